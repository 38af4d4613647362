//! Revoking a device's or a user's tokens through the push port, against
//! a real node: live sessions are kicked with REVOKED, older tokens are
//! refused at Auth and Refresh, tokens issued later are taken.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use longlink::protocol::codec::Frame;
use longlink::protocol::codes::from_wire;
use longlink::protocol::proto::{self, ErrorCode};
use longlink::protocol::token::now_unix_secs;

/// Sends Auth with `token`; returns the socket, its buffer and the answer.
fn auth(node: &NodeProcess, token: String) -> (TcpStream, Vec<u8>, Option<Frame>) {
    let mut s = TcpStream::connect(node.client_addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&Frame::Auth(proto::Auth { token, ..Default::default() }).to_bytes()).expect("auth");
    let mut buf = Vec::new();
    let answer = read_frame_blocking(&mut s, &mut buf);
    (s, buf, answer)
}

/// The test config, its push key allowed to revoke.
fn config(shards: u16) -> longlink::config::Config {
    let mut cfg = test_config(shards);
    cfg.push_auth.keys[0].rights.push("revoke".into());
    cfg
}

fn code(frame: &Option<Frame>) -> Option<ErrorCode> {
    match frame {
        Some(Frame::Error(e)) => Some(from_wire(e.code)),
        Some(Frame::Kicked(k)) => Some(from_wire(k.code)),
        _ => None,
    }
}

