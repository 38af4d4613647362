//! The push port ([`super::PushPort`] and the entry points of `port.rs`)
//! driven through a fake [`PortHost`]: a backend connection in a slot, a
//! clock the test moves, the mesh as a list of sent messages, no sockets and
//! no shard. Requests are split, their parts answered (or not) by the test,
//! and the merged reply checked where the port hands it over.

use std::cell::RefCell;

use super::port::{admit_backend, on_request};
use super::*;

const SHARDS: u16 = 2;
const TIMEOUT_MS: u64 = 5_000;
/// The backend index the fake treats as the local part of a cluster
/// request (its reply goes to a merge, not to a backend).
const LOCAL: u32 = u32::MAX;

struct FakeShard {
    port: PushPort,
    now: Now,
    auth: Arc<auth::PortAuth>,
    token: u64,
    /// Messages sent to shards, in order.
    routed: Vec<(ShardId, ShardMsg)>,
    /// Replies handed over (to a backend or a cluster merge), in order.
    replies: Vec<(ConnKey, Frame)>,
    events: RefCell<Vec<PortEvent>>,
}

impl FakeShard {
    fn new() -> FakeShard {
        let auth = Arc::new(auth::PortAuth {
            push: auth::PushKeyring::new(Vec::new()),
            node: None,
            auth_timeout_ms: 1_000,
            idle_timeout_ms: 60_000,
            max_unauthenticated: 4,
        });
        FakeShard {
            port: PushPort::default(),
            now: Now { mono: Millis(1_000), unix_ms: 1_800_000_000_000 },
            auth,
            token: 0,
            routed: Vec::new(),
            replies: Vec::new(),
            events: RefCell::default(),
        }
    }

    /// An authenticated backend connection allowed everything.
    fn granted_backend(&mut self) -> ConnKey {
        let key = admit_backend(self, auth::Listener::Push).expect("room for a backend");
        let b = self.port.backend(key).expect("just admitted");
        b.out.clear();
        b.auth = BackendAuth::Granted { rights: auth::Rights::ALL_PUSH, service_ids: Rc::from(Vec::new()) };
        b.deadline = self.now.mono.add_ms(self.auth.idle_timeout_ms);
        key
    }

    fn inflight(&mut self, key: ConnKey) -> u32 {
        self.port.backend(key).map_or(0, |b| b.inflight)
    }

    fn count_of(&self, want: fn(&PortEvent) -> bool) -> usize {
        self.events.borrow().iter().filter(|e| want(e)).count()
    }

    fn advance(&mut self, ms: u64) {
        self.now.mono = self.now.mono.add_ms(ms);
        self.now.unix_ms += ms as i64;
    }
}

impl PortHost for FakeShard {
    fn port(&mut self) -> &mut PushPort {
        &mut self.port
    }

    fn shard_id(&self) -> ShardId {
        ShardId(0)
    }

    fn shards(&self) -> u16 {
        SHARDS
    }

    fn now(&self) -> Now {
        self.now
    }

    fn limits(&self) -> PushLimits {
        PushLimits {
            max_inflight_per_backend: 16,
            max_targets_per_request: 100,
            max_request_bytes: 64 * 1024,
            reply_timeout_ms: TIMEOUT_MS,
            broadcast_rate_per_sec: 1_000,
            broadcast_queue_bytes: 1 << 20,
        }
    }

    fn port_auth(&self) -> Arc<auth::PortAuth> {
        self.auth.clone()
    }

    fn max_frame_bytes(&self) -> u32 {
        64 * 1024
    }

    fn count(&self, event: PortEvent) {
        self.events.borrow_mut().push(event);
    }

    fn next_token(&mut self) -> u64 {
        self.token += 1;
        self.token
    }

    fn next_message_id(&mut self) -> u64 {
        self.next_token() + 1_000
    }

    fn route(&mut self, to: ShardId, msg: ShardMsg) {
        self.routed.push((to, msg));
    }

    fn reserve_broadcast(&self, _frame_len: usize) -> Result<(), String> {
        Ok(())
    }

    fn store_is_shared(&mut self) -> bool {
        false
    }

    fn mesh_congested(&self, _waker: &Waker) -> bool {
        false
    }

    fn upgrading(&self) -> bool {
        false
    }

    fn cluster_takes(&mut self, _backend: ConnKey, frame: Frame) -> Option<Frame> {
        Some(frame)
    }

