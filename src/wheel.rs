//! A coarse timer wheel: one per shard, driving every session deadline.
//!
//! Each live session sits in exactly one bucket (8 bytes: its [`ConnKey`]).
//! Deadlines move often (every frame pushes the idle deadline out) but the
//! wheel is not told: when a bucket comes due, the shard checks each
//! session's real deadline and re-files the ones not yet due. A deadline
//! that moves *earlier* (closing linger) is filed once more; visiting a
//! session twice is harmless because the check is against its real deadline.

use crate::protocol::ids::ConnKey;
use crate::protocol::time::Millis;

pub struct Wheel {
    tick_ms: u64,
    /// `buckets[t % len]` holds keys due at tick `t` (or later, for deadlines
    /// beyond the wheel's span).
    buckets: Vec<Vec<ConnKey>>,
    /// Every tick before this one has been expired.
    next_tick: u64,
}

impl Wheel {
    /// A wheel of `slots` buckets of `tick_ms` each, starting at `now`.
    pub fn new(tick_ms: u64, slots: usize, now: Millis) -> Wheel {
        let tick_ms = tick_ms.max(1);
        Wheel { tick_ms, buckets: (0..slots.max(2)).map(|_| Vec::new()).collect(), next_tick: now.0 / tick_ms }
    }

    pub fn tick_ms(&self) -> u64 {
        self.tick_ms
    }

    /// Files `key` to be looked at once `deadline` has passed (rounded up to
    /// the next tick; capped at the wheel's span).
    pub fn insert(&mut self, key: ConnKey, deadline: Millis) {
        let span = self.buckets.len() as u64;
        let tick = deadline.0.div_ceil(self.tick_ms).clamp(self.next_tick, self.next_tick + span - 1);
        self.buckets[(tick % span) as usize].push(key);
    }

    /// Moves every key whose bucket is due at `now` into `out`. The caller
    /// re-inserts the keys whose sessions are not actually due.
    pub fn expire(&mut self, now: Millis, out: &mut Vec<ConnKey>) {
        let now_tick = now.0 / self.tick_ms;
        let span = self.buckets.len() as u64;
        // After a long stall, one pass over all buckets is enough.
        let end = now_tick.min(self.next_tick + span - 1);
        while self.next_tick <= end {
            let idx = (self.next_tick % span) as usize;
            // Take the bucket's buffer too: `append` would leave every bucket
            // holding its high-water capacity, which adds up over thousands
            // of buckets as sessions are re-filed around the wheel.
            out.extend(std::mem::take(&mut self.buckets[idx]));
            self.next_tick += 1;
        }
        self.next_tick = self.next_tick.max(now_tick + 1);
    }

    /// Keys filed in total (including duplicates).
    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(Vec::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> ConnKey {
        ConnKey { index: i, generation: 0 }
    }

    #[test]
    fn fires_at_or_after_deadline_never_before() {
        let mut w = Wheel::new(100, 64, Millis(0));
        w.insert(key(1), Millis(250));
        w.insert(key(2), Millis(300));
        let mut out = Vec::new();
        w.expire(Millis(249), &mut out);
        assert!(out.is_empty());
        w.expire(Millis(299), &mut out);
        assert!(out.is_empty(), "250 rounds up to tick 3");
        w.expire(Millis(300), &mut out);
        assert_eq!(out, vec![key(1), key(2)]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadline_fires_on_next_expire() {
        let mut w = Wheel::new(100, 8, Millis(1_000));
        w.insert(key(1), Millis(10));
        let mut out = Vec::new();
        w.expire(Millis(1_000), &mut out);
        assert_eq!(out, vec![key(1)]);
    }

    #[test]
    fn far_deadline_is_capped_at_the_span_and_refiled() {
        let mut w = Wheel::new(100, 8, Millis(0));
        w.insert(key(1), Millis(5_000));
        let mut out = Vec::new();
        w.expire(Millis(699), &mut out);
        assert!(out.is_empty());
        w.expire(Millis(700), &mut out);
        assert_eq!(out, vec![key(1)], "capped at the last bucket of the span");
    }

    #[test]
    fn expired_buckets_release_their_memory() {
        let mut w = Wheel::new(10, 16, Millis(0));
        for i in 0..1000 {
            w.insert(key(i), Millis(50));
        }
        let mut out = Vec::new();
        w.expire(Millis(60), &mut out);
        assert_eq!(out.len(), 1000);
        assert!(w.buckets.iter().all(|b| b.capacity() == 0));
    }

    #[test]
    fn long_stall_drains_everything_once() {
        let mut w = Wheel::new(10, 16, Millis(0));
        for i in 0..100 {
            w.insert(key(i), Millis(u64::from(i) * 3));
        }
        let mut out = Vec::new();
        w.expire(Millis(1_000_000), &mut out);
        assert_eq!(out.len(), 100);
        assert!(w.is_empty());
        w.insert(key(7), Millis(1_000_050));
        out.clear();
        w.expire(Millis(1_000_040), &mut out);
        assert!(out.is_empty());
        w.expire(Millis(1_000_050), &mut out);
        assert_eq!(out, vec![key(7)]);
    }
}
