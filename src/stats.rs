//! Metric primitives every layer records into (a latency histogram, the
//! codes and results counted by label): a leaf module, so delivery, the
//! shard and the cluster share them without importing each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::proto::{ErrorCode, PushStatus};

/// Disconnect codes counted separately (others count as "other").
pub const DISCONNECT_CODES: [ErrorCode; 10] = [
    ErrorCode::Unspecified,
    ErrorCode::Shutdown,
    ErrorCode::GoingAway,
    ErrorCode::Slow,
    ErrorCode::Replaced,
    ErrorCode::Kicked,
    ErrorCode::IdleTimeout,
    ErrorCode::BadFrame,
    ErrorCode::RateLimited,
    ErrorCode::LimitExceeded,
];

/// Push results counted for /metrics.
pub const PUSH_RESULTS: [PushStatus; 5] =
    [PushStatus::Delivered, PushStatus::NotOnline, PushStatus::Stored, PushStatus::Rejected, PushStatus::Accepted];

/// A latency histogram with fixed bounds, written by any thread.
#[derive(Debug)]
pub struct AtomicHistogram {
    counts: [AtomicU64; HIST_BOUNDS_US.len() + 1],
}

/// Upper bounds of the buckets, in microseconds.
pub const HIST_BOUNDS_US: [u64; 14] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000];

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram { counts: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl AtomicHistogram {
    pub fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros() as u64;
        let i = HIST_BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(HIST_BOUNDS_US.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// An hdrhistogram with each bucket's count at its bound (for the
    /// exposition, which reports the same bounds).
    pub fn snapshot(&self) -> hdrhistogram::Histogram<u64> {
        // Invariant: 3 significant digits is a valid precision.
        let mut h = hdrhistogram::Histogram::new(3).expect("valid histogram precision");
        for (i, c) in self.counts.iter().enumerate() {
            let bound = HIST_BOUNDS_US.get(i).copied().unwrap_or(10_000_000);
            let _ = h.record_n(bound, c.load(Ordering::Relaxed));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let h = AtomicHistogram::default();
        h.record(Duration::from_micros(40));
        h.record(Duration::from_micros(700));
        h.record(Duration::from_secs(9));
        let s = h.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!(s.count_between(0, 50), 1);
    }
}
