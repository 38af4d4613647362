//! The Redis router against a real redis-server: epochs, compare-and-set,
//! leases and route validity.

mod common;

use std::time::Duration;

use common::{RedisServer, wait_until};
use futures_lite::future::block_on;
use longlink::router::{Router, RouterConfig};

fn router_config(redis: &RedisServer, node: &str, incarnation: u64, lease: Duration) -> RouterConfig {
    RouterConfig {
        url: redis.url(),
        prefix: "lltest".into(),
        node: node.into(),
        incarnation,
        lease,
        client_endpoint: format!("{node}:7100"),
        node_endpoint: format!("{node}:7102"),
        route_ttl: Duration::from_secs(3600),
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(2),
    }
}

fn router(redis: &RedisServer, node: &str, incarnation: u64, lease: Duration) -> Router {
    let cfg = router_config(redis, node, incarnation, lease);
    let r = Router::start(cfg, Box::new(|| {})).expect("router starts");
    assert!(wait_until(Duration::from_secs(5), || r.state().is_live()), "{node} registers");
    r
}

#[test]
fn newest_login_wins_and_a_stale_node_can_neither_overwrite_nor_delete() {
    let redis = RedisServer::start();
    let a = router(&redis, "node-a", 11, Duration::from_secs(30));
    let b = router(&redis, "node-b", 22, Duration::from_secs(30));

    let first = block_on(a.claim("phone", 1, 100)).unwrap();
    assert_eq!(first.previous, None);
    let route = block_on(b.lookup(vec!["phone".into(), "nobody".into()])).unwrap();
    assert_eq!(route[0].as_ref().map(|r| (r.node.as_str(), r.shard, r.conn_id)), Some(("node-a", 1, 100)));
    assert_eq!(route[1], None);

    // The device logs in on node B: a newer epoch, and B learns whom to kick.
    let second = block_on(b.claim("phone", 0, 200)).unwrap();
    assert!(second.epoch > first.epoch);
    assert_eq!(second.previous.as_ref().map(|r| (r.node.as_str(), r.epoch)), Some(("node-a", first.epoch)));

    // Node A, stale, re-asserts and deletes with its old epoch: both refused.
    assert!(!block_on(a.reassert("phone", 1, 100, first.epoch)).unwrap());
    assert!(!block_on(a.release("phone", first.epoch)).unwrap());
    let route = block_on(a.lookup(vec!["phone".into()])).unwrap();
    assert_eq!(route[0].as_ref().map(|r| (r.node.as_str(), r.epoch)), Some(("node-b", second.epoch)));

    // The owner re-asserts and releases its own route.
    assert!(block_on(b.reassert("phone", 0, 200, second.epoch)).unwrap());
    assert!(block_on(b.release("phone", second.epoch)).unwrap());
    assert_eq!(block_on(a.lookup(vec!["phone".into()])).unwrap()[0], None);

    let nodes = block_on(a.nodes()).unwrap();
    let names: Vec<_> = nodes.iter().map(|n| (n.name.as_str(), n.client_endpoint.as_str())).collect();
    assert!(names.contains(&("node-a", "node-a:7100")) && names.contains(&("node-b", "node-b:7100")), "{names:?}");
}

#[test]
fn routes_of_a_dead_node_expire_with_its_lease() {
    let redis = RedisServer::start();
    let watcher = router(&redis, "watcher", 1, Duration::from_secs(30));
    let doomed = router(&redis, "doomed", 2, Duration::from_millis(900));
    block_on(doomed.claim("tablet", 0, 5)).unwrap();
    assert!(block_on(watcher.lookup(vec!["tablet".into()])).unwrap()[0].is_some());
    // The node dies: its sidecar stops renewing.
    drop(doomed);
    assert!(wait_until(Duration::from_secs(10), || {
        block_on(watcher.lookup(vec!["tablet".into()])).unwrap()[0].is_none()
    }));
    assert!(block_on(watcher.nodes()).unwrap().iter().all(|n| n.name != "doomed"));
}

#[test]
fn a_second_process_with_the_same_node_name_is_fenced() {
    let redis = RedisServer::start();
    let _first = router(&redis, "twin", 1, Duration::from_secs(30));
    let cfg = RouterConfig {
        url: redis.url(),
        prefix: "lltest".into(),
        node: "twin".into(),
        incarnation: 2,
        lease: Duration::from_secs(30),
        client_endpoint: String::new(),
        node_endpoint: String::new(),
        route_ttl: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(2),
    };
    let second = Router::start(cfg, Box::new(|| {})).unwrap();
    assert!(wait_until(Duration::from_secs(5), || second.state().is_fenced()));
    assert!(block_on(second.claim("x", 0, 1)).is_err(), "a fenced node claims nothing");
}

fn redis_cmd(redis: &RedisServer, args: &[&str]) -> redis::Value {
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).unwrap()
}

