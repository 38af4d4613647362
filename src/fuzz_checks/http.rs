//! The sidecars' HTTP/1.1 request reader and parser ([`crate::http`]): a
//! connection's bytes, read head by head as `serve` does, keep-alive
//! included.
//!
//! Input: one byte picks the head limit (small, so it is reachable), the
//! rest is what the client sends. Invariants:
//! - reading a head never takes in more than the limit (plus the byte
//!   that crosses it), however long a line is;
//! - a parsed head announces a body within the body limit;
//! - percent-decoding follows the spec: `+` is a space, `%` and two hex
//!   digits is a byte, anything else stays as it is.

use std::io::{BufRead, Cursor, Read};

use super::Input;
use crate::http::{parse_head, percent_decode, read_head};

/// `crate::http::MAX_BODY`.
const MAX_BODY: usize = 64 * 1024;

pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let max_head = [64, 200, 1024][usize::from(input.u8() % 3)];
    let bytes = input.rest();
    check_percent_decode(&String::from_utf8_lossy(bytes));
    let mut reader = Cursor::new(bytes);
    // Each round consumes at least one byte or stops.
    for _ in 0..=bytes.len() {
        let start = reader.position();
        let head = read_head(&mut reader, max_head);
        let consumed = (reader.position() - start) as usize;
        assert!(consumed <= max_head + 1, "read {consumed} bytes of a head (limit {max_head})");
        let head = match head {
            Ok(Some(head)) => head,
            Ok(None) => {
                assert!(consumed == 0 && reader.fill_buf().is_ok_and(|b| b.is_empty()));
                return;
            }
            // `serve` drops the connection.
            Err(_) => return,
        };
        assert!(head.len() <= max_head && (head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n")));
        let Ok(parsed) = parse_head(&head) else { return };
        assert!(parsed.body_len <= MAX_BODY, "body of {} bytes", parsed.body_len);
        assert!(!parsed.method.is_empty());
        let mut body = vec![0; parsed.body_len];
        if reader.read_exact(&mut body).is_err() || parsed.close {
            return;
        }
    }
    panic!("read_head made no progress");
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
