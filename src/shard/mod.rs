//! One shard: everything a single glommio executor (one core) owns.
//!
//! A shard accepts on its own SO_REUSEPORT listeners (client and push
//! ports), keeps its sessions in a slab, indexes them by device and by user,
//! holds their group memberships, and drives every deadline from one timer
//! wheel. Nothing here is shared with other threads except counters; other
//! shards reach it only through the mesh ([`crate::mesh`]).
//!
//! Each connection is one task that waits in [`Shard::poll_conn`]. It reads
//! into the shard's scratch buffer, so an idle connection holds no read
//! buffer: only an incomplete frame is copied out and kept. Outbound frames
//! wait in a per-connection queue bounded in bytes, allocated only while
//! something is queued; when nothing is queued a push is sent at once.
//!
//! Owner shard: a device lives on `owner_shard(device)`. A connection that
//! authenticates on another shard is handed over (fd, session, login and any
//! bytes already read) through the mesh, and the owner sends `AuthOk`.
//! Users: the shard `home_shard(user)` keeps a directory of which shards
//! hold sessions of the user, so a push to a user visits only those.
//!
//! Here: the shard's state (the session slab, `Conn`, the indexes) and
//! its construction. The rest of the shard's own work is in
//! - `task`: accepting, the connection task, hand-off and adoption;
//! - `index`: registering authenticated sessions (device, user, directory);
//! - `inbox`: messages from other shards;
//! - `fanout`: broadcast pacing;
//! - `timers`: the timer loop and shutdown.

mod drain;
pub use drain::DrainPacer;
pub(crate) use drain::ShardDrain;
mod fanout;
mod hosts;
mod inbox;
mod index;
mod links;
mod output;
mod task;
mod timers;
mod upgrade;
pub(crate) use upgrade::ShardUpgrade;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use hashbrown::HashTable;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::conn::OutQueue;
use crate::conn::fd::{self, SlotFd, Socket};
use crate::conn::transport::{Link, MAX_TLS_HANDSHAKE_TAIL, TlsLink, Wrapper, WsState};
use crate::conn::ws;
use crate::delivery::MessageIds;
use crate::delivery::reliable::{self, DeliverySettings, Reliable, ReliableCounters};
use crate::delivery::store::TimelineStore;
use crate::groups::Groups;
use crate::mesh::{Adoption, Origin, Outbox, Part, PresencePart, PresenceQuery, ShardMsg, UserAction};
use crate::protocol::codec::{self, Frame, Peer};
use crate::protocol::codes;
use crate::protocol::ids::{ConnId, ConnKey, ShardId, home_shard, owner_shard, stable_hash};
use crate::protocol::proto::{self, ConnectionEventKind, ErrorCode, FrameKind};
use crate::protocol::time::{Millis, Now};
use crate::push::{Backend, Deadlines, Pending};
use crate::rate::TokenBucket;
use crate::session::{Action, Login, Phase, Session};
use crate::upstream::{Upstream, UpstreamCounters, UpstreamSettings};
use crate::wheel::Wheel;

/// Reads handled in one poll of a connection before yielding to others.
const READS_PER_POLL: usize = 8;
/// Sessions handled by the timer sweep before it yields.
const SWEEP_BATCH: usize = 1024;
/// Buckets in the timer wheel (span = slots x tick).
const WHEEL_SLOTS: usize = 4096;
/// Sentinel for "no next session of the same user".
const NO_CONN: u32 = u32::MAX;
/// How often the broadcast pacer runs while broadcasts are queued.
const PACER_TICK: Duration = Duration::from_millis(10);
/// Sessions the flusher writes before letting the executor poll again.
const FLUSH_CHUNK: usize = 256;
/// Group members on a shard up to which a fan-out is written at once.
const INLINE_FANOUT: usize = 64;

