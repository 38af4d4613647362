//! The one token bucket: a shard's accept rate, a connection's request
//! rate (upstream) and a shard's broadcast pacing. No clock: the caller
//! passes the time in, so the bucket is tested without waiting.

use std::time::Duration;

use crate::protocol::time::Millis;

/// Tokens earned at a rate per second since the last refill, up to a cap.
/// 16 bytes: it is kept per connection while a connection is limited.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    refilled: Millis,
}

impl TokenBucket {
    /// A bucket holding `tokens` at `now`.
    pub fn new(tokens: f64, now: Millis) -> TokenBucket {
        TokenBucket { tokens, refilled: now }
    }

    /// Adds what `rate_per_sec` earned since the last refill, up to `cap`
    /// (a clock read earlier than the last refill adds nothing).
    pub fn refill(&mut self, now: Millis, rate_per_sec: f64, cap: f64) {
        let ms = now.0.saturating_sub(self.refilled.0);
        self.tokens = (self.tokens + ms as f64 * rate_per_sec / 1000.0).min(cap);
        self.refilled = self.refilled.max(now);
    }

    pub fn tokens(&self) -> f64 {
        self.tokens
    }

    /// Takes one token if a whole one is there.
    pub fn try_take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token whether or not it is there; when the bucket is in
    /// debt, how long `rate_per_sec` takes to pay it back (the taker waits
    /// that long before its next take).
    pub fn take_or_owe(&mut self, rate_per_sec: f64) -> Option<Duration> {
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate_per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_at_the_rate_up_to_the_cap_and_takes_whole_tokens() {
        let mut b = TokenBucket::new(2.0, Millis(0));
        assert!(b.try_take() && b.try_take() && !b.try_take());
        b.refill(Millis(250), 10.0, 5.0);
        assert_eq!(b.tokens(), 2.5);
        b.refill(Millis(100), 10.0, 5.0); // the clock went back: nothing
        assert_eq!(b.tokens(), 2.5);
        b.refill(Millis(10_250), 10.0, 5.0);
        assert_eq!(b.tokens(), 5.0, "capped");
    }

    #[test]
    fn a_debt_is_a_wait_at_the_rate() {
        let mut b = TokenBucket::new(1.0, Millis(0));
        assert_eq!(b.take_or_owe(10.0), None);
        assert_eq!(b.take_or_owe(10.0), Some(Duration::from_millis(100)));
        b.refill(Millis(100), 10.0, 10.0);
        assert_eq!(b.tokens(), 0.0, "paid back after the wait");
    }
}
