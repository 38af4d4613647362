//! The shard's cluster task (node table refresh, claim retries, drain
//! steps) and the node's drain coordinator.

use super::*;

/// Runs the drain when asked: announce it, wait until every session left
/// (or the deadline), leave the registry, then stop the node. Returns when
/// the node is told to stop (by this or by `stop` being set elsewhere).
pub fn spawn_drain_coordinator(
    shared: Arc<ClusterShared>,
    active: Vec<Arc<crate::shard::ShardCounters>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("longlink-drain".into()).spawn(move || {
        while !shared.is_draining() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        if let Err(e) = futures_lite::future::block_on(shared.router.announce_draining()) {
            warn!(error = %e, "could not mark the node as draining in the registry");
        }
        let sessions = || active.iter().map(|c| c.active.load(Ordering::Relaxed)).sum::<u64>();
        info!(node = %shared.node, sessions = sessions(), deadline_ms = shared.drain_deadline.as_millis() as u64, "draining");
        while sessions() > 0 && started.elapsed() < shared.drain_deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = sessions();
        // Releases queued by the closing sessions run before this (the
        // sidecar keeps order).
        if let Err(e) = futures_lite::future::block_on(shared.router.deregister()) {
            warn!(error = %e, "could not leave the registry; the lease will expire");
        }
        info!(node = %shared.node, left, elapsed_ms = started.elapsed().as_millis() as u64, "drain finished; stopping");
        stop.store(true, Ordering::Relaxed);
    })?;
    Ok(())
}

impl Shard {
    // ---- the shard's cluster task ----------------------------------------

    pub(super) async fn cluster_loop(self: Rc<Self>) {
        let Some(local) = self.local() else { return };
        let mut tick = 0u32;
        let mut reasserted = Instant::now();
        while !self.is_stopping() {
            if tick.is_multiple_of(NODES_EVERY) {
                self.refresh_nodes(&local).await;
            }
            let rereg = local.shared.reregistered.load(Ordering::Relaxed);
            if rereg != local.reregistered_seen.get() {
                local.reregistered_seen.set(rereg);
                info!(shard = %self.id, "re-registered: re-asserting routes");
                self.reassert_routes(&local, true);
                reasserted = Instant::now();
            } else if reasserted.elapsed() >= local.shared.route_ttl / 2 {
                // Route keys expire (so devices that never return are
                // forgotten): those of long sessions are written again.
                self.reassert_routes(&local, true);
                reasserted = Instant::now();
            } else if tick.is_multiple_of(RETRY_EVERY) {
                self.reassert_routes(&local, false);
            }
            if local.shared.is_draining() {
                self.drain_step(&local);
            }
            tick = tick.wrapping_add(1);
            glommio::timer::sleep(TICK).await;
        }
    }

    pub(super) async fn refresh_nodes(&self, local: &Rc<Local>) {
        match local.shared.router.nodes().await {
            Ok(nodes) => *local.nodes.borrow_mut() = nodes,
            Err(err) => debug!(shard = %self.id, %err, "node table not refreshed"),
        }
    }

    /// One tick of the drain: stop accepting once, then GoAway + close the
    /// next sessions within this tick's share of the drain rate.
    pub(super) fn drain_step(&self, local: &Rc<Local>) {
        let mut pacer = local.drain.borrow_mut();
        let mut st = self.state.borrow_mut();
        let per_tick = local.shared.drain_rate_per_shard * TICK.as_secs_f64();
        if pacer.begin_tick(per_tick, || st.active_keys()) {
            info!(shard = %self.id, sessions = pacer.queued(), "draining: stop accepting, sending GoAway");
            self.stop_accepting.close();
        }
        let nodes = local.nodes.borrow();
        let others: Vec<NodeInfo> =
            nodes.iter().filter(|n| n.name != local.shared.node && !n.draining).cloned().collect();
        let now = self.now();
        while let Some(key) = pacer.next_session() {
            // A session that left since it was queued costs no budget.
            let Some(user) = st.user_of(key).map(str::to_owned) else { continue };
            let endpoint = rank(&user, &others, 1).first().map(|n| n.client_endpoint.clone()).unwrap_or_default();
            let frame = Frame::GoAway(proto::GoAway { endpoint, reason: "node draining".into() }).to_bytes();
            self.send_to_slot(&mut st, key.index, &frame);
            self.close_conn(&mut st, key, now, ErrorCode::GoingAway, "node draining; reconnect elsewhere".into());
            local.shared.counters.go_away_sent.fetch_add(1, Ordering::Relaxed);
            pacer.sent();
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
