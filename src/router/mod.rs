//! The cluster router: which node holds each device, in Redis.
//!
//! - Node registry: `P:node:<name>` (a hash: incarnation, endpoints,
//!   draining) with a lease (PEXPIRE), renewed by its own sidecar thread
//!   ([`lease`]), and
//!   `P:nodes`, a sorted set of node names scored by lease expiry.
//! - Routes: `P:route:{device}` (node, incarnation, shard, connection id,
//!   epoch). A login takes a new epoch from `P:epoch:{device}` (INCR), so
//!   the newest login wins; re-asserting a route and deleting one are
//!   compare-and-set on the epoch inside a Lua script, so a stale node can
//!   neither overwrite nor delete a newer route.
//! - A route is only valid while its node's lease is live with the same
//!   incarnation: routes of a dead node expire with its lease.
//!
//! Fencing: a node that cannot renew its lease must not keep claiming
//! devices. [`LeaseKeeper`] tells the two cases apart: the node itself was
//! stopped (its lease lapsed while it made no attempt: it was paused, so
//! others may own its devices now; it fences itself, drains and exits
//! non-zero) and Redis was unreachable (every node failed alike: it
//! re-registers and re-asserts its routes when Redis returns, and its
//! clients stay connected).
//!
//! Restarts: a node started again under its name while the lease of its
//! previous run is still running ([`NameHeld`]) takes that lease over at
//! once when the registry names a process of this host that is gone (kill
//! -9, a crash), waits for it to lapse when the holder cannot be checked
//! (another host), and gives up (fenced) when the holder is alive or renews
//! it: two live processes must not share a name. The new run has a new
//! incarnation, so routes of the old one stay invalid (their sockets died
//! with it) until their devices log in again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::Value;

pub mod lease;

use crate::protocol::ids::stable_hash;
use crate::sidecar::redis_link::{self, NotSent, RedisLink, SidecarHandle, Unavailable, as_string, as_u64, take_batch};
use lease::{LeaseHandle, LeaseOp, LeaseSidecar};
pub use lease::{Liveness, NameHeld, StartAction, liveness, process_identity};

/// Where a device is connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub node: String,
    pub incarnation: u64,
    pub shard: u16,
    pub conn_id: u64,
    pub epoch: u64,
}

/// A live node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub incarnation: u64,
    /// host:port clients connect to.
    pub client_endpoint: String,
    /// host:port other nodes forward pushes to.
    pub node_endpoint: String,
    pub draining: bool,
    /// Unix ms when its lease runs out (as of our last look).
    pub lease_expires_ms: u64,
}

/// Nodes for `uid`, best first: highest rendezvous score among the healthy,
/// non-draining nodes (the dispatcher's order, and where a draining node
/// sends its clients).
pub fn rank(uid: &str, nodes: &[NodeInfo], k: usize) -> Vec<NodeInfo> {
    let mut scored: Vec<(u64, &NodeInfo)> = nodes
        .iter()
        .filter(|n| !n.draining && !n.client_endpoint.is_empty())
        .map(|n| (stable_hash(&format!("{}\u{0}{uid}", n.name)), n))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    scored.into_iter().take(k).map(|(_, n)| n.clone()).collect()
}

/// The lease state of this node, readable by every shard.
#[derive(Debug, Default)]
pub struct NodeState {
    /// 0 unregistered, 1 live, 2 fenced (stop accepting, drain).
    state: AtomicU8,
    draining: AtomicBool,
    /// Left the registry on purpose: never renew or register again.
    left: AtomicBool,
    /// A route call failed for lack of Redis since the lease thread last
    /// looked: a lease found lapsed is blamed on the outage.
    redis_error: AtomicBool,
}

impl NodeState {
    pub fn is_live(&self) -> bool {
        self.state.load(Ordering::Relaxed) == 1
    }

