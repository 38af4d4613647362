//! The connector core over real TCP: 2 shards, port 0.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::protocol::codec::{self, Flags, Frame};
use longlink::protocol::ids::{ConnId, owner_shard};
use longlink::protocol::proto::{self, ErrorCode, FrameKind};

fn auth_bytes(token: String) -> BytesMut {
    let mut b = BytesMut::new();
    Frame::Auth(proto::Auth { token, ..Default::default() }).encode_into(&mut b, Flags::default());
    b
}

#[test]
fn thousand_clients_authenticate_ping_and_live_on_their_owner_shard() {
    let mut cfg = test_config(2);
    // A thousand client tasks on one starved test thread may send their
    // Auth later than the suite's short auth deadline.
    cfg.session.auth_timeout_ms = 10_000;
    let server = start(&cfg);
    let addr = server.client_addr();
    let tokens: Vec<(String, String)> = (0..1000)
        .map(|i| {
            let device = format!("dev-{i}");
            (device.clone(), token(&cfg, &format!("user-{}", i % 300), &device))
        })
        .collect();
    let results = run(async move {
        let tasks: Vec<_> = tokens
            .into_iter()
            .map(|(device, token)| {
                glommio::spawn_local(async move {
                    let (mut conn, ok) = Connection::connect(addr, ClientOptions::new(token)).await.expect("auth");
                    conn.ping().await.expect("ping");
                    let ev = conn.next_event().await.expect("pong");
                    assert!(matches!(ev, ClientEvent::Pong { .. }), "{ev:?}");
                    (device, ok, conn)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        // Every connection is still open here; close them all together.
        out.into_iter().map(|(d, ok, _conn)| (d, ok)).collect::<Vec<_>>()
    });
    assert_eq!(results.len(), 1000);
    for (device, ok) in &results {
        let owner = owner_shard(device, 2);
        assert_eq!(ok.shard, u32::from(owner.0), "{device} answered by the wrong shard");
        assert_eq!(ConnId(ok.conn_id).shard(), owner);
    }
    let counters = server.counters();
    let handed: u64 = counters.iter().map(|c| c.handed_off.load(Ordering::Relaxed)).sum();
    let adopted: u64 = counters.iter().map(|c| c.adopted.load(Ordering::Relaxed)).sum();
    // SO_REUSEPORT spreads accepts over both shards, so about half of the
    // devices were accepted on the wrong core and moved.
    assert!(handed > 100, "only {handed} hand-offs");
    assert_eq!(handed, adopted);
    server.shutdown();
}

#[test]
fn frames_pipelined_behind_auth_survive_the_hand_off() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let inputs: Vec<BytesMut> = (0..40)
        .map(|i| {
            let mut b = auth_bytes(token(&cfg, "u", &format!("pipelined-{i}")));
            b.extend_from_slice(&codec::encode_empty(FrameKind::Ping, Flags::default()));
            b.extend_from_slice(&codec::encode_empty(FrameKind::Ping, Flags::default()));
            b
        })
        .collect();
    run(async move {
        for input in inputs {
            let mut stream = glommio::net::TcpStream::connect(addr).await.unwrap();
            futures_lite::AsyncWriteExt::write_all(&mut stream, &input).await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // AuthOk + 2 Pongs = 3 frames.
            while decode_all(&buf).len() < 3 {
                let n = futures_lite::AsyncReadExt::read(&mut stream, &mut chunk).await.unwrap();
                assert!(n > 0, "closed early: {:?}", decode_all(&buf));
                buf.extend_from_slice(&chunk[..n]);
            }
            let frames = decode_all(&buf);
            assert!(matches!(frames[0], Frame::AuthOk(_)), "{frames:?}");
            assert_eq!(&frames[1..], &[Frame::Pong, Frame::Pong]);
        }
    });
    let handed: u64 = server.counters().iter().map(|c| c.handed_off.load(Ordering::Relaxed)).sum();
    assert!(handed > 0, "no connection crossed shards; the test proved nothing");
    server.shutdown();
}

#[test]
fn frames_sent_right_after_auth_survive_the_wait_for_the_user_directory() {
    // Devices whose user's home shard is not the device's owner shard: the
    // session waits for the home shard's directory ack before AuthOk. Frames
    // the client sends meanwhile must wait in the socket, not be dropped.
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let pairs: Vec<(String, String)> = (0..400)
        .map(|i| (format!("dir-user-{i}"), format!("dir-dev-{i}")))
        .filter(|(u, d)| longlink::protocol::ids::home_shard(u, 2) != owner_shard(d, 2))
        .take(60)
        .collect();
    assert_eq!(pairs.len(), 60);
    let inputs: Vec<(BytesMut, Vec<u8>)> = pairs
        .iter()
        .map(|(u, d)| {
            let pings: Vec<u8> =
                (0..200).flat_map(|_| codec::encode_empty(FrameKind::Ping, Flags::default())).collect();
            (auth_bytes(token(&cfg, u, d)), pings)
        })
        .collect();
    run(async move {
        let tasks: Vec<_> = inputs
            .into_iter()
            .map(|(auth, pings)| {
                glommio::spawn_local(async move {
                    let mut stream = glommio::net::TcpStream::connect(addr).await.unwrap();
                    // Two writes: the node may read the Auth alone, then the
                    // Pings while the session waits for activation.
                    futures_lite::AsyncWriteExt::write_all(&mut stream, &auth).await.unwrap();
                    futures_lite::AsyncWriteExt::write_all(&mut stream, &pings).await.unwrap();
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while decode_all(&buf).len() < 201 {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        let read = futures_lite::future::or(
                            async { Some(futures_lite::AsyncReadExt::read(&mut stream, &mut chunk).await) },
                            async {
                                glommio::timer::sleep(left).await;
                                None
                            },
                        )
                        .await;
                        let n = read.unwrap_or_else(|| panic!("{} of 201 frames in 10 s", decode_all(&buf).len()));
                        let n = n.unwrap();
                        assert!(n > 0, "closed early: {:?}", decode_all(&buf).last());
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let frames = decode_all(&buf);
                    assert!(matches!(frames[0], Frame::AuthOk(_)), "{:?}", frames[0]);
                    assert!(frames[1..].iter().all(|f| *f == Frame::Pong), "every Ping answered");
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
    server.shutdown();
}

#[test]
fn each_bad_input_gets_its_code_and_others_keep_being_served() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let ring = keyring(&cfg);
    let now = longlink::protocol::token::now_unix_secs();
    let good = token(&cfg, "good", "good-device");
    let expired = ring.mint("u", "d-exp", "a", now - 7200, now - 3600);
    let future = ring.mint("u", "d-fut", "a", now + 3600, now + 7200);
    let mut forged = token(&cfg, "u", "d-forged");
    forged.insert(5, if forged.as_bytes()[5] == b'A' { 'B' } else { 'A' });

    let mut too_large = vec![codec::MAGIC, codec::VERSION, FrameKind::Auth as u8, 0];
    too_large.extend_from_slice(&u32::MAX.to_be_bytes());
    let ping = codec::encode_empty(FrameKind::Ping, Flags::default()).to_vec();
    let mut wrong_version = ping.clone();
    wrong_version[1] = 9;
    let mut bad_body = vec![codec::MAGIC, codec::VERSION, FrameKind::Auth as u8, 0, 0, 0, 0, 3];
    bad_body.extend_from_slice(&[0xff, 0xff, 0xff]);

    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("http garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), ErrorCode::BadFrame),
        ("4 GiB header", too_large, ErrorCode::FrameTooLarge),
        ("wrong version", wrong_version, ErrorCode::UnsupportedVersion),
        ("malformed body", bad_body, ErrorCode::BadFrame),
        ("frame before auth", ping, ErrorCode::BadFrame),
        ("invalid token", auth_bytes("not-a-token".into()).to_vec(), ErrorCode::InvalidToken),
        ("forged token", auth_bytes(forged).to_vec(), ErrorCode::InvalidToken),
        ("expired token", auth_bytes(expired).to_vec(), ErrorCode::TokenExpired),
        ("future token", auth_bytes(future).to_vec(), ErrorCode::TokenNotYetValid),
        ("silent client", Vec::new(), ErrorCode::AuthTimeout),
    ];
    run(async move {
        let (mut keeper, _) = Connection::connect(addr, ClientOptions::new(good)).await.unwrap();
        for (name, input, want) in cases {
            let frames = exchange(addr, &input, Duration::from_secs(10)).await;
            assert_eq!(close_code(&frames), Some(want), "{name}: {frames:?}");
            let Some(Frame::Error(e)) = frames.last() else { panic!("{name}: no Error frame") };
            assert_eq!(e.reconnect, longlink::protocol::codes::reconnect_allowed(want), "{name}");
            // The well-behaved client is still served after each bad one.
            keeper.ping().await.unwrap();
            assert!(matches!(keeper.next_event().await.unwrap(), ClientEvent::Pong { .. }), "{name}");
        }
    });
    server.shutdown();
}

#[test]
fn silent_session_is_closed_with_idle_timeout() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut auth = proto::Auth { token: token(&cfg, "u", "quiet"), heartbeat_ms: 100, ..Default::default() };
    auth.client_version = "t".into();
    let mut bytes = BytesMut::new();
    Frame::Auth(auth).encode_into(&mut bytes, Flags::default());
    let frames = run(async move { exchange(addr, &bytes, Duration::from_secs(10)).await });
    let Some(Frame::AuthOk(ok)) = frames.first() else { panic!("{frames:?}") };
    assert_eq!((ok.heartbeat_ms, ok.idle_timeout_ms), (100, 300));
    assert_eq!(close_code(&frames), Some(ErrorCode::IdleTimeout));
    server.shutdown();
}

#[test]
fn second_login_of_a_device_replaces_the_first() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let t1 = token(&cfg, "alice", "phone");
    let t2 = token(&cfg, "alice", "phone");
    run(async move {
        let (mut first, ok1) = Connection::connect(addr, ClientOptions::new(t1)).await.unwrap();
        let (mut second, ok2) = Connection::connect(addr, ClientOptions::new(t2)).await.unwrap();
        assert_ne!(ok1.conn_id, ok2.conn_id);
        let err = first.next_event().await.unwrap_err();
        assert!(matches!(err, ClientError::Kicked { code: ErrorCode::Replaced, .. }), "{err:?}");
        assert!(!err.reconnect_allowed());
        second.ping().await.unwrap();
        assert!(matches!(second.next_event().await.unwrap(), ClientEvent::Pong { .. }));
    });
    let replaced: u64 = server.counters().iter().map(|c| c.replaced.load(Ordering::Relaxed)).sum();
    assert_eq!(replaced, 1);
    server.shutdown();
}

#[test]
fn shutdown_closes_sessions_with_shutdown() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let tokens: Vec<String> = (0..20).map(|i| token(&cfg, "u", &format!("s-{i}"))).collect();
    let stop = server.stop_flag();
    let codes = run(async move {
        let mut conns = Vec::new();
        for t in tokens {
            conns.push(Connection::connect(addr, ClientOptions::new(t)).await.unwrap().0);
        }
        stop.store(true, Ordering::Relaxed);
        let mut codes = Vec::new();
        for mut c in conns {
            codes.push(c.next_event().await.unwrap_err().code());
        }
        codes
    });
    assert!(codes.iter().all(|c| *c == Some(ErrorCode::Shutdown)), "{codes:?}");
    server.join();
}

#[test]
fn a_single_node_serves_metrics_and_health_on_its_admin_port() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let (addr, admin) = (server.client_addr(), server.admin_addr());
    let t = token(&cfg, "admin-user", "admin-dev");
    let stop = server.stop_flag();
    run(async move {
        let (mut conn, _) = Connection::connect(addr, ClientOptions::new(t)).await.unwrap();
        let (code, metrics) = http(admin, "GET", "/metrics");
        assert_eq!(code, 200, "{metrics}");
        let connections: u64 = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("longlink_connections{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(connections, 1, "{metrics}");
        for family in ["longlink_connections{shard=\"1\"}", "longlink_shard_turns_total{shard=\"0\"}"] {
            assert!(metrics.contains(family), "{family} missing:\n{metrics}");
        }
        assert!(!metrics.contains("longlink_route_claims_total"), "no cluster families on a single node");
        let (code, health) = http(admin, "GET", "/healthz");
        assert_eq!((code, health.contains("\"ok\"")), (200, true), "{health}");
        // The cluster's endpoints are not there.
        assert_eq!(http(admin, "GET", "/v1/dispatch?uid=u&device=d").0, 404);
        // /drain is on every node (issue 16), behind the admin token: none
        // is configured here, so it is refused.
        assert_eq!(http(admin, "POST", "/drain").0, 403);
        stop.store(true, Ordering::Relaxed);
        let (code, health) = http(admin, "GET", "/healthz");
        assert_eq!((code, health.contains("stopping")), (503, true), "{health}");
        assert_eq!(conn.next_event().await.unwrap_err().code(), Some(ErrorCode::Shutdown));
    });
    server.join();
}
