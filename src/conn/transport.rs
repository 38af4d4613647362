//! The seam below framing: what a transport does between the socket and
//! the frame codec.
//!
//! A shard serves several transports side by side, so the kind is a
//! per-connection [`Link`] in the session's slot (one byte), and the
//! per-connection state of a transport lives with the connection's other
//! busy-time state (dropped while idle: an idle WebSocket session keeps no
//! decoder, no buffer):
//! - Inbound, the connection task turns what one read put in the shard's
//!   scratch buffer into frame bytes, in place (WebSocket unmasks and
//!   strips headers: [`crate::conn::ws::Decoder`]).
//! - Outbound, [`Wrapper::wrap`] makes a message's wire form; a fan-out
//!   passes the same `Bytes` for every member, and the wire form is built
//!   once per message and shared (WebSocket: one header and one copy per
//!   message, not per member).
//! - A connection handed to its owner shard carries its link and transport
//!   state with the session (`Transit`).

use bytes::{Bytes, BytesMut};

use super::ws;

/// How a connection's bytes reach the frame codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Link {
    /// Plain TCP: socket bytes are frame bytes.
    #[default]
    Plain,
    /// WebSocket, before the upgrade completed: nothing but the 101 (or an
    /// HTTP error) may be written.
    WsUpgrade,
    /// WebSocket: every frame goes out in a binary message.
    Ws,
    /// TLS (`tls_listen`): plain frames inside TLS records.
    Tls,
    /// WebSocket over TLS (`wss_listen`), before and after the upgrade.
    WssUpgrade,
    Wss,
}

impl Link {
    pub fn is_ws(self) -> bool {
        matches!(self.form(), Link::WsUpgrade | Link::Ws)
    }

    /// Whether records are sealed per connection (no direct writes: the
    /// connection task encrypts at flush time).
    pub fn is_tls(self) -> bool {
        matches!(self, Link::Tls | Link::WssUpgrade | Link::Wss)
    }

    /// The link as it frames plaintext (TLS taken off).
    pub fn form(self) -> Link {
        match self {
            Link::Tls => Link::Plain,
            Link::WssUpgrade => Link::WsUpgrade,
            Link::Wss => Link::Ws,
            other => other,
        }
    }

    /// The link once its WebSocket upgrade is answered.
    pub fn upgraded(self) -> Link {
        match self {
            Link::WsUpgrade => Link::Ws,
            Link::WssUpgrade => Link::Wss,
            other => other,
        }
    }
}

/// Longest carried input while the TLS handshake runs: rustls keeps a
/// handshake message spanning records in the caller's buffer until it is
/// whole (up to 64 KiB); real ClientHellos are a few KiB. (Security review
/// finding 3.)
pub const MAX_TLS_HANDSHAKE_TAIL: usize = 16 * 1024 + 5;

/// A TLS connection's state, kept by its connection task (it is used only
/// there: every TLS write goes through the task, which seals at flush).
/// Idle, it is the record layer and two empty pointers: the buffers exist
/// only while something is carried or queued.
pub struct TlsLink {
    /// rustls' record layer, or the compact one after a TLS 1.3 handshake.
    pub session: crate::conn::tls::ServerRecords,
    /// An incomplete record from the last read (at most one record once the
    /// handshake is done: rustls refuses longer record headers).
    pub tail: Option<Box<[u8]>>,
    /// Sealed records not yet written, in seal order: handshake records,
    /// alerts and KeyUpdate answers from reads, and sealed frames. A
    /// record's sequence number is spent once sealed, so these are never
    /// dropped or re-sealed. Frames are sealed only when this is empty.
    pub cipher: SealedQueue,
    /// close_notify was queued.
    pub sent_close: bool,
}

impl TlsLink {
    pub fn new(session: crate::conn::tls::ServerTls) -> TlsLink {
        let session = crate::conn::tls::ServerRecords::new(session);
        TlsLink { session, tail: None, cipher: SealedQueue::default(), sent_close: false }
    }

    /// Seals every frame of `plain` (the connection's out-queue) into one
    /// batch of records behind what is already sealed. Nothing is sealed
    /// during the handshake.
    pub fn seal(&mut self, plain: &mut super::OutQueue) -> Result<(), crate::conn::tls::TlsError> {
        if plain.is_empty() || self.session.is_handshaking() || self.sent_close {
            return Ok(());
        }
        let mut text = Vec::with_capacity(plain.bytes());
        plain.drain_into(&mut text);
        let mut sealed = Vec::with_capacity(text.len() + 64);
        self.session.write(&text, &mut sealed)?;
        self.cipher.push(Bytes::from(sealed));
        Ok(())
    }

