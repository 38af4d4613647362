//! The delivery engine in fake time, without sockets: the real per-device
//! window ([`DeviceWindow`]) and the real timeline store ([`MemoryStore`])
//! put together the way `reliable.rs` puts them together on a shard
//! (append, first send, resend from the timer, cumulative ACK, refill from
//! the timeline, resume after a reconnect), with a clock the test moves.

use bytes::Bytes;
use futures_lite::future::block_on;

use super::store::{MemoryStore, NewMessage, Retention, Status, TimelineStore};
use super::{DeviceWindow, RetryPolicy};
use crate::protocol::time::{Millis, Now};

const BOOT: u64 = 1_800_000_000_000;
const DEVICE: &str = "device-1";

/// What went on the wire: when, which sequence, whether as a resend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sent {
    at: u64,
    seq: u64,
    resend: bool,
}

/// One online device's delivery, driven step by step.
struct Engine {
    store: MemoryStore,
    policy: RetryPolicy,
    /// Messages in flight at most.
    size: usize,
    /// `None` while the device is offline.
    window: Option<DeviceWindow<u64>>,
    /// Highest sequence sent on this session.
    last_sent: u64,
    now: Now,
    wire: Vec<Sent>,
    given_up: Vec<u64>,
    next_id: u64,
}

impl Engine {
    fn new(policy: RetryPolicy, size: usize) -> Engine {
        Engine {
            store: MemoryStore::new(Retention::default(), BOOT),
            policy,
            size,
            window: None,
            last_sent: 0,
            now: Now { mono: Millis(0), unix_ms: BOOT as i64 },
            wire: Vec::new(),
            given_up: Vec::new(),
            next_id: 1,
        }
    }

    fn now_ms(&self) -> u64 {
        self.now.unix_ms_u64()
    }

    /// Moves the fake clock to `t` ms, running the timer at every 10 ms
    /// step on the way (as the shard's timer wheel would).
    fn advance_to(&mut self, t: u64) {
        while self.now.mono.0 < t {
            let step = (self.now.mono.0 + 10).min(t);
            self.now = Now { mono: Millis(step), unix_ms: (BOOT + step) as i64 };
            self.timer();
        }
    }

    /// A backend pushed a message to the device: it is stored, and sent at
    /// once when it is next in line and the window has room.
    fn push(&mut self) -> (u64, u64) {
        let message_id = self.next_id;
        self.next_id += 1;
        let msg = NewMessage {
            message_id,
            service_id: "svc".into(),
            payload: Bytes::from_static(b"hello"),
            expires_at_ms: 0,
        };
        let now_ms = self.now_ms();
        let appended = block_on(self.store.append(DEVICE, msg, now_ms)).expect("memory store has room");
        if self.window.as_ref().is_some_and(|w| w.is_idle()) && appended.oldest == appended.seq {
            // Nothing in flight and nothing older waiting: the shard forgot
            // the device's delivery state and starts it again from this
            // message, with the recovery time the store kept.
            let mut w = DeviceWindow::new(appended.seq - 1);
            w.set_learned_ms(appended.learned_ms);
            self.window = Some(w);
            self.last_sent = appended.seq - 1;
        }
        if let Some(w) = &self.window
            && appended.seq == self.last_sent + 1
            && w.has_room(self.size)
        {
            self.send_new(appended.seq, message_id);
        }
        (appended.seq, message_id)
    }

    fn send_new(&mut self, seq: u64, message_id: u64) {
        let (now, policy) = (self.now, self.policy);
        let Some(w) = self.window.as_mut() else { return };
        w.on_sent(seq, message_id, now.mono, &policy);
        self.last_sent = seq;
        self.wire.push(Sent { at: now.mono.0, seq, resend: false });
        block_on(self.store.mark_sent(DEVICE, seq, message_id, now.unix_ms_u64())).expect("mark_sent");
    }

