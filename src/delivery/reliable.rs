//! At-least-once delivery on a shard: the owner shard of a device appends
//! each copy to the device's timeline ([`crate::delivery::store`]), sends it through
//! the device's window ([`crate::delivery`]), resends from the timer wheel,
//! drops acknowledged messages from the timeline, and replays the timeline
//! when the client resumes.
//!
//! The timeline is the source of truth, the window only a cache of what is
//! in flight. Per-device state ([`Tracked`]) exists while the device has
//! messages in flight, waiting in the timeline, or a store call pending;
//! an idle session has none (nothing is added to a connection's slot).
//!
//! Order: sequences are dense per device, so a new message goes out at once
//! only when it directly follows the last one sent (or, with nothing
//! tracked, when the store says nothing older waits); otherwise the device
//! is flagged as having a backlog and the timeline is read back in order
//! (`replay(after = last sent, limit = room in the window)`) when there is
//! room. At most one replay per device is in flight.
//!
//! Store calls are asynchronous. The memory store answers at once and its
//! answer is handled inline; a Redis answer comes back to a small task that
//! borrows the shard state only after the await.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tracing::warn;

use crate::delivery::store::{Appended, NewMessage, Replay, Status, StoreError};
use crate::delivery::{DeviceWindow, RetryPolicy};
use crate::mesh::{CopyResult, Origin, Outgoing, Part};
use crate::protocol::codec::{self, Flags};
use crate::protocol::ids::ConnKey;
use crate::protocol::proto::{self, FrameKind};
use crate::protocol::time::{Millis, Now};
use crate::session::Login;
use crate::shard::{Shard, State};

// Hook: delivery state across the in-place upgrade.
mod handover;

/// Reliable-delivery settings of a shard.
#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// Messages in flight per device.
    pub window: usize,
    pub policy: RetryPolicy,
    /// The store is shared by every shard (Redis): any shard can answer a
    /// status query.
    pub shared_store: bool,
    /// Stored messages a client without ACK support gets when it connects.
    pub unacked_replay_limit: usize,
    /// Part of every message id (see `delivery.node_index`).
    pub node_index: u16,
}

/// Counters of at-least-once delivery, per shard.
#[derive(Debug, Default)]
pub struct ReliableCounters {
    /// Copies appended to timelines.
    pub stored: AtomicU64,
    /// Store calls that failed or were shed.
    pub store_errors: AtomicU64,
    /// Messages sent to ACK-capable clients for the first time in their
    /// session (directly or from a replay).
    pub sent: AtomicU64,
    /// Resends of unacknowledged messages (each one counted).
    pub retries: AtomicU64,
    /// Messages that reached `max_retries` (left to the timeline).
    pub given_up: AtomicU64,
    /// Ack frames received, and messages they acknowledged.
    pub ack_frames: AtomicU64,
    pub acked: AtomicU64,
    /// ResyncRequired frames sent.
    pub resyncs: AtomicU64,
    /// Stored messages sent once to clients without ACK support.
    pub sent_unacked: AtomicU64,
    /// Devices with delivery state right now.
    pub tracked_devices: AtomicU64,
}

/// Delivery state of one online, ACK-capable device (see the module docs).
#[derive(Debug)]
pub struct Tracked {
    key: ConnKey,
    /// In flight: sequence, encoded frame, resend schedule.
    window: DeviceWindow<Bytes>,
    /// Highest sequence sent on this session, or announced as missing;
    /// the next message to send follows it.
    last_sent: u64,
    /// Messages after `last_sent` wait in the timeline.
    backlog: bool,
    /// A replay is in flight.
    refilling: bool,
    /// An append completed while replaying: replay once more afterwards.
    refill_again: bool,
    /// A message reached `max_retries`: nothing new is sent on this session
    /// until the client acknowledges something (or reconnects and resumes).
    stalled: bool,
    /// Until the session's first replay succeeded: the store incarnation the
    /// client saw last (it may have missed all that a lost store held).
    resume_incarnation: u64,
    /// The session's first replay has not succeeded yet: it is a resume
    /// (see [`crate::delivery::store::TimelineStore::resume`]).
    resuming: bool,
    /// The resume replayed messages: the first resend on this session
    /// counts a replay without an ACK ([`crate::delivery::store::TimelineStore::count_replay`]).
    replayed: bool,
}

