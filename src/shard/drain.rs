//! Paced drain: GoAway then close with GOING_AWAY, a bounded number per
//! tick, so the clients' reconnects reach the load balancer (or the other
//! nodes) spread over time. Cluster drain and single-node drain both use it.
//! The component (`ShardDrain`, its `DrainPacer`) decides who goes in each
//! tick with no I/O and no clock; the shard's driver (`Shard::drain_step`
//! in `shard/mod.rs`) sends the frames.

use super::*;

/// How often a single node's drain task sends its next batch (the cluster
/// task ticks at the same pace).
pub(crate) const DRAIN_TICK: Duration = Duration::from_millis(100);

/// One shard's drain: the pacing and the rate it runs at.
pub(crate) struct ShardDrain {
    pacer: RefCell<DrainPacer>,
    /// GoAway frames per second this shard sends.
    rate_per_shard: f64,
}

impl ShardDrain {
    pub(crate) fn new(rate_per_shard: f64) -> ShardDrain {
        ShardDrain { pacer: RefCell::default(), rate_per_shard }
    }
}

/// One drain tick's work, decided without I/O: whether the shard stops
/// accepting now, and which sessions get GoAway (with their user, for the
/// endpoint). The shard's driver sends the frames and closes the sessions.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct DrainBatch {
    /// The drain's first tick: the shard stops accepting.
    pub(crate) stop_accepting: bool,
    /// Sessions still queued after this tick's share was taken.
    pub(crate) queued: usize,
    pub(crate) goaway: Vec<(ConnKey, String)>,
}

impl ShardDrain {
    /// Which sessions to send GoAway now: one tick of `tick` at this
    /// shard's rate. `active` lists the shard's active sessions (asked when
    /// the queue ran dry, so hand-offs that became active since are drained
    /// too); `user_of` gives a queued session's user, or `None` when it left
    /// since it was queued (it costs no budget).
    pub(crate) fn tick(
        &self,
        tick: Duration,
        active: impl FnOnce() -> Vec<ConnKey>,
        mut user_of: impl FnMut(ConnKey) -> Option<String>,
    ) -> DrainBatch {
        let mut pacer = self.pacer.borrow_mut();
        let per_tick = self.rate_per_shard * tick.as_secs_f64();
        let stop_accepting = pacer.begin_tick(per_tick, active);
        let queued = pacer.queued();
        let mut goaway = Vec::new();
        while let Some(key) = pacer.next_session() {
            let Some(user) = user_of(key) else { continue };
            goaway.push((key, user));
            pacer.sent();
        }
        DrainBatch { stop_accepting, queued, goaway }
    }
}

/// The pacing of a shard's drain, with no I/O and no clock: which sessions
/// get GoAway in each tick, at the drain rate. The shard's cluster task
/// calls [`DrainPacer::begin_tick`] once per tick, then takes sessions with
/// [`DrainPacer::next_session`] and reports each GoAway sent with
/// [`DrainPacer::sent`].
#[derive(Debug, Default)]
pub struct DrainPacer {
    /// Sessions still to send GoAway to (set once the drain starts).
    queue: Option<VecDeque<ConnKey>>,
    /// GoAway frames this shard may send now (grows with the drain rate).
    budget: f64,
}

impl DrainPacer {
    /// Starts a tick that allows `per_tick` GoAways (the rate times the
    /// tick). `active` lists the shard's active sessions; it is asked when
    /// the queue is empty, so sessions that became active since (hand-offs
    /// in flight) are drained too. True on the drain's first tick: the
    /// shard stops accepting then.
    pub fn begin_tick(&mut self, per_tick: f64, active: impl FnOnce() -> Vec<ConnKey>) -> bool {
        let first = self.queue.is_none();
        let queue = self.queue.get_or_insert_with(VecDeque::new);
        if queue.is_empty() {
            queue.extend(active());
        }
        // Rates below one per tick accumulate; a backlog never banks more
        // than one tick's worth plus one.
        self.budget = (self.budget + per_tick).min(per_tick + 1.0);
        first
    }

    /// The next session to send GoAway to, while this tick's budget lasts.
    /// Taking one costs nothing until [`DrainPacer::sent`].
    pub fn next_session(&mut self) -> Option<ConnKey> {
        if self.budget < 1.0 {
            return None;
        }
        self.queue.as_mut()?.pop_front()
    }

    /// A GoAway went out: it counts against the tick's budget.
    pub fn sent(&mut self) {
        self.budget -= 1.0;
    }

