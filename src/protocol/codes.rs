//! The one table of error and disconnect codes.
//!
//! Every code the node sends in an `Error` or `Kicked` frame is listed here
//! with whether the client may reconnect. The numbers live in
//! `proto/longlink.proto` (`ErrorCode`); 1xxx allow reconnecting, 2xxx are
//! terminal. A test checks that the proto enum and this table agree.

use crate::protocol::proto::{self, ErrorCode};

/// What a client should do after receiving a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Reconnect with backoff (possibly after refreshing the token).
    Reconnect,
    /// Do not reconnect with the same credentials or build.
    Terminal,
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct CodeInfo {
    pub code: ErrorCode,
    pub disposition: Disposition,
    /// Default reason text, used when the caller has nothing more specific.
    pub summary: &'static str,
}

use Disposition::{Reconnect, Terminal};

const fn row(code: ErrorCode, disposition: Disposition, summary: &'static str) -> CodeInfo {
    CodeInfo { code, disposition, summary }
}

/// Every code, in proto order.
pub const TABLE: &[CodeInfo] = &[
    row(ErrorCode::Shutdown, Reconnect, "node shutting down"),
    row(ErrorCode::IdleTimeout, Reconnect, "no frame within the idle timeout"),
    row(ErrorCode::AuthTimeout, Reconnect, "no Auth frame within the auth deadline"),
    row(ErrorCode::ServerError, Reconnect, "internal server error"),
    row(ErrorCode::Slow, Reconnect, "client not reading fast enough"),
    row(ErrorCode::RateLimited, Reconnect, "too many requests"),
    row(ErrorCode::TokenExpired, Reconnect, "token expired; fetch a new one"),
    row(ErrorCode::TokenNotYetValid, Reconnect, "token not yet valid; check the clock"),
    row(ErrorCode::GoingAway, Reconnect, "node draining; reconnect elsewhere"),
    row(ErrorCode::Busy, Reconnect, "service saturated"),
    row(ErrorCode::Unavailable, Reconnect, "no backend or route available"),
    row(ErrorCode::Timeout, Reconnect, "request timed out"),
    row(ErrorCode::BadFrame, Terminal, "malformed frame"),
    row(ErrorCode::FrameTooLarge, Terminal, "frame larger than the limit"),
    row(ErrorCode::InvalidToken, Terminal, "invalid token"),
    row(ErrorCode::Replaced, Terminal, "the device logged in on another connection"),
    row(ErrorCode::Kicked, Terminal, "session ended by a backend"),
    row(ErrorCode::UnsupportedVersion, Terminal, "protocol version not supported"),
    row(ErrorCode::LimitExceeded, Terminal, "a per-session limit was exceeded"),
    row(ErrorCode::Unauthenticated, Terminal, "no valid credential"),
    row(ErrorCode::PermissionDenied, Terminal, "the credential does not allow this"),
    row(ErrorCode::Revoked, Terminal, "the token was revoked; get a new one"),
];

/// The table row for `code`; `Unspecified` maps to SERVER_ERROR's row.
pub fn info(code: ErrorCode) -> &'static CodeInfo {
    TABLE.iter().find(|r| r.code == code).unwrap_or(&TABLE[3])
}

/// Whether a client may reconnect after `code`.
pub fn reconnect_allowed(code: ErrorCode) -> bool {
    info(code).disposition == Reconnect
}

/// The `RequestError` a push-port request is answered with (`request_id` 0
/// for a reply whose id is set later, as cluster parts are).
pub fn request_error(request_id: u64, code: ErrorCode, reason: impl Into<String>) -> proto::RequestError {
    proto::RequestError { request_id, code: code as i32, reason: reason.into() }
}

/// The `Error` body for `code`; an empty `reason` takes the table's summary.
pub fn error_body(code: ErrorCode, reason: impl Into<String>) -> proto::Error {
    let mut reason = reason.into();
    if reason.is_empty() {
        reason = info(code).summary.to_owned();
    }
    proto::Error { code: code as i32, reason, reconnect: reconnect_allowed(code) }
}

/// Decodes a code number from the wire; unknown numbers are kept as
/// SERVER_ERROR-like "unspecified" so an older client still acts sensibly:
/// 1xxx reconnect, anything else terminal.
pub fn from_wire(code: i32) -> ErrorCode {
    ErrorCode::try_from(code).unwrap_or(ErrorCode::Unspecified)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_every_proto_code_and_ranges_match() {
        for n in 0..3000 {
            let Ok(code) = ErrorCode::try_from(n) else { continue };
            if code == ErrorCode::Unspecified {
                continue;
            }
            let row = TABLE.iter().find(|r| r.code == code);
            let row = row.unwrap_or_else(|| panic!("{code:?} missing from codes::TABLE"));
            let expect = if (1000..2000).contains(&n) { Reconnect } else { Terminal };
            assert_eq!(row.disposition, expect, "{code:?} is in the wrong range");
        }
        assert_eq!(TABLE.len(), TABLE.iter().map(|r| r.code).collect::<std::collections::HashSet<_>>().len());
    }

    #[test]
    fn error_body_fills_reason_and_flag() {
        let e = error_body(ErrorCode::IdleTimeout, "");
        assert!(e.reconnect);
        assert_eq!(e.reason, "no frame within the idle timeout");
        assert!(!error_body(ErrorCode::Replaced, "x").reconnect);
    }
}
