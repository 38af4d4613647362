//! Per-device timelines: where at-least-once messages wait until the
//! device acknowledges them.
//!
//! One trait, two implementations: [`MemoryStore`] (embedded default, one
//! per shard, holding the timelines of the devices the shard owns; lost on
//! restart) and the Redis store (cluster mode, in `store_redis`). Calls are
//! asynchronous so a shard never blocks on a store.
//!
//! Sequences are per device, start above every sequence an earlier run of
//! the same store could have issued, and are never reused. A client that
//! resumes from a sequence the store can no longer replay (retention, or a
//! memory store that restarted) gets the missing range instead of silence.
//!
//! Per device the store also keeps the learned recovery time of the
//! retransmission schedule ([`TimelineStore::set_learned`], with a TTL), so
//! a device starts from it when its window empties or it reconnects, and
//! counts the sessions that replayed its backlog and kept it
//! unacknowledged past a resend ([`TimelineStore::count_replay`]): after
//! `Retention::max_unacked_replays` of them the replayed messages expire
//! ([`TimelineStore::resume`]).
//!
//! Each store has an incarnation ([`TimelineStore::incarnation`]) that
//! changes when its contents were lost: a memory store's is random per
//! start, Redis keeps one in a key (a Redis that lost its data makes a new
//! one). Clients are told it in AuthOk and send back the one they saw; a
//! client that resumes across a change is told the whole range it may have
//! missed, even from sequence 0 ([`Replay::base`]).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

// Hook: images of the memory store for the in-place upgrade.
mod handover;
pub use handover::{StoreImage, TimelineImage};

/// A message to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewMessage {
    pub message_id: u64,
    pub service_id: String,
    pub payload: Bytes,
    /// Unix ms; the message is not replayed after this (0 = retention only).
    pub expires_at_ms: u64,
}

/// A message in a timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub seq: u64,
    pub message_id: u64,
    pub service_id: String,
    pub payload: Bytes,
    pub stored_at_ms: u64,
    pub expires_at_ms: u64,
}

/// What an append did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The new message's sequence.
    pub seq: u64,
    /// The oldest sequence still in the device's timeline after the append
    /// (`== seq` when nothing older waits: the message may be sent at once
    /// to a device with nothing in flight).
    pub oldest: u64,
    /// The device's learned recovery time, if one is kept.
    pub learned_ms: Option<u32>,
}

/// What a resume finds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Replay {
    /// Messages after the requested sequence, in order (at most `limit`).
    pub messages: Vec<Stored>,
    /// Set when messages after the requested sequence are gone: the first
    /// and last missing sequence (inclusive).
    pub missing: Option<(u64, u64)>,
    /// The store's incarnation as of this read (0: unknown).
    pub incarnation: u64,
    /// The device's learned recovery time, if one is kept.
    pub learned_ms: Option<u32>,
    /// Every sequence this incarnation issued for the device is above this:
    /// a client resuming from an earlier incarnation may have missed
    /// everything after its sequence up to here (0: unknown).
    pub base: u64,
}

/// Where a message is in its life, for the delivery status query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Stored {
        device: String,
        seq: u64,
        stored_at_ms: u64,
    },
    Sent {
        device: String,
        seq: u64,
        stored_at_ms: u64,
        sent_at_ms: u64,
    },
    Acked {
        device: String,
        seq: u64,
        stored_at_ms: u64,
        sent_at_ms: u64,
        acked_at_ms: u64,
    },
    /// Dropped before it was acknowledged.
    Expired {
        device: String,
        seq: u64,
        by: ExpiredBy,
    },
}

/// Why a message left its timeline unacknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiredBy {
    /// More messages waited for the device than retention keeps.
    Retention,
    /// Older than the retention age.
    Age,
    /// Its push's `ttl_ms` passed.
    Ttl,
    /// Replayed to this many sessions of the device, none acknowledging.
    Unacknowledged { replays: u32 },
}