    /// Reads what waits after the last sequence sent, as far as the window
    /// has room, and sends it.
    fn refill(&mut self, resume: bool) {
        let Some(w) = &self.window else { return };
        let room = self.size.saturating_sub(w.in_flight());
        if room == 0 {
            return;
        }
        let (after, now_ms) = (self.last_sent, self.now_ms());
        let replay = if resume {
            block_on(self.store.resume(DEVICE, after, room, now_ms))
        } else {
            block_on(self.store.replay(DEVICE, after, room, now_ms))
        }
        .expect("replay");
        assert_eq!(replay.missing, None, "nothing was lost");
        if resume && let Some(w) = self.window.as_mut() {
            w.set_learned_ms(replay.learned_ms);
        }
        for m in replay.messages {
            self.send_new(m.seq, m.message_id);
        }
    }

    /// The client acknowledged everything up to `seq`.
    fn ack(&mut self, seq: u64) {
        let (now, policy) = (self.now, self.policy);
        let Some(w) = self.window.as_mut() else { return };
        let learned_before = w.learned_ms();
        if w.on_ack(seq.min(self.last_sent), now.mono, &policy).stale {
            return;
        }
        let learned = w.learned_ms();
        block_on(self.store.ack(DEVICE, seq, now.unix_ms_u64())).expect("ack");
        if learned != learned_before {
            block_on(self.store.set_learned(DEVICE, learned, now.unix_ms_u64())).expect("set_learned");
        }
        self.refill(false);
    }

    /// The timer: resends what is due.
    fn timer(&mut self) {
        let (now, policy) = (self.now, self.policy);
        let Some(w) = self.window.as_mut() else { return };
        let due = w.due(now.mono, &policy);
        self.wire.extend(due.resend.iter().map(|&seq| Sent { at: now.mono.0, seq, resend: true }));
        self.given_up.extend(due.given_up);
    }

    /// The device connects, having processed everything up to `last_seq`.
    fn connect(&mut self, last_seq: u64) {
        if last_seq > 0 {
            block_on(self.store.ack(DEVICE, last_seq, self.now_ms())).expect("ack");
        }
        self.window = Some(DeviceWindow::new(last_seq));
        self.last_sent = last_seq;
        self.refill(true);
    }

    fn disconnect(&mut self) {
        self.window = None;
    }

    fn window(&self) -> &DeviceWindow<u64> {
        self.window.as_ref().expect("online")
    }

    fn status(&self, message_id: u64) -> Option<Status> {
        block_on(self.store.status(message_id)).expect("status")
    }

    fn first_sends(&self) -> Vec<u64> {
        self.wire.iter().filter(|s| !s.resend).map(|s| s.seq).collect()
    }

