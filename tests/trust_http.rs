//! Trust boundaries of the HTTP side (issue 13): each attack against the
//! dispatcher, the admin port and the HTTP server gets its refusal and
//! code, over real sockets and real processes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use longlink::client::{ClientOptions, Connection};
use longlink::http::dispatch_auth::{DispatchAuth, DispatchAuthConfig, ReplayStore};
use longlink::http::dispatcher::{DispatchConfig, Dispatcher, StaticNodes};
use longlink::http::{HttpServer, Limits, Reply, Request, Response};
use longlink::protocol::proto::ErrorCode;
use longlink::protocol::token::now_unix_secs;
use longlink::router::NodeInfo;
use serde_json::Value;

fn node(endpoint: &str) -> NodeInfo {
    NodeInfo {
        name: "n1".into(),
        incarnation: 1,
        client_endpoint: endpoint.into(),
        node_endpoint: String::new(),
        draining: false,
        lease_expires_ms: u64::MAX,
    }
}

fn dispatch_config() -> DispatchConfig {
    DispatchConfig {
        endpoints: 1,
        token_ttl_secs: 600,
        heartbeat_min_ms: 5_000,
        heartbeat_default_ms: 30_000,
        heartbeat_max_ms: 270_000,
    }
}

/// A dispatcher with `auth` on a real HTTP server, with /healthz beside it.
fn serve_dispatcher(auth: DispatchAuth, limits: Limits) -> HttpServer {
    let cfg = test_config(1);
    let d = Arc::new(
        Dispatcher::new(dispatch_config(), keyring(&cfg), Arc::new(StaticNodes(vec![node("127.0.0.1:7100")])))
            .with_auth(auth),
    );
    let handler = move |req: &Request| -> Reply {
        match req.path.as_str() {
            "/v1/dispatch" => d.dispatch(req, now_unix_secs()),
            _ => Response::json(200, &serde_json::json!({"status": "ok"})).into(),
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    HttpServer::serve_with(listener, limits, Arc::new(handler)).unwrap()
}

fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, Value) {
    let (status, body) =
        http_raw(addr, &format!("GET {path} HTTP/1.1\r\nhost: x\r\n{headers}connection: close\r\n\r\n"));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// The token in `body` verifies and names `uid`.
fn token_for(body: &Value, uid: &str, device: &str) {
    let cfg = test_config(1);
    let token = body["token"].as_str().unwrap_or_else(|| panic!("no token in {body}"));
    let claims = keyring(&cfg).verify(token, now_unix_secs(), 0).unwrap();
    assert_eq!((claims.user.as_str(), claims.device.as_str()), (uid, device));
}

#[test]
fn dispatch_mints_only_for_a_valid_unused_ticket() {
    let auth = DispatchAuth::new(&trusted(test_config(1)).dispatch, ReplayStore::memory(1_000)).unwrap();
    let server = serve_dispatcher(auth, Limits::default());
    let addr = server.addr();

    // The attack of the issue: a bare uid.
    let (status, body) = get(addr, "/v1/dispatch?uid=victim&device=vphone", "");
    assert_eq!((status, body["code"].as_str()), (401, Some("NO_PROOF")), "{body}");
    assert!(body["token"].is_null());

    // A ticket signed with another key, or cut short.
    let forged = {
        let claims =
            serde_json::json!({"kid": "app-1", "uid": "victim", "exp": now_unix_secs() + 60, "nonce": "forged-01"});
        longlink::http::dispatch_auth::sign_ticket(&[0x55; 32], &claims)
    };
    for bad in [forged.as_str(), "not-a-ticket", &ticket("victim")[..20]] {
        let (status, body) = get(addr, &format!("/v1/dispatch?ticket={bad}&device=vphone"), "");
        assert_eq!((status, body["code"].as_str()), (401, Some("BAD_TICKET")), "{body}");
    }

    // A good ticket works once; the uid is the ticket's, not the query's.
    let t = ticket("alice");
    let (status, body) = get(addr, &format!("/v1/dispatch?ticket={t}&uid=victim&device=phone"), "");
    assert_eq!(status, 200, "{body}");
    token_for(&body, "alice", "phone");
    let (status, body) = get(addr, &format!("/v1/dispatch?ticket={t}&device=phone"), "");
    assert_eq!((status, body["code"].as_str()), (401, Some("TICKET_REPLAYED")), "{body}");

    // Ids with control characters (ANSI escapes) are refused.
    let (status, body) = get(addr, &format!("/v1/dispatch?ticket={}&device=ph%1B%5B31mone", ticket("alice")), "");
    assert_eq!((status, body["code"].as_str()), (400, Some("BAD_ID")), "{body}");
    server.stop();
}

#[test]
fn without_hook_or_tickets_the_dispatcher_gives_endpoints_but_no_token() {
    let server = serve_dispatcher(DispatchAuth::none(), Limits::default());
    let (status, body) = get(server.addr(), "/v1/dispatch?uid=alice&device=phone", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["endpoints"][0], "127.0.0.1:7100");
    assert_eq!(body["heartbeat"]["max_ms"], 270_000);
    assert!(body["token"].is_null(), "{body}");
    server.stop();
}

/// A tiny business auth hook: `Bearer good-<uid>` is that user, `Bearer
/// slow` answers after `slow`, anything else is refused. Counts calls.
fn start_hook(slow: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            counted.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Head and the small JSON body.
                while !String::from_utf8_lossy(&buf).contains("}") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf).to_lowercase();
                let auth = text.lines().find_map(|l| l.strip_prefix("authorization: bearer ")).unwrap_or("").trim();
                let (status, body) = if let Some(uid) = auth.strip_prefix("grouped-") {
                    ("200 OK", format!("{{\"uid\":\"{uid}\",\"groups\":[\"team-*\"]}}"))
                } else if auth == "too-many-groups" {
                    let groups: Vec<String> = (0..65).map(|i| format!("\"g{i}\"")).collect();
                    ("200 OK", format!("{{\"uid\":\"greedy\",\"groups\":[{}]}}", groups.join(",")))
                } else if let Some(uid) = auth.strip_prefix("good-") {
                    ("200 OK", format!("{{\"uid\":\"{uid}\"}}"))
                } else if auth == "slow" {
                    std::thread::sleep(slow);
                    ("200 OK", "{\"uid\":\"slowpoke\"}".to_owned())
                } else {
                    ("403 Forbidden", "{}".to_owned())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    (addr, calls)
}

#[test]
fn dispatch_through_the_auth_hook() {
    let (hook, calls) = start_hook(Duration::from_secs(3));
    let cfg = DispatchAuthConfig {
        hook_url: format!("http://{hook}/auth"),
        hook_timeout_ms: 300,
        ..DispatchAuthConfig::default()
    };
    let auth = DispatchAuth::new(&cfg, ReplayStore::memory(16)).unwrap();
    let server = serve_dispatcher(auth, Limits::default());
    let addr = server.addr();

    let (status, body) = get(addr, "/v1/dispatch?uid=victim&device=phone", "");
    assert_eq!((status, body["code"].as_str()), (401, Some("NO_PROOF")), "{body}");
    let (status, body) = get(addr, "/v1/dispatch?device=phone", "authorization: Bearer nope\r\n");
    assert_eq!((status, body["code"].as_str()), (403, Some("HOOK_DENIED")), "{body}");

    // The hook names the user; the query's uid is ignored.
    let (status, body) = get(addr, "/v1/dispatch?uid=victim&device=phone", "authorization: Bearer good-alice\r\n");
    assert_eq!(status, 200, "{body}");
    token_for(&body, "alice", "phone");
    // The answer is cached briefly: the same credential again costs no call.
    let before = calls.load(Ordering::Relaxed);
    let (status, body) = get(addr, "/v1/dispatch?device=tablet", "authorization: Bearer good-alice\r\n");
    assert_eq!(status, 200, "{body}");
    token_for(&body, "alice", "tablet");
    assert_eq!(calls.load(Ordering::Relaxed), before, "a cached answer called the hook again");

    // A hook that does not answer in time: 504, and meanwhile the server
    // keeps answering others (the call runs off its event loop).
    let slow = std::thread::spawn(move || get(addr, "/v1/dispatch?device=phone", "authorization: Bearer slow\r\n"));
    let (status, _) = get(addr, "/healthz", "");
    assert_eq!(status, 200);
    let (status, body) = slow.join().unwrap();
    assert_eq!((status, body["code"].as_str()), (504, Some("HOOK_TIMEOUT")), "{body}");
    server.stop();
}

/// A JOIN of `group` on a live session: the node's answer code.
fn join(s: &mut TcpStream, buf: &mut Vec<u8>, group: &str) -> ErrorCode {
    use longlink::protocol::codec::Frame;
    let frame = Frame::Join(longlink::protocol::proto::GroupMembership { group: group.into() });
    s.write_all(&frame.to_bytes()).unwrap();
    match read_frame_blocking(s, buf) {
        Some(Frame::GroupResult(r)) => longlink::protocol::codes::from_wire(r.code),
        other => panic!("no GroupResult: {other:?}"),
    }
}

#[test]
fn the_dispatcher_mints_the_groups_its_ticket_or_hook_names_and_the_node_honours_them() {
    use longlink::protocol::codec::Frame;
    let cfg = test_config(1);
    let live = NodeProcess::start(&cfg);
    let (hook, _) = start_hook(Duration::from_secs(3));
    let mut dispatch = trusted(test_config(1)).dispatch;
    dispatch.hook_url = format!("http://{hook}/auth");
    let auth = DispatchAuth::new(&dispatch, ReplayStore::memory(16)).unwrap();
    let d = Arc::new(
        Dispatcher::new(
            dispatch_config(),
            keyring(&cfg),
            Arc::new(StaticNodes(vec![node(&live.client_addr.to_string())])),
        )
        .with_auth(auth),
    );
    let handler = move |req: &Request| -> Reply { d.dispatch(req, now_unix_secs()) };
    let server =
        HttpServer::serve_with(TcpListener::bind("127.0.0.1:0").unwrap(), Limits::default(), Arc::new(handler))
            .unwrap();
    let groups_of = |body: &Value| {
        let token = body["token"].as_str().unwrap_or_else(|| panic!("no token in {body}"));
        keyring(&cfg).verify(token, now_unix_secs(), 0).unwrap().groups
    };

    // A ticket naming groups: the token carries them.
    let secret = longlink::protocol::token::decode_hex(APP_KEY_HEX).unwrap();
    let claims = serde_json::json!({
        "kid": "app-1", "uid": "gina", "exp": now_unix_secs() + 60, "nonce": "groups-ticket-1",
        "groups": ["room-*", "vip"],
    });
    let t = longlink::http::dispatch_auth::sign_ticket(&secret, &claims);
    let (status, body) = get(server.addr(), &format!("/v1/dispatch?ticket={t}&device=gphone"), "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(groups_of(&body), ["room-*", "vip"]);

    // The node lets that client JOIN what they name, and nothing else
    // (client JOIN is off by default).
    let mut s = TcpStream::connect(live.client_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let token = body["token"].as_str().unwrap().to_owned();
    s.write_all(&Frame::Auth(longlink::protocol::proto::Auth { token, ..Default::default() }).to_bytes()).unwrap();
    let mut buf = Vec::new();
    assert!(matches!(read_frame_blocking(&mut s, &mut buf), Some(Frame::AuthOk(_))));
    assert_eq!(join(&mut s, &mut buf, "room-7"), ErrorCode::Unspecified);
    assert_eq!(join(&mut s, &mut buf, "vip"), ErrorCode::Unspecified);
    assert_eq!(join(&mut s, &mut buf, "staff"), ErrorCode::PermissionDenied);

    // The hook's answer names groups the same way.
    let (status, body) = get(server.addr(), "/v1/dispatch?device=hphone", "authorization: Bearer grouped-hank\r\n");
    assert_eq!(status, 200, "{body}");
    token_for(&body, "hank", "hphone");
    assert_eq!(groups_of(&body), ["team-*"]);
    // More groups than a token may carry: not a usable answer.
    let (status, body) = get(server.addr(), "/v1/dispatch?device=x", "authorization: Bearer too-many-groups\r\n");
    assert_eq!((status, body["code"].as_str()), (502, Some("HOOK_UNAVAILABLE")), "{body}");
    // A plain proof: no groups claim.
    let (status, body) = get(server.addr(), "/v1/dispatch?device=iphone", "authorization: Bearer good-ivy\r\n");
    assert_eq!(status, 200, "{body}");
    assert!(groups_of(&body).is_empty());
    server.stop();
}

#[test]
fn slowloris_sockets_are_closed_at_the_header_deadline_while_others_are_served() {
    // More slow sockets than the thread-per-connection server had threads.
    const SLOW: usize = 300;
    let limits = Limits {
        max_connections: 2_000,
        max_per_ip: 2_000,
        header_timeout: Duration::from_millis(1_500),
        ..Limits::default()
    };
    let auth = DispatchAuth::new(&trusted(test_config(1)).dispatch, ReplayStore::memory(1_000)).unwrap();
    let server = serve_dispatcher(auth, limits);
    let addr = server.addr();
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut closed = vec![false; SLOW];
    let started = Instant::now();
    // A byte every 500 ms keeps any per-read timeout from firing; only a
    // deadline for the whole head ends them. Bounded: 30 s at most.
    while closed.iter().any(|c| !c) && started.elapsed() < Duration::from_secs(30) {
        for (s, done) in slow.iter_mut().zip(closed.iter_mut()) {
            if *done {
                continue;
            }
            let mut byte = [0u8; 64];
            match s.read(&mut byte) {
                Ok(0) => *done = true,
                Ok(n) => panic!("a slow socket got an answer: {:?}", String::from_utf8_lossy(&byte[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if s.write_all(b"x").is_err() {
                        *done = true;
                    }
                }
                Err(_) => *done = true,
            }
        }
        // Others are served meanwhile.
        assert_eq!(get(addr, "/healthz", "").0, 200);
        let (status, body) = get(addr, &format!("/v1/dispatch?ticket={}&device=d", ticket("u")), "");
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(closed.iter().filter(|c| !**c).count(), 0, "slow sockets left open");
    assert_eq!(get(addr, "/healthz", "").0, 200);
    server.stop();
}

/// A connection from `source` (a loopback address) to `to`.
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

fn answer_of(mut s: TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn connections_over_the_per_ip_cap_are_refused_while_another_address_is_served() {
    let limits = Limits { max_per_ip: 8, ..Limits::default() };
    let server = serve_dispatcher(DispatchAuth::none(), limits);
    let addr = server.addr();
    let held: Vec<TcpStream> = (0..8).map(|_| connect_from("127.0.0.1", addr)).collect();
    // Held connections are registered once one of them is answered.
    let mut first = held[0].try_clone().unwrap();
    first.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(first.read(&mut buf).unwrap() > 0);
    for _ in 0..20 {
        let mut over = connect_from("127.0.0.1", addr);
        let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let answer = answer_of(over);
        assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("from your address"), "{answer}");
    }
    let mut other = connect_from("127.0.0.2", addr);
    other.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let answer = answer_of(other);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Closing frees the address's share.
    drop(held);
    assert!(wait_until(Duration::from_secs(10), || {
        let mut s = connect_from("127.0.0.1", addr);
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        answer_of(s).starts_with("HTTP/1.1 200")
    }));
    server.stop();
}

#[test]
fn a_token_over_the_max_lifetime_is_refused() {
    let mut cfg = test_config(1);
    cfg.auth.max_token_lifetime_secs = 86_400;
    let server = start(&cfg);
    let addr = server.client_addr();
    let now = now_unix_secs();
    let century = keyring(&cfg).mint("u", "d", "a", now, now + 100 * 365 * 86_400);
    let day = keyring(&cfg).mint("u", "d2", "a", now, now + 3_600);
    run(async move {
        let err = Connection::connect(addr, ClientOptions::new(century)).await.map(|_| ()).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidToken), "{err:?}");
        assert!(err.to_string().contains("accepts at most 86400 s"), "{err}");
        Connection::connect(addr, ClientOptions::new(day)).await.expect("a short-lived token works");
    });
    server.shutdown();
}

#[test]
fn the_dispatcher_refuses_to_start_without_the_nodes_key() {
    let dir = TempDir::new("dispatcher-nokey");
    let mut child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["dispatcher", "--listen", "127.0.0.1:0", "--redis", "redis://127.0.0.1:1/"])
            .current_dir(&dir.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // It must exit by itself; one still running after 20 s started serving.
    let status = wait_exit(&mut child.0, Duration::from_secs(20)).expect("the dispatcher exits");
    assert!(!status.success());
    let mut stderr = String::new();
    child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("needs the token keys the nodes use"), "{stderr}");
    assert!(!dir.0.join(".longlink").exists(), "it made a key of its own");
}

#[test]
fn admin_drain_needs_the_token_and_refuses_cross_site_requests() {
    let redis = RedisServer::start();
    let mut cfg = trusted(test_config(1));
    cfg.node_name = "admin-a".into();
    cfg.delivery.redis_url = redis.url();
    cfg.cluster.enabled = true;
    let dispatch_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    cfg.http.dispatch_listen = format!("127.0.0.1:{dispatch_port}");
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.unwrap();
    let dispatch_addr: SocketAddr = cfg.http.dispatch_listen.parse().unwrap();
    let drain_with = |headers: &str| {
        let (status, body) = http_raw(
            admin,
            &format!("POST /drain HTTP/1.1\r\nhost: x\r\n{headers}content-length: 2\r\nconnection: close\r\n\r\n{{}}"),
        );
        (status, serde_json::from_str::<Value>(&body).unwrap_or(Value::Null)["code"].as_str().unwrap_or("").to_owned())
    };
    let bearer = format!("authorization: Bearer {ADMIN_TOKEN}\r\n");
    assert_eq!(drain_with(""), (401, "ADMIN_TOKEN_MISSING".into()));
    assert_eq!(drain_with("authorization: Bearer wrong-token-0123456789\r\n"), (401, "ADMIN_TOKEN_INVALID".into()));
    // The cross-site shape, without and even with the token.
    let cross_site = "origin: http://evil.example\r\ncontent-type: text/plain\r\n";
    assert_eq!(drain_with(cross_site), (403, "ORIGIN_NOT_ALLOWED".into()));
    assert_eq!(drain_with(&format!("{bearer}{cross_site}")), (403, "ORIGIN_NOT_ALLOWED".into()));
    assert_eq!(drain_with(&format!("{bearer}content-type: text/plain\r\n")), (415, "SIMPLE_CONTENT_TYPE".into()));
    let (status, _) = http_raw(admin, &format!("GET /drain HTTP/1.1\r\nhost: x\r\n{bearer}connection: close\r\n\r\n"));
    assert_eq!(status, 405);
    // Open: metrics and health. The dispatcher is on its own listener.
    assert_eq!(http(admin, "GET", "/metrics").0, 200);
    assert_eq!(http(admin, "GET", "/healthz").0, 200);
    assert_eq!(get(admin, &format!("/v1/dispatch?ticket={}&device=p", ticket("u")), "").0, 404);
    assert!(wait_until(Duration::from_secs(10), || {
        get(dispatch_addr, &format!("/v1/dispatch?ticket={}&device=p", ticket("u")), "").0 == 200
    }));
    assert_eq!(drain_with(&format!("{bearer}content-type: application/json\r\n")), (202, "".into()));
    assert!(wait_until(Duration::from_secs(10), || http(admin, "GET", "/healthz").0 == 503));
}

#[test]
fn a_ticket_is_single_use_across_dispatchers_of_a_cluster() {
    let redis = RedisServer::start();
    let mut cfg = trusted(test_config(1));
    cfg.node_name = "ticket-a".into();
    cfg.delivery.redis_url = redis.url();
    cfg.cluster.enabled = true;
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.unwrap();
    // The standalone dispatcher shares the node's Redis and keys.
    let dir = TempDir::new("dispatcher-ticket");
    let path = dir.0.join("longlink.toml");
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let mut standalone = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["dispatcher", "--listen", "127.0.0.1:0", "--redis", &redis.url(), "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = standalone.0.stdout.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stdout)).next().unwrap().unwrap();
    let other: SocketAddr = line.strip_prefix("dispatcher ").unwrap().parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        get(admin, &format!("/v1/dispatch?ticket={}&device=p", ticket("u")), "").0 == 200
    }));
    let t = ticket("bob");
    let (status, body) = get(admin, &format!("/v1/dispatch?ticket={t}&device=phone"), "");
    assert_eq!(status, 200, "{body}");
    token_for(&body, "bob", "phone");
    // The same ticket at another dispatcher: already used.
    let (status, body) = get(other, &format!("/v1/dispatch?ticket={t}&device=phone"), "");
    assert_eq!((status, body["code"].as_str()), (401, Some("TICKET_REPLAYED")), "{body}");
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A child process killed and reaped on drop, also when an assertion fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
