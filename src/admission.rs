//! Per-source admission on the client listeners: how many connections one
//! address (IPv4 /32, IPv6 /128) and one network (IPv4 /24, IPv6 /64) may
//! hold at once, and how many it may open per second.
//!
//! One table for the whole node, shared by every shard without a lock:
//! fixed arrays of atomic counters indexed by a keyed hash of the source.
//! Shared rather than a per-shard share of each limit because a connection
//! is accepted on one shard and closed on its device's owner shard (after
//! the hand-off), and because the kernel's SO_REUSEPORT hash spreads one
//! source over the shards unevenly, so a per-shard share would refuse a
//! busy but honest source (a carrier NAT) early on one shard. An accept
//! touches at most four cache lines; only accepts from the same source on
//! two cores at once contend.
//!
//! Sources that hash to the same slot share its limit (a count-min sketch
//! of depth one): with [`SLOTS`] slots this adds little to a slot unless
//! the node holds hundreds of thousands of distinct sources, and the hash
//! key is random per process, so an attacker cannot aim at a victim's slot.
//! Memory is fixed (no entry per source): many sources cost nothing more.
//!
//! The accept rate is a fixed one-second window per slot (a burst of up to
//! twice the rate across a window edge passes). An address's attempts
//! count against its own rate even when refused; its network's rate and
//! count are charged only once the address's own limits let it in, so one
//! noisy address cannot lock its neighbours out.
//!
//! A reload (SIGHUP, `POST /reload`) changes the four limits in place
//! ([`Admission::set_limits`]: atomics, read with relaxed loads at accept).
//! A node started with every limit off has no table; a reload that turns
//! one on allocates it then, and connections opened before are not
//! counted. The exempt list needs a restart.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

/// Slots per table (a power of two; slot indices fit in 16 bits).
pub const SLOTS: usize = 1 << 15;

/// The limits, from `[server]` (0 = no limit).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_connections_per_ip: u32,
    pub max_connections_per_net: u32,
    pub accepts_per_ip_per_sec: u32,
    pub accepts_per_net_per_sec: u32,
    /// Addresses never limited (by default the host itself: a local proxy
    /// or health check; every client behind such a proxy shares its address).
    pub exempt: Vec<IpAddr>,
}

impl AdmissionLimits {
    /// The limits of `[server]`.
    pub fn of(server: &crate::config::ServerConfig) -> AdmissionLimits {
        AdmissionLimits {
            max_connections_per_ip: server.max_connections_per_ip,
            max_connections_per_net: server.max_connections_per_net,
            accepts_per_ip_per_sec: server.accepts_per_ip_per_sec,
            accepts_per_net_per_sec: server.accepts_per_net_per_sec,
            exempt: server.admission_exempt.clone(),
        }
    }

    fn is_off(&self) -> bool {
        self.max_connections_per_ip == 0
            && self.max_connections_per_net == 0
            && self.accepts_per_ip_per_sec == 0
            && self.accepts_per_net_per_sec == 0
    }
}

/// Why a connection was refused at accept (a label in /metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    IpConnections = 0,
    NetConnections = 1,
    IpRate = 2,
    NetRate = 3,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [Refusal::IpConnections, Refusal::NetConnections, Refusal::IpRate, Refusal::NetRate];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::IpConnections => "ip_connections",
            Refusal::NetConnections => "net_connections",
            Refusal::IpRate => "ip_rate",
            Refusal::NetRate => "net_rate",
        }
    }
}

/// A connection's charge in the table, returned by [`Admission::release`]
/// when it closes. Four bytes: it travels with the connection task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    ip: u16,
    net: u16,
}

impl Admitted {
    /// Charged nowhere (an exempt source, limits off, tests).
    pub const NONE: Admitted = Admitted { ip: u16::MAX, net: u16::MAX };
}