    fn resends(&self) -> Vec<(u64, u64)> {
        self.wire.iter().filter(|s| s.resend).map(|s| (s.at, s.seq)).collect()
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy { base_delay_ms: 100, fast_retries: 2, step_ms: 100, max_delay_ms: 400, max_retries: 5 }
}

#[test]
fn engine_window_caps_what_is_in_flight_and_acks_pull_the_backlog_from_the_timeline() {
    let mut e = Engine::new(policy(), 3);
    e.connect(0);
    let pushed: Vec<(u64, u64)> = (0..7).map(|_| e.push()).collect();
    let seqs: Vec<u64> = pushed.iter().map(|&(seq, _)| seq).collect();
    assert_eq!(e.first_sends(), seqs[..3], "three in flight at most");
    assert!(matches!(e.status(pushed[5].1), Some(Status::Stored { .. })), "waits in the timeline");
    e.ack(seqs[1]);
    assert_eq!(e.first_sends(), seqs[..5], "two acknowledged, two more sent");
    assert_eq!(e.window().in_flight(), 3);
    e.ack(seqs[4]);
    assert_eq!(e.first_sends(), seqs, "in order, each once");
    e.ack(seqs[6]);
    assert!(e.window().is_idle());
    for &(_, id) in &pushed {
        assert!(matches!(e.status(id), Some(Status::Acked { .. })), "{id}: {:?}", e.status(id));
    }
    assert!(e.resends().is_empty(), "acknowledged in time: no resends");
}

#[test]
fn engine_resends_on_the_schedule_until_acked_then_starts_from_the_learned_time() {
    let mut e = Engine::new(policy(), 8);
    e.connect(0);
    let (s1, id1) = e.push();
    // The client's link drops what it gets until t = 450.
    e.advance_to(450);
    // N = 100 twice, then N + M = 200, then N + 2M = 300.
    assert_eq!(e.resends(), [(100, s1), (200, s1), (400, s1)]);
    assert_eq!(e.window().next_deadline(), Some(Millis(700)));
    e.ack(s1);
    assert!(e.window().is_idle());
    assert!(matches!(e.status(id1), Some(Status::Acked { sent_at_ms, acked_at_ms, .. })
        if sent_at_ms == BOOT && acked_at_ms == BOOT + 450));
    // It took 450 ms (capped at MAX = 400): the next message waits that
    // long before its first resend, and the store keeps it for resume.
    assert_eq!(e.window().learned_ms(), Some(400));
    e.advance_to(500);
    let (s2, _) = e.push();
    assert_eq!(e.window().next_deadline(), Some(Millis(900)));
    e.advance_to(899);
    assert_eq!(e.resends().len(), 3, "no resend before the learned time");
    e.advance_to(900);
    assert_eq!(e.resends().last(), Some(&(900, s2)));
    // An ACK whose newest message needed no resend resets it: the link
    // recovered.
    e.advance_to(950);
    let (s3, _) = e.push();
    e.advance_to(960);
    e.ack(s3);
    assert_eq!(e.window().learned_ms(), None);
    assert_eq!(e.window().next_deadline(), None);
}

#[test]
fn engine_gives_up_after_max_retries_and_the_message_waits_for_resume() {
    let mut e = Engine::new(policy(), 8);
    e.connect(0);
    let (s1, id1) = e.push();
    e.advance_to(5_000);
    let at: Vec<u64> = e.resends().iter().map(|&(at, _)| at).collect();
    assert_eq!(at, [100, 200, 400, 700, 1_100], "five resends, the delay capped at MAX");
    assert_eq!(e.given_up, [s1], "left to the timeline at 1.5 s");
    assert!(e.window().is_idle());
    assert!(matches!(e.status(id1), Some(Status::Sent { .. })), "still stored, not acknowledged");
    // The device reconnects: the resume replays it.
    e.disconnect();
    e.connect(0);
    assert_eq!(e.first_sends(), [s1, s1]);
    e.ack(s1);
    assert!(matches!(e.status(id1), Some(Status::Acked { .. })));
}

#[test]
fn engine_resume_replays_what_the_client_has_not_processed_in_order() {
    let mut e = Engine::new(policy(), 4);
    e.connect(0);
    let pushed: Vec<(u64, u64)> = (0..4).map(|_| e.push()).collect();
    let seqs: Vec<u64> = pushed.iter().map(|&(seq, _)| seq).collect();
    e.advance_to(50);
    e.ack(seqs[1]);
    // The connection drops with 3 and 4 in flight.
    e.advance_to(350);
    e.disconnect();
    // Pushed while the device is offline: stored, not sent.
    let (s5, id5) = e.push();
    assert!(matches!(e.status(id5), Some(Status::Stored { .. })));
    let sent_before = e.wire.len();
    // The client says it processed up to 2 (its ACK of 2 may have been lost
    // too: it says so again).
    e.advance_to(1_000);
    e.connect(seqs[1]);
    let replayed: Vec<u64> = e.wire[sent_before..].iter().map(|s| s.seq).collect();
    assert_eq!(replayed, [seqs[2], seqs[3], s5], "what it has not processed, in order, nothing twice");
    e.ack(s5);
    assert!(e.window().is_idle());
    for &(_, id) in pushed.iter().chain([(s5, id5)].iter()) {
        assert!(matches!(e.status(id), Some(Status::Acked { .. })), "{id}");
    }
}
