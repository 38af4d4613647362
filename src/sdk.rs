//! The client SDK: a sans-IO core, a glommio driver and a blocking facade.
//!
//! - [`agent`]: the [`Agent`], the state machine that lives across
//!   connections (where to connect, when, heartbeats, resume, requests);
//!   it drives one `client::ClientSession` per connection.
//! - [`driver`]: [`Client`], the agent over real TCP on a glommio executor
//!   (and [`Handle`] for other threads); [`dispatch`]: the dispatcher
//!   lookup over HTTP.
//! - [`blocking`]: [`BlockingClient`], a thread running the driver, with
//!   channels, for simple programs.
//! - Here: the policies the agent applies, with no I/O and no clock:
//!   - [`Backoff`]: exponential backoff with full jitter between bounds,
//!     never a tight loop; reset by a connection that carried a round trip.
//!   - [`Endpoints`]: an ordered endpoint list (from the dispatcher or
//!     fixed); a failed endpoint drifts to the next; `GoAway` jumps to the
//!     endpoint it names.
//!   - [`SmartHeartbeat`]: starts short while the link is unproven,
//!     lengthens after 3 consecutive pongs toward the NAT-safe maximum,
//!     falls back to the last proven interval and probes after a missed
//!     pong, and keeps separate foreground and background intervals (one
//!     heartbeat when returning to the foreground).
//!
//! Deterministic tests of the agent over a simulated lossy link are in
//! `sdk/sim.rs`; real-TCP tests in `tests/sdk.rs`.

pub mod agent;
pub mod blocking;
pub mod dispatch;
pub mod driver;
#[cfg(test)]
mod sim;

pub use agent::{Action, Agent, AgentConfig, Disconnect, Dispatch, Event, LinkId, RequestError, RequestId, SdkError};
pub use blocking::{BlockingClient, NextError, StartError};
pub use dispatch::{DispatchError, DispatcherConfig};
pub use driver::{CallError, Client, ClientConfig, Handle, TokenRefresher};

