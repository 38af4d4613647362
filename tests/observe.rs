//! The operations series on a real single node's /metrics move when their
//! event happens: push and push -> ACK latency, resends given up, resyncs,
//! sessions by platform and app version, queue bytes, disconnects and
//! push refusals by code.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use longlink::client::{ClientEvent, ClientOptions, Connection};
use longlink::protocol::codec::Frame;
use longlink::protocol::proto::{self, ErrorCode};

/// The value of the sample `series` (name and labels exactly as exported).
fn sample(admin: std::net::SocketAddr, series: &str) -> f64 {
    let (status, body) = http(admin, "GET", "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not exported"))
}

fn config() -> longlink::config::Config {
    let mut cfg = test_config(1);
    cfg.push.max_targets_per_request = 2;
    // Resends give up fast: one resend after 50 ms.
    cfg.delivery.retry_base_ms = 50;
    cfg.delivery.retry_fast = 1;
    cfg.delivery.max_retries = 1;
    cfg.session.outbound_queue_bytes = 64 << 20;
    cfg
}

#[test]
fn sessions_latencies_and_disconnects_move_with_their_events() {
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let kind = "longlink_sessions{platform=\"ios-test\",app_version=\"9.9.9_beta\"}";
    let kicked = "longlink_disconnects_total{code=\"KICKED\"}";
    let (push0, ack0) = (
        sample(admin, "longlink_push_latency_seconds_count"),
        sample(admin, "longlink_reliable_ack_latency_seconds_count"),
    );
    let kicked0 = sample(admin, kicked);
    let addr = node.client_addr;
    let opts = ClientOptions {
        platform: "ios-test".into(),
        client_version: "9.9.9 beta".into(), // sanitized to 9.9.9_beta
        ..ClientOptions::new(token(&cfg, "alice", "phone-1"))
    };
    let (up_tx, up_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn(move || {
        run(async move {
            let mut conn = Connection::connect(addr, opts).await.expect("logs in").0;
            up_tx.send(()).unwrap();
            let m = next_message(&mut conn).await;
            conn.ack_now().await.expect("ack");
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
            // Until the kick closes it.
            let limit = async {
                glommio::timer::sleep(Duration::from_secs(30)).await;
                None
            };
            let closed = async {
                loop {
                    if let Err(e) = conn.next_event().await {
                        return Some(e);
                    }
                }
            };
            (m, futures_lite::future::or(closed, limit).await)
        })
    });
    up_rx.recv_timeout(Duration::from_secs(20)).expect("client up");
    assert!(wait_until(Duration::from_secs(10), || sample(admin, kind) == 1.0), "the session's kind counts 1");

    let mut push = push_client(node.push_addr);
    let reply = push.push_devices_at_least_once(&["phone-1"], "hello".into()).expect("push");
    assert_eq!(reply.results[0].status, proto::PushStatus::Stored as i32);
    assert!(sample(admin, "longlink_push_latency_seconds_count") > push0, "push latency recorded");
    assert!(
        wait_until(Duration::from_secs(10), || sample(admin, "longlink_reliable_ack_latency_seconds_count") > ack0),
        "ACK latency recorded once the client acknowledged"
    );
    go_tx.send(()).unwrap();
    push.kick_devices(&["phone-1"], ErrorCode::Kicked, "bye").expect("kick");
    let (m, _closed) = client.join().expect("client thread");
    assert_eq!(&m.payload[..], b"hello");
    assert!(wait_until(Duration::from_secs(10), || sample(admin, kicked) > kicked0), "disconnect by KICKED");
    assert!(wait_until(Duration::from_secs(10), || sample(admin, kind) == 0.0), "the session left its kind");
}

#[test]
fn refusals_resends_given_up_resyncs_and_queue_bytes_move() {
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");

    // Refusals: a wrong push key, then too many targets.
    let unauth = "longlink_push_refusals_total{code=\"UNAUTHENTICATED\"}";
    let limit = "longlink_push_refusals_total{code=\"LIMIT_EXCEEDED\"}";
    let (unauth0, limit0) = (sample(admin, unauth), sample(admin, limit));
    let wrong = longlink::push::auth::parse_credential(&format!("{PUSH_KEY_ID}:{}", "ee".repeat(32))).expect("key");
    let mut s = std::net::TcpStream::connect(node.push_addr).expect("push port");
    assert!(matches!(raw_push_auth(&mut s, &wrong), Some(Frame::Error(_))), "wrong key refused");
    assert!(wait_until(Duration::from_secs(10), || sample(admin, unauth) > unauth0));
    let mut push = push_client(node.push_addr);
    assert!(push.push_devices(&["a", "b", "c"], "x".into()).is_err());
    assert!(wait_until(Duration::from_secs(10), || sample(admin, limit) > limit0));

    // A raw client that declares ACKs and never reads nor acknowledges.
    let mut raw = std::net::TcpStream::connect(node.client_addr).expect("client port");
    let auth = proto::Auth {
        token: token(&cfg, "bob", "tablet-1"),
        capabilities: proto::Capability::Ack as u32,
        ..Default::default()
    };
    raw.write_all(&Frame::Auth(auth).to_bytes()).expect("auth");
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(read_frame_blocking(&mut raw, &mut buf), Some(Frame::AuthOk(_))));

    let given_up0 = sample(admin, "longlink_reliable_given_up_total");
    let reply = push.push_devices_at_least_once(&["tablet-1"], "unacked".into()).expect("push");
    assert_eq!(reply.results[0].status, proto::PushStatus::Stored as i32);
    assert!(
        wait_until(Duration::from_secs(20), || sample(admin, "longlink_reliable_given_up_total") > given_up0),
        "the unacknowledged message's resends were given up"
    );

    // Queue bytes: at-most-once pushes the raw client does not read.
    let queued = "longlink_queued_bytes{shard=\"0\"}";
    let payload = bytes::Bytes::from(vec![7u8; 32 * 1024]);
    let mut seen = 0.0;
    for _ in 0..2_000 {
        push.push_devices(&["tablet-1"], payload.clone()).expect("push");
        seen = sample(admin, queued);
        if seen > 0.0 {
            break;
        }
    }
    assert!(seen > 0.0, "bytes waiting for a client that does not read show in {queued}");
    drop(raw);
    assert!(wait_until(Duration::from_secs(20), || sample(admin, queued) == 0.0), "released with the session");

    // Resync: a client resuming from another store incarnation.
    let resyncs0 = sample(admin, "longlink_reliable_resyncs_total");
    let opts =
        ClientOptions { last_seq: 5, store_incarnation: 12345, ..ClientOptions::new(token(&cfg, "carol", "phone-9")) };
    let addr = node.client_addr;
    let got = run(async move {
        let mut conn = Connection::connect(addr, opts).await.expect("logs in").0;
        let limit = async {
            glommio::timer::sleep(Duration::from_secs(10)).await;
            false
        };
        let resync = async {
            loop {
                match conn.next_event().await {
                    Ok(ClientEvent::ResyncRequired { .. }) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        };
        futures_lite::future::or(resync, limit).await
    });
    assert!(got, "the client was told to resync");
    assert!(sample(admin, "longlink_reliable_resyncs_total") > resyncs0, "resync counted");
}