    pub fn is_fenced(&self) -> bool {
        self.state.load(Ordering::Relaxed) == 2
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn set_live(&self) {
        self.state.store(1, Ordering::Relaxed);
    }

    pub(crate) fn set_fenced(&self) {
        self.state.store(2, Ordering::Relaxed);
    }

    pub(crate) fn has_left(&self) -> bool {
        self.left.load(Ordering::Relaxed)
    }

    fn note_redis_error(&self) {
        self.redis_error.store(true, Ordering::Relaxed);
    }

    pub(crate) fn take_redis_error(&self) -> bool {
        self.redis_error.swap(false, Ordering::Relaxed)
    }
}

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub url: String,
    pub prefix: String,
    pub node: String,
    /// Unique per process start, growing with the start time: tells this
    /// run from an earlier one.
    pub incarnation: u64,
    pub lease: Duration,
    pub client_endpoint: String,
    pub node_endpoint: String,
    /// Route keys expire after this unless re-asserted (garbage collection
    /// of devices that never come back).
    pub route_ttl: Duration,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RouterError {
    #[error("router unavailable: {0}")]
    Unavailable(String),
    #[error("router overloaded: request shed")]
    Overloaded,
    #[error("router reply malformed: {0}")]
    Protocol(String),
}

impl From<Unavailable> for RouterError {
    fn from(e: Unavailable) -> Self {
        RouterError::Unavailable(e.0)
    }
}

/// The result of a login claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub epoch: u64,
    /// The route this claim replaced, if it was still valid (its node live):
    /// that session must be kicked as REPLACED.
    pub previous: Option<Route>,
}

enum Op {
    Claim {
        device: String,
        shard: u16,
        conn_id: u64,
    },
    Reassert {
        device: String,
        shard: u16,
        conn_id: u64,
        epoch: u64,
    },
    Release {
        device: String,
        epoch: u64,
    },
    Lookup {
        devices: Vec<String>,
    },
    /// The node table, refreshed first if older than `max_age`.
    Nodes {
        max_age: Duration,
    },
    /// Leave the registry (clean exit): routes naming us turn invalid now.
    Deregister,
    /// Record a revocation for every node, now and later.
    Revoke {
        devices: Vec<String>,
        users: Vec<String>,
        not_before: i64,
        keep_secs: i64,
    },
    /// Revocations recorded after sequence number `after`, at most `limit`.
    Revocations {
        after: u64,
        limit: usize,
    },
}

enum Answer {
    Claimed(Claimed),
    Done(bool),
    Routes(Vec<Option<Route>>),
    Nodes(Vec<NodeInfo>),
    /// Entries, and the log's sequence counter now.
    Revocations(Vec<StoredRevocation>, u64),
}

/// A revocation as the cluster keeps it in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRevocation {
    /// Its place in the cluster's revocation log (grows with every entry).
    pub seq: u64,
    pub is_user: bool,
    pub id: String,
    /// Tokens issued at or before this (unix seconds) are refused.
    pub not_before: i64,
}

type Job = redis_link::Job<Op, Answer, RouterError>;

/// A handle to the router sidecar, cheap to clone into every shard.
#[derive(Clone)]
pub struct Router {
    sidecar: SidecarHandle<Op, Answer, RouterError>,
    lease: LeaseHandle,
    state: Arc<NodeState>,
}

/// Indexes of the scripts in the link.
const CLAIM: usize = 0;
const REASSERT: usize = 1;
const RELEASE: usize = 2;
const DEREGISTER: usize = 3;
const REVOKE: usize = 4;

/// KEYS: epoch, route. ARGV: node, incarnation, shard, conn, ttl_ms.
/// Returns {epoch, previous node, inc, shard, conn, epoch}.
const CLAIM_LUA: &str = r#"
local e = redis.call('INCR', KEYS[1])
local prev = redis.call('HMGET', KEYS[2], 'node', 'inc', 'shard', 'conn', 'epoch')
redis.call('HSET', KEYS[2], 'node', ARGV[1], 'inc', ARGV[2], 'shard', ARGV[3], 'conn', ARGV[4], 'epoch', e)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {e, prev[1], prev[2], prev[3], prev[4], prev[5]}
"#;

