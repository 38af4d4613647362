//! The SDK over real TCP: a real node on port 0 (and the real dispatcher
//! over HTTP, the real echo backend), the blocking facade or the glommio
//! client, and a scripted peer where the node has no such feature yet
//! (GoAway). Readiness by events and polling, never by sleeping.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::*;
use longlink::backend::PushClient;
use longlink::client::ClientOptions;
use longlink::config::ServiceConfig;
use longlink::echo::EchoBackend;
use longlink::http::HttpServer;
use longlink::http::dispatch_auth::{DispatchAuth, ReplayStore};
use longlink::http::dispatcher::{DispatchConfig, Dispatcher, StaticNodes};
use longlink::protocol::codec::{self, Flags, Frame};
use longlink::protocol::proto::{self, ErrorCode};
use longlink::router::NodeInfo;
use longlink::sdk::{
    AgentConfig, BlockingClient, Client, ClientConfig, Disconnect, DispatcherConfig, Event, NextError, RequestId,
};

const WAIT: Duration = Duration::from_secs(20);

/// Fast retries so tests do not wait on backoff; bounds as a server gives.
fn agent_config(token: String, endpoints: &[String]) -> AgentConfig {
    let mut opts = ClientOptions::new(token);
    opts.platform = "test".into();
    let mut cfg = AgentConfig::new(opts);
    cfg.endpoints = endpoints.to_vec();
    cfg.backoff_min_ms = 20;
    cfg.backoff_base_ms = 50;
    cfg.backoff_max_ms = 500;
    cfg.connect_timeout_ms = 5_000;
    cfg.request_retry_ms = 300;
    cfg
}

fn start_client(cfg: AgentConfig) -> BlockingClient {
    BlockingClient::start(ClientConfig::fixed(cfg)).expect("client starts")
}

/// Reads events until one matches; returns it and the ones before it.
fn wait_for(c: &BlockingClient, what: &str, mut pred: impl FnMut(&Event) -> bool) -> (Event, Vec<Event>) {
    let deadline = Instant::now() + WAIT;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(left) {
            Ok(ev) if pred(&ev) => return (ev, before),
            Ok(ev) => before.push(ev),
            Err(e) => panic!("waiting for {what}: {e}; events so far: {before:?}"),
        }
    }
}

fn connected(ev: &Event) -> bool {
    matches!(ev, Event::Connected { .. })
}

/// An address nobody listens on (connections are refused).
fn dead_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn push_port(addr: SocketAddr) -> PushClient {
    let mut b = PushClient::connect(addr, Duration::from_secs(5), &push_key()).expect("push port");
    b.set_read_timeout(Some(WAIT)).unwrap();
    b
}

#[test]
fn reconnects_after_a_kick_with_a_reconnect_code_and_stops_on_a_terminal_one() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let endpoint = server.client_addr().to_string();
    let client = start_client(agent_config(token(&cfg, "u1", "kick-me"), std::slice::from_ref(&endpoint)));
    let (ev, _) = wait_for(&client, "connected", connected);
    let Event::Connected { endpoint: at, auth_ok } = ev else { unreachable!() };
    assert_eq!(at, endpoint);
    let first_conn = auth_ok.conn_id;

    let mut push = push_port(server.push_addr());
    push.kick_devices(&["kick-me"], ErrorCode::Shutdown, "restart").unwrap();
    let (ev, before) = wait_for(&client, "reconnected", connected);
    let Event::Connected { auth_ok, .. } = ev else { unreachable!() };
    assert_ne!(auth_ok.conn_id, first_conn, "a new session");
    assert!(
        matches!(&before[0], Event::Kicked { code: ErrorCode::Shutdown, reason } if reason == "restart"),
        "{before:?}"
    );
    assert!(
        matches!(&before[1], Event::Disconnected { reason, retry_in_ms: Some(_) } if reason.code() == Some(ErrorCode::Shutdown)),
        "{before:?}"
    );

    push.kick_devices(&["kick-me"], ErrorCode::Kicked, "banned").unwrap();
    let (ev, _) = wait_for(&client, "final disconnect", |e| matches!(e, Event::Disconnected { .. }));
    let Event::Disconnected { reason, retry_in_ms } = ev else { unreachable!() };
    assert_eq!((reason.code(), retry_in_ms), (Some(ErrorCode::Kicked), None));
    assert_eq!(client.next_event(WAIT), Err(NextError::Stopped));
    server.shutdown();
}