/// Counters readable from other threads (tests, stats logs, metrics).
#[derive(Debug, Default)]
pub struct ShardCounters {
    pub accepted: AtomicU64,
    pub authenticated: AtomicU64,
    pub handed_off: AtomicU64,
    pub adopted: AtomicU64,
    pub replaced: AtomicU64,
    pub closed: AtomicU64,
    /// Sessions registered (authenticated, indexed) right now.
    pub active: AtomicU64,
    /// Sessions closed as SLOW (queue full or write deadline passed).
    pub slow_closed: AtomicU64,
    /// Frames dropped from the queues of sessions closed as SLOW.
    pub slow_dropped_frames: AtomicU64,
    /// Messages queued or written to a session.
    pub delivered: AtomicU64,
    /// Session queues written by the fan-out flusher (each one `writev` of
    /// every frame queued for it): deliveries per write show the batching.
    pub fanout_writes: AtomicU64,
    /// Client frames and bytes read, and frames and bytes sent to clients
    /// (written or queued).
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Broadcast deliveries dropped because their TTL passed while paced.
    pub broadcast_expired: AtomicU64,
    /// Bytes of broadcasts queued on this shard or on their way to it
    /// (reserved by the shard that took the request, released by the pacer).
    pub broadcast_queued_bytes: AtomicU64,
    /// Broadcasts this shard refused because a shard's queue was full.
    pub broadcast_rejected: AtomicU64,
    /// Client connections closed at accept by the per-source limits, by
    /// [`crate::admission::Refusal`].
    pub admission_refused: [AtomicU64; 4],
    /// Push-port requests received.
    pub push_requests: AtomicU64,
    /// Push-port and node-listener connections refused before or at
    /// authentication (bad or missing credential, too many authenticating).
    pub push_refused: AtomicU64,
    /// Requests refused because the key lacks the right (PERMISSION_DENIED).
    pub push_denied: AtomicU64,
    /// Push-port and node-listener connections closed silent before their
    /// auth deadline (AUTH_TIMEOUT).
    pub push_auth_timeouts: AtomicU64,
    /// Push-port requests answered at `push.reply_timeout_ms` with answers
    /// missing, and answers that came after that (dropped).
    pub push_timeouts: AtomicU64,
    pub push_late_answers: AtomicU64,
    /// Times a push-port connection stopped reading because the mesh
    /// toward other shards was backed up ([`crate::mesh::Outbox::congested`]).
    pub mesh_backpressure: AtomicU64,
    /// Groups with members on this shard, and sessions in any group.
    pub groups: AtomicU64,
    pub group_sessions: AtomicU64,
    /// Requests to service backends, events, dedup, rate limit.
    pub upstream: UpstreamCounters,
    /// At-least-once delivery: stored, sent, resent, acknowledged.
    pub reliable: Arc<ReliableCounters>,
    /// Turns of the shard's timer loop and how late it is: a shard that
    /// stops turning while it has work shows here.
    pub liveness: crate::liveness::Liveness,
    /// Latencies, disconnects and refusals by code, queue bytes, sessions
    /// by platform and version ([`crate::observe`]).
    pub ops: crate::observe::OpsCounters,
}

/// Push-port limits a shard enforces.
#[derive(Clone, Debug)]
pub struct PushLimits {
    pub max_inflight_per_backend: u32,
    pub max_targets_per_request: u32,
    pub max_request_bytes: u32,
    /// Every request is answered within this, in ms.
    pub reply_timeout_ms: u64,
    /// This shard's share of the node's broadcast rate, deliveries/s.
    pub broadcast_rate_per_sec: u32,
    /// Bytes of broadcasts each shard may hold ([`broadcast_cost`]).
    pub broadcast_queue_bytes: u64,
}

/// Everything a shard needs to start, built on the main thread.
#[derive(Clone)]
pub struct ShardConfig {
    /// What a reload may change (the shard's copy is [`Shard::live`]).
    pub live: crate::reload::LiveSettings,
    /// Where reloads leave new settings ([`crate::reload`]).
    pub reload: Arc<crate::reload::ReloadHub>,
    pub max_frame_bytes: u32,
    pub outbound_queue_bytes: u32,
    pub write_timeout_ms: u64,
    pub read_buffer_bytes: usize,
    pub wheel_tick_ms: u64,
    /// Per-source limits, one table for the node.
    pub admission: Arc<crate::admission::Admission>,
    pub max_groups_per_session: u32,
    /// Groups any client may JOIN (`[client_groups] allow`).
    pub join_policy: Arc<[String]>,
    pub node: String,
    /// Services and their backends, dedup and rate-limit settings.
    pub upstream: UpstreamSettings,
    /// At-least-once delivery: window, retransmission, store sharing.
    pub delivery: DeliverySettings,
    /// Every shard's counters, by shard id: a broadcast reserves room in
    /// every shard's queue before it is sent to any.
    pub node_counters: Arc<[Arc<ShardCounters>]>,
    /// The WebSocket upgrade's settings (`[ws]`).
    pub ws: Arc<crate::conn::ws::HandshakeConfig>,
    /// Certificates of `tls_listen` and `wss_listen` (when on).
    pub tls: crate::conn::links::TlsStores,
}

