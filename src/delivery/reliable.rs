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
//! A component: [`Reliable`] owns the per-device state, the store and the
//! settings; its entry points are called with a [`Host`], the small context
//! the shard gives it (its sessions, its outbox, the store jobs it runs), and
//! the time. Nothing here reads the clock or knows the shard's types, so
//! `delivery/` does not depend on `shard/`.
//!
//! Store calls are asynchronous: each becomes a [`StoreJob`] the host runs.
//! The memory store answers at once and the host hands its [`StoreDone`]
//! back inline ([`done`]); a Redis answer comes back from a small task that
//! borrows the shard state only after the await.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tracing::warn;

use crate::delivery::store::{Appended, NewMessage, Replay, Status, StoreError, TimelineStore};
use crate::delivery::{DeviceWindow, RetryPolicy};
use crate::mesh::{CopyResult, Origin, Outgoing, Part};
use crate::protocol::codec::{self, Flags};
use crate::protocol::ids::{ConnKey, ShardId};
use crate::protocol::proto::{self, FrameKind};
use crate::protocol::time::{Millis, Now};
use crate::session::Login;

// Hook: delivery state across the in-place upgrade.
mod handover;
pub(crate) use handover::restore;

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
    /// Timeline reads answered and handled (the gap announced and the
    /// messages sent): a session's resume is complete once its read is.
    pub replays: AtomicU64,
    /// Stored messages sent once to clients without ACK support.
    pub sent_unacked: AtomicU64,
    /// Devices with delivery state right now.
    pub tracked_devices: AtomicU64,
    /// From stored to acknowledged by the client (`/metrics`).
    pub ack_latency: crate::cluster::AtomicHistogram,
}

impl ReliableCounters {
    /// Message `message_id` was acknowledged at `now_unix_ms`: its time
    /// since it was stored (the id carries its store time).
    pub(crate) fn acked_after_store(&self, message_id: u64, now_unix_ms: u64) {
        let stored = crate::delivery::MessageIds::unix_ms_of(message_id);
        self.ack_latency.record(std::time::Duration::from_millis(now_unix_ms.saturating_sub(stored)));
    }
}

/// Delivery state of one online, ACK-capable device (see the module docs).
#[derive(Debug)]
pub struct Tracked {
    key: ConnKey,
    /// In flight: sequence, encoded frame, resend schedule.
    /// In flight: the frame and its message id (for the ACK latency).
    window: DeviceWindow<(Bytes, u64)>,
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

/// A store call of the delivery component, for the host to run.
pub(crate) type StoreJob = Pin<Box<dyn Future<Output = StoreDone>>>;

/// The outcome of a [`StoreJob`], handed back to [`done`].
pub(crate) enum StoreDone {
    /// A call whose only outcome worth knowing is a failure.
    Quiet { what: &'static str, result: Result<(), StoreError> },
    /// The appends of [`store_copies`].
    Appended {
        origin: Origin,
        copies: Vec<(u32, String, u64)>,
        results: Vec<Option<Result<Appended, StoreError>>>,
        msg: Arc<Outgoing>,
    },
    /// A replay for an ACK-capable session ([`refill`]).
    Replayed { key: ConnKey, limit: usize, result: Result<Replay, StoreError> },
    /// The once-only replay for a client without ACK support.
    ReplayedUnacked { key: ConnKey, result: Result<Replay, StoreError> },
    /// The lookups of [`status_part`].
    Status { origin: Origin, found: Vec<(u32, proto::MessageStatus)>, failures: Vec<StoreError> },
}

/// What the delivery component needs of the shard that holds it.
pub(crate) trait Host {
    /// The component itself (it lives in the shard's state).
    fn delivery(&mut self) -> &mut Reliable;
    /// The device of session `key`, whether it is active (AuthOk sent, not
    /// closing) and whether it ACKs.
    fn target(&self, key: ConnKey) -> Option<(&str, bool, bool)>;
    fn device_slot(&self, device: &str) -> Option<u32>;
    fn key_of(&self, slot: u32) -> ConnKey;
    /// Files `key` in the timer wheel for `at` (a resend).
    fn wake_at(&mut self, key: ConnKey, at: Millis);
    /// Sends a message to the session in `slot`, counted as a delivery;
    /// false when the session no longer takes frames.
    fn deliver(&mut self, slot: u32, frame: &Bytes) -> bool;
    /// The same, not counted (resends, control frames).
    fn send(&mut self, slot: u32, frame: &Bytes) -> bool;
    /// Answers the origin of a push with this shard's part.
    fn answer(&mut self, origin: Origin, part: Part);
    /// Runs a store call and hands its outcome to [`done`] with the time
    /// then: inline when it is ready at once, else once it resolves.
    fn run_store(&mut self, job: StoreJob);
}

/// The at-least-once delivery of one shard (see the module docs).
pub(crate) struct Reliable {
    shard: ShardId,
    settings: DeliverySettings,
    store: Rc<dyn TimelineStore>,
    counters: Arc<ReliableCounters>,
    /// Delivery state of online devices, by slot: only while a device has
    /// messages in flight or waiting.
    tracked: HashMap<u32, Tracked>,
}

impl Reliable {
    pub(crate) fn new(
        shard: ShardId,
        settings: DeliverySettings,
        store: Rc<dyn TimelineStore>,
        counters: Arc<ReliableCounters>,
    ) -> Reliable {
        Reliable { shard, settings, store, counters, tracked: HashMap::new() }
    }

