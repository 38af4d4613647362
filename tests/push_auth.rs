//! The push port's trust boundary, attacked over real TCP: every forged
//! request without a key, with a bad MAC, a replayed auth or a key lacking
//! the right gets its refusal and code, and nothing is carried out.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use longlink::backend::{BackendError, PushClient, PushKey, Request};
use longlink::protocol::codec::Frame;
use longlink::protocol::codes;
use longlink::protocol::proto::{self, ErrorCode, PushStatus};
use longlink::push::auth::PushKeyConfig;

/// One forged request of each kind a backend can make, all aimed at the
/// victim device (or everyone).
fn attacks(victim: &str) -> Vec<(&'static str, Request)> {
    let targets = |t: proto::Targets| Some(t);
    vec![
        (
            "push",
            Request::Push(proto::PushRequest {
                targets: targets(proto::Targets { devices: vec![victim.into()], ..Default::default() }),
                payload: Bytes::from_static(b"forged"),
                ..Default::default()
            }),
        ),
        (
            "broadcast",
            Request::Push(proto::PushRequest {
                targets: targets(proto::Targets { broadcast: true, ..Default::default() }),
                payload: Bytes::from_static(b"forged"),
                ..Default::default()
            }),
        ),
        (
            "groups",
            Request::Group(proto::GroupUpdate {
                group: "secret-room".into(),
                add_devices: vec![victim.into()],
                ..Default::default()
            }),
        ),
        (
            "kick",
            Request::Kick(proto::KickRequest {
                devices: vec![victim.into()],
                code: ErrorCode::Kicked as i32,
                ..Default::default()
            }),
        ),
        ("presence", Request::Presence(proto::PresenceQuery { devices: vec![victim.into()], ..Default::default() })),
        ("status", Request::Status(proto::DeliveryStatusQuery { message_ids: vec![1], ..Default::default() })),
    ]
}

fn frame_of(req: Request) -> Frame {
    match req {
        Request::Push(r) => Frame::PushRequest(r),
        Request::Group(r) => Frame::GroupUpdate(r),
        Request::Kick(r) => Frame::KickRequest(r),
        Request::Presence(r) => Frame::PresenceQuery(r),
        Request::Status(r) => Frame::DeliveryStatusQuery(r),
    }
}

/// Every frame the node sends until it closes the socket.
fn until_close(s: &mut TcpStream) -> Vec<Frame> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    while let Some(f) = read_frame_blocking(s, &mut buf) {
        frames.push(f);
    }
    frames
}

fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().rev().find_map(|f| match f {
        Frame::Error(e) => Some(codes::from_wire(e.code)),
        _ => None,
    })
}

/// The device the forged requests aim at. At the end of each test it is
/// still connected and got nothing ([`assert_nothing_queued`]): no forged
/// message, no kick.
async fn victim(server: &longlink::server::Server, cfg: &longlink::config::Config) -> longlink::client::Connection {
    let opts = longlink::client::ClientOptions::new(token(cfg, "victim", "vphone"));
    longlink::client::Connection::connect(server.client_addr(), opts).await.expect("victim connects").0
}