/// A small deterministic PRNG (xorshift64*), so the SDK's jitter can be
/// seeded in tests and needs no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// Seeded from the clock and the process id.
    pub fn from_entropy() -> Rng {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Rng::new(t ^ u64::from(std::process::id()).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..=max`.
    pub fn below_or_eq(&mut self, max: u64) -> u64 {
        if max == u64::MAX { self.next_u64() } else { self.next_u64() % (max + 1) }
    }
}

/// Exponential backoff with full jitter: attempt `k` waits a uniform random
/// time in `[min, min(max, base * 2^k)]`.
#[derive(Clone, Debug)]
pub struct Backoff {
    min_ms: u64,
    base_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// `min_ms` is a floor on every wait (never a tight loop), `base_ms` the
    /// first ceiling, `max_ms` the cap (the server's bounds).
    pub fn new(min_ms: u64, base_ms: u64, max_ms: u64) -> Backoff {
        let min_ms = min_ms.max(1);
        let max_ms = max_ms.max(min_ms);
        Backoff { min_ms, base_ms: base_ms.clamp(min_ms, max_ms), max_ms, attempt: 0 }
    }

    /// Adopts new bounds (the server's, from the dispatcher) without
    /// forgetting the attempt count.
    pub fn set_bounds(&mut self, min_ms: u64, max_ms: u64) {
        let attempt = self.attempt;
        *self = Backoff::new(min_ms, self.base_ms, max_ms);
        self.attempt = attempt;
    }

    /// The wait before the next attempt.
    pub fn next_delay_ms(&mut self, rng: &mut Rng) -> u64 {
        let ceiling = self.base_ms.saturating_mul(1u64 << self.attempt.min(30)).min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        self.min_ms + rng.below_or_eq(ceiling.saturating_sub(self.min_ms))
    }

    /// A connection stayed up: the next failure starts from the beginning.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// (min, max) in ms.
    pub fn bounds(&self) -> (u64, u64) {
        (self.min_ms, self.max_ms)
    }
}

/// An ordered list of endpoints to connect to.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    list: Vec<String>,
    current: usize,
}

impl Endpoints {
    pub fn new(list: Vec<String>) -> Endpoints {
        Endpoints { list, current: 0 }
    }

    /// A fresh list (from the dispatcher): start from its first entry.
    pub fn replace(&mut self, list: Vec<String>) {
        if !list.is_empty() {
            *self = Endpoints::new(list);
        }
    }

    pub fn current(&self) -> Option<&str> {
        self.list.get(self.current).map(String::as_str)
    }

    /// The current endpoint failed: drift to the next (wrapping). Returns
    /// true when the whole list has been tried since the last success.
    pub fn fail(&mut self) -> bool {
        if self.list.is_empty() {
            return true;
        }
        self.current = (self.current + 1) % self.list.len();
        self.current == 0
    }

    /// The server sent `GoAway` naming `endpoint`: go there next, keeping
    /// the rest of the list behind it for drift.
    pub fn go_away(&mut self, endpoint: &str) {
        if endpoint.is_empty() {
            self.fail();
            return;
        }
        self.list.retain(|e| e != endpoint);
        self.list.insert(0, endpoint.to_owned());
        self.current = 0;
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Adaptive heartbeat inside the server's bounds.
#[derive(Clone, Debug)]
pub struct SmartHeartbeat {
    min_ms: u32,
    max_ms: u32,
    step_ms: u32,
    /// The interval being tried in the foreground.
    current_ms: u32,
    /// The longest interval proven by 3 consecutive pongs.
    proven_ms: u32,
    /// The shortest interval that lost a pong (the link's NAT timeout is
    /// somewhere below it); the interval never climbs back up to it.
    ceiling_ms: u32,
    /// Consecutive pongs at `current_ms`.
    streak: u8,
    foreground: bool,
    /// Set after a missed pong: the next ping is a probe, sent at once.
    probing: bool,
}

/// Pongs in a row that prove an interval.
const PROOF: u8 = 3;

impl SmartHeartbeat {
    /// `min_ms`/`max_ms`: the server's bounds (from `AuthOk`).
    pub fn new(min_ms: u32, max_ms: u32) -> SmartHeartbeat {
        let min_ms = min_ms.max(1);
        let max_ms = max_ms.max(min_ms);
        SmartHeartbeat {
            min_ms,
            max_ms,
            // Eight steps from the floor to the ceiling.
            step_ms: ((max_ms - min_ms) / 8).max(1),
            current_ms: min_ms,
            proven_ms: min_ms,
            ceiling_ms: max_ms.saturating_add(1),
            streak: 0,
            foreground: true,
            probing: false,
        }
    }

    /// The interval to wait before the next ping.
    pub fn interval_ms(&self) -> u32 {
        if self.probing {
            0
        } else if self.foreground {
            self.current_ms
        } else {
            // In the background only what is proven, as long as possible:
            // the radio wakes least, and the link is known to hold.
            self.proven_ms.max(self.current_ms.min(self.proven_ms))
        }
    }

    pub fn min_ms(&self) -> u32 {
        self.min_ms
    }

    /// The longest interval the client may declare to the server (the idle
    /// timeout is a multiple of it).
    pub fn max_ms(&self) -> u32 {
        self.max_ms
    }

    pub fn proven_ms(&self) -> u32 {
        self.proven_ms
    }

    pub fn is_foreground(&self) -> bool {
        self.foreground
    }

    /// A ping was answered.
    pub fn on_pong(&mut self) {
        if self.probing {
            // The probe came back: the link is alive at the proven interval.
            self.probing = false;
            return;
        }
        if !self.foreground {
            return; // background pings prove nothing new
        }
        self.streak = self.streak.saturating_add(1);
        if self.streak >= PROOF {
            self.proven_ms = self.proven_ms.max(self.current_ms);
            let next = self.current_ms.saturating_add(self.step_ms).min(self.max_ms);
            if next < self.ceiling_ms {
                self.current_ms = next;
            }
            self.streak = 0;
        }
    }

    /// A ping went unanswered within the response timeout. Returns true if
    /// the link should be treated as dead (the probe failed too).
    pub fn on_missed(&mut self) -> bool {
        if self.probing {
            self.probing = false;
            return true;
        }
        // Above the proven interval, the NAT (or the network) dropped us
        // somewhere below this one. At a proven interval it was a loss, not
        // the interval: keep the ceiling, or one bad minute would pin the
        // heartbeat to its floor for good.
        if self.current_ms > self.proven_ms {
            self.ceiling_ms = self.ceiling_ms.min(self.current_ms);
        }
        if self.proven_ms >= self.ceiling_ms {
            self.proven_ms = self.min_ms;
        }
        self.current_ms = self.proven_ms;
        self.streak = 0;
        self.probing = true;
        false
    }

    /// The app moved to the foreground or background. Returns true when a
    /// heartbeat should go out now (returning to the foreground).
    pub fn set_foreground(&mut self, foreground: bool) -> bool {
        let returning = foreground && !self.foreground;
        self.foreground = foreground;
        self.streak = 0;
        returning
    }

    /// A new connection (possibly another network): keep what was learned
    /// about the bounds, but prove the interval again.
    pub fn reset_for_new_link(&mut self) {
        self.current_ms = self.proven_ms.min(self.current_ms);
        self.streak = 0;
        self.probing = false;
    }

    /// The network changed (e.g. Wi-Fi to cellular): nothing learned holds.
    pub fn reset_network(&mut self) {
        *self = SmartHeartbeat { foreground: self.foreground, ..SmartHeartbeat::new(self.min_ms, self.max_ms) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_exponentially_with_full_jitter_inside_the_bounds() {
        let mut rng = Rng::new(7);
        let mut b = Backoff::new(100, 500, 30_000);
        let mut ceilings = Vec::new();
        for attempt in 0..10u32 {
            let ceiling = (500u64 << attempt).min(30_000);
            ceilings.push(ceiling);
            let d = b.next_delay_ms(&mut rng);
            assert!((100..=ceiling).contains(&d), "attempt {attempt}: {d} not in 100..={ceiling}");
        }
        // Jitter: many draws at the cap spread over the range.
        let draws: Vec<u64> = (0..200).map(|_| b.next_delay_ms(&mut rng)).collect();
        assert!(draws.iter().any(|&d| d < 10_000) && draws.iter().any(|&d| d > 20_000));
        b.reset();
        assert!(b.next_delay_ms(&mut rng) <= 500);
    }

    #[test]
    fn backoff_is_never_a_tight_loop() {
        let mut rng = Rng::new(1);
        let mut b = Backoff::new(0, 0, 0);
        assert!((0..100).all(|_| b.next_delay_ms(&mut rng) >= 1));
    }

    #[test]
    fn endpoints_drift_and_go_away() {
        let mut e = Endpoints::new(vec!["a:1".into(), "b:1".into(), "c:1".into()]);
        assert_eq!(e.current(), Some("a:1"));
        assert!(!e.fail());
        assert_eq!(e.current(), Some("b:1"));
        assert!(!e.fail());
        assert!(e.fail(), "wrapped: every endpoint failed");
        e.go_away("c:1");
        assert_eq!(e.current(), Some("c:1"));
        assert_eq!(e.len(), 3);
        e.go_away("d:1");
        assert_eq!((e.current(), e.len()), (Some("d:1"), 4));
    }

    #[test]
    fn heartbeat_lengthens_after_three_pongs_and_backs_off_after_a_miss() {
        let mut h = SmartHeartbeat::new(10_000, 90_000); // step 10 s
        assert_eq!(h.interval_ms(), 10_000, "short while unproven");
        for _ in 0..3 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 20_000);
        for _ in 0..6 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 40_000);
        assert_eq!(h.proven_ms(), 30_000);
        // The NAT drops the link somewhere below 40 s.
        assert!(!h.on_missed());
        assert_eq!(h.interval_ms(), 0, "probe at once");
        h.on_pong();
        assert_eq!(h.interval_ms(), 30_000, "back to the proven interval");
        // It never climbs back to the interval that failed.
        for _ in 0..30 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 30_000);
    }

    #[test]
    fn a_loss_at_a_proven_interval_does_not_cap_the_heartbeat() {
        let mut h = SmartHeartbeat::new(10_000, 90_000);
        // Lost at the floor: not the NAT (nothing shorter is allowed).
        assert!(!h.on_missed());
        h.on_pong();
        for _ in 0..3 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 20_000, "still climbs");
        for _ in 0..3 {
            h.on_pong();
        }
        // Lost at 30 s, proven 20 s: 30 s is the suspect; 20 s holds.
        assert!(!h.on_missed());
        h.on_pong();
        assert_eq!(h.interval_ms(), 20_000);
        // Lost again at the proven 20 s: a loss, the 30 s cap stays, no lower.
        assert!(!h.on_missed());
        h.on_pong();
        for _ in 0..30 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 20_000);
    }

    #[test]
    fn heartbeat_climbs_to_the_maximum_and_a_failed_probe_means_dead() {
        let mut h = SmartHeartbeat::new(10_000, 90_000);
        for _ in 0..100 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 90_000);
        assert!(!h.on_missed());
        assert!(h.on_missed(), "the probe was lost too");
    }

    #[test]
    fn background_uses_the_proven_interval_and_foreground_return_pings_once() {
        let mut h = SmartHeartbeat::new(10_000, 90_000);
        for _ in 0..6 {
            h.on_pong();
        }
        assert_eq!(h.interval_ms(), 30_000);
        assert!(!h.set_foreground(false));
        assert_eq!(h.interval_ms(), 20_000, "background: proven only");
        h.on_pong();
        assert_eq!(h.interval_ms(), 20_000);
        assert!(h.set_foreground(true), "one heartbeat on return");
        assert!(!h.set_foreground(true));
        assert_eq!(h.interval_ms(), 30_000);
        h.reset_network();
        assert_eq!(h.interval_ms(), 10_000);
    }
}