    /// Whether every shard shares one store (Redis).
    pub(crate) fn store_is_shared(&self) -> bool {
        self.settings.shared_store
    }

    /// Drops the device state of `slot` (the session ended): nothing is
    /// resent; the timeline keeps every unacknowledged message.
    pub(crate) fn forget(&mut self, slot: u32) {
        if self.tracked.remove(&slot).is_some() {
            self.counters.tracked_devices.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The device state of session `key`, if it has one (a state left by an
    /// earlier session in the same slot is dropped).
    fn tracked(&mut self, key: ConnKey) -> Option<&mut Tracked> {
        if self.tracked.get(&key.index).is_some_and(|t| t.key != key) {
            self.forget(key.index);
        }
        self.tracked.get_mut(&key.index)
    }

    fn track(&mut self, tracked: Tracked) {
        if self.tracked.insert(tracked.key.index, tracked).is_none() {
            self.counters.tracked_devices.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn forget_if_idle(&mut self, key: ConnKey) {
        if self.tracked.get(&key.index).is_some_and(|t| t.key == key && t.is_idle()) {
            self.forget(key.index);
        }
    }

    /// Counts a store failure; logs the first and then every 1,024th.
    fn failed(&self, what: &'static str, err: &StoreError) {
        let n = self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1024) {
            warn!(shard = %self.shard, what, error = %err, failures = n + 1, "timeline store call failed");
        }
    }

    fn counters(&self) -> &ReliableCounters {
        &self.counters
    }
}

/// A store call whose only outcome worth knowing is a failure.
fn store_quietly<H: Host>(h: &mut H, what: &'static str, fut: impl Future<Output = Result<(), StoreError>> + 'static) {
    h.run_store(Box::pin(async move { StoreDone::Quiet { what, result: fut.await } }));
}

fn ack_in_store<H: Host>(h: &mut H, device: &str, seq: u64, now: Now) {
    let (store, device) = (h.delivery().store.clone(), device.to_owned());
    let now_ms = unix_ms(now);
    store_quietly(h, "ack", async move { store.ack(&device, seq, now_ms).await });
}

/// A store call finished: carries on where it was started.
pub(crate) fn done<H: Host>(h: &mut H, now: Now, done: StoreDone) {
    match done {
        StoreDone::Quiet { what, result } => {
            if let Err(err) = result {
                h.delivery().failed(what, &err);
            }
        }
        StoreDone::Appended { origin, copies, results, msg } => on_stored(h, now, origin, copies, results, &msg),
        StoreDone::Replayed { key, limit, result } => on_replayed(h, key, now, limit, result),
        StoreDone::ReplayedUnacked { key, result } => on_replayed_unacked(h, key, now, result),
        StoreDone::Status { origin, found, failures } => {
            for err in &failures {
                h.delivery().failed("status", err);
            }
            h.answer(origin, Part::Status(found));
        }
    }
}

// ---- new messages -------------------------------------------------------

/// Appends one copy per `(target index, device, message id)` to the
/// devices' timelines (this shard owns them), sends each to its device
/// when it can go out now, and answers the origin with the sequences.
/// An empty device stands for a user target with no session here: it is
/// answered without a copy.
pub(crate) fn store_copies<H: Host>(
    h: &mut H,
    now: Now,
    origin: Origin,
    copies: Vec<(u32, String, u64)>,
    msg: Arc<Outgoing>,
) {
    let now_ms = unix_ms(now);
    let store = h.delivery().store.clone();
    let appends = async move {
        let mut results = Vec::with_capacity(copies.len());
        {
            // Created (and, for Redis, queued) all at once, in order.
            let pending: Vec<_> = copies
                .iter()
                .map(|(_, device, message_id)| {
                    let new = NewMessage {
                        message_id: *message_id,
                        service_id: msg.service_id.clone(),
                        payload: msg.payload.clone(),
                        expires_at_ms: msg.expires_at_ms,
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
        StoreDone::Appended { origin, copies, results, msg }
    };
    h.run_store(Box::pin(appends));
}

/// The appends of [`store_copies`] are done: sends and answers.
fn on_stored<H: Host>(
    h: &mut H,
    now: Now,
    origin: Origin,
    copies: Vec<(u32, String, u64)>,
    results: Vec<Option<Result<Appended, StoreError>>>,
    msg: &Outgoing,
) {
    let mut part = Vec::with_capacity(copies.len());
    for ((idx, device, message_id), result) in copies.into_iter().zip(results) {
        let Some(result) = result else {
            part.push(CopyResult { idx, ..Default::default() });
            continue;
        };
        match result {
            Ok(appended) => {
                h.delivery().counters().stored.fetch_add(1, Ordering::Relaxed);
                let sessions = on_appended(h, now, &device, appended, message_id, msg);
                part.push(CopyResult { idx, device, seq: appended.seq, message_id, sessions, ..Default::default() });
            }
            Err(err) => {
                h.delivery().failed("append", &err);
                let retryable = err.is_retryable();
                let error = Some(err.to_string());
                part.push(CopyResult { idx, device, message_id, error, retryable, ..Default::default() });
            }
        }
    }
    h.answer(origin, Part::Stored(part));
}

/// A copy is in the timeline: send it now if the device is online and
/// it is next in line. Returns the sessions it was sent to (0 or 1).
fn on_appended<H: Host>(h: &mut H, now: Now, device: &str, appended: Appended, message_id: u64, msg: &Outgoing) -> u32 {
    let Some(slot) = h.device_slot(device) else { return 0 };
    let key = h.key_of(slot);
    // Not active yet: the activation replay will find it.
    let Some((_, true, acks)) = h.target(key) else { return 0 };
    let Appended { seq, oldest, learned_ms } = appended;
    let frame = message_frame(seq, message_id, &msg.service_id, &msg.payload);
    if !acks {
        // A client without ACK support gets it once, at most once; once
        // handed to its socket it is acknowledged in the store so no
        // resume replays it. A send that failed (the session was cut off
        // as SLOW) leaves it in the timeline for the next connect.
        let sent = h.deliver(slot, &frame);
        if sent {
            h.delivery().counters().sent_unacked.fetch_add(1, Ordering::Relaxed);
            ack_in_store(h, device, seq, now);
        }
        return u32::from(sent);
    }
    let r = h.delivery();
    let window = r.settings.window;
    let Some(t) = r.tracked(key) else {
        if oldest < seq {
            // Older messages wait (another append still on its way, or a
            // failed send): read them back in order.
            let mut t = Tracked::new(key, oldest - 1).learned(learned_ms);
            t.backlog = true;
            r.track(t);
            refill(h, key, now);
            return 0;
        }
        r.track(Tracked::new(key, seq - 1).learned(learned_ms));
        return u32::from(send_new(h, key, (seq, message_id), frame, now));
    };
    if t.refilling {
        t.refill_again = true;
        return 0;
    }
    if seq <= t.last_sent {
        return 0; // a replay already sent it
    }
    if seq == t.last_sent + 1 && !t.backlog && !t.stalled && t.window.has_room(window) {
        return u32::from(send_new(h, key, (seq, message_id), frame, now));
    }
    t.backlog = true;
    if !t.stalled && t.window.has_room(window) {
        refill(h, key, now);
    }
    0
}

/// Sends `seq` for the first time on this session and puts it in the
/// window. False when the session no longer takes frames.
fn send_new<H: Host>(h: &mut H, key: ConnKey, (seq, message_id): (u64, u64), frame: Bytes, now: Now) -> bool {
    if !h.deliver(key.index, &frame) {
        return false;
    }
    let Some(device) = h.target(key).map(|(d, _, _)| d.to_owned()) else { return false };
    let r = h.delivery();
    let policy = r.settings.policy;
    let Some(t) = r.tracked(key) else { return false };
    let was_idle = t.window.is_idle();
    t.window.on_sent(seq, (frame, message_id), now.mono, &policy);
    t.last_sent = seq;
    let resend_at = t.window.next_deadline();
    r.counters().sent.fetch_add(1, Ordering::Relaxed);
    let store = r.store.clone();
    if was_idle && let Some(at) = resend_at {
        h.wake_at(key, at);
    }
    let now_ms = unix_ms(now);
    store_quietly(h, "mark_sent", async move { store.mark_sent(&device, seq, message_id, now_ms).await });
    true
}

// ---- replays ------------------------------------------------------------

/// Reads the messages after the last one sent back from the timeline,
/// as many as the window has room for.
fn refill<H: Host>(h: &mut H, key: ConnKey, now: Now) {
    let Some(device) = h.target(key).map(|(d, _, _)| d.to_owned()) else { return };
    let r = h.delivery();
    let window = r.settings.window;
    let store = r.store.clone();
    let Some(t) = r.tracked(key) else { return };
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
    let now_ms = unix_ms(now);
    let replay = async move {
        let result = if resume {
            store.resume(&device, after, room, now_ms).await
        } else {
            store.replay(&device, after, room, now_ms).await
        };
        StoreDone::Replayed { key, limit: room, result }
    };
    h.run_store(Box::pin(replay));
}

/// Sends what a replay found, after announcing a gap if there is one.
fn on_replayed<H: Host>(h: &mut H, key: ConnKey, now: Now, limit: usize, result: Result<Replay, StoreError>) {
    let r = h.delivery();
    let base_delay_ms = r.settings.policy.base_delay_ms;
    let Some(t) = r.tracked(key) else { return };
    t.refilling = false;
    let replay = match result {
        Ok(replay) => replay,
        Err(err) => {
            // Try again from the timer wheel.
            t.backlog = true;
            r.failed("replay", &err);
            let retry_at = now.mono.add_ms(u64::from(base_delay_ms));
            return h.wake_at(key, retry_at);
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
        r.counters().resyncs.fetch_add(1, Ordering::Relaxed);
        if !h.send(key.index, &frame) {
            return;
        }
    }
    let more = replay.messages.len() >= limit;
    let mut progressed = false;
    for m in replay.messages {
        let Some(t) = h.delivery().tracked(key) else { return };
        if m.seq <= t.last_sent {
            continue;
        }
        let frame = message_frame(m.seq, m.message_id, &m.service_id, &m.payload);
        if !send_new(h, key, (m.seq, m.message_id), frame, now) {
            return;
        }
        progressed = true;
    }
    h.delivery().counters().replays.fetch_add(1, Ordering::Relaxed);
    let Some(t) = h.delivery().tracked(key) else { return };
    let again = std::mem::take(&mut t.refill_again);
    t.backlog = more || again;
    if t.backlog && (progressed || again) {
        refill(h, key, now);
    }
    h.delivery().forget_if_idle(key);
}

/// A session became active: replay what its client has not processed.
pub(crate) fn resume<H: Host>(h: &mut H, key: ConnKey, now: Now, login: &Login) {
    let device = login.device.clone();
    if login.capabilities & proto::Capability::Ack as u32 != 0 {
        if login.last_seq > 0 {
            // The client says it processed everything up to here.
            ack_in_store(h, &device, login.last_seq, now);
        }
        let mut t = Tracked::new(key, login.last_seq);
        t.resume_incarnation = login.store_incarnation;
        t.resuming = true;
        h.delivery().track(t);
        return refill(h, key, now);
    }
    // An old client: whatever waits goes out once, and is acknowledged
    // in the store (it cannot be resent: the client cannot ACK).
    let r = h.delivery();
    let limit = r.settings.unacked_replay_limit;
    let store = r.store.clone();
    let now_ms = unix_ms(now);
    let replay = async move {
        let result = store.replay(&device, 0, limit, now_ms).await;
        StoreDone::ReplayedUnacked { key, result }
    };
    h.run_store(Box::pin(replay));
}

/// The once-only replay of [`resume`] for a client without ACK support.
fn on_replayed_unacked<H: Host>(h: &mut H, key: ConnKey, now: Now, result: Result<Replay, StoreError>) {
    let replay = match result {
        Ok(replay) => replay,
        Err(err) => return h.delivery().failed("replay", &err),
    };
    let Some((device, true, _)) = h.target(key).map(|(d, a, k)| (d.to_owned(), a, k)) else {
        return;
    };
    let mut last = None;
    for m in replay.messages {
        let frame = message_frame(m.seq, m.message_id, &m.service_id, &m.payload);
        if !h.deliver(key.index, &frame) {
            break;
        }
        h.delivery().counters().sent_unacked.fetch_add(1, Ordering::Relaxed);
        last = Some(m.seq);
    }
    if let Some(seq) = last {
        ack_in_store(h, &device, seq, now);
    }
}

// ---- acknowledgements and resends -----------------------------------------

/// The client processed everything up to `seq`.
pub(crate) fn on_ack<H: Host>(h: &mut H, key: ConnKey, now: Now, seq: u64) {
    h.delivery().counters().ack_frames.fetch_add(1, Ordering::Relaxed);
    let Some(device) = h.target(key).map(|(d, _, _)| d.to_owned()) else { return };
    let r = h.delivery();
    let policy = r.settings.policy;
    let window = r.settings.window;
    let counters = r.counters.clone();
    // Nothing in flight: a late duplicate, nothing to do.
    let Some(t) = r.tracked(key) else { return };
    // A client cannot acknowledge what was never sent to it.
    let seq = seq.min(t.last_sent);
    let learned_before = t.window.learned_ms();
    t.window.acked_by(seq).for_each(|m| counters.acked_after_store(m.payload.1, unix_ms(now)));
    let acked = t.window.on_ack(seq, now.mono, &policy);
    if acked.stale {
        return;
    }
    let learned = t.window.learned_ms();
    t.stalled = false;
    // It acknowledges: its replay was not in vain.
    t.replayed = false;
    let refill_now = t.backlog && !t.refilling && t.window.has_room(window);
    r.counters().acked.fetch_add(u64::from(acked.messages), Ordering::Relaxed);
    let store = r.store.clone();
    ack_in_store(h, &device, seq, now);
    if learned != learned_before {
        // Kept with the timeline: the next window or session starts
        // from it (written only when it changes).
        let now_ms = unix_ms(now);
        store_quietly(h, "set_learned", async move { store.set_learned(&device, learned, now_ms).await });
    }
    if refill_now {
        refill(h, key, now);
    }
    h.delivery().forget_if_idle(key);
}

/// Resends what is due for session `key` (from the timer sweep);
/// returns when the window next needs the sweep.
pub(crate) fn retransmit<H: Host>(h: &mut H, key: ConnKey, now: Now) -> Option<Millis> {
    let r = h.delivery();
    let policy = r.settings.policy;
    let window = r.settings.window;
    let counters = r.counters.clone();
    let t = r.tracked(key)?;
    let due = t.window.due(now.mono, &policy);
    // A replayed backlog went unacknowledged past a resend: the client
    // had it and the time to acknowledge it.
    let unacked_replay = (!due.resend.is_empty() && std::mem::take(&mut t.replayed)).then_some(t.last_sent);
    let frames: Vec<Bytes> =
        due.resend.iter().filter_map(|&seq| t.window.payload(seq)).map(|(f, _)| as_retransmission(f)).collect();
    if !due.given_up.is_empty() {
        counters.given_up.fetch_add(due.given_up.len() as u64, Ordering::Relaxed);
        t.stalled = true;
        t.backlog = true;
    }
    let refill_now = t.backlog && !t.refilling && !t.stalled && t.window.has_room(window);
    for frame in &frames {
        if h.send(key.index, frame) {
            counters.retries.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(through) = unacked_replay
        && let Some((device, _, _)) = h.target(key)
    {
        let device = device.to_owned();
        let store = h.delivery().store.clone();
        store_quietly(h, "count_replay", async move { store.count_replay(&device, through).await });
    }
    if refill_now {
        // A replay that failed earlier.
        refill(h, key, now);
    }
    let r = h.delivery();
    r.forget_if_idle(key);
    r.tracked.get(&key.index).filter(|t| t.key == key).and_then(|t| t.window.next_deadline())
}

// ---- status -------------------------------------------------------------

/// Looks message ids up in this shard's store and answers the origin.
pub(crate) fn status_part<H: Host>(h: &mut H, origin: Origin, ids: Arc<Vec<u64>>) {
    let store = h.delivery().store.clone();
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
        StoreDone::Status { origin, found, failures }
    };
    h.run_store(Box::pin(lookups));
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
