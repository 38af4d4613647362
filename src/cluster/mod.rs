//! Cluster mode on a shard: several nodes share one Redis and act as one
//! gateway.
//!
//! - Routes: a session claims its device in the router ([`crate::router`])
//!   when it becomes active and releases it when it ends; each claim takes a
//!   new epoch, so the newest login wins and a stale node can neither
//!   overwrite nor delete a newer route. A login that replaced a session on
//!   another node kicks it there (REPLACED). Claims that failed (Redis down)
//!   are retried, and every route is re-asserted after a re-registration.
//! - Pushes: a request from a backend (not one forwarded by another node)
//!   is answered by the cluster. Device targets are looked up in the router:
//!   those held by another live node are forwarded to that node's push port
//!   (one pipelined connection per shard and peer, `forwarded` set so the
//!   receiver does not forward again); the rest are handled here. User,
//!   group and broadcast pushes, group updates, kicks and presence queries
//!   go to every live node. The parts are merged into one reply. Shards never wait on Redis:
//!   the router is a sidecar thread answering through futures.
//! - Failures: a device whose node cannot be reached gets an at-least-once
//!   copy stored in the shared timeline (it resumes from there) or, at most
//!   once, REJECTED with `retryable` set; when the router itself is down,
//!   targets not found on this node are REJECTED, retryable. Every request
//!   is answered by `push.reply_timeout_ms` with what came in by then:
//!   targets of a node (or the router) that did not answer are REJECTED,
//!   retryable.
//! - Drain (SIGTERM, `POST /drain`, or a lapsed lease): the node leaves the
//!   dispatcher's list, stops accepting, and sends each client `GoAway` with
//!   another node's endpoint at a bounded rate, then closes it with
//!   GOING_AWAY; unacknowledged messages are already in the timeline.

pub mod metrics;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_channel::oneshot;
use glommio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::conn::OutQueue;
use crate::protocol::codec::{self, Frame};
use crate::protocol::ids::{ConnId, ConnKey};
use crate::protocol::proto::{self, ErrorCode, PushStatus};
use crate::push::{Alarm, Expiry};
use crate::router::{NodeInfo, Route, Router, RouterConfig, rank};
use crate::session::Login;
use crate::shard::{Shard, State};
pub use metrics::{AtomicHistogram, ClusterCounters, DISCONNECT_CODES, HIST_BOUNDS_US, PUSH_RESULTS};

/// The slot index of the pseudo backend that collects the local part of a
/// cluster request (no real backend slot gets near it).
const LOCAL_PART: u32 = u32::MAX;
/// How often each shard's cluster task runs.
const TICK: Duration = Duration::from_millis(100);
/// The shard's copy of the node table is refreshed every this many ticks.
const NODES_EVERY: u32 = 5;
/// Failed claims are retried every this many ticks, this many at a time.
const RETRY_EVERY: u32 = 10;
const RETRY_BATCH: usize = 1024;
/// Cluster-wide requests use a node table at most this old.
const FRESH_NODES: Duration = Duration::from_millis(50);
/// Bytes queued to one peer before further forwards fail fast.
const PEER_QUEUE_BYTES: usize = 64 << 20;
/// Largest reply accepted from a peer.
const PEER_MAX_FRAME: u32 = 64 << 20;

/// The node's cluster state shared by every shard and the sidecars.
pub struct ClusterShared {
    pub router: Router,
    pub node: String,
    pub incarnation: u64,
    pub client_endpoint: String,
    pub node_endpoint: String,
    pub counters: ClusterCounters,
    /// A drain was asked for (SIGTERM, /drain).
    drain: AtomicBool,
    /// Bumped by the router sidecar after each re-registration: shards
    /// re-assert their routes.
    reregistered: Arc<AtomicU64>,
    pub forward_timeout: Duration,
    pub drain_deadline: Duration,
    /// Routes are re-asserted every half of this (their keys expire after it).
    route_ttl: Duration,
    /// GoAway frames per second per shard.
    drain_rate_per_shard: f64,
}

