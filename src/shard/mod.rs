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
//! Here: the `Shard` (what one executor holds besides its state), its
//! construction and its loops (timers, reload, shutdown, pacer, flusher,
//! drain, upgrade commands, the mesh's sending side). The state (the
//! session slab, `Conn`, the indexes) is in `state`. `impl Shard` is here
//! and in `driver` only: what runs outside a borrow of the state (tasks,
//! loops). What runs inside one borrow is `ShardCtx`'s (`hosts`: the
//! shard's surroundings and `&mut State`), by feature:
//! - `driver`: accepting, the connection task, hand-off, adoption and the
//!   sessions an upgrade hands over; `links` has its WebSocket/TLS helpers;
//! - `actions`: a session's frames and the actions it asks for (`apply`);
//! - `output`: queueing, direct sends, batched deliveries;
//! - `index`: registering authenticated sessions (device, user, directory);
//! - `inbox`: what messages from other shards ask (`handle`), replies merged;
//! - `upgrade`: freeze and resume for an in-place upgrade;
//! - `fanout`: the broadcast queue's pacing (`State`);
//! - `drain`: the drain component (who gets GoAway in each tick);

mod drain;
mod driver;
pub use drain::DrainPacer;
pub(crate) use drain::ShardDrain;
mod fanout;
mod hosts;
mod hosts_features;
use hosts::ShardCtx;
mod actions;
mod inbox;
mod index;
mod links;
mod output;
mod state;
use state::{BroadcastJob, Conn, UserDir, slot_device, slot_user};
pub(crate) use state::{State, broadcast_cost};
mod upgrade;
pub(crate) use upgrade::ShardUpgrade;
use upgrade::{QUIESCE_POLL, QUIESCE_SLACK};

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
pub use crate::push::PushLimits;
use crate::push::PushPort;
use crate::rate::TokenBucket;
use crate::session::{Action, Login, Phase, Session};
use crate::upgrade::{Command, Report, ShardLink};
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