/// Outbound queue and input leftovers: allocated only while in use.
#[derive(Default)]
struct ConnIo {
    out: OutQueue,
    /// When the socket stopped taking our writes (cleared when it drains).
    stalled_since: Option<Millis>,
    /// An incomplete frame carried over to the next read.
    partial: Vec<u8>,
    /// Set when the session must move to another shard.
    handoff: Option<(ShardId, Box<Login>)>,
    /// Registered, waiting for the user's home shard to record it before
    /// `AuthOk` goes out.
    awaiting_dir: Option<Box<Login>>,
    /// Listed in the shard's flush list ([`Shard::deliver_batched`]).
    in_flush: bool,
    /// WebSocket upgrade, decoder mid-frame, handshake token.
    ws: Option<Box<WsState>>,
}

impl ConnIo {
    fn is_idle(&self) -> bool {
        self.out.is_empty()
            && self.partial.is_empty()
            && self.handoff.is_none()
            && self.awaiting_dir.is_none()
            && self.ws.as_ref().is_none_or(|ws| ws.is_idle())
    }
}

/// One connection's slot. Every field is paid per connection.
struct Conn {
    session: Session,
    /// The connection task's waker, to wake it when another task queues
    /// frames or closes it.
    waker: Option<Waker>,
    /// user, device, app, platform and client version, concatenated; the
    /// first four lengths are in `lens`. Set once authenticated.
    ident: Option<Box<str>>,
    io: Option<Box<ConnIo>>,
    generation: u32,
    /// Next session of the same user on this shard (intrusive list).
    next_of_user: u32,
    /// The socket, for writing to an idle session without waking its task
    /// (see [`crate::conn::fd`]: the task takes it back to close the socket).
    fd: SlotFd,
    /// Unix seconds when the session was accepted.
    connected_at: u32,
    lens: [u8; 4],
    /// Capability bits from Auth (every defined bit fits in a byte).
    capabilities: u8,
    /// The write side has been shut down after the final flush.
    write_shut: bool,
    /// The transport below framing.
    link: Link,
}

impl Conn {
    fn io(&mut self) -> &mut ConnIo {
        self.io.get_or_insert_with(Box::default)
    }

    fn release_io_if_idle(&mut self) {
        if self.io.as_ref().is_some_and(|io| io.is_idle()) {
            self.io = None;
        }
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }

    fn set_ident(&mut self, login: &Login) {
        let parts = [&login.user, &login.device, &login.app, &login.platform];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + login.client_version.len());
        for (len, part) in self.lens.iter_mut().zip(parts) {
            // Session::on_auth rejects ids longer than MAX_ID_BYTES.
            *len = u8::try_from(part.len()).unwrap_or(u8::MAX);
            text.push_str(&part[..usize::from(*len)]);
        }
        text.push_str(&login.client_version);
        // The token's group patterns follow, each after a NUL (no field
        // holds one): they cost nothing for tokens without them.
        for group in &login.groups {
            text.push('\0');
            text.push_str(group);
        }
        self.ident = Some(text.into_boxed_str());
    }

    /// The group patterns of the session's token.
    fn group_claims(&self) -> impl Iterator<Item = &str> {
        let text = self.ident.as_deref().unwrap_or("");
        let tail = text.find('\0').map_or("", |i| &text[i + 1..]);
        tail.split('\0').filter(|g| !g.is_empty())
    }

    /// Field `i` of the identity: 0 user, 1 device, 2 app, 3 platform, 4 version.
    fn field(&self, i: usize) -> Option<&str> {
        let text = self.ident.as_deref()?;
        let start: usize = self.lens[..i].iter().map(|&l| usize::from(l)).sum();
        let end = if i < 4 {
            start + usize::from(self.lens[i])
        } else {
            text[start..].find('\0').map_or(text.len(), |n| start + n)
        };
        text.get(start..end)
    }

    fn user(&self) -> Option<&str> {
        self.field(0)
    }

    fn device(&self) -> Option<&str> {
        self.field(1)
    }

    fn is_active(&self) -> bool {
        self.session.phase() == Phase::Active
    }

    /// Whether the client declared it acknowledges messages.
    fn acks(&self) -> bool {
        u32::from(self.capabilities) & proto::Capability::Ack as u32 != 0
    }
}

