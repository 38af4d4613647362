//! The sidecars' HTTP/1.1 request parser ([`crate::http`]) as the server's
//! event loop drives it: bytes arrive in pieces, `find_head_end` searches
//! only what it has not searched before, whole heads are parsed and their
//! bodies taken, keep-alive included.
//!
//! Input: one byte per piece gives its length, the rest is what the client
//! sends. Invariants:
//! - the incremental search finds the same head end as a search of the
//!   whole input from its start, and never past `MAX_HEAD` + 4;
//! - a parsed head announces a body within the body limit;
//! - percent-decoding follows the spec: `+` is a space, `%` and two hex
//!   digits is a byte, anything else stays as it is.

use super::Input;
use crate::http::{MAX_HEAD, find_head_end, parse_head, percent_decode};

/// `crate::http::MAX_BODY`.
const MAX_BODY: usize = 64 * 1024;

pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let piece = usize::from(input.u8() % 16) + 1;
    let bytes = input.rest();
    check_percent_decode(&String::from_utf8_lossy(bytes));
    // What the server holds for the connection, and how far it searched.
    let mut held: Vec<u8> = Vec::new();
    let mut scanned = 0;
    for chunk in bytes.chunks(piece) {
        held.extend_from_slice(chunk);
        loop {
            let found = find_head_end(&held, scanned);
            assert_eq!(found, find_head_end(&held, 0), "the incremental search differs from a full one");
            // As `process` does.
            if found.is_none() {
                scanned = held.len();
            }
            let end = match found {
                Some(end) if end <= MAX_HEAD => end,
                // 431 and the connection closes.
                Some(end) => return assert!(end <= MAX_HEAD + 4, "head end {end}"),
                None if held.len() > MAX_HEAD => return,
                None => break,
            };
            assert!(held[..end].ends_with(b"\r\n\r\n") || held[..end].ends_with(b"\n\n"));
            // 400 and the connection closes.
            let Ok(head) = parse_head(&held[..end]) else { return };
            assert!(head.body_len <= MAX_BODY, "body of {} bytes", head.body_len);
            assert!(!head.method.is_empty());
            if held.len() < end + head.body_len {
                break;
            }
            held.drain(..end + head.body_len);
            scanned = 0;
            if head.close {
                return;
            }
        }
    }
}

/// `percent_decode` against the rule written out byte by byte.
fn check_percent_decode(text: &str) {
    let bytes = text.as_bytes();
    let mut expected = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => expected.push(b' '),
            b'%' if i + 2 < bytes.len() && bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit() => {
                let hex = |b: u8| (b as char).to_digit(16).map_or(0, |d| d as u8);
                expected.push(hex(bytes[i + 1]) << 4 | hex(bytes[i + 2]));
                i += 2;
            }
            b => expected.push(b),
        }
        i += 1;
    }
    assert_eq!(percent_decode(text), String::from_utf8_lossy(&expected), "percent_decode({text:?})");
}
