//! Cluster mode with a real redis-server and several real `longlink serve
//! --redis` processes: cross-node pushes, kill -9, drain, a stale node,
//! Redis restarts, the dispatcher and admin HTTP.

mod common;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use longlink::backend::PushClient;
use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::config::Config;
use longlink::protocol::proto::{ErrorCode, PushStatus};

/// A `longlink serve` process in cluster mode, killed on drop.
struct Node {
    proc: NodeProcess,
    client: SocketAddr,
    push: SocketAddr,
    admin: SocketAddr,
    cfg: Config,
}

fn node_config(redis: &RedisServer, name: &str, index: u16) -> Config {
    let mut cfg = trusted(test_config(2));
    cfg.node_name = name.into();
    cfg.delivery.redis_url = redis.url();
    cfg.delivery.node_index = index;
    cfg.delivery.retry_base_ms = 300;
    cfg.cluster.enabled = true;
    // Short enough for the tests that wait for a lease to end, long enough
    // that a loaded box (thousands of clients, debug builds) renews in time.
    cfg.cluster.lease_ms = 3_000;
    cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    cfg.cluster.forward_timeout_ms = 2_000;
    // Requests of thousands of targets on a loaded box (debug builds) may
    // take seconds; the tests of the deadline set their own.
    cfg.push.reply_timeout_ms = 20_000;
    cfg.cluster.drain_deadline_ms = 30_000;
    cfg.cluster.drain_rate_per_sec = 5_000;
    cfg.session.heartbeat_default_ms = 30_000;
    cfg.session.close_linger_ms = 300;
    // Thousands of clients connect at once in the drain test.
    cfg.session.auth_timeout_ms = 10_000;
    cfg
}

impl Node {
    fn start(cfg: Config) -> Node {
        let proc = NodeProcess::start(&cfg);
        let (client, push) = (proc.client_addr, proc.push_addr);
        let admin = proc.admin_addr.expect("a cluster node prints its admin address");
        Node { proc, client, push, admin, cfg }
    }

    fn pusher(&self) -> PushClient {
        let mut p = PushClient::connect(self.push, Duration::from_secs(5), &push_key()).expect("push port");
        p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        p
    }