impl std::fmt::Display for ExpiredBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpiredBy::Retention => write!(f, "dropped by retention: too many messages waiting for the device"),
            ExpiredBy::Age => write!(f, "dropped by retention: older than the retention age"),
            ExpiredBy::Ttl => write!(f, "its ttl passed"),
            ExpiredBy::Unacknowledged { replays } => {
                write!(f, "not acknowledged after {replays} replays to the device")
            }
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store overloaded: request shed")]
    Overloaded,
    #[error("store protocol error: {0}")]
    Protocol(String),
    /// The store holds as much as it may; appends wait for clients to
    /// acknowledge (or retention to drop) what it holds.
    #[error("timeline store full: {0}")]
    Full(String),
}

impl StoreError {
    /// Whether the same call may succeed later (the store was unreachable,
    /// shed the call or was full); a malformed answer will not fix itself.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Overloaded | StoreError::Full(_))
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + 'a>>;

/// A timeline store. Implementations never block the calling shard.
pub trait TimelineStore {
    /// Appends to the device's timeline; returns the new sequence. The
    /// message is durable (as far as the store is) when this resolves.
    fn append<'a>(&'a self, device: &'a str, msg: NewMessage, now_ms: u64) -> StoreFuture<'a, Appended>;
    /// Messages after `after_seq`, oldest first, at most `limit`.
    fn replay<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay>;
    /// A session of the device starts: [`TimelineStore::replay`]; but once
    /// `Retention::max_unacked_replays` sessions replayed messages without
    /// an ACK ([`TimelineStore::count_replay`]), those expire (reported
    /// missing, status EXPIRED) instead of going out again.
    fn resume<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay>;
    /// A session replayed the device's messages up to `through_seq` and
    /// one of them went unacknowledged past its resend (the client had it
    /// and the time to acknowledge it): one more replay without an ACK.
    /// An ACK starts the count over. A session cut before a resend does
    /// not count, so a device on a flapping network keeps its backlog.
    fn count_replay<'a>(&'a self, device: &'a str, through_seq: u64) -> StoreFuture<'a, ()>;
    /// Keeps the device's learned recovery time (`None`: forget it) for
    /// `Retention::learned_ttl_ms`.
    fn set_learned<'a>(&'a self, device: &'a str, learned_ms: Option<u32>, now_ms: u64) -> StoreFuture<'a, ()>;
    /// The device processed everything up to `seq`: drop it from the timeline.
    fn ack<'a>(&'a self, device: &'a str, seq: u64, now_ms: u64) -> StoreFuture<'a, ()>;
    /// Records the first send of message `seq` (id `message_id`) for the
    /// status query.
    fn mark_sent<'a>(&'a self, device: &'a str, seq: u64, message_id: u64, now_ms: u64) -> StoreFuture<'a, ()>;
    /// Where message `message_id` is, if the store still knows it.
    fn status(&self, message_id: u64) -> StoreFuture<'_, Option<Status>>;
    /// Identifies the store's contents; changes when they were lost. 0:
    /// not known yet (a Redis store before it first reached Redis).
    fn incarnation(&self) -> u64;
}

/// Retention limits of a timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept per device; older ones are dropped (and reported as
    /// missing on resume).
    pub max_messages: usize,
    /// Age after which a message is dropped, in ms.
    pub max_age_ms: u64,
    /// Status records kept (acknowledged and expired messages), per store.
    pub max_status_records: usize,
    /// Sessions that may replay messages the device does not acknowledge;
    /// then they expire. 0: no limit.
    pub max_unacked_replays: u32,
    /// How long a device's learned recovery time is kept, in ms.
    pub learned_ttl_ms: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_messages: 1_000,
            max_age_ms: 7 * 24 * 3600 * 1000,
            max_status_records: 100_000,
            max_unacked_replays: 3,
            learned_ttl_ms: 24 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Default)]
