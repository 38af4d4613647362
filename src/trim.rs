//! Giving freed memory back to the system after many connections closed.
//!
//! glibc keeps freed chunks in its per-thread arenas and returns only the
//! top of a heap: after thousands of connections close (an attack of
//! partial frames, a mass reconnect), the resident size stays at its peak
//! although nothing is used. `malloc_trim(0)` releases every free page of
//! every arena. It walks the arenas under their locks, so it runs rarely:
//! only when a shard's connections fell by [`TrimWatch::DROP`] since their
//! last high point, at most once per [`TrimWatch::EVERY`].

use std::time::{Duration, Instant};

/// Follows one shard's connection count; says when to trim.
#[derive(Debug)]
pub struct TrimWatch {
    high: usize,
    last: Option<Instant>,
}

impl Default for TrimWatch {
    fn default() -> Self {
        TrimWatch::new()
    }
}

impl TrimWatch {
    /// Connections that must have closed since the high point.
    pub const DROP: usize = 1024;
    pub const EVERY: Duration = Duration::from_secs(5);

    pub fn new() -> TrimWatch {
        TrimWatch { high: 0, last: None }
    }

    /// Notes the shard's connection count; trims when it fell enough.
    /// Returns whether it trimmed.
    pub fn observe(&mut self, conns: usize, now: Instant) -> bool {
        self.high = self.high.max(conns);
        if self.high - conns < Self::DROP || self.last.is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY) {
            return false;
        }
        self.high = conns;
        self.last = Some(now);
        release_free_memory();
        true
    }
}

/// Returns free heap pages to the system (glibc only; elsewhere a no-op).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_large_drop_at_most_once_per_period() {
        let mut w = TrimWatch::new();
        let t0 = Instant::now();
        assert!(!w.observe(5_000, t0));
        assert!(!w.observe(4_000, t0), "1,000 closed: not enough");
        assert!(w.observe(3_000, t0));
        assert!(!w.observe(0, t0 + Duration::from_secs(1)), "too soon");
        assert!(w.observe(0, t0 + TrimWatch::EVERY + Duration::from_secs(1)));
        assert!(!w.observe(0, t0 + Duration::from_secs(60)), "nothing closed since");
    }
}