/// KEYS: epoch, route. ARGV: node, incarnation, shard, conn, ttl_ms, epoch.
/// Writes only if no newer epoch was handed out. Returns 1 if written.
const REASSERT_LUA: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur > tonumber(ARGV[6]) then return 0 end
local stored = redis.call('HGET', KEYS[2], 'epoch')
if stored and tonumber(stored) > tonumber(ARGV[6]) then return 0 end
if cur < tonumber(ARGV[6]) then redis.call('SET', KEYS[1], ARGV[6]) end
redis.call('HSET', KEYS[2], 'node', ARGV[1], 'inc', ARGV[2], 'shard', ARGV[3], 'conn', ARGV[4], 'epoch', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"#;

/// KEYS: route. ARGV: epoch, node. Deletes only our own, current route.
const RELEASE_LUA: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'epoch', 'node')
if r[1] == ARGV[1] and r[2] == ARGV[2] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"#;

/// KEYS: node key, nodes zset. ARGV: incarnation, name. Removes only our
/// own registration (not a newer process's under the same name).
const DEREGISTER_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'inc') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"#;

/// KEYS: revocation log (sorted set), its sequence counter. ARGV: keep_ms,
/// expired_before (unix s), then members `d:<not_before>:<device>` or
/// `u:<not_before>:<user>`. Each member is scored with the next sequence
/// number; the oldest members no token can still need are dropped (they
/// were appended in time order; at most 1000 per call, so the script stays
/// short), and the log expires `keep_ms` after its last write. The counter
/// never expires: nodes read the log from where they stopped.
const REVOKE_LUA: &str = r#"
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[i])
end
for _ = 1, 1000 do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #first == 0 then break end
  local nb = tonumber(string.match(first[1], '^[du]:(%-?%d+):'))
  if nb ~= nil and nb >= tonumber(ARGV[2]) then break end
  redis.call('ZREM', KEYS[1], first[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"#;

impl Router {
    /// Starts the sidecars: the lease thread registers the node and renews
    /// its lease ([`lease`]); the router thread answers route
    /// requests. `on_reregister` runs on the lease thread after a
    /// re-registration (the caller re-asserts its routes).
    pub fn start(cfg: RouterConfig, on_reregister: Box<dyn Fn() + Send>) -> std::io::Result<Router> {
        let (handle, rx) = SidecarHandle::channel();
        let state = Arc::new(NodeState::default());
        let lease = LeaseSidecar::start(cfg.clone(), state.clone(), on_reregister)?;
        let sidecar = RouterSidecar::new(cfg, state.clone());
        thread::Builder::new().name("longlink-router".into()).spawn(move || sidecar.run(rx))?;
        Ok(Router { sidecar: handle, lease, state })
    }

    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    fn call(&self, op: Op) -> impl std::future::Future<Output = Result<Answer, RouterError>> + 'static {
        self.sidecar.call(op, |e| match e {
            NotSent::Full => RouterError::Overloaded,
            NotSent::Stopped => RouterError::Unavailable("router stopped".into()),
        })
    }

    /// A device logged in here: take a new epoch and point its route here.
    pub async fn claim(&self, device: &str, shard: u16, conn_id: u64) -> Result<Claimed, RouterError> {
        match self.call(Op::Claim { device: device.into(), shard, conn_id }).await? {
            Answer::Claimed(c) => Ok(c),
            _ => Err(RouterError::Protocol("claim".into())),
        }
    }

    /// Re-writes a route we hold, unless a newer login took the device.
    /// Returns false when the device now belongs to a newer login.
    pub async fn reassert(&self, device: &str, shard: u16, conn_id: u64, epoch: u64) -> Result<bool, RouterError> {
        match self.call(Op::Reassert { device: device.into(), shard, conn_id, epoch }).await? {
            Answer::Done(ok) => Ok(ok),
            _ => Err(RouterError::Protocol("reassert".into())),
        }
    }

    /// The session with `epoch` ended: delete the route if it is still ours.
    pub async fn release(&self, device: &str, epoch: u64) -> Result<bool, RouterError> {
        match self.call(Op::Release { device: device.into(), epoch }).await? {
            Answer::Done(ok) => Ok(ok),
            _ => Err(RouterError::Protocol("release".into())),
        }
    }

    /// Valid routes of `devices` (None: offline, or its node is gone).
    pub async fn lookup(&self, devices: Vec<String>) -> Result<Vec<Option<Route>>, RouterError> {
        match self.call(Op::Lookup { devices }).await? {
            Answer::Routes(r) => Ok(r),
            _ => Err(RouterError::Protocol("lookup".into())),
        }
    }

    /// Live nodes (for the dispatcher and cluster-wide fan-out).
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, RouterError> {
        self.nodes_fresh(Duration::MAX).await
    }

    /// Live nodes as of at most `max_age` ago (for cluster-wide requests,
    /// which must not miss a node that just joined).
    pub async fn nodes_fresh(&self, max_age: Duration) -> Result<Vec<NodeInfo>, RouterError> {
        match self.call(Op::Nodes { max_age }).await? {
            Answer::Nodes(n) => Ok(n),
            _ => Err(RouterError::Protocol("nodes".into())),
        }
    }

    /// Stores a revocation in Redis for every node, including those started
    /// later: tokens of `devices` and `users` issued at or before
    /// `not_before` are refused for `keep_secs` (the longest token
    /// lifetime), after which no such token is valid anyway.
    pub async fn revoke(
        &self,
        devices: Vec<String>,
        users: Vec<String>,
        not_before: i64,
        keep_secs: i64,
    ) -> Result<(), RouterError> {
        match self.call(Op::Revoke { devices, users, not_before, keep_secs }).await? {
            Answer::Done(_) => Ok(()),
            _ => Err(RouterError::Protocol("revoke".into())),
        }
    }

    /// The cluster's revocations stored after sequence number `after`
    /// (0: all), oldest first, at most `limit`; and the log's sequence
    /// counter (below `after`: Redis lost its data, read again from 0).
    pub async fn revocations_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<StoredRevocation>, u64), RouterError> {
        match self.call(Op::Revocations { after, limit }).await? {
            Answer::Revocations(r, counter) => Ok((r, counter)),
            _ => Err(RouterError::Protocol("revocations".into())),
        }
    }

    /// Marks the node as draining in the registry now (the dispatcher stops
    /// listing it), instead of at the next renewal.
    pub async fn announce_draining(&self) -> Result<(), RouterError> {
        self.state.set_draining(true);
        self.lease
            .call(LeaseOp::Announce, |e| match e {
                NotSent::Full => RouterError::Overloaded,
                NotSent::Stopped => RouterError::Unavailable("lease thread stopped".into()),
            })
            .await
    }

    /// Removes the node from the registry (clean exit). Requests queued
    /// before it (route releases) run first: the sidecar keeps order.
    pub async fn deregister(&self) -> Result<(), RouterError> {
        match self.call(Op::Deregister).await? {
            Answer::Done(_) => Ok(()),
            _ => Err(RouterError::Protocol("deregister".into())),
        }
    }
}