struct Timeline {
    /// Sequences below this are gone (acknowledged or dropped).
    floor: u64,
    /// The last sequence handed out.
    last: u64,
    /// Highest sequence the device acknowledged.
    acked: u64,
    messages: VecDeque<(Stored, Option<u64>)>,
    /// Sessions that replayed messages up to `replayed_through` since the
    /// last ACK.
    replays: u32,
    replayed_through: u64,
    /// Learned recovery time and until when it is kept (unix ms).
    learned: Option<(u32, u64)>,
}

impl Timeline {
    fn learned_ms(&self, now_ms: u64) -> Option<u32> {
        self.learned.filter(|&(_, until)| now_ms < until).map(|(ms, _)| ms)
    }

    /// Drops the oldest message; its status says why.
    fn drop_front(&mut self, store: &MemoryStore, device: &str, by: ExpiredBy) {
        if let Some((m, _)) = self.messages.pop_front() {
            self.floor = m.seq + 1;
            store.sub_bytes(message_cost(&m));
            store.finish(m.message_id, Status::Expired { device: device.to_owned(), seq: m.seq, by });
        }
    }
}

/// The embedded store: timelines in this shard's memory, bounded by
/// [`Retention`] per device and by a byte cap as a whole, lost on restart
/// (the next run's sequences start higher, so resuming clients are told
/// about the gap).
#[derive(Debug)]
pub struct MemoryStore {
    /// Every sequence this run issues is above this.
    base_seq: u64,
    /// Random per run (never 0).
    incarnation: u64,
    /// Timelines start above this too: the highest sequence of any
    /// timeline dropped once everything in it was acknowledged, so a
    /// device's sequences never repeat.
    reuse_floor: Cell<u64>,
    retention: Retention,
    /// Appends are refused once `bytes` reaches this.
    max_bytes: usize,
    /// Memory held by the timelines, the messages and their index, as
    /// [`MemoryStore`]'s cost functions count it (status records are
    /// bounded separately, by `Retention::max_status_records`).
    bytes: Cell<usize>,
    timelines: RefCell<HashMap<String, Timeline>>,
    /// Status of messages that left their timeline, oldest first.
    finished: RefCell<(HashMap<u64, Status>, VecDeque<u64>)>,
    /// message id -> (device, seq) while the message is in a timeline.
    live: RefCell<HashMap<u64, (String, u64)>>,
}

impl MemoryStore {
    /// `boot_unix_ms`: the start time of this run; sequences start at
    /// `boot_unix_ms * 1000`, above anything an earlier run issued (it
    /// would take 1,000 messages per ms per device to catch up).
    pub fn new(retention: Retention, boot_unix_ms: u64) -> MemoryStore {
        let mut seed = [0u8; 8];
        // Without randomness, the start time still tells runs apart.
        let random = getrandom::fill(&mut seed).map_or(boot_unix_ms, |()| u64::from_le_bytes(seed));
        MemoryStore {
            base_seq: boot_unix_ms.saturating_mul(1000),
            incarnation: random.max(1),
            reuse_floor: Cell::new(0),
            retention,
            max_bytes: usize::MAX,
            bytes: Cell::new(0),
            timelines: RefCell::default(),
            finished: RefCell::default(),
            live: RefCell::default(),
        }
    }

    /// Caps the memory the store holds at about `max_bytes`: appends past it
    /// fail with [`StoreError::Full`].
    pub fn with_max_bytes(mut self, max_bytes: usize) -> MemoryStore {
        self.max_bytes = max_bytes;
        self
    }

    pub fn base_seq(&self) -> u64 {
        self.base_seq
    }

    /// Bytes held, as counted against the cap (for tests and metrics).
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    fn add_bytes(&self, n: usize) {
        self.bytes.set(self.bytes.get() + n);
    }

    fn sub_bytes(&self, n: usize) {
        self.bytes.set(self.bytes.get().saturating_sub(n));
    }

    /// Runs `f` on a timeline and counts the growth or shrinking of its
    /// message buffer (it grows by doubling: a device's first message takes
    /// room for four).
    fn resized<T>(&self, tl: &mut Timeline, f: impl FnOnce(&mut Timeline) -> T) -> T {
        let before = tl.messages.capacity();
        let out = f(tl);
        let after = tl.messages.capacity();
        let slot = std::mem::size_of::<(Stored, Option<u64>)>();
        if after > before {
            self.add_bytes((after - before) * slot);
        } else {
            self.sub_bytes((before - after) * slot);
        }
        out
    }

