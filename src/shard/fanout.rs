//! Broadcast pacing: queued broadcasts delivered at the configured rate.
//! The queue is the state's; the shard's pacer task (`Shard::pacer_loop`)
//! refills the budget from the clock and passes the time in.

use super::*;

impl State {
    /// Spends `budget` deliveries on queued broadcasts, handing each
    /// active session's copy to `deliver`; true when none is left. A
    /// broadcast whose TTL passed at `now` is dropped, its undelivered
    /// sessions counted as expired.
    pub(super) fn pace_step(
        &mut self,
        budget: &mut TokenBucket,
        now: Instant,
        counters: &ShardCounters,
        mut deliver: impl FnMut(&mut State, u32, &Bytes) -> bool,
    ) -> bool {
        while budget.tokens() >= 1.0 {
            let Some(mut job) = self.broadcasts.pop_front() else { return true };
            if job.expires_at.is_some_and(|t| now >= t) {
                let left = self.conns.iter().filter(|(i, c)| *i >= job.cursor && c.is_active()).count();
                counters.broadcast_expired.fetch_add(left as u64, Ordering::Relaxed);
                release_broadcast(counters, &job);
                continue;
            }
            let end = self.conns.capacity();
            while job.cursor < end && budget.tokens() >= 1.0 {
                let slot = job.cursor as u32;
                job.cursor += 1;
                if self.conns.get(slot as usize).is_some_and(Conn::is_active) && deliver(self, slot, &job.frame) {
                    budget.try_take();
                }
            }
            if job.cursor < end {
                self.broadcasts.push_front(job);
            } else {
                release_broadcast(counters, &job);
            }
        }
        self.broadcasts.is_empty()
    }
}

/// Gives back the room [`Shard::reserve_broadcast`] took on this shard.
fn release_broadcast(counters: &ShardCounters, job: &BroadcastJob) {
    counters.broadcast_queued_bytes.fetch_sub(broadcast_cost(job.frame.len()), Ordering::AcqRel);
}