/// Reads the live nodes from Redis (the registry the routers keep): used by
/// the router sidecar and by the standalone dispatcher, which registers
/// nothing itself.
pub fn read_nodes(link: &mut RedisLink, prefix: &str) -> Result<Vec<NodeInfo>, Unavailable> {
    let now_ms = unix_ms();
    let mut pipe = redis::pipe();
    pipe.cmd("ZRANGEBYSCORE").arg(format!("{prefix}:nodes")).arg(now_ms).arg("+inf").arg("WITHSCORES");
    let values = link.query(&pipe)?;
    let Some(Value::Array(flat)) = values.first() else {
        return Err(Unavailable(format!("unexpected reply to ZRANGEBYSCORE: {values:?}")));
    };
    let (names, expiries): (Vec<String>, Vec<u64>) = flat
        .chunks(2)
        .filter_map(|kv| Some((as_string(kv.first()?)?, as_string(kv.get(1)?)?.parse::<f64>().ok()? as u64)))
        .unzip();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for n in &names {
        pipe.cmd("HMGET").arg(format!("{prefix}:node:{n}")).arg(&["inc", "client", "node", "draining"]);
    }
    let values = link.query(&pipe)?;
    Ok(names
        .into_iter()
        .zip(expiries)
        .zip(values)
        .filter_map(|((name, lease_expires_ms), v)| {
            let Value::Array(f) = v else { return None };
            let incarnation = f.first().and_then(as_u64)?;
            Some(NodeInfo {
                name,
                incarnation,
                client_endpoint: f.get(1).and_then(as_string).unwrap_or_default(),
                node_endpoint: f.get(2).and_then(as_string).unwrap_or_default(),
                draining: f.get(3).and_then(as_string).is_some_and(|d| d == "1"),
                lease_expires_ms,
            })
        })
        .collect())
}

