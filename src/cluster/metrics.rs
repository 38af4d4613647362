//! The node's cluster counters (all shards, any thread) and their
//! Prometheus families for the admin endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::codec::Frame;
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

impl ClusterCounters {
    pub(crate) fn count_reply(&self, reply: &Frame) {
        let count = |status: i32| {
            if let Some(i) = PUSH_RESULTS.iter().position(|s| *s as i32 == status) {
                self.push_results[i].fetch_add(1, Ordering::Relaxed);
            }
        };
        match reply {
            Frame::PushReply(r) if r.results.is_empty() => count(r.status),
            Frame::PushReply(r) => r.results.iter().for_each(|t| count(t.status)),
            Frame::RequestError(_) => {
                self.request_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

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

/// Cluster counters of the node (all shards), for /metrics.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub claims: AtomicU64,
    pub claim_failures: AtomicU64,
    pub remote_kicks: AtomicU64,
    pub releases: AtomicU64,
    pub reasserts: AtomicU64,
    pub lookups: AtomicU64,
    pub lookup_failures: AtomicU64,
    /// Requests this node forwarded to others, and those that failed.
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
    /// Requests other nodes forwarded to this one.
    pub forwarded_in: AtomicU64,
    /// Cluster requests answered, by how they ended.
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub go_away_sent: AtomicU64,
    /// Revocations stored in Redis, and those that could not be.
    pub revocations_stored: AtomicU64,
    pub revocation_store_failures: AtomicU64,
    /// Reads of the stored revocations that failed (retried).
    pub revocation_sync_failures: AtomicU64,
    /// Push targets by result ([`PUSH_RESULTS`] order); group and
    /// broadcast pushes count once.
    pub push_results: [AtomicU64; PUSH_RESULTS.len()],
    /// Sessions ended, by [`DISCONNECT_CODES`] index (last: other codes).
    pub disconnects: [AtomicU64; DISCONNECT_CODES.len() + 1],
    pub router_latency: AtomicHistogram,
    pub forward_latency: AtomicHistogram,
    pub request_latency: AtomicHistogram,
}
