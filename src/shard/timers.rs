//! The timer loop (deadlines from the wheel, liveness) and shutdown.

use super::*;

impl Shard {
    // ---- timers and shutdown -------------------------------------------------

    /// Drives every deadline of the shard; returns after shutdown completes.
    pub async fn timer_loop(self: Rc<Self>, stop: Arc<AtomicBool>, shutdown_grace: Duration) {
        let tick = Duration::from_millis(self.cfg.wheel_tick_ms);
        let mut due = Vec::new();
        let mut shutdown_deadline: Option<Instant> = None;
        let liveness = &self.counters.liveness;
        let mut trim = crate::trim::TrimWatch::new();
        loop {
            liveness.waiting_until(Instant::now() + tick);
            glommio::timer::sleep(tick).await;
            liveness.turned(Instant::now());
            self.poll_reload();
            self.publish_ops_gauges();
            if shutdown_deadline.is_none() && stop.load(Ordering::Relaxed) {
                self.begin_shutdown();
                shutdown_deadline = Some(Instant::now() + shutdown_grace);
            }
            // Hook: no deadline fires on sessions being handed over.
            if self.upgrade.frozen() && shutdown_deadline.is_none() {
                continue;
            }
            // Push-port requests past their deadline are answered now.
            crate::push::expire(&mut self.ctx(&mut self.state.borrow_mut()));
            self.state.borrow_mut().wheel.expire(self.now().mono, &mut due);
            // A session may be filed more than once (its deadline moved
            // earlier); visiting it once re-files it once, so copies merge.
            due.sort_unstable_by_key(|k| (k.index, k.generation));
            due.dedup();
            for chunk in due.chunks(SWEEP_BATCH) {
                self.sweep(chunk);
                glommio::yield_if_needed().await;
                liveness.turned(Instant::now());
            }
            due.clear();
            let held = {
                let st = self.state.borrow();
                st.conns.len() + st.port.connections()
            };
            trim.observe(held, Instant::now());
            if let Some(deadline) = shutdown_deadline
                && (self.state.borrow().conns.is_empty() || Instant::now() >= deadline)
            {
                break;
            }
        }
    }

    pub(super) fn sweep(&self, keys: &[ConnKey]) {
        let now = self.now();
        let mut st = self.state.borrow_mut();
        let mut actions = std::mem::take(&mut st.actions);
        for &key in keys {
            let Some(conn) = st.conn(key) else { continue };
            let stalled = conn.io.as_ref().and_then(|io| io.stalled_since);
            if stalled.is_some_and(|t| now.mono.0 >= t.0 + self.cfg.write_timeout_ms) && conn.is_active() {
                // As in `enqueue`: a frame already on the wire is finished.
                let dropped = conn.io().out.cut();
                let reason = format!("socket blocked for {} ms", self.cfg.write_timeout_ms);
                self.close_slow(&mut st, key, dropped, reason);
            } else if conn.session.deadline() <= now.mono {
                conn.session.handle_timeout(now, &self.live().params, &mut actions);
                conn.wake();
                self.apply(&mut st, key, now, &mut actions);
            }
            // Resends due for the device's window, if it has one.
            let resend_at = reliable::retransmit(&mut self.ctx(&mut st), key, now);
            let Some(conn) = st.conn(key) else { continue };
            if conn.session.phase() == Phase::Closed {
                conn.wake();
            } else {
                let deadline = conn.session.deadline();
                let deadline = resend_at.map_or(deadline, |r| r.min(deadline));
                st.wheel.insert(key, deadline);
            }
        }
        st.actions = actions;
    }

    /// Stops accepting and closes every session with SHUTDOWN.
    pub(super) fn begin_shutdown(&self) {
        self.stopping.set(true);
        self.stop_accepting.close();
        let now = self.now();
        let mut st = self.state.borrow_mut();
        let keys: Vec<ConnKey> =
            st.conns.iter().map(|(i, c)| ConnKey { index: i as u32, generation: c.generation }).collect();
        info!(shard = %self.id, sessions = keys.len(), "shutting down");
        let mut actions = Vec::new();
        for key in keys {
            if let Some(conn) = st.conn(key) {
                conn.session.close(now, ErrorCode::Shutdown, String::new(), &self.live().params, &mut actions);
            }
            self.apply(&mut st, key, now, &mut actions);
        }
        st.port.close_all();
        st.upstream.stop();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }
}
