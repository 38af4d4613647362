//! Reload without restart against a real `longlink serve` process: the
//! config file is rewritten, then SIGHUP or `POST /reload` applies what can
//! change live and reports the rest; an invalid file changes nothing.

mod common;

use std::time::Duration;

use common::*;
use longlink::client::{ClientOptions, Connection};
use longlink::config::{Config, KeyConfig};
use longlink::protocol::token::{Key, Keyring, decode_hex, now_unix_secs};

const K2_HEX: &str = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf";

fn node_config() -> Config {
    trusted(test_config(1))
}

/// A token signed with key `id` / `hex`.
fn token_with(id: &str, hex: &str, device: &str) -> String {
    let key = Key::new(id, decode_hex(hex).expect("hex")).expect("key");
    let now = now_unix_secs();
    Keyring::new(vec![key], None).expect("ring").mint("alice", device, "test", now, now + 3600)
}

/// Whether a client with `token` gets in.
fn logs_in(node: &NodeProcess, token: String) -> bool {
    let addr = node.client_addr;
    run(async move { Connection::connect(addr, ClientOptions::new(token)).await.is_ok() })
}

fn write_config(node: &NodeProcess, cfg: &Config) {
    std::fs::write(node.config_path(), toml::to_string(cfg).expect("config serializes")).expect("write config");
}

fn with_key_k2_only(mut cfg: Config) -> Config {
    cfg.auth.keys = vec![KeyConfig { id: "k2".into(), secret_hex: K2_HEX.into() }];
    cfg
}

fn signal(node: &NodeProcess, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.child.id() as i32, sig) };
}

#[test]
fn post_reload_rotates_token_keys_changes_limits_and_reports_upgrades() {
    let cfg = node_config();
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let k1 = |d: &str| token_with("k1", KEY_HEX, d);
    let k2 = |d: &str| token_with("k2", K2_HEX, d);
    assert!(logs_in(&node, k1("a")), "k1 accepted before the reload");
    assert!(!logs_in(&node, k2("b")), "k2 unknown before the reload");
    let mut push = push_client(node.push_addr);
    let three = ["d1", "d2", "d3"];
    assert!(push.push_devices(&three, "x".into()).is_ok(), "3 targets allowed at first");

    let mut new = with_key_k2_only(cfg.clone());
    new.push.max_targets_per_request = 2;
    new.server.shards = 2; // needs an upgrade
    write_config(&node, &new);
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("json");
    let names = |field: &str| -> Vec<String> {
        report[field].as_array().expect(field).iter().map(|v| v.as_str().unwrap_or_default().to_owned()).collect()
    };
    assert_eq!(names("applied"), ["auth.keys", "push.max_targets_per_request"], "{body}");
    assert_eq!(names("needs_upgrade"), ["server.shards"], "{body}");
    assert_eq!(report["shards_applied"], true, "{body}");
    assert!(!body.contains(K2_HEX), "no secret in the answer");

    assert!(!logs_in(&node, k1("c")), "the removed key's tokens are refused");
    assert!(logs_in(&node, k2("d")), "the new key is accepted");
    let refused = push.push_devices(&three, "x".into()).expect_err("over the new target limit");
    assert!(refused.to_string().contains("more than 2 targets"), "{refused}");
    assert!(push.push_devices(&three[..2], "x".into()).is_ok());
}