impl ClusterShared {
    /// Starts the router sidecar (registration, lease, routes).
    pub fn start(
        config: &Config,
        client_addr: std::net::SocketAddr,
        push_addr: std::net::SocketAddr,
        shards: u16,
    ) -> std::io::Result<Arc<ClusterShared>> {
        let c = &config.cluster;
        // A wildcard bind advertises the address this host reaches Redis
        // from: the other nodes share that network.
        let advertised_ip = reachable_ip(&config.delivery.redis_url);
        let endpoint = |configured: &str, bound: std::net::SocketAddr| {
            if !configured.is_empty() {
                return configured.to_owned();
            }
            let mut addr = bound;
            if addr.ip().is_unspecified() {
                addr.set_ip(advertised_ip);
            }
            addr.to_string()
        };
        let client_endpoint = endpoint(&c.client_endpoint, client_addr);
        let node_endpoint = endpoint(&c.node_endpoint, push_addr);
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Later runs of a node have larger incarnations (start time in the
        // high bits), so a router that meets a newer one than it knows
        // refreshes its node table; the low bits tell apart runs started in
        // the same millisecond.
        let started_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let incarnation = (started_ms << 16 | u64::from_le_bytes(seed) & 0xffff) & (u64::MAX >> 1);
        let node = config.node_name_bound(client_addr.port());
        let reregistered = Arc::new(AtomicU64::new(0));
        let bump = reregistered.clone();
        let timeout = Duration::from_millis(config.delivery.redis_timeout_ms);
        let router = Router::start(
            RouterConfig {
                url: config.delivery.redis_url.clone(),
                prefix: config.delivery.redis_prefix.clone(),
                node: node.clone(),
                incarnation,
                lease: Duration::from_millis(c.lease_ms),
                client_endpoint: client_endpoint.clone(),
                node_endpoint: node_endpoint.clone(),
                route_ttl: Duration::from_secs(c.route_ttl_secs),
                connect_timeout: timeout,
                io_timeout: timeout,
            },
            Box::new(move || {
                bump.fetch_add(1, Ordering::Relaxed);
            }),
        )?;
        Ok(Arc::new(ClusterShared {
            router,
            node,
            incarnation,
            client_endpoint,
            node_endpoint,
            counters: ClusterCounters::default(),
            drain: AtomicBool::new(false),
            reregistered,
            forward_timeout: Duration::from_millis(c.forward_timeout_ms),
            drain_deadline: Duration::from_millis(c.drain_deadline_ms),
            route_ttl: Duration::from_secs(c.route_ttl_secs),
            drain_rate_per_shard: f64::from(c.drain_rate_per_sec) / f64::from(shards.max(1)),
        }))
    }

    /// Asks the node to drain (idempotent).
    pub fn request_drain(&self) {
        if !self.drain.swap(true, Ordering::Relaxed) {
            info!(node = %self.node, "drain requested");
        }
    }

    /// Draining: asked to, or fenced because the lease lapsed.
    pub fn is_draining(&self) -> bool {
        self.drain.load(Ordering::Relaxed) || self.router.state().is_fenced()
    }

    fn count_disconnect(&self, code: ErrorCode) {
        let i = DISCONNECT_CODES.iter().position(|&c| c == code).unwrap_or(DISCONNECT_CODES.len());
        self.counters.disconnects[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// The local IP address this host uses to reach `redis_url`'s host (a UDP
/// connect sends nothing); loopback when that cannot be told.
fn reachable_ip(redis_url: &str) -> std::net::IpAddr {
    let loopback = std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST);
    let Ok(client) = redis::Client::open(redis_url) else { return loopback };
    let redis::ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr() else { return loopback };
    let target = (host.as_str(), *port);
    let Ok(Some(remote)) = std::net::ToSocketAddrs::to_socket_addrs(&target).map(|mut a| a.next()) else {
        return loopback;
    };
    let local = if remote.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    std::net::UdpSocket::bind(local)
        .and_then(|s| s.connect(remote).and_then(|()| s.local_addr()))
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(loopback)
}

/// Runs the drain when asked: announce it, wait until every session left
/// (or the deadline), leave the registry, then stop the node. Returns when
/// the node is told to stop (by this or by `stop` being set elsewhere).
pub fn spawn_drain_coordinator(
    shared: Arc<ClusterShared>,
    active: Vec<Arc<crate::shard::ShardCounters>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("longlink-drain".into()).spawn(move || {
        while !shared.is_draining() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = Instant::now();
        if let Err(e) = futures_lite::future::block_on(shared.router.announce_draining()) {
            warn!(error = %e, "could not mark the node as draining in the registry");
        }
        let sessions = || active.iter().map(|c| c.active.load(Ordering::Relaxed)).sum::<u64>();
        info!(node = %shared.node, sessions = sessions(), deadline_ms = shared.drain_deadline.as_millis() as u64, "draining");
        while sessions() > 0 && started.elapsed() < shared.drain_deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = sessions();
        // Releases queued by the closing sessions run before this (the
        // sidecar keeps order).
        if let Err(e) = futures_lite::future::block_on(shared.router.deregister()) {
            warn!(error = %e, "could not leave the registry; the lease will expire");
        }
        info!(node = %shared.node, left, elapsed_ms = started.elapsed().as_millis() as u64, "drain finished; stopping");
        stop.store(true, Ordering::Relaxed);
    })?;
    Ok(())
}

/// A session's claim on its device's route.
#[derive(Clone, Copy, Debug)]
enum Claim {
    Pending,
    Held(u64),
    Failed,
}

/// One shard's cluster state.
pub(crate) struct Local {
    shared: Arc<ClusterShared>,
    /// Claims of this shard's active sessions, by slot (with the slot's
    /// generation).
    routes: RefCell<HashMap<u32, (u32, Claim)>>,
    /// Live nodes as of the last refresh.
    nodes: RefCell<Vec<NodeInfo>>,
    peers: RefCell<HashMap<String, Rc<PeerLink>>>,
    /// Local parts of cluster requests waiting for their reply.
    merges: RefCell<HashMap<u32, oneshot::Sender<Frame>>>,
    next_merge: Cell<u32>,
    reregistered_seen: Cell<u64>,
    /// Sessions still to send GoAway to (set once the drain starts).
    drain_queue: RefCell<Option<VecDeque<ConnKey>>>,
    /// GoAway frames this shard may send now (grows with the drain rate).
    drain_budget: Cell<f64>,
}

/// Joins a shard to the cluster and starts its cluster task.
pub fn attach(shard: &Rc<Shard>, shared: Arc<ClusterShared>) {
    let local = Local {
        reregistered_seen: Cell::new(shared.reregistered.load(Ordering::Relaxed)),
        shared,
        routes: RefCell::default(),
        nodes: RefCell::default(),
        peers: RefCell::default(),
        merges: RefCell::default(),
        next_merge: Cell::new(0),
        drain_queue: RefCell::new(None),
        drain_budget: Cell::new(0.0),
    };
    if shard.cluster.set(Rc::new(local)).is_err() {
        warn!(shard = %shard.id(), "shard already joined the cluster");
        return;
    }
    glommio::spawn_local(Rc::clone(shard).cluster_loop()).detach();
}

/// The cluster state of a shard, when the node runs in cluster mode.
pub(crate) type Slot = OnceCell<Rc<Local>>;

impl Shard {
    fn local(&self) -> Option<Rc<Local>> {
        self.cluster.get().cloned()
    }

    // ---- routes ---------------------------------------------------------

    /// Hook: session `key` became active: claim its device's route.
    pub(crate) fn cluster_on_active(&self, st: &mut State, key: ConnKey, login: &Login) {
        let Some(local) = self.local() else { return };
        local.routes.borrow_mut().insert(key.index, (key.generation, Claim::Pending));
        self.claim(st, &local, key, login.device.clone());
    }

    fn claim(&self, st: &mut State, local: &Rc<Local>, key: ConnKey, device: String) {
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
                    debug!(error = %err, %device, "route claim failed; retrying later");
                    if let Some(entry) = entry {
                        entry.1 = Claim::Failed;
                    }
                }
            }
        });
    }

    /// The device logged in here while a session of it lived on another
    /// node: end that one as REPLACED.
    fn kick_remote(&self, local: &Rc<Local>, previous: Route, device: String) {
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
    fn reassert_routes(&self, local: &Rc<Local>, all: bool) {
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
                                this.close_conn(st, key, this.now(), ErrorCode::Replaced, reason);
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

    // ---- the shard's cluster task ----------------------------------------

    async fn cluster_loop(self: Rc<Self>) {
        let Some(local) = self.local() else { return };
        let mut tick = 0u32;
        let mut reasserted = Instant::now();
        while !self.is_stopping() {
            if tick.is_multiple_of(NODES_EVERY) {
                self.refresh_nodes(&local).await;
            }
            let rereg = local.shared.reregistered.load(Ordering::Relaxed);
            if rereg != local.reregistered_seen.get() {
                local.reregistered_seen.set(rereg);
                info!(shard = %self.id, "re-registered: re-asserting routes");
                self.reassert_routes(&local, true);
                reasserted = Instant::now();
            } else if reasserted.elapsed() >= local.shared.route_ttl / 2 {
                // Route keys expire (so devices that never return are
                // forgotten): those of long sessions are written again.
                self.reassert_routes(&local, true);
                reasserted = Instant::now();
            } else if tick.is_multiple_of(RETRY_EVERY) {
                self.reassert_routes(&local, false);
            }
            if local.shared.is_draining() {
                self.drain_step(&local);
            }
            tick = tick.wrapping_add(1);
            glommio::timer::sleep(TICK).await;
        }
    }

    async fn refresh_nodes(&self, local: &Rc<Local>) {
        match local.shared.router.nodes().await {
            Ok(nodes) => *local.nodes.borrow_mut() = nodes,
            Err(err) => debug!(shard = %self.id, %err, "node table not refreshed"),
        }
    }

    /// One tick of the drain: stop accepting once, then GoAway + close the
    /// next sessions within this tick's share of the drain rate.
    fn drain_step(&self, local: &Rc<Local>) {
        let mut queue = local.drain_queue.borrow_mut();
        let mut st = self.state.borrow_mut();
        if queue.is_none() {
            info!(shard = %self.id, sessions = st.active_keys().len(), "draining: stop accepting, sending GoAway");
            self.stop_accepting.close();
        }
        let queue = queue.get_or_insert_with(VecDeque::new);
        if queue.is_empty() {
            // Sessions that became active since (hand-offs in flight).
            queue.extend(st.active_keys());
        }
        // Rates below one per tick accumulate; a backlog never banks more
        // than one tick's worth plus one.
        let per_tick = local.shared.drain_rate_per_shard * TICK.as_secs_f64();
        let budget = (local.drain_budget.get() + per_tick).min(per_tick + 1.0);
        let nodes = local.nodes.borrow();
        let others: Vec<NodeInfo> =
            nodes.iter().filter(|n| n.name != local.shared.node && !n.draining).cloned().collect();
        let now = self.now();
        let mut sent = 0.0;
        while sent + 1.0 <= budget {
            let Some(key) = queue.pop_front() else { break };
            let Some(user) = st.user_of(key).map(str::to_owned) else { continue };
            let endpoint = rank(&user, &others, 1).first().map(|n| n.client_endpoint.clone()).unwrap_or_default();
            let frame = Frame::GoAway(proto::GoAway { endpoint, reason: "node draining".into() }).to_bytes();
            self.send_to_slot(&mut st, key.index, &frame);
            self.close_conn(&mut st, key, now, ErrorCode::GoingAway, "node draining; reconnect elsewhere".into());
            local.shared.counters.go_away_sent.fetch_add(1, Ordering::Relaxed);
            sent += 1.0;
        }
        local.drain_budget.set(budget - sent);
    }

    // ---- requests from backends ------------------------------------------

    /// Hook: a push-port request. In cluster mode a backend's push, group
    /// update, kick or presence query is answered by the cluster; returns
    /// the frame when this shard should handle it alone.
    pub(crate) fn cluster_intercept(&self, st: &mut State, backend: ConnKey, frame: Frame) -> Option<Frame> {
        let Some(local) = self.local() else { return Some(frame) };
        let forwarded = match &frame {
            Frame::PushRequest(r) => r.forwarded,
            Frame::GroupUpdate(r) => r.forwarded,
            Frame::KickRequest(r) => r.forwarded,
            Frame::PresenceQuery(r) => r.forwarded,
            _ => return Some(frame),
        };
        if forwarded {
            local.shared.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
            return match frame {
                Frame::KickRequest(kick) if !kick.conn_ids.is_empty() => {
                    let shard = self.me.upgrade()?;
                    crate::push::hold(st, backend);
                    let alarm = Rc::new(Alarm::default());
                    self.arm_deadline(st, Expiry::Alarm(alarm.clone()));
                    glommio::spawn_local(async move {
                        futures_lite::future::yield_now().await;
                        let request_id = kick.request_id;
                        let reply = match alarm.before(shard.kick_if_same_session(&local, kick)).await {
                            Some(reply) => reply,
                            None => Frame::AdminReply(proto::AdminReply { request_id, results: Vec::new() }),
                        };
                        let mut st = shard.state.borrow_mut();
                        crate::push::reply(&mut st, backend, reply.to_bytes());
                    })
                    .detach();
                    None
                }
                other => Some(other),
            };
        }
        let shard = self.me.upgrade()?;
        crate::push::hold(st, backend);
        // The reply goes out by the push-port deadline, whatever is missing.
        let alarm = Rc::new(Alarm::default());
        self.arm_deadline(st, Expiry::Alarm(alarm.clone()));
        glommio::spawn_local(async move {
            // Spawned inside the caller's state borrow: start on the next turn.
            futures_lite::future::yield_now().await;
            let started = Instant::now();
            let reply = shard.cluster_request(&local, frame, &alarm).await;
            if alarm.rang() {
                shard.counters.push_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            let counters = &local.shared.counters;
            counters.request_latency.record(started.elapsed());
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters.count_reply(&reply);
            let mut st = shard.state.borrow_mut();
            crate::push::reply(&mut st, backend, reply.to_bytes());
        })
        .detach();
        None
    }

    /// Hook: the reply of a finished request; the local part of a cluster
    /// request goes back to its merge instead of a backend.
    pub(crate) fn cluster_local_reply(&self, backend: ConnKey, frame: Frame) -> Option<Frame> {
        if backend.index != LOCAL_PART {
            return Some(frame);
        }
        let local = self.local()?;
        let waiting = local.merges.borrow_mut().remove(&backend.generation);
        if let Some(tx) = waiting {
            let _ = tx.send(frame);
        }
        None
    }

    /// A replaced login's kick: only the sessions that still have the
    /// connection ids the kicker's route named (a newer login of the device
    /// here stays).
    async fn kick_if_same_session(self: &Rc<Self>, local: &Rc<Local>, mut kick: proto::KickRequest) -> Frame {
        let request_id = kick.request_id;
        let query = proto::PresenceQuery { devices: kick.devices.clone(), forwarded: true, ..Default::default() };
        let Frame::PresenceReply(presence) = self.run_locally(local, Frame::PresenceQuery(query)).await else {
            return Frame::RequestError(request_error(ErrorCode::ServerError, "presence lookup failed"));
        };
        let same: Vec<String> = presence
            .devices
            .into_iter()
            .zip(&kick.conn_ids)
            .filter(|(d, conn_id)| d.online && d.conn_id == **conn_id)
            .map(|(d, _)| d.device)
            .collect();
        if same.is_empty() {
            return Frame::AdminReply(proto::AdminReply { request_id, results: Vec::new() });
        }
        kick.devices = same;
        kick.conn_ids.clear();
        with_request_id(self.run_locally(local, Frame::KickRequest(kick)).await, request_id)
    }

    async fn cluster_request(self: &Rc<Self>, local: &Rc<Local>, frame: Frame, alarm: &Alarm) -> Frame {
        let request_id = request_id(&frame);
        let reply = match frame {
            Frame::PushRequest(req) if is_device_push(&req) => self.push_devices(local, req, alarm).await,
            other => self.everywhere(local, other, alarm).await,
        };
        with_request_id(reply, request_id)
    }

    /// Why targets are REJECTED when the deadline passed first.
    fn late_reason(&self, who: &str) -> String {
        format!("{who} did not answer within {} ms", self.cfg.push.reply_timeout_ms)
    }

    /// Runs `frame` through this node's own request handling and returns
    /// its reply.
    async fn run_locally(self: &Rc<Self>, local: &Rc<Local>, frame: Frame) -> Frame {
        let token = local.next_merge.get().wrapping_add(1);
        local.next_merge.set(token);
        let (tx, rx) = oneshot::channel();
        local.merges.borrow_mut().insert(token, tx);
        let pseudo = ConnKey { index: LOCAL_PART, generation: token };
        let accepted = {
            let mut st = self.state.borrow_mut();
            match frame {
                Frame::PushRequest(r) => self.start_push(&mut st, pseudo, r),
                Frame::GroupUpdate(r) => self.start_group_update(&mut st, pseudo, r),
                Frame::KickRequest(r) => self.start_kick(&mut st, pseudo, r),
                Frame::PresenceQuery(r) => self.start_presence(&mut st, pseudo, r),
                other => Err(request_error(ErrorCode::BadFrame, format!("{:?} is not clustered", other.kind()))),
            }
        };
        if let Err(err) = accepted {
            local.merges.borrow_mut().remove(&token);
            return Frame::RequestError(err);
        }
        rx.await.unwrap_or_else(|_| Frame::RequestError(request_error(ErrorCode::ServerError, "request dropped")))
    }

    /// Sends `frame` to node `node` (its run `incarnation` or a later one;
    /// 0: any) and waits for its reply.
    async fn forward(
        &self,
        local: &Rc<Local>,
        node: &str,
        incarnation: u64,
        frame: Frame,
    ) -> Result<Frame, ForwardError> {
        let counters = &local.shared.counters;
        counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match self.peer(local, node, incarnation).await {
            Some(link) => link.call(frame, local.shared.forward_timeout).await,
            None => Err(ForwardError::NotLive),
        };
        counters.forward_latency.record(started.elapsed());
        if result.is_err() {
            counters.forward_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// The link to `node`, run `incarnation` or later (a node restarted
    /// under its name may listen elsewhere: the old link and the old
    /// endpoint are not used for the new run).
    async fn peer(&self, local: &Rc<Local>, node: &str, incarnation: u64) -> Option<Rc<PeerLink>> {
        let existing = local.peers.borrow().get(node).cloned();
        if let Some(link) = existing.filter(|l| l.is_usable() && l.incarnation >= incarnation) {
            return Some(link);
        }
        let known = |local: &Local| {
            local
                .nodes
                .borrow()
                .iter()
                .find(|n| n.name == node && n.incarnation >= incarnation)
                .map(|n| (n.node_endpoint.clone(), n.incarnation))
        };
        let (endpoint, incarnation) = match known(local) {
            Some(known) => known,
            None => {
                // It may have joined (or restarted) since the last refresh.
                self.refresh_nodes(local).await;
                known(local)?
            }
        };
        let link = Rc::new(PeerLink::new(node.to_owned(), incarnation, self.counters.clone()));
        local.peers.borrow_mut().insert(node.to_owned(), link.clone());
        glommio::spawn_local(link.clone().run(endpoint)).detach();
        Some(link)
    }

    /// Device targets: each goes where its route says.
    async fn push_devices(self: &Rc<Self>, local: &Rc<Local>, req: proto::PushRequest, alarm: &Alarm) -> Frame {
        let devices = req.targets.as_ref().map(|t| t.devices.clone()).unwrap_or_default();
        if devices.len() > self.cfg.push.max_targets_per_request as usize {
            // Refused as a whole, as by a single node.
            return self.run_locally(local, Frame::PushRequest(req)).await;
        }
        let mut results: Vec<proto::TargetResult> =
            devices.iter().map(|d| proto::TargetResult { target: d.clone(), ..Default::default() }).collect();
        let all: Vec<usize> = (0..devices.len()).collect();
        let reliable = req.qos == proto::Qos::AtLeastOnce as i32;
        let started = Instant::now();
        let counters = &local.shared.counters;
        counters.lookups.fetch_add(1, Ordering::Relaxed);
        let Some(routes) = alarm.before(local.shared.router.lookup(devices.clone())).await else {
            reject(&mut results, &all, &self.late_reason("the router"), true);
            return Frame::PushReply(summarize(results, false, 0));
        };
        counters.router_latency.record(started.elapsed());
        let mut here = Vec::new();
        // Per node: the latest run its routes name, and the targets.
        let mut remote: HashMap<String, (u64, Vec<usize>)> = HashMap::new();
        let router_error = match routes {
            Ok(routes) => {
                for (i, route) in routes.into_iter().enumerate() {
                    match route {
                        Some(r) if r.node != local.shared.node => {
                            let entry = remote.entry(r.node).or_default();
                            entry.0 = entry.0.max(r.incarnation);
                            entry.1.push(i);
                        }
                        _ => here.push(i),
                    }
                }
                None
            }
            Err(err) => {
                counters.lookup_failures.fetch_add(1, Ordering::Relaxed);
                here.extend(0..devices.len());
                Some(err)
            }
        };
        let subset = |idx: &[usize], forwarded: bool| {
            let mut r = req.clone();
            r.targets = Some(proto::Targets {
                devices: idx.iter().map(|&i| devices[i].clone()).collect(),
                ..Default::default()
            });
            r.forwarded = forwarded;
            Frame::PushRequest(r)
        };
        let mut parts: Vec<(Vec<usize>, String, PartTask)> = Vec::new();
        if !here.is_empty() {
            let (shard, local, frame) = (self.clone(), local.clone(), subset(&here, false));
            let who = format!("node {}", self.cfg.node);
            parts.push((here, who, spawn(async move { Ok(shard.run_locally(&local, frame).await) })));
        }
        for (node, (incarnation, idx)) in remote {
            let (shard, l, frame) = (self.clone(), local.clone(), subset(&idx, true));
            let fallback = reliable.then(|| subset(&idx, false));
            parts.push((
                idx,
                format!("node {node}"),
                spawn(async move {
                    let err = match shard.forward(&l, &node, incarnation, frame).await {
                        Ok(reply) => return Ok(reply),
                        Err(err) => err,
                    };
                    match fallback {
                        // Its node is alive but did not answer in time: it
                        // may have stored the copy and sent it to the device.
                        // A copy stored here would reach the device only when
                        // it reconnects (its node is never told), while the
                        // backend takes it as stored: it retries instead.
                        Some(_) if matches!(err, ForwardError::Timeout(_)) => {
                            Err(format!("node {node} did not answer: {err}"))
                        }
                        // Its node is gone: the copy waits in the shared
                        // timeline for the device to resume anywhere.
                        Some(frame) => {
                            debug!(%node, %err, "forward failed; storing in the timeline here");
                            Ok(shard.run_locally(&l, frame).await)
                        }
                        None => Err(format!("node {node} unreachable: {err}")),
                    }
                }),
            ));
        }
        let mut message_id = 0;
        for (idx, who, handle) in parts {
            // The part keeps running when the deadline passes; its late
            // answer is dropped (and counted where it arrives).
            let Some(answer) = alarm.before(handle).await else {
                reject(&mut results, &idx, &self.late_reason(&who), true);
                continue;
            };
            match answer {
                Some(Ok(Frame::PushReply(r))) => {
                    if message_id == 0 {
                        message_id = r.message_id;
                    }
                    for (i, res) in idx.iter().zip(r.results) {
                        results[*i] = res;
                    }
                }
                Some(Ok(Frame::RequestError(e))) => return Frame::RequestError(e),
                Some(Ok(other)) => {
                    let reason = format!("unexpected {:?} from a node", other.kind());
                    reject(&mut results, &idx, &reason, false);
                }
                // The node could not be asked, or did not answer: the push
                // may succeed when sent again.
                Some(Err(reason)) => reject(&mut results, &idx, &reason, true),
                None => reject(&mut results, &idx, "request task lost", true),
            }
        }
        if let Some(err) = router_error {
            // Not here, and nobody can say where: the backend should retry.
            for r in results.iter_mut().filter(|r| r.status == PushStatus::NotOnline as i32) {
                r.status = PushStatus::Rejected as i32;
                r.reason = err.to_string();
                r.retryable = true;
            }
        }
        if let [only] = &results[..]
            && only.message_id != 0
        {
            message_id = only.message_id;
        }
        Frame::PushReply(summarize(results, false, message_id))
    }

    /// User, group and broadcast pushes, group updates, kicks and presence
    /// queries: every live node handles its own sessions; the replies are
    /// merged.
    async fn everywhere(self: &Rc<Self>, local: &Rc<Local>, frame: Frame, alarm: &Alarm) -> Frame {
        // A node that joined a moment ago may hold targets already.
        if let Some(Ok(nodes)) = alarm.before(local.shared.router.nodes_fresh(FRESH_NODES)).await {
            *local.nodes.borrow_mut() = nodes;
        }
        let others: Vec<String> =
            local.nodes.borrow().iter().filter(|n| n.name != local.shared.node).map(|n| n.name.clone()).collect();
        let mut handles = Vec::with_capacity(others.len() + 1);
        {
            let (shard, l, f) = (self.clone(), local.clone(), frame.clone());
            handles.push((self.cfg.node.clone(), spawn(async move { Ok(shard.run_locally(&l, f).await) })));
        }
        for node in others {
            let (shard, l) = (self.clone(), local.clone());
            let mut f = frame.clone();
            set_forwarded(&mut f);
            let name = node.clone();
            handles.push((name, spawn(async move { shard.forward(&l, &node, 0, f).await })));
        }
        let mut merged: Option<Frame> = None;
        // Nodes that may hold targets but did not answer in time.
        let mut silent = Vec::new();
        for (node, handle) in handles {
            let Some(answer) = alarm.before(handle).await else {
                silent.push(node);
                continue;
            };
            match answer {
                Some(Ok(reply)) => {
                    merged = Some(match merged {
                        None => reply,
                        Some(acc) => match merge(acc, reply) {
                            Ok(m) => m,
                            Err(e) => return Frame::RequestError(e),
                        },
                    })
                }
                // Alive but slow: it may hold targets.
                Some(Err(ForwardError::Timeout(_))) => silent.push(node),
                // That node's sessions are gone with it.
                Some(Err(err)) => warn!(%node, %err, "a node did not answer a cluster-wide request"),
                None => {}
            }
        }
        if silent.is_empty() {
            return merged
                .unwrap_or_else(|| Frame::RequestError(request_error(ErrorCode::ServerError, "no node answered")));
        }
        let reason = self.late_reason(&format!("node {}", silent.join(", node ")));
        incomplete(merged.unwrap_or_else(|| blank_reply(&frame)), &reason)
    }
}

/// A part of a cluster request running as its own task: its reply, or why
/// its node could not be asked.
type PartTask = glommio::task::JoinHandle<Result<Frame, String>>;

fn spawn<T: 'static>(fut: impl std::future::Future<Output = T> + 'static) -> glommio::task::JoinHandle<T> {
    glommio::spawn_local(fut).detach()
}

fn release(local: &Rc<Local>, device: String, epoch: u64) {
    let router = local.shared.router.clone();
    local.shared.counters.releases.fetch_add(1, Ordering::Relaxed);
    glommio::spawn_local(async move {
        if let Err(err) = router.release(&device, epoch).await {
            // The route stays until its node's lease or the route TTL ends.
            debug!(%device, %err, "route release failed");
        }
    })
    .detach();
}

fn is_device_push(req: &proto::PushRequest) -> bool {
    req.targets
        .as_ref()
        .is_some_and(|t| !t.devices.is_empty() && t.users.is_empty() && t.group.is_empty() && !t.broadcast)
}

fn request_error(code: ErrorCode, reason: impl Into<String>) -> proto::RequestError {
    proto::RequestError { request_id: 0, code: code as i32, reason: reason.into() }
}

fn reject(results: &mut [proto::TargetResult], idx: &[usize], reason: &str, retryable: bool) {
    for &i in idx {
        if let Some(r) = results.get_mut(i) {
            r.status = PushStatus::Rejected as i32;
            r.reason = reason.to_owned();
            r.retryable = retryable;
        }
    }
}

/// A cluster-wide reply some nodes did not contribute to in time: targets
/// found nowhere may be on those nodes (REJECTED, retryable); a group or
/// broadcast push is REJECTED, retryable, with the sessions counted so far.
fn incomplete(mut reply: Frame, reason: &str) -> Frame {
    let mark = |results: &mut Vec<proto::TargetResult>| {
        for r in results.iter_mut().filter(|r| r.status == PushStatus::NotOnline as i32) {
            r.status = PushStatus::Rejected as i32;
            r.reason = reason.to_owned();
            r.retryable = true;
        }
    };
    match &mut reply {
        Frame::PushReply(r) if r.results.is_empty() => {
            r.status = PushStatus::Rejected as i32;
            r.reason = format!("{reason}; delivered counts the nodes that did");
            r.retryable = true;
        }
        Frame::PushReply(r) => {
            mark(&mut r.results);
            let (users, message_id) = (true, r.message_id);
            *r = proto::PushReply {
                request_id: r.request_id,
                ..summarize(std::mem::take(&mut r.results), users, message_id)
            };
        }
        Frame::AdminReply(r) => mark(&mut r.results),
        _ => {}
    }
    reply
}

/// The reply to a cluster-wide request when no node answered in time:
/// every target not found (see [`incomplete`]).
fn blank_reply(request: &Frame) -> Frame {
    let not_online = |ids: &[String]| -> Vec<proto::TargetResult> {
        ids.iter()
            .map(|id| proto::TargetResult {
                target: id.clone(),
                status: PushStatus::NotOnline as i32,
                ..Default::default()
            })
            .collect()
    };
    match request {
        Frame::PushRequest(r) => {
            let t = r.targets.clone().unwrap_or_default();
            let results = not_online(if t.devices.is_empty() { &t.users } else { &t.devices });
            let status = if t.broadcast { PushStatus::Accepted } else { PushStatus::NotOnline };
            if results.is_empty() {
                Frame::PushReply(proto::PushReply { status: status as i32, ..Default::default() })
            } else {
                Frame::PushReply(summarize(results, true, 0))
            }
        }
        Frame::GroupUpdate(r) => {
            let ids: Vec<String> = r.add_devices.iter().chain(&r.remove_devices).cloned().collect();
            Frame::AdminReply(proto::AdminReply { request_id: 0, results: not_online(&ids) })
        }
        Frame::KickRequest(r) => {
            let ids: Vec<String> = r.devices.iter().chain(&r.users).cloned().collect();
            Frame::AdminReply(proto::AdminReply { request_id: 0, results: not_online(&ids) })
        }
        Frame::PresenceQuery(q) => Frame::PresenceReply(proto::PresenceReply {
            devices: q
                .devices
                .iter()
                .map(|d| proto::DevicePresence { device: d.clone(), ..Default::default() })
                .collect(),
            users: q.users.iter().map(|u| proto::UserPresence { user: u.clone(), devices: Vec::new() }).collect(),
            groups: q.groups.iter().map(|g| proto::GroupCount { group: g.clone(), online: 0 }).collect(),
            ..Default::default()
        }),
        other => {
            Frame::RequestError(request_error(ErrorCode::ServerError, format!("{:?} is not clustered", other.kind())))
        }
    }
}

fn request_id(frame: &Frame) -> u64 {
    match frame {
        Frame::PushRequest(r) => r.request_id,
        Frame::GroupUpdate(r) => r.request_id,
        Frame::KickRequest(r) => r.request_id,
        Frame::PresenceQuery(r) => r.request_id,
        Frame::PresenceReply(r) => r.request_id,
        Frame::PushReply(r) => r.request_id,
        Frame::AdminReply(r) => r.request_id,
        Frame::RequestError(r) => r.request_id,
        _ => 0,
    }
}

fn set_request_id(frame: &mut Frame, id: u64) {
    match frame {
        Frame::PushRequest(r) => r.request_id = id,
        Frame::GroupUpdate(r) => r.request_id = id,
        Frame::KickRequest(r) => r.request_id = id,
        Frame::PresenceQuery(r) => r.request_id = id,
        Frame::PresenceReply(r) => r.request_id = id,
        Frame::PushReply(r) => r.request_id = id,
        Frame::AdminReply(r) => r.request_id = id,
        Frame::RequestError(r) => r.request_id = id,
        _ => {}
    }
}

fn with_request_id(mut frame: Frame, id: u64) -> Frame {
    set_request_id(&mut frame, id);
    frame
}

fn set_forwarded(frame: &mut Frame) {
    match frame {
        Frame::PushRequest(r) => r.forwarded = true,
        Frame::GroupUpdate(r) => r.forwarded = true,
        Frame::KickRequest(r) => r.forwarded = true,
        Frame::PresenceQuery(r) => r.forwarded = true,
        _ => {}
    }
}

/// Which outcome of one target wins when nodes answer differently.
fn status_rank(status: i32) -> u8 {
    match PushStatus::try_from(status) {
        Ok(PushStatus::Rejected) => 4,
        Ok(PushStatus::Stored) => 3,
        Ok(PushStatus::Delivered) => 2,
        Ok(PushStatus::NotOnline) => 1,
        _ => 0,
    }
}

/// Folds another node's result for the same target into `acc`.
fn combine(acc: &mut proto::TargetResult, r: proto::TargetResult) {
    if status_rank(r.status) > status_rank(acc.status) {
        acc.status = r.status;
        acc.reason = r.reason;
        acc.retryable = r.retryable;
    }
    acc.sessions += r.sessions;
    acc.copies.extend(r.copies);
    if r.seq != 0 {
        acc.seq = r.seq;
        acc.message_id = r.message_id;
    }
}

/// The reply's totals from its per-target results.
fn summarize(results: Vec<proto::TargetResult>, users: bool, message_id: u64) -> proto::PushReply {
    let (mut delivered, mut not_online, mut stored) = (0u64, 0u64, 0u64);
    for r in &results {
        match PushStatus::try_from(r.status) {
            Ok(PushStatus::Delivered) => delivered += u64::from(r.sessions),
            Ok(PushStatus::Stored) => {
                delivered += u64::from(r.sessions);
                stored += if users { r.copies.len() as u64 } else { 1 };
            }
            Ok(PushStatus::NotOnline) => not_online += 1,
            Ok(PushStatus::Rejected) => stored += r.copies.len() as u64,
            _ => {}
        }
    }
    let status = if stored > 0 {
        PushStatus::Stored
    } else if delivered > 0 {
        PushStatus::Delivered
    } else {
        PushStatus::NotOnline
    };
    proto::PushReply {
        request_id: 0,
        results,
        delivered,
        not_online,
        status: status as i32,
        reason: String::new(),
        message_id,
        stored,
        retryable: false,
    }
}

/// Merges two nodes' replies to the same cluster-wide request.
fn merge(acc: Frame, other: Frame) -> Result<Frame, proto::RequestError> {
    match (acc, other) {
        (Frame::RequestError(e), _) | (_, Frame::RequestError(e)) => Err(e),
        (Frame::PushReply(mut a), Frame::PushReply(b)) => {
            if a.results.is_empty() {
                // Group or broadcast: counts.
                a.delivered += b.delivered;
                let rejected = PushStatus::Rejected as i32;
                if b.status == rejected {
                    // One node refused (a full broadcast queue, its deadline):
                    // the reply says so even if others took it, with every
                    // node's reason.
                    a.reason = match (a.status == rejected, a.reason.is_empty()) {
                        (true, false) => format!("{}; {}", a.reason, b.reason),
                        _ => b.reason,
                    };
                    a.retryable = b.retryable || (a.status == rejected && a.retryable);
                    a.status = rejected;
                } else if a.status == PushStatus::NotOnline as i32 && b.delivered > 0 {
                    a.status = PushStatus::Delivered as i32;
                }
                return Ok(Frame::PushReply(a));
            }
            for (acc, r) in a.results.iter_mut().zip(b.results) {
                combine(acc, r);
            }
            Ok(Frame::PushReply(summarize(a.results, true, a.message_id)))
        }
        (Frame::PresenceReply(mut a), Frame::PresenceReply(b)) => {
            // Devices and users are listed once per query entry, in order.
            for (acc, d) in a.devices.iter_mut().zip(b.devices) {
                if d.online && !acc.online {
                    *acc = d;
                }
            }
            for (acc, u) in a.users.iter_mut().zip(b.users) {
                acc.devices.extend(u.devices);
            }
            for (acc, g) in a.groups.iter_mut().zip(b.groups) {
                acc.online += g.online;
            }
            // Shard i of every node adds up; the total is the cluster's.
            if a.connections_per_shard.len() < b.connections_per_shard.len() {
                a.connections_per_shard.resize(b.connections_per_shard.len(), 0);
            }
            for (acc, n) in a.connections_per_shard.iter_mut().zip(b.connections_per_shard) {
                *acc += n;
            }
            a.connections_total += b.connections_total;
            Ok(Frame::PresenceReply(a))
        }
        (Frame::AdminReply(mut a), Frame::AdminReply(b)) => {
            for (acc, r) in a.results.iter_mut().zip(b.results) {
                combine(acc, r);
            }
            Ok(Frame::AdminReply(a))
        }
        (a, b) => {
            warn!(left = ?a.kind(), right = ?b.kind(), "replies of different kinds; keeping the first");
            Ok(a)
        }
    }
}

// ---- node-to-node links -------------------------------------------------

/// Why a forwarded request got no reply. Every case may pass: the
/// backend may send the push again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("not live")]
    NotLive,
    #[error("too much queued for this node")]
    Queued,
    #[error("connection failed")]
    Failed,
    #[error("connection lost")]
    Lost,
    #[error("no answer within {0} ms")]
    Timeout(u64),
}

/// One pipelined connection from a shard to another node's push port.
pub(crate) struct PeerLink {
    node: String,
    /// The run of the node it was opened to.
    incarnation: u64,
    inner: RefCell<PeerInner>,
    /// Where replies that come after their caller gave up are counted.
    counters: Arc<crate::shard::ShardCounters>,
}

#[derive(Default)]
struct PeerInner {
    out: OutQueue,
    waiting: HashMap<u64, oneshot::Sender<Frame>>,
    next_id: u64,
    waker: Option<Waker>,
    /// Set when the connection failed: the link is replaced on next use.
    failed: bool,
}

impl PeerLink {
    fn new(node: String, incarnation: u64, counters: Arc<crate::shard::ShardCounters>) -> PeerLink {
        PeerLink { node, incarnation, inner: RefCell::default(), counters }
    }

    fn is_usable(&self) -> bool {
        !self.inner.borrow().failed
    }

    /// Sends `frame` (its request id is replaced) and waits for the reply.
    async fn call(&self, mut frame: Frame, timeout: Duration) -> Result<Frame, ForwardError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.inner.borrow_mut();
            if inner.failed {
                return Err(ForwardError::Failed);
            }
            if inner.out.bytes() > PEER_QUEUE_BYTES {
                return Err(ForwardError::Queued);
            }
            inner.next_id += 1;
            let id = inner.next_id;
            set_request_id(&mut frame, id);
            inner.out.push(frame.to_bytes());
            inner.waiting.insert(id, tx);
            if let Some(w) = &inner.waker {
                w.wake_by_ref();
            }
            id
        };
        let answer = futures_lite::future::or(async { Some(rx.await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        match answer {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(_)) => Err(ForwardError::Lost),
            None => {
                self.inner.borrow_mut().waiting.remove(&id);
                Err(ForwardError::Timeout(timeout.as_millis() as u64))
            }
        }
    }

    async fn run(self: Rc<Self>, endpoint: String) {
        let connected = TcpStream::connect_timeout(endpoint.as_str(), Duration::from_secs(2)).await;
        let mut stream = match connected {
            Ok(s) => s,
            Err(err) => {
                warn!(node = %self.node, %endpoint, error = %err, "cannot connect to node");
                return self.fail();
            }
        };
        let _ = stream.set_nodelay(true);
        debug!(node = %self.node, %endpoint, "connected to node");
        let mut rbuf = BytesMut::new();
        std::future::poll_fn(|cx| self.poll(&mut stream, &mut rbuf, cx)).await;
        debug!(node = %self.node, "link to node closed");
        self.fail();
    }

    fn fail(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.failed = true;
        // Dropping the senders tells every waiting call.
        inner.waiting.clear();
        inner.out.clear();
    }

    fn poll(&self, stream: &mut TcpStream, rbuf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..8 {
            {
                let mut inner = self.inner.borrow_mut();
                if inner.out.flush(stream, cx).is_err() {
                    return Poll::Ready(());
                }
                if !inner.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    inner.waker = Some(cx.waker().clone());
                }
                loop {
                    match codec::split_frame(rbuf, PEER_MAX_FRAME) {
                        Ok(None) => break,
                        Ok(Some((header, body))) => {
                            let len = header.frame_len();
                            let frame = Frame::decode(header, body);
                            let _ = rbuf.split_to(len);
                            let Ok(frame) = frame else { return Poll::Ready(()) };
                            match inner.waiting.remove(&request_id(&frame)) {
                                Some(tx) => {
                                    let _ = tx.send(frame);
                                }
                                // Its caller stopped waiting (forward timeout).
                                None => {
                                    self.counters.push_late_answers.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Err(err) => {
                            warn!(node = %self.node, error = %err, "bad frame from node");
                            return Poll::Ready(());
                        }
                    }
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, &mut chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => rbuf.extend_from_slice(&chunk[..n]),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: PushStatus, sessions: u32) -> proto::TargetResult {
        proto::TargetResult { target: "u".into(), status: status as i32, sessions, ..Default::default() }
    }

    #[test]
    fn user_results_merge_across_nodes() {
        let a = Frame::PushReply(summarize(
            vec![result(PushStatus::Delivered, 2), result(PushStatus::NotOnline, 0)],
            true,
            7,
        ));
        let b = Frame::PushReply(summarize(
            vec![result(PushStatus::NotOnline, 0), result(PushStatus::Delivered, 1)],
            true,
            9,
        ));
        let Ok(Frame::PushReply(r)) = merge(a, b) else { panic!("push reply") };
        let got: Vec<_> = r.results.iter().map(|r| (r.status, r.sessions)).collect();
        assert_eq!(got, [(PushStatus::Delivered as i32, 2), (PushStatus::Delivered as i32, 1)]);
        assert_eq!((r.delivered, r.not_online, r.status), (3, 0, PushStatus::Delivered as i32));
    }

    #[test]
    fn a_rejected_copy_wins_and_group_counts_add_up() {
        let mut acc = result(PushStatus::Stored, 1);
        combine(
            &mut acc,
            proto::TargetResult {
                status: PushStatus::Rejected as i32,
                reason: "x".into(),
                retryable: true,
                ..Default::default()
            },
        );
        assert_eq!((acc.status, acc.reason.as_str(), acc.retryable), (PushStatus::Rejected as i32, "x", true));
        let g = |delivered, status: PushStatus| {
            Frame::PushReply(proto::PushReply { delivered, status: status as i32, ..Default::default() })
        };
        let Ok(Frame::PushReply(r)) = merge(g(0, PushStatus::NotOnline), g(4, PushStatus::Delivered)) else { panic!() };
        assert_eq!((r.delivered, r.status), (4, PushStatus::Delivered as i32));
        // A node that refused a broadcast is not hidden by one that took it.
        let refused = |reason: &str| {
            Frame::PushReply(proto::PushReply {
                status: PushStatus::Rejected as i32,
                reason: reason.into(),
                retryable: true,
                ..Default::default()
            })
        };
        for (x, y) in [(g(0, PushStatus::Accepted), refused("full")), (refused("full"), g(0, PushStatus::Accepted))] {
            let Ok(Frame::PushReply(r)) = merge(x, y) else { panic!() };
            assert_eq!((r.status, r.reason.as_str(), r.retryable), (PushStatus::Rejected as i32, "full", true));
        }
        let Ok(Frame::PushReply(r)) = merge(refused("a"), refused("b")) else { panic!() };
        assert_eq!((r.status, r.reason.as_str()), (PushStatus::Rejected as i32, "a; b"));
        let err = Frame::RequestError(request_error(ErrorCode::BadFrame, "bad"));
        assert!(merge(g(1, PushStatus::Delivered), err).is_err());
    }

    #[test]
    fn wildcard_binds_advertise_the_address_that_reaches_redis() {
        let lo = std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(reachable_ip("redis://127.0.0.1:6379/"), lo);
        assert_eq!(reachable_ip("redis://127.0.0.5:6379/"), std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(reachable_ip("not a url"), lo);
    }

    #[test]
    fn histogram_buckets() {
        let h = AtomicHistogram::default();
        h.record(Duration::from_micros(40));
        h.record(Duration::from_micros(700));
        h.record(Duration::from_secs(9));
        let s = h.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!(s.count_between(0, 50), 1);
    }
}
