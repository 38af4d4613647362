//! The cluster router: which node holds each device, in Redis.
//!
//! - Node registry: `P:node:<name>` (a hash: incarnation, endpoints,
//!   draining) with a lease (PEXPIRE), renewed by a sidecar thread, and
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
use tracing::{info, warn};

use crate::redis_link::{self, NotSent, RedisLink, SidecarHandle, Unavailable, as_string, as_u64, take_batch};

/// A reply as a signed integer (PTTL answers -1 and -2).
fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => as_string(other)?.parse().ok(),
    }
}

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

/// The lease state of this node, readable by every shard.
#[derive(Debug, Default)]
pub struct NodeState {
    /// 0 unregistered, 1 live, 2 fenced (stop accepting, drain).
    state: AtomicU8,
    draining: AtomicBool,
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
}

/// What the lease keeper decides after a renewal attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// Renewed; nothing else to do.
    Renewed,
    /// Our registration is gone because Redis was unreachable or restarted:
    /// register again and re-assert every local route.
    Reregister,
    /// Our lease lapsed while we made no attempt (we were paused): others
    /// may own our devices. Stop accepting and drain.
    Fence,
    /// Another process registered under our node name.
    Taken,
    /// Redis is unreachable; keep serving, try again.
    Retry,
}

/// Whether the process a registry entry names is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// It ran on this host and is gone (or its pid now names another process).
    Gone,
    /// Another host or pid namespace, or no identity recorded.
    Unknown,
}

/// What a starting node does when its name is registered by another
/// incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAction {
    /// The holder is a dead run of this node: replace its incarnation.
    TakeOver,
    /// Look again shortly: the lease may lapse on its own.
    Wait,
    /// A live process holds the name: fence (and exit).
    GiveUp,
}

/// A starting node's view of the registration that holds its name (no
/// I/O): the holder's incarnation and how its lease ran, observed over time.
#[derive(Clone, Debug)]
pub struct NameHeld {
    incarnation: u64,
    first_seen: Instant,
    last_pttl_ms: i64,
}

impl NameHeld {
    pub fn new(incarnation: u64, pttl_ms: i64, now: Instant) -> NameHeld {
        NameHeld { incarnation, first_seen: now, last_pttl_ms: pttl_ms }
    }

    /// One more look at the registration: holder `incarnation`, whose
    /// process is `holder`, with `pttl_ms` of its lease left.
    pub fn observe(
        &mut self,
        incarnation: u64,
        holder: Liveness,
        pttl_ms: i64,
        now: Instant,
        lease: Duration,
    ) -> StartAction {
        match holder {
            Liveness::Alive => return StartAction::GiveUp,
            Liveness::Gone if incarnation == self.incarnation => return StartAction::TakeOver,
            _ => {}
        }
        // Renewed since the last look, or registered anew: someone is alive.
        let renewed = incarnation != self.incarnation || pttl_ms > self.last_pttl_ms;
        self.last_pttl_ms = pttl_ms;
        if renewed || now.duration_since(self.first_seen) > lease + lease / 2 {
            StartAction::GiveUp
        } else {
            StartAction::Wait
        }
    }
}

/// How this process names itself in the registry, so that a later run of
/// the node on the same host can tell whether it still runs: boot id, pid
/// namespace, pid and start time (a pid alone may be reused).
pub fn process_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
    let pid = std::process::id();
    let start = start_time(pid).unwrap_or(0);
    format!("{}/{ns}/{pid}/{start}", boot.trim())
}

/// Whether the process `identity` ([`process_identity`]) names runs.
pub fn liveness(identity: &str) -> Liveness {
    let mut theirs = identity.splitn(4, '/');
    let mine = process_identity();
    let mut ours = mine.splitn(4, '/');
    let (Some(boot), Some(ns), Some(pid), Some(start)) = (theirs.next(), theirs.next(), theirs.next(), theirs.next())
    else {
        return Liveness::Unknown;
    };
    if boot.is_empty() || ns.is_empty() || ours.next() != Some(boot) || ours.next() != Some(ns) {
        return Liveness::Unknown;
    }
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else { return Liveness::Unknown };
    if start_time(pid) == Some(start) { Liveness::Alive } else { Liveness::Gone }
}

