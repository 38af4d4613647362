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

mod drain;
mod forward;
mod merge;
pub mod metrics;
mod peers;
mod routes;

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::future::Future;
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
use crate::protocol::codes::request_error;
use crate::protocol::ids::{ConnId, ConnKey, ShardId};
use crate::protocol::proto::{self, ErrorCode, PushStatus};
use crate::protocol::time::Now;
pub(crate) use crate::push::request_id;
use crate::push::{Alarm, Expiry, PortEvent, PortHost, PushLimits, summarize};
use crate::router::{NodeInfo, Route, Router, RouterConfig, rank};
use crate::session::Login;
pub use drain::spawn_drain_coordinator;
use drain::{cluster_loop, refresh_nodes};
use forward::*;
pub(crate) use forward::{intercept, local_reply, start_queued};
use merge::*;
pub use metrics::{AtomicHistogram, ClusterCounters, DISCONNECT_CODES, HIST_BOUNDS_US, PUSH_RESULTS};
use peers::*;
use routes::*;
pub(crate) use routes::{on_active, on_gone};

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
/// Revocations stored by other nodes are read every this many ticks (every
/// tick until the first complete read), this many at a time.
const REVOCATIONS_EVERY: u32 = 10;
const REVOCATIONS_BATCH: usize = 1000;
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
    /// The cluster secret: links to other nodes' listeners authenticate
    /// with it.
    node_key: crate::protocol::token::Key,
    /// `cluster.tls`: links to the other nodes run TLS and verify them.
    node_tls: Option<crate::conn::tls::pipe::DialTls>,
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
    /// Shards that recorded the revocations stored in Redis (logins are
    /// refused until then), of `shards`.
    revocations_loaded: std::sync::atomic::AtomicU16,
    shards: u16,
}

impl ClusterShared {
    /// Starts the router sidecar (registration, lease, routes).
    pub fn start(
        config: &Config,
        client_addr: std::net::SocketAddr,
        node_addr: std::net::SocketAddr,
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
        let node_endpoint = endpoint(&c.node_endpoint, node_addr);
        let (node_key, _) = crate::push::auth::cluster_key_or_dev(&c.secret_hex, &config.data_dir)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let node_tls = match c.tls {
            true => Some(
                crate::conn::tls::pipe::DialTls::load(&c.tls_ca_file, &c.tls_server_name)
                    .map_err(|e| std::io::Error::other(e.to_string()))?,
            ),
            false => None,
        };
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
            node_key,
            node_tls,
            counters: ClusterCounters::default(),
            drain: AtomicBool::new(false),
            reregistered,
            forward_timeout: Duration::from_millis(c.forward_timeout_ms),
            drain_deadline: Duration::from_millis(c.drain_deadline_ms),
            route_ttl: Duration::from_secs(c.route_ttl_secs),
            drain_rate_per_shard: f64::from(c.drain_rate_per_sec) / f64::from(shards.max(1)),
            revocations_loaded: std::sync::atomic::AtomicU16::new(0),
            shards,
        }))
    }

    /// Asks the node to drain (idempotent).
    pub fn request_drain(&self) {
        if !self.drain.swap(true, Ordering::Relaxed) {
            info!(node = %self.node, "drain requested");
        }
    }

    /// Whether the revocations stored in Redis were read (logins are refused
    /// with UNAVAILABLE until then).
    pub fn revocations_loaded(&self) -> bool {
        self.revocations_loaded.load(Ordering::Acquire) >= self.shards
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

/// A backend request the cluster answers from a task.
enum Queued {
    /// A replaced login's kick, for the sessions it names only.
    Kick(proto::KickRequest),
    Request(Frame),
}

/// A session's claim on its device's route.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Claim {
    Pending,
    Held(u64),
    Failed,
}

/// What the cluster needs of the shard during one call (its state
/// borrowed): the push port's context, and the sessions.
pub(crate) trait ClusterHost: PortHost {
    /// The device of the active session `key`.
    fn device_of(&self, key: ConnKey) -> Option<&str>;
    /// Ends session `key` (`code` and `reason` tell the client why).
    fn close_conn(&mut self, key: ConnKey, now: Now, code: ErrorCode, reason: String);
    /// How long a revocation must be kept (the longest token lifetime and
    /// the clock leeway), in seconds.
    fn revocation_keep_secs(&self) -> i64;
    /// Logins wait until the stored revocations are read.
    fn await_revocations(&mut self);
}

