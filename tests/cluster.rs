//! Cluster mode with a real redis-server and several real `longlink serve
//! --redis` processes: cross-node pushes, kill -9, drain, a stale node,
//! Redis restarts, the dispatcher and admin HTTP.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use longlink::backend::PushClient;
use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::config::Config;
use longlink::proto::{self, ErrorCode, PushStatus};

/// A `longlink serve` process in cluster mode, killed on drop.
struct Node {
    name: String,
    child: std::process::Child,
    client: SocketAddr,
    push: SocketAddr,
    admin: SocketAddr,
    cfg: Config,
    _dir: TempDir,
}

fn node_config(redis: &RedisServer, name: &str, index: u16) -> Config {
    let mut cfg = test_config(2);
    cfg.node_name = name.into();
    cfg.delivery.redis_url = redis.url();
    cfg.delivery.node_index = index;
    cfg.delivery.retry_base_ms = 300;
    cfg.cluster.enabled = true;
    cfg.cluster.lease_ms = 1_000;
    cfg.cluster.admin_listen = "127.0.0.1:0".parse().unwrap();
    cfg.cluster.forward_timeout_ms = 2_000;
    cfg.cluster.drain_deadline_ms = 30_000;
    cfg.cluster.drain_rate_per_sec = 5_000;
    cfg.session.heartbeat_default_ms = 30_000;
    cfg.session.close_linger_ms = 300;
    cfg
}

impl Node {
    fn start(cfg: Config) -> Node {
        let dir = TempDir::new("cluster-node");
        let path = dir.0.join("longlink.toml");
        std::fs::write(&path, toml::to_string(&cfg).expect("config serializes")).expect("write config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn longlink");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = |prefix: &str| -> SocketAddr {
            let line = lines.next().expect("node prints its addresses").expect("read stdout");
            line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {line:?}")).parse().expect("addr")
        };
        let (client, push, admin) = (addr("listening "), addr("push "), addr("admin "));
        Node { name: cfg.node_name.clone(), child, client, push, admin, cfg, _dir: dir }
    }

    fn pusher(&self) -> PushClient {
        let mut p = PushClient::connect(self.push, Duration::from_secs(5)).expect("push port");
        p.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        p
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to exit; its status.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
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

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request; the status and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("admin port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn redis_conn(redis: &RedisServer) -> redis::Connection {
    redis::Client::open(redis.url()).unwrap().get_connection_with_timeout(Duration::from_secs(2)).unwrap()
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
}

#[test]
fn a_second_login_on_another_node_replaces_the_first() {
    let redis = RedisServer::start();
    let a = Node::start(node_config(&redis, "a", 0));
    let b = Node::start(node_config(&redis, "b", 1));
    let cfg = a.cfg.clone();
    run(async {
        let mut first = connect(a.client, &cfg, "u", "phone").await;
        wait_routes(&redis, &[("phone", "a")]);
        let _second = connect(b.client, &cfg, "u", "phone").await;
        let end = loop {
            match first.next_event().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(end, ClientError::Kicked { code: ErrorCode::Replaced, .. }), "{end:?}");
        wait_routes(&redis, &[("phone", "b")]);
    });
}

#[test]
fn dispatcher_and_admin_endpoints() {
    let redis = RedisServer::start();
    let nodes: Vec<Node> =
        ["a", "b", "c"].iter().zip(0..).map(|(n, i)| Node::start(node_config(&redis, n, i))).collect();
    let clients: Vec<String> = nodes.iter().map(|n| n.client.to_string()).collect();
    let dispatch = |addr| {
        let (code, body) = http(addr, "GET", "/v1/dispatch?uid=alice&device=phone&platform=ios&net=wifi");
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
    ] {
        assert!(metrics.contains(family), "{family} missing from\n{metrics}");
    }
    assert_eq!(http(nodes[2].admin, "POST", "/drain").0, 202);
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
