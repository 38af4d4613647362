//! Reliable delivery bookkeeping for one device, with no I/O and no clock:
//! the in-flight window, cumulative ACKs, and the adaptive retransmission
//! schedule.
//!
//! Schedule (after Xianyu's measurements: most messages arrive within a few
//! short retries, and more retries at a fixed short delay waste resources):
//! an unacknowledged message is resent after a fixed short delay `N` for the
//! first `fast_retries` attempts, then after `N + k * M` (k = 1, 2, ...) up
//! to `MAX`. When a message needed retries, the time it took to be
//! acknowledged is the device's learned recovery time and replaces `N` for
//! its next messages; a message acknowledged on its first send resets it.
//! After `max_retries` the message leaves the window: it stays in the
//! timeline and is replayed when the client resumes.
//!
//! The folder: this file is the window and schedule; [`store`] the
//! timelines (in memory, bounded), [`store_redis`] the same in Redis on a
//! sidecar thread, and [`reliable`] the shard code that ties them to
//! sessions (append, send, resend from the timer wheel, ACK, resume).

pub mod reliable;
pub mod store;
pub mod store_redis;

use std::collections::VecDeque;

use crate::protocol::time::Millis;

/// Retransmission settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// `N`: delay before each of the first `fast_retries` resends, in ms.
    pub base_delay_ms: u32,
    /// Resends at the short delay before the delay starts growing.
    pub fast_retries: u8,
    /// `M`: growth of the delay per further resend, in ms.
    pub step_ms: u32,
    /// `MAX`: the longest delay between resends, in ms.
    pub max_delay_ms: u32,
    /// Resends before the message is left to the timeline.
    pub max_retries: u8,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { base_delay_ms: 2_000, fast_retries: 4, step_ms: 5_000, max_delay_ms: 60_000, max_retries: 10 }
    }
}

impl RetryPolicy {
    /// Delay before resend number `attempt` (1-based), starting from
    /// `first_delay` (N, or the learned recovery time).
    pub fn delay_ms(&self, attempt: u8, first_delay: u32) -> u32 {
        let first = first_delay.min(self.max_delay_ms);
        if attempt <= self.fast_retries {
            first
        } else {
            let grown = u64::from(first) + u64::from(attempt - self.fast_retries) * u64::from(self.step_ms);
            grown.min(u64::from(self.max_delay_ms)) as u32
        }
    }
}

/// One sent, unacknowledged message, with what the driver needs to send
/// it again (`T`: e.g. the encoded frame).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight<T> {
    pub seq: u64,
    pub payload: T,
    /// When it was first sent (for the learned recovery time).
    pub first_sent: Millis,
    /// Resends so far.
    pub retries: u8,
    pub next_retry: Millis,
}

/// What an ACK did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Acked {
    /// In-flight messages it acknowledged.
    pub messages: u32,
    /// True when it acknowledged nothing new (a duplicate or stale ACK).
    pub stale: bool,
}

/// What a timer pass asks the driver to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Resend these (already rescheduled).
    pub resend: Vec<u64>,
    /// These reached `max_retries` and left the window; they stay in the
    /// timeline for resume.
    pub given_up: Vec<u64>,
}

/// The reliable-delivery state of one online device.
#[derive(Debug)]
pub struct DeviceWindow<T = ()> {
    /// Sent and not acknowledged, in sequence order.
    inflight: VecDeque<InFlight<T>>,
    /// Highest sequence the client acknowledged.
    acked: u64,
    /// Learned recovery time in ms, replacing `N` while set.
    learned_ms: Option<u32>,
}

impl<T> Default for DeviceWindow<T> {
    fn default() -> Self {
        DeviceWindow { inflight: VecDeque::new(), acked: 0, learned_ms: None }
    }
}

