//! The upstream component driven through a fake [`UpstreamHost`]: one
//! service with one link, sessions that are only keys, a clock the test
//! moves, no sockets and no shard. Requests are forwarded, answered (or
//! not) by feeding the link's bytes in, and the answers checked where the
//! component hands them to the host.

use super::*;
use crate::config::UpstreamConfig;

const SESSION: ConnKey = ConnKey { index: 1, generation: 1 };
const TIMEOUT_MS: u32 = 1_000;

struct FakeShard {
    up: Upstream,
    counters: UpstreamCounters,
    now: Now,
    /// Responses handed to sessions, decoded.
    sent: Vec<(ConnKey, proto::Response)>,
}

impl FakeShard {
    fn new() -> FakeShard {
        let mut settings = UpstreamSettings::resolve(&UpstreamConfig::default()).expect("default settings");
        settings.services.push(ServiceSettings {
            id: "chat".into(),
            backends: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
            timeout_ms: TIMEOUT_MS,
            max_inflight: 8,
            pool_size: 1,
            subscribe_events: false,
        });
        FakeShard {
            up: Upstream::new(settings),
            counters: UpstreamCounters::default(),
            now: Now { mono: Millis(1_000), unix_ms: 1_800_000_000_000 },
            sent: Vec::new(),
        }
    }

    /// The service's one link, marked up (no socket: what it would write
    /// stays queued on it).
    fn link_up(&mut self) -> u32 {
        let (idx, link) = self.up.links.iter_mut().next().expect("one link");
        link.state = LinkState::Up;
        idx as u32
    }

    fn request(&mut self, request_id: u64, client_msg_id: u64) {
        let req =
            proto::Request { request_id, service_id: "chat".into(), client_msg_id, body: Bytes::from_static(b"ping") };
        let now = self.now;
        on_client_request(self, SESSION, now, req);
    }

    /// The backend answers every request in flight (oldest first).
    fn answer_all(&mut self, link: u32, body: &'static [u8]) {
        let mut ids: Vec<u64> = self.up.pending.keys().copied().collect();
        ids.sort_unstable();
        let mut wire = Vec::new();
        for id in ids {
            let r = proto::UpstreamResponse { id, status: 0, body: Bytes::from_static(body), reason: String::new() };
            wire.extend_from_slice(&codec::encode(FrameKind::UpstreamResponse, Flags::default(), &r));
        }
        assert_eq!(on_link_bytes(self, link, &wire, 1 << 20), Ok(wire.len()));
    }

    fn statuses(&self) -> Vec<(u64, i32)> {
        self.sent.iter().map(|(_, r)| (r.request_id, r.status)).collect()
    }
}

impl UpstreamHost for FakeShard {
    fn upstream(&mut self) -> &mut Upstream {
        &mut self.up
    }

    fn counters(&self) -> &UpstreamCounters {
        &self.counters
    }

    fn parts(&mut self) -> (&mut Upstream, &UpstreamCounters) {
        (&mut self.up, &self.counters)
    }

    fn with_device(&mut self, _key: ConnKey) -> (&mut Upstream, Option<&str>) {
        (&mut self.up, Some("phone-1"))
    }

    fn device_of(&self, _key: ConnKey) -> Option<&str> {
        Some("phone-1")
    }

    fn shard_id(&self) -> crate::protocol::ids::ShardId {
        crate::protocol::ids::ShardId(0)
    }

    fn now(&self) -> Now {
        self.now
    }

    fn max_frame_bytes(&self) -> u32 {
        64 * 1024
    }

    fn conn_info(&self, _key: ConnKey) -> Option<proto::ConnInfo> {
        Some(proto::ConnInfo { device: "phone-1".into(), user: "alice".into(), ..Default::default() })
    }

    fn respond(&mut self, key: ConnKey, frame: Bytes) -> bool {
        let Ok(Some((header, body))) = codec::split_frame(&frame, 1 << 20) else { panic!("a whole frame") };
        let Ok(Frame::Response(r)) = Frame::decode(header, body) else { panic!("a Response") };
        self.sent.push((key, r));
        false
    }

