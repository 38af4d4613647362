//! The checks behind the fuzz targets in `fuzz/` (cargo fuzz, nightly) and
//! behind `tests/fuzz_corpus.rs`, which replays the saved corpus on stable.
//! Each `check` takes the raw fuzz input, drives one entry point with it
//! and panics when an invariant breaks: not only "no panic", but what the
//! entry point promises (round trips, bounds, no frames before `AuthOk`,
//! no secrets in errors). Not part of the API.
//!
//! | target    | entry point                                            |
//! |-----------|--------------------------------------------------------|
//! | `frame`   | [`crate::protocol::codec::split_frame`], [`crate::protocol::codec::Frame::decode`] |
//! | `session` | [`crate::session::Session`] fed bytes, time and shard events   |
//! | `push`    | push-port framing and request checks ([`crate::push`])         |
//! | `http`    | the sidecars' HTTP request reader and parser ([`crate::http`]) |
//! | `config`  | [`crate::config::Config::from_toml_str`]                       |
//! | `ws_decoder`, `ws_handshake` | the WebSocket decoder and upgrade ([`crate::conn::ws`]) |

pub mod alloc;
pub mod config;
pub mod frame;
pub mod http;
pub mod push;
pub mod seeds;
pub mod session;
pub mod ws;

/// A target's check: panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name: the directory names under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("frame", frame::check),
    ("session", session::check),
    ("push", push::check),
    ("http", http::check),
    ("config", config::check),
    ("ws_decoder", ws::check_decoder),
    ("ws_handshake", ws::check_handshake),
];

/// Reads a fuzz input as a sequence of small decisions. Past the end it
/// yields zeros, so every input is a valid (if short) program.
pub(crate) struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// A length byte, then that many bytes.
    pub(crate) fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8());
        self.bytes(n)
    }

    /// A string of up to `max` bytes (lossy UTF-8: ids may hold anything,
    /// NUL included).
    pub(crate) fn string(&mut self, max: usize) -> String {
        let n = usize::from(self.u8()) % (max + 1);
        String::from_utf8_lossy(self.bytes(n)).into_owned()
    }

    /// The rest of the input.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}
