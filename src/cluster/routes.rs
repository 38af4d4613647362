//! Routes: a session claims its device in the router when it becomes
//! active and releases it when it ends; failed claims are retried and every
//! route is re-asserted after a re-registration.

use super::*;

impl Shard {
    // ---- routes ---------------------------------------------------------

    /// Hook: session `key` became active: claim its device's route.
    pub(crate) fn cluster_on_active(&self, st: &mut State, key: ConnKey, login: &Login) {
        let Some(local) = self.local() else { return };
        local.routes.borrow_mut().insert(key.index, (key.generation, Claim::Pending));
        self.claim(st, &local, key, login.device.clone());
    }

    pub(super) fn claim(&self, st: &mut State, local: &Rc<Local>, key: ConnKey, device: String) {
        let router = local.shared.router.clone();
        let conn_id = ConnId::new(self.id, key).0;
        let shard = self.id.0;
        let local = local.clone();
        let started = Instant::now();
        let fut = async move {
            let claimed = router.claim(&device, shard, conn_id).await;
            (device, claimed)
        };
        self.after_store(st, fut, move |this, _st, (device, claimed)| {
            let counters = &local.shared.counters;
            counters.router_latency.record(started.elapsed());
            let mut routes = local.routes.borrow_mut();
            let mine = routes.get_mut(&key.index).filter(|(generation, _)| *generation == key.generation);
            match (claimed, mine) {
                (Ok(claimed), Some(entry)) => {
                    counters.claims.fetch_add(1, Ordering::Relaxed);
                    entry.1 = Claim::Held(claimed.epoch);
                    drop(routes);
                    if let Some(previous) = claimed.previous.filter(|p| p.node != local.shared.node) {
                        this.kick_remote(&local, previous, device);
                    }
                }
                (Ok(claimed), None) => {
                    // The session ended while its claim was on the way.
                    drop(routes);
                    release(&local, device, claimed.epoch);
                }
                (Err(err), entry) => {
                    counters.claim_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(error = %err, device = %crate::protocol::limits::Escaped(&device), "route claim failed; retrying later");
                    if let Some(entry) = entry {
                        entry.1 = Claim::Failed;
                    }
                }
            }
        });
    }

    /// The device logged in here while a session of it lived on another
    /// node: end that one as REPLACED.
    pub(super) fn kick_remote(&self, local: &Rc<Local>, previous: Route, device: String) {
        let Some(shard) = self.me.upgrade() else { return };
        let local = local.clone();
        local.shared.counters.remote_kicks.fetch_add(1, Ordering::Relaxed);
        glommio::spawn_local(async move {
            let kick = Frame::KickRequest(proto::KickRequest {
                devices: vec![device],
                code: ErrorCode::Replaced as i32,
                reason: "logged in on another node".into(),
                forwarded: true,
                conn_ids: vec![previous.conn_id],
                ..Default::default()
            });
            if let Err(err) = shard.forward(&local, &previous.node, previous.incarnation, kick).await {
                debug!(node = %previous.node, %err, "could not kick the replaced session on its node");
            }
        })
        .detach();
    }

    /// Hook: the session in `slot` left the indexes (`code`: why).
    pub(crate) fn cluster_on_gone(&self, slot: u32, device: &str, code: ErrorCode) {
        let Some(local) = self.local() else { return };
        local.shared.count_disconnect(code);
        let claim = local.routes.borrow_mut().remove(&slot);
        if let Some((_, Claim::Held(epoch))) = claim {
            release(&local, device.to_owned(), epoch);
        }
    }

    /// Re-asserts every held route (after a re-registration) and retries
    /// failed claims.
    pub(super) fn reassert_routes(&self, local: &Rc<Local>, all: bool) {
        let mut st = self.state.borrow_mut();
        let entries: Vec<(u32, u32, Claim)> = local
            .routes
            .borrow()
            .iter()
            .filter(|(_, (_, c))| all || matches!(c, Claim::Failed))
            .map(|(&slot, &(generation, claim))| (slot, generation, claim))
            .take(if all { usize::MAX } else { RETRY_BATCH })
            .collect();
        for (slot, generation, claim) in entries {
            let key = ConnKey { index: slot, generation };
            let Some(device) = st.device_of(key).map(str::to_owned) else { continue };
            match claim {
                Claim::Held(epoch) => {
                    let router = local.shared.router.clone();
                    let (shard, conn_id) = (self.id.0, ConnId::new(self.id, key).0);
                    local.shared.counters.reasserts.fetch_add(1, Ordering::Relaxed);
                    let l = local.clone();
                    let fut = async move { router.reassert(&device, shard, conn_id, epoch).await };
                    self.after_store(&mut st, fut, move |this, st, result| {
                        let mut routes = l.routes.borrow_mut();
                        let Some(entry) = routes.get_mut(&slot).filter(|(g, _)| *g == generation) else { return };
                        match result {
                            Ok(true) => {}
                            // Redis failed again: claim anew later.
                            Err(_) => entry.1 = Claim::Failed,
                            // A newer login of the device (on another node,
                            // while Redis was away) owns it: this one yields.
                            Ok(false) => {
                                routes.remove(&slot);
                                drop(routes);
                                let reason = "the device logged in elsewhere".to_owned();
                                this.ctx(st).close_conn(key, this.now(), ErrorCode::Replaced, reason);
                            }
                        }
                    });
                }
                Claim::Failed => {
                    if let Some(entry) = local.routes.borrow_mut().get_mut(&slot) {
                        entry.1 = Claim::Pending;
                    }
                    self.claim(&mut st, local, key, device);
                }
                Claim::Pending => {}
            }
        }
    }
}

pub(super) fn release(local: &Rc<Local>, device: String, epoch: u64) {
    let router = local.shared.router.clone();
    local.shared.counters.releases.fetch_add(1, Ordering::Relaxed);
    glommio::spawn_local(async move {
        if let Err(err) = router.release(&device, epoch).await {
            // The route stays until its node's lease or the route TTL ends.
            debug!(device = %crate::protocol::limits::Escaped(&device), %err, "route release failed");
        }
    })
    .detach();
}
