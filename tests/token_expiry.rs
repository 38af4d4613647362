//! A token that expires during a session, against a real node: the
//! session closes with TOKEN_EXPIRED unless the client refreshed in-band.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use longlink::protocol::codec::Frame;
use longlink::protocol::proto::{self, ErrorCode};
use longlink::protocol::token::now_unix_secs;

fn config() -> longlink::config::Config {
    let mut cfg = test_config(2);
    // Expiry exactly at `expires_at`, and no idle timeout in the way.
    cfg.auth.clock_leeway_secs = 0;
    cfg.session.heartbeat_default_ms = 60_000;
    cfg
}

/// Logs in with a token of `device` valid for `secs`; returns the socket,
/// its read buffer and the AuthOk.
fn login(
    node: &NodeProcess,
    cfg: &longlink::config::Config,
    device: &str,
    secs: i64,
) -> (TcpStream, Vec<u8>, proto::AuthOk) {
    let now = now_unix_secs();
    let token = keyring(cfg).mint("u", device, "test", now, now + secs);
    let mut s = TcpStream::connect(node.client_addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(&Frame::Auth(proto::Auth { token, ..Default::default() }).to_bytes()).expect("auth");
    let mut buf = Vec::new();
    match read_frame_blocking(&mut s, &mut buf) {
        Some(Frame::AuthOk(ok)) => (s, buf, ok),
        other => panic!("expected AuthOk, got {other:?}"),
    }
}

fn code_of(frame: Option<Frame>) -> Option<ErrorCode> {
    match frame {
        Some(Frame::Error(e)) => Some(longlink::protocol::codes::from_wire(e.code)),
        _ => None,
    }
}

#[test]
fn an_expired_token_ends_the_session_with_token_expired() {
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let (mut s, mut buf, ok) = login(&node, &cfg, "short", 2);
    assert!(ok.token_expires_ms > 0, "AuthOk says when the token expires");
    // Nothing is sent: the node closes it by itself once the token expired.
    let frame = read_frame_blocking(&mut s, &mut buf);
    assert!(now_unix_secs() * 1000 >= ok.token_expires_ms as i64, "not before the expiry");
    let Some(Frame::Error(e)) = &frame else { panic!("expected Error, got {frame:?}") };
    assert_eq!(longlink::protocol::codes::from_wire(e.code), ErrorCode::TokenExpired);
    assert!(e.reconnect, "reconnect after fetching a new token");
}

#[test]
fn a_refreshed_session_outlives_its_first_token() {
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let (mut s, mut buf, ok) = login(&node, &cfg, "long", 2);
    let now = now_unix_secs();
    let fresh = keyring(&cfg).mint("u", "long", "test", now, now + 3600);
    s.write_all(&Frame::Refresh(proto::Refresh { token: fresh }).to_bytes()).expect("refresh");
    match read_frame_blocking(&mut s, &mut buf) {
        Some(Frame::RefreshOk(r)) => assert_eq!(r.token_expires_ms, (now as u64 + 3600) * 1000),
        other => panic!("expected RefreshOk, got {other:?}"),
    }
    // Past the first token's expiry (and a wheel turn), the session answers.
    assert!(wait_until(Duration::from_secs(10), || now_unix_secs() * 1000 > ok.token_expires_ms as i64 + 1500));
    s.write_all(&Frame::Ping.to_bytes()).expect("ping");
    let frame = read_frame_blocking(&mut s, &mut buf);
    assert!(matches!(frame, Some(Frame::Pong)), "{frame:?}");
}

#[test]
fn a_refresh_for_another_device_or_with_a_bad_token_closes() {
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let (mut s, mut buf, _) = login(&node, &cfg, "mine", 600);
    let now = now_unix_secs();
    let other = keyring(&cfg).mint("u", "theirs", "test", now, now + 600);
    s.write_all(&Frame::Refresh(proto::Refresh { token: other }).to_bytes()).expect("refresh");
    assert_eq!(code_of(read_frame_blocking(&mut s, &mut buf)), Some(ErrorCode::InvalidToken));

    let (mut s, mut buf, _) = login(&node, &cfg, "mine2", 600);
    let expired = keyring(&cfg).mint("u", "mine2", "test", now - 100, now - 10);
    s.write_all(&Frame::Refresh(proto::Refresh { token: expired }).to_bytes()).expect("refresh");
    assert_eq!(code_of(read_frame_blocking(&mut s, &mut buf)), Some(ErrorCode::TokenExpired));
}

/// An SDK client (blocking facade) of `device` with a token valid for
/// `secs`, and `refresher` if given.
fn sdk_client(
    node: &NodeProcess,
    cfg: &longlink::config::Config,
    device: &str,
    secs: i64,
    refresher: Option<longlink::sdk::TokenRefresher>,
) -> longlink::sdk::BlockingClient {
    let now = now_unix_secs();
    let token = keyring(cfg).mint("u", device, "test", now, now + secs);
    let mut agent = longlink::sdk::AgentConfig::new(longlink::client::ClientOptions::new(token));
    agent.endpoints = vec![node.client_addr.to_string()];
    let client_cfg =
        longlink::sdk::ClientConfig { token_refresher: refresher, ..longlink::sdk::ClientConfig::fixed(agent) };
    longlink::sdk::BlockingClient::start(client_cfg).expect("client starts")
}

/// The SDK's events until `until` (unix seconds) has passed or one matches `stop`.
fn sdk_events(
    client: &longlink::sdk::BlockingClient,
    until: i64,
    stop: impl Fn(&longlink::sdk::Event) -> bool,
) -> Vec<longlink::sdk::Event> {
    let mut events = Vec::new();
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while now_unix_secs() <= until && std::time::Instant::now() < limit {
        if let Ok(ev) = client.next_event(Duration::from_millis(200)) {
            let done = stop(&ev);
            events.push(ev);
            if done {
                break;
            }
        }
    }
    events
}

#[test]
fn the_sdk_refreshes_through_the_application_callback() {
    use longlink::sdk::Event;
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let ring = keyring(&cfg);
    let refresher = longlink::sdk::TokenRefresher(std::sync::Arc::new(move || {
        let now = now_unix_secs();
        Ok(ring.mint("u", "sdk", "test", now, now + 3600))
    }));
    let client = sdk_client(&node, &cfg, "sdk", 3, Some(refresher));
    let first_expiry = now_unix_secs() + 3;
    // Until well past the first token's expiry: refreshed, never dropped.
    let events = sdk_events(&client, first_expiry + 2, |ev| matches!(ev, Event::Disconnected { .. }));
    assert!(matches!(events.first(), Some(Event::Connected { .. })), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, Event::TokenExpiring { .. })), "{events:?}");
    assert!(events.iter().any(|e| matches!(e, Event::TokenRefreshed { token_expires_ms } if *token_expires_ms > first_expiry as u64 * 1000)), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Disconnected { .. })), "{events:?}");
}

#[test]
fn without_a_refresh_the_sdk_sees_token_expired() {
    use longlink::sdk::Event;
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let client = sdk_client(&node, &cfg, "sdk2", 2, None);
    let events = sdk_events(&client, now_unix_secs() + 20, |ev| matches!(ev, Event::Disconnected { .. }));
    let last = events.last();
    assert!(
        matches!(last, Some(Event::Disconnected { reason, .. }) if reason.code() == Some(ErrorCode::TokenExpired)),
        "{events:?}"
    );
}