/// A home shard's directory of users: which shards hold sessions of each
/// user, by user hash. One 64-bit word covers 64 shards: shards 0-63 sit
/// in `low`, one word per user as on any node of up to 64 shards; higher
/// shards (hosts with more cores) in `high`, a word only for the users
/// with sessions among those 64.
#[derive(Default)]
struct UserDir {
    low: HashMap<u64, u64>,
    /// (user hash, word number >= 1) -> shards `64 * word ..` holding sessions.
    high: HashMap<(u64, u16), u64>,
}

impl UserDir {
    /// Records that `shard` holds (or no longer holds) sessions of the user.
    fn set(&mut self, user_hash: u64, shard: ShardId, present: bool) {
        let (word, bit) = (shard.0 / 64, 1u64 << (shard.0 % 64));
        fn update<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, key: K, bit: u64, present: bool) {
            if present {
                *map.entry(key).or_insert(0) |= bit;
            } else if let Some(mask) = map.get_mut(&key) {
                *mask &= !bit;
                if *mask == 0 {
                    map.remove(&key);
                }
            }
        }
        if word == 0 {
            update(&mut self.low, user_hash, bit, present);
        } else {
            update(&mut self.high, (user_hash, word), bit, present);
        }
    }

    /// The shards (below `shards`) holding sessions of the user.
    fn shards(&self, user_hash: u64, shards: u16) -> Vec<ShardId> {
        let mut out = Vec::new();
        for word in 0..shards.div_ceil(64) {
            let mut mask =
                if word == 0 { self.low.get(&user_hash).copied() } else { self.high.get(&(user_hash, word)).copied() }
                    .unwrap_or(0);
            while mask != 0 {
                let bit = mask.trailing_zeros() as u16;
                mask &= mask - 1;
                out.push(ShardId(word * 64 + bit));
            }
        }
        out
    }
}

/// What one queued broadcast costs a shard's queue: its frame and its job.
pub(crate) fn broadcast_cost(frame_len: usize) -> u64 {
    frame_len as u64 + 64
}

/// A broadcast being paced out over this shard's sessions.
struct BroadcastJob {
    frame: Bytes,
    /// Next slab slot to visit.
    cursor: usize,
    /// After this the rest is dropped (and counted as expired).
    expires_at: Option<Instant>,
}

/// The shard's mutable state, behind one `RefCell`. Never borrowed across
/// an await.
pub(crate) struct State {
    conns: Slab<Conn>,
    /// Slot index by device id (hash of the device string; equality checked
    /// against the slot's identity, so only 4 bytes per entry).
    devices: HashTable<u32>,
    /// Head slot of each user's list of sessions on this shard.
    users: HashTable<u32>,
    /// Home-shard directory: user hash -> set of shards holding sessions.
    user_dir: UserDir,
    groups: Groups,
    wheel: Wheel,
    next_gen: u32,
    /// Reused action buffer.
    actions: Vec<Action>,
    broadcasts: VecDeque<BroadcastJob>,
    pub(crate) backends: Slab<Backend>,
    /// Requests from this shard's backends waiting for parts of their answer.
    pub(crate) pending: HashMap<u64, Pending>,
    /// When each of those must be answered at the latest.
    pub(crate) deadlines: Deadlines,
    /// Sessions with frames queued by a fan-out, in the order they were
    /// queued, for the flusher task ([`Shard::deliver_batched`]).
    flush: VecDeque<ConnKey>,
    next_token: u64,
    pub(crate) message_ids: MessageIds,
    /// At-least-once delivery of online devices ([`crate::delivery::reliable`]).
    pub(crate) reliable: Reliable,
    /// Requests to service backends and connection events ([`crate::upstream`]).
    pub(crate) upstream: Upstream,
    /// Wire forms of outbound frames, for links other than plain TCP.
    wrapper: Wrapper,
    /// Users and devices whose older tokens are refused.
    pub(crate) revoked: crate::revocation::Revocations,
}

