//! Close status codes: RFC 6455's, and how longlink's error codes travel.
//!
//! A longlink code (1xxx reconnect, 2xxx terminal; `proto::ErrorCode`) cannot
//! be sent as `4000 + code`: that gives 5000..=6006, and RFC 6455 7.4 only
//! allows 1000..=4999 on the wire (browsers fail the connection on anything
//! else). So the private range 4000..=4999 is split in two halves that keep
//! the reconnect/terminal distinction a browser can branch on:
//!
//! ```text
//! longlink 1000..=1499 (reconnect) -> 4000 + (code - 1000)  = 4000..=4499
//! longlink 2000..=2499 (terminal)  -> 4500 + (code - 2000)  = 4500..=4999
//! ```
//!
//! and the close reason starts with the exact longlink code in decimal
//! ("2002 invalid token"), so a client can always recover it.

/// A WebSocket close status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// Sent for text messages: longlink frames are binary.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// A close reason that is not UTF-8.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);

    /// Whether a peer may send this code in a Close frame (RFC 6455 7.4.1 and
    /// the IANA registry: 1004-1006 and 1015 are reserved for local use).
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Longlink codes are `i32` in the proto; only 1000..=1499 and 2000..=2499
/// have a slot in the WebSocket range.
pub fn from_longlink(code: i32) -> CloseCode {
    match code {
        1000..=1499 => CloseCode(4000 + (code - 1000) as u16),
        2000..=2499 => CloseCode(4500 + (code - 2000) as u16),
        // Unspecified or out of range: the client treats it like SERVER_ERROR.
        _ => CloseCode::INTERNAL_ERROR,
    }
}

/// The longlink code a close status carries, if it is one of ours.
pub fn to_longlink(code: CloseCode) -> Option<i32> {
    match code.0 {
        4000..=4499 => Some(1000 + i32::from(code.0 - 4000)),
        4500..=4999 => Some(2000 + i32::from(code.0 - 4500)),
        _ => None,
    }
}

/// Longest close reason: a control payload is at most 125 bytes, 2 of them
/// the status code.
pub const MAX_REASON_BYTES: usize = 123;

/// `"<code> <summary>"`, cut at a character boundary to fit a Close frame.
pub fn longlink_reason(code: i32, summary: &str) -> String {
    let mut reason = format!("{code} {summary}");
    truncate_utf8(&mut reason, MAX_REASON_BYTES);
    reason
}

/// Cuts `s` to at most `max` bytes without splitting a character.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code in longlink's proto today (`ErrorCode`).
    const LONGLINK_CODES: &[i32] = &[
        1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 2000, 2001, 2002, 2003, 2004, 2005,
        2006,
    ];

    #[test]
    fn every_longlink_code_maps_into_the_private_range_and_back() {
        for &code in LONGLINK_CODES {
            let ws = from_longlink(code);
            assert!((4000..=4999).contains(&ws.0), "{code} -> {ws:?}");
            assert!(ws.is_valid_on_wire());
            assert_eq!(to_longlink(ws), Some(code));
            // The reconnect/terminal split survives in the WebSocket code.
            assert_eq!(ws.0 < 4500, code < 2000, "{code}");
        }
        assert_eq!(from_longlink(0), CloseCode::INTERNAL_ERROR);
        assert_eq!(from_longlink(3000), CloseCode::INTERNAL_ERROR);
        assert_eq!(to_longlink(CloseCode::NORMAL), None);
    }

    #[test]
    fn reasons_carry_the_code_and_fit_a_control_frame() {
        assert_eq!(longlink_reason(2002, "invalid token"), "2002 invalid token");
        let long = longlink_reason(1003, &"é".repeat(100));
        assert!(long.len() <= MAX_REASON_BYTES && long.starts_with("1003 "));
        assert!(std::str::from_utf8(long.as_bytes()).is_ok());
    }

    #[test]
    fn reserved_codes_are_not_valid_on_the_wire() {
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 6002, u16::MAX] {
            assert!(!CloseCode(bad).is_valid_on_wire(), "{bad}");
        }
        for good in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 4000, 4999] {
            assert!(CloseCode(good).is_valid_on_wire(), "{good}");
        }
    }
}