impl<T> DeviceWindow<T> {
    /// A window for a client that already processed everything up to
    /// `last_seq`.
    pub fn new(last_seq: u64) -> DeviceWindow<T> {
        DeviceWindow { acked: last_seq, ..Default::default() }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The messages an ACK of `seq` covers, before [`DeviceWindow::on_ack`].
    pub fn acked_by(&self, seq: u64) -> impl Iterator<Item = &InFlight<T>> {
        self.inflight.iter().skip_while(move |m| m.seq <= self.acked).take_while(move |m| m.seq <= seq)
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Highest sequence sent so far (acknowledged or not).
    pub fn highest_sent(&self) -> u64 {
        self.inflight.back().map_or(self.acked, |m| m.seq)
    }

    pub fn learned_ms(&self) -> Option<u32> {
        self.learned_ms
    }

    /// Starts from a recovery time learned earlier (kept by the store).
    pub fn set_learned_ms(&mut self, learned_ms: Option<u32>) {
        self.learned_ms = learned_ms;
    }

    pub fn has_room(&self, window: usize) -> bool {
        self.inflight.len() < window
    }

    /// Records the first send of `seq` (sequences are sent in order).
    pub fn on_sent(&mut self, seq: u64, payload: T, now: Millis, policy: &RetryPolicy) {
        let first = self.learned_ms.unwrap_or(policy.base_delay_ms);
        let next_retry = now.add_ms(u64::from(policy.delay_ms(1, first)));
        self.inflight.push_back(InFlight { seq, payload, first_sent: now, retries: 0, next_retry });
    }

    /// What was sent as `seq`, while it is in flight.
    pub fn payload(&self, seq: u64) -> Option<&T> {
        self.inflight.iter().find(|m| m.seq == seq).map(|m| &m.payload)
    }

    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// A cumulative ACK: everything up to `seq` was processed.
    pub fn on_ack(&mut self, seq: u64, now: Millis, policy: &RetryPolicy) -> Acked {
        if seq <= self.acked {
            return Acked { messages: 0, stale: true };
        }
        self.acked = seq;
        let mut acked = Acked::default();
        while self.inflight.front().is_some_and(|m| m.seq <= seq) {
            let Some(m) = self.inflight.pop_front() else { break };
            acked.messages += 1;
            // The newest message this ACK covers tells how the link is now.
            if m.retries == 0 {
                self.learned_ms = None;
            } else {
                let took = now.0.saturating_sub(m.first_sent.0);
                let learned = u32::try_from(took).unwrap_or(u32::MAX).clamp(policy.base_delay_ms, policy.max_delay_ms);
                self.learned_ms = Some(learned);
            }
        }
        acked
    }

    /// The earliest resend time, if anything is in flight.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.inflight.iter().map(|m| m.next_retry).min()
    }

    /// Resends that are due at `now`, rescheduling them.
    pub fn due(&mut self, now: Millis, policy: &RetryPolicy) -> Due {
        let mut due = Due::default();
        let first = self.learned_ms.unwrap_or(policy.base_delay_ms);
        self.inflight.retain_mut(|m| {
            if m.next_retry > now {
                return true;
            }
            if m.retries >= policy.max_retries {
                due.given_up.push(m.seq);
                return false;
            }
            m.retries += 1;
            m.next_retry = now.add_ms(u64::from(policy.delay_ms(m.retries + 1, first)));
            due.resend.push(m.seq);
            true
        });
        due
    }

    /// The device went offline: nothing is retried until it resumes, and
    /// resuming replays from the timeline.
    pub fn clear(&mut self) {
        self.inflight.clear();
    }
}

/// Hands out message ids that are unique across shards and restarts:
/// milliseconds since 2025-01-01 (41 bits), a worker id (12 bits: node
/// index 4, shard 8, so up to 256 shards), and a counter (10 bits) within
/// the millisecond: 1,024 ids per ms per shard, then the next
/// millisecond's ids are borrowed.
#[derive(Debug)]
pub struct MessageIds {
    worker: u64,
    last: u64,
}

/// Bits of the per-millisecond counter, below the worker id.
const COUNTER_BITS: u32 = 10;
/// The worker id's 12 bits (above the counter, below the milliseconds).
const WORKER_MASK: u64 = 0xfff;

/// 2025-01-01T00:00:00Z in unix ms.
const ID_EPOCH_MS: u64 = 1_735_689_600_000;

impl MessageIds {
    pub fn new(worker: u16) -> MessageIds {
        MessageIds { worker: u64::from(worker) & WORKER_MASK, last: 0 }
    }

    /// The wall-clock ms an id was handed out at (its store time).
    pub fn unix_ms_of(id: u64) -> u64 {
        (id >> 22) + ID_EPOCH_MS
    }

    /// The next id at wall-clock `unix_ms`; never repeats, even if the
    /// clock steps back (it then borrows from the future).
    pub fn next(&mut self, unix_ms: u64) -> u64 {
        let ms = unix_ms.saturating_sub(ID_EPOCH_MS) & ((1 << 41) - 1);
        let candidate = ms << 22 | self.worker << COUNTER_BITS;
        self.last = if candidate > self.last { candidate } else { self.last + 1 };
        // Keep the worker bits when the counter overflows into them.
        if (self.last >> COUNTER_BITS) & WORKER_MASK != self.worker {
            self.last = ((self.last >> 22) + 1) << 22 | self.worker << COUNTER_BITS;
        }
        self.last
    }
}

/// The delivery settings as the engine and the stores take them (built
/// here so `config` does not import `delivery`).
impl crate::config::DeliveryConfig {
    /// The retransmission schedule.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            base_delay_ms: self.retry_base_ms,
            fast_retries: self.retry_fast,
            step_ms: self.retry_step_ms,
            max_delay_ms: self.retry_max_delay_ms,
            max_retries: self.max_retries,
        }
    }

    /// Timeline retention.
    pub fn retention(&self) -> store::Retention {
        store::Retention {
            max_messages: self.retention_messages as usize,
            max_age_ms: self.retention_age_ms,
            max_status_records: self.status_records as usize,
            max_unacked_replays: self.max_replays,
            learned_ttl_ms: self.learned_ttl_secs.saturating_mul(1000),
        }
    }
}