    /// Devices with a timeline (for leak checks and metrics).
    pub fn timelines(&self) -> usize {
        self.timelines.borrow().len()
    }

    fn finish(&self, message_id: u64, status: Status) {
        if let Some((device, _)) = self.live.borrow_mut().remove(&message_id) {
            self.sub_bytes(live_cost(&device));
        }
        let (map, order) = &mut *self.finished.borrow_mut();
        map.insert(message_id, status);
        order.push_back(message_id);
        while order.len() > self.retention.max_status_records {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    /// Drops messages beyond the count or age limit.
    fn trim(&self, device: &str, tl: &mut Timeline, now_ms: u64) {
        while let Some((m, _)) = tl.messages.front() {
            let too_many = tl.messages.len() > self.retention.max_messages;
            let too_old = now_ms.saturating_sub(m.stored_at_ms) > self.retention.max_age_ms;
            let expired = m.expires_at_ms != 0 && now_ms >= m.expires_at_ms;
            let by = if expired {
                ExpiredBy::Ttl
            } else if too_old {
                ExpiredBy::Age
            } else if too_many {
                ExpiredBy::Retention
            } else {
                break;
            };
            tl.drop_front(self, device, by);
        }
    }

    fn append_now(&self, device: &str, msg: NewMessage, now_ms: u64) -> Result<Appended, StoreError> {
        let mut timelines = self.timelines.borrow_mut();
        let held = self.bytes.get();
        let needs = msg.payload.len() + msg.service_id.len() + MESSAGE_COST + live_cost(device);
        if held.saturating_add(needs) > self.max_bytes {
            return Err(StoreError::Full(format!(
                "{held} of {} bytes in use on this shard (delivery.memory_store_bytes, shared by the shards); \
                 it frees up as clients acknowledge",
                self.max_bytes
            )));
        }
        let tl = timelines.entry(device.to_owned()).or_insert_with(|| self.new_timeline(device));
        tl.last += 1;
        let seq = tl.last;
        self.live.borrow_mut().insert(msg.message_id, (device.to_owned(), seq));
        self.add_bytes(live_cost(device));
        let stored = Stored {
            seq,
            message_id: msg.message_id,
            service_id: msg.service_id,
            payload: msg.payload,
            stored_at_ms: now_ms,
            expires_at_ms: msg.expires_at_ms,
        };
        self.add_bytes(message_cost(&stored));
        self.resized(tl, |tl| tl.messages.push_back((stored, None)));
        self.trim(device, tl, now_ms);
        let oldest = tl.messages.front().map_or(seq, |(m, _)| m.seq);
        Ok(Appended { seq, oldest, learned_ms: tl.learned_ms(now_ms) })
    }

    fn resume_now(&self, device: &str, after_seq: u64, limit: usize, now_ms: u64) -> Replay {
        let max = self.retention.max_unacked_replays;
        if max > 0
            && let Some(tl) = self.timelines.borrow_mut().get_mut(device)
            && tl.replays >= max
            && tl.replayed_through > after_seq
        {
            // Replayed `max` times, never acknowledged: they go, and the
            // resume reports them missing.
            let through = tl.replayed_through;
            while tl.messages.front().is_some_and(|(m, _)| m.seq <= through) {
                tl.drop_front(self, device, ExpiredBy::Unacknowledged { replays: max });
            }
            tl.floor = tl.floor.max(through + 1);
            (tl.replays, tl.replayed_through) = (0, 0);
        }
        self.replay_now(device, after_seq, limit, now_ms)
    }

    fn count_replay_now(&self, device: &str, through_seq: u64) {
        if let Some(tl) = self.timelines.borrow_mut().get_mut(device) {
            tl.replays = tl.replays.saturating_add(1);
            tl.replayed_through = tl.replayed_through.max(through_seq);
        }
    }

    fn set_learned_now(&self, device: &str, learned_ms: Option<u32>, now_ms: u64) {
        let mut timelines = self.timelines.borrow_mut();
        let learned = learned_ms.map(|ms| (ms, now_ms.saturating_add(self.retention.learned_ttl_ms)));
        match timelines.get_mut(device) {
            Some(tl) => tl.learned = learned,
            // Its messages were all acknowledged (the timeline went): a
            // timeline comes back to keep what was learned.
            None if learned.is_some() => {
                let mut tl = self.new_timeline(device);
                tl.learned = learned;
                timelines.insert(device.to_owned(), tl);
            }
            None => {}
        }
    }

    /// A new, empty timeline; its sequences start above any this run issued
    /// for a dropped timeline. Counted against the cap.
    fn new_timeline(&self, device: &str) -> Timeline {
        self.add_bytes(timeline_cost(device));
        let start = self.base_seq.max(self.reuse_floor.get());
        Timeline { floor: start + 1, last: start, acked: start, ..Default::default() }
    }

    fn replay_now(&self, device: &str, after_seq: u64, limit: usize, now_ms: u64) -> Replay {
        let mut timelines = self.timelines.borrow_mut();
        let Some(tl) = timelines.get_mut(device) else {
            // Nothing stored for this device in this run. A client that
            // processed a sequence from an earlier run may have missed
            // messages that died with it.
            let missing = (after_seq > 0 && after_seq < self.base_seq).then_some((after_seq + 1, self.base_seq));
            let base = self.base_seq;
            return Replay { messages: Vec::new(), missing, incarnation: self.incarnation, base, learned_ms: None };
        };
        self.trim(device, tl, now_ms);
        // Everything below the floor is gone; the client missed what lies
        // between its sequence and the floor unless it acknowledged it. A
        // sequence of an earlier run (below this run's base) was never
        // acknowledged here: all of the gap up to the floor is unknown.
        let gone_up_to = tl.floor - 1;
        let known = if after_seq > 0 && after_seq < self.base_seq { after_seq } else { after_seq.max(tl.acked) };
        let missing = (known < gone_up_to).then(|| (known + 1, gone_up_to));
        let live = |m: &Stored| m.seq > after_seq && (m.expires_at_ms == 0 || now_ms < m.expires_at_ms);
        let messages = tl.messages.iter().filter(|(m, _)| live(m)).take(limit).map(|(m, _)| m.clone()).collect();
        let learned_ms = tl.learned_ms(now_ms);
        Replay { messages, missing, incarnation: self.incarnation, base: self.base_seq, learned_ms }
    }

    fn ack_now(&self, device: &str, seq: u64, now_ms: u64) {
        let mut timelines = self.timelines.borrow_mut();
        let Some(tl) = timelines.get_mut(device) else { return };
        if seq.min(tl.last) > tl.acked {
            // The device acknowledges again: replays count from zero.
            (tl.replays, tl.replayed_through) = (0, 0);
        }
        tl.acked = tl.acked.max(seq.min(tl.last));
        while tl.messages.front().is_some_and(|(m, _)| m.seq <= seq) {
            if let Some((m, sent)) = tl.messages.pop_front() {
                tl.floor = m.seq + 1;
                self.sub_bytes(message_cost(&m));
                let sent_at_ms = sent.unwrap_or(now_ms);
                let status = Status::Acked {
                    device: device.to_owned(),
                    seq: m.seq,
                    stored_at_ms: m.stored_at_ms,
                    sent_at_ms,
                    acked_at_ms: now_ms,
                };
                self.finish(m.message_id, status);
            }
        }
        if tl.messages.is_empty() {
            self.resized(tl, |tl| tl.messages = VecDeque::new());
            if tl.acked >= tl.last && tl.learned_ms(now_ms).is_none() {
                // Everything handed out was acknowledged: no gap to report,
                // so the timeline can go (unless it keeps a learned recovery
                // time). Sequences are never reused: new timelines start
                // above its last one.
                self.reuse_floor.set(self.reuse_floor.get().max(tl.last));
                timelines.remove(device);
                self.sub_bytes(timeline_cost(device));
            }
        }
    }

    fn mark_sent_now(&self, device: &str, seq: u64, now_ms: u64) {
        if let Some(tl) = self.timelines.borrow_mut().get_mut(device)
            && let Some((_, sent)) = tl.messages.iter_mut().find(|(m, _)| m.seq == seq)
        {
            sent.get_or_insert(now_ms);
        }
    }

    fn status_now(&self, message_id: u64) -> Option<Status> {
        if let Some(s) = self.finished.borrow().0.get(&message_id) {
            return Some(s.clone());
        }
        let (device, seq) = self.live.borrow().get(&message_id).cloned()?;
        let timelines = self.timelines.borrow();
        let (m, sent) = timelines.get(&device)?.messages.iter().find(|(m, _)| m.seq == seq)?;
        Some(match sent {
            Some(sent_at_ms) => Status::Sent { device, seq, stored_at_ms: m.stored_at_ms, sent_at_ms: *sent_at_ms },
            None => Status::Stored { device, seq, stored_at_ms: m.stored_at_ms },
        })
    }
}

/// What a message costs beyond its slot in the timeline's buffer: its
/// service id and payload (counted per copy, though copies of one push
/// share the payload).
fn message_cost(m: &Stored) -> usize {
    m.service_id.len() + m.payload.len()
}

/// The fixed part of a message: its slot (a buffer grows by doubling, so
/// counted at the append as a bound) and its entry in the id index.
const MESSAGE_COST: usize = 2 * std::mem::size_of::<(Stored, Option<u64>)>();

/// A message's entry in the id index (`live`): key, device copy, sequence,
/// and the map's own overhead.
fn live_cost(device: &str) -> usize {
    device.len() + std::mem::size_of::<(u64, (String, u64))>() + 16
}

/// A device's timeline entry: key, counters, the map's own overhead.
fn timeline_cost(device: &str) -> usize {
    device.len() + std::mem::size_of::<(String, Timeline)>() + 16
}

fn ready<'a, T: 'a>(value: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl TimelineStore for MemoryStore {
    fn append<'a>(&'a self, device: &'a str, msg: NewMessage, now_ms: u64) -> StoreFuture<'a, Appended> {
        Box::pin(std::future::ready(self.append_now(device, msg, now_ms)))
    }

    fn replay<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay> {
        ready(self.replay_now(device, after_seq, limit, now_ms))
    }

    fn resume<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay> {
        ready(self.resume_now(device, after_seq, limit, now_ms))
    }

    fn count_replay<'a>(&'a self, device: &'a str, through_seq: u64) -> StoreFuture<'a, ()> {
        self.count_replay_now(device, through_seq);
        ready(())
    }

    fn set_learned<'a>(&'a self, device: &'a str, learned_ms: Option<u32>, now_ms: u64) -> StoreFuture<'a, ()> {
        self.set_learned_now(device, learned_ms, now_ms);
        ready(())
    }

    fn ack<'a>(&'a self, device: &'a str, seq: u64, now_ms: u64) -> StoreFuture<'a, ()> {
        self.ack_now(device, seq, now_ms);
        ready(())
    }

    fn mark_sent<'a>(&'a self, device: &'a str, seq: u64, _message_id: u64, now_ms: u64) -> StoreFuture<'a, ()> {
        self.mark_sent_now(device, seq, now_ms);
        ready(())
    }

    fn status(&self, message_id: u64) -> StoreFuture<'_, Option<Status>> {
        ready(self.status_now(message_id))
    }

    fn incarnation(&self) -> u64 {
        self.incarnation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: u64 = 1_800_000_000_000;

    fn msg(id: u64) -> NewMessage {
        NewMessage {
            message_id: id,
            service_id: "chat".into(),
            payload: Bytes::from(format!("m{id}")),
            expires_at_ms: 0,
        }
    }

    fn block<T>(f: StoreFuture<'_, T>) -> T {
        block_result(f).expect("memory store without a cap never fails")
    }

    fn block_result<T>(f: StoreFuture<'_, T>) -> Result<T, StoreError> {
        futures_lite::future::block_on(f)
    }

    #[test]
    fn sequences_start_above_earlier_runs_and_increase() {
        let s = MemoryStore::new(Retention::default(), BOOT);
        let a = block(s.append("d", msg(1), BOOT));
        let b = block(s.append("d", msg(2), BOOT));
        assert_eq!((a.seq, b.seq), (BOOT * 1000 + 1, BOOT * 1000 + 2));
        assert_eq!((a.oldest, b.oldest), (a.seq, a.seq), "the first is still pending");
        block(s.ack("d", b.seq, BOOT));
        let c = block(s.append("d", msg(4), BOOT));
        assert_eq!(c.oldest, c.seq, "nothing older waits");
        let later = MemoryStore::new(Retention::default(), BOOT + 1);
        assert!(block(later.append("d", msg(3), BOOT + 1)).seq > b.seq);
    }

    #[test]
    fn replay_after_a_sequence_and_ack_trims() {
        let s = MemoryStore::new(Retention::default(), BOOT);
        let seqs: Vec<u64> = (1..=5).map(|i| block(s.append("d", msg(i), BOOT)).seq).collect();
        let r = block(s.replay("d", seqs[1], 10, BOOT));
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), &seqs[2..]);
        assert_eq!(r.missing, None);
        block(s.ack("d", seqs[3], BOOT + 5));
        let r = block(s.replay("d", seqs[3], 10, BOOT));
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.missing, None, "acknowledged messages are not missing");
        assert!(matches!(block(s.status(2)), Some(Status::Acked { acked_at_ms, .. }) if acked_at_ms == BOOT + 5));
    }

