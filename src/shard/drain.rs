//! Paced drain: GoAway then close with GOING_AWAY, a bounded number per
//! tick, so the clients' reconnects reach the load balancer (or the other
//! nodes) spread over time. Cluster drain and single-node drain both use it.

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

impl Shard {
    /// One tick of a drain: stop accepting once, then GoAway + close the
    /// next sessions within this tick's share of the rate. `endpoint` names
    /// where a user should reconnect ("" lets the client pick, e.g. through
    /// a load balancer). Returns how many sessions were sent away.
    pub(crate) fn drain_step(&self, drain: &ShardDrain, tick: Duration, endpoint: impl Fn(&str) -> String) -> u32 {
        let mut pacer = drain.pacer.borrow_mut();
        let mut st = self.state.borrow_mut();
        let per_tick = drain.rate_per_shard * tick.as_secs_f64();
        // Sessions that became active since the queue ran dry (hand-offs in
        // flight) are queued at the next tick.
        if pacer.begin_tick(per_tick, || st.active_keys()) {
            info!(shard = %self.id, sessions = pacer.queued(), "draining: stop accepting, sending GoAway");
            self.stop_accepting.close();
        }
        let now = self.now();
        let mut sent = 0u32;
        while let Some(key) = pacer.next_session() {
            // A session that left since it was queued costs no budget.
            let Some(user) = st.user_of(key).map(str::to_owned) else { continue };
            let frame = Frame::GoAway(proto::GoAway { endpoint: endpoint(&user), reason: "node draining".into() });
            self.send_to_slot(&mut st, key.index, &frame.to_bytes());
            self.close_conn(&mut st, key, now, ErrorCode::GoingAway, "node draining; reconnect elsewhere".into());
            pacer.sent();
            sent += 1;
        }
        sent
    }

    /// Single node: waits for `drain`, then sends every session away at
    /// the pacer's rate until the node stops.
    pub async fn single_drain_loop(self: Rc<Self>, drain: Arc<AtomicBool>, rate_per_shard: f64) {
        let pacing = ShardDrain::new(rate_per_shard);
        while !self.is_stopping() {
            if drain.load(Ordering::Relaxed) {
                self.drain_step(&pacing, DRAIN_TICK, |_| String::new());
            }
            glommio::timer::sleep(DRAIN_TICK).await;
        }
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