#[test]
fn invalid_file_changes_nothing_then_sighup_applies_a_good_one() {
    let cfg = node_config();
    let mut node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let k1 = |d: &str| token_with("k1", KEY_HEX, d);
    let k2 = |d: &str| token_with("k2", K2_HEX, d);

    // A file that does not parse, with a secret on the broken line.
    let good = toml::to_string(&with_key_k2_only(cfg.clone())).expect("toml");
    let broken = good.replacen(&format!("secret_hex = \"{K2_HEX}\""), &format!("secret_hex = \"{K2_HEX}"), 1);
    assert_ne!(broken, good);
    std::fs::write(node.config_path(), &broken).expect("write");
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("\"reloaded\":false") && body.contains("parse"), "{body}");
    assert!(!body.contains(K2_HEX) && !body.contains(&K2_HEX[..16]), "no secret or source line: {body}");
    // A file that parses but is invalid: nothing of it applies either.
    let mut invalid = with_key_k2_only(cfg.clone());
    invalid.push.max_targets_per_request = 0;
    write_config(&node, &invalid);
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("push.max_targets_per_request"), "{body}");
    assert!(logs_in(&node, k1("a")) && !logs_in(&node, k2("b")), "the old keys still rule");

    // SIGHUP with a good file.
    write_config(&node, &with_key_k2_only(cfg.clone()));
    signal(&node, libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(20), || logs_in(&node, k2("c"))), "SIGHUP applied the new key");
    assert!(!logs_in(&node, k1("d")), "and removed the old one");
    assert_eq!(node.child.try_wait().expect("wait").map(|s| s.code()), None, "SIGHUP does not stop the node");
}

#[test]
fn reload_needs_the_admin_credential() {
    let cfg = node_config();
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    write_config(&node, &with_key_k2_only(cfg.clone()));
    let (status, _) = http(admin, "POST", "/reload");
    assert_eq!(status, 401, "no credential");
    let wrong = "POST /reload HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong-token-0123456789\r\n\
                 content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
    assert_eq!(http_raw(admin, wrong).0, 401, "wrong token");
    let cross_site = format!(
        "POST /reload HTTP/1.1\r\nhost: x\r\norigin: https://evil.example\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
         content-type: text/plain\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    assert_eq!(http_raw(admin, &cross_site).0, 403, "cross-site");
    assert!(logs_in(&node, token_with("k1", KEY_HEX, "a")), "nothing was reloaded");
    // A node without an admin token refuses it whatever is sent.
    let mut open = test_config(1);
    open.http.admin_token = Default::default();
    let open_node = NodeProcess::start(&open);
    assert_eq!(admin_post(open_node.admin_addr.expect("admin"), "/reload").0, 403);
}

#[test]
fn post_drain_drains_a_single_node() {
    let cfg = node_config();
    let mut node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    assert_eq!(http(admin, "POST", "/drain").0, 401, "no credential");
    let (status, body) = admin_post(admin, "/drain");
    assert_eq!(status, 202, "{body}");
    let mut exit = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            exit = node.child.try_wait().ok().flatten();
            exit.is_some()
        }),
        "a drained node with no sessions exits"
    );
    assert_eq!(exit.and_then(|s| s.code()), Some(0));
}

/// Sends 40 pipelined requests to `echo` and waits for their answers:
/// Ok(answers) or the code the node closed the connection with.
fn request_burst(
    addr: std::net::SocketAddr,
    token: String,
) -> Result<usize, Option<longlink::protocol::proto::ErrorCode>> {
    use longlink::client::ClientError;
    use longlink::protocol::proto;
    run(async move {
        let mut conn = Connection::connect(addr, ClientOptions::new(token)).await.expect("logs in").0;
        for id in 1..=40u64 {
            let req = proto::Request { service_id: "echo".into(), request_id: id, client_msg_id: 0, body: "x".into() };
            if let Err(e) = conn.send_request(&req, false).await {
                return Err(match e {
                    ClientError::Closed { code, .. } => Some(code),
                    _ => None,
                });
            }
        }
        for id in 1..=40u64 {
            match conn.wait_response(id, Duration::from_secs(10)).await {
                Ok(_) => {}
                Err(ClientError::Closed { code, .. }) => return Err(Some(code)),
                Err(_) => return Err(None),
            }
        }
        Ok(40)
    })
}

#[test]
fn a_reload_changes_the_upstream_rate_limit() {
    let backend = longlink::echo::EchoBackend::start("127.0.0.1:0").expect("echo backend");
    let mut cfg = node_config();
    cfg.upstream.services = vec![longlink::config::ServiceConfig {
        id: "echo".into(),
        backends: vec![backend.addr().to_string()],
        ..Default::default()
    }];
    cfg.upstream.rate_limit_per_sec = 0; // off
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let tok = |d: &str| token_with("k1", KEY_HEX, d);
    assert_eq!(request_burst(node.client_addr, tok("a")), Ok(40), "no limit at first");

    let mut limited = cfg.clone();
    limited.upstream.rate_limit_per_sec = 1;
    limited.upstream.rate_limit_burst = 1;
    limited.upstream.rate_limit_close_after_paused_ms = 200;
    write_config(&node, &limited);
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("upstream.rate_limit_per_sec") && body.contains("\"needs_upgrade\":[]"), "{body}");
    assert_eq!(
        request_burst(node.client_addr, tok("b")),
        Err(Some(longlink::protocol::proto::ErrorCode::RateLimited)),
        "the same burst is now over the limit"
    );
}