#[test]
fn a_revoked_device_is_kicked_and_its_old_tokens_refused() {
    let cfg = config(2);
    let node = NodeProcess::start(&cfg);
    let ring = keyring(&cfg);
    let now = now_unix_secs();
    let old = ring.mint("alice", "phone", "test", now - 5, now + 600);
    let (mut live, mut buf, answer) = auth(&node, old.clone());
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    let (mut other, mut other_buf, answer) = auth(&node, ring.mint("bob", "tablet", "test", now - 5, now + 600));
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");

    let reply = push_client(node.push_addr).revoke(&["phone"], &[], "lost phone").expect("revoke");
    assert_eq!(reply.results.len(), 1);
    // The live session is kicked, terminally.
    let kicked = read_frame_blocking(&mut live, &mut buf);
    assert_eq!(code(&kicked), Some(ErrorCode::Revoked), "{kicked:?}");
    // Its token (and any issued before the revocation) is refused.
    let (_, _, answer) = auth(&node, old);
    assert_eq!(code(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    assert!(matches!(&answer, Some(Frame::Error(e)) if !e.reconnect), "terminal");
    // A token issued after it is taken (second granularity: issued a
    // second later; the clock leeway allows it).
    let fresh = ring.mint("alice", "phone", "test", now_unix_secs() + 1, now + 600);
    let (_, _, answer) = auth(&node, fresh);
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    // Others are untouched.
    other.write_all(&Frame::Ping.to_bytes()).expect("ping");
    let pong = read_frame_blocking(&mut other, &mut other_buf);
    assert!(matches!(pong, Some(Frame::Pong)), "{pong:?}");
}

#[test]
fn a_revoked_user_loses_every_device_and_cannot_refresh_with_an_old_token() {
    let cfg = config(2);
    let node = NodeProcess::start(&cfg);
    let ring = keyring(&cfg);
    let now = now_unix_secs();
    let mut sessions: Vec<_> = ["d1", "d2", "d3"]
        .iter()
        .map(|d| {
            let (s, buf, answer) = auth(&node, ring.mint("carol", d, "test", now - 5, now + 600));
            assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
            (s, buf)
        })
        .collect();
    // A token minted before the revocation, kept for a Refresh later.
    let stale = ring.mint("carol", "d4", "test", now - 5, now + 600);
    push_client(node.push_addr).revoke::<&str>(&[], &["carol"], "").expect("revoke");
    for (s, buf) in &mut sessions {
        let kicked = read_frame_blocking(s, buf);
        assert_eq!(code(&kicked), Some(ErrorCode::Revoked), "{kicked:?}");
    }
    // A session that logged in after the revocation cannot refresh with a
    // token from before it.
    let (mut s, mut buf, answer) = auth(&node, ring.mint("carol", "d4", "test", now_unix_secs() + 1, now + 600));
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    s.write_all(&Frame::Refresh(proto::Refresh { token: stale }).to_bytes()).expect("refresh");
    let closed = read_frame_blocking(&mut s, &mut buf);
    assert_eq!(code(&closed), Some(ErrorCode::Revoked), "{closed:?}");
}

#[test]
fn revoking_needs_the_revoke_right() {
    // The tests' key has every right but "revoke".
    let cfg = test_config(1);
    let node = NodeProcess::start(&cfg);
    let err = push_client(node.push_addr).revoke(&["phone"], &[], "").expect_err("refused");
    assert!(err.to_string().contains("PERMISSION_DENIED") || err.to_string().contains("revoke"), "{err}");
}

/// A cluster node's config: Redis, the tests' cluster secret, and a push
/// key allowed to revoke.
fn cluster_node(redis: &RedisServer, name: &str, index: u16) -> longlink::config::Config {
    let mut cfg = config(2);
    cfg.node_name = name.into();
    cfg.delivery.redis_url = redis.url();
    cfg.delivery.node_index = index;
    cfg.cluster.enabled = true;
    cfg.cluster.lease_ms = 3_000;
    cfg.cluster.forward_timeout_ms = 2_000;
    cfg
}

#[test]
fn in_a_cluster_a_revocation_sent_to_one_node_reaches_the_session_on_another() {
    let redis = RedisServer::start();
    let a = NodeProcess::start(&cluster_node(&redis, "a", 0));
    let b = NodeProcess::start(&cluster_node(&redis, "b", 1));
    let cfg = cluster_node(&redis, "a", 0);
    let ring = keyring(&cfg);
    let now = now_unix_secs();
    let old = ring.mint("dan", "watch", "test", now - 5, now + 600);
    let (mut live, mut buf, answer) = auth(&b, old.clone());
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    // Node a learns where the device is from its route in Redis.
    let mut redis_conn = redis::Client::open(redis.url()).expect("redis url");
    assert!(wait_until(Duration::from_secs(10), || {
        let node: Option<String> =
            redis::cmd("HGET").arg("ll:route:{watch}").arg("node").query(&mut redis_conn).ok().flatten();
        node.as_deref() == Some("b")
    }));
    push_client(a.push_addr).revoke(&["watch"], &[], "").expect("revoke through node a");
    let kicked = read_frame_blocking(&mut live, &mut buf);
    assert_eq!(code(&kicked), Some(ErrorCode::Revoked), "{kicked:?}");
    // Both the node that took the request and the one that held the
    // session refuse the old token now.
    for node in [&a, &b] {
        let (_, _, answer) = auth(node, old.clone());
        assert_eq!(code(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    }
}

/// The node's metric line `name` (with its labels), as a number.
fn metric(node: &NodeProcess, name: &str) -> Option<f64> {
    let (_, body) = http(node.admin_addr.expect("admin"), "GET", "/metrics");
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn in_a_cluster_a_node_started_after_a_revocation_refuses_the_old_tokens() {
    let redis = RedisServer::start();
    let cfg = cluster_node(&redis, "a", 0);
    let a = NodeProcess::start(&cfg);
    let ring = keyring(&cfg);
    let now = now_unix_secs();
    let of_user = ring.mint("erin", "pad", "test", now - 5, now + 600);
    let of_device = ring.mint("fay", "glass", "test", now - 5, now + 600);
    let reply = push_client(a.push_addr).revoke(&["glass"], &["erin"], "").expect("revoke through node a");
    assert!(reply.results.iter().all(|r| !r.retryable), "stored: {reply:?}");
    // Kept in Redis as long as a token issued before it can be valid.
    let keep_ms = (cfg.auth.max_token_lifetime_secs + u64::from(cfg.auth.clock_leeway_secs)) * 1000;
    let mut redis_conn = redis::Client::open(redis.url()).expect("redis url");
    let pttl: i64 = redis::cmd("PTTL").arg("ll:{revocations}").query(&mut redis_conn).expect("pttl");
    assert!(pttl > 0 && pttl as u64 <= keep_ms, "PTTL {pttl}, keep {keep_ms}");

    // Node b starts after the revocation: it reads it before taking logins.
    let b = NodeProcess::start(&cluster_node(&redis, "b", 1));
    for token in [of_user, of_device] {
        let (_, _, answer) = auth(&b, token);
        assert_eq!(code(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    }
    let fresh = ring.mint("erin", "pad", "test", now_unix_secs() + 1, now + 600);
    let (_, _, answer) = auth(&b, fresh);
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    assert_eq!(metric(&b, "longlink_revocations_loaded"), Some(1.0));
}

#[test]
fn in_a_cluster_a_revocation_redis_cannot_store_is_applied_live_and_answered_retryable() {
    let redis = RedisServer::start();
    let cfg = cluster_node(&redis, "a", 0);
    let a = NodeProcess::start(&cfg);
    let ring = keyring(&cfg);
    let now = now_unix_secs();
    let old = ring.mint("gus", "ring", "test", now - 5, now + 600);
    let (mut live, mut buf, answer) = auth(&a, old.clone());
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    drop(redis);
    let reply = push_client(a.push_addr).revoke(&["ring"], &[], "").expect("answered");
    // Applied on the live node all the same.
    let kicked = read_frame_blocking(&mut live, &mut buf);
    assert_eq!(code(&kicked), Some(ErrorCode::Revoked), "{kicked:?}");
    let (_, _, answer) = auth(&a, old);
    assert_eq!(code(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    // But not stored: the backend is told to send it again.
    assert_eq!(reply.results.len(), 1);
    let r = &reply.results[0];
    assert!(r.retryable && r.status == proto::PushStatus::Rejected as i32, "{r:?}");
    assert!(r.reason.contains("not stored in Redis"), "{r:?}");
    assert_eq!(metric(&a, "longlink_revocations_stored_total{result=\"failed\"}"), Some(1.0));
}

#[test]
fn in_a_cluster_a_node_that_cannot_read_the_revocations_refuses_logins_until_it_can() {
    // No Redis on this port yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let mut cfg = config(2);
    cfg.node_name = "lonely".into();
    cfg.delivery.redis_url = format!("redis://127.0.0.1:{port}/");
    cfg.cluster.enabled = true;
    cfg.cluster.lease_ms = 3_000;
    let node = NodeProcess::start(&cfg);
    let ring = keyring(&cfg);
    let now = now_unix_secs();
    let token = ring.mint("hal", "desk", "test", now - 5, now + 600);
    // Fail closed, retryable.
    let (_, _, answer) = auth(&node, token.clone());
    assert_eq!(code(&answer), Some(ErrorCode::Unavailable), "{answer:?}");
    assert!(matches!(&answer, Some(Frame::Error(e)) if e.reconnect), "retryable");
    assert!(metric(&node, "longlink_revocation_sync_failures_total").is_some_and(|n| n >= 1.0));
    assert_eq!(metric(&node, "longlink_revocations_loaded"), Some(0.0));
    // Redis comes up: logins are taken once the (empty) list is read.
    let _redis = RedisServer::start_on(port);
    assert!(wait_until(Duration::from_secs(20), || matches!(auth(&node, token.clone()).2, Some(Frame::AuthOk(_)))));
}