impl State {
    fn conn(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key.index as usize).filter(|c| c.generation == key.generation)
    }

    pub(crate) fn key_of(&self, slot: u32) -> ConnKey {
        ConnKey { index: slot, generation: self.conns.get(slot as usize).map_or(0, |c| c.generation) }
    }

    /// What reliable delivery needs to know of session `key`: its device,
    /// whether it is active (AuthOk sent, not closing) and whether it ACKs.
    pub(crate) fn delivery_target(&self, key: ConnKey) -> Option<(&str, bool, bool)> {
        let conn = self.conn_ref(key)?;
        Some((conn.device()?, conn.is_active(), conn.acks()))
    }

    /// Files `key` in the timer wheel for `deadline` (another deadline than
    /// the session's, e.g. a resend).
    pub(crate) fn wake_at(&mut self, key: ConnKey, deadline: Millis) {
        self.wheel.insert(key, deadline);
    }

    pub(crate) fn device_slot(&self, device: &str) -> Option<u32> {
        let conns = &self.conns;
        self.devices.find(stable_hash(device), |&i| slot_device(conns, i) == Some(device)).copied()
    }

    fn user_head(&self, user: &str) -> Option<u32> {
        let conns = &self.conns;
        self.users.find(stable_hash(user), |&i| slot_user(conns, i) == Some(user)).copied()
    }

    /// Slots of every session of `user` on this shard.
    pub(crate) fn user_slots(&self, user: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cur = self.user_head(user).unwrap_or(NO_CONN);
        while cur != NO_CONN {
            out.push(cur);
            cur = self.conns.get(cur as usize).map_or(NO_CONN, |c| c.next_of_user);
        }
        out
    }

    /// Whether another user with the same hash has sessions here (64-bit
    /// collisions are possible in principle; the directory keys by hash).
    fn hash_in_use(&self, hash: u64) -> bool {
        let conns = &self.conns;
        self.users.iter_hash(hash).any(|&i| slot_user(conns, i).is_some_and(|u| stable_hash(u) == hash))
    }

    pub(crate) fn next_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn conn_ref(&self, key: ConnKey) -> Option<&Conn> {
        self.conns.get(key.index as usize).filter(|c| c.generation == key.generation)
    }

    /// The device id of session `key` (once authenticated).
    pub(crate) fn device_of(&self, key: ConnKey) -> Option<&str> {
        self.conn_ref(key).and_then(Conn::device)
    }

    /// Keys of the active sessions (cluster drain).
    pub(crate) fn active_keys(&self) -> Vec<ConnKey> {
        self.conns
            .iter()
            .filter(|(_, c)| c.is_active())
            .map(|(i, c)| ConnKey { index: i as u32, generation: c.generation })
            .collect()
    }

    /// The user of session `key` (once authenticated).
    pub(crate) fn user_of(&self, key: ConnKey) -> Option<&str> {
        self.conn_ref(key).and_then(Conn::user)
    }

    /// Wakes the task of connection `key` (e.g. to read again).
    pub(crate) fn wake_conn(&self, key: ConnKey) {
        if let Some(conn) = self.conn_ref(key) {
            conn.wake();
        }
    }
}

fn slot_device(conns: &Slab<Conn>, i: u32) -> Option<&str> {
    conns.get(i as usize).and_then(Conn::device)
}

fn slot_user(conns: &Slab<Conn>, i: u32) -> Option<&str> {
    conns.get(i as usize).and_then(Conn::user)
}