impl ShardCounters {
    /// One frame of `bytes` sent to a client (written or queued).
    pub(crate) fn count_out(&self, bytes: usize) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }
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
                port: PushPort::default(),
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

    /// Allocates a message id, unique across shards, restarts and (with
    /// distinct `delivery.node_index`) nodes.
    pub(crate) fn next_message_id(&self, st: &mut State) -> u64 {
        let unix_ms = self.now().unix_ms.max(0) as u64;
        st.message_ids.next(unix_ms)
    }

    // ---- reload ------------------------------------------------------------

    /// The shard's current copy of the reloadable settings.
    pub(crate) fn live(&self) -> Rc<crate::reload::LiveSettings> {
        self.live.borrow().clone()
    }

    /// Takes new settings from the hub, if a reload published some (the
    /// timer loop calls it every tick).
    pub(crate) fn poll_reload(&self) {
        let Some((generation, live)) = self.cfg.reload.poll(self.live_generation.get()) else { return };
        let added = self.state.borrow_mut().upstream.apply_live(&live.upstream);
        if let Some(me) = self.me.upgrade() {
            for idx in added {
                glommio::spawn_local(crate::upstream::run_link(Rc::clone(&me), idx, None)).detach();
            }
        }
        *self.live.borrow_mut() = Rc::new(live);
        self.live_generation.set(generation);
        self.cfg.reload.mark_applied(self.id.index(), generation);
    }

    // ---- the shard loop: timers and shutdown --------------------------------

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
                self.ctx(&mut st).close_slow(key, dropped, reason);
            } else if conn.session.deadline() <= now.mono {
                conn.session.handle_timeout(now, &self.live().params, &mut actions);
                conn.wake();
                self.ctx(&mut st).apply(key, now, &mut actions);
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
            self.ctx(&mut st).apply(key, now, &mut actions);
        }
        st.port.close_all();
        st.upstream.stop();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    // ---- broadcast pacing and drain: the components' drivers ----------------

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

    pub(super) async fn pace_broadcasts(&self) {
        let rate = f64::from(self.live().push.broadcast_rate_per_sec.max(1));
        let mut budget = TokenBucket::new(1.0, self.now().mono);
        loop {
            // Bank at most two ticks' worth: a timer that fires late (the
            // sleep below overshoots by up to a tick under load) is made up
            // for, but a longer stall does not turn into a burst. With one
            // tick's cap the node reached 63-89 % of its configured rate.
            budget.refill(self.now().mono, rate, 2.0 * rate * PACER_TICK.as_secs_f64() + 1.0);
            let done = {
                let mut st = self.state.borrow_mut();
                st.pace_step(&mut budget, Instant::now(), &self.counters, |st, slot, frame| {
                    self.ctx(st).deliver(slot, frame)
                })
            };
            if done {
                break;
            }
            glommio::timer::sleep(PACER_TICK).await;
        }
    }

    /// One tick of a drain: stop accepting once, then GoAway + close the
    /// sessions the drain component picks for this tick ([`ShardDrain::tick`]).
    /// `endpoint` names where a user should reconnect ("" lets the client
    /// pick, e.g. through a load balancer). Returns how many sessions were
    /// sent away.
    pub(crate) fn drain_step(&self, drain: &ShardDrain, tick: Duration, endpoint: impl Fn(&str) -> String) -> u32 {
        let mut st = self.state.borrow_mut();
        let batch = drain.tick(tick, || st.active_keys(), |key| st.user_of(key).map(str::to_owned));
        if batch.stop_accepting {
            info!(shard = %self.id, sessions = batch.queued, "draining: stop accepting, sending GoAway");
            self.stop_accepting.close();
        }
        let now = self.now();
        for (key, user) in &batch.goaway {
            let frame = Frame::GoAway(proto::GoAway { endpoint: endpoint(user), reason: "node draining".into() });
            let mut ctx = self.ctx(&mut st);
            ctx.send_to_slot(key.index, &frame.to_bytes());
            ctx.close_conn(*key, now, ErrorCode::GoingAway, "node draining; reconnect elsewhere".into());
        }
        batch.goaway.len() as u32
    }

    /// Single node: waits for `drain`, then sends every session away at
    /// the drain's rate until the node stops.
    pub async fn single_drain_loop(self: Rc<Self>, drain: Arc<AtomicBool>, rate_per_shard: f64) {
        let pacing = ShardDrain::new(rate_per_shard);
        while !self.is_stopping() {
            if drain.load(Ordering::Relaxed) {
                self.drain_step(&pacing, drain::DRAIN_TICK, |_| String::new());
            }
            glommio::timer::sleep(drain::DRAIN_TICK).await;
        }
    }

    // ---- the fan-out flusher -----------------------------------------------

    /// Starts the flusher task if sessions wait in the flush list.
    pub(super) fn kick_flusher(&self, st: &State) {
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
                    self.ctx(&mut st).flush_responses(&chunk);
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

    // ---- in-place upgrade: the coordinator's commands ([`crate::upgrade`]) ---

    /// Carries out the coordinator's commands until the node stops.
    pub(crate) async fn upgrade_loop(self: Rc<Self>, link: ShardLink) {
        let ShardLink { mut commands, reports } = link;
        while let Some(command) = futures_lite::StreamExt::next(&mut commands).await {
            let shard = self.id.0;
            let report = match command {
                Command::Quiesce => Report::Quiesced { pending_left: self.quiesce_upgrade().await },
                Command::Freeze => {
                    let (image, fds) = self.ctx(&mut self.state.borrow_mut()).freeze();
                    Report::Frozen { shard, image, fds }
                }
                Command::Resume => {
                    self.ctx(&mut self.state.borrow_mut()).resume();
                    Report::Resumed
                }
            };
            if reports.send(report).is_err() {
                return;
            }
        }
    }

    /// Quiesce (see `upgrade`'s module doc). Returns the push requests
    /// still unanswered when the wait ended.
    async fn quiesce_upgrade(&self) -> usize {
        self.upgrade.set_paused(true);
        let limit = Duration::from_millis(self.live().push.reply_timeout_ms) + QUIESCE_SLACK;
        let deadline = Instant::now() + limit;
        while self.state.borrow().port.in_flight() > 0 && Instant::now() < deadline {
            glommio::timer::sleep(QUIESCE_POLL).await;
        }
        let mut st = self.state.borrow_mut();
        let bye = Frame::Error(codes::error_body(ErrorCode::GoingAway, "node upgrading; reconnect")).to_bytes();
        st.port.close_all_with(bye);
        st.port.in_flight()
    }

    // ---- the mesh: sending to other shards, and what they send ---------------

    /// Handles a message from another shard.
    pub fn on_message(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt(adoption) => self.adopt(*adoption),
            other => {
                let mut st = self.state.borrow_mut();
                self.ctx(&mut st).handle(other);
            }
        }
    }

    /// Sends `msg` to shard `to`, or handles it right here when `to` is us.
    pub(crate) fn route(&self, st: &mut State, to: ShardId, msg: ShardMsg) {
        if to == self.id { self.ctx(st).handle(msg) } else { self.outbox.send(to, msg) }
    }

    /// Reserves room for a broadcast of `frame_len` bytes in the queue of
    /// every shard, or in none: a broadcast refused by one shard must not
    /// reach the sessions of the others, so that sending it again is safe.
    /// Each shard's pacer releases its share when the job is done.
    pub(crate) fn reserve_broadcast(&self, frame_len: usize) -> Result<(), String> {
        let cost = broadcast_cost(frame_len);
        let limit = self.live().push.broadcast_queue_bytes;
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
            crate::push::merge_part(&mut self.ctx(st), origin.token, part);
        } else {
            self.outbox.send(origin.shard, ShardMsg::Part { token: origin.token, part });
        }
    }

    // ---- contexts for the feature components -------------------------------

    /// The context for a component call on `st`.
    pub(crate) fn ctx<'a>(&'a self, st: &'a mut State) -> ShardCtx<'a> {
        ShardCtx { shard: self, st }
    }

    /// Runs a sidecar call (Redis); `then` gets its output and the shard
    /// state: inline when the future is ready at once, else from a task
    /// once it resolves (never holding a state borrow across the await).
    pub(crate) fn after_store<T: 'static>(
        &self,
        st: &mut State,
        fut: impl std::future::Future<Output = T> + 'static,
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
}
