//! The per-connection rate limit on requests: a token bucket, paused
//! reads while it is empty, a close after too long paused.

use super::*;
use crate::rate::TokenBucket;

/// Per-connection upstream state, created on the connection's first
/// request and dropped when its bucket is full again (or it closes).
pub(super) struct ConnUp {
    /// The connection's encoded `ConnInfo`, spliced into every request.
    pub(super) info: Bytes,
    pub(super) bucket: TokenBucket,
    pub(super) paused_since: Option<Millis>,
    pub(super) window_start: Millis,
    pub(super) paused_in_window_ms: u64,
}

impl ConnUp {
    pub(super) fn refill(&mut self, now: Millis, rate: u32, burst: u32) {
        self.bucket.refill(now, f64::from(rate), f64::from(burst));
    }

    /// Paused time in the current window, counting a pause in progress.
    pub(super) fn paused_ms(&mut self, now: Millis, window_ms: u64) -> u64 {
        if now.0.saturating_sub(self.window_start.0) >= window_ms {
            self.window_start = now;
            self.paused_in_window_ms = 0;
        }
        self.paused_in_window_ms + self.paused_since.map_or(0, |t| now.0.saturating_sub(t.0))
    }
}

/// What a rate-limit check found.
pub(super) enum Unpause {
    Resume(ConnKey),
    Close(ConnKey, u64),
}