#[test]
fn drifts_to_the_second_endpoint_when_the_first_is_down() {
    let cfg = test_config(1);
    let server = start(&cfg);
    let live = server.client_addr().to_string();
    let dead = dead_addr().to_string();
    let agent = agent_config(token(&cfg, "u2", "drifter"), &[dead, live.clone()]);
    let events = run(async move {
        let mut client = Client::new(ClientConfig::fixed(agent)).expect("client");
        let mut events = Vec::new();
        for _ in 0..100 {
            let ev = client.next_event().await.expect("still running");
            let done = connected(&ev);
            events.push(ev);
            if done {
                break;
            }
        }
        client.close();
        while let Some(ev) = client.next_event().await {
            events.push(ev);
        }
        events
    });
    assert!(matches!(&events[0], Event::Disconnected { reason: Disconnect::ConnectFailed(_), retry_in_ms: Some(_) }));
    assert!(matches!(&events[1], Event::Connected { endpoint, .. } if *endpoint == live), "{events:?}");
    assert_eq!(events[2], Event::Disconnected { reason: Disconnect::ClosedByApp, retry_in_ms: None });
    assert_eq!(events.len(), 3);
    server.shutdown();
}

/// A peer that speaks just enough of the protocol: answers Auth with
/// AuthOk, then tells the client to go to `to`.
fn go_away_peer(to: SocketAddr) -> (SocketAddr, std::thread::JoinHandle<proto::Auth>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = Vec::new();
        let auth = loop {
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).expect("the client sends Auth");
            assert!(n > 0, "closed before Auth");
            buf.extend_from_slice(&chunk[..n]);
            if let Some((h, body)) = codec::split_frame(&buf, codec::DEFAULT_MAX_BODY).unwrap() {
                let Frame::Auth(auth) = Frame::decode(h, body).unwrap() else { panic!("first frame not Auth") };
                break auth;
            }
        };
        let mut out = BytesMut::new();
        let ok = proto::AuthOk {
            conn_id: 1,
            heartbeat_min_ms: 100,
            heartbeat_max_ms: 10_000,
            heartbeat_ms: 10_000,
            ..Default::default()
        };
        Frame::AuthOk(ok).encode_into(&mut out, Flags::default());
        Frame::GoAway(proto::GoAway { endpoint: to.to_string(), reason: "draining".into() })
            .encode_into(&mut out, Flags::default());
        s.write_all(&out).unwrap();
        // The client leaves: read until it closes.
        let mut sink = [0u8; 1024];
        while s.read(&mut sink).is_ok_and(|n| n > 0) {}
        auth
    });
    (addr, peer)
}

#[test]
fn go_away_moves_to_the_endpoint_it_names_at_once() {
    let cfg = test_config(1);
    let server = start(&cfg);
    let real = server.client_addr();
    let (peer_addr, peer) = go_away_peer(real);
    let mut agent = agent_config(token(&cfg, "u3", "mover"), &[peer_addr.to_string()]);
    // A backoff this long would show: GoAway must not wait for it.
    agent.backoff_min_ms = 60_000;
    agent.backoff_base_ms = 60_000;
    agent.backoff_max_ms = 60_000;
    let client = start_client(agent);
    let (ev, _) = wait_for(&client, "connected to the peer", connected);
    assert!(matches!(ev, Event::Connected { endpoint, .. } if endpoint == peer_addr.to_string()));
    let (ev, before) = wait_for(&client, "connected to the node", connected);
    assert!(matches!(ev, Event::Connected { endpoint, .. } if endpoint == real.to_string()));
    assert_eq!(
        before,
        [Event::Disconnected {
            reason: Disconnect::GoAway { endpoint: real.to_string(), reason: "draining".into() },
            retry_in_ms: Some(0)
        }]
    );
    let auth = peer.join().unwrap();
    assert_eq!(auth.platform, "test");
    drop(client);
    server.shutdown();
}

