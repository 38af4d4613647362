//! The delivery component itself ([`super::reliable`]) driven through a
//! fake [`Host`]: one session in slot 0, the real memory store, a clock the
//! test moves, no sockets and no shard. What the shard gives the component
//! is all the component sees, so these runs are the shard's runs minus I/O.

use std::rc::Rc;

use bytes::Bytes;

use super::RetryPolicy;
use super::reliable::{self, DeliverySettings, Host, Reliable, ReliableCounters, StoreJob};
use super::store::{MemoryStore, Retention, Status, TimelineStore};
use crate::mesh::{CopyResult, Origin, Outgoing, Part};
use crate::protocol::codec::{Frame, split_frame};
use crate::protocol::ids::{ConnKey, ShardId};
use crate::protocol::proto;
use crate::protocol::time::{Millis, Now};
use crate::session::Login;

const BOOT: i64 = 1_800_000_000_000;
const DEVICE: &str = "device-1";
const KEY: ConnKey = ConnKey { index: 0, generation: 1 };

struct FakeShard {
    delivery: Reliable,
    store: Rc<MemoryStore>,
    counters: std::sync::Arc<ReliableCounters>,
    /// The session in slot 0: online (active, ACKs) or not.
    online: bool,
    now: Now,
    /// Frames sent to the session: (sequence, retransmission flag), or
    /// (from, to) of a ResyncRequired as (from, to | 1 << 63).
    wire: Vec<(u64, bool)>,
    answers: Vec<Part>,
    wakes: Vec<Millis>,
}

impl FakeShard {
    fn new(window: usize) -> FakeShard {
        let store = Rc::new(MemoryStore::new(Retention::default(), BOOT as u64));
        let counters = std::sync::Arc::new(ReliableCounters::default());
        let settings = DeliverySettings {
            window,
            policy: RetryPolicy::default(),
            shared_store: false,
            unacked_replay_limit: 100,
            node_index: 0,
        };
        let delivery = Reliable::new(ShardId(0), settings, store.clone(), counters.clone());
        FakeShard {
            delivery,
            store,
            counters,
            online: true,
            now: Now { mono: Millis(0), unix_ms: BOOT },
            wire: Vec::new(),
            answers: Vec::new(),
            wakes: Vec::new(),
        }
    }

    fn at(&mut self, ms: u64) -> Now {
        self.now = Now { mono: Millis(ms), unix_ms: BOOT + ms as i64 };
        self.now
    }

    fn push(&mut self, message_id: u64) {
        let msg = Outgoing { service_id: "svc".into(), payload: Bytes::from_static(b"hi"), expires_at_ms: 0 };
        let origin = Origin { shard: ShardId(0), token: message_id };
        let now = self.now;
        reliable::store_copies(self, now, origin, vec![(0, DEVICE.into(), message_id)], msg.into());
    }

    fn stored(&self) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        for part in &self.answers {
            if let Part::Stored(copies) = part {
                out.extend(copies.iter().map(|c: &CopyResult| (c.seq, c.sessions)));
            }
        }
        out
    }

    fn status(&self, message_id: u64) -> Option<Status> {
        futures_lite::future::block_on(self.store.status(message_id)).expect("memory store")
    }
}

impl Host for FakeShard {
    fn delivery(&mut self) -> &mut Reliable {
        &mut self.delivery
    }

    fn target(&self, key: ConnKey) -> Option<(&str, bool, bool)> {
        (key == KEY && self.online).then_some((DEVICE, true, true))
    }

    fn device_slot(&self, device: &str) -> Option<u32> {
        (device == DEVICE && self.online).then_some(KEY.index)
    }

    fn key_of(&self, _slot: u32) -> ConnKey {
        KEY
    }

    fn wake_at(&mut self, _key: ConnKey, at: Millis) {
        self.wakes.push(at);
    }

    fn deliver(&mut self, slot: u32, frame: &Bytes) -> bool {
        self.send(slot, frame)
    }

