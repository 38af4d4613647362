//! Single-node drain: SIGTERM on a `longlink serve` process (no cluster)
//! sends every client a GoAway without an endpoint and closes it with
//! GOING_AWAY, a bounded number per tick; a second SIGTERM stops at once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::protocol::proto::ErrorCode;

/// How one client's session ended.
#[derive(Debug, Default)]
struct Ending {
    /// Endpoints of the GoAway frames received, in order.
    go_aways: Vec<String>,
    /// The close code, if the node sent one.
    code: Option<ErrorCode>,
}

/// Clients on their own thread: connects `n`, bumps `connected` per
/// session up, then waits (bounded) for each to end. Returns the endings.
fn clients(
    addr: std::net::SocketAddr,
    cfg: longlink::config::Config,
    n: usize,
    connected: Arc<AtomicU32>,
    go_aways: Arc<AtomicU32>,
) -> std::thread::JoinHandle<Vec<Ending>> {
    std::thread::spawn(move || {
        run(async move {
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let opts = ClientOptions::new(token(&cfg, &format!("u{i}"), &format!("d{i}")));
                    let (connected, go_aways) = (connected.clone(), go_aways.clone());
                    glommio::spawn_local(async move {
                        let mut conn = Connection::connect(addr, opts).await.expect("client authenticates").0;
                        connected.fetch_add(1, Ordering::Relaxed);
                        let mut ending = Ending::default();
                        let watch = async {
                            loop {
                                match conn.next_event().await {
                                    Ok(ClientEvent::GoAway { endpoint, .. }) => {
                                        go_aways.fetch_add(1, Ordering::Relaxed);
                                        ending.go_aways.push(endpoint);
                                    }
                                    Ok(_) => {}
                                    Err(ClientError::Closed { code, .. }) => return Some(code),
                                    Err(_) => return None,
                                }
                            }
                        };
                        let limit = async {
                            glommio::timer::sleep(Duration::from_secs(120)).await;
                            None
                        };
                        ending.code = futures_lite::future::or(watch, limit).await;
                        ending
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await);
            }
            out
        })
    })
}

fn signal(node: &NodeProcess, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(node.child.id() as i32, sig) };
}

fn wait_exit(node: &mut NodeProcess, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = node.child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Sum of `longlink_connections` over the shards, from the node's /metrics.
fn sessions(admin: std::net::SocketAddr) -> Option<u64> {
    let (status, body) = http(admin, "GET", "/metrics");
    (status == 200).then(|| {
        body.lines()
            .filter(|l| l.starts_with("longlink_connections{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    })
}

#[test]
fn sigterm_on_a_single_node_sends_every_client_away_at_the_drain_rate_then_exits_0() {
    const CLIENTS: usize = 500;
    let mut cfg = test_config(2);
    // 250 a second over 2 shards: 12.5 per shard per 100 ms tick, so the
    // drain takes about twenty ticks (room for a slow /metrics sampler on
    // a loaded box to see several of them).
    cfg.cluster.drain_rate_per_sec = 250;
    let mut node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin port");
    let (connected, go_aways) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let handle = clients(node.client_addr, cfg.clone(), CLIENTS, connected.clone(), go_aways.clone());
    assert!(wait_until(Duration::from_secs(60), || connected.load(Ordering::Relaxed) as usize == CLIENTS));
    assert!(wait_until(Duration::from_secs(10), || sessions(admin) == Some(CLIENTS as u64)));

    signal(&node, libc::SIGTERM);
    // The node's own count, sampled while it drains: a paced drain passes
    // through counts strictly between all and none (closing everyone at
    // once would jump from 500 to 0).
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match sessions(admin) {
            Some(n) => {
                seen.insert(n);
                if n == 0 {
                    break;
                }
            }
            None => break, // the node stopped
        }
    }
    let status = wait_exit(&mut node, Duration::from_secs(60)).expect("the node exits after the drain");
    assert!(status.success(), "exit status {status:?}");

    let endings = handle.join().expect("client thread");
    assert_eq!(endings.len(), CLIENTS);
    for (i, e) in endings.iter().enumerate() {
        assert_eq!(e.go_aways, [String::new()], "client {i}: one GoAway without an endpoint");
        assert_eq!(e.code, Some(ErrorCode::GoingAway), "client {i}: closed with GOING_AWAY");
    }
    let between: Vec<u64> = seen.iter().copied().filter(|&n| n > 0 && n < CLIENTS as u64).collect();
    println!("session counts seen while draining: {seen:?}");
    assert!(between.len() >= 2, "the drain is paced: counts seen {seen:?}");
}

#[test]
fn a_second_sigterm_during_a_single_node_drain_stops_at_once_and_exits_0() {
    const CLIENTS: usize = 200;
    let mut cfg = test_config(2);
    // 2 a second: the drain would take 100 s.
    cfg.cluster.drain_rate_per_sec = 2;
    let mut node = NodeProcess::start(&cfg);
    let (connected, go_aways) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let handle = clients(node.client_addr, cfg.clone(), CLIENTS, connected.clone(), go_aways.clone());
    assert!(wait_until(Duration::from_secs(60), || connected.load(Ordering::Relaxed) as usize == CLIENTS));

    signal(&node, libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(30), || go_aways.load(Ordering::Relaxed) > 0), "the drain started");
    signal(&node, libc::SIGTERM);
    let status = wait_exit(&mut node, Duration::from_secs(30)).expect("the second SIGTERM stops the node");
    assert!(status.success(), "exit status {status:?}");

    let endings = handle.join().expect("client thread");
    let away = endings.iter().filter(|e| e.code == Some(ErrorCode::GoingAway)).count();
    let shut = endings.iter().filter(|e| e.code == Some(ErrorCode::Shutdown)).count();
    assert!(away >= 1, "some clients were drained before the second SIGTERM");
    assert!(shut >= CLIENTS / 2, "the rest were closed at once with SHUTDOWN: {away} away, {shut} shutdown");
    assert_eq!(away + shut, CLIENTS, "every client was closed by the node");
    for e in endings.iter().filter(|e| e.code == Some(ErrorCode::GoingAway)) {
        assert_eq!(e.go_aways, [String::new()]);
    }
}