/// One executor's shard.
pub struct Shard {
    /// Itself, for tasks spawned from `&self` methods (store answers).
    pub(crate) me: Weak<Shard>,
    pub(crate) id: ShardId,
    shards: u16,
    pub(crate) cfg: ShardConfig,
    /// The reloadable settings in force on this shard, and the reload
    /// generation they came from ([`crate::reload`]).
    pub(crate) live: RefCell<Rc<crate::reload::LiveSettings>>,
    pub(crate) live_generation: Cell<u64>,
    pub(crate) state: RefCell<State>,
    /// Read buffer shared by every connection of the shard.
    scratch: RefCell<Vec<u8>>,
    /// Plaintext of the TLS records of one read (for wss, the WebSocket
    /// decoder rewrites it in place).
    plain_scratch: RefCell<Vec<u8>>,
    /// This shard's handles on the certificate stores of `cfg.tls`.
    tls_configs: RefCell<(Option<crate::conn::tls::ShardServerConfig>, Option<crate::conn::tls::ShardServerConfig>)>,
    outbox: Rc<Outbox>,
    pub(crate) counters: Arc<ShardCounters>,
    /// Monotonic origin of [`Millis`].
    epoch: Instant,
    /// Closed when the shard stops accepting.
    pub(crate) stop_accepting: Rc<glommio::sync::Semaphore>,
    stopping: Cell<bool>,
    /// Set while the broadcast pacer is working through queued broadcasts.
    pacing: Cell<bool>,
    /// Wakes the pacer task when a broadcast is queued.
    pacer_wake: LocalSender<()>,
    pacer_rx: RefCell<Option<LocalReceiver<()>>>,
    /// The flusher task is writing the flush list.
    flushing: Cell<bool>,
    /// Wakes the flusher task when the flush list fills.
    flush_wake: LocalSender<()>,
    flush_rx: RefCell<Option<LocalReceiver<()>>>,
    /// Timelines of at-least-once messages: this shard's memory store, or a
    /// handle to the node's Redis store.
    pub(crate) store: Rc<dyn TimelineStore>,
    /// Cluster mode: routes, forwarding, drain ([`crate::cluster`]).
    pub(crate) cluster: crate::cluster::Slot,
    /// In-place upgrade: paused, frozen ([`crate::upgrade`]).
    pub(crate) upgrade: ShardUpgrade,
}