impl Tracked {
    fn new(key: ConnKey, last_sent: u64) -> Tracked {
        Tracked {
            key,
            window: DeviceWindow::new(last_sent),
            last_sent,
            backlog: false,
            refilling: false,
            refill_again: false,
            stalled: false,
            resume_incarnation: 0,
            resuming: false,
            replayed: false,
        }
    }

    /// Starts the device's resend schedule from its learned recovery time.
    fn learned(mut self, learned_ms: Option<u32>) -> Tracked {
        self.window.set_learned_ms(learned_ms);
        self
    }

    fn is_idle(&self) -> bool {
        self.window.is_idle() && !self.backlog && !self.refilling && !self.stalled
    }
}

/// The `Message` frame of one stored copy.
fn message_frame(seq: u64, message_id: u64, service_id: &str, payload: &Bytes) -> Bytes {
    let body = proto::Message { payload: payload.clone(), service_id: service_id.to_owned(), message_id, seq };
    codec::encode(FrameKind::Message, Flags::default(), &body)
}

/// The same frame with the header's retransmission flag set.
fn as_retransmission(frame: &Bytes) -> Bytes {
    let mut copy = BytesMut::from(&frame[..]);
    if let Some(flags) = copy.get_mut(3) {
        *flags |= Flags::RETRANSMISSION.0;
    }
    copy.freeze()
}

fn unix_ms(now: Now) -> u64 {
    u64::try_from(now.unix_ms).unwrap_or(0)
}

