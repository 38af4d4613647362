//! Upstream requests and connection events over real TCP: a node with 2
//! shards on port 0, glommio clients, and echo backends (the real example
//! backend, `longlink::echo`) on port 0.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use longlink::client::{ClientEvent, ClientOptions, Connection};
use longlink::config::{Config, ServiceConfig};
use longlink::echo::EchoBackend;
use longlink::protocol::codec::{self, Flags, Frame};
use longlink::protocol::ids::owner_shard;
use longlink::protocol::proto::{self, ConnectionEventKind, ErrorCode};
use longlink::server::Server;
use longlink::upstream::UpstreamCounters;

const WAIT: Duration = Duration::from_secs(10);

fn service(id: &str, backends: &[SocketAddr]) -> ServiceConfig {
    ServiceConfig {
        id: id.into(),
        backends: backends.iter().map(|a| a.to_string()).collect(),
        timeout_ms: 10_000,
        ..ServiceConfig::default()
    }
}

fn config(services: Vec<ServiceConfig>) -> Config {
    let mut cfg = test_config(2);
    cfg.upstream.services = services;
    cfg.upstream.reconnect_backoff_min_ms = 20;
    cfg.upstream.reconnect_backoff_max_ms = 200;
    // The tests send hundreds of requests quickly; only the flood test limits.
    cfg.upstream.rate_limit_per_sec = 0;
    cfg
}

fn backend() -> EchoBackend {
    EchoBackend::start("127.0.0.1:0").expect("echo backend")
}

