//! Fuzz targets `ws_decoder` and `ws_handshake`: the WebSocket decoder and
//! the upgrade's head reader and parser ([`crate::conn::ws`]). The first
//! input byte sets the size of the reads the rest is cut into, so split
//! headers and payloads are exercised. Invariants: no panic; the decoder
//! never hands out more bytes than it was given and every error maps to a
//! status valid on the wire; the head reader never holds more than its
//! limit; every refusal is a 4xx answer that does not echo a token.

use std::time::Instant;

use crate::conn::ws::decode::Decoder;
use crate::conn::ws::handshake::{self, Feed, HandshakeConfig, HeadReader};

pub fn check_decoder(data: &[u8]) {
    let Some((&step, rest)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let mut decoder = Decoder::new();
    for chunk in rest.chunks(step) {
        let mut buf = chunk.to_vec();
        match decoder.decode(&mut buf, 4096) {
            Ok(out) => assert!(out.data_len <= buf.len()),
            Err(err) => {
                assert!(err.close_code().is_valid_on_wire());
                return;
            }
        }
    }
}

pub fn check_handshake(data: &[u8]) {
    let Some((&step, rest)) = data.split_first() else { return };
    let step = usize::from(step).max(1);
    let cfg = HandshakeConfig { max_head_bytes: 1024, ..HandshakeConfig::default() };
    let mut reader = HeadReader::new(&cfg, Instant::now());
    for chunk in rest.chunks(step) {
        match reader.feed(chunk) {
            Ok(Feed::Incomplete) => {}
            Ok(Feed::Complete { consumed }) => {
                assert!(consumed <= chunk.len());
                match handshake::parse_request(reader.head(), &cfg) {
                    Ok(ok) => {
                        let response = ok.response();
                        assert!(response.starts_with(b"HTTP/1.1 101"));
                        if let Some(token) = &ok.token {
                            let shown = String::from_utf8_lossy(&response);
                            assert!(token.expose().is_empty() || !shown.contains(token.expose()));
                        }
                    }
                    Err(err) => assert!(err.response().starts_with(b"HTTP/1.1 4")),
                }
                return;
            }
            Err(err) => {
                assert!(reader.head().len() <= cfg.max_head_bytes);
                assert!(err.response().starts_with(b"HTTP/1.1 4"));
                return;
            }
        }
    }
}

/// Seeds: a valid upgrade (with a token entry) read a few bytes at a time,
/// and client frames (masked Auth-sized binary, ping, close, unmasked,
/// fragmented).
pub fn seeds_decoder() -> Vec<(&'static str, Vec<u8>)> {
    let mask = [1u8, 2, 3, 4];
    let masked = |first: u8, payload: &[u8]| {
        let mut out = vec![first, 0x80 | payload.len() as u8];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    };
    vec![
        ("binary", [&[7u8][..], &masked(0x82, b"\xa7\x01\x01\x00\x00\x00\x00\x00")].concat()),
        ("ping-close", [&[3u8][..], &masked(0x89, b"hi"), &masked(0x88, b"\x03\xe8bye")].concat()),
        ("fragments", [&[2u8][..], &masked(0x02, b"abc"), &masked(0x80, b"def")].concat()),
        ("unmasked", vec![1, 0x82, 0x02, b'a', b'b']),
        ("long-length", vec![5, 0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]),
    ]
}

pub fn seeds_handshake() -> Vec<(&'static str, Vec<u8>)> {
    let req = "GET /v1/ws?token=abc HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
               Sec-WebSocket-Protocol: longlink.v1, longlink.token.abc\r\n\r\n";
    vec![
        ("upgrade", [&[9u8][..], req.as_bytes()].concat()),
        ("bare-lf", [&[200u8][..], req.replace("\r\n", "\n").as_bytes(), b"\r\n\r\n"].concat()),
        ("too-long", [&[255u8][..], &vec![b'a'; 2000]].concat()),
    ]
}
