//! Executor liveness under CPU contention: an executor with runnable work
//! must keep turning. glommio 0.9.0 could park with a task ready to run and
//! sleep until some unrelated I/O or timer completed (forever if none was
//! pending); vendor/glommio/PATCHES.md has the story. These tests fail on
//! the unpatched crate and are the stress reproducer for it
//! (`LONGLINK_LIVENESS_ROUNDS` runs more rounds).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};

/// How long a turn counter may stand still before the executor counts as
/// stalled. A healthy executor turns thousands of times per second even on
/// a box whose cores are busy with other work.
const STALL: Duration = Duration::from_secs(10);

fn rounds(default: u32) -> u32 {
    std::env::var("LONGLINK_LIVENESS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Two sockets per task in this process: lift the soft limit to the hard one.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Two threads that spin until dropped: the executor thread gets
/// descheduled at arbitrary points, as on a host whose cores are shared.
struct Contention {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Contention {
    fn start(deadline: Instant) -> Contention {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    // Bounded in time even if the test panics before drop.
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_add(1));
                        }
                    }
                })
            })
            .collect();
        Contention { stop, threads }
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs `body` on a fresh executor thread; `turns` must keep moving until
/// `finished` is set. Returns `Err` with the turn count if it stood still
/// for [`STALL`] (the stalled thread is left behind: it cannot be woken).
fn watch(
    name: &str,
    turns: Arc<AtomicU64>,
    finished: Arc<AtomicBool>,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), u64> {
    let thread = std::thread::Builder::new().name(name.into()).spawn(body).expect("executor thread");
    let (mut last, mut moved_at) = (u64::MAX, Instant::now());
    while !finished.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        let now = turns.load(Ordering::Relaxed);
        if now != last {
            (last, moved_at) = (now, Instant::now());
        } else if moved_at.elapsed() > STALL {
            return Err(now);
        }
    }
    thread.join().expect("executor thread panicked");
    Ok(())
}

/// A task that only yields: nothing else (no timer, no I/O) can wake a
/// parked executor, so a park with this task ready is a permanent stall.
/// A short preemption timer makes the preemption-before-the-queues-ran
/// window frequent.
#[test]
fn an_executor_never_parks_with_a_runnable_task() {
    let rounds = rounds(12);
    let _busy = Contention::start(Instant::now() + Duration::from_secs(30 + 3 * u64::from(rounds)));
    for round in 0..rounds {
        let preempt = Duration::from_micros([10, 50, 200][round as usize % 3]);
        let turns = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let (t, f) = (turns.clone(), finished.clone());
        let outcome = watch("yielder", turns.clone(), finished.clone(), move || {
            glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .preempt_timer(preempt)
                .make()
                .expect("executor")
                .run(async move {
                    let end = Instant::now() + Duration::from_secs(1);
                    while Instant::now() < end {
                        t.fetch_add(1, Ordering::Relaxed);
                        futures_lite::future::yield_now().await;
                    }
                });
            f.store(true, Ordering::Release);
        });
        if let Err(at) = outcome {
            panic!(
                "round {round} (preemption timer {preempt:?}): the executor stopped after {at} turns \
                 with its task runnable"
            );
        }
        assert!(turns.load(Ordering::Relaxed) > 0);
    }
}

/// Many tasks, each waiting on a socket read raced with a short timer (the
/// shape of the cluster tests' clients), while a peer thread writes to and
/// closes the sockets: every task must finish, so no timer or socket
/// wake-up is lost.
#[test]
fn thousands_of_tasks_on_timers_and_sockets_all_finish() {
    const TASKS: usize = 2_000;
    const MESSAGES: usize = 5;
    raise_open_files_limit();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(60);
    let _busy = Contention::start(deadline);
    // The peer: accepts every connection, then writes MESSAGES bytes to each
    // (a few milliseconds apart) and closes them all.
    let peer = std::thread::spawn(move || {
        let mut conns = Vec::with_capacity(TASKS);
        while conns.len() < TASKS && Instant::now() < deadline {
            match listener.accept() {
                Ok((s, _)) => conns.push(s),
                Err(_) => break,
            }
        }
        for _ in 0..MESSAGES {
            std::thread::sleep(Duration::from_millis(30));
            for c in &mut conns {
                let _ = std::io::Write::write_all(c, b"m");
            }
        }
        drop(conns);
    });
    let turns = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let (t, f) = (turns.clone(), finished.clone());
    let outcome = watch("sockets", turns, finished, move || {
        let done = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .ring_depth(4096)
            .make()
            .expect("executor")
            .run(async move {
                let tasks: Vec<_> = (0..TASKS)
                    .map(|_| {
                        let t = t.clone();
                        glommio::spawn_local(async move {
                            let mut s = glommio::net::TcpStream::connect(addr).await.expect("connect");
                            let _ = s.write_all(b"hi").await;
                            let (mut got, mut buf) = (0, [0u8; 16]);
                            while Instant::now() < deadline {
                                let read = futures_lite::future::or(async { Some(s.read(&mut buf).await) }, async {
                                    glommio::timer::sleep(Duration::from_millis(20)).await;
                                    None
                                })
                                .await;
                                t.fetch_add(1, Ordering::Relaxed);
                                match read {
                                    Some(Ok(0)) | Some(Err(_)) => return got,
                                    Some(Ok(n)) => got += n,
                                    None => {}
                                }
                            }
                            got
                        })
                    })
                    .collect();
                let mut total = 0;
                for task in tasks {
                    total += task.await;
                }
                total
            });
        assert_eq!(done, TASKS * MESSAGES, "every task read every byte and the close");
        f.store(true, Ordering::Release);
    });
    peer.join().expect("peer");
    if let Err(at) = outcome {
        panic!("the executor stopped after {at} task wake-ups");
    }
}

/// `GET path` on a node's admin port; the body.
fn get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

/// The value of the sample `name{shard="i"}` in a Prometheus exposition.
fn sample(body: &str, name: &str, shard: usize) -> Option<u64> {
    let prefix = format!("{name}{{shard=\"{shard}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
}

/// A cluster node's `/metrics` carries, per shard, a turn counter that
/// moves and a stall gauge.
#[test]
fn metrics_show_every_shard_turning() {
    let redis = common::RedisServer::start();
    let mut cfg = common::test_config(2);
    cfg.node_name = "live".into();
    cfg.delivery.redis_url = redis.url();
    cfg.cluster.enabled = true;
    cfg.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    let node = common::NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("a cluster node prints its admin address");
    let first = get(admin, "/metrics");
    let before: Vec<Option<u64>> = (0..2).map(|i| sample(&first, "longlink_shard_turns_total", i)).collect();
    assert!(before.iter().all(Option::is_some), "turn counters missing from\n{first}");
    for shard in 0..2 {
        assert!(sample(&first, "longlink_shard_stalled_ms", shard).is_some(), "stall gauge missing from\n{first}");
    }
    // Both shards keep turning (their timer loops tick every 20 ms here).
    let turning = common::wait_until(Duration::from_secs(30), || {
        let body = get(admin, "/metrics");
        (0..2).all(|i| sample(&body, "longlink_shard_turns_total", i) > before[i])
    });
    assert!(turning, "a shard's turn counter did not move");
}