impl Shard {
    /// Runs a store call; `then` gets its output and the shard state: inline
    /// when the future is ready at once (the memory store), else from a task
    /// once it resolves (never holding a state borrow across the await).
    pub(crate) fn after_store<T: 'static>(
        &self,
        st: &mut State,
        fut: impl Future<Output = T> + 'static,
        then: impl FnOnce(&Shard, &mut State, T) + 'static,
    ) {
        let mut fut = Box::pin(fut);
        let mut cx = Context::from_waker(Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(value) => then(self, st, value),
            Poll::Pending => {
                let Some(shard) = self.me.upgrade() else { return };
                glommio::spawn_local(async move {
                    // glommio polls a new task right away, inside the
                    // caller's borrow of the state: wait for the next turn.
                    futures_lite::future::yield_now().await;
                    let value = fut.await;
                    let mut st = shard.state.borrow_mut();
                    then(&shard, &mut st, value);
                })
                .detach();
            }
        }
    }

    /// A store call whose only outcome worth knowing is a failure.
    fn store_quietly(
        &self,
        st: &mut State,
        what: &'static str,
        fut: impl Future<Output = Result<(), StoreError>> + 'static,
    ) {
        self.after_store(st, fut, move |shard, _, result| {
            if let Err(err) = result {
                shard.store_failed(what, &err);
            }
        });
    }

    /// Counts a store failure; logs the first and then every 1,024th.
    fn store_failed(&self, what: &'static str, err: &StoreError) {
        let n = self.counters.reliable.store_errors.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1024) {
            warn!(shard = %self.id, what, error = %err, failures = n + 1, "timeline store call failed");
        }
    }

    fn ack_in_store(&self, st: &mut State, device: &str, seq: u64, now: Now) {
        let (store, device) = (self.store.clone(), device.to_owned());
        let now_ms = unix_ms(now);
        self.store_quietly(st, "ack", async move { store.ack(&device, seq, now_ms).await });
    }

    /// The device state of session `key`, if it has one (a state left by an
    /// earlier session in the same slot is dropped).
    fn tracked<'a>(&self, st: &'a mut State, key: ConnKey) -> Option<&'a mut Tracked> {
        if st.reliable.get(&key.index).is_some_and(|t| t.key != key) {
            self.forget_delivery(st, key.index);
        }
        st.reliable.get_mut(&key.index)
    }

    fn track(&self, st: &mut State, tracked: Tracked) {
        if st.reliable.insert(tracked.key.index, tracked).is_none() {
            self.counters.reliable.tracked_devices.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops the device state of `slot` (the session ended): nothing is
    /// resent; the timeline keeps every unacknowledged message.
    pub(crate) fn forget_delivery(&self, st: &mut State, slot: u32) {
        if st.reliable.remove(&slot).is_some() {
            self.counters.reliable.tracked_devices.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn forget_if_idle(&self, st: &mut State, key: ConnKey) {
        if st.reliable.get(&key.index).is_some_and(|t| t.key == key && t.is_idle()) {
            self.forget_delivery(st, key.index);
        }
    }

    // ---- new messages ---------------------------------------------------

    /// Appends one copy per `(target index, device, message id)` to the
    /// devices' timelines (this shard owns them), sends each to its device
    /// when it can go out now, and answers the origin with the sequences.
    /// An empty device stands for a user target with no session here: it is
    /// answered without a copy.
    pub(crate) fn store_copies(
        &self,
        st: &mut State,
        origin: Origin,
        copies: Vec<(u32, String, u64)>,
        msg: Arc<Outgoing>,
    ) {
        let now_ms = unix_ms(self.now());
        let store = self.store.clone();
        let m = msg.clone();
        let appends = async move {
            let mut results = Vec::with_capacity(copies.len());
            {
                // Created (and, for Redis, queued) all at once, in order.
                let pending: Vec<_> = copies
                    .iter()
                    .map(|(_, device, message_id)| {
                        let new = NewMessage {
                            message_id: *message_id,
                            service_id: m.service_id.clone(),
                            payload: m.payload.clone(),
                            expires_at_ms: m.expires_at_ms,
                        };
                        (!device.is_empty()).then(|| store.append(device, new, now_ms))
                    })
                    .collect();
                for append in pending {
                    results.push(match append {
                        Some(append) => Some(append.await),
                        None => None,
                    });
                }
            }
            (copies, results)
        };
        self.after_store(st, appends, move |shard, st, (copies, results)| {
            let mut part = Vec::with_capacity(copies.len());
            for ((idx, device, message_id), result) in copies.into_iter().zip(results) {
                let Some(result) = result else {
                    part.push(CopyResult { idx, ..Default::default() });
                    continue;
                };
                match result {
                    Ok(appended) => {
                        shard.counters.reliable.stored.fetch_add(1, Ordering::Relaxed);
                        let sessions = shard.on_appended(st, &device, appended, message_id, &msg);
                        part.push(CopyResult {
                            idx,
                            device,
                            seq: appended.seq,
                            message_id,
                            sessions,
                            ..Default::default()
                        });
                    }
                    Err(err) => {
                        shard.store_failed("append", &err);
                        let retryable = err.is_retryable();
                        let error = Some(err.to_string());
                        part.push(CopyResult { idx, device, message_id, error, retryable, ..Default::default() });
                    }
                }
            }
            shard.answer(st, origin, Part::Stored(part));
        });
    }

    /// A copy is in the timeline: send it now if the device is online and
    /// it is next in line. Returns the sessions it was sent to (0 or 1).
    fn on_appended(&self, st: &mut State, device: &str, appended: Appended, message_id: u64, msg: &Outgoing) -> u32 {
        let Some(slot) = st.device_slot(device) else { return 0 };
        let key = st.key_of(slot);
        // Not active yet: the activation replay will find it.
        let Some((_, true, acks)) = st.delivery_target(key) else { return 0 };
        let Appended { seq, oldest, learned_ms } = appended;
        let now = self.now();
        let frame = message_frame(seq, message_id, &msg.service_id, &msg.payload);
        if !acks {
            // A client without ACK support gets it once, at most once; once
            // handed to its socket it is acknowledged in the store so no
            // resume replays it. A send that failed (the session was cut off
            // as SLOW) leaves it in the timeline for the next connect.
            let sent = self.deliver(st, slot, &frame);
            if sent {
                self.counters.reliable.sent_unacked.fetch_add(1, Ordering::Relaxed);
                self.ack_in_store(st, device, seq, now);
            }
            return u32::from(sent);
        }
        let window = self.cfg.delivery.window;
        let Some(t) = self.tracked(st, key) else {
            if oldest < seq {
                // Older messages wait (another append still on its way, or a
                // failed send): read them back in order.
                let mut t = Tracked::new(key, oldest - 1).learned(learned_ms);
                t.backlog = true;
                self.track(st, t);
                self.refill(st, key, now);
                return 0;
            }
            self.track(st, Tracked::new(key, seq - 1).learned(learned_ms));
            return u32::from(self.send_new(st, key, (seq, message_id), frame, now));
        };
        if t.refilling {
            t.refill_again = true;
            return 0;
        }
        if seq <= t.last_sent {
            return 0; // a replay already sent it
        }
        if seq == t.last_sent + 1 && !t.backlog && !t.stalled && t.window.has_room(window) {
            return u32::from(self.send_new(st, key, (seq, message_id), frame, now));
        }
        t.backlog = true;
        if !t.stalled && t.window.has_room(window) {
            self.refill(st, key, now);
        }
        0
    }

    /// Sends `seq` for the first time on this session and puts it in the
    /// window. False when the session no longer takes frames.
    fn send_new(&self, st: &mut State, key: ConnKey, (seq, message_id): (u64, u64), frame: Bytes, now: Now) -> bool {
        if !self.deliver(st, key.index, &frame) {
            return false;
        }
        let Some(device) = st.delivery_target(key).map(|(d, _, _)| d.to_owned()) else { return false };
        let policy = self.cfg.delivery.policy;
        let Some(t) = self.tracked(st, key) else { return false };
        let was_idle = t.window.is_idle();
        t.window.on_sent(seq, frame, now.mono, &policy);
        t.last_sent = seq;
        let resend_at = t.window.next_deadline();
        if was_idle && let Some(at) = resend_at {
            st.wake_at(key, at);
        }
        self.counters.reliable.sent.fetch_add(1, Ordering::Relaxed);
        let store = self.store.clone();
        let now_ms = unix_ms(now);
        self.store_quietly(st, "mark_sent", async move { store.mark_sent(&device, seq, message_id, now_ms).await });
        true
    }

    // ---- replays --------------------------------------------------------

    /// Reads the messages after the last one sent back from the timeline,
    /// as many as the window has room for.
    fn refill(&self, st: &mut State, key: ConnKey, now: Now) {
        let window = self.cfg.delivery.window;
        let Some(device) = st.delivery_target(key).map(|(d, _, _)| d.to_owned()) else { return };
        let Some(t) = self.tracked(st, key) else { return };
        if t.refilling {
            t.refill_again = true;
            return;
        }
        let room = window.saturating_sub(t.window.in_flight());
        if t.stalled || room == 0 {
            t.backlog = true;
            return;
        }
        t.refilling = true;
        t.refill_again = false;
        let (after, resume) = (t.last_sent, t.resuming);
        let store = self.store.clone();
        let now_ms = unix_ms(now);
        let replay = async move {
            if resume {
                store.resume(&device, after, room, now_ms).await
            } else {
                store.replay(&device, after, room, now_ms).await
            }
        };
        self.after_store(st, replay, move |shard, st, result| shard.on_replayed(st, key, room, result));
    }

    /// Sends what a replay found, after announcing a gap if there is one.
    fn on_replayed(&self, st: &mut State, key: ConnKey, limit: usize, result: Result<Replay, StoreError>) {
        let now = self.now();
        let Some(t) = self.tracked(st, key) else { return };
        t.refilling = false;
        let replay = match result {
            Ok(replay) => replay,
            Err(err) => {
                // Try again from the timer wheel.
                t.backlog = true;
                let retry_at = now.mono.add_ms(u64::from(self.cfg.delivery.policy.base_delay_ms));
                st.wake_at(key, retry_at);
                return self.store_failed("replay", &err);
            }
        };
        let mut missing = replay.missing;
        if std::mem::take(&mut t.resuming) {
            // A reconnecting device starts from what its link taught us.
            t.window.set_learned_ms(replay.learned_ms);
            t.replayed = !replay.messages.is_empty();
        }
        let seen = std::mem::take(&mut t.resume_incarnation);
        if seen != 0 && replay.incarnation != 0 && seen != replay.incarnation && t.last_sent < replay.base {
            // The client resumes across a store that lost its contents: all
            // it may have missed up to this incarnation's first sequence is
            // unknown, even from sequence 0.
            let to = missing.map_or(replay.base, |(_, to)| to.max(replay.base));
            missing = Some((t.last_sent + 1, to));
        }
        if let Some((from, to)) = missing
            && to > t.last_sent
        {
            let from = from.max(t.last_sent + 1);
            t.last_sent = to;
            let frame = codec::encode(
                FrameKind::ResyncRequired,
                Flags::default(),
                &proto::ResyncRequired { from_seq: from, to_seq: to },
            );
            self.counters.reliable.resyncs.fetch_add(1, Ordering::Relaxed);
            if !self.send_to_slot(st, key.index, &frame) {
                return;
            }
        }
        let more = replay.messages.len() >= limit;
        let mut progressed = false;
        for m in replay.messages {
            let Some(t) = self.tracked(st, key) else { return };
            if m.seq <= t.last_sent {
                continue;
            }
            let frame = message_frame(m.seq, m.message_id, &m.service_id, &m.payload);
            if !self.send_new(st, key, (m.seq, m.message_id), frame, now) {
                return;
            }
            progressed = true;
        }
        let Some(t) = self.tracked(st, key) else { return };
        let again = std::mem::take(&mut t.refill_again);
        t.backlog = more || again;
        if t.backlog && (progressed || again) {
            self.refill(st, key, now);
        }
        self.forget_if_idle(st, key);
    }

    /// A session became active: replay what its client has not processed.
    pub(crate) fn resume_delivery(&self, st: &mut State, key: ConnKey, now: Now, login: &Login) {
        let device = login.device.clone();
        if login.capabilities & proto::Capability::Ack as u32 != 0 {
            if login.last_seq > 0 {
                // The client says it processed everything up to here.
                self.ack_in_store(st, &device, login.last_seq, now);
            }
            let mut t = Tracked::new(key, login.last_seq);
            t.resume_incarnation = login.store_incarnation;
            t.resuming = true;
            self.track(st, t);
            return self.refill(st, key, now);
        }
        // An old client: whatever waits goes out once, and is acknowledged
        // in the store (it cannot be resent: the client cannot ACK).
        let limit = self.cfg.delivery.unacked_replay_limit;
        let store = self.store.clone();
        let now_ms = unix_ms(now);
        let replay = async move { store.replay(&device, 0, limit, now_ms).await };
        self.after_store(st, replay, move |shard, st, result| {
            let replay = match result {
                Ok(replay) => replay,
                Err(err) => return shard.store_failed("replay", &err),
            };
            let Some((device, true, _)) = st.delivery_target(key).map(|(d, a, k)| (d.to_owned(), a, k)) else {
                return;
            };
            let mut last = None;
            for m in replay.messages {
                let frame = message_frame(m.seq, m.message_id, &m.service_id, &m.payload);
                if !shard.deliver(st, key.index, &frame) {
                    break;
                }
                shard.counters.reliable.sent_unacked.fetch_add(1, Ordering::Relaxed);
                last = Some(m.seq);
            }
            if let Some(seq) = last {
                shard.ack_in_store(st, &device, seq, shard.now());
            }
        });
    }

    // ---- acknowledgements and resends -------------------------------------

    /// The client processed everything up to `seq`.
    pub(crate) fn on_ack(&self, st: &mut State, key: ConnKey, now: Now, seq: u64) {
        self.counters.reliable.ack_frames.fetch_add(1, Ordering::Relaxed);
        let policy = self.cfg.delivery.policy;
        let window = self.cfg.delivery.window;
        let Some(device) = st.delivery_target(key).map(|(d, _, _)| d.to_owned()) else { return };
        // Nothing in flight: a late duplicate, nothing to do.
        let Some(t) = self.tracked(st, key) else { return };
        // A client cannot acknowledge what was never sent to it.
        let seq = seq.min(t.last_sent);
        let learned_before = t.window.learned_ms();
        let acked = t.window.on_ack(seq, now.mono, &policy);
        if acked.stale {
            return;
        }
        let learned = t.window.learned_ms();
        t.stalled = false;
        // It acknowledges: its replay was not in vain.
        t.replayed = false;
        let refill = t.backlog && !t.refilling && t.window.has_room(window);
        self.counters.reliable.acked.fetch_add(u64::from(acked.messages), Ordering::Relaxed);
        self.ack_in_store(st, &device, seq, now);
        if learned != learned_before {
            // Kept with the timeline: the next window or session starts
            // from it (written only when it changes).
            let (store, device, now_ms) = (self.store.clone(), device.clone(), unix_ms(now));
            self.store_quietly(st, "set_learned", async move { store.set_learned(&device, learned, now_ms).await });
        }
        if refill {
            self.refill(st, key, now);
        }
        self.forget_if_idle(st, key);
    }

    /// Resends what is due for session `key` (from the timer sweep);
    /// returns when the window next needs the sweep.
    pub(crate) fn retransmit(&self, st: &mut State, key: ConnKey, now: Now) -> Option<Millis> {
        let policy = self.cfg.delivery.policy;
        let window = self.cfg.delivery.window;
        let t = self.tracked(st, key)?;
        let due = t.window.due(now.mono, &policy);
        // A replayed backlog went unacknowledged past a resend: the client
        // had it and the time to acknowledge it.
        let unacked_replay = (!due.resend.is_empty() && std::mem::take(&mut t.replayed)).then_some(t.last_sent);
        let frames: Vec<Bytes> =
            due.resend.iter().filter_map(|&seq| t.window.payload(seq)).map(as_retransmission).collect();
        if !due.given_up.is_empty() {
            self.counters.reliable.given_up.fetch_add(due.given_up.len() as u64, Ordering::Relaxed);
            t.stalled = true;
            t.backlog = true;
        }
        let refill = t.backlog && !t.refilling && !t.stalled && t.window.has_room(window);
        for frame in &frames {
            if self.send_to_slot(st, key.index, frame) {
                self.counters.reliable.retries.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(through) = unacked_replay
            && let Some((device, _, _)) = st.delivery_target(key)
        {
            let (store, device) = (self.store.clone(), device.to_owned());
            self.store_quietly(st, "count_replay", async move { store.count_replay(&device, through).await });
        }
        if refill {
            // A replay that failed earlier.
            self.refill(st, key, now);
        }
        self.forget_if_idle(st, key);
        st.reliable.get(&key.index).filter(|t| t.key == key).and_then(|t| t.window.next_deadline())
    }

    // ---- status ---------------------------------------------------------

    /// Whether every shard shares one store (Redis).
    pub(crate) fn store_is_shared(&self) -> bool {
        self.cfg.delivery.shared_store
    }

    /// Looks message ids up in this shard's store and answers the origin.
    pub(crate) fn status_part(&self, st: &mut State, origin: Origin, ids: Arc<Vec<u64>>) {
        let store = self.store.clone();
        let lookups = async move {
            let mut found = Vec::new();
            let mut failures = Vec::new();
            let pending: Vec<_> = ids.iter().map(|&id| store.status(id)).collect();
            for (i, lookup) in pending.into_iter().enumerate() {
                match lookup.await {
                    Ok(Some(status)) => found.push((i as u32, status_to_proto(ids[i], status))),
                    Ok(None) => {}
                    Err(err) => failures.push(err),
                }
            }
            (found, failures)
        };
        self.after_store(st, lookups, move |shard, st, (found, failures)| {
            for err in &failures {
                shard.store_failed("status", err);
            }
            shard.answer(st, origin, Part::Status(found));
        });
    }
}

fn status_to_proto(message_id: u64, status: Status) -> proto::MessageStatus {
    use proto::DeliveryState as S;
    let reason = match &status {
        Status::Expired { by, .. } => by.to_string(),
        _ => String::new(),
    };
    let (state, device, seq, stored_at_ms, sent_at_ms, acked_at_ms) = match status {
        Status::Stored { device, seq, stored_at_ms } => (S::Stored, device, seq, stored_at_ms, 0, 0),
        Status::Sent { device, seq, stored_at_ms, sent_at_ms } => (S::Sent, device, seq, stored_at_ms, sent_at_ms, 0),
        Status::Acked { device, seq, stored_at_ms, sent_at_ms, acked_at_ms } => {
            (S::Acked, device, seq, stored_at_ms, sent_at_ms, acked_at_ms)
        }
        Status::Expired { device, seq, .. } => (S::Expired, device, seq, 0, 0, 0),
    };
    let state = state as i32;
    proto::MessageStatus { message_id, state, device, seq, stored_at_ms, sent_at_ms, acked_at_ms, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::split_frame;

    #[test]
    fn retransmissions_carry_the_flag_and_the_same_body() {
        let frame = message_frame(42, 7, "chat", &Bytes::from_static(b"hi"));
        let again = as_retransmission(&frame);
        let (h1, b1) = split_frame(&frame, 1024).unwrap().unwrap();
        let (h2, b2) = split_frame(&again, 1024).unwrap().unwrap();
        assert!(!h1.flags.is_retransmission() && h2.flags.is_retransmission());
        assert_eq!(b1, b2);
    }

    #[test]
    fn tracked_state_is_small() {
        // Paid per device with messages in flight, not per connection.
        assert!(std::mem::size_of::<Tracked>() <= 96, "{}", std::mem::size_of::<Tracked>());
    }
}