    fn send(&mut self, _slot: u32, frame: &Bytes) -> bool {
        if !self.online {
            return false;
        }
        let Ok(Some((header, body))) = split_frame(frame, 1 << 20) else { panic!("a whole frame") };
        match Frame::decode(header, body) {
            Ok(Frame::Message(m)) => self.wire.push((m.seq, header.flags.is_retransmission())),
            Ok(Frame::ResyncRequired(r)) => self.wire.push((r.to_seq | 1 << 63, false)),
            other => panic!("unexpected frame {other:?}"),
        }
        true
    }

    fn answer(&mut self, _origin: Origin, part: Part) {
        self.answers.push(part);
    }

    fn run_store(&mut self, job: StoreJob) {
        // The memory store answers at once.
        let done = futures_lite::future::block_on(job);
        let now = self.now;
        reliable::done(self, now, done);
    }
}

#[test]
fn component_sends_a_stored_copy_resends_it_and_forgets_it_once_acked() {
    let mut s = FakeShard::new(4);
    s.push(11);
    let [(seq, 1)] = s.stored()[..] else { panic!("one copy sent to one session: {:?}", s.stored()) };
    assert_eq!(s.wire, [(seq, false)]);
    // The resend is filed in the wheel at the policy's first delay.
    assert_eq!(s.wakes, [Millis(2_000)]);
    let now = s.at(1_999);
    assert_eq!(reliable::retransmit(&mut s, KEY, now), Some(Millis(2_000)));
    assert_eq!(s.wire.len(), 1, "nothing is due before the deadline");
    let now = s.at(2_000);
    reliable::retransmit(&mut s, KEY, now);
    assert_eq!(s.wire, [(seq, false), (seq, true)]);
    reliable::on_ack(&mut s, KEY, now, seq);
    assert!(matches!(s.status(11), Some(Status::Acked { .. })), "{:?}", s.status(11));
    // Nothing in flight: the device's state is gone and nothing is resent.
    assert_eq!(s.counters.tracked_devices.load(std::sync::atomic::Ordering::Relaxed), 0);
    let now = s.at(60_000);
    assert_eq!(reliable::retransmit(&mut s, KEY, now), None);
    assert_eq!(s.wire.len(), 2);
}

#[test]
fn component_keeps_order_past_a_full_window_and_refills_on_ack() {
    let mut s = FakeShard::new(2);
    for id in 1..=4 {
        s.push(id);
    }
    let seqs: Vec<u64> = s.stored().iter().map(|&(seq, _)| seq).collect();
    assert_eq!(s.wire, [(seqs[0], false), (seqs[1], false)], "the window holds two");
    let now = s.now;
    reliable::on_ack(&mut s, KEY, now, seqs[1]);
    assert_eq!(&s.wire[2..], [(seqs[2], false), (seqs[3], false)], "the timeline refills it in order");
}

#[test]
fn component_resume_replays_what_waited_while_offline() {
    let mut s = FakeShard::new(4);
    s.online = false;
    s.push(21);
    s.push(22);
    assert!(s.stored().iter().all(|&(_, sessions)| sessions == 0));
    assert!(s.wire.is_empty());
    s.online = true;
    let login = Login {
        user: "user-1".into(),
        device: DEVICE.into(),
        app: String::new(),
        platform: String::new(),
        client_version: String::new(),
        capabilities: proto::Capability::Ack as u32,
        last_seq: 0,
        heartbeat_ms: 0,
        store_incarnation: 0,
        groups: Vec::new(),
    };
    let now = s.now;
    reliable::resume(&mut s, KEY, now, &login);
    let seqs: Vec<u64> = s.stored().iter().map(|&(seq, _)| seq).collect();
    let sent: Vec<u64> = s.wire.iter().map(|&(seq, _)| seq).filter(|seq| seq >> 63 == 0).collect();
    assert_eq!(sent, seqs);
}