/// A CA and a "localhost" leaf it signed, written as PEM to `cert` and
/// `key`; returns the CA certificate.
fn write_pki(cert: &std::path::Path, key: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    std::fs::write(cert, format!("{}{}", leaf.pem(), ca.pem())).expect("write cert");
    std::fs::write(key, leaf_key.serialize_pem()).expect("write key");
    ca.der().clone()
}

/// Whether a TLS handshake with the node succeeds trusting only `ca`.
fn tls_trusts(addr: std::net::SocketAddr, ca: &rustls::pki_types::CertificateDer<'static>) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("root");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let Ok(conn) = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name) else { return false };
    let Ok(sock) = std::net::TcpStream::connect(addr) else { return false };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return false;
        }
    }
    true
}

#[test]
fn a_reload_swaps_tls_certificates_and_a_bad_one_changes_nothing_at_all() {
    let dir = TempDir::new("reload-tls");
    let (cert, key) = (dir.0.join("chain.pem"), dir.0.join("key.pem"));
    let first = write_pki(&cert, &key);
    let mut cfg = node_config();
    cfg.server.tls_listen = "127.0.0.1:0".into();
    cfg.tls.cert_file = cert.clone();
    cfg.tls.key_file = key.clone();
    let path = dir.0.join("longlink.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write");
    let server = start(&cfg);
    let reloader = server.reloader();
    reloader.set_source(longlink::reload::file_source(path.clone(), |_| {}));
    let addr = server.links().tls.expect("tls listener");
    assert!(tls_trusts(addr, &first));

    // New files at the same paths: a reload serves them.
    let second = write_pki(&cert, &key);
    let report = reloader.reload().expect("reload");
    assert!(report.tls_reloaded && report.applied.is_empty(), "{report:?}");
    assert!(tls_trusts(addr, &second) && !tls_trusts(addr, &first), "new connections get the new certificate");

    // A bad key file in a reload that also lowers a limit: refused whole.
    std::fs::write(&key, "not a key").expect("write");
    let mut lower = cfg.clone();
    lower.push.max_targets_per_request = 1;
    std::fs::write(&path, toml::to_string(&lower).expect("toml")).expect("write");
    let err = reloader.reload().expect_err("a bad key file fails the reload");
    assert!(err.to_string().contains("TLS"), "{err}");
    assert!(tls_trusts(addr, &second), "the certificate in force stays");
    let mut push = push_client(server.push_addr());
    assert!(push.push_devices(&["d1", "d2"], "x".into()).is_ok(), "the limit did not change either");
    server.shutdown();
}