    /// Frees the sealed queue once it is empty (idle connections keep no
    /// buffer), and the compact layer's expanded keys with it.
    pub fn release_idle(&mut self) {
        if self.cipher.is_empty() {
            self.session.release_idle();
            self.cipher.0 = None;
        }
    }
}

/// A TLS connection's sealed records: an [`super::OutQueue`] made on the
/// first push and dropped when the connection goes idle (8 bytes then).
#[derive(Default)]
pub struct SealedQueue(Option<Box<super::OutQueue>>);

impl SealedQueue {
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|q| q.is_empty())
    }

    pub fn push(&mut self, records: Bytes) {
        self.0.get_or_insert_with(Box::default).push(records);
    }

    /// As [`super::OutQueue::flush`]; `Ok(true)` when empty.
    pub fn flush(
        &mut self,
        stream: &mut glommio::net::TcpStream,
        cx: &mut std::task::Context<'_>,
    ) -> std::io::Result<bool> {
        match self.0.as_mut() {
            Some(q) => q.flush(stream, cx),
            None => Ok(true),
        }
    }

    /// As [`super::OutQueue::write_now`].
    pub fn write_now(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<bool> {
        match self.0.as_mut() {
            Some(q) => q.write_now(fd),
            None => Ok(true),
        }
    }
}

/// A WebSocket connection's state while it is busy (upgrading, mid-frame,
/// or holding a handshake token until Auth). `None` when idle.
#[derive(Debug, Default)]
pub struct WsState {
    /// The request head, until the upgrade is answered.
    pub upgrade: Option<ws::HeadReader>,
    pub decoder: ws::Decoder,
    /// Token from the URL or a subprotocol entry, for an Auth frame that
    /// carries none.
    pub token: Option<ws::handshake::Token>,
}

impl WsState {
    pub fn is_idle(&self) -> bool {
        self.upgrade.is_none() && self.decoder.is_idle() && self.token.is_none() && !self.decoder.peer_closed()
    }
}

/// Builds wire forms of outbound frames for a link, caching the last one
/// so that a fan-out (the same `Bytes` for every member) wraps once.
#[derive(Default)]
pub struct Wrapper {
    /// The last frame wrapped and its WebSocket message. Holding `source`
    /// keeps its allocation alive, so a pointer match is the same bytes.
    last: Option<(Bytes, Bytes)>,
}

impl Wrapper {
    /// The wire form of `frame` on `link`; `None` when nothing may be sent
    /// on it (an upgrade in progress).
    pub fn wrap(&mut self, link: Link, frame: &Bytes) -> Option<Bytes> {
        match link.form() {
            Link::Plain => Some(frame.clone()),
            Link::WsUpgrade => None,
            _ => {
                if let Some((source, wire)) = &self.last
                    && source.as_ptr() == frame.as_ptr()
                    && source.len() == frame.len()
                {
                    return Some(wire.clone());
                }
                let mut out = BytesMut::new();
                ws::encode::encode_binary_into(&mut out, frame);
                let wire = out.freeze();
                self.last = Some((frame.clone(), wire.clone()));
                Some(wire)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_passes_frames_through() {
        let frame = Bytes::from_static(b"msg");
        let wire = Wrapper::default().wrap(Link::Plain, &frame).unwrap();
        assert_eq!(wire.as_ptr(), frame.as_ptr(), "no copy");
        assert!(Wrapper::default().wrap(Link::WsUpgrade, &frame).is_none());
    }

    #[test]
    fn websocket_fanout_wraps_once_per_message() {
        let mut w = Wrapper::default();
        let frame = Bytes::from(vec![7u8; 300]);
        let a = w.wrap(Link::Ws, &frame).unwrap();
        let b = w.wrap(Link::Ws, &frame.clone()).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "second member shares the first one's message");
        assert_eq!(&a[..4], [0x82, 126, 1, 44]);
        assert_eq!(&a[4..], &frame[..]);
        // Another frame of the same length is another message.
        let other = Bytes::from(vec![8u8; 300]);
        let c = w.wrap(Link::Ws, &other).unwrap();
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(&c[4..], &other[..]);
    }
}