    fn flush_responses(&mut self, _keys: &[ConnKey]) {}

    fn resume(&mut self, _key: ConnKey) {}

    fn close_conn(&mut self, _key: ConnKey, _now: Now, _code: ErrorCode, _reason: String) {}
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .expect("executor")
        .run(f)
}

const OK: i32 = ErrorCode::Unspecified as i32;

#[test]
fn a_request_is_forwarded_on_a_link_that_is_up_and_its_answer_reaches_the_session() {
    run(async {
        let mut h = FakeShard::new();
        h.request(1, 0);
        assert_eq!(h.statuses(), [(1, ErrorCode::Unavailable as i32)], "no backend up yet");
        let link = h.link_up();
        h.request(2, 0);
        assert_eq!(h.up.pending.len(), 1);
        assert!(!h.up.links[link as usize].out.is_empty(), "queued on the link");
        h.answer_all(link, b"pong");
        assert_eq!(h.statuses(), [(1, ErrorCode::Unavailable as i32), (2, OK)]);
        assert_eq!(&h.sent[1].1.body[..], b"pong");
        assert!(h.up.pending.is_empty());
        assert_eq!(h.up.services[0].inflight, 0);
    });
}

#[test]
fn a_retry_joins_its_first_attempt_then_replays_its_answer() {
    run(async {
        let mut h = FakeShard::new();
        let link = h.link_up();
        h.request(1, 77);
        h.request(2, 77);
        assert_eq!(h.up.pending.len(), 1, "the retry waits for the first attempt");
        assert_eq!(h.counters.dedup_joined.load(Ordering::Relaxed), 1);
        h.answer_all(link, b"once");
        assert_eq!(h.statuses(), [(1, OK), (2, OK)]);
        h.request(3, 77);
        assert_eq!(h.statuses(), [(1, OK), (2, OK), (3, OK)], "answered from the dedup window");
        assert_eq!(&h.sent[2].1.body[..], b"once");
        assert!(h.up.pending.is_empty(), "never forwarded again");
    });
}

#[test]
fn a_request_without_an_answer_times_out_and_its_late_answer_is_dropped() {
    run(async {
        let mut h = FakeShard::new();
        let link = h.link_up();
        h.request(1, 0);
        h.now.mono = h.now.mono.add_ms(u64::from(TIMEOUT_MS) - 1);
        tick(&mut h);
        assert!(h.sent.is_empty(), "not before its deadline");
        let id = *h.up.pending.keys().next().expect("in flight");
        h.now.mono = h.now.mono.add_ms(1);
        tick(&mut h);
        assert_eq!(h.statuses(), [(1, ErrorCode::Timeout as i32)]);
        let r = proto::UpstreamResponse { id, status: 0, body: Bytes::new(), reason: String::new() };
        let wire = codec::encode(FrameKind::UpstreamResponse, Flags::default(), &r);
        assert_eq!(on_link_bytes(&mut h, link, &wire, 1 << 20), Ok(wire.len()));
        assert_eq!(h.sent.len(), 1, "answered once");
        assert_eq!(h.counters.late.load(Ordering::Relaxed), 1);
    });
}

#[test]
fn a_broken_link_fails_its_requests_unavailable_and_a_bad_frame_drops_it() {
    run(async {
        let mut h = FakeShard::new();
        let link = h.link_up();
        h.request(1, 0);
        h.request(2, 0);
        assert!(link_down(&mut h, link).is_none(), "no socket in this test");
        let mut failed = h.statuses();
        failed.sort_unstable();
        assert_eq!(failed, [(1, ErrorCode::Unavailable as i32), (2, ErrorCode::Unavailable as i32)]);
        assert_eq!(h.up.services[0].inflight, 0);
        let garbage = [0xffu8; 64];
        assert_eq!(on_link_bytes(&mut h, link, &garbage, 1 << 20), Err(()));
    });
}