#[test]
fn a_reload_moves_a_service_to_another_backend_and_adds_and_removes_services() {
    use longlink::config::ServiceConfig;
    let (a, b) = (
        longlink::echo::EchoBackend::start("127.0.0.1:0").expect("echo a"),
        longlink::echo::EchoBackend::start("127.0.0.1:0").expect("echo b"),
    );
    let service = |id: &str, backend: std::net::SocketAddr| ServiceConfig {
        id: id.into(),
        backends: vec![backend.to_string()],
        ..Default::default()
    };
    let mut cfg = node_config();
    cfg.upstream.rate_limit_per_sec = 0;
    cfg.upstream.services = vec![service("echo", a.addr())];
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let addr = node.client_addr;
    // Status of one request to each service, in order.
    let ask = |services: &'static [&'static str], device: &str| -> Vec<i32> {
        let token = token_with("k1", KEY_HEX, device);
        run(async move {
            let mut conn = Connection::connect(addr, ClientOptions::new(token)).await.expect("logs in").0;
            let mut out = Vec::new();
            for s in services {
                let r = conn.request(s, "x".into(), Duration::from_secs(10)).await.expect("an answer");
                out.push(r.status);
            }
            out
        })
    };
    assert_eq!(ask(&["echo", "echo2"], "d1"), [0, longlink::protocol::proto::ErrorCode::Unavailable as i32]);
    assert_eq!((a.stats().requests_for("echo"), b.stats().requests_for("echo")), (1, 0));

    let mut moved = cfg.clone();
    moved.upstream.services = vec![service("echo", b.addr()), service("echo2", b.addr())];
    write_config(&node, &moved);
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("upstream.services") && body.contains("\"needs_upgrade\":[]"), "{body}");
    // The new links connect in the background: ask until they answer.
    let ok = |s: &Vec<i32>| s.iter().all(|&c| c == 0);
    assert!(wait_until(Duration::from_secs(20), || ok(&ask(&["echo", "echo2"], "d2"))), "both served after the reload");
    let from_a = a.stats().requests_for("echo");
    assert_eq!(ask(&["echo", "echo", "echo2"], "d3"), [0, 0, 0]);
    assert_eq!(a.stats().requests_for("echo"), from_a, "the old backend gets nothing more");
    assert!(b.stats().requests_for("echo2") >= 1);

    moved.upstream.services.truncate(1);
    write_config(&node, &moved);
    assert_eq!(admin_post(admin, "/reload").0, 200);
    let unavailable = longlink::protocol::proto::ErrorCode::Unavailable as i32;
    assert_eq!(ask(&["echo", "echo2"], "d4"), [0, unavailable], "a removed service is unknown");
}

/// Auth from the loopback address `from` (not exempt from admission
/// limits, unlike 127.0.0.1); the socket if the node answered AuthOk.
fn login_from(from: &str, node: &NodeProcess, device: &str) -> Option<std::net::TcpStream> {
    use longlink::protocol::codec::Frame;
    use std::io::Write;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    let from: std::net::IpAddr = from.parse().expect("source address");
    socket.bind(&std::net::SocketAddr::new(from, 0).into()).ok()?;
    socket.connect_timeout(&node.client_addr.into(), Duration::from_secs(10)).ok()?;
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let token = token_with("k1", KEY_HEX, device);
    s.write_all(&Frame::Auth(longlink::protocol::proto::Auth { token, ..Default::default() }).to_bytes()).ok()?;
    matches!(read_frame_blocking(&mut s, &mut Vec::new()), Some(Frame::AuthOk(_))).then_some(s)
}

#[test]
fn a_reload_changes_the_per_source_admission_limits() {
    // Started with no per-address limit at all.
    let mut cfg = node_config();
    cfg.server.max_connections_per_ip = 0;
    cfg.server.max_connections_per_net = 0;
    cfg.server.accepts_per_ip_per_sec = 0;
    cfg.server.accepts_per_net_per_sec = 0;
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let early: Vec<_> = (0..3).map(|i| login_from("127.0.0.3", &node, &format!("early-{i}"))).collect();
    assert!(early.iter().all(Option::is_some), "no limit yet");

    let mut limited = cfg.clone();
    limited.server.max_connections_per_ip = 2;
    write_config(&node, &limited);
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("server.max_connections_per_ip") && !body.contains("needs_upgrade\":[\""), "{body}");
    let mut held: Vec<_> = (0..2).map(|i| login_from("127.0.0.4", &node, &format!("a-{i}"))).collect();
    assert!(held.iter().all(Option::is_some), "two are let in");
    assert!(login_from("127.0.0.4", &node, "a-2").is_none(), "the third is refused at the new limit");

    limited.server.max_connections_per_ip = 3;
    write_config(&node, &limited);
    let (status, body) = admin_post(admin, "/reload");
    assert_eq!(status, 200, "{body}");
    held.push(login_from("127.0.0.4", &node, "a-3"));
    assert!(held.last().is_some_and(Option::is_some), "a third now");
    assert!(login_from("127.0.0.4", &node, "a-4").is_none(), "not a fourth");
}