/// An address nobody listens on (connections are refused).
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// The sum of one upstream counter over every shard.
fn total(server: &Server, counter: impl Fn(&UpstreamCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
    server.counters().iter().map(|c| counter(&c.upstream).load(Ordering::Relaxed)).sum()
}

fn status(r: &proto::Response) -> ErrorCode {
    longlink::protocol::codes::from_wire(r.status)
}

async fn connect(addr: SocketAddr, cfg: &Config, user: &str, device: &str) -> (Connection, proto::AuthOk) {
    let mut opts = ClientOptions::new(token(cfg, user, device));
    opts.platform = "ios".into();
    opts.client_version = "9.9.1".into();
    Connection::connect(addr, opts).await.expect("client authenticates")
}

fn request(service: &str, request_id: u64, client_msg_id: u64, body: &'static str) -> proto::Request {
    proto::Request { service_id: service.into(), request_id, client_msg_id, body: Bytes::from_static(body.as_bytes()) }
}

#[test]
fn two_services_on_one_connection_each_reach_their_own_backend_with_the_common_parameters() {
    let chat = backend();
    let live = backend();
    let cfg = config(vec![service("chat", &[chat.addr()]), service("live", &[live.addr()])]);
    let server = start(&cfg);
    let addr = server.client_addr();
    let (ok, local) = run(async move {
        let (mut conn, ok) = connect(addr, &cfg, "alice", "alice-phone").await;
        // Pipelined and interleaved: 50 requests per service in flight at once.
        let mut ids = Vec::new();
        for i in 0..100u64 {
            let id = conn.next_request_id();
            let service = if i % 2 == 0 { "chat" } else { "live" };
            let req = proto::Request {
                service_id: service.into(),
                request_id: id,
                client_msg_id: 0,
                body: Bytes::from(format!("{service}-{i}")),
            };
            conn.send_request(&req, false).await.unwrap();
            ids.push((id, format!("{service}-{i}")));
        }
        for (id, body) in ids {
            let r = conn.wait_response(id, WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Unspecified, "{r:?}");
            assert_eq!(r.body, Bytes::from(body));
        }
        // The convenience call, and an unknown service: the connection stays up.
        let r = conn.request("live", Bytes::from_static(b"one more"), WAIT).await.unwrap();
        assert_eq!(r.body, Bytes::from_static(b"one more"));
        let r = conn.request("nope", Bytes::new(), WAIT).await.unwrap();
        assert_eq!(status(&r), ErrorCode::Unavailable);
        assert!(r.reason.contains("unknown service \"nope\""), "{}", r.reason);
        assert_nothing_queued(&mut conn).await;
        (ok, conn.local_addr().unwrap())
    });
    let (c, l) = (chat.stats(), live.stats());
    assert_eq!((c.requests_for("chat"), c.requests_for("live")), (50, 0));
    assert_eq!((l.requests_for("live"), l.requests_for("chat")), (51, 0));
    let info = c.recent.back().and_then(|r| r.conn.clone()).expect("common parameters");
    let want = proto::ConnInfo {
        user: "alice".into(),
        device: "alice-phone".into(),
        app: "test".into(),
        platform: "ios".into(),
        client_version: "9.9.1".into(),
        conn_id: ok.conn_id,
        node: "test".into(),
        client_addr: local.to_string(),
    };
    assert_eq!(info, want);
    assert_eq!(c.recent.back().unwrap().timeout_ms, 10_000);
    assert_eq!(total(&server, |c| &c.ok), 101);
    assert_eq!(total(&server, |c| &c.unavailable), 1);
    server.shutdown();
}

#[test]
fn a_stalled_service_neither_delays_nor_blocks_another_on_the_same_connection() {
    let slow = backend();
    let fast = backend();
    let mut slow_service = service("slow", &[slow.addr()]);
    slow_service.max_inflight_per_shard = 32;
    let cfg = config(vec![slow_service, service("fast", &[fast.addr()])]);
    let server = start(&cfg);
    let addr = server.client_addr();
    slow.set_stalled(true);
    let slow_ref = &slow;
    run(async move {
        let (mut conn, _) = connect(addr, &cfg, "bob", "bob-phone").await;
        // Fill the slow service's budget, and go over it.
        let mut slow_ids = Vec::new();
        for _ in 0..40 {
            let id = conn.next_request_id();
            conn.send_request(&request("slow", id, 0, "s"), false).await.unwrap();
            slow_ids.push(id);
        }
        assert!(slow_ref.wait_for(WAIT, |s| s.requests_for("slow") == 32), "the backend holds 32");
        // The fast service answers 300 requests in a row meanwhile: all of
        // them while every slow request is still unanswered (its timeout is
        // 10 s; these take well under that even on a debug build).
        let start = Instant::now();
        for i in 0..300 {
            let r = conn.request("fast", Bytes::from(format!("f{i}")), WAIT).await.unwrap();
            assert_eq!((status(&r), r.body.clone()), (ErrorCode::Unspecified, Bytes::from(format!("f{i}"))));
        }
        let fast_time = start.elapsed();
        // Over the budget: BUSY at once, nothing else from the slow service yet.
        let mut busy = 0;
        for &id in &slow_ids[32..] {
            let r = conn.wait_response(id, WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Busy, "{r:?}");
            assert!(r.reason.contains("in flight"), "{}", r.reason);
            busy += 1;
        }
        assert_eq!(busy, 8);
        for &id in &slow_ids[..32] {
            assert!(matches!(
                conn.wait_response(id, Duration::from_millis(1)).await,
                Err(longlink::client::ClientError::NoResponse { .. })
            ));
        }
        assert!(fast_time < Duration::from_secs(10), "fast service took {fast_time:?}");
        // The slow backend recovers: its 32 answers arrive.
        slow_ref.set_stalled(false);
        for &id in &slow_ids[..32] {
            let r = conn.wait_response(id, WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Unspecified);
        }
    });
    assert_eq!(fast.stats().requests_for("fast"), 300);
    assert_eq!(slow.stats().requests_for("slow"), 32, "BUSY requests never reach the backend");
    assert_eq!(total(&server, |c| &c.busy), 8);
    server.shutdown();
}

#[test]
fn timeouts_busy_and_late_answers() {
    let stalled = backend();
    let mut svc = service("stuck", &[stalled.addr()]);
    svc.timeout_ms = 300;
    svc.max_inflight_per_shard = 2;
    let cfg = config(vec![svc]);
    let server = start(&cfg);
    let addr = server.client_addr();
    stalled.set_stalled(true);
    let stalled_ref = &stalled;
    let server_ref = &server;
    run(async move {
        let (mut conn, _) = connect(addr, &cfg, "carol", "carol-phone").await;
        let start = Instant::now();
        let ids: Vec<u64> = (0..3).map(|_| conn.next_request_id()).collect();
        for &id in &ids {
            conn.send_request(&request("stuck", id, 0, "x"), false).await.unwrap();
        }
        let r = conn.wait_response(ids[2], WAIT).await.unwrap();
        assert_eq!(status(&r), ErrorCode::Busy, "third request over a budget of 2");
        for &id in &ids[..2] {
            let r = conn.wait_response(id, WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Timeout, "{r:?}");
            assert!(r.reason.contains("300 ms"), "{}", r.reason);
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(290), "timed out early: {waited:?}");
        assert!(waited < Duration::from_secs(5), "timed out late: {waited:?}");
        // The answers come after all: dropped and counted, never delivered.
        stalled_ref.set_stalled(false);
        assert!(wait_until(WAIT, || total(server_ref, |c| &c.late) == 2));
        let r = conn.request("stuck", Bytes::from_static(b"now"), WAIT).await.unwrap();
        assert_eq!((status(&r), r.body), (ErrorCode::Unspecified, Bytes::from_static(b"now")));
        assert_nothing_queued(&mut conn).await;
    });
    assert_eq!(total(&server, |c| &c.timeouts), 2);
    server.shutdown();
}

#[test]
fn failover_to_a_live_backend_and_unavailable_when_none_is_up() {
    let b1 = backend();
    let mut b2 = backend();
    let b2_addr = b2.addr();
    let mut svc = service("pay", &[dead_addr(), b1.addr(), b2_addr]);
    svc.pool_size = 2;
    let cfg = config(vec![svc]);
    let server = start(&cfg);
    let addr = server.client_addr();
    let server_ref = &server;
    let b1_ref = &b1;
    run(async move {
        let (mut conn, _) = connect(addr, &cfg, "dan", "dan-phone").await;
        // The dead backend is skipped; the live two share the load.
        for i in 0..40 {
            let r = conn.request("pay", Bytes::from(format!("p{i}")), WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Unspecified, "{r:?}");
        }
        assert_eq!(b1_ref.stats().requests_for("pay"), 20);
        assert_eq!(b2.stats().requests_for("pay"), 20);
        // One live backend goes away: the node notices (4 links: 2 per shard)
        // and everything goes to the other.
        b2.stop();
        assert!(wait_until(WAIT, || total(server_ref, |c| &c.backend_disconnects) >= 4));
        for i in 0..20 {
            let r = conn.request("pay", Bytes::from(format!("q{i}")), WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Unspecified, "{r:?}");
        }
        assert_eq!(b1_ref.stats().requests_for("pay"), 40);
        // It comes back on the same port: the node reconnects by itself.
        let b2 = EchoBackend::start(b2_addr).expect("restart on the same port");
        assert!(wait_until(WAIT, || b2.stats().connections >= 4));
        let mut reached = false;
        for _ in 0..20 {
            conn.request("pay", Bytes::from_static(b"r"), WAIT).await.unwrap();
            reached |= b2.stats().requests_for("pay") > 0;
        }
        assert!(reached, "requests go to the restarted backend again");
    });
    drop(b1);
    assert!(wait_until(WAIT, || total(&server, |c| &c.backend_disconnects) >= 12));
    run({
        let cfg = config(vec![]);
        async move {
            let (mut conn, _) = connect(addr, &cfg, "dan", "dan-phone").await;
            let r = conn.request("pay", Bytes::from_static(b"x"), WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Unavailable);
            assert!(r.reason.contains("no backend of service \"pay\" is up"), "{}", r.reason);
            // Still connected.
            assert_nothing_queued(&mut conn).await;
        }
    });
    server.shutdown();
}

#[test]
fn retries_with_the_same_client_msg_id_reach_the_backend_once() {
    let b = backend();
    let cfg = config(vec![service("orders", &[b.addr()])]);
    let server = start(&cfg);
    let addr = server.client_addr();
    b.set_stalled(true);
    let b_ref = &b;
    let cfg2 = cfg.clone();
    run(async move {
        let (mut conn, _) = connect(addr, &cfg2, "erin", "erin-phone").await;
        let first = request("orders", 1, 777, "buy 1");
        conn.send_request(&first, false).await.unwrap();
        assert!(b_ref.wait_for(WAIT, |s| s.times_seen("erin-phone", 777) == 1));
        // A retry while the first attempt is in flight waits for it.
        conn.send_request(&request("orders", 2, 777, "buy 1"), true).await.unwrap();
        // Another message id is a different request.
        conn.send_request(&request("orders", 3, 778, "buy 2"), false).await.unwrap();
        assert!(b_ref.wait_for(WAIT, |s| s.requests_for("orders") == 2));
        b_ref.set_stalled(false);
        let a1 = conn.wait_response(1, WAIT).await.unwrap();
        let a2 = conn.wait_response(2, WAIT).await.unwrap();
        assert_eq!((status(&a1), a1.body.clone()), (ErrorCode::Unspecified, Bytes::from_static(b"buy 1")));
        assert_eq!((a2.status, a2.body.clone()), (a1.status, a1.body.clone()));
        assert_eq!(conn.wait_response(3, WAIT).await.unwrap().body, Bytes::from_static(b"buy 2"));
        // A retry after the answer is replayed from the dedup window.
        conn.send_request(&request("orders", 4, 777, "buy 1"), true).await.unwrap();
        let a4 = conn.wait_response(4, WAIT).await.unwrap();
        assert_eq!((a4.status, a4.body), (a1.status, a1.body.clone()));
        conn.close().await;
        // So is one sent over a new connection after a reconnect.
        let (mut again, _) = connect(addr, &cfg2, "erin", "erin-phone").await;
        again.send_request(&request("orders", 1, 777, "buy 1"), true).await.unwrap();
        let a5 = again.wait_response(1, WAIT).await.unwrap();
        assert_eq!(a5.body, a1.body);
        // Another device may use the same id: it is its own request.
        let (mut other, _) = connect(addr, &cfg2, "frank", "frank-phone").await;
        other.send_request(&request("orders", 1, 777, "buy 1"), true).await.unwrap();
        assert_eq!(other.wait_response(1, WAIT).await.unwrap().body, Bytes::from_static(b"buy 1"));
    });
    let s = b.stats();
    assert_eq!(s.times_seen("erin-phone", 777), 1, "the backend saw it once");
    assert_eq!(s.times_seen("frank-phone", 777), 1);
    assert_eq!(s.requests_for("orders"), 3);
    assert_eq!(total(&server, |c| &c.dedup_joined), 1);
    assert_eq!(total(&server, |c| &c.dedup_replayed), 2);
    server.shutdown();
}

fn kind(e: &proto::ConnectionEvent) -> ConnectionEventKind {
    ConnectionEventKind::try_from(e.kind).unwrap_or(ConnectionEventKind::Unspecified)
}

#[test]
fn online_replaced_and_offline_events_reach_a_subscribed_backend_with_the_parameters() {
    let watcher = backend();
    let plain = backend();
    let mut presence = service("presence", &[watcher.addr()]);
    presence.subscribe_events = true;
    presence.timeout_ms = 300; // an unacknowledged batch is sent again after this
    let mut unreachable = service("audit", &[dead_addr()]);
    unreachable.subscribe_events = true;
    let mut cfg = config(vec![presence, service("chat", &[plain.addr()]), unreachable]);
    cfg.upstream.events_batch_max = 2;
    cfg.upstream.events_queue_max = 3;
    let server = start(&cfg);
    let addr = server.client_addr();
    // Withhold acks at first: the node must send the batch again.
    watcher.set_ack_events(false);
    let watcher_ref = &watcher;
    let (first, second) = run(async move {
        let (c1, ok1) = connect(addr, &cfg, "gina", "gina-phone").await;
        assert!(watcher_ref.wait_for(WAIT, |s| s.event_batches >= 2), "the unacknowledged batch comes again");
        watcher_ref.set_ack_events(true);
        let local1 = c1.local_addr().unwrap();
        // The same device logs in again: the first session is replaced.
        let (c2, ok2) = connect(addr, &cfg, "gina", "gina-phone").await;
        let local2 = c2.local_addr().unwrap();
        c2.close().await;
        drop(c1);
        ((ok1.conn_id, local1), (ok2.conn_id, local2))
    });
    assert!(watcher.wait_for(WAIT, |s| {
        let kinds: Vec<_> = s.events.iter().map(kind).collect();
        kinds.ends_with(&[ConnectionEventKind::Replaced, ConnectionEventKind::Online, ConnectionEventKind::Offline])
    }));
    let s = watcher.stats();
    // The first ONLINE came twice (not acknowledged the first time).
    let kinds: Vec<_> = s.events.iter().map(kind).collect();
    assert!(kinds.len() >= 5, "{kinds:?}");
    assert!(kinds[..kinds.len() - 3].iter().all(|k| *k == ConnectionEventKind::Online), "{kinds:?}");
    let n = s.events.len();
    let param = |e: &proto::ConnectionEvent| e.conn.clone().expect("conn info");
    let (online1, replaced, online2, offline) =
        (param(&s.events[0]), param(&s.events[n - 3]), param(&s.events[n - 2]), param(&s.events[n - 1]));
    for (info, (conn_id, local)) in [(&online1, first), (&replaced, first), (&online2, second), (&offline, second)] {
        assert_eq!(
            (info.user.as_str(), info.device.as_str(), info.app.as_str(), info.platform.as_str()),
            ("gina", "gina-phone", "test", "ios")
        );
        assert_eq!((info.client_version.as_str(), info.node.as_str()), ("9.9.1", "test"));
        assert_eq!(info.conn_id, conn_id);
        if info != &offline {
            assert_eq!(info.client_addr, local.to_string());
        }
    }
    assert_ne!(online1.conn_id, online2.conn_id);
    assert_eq!(longlink::protocol::codes::from_wire(s.events[n - 3].code), ErrorCode::Replaced);
    assert!(s.events.iter().all(|e| e.at_ms > 0));
    assert_eq!(plain.stats().events.len(), 0, "a service that did not subscribe gets none");
    // The unreachable subscriber's queue holds 3 of the 4 events: the oldest
    // was dropped and counted.
    assert!(wait_until(WAIT, || total(&server, |c| &c.events_dropped) == 1));
    assert!(total(&server, |c| &c.events_resent_batches) >= 1);
    server.shutdown();
}

/// Encodes `n` Request frames for a raw socket.
fn request_frames(n: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    for i in 0..n {
        let req = proto::Request { service_id: "svc".into(), request_id: i as u64 + 1, ..Default::default() };
        Frame::Request(req).encode_into(&mut b, Flags::default());
    }
    b.to_vec()
}

/// A client on a plain blocking socket that sends requests as fast as the
/// socket takes them and counts the responses until the node closes it.
/// Returns (responses, the close code, how long it was connected).
fn flood(addr: SocketAddr, token: String) -> (u64, Option<ErrorCode>, Duration) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut b = BytesMut::new();
    Frame::Auth(proto::Auth { token, ..Default::default() }).encode_into(&mut b, Flags::default());
    s.write_all(&b).unwrap();
    let start = Instant::now();
    let mut writer = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let batch = request_frames(1000);
        // Ends when the node closes the socket.
        while writer.write_all(&batch).is_ok() {}
    });
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (mut buf, mut chunk) = (Vec::new(), vec![0u8; 64 * 1024]);
    let (mut responses, mut code) = (0u64, None);
    loop {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut used = 0;
        while let Ok(Some((h, body))) = codec::split_frame(&buf[used..], codec::DEFAULT_MAX_BODY) {
            match Frame::decode(h, body).unwrap() {
                Frame::Response(_) => responses += 1,
                Frame::Error(e) => code = Some(longlink::protocol::codes::from_wire(e.code)),
                _ => {}
            }
            used += h.frame_len();
        }
        buf.drain(..used);
    }
    (responses, code, start.elapsed())
}

