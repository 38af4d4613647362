//! In-place upgrade (`longlink upgrade --pid`, SIGUSR2): a real node
//! process hands its listeners, client sockets, sessions and memory-store
//! timelines to a new process of the same binary. 5,000 clients on 2
//! shards with at-least-once and at-most-once pushes running, three
//! upgrades in a row: nobody is disconnected, no stored message is lost.
//! And the ways it can fail: an incompatible hand-over is refused, a new
//! binary that does not start or dies after the hand-over began leaves the
//! old process serving.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use longlink::backend::PushClient;
use longlink::client::{ClientEvent, ClientOptions, Connection};
use longlink::config::Config;
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::proto::{self, PushStatus};

/// A `longlink serve` process with extra environment, killed on drop (by
/// pid: after an upgrade the serving process is not our child).
struct Node {
    child: std::process::Child,
    /// The process serving now (the child, or the one an upgrade started).
    pid: u32,
    client_addr: SocketAddr,
    push_addr: SocketAddr,
    admin_addr: SocketAddr,
    _dir: TempDir,
}

impl Node {
    fn start(cfg: &Config, env: &[(&str, &str)]) -> Node {
        use std::io::BufRead;
        let dir = TempDir::new("upgrade");
        let path = dir.0.join("longlink.toml");
        std::fs::write(&path, toml::to_string(cfg).expect("config serializes")).expect("write config");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"));
        cmd.args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", std::env::var("LONGLINK_TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn longlink");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = |prefix: &str| -> SocketAddr {
            let line = lines.next().expect("node prints its addresses").expect("read stdout");
            line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {line:?}")).parse().expect("addr")
        };
        let (client_addr, push_addr, admin_addr) = (addr("listening "), addr("push "), addr("admin "));
        let pid = child.id();
        Node { child, pid, client_addr, push_addr, admin_addr, _dir: dir }
    }

    /// `longlink upgrade --pid`: the JSON outcome and whether it succeeded.
    fn upgrade(&mut self) -> (bool, serde_json::Value) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["upgrade", "--pid", &self.pid.to_string(), "--timeout-secs", "90"])
            .output()
            .expect("run longlink upgrade");
        let text = String::from_utf8_lossy(&out.stdout);
        let outcome: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        if out.status.success() {
            let new_pid = outcome["new_pid"].as_u64().expect("new pid") as u32;
            assert_ne!(new_pid, self.pid);
            self.pid = new_pid;
        }
        (out.status.success(), outcome)
    }

    fn alive(&self) -> bool {
        process_alive(self.pid)
    }

    /// Open fds and resident bytes of the serving process.
    fn footprint(&self) -> (usize, u64) {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, |d| d.count());
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        (fds, rss)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of the node this test started.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z" && s != "X")
}

fn config() -> Config {
    let mut cfg = test_config(2);
    // The test runs for a while: no session may time out for silence.
    cfg.session.heartbeat_default_ms = 120_000;
    cfg.session.heartbeat_max_ms = 120_000;
    cfg.session.auth_timeout_ms = 30_000;
    cfg
}