    /// A connection to the node listener, as another node opens one.
    fn node_link(&self) -> PushClient {
        let addr = self.proc.node_addr.expect("a cluster node prints its node listener");
        let mut p = PushClient::connect(addr, Duration::from_secs(5), &cluster_key()).expect("node listener");
        p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        p
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.proc.child.id() as i32, sig) };
    }

    /// Waits for the process to exit; its status.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn metric(&self, name: &str) -> u64 {
        let (_, body) = http(self.admin, "GET", "/metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// One HTTP/1.1 request; the status and body.
fn redis_conn(redis: &RedisServer) -> redis::Connection {
    let client = redis::Client::open(redis.url()).unwrap();
    // A signal may interrupt the connect (EINTR): try again.
    for _ in 0..50 {
        if let Ok(conn) = client.get_connection_with_timeout(Duration::from_secs(2)) {
            return conn;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    client.get_connection_with_timeout(Duration::from_secs(2)).expect("redis connection")
}

/// The node a device's route names in Redis (raw, valid or not).
fn route_node(conn: &mut redis::Connection, device: &str) -> Option<String> {
    redis::cmd("HGET").arg(format!("ll:route:{{{device}}}")).arg("node").query(conn).ok().flatten()
}

fn route_epoch(conn: &mut redis::Connection, device: &str) -> Option<u64> {
    redis::cmd("HGET").arg(format!("ll:route:{{{device}}}")).arg("epoch").query(conn).ok().flatten()
}

fn wait_routes(redis: &RedisServer, devices: &[(&str, &str)]) {
    let mut conn = redis_conn(redis);
    let ok = wait_until(Duration::from_secs(10), || {
        devices.iter().all(|(d, node)| route_node(&mut conn, d).as_deref() == Some(*node))
    });
    assert!(ok, "routes did not appear: {devices:?}");
}

fn status(code: i32) -> PushStatus {
    PushStatus::try_from(code).unwrap_or(PushStatus::Unspecified)
}

fn opts(cfg: &Config, user: &str, device: &str) -> ClientOptions {
    ClientOptions::new(token(cfg, user, device))
}

async fn connect(addr: SocketAddr, cfg: &Config, user: &str, device: &str) -> Connection {
    Connection::connect(addr, opts(cfg, user, device)).await.expect("client authenticates").0
}

#[test]
fn three_nodes_unicast_user_fan_out_group_and_broadcast() {
    let redis = RedisServer::start();
    let nodes: Vec<Node> =
        ["a", "b", "c"].iter().zip(0..).map(|(n, i)| Node::start(node_config(&redis, n, i))).collect();
    let cfg = nodes[0].cfg.clone();
    run(async {
        // One device per node, and user "alice" with a device on each node.
        let mut devs = Vec::new();
        let mut alice = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            devs.push(connect(n.client, &cfg, &format!("u{i}"), &format!("dev-{i}")).await);
            alice.push(connect(n.client, &cfg, "alice", &format!("alice-{i}")).await);
        }
        wait_routes(&redis, &[("dev-0", "a"), ("dev-1", "b"), ("dev-2", "c"), ("alice-0", "a"), ("alice-2", "c")]);

        // Unicast through node a: two of the devices live elsewhere.
        let mut push = nodes[0].pusher();
        let reply = push.push_devices(&["dev-1", "dev-2", "dev-0", "nobody"], Bytes::from_static(b"uni")).unwrap();
        let got: Vec<_> = reply.results.iter().map(|r| (r.target.as_str(), status(r.status), r.sessions)).collect();
        assert_eq!(
            got,
            [
                ("dev-1", PushStatus::Delivered, 1),
                ("dev-2", PushStatus::Delivered, 1),
                ("dev-0", PushStatus::Delivered, 1),
                ("nobody", PushStatus::NotOnline, 0)
            ]
        );
        assert_eq!((reply.delivered, reply.not_online), (3, 1));
        for d in &mut devs {
            assert_eq!(next_message(d).await.payload, Bytes::from_static(b"uni"));
        }

        // User fan-out through node b reaches alice on all three nodes.
        let mut push_b = nodes[1].pusher();
        let reply = push_b.push_users(&["alice", "bob"], Bytes::from_static(b"hi alice")).unwrap();
        assert_eq!((status(reply.results[0].status), reply.results[0].sessions), (PushStatus::Delivered, 3));
        assert_eq!(status(reply.results[1].status), PushStatus::NotOnline);
        for a in &mut alice {
            assert_eq!(next_message(a).await.payload, Bytes::from_static(b"hi alice"));
        }

        // At-least-once to a device on another node: stored, then delivered.
        let reply = push_b.push_devices_at_least_once(&["dev-2"], Bytes::from_static(b"sure")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Stored, "{reply:?}");
        let m = next_message(&mut devs[2]).await;
        assert_eq!((m.payload.as_ref(), m.seq), (&b"sure"[..], reply.results[0].seq));

        // Group: members join on their own nodes; pushed through node c.
        for d in &mut devs {
            d.join("room").await.unwrap();
            assert_nothing_queued(d).await;
        }
        let mut push_c = nodes[2].pusher();
        let reply = push_c.push_group("room", Bytes::from_static(b"to room")).unwrap();
        assert_eq!((status(reply.status), reply.delivered), (PushStatus::Delivered, 3));
        for d in &mut devs {
            assert_eq!(next_message(d).await.payload, Bytes::from_static(b"to room"));
        }
        for a in &mut alice {
            assert_nothing_queued(a).await;
        }

        // Presence through node b answers for the whole cluster.
        let p = push_b.presence(&["dev-0", "dev-2", "nobody"], &["alice"], &["room"]).unwrap();
        let online: Vec<bool> = p.devices.iter().map(|d| d.online).collect();
        assert_eq!(online, [true, true, false]);
        assert_eq!(p.users[0].devices.len(), 3);
        assert_eq!((p.groups[0].online, p.connections_total), (3, 6));

        // Broadcast through node a reaches all six sessions.
        let reply = push.broadcast(Bytes::from_static(b"all")).unwrap();
        assert_eq!((status(reply.status), reply.delivered), (PushStatus::Accepted, 6));
        for c in devs.iter_mut().chain(alice.iter_mut()) {
            assert_eq!(next_message(c).await.payload, Bytes::from_static(b"all"));
        }

        // A backend kick through node c ends the session on node a.
        let reply = push_c.kick_devices(&["dev-0"], ErrorCode::Kicked, "bye").unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered);
        let d0 = &mut devs[0];
        let end = loop {
            match d0.next_event().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(end, ClientError::Kicked { code: ErrorCode::Kicked, .. }), "{end:?}");
    });
    assert!(nodes[0].metric("longlink_forwarded_total") >= 3);
    assert!(nodes[0].metric("longlink_push_results_total") >= 4);
    assert!(nodes[0].metric("longlink_frames_in_total") > 0 && nodes[0].metric("longlink_bytes_out_total") > 0);
}

async fn ended(conn: &mut Connection) -> ClientError {
    loop {
        match conn.next_event().await {
            Ok(_) => continue,
            Err(e) => break e,
        }
    }
}

/// Sends a kick the way a node forwards one for a replaced login.
fn forwarded_kick(push: &mut PushClient, device: &str, conn_id: u64) -> longlink::backend::Reply {
    let kick = longlink::protocol::proto::KickRequest {
        devices: vec![device.into()],
        code: ErrorCode::Replaced as i32,
        forwarded: true,
        conn_ids: vec![conn_id],
        ..Default::default()
    };
    push.send(longlink::backend::Request::Kick(kick)).unwrap();
    push.flush().unwrap();
    push.recv().unwrap()
}

#[test]
fn a_second_login_on_another_node_replaces_the_first() {
    let redis = RedisServer::start();
    let a = Node::start(node_config(&redis, "a", 0));
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    run(async {
        let (mut first, ok1) = Connection::connect(a.client, opts(&cfg, "u", "phone")).await.unwrap();
        wait_routes(&redis, &[("phone", "a")]);
        let mut second = connect(b.client, &cfg, "u", "phone").await;
        let end = ended(&mut first).await;
        assert!(matches!(end, ClientError::Kicked { code: ErrorCode::Replaced, .. }), "{end:?}");
        wait_routes(&redis, &[("phone", "b")]);
        // Back on node a: the session on b goes.
        let (mut third, ok3) = Connection::connect(a.client, opts(&cfg, "u", "phone")).await.unwrap();
        let end = ended(&mut second).await;
        assert!(matches!(end, ClientError::Kicked { code: ErrorCode::Replaced, .. }), "{end:?}");
        wait_routes(&redis, &[("phone", "a")]);
        // A late kick aimed at the first session leaves the third alone;
        // one aimed at the third ends it. Nodes send these to each other's
        // node listener.
        let mut push = a.node_link();
        forwarded_kick(&mut push, "phone", ok1.conn_id);
        assert_nothing_queued(&mut third).await;
        forwarded_kick(&mut push, "phone", ok3.conn_id);
        let end = ended(&mut third).await;
        assert!(matches!(end, ClientError::Kicked { code: ErrorCode::Replaced, .. }), "{end:?}");
    });
}

#[test]
fn dispatcher_and_admin_endpoints() {
    let redis = RedisServer::start();
    let nodes: Vec<Node> =
        ["a", "b", "c"].iter().zip(0..).map(|(n, i)| Node::start(node_config(&redis, n, i))).collect();
    let clients: Vec<String> = nodes.iter().map(|n| n.client.to_string()).collect();
    let dispatch = |addr| {
        let path = format!("/v1/dispatch?ticket={}&device=phone&platform=ios&net=wifi", ticket("alice"));
        let (code, body) = http(addr, "GET", &path);
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    // Every node lists the three nodes, in the same order for one user.
    for n in &nodes {
        assert!(wait_until(Duration::from_secs(5), || dispatch(n.admin)["endpoints"].as_array().unwrap().len() == 3));
    }
    let first = dispatch(nodes[0].admin);
    assert_eq!(dispatch(nodes[1].admin)["endpoints"], first["endpoints"]);
    for e in first["endpoints"].as_array().unwrap() {
        assert!(clients.contains(&e.as_str().unwrap().to_owned()), "{e}");
    }
    assert!(first["token"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(first["heartbeat"]["default_ms"], 30_000);

    // The token works on the first endpoint.
    let token = first["token"].as_str().unwrap().to_owned();
    let endpoint: SocketAddr = first["endpoints"][0].as_str().unwrap().parse().unwrap();
    run(async move {
        Connection::connect(endpoint, ClientOptions::new(token)).await.expect("dispatched token authenticates");
    });

    // The standalone dispatcher reads the same registry.
    let dir = TempDir::new("dispatcher");
    let path = dir.0.join("longlink.toml");
    std::fs::write(&path, toml::to_string(&nodes[0].cfg).unwrap()).unwrap();
    let mut standalone = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["dispatcher", "--listen", "127.0.0.1:0", "--redis", &redis.url(), "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = std::io::BufReader::new(standalone.stdout.take().unwrap()).lines().next().unwrap().unwrap();
    let standalone_addr: SocketAddr = line.strip_prefix("dispatcher ").unwrap().parse().unwrap();
    assert!(wait_until(Duration::from_secs(5), || dispatch(standalone_addr)["endpoints"] == first["endpoints"]));

    // Health, metrics, drain: a draining node leaves every list.
    assert_eq!(http(nodes[2].admin, "GET", "/healthz").0, 200);
    let (code, metrics) = http(nodes[2].admin, "GET", "/metrics");
    assert_eq!(code, 200);
    for family in [
        "longlink_connections{shard=\"0\"}",
        "longlink_disconnects_total{code=",
        "longlink_forward_latency_seconds_bucket",
        "longlink_frames_in_total{shard=",
        "longlink_bytes_out_total{shard=",
        "longlink_push_results_total{result=",
    ] {
        assert!(metrics.contains(family), "{family} missing from\n{metrics}");
    }
    assert_eq!(drain(nodes[2].admin).0, 202);
    assert_eq!(http(nodes[2].admin, "GET", "/healthz").0, 503);
    let c = nodes[2].client.to_string();
    for addr in [nodes[0].admin, standalone_addr] {
        assert!(wait_until(Duration::from_secs(5), || {
            let e = dispatch(addr)["endpoints"].as_array().unwrap().clone();
            e.len() == 2 && !e.iter().any(|x| x.as_str() == Some(c.as_str()))
        }));
    }
    let _ = standalone.kill();
    let _ = standalone.wait();
}

/// [`wait_until`] that lets the executor's other tasks run meanwhile.
async fn wait_async(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// What one drifting client saw.
#[derive(Default, Debug)]
struct Track {
    seqs: Vec<u64>,
    order_violations: u64,
    resyncs: u64,
    /// Sessions after the first (drift or GoAway).
    reconnects: u64,
    /// Where it is connected now.
    at: Option<SocketAddr>,
    go_aways: u64,
}

/// A client that resumes from its last sequence on another endpoint when
/// its node fails (drift over `endpoints`) or tells it to go (GoAway).
/// Runs until `done` says so; returns its connection (still open).
async fn drifting_client(
    endpoints: Vec<SocketAddr>,
    opts: ClientOptions,
    track: Rc<RefCell<Track>>,
    done: Rc<dyn Fn(&Track) -> bool>,
    since: Arc<OnceLock<Instant>>,
) -> Option<Connection> {
    let mut idx = 0;
    let mut next: Option<SocketAddr> = None;
    let mut first = true;
    // The 120 s budget runs from the disruption (`since`, set once by the
    // test), not from spawn: on a loaded box connecting 5,000 clients and
    // the first push round can take most of it, and a client that gave up
    // before its node was drained would never move.
    let expired = || since.get().is_some_and(|t| t.elapsed() >= Duration::from_secs(120));
    while !done(&track.borrow()) && !expired() {
        let addr = next.take().unwrap_or(endpoints[idx % endpoints.len()]);
        let mut o = opts.clone();
        o.last_seq = track.borrow().seqs.last().copied().unwrap_or(0);
        let Ok((mut conn, _)) = Connection::connect(addr, o).await else {
            idx += 1;
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !first {
            track.borrow_mut().reconnects += 1;
        }
        first = false;
        track.borrow_mut().at = Some(addr);
        loop {
            // At the deadline the client stops waiting: a message that never
            // came shows as lost in the test's checks instead of a hang.
            if done(&track.borrow()) || expired() {
                return Some(conn);
            }
            let event = futures_lite::future::or(async { Some(conn.next_event().await) }, async {
                glommio::timer::sleep(Duration::from_millis(200)).await;
                None
            })
            .await;
            match event {
                None => {}
                Some(Ok(ClientEvent::Message(m))) => {
                    let mut t = track.borrow_mut();
                    if t.seqs.last().is_some_and(|&last| m.seq <= last) {
                        t.order_violations += 1;
                    }
                    t.seqs.push(m.seq);
                }
                Some(Ok(ClientEvent::ResyncRequired { .. })) => track.borrow_mut().resyncs += 1,
                Some(Ok(ClientEvent::GoAway { endpoint, .. })) => {
                    track.borrow_mut().go_aways += 1;
                    next = endpoint.parse().ok();
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => {
                    if next.is_none() {
                        idx += 1;
                    }
                    break;
                }
            }
        }
    }
    None
}

/// Stored sequences per device, from at-least-once push replies.
type Stored = Arc<Mutex<HashMap<String, Vec<u64>>>>;

/// Pushes one at-least-once message to each of `devices` through `push`,
/// retrying targets rejected as retryable; records the stored sequences.
fn push_reliably(push: &mut PushClient, devices: &[String], payload: &str, stored: &Stored) {
    let mut left: Vec<String> = devices.to_vec();
    let mut reason = String::new();
    // Bounded in time, not in tries: while a node drains on a loaded box a
    // forward may time out (retryable) for a while.
    let until = Instant::now() + Duration::from_secs(90);
    while Instant::now() < until {
        if left.is_empty() {
            return;
        }
        let mut retry = Vec::new();
        // In requests of a few hundred targets, as a backend sends them: a
        // forward of thousands to a draining node on a loaded box (debug
        // builds) can outlast the forward deadline every time.
        for chunk in left.chunks(500) {
            let reply = push.push_devices_at_least_once(chunk, Bytes::copy_from_slice(payload.as_bytes())).unwrap();
            for r in reply.results {
                match status(r.status) {
                    PushStatus::Stored => stored.lock().unwrap().entry(r.target).or_default().push(r.seq),
                    PushStatus::Rejected if r.retryable => {
                        reason = r.reason;
                        retry.push(r.target)
                    }
                    other => panic!("{} not stored: {other:?} {}", r.target, r.reason),
                }
            }
        }
        left = retry;
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("could not store for {} devices (last reason: {reason}), e.g. {:?}", left.len(), &left[..left.len().min(5)]);
}

/// lost = stored and never received; order violations as counted.
fn losses(stored: &Stored, tracks: &HashMap<String, Rc<RefCell<Track>>>) -> (u64, u64, u64) {
    let stored = stored.lock().unwrap();
    let (mut lost, mut order, mut resyncs) = (0, 0, 0);
    for (device, track) in tracks {
        let t = track.borrow();
        let got: std::collections::HashSet<u64> = t.seqs.iter().copied().collect();
        lost += stored.get(device).map_or(0, |s| s.iter().filter(|q| !got.contains(q)).count() as u64);
        order += t.order_violations;
        resyncs += t.resyncs;
    }
    (lost, order, resyncs)
}

fn all_received(stored: &Stored, device: &str, t: &Track) -> bool {
    let stored = stored.lock().unwrap();
    stored.get(device).is_some_and(|s| s.iter().all(|q| t.seqs.contains(q)))
}

#[test]
fn kill_9_while_pushing_at_least_once_clients_drift_and_resume_without_loss() {
    let redis = RedisServer::start();
    let mut nodes: Vec<Node> =
        ["a", "b", "c"].iter().zip(0..).map(|(n, i)| Node::start(node_config(&redis, n, i))).collect();
    let cfg = nodes[0].cfg.clone();
    let endpoints: Vec<SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let devices: Vec<String> = (0..20).map(|i| format!("k9-{i}")).collect();
    let stored: Stored = Arc::default();
    let pushing_done = Arc::new(AtomicBool::new(false));
    let victim = nodes[0].proc.child.id() as i32;
    let push_addr = nodes[2].push;
    let tracks: HashMap<String, Rc<RefCell<Track>>> = devices.iter().map(|d| (d.clone(), Rc::default())).collect();
    let since: Arc<OnceLock<Instant>> = Arc::default();
    run(async {
        let mut tasks = Vec::new();
        for d in &devices {
            let (stored, done_flag) = (stored.clone(), pushing_done.clone());
            let device = d.clone();
            let done: Rc<dyn Fn(&Track) -> bool> =
                Rc::new(move |t| done_flag.load(Ordering::Relaxed) && all_received(&stored, &device, t));
            let o = opts(&cfg, &format!("user-{d}"), d);
            let client = drifting_client(endpoints.clone(), o, tracks[d].clone(), done, since.clone());
            tasks.push(glommio::spawn_local(client).detach());
        }
        let mut conn = redis_conn(&redis);
        let ready = wait_async(Duration::from_secs(10), || {
            devices.iter().all(|d| route_node(&mut conn, d).as_deref() == Some("a"))
        })
        .await;
        assert!(ready, "every device connects to node a first");
        // The pusher runs on its own thread (a blocking client) and kills
        // node a with SIGKILL in the middle.
        let (stored2, done2, devs, since2) = (stored.clone(), pushing_done.clone(), devices.clone(), since.clone());
        let pusher = std::thread::spawn(move || {
            let mut push = PushClient::connect(push_addr, Duration::from_secs(5), &push_key()).unwrap();
            push.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            for round in 0..30 {
                if round == 10 {
                    since2.get_or_init(Instant::now);
                    // SAFETY: kill(2) of our own child process.
                    unsafe { libc::kill(victim, libc::SIGKILL) };
                }
                push_reliably(&mut push, &devs, &format!("m{round}"), &stored2);
                std::thread::sleep(Duration::from_millis(20));
            }
            done2.store(true, Ordering::Relaxed);
        });
        while !pusher.is_finished() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        pusher.join().expect("pusher");
        for t in tasks {
            t.await;
        }
    });
    assert!(nodes[0].wait_exit(Duration::from_secs(5)).is_some());
    let (lost, order, resyncs) = losses(&stored, &tracks);
    let total: usize = stored.lock().unwrap().values().map(Vec::len).sum();
    assert_eq!(total, 20 * 30, "every push was stored");
    assert_eq!((lost, order, resyncs), (0, 0, 0), "lost, order violations, resyncs");
    for (d, t) in &tracks {
        let t = t.borrow();
        assert!(t.reconnects >= 1 && t.at != Some(endpoints[0]), "{d} drifted away from the dead node: {t:?}");
    }
}

#[test]
fn kill_9_of_the_node_pushes_are_forwarded_to_every_push_answered_and_the_lost_ones_retryable() {
    let redis = RedisServer::start();
    let mut a = Node::start(node_config(&redis, "a", 0));
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    let devices: Vec<String> = (0..10).map(|i| format!("fw-{i}")).collect();
    let victim = a.proc.child.id() as i32;
    let push_addr = b.push;
    let (results, elapsed) = run(async {
        let mut conns = Vec::new();
        for d in &devices {
            conns.push(connect(a.client, &cfg, &format!("user-{d}"), d).await);
        }
        let on_a: Vec<(&str, &str)> = devices.iter().map(|d| (d.as_str(), "a")).collect();
        wait_routes(&redis, &on_a);
        // A blocking backend on node b: every device lives on node a.
        let devs = devices.clone();
        let pusher = std::thread::spawn(move || {
            let mut push = PushClient::connect(push_addr, Duration::from_secs(5), &push_key()).unwrap();
            // Far above push.reply_timeout_ms: a request left unanswered
            // fails the test here.
            push.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut results = Vec::new();
            let mut slowest = Duration::ZERO;
            for round in 0..60 {
                if round == 5 {
                    // SAFETY: kill(2) of our own child process.
                    unsafe { libc::kill(victim, libc::SIGKILL) };
                }
                let started = Instant::now();
                let reply = push.push_devices(&devs, Bytes::from(format!("r{round}"))).expect("every push is answered");
                slowest = slowest.max(started.elapsed());
                results.extend(reply.results.into_iter().map(|r| (round, r)));
                std::thread::sleep(Duration::from_millis(20));
            }
            (results, slowest)
        });
        while !pusher.is_finished() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        drop(conns);
        pusher.join().expect("pusher")
    });
    assert!(a.wait_exit(Duration::from_secs(5)).is_some());
    let mut forwarded_lost = 0;
    for (round, r) in &results {
        match status(r.status) {
            PushStatus::Delivered => assert!(*round < 5, "delivered to a dead node: {r:?}"),
            // Forwarded to the dead node (its lease still running).
            PushStatus::Rejected => {
                assert!(r.retryable, "a push lost with its node is retryable: {r:?}");
                forwarded_lost += 1;
            }
            // Its lease ended: nobody holds the device.
            PushStatus::NotOnline => assert!(*round >= 5, "{r:?}"),
            other => panic!("unexpected {other:?}: {r:?}"),
        }
    }
    assert_eq!(results.len(), 60 * devices.len(), "one result per target and push");
    assert!(forwarded_lost > 0, "no push was forwarded to the dead node");
    println!("kill -9 while forwarding: {forwarded_lost} targets REJECTED retryable, slowest reply {elapsed:?}");
}

#[test]
fn a_router_that_does_not_answer_cannot_hold_a_cluster_push_past_the_reply_deadline() {
    let redis = RedisServer::start();
    let slow_redis = |name, index| {
        let mut cfg = node_config(&redis, name, index);
        // A stopped Redis would hold a route lookup for 30 s.
        cfg.delivery.redis_timeout_ms = 30_000;
        cfg.push.reply_timeout_ms = 3_000;
        cfg
    };
    let a = Node::start(slow_redis("a", 0));
    let b = Node::start(slow_redis("b", 1));
    let cfg = a.cfg.clone();
    let pause = |sig| {
        // SAFETY: kill(2) of our own redis-server child.
        unsafe { libc::kill(redis.pid() as i32, sig) };
    };
    run(async {
        let _phone = connect(a.client, &cfg, "u", "held-phone").await;
        wait_routes(&redis, &[("held-phone", "a")]);
        let mut push = b.pusher();
        push.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        pause(libc::SIGSTOP);
        let reply = push.push_devices(&["held-phone"], Bytes::from_static(b"held")).expect("answered in time");
        pause(libc::SIGCONT);
        let r = &reply.results[0];
        assert_eq!((status(r.status), r.retryable), (PushStatus::Rejected, true), "{reply:?}");
        assert!(r.reason.contains("did not answer within 3000 ms"), "{}", r.reason);
    });
    assert_eq!(b.metric("longlink_push_timeouts_total"), 1);
}

#[test]
fn a_node_killed_and_restarted_within_its_lease_takes_it_over_and_serves() {
    let redis = RedisServer::start();
    let mut long_lease = node_config(&redis, "a", 0);
    // Long enough that the restart surely comes before it ends.
    long_lease.cluster.lease_ms = 20_000;
    let mut a = Node::start(long_lease.clone());
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    let mut r = redis_conn(&redis);
    let incarnation = |r: &mut redis::Connection| -> Option<u64> {
        redis::cmd("HGET").arg("ll:node:a").arg("inc").query(r).ok().flatten()
    };
    run(async {
        let old = connect(a.client, &cfg, "u", "phoenix-phone").await;
        wait_routes(&redis, &[("phoenix-phone", "a")]);
        let first_run = incarnation(&mut r).expect("node a registered");
        a.signal(libc::SIGKILL);
        assert!(a.wait_exit(Duration::from_secs(5)).is_some());
        drop(old);
        assert_eq!(incarnation(&mut r), Some(first_run), "the dead run's lease is still running");
        // The same node, started again at once (as a supervisor would).
        let a = Node::start(long_lease);
        let healthy = wait_until(Duration::from_secs(10), || {
            let (code, body) = http(a.admin, "GET", "/healthz");
            code == 200 && body.contains("\"ok\"")
        });
        assert!(healthy, "the restarted node serves: {:?}", http(a.admin, "GET", "/healthz"));
        let second_run = incarnation(&mut r).expect("registered");
        assert_ne!(second_run, first_run, "a new incarnation holds the name");
        let (_, health) = http(a.admin, "GET", "/healthz");
        assert!(health.contains(&second_run.to_string()), "{health}");
        // Clients connect to it and receive pushes, directly and through b.
        let mut phone = connect(a.client, &cfg, "u", "phoenix-phone").await;
        let route_inc = |r: &mut redis::Connection| -> Option<u64> {
            redis::cmd("HGET").arg("ll:route:{phoenix-phone}").arg("inc").query(r).ok().flatten()
        };
        assert!(wait_until(Duration::from_secs(10), || route_inc(&mut r) == Some(second_run)), "route claimed anew");
        let reply = b.pusher().push_devices(&["phoenix-phone"], Bytes::from_static(b"via b")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered, "{reply:?}");
        assert_eq!(next_message(&mut phone).await.payload, Bytes::from_static(b"via b"));
        let reply = a.pusher().push_devices(&["phoenix-phone"], Bytes::from_static(b"direct")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered, "{reply:?}");
        assert_eq!(next_message(&mut phone).await.payload, Bytes::from_static(b"direct"));
        let mut a = a;
        assert!(a.proc.child.try_wait().unwrap().is_none(), "still running");
    });
}

#[test]
fn a_stale_node_cannot_overwrite_or_delete_newer_routes() {
    let redis = RedisServer::start();
    let mut short_lease = node_config(&redis, "a", 0);
    short_lease.cluster.lease_ms = 1_000;
    let mut a = Node::start(short_lease);
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    let mut r = redis_conn(&redis);
    run(async {
        let mut old = connect(a.client, &cfg, "u", "phone").await;
        wait_routes(&redis, &[("phone", "a")]);
        let old_epoch = route_epoch(&mut r, "phone").unwrap();
        // Node a stops (SIGSTOP) until its lease is gone.
        a.signal(libc::SIGSTOP);
        let gone = wait_until(Duration::from_secs(10), || {
            redis::cmd("EXISTS").arg("ll:node:a").query::<u64>(&mut r).unwrap() == 0
        });
        assert!(gone, "the lease of the stopped node expires");
        // The device logs in on b meanwhile.
        let mut new = connect(b.client, &cfg, "u", "phone").await;
        wait_routes(&redis, &[("phone", "b")]);
        let new_epoch = route_epoch(&mut r, "phone").unwrap();
        assert!(new_epoch > old_epoch);
        // Node a resumes: it finds its lease lapsed, fences itself, drains
        // its old session (whose release must not delete b's route) and exits.
        a.signal(libc::SIGCONT);
        let end = loop {
            match old.next_event().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(end, ClientError::Closed { code: ErrorCode::GoingAway, .. }), "{end:?}");
        let exit = a.wait_exit(Duration::from_secs(15));
        assert!(exit.is_some(), "the fenced node drains and exits");
        // Not a clean exit: a supervisor (Restart=on-failure) starts it again.
        assert_eq!(exit.and_then(|s| s.code()), Some(3), "a fenced node exits with status 3: {exit:?}");
        assert_eq!(route_node(&mut r, "phone").as_deref(), Some("b"));
        assert_eq!(route_epoch(&mut r, "phone"), Some(new_epoch));
        let mut push = b.pusher();
        let reply = push.push_devices(&["phone"], Bytes::from_static(b"still here")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered);
        assert_eq!(next_message(&mut new).await.payload, Bytes::from_static(b"still here"));
    });
}

#[test]
fn redis_restart_keeps_clients_connected_and_routes_come_back() {
    let redis = RedisServer::start();
    let port = redis.port;
    let a = Node::start(node_config(&redis, "a", 0));
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    run(async {
        let mut da = connect(a.client, &cfg, "ua", "da").await;
        let mut db = connect(b.client, &cfg, "ub", "db").await;
        wait_routes(&redis, &[("da", "a"), ("db", "b")]);
        let mut push = a.pusher();
        drop(redis);
        // Redis is gone: the device on this node is still reached, the one
        // on the other node gets a retryable error; nobody is disconnected.
        let reply = push.push_devices(&["da", "db"], Bytes::from_static(b"no redis")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered);
        assert_eq!(status(reply.results[1].status), PushStatus::Rejected);
        assert!(reply.results[1].retryable, "{}", reply.results[1].reason);
        assert_eq!(next_message(&mut da).await.payload, Bytes::from_static(b"no redis"));
        assert_nothing_queued(&mut db).await;
        // Redis returns empty: both nodes register again and re-assert.
        let redis = RedisServer::start_on(port);
        wait_routes(&redis, &[("da", "a"), ("db", "b")]);
        let reply = push.push_devices(&["db"], Bytes::from_static(b"back")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered, "{reply:?}");
        assert_eq!(next_message(&mut db).await.payload, Bytes::from_static(b"back"));
        assert_nothing_queued(&mut da).await;
        drop(redis);
    });
}

#[test]
fn draining_a_node_with_5000_clients_moves_them_all_without_loss() {
    const CLIENTS: usize = 5_000;
    let redis = RedisServer::start();
    let mut nodes: Vec<Node> =
        ["a", "b", "c"].iter().zip(0..).map(|(n, i)| Node::start(node_config(&redis, n, i))).collect();
    let cfg = nodes[0].cfg.clone();
    let endpoints: Vec<SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let drained = endpoints[0];
    let devices: Vec<String> = (0..CLIENTS).map(|i| format!("dr-{i}")).collect();
    let stored: Stored = Arc::default();
    let pushing_done = Arc::new(AtomicBool::new(false));
    let tracks: HashMap<String, Rc<RefCell<Track>>> = devices.iter().map(|d| (d.clone(), Rc::default())).collect();
    let push_addr = nodes[1].push;
    let victim = nodes[0].proc.child.id() as i32;
    let since: Arc<OnceLock<Instant>> = Arc::default();
    let (finished, checked) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(false)));
    run(async {
        let mut tasks = Vec::new();
        for d in &devices {
            let (stored, done_flag) = (stored.clone(), pushing_done.clone());
            let device = d.clone();
            let done: Rc<dyn Fn(&Track) -> bool> = Rc::new(move |t| {
                done_flag.load(Ordering::Relaxed) && t.at != Some(drained) && all_received(&stored, &device, t)
            });
            // Everyone starts on node a; GoAway says where to go.
            let o = opts(&cfg, &format!("user-{d}"), d);
            let client = drifting_client(endpoints.clone(), o, tracks[d].clone(), done, since.clone());
            let (finished, checked) = (finished.clone(), checked.clone());
            tasks.push(
                glommio::spawn_local(async move {
                    let mut conn = client.await;
                    finished.set(finished.get() + 1);
                    // Keep reading (and so heartbeating) until the test has
                    // read the routes: a session left unread while others
                    // finish would time out on its node and release its route.
                    while let Some(c) = conn.as_mut()
                        && !checked.get()
                    {
                        let read = futures_lite::future::or(async { Some(c.next_event().await) }, async {
                            glommio::timer::sleep(Duration::from_millis(200)).await;
                            None
                        });
                        if let Some(Err(_)) = read.await {
                            conn = None;
                        }
                    }
                    conn
                })
                .detach(),
            );
        }
        let a = &nodes[0];
        let claimed = wait_async(Duration::from_secs(60), || {
            a.metric("longlink_connections") == CLIENTS as u64
                && a.metric("longlink_route_claims_total") >= CLIENTS as u64
        })
        .await;
        assert!(claimed, "{CLIENTS} clients connect to node a and claim their routes");
        let (stored2, done2, devs, since2) = (stored.clone(), pushing_done.clone(), devices.clone(), since.clone());
        let pusher = std::thread::spawn(move || {
            let mut push = PushClient::connect(push_addr, Duration::from_secs(5), &push_key()).unwrap();
            push.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            push_reliably(&mut push, &devs, "before", &stored2);
            since2.get_or_init(Instant::now);
            // SAFETY: kill(2) of our own child process.
            unsafe { libc::kill(victim, libc::SIGTERM) };
            for round in 0..3 {
                push_reliably(&mut push, &devs, &format!("during {round}"), &stored2);
                std::thread::sleep(Duration::from_millis(200));
            }
            done2.store(true, Ordering::Relaxed);
        });
        while !pusher.is_finished() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        pusher.join().expect("pusher");
        // Each client finishes once it received everything on a node other
        // than a (or at its 120 s budget); it then keeps its session alive.
        while finished.get() < CLIENTS {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        // Losses first: a client still missing a message at its budget is
        // the likelier cause of any route check below failing.
        let (lost, order, resyncs) = losses(&stored, &tracks);
        assert_eq!(stored.lock().unwrap().values().map(Vec::len).sum::<usize>(), CLIENTS * 4);
        assert_eq!((lost, order, resyncs), (0, 0, 0), "lost, order violations, resyncs");
        let status = nodes[0].wait_exit(Duration::from_secs(60)).expect("the drained node exits");
        assert!(status.success(), "{status:?}");
        // Say which clients never moved, rather than "devices without a route".
        let moved = tracks.values().filter(|t| t.borrow().at.is_some_and(|at| at != drained)).count();
        assert_eq!(moved, CLIENTS, "every client moved");
        // Readiness: b and c have claimed the moved devices' routes.
        let claimed = wait_async(Duration::from_secs(20), || {
            nodes[1..].iter().map(|n| n.metric("longlink_route_claims_total")).sum::<u64>() >= CLIENTS as u64
        })
        .await;
        assert!(claimed, "nodes b and c claim the moved devices' routes");
        // No route points at the drained node: each names where its device is.
        let mut r = redis_conn(&redis);
        let mut pipe = redis::pipe();
        for d in &devices {
            pipe.cmd("HGET").arg(format!("ll:route:{{{d}}}")).arg("node");
        }
        let owners: Vec<Option<String>> = pipe.query(&mut r).unwrap();
        let on_a = owners.iter().filter(|o| o.as_deref() == Some("a")).count();
        assert_eq!(on_a, 0, "routes left pointing at the drained node");
        let missing = owners.iter().filter(|o| o.is_none()).count();
        assert_eq!(missing, 0, "devices without a route");
        let after: u64 = nodes[1..].iter().map(|n| n.metric("longlink_connections")).sum();
        assert_eq!(after, CLIENTS as u64, "sessions on the other nodes");
        checked.set(true);
        let mut conns = Vec::with_capacity(CLIENTS);
        for t in tasks {
            conns.push(t.await.flatten());
        }
        assert!(conns.iter().all(Option::is_some), "every client ends connected");
    });
    let told = tracks.values().filter(|t| t.borrow().go_aways >= 1).count();
    assert_eq!(told, CLIENTS, "every client got a GoAway");
}

#[test]
fn redis_paused_keeps_clients_connected_and_pushes_fail_retryably() {
    let redis = RedisServer::start();
    let a = Node::start(node_config(&redis, "a", 0));
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    let pause = |sig| {
        // SAFETY: kill(2) of our own redis-server child.
        unsafe { libc::kill(redis.pid() as i32, sig) };
    };
    run(async {
        let mut da = connect(a.client, &cfg, "ua", "pa").await;
        let mut db = connect(b.client, &cfg, "ub", "pb").await;
        wait_routes(&redis, &[("pa", "a"), ("pb", "b")]);
        let mut push = a.pusher();
        pause(libc::SIGSTOP);
        let reply = push.push_devices(&["pa", "pb"], Bytes::from_static(b"paused")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered);
        assert_eq!(status(reply.results[1].status), PushStatus::Rejected);
        assert!(reply.results[1].retryable, "{}", reply.results[1].reason);
        assert_eq!(next_message(&mut da).await.payload, Bytes::from_static(b"paused"));
        pause(libc::SIGCONT);
        // Both sessions survived; once Redis answers, pushes cross again.
        let mut tries = 0;
        let reply = loop {
            let reply = push.push_devices(&["pb"], Bytes::from_static(b"resumed")).unwrap();
            if status(reply.results[0].status) == PushStatus::Delivered || tries == 100 {
                break reply;
            }
            tries += 1;
            glommio::timer::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered, "{reply:?}");
        assert_eq!(next_message(&mut db).await.payload, Bytes::from_static(b"resumed"));
        assert_nothing_queued(&mut da).await;
        wait_routes(&redis, &[("pa", "a"), ("pb", "b")]);
    });
}

#[test]
fn a_second_sigterm_stops_a_draining_node_at_once() {
    let redis = RedisServer::start();
    let mut slow = node_config(&redis, "a", 0);
    // One GoAway per second: the drain of 50 clients would last until its
    // deadline (30 s).
    slow.cluster.drain_rate_per_sec = 1;
    let mut a = Node::start(slow);
    let cfg = a.cfg.clone();
    run(async {
        let pairs: Vec<(String, String)> = (0..50).map(|i| (format!("u{i}"), format!("s-{i}"))).collect();
        let mut conns = connect_all(a.client, &cfg, &pairs).await;
        a.signal(libc::SIGTERM);
        let draining =
            wait_async(Duration::from_secs(10), || http(a.admin, "GET", "/healthz").1.contains("draining")).await;
        assert!(draining, "the first SIGTERM starts a drain");
        a.signal(libc::SIGTERM);
        let status = a.wait_exit(Duration::from_secs(15)).expect("the second SIGTERM stops the node");
        assert!(status.success(), "{status:?}");
        // Nobody was left hanging: every connection ended.
        let mut ended = 0;
        for c in &mut conns {
            let end = loop {
                match c.next_event().await {
                    Ok(_) => continue,
                    Err(e) => break e,
                }
            };
            assert!(end.reconnect_allowed(), "{end:?}");
            ended += 1;
        }
        assert_eq!(ended, pairs.len());
    });
}

/// The at-least-once contract across nodes: a STORED reply names a copy the
/// device gets. When the device's node stores and sends a forwarded push but
/// its answer comes too late, a second copy stored by the receiving node
/// would reach the device only after a reconnect (its node is never told);
/// the push must be rejected as retryable instead, and the retry stored on
/// the device's node.
#[test]
fn a_forward_answered_too_late_is_retried_not_stored_out_of_reach() {
    let redis = RedisServer::start();
    let b = Node::start(node_config(&redis, "b", 1));
    // Node c advertises a relay as its node-to-node endpoint: requests pass
    // at once, answers are held past b's forward timeout (2 s) at first.
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut via_relay = node_config(&redis, "c", 2);
    via_relay.cluster.node_endpoint = relay.local_addr().unwrap().to_string();
    let c = Node::start(via_relay);
    let c_node = c.proc.node_addr.expect("node listener");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let Ok((from_b, _)) = relay.accept() else { return };
        let Ok(to_c) = std::net::TcpStream::connect(c_node) else { return };
        let (mut b_in, mut c_out) = (from_b.try_clone().unwrap(), to_c.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut b_in, &mut c_out));
        let (mut c_in, mut b_out) = (to_c, from_b);
        // The link's authentication (challenge, then PushAuthOk) passes at
        // once; the answers to requests are held.
        for _ in 0..2 {
            let mut header = [0u8; 8];
            if c_in.read_exact(&mut header).is_err() {
                return;
            }
            let mut body = vec![0u8; u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize];
            if c_in.read_exact(&mut body).is_err()
                || b_out.write_all(&header).is_err()
                || b_out.write_all(&body).is_err()
            {
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(3));
        let _ = std::io::copy(&mut c_in, &mut b_out);
    });
    let cfg = b.cfg.clone();
    let mut push = b.pusher();
    run(async {
        let mut dev = connect(c.client, &cfg, "u", "on-c").await;
        wait_routes(&redis, &[("on-c", "c")]);
        let reply = push.push_devices_at_least_once(&["on-c"], Bytes::from_static(b"late")).unwrap();
        let first = &reply.results[0];
        let mut stored = Vec::new();
        match status(first.status) {
            PushStatus::Stored => stored.push(first.seq),
            PushStatus::Rejected => assert!(first.retryable, "{first:?}"),
            other => panic!("unexpected {other:?}: {first:?}"),
        }
        if stored.is_empty() {
            // The backend retries; this answer comes in time.
            let retry = push.push_devices_at_least_once(&["on-c"], Bytes::from_static(b"late")).unwrap();
            assert_eq!(status(retry.results[0].status), PushStatus::Stored, "{retry:?}");
            stored.push(retry.results[0].seq);
        }
        // The device, connected to c all along, gets every copy reported
        // STORED (and the one c stored for the late answer).
        let mut got = Vec::new();
        while !stored.iter().all(|s| got.contains(s)) {
            let next = futures_lite::future::or(async { Some(next_message(&mut dev).await) }, async {
                glommio::timer::sleep(Duration::from_secs(20)).await;
                None
            })
            .await;
            let Some(m) = next else {
                panic!("the device never got copies {stored:?} reported STORED (got {got:?})");
            };
            got.push(m.seq);
        }
    });
}

/// Node-to-node traffic has its own listener: the public push port refuses
/// `forwarded` requests (PERMISSION_DENIED, nothing carried out), the node
/// listener refuses push keys and a wrong cluster secret (UNAUTHENTICATED),
/// and forwarding between nodes still reaches a device on another node.
#[test]
fn forwarded_requests_go_only_to_the_node_listener_with_the_cluster_secret() {
    let redis = RedisServer::start();
    let a = Node::start(node_config(&redis, "a", 0));
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    let node_b = b.proc.node_addr.expect("node listener");
    assert_ne!(node_b, b.push, "the node listener is not the push port");
    run(async {
        let mut dev = connect(b.client, &cfg, "u", "on-b").await;
        wait_routes(&redis, &[("on-b", "b")]);
        // A backend forging a forwarded push on b's public port.
        let mut push = b.pusher();
        let forged = longlink::protocol::proto::PushRequest {
            targets: Some(longlink::protocol::proto::Targets { devices: vec!["on-b".into()], ..Default::default() }),
            payload: Bytes::from_static(b"bypass"),
            forwarded: true,
            ..Default::default()
        };
        let err = push.push_request(forged).unwrap_err();
        assert!(
            matches!(err, longlink::backend::BackendError::Rejected { code: ErrorCode::PermissionDenied, .. }),
            "{err:?}"
        );
        // The node listener takes neither a push key nor a wrong secret.
        for key in [push_key(), longlink::backend::PushKey::new("cluster", vec![1; 32]).unwrap()] {
            let err = PushClient::connect(node_b, Duration::from_secs(5), &key).unwrap_err();
            assert!(
                matches!(err, longlink::backend::BackendError::Closed { code: ErrorCode::Unauthenticated, .. }),
                "{}: {err:?}",
                key.id()
            );
        }
        // A push through node a reaches the device on b over a's link to
        // b's node listener.
        let reply = a.pusher().push_devices(&["on-b"], Bytes::from_static(b"via a")).unwrap();
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered, "{reply:?}");
        let m = next_message(&mut dev).await;
        assert_eq!(&m.payload[..], b"via a", "the forged push never arrived first");
    });
    assert!(a.metric("longlink_forwarded_total") >= 1);
}