#[test]
fn a_flooding_client_is_paused_then_closed_while_a_normal_client_is_unaffected() {
    let b = backend();
    let mut cfg = config(vec![service("svc", &[b.addr()])]);
    cfg.upstream.rate_limit_per_sec = 50;
    cfg.upstream.rate_limit_burst = 20;
    cfg.upstream.rate_limit_close_after_paused_ms = 1_000;
    cfg.upstream.rate_limit_window_ms = 10_000;
    let server = start(&cfg);
    let addr = server.client_addr();
    let flooder = {
        let token = token(&cfg, "mallory", "mallory-phone");
        std::thread::spawn(move || flood(addr, token))
    };
    let latencies = run(async move {
        let (mut conn, _) = connect(addr, &cfg, "nina", "nina-phone").await;
        // 30 requests at 20/s, under the limit of 50/s, while the flood goes on.
        let mut latencies = Vec::new();
        for i in 0..30 {
            let sent = Instant::now();
            let r = conn.request("svc", Bytes::from(format!("n{i}")), WAIT).await.unwrap();
            assert_eq!(status(&r), ErrorCode::Unspecified, "{r:?}");
            latencies.push(sent.elapsed());
            glommio::timer::sleep(Duration::from_millis(50)).await;
        }
        assert_nothing_queued(&mut conn).await;
        latencies
    });
    let (responses, code, connected) = flooder.join().unwrap();
    assert_eq!(code, Some(ErrorCode::RateLimited));
    // Paused: it got the burst plus about the rate while connected (it sent
    // thousands), and it was closed after about 1 s of pausing.
    let allowed = 20.0 + 50.0 * connected.as_secs_f64() * 1.5 + 10.0;
    assert!(responses >= 20 && (responses as f64) <= allowed, "{responses} responses in {connected:?}");
    assert!(connected >= Duration::from_millis(900) && connected < Duration::from_secs(8), "{connected:?}");
    assert!(total(&server, |c| &c.rate_paused) >= 1);
    assert_eq!(total(&server, |c| &c.rate_closed), 1);
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    assert!(slowest < Duration::from_secs(1), "the normal client waited {slowest:?}");
    assert!(b.stats().requests_for("svc") >= 30 + 20);
    server.shutdown();
}

