//! Paced drain: GoAway then close with GOING_AWAY, a bounded number per
//! tick, so the clients' reconnects reach the load balancer (or the other
//! nodes) spread over time. Cluster drain and single-node drain both use it.

use super::*;

/// How often a single node's drain task sends its next batch (the cluster
/// task ticks at the same pace).
pub(crate) const DRAIN_TICK: Duration = Duration::from_millis(100);

/// One shard's drain progress.
pub(crate) struct DrainPacer {
    /// Sessions still to send GoAway to (set once the drain starts).
    queue: RefCell<Option<VecDeque<ConnKey>>>,
    /// GoAway frames this shard may send now (grows with the rate).
    budget: Cell<f64>,
    /// GoAway frames per second this shard sends.
    rate_per_shard: f64,
}

impl DrainPacer {
    pub(crate) fn new(rate_per_shard: f64) -> DrainPacer {
        DrainPacer { queue: RefCell::new(None), budget: Cell::new(0.0), rate_per_shard }
    }
}

impl Shard {
    /// One tick of a drain: stop accepting once, then GoAway + close the
    /// next sessions within this tick's share of the rate. `endpoint` names
    /// where a user should reconnect ("" lets the client pick, e.g. through
    /// a load balancer). Returns how many sessions were sent away.
    pub(crate) fn drain_step(&self, pacer: &DrainPacer, tick: Duration, endpoint: impl Fn(&str) -> String) -> u32 {
        let mut queue = pacer.queue.borrow_mut();
        let mut st = self.state.borrow_mut();
        if queue.is_none() {
            info!(shard = %self.id, sessions = st.active_keys().len(), "draining: stop accepting, sending GoAway");
            self.stop_accepting.close();
        }
        let queue = queue.get_or_insert_with(VecDeque::new);
        if queue.is_empty() {
            // Sessions that became active since (hand-offs in flight).
            queue.extend(st.active_keys());
        }
        // Rates below one per tick accumulate; a backlog never banks more
        // than one tick's worth plus one.
        let per_tick = pacer.rate_per_shard * tick.as_secs_f64();
        let budget = (pacer.budget.get() + per_tick).min(per_tick + 1.0);
        let now = self.now();
        let mut sent = 0u32;
        while f64::from(sent) + 1.0 <= budget {
            let Some(key) = queue.pop_front() else { break };
            let Some(user) = st.user_of(key).map(str::to_owned) else { continue };
            let frame = Frame::GoAway(proto::GoAway { endpoint: endpoint(&user), reason: "node draining".into() });
            self.send_to_slot(&mut st, key.index, &frame.to_bytes());
            self.close_conn(&mut st, key, now, ErrorCode::GoingAway, "node draining; reconnect elsewhere".into());
            sent += 1;
        }
        pacer.budget.set(budget - f64::from(sent));
        sent
    }

    /// Single node: waits for `drain`, then sends every session away at
    /// the pacer's rate until the node stops.
    pub async fn single_drain_loop(self: Rc<Self>, drain: Arc<AtomicBool>, rate_per_shard: f64) {
        let pacer = DrainPacer::new(rate_per_shard);
        while !self.is_stopping() {
            if drain.load(Ordering::Relaxed) {
                self.drain_step(&pacer, DRAIN_TICK, |_| String::new());
            }
            glommio::timer::sleep(DRAIN_TICK).await;
        }
    }
}
