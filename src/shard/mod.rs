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
use crate::conn::transport::{Plain, Transport};
use crate::delivery::MessageIds;
use crate::groups::Groups;
use crate::mesh::{Adoption, Origin, Outbox, Part, PresencePart, PresenceQuery, ShardMsg, UserAction};
use crate::protocol::codec::{self, Frame, Peer};
use crate::protocol::codes;
use crate::protocol::ids::{ConnId, ConnKey, ShardId, home_shard, owner_shard, stable_hash};
use crate::protocol::proto::{self, ConnectionEventKind, ErrorCode, FrameKind};
use crate::protocol::time::{Millis, Now};
use crate::push::{Backend, Deadlines, Pending};
use crate::reliable::{DeliverySettings, ReliableCounters, Tracked};
use crate::session::{Action, Login, Params, Phase, Session};
use crate::store::TimelineStore;
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
    /// Push-port requests received.
    pub push_requests: AtomicU64,
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
    pub reliable: ReliableCounters,
    /// Turns of the shard's timer loop and how late it is: a shard that
    /// stops turning while it has work shows here.
    pub liveness: crate::liveness::Liveness,
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
    pub params: Params,
    pub max_frame_bytes: u32,
    pub outbound_queue_bytes: u32,
    pub write_timeout_ms: u64,
    pub read_buffer_bytes: usize,
    pub wheel_tick_ms: u64,
    pub max_connections: u32,
    pub accept_rate_per_sec: u32,
    pub max_groups_per_session: u32,
    pub push: PushLimits,
    pub node: String,
    /// Services and their backends, dedup and rate-limit settings.
    pub upstream: UpstreamSettings,
    /// At-least-once delivery: window, retransmission, store sharing.
    pub delivery: DeliverySettings,
    /// Every shard's counters, by shard id: a broadcast reserves room in
    /// every shard's queue before it is sent to any.
    pub node_counters: Arc<[Arc<ShardCounters>]>,
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
}

impl ConnIo {
    fn is_idle(&self) -> bool {
        self.out.is_empty() && self.partial.is_empty() && self.handoff.is_none() && self.awaiting_dir.is_none()
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
        self.ident = Some(text.into_boxed_str());
    }

    /// Field `i` of the identity: 0 user, 1 device, 2 app, 3 platform, 4 version.
    fn field(&self, i: usize) -> Option<&str> {
        let text = self.ident.as_deref()?;
        let start: usize = self.lens[..i].iter().map(|&l| usize::from(l)).sum();
        let end = if i < 4 { start + usize::from(self.lens[i]) } else { text.len() };
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
    /// At-least-once delivery state of online devices, by slot: only while
    /// a device has messages in flight or waiting ([`crate::reliable`]).
    pub(crate) reliable: HashMap<u32, Tracked>,
    /// Requests to service backends and connection events ([`crate::upstream`]).
    pub(crate) upstream: Upstream,
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

/// The task of one connection, written by hand: an `async` block around
/// the stream keeps several copies of it in its state (448 bytes against
/// 136 here), and this is paid by every idle connection.
struct ConnTask {
    shard: Rc<Shard>,
    key: ConnKey,
    /// Taken when the task finishes.
    socket: Option<Socket>,
}

impl std::future::Future for ConnTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(socket) = this.socket.as_mut() else { return Poll::Ready(()) };
        let Poll::Ready(exit) = this.shard.poll_conn(this.key, socket.stream(), cx) else { return Poll::Pending };
        if let Some(socket) = this.socket.take() {
            this.shard.finish_conn(this.key, socket, exit);
        }
        Poll::Ready(())
    }
}

/// How a connection task ended.
enum Exit {
    Closed,
    /// Authenticated here, owned by another shard: move it there.
    Handoff(ShardId, Box<Transit>),
}

/// The session part of an [`Adoption`], before the fd is attached.
struct Transit {
    session: Session,
    login: Login,
    leftover: Vec<u8>,
}

