//! Whether a shard's executor keeps turning.
//!
//! Each shard's timer loop wakes every `session.wheel_tick_ms`. Before it
//! sleeps it publishes when it is due; each time it runs (woken, or resumed
//! after yielding during a sweep) it counts a turn and is due again at once,
//! since it is ready work until it sleeps. Another
//! thread (the metrics endpoint) can then tell a shard that has ready work
//! and does not run it: its tick is past due and no turn came. That covers
//! a task hogging the thread, a blocking call, a lost timer wake-up and an
//! executor parked with runnable tasks (vendor/glommio/PATCHES.md), which
//! all look alike from outside: the shard's sessions stop being served.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The process-wide clock the shards and the reader share.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], plus one so that 0 can mean "not waiting".
fn stamp(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// One shard's turn counter and the time its next turn is due.
#[derive(Debug, Default)]
pub struct Liveness {
    turns: AtomicU64,
    /// [`stamp`] of the moment the timer loop is next due to run; 0 before
    /// the loop starts.
    due: AtomicU64,
}

impl Liveness {
    /// The shard is about to sleep until `due`.
    pub fn waiting_until(&self, due: Instant) {
        self.due.store(stamp(due), Ordering::Relaxed);
    }

    /// The shard's timer loop runs (at `now`): one more turn. It stays
    /// ready work until it waits again, so it is due from now on.
    pub fn turned(&self, now: Instant) {
        self.due.store(stamp(now), Ordering::Relaxed);
        self.turns.fetch_add(1, Ordering::Relaxed);
    }

    /// Ticks the shard has run.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// How long past due the shard's timer loop is at `now`, in
    /// milliseconds: about 0 while the shard turns. It grows for as long as
    /// the shard has that ready work and does not run it.
    pub fn stalled_ms(&self, now: Instant) -> u64 {
        match self.due.load(Ordering::Relaxed) {
            0 => 0,
            due => stamp(now).saturating_sub(due),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_tick_past_due_counts_as_stalled_until_it_turns() {
        let l = Liveness::default();
        let t0 = Instant::now();
        assert_eq!(l.stalled_ms(t0), 0, "not waiting yet");
        l.waiting_until(t0 + Duration::from_millis(100));
        assert_eq!(l.stalled_ms(t0), 0, "not due yet");
        assert_eq!(l.stalled_ms(t0 + Duration::from_millis(100)), 0, "due now");
        assert_eq!(l.stalled_ms(t0 + Duration::from_millis(2_600)), 2_500);
        let t1 = t0 + Duration::from_millis(2_700);
        l.turned(t1);
        assert_eq!((l.turns(), l.stalled_ms(t1)), (1, 0), "it runs");
        // Running (a sweep) without yielding for 30 ms: late by that much.
        assert_eq!(l.stalled_ms(t1 + Duration::from_millis(30)), 30);
        l.waiting_until(t1 + Duration::from_millis(130));
        assert_eq!(l.stalled_ms(t1 + Duration::from_millis(40)), 0, "asleep until its next tick");
    }
}
