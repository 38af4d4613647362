//! Routes: a session claims its device in the router when it becomes
//! active and releases it when it ends; failed claims are retried and every
//! route is re-asserted after a re-registration.

use super::*;

/// The claims of one shard's active sessions on their devices' routes, by
/// slot (with the slot's generation): the bookkeeping of the claim and
/// release calls, without the router (tested alone below).
#[derive(Default)]
pub(super) struct Routes {
    by_slot: HashMap<u32, (u32, Claim)>,
}

/// What to do once a claim came back from the router.
#[derive(Debug, PartialEq)]
pub(super) enum Claimed {
    /// The route is this session's; a session it replaced on another node
    /// is kicked.
    Held { previous: Option<Route> },
    /// The session ended (or its slot holds a newer one) while the claim
    /// was on the way: the route is released at the claim's epoch, so a
    /// newer claim of the device is never touched.
    Release(u64),
    /// Redis failed: the claim is retried later.
    Failed,
}

/// What to do once a route was re-asserted.
#[derive(Debug, PartialEq)]
pub(super) enum Reasserted {
    Kept,
    /// A newer login of the device owns the route: the session ends as
    /// REPLACED.
    Yield(ConnKey),
}

impl Routes {
    /// Session `key` became active: its claim is on the way.
    pub(super) fn claiming(&mut self, key: ConnKey) {
        self.by_slot.insert(key.index, (key.generation, Claim::Pending));
    }

    fn entry(&mut self, key: ConnKey) -> Option<&mut Claim> {
        self.by_slot.get_mut(&key.index).filter(|(generation, _)| *generation == key.generation).map(|(_, c)| c)
    }

    /// The router answered the claim of session `key`.
    pub(super) fn claimed(&mut self, key: ConnKey, result: Result<crate::router::Claimed, ()>) -> Claimed {
        match (result, self.entry(key)) {
            (Ok(claimed), Some(claim)) => {
                *claim = Claim::Held(claimed.epoch);
                Claimed::Held { previous: claimed.previous }
            }
            (Ok(claimed), None) => Claimed::Release(claimed.epoch),
            (Err(()), claim) => {
                if let Some(claim) = claim {
                    *claim = Claim::Failed;
                }
                Claimed::Failed
            }
        }
    }

    /// The session in `slot` ended: the epoch of its route to release, if
    /// it held one (a claim still on the way releases when it comes back).
    pub(super) fn gone(&mut self, slot: u32) -> Option<u64> {
        match self.by_slot.remove(&slot) {
            Some((_, Claim::Held(epoch))) => Some(epoch),
            _ => None,
        }
    }

    /// The claims to re-assert (`all`) or, else, a batch of failed ones to
    /// retry.
    pub(super) fn to_reassert(&self, all: bool) -> Vec<(ConnKey, Claim)> {
        self.by_slot
            .iter()
            .filter(|(_, (_, c))| all || matches!(c, Claim::Failed))
            .map(|(&index, &(generation, claim))| (ConnKey { index, generation }, claim))
            .take(if all { usize::MAX } else { RETRY_BATCH })
            .collect()
    }

    /// A failed claim of session `key` is sent again.
    pub(super) fn retrying(&mut self, key: ConnKey) {
        if let Some(claim) = self.entry(key) {
            *claim = Claim::Pending;
        }
    }

    /// The router answered the re-assertion of session `key`'s route
    /// (`Ok(false)`: a newer claim owns it).
    pub(super) fn reasserted(&mut self, key: ConnKey, result: Result<bool, ()>) -> Reasserted {
        let Some(claim) = self.entry(key) else { return Reasserted::Kept };
        match result {
            Ok(true) => Reasserted::Kept,
            // Redis failed again: claim anew later.
            Err(()) => {
                *claim = Claim::Failed;
                Reasserted::Kept
            }
            // A newer login of the device (on another node, while Redis was
            // away) owns it: this one yields.
            Ok(false) => {
                self.by_slot.remove(&key.index);
                Reasserted::Yield(key)
            }
        }
    }

    #[cfg(test)]
    fn claim_of(&self, key: ConnKey) -> Option<Claim> {
        self.by_slot.get(&key.index).filter(|(g, _)| *g == key.generation).map(|&(_, c)| c)
    }
}

impl Shard {
    // ---- routes ---------------------------------------------------------