/// One executor's shard.
pub struct Shard {
    /// Itself, for tasks spawned from `&self` methods (store answers).
    pub(crate) me: Weak<Shard>,
    pub(crate) id: ShardId,
    shards: u16,
    pub(crate) cfg: ShardConfig,
    pub(crate) state: RefCell<State>,
    /// Read buffer shared by every connection of the shard.
    scratch: RefCell<Vec<u8>>,
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
                reliable: HashMap::new(),
                upstream: Upstream::new(cfg.upstream.clone()),
            }),
            scratch: RefCell::new(vec![0; cfg.read_buffer_bytes]),
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

    // ---- accepting ------------------------------------------------------

    /// Accepts client connections until [`Shard::begin_shutdown`].
    pub async fn accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener) {
        let mut bucket = AcceptBucket::new(self.cfg.accept_rate_per_sec);
        while let Some(accepted) = self.accept_or_stop(&listener).await {
            match accepted {
                Ok(stream) => self.on_accept(stream),
                Err(err) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning.
                    warn!(shard = %self.id, error = %err, "accept failed; pausing 100 ms");
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
            }
            if let Some(wait) = bucket.take(Instant::now()) {
                glommio::timer::sleep(wait).await;
            }
        }
        debug!(shard = %self.id, "stopped accepting clients");
    }

    /// The next accepted connection, or `None` once the shard stops.
    pub(crate) async fn accept_or_stop(
        &self,
        listener: &glommio::net::TcpListener,
    ) -> Option<glommio::Result<TcpStream, ()>> {
        futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = self.stop_accepting.acquire(1).await;
            None
        })
        .await
    }

    fn on_accept(self: &Rc<Self>, stream: TcpStream) {
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            if st.conns.len() >= self.cfg.max_connections as usize {
                drop(st);
                debug!(shard = %self.id, "connection limit reached; refusing");
                // Best effort: the socket is fresh, a small frame fits.
                let bytes =
                    Frame::Error(codes::error_body(ErrorCode::ServerError, "connection limit reached")).to_bytes();
                let _ = fd::send(fd::stream_fd(&stream), &bytes);
                return;
            }
            let session = Session::new(now.mono, &self.cfg.params);
            let (socket, slot_fd) = Socket::new(stream);
            (insert_conn(&mut st, session, slot_fd, now, 0), socket)
        };
        let (key, socket) = key;
        let shard = self.clone();
        glommio::spawn_local(ConnTask { shard, key, socket: Some(socket) }).detach();
    }

    // ---- the connection task ----------------------------------------------

    /// Ends a connection task: the slot goes, then the socket (closed, or
    /// handed to its owner shard).
    fn finish_conn(&self, key: ConnKey, socket: Socket, exit: Exit) {
        // The slot goes first: it holds the fd handle deliveries write to,
        // which closing takes back.
        let Some(slot_fd) = self.remove_conn(key) else {
            // Invariant: only this task removes its slot.
            debug_assert!(false, "connection slot removed by someone else");
            return;
        };
        match exit {
            Exit::Closed => socket.close(slot_fd),
            Exit::Handoff(owner, transit) => match socket.hand_over(slot_fd) {
                Ok(fd) => {
                    let Transit { session, login, leftover } = *transit;
                    self.counters.handed_off.fetch_add(1, Ordering::Relaxed);
                    self.outbox.send(owner, ShardMsg::Adopt(Box::new(Adoption { fd, session, login, leftover })));
                }
                Err(err) => warn!(shard = %self.id, error = %err, "dup failed; dropping connection"),
            },
        }
    }

    fn poll_conn(&self, key: ConnKey, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Exit> {
        for _ in 0..READS_PER_POLL {
            let draining = {
                let mut st = self.state.borrow_mut();
                let now = self.now().mono;
                let Some(conn) = st.conn(key) else {
                    return Poll::Ready(Exit::Closed);
                };
                let mut stalled_now = false;
                if let Some(io) = conn.io.as_mut() {
                    match io.out.flush(stream, cx) {
                        Err(err) => {
                            debug!(shard = %self.id, error = %err, "write failed");
                            conn.session.closed_by_peer();
                            return Poll::Ready(Exit::Closed);
                        }
                        Ok(true) => io.stalled_since = None,
                        Ok(false) if io.stalled_since.is_none() => {
                            io.stalled_since = Some(now);
                            stalled_now = true;
                        }
                        Ok(false) => {}
                    }
                    conn.release_io_if_idle();
                }
                match conn.session.phase() {
                    Phase::Closed => return Poll::Ready(Exit::Closed),
                    Phase::Closing => {
                        let flushed = conn.io.as_ref().is_none_or(|io| io.out.is_empty());
                        if flushed && !conn.write_shut {
                            // Half-close so the Error frame arrives before FIN;
                            // keep reading until the peer closes or the linger ends.
                            conn.write_shut = true;
                            fd::shutdown_write(fd::stream_fd(stream));
                        }
                    }
                    Phase::Authenticated => {
                        if let Some((owner, transit)) = take_handoff(conn) {
                            return Poll::Ready(Exit::Handoff(owner, transit));
                        }
                    }
                    Phase::Handshaking | Phase::Active => {}
                }
                if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    conn.waker = Some(cx.waker().clone());
                }
                let draining = !conn.session.wants_input();
                let awaiting_activation = conn.session.phase() == Phase::Authenticated;
                if stalled_now {
                    // The sweep closes the session as SLOW if the socket is
                    // still full by then.
                    st.wheel.insert(key, now.add_ms(self.cfg.write_timeout_ms));
                }
                // Leave the bytes in the socket while the session waits for
                // its activation (the user directory's ack: reading now would
                // discard frames pipelined behind Auth; the AuthOk queued at
                // activation wakes this task), or while the rate limit pauses
                // it (the upstream task resumes and wakes it).
                if awaiting_activation || (!draining && st.upstream.is_paused(key)) {
                    return Poll::Pending;
                }
                draining
            };

            let mut buf = std::mem::take(&mut *self.scratch.borrow_mut());
            let read = futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, &mut buf);
            let result = match read {
                Poll::Pending => None,
                Poll::Ready(Ok(0)) => Some(Err(())),
                Poll::Ready(Ok(n)) => match Plain::inbound(&mut (), &mut buf[..n]) {
                    Ok(frames) if !draining => {
                        self.on_bytes(key, frames);
                        Some(Ok(()))
                    }
                    Ok(_) => Some(Ok(())),
                    Err(err) => {
                        debug!(shard = %self.id, error = %err, "transport failed");
                        Some(Err(()))
                    }
                },
                Poll::Ready(Err(err)) => {
                    debug!(shard = %self.id, error = %err, "read failed");
                    Some(Err(()))
                }
            };
            *self.scratch.borrow_mut() = buf;
            match result {
                None => return Poll::Pending,
                Some(Ok(())) => {}
                Some(Err(())) => {
                    if let Some(conn) = self.state.borrow_mut().conn(key) {
                        conn.session.closed_by_peer();
                    }
                    return Poll::Ready(Exit::Closed);
                }
            }
        }
        // Fairness: let other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Decodes and handles every whole frame in `data` (after any partial
    /// frame kept from the last read); keeps the incomplete tail.
    fn on_bytes(&self, key: ConnKey, data: &[u8]) {
        self.counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut st = self.state.borrow_mut();
        let Some(conn) = st.conn(key) else { return };
        let mut carried = conn.io.as_mut().map(|io| std::mem::take(&mut io.partial)).unwrap_or_default();
        let input: &[u8] = if carried.is_empty() {
            data
        } else {
            carried.extend_from_slice(data);
            &carried
        };
        let consumed = self.handle_input(&mut st, key, input);
        let rest = &input[consumed..];
        if let Some(conn) = st.conn(key) {
            if !rest.is_empty() && conn.session.phase() != Phase::Closing {
                let io = conn.io();
                io.partial.clear();
                io.partial.extend_from_slice(rest);
            }
            conn.release_io_if_idle();
        }
        // Hook: upstream requests (and immediate answers) of this read go
        // out together.
        self.flush_upstream(&mut st);
    }

    /// Handles frames that waited in the input leftovers: behind Auth for
    /// activation, or behind a rate-limited Request.
    pub(crate) fn resume_input(&self, st: &mut State, key: ConnKey) {
        let Some(partial) = st.conn(key).and_then(|c| c.io.as_mut()).map(|io| std::mem::take(&mut io.partial)) else {
            return;
        };
        let consumed = self.handle_input(st, key, &partial);
        if let Some(conn) = st.conn(key) {
            if consumed < partial.len() && conn.session.phase() != Phase::Closing {
                conn.io().partial.extend_from_slice(&partial[consumed..]);
            }
            conn.release_io_if_idle();
        }
        self.flush_upstream(st);
    }

    /// Returns how many bytes of `input` were consumed.
    fn handle_input(&self, st: &mut State, key: ConnKey, input: &[u8]) -> usize {
        let mut pos = 0;
        let now = self.now();
        let mut actions = std::mem::take(&mut st.actions);
        let consumed = loop {
            let Some(conn) = st.conn(key) else { break input.len() };
            if !conn.session.wants_input() {
                // Closing: discard the rest. Authenticated (hand-off): keep it.
                break if conn.session.phase() == Phase::Authenticated { pos } else { input.len() };
            }
            let active = conn.is_active();
            match codec::split_frame(&input[pos..], self.cfg.max_frame_bytes) {
                Ok(None) => break pos,
                Ok(Some((header, body))) => {
                    // Rate limit: a Request over the budget stays in the
                    // leftovers, and reading pauses.
                    if header.kind == FrameKind::Request && active && !self.admit_request(st, key, now.mono) {
                        break pos;
                    }
                    let Some(conn) = st.conn(key) else { break input.len() };
                    pos += header.frame_len();
                    self.counters.frames_in.fetch_add(1, Ordering::Relaxed);
                    match Frame::decode_from(Peer::Client, header, body) {
                        Ok(frame) => conn.session.handle_frame(now, frame, &self.cfg.params, &mut actions),
                        Err(err) => conn.session.handle_codec_error(now, &err, &self.cfg.params, &mut actions),
                    }
                }
                Err(err) => {
                    pos = input.len();
                    conn.session.handle_codec_error(now, &err, &self.cfg.params, &mut actions);
                }
            }
            self.apply(st, key, now, &mut actions);
        };
        st.actions = actions;
        consumed
    }

    /// Carries out a session's actions for connection `key`.
    fn apply(&self, st: &mut State, key: ConnKey, now: Now, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Send(frame) => self.queue_frame(st, key, &frame),
                Action::Close(code) => self.on_close(st, key, code),
                Action::Authenticated(login) => {
                    self.counters.authenticated.fetch_add(1, Ordering::Relaxed);
                    let owner = owner_shard(&login.device, self.shards);
                    if owner == self.id {
                        self.register(st, key, now, &login);
                    } else if let Some(conn) = st.conn(key) {
                        conn.io().handoff = Some((owner, login));
                    }
                }
                Action::Join(group) => {
                    let limit = self.cfg.max_groups_per_session as usize;
                    if st.groups.join(key.index, &group, limit).is_err() {
                        let mut more = Vec::new();
                        if let Some(conn) = st.conn(key) {
                            let reason = format!("at most {limit} groups per session");
                            conn.session.close(now, ErrorCode::LimitExceeded, reason, &self.cfg.params, &mut more);
                        }
                        self.apply(st, key, now, &mut more);
                    }
                    self.publish_group_counts(st);
                }
                Action::Leave(group) => {
                    st.groups.leave(key.index, &group);
                    self.publish_group_counts(st);
                }
                Action::Request(request) => self.on_client_request(st, key, now, request),
                Action::Ack(seq) => self.on_ack(st, key, now, seq),
            }
        }
    }

    fn on_close(&self, st: &mut State, key: ConnKey, code: ErrorCode) {
        let Some(conn) = st.conn(key) else { return };
        let deadline = conn.session.deadline();
        conn.wake();
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), device = conn.device().unwrap_or(""), ?code, "closing");
        // A closing session leaves the indexes now: a new login of the same
        // device must not see it, and pushes must not count it.
        self.unindex(st, key.index, code);
        st.wheel.insert(key, deadline);
    }

    fn queue_frame(&self, st: &mut State, key: ConnKey, frame: &Frame) {
        let bytes = match frame {
            Frame::Pong => Bytes::from_static(&PONG),
            other => other.to_bytes(),
        };
        self.count_out(bytes.len());
        self.queue_bytes(st, key, bytes);
    }

    /// Queues an encoded frame; a full queue closes the session with SLOW.
    /// Returns whether the frame was queued.
    fn queue_bytes(&self, st: &mut State, key: ConnKey, bytes: Bytes) -> bool {
        let queued = self.enqueue(st, key, bytes);
        if queued && let Some(conn) = st.conn(key) {
            conn.wake();
        }
        queued
    }

    /// [`Shard::queue_bytes`] without waking the task.
    fn enqueue(&self, st: &mut State, key: ConnKey, bytes: Bytes) -> bool {
        let limit = self.cfg.outbound_queue_bytes as usize;
        let Some(conn) = st.conn(key) else { return false };
        let closing = conn.session.phase() == Phase::Closing;
        let io = conn.io();
        if io.out.bytes() + bytes.len() > limit && !io.out.is_empty() {
            if closing {
                // The closing frame (Error, Kicked) does not fit behind what
                // is still queued: close without it.
                return false;
            }
            // The client is not reading. Drop the backlog (but finish a
            // frame already on the wire) and tell it why, if the Error
            // frame fits in the bound.
            let dropped = io.out.cut();
            self.close_slow(st, key, dropped, format!("outbound queue above {limit} bytes"));
            return false;
        }
        io.out.push(bytes);
        true
    }

    fn close_slow(&self, st: &mut State, key: ConnKey, dropped: usize, reason: String) {
        self.counters.slow_closed.fetch_add(1, Ordering::Relaxed);
        self.counters.slow_dropped_frames.fetch_add(dropped as u64, Ordering::Relaxed);
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), dropped, %reason, "slow consumer");
        let now = self.now();
        let mut actions = Vec::new();
        if let Some(conn) = st.conn(key) {
            conn.session.close(now, ErrorCode::Slow, reason, &self.cfg.params, &mut actions);
        }
        self.apply(st, key, now, &mut actions);
    }

    /// Hands `frame` to an active session: written at once when nothing is
    /// queued ahead of it, else queued. Returns whether it was accepted.
    /// Counted as a delivered message.
    pub(crate) fn deliver(&self, st: &mut State, slot: u32, frame: &Bytes) -> bool {
        let ok = self.send_to_slot(st, slot, frame);
        if ok {
            self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// [`Shard::deliver`] without counting (resends, control frames).
    pub(crate) fn send_to_slot(&self, st: &mut State, slot: u32, frame: &Bytes) -> bool {
        let key = st.key_of(slot);
        let Some(conn) = st.conn(key) else { return false };
        if !conn.is_active() {
            return false;
        }
        self.count_out(frame.len());
        let idle = conn.io.as_ref().is_none_or(|io| io.out.is_empty());
        let written = if idle {
            // On an error, let the task find it on its own write.
            fd::send(conn.fd.get(), frame).unwrap_or(0)
        } else {
            0
        };
        if written == frame.len() {
            return true;
        }
        if written == 0 {
            return self.queue_bytes(st, key, frame.clone());
        }
        // Part of the frame is on the wire. The queue (empty: `idle`) takes
        // the whole frame marked as partly written, so that cutting a slow
        // client later finishes this frame instead of dropping its tail.
        conn.io().out.push_written(frame.clone(), written);
        conn.wake();
        true
    }

    /// Queues `frame` for an active session and lists the session for the
    /// flusher task, which writes each listed session's whole queue with one
    /// `writev` a chunk of sessions at a time, letting the executor poll
    /// for new work in between. A fan-out costs a queue push per member;
    /// when fan-outs arrive faster than the sockets are written, frames for
    /// the same session pile up and go out together: fewer syscalls per
    /// delivery exactly when the shard is behind. Counted as delivered.
    pub(crate) fn deliver_batched(&self, st: &mut State, slot: u32, frame: &Bytes) -> bool {
        let key = st.key_of(slot);
        if !st.conn(key).is_some_and(|c| c.is_active()) || !self.enqueue(st, key, frame.clone()) {
            return false;
        }
        self.count_out(frame.len());
        if let Some(io) = st.conn(key).and_then(|c| c.io.as_mut())
            && !io.in_flush
        {
            io.in_flush = true;
            st.flush.push_back(key);
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Starts the flusher task if sessions wait in the flush list.
    fn kick_flusher(&self, st: &State) {
        if !st.flush.is_empty() && !self.flushing.get() {
            let _ = self.flush_wake.try_send(());
        }
    }

    /// Writes the queues of listed sessions, a chunk at a time, until the
    /// list is empty; then waits to be woken again.
    pub async fn flusher_loop(self: Rc<Self>) {
        let Some(wake) = self.flush_rx.borrow_mut().take() else { return };
        let mut chunk = Vec::with_capacity(FLUSH_CHUNK);
        while wake.recv().await.is_some() {
            self.flushing.set(true);
            loop {
                {
                    let mut st = self.state.borrow_mut();
                    let n = st.flush.len().min(FLUSH_CHUNK);
                    chunk.extend(st.flush.drain(..n));
                    self.flush_responses(&mut st, &chunk);
                    self.counters.fanout_writes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                if chunk.is_empty() {
                    break;
                }
                chunk.clear();
                // Other tasks run before the next chunk; fan-outs that arrive
                // meanwhile (the executor polls its rings at the latest when
                // its preemption timer fires) join the queues being written.
                // Measured: a zero timer here instead polls more often and
                // coalesces less (p99 ~710 ms instead of ~390 ms at 1M/s).
                futures_lite::future::yield_now().await;
            }
            self.flushing.set(false);
        }
    }

    /// Queues an upstream `Response` frame for session `key` (dropped if
    /// the session is gone or closing) without waking its task: the
    /// upstream code writes every answer of one pass with one `writev` per
    /// session at the end of the pass ([`Shard::flush_responses`]).
    pub(crate) fn respond(&self, st: &mut State, key: ConnKey, frame: Bytes) -> bool {
        self.count_out(frame.len());
        st.conn(key).is_some_and(|c| c.is_active()) && self.enqueue(st, key, frame)
    }

    fn count_out(&self, bytes: usize) {
        self.counters.frames_out.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Writes what [`Shard::respond`] queued for `keys`; a socket that is
    /// full (or failed) is left to its task, which is woken.
    pub(crate) fn flush_responses(&self, st: &mut State, keys: &[ConnKey]) {
        for &key in keys {
            let Some(conn) = st.conn(key) else { continue };
            let Some(io) = conn.io.as_mut() else { continue };
            io.in_flush = false;
            if io.out.is_empty() {
                conn.release_io_if_idle();
                continue;
            }
            if let Ok(true) = io.out.write_now(conn.fd.get()) {
                io.stalled_since = None;
                conn.release_io_if_idle();
            } else {
                conn.wake();
            }
        }
    }

    /// Closes session `key` from the server side with an `Error` frame.
    pub(crate) fn close_conn(&self, st: &mut State, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        let mut actions = Vec::new();
        if let Some(conn) = st.conn(key) {
            conn.session.close(now, code, reason, &self.cfg.params, &mut actions);
        }
        self.apply(st, key, now, &mut actions);
    }

    /// The common parameters of session `key`, for upstream requests and
    /// connection events. The client address comes from the socket (it is
    /// not kept per connection).
    pub(crate) fn conn_info(&self, st: &State, key: ConnKey) -> Option<proto::ConnInfo> {
        let conn = st.conn_ref(key)?;
        let field = |i| conn.field(i).unwrap_or_default().to_owned();
        Some(proto::ConnInfo {
            user: field(0),
            device: field(1),
            app: field(2),
            platform: field(3),
            client_version: field(4),
            conn_id: ConnId::new(self.id, key).0,
            node: self.cfg.node.clone(),
            client_addr: fd::peer_addr(conn.fd.get()).map(|a| a.to_string()).unwrap_or_default(),
        })
    }

    // ---- registration -----------------------------------------------------

    /// Makes `key` the device's session on this shard: replaces an older
    /// login, indexes it, and activates it.
    fn register(&self, st: &mut State, key: ConnKey, now: Now, login: &Login) {
        if let Some(old) = st.device_slot(&login.device) {
            let old_key = st.key_of(old);
            self.counters.replaced.fetch_add(1, Ordering::Relaxed);
            self.kick(st, old_key, now, ErrorCode::Replaced, String::new());
        }
        let Some(conn) = st.conn(key) else { return };
        conn.set_ident(login);
        conn.capabilities = login.capabilities as u8;
        let conns = &st.conns;
        st.devices
            .insert_unique(stable_hash(&login.device), key.index, |&i| slot_device(conns, i).map_or(0, stable_hash));
        self.counters.active.fetch_add(1, Ordering::Relaxed);
        if self.link_user(st, key, &login.user) {
            if let Some(conn) = st.conn(key) {
                conn.io().awaiting_dir = Some(Box::new(login.clone()));
            }
        } else {
            self.activate(st, key, now, login);
        }
    }

    /// Sends `AuthOk`: the session is indexed and reachable.
    fn activate(&self, st: &mut State, key: ConnKey, now: Now, login: &Login) {
        let ok = proto::AuthOk {
            conn_id: ConnId::new(self.id, key).0,
            shard: u32::from(self.id.0),
            node: self.cfg.node.clone(),
            store_incarnation: self.store.incarnation(),
            ..Default::default()
        };
        let mut actions = std::mem::take(&mut st.actions);
        if let Some(conn) = st.conn(key) {
            conn.session.activate(now, login, ok, &self.cfg.params, &mut actions);
            let deadline = conn.session.deadline();
            st.wheel.insert(key, deadline);
        }
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), user = %login.user, device = %login.device, "authenticated");
        self.apply(st, key, now, &mut actions);
        st.actions = actions;
        // Hook: stored messages since the client's last sequence follow AuthOk.
        self.resume_delivery(st, key, now, login);
        // Hook: subscribed backends learn the session is online.
        self.conn_event(st, key, ConnectionEventKind::Online, ErrorCode::Unspecified);
        // Hook: cluster mode claims the device's route.
        self.cluster_on_active(st, key, login);
    }

    /// Ends a session with a Kicked frame; it leaves the indexes at once.
    fn kick(&self, st: &mut State, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        let mut actions = Vec::new();
        if let Some(conn) = st.conn(key) {
            conn.session.kick(now, code, reason, &self.cfg.params, &mut actions);
        }
        self.apply(st, key, now, &mut actions);
    }

    /// Links the session into its user's list. Returns true when the
    /// user's home shard (another shard) must first record this shard in
    /// its directory; it acknowledges with `UserDirAck`.
    fn link_user(&self, st: &mut State, key: ConnKey, user: &str) -> bool {
        let slot = key.index;
        let hash = stable_hash(user);
        let conns = &st.conns;
        if let Some(head) = st.users.find_mut(hash, |&i| slot_user(conns, i) == Some(user)) {
            let old_head = std::mem::replace(head, slot);
            st.conns[slot as usize].next_of_user = old_head;
            return false;
        }
        let first_of_hash = !st.hash_in_use(hash);
        st.conns[slot as usize].next_of_user = NO_CONN;
        let conns = &st.conns;
        st.users.insert_unique(hash, slot, |&i| slot_user(conns, i).map_or(0, stable_hash));
        if !first_of_hash {
            return false;
        }
        let home = home_shard(user, self.shards);
        let remote = home != self.id;
        let ack = remote.then_some(key);
        self.route(st, home, ShardMsg::UserDir { user_hash: hash, shard: self.id, present: true, ack });
        remote
    }

    /// Removes slot `slot` from the device, user and group indexes (the
    /// identity stays on the slot for logs until the slot is removed).
    /// `code` says why the session ended (`Unspecified`: the peer left).
    fn unindex(&self, st: &mut State, slot: u32, code: ErrorCode) {
        let Some(conn) = st.conns.get(slot as usize) else { return };
        let (Some(device), Some(user)) = (conn.device(), conn.user()) else { return };
        let (device_hash, user_hash) = (stable_hash(device), stable_hash(user));
        let Ok(entry) = st.devices.find_entry(device_hash, |&i| i == slot) else {
            return; // not indexed (already unindexed, or replaced)
        };
        entry.remove();
        // Hook: cluster mode releases the device's route.
        self.cluster_on_gone(slot, device, code);
        let home = home_shard(user, self.shards);
        let next = conn.next_of_user;
        let mut user_gone = false;
        match st.users.find_entry(user_hash, |&i| i == slot) {
            Ok(mut head) if next != NO_CONN => *head.get_mut() = next,
            Ok(head) => {
                head.remove();
                user_gone = true;
            }
            Err(_) => {
                // Not the head: unlink from its predecessor.
                let user = user.to_owned();
                let mut cur = st.user_head(&user).unwrap_or(NO_CONN);
                while cur != NO_CONN {
                    let n = st.conns[cur as usize].next_of_user;
                    if n == slot {
                        st.conns[cur as usize].next_of_user = next;
                        break;
                    }
                    cur = n;
                }
            }
        }
        st.conns[slot as usize].next_of_user = NO_CONN;
        st.groups.leave_all(slot);
        // Offline: nothing is resent; the timeline keeps what was not acked.
        self.forget_delivery(st, slot);
        self.publish_group_counts(st);
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        if user_gone && !st.hash_in_use(user_hash) {
            self.route(st, home, ShardMsg::UserDir { user_hash, shard: self.id, present: false, ack: None });
        }
        // Hook: this point is reached once per indexed session, so
        // subscribed backends get exactly one end event for each ONLINE.
        let key = st.key_of(slot);
        if st.conn_ref(key).is_some_and(|c| c.session.was_activated()) {
            let kind =
                if code == ErrorCode::Replaced { ConnectionEventKind::Replaced } else { ConnectionEventKind::Offline };
            self.conn_event(st, key, kind, code);
        }
    }

    fn publish_group_counts(&self, st: &State) {
        self.counters.groups.store(st.groups.group_count() as u64, Ordering::Relaxed);
        self.counters.group_sessions.store(st.groups.session_count() as u64, Ordering::Relaxed);
    }

    /// Removes the slot of `key`; returns its socket handle.
    fn remove_conn(&self, key: ConnKey) -> Option<SlotFd> {
        let mut st = self.state.borrow_mut();
        st.conn(key)?;
        self.unindex(&mut st, key.index, ErrorCode::Unspecified);
        st.upstream.forget_conn(key);
        let conn = st.conns.remove(key.index as usize);
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        Some(conn.fd)
    }

    // ---- mesh -------------------------------------------------------------

    /// Handles a message from another shard.
    pub fn on_message(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt(adoption) => self.adopt(*adoption),
            other => {
                let mut st = self.state.borrow_mut();
                self.handle(&mut st, other);
            }
        }
    }

    /// Sends `msg` to shard `to`, or handles it right here when `to` is us.
    pub(crate) fn route(&self, st: &mut State, to: ShardId, msg: ShardMsg) {
        if to == self.id { self.handle(st, msg) } else { self.outbox.send(to, msg) }
    }

    /// Reserves room for a broadcast of `frame_len` bytes in the queue of
    /// every shard, or in none: a broadcast refused by one shard must not
    /// reach the sessions of the others, so that sending it again is safe.
    /// Each shard's pacer releases its share when the job is done.
    pub(crate) fn reserve_broadcast(&self, frame_len: usize) -> Result<(), String> {
        let cost = broadcast_cost(frame_len);
        let limit = self.cfg.push.broadcast_queue_bytes;
        let shards = &self.cfg.node_counters;
        for (i, counters) in shards.iter().enumerate() {
            let queued = &counters.broadcast_queued_bytes;
            if let Err(held) =
                queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q + cost <= limit).then_some(q + cost))
            {
                for earlier in &shards[..i] {
                    earlier.broadcast_queued_bytes.fetch_sub(cost, Ordering::AcqRel);
                }
                self.counters.broadcast_rejected.fetch_add(1, Ordering::Relaxed);
                return Err(format!(
                    "broadcast queue of shard {i} is full ({held} of {limit} bytes queued \
                     (push.broadcast_queue_bytes_per_shard)); send it again later"
                ));
            }
        }
        Ok(())
    }

    /// Whether the mesh toward other shards is too backed up to read more
    /// push-port requests; if so, `waker` is woken when it has drained.
    pub(crate) fn mesh_congested(&self, waker: &Waker) -> bool {
        let congested = self.outbox.congested(waker);
        if congested {
            self.counters.mesh_backpressure.fetch_add(1, Ordering::Relaxed);
        }
        congested
    }

    /// Sends part of an answer back to the request's origin.
    pub(crate) fn answer(&self, st: &mut State, origin: Origin, part: Part) {
        if origin.shard == self.id {
            self.merge_part(st, origin.token, part);
        } else {
            self.outbox.send(origin.shard, ShardMsg::Part { token: origin.token, part });
        }
    }

    /// Every message but `Adopt` (which needs to spawn a task).
    fn handle(&self, st: &mut State, msg: ShardMsg) {
        let now = self.now();
        match msg {
            ShardMsg::Adopt(_) => {}
            ShardMsg::StoreDevices { origin, items, msg } => self.store_copies(st, origin, items, msg),
            ShardMsg::DeliveryStatus { origin, ids } => self.status_part(st, origin, ids),
            ShardMsg::Users { origin, items, action: UserAction::Store(msg) } => {
                let mut copies = Vec::new();
                for (idx, user) in items {
                    let before = copies.len();
                    for slot in st.user_slots(&user) {
                        let Some(device) = slot_device(&st.conns, slot).map(str::to_owned) else { continue };
                        let message_id = self.next_message_id(st);
                        copies.push((idx, device, message_id));
                    }
                    if copies.len() == before {
                        // No session left here: answered with no copy.
                        copies.push((idx, String::new(), 0));
                    }
                }
                self.store_copies(st, origin, copies, msg);
            }
            ShardMsg::Devices { origin, items, frame } => {
                let reached = items
                    .iter()
                    .map(|(idx, device)| {
                        let slot = st.device_slot(device);
                        (*idx, u32::from(slot.is_some_and(|slot| self.deliver(st, slot, &frame))))
                    })
                    .collect();
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::UserLookup { origin, items, action } => {
                let mut per_shard: Vec<Vec<(u32, String)>> = vec![Vec::new(); usize::from(self.shards)];
                let mut targets = Vec::with_capacity(items.len());
                for (idx, user) in items {
                    let mut holders = 0;
                    for shard in st.user_dir.shards(stable_hash(&user), self.shards) {
                        if let Some(batch) = per_shard.get_mut(shard.index()) {
                            batch.push((idx, user.clone()));
                            holders += 1;
                        }
                    }
                    targets.push((idx, holders));
                }
                let parts = per_shard.iter().filter(|b| !b.is_empty()).count() as u32;
                self.answer(st, origin, Part::Expect { parts, targets });
                for (shard, items) in per_shard.into_iter().enumerate() {
                    if !items.is_empty() {
                        let msg = ShardMsg::Users { origin, items, action: action.clone() };
                        self.route(st, ShardId(shard as u16), msg);
                    }
                }
            }
            ShardMsg::Users { origin, items, action } => {
                let mut reached = Vec::new();
                for (idx, user) in items {
                    let mut n = 0;
                    for slot in st.user_slots(&user) {
                        let ok = match &action {
                            UserAction::Deliver(frame) => self.deliver(st, slot, frame),
                            UserAction::Kick { code, reason } => {
                                let key = st.key_of(slot);
                                self.kick(st, key, now, *code, reason.clone());
                                true
                            }
                            // Handled above; nothing reaches here.
                            UserAction::Store(_) => false,
                        };
                        n += u32::from(ok);
                    }
                    reached.push((idx, n));
                }
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::Group { origin, group, frame } => {
                // A shard-local copy: the refcount of a shared buffer would
                // bounce between cores on every member.
                let frame = if origin.shard == self.id { frame } else { Bytes::copy_from_slice(&frame) };
                let members: Vec<u32> = st.groups.members(&group).collect();
                let reached = if members.len() <= INLINE_FANOUT && st.flush.is_empty() {
                    members.into_iter().filter(|&slot| self.deliver(st, slot, &frame)).count()
                } else {
                    let n = members.into_iter().filter(|&slot| self.deliver_batched(st, slot, &frame)).count();
                    self.kick_flusher(st);
                    n
                };
                self.answer(st, origin, Part::Count(reached as u64));
            }
            ShardMsg::Broadcast { origin, frame, expires_at } => {
                let frame = if origin.shard == self.id { frame } else { Bytes::copy_from_slice(&frame) };
                let targeted = st.conns.iter().filter(|(_, c)| c.is_active()).count();
                st.broadcasts.push_back(BroadcastJob { frame, cursor: 0, expires_at });
                self.answer(st, origin, Part::Count(targeted as u64));
                if !self.pacing.get() {
                    let _ = self.pacer_wake.try_send(());
                }
            }
            ShardMsg::GroupUpdate { origin, group, items, add } => {
                let limit = self.cfg.max_groups_per_session as usize;
                let mut reached = Vec::new();
                for (idx, device) in items {
                    let ok = st.device_slot(&device).is_some_and(|slot| {
                        if add { st.groups.join(slot, &group, limit).is_ok() } else { st.groups.leave(slot, &group) }
                    });
                    reached.push((idx, u32::from(ok)));
                }
                self.publish_group_counts(st);
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::KickDevices { origin, items, code, reason } => {
                let mut reached = Vec::new();
                for (idx, device) in items {
                    let slot = st.device_slot(&device);
                    if let Some(slot) = slot {
                        let key = st.key_of(slot);
                        self.kick(st, key, now, code, reason.clone());
                    }
                    reached.push((idx, u32::from(slot.is_some())));
                }
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::Presence { origin, query } => {
                let part = self.presence(st, &query);
                self.answer(st, origin, Part::Presence(Box::new(part)));
            }
            ShardMsg::UserDir { user_hash, shard, present, ack } => {
                st.user_dir.set(user_hash, shard, present);
                if let Some(key) = ack {
                    self.route(st, shard, ShardMsg::UserDirAck { key });
                }
            }
            ShardMsg::UserDirAck { key } => {
                let login = st.conn(key).and_then(|c| c.io.as_mut()).and_then(|io| io.awaiting_dir.take());
                // A session kicked or closed meanwhile has nothing to activate.
                if let Some(login) = login
                    && st.conn(key).is_some_and(|c| c.session.phase() == Phase::Authenticated)
                {
                    self.activate(st, key, now, &login);
                    self.resume_input(st, key);
                }
            }
            ShardMsg::Part { token, part } => self.merge_part(st, token, part),
        }
    }

    /// Merges part of an answer into a pending request; replies when whole.
    pub(crate) fn merge_part(&self, st: &mut State, token: u64, part: Part) {
        let Some(pending) = st.pending.get_mut(&token) else {
            // Answered at its deadline already.
            self.counters.push_late_answers.fetch_add(1, Ordering::Relaxed);
            return;
        };
        pending.merge(part);
        self.finish_if_done(st, token);
    }

    pub(crate) fn finish_if_done(&self, st: &mut State, token: u64) {
        if !st.pending.get(&token).is_some_and(Pending::is_done) {
            return;
        }
        let Some(pending) = st.pending.remove(&token) else { return };
        let (backend, frame) = pending.finish();
        // Hook: the local part of a cluster request goes to its merge.
        let Some(frame) = self.cluster_local_reply(backend, frame) else { return };
        crate::push::reply(st, backend, frame.to_bytes());
    }

    fn presence(&self, st: &mut State, query: &PresenceQuery) -> PresencePart {
        let describe = |conn: &Conn, slot: u32, generation: u32| proto::DevicePresence {
            device: conn.device().unwrap_or_default().to_owned(),
            online: true,
            shard: u32::from(self.id.0),
            connected_at_ms: u64::from(conn.connected_at) * 1000,
            client_version: conn.field(4).unwrap_or_default().to_owned(),
            platform: conn.field(3).unwrap_or_default().to_owned(),
            user: conn.user().unwrap_or_default().to_owned(),
            conn_id: ConnId::new(self.id, ConnKey { index: slot, generation }).0,
        };
        let mut part = PresencePart {
            shard: self.id,
            connections: st.conns.iter().filter(|(_, c)| c.is_active()).count() as u64,
            ..Default::default()
        };
        for (i, device) in query.devices.iter().enumerate() {
            if let Some(slot) = st.device_slot(device) {
                let conn = &st.conns[slot as usize];
                part.devices.push((i as u32, describe(conn, slot, conn.generation)));
            }
        }
        for (i, user) in query.users.iter().enumerate() {
            let sessions: Vec<_> = st
                .user_slots(user)
                .into_iter()
                .map(|slot| {
                    let conn = &st.conns[slot as usize];
                    describe(conn, slot, conn.generation)
                })
                .collect();
            if !sessions.is_empty() {
                part.users.push((i as u32, sessions));
            }
        }
        for (i, group) in query.groups.iter().enumerate() {
            part.groups.push((i as u32, st.groups.count(group) as u64));
        }
        part
    }

    /// Allocates a message id, unique across shards, restarts and (with
    /// distinct `delivery.node_index`) nodes.
    pub(crate) fn next_message_id(&self, st: &mut State) -> u64 {
        let unix_ms = self.now().unix_ms.max(0) as u64;
        st.message_ids.next(unix_ms)
    }

    fn adopt(self: &Rc<Self>, adoption: Adoption) {
        let Adoption { fd, session, login, leftover } = adoption;
        if self.stopping.get() {
            return; // dropping the fd closes it; the client reconnects
        }
        // The sending shard closed its own copy.
        let (socket, slot_fd) = Socket::adopt(fd);
        self.counters.adopted.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            let key = insert_conn(&mut st, session, slot_fd, now, login.capabilities);
            self.register(&mut st, key, now, &login);
            key
        };
        // Frames that arrived right behind Auth on the old shard; their
        // answers wait in the queue for the task's first poll.
        if !leftover.is_empty() {
            self.on_bytes(key, &leftover);
        }
        glommio::spawn_local(ConnTask { shard: self.clone(), key, socket: Some(socket) }).detach();
    }

    // ---- broadcast pacing ---------------------------------------------------

    /// Delivers queued broadcasts at this shard's share of the node rate;
    /// sleeps while none is queued.
    pub async fn pacer_loop(self: Rc<Self>) {
        let Some(wake) = self.pacer_rx.borrow_mut().take() else { return };
        while wake.recv().await.is_some() {
            self.pacing.set(true);
            self.pace_broadcasts().await;
            self.pacing.set(false);
        }
    }

    async fn pace_broadcasts(&self) {
        let rate = f64::from(self.cfg.push.broadcast_rate_per_sec.max(1));
        let mut last = Instant::now();
        let mut budget = 1.0f64;
        loop {
            let now = Instant::now();
            // Bank at most two ticks' worth: a timer that fires late (the
            // sleep below overshoots by up to a tick under load) is made up
            // for, but a longer stall does not turn into a burst. With one
            // tick's cap the node reached 63-89 % of its configured rate.
            budget = (budget + now.duration_since(last).as_secs_f64() * rate)
                .min(2.0 * rate * PACER_TICK.as_secs_f64() + 1.0);
            last = now;
            let done = {
                let mut st = self.state.borrow_mut();
                self.pace_step(&mut st, &mut budget)
            };
            if done {
                break;
            }
            glommio::timer::sleep(PACER_TICK).await;
        }
    }

    /// Spends `budget` deliveries on queued broadcasts; true when none is left.
    fn pace_step(&self, st: &mut State, budget: &mut f64) -> bool {
        let now = Instant::now();
        while *budget >= 1.0 {
            let Some(mut job) = st.broadcasts.pop_front() else { return true };
            if job.expires_at.is_some_and(|t| now >= t) {
                let left = st.conns.iter().filter(|(i, c)| *i >= job.cursor && c.is_active()).count();
                self.counters.broadcast_expired.fetch_add(left as u64, Ordering::Relaxed);
                self.release_broadcast(&job);
                continue;
            }
            let end = st.conns.capacity();
            while job.cursor < end && *budget >= 1.0 {
                let slot = job.cursor as u32;
                job.cursor += 1;
                if st.conns.get(slot as usize).is_some_and(Conn::is_active) && self.deliver(st, slot, &job.frame) {
                    *budget -= 1.0;
                }
            }
            if job.cursor < end {
                st.broadcasts.push_front(job);
            } else {
                self.release_broadcast(&job);
            }
        }
        st.broadcasts.is_empty()
    }

    /// Gives back the room [`Shard::reserve_broadcast`] took on this shard.
    fn release_broadcast(&self, job: &BroadcastJob) {
        self.counters.broadcast_queued_bytes.fetch_sub(broadcast_cost(job.frame.len()), Ordering::AcqRel);
    }

    // ---- timers and shutdown -------------------------------------------------

    /// Drives every deadline of the shard; returns after shutdown completes.
    pub async fn timer_loop(self: Rc<Self>, stop: Arc<AtomicBool>, shutdown_grace: Duration) {
        let tick = Duration::from_millis(self.cfg.wheel_tick_ms);
        let mut due = Vec::new();
        let mut shutdown_deadline: Option<Instant> = None;
        let liveness = &self.counters.liveness;
        loop {
            liveness.waiting_until(Instant::now() + tick);
            glommio::timer::sleep(tick).await;
            liveness.turned(Instant::now());
            if shutdown_deadline.is_none() && stop.load(Ordering::Relaxed) {
                self.begin_shutdown();
                shutdown_deadline = Some(Instant::now() + shutdown_grace);
            }
            // Push-port requests past their deadline are answered now.
            self.expire_requests();
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
            if let Some(deadline) = shutdown_deadline
                && (self.state.borrow().conns.is_empty() || Instant::now() >= deadline)
            {
                break;
            }
        }
    }

    fn sweep(&self, keys: &[ConnKey]) {
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
                conn.session.handle_timeout(now, &self.cfg.params, &mut actions);
                conn.wake();
                self.apply(&mut st, key, now, &mut actions);
            }
            // Resends due for the device's window, if it has one.
            let resend_at = self.retransmit(&mut st, key, now);
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
    fn begin_shutdown(&self) {
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
                conn.session.close(now, ErrorCode::Shutdown, String::new(), &self.cfg.params, &mut actions);
            }
            self.apply(&mut st, key, now, &mut actions);
        }
        for (_, backend) in st.backends.iter_mut() {
            backend.close();
        }
        st.upstream.stop();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }
}

/// Header-only Pong, shared by every session.
static PONG: [u8; codec::HEADER_LEN] = [codec::MAGIC, codec::VERSION, FrameKind::Pong as u8, 0, 0, 0, 0, 0];

fn insert_conn(st: &mut State, session: Session, fd: SlotFd, now: Now, capabilities: u32) -> ConnKey {
    st.next_gen = st.next_gen.wrapping_add(1);
    let generation = st.next_gen;
    let deadline = session.deadline();
    let index = st.conns.insert(Conn {
        session,
        waker: None,
        ident: None,
        io: None,
        generation,
        next_of_user: NO_CONN,
        fd,
        connected_at: u32::try_from(now.unix_secs()).unwrap_or(0),
        lens: [0; 4],
        capabilities: capabilities as u8,
        write_shut: false,
    }) as u32;
    let key = ConnKey { index, generation };
    st.wheel.insert(key, deadline);
    key
}

fn take_handoff(conn: &mut Conn) -> Option<(ShardId, Box<Transit>)> {
    let io = conn.io.as_mut()?;
    let (owner, login) = io.handoff.take()?;
    let leftover = std::mem::take(&mut io.partial);
    Some((owner, Box::new(Transit { session: conn.session, login: *login, leftover })))
}

/// Token bucket capping accepts per second on one shard.
struct AcceptBucket {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl AcceptBucket {
    fn new(rate: u32) -> AcceptBucket {
        AcceptBucket { rate, tokens: f64::from(rate), last: Instant::now() }
    }

    /// Takes one token; returns how long to wait when the bucket is empty.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::limits::MAX_ID_BYTES;

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
        };
        conn.set_ident(&login);
        let fields: Vec<_> = (0..5).map(|i| conn.field(i).unwrap()).collect();
        assert_eq!(fields, ["alice", "phone-1", "chat", "ios", "2.0.1"]);
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