#[cfg(test)]
mod component_tests;
#[cfg(test)]
mod engine_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { base_delay_ms: 1_000, fast_retries: 4, step_ms: 2_000, max_delay_ms: 9_000, max_retries: 8 }
    }

    #[test]
    fn schedule_is_n_four_times_then_grows_by_m_up_to_max() {
        let p = policy();
        let delays: Vec<u32> = (1..=9).map(|a| p.delay_ms(a, p.base_delay_ms)).collect();
        assert_eq!(delays, [1_000, 1_000, 1_000, 1_000, 3_000, 5_000, 7_000, 9_000, 9_000]);
    }

    #[test]
    fn resends_follow_the_schedule_in_simulated_time_then_give_up() {
        let p = policy();
        let mut w: DeviceWindow = DeviceWindow::new(0);
        w.on_sent(1, (), Millis(0), &p);
        let mut resent_at = Vec::new();
        let mut now = 0;
        let mut given_up = None;
        while now <= 100_000 {
            let due = w.due(Millis(now), &p);
            if !due.resend.is_empty() {
                resent_at.push(now);
            }
            if !due.given_up.is_empty() {
                given_up = Some(now);
                break;
            }
            now += 100;
        }
        // Sent at 0; resends 1s apart four times, then +3s, +5s, +7s, +9s.
        assert_eq!(resent_at, [1_000, 2_000, 3_000, 4_000, 7_000, 12_000, 19_000, 28_000]);
        assert_eq!(given_up, Some(37_000));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn cumulative_ack_clears_the_window_and_stale_acks_are_flagged() {
        let p = policy();
        let mut w: DeviceWindow = DeviceWindow::new(10);
        for seq in 11..=15 {
            w.on_sent(seq, (), Millis(0), &p);
        }
        assert!(!w.has_room(5) && w.has_room(6));
        assert_eq!(w.on_ack(13, Millis(5), &p), Acked { messages: 3, stale: false });
        assert_eq!(w.in_flight(), 2);
        assert_eq!(w.on_ack(12, Millis(6), &p), Acked { messages: 0, stale: true });
        assert_eq!(w.on_ack(15, Millis(7), &p).messages, 2);
        assert_eq!(w.acked(), 15);
    }

    #[test]
    fn learned_recovery_time_replaces_n_and_resets_when_the_link_recovers() {
        let p = policy();
        let mut w: DeviceWindow = DeviceWindow::new(0);
        w.on_sent(1, (), Millis(0), &p);
        assert_eq!(w.due(Millis(1_000), &p).resend, [1]);
        assert_eq!(w.due(Millis(2_000), &p).resend, [1]);
        // Acknowledged 2.5 s after the first send: the link needs ~2.5 s.
        w.on_ack(1, Millis(2_500), &p);
        assert_eq!(w.learned_ms(), Some(2_500));
        w.on_sent(2, (), Millis(10_000), &p);
        assert!(w.due(Millis(11_000), &p).resend.is_empty(), "N no longer applies");
        assert_eq!(w.due(Millis(12_500), &p).resend, [2]);
        // Acknowledged on its first send: back to N.
        w.on_ack(2, Millis(13_000), &p);
        w.on_sent(3, (), Millis(20_000), &p);
        w.on_ack(3, Millis(20_010), &p);
        assert_eq!(w.learned_ms(), None);
    }

    #[test]
    fn message_ids_are_unique_and_increasing_even_when_the_clock_steps_back() {
        let mut ids = MessageIds::new(5);
        let t = ID_EPOCH_MS + 1_000;
        let mut last = 0;
        for i in 0..10_000u64 {
            let now = if i % 100 == 99 { t - 50 } else { t + i / 1000 };
            let id = ids.next(now);
            assert!(id > last);
            assert_eq!((id >> COUNTER_BITS) & WORKER_MASK, 5, "worker bits kept");
            last = id;
        }
        let mut other = MessageIds::new(6);
        assert_ne!(other.next(t), MessageIds::new(5).next(t));
        // Shard 0 and shard 64 (and 128, 192) of one node: distinct workers.
        let workers: std::collections::HashSet<u64> =
            [0u16, 64, 128, 192, 255, 15 << 8].into_iter().map(|w| MessageIds::new(w).next(t)).collect();
        assert_eq!(workers.len(), 6);
    }
}