    #[test]
    fn retention_overflow_reports_the_missing_range() {
        let retention = Retention { max_messages: 3, ..Default::default() };
        let s = MemoryStore::new(retention, BOOT);
        let seqs: Vec<u64> = (1..=6).map(|i| block(s.append("d", msg(i), BOOT)).seq).collect();
        // The client processed up to seqs[0]; seqs[1..3] were dropped.
        let r = block(s.replay("d", seqs[0], 10, BOOT));
        assert_eq!(r.missing, Some((seqs[1], seqs[2])));
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), &seqs[3..]);
        assert!(matches!(block(s.status(2)), Some(Status::Expired { .. })));
    }

    #[test]
    fn a_store_that_restarted_reports_the_unknown_gap() {
        let s = MemoryStore::new(Retention::default(), BOOT);
        // The client processed sequence 42 of an earlier run.
        let r = block(s.replay("d", 42, 10, BOOT));
        assert_eq!(r.missing, Some((43, BOOT * 1000)));
        // A fresh client (sequence 0) has nothing to miss.
        assert_eq!(block(s.replay("d", 0, 10, BOOT)).missing, None);
        // Also when this run stored messages for the device since: what lay
        // between 42 and this run's first sequence is unknown.
        let first = block(s.append("d", msg(1), BOOT)).seq;
        let r = block(s.replay("d", 42, 10, BOOT));
        assert_eq!((r.missing, r.messages.len()), (Some((43, BOOT * 1000)), 1));
        assert_eq!((r.base, r.incarnation), (first - 1, s.incarnation()));
        assert_ne!(MemoryStore::new(Retention::default(), BOOT).incarnation(), s.incarnation(), "a new run, a new one");
    }

    #[test]
    fn ttl_and_age_expire_messages() {
        let retention = Retention { max_age_ms: 1_000, ..Default::default() };
        let s = MemoryStore::new(retention, BOOT);
        let mut m = msg(1);
        m.expires_at_ms = BOOT + 100;
        let first = block(s.append("d", m, BOOT)).seq;
        block(s.append("d", msg(2), BOOT));
        let r = block(s.replay("d", 0, 10, BOOT + 200));
        assert_eq!(r.messages.len(), 1);
        assert_eq!(r.missing, Some((first, first)));
        let r = block(s.replay("d", 0, 10, BOOT + 5_000));
        assert!(r.messages.is_empty());
    }

    #[test]
    fn status_follows_the_message() {
        let s = MemoryStore::new(Retention::default(), BOOT);
        let seq = block(s.append("d", msg(7), BOOT)).seq;
        assert_eq!(block(s.status(7)), Some(Status::Stored { device: "d".into(), seq, stored_at_ms: BOOT }));
        block(s.mark_sent("d", seq, 7, BOOT + 1));
        assert!(matches!(block(s.status(7)), Some(Status::Sent { sent_at_ms, .. }) if sent_at_ms == BOOT + 1));
        assert_eq!(block(s.status(8)), None);
    }

    #[test]
    fn a_full_store_refuses_appends_until_clients_acknowledge() {
        let s = MemoryStore::new(Retention::default(), BOOT).with_max_bytes(64 * 1024);
        let mut stored = Vec::new();
        let err = loop {
            let device = format!("made-up-{}", stored.len());
            match block_result(s.append(&device, msg(stored.len() as u64), BOOT)) {
                Ok(a) => stored.push((device, a.seq)),
                Err(e) => break e,
            }
            assert!(stored.len() < 10_000, "never full");
        };
        assert!(matches!(&err, StoreError::Full(why) if why.contains("delivery.memory_store_bytes")), "{err}");
        assert!(s.bytes() <= 64 * 1024 && stored.len() > 20, "{} bytes, {} messages", s.bytes(), stored.len());
        // Acknowledged messages leave, and so do timelines with nothing
        // left to report: the room comes back.
        for (device, seq) in &stored {
            block(s.ack(device, *seq, BOOT));
        }
        assert_eq!((s.bytes(), s.timelines()), (0, 0));
        assert!(block_result(s.append("made-up-0", msg(99_999), BOOT)).is_ok());
    }

    #[test]
    fn a_timeline_dropped_once_acknowledged_never_repeats_a_sequence() {
        let s = MemoryStore::new(Retention::default(), BOOT);
        let first = block(s.append("d", msg(1), BOOT)).seq;
        block(s.append("other", msg(2), BOOT));
        let other = block(s.append("other", msg(3), BOOT)).seq;
        block(s.ack("d", first, BOOT));
        block(s.ack("other", other, BOOT));
        assert_eq!(s.timelines(), 0);
        let again = block(s.append("d", msg(4), BOOT));
        assert!(again.seq > other && again.oldest == again.seq, "{again:?} after {other}");
        // The client resumes from what it acknowledged: nothing missing.
        let r = block(s.replay("d", first, 10, BOOT));
        assert_eq!((r.missing, r.messages.len()), (None, 1));
        // A timeline with an unacknowledged gap stays, to report it.
        let s = MemoryStore::new(Retention::default(), BOOT);
        let expiring = |id| NewMessage { expires_at_ms: BOOT + 10, ..msg(id) };
        let acked = block(s.append("d", expiring(1), BOOT)).seq;
        let lost = block(s.append("d", expiring(2), BOOT)).seq;
        assert!(block(s.replay("d", 0, 10, BOOT + 20)).messages.is_empty(), "both expired");
        block(s.ack("d", acked, BOOT + 20));
        assert_eq!(s.timelines(), 1);
        assert_eq!(block(s.replay("d", acked, 10, BOOT + 20)).missing, Some((lost, lost)));
    }

    #[test]
    fn status_records_are_bounded() {
        let retention = Retention { max_status_records: 2, ..Default::default() };
        let s = MemoryStore::new(retention, BOOT);
        for i in 1..=5 {
            let seq = block(s.append("d", msg(i), BOOT)).seq;
            block(s.ack("d", seq, BOOT));
        }
        assert_eq!(block(s.status(1)), None);
        assert!(block(s.status(5)).is_some());
    }
}