fn key_with(id: &str, secret_hex: &str, rights: &[&str], service_ids: &[&str]) -> PushKeyConfig {
    PushKeyConfig {
        id: id.into(),
        secret_hex: secret_hex.into(),
        rights: rights.iter().map(|r| (*r).to_owned()).collect(),
        service_ids: service_ids.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn hex_secret(n: u8) -> String {
    longlink::protocol::token::encode_hex(&[n; 32])
}

fn key(id: &str, n: u8) -> PushKey {
    PushKey::new(id, vec![n; 32]).unwrap()
}

const ALL: [&str; 6] = ["push", "broadcast", "groups", "kick", "presence", "status"];

#[test]
fn requests_without_a_key_are_refused_unauthenticated_and_never_carried_out() {
    let cfg = test_config(2);
    let server = start(&cfg);
    run(async {
        let mut victim = victim(&server, &cfg).await;
        for (what, req) in attacks("vphone") {
            // Straight in, ignoring the challenge.
            let mut s = TcpStream::connect(server.push_addr()).unwrap();
            s.write_all(&frame_of(req).to_bytes()).unwrap();
            let frames = until_close(&mut s);
            assert!(
                matches!(frames.first(), Some(Frame::PushChallenge(c)) if c.nonce.len() == 32),
                "{what}: {frames:?}"
            );
            assert_eq!(error_code(&frames), Some(ErrorCode::Unauthenticated), "{what}: {frames:?}");
            assert!(
                frames.iter().all(|f| matches!(f, Frame::PushChallenge(_) | Frame::Error(_))),
                "{what}: nothing but the refusal: {frames:?}"
            );
        }
        assert_nothing_queued(&mut victim).await;
        // The real backend sees the victim online and in no group.
        let mut push = push_client(server.push_addr());
        let p = push.presence(&["vphone"], &[], &["secret-room"]).unwrap();
        assert!(p.devices[0].online);
        assert_eq!(p.groups[0].online, 0);
    });
    server.shutdown();
}

#[test]
fn a_bad_mac_an_unknown_key_and_a_replayed_auth_are_refused() {
    let cfg = test_config(1);
    let server = start(&cfg);
    // Right id, wrong secret.
    let forged = PushKey::new(PUSH_KEY_ID, vec![0xee; 32]).unwrap();
    let err = PushClient::connect(server.push_addr(), Duration::from_secs(5), &forged).unwrap_err();
    assert!(matches!(err, BackendError::Closed { code: ErrorCode::Unauthenticated, .. }), "{err:?}");
    // Unknown id.
    let err = PushClient::connect(server.push_addr(), Duration::from_secs(5), &key("nobody", 1)).unwrap_err();
    assert!(matches!(err, BackendError::Closed { code: ErrorCode::Unauthenticated, .. }), "{err:?}");

    // A PushAuth recorded on one connection, replayed on another.
    let mut first = TcpStream::connect(server.push_addr()).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let Some(Frame::PushChallenge(c1)) = read_frame_blocking(&mut first, &mut buf) else { panic!("challenge") };
    let recorded = Frame::PushAuth(longlink::push::auth::answer(&push_key(), &c1));
    first.write_all(&recorded.to_bytes()).unwrap();
    assert!(matches!(read_frame_blocking(&mut first, &mut buf), Some(Frame::PushAuthOk(_))));
    let mut replay = TcpStream::connect(server.push_addr()).unwrap();
    replay.write_all(&recorded.to_bytes()).unwrap();
    let query = Frame::PresenceQuery(proto::PresenceQuery { request_id: 1, ..Default::default() });
    let _ = replay.write_all(&query.to_bytes());
    let frames = until_close(&mut replay);
    let Some(Frame::PushChallenge(c2)) = frames.first() else { panic!("{frames:?}") };
    assert_ne!(c1.nonce, c2.nonce, "every connection gets a fresh nonce");
    assert_eq!(error_code(&frames), Some(ErrorCode::Unauthenticated), "{frames:?}");
    assert!(!frames.iter().any(|f| matches!(f, Frame::PresenceReply(_))), "{frames:?}");
    server.shutdown();
}

#[test]
fn each_request_needs_its_right_and_a_restricted_key_pushes_only_as_its_services() {
    let mut cfg = test_config(2);
    // One key per right, holding every right but that one.
    for (i, missing) in ALL.iter().enumerate() {
        let rights: Vec<&str> = ALL.iter().copied().filter(|r| r != missing).collect();
        cfg.push_auth.keys.push(key_with(&format!("no-{missing}"), &hex_secret(i as u8 + 1), &rights, &[]));
    }
    cfg.push_auth.keys.push(key_with("chat-only", &hex_secret(9), &["push"], &["chat"]));
    let server = start(&cfg);
    run(async {
        let mut victim = victim(&server, &cfg).await;
        for (i, (right, req)) in attacks("vphone").into_iter().enumerate() {
            let lacking = key(&format!("no-{right}"), i as u8 + 1);
            let mut push = PushClient::connect(server.push_addr(), Duration::from_secs(5), &lacking).unwrap();
            push.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let id = push.send(req).unwrap();
            push.flush().unwrap();
            match push.recv().unwrap() {
                longlink::backend::Reply::Error(e) => {
                    assert_eq!(e.request_id, id, "{right}");
                    assert_eq!(codes::from_wire(e.code), ErrorCode::PermissionDenied, "{right}: {e:?}");
                    assert!(e.reason.contains(right), "{right}: {}", e.reason);
                }
                other => panic!("{right}: carried out: {other:?}"),
            }
            // The connection stays usable for what the key may do.
            let allowed = if right == "presence" { "status" } else { "presence" };
            let ok = match allowed {
                "presence" => push.presence(&["vphone"], &[], &[]).map(|_| ()),
                _ => push.delivery_status(&[1]).map(|_| ()),
            };
            assert!(ok.is_ok(), "{right}: {ok:?}");
        }
        assert_nothing_queued(&mut victim).await;

        let mut chat = PushClient::connect(server.push_addr(), Duration::from_secs(5), &key("chat-only", 9)).unwrap();
        let err = chat.push(devices("vphone"), Bytes::from_static(b"x"), "payments", 0).unwrap_err();
        assert!(matches!(err, BackendError::Rejected { code: ErrorCode::PermissionDenied, .. }), "{err:?}");
        let reply = chat.push(devices("vphone"), Bytes::from_static(b"hi"), "chat", 0).unwrap();
        assert_eq!(reply.results[0].status, PushStatus::Delivered as i32);
        let m = next_message(&mut victim).await;
        assert_eq!((m.service_id.as_str(), &m.payload[..]), ("chat", &b"hi"[..]));
    });
    server.shutdown();
}

fn devices(d: &str) -> proto::Targets {
    proto::Targets { devices: vec![d.into()], ..Default::default() }
}

#[test]
fn forwarded_requests_are_refused_on_the_public_push_port() {
    let cfg = test_config(1);
    let server = start(&cfg);
    run(async {
        let mut victim = victim(&server, &cfg).await;
        let mut push = push_client(server.push_addr());
        let forged = proto::PushRequest {
            targets: Some(devices("vphone")),
            payload: Bytes::from_static(b"bypass"),
            forwarded: true,
            ..Default::default()
        };
        let err = push.push_request(forged).unwrap_err();
        assert!(matches!(err, BackendError::Rejected { code: ErrorCode::PermissionDenied, .. }), "{err:?}");
        let kick = proto::KickRequest { devices: vec!["vphone".into()], forwarded: true, ..Default::default() };
        let id = push.send(Request::Kick(kick)).unwrap();
        push.flush().unwrap();
        let longlink::backend::Reply::Error(e) = push.recv().unwrap() else { panic!("kick carried out") };
        assert_eq!((e.request_id, codes::from_wire(e.code)), (id, ErrorCode::PermissionDenied));
        assert_nothing_queued(&mut victim).await;
    });
    server.shutdown();
}

#[test]
fn rotated_keys_are_both_accepted_while_both_are_configured() {
    let mut cfg = test_config(1);
    cfg.push_auth.keys = vec![key_with("old", &hex_secret(1), &ALL, &[]), key_with("new", &hex_secret(2), &ALL, &[])];
    let server = start(&cfg);
    for k in [key("old", 1), key("new", 2)] {
        let mut push = PushClient::connect(server.push_addr(), Duration::from_secs(5), &k).unwrap();
        assert!(push.presence::<&str>(&[], &[], &[]).is_ok(), "{}", k.id());
    }
    server.shutdown();
    // The old key removed: refused.
    cfg.push_auth.keys.remove(0);
    let server = start(&cfg);
    let err = PushClient::connect(server.push_addr(), Duration::from_secs(5), &key("old", 1)).unwrap_err();
    assert!(matches!(err, BackendError::Closed { code: ErrorCode::Unauthenticated, .. }), "{err:?}");
    assert!(PushClient::connect(server.push_addr(), Duration::from_secs(5), &key("new", 2)).is_ok());
    server.shutdown();
}

#[test]
fn before_auth_a_large_frame_is_refused_from_its_header_and_silence_ends_at_the_auth_deadline() {
    let mut cfg = test_config(1);
    cfg.push_auth.auth_timeout_ms = 300;
    cfg.push_auth.idle_timeout_ms = 1_000;
    let server = start(&cfg);
    // A 4 MB "request" announced before auth: refused from its header.
    let mut s = TcpStream::connect(server.push_addr()).unwrap();
    s.write_all(&[0x4C, 1, 32, 0, 0, 0x40, 0, 0]).unwrap();
    let frames = until_close(&mut s);
    assert_eq!(error_code(&frames), Some(ErrorCode::Unauthenticated), "{frames:?}");
    // A partial PushAuth that never completes: AUTH_TIMEOUT.
    let mut s = TcpStream::connect(server.push_addr()).unwrap();
    s.write_all(&[0x4C, 1, 43, 0, 0, 0, 0, 60, 1, 2]).unwrap();
    let frames = until_close(&mut s);
    assert_eq!(error_code(&frames), Some(ErrorCode::AuthTimeout), "{frames:?}");
    // Authenticated, then silent (a partial frame held): IDLE_TIMEOUT.
    let mut s = TcpStream::connect(server.push_addr()).unwrap();
    assert!(matches!(raw_push_auth(&mut s, &push_key()), Some(Frame::PushAuthOk(_))));
    s.write_all(&[0x4C, 1, 32, 0, 0, 0x10, 0, 0, 7]).unwrap();
    let frames = until_close(&mut s);
    assert_eq!(error_code(&frames), Some(ErrorCode::IdleTimeout), "{frames:?}");
    server.shutdown();
}

#[test]
fn the_quickstart_cli_finds_the_dev_push_key_next_to_the_node() {
    let dir = TempDir::new("quickstart");
    // The defaults, but on free ports (other tests run beside this one).
    std::fs::write(
        dir.0.join("longlink.toml"),
        "[server]\nclient_listen = \"127.0.0.1:0\"\npush_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshards = 1\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_longlink");
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--config", "longlink.toml"])
        .current_dir(&dir.0)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let _client = lines.next().unwrap().unwrap();
    let push = lines.next().unwrap().unwrap();
    let push = push.strip_prefix("push ").unwrap().to_owned();
    assert!(push.starts_with("127.0.0.1:"), "{push}");
    let key_file = dir.0.join(".longlink").join(longlink::push::auth::PUSH_KEY_FILE);
    assert!(key_file.exists(), "the node created its dev push key");
    let cli = |cwd: &std::path::Path| {
        std::process::Command::new(bin)
            .args(["push", "--server", &push, "--device", "nobody", "hello"])
            .current_dir(cwd)
            .env_remove("LONGLINK_PUSH_KEY")
            .env_remove("LONGLINK_PUSH_KEY_FILE")
            .output()
            .unwrap()
    };
    let out = cli(&dir.0);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT_ONLINE"), "{}", String::from_utf8_lossy(&out.stdout));
    // Elsewhere there is no key: the CLI says so and sends nothing.
    let elsewhere = TempDir::new("elsewhere");
    let out = cli(&elsewhere.0);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("push key"), "{}", String::from_utf8_lossy(&out.stderr));
    // The env var works from anywhere.
    let text = std::fs::read_to_string(&key_file).unwrap();
    let out = std::process::Command::new(bin)
        .args(["online", "--server", &push, "--device", "nobody"])
        .current_dir(&elsewhere.0)
        .env("LONGLINK_PUSH_KEY", text.trim())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = child.kill();
    let _ = child.wait();
}

/// Client JOIN is off unless the token's `groups` claim or the node's
/// `[client_groups] allow` covers the group; a refused JOIN is answered
/// explicitly and joins nothing.
#[test]
fn a_join_needs_the_token_claim_or_the_node_policy_and_a_refusal_is_explicit() {
    let mut cfg = test_config(2);
    cfg.client_groups.allow = vec!["lobby".into(), "pub-*".into()];
    let server = start(&cfg);
    let now = longlink::protocol::token::now_unix_secs();
    let with_claims = keyring(&cfg).mint_claims(proto::TokenClaims {
        user: "carol".into(),
        device: "carol-phone".into(),
        app: "test".into(),
        issued_at: now,
        expires_at: now + 3600,
        groups: vec!["room-*".into(), "vip".into()],
        ..Default::default()
    });
    run(async {
        let opts = longlink::client::ClientOptions::new(with_claims);
        let (mut carol, _) = longlink::client::Connection::connect(server.client_addr(), opts).await.unwrap();
        let mut plain = victim(&server, &cfg).await;
        let code = |r: proto::GroupResult| (r.join, codes::from_wire(r.code));
        let ok = (true, ErrorCode::Unspecified);
        let denied = (true, ErrorCode::PermissionDenied);
        // The claim: a prefix and an exact name; the policy: the same.
        for g in ["room-5", "vip", "lobby", "pub-x"] {
            assert_eq!(code(carol.join(g).await.unwrap()), ok, "{g}");
        }
        for g in ["secret", "vipx", "room"] {
            let r = carol.join(g).await.unwrap();
            assert!(r.reason.contains("allow"), "{r:?}");
            assert_eq!(code(r), denied, "{g}");
        }
        // Without the claim only the policy counts.
        assert_eq!(code(plain.join("room-5").await.unwrap()), denied);
        assert_eq!(code(plain.join("lobby").await.unwrap()), ok);
        let left = plain.leave("lobby").await.unwrap();
        assert_eq!((left.join, left.code), (false, 0));
        // Refused joins joined nothing: a backend's group push reaches no one.
        let mut push = push_client(server.push_addr());
        let reply = push.push_group("secret", Bytes::from_static(b"eavesdrop")).unwrap();
        assert_eq!(reply.delivered, 0);
        let reply = push.push_group("room-5", Bytes::from_static(b"hello room")).unwrap();
        assert_eq!(reply.delivered, 1);
        assert_eq!(&next_message(&mut carol).await.payload[..], b"hello room");
        assert_nothing_queued(&mut carol).await;
        assert_nothing_queued(&mut plain).await;
    });
    server.shutdown();
}

#[test]
fn by_default_no_client_may_join_a_group() {
    let mut cfg = test_config(1);
    cfg.client_groups = Default::default();
    let server = start(&cfg);
    run(async {
        let mut c = victim(&server, &cfg).await;
        let r = c.join("room").await.unwrap();
        assert_eq!(codes::from_wire(r.code), ErrorCode::PermissionDenied, "{r:?}");
        assert_nothing_queued(&mut c).await;
    });
    let p = push_client(server.push_addr()).presence::<&str>(&[], &[], &["room"]).unwrap();
    assert_eq!(p.groups[0].online, 0);
    server.shutdown();
}

/// Ids reach logs and terminals: a device id or a push target with an ANSI
/// escape is refused, never stored or echoed raw.
#[test]
fn ids_with_control_characters_are_refused() {
    let cfg = test_config(1);
    let server = start(&cfg);
    let escape = "\u{1b}[2J\u{1b}[31mpwned";
    run(async {
        let opts = longlink::client::ClientOptions::new(token(&cfg, "mallory", escape));
        let Err(err) = longlink::client::Connection::connect(server.client_addr(), opts).await else {
            panic!("a device id with an escape sequence was accepted")
        };
        assert_eq!(err.code(), Some(ErrorCode::BadFrame), "{err:?}");
    });
    let reply = push_client(server.push_addr()).push_devices(&[escape], Bytes::from_static(b"x")).unwrap();
    assert_eq!(reply.results[0].status, PushStatus::Rejected as i32, "{reply:?}");
    server.shutdown();
}