/// Registers `node` the way an earlier run did, as process `holder`, with
/// `lease_ms` of its lease left.
fn earlier_run(redis: &RedisServer, node: &str, incarnation: u64, holder: &str, lease_ms: u64) {
    let key = format!("lltest:node:{node}");
    redis_cmd(redis, &["HSET", &key, "inc", &incarnation.to_string(), "client", "x:1", "node", "x:2", "draining", "0"]);
    redis_cmd(redis, &["HSET", &key, "holder", holder]);
    redis_cmd(redis, &["PEXPIRE", &key, &lease_ms.to_string()]);
}

fn registered_incarnation(redis: &RedisServer, node: &str) -> Option<u64> {
    match redis_cmd(redis, &["HGET", &format!("lltest:node:{node}"), "inc"]) {
        redis::Value::BulkString(b) => String::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

#[test]
fn a_restart_within_the_lease_of_a_dead_run_takes_it_over_at_once() {
    let redis = RedisServer::start();
    // The previous run of "phoenix" on this host was killed (its process is
    // gone) with 60 s of lease left.
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let me = longlink::router::process_identity();
    let (boot_ns, _) = me.rsplit_once('/').and_then(|(rest, _)| rest.rsplit_once('/')).unwrap();
    earlier_run(&redis, "phoenix", 1, &format!("{boot_ns}/{pid}/12345"), 60_000);
    let again = Router::start(router_config(&redis, "phoenix", 2, Duration::from_secs(60)), Box::new(|| {})).unwrap();
    assert!(wait_until(Duration::from_secs(5), || again.state().is_live()), "takes over at once");
    assert!(!again.state().is_fenced());
    assert_eq!(registered_incarnation(&redis, "phoenix"), Some(2));
    // Routes of the dead run are not its routes: they stay invalid.
    redis_cmd(
        &redis,
        &["HSET", "lltest:route:{old-phone}", "node", "phoenix", "inc", "1", "shard", "0", "conn", "5", "epoch", "1"],
    );
    assert_eq!(block_on(again.lookup(vec!["old-phone".into()])).unwrap()[0], None);
    assert!(block_on(again.claim("new-phone", 0, 1)).is_ok());
}

#[test]
fn a_restart_waits_out_the_lease_of_a_run_it_cannot_check() {
    let redis = RedisServer::start();
    // Registered from another host, 1.5 s of lease left, never renewed.
    earlier_run(&redis, "far", 1, "another-boot-id/pid:[1]/77/99", 1_500);
    let again = Router::start(router_config(&redis, "far", 2, Duration::from_secs(3)), Box::new(|| {})).unwrap();
    // Well into the earlier lease, the name is still the earlier run's.
    let pttl = || match redis_cmd(&redis, &["PTTL", "lltest:node:far"]) {
        redis::Value::Int(ms) => ms,
        _ => -2,
    };
    assert!(wait_until(Duration::from_secs(5), || pttl() < 700), "the earlier lease runs down");
    assert_eq!(registered_incarnation(&redis, "far"), Some(1), "not taken over while it runs");
    assert!(!again.state().is_live() && !again.state().is_fenced());
    assert!(wait_until(Duration::from_secs(10), || again.state().is_live()), "registers once it lapsed");
    assert!(!again.state().is_fenced());
    assert_eq!(registered_incarnation(&redis, "far"), Some(2));
}

#[test]
fn a_lookup_that_outlasts_the_lease_does_not_fence_a_healthy_node() {
    // Renewals have their own thread and connection: a route lookup of many
    // devices (seconds on a loaded host) must not hold them back. With both
    // on one thread, the lease lapsed behind the lookup and the node fenced
    // itself.
    let redis = RedisServer::start();
    // A lease long enough that a starved host (load far above its cores)
    // does not lapse it by scheduling delay alone; the lookup must still
    // outlast it several times over.
    let lease = Duration::from_millis(1000);
    let mut cfg = router_config(&redis, "busy", 7, lease);
    cfg.io_timeout = Duration::from_secs(60);
    let r = Router::start(cfg, Box::new(|| {})).expect("router starts");
    assert!(wait_until(Duration::from_secs(5), || r.state().is_live()), "registers");
    let mut devices = 100_000;
    let took = loop {
        let batch: Vec<String> = (0..devices).map(|i| format!("device-{i}")).collect();
        let started = std::time::Instant::now();
        let routes = block_on(r.lookup(batch)).expect("lookup answered");
        assert_eq!(routes.len(), devices);
        let took = started.elapsed();
        // Only a lookup longer than several leases shows anything.
        if took >= lease * 3 || devices >= 6_400_000 {
            break took;
        }
        devices *= 2;
    };
    assert!(took >= lease * 3, "{devices} lookups took only {took:?}");
    assert!(!r.state().is_fenced(), "fenced during a {took:?} lookup of {devices} devices");
    assert!(r.state().is_live());
    assert_eq!(registered_incarnation(&redis, "busy"), Some(7), "the registration stayed");
}