    /// Sessions still queued.
    pub fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, VecDeque::len)
    }

    /// Whether the drain started on this shard.
    pub fn started(&self) -> bool {
        self.queue.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(range: std::ops::Range<u32>) -> Vec<ConnKey> {
        range.map(|index| ConnKey { index, generation: 1 }).collect()
    }

    /// Runs `ticks` ticks in which every queued session takes its GoAway;
    /// returns how many went out in each.
    fn run(pacer: &mut DrainPacer, per_tick: f64, ticks: usize, active: &[ConnKey]) -> Vec<usize> {
        (0..ticks)
            .map(|_| {
                pacer.begin_tick(per_tick, || active.to_vec());
                let mut n = 0;
                while pacer.next_session().is_some() {
                    pacer.sent();
                    n += 1;
                }
                n
            })
            .collect()
    }

    #[test]
    fn drain_component_picks_sessions_at_the_rate_without_sockets() {
        // 20 GoAways/s per shard at a 100 ms tick: two per tick.
        let drain = ShardDrain::new(20.0);
        let gone = ConnKey { index: 1, generation: 1 };
        let user_of = |key: ConnKey| (key != gone).then(|| format!("u{}", key.index));
        let first = drain.tick(DRAIN_TICK, || keys(0..5), user_of);
        assert!(first.stop_accepting, "the first tick stops accepting");
        assert_eq!(first.queued, 5);
        // Session 1 left since it was queued: it costs no budget.
        let sent: Vec<_> = first.goaway.iter().map(|(k, u)| (k.index, u.as_str())).collect();
        assert_eq!(sent, [(0, "u0"), (2, "u2")]);
        let second = drain.tick(DRAIN_TICK, Vec::new, user_of);
        assert!(!second.stop_accepting, "only the first tick stops accepting");
        assert_eq!(second.goaway.iter().map(|(k, _)| k.index).collect::<Vec<_>>(), [3, 4]);
        // The queue ran dry: a session that became active since is drained.
        let third = drain.tick(DRAIN_TICK, || keys(9..10), user_of);
        assert_eq!(third.goaway.iter().map(|(k, _)| k.index).collect::<Vec<_>>(), [9]);
        assert_eq!(drain.tick(DRAIN_TICK, Vec::new, user_of), DrainBatch::default());
    }

    #[test]
    fn drain_stops_accepting_once_and_sends_goaway_at_the_rate() {
        let mut pacer = DrainPacer::default();
        assert!(!pacer.started());
        let active = keys(0..10);
        assert!(pacer.begin_tick(2.5, || active.clone()), "the first tick stops accepting");
        assert_eq!(pacer.queued(), 10);
        let mut order = Vec::new();
        while let Some(key) = pacer.next_session() {
            order.push(key.index);
            pacer.sent();
        }
        // 2.5 per tick: 2 now, the half carries over.
        assert_eq!(order, [0, 1]);
        assert!(!pacer.begin_tick(2.5, Vec::new), "only the first tick stops accepting");
        let mut second = 0;
        while pacer.next_session().is_some() {
            pacer.sent();
            second += 1;
        }
        assert_eq!(second, 3);
        assert_eq!(run(&mut pacer, 2.5, 2, &[]), [2, 3]);
        assert_eq!(pacer.queued(), 0);
    }

    #[test]
    fn drain_rate_below_one_per_tick_accumulates() {
        let mut pacer = DrainPacer::default();
        // 0.25 per tick (2.5/s per shard at a 100 ms tick): one every 4th tick.
        let sent = run(&mut pacer, 0.25, 12, &keys(0..10));
        assert_eq!(sent, [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]);
    }

    #[test]
    fn drain_budget_banks_at_most_one_tick_plus_one() {
        let mut pacer = DrainPacer::default();
        // Ticks with nobody to drain do not save up a burst.
        assert_eq!(run(&mut pacer, 2.0, 5, &[]), [0; 5]);
        assert_eq!(run(&mut pacer, 2.0, 2, &keys(0..20)), [3, 2]);
    }

    #[test]
    fn drain_sessions_gone_since_cost_no_budget_and_late_arrivals_are_drained() {
        let mut pacer = DrainPacer::default();
        pacer.begin_tick(1.0, || keys(0..3));
        // Sessions 0 and 1 left (no GoAway sent): 2 still gets one.
        assert_eq!(pacer.next_session().map(|k| k.index), Some(0));
        assert_eq!(pacer.next_session().map(|k| k.index), Some(1));
        assert_eq!(pacer.next_session().map(|k| k.index), Some(2));
        pacer.sent();
        assert_eq!(pacer.next_session(), None);
        // The queue ran dry; a hand-off that became active since is queued
        // at the next tick.
        pacer.begin_tick(1.0, || keys(7..8));
        assert_eq!(pacer.next_session().map(|k| k.index), Some(7));
    }
}