impl Shard {
    pub fn new(
        id: ShardId,
        shards: u16,
        cfg: ShardConfig,
        outbox: Rc<Outbox>,
        counters: Arc<ShardCounters>,
        store: Rc<dyn TimelineStore>,
    ) -> Rc<Shard> {
        let (pacer_wake, pacer_rx) = glommio::channels::local_channel::new_bounded(1);
        let (flush_wake, flush_rx) = glommio::channels::local_channel::new_bounded(1);
        // Message ids: node index (4 bits) and shard (8 bits) as the worker;
        // `Config::validate` keeps both in range.
        let worker = cfg.delivery.node_index << 8 | (id.0 & 0xff);
        Rc::new_cyclic(|me| Shard {
            me: me.clone(),
            id,
            shards,
            state: RefCell::new(State {
                conns: Slab::new(),
                devices: HashTable::new(),
                users: HashTable::new(),
                user_dir: UserDir::default(),
                groups: Groups::default(),
                wheel: Wheel::new(cfg.wheel_tick_ms, WHEEL_SLOTS, Millis(0)),
                next_gen: 0,
                actions: Vec::new(),
                broadcasts: VecDeque::new(),
                backends: Slab::new(),
                pending: HashMap::new(),
                deadlines: Deadlines::default(),
                flush: VecDeque::new(),
                next_token: 0,
                message_ids: MessageIds::new(worker),
                reliable: Reliable::new(id, cfg.delivery.clone(), store.clone(), counters.reliable.clone()),
                upstream: Upstream::new(cfg.upstream.clone()),
                wrapper: Wrapper::default(),
                revoked: crate::revocation::Revocations::new(
                    cfg.live
                        .params
                        .keyring
                        .max_lifetime_secs()
                        .saturating_add(i64::from(cfg.live.params.clock_leeway_secs)),
                ),
            }),
            scratch: RefCell::new(vec![0; cfg.read_buffer_bytes]),
            plain_scratch: RefCell::new(Vec::new()),
            tls_configs: RefCell::new((
                cfg.tls.tls.as_ref().map(|s| s.shard_handle()),
                cfg.tls.wss.as_ref().map(|s| s.shard_handle()),
            )),
            live: RefCell::new(Rc::new(cfg.live.clone())),
            live_generation: Cell::new(0),
            cfg,
            outbox,
            counters,
            epoch: Instant::now(),
            stop_accepting: Rc::new(glommio::sync::Semaphore::new(0)),
            stopping: Cell::new(false),
            pacing: Cell::new(false),
            pacer_wake,
            pacer_rx: RefCell::new(Some(pacer_rx)),
            flushing: Cell::new(false),
            flush_wake,
            flush_rx: RefCell::new(Some(flush_rx)),
            store,
            cluster: Default::default(),
            upgrade: ShardUpgrade::default(),
        })
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    pub(crate) fn shards(&self) -> u16 {
        self.shards
    }

    pub(crate) fn now(&self) -> Now {
        let mono = Millis(self.epoch.elapsed().as_millis() as u64);
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Now { mono, unix_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::task::{AcceptBucket, ConnTask};
    use super::*;
    use crate::protocol::limits::MAX_ID_BYTES;
    use crate::session::Params;

    #[test]
    fn ident_packs_fields() {
        let login = Login {
            user: "alice".into(),
            device: "phone-1".into(),
            app: "chat".into(),
            platform: "ios".into(),
            client_version: "2.0.1".into(),
            capabilities: 0,
            last_seq: 0,
            heartbeat_ms: 0,
            store_incarnation: 0,
            groups: vec!["room-*".into(), "vip".into()],
            expires_at: 0,
            issued_at: 0,
        };
        let mut conn = Conn {
            session: Session::new(Millis(0), &test_params()),
            waker: None,
            ident: None,
            io: None,
            generation: 0,
            next_of_user: NO_CONN,
            fd: SlotFd::unused(),
            connected_at: 0,
            lens: [0; 4],
            capabilities: 0,
            write_shut: false,
            link: Link::Plain,
        };
        conn.set_ident(&login);
        let fields: Vec<_> = (0..5).map(|i| conn.field(i).unwrap()).collect();
        assert_eq!(fields, ["alice", "phone-1", "chat", "ios", "2.0.1"]);
        assert_eq!(conn.group_claims().collect::<Vec<_>>(), ["room-*", "vip"]);
    }

    fn test_params() -> Params {
        let key = crate::protocol::token::Key::new("k", vec![1; 32]).unwrap();
        Params {
            keyring: crate::protocol::token::Keyring::new(vec![key], None).unwrap(),
            clock_leeway_secs: 0,
            auth_timeout_ms: 1000,
            heartbeat_min_ms: 1,
            heartbeat_default_ms: 1,
            heartbeat_max_ms: 1,
            idle_timeout_factor: 2,
            close_linger_ms: 1,
            max_id_bytes: MAX_ID_BYTES,
            control: crate::session::ControlBudget::OFF,
        }
    }

    #[test]
    fn accept_bucket_paces() {
        let t0 = Instant::now();
        let mut b = AcceptBucket::new(10);
        for _ in 0..10 {
            assert_eq!(b.take(t0), None);
        }
        let wait = b.take(t0).expect("empty bucket waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert_eq!(AcceptBucket::new(0).take(t0), None);
    }

    #[test]
    fn user_directory_holds_every_shard_of_a_large_host() {
        let mut dir = UserDir::default();
        for shard in [0, 5, 63, 64, 130, 255] {
            dir.set(7, ShardId(shard), true);
        }
        dir.set(8, ShardId(64), true);
        let ids = |v: Vec<ShardId>| v.into_iter().map(|s| s.0).collect::<Vec<_>>();
        assert_eq!(ids(dir.shards(7, 256)), [0, 5, 63, 64, 130, 255]);
        assert_eq!(ids(dir.shards(7, 64)), [0, 5, 63], "a 64-shard node looks at one word");
        for shard in [0, 64, 255] {
            dir.set(7, ShardId(shard), false);
        }
        assert_eq!(ids(dir.shards(7, 256)), [5, 63, 130]);
        assert_eq!(ids(dir.shards(8, 256)), [64]);
        for shard in [5, 63, 130] {
            dir.set(7, ShardId(shard), false);
        }
        dir.set(8, ShardId(64), false);
        assert!(dir.low.is_empty() && dir.high.is_empty(), "nothing left behind");
    }

    #[test]
    fn conn_task_is_small() {
        // Every idle connection holds one.
        assert!(std::mem::size_of::<ConnTask>() <= 160, "{}", std::mem::size_of::<ConnTask>());
    }

    #[test]
    fn conn_slot_is_small() {
        // Each byte here is multiplied by every idle connection.
        assert!(std::mem::size_of::<Conn>() <= 80, "{}", std::mem::size_of::<Conn>());
    }
}