/// Messages until `n` have arrived (other events skipped).
fn messages(c: &BlockingClient, n: usize) -> Vec<proto::Message> {
    let mut got = Vec::new();
    while got.len() < n {
        let (ev, _) = wait_for(c, "a message", |e| matches!(e, Event::Message(_)));
        let Event::Message(m) = ev else { unreachable!() };
        got.push(m);
    }
    got
}

#[test]
fn resume_delivers_the_backlog_once_across_restarts_and_reconnects() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let endpoint = server.client_addr().to_string();
    let device = "resumer";
    let tok = token(&cfg, "u4", device);
    let mut push = push_port(server.push_addr());

    // A first run handles 1..=3 and exits.
    let client = start_client(agent_config(tok.clone(), std::slice::from_ref(&endpoint)));
    wait_for(&client, "connected", connected);
    let mut seqs = Vec::new();
    let mut store = |push: &mut PushClient, i: u32| {
        let r = push.push_devices_at_least_once(&[device], Bytes::from(format!("m{i}"))).unwrap();
        assert_eq!(r.results[0].status, proto::PushStatus::Stored as i32);
        seqs.push(r.results[0].seq);
    };
    for i in 1..=3 {
        store(&mut push, i);
    }
    let got = messages(&client, 3);
    assert_eq!(got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), ["m1", "m2", "m3"]);
    let third = got[2].seq;
    client.message_handled(third).unwrap();
    client.close().unwrap();
    wait_for(&client, "closed", |e| matches!(e, Event::Disconnected { retry_in_ms: None, .. }));
    drop(client);

    // Offline: 4..=6 are stored.
    for i in 4..=6 {
        store(&mut push, i);
    }
    // The next run resumes after 3.
    let mut agent = agent_config(tok, std::slice::from_ref(&endpoint));
    agent.client.last_seq = third;
    let client = start_client(agent);
    let got = messages(&client, 3);
    assert_eq!(got.iter().map(|m| m.payload.clone()).collect::<Vec<_>>(), ["m4", "m5", "m6"]);
    // Only 4 is handled when the connection drops: 5 and 6 come again from
    // the node, and the SDK drops them (the application has them).
    client.message_handled(got[0].seq).unwrap();
    push.kick_devices(&[device], ErrorCode::Shutdown, "cut").unwrap();
    wait_for(&client, "reconnected", connected);
    store(&mut push, 7);
    let (ev, before) = wait_for(&client, "m7", |e| matches!(e, Event::Message(_)));
    assert!(matches!(&ev, Event::Message(m) if m.seq == seqs[6] && m.payload == "m7"), "{ev:?} after {before:?}");
    assert!(!before.iter().any(|e| matches!(e, Event::Message(_))), "no duplicate: {before:?}");
    client.message_handled(seqs[6]).unwrap();
    drop(client);
    server.shutdown();
}