    fn local_part(&mut self, backend: ConnKey, frame: Frame) -> Option<Frame> {
        self.replies.push((backend, frame.clone()));
        (backend.index != LOCAL).then_some(frame)
    }
}

fn device_push(request_id: u64, devices: &[&str]) -> Frame {
    Frame::PushRequest(proto::PushRequest {
        request_id,
        targets: Some(proto::Targets {
            devices: devices.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        }),
        payload: Bytes::from_static(b"hi"),
        ..Default::default()
    })
}

/// The device parts sent so far: (origin token, target indexes).
fn device_parts(h: &FakeShard) -> Vec<(ShardId, u64, Vec<u32>)> {
    h.routed
        .iter()
        .filter_map(|(to, msg)| match msg {
            ShardMsg::Devices { origin, items, .. } => {
                Some((*to, origin.token, items.iter().map(|(i, _)| *i).collect()))
            }
            _ => None,
        })
        .collect()
}

/// Devices spread over both shards (owner_shard decides).
fn devices_on_both_shards() -> Vec<&'static str> {
    let all = ["d-a", "d-b", "d-c", "d-d", "d-e", "d-f", "d-g", "d-h"];
    let on = |s: u16| all.iter().copied().filter(move |d| owner_shard(d, SHARDS) == ShardId(s));
    let (first, second): (Vec<_>, Vec<_>) = (on(0).take(2).collect(), on(1).take(1).collect());
    assert!(first.len() == 2 && second.len() == 1, "test devices must cover both shards");
    first.into_iter().chain(second).collect()
}

#[test]
fn a_push_over_two_shards_is_answered_once_when_both_parts_are_in() {
    let mut h = FakeShard::new();
    let backend = h.granted_backend();
    let devices = devices_on_both_shards();
    on_request(&mut h, backend, Ok(device_push(7, &devices)));
    let parts = device_parts(&h);
    assert_eq!(parts.len(), 2, "one part per shard holding targets");
    assert_eq!(h.inflight(backend), 1);
    assert!(h.replies.is_empty(), "nothing before the answers");

    let (_, token, first) = &parts[0];
    merge_part(&mut h, *token, Part::Sessions(first.iter().map(|&i| (i, 1)).collect()));
    assert!(h.replies.is_empty(), "one shard still owes its part");
    let (_, token, second) = &parts[1];
    merge_part(&mut h, *token, Part::Sessions(second.iter().map(|&i| (i, 0)).collect()));

    assert_eq!(h.replies.len(), 1);
    let (to, Frame::PushReply(r)) = &h.replies[0] else { panic!("a push reply: {:?}", h.replies[0].1) };
    assert_eq!(*to, backend);
    assert_eq!(r.request_id, 7);
    assert_eq!((r.delivered, r.not_online), (2, 1));
    assert_eq!(h.inflight(backend), 0, "the reply frees its in-flight slot");
    assert_eq!(h.port.in_flight(), 0);
    assert!(h.port.backend(backend).is_some_and(|b| !b.out.is_empty()), "queued on the connection");

    // An answer repeated after the reply is late: counted, not replied.
    merge_part(&mut h, *token, Part::Sessions(Vec::new()));
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.count_of(|e| matches!(e, PortEvent::LateAnswer)), 1);
}

#[test]
fn at_the_deadline_missing_parts_are_rejected_retryable_and_later_answers_are_dropped() {
    let mut h = FakeShard::new();
    let backend = h.granted_backend();
    let devices = devices_on_both_shards();
    on_request(&mut h, backend, Ok(device_push(8, &devices)));
    let parts = device_parts(&h);
    let (answered_shard, token, first) = parts[0].clone();
    merge_part(&mut h, token, Part::Sessions(first.iter().map(|&i| (i, 1)).collect()));

    h.advance(TIMEOUT_MS - 1);
    expire(&mut h);
    assert!(h.replies.is_empty(), "not before the deadline");
    h.advance(1);
    expire(&mut h);
    assert_eq!(h.replies.len(), 1);
    let (_, Frame::PushReply(r)) = &h.replies[0] else { panic!("a push reply") };
    for (res, device) in r.results.iter().zip(&devices) {
        if owner_shard(device, SHARDS) == answered_shard {
            assert_eq!((res.status, res.retryable), (PushStatus::Delivered as i32, false), "{res:?}");
        } else {
            assert_eq!((res.status, res.retryable), (PushStatus::Rejected as i32, true), "{res:?}");
        }
    }
    assert_eq!(h.count_of(|e| matches!(e, PortEvent::Timeout)), 1);
    assert_eq!(h.inflight(backend), 0);

    let (_, token, second) = &parts[1];
    merge_part(&mut h, *token, Part::Sessions(second.iter().map(|&i| (i, 1)).collect()));
    assert_eq!(h.replies.len(), 1, "answered once");
    assert_eq!(h.count_of(|e| matches!(e, PortEvent::LateAnswer)), 1);
    // The deadline is spent: a later tick answers nothing again.
    h.advance(TIMEOUT_MS);
    expire(&mut h);
    assert_eq!(h.replies.len(), 1);
}