    /// Hook: session `key` became active: claim its device's route.
    pub(crate) fn cluster_on_active(&self, st: &mut State, key: ConnKey, login: &Login) {
        let Some(local) = self.local() else { return };
        local.routes.borrow_mut().claiming(key);
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
            let result = claimed.map_err(|err| {
                debug!(error = %err, device = %crate::protocol::limits::Escaped(&device), "route claim failed; retrying later");
            });
            let outcome = local.routes.borrow_mut().claimed(key, result);
            match outcome {
                Claimed::Held { previous } => {
                    counters.claims.fetch_add(1, Ordering::Relaxed);
                    if let Some(previous) = previous.filter(|p| p.node != local.shared.node) {
                        this.kick_remote(&local, previous, device);
                    }
                }
                // The session ended while its claim was on the way.
                Claimed::Release(epoch) => release(&local, device, epoch),
                Claimed::Failed => {
                    counters.claim_failures.fetch_add(1, Ordering::Relaxed);
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
        let held = local.routes.borrow_mut().gone(slot);
        if let Some(epoch) = held {
            release(&local, device.to_owned(), epoch);
        }
    }

    /// Re-asserts every held route (after a re-registration) and retries
    /// failed claims.
    pub(super) fn reassert_routes(&self, local: &Rc<Local>, all: bool) {
        let mut st = self.state.borrow_mut();
        let entries = local.routes.borrow().to_reassert(all);
        for (key, claim) in entries {
            let Some(device) = st.device_of(key).map(str::to_owned) else { continue };
            match claim {
                Claim::Held(epoch) => {
                    let router = local.shared.router.clone();
                    let (shard, conn_id) = (self.id.0, ConnId::new(self.id, key).0);
                    local.shared.counters.reasserts.fetch_add(1, Ordering::Relaxed);
                    let l = local.clone();
                    let fut = async move { router.reassert(&device, shard, conn_id, epoch).await };
                    self.after_store(&mut st, fut, move |this, st, result| {
                        let outcome = l.routes.borrow_mut().reasserted(key, result.map_err(|_| ()));
                        if let Reasserted::Yield(key) = outcome {
                            let reason = "the device logged in elsewhere".to_owned();
                            this.ctx(st).close_conn(key, this.now(), ErrorCode::Replaced, reason);
                        }
                    });
                }
                Claim::Failed => {
                    local.routes.borrow_mut().retrying(key);
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: ConnKey = ConnKey { index: 5, generation: 1 };
    /// A newer session in A's slot.
    const B: ConnKey = ConnKey { index: 5, generation: 2 };

    fn ok(epoch: u64) -> Result<crate::router::Claimed, ()> {
        Ok(crate::router::Claimed { epoch, previous: None })
    }

    #[test]
    fn a_claim_that_comes_back_is_held_and_released_at_its_epoch_when_the_session_ends() {
        let mut routes = Routes::default();
        routes.claiming(A);
        assert_eq!(routes.claim_of(A), Some(Claim::Pending));
        let previous = Route { node: "n2".into(), incarnation: 1, shard: 0, conn_id: 9, epoch: 3 };
        let held = routes.claimed(A, Ok(crate::router::Claimed { epoch: 4, previous: Some(previous.clone()) }));
        assert_eq!(held, Claimed::Held { previous: Some(previous) }, "the replaced session is kicked");
        assert_eq!(routes.claim_of(A), Some(Claim::Held(4)));
        assert_eq!(routes.gone(A.index), Some(4));
        assert_eq!(routes.gone(A.index), None, "released once");
    }

    #[test]
    fn a_claim_answer_after_its_session_ended_releases_its_own_epoch_only() {
        let mut routes = Routes::default();
        routes.claiming(A);
        // The session ends while its claim is on the way: nothing to
        // release yet (no epoch).
        assert_eq!(routes.gone(A.index), None);
        assert_eq!(routes.claimed(A, ok(7)), Claimed::Release(7));

        // The slot already holds a newer session with its own claim: the
        // old answer releases at its own epoch and leaves the new claim be.
        routes.claiming(A);
        assert_eq!(routes.gone(A.index), None);
        routes.claiming(B);
        assert_eq!(routes.claimed(B, ok(9)), Claimed::Held { previous: None });
        assert_eq!(routes.claimed(A, ok(8)), Claimed::Release(8));
        assert_eq!(routes.claim_of(B), Some(Claim::Held(9)), "the newer claim's route stays");
        assert_eq!(routes.gone(B.index), Some(9));
    }

    #[test]
    fn a_release_never_takes_a_newer_claims_route() {
        let mut routes = Routes::default();
        routes.claiming(A);
        assert_eq!(routes.claimed(A, ok(1)), Claimed::Held { previous: None });
        assert_eq!(routes.gone(A.index), Some(1));
        // B claims while A's release is on the way; B's answer comes first
        // or last, B holds its epoch, and a late answer of A's never
        // touches it.
        routes.claiming(B);
        assert_eq!(routes.claimed(A, ok(1)), Claimed::Release(1));
        assert_eq!(routes.claim_of(B), Some(Claim::Pending));
        assert_eq!(routes.claimed(B, ok(2)), Claimed::Held { previous: None });
        assert_eq!(routes.reasserted(A, Ok(false)), Reasserted::Kept, "an old session's answer is ignored");
        assert_eq!(routes.claim_of(B), Some(Claim::Held(2)));
    }

    #[test]
    fn failed_claims_are_retried_and_a_lost_route_makes_the_session_yield() {
        let mut routes = Routes::default();
        routes.claiming(A);
        assert_eq!(routes.claimed(A, Err(())), Claimed::Failed);
        let other = ConnKey { index: 6, generation: 1 };
        routes.claiming(other);
        assert_eq!(routes.claimed(other, ok(3)), Claimed::Held { previous: None });
        assert_eq!(routes.to_reassert(false), vec![(A, Claim::Failed)], "only failed ones are retried");
        routes.retrying(A);
        assert_eq!(routes.claim_of(A), Some(Claim::Pending));
        assert!(routes.to_reassert(false).is_empty());
        assert_eq!(routes.claimed(A, ok(4)), Claimed::Held { previous: None });
        let mut all = routes.to_reassert(true);
        all.sort_by_key(|(k, _)| k.index);
        assert_eq!(all, vec![(A, Claim::Held(4)), (other, Claim::Held(3))]);

        assert_eq!(routes.reasserted(other, Ok(true)), Reasserted::Kept);
        assert_eq!(routes.reasserted(other, Err(())), Reasserted::Kept);
        assert_eq!(routes.claim_of(other), Some(Claim::Failed), "claimed anew later");
        assert_eq!(routes.reasserted(A, Ok(false)), Reasserted::Yield(A));
        assert_eq!(routes.gone(A.index), None, "the yielded route is not released");
    }
}