/// Sessions the node counts (`longlink_connections` over the shards).
fn sessions(admin: SocketAddr) -> Option<u64> {
    let (status, body) = http(admin, "GET", "/metrics");
    (status == 200).then(|| {
        body.lines()
            .filter(|l| l.starts_with("longlink_connections{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    })
}

/// What the clients saw, shared with the test thread.
#[derive(Default)]
struct Seen {
    connected: AtomicU64,
    /// Sessions that ended (the node closed them, or the socket failed).
    disconnects: AtomicU64,
    at_least_once: Mutex<HashSet<u64>>,
    at_most_once: Mutex<HashSet<u64>>,
}

fn device(i: usize) -> String {
    format!("d{i}")
}

/// `count` clients from `first` on one thread, recording every message
/// until `stop`.
fn clients(
    addr: SocketAddr,
    cfg: Config,
    first: usize,
    count: usize,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        run(async move {
            // A bounded number of handshakes at a time (a debug build on a
            // busy box).
            let handshakes = std::rc::Rc::new(glommio::sync::Semaphore::new(64));
            let tasks: Vec<_> = (first..first + count)
                .map(|i| {
                    let opts = ClientOptions::new(token(&cfg, &format!("u{i}"), &device(i)));
                    let (seen, stop, handshakes) = (seen.clone(), stop.clone(), handshakes.clone());
                    glommio::spawn_local(async move {
                        let _ = handshakes.acquire(1).await;
                        let mut conn = Connection::connect(addr, opts).await.expect("client authenticates").0;
                        handshakes.signal(1);
                        seen.connected.fetch_add(1, Ordering::Relaxed);
                        let watch = async {
                            loop {
                                match conn.next_event().await {
                                    Ok(ClientEvent::Message(m)) => {
                                        let text = String::from_utf8_lossy(&m.payload).into_owned();
                                        let (set, n) = match text.split_at(1) {
                                            ("L", n) => (&seen.at_least_once, n),
                                            (_, n) => (&seen.at_most_once, n),
                                        };
                                        set.lock().unwrap().insert(n.parse().expect("payload number"));
                                    }
                                    Ok(_) => {}
                                    Err(_) => {
                                        seen.disconnects.fetch_add(1, Ordering::Relaxed);
                                        return;
                                    }
                                }
                            }
                        };
                        let until_stop = async {
                            while !stop.load(Ordering::Relaxed) {
                                glommio::timer::sleep(Duration::from_millis(50)).await;
                            }
                        };
                        futures_lite::future::or(watch, until_stop).await;
                    })
                })
                .collect();
            for t in tasks {
                t.await;
            }
        })
    })
}

fn push_client(addr: SocketAddr) -> Option<PushClient> {
    let mut c = PushClient::connect(addr, Duration::from_secs(5), &push_key()).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    Some(c)
}

/// Pushes to random devices until `stop` (at most `limit` pushes), one
/// request at a time, reconnecting when the node closes the connection (it
/// does at each upgrade). Returns the numbers the node took: STORED for
/// at-least-once, DELIVERED for at-most-once.
fn publisher(
    addr: SocketAddr,
    clients: usize,
    reliable: bool,
    limit: u64,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(HashSet<u64>, u64)> {
    std::thread::spawn(move || {
        let mut taken = HashSet::new();
        let mut refused = 0u64;
        let mut push = None;
        let mut x: u64 = if reliable { 0x9e37_79b9 } else { 0x7f4a_7c15 };
        for n in 0..limit {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let target = [device((x % clients as u64) as usize)];
            let payload = Bytes::from(format!("{}{n}", if reliable { "L" } else { "M" }));
            let deadline = Instant::now() + Duration::from_secs(60);
            while push.is_none() && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                push = push_client(addr);
                if push.is_none() {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let Some(client) = push.as_mut() else { break };
            let reply = match reliable {
                true => client.push_devices_at_least_once(&target, payload),
                false => client.push_devices(&target, payload),
            };
            match reply {
                Ok(r) => {
                    let status = r.results.first().map(|t| t.status).unwrap_or_default();
                    let want = if reliable { PushStatus::Stored } else { PushStatus::Delivered };
                    if status == want as i32 {
                        taken.insert(n);
                        accepted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        refused += 1;
                    }
                }
                // Refused while the node hands over (UNAVAILABLE), or the
                // connection closed at the hand-over: reconnect, go on.
                Err(_) => {
                    refused += 1;
                    push = None;
                }
            }
            // Pacing, not synchronisation: a steady stream, not a flood.
            std::thread::sleep(Duration::from_millis(1));
        }
        (taken, refused)
    })
}

#[test]
fn three_upgrades_in_a_row_keep_every_client_and_every_at_least_once_message() {
    const CLIENTS: usize = 5_000;
    const THREADS: usize = 4;
    let cfg = config();
    let mut node = Node::start(&cfg, &[]);
    let first_pid = node.pid;
    let seen = Arc::new(Seen::default());
    let stop_clients = Arc::new(AtomicBool::new(false));
    let per = CLIENTS / THREADS;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| clients(node.client_addr, cfg.clone(), t * per, per, seen.clone(), stop_clients.clone()))
        .collect();
    assert!(
        wait_until(Duration::from_secs(90), || seen.connected.load(Ordering::Relaxed) as usize == CLIENTS),
        "only {} of {CLIENTS} clients connected",
        seen.connected.load(Ordering::Relaxed)
    );
    assert!(wait_until(Duration::from_secs(10), || sessions(node.admin_addr) == Some(CLIENTS as u64)));

    let stop_pushes = Arc::new(AtomicBool::new(false));
    let (stored, delivered) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reliable = publisher(node.push_addr, CLIENTS, true, 200_000, stored.clone(), stop_pushes.clone());
    let unreliable = publisher(node.push_addr, CLIENTS, false, 200_000, delivered.clone(), stop_pushes.clone());
    // Pushes flow before each upgrade and through each new process.
    let flowing = |stored: &AtomicU64, delivered: &AtomicU64| {
        let (s0, d0) = (stored.load(Ordering::Relaxed), delivered.load(Ordering::Relaxed));
        wait_until(Duration::from_secs(60), || {
            stored.load(Ordering::Relaxed) >= s0 + 200 && delivered.load(Ordering::Relaxed) >= d0 + 200
        })
    };
    assert!(flowing(&stored, &delivered), "pushes flow before the first upgrade");
    let mut pids = vec![node.pid];
    for round in 1..=3 {
        let old = node.pid;
        let started = Instant::now();
        let (ok, outcome) = node.upgrade();
        assert!(ok, "upgrade {round}: {outcome}");
        println!("upgrade {round}: {outcome} in {:?}", started.elapsed());
        assert!(wait_until(Duration::from_secs(10), || !process_alive(old)), "upgrade {round}: the old process exits");
        assert!(node.alive());
        pids.push(node.pid);
        assert!(flowing(&stored, &delivered), "upgrade {round}: pushes flow through the new process");
        assert_eq!(seen.disconnects.load(Ordering::Relaxed), 0, "upgrade {round}: no client disconnected");
    }
    let status = node.child.wait().expect("first process");
    assert!(status.success(), "the first process exits 0 after its hand-over: {status:?} (pid {first_pid})");

    stop_pushes.store(true, Ordering::Relaxed);
    let (stored_ids, refused_l) = reliable.join().expect("publisher");
    let (delivered_ids, refused_m) = unreliable.join().expect("publisher");
    // Every stored message arrives (resends included).
    let missing = |set: &Mutex<HashSet<u64>>, ids: &HashSet<u64>| {
        let got = set.lock().unwrap();
        ids.iter().filter(|n| !got.contains(n)).count()
    };
    wait_until(Duration::from_secs(60), || missing(&seen.at_least_once, &stored_ids) == 0);
    wait_until(Duration::from_secs(10), || missing(&seen.at_most_once, &delivered_ids) == 0);
    let lost_l = missing(&seen.at_least_once, &stored_ids);
    let lost_m = missing(&seen.at_most_once, &delivered_ids);
    println!(
        "pids {pids:?}; at-least-once: {} stored, {lost_l} lost, {refused_l} refused or cut (retryable); \
         at-most-once: {} delivered, {lost_m} lost, {refused_m} refused or cut",
        stored_ids.len(),
        delivered_ids.len()
    );
    assert_eq!(seen.disconnects.load(Ordering::Relaxed), 0, "no client was disconnected");
    assert_eq!(lost_l, 0, "every at-least-once message the node stored arrived");
    assert_eq!(sessions(node.admin_addr), Some(CLIENTS as u64), "the final process holds every session");

    // The final process against a fresh start with the same clients.
    let after = node.footprint();
    stop_clients.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }
    drop(node);
    let fresh_node = Node::start(&cfg, &[]);
    let fresh_seen = Arc::new(Seen::default());
    let stop_fresh = Arc::new(AtomicBool::new(false));
    let fresh_threads: Vec<_> = (0..THREADS)
        .map(|t| clients(fresh_node.client_addr, cfg.clone(), t * per, per, fresh_seen.clone(), stop_fresh.clone()))
        .collect();
    assert!(wait_until(Duration::from_secs(90), || fresh_seen.connected.load(Ordering::Relaxed) as usize == CLIENTS));
    assert!(wait_until(Duration::from_secs(10), || sessions(fresh_node.admin_addr) == Some(CLIENTS as u64)));
    let fresh = fresh_node.footprint();
    println!(
        "after three upgrades: {} fds, {} KiB resident; fresh start: {} fds, {} KiB resident",
        after.0,
        after.1 / 1024,
        fresh.0,
        fresh.1 / 1024
    );
    // Same sockets: every client, every listener, the executors' rings.
    assert!(after.0.abs_diff(fresh.0) <= 8, "fds: {} after upgrades, {} fresh", after.0, fresh.0);
    // Memory within a quarter of a fresh start's (allocator slack; the
    // pushes the final process served).
    assert!(after.1.abs_diff(fresh.1) <= fresh.1 / 4, "RSS: {} after upgrades, {} fresh", after.1, fresh.1);
    stop_fresh.store(true, Ordering::Relaxed);
    for t in fresh_threads {
        t.join().expect("client thread");
    }
}

/// One client that must stay connected and keep receiving through a
/// failed upgrade; then a new client must get in.
fn assert_serves_on(node: &Node, cfg: &Config) {
    let (addr, cfg) = (node.client_addr, cfg.clone());
    run(async move {
        let opts = ClientOptions::new(token(&cfg, "late", "late-dev"));
        let mut conn = Connection::connect(addr, opts).await.expect("a new client gets in").0;
        conn.ping().await.expect("ping");
        loop {
            match conn.next_event().await.expect("pong") {
                ClientEvent::Pong { .. } => break,
                _ => continue,
            }
        }
    });
}

/// A client connected before the upgrade attempt; it pushes and checks
/// delivery after it.
fn failed_upgrade_leaves_the_old_process_serving(env: &[(&str, &str)], expect: &str) {
    let cfg = config();
    let mut node = Node::start(&cfg, env);
    let old = node.pid;
    let (addr, push_addr, cfg2) = (node.client_addr, node.push_addr, cfg.clone());
    let connected = Arc::new(AtomicBool::new(false));
    let go = Arc::new(AtomicBool::new(false));
    let client = {
        let (connected, go) = (connected.clone(), go.clone());
        std::thread::spawn(move || {
            run(async move {
                let opts = ClientOptions::new(token(&cfg2, "u", "survivor"));
                let mut conn = Connection::connect(addr, opts).await.expect("client authenticates").0;
                connected.store(true, Ordering::Relaxed);
                // Pings all along, so that some arrive while the node is
                // frozen for the hand-over: they are answered once it
                // resumes.
                let pinging = async {
                    while !go.load(Ordering::Relaxed) {
                        conn.ping().await.expect("ping");
                        loop {
                            match conn.next_event().await.expect("the session stays up") {
                                ClientEvent::Pong { .. } => break,
                                _ => continue,
                            }
                        }
                        glommio::timer::sleep(Duration::from_millis(20)).await;
                    }
                };
                let limit = async {
                    glommio::timer::sleep(Duration::from_secs(60)).await;
                    panic!("a Ping went unanswered for 60 s");
                };
                futures_lite::future::or(pinging, limit).await;
                // The same session still works: it is read (a Ping is
                // answered) and a message after the failed attempt arrives.
                let work = async {
                    conn.ping().await.expect("ping");
                    let (mut pong, mut message) = (false, None);
                    while !pong || message.is_none() {
                        match conn.next_event().await.expect("the session stays up") {
                            ClientEvent::Pong { .. } => pong = true,
                            ClientEvent::Message(m) => message = Some(m.payload),
                            _ => {}
                        }
                    }
                    message.unwrap_or_default()
                };
                let limit = async {
                    glommio::timer::sleep(Duration::from_secs(30)).await;
                    panic!("the session did not answer within 30 s of the failed upgrade");
                };
                futures_lite::future::or(work, limit).await
            })
        })
    };
    assert!(wait_until(Duration::from_secs(30), || connected.load(Ordering::Relaxed)));
    let (ok, outcome) = node.upgrade();
    println!("outcome: {outcome}");
    assert!(!ok, "the upgrade must fail: {outcome}");
    assert_eq!(outcome["ok"], false);
    let error = outcome["error"].as_str().unwrap_or_default();
    assert!(error.contains(expect), "error {error:?} names {expect:?}");
    assert_eq!(node.pid, old);
    assert!(node.alive(), "the old process serves on");
    go.store(true, Ordering::Relaxed);
    let mut push = push_client(push_addr).expect("the push port still answers");
    let reply = push.push_devices_at_least_once(&["survivor"], Bytes::from_static(b"after")).expect("push");
    assert_eq!(reply.results[0].status, PushStatus::Stored as i32, "{reply:?}");
    assert_eq!(&client.join().expect("client")[..], b"after");
    assert_serves_on(&node, &cfg);
}

#[test]
fn an_incompatible_hand_over_is_refused_and_the_old_process_serves_on() {
    failed_upgrade_leaves_the_old_process_serving(&[("LONGLINK_UPGRADE_TEST_FORMAT", "999")], "format 999");
}

#[test]
fn a_new_binary_that_exits_at_once_leaves_the_old_process_serving() {
    failed_upgrade_leaves_the_old_process_serving(&[("LONGLINK_UPGRADE_EXE", "/bin/false")], "exited (exit status: 1)");
}

#[test]
fn a_new_process_that_dies_after_the_hand_over_began_leaves_the_old_process_serving() {
    // The old process froze its shards and sent everything; the new one
    // exits 1 before it serves: the old one resumes every session.
    failed_upgrade_leaves_the_old_process_serving(
        &[("LONGLINK_UPGRADE_TEST_FAIL", "after-state")],
        "exited (exit status: 1)",
    );
}

/// A blocking WebSocket client, just enough for one session.
struct WsClient {
    s: std::net::TcpStream,
    /// Bytes read and not yet parsed as WebSocket frames.
    raw: Vec<u8>,
    /// Payload of binary messages: longlink frames.
    frames: Vec<u8>,
}

impl WsClient {
    fn open(addr: SocketAddr) -> WsClient {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect ws");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let req = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: longlink.v1\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = s.read(&mut chunk).expect("read the 101");
            assert!(n > 0, "closed before the 101");
            raw.extend_from_slice(&chunk[..n]);
        };
        assert!(raw.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&raw[..end]));
        WsClient { s, raw: raw[end..].to_vec(), frames: Vec::new() }
    }

    fn send(&mut self, frame: &Frame) {
        use std::io::Write;
        let payload = frame.to_bytes();
        let mut out = vec![0x82];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.s.write_all(&out).unwrap();
    }

    fn recv(&mut self) -> Frame {
        use std::io::Read;
        loop {
            if let Ok(Some((h, body))) = codec::split_frame(&self.frames, codec::DEFAULT_MAX_BODY) {
                let frame = Frame::decode(h, body).expect("server frame");
                self.frames.drain(..h.frame_len());
                return frame;
            }
            // One server frame (never masked) if it is all here.
            if self.raw.len() >= 2 {
                let (opcode, len7) = (self.raw[0] & 0x0f, usize::from(self.raw[1] & 0x7f));
                let (len, at) = match len7 {
                    126 if self.raw.len() >= 4 => (usize::from(u16::from_be_bytes([self.raw[2], self.raw[3]])), 4),
                    127 if self.raw.len() >= 10 => {
                        (u64::from_be_bytes(self.raw[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n, 2),
                };
                if len != usize::MAX && self.raw.len() >= at + len {
                    assert_ne!(opcode, 0x8, "the server closed the WebSocket");
                    if opcode == 0x2 || opcode == 0x0 {
                        self.frames.extend_from_slice(&self.raw[at..at + len]);
                    }
                    self.raw.drain(..at + len);
                    continue;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("read");
            assert!(n > 0, "the server closed the connection");
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }
}

fn auth(cfg: &Config, device: &str) -> Frame {
    Frame::Auth(proto::Auth {
        token: token(cfg, &format!("user-{device}"), device),
        client_version: "upgrade-test".into(),
        capabilities: proto::Capability::Ack as u32,
        ..Default::default()
    })
}

fn recv_plain(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Frame {
    read_frame_blocking(s, buf).expect("the session stays open")
}

#[test]
fn a_half_sent_frame_a_session_before_auth_and_a_websocket_session_survive_an_upgrade() {
    use std::io::Write;
    let mut cfg = config();
    let ws_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    cfg.server.ws_listen = format!("127.0.0.1:{ws_port}");
    let mut node = Node::start(&cfg, &[]);
    let ws_addr: SocketAddr = ([127, 0, 0, 1], ws_port).into();

    // Active, with half a Ping frame sent before the upgrade.
    let mut half = std::net::TcpStream::connect(node.client_addr).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut half_buf = Vec::new();
    half.write_all(&auth(&cfg, "half").to_bytes()).unwrap();
    assert!(matches!(recv_plain(&mut half, &mut half_buf), Frame::AuthOk(_)));
    let ping = Frame::Ping.to_bytes();
    half.write_all(&ping[..3]).unwrap();
    // Connected, no Auth yet.
    let mut early = std::net::TcpStream::connect(node.client_addr).unwrap();
    early.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Over WebSocket.
    let mut ws = WsClient::open(ws_addr);
    ws.send(&auth(&cfg, "ws"));
    assert!(matches!(ws.recv(), Frame::AuthOk(_)));
    // Every session is on the node before it is handed over.
    assert!(wait_until(Duration::from_secs(10), || sessions(node.admin_addr) == Some(2)));

    let (ok, outcome) = node.upgrade();
    assert!(ok, "{outcome}");

    half.write_all(&ping[3..]).unwrap();
    assert!(matches!(recv_plain(&mut half, &mut half_buf), Frame::Pong), "the Ping completed across the upgrade");
    let mut early_buf = Vec::new();
    early.write_all(&auth(&cfg, "early").to_bytes()).unwrap();
    assert!(matches!(recv_plain(&mut early, &mut early_buf), Frame::AuthOk(_)), "auth after the upgrade");
    ws.send(&Frame::Ping);
    assert!(matches!(ws.recv(), Frame::Pong), "the WebSocket session answers");
    let mut push = push_client(node.push_addr).expect("push port of the new process");
    let reply = push.push_devices_at_least_once(&["ws"], Bytes::from_static(b"to-ws")).expect("push");
    assert_eq!(reply.results[0].status, PushStatus::Stored as i32, "{reply:?}");
    match ws.recv() {
        Frame::Message(m) => assert_eq!(&m.payload[..], b"to-ws"),
        other => panic!("expected the message, got {other:?}"),
    }
    assert_eq!(sessions(node.admin_addr), Some(3));
}

#[test]
fn an_unacknowledged_at_least_once_message_is_sent_again_by_the_new_process() {
    use std::io::Write;
    let cfg = config();
    let mut node = Node::start(&cfg, &[]);
    let mut s = std::net::TcpStream::connect(node.client_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    s.write_all(&auth(&cfg, "slow").to_bytes()).unwrap();
    assert!(matches!(recv_plain(&mut s, &mut buf), Frame::AuthOk(_)));
    // Stored and sent, never acknowledged: it lives in the old process's
    // memory store and in the session's window.
    let mut push = push_client(node.push_addr).expect("push port");
    let reply = push.push_devices_at_least_once(&["slow"], Bytes::from_static(b"first")).expect("push");
    assert_eq!(reply.results[0].status, PushStatus::Stored as i32, "{reply:?}");
    let first = match recv_plain(&mut s, &mut buf) {
        Frame::Message(m) => m,
        other => panic!("expected the message, got {other:?}"),
    };
    assert_eq!(&first.payload[..], b"first");
    drop(push);

    let (ok, outcome) = node.upgrade();
    assert!(ok, "{outcome}");

    // The new process has the timeline and the window's state: it sends
    // the unacknowledged message again, same sequence, then new ones after it.
    let again = match recv_plain(&mut s, &mut buf) {
        Frame::Message(m) => m,
        other => panic!("expected the message again, got {other:?}"),
    };
    assert_eq!((again.seq, &again.payload[..]), (first.seq, &b"first"[..]));
    s.write_all(&Frame::Ack(proto::Ack { seq: first.seq }).to_bytes()).unwrap();
    let mut push = push_client(node.push_addr).expect("push port of the new process");
    let reply = push.push_devices_at_least_once(&["slow"], Bytes::from_static(b"second")).expect("push");
    assert_eq!(reply.results[0].status, PushStatus::Stored as i32, "{reply:?}");
    match recv_plain(&mut s, &mut buf) {
        Frame::Message(m) => assert_eq!((m.seq, &m.payload[..]), (first.seq + 1, &b"second"[..])),
        other => panic!("expected the next message, got {other:?}"),
    }
}

#[test]
fn a_revocation_outlives_an_upgrade() {
    use longlink::protocol::codes::from_wire;
    use longlink::protocol::proto::ErrorCode;
    use longlink::protocol::token::now_unix_secs;
    use std::io::Write;
    let mut cfg = config();
    cfg.push_auth.keys[0].rights.push("revoke".into());
    let mut node = Node::start(&cfg, &[]);
    let now = now_unix_secs();
    let old = keyring(&cfg).mint("alice", "phone", "test", now - 5, now + 600);
    let mut push = push_client(node.push_addr).expect("push port");
    push.revoke(&["phone"], &[], "lost phone").expect("revoke");
    drop(push);

    let (ok, outcome) = node.upgrade();
    assert!(ok, "{outcome}");

    // The new process took the old one's revocations: the token stays refused.
    let mut s = std::net::TcpStream::connect(node.client_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&Frame::Auth(proto::Auth { token: old, ..Default::default() }).to_bytes()).unwrap();
    let mut buf = Vec::new();
    match recv_plain(&mut s, &mut buf) {
        Frame::Error(e) => assert_eq!(from_wire(e.code), ErrorCode::Revoked, "{e:?}"),
        other => panic!("expected REVOKED, got {other:?}"),
    }
}

#[test]
fn a_token_still_expires_after_an_upgrade() {
    use longlink::protocol::codes::from_wire;
    use longlink::protocol::proto::ErrorCode;
    use longlink::protocol::token::now_unix_secs;
    use std::io::Write;
    let mut cfg = config();
    cfg.auth.clock_leeway_secs = 0;
    let mut node = Node::start(&cfg, &[]);
    let now = now_unix_secs();
    let short = keyring(&cfg).mint("u", "short", "test", now - 1, now + 3);
    let mut s = std::net::TcpStream::connect(node.client_addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    s.write_all(&Frame::Auth(proto::Auth { token: short, ..Default::default() }).to_bytes()).unwrap();
    let expires_ms = match recv_plain(&mut s, &mut buf) {
        Frame::AuthOk(ok) => ok.token_expires_ms,
        other => panic!("expected AuthOk, got {other:?}"),
    };

    let (ok, outcome) = node.upgrade();
    assert!(ok, "{outcome}");

    // The new process knows the session's token expiry: it closes the
    // session when it passes (without it the session would live on).
    match recv_plain(&mut s, &mut buf) {
        Frame::Error(e) => assert_eq!(from_wire(e.code), ErrorCode::TokenExpired, "{e:?}"),
        other => panic!("expected TOKEN_EXPIRED, got {other:?}"),
    }
    assert!(now_unix_secs() * 1000 >= expires_ms as i64, "not before the expiry");
}
