//! The node's lease in the cluster registry, kept by its own sidecar
//! thread with its own Redis connection.
//!
//! The registry entry `P:node:<name>` (see [`crate::router`]) must be
//! renewed within its lease or the node fences itself. Renewals therefore
//! never queue behind route work: a lookup of thousands of devices can take
//! seconds on a loaded host, and a renewal that waited for it let a healthy
//! node's lease lapse (seen in the 5,000-client drain test under CPU load).
//!
//! [`LeaseKeeper`] decides from renewal outcomes and the monotonic clock
//! alone (no I/O); [`NameHeld`] decides what a starting node does when its
//! name is held by another run.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::Value;
use tracing::{info, warn};

use crate::router::{NodeState, RouterConfig, RouterError, unix_ms};
use crate::sidecar::redis_link::{self, RedisLink, SidecarHandle, Unavailable, as_string, as_u64};

/// A reply as a signed integer (PTTL answers -1 and -2).
fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => as_string(other)?.parse().ok(),
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

/// Requests to the lease thread.
pub(crate) enum LeaseOp {
    /// Write the draining flag now (the dispatcher stops listing the node).
    Announce,
}

pub(crate) type LeaseHandle = SidecarHandle<LeaseOp, (), RouterError>;
type LeaseJob = redis_link::Job<LeaseOp, (), RouterError>;

/// The lease thread: registers the node, renews its lease, fences it.
pub(crate) struct LeaseSidecar {
    cfg: RouterConfig,
    link: RedisLink,
    state: Arc<NodeState>,
    keeper: LeaseKeeper,
    registered: bool,
    /// Runs after a re-registration (the node re-asserts its routes).
    on_reregister: Box<dyn Fn() + Send>,
    /// The draining flag as last written to the registry.
    announced_draining: bool,
    /// This process in the registry ([`process_identity`]).
    holder: String,
    /// Starting: the registration of another run that holds our name.
    held: Option<NameHeld>,
}

impl LeaseSidecar {
    /// Starts the lease thread; the handle asks it to announce draining.
    pub(crate) fn start(
        cfg: RouterConfig,
        state: Arc<NodeState>,
        on_reregister: Box<dyn Fn() + Send>,
    ) -> std::io::Result<LeaseHandle> {
        let (handle, rx) = SidecarHandle::channel();
        let link =
            RedisLink::new("lease", &cfg.url, cfg.connect_timeout, cfg.io_timeout, vec![redis::Script::new(RENEW_LUA)]);
        let keeper = LeaseKeeper::new(cfg.lease);
        let sidecar = LeaseSidecar {
            cfg,
            link,
            state,
            keeper,
            registered: false,
            on_reregister,
            announced_draining: false,
            holder: process_identity(),
            held: None,
        };
        thread::Builder::new().name("longlink-lease".into()).spawn(move || sidecar.run(rx))?;
        Ok(handle)
    }

    fn run(mut self, rx: Receiver<LeaseJob>) {
        let mut next_renew = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_renew || self.state.is_draining() != self.announced_draining {
                self.renew();
                // Waiting for the lease of a previous run to lapse: look often.
                let every = if self.held.is_some() { self.cfg.lease / 10 } else { self.keeper.interval() };
                next_renew = Instant::now() + every;
            }
            match rx.recv_timeout(next_renew.saturating_duration_since(Instant::now())) {
                Ok(job) => {
                    let LeaseOp::Announce = job.op;
                    if self.state.is_draining() != self.announced_draining {
                        self.renew();
                    }
                    let _ = job.reply.send(Ok(()));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn p(&self, what: &str) -> String {
        format!("{}:{what}", self.cfg.prefix)
    }

    fn renew(&mut self) {
        if self.keeper.is_fenced() || self.state.has_left() {
            return;
        }
        if self.state.take_redis_error() {
            self.keeper.on_redis_error();
        }
        let now_ms = unix_ms();
        let lease_ms = self.cfg.lease.as_millis() as u64;
        self.announced_draining = self.state.is_draining();
        let attempt = |this: &mut LeaseSidecar, create: bool, replace: Option<u64>| -> Result<Renewal, Unavailable> {
            let mut inv = this.link.script(0).prepare_invoke();
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
                self.state.set_live();
            }
            LeaseAction::Retry => {}
            LeaseAction::Reregister if self.state.has_left() => {}
            LeaseAction::Reregister => {
                warn!(node = %self.cfg.node, "registration lost while Redis was unreachable; registering again");
                if matches!(attempt(self, true, None), Ok(Renewal::Ok)) {
                    self.keeper.on_registered(Instant::now());
                    self.registered = true;
                    self.state.set_live();
                    (self.on_reregister)();
                }
            }
            LeaseAction::Fence | LeaseAction::Taken => {
                warn!(node = %self.cfg.node, ?outcome, "lease lost: fencing this node (stop accepting, drain, exit with status 3)");
                self.state.set_fenced();
            }
        }
    }
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