/// Field 22 of /proc/<pid>/stat: when the process started, in clock ticks
/// since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The outcome of one renewal round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewOutcome {
    /// The key existed with our incarnation and was extended.
    Extended,
    /// The key was missing (not recreated).
    Missing,
    /// The key holds another incarnation.
    Taken,
    /// No answer from Redis.
    Unreachable,
}

/// Decides fencing from renewal outcomes and the monotonic clock (no I/O).
#[derive(Debug)]
pub struct LeaseKeeper {
    lease: Duration,
    last_renewed: Option<Instant>,
    /// Whether a renewal failed for lack of Redis since the last success.
    outage: bool,
    /// Set once fenced: never renew again.
    fenced: bool,
}

impl LeaseKeeper {
    pub fn new(lease: Duration) -> LeaseKeeper {
        LeaseKeeper { lease, last_renewed: None, outage: false, fenced: false }
    }

    /// How often to renew: three tries per lease.
    pub fn interval(&self) -> Duration {
        self.lease / 3
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    pub fn on_outcome(&mut self, outcome: RenewOutcome, now: Instant) -> LeaseAction {
        if self.fenced {
            return LeaseAction::Fence;
        }
        match outcome {
            RenewOutcome::Extended => {
                self.last_renewed = Some(now);
                self.outage = false;
                LeaseAction::Renewed
            }
            RenewOutcome::Unreachable => {
                self.outage = true;
                LeaseAction::Retry
            }
            RenewOutcome::Taken => {
                self.fenced = true;
                LeaseAction::Taken
            }
            RenewOutcome::Missing => {
                let lapsed_silently = match self.last_renewed {
                    // First registration.
                    None => false,
                    Some(t) => now.duration_since(t) >= self.lease && !self.outage,
                };
                if lapsed_silently {
                    self.fenced = true;
                    LeaseAction::Fence
                } else {
                    LeaseAction::Reregister
                }
            }
        }
    }

    /// Another call to Redis failed for lack of Redis: a lease found
    /// lapsed later is blamed on the outage, not on this node being stopped.
    pub fn on_redis_error(&mut self) {
        self.outage = true;
    }

    /// Registered (again).
    pub fn on_registered(&mut self, now: Instant) {
        self.last_renewed = Some(now);
        self.outage = false;
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
}

enum Answer {
    Claimed(Claimed),
    Done(bool),
    Routes(Vec<Option<Route>>),
    Nodes(Vec<NodeInfo>),
}

type Job = redis_link::Job<Op, Answer, RouterError>;

/// A handle to the router sidecar, cheap to clone into every shard.
#[derive(Clone)]
pub struct Router {
    sidecar: SidecarHandle<Op, Answer, RouterError>,
    state: Arc<NodeState>,
}

/// Indexes of the scripts in the link.
const CLAIM: usize = 0;
const REASSERT: usize = 1;
const RELEASE: usize = 2;
const RENEW: usize = 3;
const DEREGISTER: usize = 4;

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

/// KEYS: node key, nodes zset. ARGV: incarnation, lease_ms, now_ms, name,
/// client endpoint, node endpoint, draining, create (1/0), holder (this
/// process), replace (an incarnation this one may take over, or '').
/// Returns 'ok', 'missing', or {'taken', incarnation, holder, pttl}.
const RENEW_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'inc')
if cur and cur ~= ARGV[1] and cur ~= ARGV[10] then
  return {'taken', cur, redis.call('HGET', KEYS[1], 'holder') or '', redis.call('PTTL', KEYS[1])}
end
if not cur and ARGV[8] ~= '1' then return 'missing' end
redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'client', ARGV[5], 'node', ARGV[6], 'draining', ARGV[7], 'holder', ARGV[9])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
return 'ok'
"#;