/// The node's admission table. See the module docs.
pub struct Admission {
    /// The four limits (0 = none), changed in place by a reload.
    max_ip: AtomicU32,
    max_net: AtomicU32,
    rate_ip: AtomicU32,
    rate_net: AtomicU32,
    exempt: Vec<IpAddr>,
    /// Random per process: sources cannot be chosen to collide.
    hasher: RandomState,
    /// Allocated once some limit is on.
    tables: OnceLock<Tables>,
}

/// The counters, [`SLOTS`] of each.
struct Tables {
    ip_conns: Box<[AtomicU32]>,
    net_conns: Box<[AtomicU32]>,
    /// (window second << 32) | attempts in that second.
    ip_rate: Box<[AtomicU64]>,
    net_rate: Box<[AtomicU64]>,
}

impl Tables {
    fn new() -> Tables {
        Tables {
            ip_conns: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            net_conns: (0..SLOTS).map(|_| AtomicU32::new(0)).collect(),
            ip_rate: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            net_rate: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("limits", &self.limits()).finish_non_exhaustive()
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits) -> Admission {
        let admission = Admission {
            max_ip: AtomicU32::new(0),
            max_net: AtomicU32::new(0),
            rate_ip: AtomicU32::new(0),
            rate_net: AtomicU32::new(0),
            exempt: limits.exempt.clone(),
            hasher: RandomState::new(),
            tables: OnceLock::new(),
        };
        admission.set_limits(&limits);
        admission
    }

    /// New limits (a reload); the exempt list stays as started. With every
    /// limit off nothing is charged until one is on: no table until then.
    pub fn set_limits(&self, limits: &AdmissionLimits) {
        if !limits.is_off() {
            self.tables.get_or_init(Tables::new);
        }
        self.max_ip.store(limits.max_connections_per_ip, Ordering::Relaxed);
        self.max_net.store(limits.max_connections_per_net, Ordering::Relaxed);
        self.rate_ip.store(limits.accepts_per_ip_per_sec, Ordering::Relaxed);
        self.rate_net.store(limits.accepts_per_net_per_sec, Ordering::Relaxed);
    }

    /// The limits in force.
    pub fn limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_connections_per_ip: self.max_ip.load(Ordering::Relaxed),
            max_connections_per_net: self.max_net.load(Ordering::Relaxed),
            accepts_per_ip_per_sec: self.rate_ip.load(Ordering::Relaxed),
            accepts_per_net_per_sec: self.rate_net.load(Ordering::Relaxed),
            exempt: self.exempt.clone(),
        }
    }

    /// The table, unless `peer` is never charged (exempt, or no limit was
    /// ever on).
    fn tables_for(&self, peer: IpAddr) -> Option<&Tables> {
        self.tables.get().filter(|_| !self.exempt.contains(&peer))
    }

    /// Charges a new connection from `peer` at `now_secs` (any clock in
    /// seconds), or says why it is refused (nothing stays charged then).
    pub fn admit(&self, peer: IpAddr, now_secs: u64) -> Result<Admitted, Refusal> {
        let peer = peer.to_canonical();
        let Some(t) = self.tables_for(peer) else { return Ok(Admitted::NONE) };
        let (ip_key, net_key) = keys(peer);
        let ip = self.slot(ip_key);
        let net = self.slot(net_key);
        let load = |limit: &AtomicU32| limit.load(Ordering::Relaxed);
        if !take_rate(&t.ip_rate[usize::from(ip)], load(&self.rate_ip), now_secs) {
            return Err(Refusal::IpRate);
        }
        if !take_conn(&t.ip_conns[usize::from(ip)], load(&self.max_ip)) {
            return Err(Refusal::IpConnections);
        }
        if !take_conn(&t.net_conns[usize::from(net)], load(&self.max_net)) {
            t.ip_conns[usize::from(ip)].fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::NetConnections);
        }
        if !take_rate(&t.net_rate[usize::from(net)], load(&self.rate_net), now_secs) {
            t.ip_conns[usize::from(ip)].fetch_sub(1, Ordering::Relaxed);
            t.net_conns[usize::from(net)].fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::NetRate);
        }
        Ok(Admitted { ip, net })
    }

    /// Charges a connection the previous process admitted (in-place
    /// upgrade): counted like any other, never refused, no rate taken.
    pub fn carry_over(&self, peer: IpAddr) -> Admitted {
        let peer = peer.to_canonical();
        let Some(t) = self.tables_for(peer) else { return Admitted::NONE };
        let (ip_key, net_key) = keys(peer);
        let (ip, net) = (self.slot(ip_key), self.slot(net_key));
        t.ip_conns[usize::from(ip)].fetch_add(1, Ordering::Relaxed);
        t.net_conns[usize::from(net)].fetch_add(1, Ordering::Relaxed);
        Admitted { ip, net }
    }

    /// Gives back what [`Admission::admit`] charged (once per connection).
    pub fn release(&self, admitted: Admitted) {
        let Some(t) = self.tables.get().filter(|_| admitted != Admitted::NONE) else { return };
        for (table, slot) in [(&t.ip_conns, admitted.ip), (&t.net_conns, admitted.net)] {
            if let Some(count) = table.get(usize::from(slot)) {
                // Never below zero, even if a bug released twice.
                let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
    }

    /// Connections charged to `peer`'s address and network now (tests).
    pub fn held(&self, peer: IpAddr) -> (u32, u32) {
        let Some(t) = self.tables.get() else { return (0, 0) };
        let (ip_key, net_key) = keys(peer.to_canonical());
        let ip = usize::from(self.slot(ip_key));
        let net = usize::from(self.slot(net_key));
        (t.ip_conns[ip].load(Ordering::Relaxed), t.net_conns[net].load(Ordering::Relaxed))
    }

    fn slot(&self, key: (u8, u128)) -> u16 {
        // SLOTS is 2^15: the mask keeps the index in range and in 16 bits.
        (self.hasher.hash_one(key) as usize & (SLOTS - 1)) as u16
    }
}

/// Hash keys of the address and of its network (/24 or /64), tagged so
/// that no two kinds of key can be equal.
fn keys(peer: IpAddr) -> ((u8, u128), (u8, u128)) {
    match peer {
        IpAddr::V4(v4) => {
            let a = u32::from(v4);
            ((4, u128::from(a)), (24, u128::from(a & 0xffff_ff00)))
        }
        IpAddr::V6(v6) => {
            let a = u128::from(v6);
            ((6, a), (64, a >> 64))
        }
    }
}

/// One more connection unless `max` (0 = none) is reached.
fn take_conn(count: &AtomicU32, max: u32) -> bool {
    if max == 0 {
        count.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
}

/// One more accept in this second's window unless `rate` (0 = none) is used up.
fn take_rate(window: &AtomicU64, rate: u32, now_secs: u64) -> bool {
    if rate == 0 {
        return true;
    }
    let now = now_secs & 0xffff_ffff;
    window
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            let (second, used) = (w >> 32, w & 0xffff_ffff);
            if second != now {
                Some(now << 32 | 1)
            } else if used < u64::from(rate) {
                Some(w + 1)
            } else {
                None
            }
        })
        .is_ok()
}