#[test]
fn requests_follow_the_device_to_its_owner_shard() {
    // Devices on both shards: each shard has its own links and budgets.
    let b = backend();
    let cfg = config(vec![service("svc", &[b.addr()])]);
    let server = start(&cfg);
    let addr = server.client_addr();
    let devices: Vec<(String, String)> = (0..8).map(|i| (format!("u{i}"), format!("shard-dev-{i}"))).collect();
    let owners: HashSet<_> = devices.iter().map(|(_, d)| owner_shard(d, 2)).collect();
    assert_eq!(owners.len(), 2);
    run(async move {
        let mut conns = connect_all(addr, &cfg, &devices).await;
        for (i, c) in conns.iter_mut().enumerate() {
            let r = c.request("svc", Bytes::from(format!("d{i}")), WAIT).await.unwrap();
            assert_eq!(r.body, Bytes::from(format!("d{i}")));
        }
        // A message pushed while a request waits is kept for next_event.
        let id = conns[0].next_request_id();
        conns[0].send_request(&request("svc", id, 0, "x"), false).await.unwrap();
        conns[0].ping().await.unwrap();
        assert_eq!(conns[0].wait_response(id, WAIT).await.unwrap().body, Bytes::from_static(b"x"));
        assert!(matches!(conns[0].next_event().await.unwrap(), ClientEvent::Pong { .. }));
    });
    let per_shard: Vec<u64> = server.counters().iter().map(|c| c.upstream.forwarded.load(Ordering::Relaxed)).collect();
    assert!(per_shard.iter().all(|&n| n > 0), "{per_shard:?}");
    server.shutdown();
}
