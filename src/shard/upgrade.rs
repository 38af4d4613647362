//! The shard's side of the in-place upgrade ([`crate::upgrade`]).
//!
//! Old process, on the coordinator's commands:
//! - `Quiesce`: stop accepting (the listeners' backlogs hold newcomers for
//!   the new process), answer new push requests UNAVAILABLE (retryable),
//!   wait (bounded) until every request in flight is answered, then close
//!   the push-port connections with GOING_AWAY: backends reconnect, and
//!   reach the new process.
//! - `Freeze`: the hand-over point. No client socket is read or written
//!   from here on (connection tasks, the timer sweep, direct sends and the
//!   flusher all check [`ShardUpgrade::frozen`]); the sessions are copied
//!   out with a duplicate of each socket. TLS sessions are not handed over:
//!   they are closed with GOING_AWAY and their tasks run on to say so.
//! - `Resume`: the new process failed; everything carries on as before.
//!
//! New process: [`Shard::restore`] puts the sessions back in the slab and
//! the indexes before the shard accepts anything.

use std::os::fd::OwnedFd;

use super::hosts::ShardCtx;
use super::*;
use crate::delivery::store::MemoryStore;
use crate::upgrade::wire::{RecordPhase, SessionRecord, ShardImage};

/// Slack on top of the push reply deadline when waiting for requests in
/// flight to be answered.
pub(super) const QUIESCE_SLACK: Duration = Duration::from_secs(1);
pub(super) const QUIESCE_POLL: Duration = Duration::from_millis(5);

/// A shard's upgrade state (one per shard, not per connection).
#[derive(Default)]
pub(crate) struct ShardUpgrade {
    /// Accepting is paused and push requests are refused.
    quiescing: Cell<bool>,
    /// No client socket is read or written (see the module doc).
    frozen: Cell<bool>,
    /// Accept loops waiting for the pause to begin or end.
    waiters: RefCell<Vec<Waker>>,
    /// The shard's memory store, to take its image.
    memory: RefCell<Option<Rc<MemoryStore>>>,
}

impl ShardUpgrade {
    pub(crate) fn frozen(&self) -> bool {
        self.frozen.get()
    }

    pub(crate) fn quiescing(&self) -> bool {
        self.quiescing.get()
    }

    pub(crate) fn set_memory_store(&self, store: Rc<MemoryStore>) {
        *self.memory.borrow_mut() = Some(store);
    }