#[test]
fn the_local_part_of_a_cluster_request_goes_to_its_merge_not_to_a_backend() {
    let mut h = FakeShard::new();
    let backend = h.granted_backend();
    let local = ConnKey { index: LOCAL, generation: 3 };
    let Frame::PushRequest(req) = device_push(9, &["d-a"]) else { unreachable!() };
    start_push(&mut h, local, req).expect("a valid push");
    let (_, token, items) = device_parts(&h).remove(0);
    merge_part(&mut h, token, Part::Sessions(items.iter().map(|&i| (i, 1)).collect()));
    assert_eq!(h.replies.len(), 1);
    assert_eq!(h.replies[0].0, local);
    assert!(h.port.backend(backend).is_some_and(|b| b.out.is_empty() && b.inflight == 0), "no backend touched");
}

#[test]
fn bad_requests_are_answered_at_once_without_a_pending_entry() {
    let mut h = FakeShard::new();
    let backend = h.granted_backend();
    let too_many: Vec<String> = (0..101).map(|i| format!("d{i}")).collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    on_request(&mut h, backend, Ok(device_push(10, &refs)));
    assert!(h.routed.is_empty());
    assert_eq!(h.port.in_flight(), 0);
    assert_eq!(h.inflight(backend), 0);
    assert!(h.port.backend(backend).is_some_and(|b| !b.out.is_empty()), "the error is queued");
    assert_eq!(h.count_of(|e| matches!(e, PortEvent::RequestError(_))), 1);
}

#[test]
fn silent_and_idle_backends_are_closed_but_a_busy_one_waits() {
    let mut h = FakeShard::new();
    let silent = admit_backend(&mut h, auth::Listener::Push).expect("room");
    let idle = h.granted_backend();
    let busy = h.granted_backend();
    h.port.hold(busy);

    h.advance(h.auth.auth_timeout_ms);
    expire(&mut h);
    assert!(h.port.backend(silent).is_some_and(|b| b.closing), "past its auth deadline");
    assert!(h.port.backend(idle).is_some_and(|b| !b.closing));
    assert_eq!(h.count_of(|e| matches!(e, PortEvent::AuthTimeout)), 1);

    h.advance(h.auth.idle_timeout_ms);
    expire(&mut h);
    assert!(h.port.backend(idle).is_some_and(|b| b.closing), "idle past its deadline");
    assert!(h.port.backend(busy).is_some_and(|b| !b.closing), "busy is not idle");
    h.port.reply(busy, Bytes::from_static(b"done"));
    h.advance(h.auth.idle_timeout_ms);
    expire(&mut h);
    assert!(h.port.backend(busy).is_some_and(|b| b.closing), "idle once its request was answered");
    assert_eq!(h.count_of(|e| matches!(e, PortEvent::AuthTimeout)), 1, "idle is not an auth timeout");
}

#[test]
fn admission_stops_at_the_bound_of_backends_authenticating() {
    let mut h = FakeShard::new();
    let max = h.auth.max_unauthenticated as usize;
    for _ in 0..max {
        assert!(admit_backend(&mut h, auth::Listener::Push).is_some());
    }
    assert!(admit_backend(&mut h, auth::Listener::Push).is_none());
    // One of them authenticated: room for one more.
    let (_, b) = h.port.backends.iter_mut().next().expect("a backend");
    b.auth = BackendAuth::Granted { rights: auth::Rights::ALL_PUSH, service_ids: Rc::from(Vec::new()) };
    assert!(admit_backend(&mut h, auth::Listener::Push).is_some());
    assert_eq!(h.port.connections(), max + 1);
}