#[test]
fn a_request_retried_across_a_reconnect_keeps_its_client_msg_id_and_reaches_the_backend_once() {
    let echo = EchoBackend::start("127.0.0.1:0").expect("echo backend");
    let mut cfg = test_config(2);
    cfg.upstream.services = vec![ServiceConfig {
        id: "chat".into(),
        backends: vec![echo.addr().to_string()],
        timeout_ms: 15_000,
        ..ServiceConfig::default()
    }];
    cfg.upstream.rate_limit_per_sec = 0;
    let server = start(&cfg);
    let joined = || -> u64 { server.counters().iter().map(|c| c.upstream.dedup_joined.load(Ordering::Relaxed)).sum() };
    let device = "requester";
    let client = start_client(agent_config(token(&cfg, "u5", device), &[server.client_addr().to_string()]));
    wait_for(&client, "connected", connected);
    echo.set_stalled(true);
    let id: RequestId = client.request("chat", Bytes::from_static(b"pay 5"), Duration::from_secs(15)).unwrap();
    // The backend holds the first attempt; a retry on the same connection
    // joins it at the node.
    assert!(echo.wait_for(WAIT, |s| s.requests_for("chat") == 1));
    assert!(wait_until(WAIT, || joined() >= 1), "a retry with the same client_msg_id");
    // The connection drops; the retry on the next one joins it too.
    let mut push = push_port(server.push_addr());
    push.kick_devices(&[device], ErrorCode::Shutdown, "cut").unwrap();
    wait_for(&client, "reconnected", connected);
    let before = joined();
    assert!(wait_until(WAIT, || joined() > before), "the retry after the reconnect");
    echo.set_stalled(false);
    let (ev, _) = wait_for(&client, "the response", |e| matches!(e, Event::Response { .. }));
    let Event::Response { id: got, result: Ok(r) } = ev else { panic!("{ev:?}") };
    assert_eq!((got, &r.body[..], r.status), (id, &b"pay 5"[..], 0));
    let stats = echo.stats();
    assert_eq!(stats.times_seen(device, id.0), 1, "forwarded once");
    assert_eq!(stats.requests_for("chat"), 1);
    // The blocking call waits for its own answer.
    let r = client.call("chat", Bytes::from_static(b"again"), WAIT).unwrap();
    assert_eq!(&r.body[..], b"again");
    drop(client);
    server.shutdown();
}

#[test]
fn connects_through_the_dispatcher_with_its_token() {
    let cfg = test_config(1);
    let server = start(&cfg);
    let node = |name: &str, endpoint: String| NodeInfo {
        name: name.into(),
        incarnation: 1,
        client_endpoint: endpoint,
        node_endpoint: String::new(),
        draining: false,
        lease_expires_ms: u64::MAX,
    };
    let nodes = vec![node("dead", dead_addr().to_string()), node("live", server.client_addr().to_string())];
    let dcfg = DispatchConfig {
        endpoints: 2,
        token_ttl_secs: 600,
        heartbeat_min_ms: 100,
        heartbeat_default_ms: 10_000,
        heartbeat_max_ms: 10_000,
    };
    let auth = DispatchAuth::new(&trusted(cfg.clone()).dispatch, ReplayStore::memory(16)).unwrap();
    let dispatcher = Arc::new(Dispatcher::new(dcfg, keyring(&cfg), Arc::new(StaticNodes(nodes))).with_auth(auth));
    let http = HttpServer::start(
        "127.0.0.1:0".parse().unwrap(),
        4,
        Arc::new(move |r| dispatcher.dispatch(r, longlink::protocol::token::now_unix_secs())),
    )
    .unwrap();
    // No token and no endpoint of its own: both come from the dispatcher.
    let agent = agent_config(String::new(), &[]);
    let mut dispatch = DispatcherConfig::new(http.addr().to_string(), "u6", "dispatched");
    dispatch.app = "test".into();
    // The dispatcher mints for the user a login ticket proves.
    dispatch.ticket = ticket("u6");
    let client =
        BlockingClient::start(ClientConfig { agent, dispatcher: Some(dispatch), token_refresher: None }).unwrap();
    let (ev, _) = wait_for(&client, "connected", connected);
    assert!(matches!(ev, Event::Connected { endpoint, .. } if endpoint == server.client_addr().to_string()));
    drop(client);
    http.stop();
    server.shutdown();
}

#[test]
fn a_network_change_reconnects_at_once() {
    let cfg = test_config(1);
    let server = start(&cfg);
    let mut agent = agent_config(token(&cfg, "u7", "roamer"), &[server.client_addr().to_string()]);
    agent.backoff_min_ms = 60_000;
    agent.backoff_base_ms = 60_000;
    agent.backoff_max_ms = 60_000;
    let client = start_client(agent);
    wait_for(&client, "connected", connected);
    client.set_foreground(false).unwrap();
    client.network_changed("cellular").unwrap();
    let (_, before) = wait_for(&client, "reconnected", connected);
    assert_eq!(before, [Event::Disconnected { reason: Disconnect::NetworkChanged, retry_in_ms: Some(0) }]);
    drop(client);
    server.shutdown();
}