    pub(super) fn set_paused(&self, paused: bool) {
        self.quiescing.set(paused);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Resolves once accepting is (`true`) or is not (`false`) paused.
    pub(crate) async fn until_paused(&self, paused: bool) {
        std::future::poll_fn(|cx| {
            if self.quiescing.get() == paused {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

impl ShardCtx<'_> {
    /// The hand-over point: freezes the shard and copies its sessions out.
    pub(super) fn freeze(&mut self) -> (ShardImage, Vec<OwnedFd>) {
        let shard = self.shard;
        shard.upgrade.frozen.set(true);
        let now = shard.now();
        let keys: Vec<ConnKey> =
            self.st.conns.iter().map(|(i, c)| ConnKey { index: i as u32, generation: c.generation }).collect();
        let mut image = ShardImage::default();
        let mut fds = Vec::with_capacity(keys.len());
        let mut skipped = 0usize;
        for key in keys {
            let Some(conn) = self.st.conn_ref(key) else { continue };
            if conn.link.is_tls() {
                if matches!(conn.session.phase(), Phase::Handshaking | Phase::Active) {
                    let reason = "node upgrading; reconnect".to_owned();
                    self.close_conn(key, now, ErrorCode::GoingAway, reason);
                }
                continue;
            }
            let Some(record) = self.st.session_image(shard.id, key, now) else {
                skipped += 1;
                continue;
            };
            match self.st.conn_ref(key).map(|c| c.fd.get().try_clone_to_owned()) {
                Some(Ok(fd)) => {
                    image.sessions.push(record);
                    fds.push(fd);
                }
                Some(Err(err)) => {
                    skipped += 1;
                    warn!(shard = %shard.id, error = %err, "dup failed; session not handed over");
                }
                None => {}
            }
        }
        image.store = shard.upgrade.memory.borrow().as_ref().map(|m| m.image());
        image.revoked = self.st.revoked.entries();
        info!(shard = %shard.id, sessions = image.sessions.len(), skipped, "frozen for the hand-over");
        (image, fds)
    }

    /// The new process failed: serve on as if nothing happened.
    pub(super) fn resume(&mut self) {
        let shard = self.shard;
        shard.upgrade.frozen.set(false);
        shard.upgrade.set_paused(false);
        let st = &*self.st;
        for (_, conn) in st.conns.iter() {
            conn.wake();
        }
        shard.kick_flusher(st);
        info!(shard = %shard.id, "upgrade abandoned; serving on");
    }

    /// Indexes a session that was active in the old process, without a
    /// second AuthOk.
    pub(super) fn restore_active(
        &mut self,
        key: ConnKey,
        now: Now,
        login: &Login,
        groups: &[String],
        delivery: Option<(u64, Option<u32>)>,
    ) {
        if let Some(old) = self.st.device_slot(&login.device) {
            let old_key = self.st.key_of(old);
            self.kick(old_key, now, ErrorCode::Replaced, String::new());
        }
        if !self.st.index_device(key, login) {
            return;
        }
        let acks = self.st.conn_ref(key).is_some_and(Conn::acks);
        self.shard.counters.active.fetch_add(1, Ordering::Relaxed);
        // The home shard records the user; its ack finds nothing to activate.
        self.link_user(key, &login.user);
        for group in groups {
            // The old process enforced the limit when they were joined.
            let _ = self.st.groups.join(key.index, group, usize::MAX);
        }
        self.st.publish_group_counts(&self.shard.counters);
        if acks && let Some(image) = delivery {
            crate::delivery::reliable::restore(self, key, now, image);
        }
    }
}

impl State {
    /// One session as the new process needs it, or `None` for one that
    /// cannot move (closing, a WebSocket mid-upgrade or mid-frame).
    pub(super) fn session_image(&self, here: ShardId, key: ConnKey, now: Now) -> Option<SessionRecord> {
        let conn = self.conn_ref(key)?;
        let ws = match conn.link {
            Link::Plain => false,
            Link::Ws => true,
            _ => return None,
        };
        let io = conn.io.as_deref();
        if io.and_then(|io| io.ws.as_ref()).is_some_and(|ws| !ws.is_idle()) {
            return None;
        }
        let (phase, login, shard) = match conn.session.phase() {
            Phase::Handshaking => (RecordPhase::Handshaking, None, here),
            Phase::Active => (RecordPhase::Active, Some(active_login(conn)), here),
            Phase::Authenticated => {
                match (io.and_then(|io| io.handoff.as_ref()), io.and_then(|io| io.awaiting_dir.as_ref())) {
                    (Some((owner, login)), _) => (RecordPhase::Authenticated, Some((**login).clone()), *owner),
                    (None, Some(login)) => (RecordPhase::Authenticated, Some((**login).clone()), here),
                    (None, None) => return None,
                }
            }
            Phase::Closing | Phase::Closed => return None,
        };
        let mut out = Vec::new();
        if let Some(io) = io {
            io.out.copy_into(&mut out);
        }
        Some(SessionRecord {
            shard: shard.0,
            ws,
            phase,
            deadline_in_ms: conn.session.phase_deadline().0.saturating_sub(now.mono.0),
            idle_timeout_ms: conn.session.idle_timeout_ms(),
            expires_in_ms: conn.session.expires_in_ms(now.mono),
            connected_at: conn.connected_at,
            login,
            groups: self.groups.of(key.index).map(str::to_owned).collect(),
            delivery: self.reliable.image(key),
            out,
            partial: io.map(|io| io.partial.clone()).unwrap_or_default(),
        })
    }

    /// Keeps the waker of a connection task that found the shard frozen,
    /// so that [`ShardCtx::resume`] reaches it.
    pub(super) fn park_conn(&mut self, key: ConnKey, waker: &Waker) {
        if let Some(conn) = self.conn(key)
            && !conn.waker.as_ref().is_some_and(|w| w.will_wake(waker))
        {
            conn.waker = Some(waker.clone());
        }
    }
}

/// The login of an active session, rebuilt from its slot.
fn active_login(conn: &Conn) -> Login {
    let field = |i| conn.field(i).unwrap_or_default().to_owned();
    Login {
        user: field(0),
        device: field(1),
        app: field(2),
        platform: field(3),
        client_version: field(4),
        capabilities: u32::from(conn.capabilities),
        last_seq: 0,
        heartbeat_ms: 0,
        store_incarnation: 0,
        groups: conn.group_claims().map(str::to_owned).collect(),
        // An active session's token expiry travels in its record
        // (`expires_in_ms`); the issue time only matters at Auth.
        expires_at: 0,
        issued_at: 0,
    }
}
