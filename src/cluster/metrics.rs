//! The node's cluster counters (all shards, any thread) and their
//! Prometheus families for the admin endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::codec::Frame;
pub use crate::stats::{AtomicHistogram, DISCONNECT_CODES, HIST_BOUNDS_US, PUSH_RESULTS};

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
