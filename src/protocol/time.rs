//! Time as the sans-IO parts of longlink see it: passed in, never read.
//! Only the drivers (a shard, the client and SDK drivers) read a clock,
//! through [`Clock`], and hand the result down as [`Now`].

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on the driver's monotonic clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub u64);

impl Millis {
    /// How long from `self` to `later` (zero if `later` is earlier).
    pub fn elapsed_to(self, later: Millis) -> std::time::Duration {
        std::time::Duration::from_millis(later.0.saturating_sub(self.0))
    }

    pub fn add_ms(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
}

/// The current time as the driver sees it: monotonic for deadlines, wall
/// clock for token validity.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono: Millis,
    pub unix_ms: i64,
}

impl Now {
    pub fn unix_secs(&self) -> i64 {
        self.unix_ms.div_euclid(1000)
    }

    /// Wall-clock milliseconds, 0 before 1970.
    pub fn unix_ms_u64(&self) -> u64 {
        u64::try_from(self.unix_ms).unwrap_or(0)
    }
}

/// A driver's clock: [`Millis`] count from its creation.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        Clock { epoch: Instant::now() }
    }

    /// Reads both clocks.
    pub fn now(&self) -> Now {
        let mono = Millis(self.epoch.elapsed().as_millis() as u64);
        Now { mono, unix_ms: unix_ms_now() as i64 }
    }
}

/// Wall-clock milliseconds since 1970 (0 if the clock is before it).
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