struct RouterSidecar {
    cfg: RouterConfig,
    link: RedisLink,
    /// Fencing and leaving, as the lease thread and deregistration set them.
    state: Arc<NodeState>,
    /// Live nodes as of the last refresh (for route validity).
    nodes: HashMap<String, NodeInfo>,
    nodes_refreshed: Option<Instant>,
}

impl RouterSidecar {
    fn new(cfg: RouterConfig, state: Arc<NodeState>) -> RouterSidecar {
        let scripts =
            [CLAIM_LUA, REASSERT_LUA, RELEASE_LUA, DEREGISTER_LUA, REVOKE_LUA].map(redis::Script::new).to_vec();
        let link = RedisLink::new("router", &cfg.url, cfg.connect_timeout, cfg.io_timeout, scripts);
        RouterSidecar { cfg, link, state, nodes: HashMap::new(), nodes_refreshed: None }
    }

    fn run(mut self, rx: Receiver<Job>) {
        // The node table is read as often as the lease is renewed, so
        // `nodes()` answers stay as fresh as the registry.
        let every = self.cfg.lease / 3;
        loop {
            if self.nodes_refreshed.is_none_or(|t| t.elapsed() >= every) {
                self.refresh_nodes();
            }
            let wait = self.nodes_refreshed.map_or(every, |t| every.saturating_sub(t.elapsed()));
            let first = match rx.recv_timeout(wait) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let batch = take_batch(&rx, first);
            let answers = self.execute(&batch);
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = job.reply.send(answer);
            }
        }
    }

    fn p(&self, what: &str) -> String {
        format!("{}:{what}", self.cfg.prefix)
    }

    fn refresh_nodes(&mut self) {
        let nodes = match read_nodes(&mut self.link, &self.cfg.prefix) {
            Ok(nodes) => nodes,
            Err(_) => return self.state.note_redis_error(),
        };
        self.nodes_refreshed = Some(Instant::now());
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
    }

    fn route_valid(&self, r: &Route) -> bool {
        if r.node == self.cfg.node {
            return r.incarnation == self.cfg.incarnation && !self.state.is_fenced();
        }
        let now_ms = unix_ms();
        self.nodes.get(&r.node).is_some_and(|n| n.incarnation == r.incarnation && n.lease_expires_ms > now_ms)
    }

    /// Whether judging `r` needs a fresher node table: its node is unknown,
    /// its lease looks expired (it may have renewed since we looked), or the
    /// route names a later run of the node than the table (a restart that
    /// took its lease over; incarnations grow with start time).
    fn needs_refresh(&self, r: &Route) -> bool {
        r.node != self.cfg.node
            && self.nodes.get(&r.node).is_none_or(|n| n.lease_expires_ms <= unix_ms() || r.incarnation > n.incarnation)
    }

    fn execute(&mut self, batch: &[Job]) -> Vec<Result<Answer, RouterError>> {
        // A fenced node must not claim anything; it still serves lookups.
        let fenced = self.state.is_fenced();
        let refused = |op: &Op| fenced && matches!(op, Op::Claim { .. } | Op::Reassert { .. });
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let route_ttl = self.cfg.route_ttl.as_millis() as u64;
        // Commands per job, to split the replies again.
        let mut counts = Vec::with_capacity(batch.len());
        for job in batch {
            let n = match &job.op {
                op if refused(op) => 0,
                Op::Claim { device, shard, conn_id } | Op::Reassert { device, shard, conn_id, .. } => {
                    let is_claim = matches!(job.op, Op::Claim { .. });
                    let script = if is_claim { CLAIM } else { REASSERT };
                    let mut inv = self.link.script(script).prepare_invoke();
                    inv.key(self.p(&format!("epoch:{{{device}}}"))).key(self.p(&format!("route:{{{device}}}")));
                    inv.arg(&self.cfg.node).arg(self.cfg.incarnation).arg(shard).arg(conn_id).arg(route_ttl);
                    if let Op::Reassert { epoch, .. } = &job.op {
                        inv.arg(epoch);
                    }
                    pipe.invoke_script(&inv);
                    1
                }
                Op::Release { device, epoch } => {
                    let mut inv = self.link.script(RELEASE).prepare_invoke();
                    inv.key(self.p(&format!("route:{{{device}}}"))).arg(epoch).arg(&self.cfg.node);
                    pipe.invoke_script(&inv);
                    1
                }
                Op::Lookup { devices } => {
                    for d in devices {
                        pipe.cmd("HMGET")
                            .arg(self.p(&format!("route:{{{d}}}")))
                            .arg(&["node", "inc", "shard", "conn", "epoch"]);
                    }
                    devices.len()
                }
                Op::Nodes { .. } => 0,
                Op::Revoke { devices, users, not_before, keep_secs } => {
                    let mut inv = self.link.script(REVOKE).prepare_invoke();
                    inv.key(self.p("{revocations}")).key(self.p("{revocations}:seq"));
                    let keep_ms = keep_secs.saturating_mul(1000).max(1);
                    inv.arg(keep_ms).arg(unix_ms() as i64 / 1000 - keep_secs);
                    for (kind, ids) in [("d", devices), ("u", users)] {
                        for id in ids {
                            inv.arg(format!("{kind}:{not_before}:{id}"));
                        }
                    }
                    pipe.invoke_script(&inv);
                    1
                }
                Op::Revocations { after, limit } => {
                    pipe.cmd("ZRANGEBYSCORE")
                        .arg(self.p("{revocations}"))
                        .arg(format!("({after}"))
                        .arg("+inf")
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(*limit);
                    pipe.cmd("GET").arg(self.p("{revocations}:seq"));
                    2
                }
                Op::Deregister => {
                    // Before the script: the lease thread must not renew or
                    // register the node again once it is gone.
                    self.state.left.store(true, Ordering::Relaxed);
                    let mut inv = self.link.script(DEREGISTER).prepare_invoke();
                    inv.key(self.p(&format!("node:{}", self.cfg.node))).key(self.p("nodes"));
                    inv.arg(self.cfg.incarnation).arg(&self.cfg.node);
                    pipe.invoke_script(&inv);
                    1
                }
            };
            counts.push(n);
        }
        let max_age =
            batch.iter().filter_map(|j| if let Op::Nodes { max_age } = j.op { Some(max_age) } else { None }).min();
        // The lease thread registered this node after the table was read:
        // a node lists itself as soon as it is live.
        let missing_self = self.state.is_live() && !self.nodes.contains_key(&self.cfg.node);
        if let Some(max_age) = max_age
            && (missing_self || self.nodes_refreshed.is_none_or(|t| t.elapsed() > max_age))
        {
            self.refresh_nodes();
        }
        let values = if pipe.is_empty() { Ok(Vec::new()) } else { self.link.query(&pipe) };
        let values = match values {
            Ok(v) => v,
            Err(e) => {
                self.state.note_redis_error();
                return batch.iter().map(|_| Err(RouterError::from(e.clone()))).collect();
            }
        };
        // A route naming a node we have not seen yet (it joined since the
        // last refresh): refresh the node table before judging validity.
        let stale = values.iter().any(|v| match v {
            Value::Array(f) => {
                parse_route(f).or_else(|| f.get(1..).and_then(parse_route)).is_some_and(|r| self.needs_refresh(&r))
            }
            _ => false,
        });
        if stale && self.nodes_refreshed.is_none_or(|t| t.elapsed() > Duration::from_millis(5)) {
            self.refresh_nodes();
        }
        let mut it = values.into_iter();
        batch
            .iter()
            .zip(counts)
            .map(|(job, n)| {
                let mine: Vec<Value> = it.by_ref().take(n).collect();
                if refused(&job.op) {
                    return Err(RouterError::Unavailable("node fenced: its lease lapsed".into()));
                }
                self.answer(&job.op, mine)
            })
            .collect()
    }

    fn answer(&self, op: &Op, values: Vec<Value>) -> Result<Answer, RouterError> {
        let bad = |what: &str| RouterError::Protocol(format!("unexpected reply to {what}: {values:?}"));
        if let Some(Value::ServerError(e)) = values.iter().find(|v| matches!(v, Value::ServerError(_))) {
            return Err(RouterError::Protocol(format!("{e:?}")));
        }
        match op {
            Op::Claim { .. } => {
                let Some(Value::Array(f)) = values.first() else { return Err(bad("claim")) };
                let epoch = f.first().and_then(as_u64).ok_or_else(|| bad("claim"))?;
                let previous = parse_route(&f[1..]).filter(|r| self.route_valid(r));
                Ok(Answer::Claimed(Claimed { epoch, previous }))
            }
            Op::Deregister | Op::Revoke { .. } => Ok(Answer::Done(true)),
            Op::Revocations { .. } => {
                let Some(Value::Array(flat)) = values.first() else { return Err(bad("revocations")) };
                let entries = flat
                    .chunks(2)
                    .filter_map(|kv| {
                        let seq = as_string(kv.get(1)?)?.parse::<f64>().ok()? as u64;
                        parse_revocation(&as_string(kv.first()?)?, seq)
                    })
                    .collect();
                // Nil: nothing was ever revoked (or Redis lost it).
                let counter = values.get(1).and_then(as_u64).unwrap_or(0);
                Ok(Answer::Revocations(entries, counter))
            }
            Op::Reassert { .. } | Op::Release { .. } => {
                Ok(Answer::Done(values.first().and_then(as_u64).ok_or_else(|| bad("cas"))? == 1))
            }
            Op::Lookup { .. } => Ok(Answer::Routes(
                values
                    .iter()
                    .map(|v| match v {
                        Value::Array(f) => parse_route(f).filter(|r| self.route_valid(r)),
                        _ => None,
                    })
                    .collect(),
            )),
            Op::Nodes { .. } => {
                // The table may predate a lease running out: list live nodes only.
                let now_ms = unix_ms();
                let mut nodes: Vec<NodeInfo> =
                    self.nodes.values().filter(|n| n.lease_expires_ms > now_ms).cloned().collect();
                nodes.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Answer::Nodes(nodes))
            }
        }
    }
}

pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A member of the revocation log, `d:<not_before>:<device>` or
/// `u:<not_before>:<user>` (the id may contain ':').
fn parse_revocation(member: &str, seq: u64) -> Option<StoredRevocation> {
    let (kind, rest) = member.split_once(':')?;
    let (not_before, id) = rest.split_once(':')?;
    let is_user = match kind {
        "d" => false,
        "u" => true,
        _ => return None,
    };
    Some(StoredRevocation { seq, is_user, id: id.to_owned(), not_before: not_before.parse().ok()? })
}

/// node, inc, shard, conn, epoch (nil fields: no route).
fn parse_route(f: &[Value]) -> Option<Route> {
    Some(Route {
        node: f.first().and_then(as_string)?,
        incarnation: f.get(1).and_then(as_u64)?,
        shard: u16::try_from(f.get(2).and_then(as_u64)?).ok()?,
        conn_id: f.get(3).and_then(as_u64)?,
        epoch: f.get(4).and_then(as_u64)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_log_members_parse_with_colons_in_ids() {
        let r = parse_revocation("u:1700000000:team:alice", 7).expect("parses");
        assert_eq!((r.seq, r.is_user, r.id.as_str(), r.not_before), (7, true, "team:alice", 1_700_000_000));
        assert!(parse_revocation("d:-5:x", 1).is_some_and(|r| !r.is_user && r.not_before == -5));
        assert_eq!(parse_revocation("x:1:a", 1), None);
        assert_eq!(parse_revocation("d:soon:a", 1), None);
    }
}