impl Router {
    /// Starts the sidecar: it registers the node, renews the lease, and
    /// answers route requests. `on_reregister` runs on the sidecar thread
    /// after a re-registration (the caller re-asserts its routes).
    pub fn start(cfg: RouterConfig, on_reregister: Box<dyn Fn() + Send>) -> std::io::Result<Router> {
        let (handle, rx) = SidecarHandle::channel();
        let state = Arc::new(NodeState::default());
        let sidecar = RouterSidecar::new(cfg, state.clone(), on_reregister);
        thread::Builder::new().name("longlink-router".into()).spawn(move || sidecar.run(rx))?;
        Ok(Router { sidecar: handle, state })
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

    /// Marks the node as draining in the registry now (the dispatcher stops
    /// listing it), instead of at the next renewal.
    pub async fn announce_draining(&self) -> Result<(), RouterError> {
        self.state.set_draining(true);
        // Any request wakes the sidecar, which renews when the flag changed.
        self.nodes().await.map(|_| ())
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
    state: Arc<NodeState>,
    keeper: LeaseKeeper,
    registered: bool,
    /// Live nodes as of the last refresh (for route validity).
    nodes: HashMap<String, NodeInfo>,
    nodes_refreshed: Option<Instant>,
    on_reregister: Box<dyn Fn() + Send>,
    /// The draining flag as last written to the registry.
    announced_draining: bool,
    /// Left the registry on purpose: never renew again.
    deregistered: bool,
    /// This process in the registry ([`process_identity`]).
    holder: String,
    /// Starting: the registration of another run that holds our name.
    held: Option<NameHeld>,
}

/// What one renewal script answered.
enum Renewal {
    Ok,
    Missing,
    /// Another incarnation holds the name: it, its process, its lease left.
    Taken {
        incarnation: u64,
        holder: String,
        pttl_ms: i64,
    },
}

impl RouterSidecar {
    fn new(cfg: RouterConfig, state: Arc<NodeState>, on_reregister: Box<dyn Fn() + Send>) -> RouterSidecar {
        let scripts =
            [CLAIM_LUA, REASSERT_LUA, RELEASE_LUA, RENEW_LUA, DEREGISTER_LUA].map(redis::Script::new).to_vec();
        let link = RedisLink::new("router", &cfg.url, cfg.connect_timeout, cfg.io_timeout, scripts);
        let keeper = LeaseKeeper::new(cfg.lease);
        RouterSidecar {
            cfg,
            link,
            state,
            keeper,
            registered: false,
            nodes: HashMap::new(),
            nodes_refreshed: None,
            on_reregister,
            announced_draining: false,
            deregistered: false,
            holder: process_identity(),
            held: None,
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        let mut next_renew = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_renew || self.state.is_draining() != self.announced_draining {
                self.renew();
                // Waiting for the lease of a previous run to lapse: look often.
                let every = if self.held.is_some() { self.cfg.lease / 10 } else { self.keeper.interval() };
                next_renew = Instant::now() + every;
            }
            let first = match rx.recv_timeout(next_renew.saturating_duration_since(Instant::now())) {
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

    fn renew(&mut self) {
        if self.keeper.is_fenced() || self.deregistered {
            return;
        }
        let now_ms = unix_ms();
        let lease_ms = self.cfg.lease.as_millis() as u64;
        self.announced_draining = self.state.is_draining();
        let attempt = |this: &mut RouterSidecar, create: bool, replace: Option<u64>| -> Result<Renewal, Unavailable> {
            let mut inv = this.link.script(RENEW).prepare_invoke();
            inv.key(this.p(&format!("node:{}", this.cfg.node))).key(this.p("nodes"));
            inv.arg(this.cfg.incarnation)
                .arg(lease_ms)
                .arg(now_ms)
                .arg(&this.cfg.node)
                .arg(&this.cfg.client_endpoint)
                .arg(&this.cfg.node_endpoint)
                .arg(u8::from(this.announced_draining))
                .arg(u8::from(create))
                .arg(&this.holder)
                .arg(replace.map(|inc| inc.to_string()).unwrap_or_default());
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.invoke_script(&inv);
            let values = this.link.query(&pipe)?;
            Ok(match values.first() {
                Some(Value::Array(f)) => Renewal::Taken {
                    incarnation: f.get(1).and_then(as_u64).unwrap_or(0),
                    holder: f.get(2).and_then(as_string).unwrap_or_default(),
                    pttl_ms: f.get(3).and_then(as_i64).unwrap_or(0),
                },
                Some(v) if as_string(v).as_deref() == Some("ok") => Renewal::Ok,
                _ => Renewal::Missing,
            })
        };
        let mut answer = attempt(self, !self.registered, None);
        if !self.registered
            && let Ok(Renewal::Taken { incarnation, holder, pttl_ms }) = &answer
        {
            // Starting while another run holds our name.
            let now = Instant::now();
            let first_look = self.held.is_none();
            let held = self.held.get_or_insert_with(|| NameHeld::new(*incarnation, *pttl_ms, now));
            let alive = liveness(holder);
            match held.observe(*incarnation, alive, *pttl_ms, now, self.cfg.lease) {
                StartAction::TakeOver => {
                    info!(node = %self.cfg.node, previous = incarnation, %holder, "taking over the lease of a previous run of this node (its process is gone)");
                    answer = attempt(self, true, Some(*incarnation));
                }
                StartAction::Wait => {
                    if first_look {
                        info!(node = %self.cfg.node, previous = incarnation, %holder, lease_left_ms = pttl_ms, "another run of this node holds its name; waiting for its lease to lapse");
                    }
                    return;
                }
                StartAction::GiveUp => {
                    warn!(node = %self.cfg.node, previous = incarnation, %holder, ?alive, "a live process holds this node's name");
                }
            }
        }
        let outcome = match answer {
            Err(_) => RenewOutcome::Unreachable,
            Ok(Renewal::Ok) => RenewOutcome::Extended,
            Ok(Renewal::Taken { .. }) => RenewOutcome::Taken,
            Ok(Renewal::Missing) => RenewOutcome::Missing,
        };
        if !matches!(outcome, RenewOutcome::Taken) {
            self.held = None;
        }
        match self.keeper.on_outcome(outcome, Instant::now()) {
            LeaseAction::Renewed => {
                if !self.registered {
                    info!(node = %self.cfg.node, "registered in the cluster");
                }
                self.registered = true;
                self.state.state.store(1, Ordering::Relaxed);
            }
            LeaseAction::Retry => {}
            LeaseAction::Reregister => {
                warn!(node = %self.cfg.node, "registration lost while Redis was unreachable; registering again");
                if matches!(attempt(self, true, None), Ok(Renewal::Ok)) {
                    self.keeper.on_registered(Instant::now());
                    self.registered = true;
                    self.state.state.store(1, Ordering::Relaxed);
                    (self.on_reregister)();
                }
            }
            LeaseAction::Fence | LeaseAction::Taken => {
                warn!(node = %self.cfg.node, ?outcome, "lease lost: fencing this node (stop accepting, drain, exit with status 3)");
                self.state.state.store(2, Ordering::Relaxed);
            }
        }
        self.refresh_nodes();
    }

    fn refresh_nodes(&mut self) {
        let nodes = match read_nodes(&mut self.link, &self.cfg.prefix) {
            Ok(nodes) => nodes,
            Err(_) => return self.keeper.on_redis_error(),
        };
        self.nodes_refreshed = Some(Instant::now());
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
    }

    fn route_valid(&self, r: &Route) -> bool {
        if r.node == self.cfg.node {
            return r.incarnation == self.cfg.incarnation && !self.keeper.is_fenced();
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
        let fenced = self.keeper.is_fenced();
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
                Op::Deregister => {
                    self.deregistered = true;
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
        if let Some(max_age) = max_age
            && self.nodes_refreshed.is_none_or(|t| t.elapsed() > max_age)
        {
            self.refresh_nodes();
        }
        let values = if pipe.is_empty() { Ok(Vec::new()) } else { self.link.query(&pipe) };
        let values = match values {
            Ok(v) => v,
            Err(e) => {
                self.keeper.on_redis_error();
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
            Op::Deregister => Ok(Answer::Done(true)),
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

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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

    const LEASE: Duration = Duration::from_secs(3);

    #[test]
    fn renewals_keep_the_lease() {
        let t0 = Instant::now();
        let mut k = LeaseKeeper::new(LEASE);
        assert_eq!(k.on_outcome(RenewOutcome::Missing, t0), LeaseAction::Reregister, "first registration");
        k.on_registered(t0);
        assert_eq!(k.on_outcome(RenewOutcome::Extended, t0 + Duration::from_secs(1)), LeaseAction::Renewed);
        assert_eq!(k.interval(), Duration::from_secs(1));
    }

    #[test]
    fn a_paused_node_fences_itself() {
        let t0 = Instant::now();
        let mut k = LeaseKeeper::new(LEASE);
        k.on_registered(t0);
        // SIGSTOP for 10 s: no attempt was made, the lease lapsed.
        assert_eq!(k.on_outcome(RenewOutcome::Missing, t0 + Duration::from_secs(10)), LeaseAction::Fence);
        assert!(k.is_fenced());
        assert_eq!(k.on_outcome(RenewOutcome::Extended, t0 + Duration::from_secs(11)), LeaseAction::Fence);
    }

    #[test]
    fn a_redis_outage_re_registers_instead() {
        let t0 = Instant::now();
        let mut k = LeaseKeeper::new(LEASE);
        k.on_registered(t0);
        assert_eq!(k.on_outcome(RenewOutcome::Unreachable, t0 + Duration::from_secs(1)), LeaseAction::Retry);
        assert_eq!(k.on_outcome(RenewOutcome::Unreachable, t0 + Duration::from_secs(2)), LeaseAction::Retry);
        // Redis came back empty (restart) or our key expired meanwhile.
        assert_eq!(k.on_outcome(RenewOutcome::Missing, t0 + Duration::from_secs(10)), LeaseAction::Reregister);
        assert!(!k.is_fenced());
    }

    #[test]
    fn a_failed_call_during_the_lease_counts_as_an_outage() {
        let t0 = Instant::now();
        let mut k = LeaseKeeper::new(LEASE);
        k.on_registered(t0);
        // A lookup timed out while Redis was paused; the lease ran out meanwhile.
        k.on_redis_error();
        assert_eq!(k.on_outcome(RenewOutcome::Missing, t0 + Duration::from_secs(5)), LeaseAction::Reregister);
        assert!(!k.is_fenced());
    }

    #[test]
    fn a_restart_takes_over_a_dead_run_waits_for_an_unknown_one_and_yields_to_a_live_one() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // The previous run on this host is gone: take over at once.
        let mut held = NameHeld::new(7, 2_500, t0);
        assert_eq!(held.observe(7, Liveness::Gone, 2_400, t0, LEASE), StartAction::TakeOver);
        // Alive: two processes must not share a name.
        assert_eq!(NameHeld::new(7, 2_500, t0).observe(7, Liveness::Alive, 2_400, t0, LEASE), StartAction::GiveUp);
        // Another host: wait while the lease runs down...
        let mut held = NameHeld::new(7, 2_500, t0);
        assert_eq!(held.observe(7, Liveness::Unknown, 2_000, t0 + ms(500), LEASE), StartAction::Wait);
        assert_eq!(held.observe(7, Liveness::Unknown, 1_000, t0 + ms(1_500), LEASE), StartAction::Wait);
        // ...and give up when it is renewed (its holder lives).
        assert_eq!(held.observe(7, Liveness::Unknown, 2_900, t0 + ms(1_600), LEASE), StartAction::GiveUp);
        // A lease that never runs out (no TTL) is not waited for forever.
        let mut held = NameHeld::new(7, -1, t0);
        assert_eq!(held.observe(7, Liveness::Unknown, -1, t0 + ms(1_000), LEASE), StartAction::Wait);
        assert_eq!(held.observe(7, Liveness::Unknown, -1, t0 + LEASE * 2, LEASE), StartAction::GiveUp);
        // Another process registered meanwhile.
        let mut held = NameHeld::new(7, 2_500, t0);
        assert_eq!(held.observe(8, Liveness::Gone, 2_500, t0 + ms(100), LEASE), StartAction::GiveUp);
    }

    #[test]
    fn a_process_identity_tells_a_live_process_from_a_dead_one() {
        let me = process_identity();
        assert_eq!(liveness(&me), Liveness::Alive);
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        let _ = child.wait();
        let (boot_ns, _) = me.rsplit_once('/').and_then(|(rest, _)| rest.rsplit_once('/')).expect("identity");
        assert_eq!(liveness(&format!("{boot_ns}/{pid}/1")), Liveness::Gone);
        // Our pid with another start time: the pid was reused.
        assert_eq!(liveness(&format!("{boot_ns}/{}/1", std::process::id())), Liveness::Gone);
        assert_eq!(liveness("other-boot/pid:[1]/1/1"), Liveness::Unknown);
        assert_eq!(liveness(""), Liveness::Unknown);
    }

    #[test]
    fn a_name_taken_by_another_process_fences() {
        let mut k = LeaseKeeper::new(LEASE);
        assert_eq!(k.on_outcome(RenewOutcome::Taken, Instant::now()), LeaseAction::Taken);
        assert!(k.is_fenced());
    }
}