/// Refusals at accept, logged at most once per [`RefusalLog::EVERY`] per
/// listener with how many there were since (an attack must not flood the log).
#[derive(Default)]
pub(crate) struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn note(&mut self, shard: crate::protocol::ids::ShardId, refusal: Refusal, peer: IpAddr, now: Instant) {
        self.since += 1;
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY) {
            return;
        }
        warn!(%shard, reason = refusal.as_str(), %peer, refused = self.since, "per-source limit: connections refused at accept");
        self.last = Some(now);
        self.since = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_connections_per_ip: 3,
            max_connections_per_net: 5,
            accepts_per_ip_per_sec: 0,
            accepts_per_net_per_sec: 0,
            exempt: vec![ip("127.0.0.1")],
        }
    }

    #[test]
    fn address_then_network_limits_and_release() {
        let a = Admission::new(limits());
        let held: Vec<_> = (0..3).map(|_| a.admit(ip("10.0.0.2"), 0).unwrap()).collect();
        assert_eq!(a.admit(ip("10.0.0.2"), 0), Err(Refusal::IpConnections));
        // The refused attempt charged nothing: the neighbour still gets two.
        assert!(a.admit(ip("10.0.0.3"), 0).is_ok() && a.admit(ip("10.0.0.3"), 0).is_ok());
        assert_eq!(a.admit(ip("10.0.0.4"), 0), Err(Refusal::NetConnections));
        assert!(a.admit(ip("10.0.1.4"), 0).is_ok(), "another /24");
        assert_eq!(a.held(ip("10.0.0.2")), (3, 5));
        a.release(held[0]);
        assert_eq!(a.held(ip("10.0.0.2")), (2, 4));
        assert!(a.admit(ip("10.0.0.4"), 0).is_ok());
        // Exempt and IPv4-mapped IPv6.
        assert!((0..10).all(|_| a.admit(ip("127.0.0.1"), 0) == Ok(Admitted::NONE)));
        assert_eq!(a.held(ip("::ffff:10.0.0.2")), (2, 5), "the same source as 10.0.0.2");
    }

    #[test]
    fn ipv6_networks_are_64_bits() {
        let a = Admission::new(limits());
        for host in 1..=5 {
            assert!(a.admit(ip(&format!("2001:db8::{host}")), 0).is_ok());
        }
        assert_eq!(a.admit(ip("2001:db8::99"), 0), Err(Refusal::NetConnections));
        assert!(a.admit(ip("2001:db8:0:1::1"), 0).is_ok(), "another /64");
    }

    #[test]
    fn rates_per_second_window() {
        let a = Admission::new(AdmissionLimits {
            max_connections_per_ip: 0,
            max_connections_per_net: 0,
            accepts_per_ip_per_sec: 2,
            accepts_per_net_per_sec: 3,
            exempt: vec![],
        });
        assert!(a.admit(ip("10.0.0.2"), 7).is_ok() && a.admit(ip("10.0.0.2"), 7).is_ok());
        assert_eq!(a.admit(ip("10.0.0.2"), 7), Err(Refusal::IpRate));
        assert!(a.admit(ip("10.0.0.3"), 7).is_ok());
        assert_eq!(a.admit(ip("10.0.0.4"), 7), Err(Refusal::NetRate));
        assert!(a.admit(ip("10.0.0.2"), 8).is_ok(), "a new second");
    }

    #[test]
    fn off_means_no_table() {
        let a = Admission::new(AdmissionLimits::default());
        assert_eq!(a.admit(ip("10.0.0.2"), 0), Ok(Admitted::NONE));
        assert!(a.tables.get().is_none());
    }

    #[test]
    fn a_reload_changes_the_limits_in_place() {
        let a = Admission::new(AdmissionLimits::default());
        let off = a.admit(ip("10.0.0.2"), 0).unwrap();
        assert_eq!(off, Admitted::NONE, "not counted: no limit yet");
        a.set_limits(&AdmissionLimits { max_connections_per_ip: 1, ..AdmissionLimits::default() });
        let first = a.admit(ip("10.0.0.2"), 0).unwrap();
        assert_eq!(a.admit(ip("10.0.0.2"), 0), Err(Refusal::IpConnections));
        a.set_limits(&AdmissionLimits { max_connections_per_ip: 2, ..AdmissionLimits::default() });
        assert!(a.admit(ip("10.0.0.2"), 0).is_ok());
        assert_eq!(a.admit(ip("10.0.0.2"), 0), Err(Refusal::IpConnections));
        a.release(first);
        a.release(off);
        assert_eq!(a.held(ip("10.0.0.2")), (1, 1));
        // Off again: counted still (a later limit sees them), never refused.
        a.set_limits(&AdmissionLimits::default());
        assert!(a.admit(ip("10.0.0.2"), 0).is_ok() && a.admit(ip("10.0.0.2"), 0).is_ok());
        assert_eq!(a.held(ip("10.0.0.2")), (3, 3));
    }
}