/// The shard as the cluster's tasks see it: entered (its state borrowed)
/// for each step, never across an await.
pub(crate) trait ClusterShard: Sized + 'static {
    type Host<'a>: ClusterHost
    where
        Self: 'a;
    /// One shard's drain pacing (GoAway at a bounded rate), kept in the
    /// cluster state and handed back to [`ClusterShard::drain_step`].
    type Drain;
    fn enter<R>(&self, f: impl FnOnce(&mut Self::Host<'_>) -> R) -> R;
    /// Where the shard keeps its cluster state.
    fn slot(&self) -> &Slot<Self>;
    /// The shard itself, for the tasks it starts (`None` once it is gone).
    fn me(&self) -> Option<Rc<Self>>;
    fn id(&self) -> ShardId;
    /// This node's name.
    fn node(&self) -> &str;
    fn is_stopping(&self) -> bool;
    /// The live (reloadable) push-port limits.
    fn limits(&self) -> PushLimits;
    /// Counts a peer's reply that came after its caller gave up.
    fn late_answers(&self) -> LateAnswers;
    /// Runs a sidecar call (Redis); `then` gets its output with the state
    /// entered: inline when the future is ready at once, else from a task.
    fn after_store<T: 'static>(
        &self,
        h: &mut Self::Host<'_>,
        fut: impl Future<Output = T> + 'static,
        then: impl for<'b> FnOnce(&Self, &mut Self::Host<'b>, T) + 'static,
    );
    fn new_drain(rate_per_shard: f64) -> Self::Drain;
    /// One drain tick: GoAway (with `endpoint(user)`) and close to the
    /// sessions `drain` picks; returns how many were sent away.
    fn drain_step(&self, drain: &Self::Drain, tick: Duration, endpoint: impl Fn(&str) -> String) -> u32;
}

/// Counts a late reply from a peer (built once per link).
pub(crate) type LateAnswers = Rc<dyn Fn()>;

/// One shard's cluster state.
pub(crate) struct Local<S: ClusterShard> {
    shared: Arc<ClusterShared>,
    /// Claims of this shard's active sessions, by slot (with the slot's
    /// generation).
    routes: RefCell<Routes>,
    /// Live nodes as of the last refresh.
    nodes: RefCell<Vec<NodeInfo>>,
    peers: RefCell<HashMap<String, Rc<PeerLink>>>,
    /// Local parts of cluster requests waiting for their reply.
    merges: RefCell<HashMap<u32, oneshot::Sender<Frame>>>,
    next_merge: Cell<u32>,
    /// Backend requests taken by the cluster, waiting for their task.
    queued: RefCell<Vec<(ConnKey, Queued, Rc<Alarm>)>>,
    reregistered_seen: Cell<u64>,
    /// Shard 0: the last revocation read from Redis (its sequence number),
    /// and whether every shard was told the whole log was read.
    revocations_seen: Cell<u64>,
    revocations_marked: Cell<bool>,
    /// This shard's drain progress (used once the drain starts).
    drain: S::Drain,
}

/// Joins a shard to the cluster and starts its cluster task.
pub(crate) fn attach<S: ClusterShard>(shard: &Rc<S>, shared: Arc<ClusterShared>) {
    let local = Local {
        reregistered_seen: Cell::new(shared.reregistered.load(Ordering::Relaxed)),
        drain: S::new_drain(shared.drain_rate_per_shard),
        shared,
        routes: RefCell::default(),
        nodes: RefCell::default(),
        peers: RefCell::default(),
        merges: RefCell::default(),
        next_merge: Cell::new(0),
        queued: RefCell::default(),
        revocations_seen: Cell::new(0),
        revocations_marked: Cell::new(false),
    };
    // Logins wait until the revocations stored in Redis are read.
    shard.enter(|h| h.await_revocations());
    if shard.slot().set(Rc::new(local)).is_err() {
        warn!(shard = %shard.id(), "shard already joined the cluster");
        return;
    }
    glommio::spawn_local(cluster_loop(Rc::clone(shard))).detach();
}

/// The cluster state of a shard, when the node runs in cluster mode.
pub(crate) type Slot<S> = OnceCell<Rc<Local<S>>>;

/// The shard's cluster state, in cluster mode.
fn local<S: ClusterShard>(shard: &S) -> Option<Rc<Local<S>>> {
    shard.slot().get().cloned()
}

/// Hook: this shard recorded the whole stored revocation log.
pub(crate) fn on_revocations_loaded<S: ClusterShard>(shard: &S) {
    if let Some(local) = local(shard) {
        local.shared.revocations_loaded.fetch_add(1, Ordering::Release);
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
        let err = Frame::RequestError(request_error(0, ErrorCode::BadFrame, "bad"));
        assert!(merge(g(1, PushStatus::Delivered), err).is_err());
    }

    #[test]
    fn wildcard_binds_advertise_the_address_that_reaches_redis() {
        let lo = std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(reachable_ip("redis://127.0.0.1:6379/"), lo);
        assert_eq!(reachable_ip("redis://127.0.0.5:6379/"), std::net::IpAddr::from([127, 0, 0, 1]));
        assert_eq!(reachable_ip("not a url"), lo);
    }
}