#[test]
fn dropping_a_blocking_client_that_nobody_reads_returns() {
    let cfg = test_config(1);
    let server = start(&cfg);
    let client = start_client(agent_config(token(&cfg, "u8", "unread"), &[server.client_addr().to_string()]));
    wait_for(&client, "connected", connected);
    // More events than the facade buffers: the driver thread blocks on the
    // full queue.
    let mut push = push_port(server.push_addr());
    for i in 0..1_500 {
        let r = push.push_devices(&["unread"], Bytes::from(format!("m{i}"))).unwrap();
        assert_eq!(r.delivered, 1);
    }
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(client);
        let _ = done_tx.send(());
    });
    assert!(done.recv_timeout(WAIT).is_ok(), "drop hung");
    server.shutdown();
}

#[test]
fn the_sdk_command_prints_events_and_exits_on_a_terminal_kick() {
    use std::io::BufRead;
    let cfg = test_config(1);
    let server = start(&cfg);
    /// Killed on drop, so a failed assertion leaves no process behind.
    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .arg("sdk")
        .args(["--endpoint", &dead_addr().to_string(), "--endpoint", &server.client_addr().to_string()])
        .args(["--token", &token(&cfg, "u9", "cli-dev")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map(Child)
        .expect("spawn longlink sdk");
    let stdout = child.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(serde_json::from_str::<serde_json::Value>(&line).expect("JSON lines"));
        }
    });
    let next = || lines.recv_timeout(WAIT).expect("a line");
    assert_eq!(next()["event"], "disconnected", "the first endpoint is down");
    let connected = next();
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["endpoint"], server.client_addr().to_string());
    let mut push = push_port(server.push_addr());
    push.push_devices_at_least_once(&["cli-dev"], Bytes::from_static(b"hello")).unwrap();
    let m = next();
    assert_eq!((m["event"].as_str(), m["payload"].as_str()), (Some("message"), Some("hello")));
    push.kick_devices(&["cli-dev"], ErrorCode::Kicked, "bye").unwrap();
    assert_eq!(next()["event"], "kicked");
    let d = next();
    assert_eq!((d["code"].as_str(), d["retry_in_ms"].is_null()), (Some("KICKED"), true));
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    server.shutdown();
}

#[test]
fn a_peer_that_stops_reading_ends_the_link_instead_of_stalling_the_client() {
    // A peer that authenticates the client, then never reads again, with a
    // tiny receive buffer.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    socket.listen(8).unwrap();
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop) = std::sync::mpsc::channel::<()>();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut chunk = [0u8; 1024];
        let _ = s.read(&mut chunk).unwrap(); // Auth
        let mut out = BytesMut::new();
        let ok = proto::AuthOk {
            heartbeat_min_ms: 100,
            heartbeat_max_ms: 10_000,
            heartbeat_ms: 10_000,
            ..Default::default()
        };
        Frame::AuthOk(ok).encode_into(&mut out, Flags::default());
        s.write_all(&out).unwrap();
        let _ = stop.recv_timeout(WAIT);
    });
    let mut agent = agent_config("t".into(), &[addr.to_string()]);
    agent.client.response_timeout_ms = 1_000;
    let client = start_client(agent);
    wait_for(&client, "connected", connected);
    // Far more than the socket buffers hold.
    let body = Bytes::from(vec![7u8; 60_000]);
    for _ in 0..200 {
        client.request("chat", body.clone(), WAIT).unwrap();
    }
    let (ev, _) = wait_for(&client, "the link given up", |e| matches!(e, Event::Disconnected { .. }));
    assert!(
        matches!(&ev, Event::Disconnected { reason: Disconnect::Lost(why), .. } if why.contains("write blocked")),
        "{ev:?}"
    );
    drop(client);
    let _ = stop_tx.send(());
    peer.join().unwrap();
}
