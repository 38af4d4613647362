//! Broadcast pacing: queued broadcasts delivered at the configured rate.

use super::*;

impl Shard {
    // ---- broadcast pacing ---------------------------------------------------

    /// Delivers queued broadcasts at this shard's share of the node rate;
    /// sleeps while none is queued.
    pub async fn pacer_loop(self: Rc<Self>) {
        let Some(wake) = self.pacer_rx.borrow_mut().take() else { return };
        while wake.recv().await.is_some() {
            self.pacing.set(true);
            self.pace_broadcasts().await;
            self.pacing.set(false);
        }
    }

    pub(super) async fn pace_broadcasts(&self) {
        let rate = f64::from(self.live().push.broadcast_rate_per_sec.max(1));
        let mut budget = TokenBucket::new(1.0, self.now().mono);
        loop {
            // Bank at most two ticks' worth: a timer that fires late (the
            // sleep below overshoots by up to a tick under load) is made up
            // for, but a longer stall does not turn into a burst. With one
            // tick's cap the node reached 63-89 % of its configured rate.
            budget.refill(self.now().mono, rate, 2.0 * rate * PACER_TICK.as_secs_f64() + 1.0);
            let done = {
                let mut st = self.state.borrow_mut();
                self.pace_step(&mut st, &mut budget)
            };
            if done {
                break;
            }
            glommio::timer::sleep(PACER_TICK).await;
        }
    }

    /// Spends `budget` deliveries on queued broadcasts; true when none is left.
    pub(super) fn pace_step(&self, st: &mut State, budget: &mut TokenBucket) -> bool {
        let now = Instant::now();
        while budget.tokens() >= 1.0 {
            let Some(mut job) = st.broadcasts.pop_front() else { return true };
            if job.expires_at.is_some_and(|t| now >= t) {
                let left = st.conns.iter().filter(|(i, c)| *i >= job.cursor && c.is_active()).count();
                self.counters.broadcast_expired.fetch_add(left as u64, Ordering::Relaxed);
                self.release_broadcast(&job);
                continue;
            }
            let end = st.conns.capacity();
            while job.cursor < end && budget.tokens() >= 1.0 {
                let slot = job.cursor as u32;
                job.cursor += 1;
                if st.conns.get(slot as usize).is_some_and(Conn::is_active) && self.deliver(st, slot, &job.frame) {
                    budget.try_take();
                }
            }
            if job.cursor < end {
                st.broadcasts.push_front(job);
            } else {
                self.release_broadcast(&job);
            }
        }
        st.broadcasts.is_empty()
    }

    /// Gives back the room [`Shard::reserve_broadcast`] took on this shard.
    pub(super) fn release_broadcast(&self, job: &BroadcastJob) {
        self.counters.broadcast_queued_bytes.fetch_sub(broadcast_cost(job.frame.len()), Ordering::AcqRel);
    }
}
