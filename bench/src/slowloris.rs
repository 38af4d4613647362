//! Scenario `slowloris`: dispatcher latency at an open-loop request rate
//! while `--slow` sockets trickle a request head one byte every few
//! seconds (issue 13's attack: 1,030 such sockets made the old
//! thread-per-connection dispatcher answer 503 for over a minute).
//!
//! Starts a redis-server, one cluster node and the standalone `longlink
//! dispatcher`; opens the slow sockets from `--sources` loopback addresses
//! (127.0.0.2, ...; each stays under the per-address cap) and reopens each
//! as the server closes it at its header deadline, so `--slow` stay open
//! throughout; then loads `/v1/dispatch` as the `dispatch` scenario does.
//! Target: p99 < 1 ms at 10,000 requests/s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::dispatch::{DispatchArgs, TargetResult, free_port, load, start_dispatcher, wait_listed};
use crate::harness::{CommonArgs, Harness};
use crate::record::{self, RunInfo};
use crate::reliable::RedisProcess;
use crate::server::{BenchKey, ServerProcess, TempDir, bench_config, check_server_bin, default_server_bin};

#[derive(Debug, Clone, clap::Args)]
pub struct SlowlorisArgs {
    /// Requests per second (open loop, spread over the connections).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Keep-alive connections of the load (one sender thread each).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Slow sockets kept open during the load.
    #[arg(long, default_value_t = 1_000)]
    pub slow: u32,
    /// Loopback source addresses the slow sockets come from (127.0.0.2 on).
    #[arg(long, default_value_t = 20)]
    pub sources: u8,
    /// Seconds between two bytes of a slow socket.
    #[arg(long, default_value_t = 2)]
    pub byte_every_s: u64,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Serialize)]
struct SlowlorisRecord {
    scenario: &'static str,
    rate_per_sec: u32,
    seconds: u64,
    connections: u32,
    slow_sockets: u32,
    /// Slow sockets the server closed (at its header deadline) during the run.
    slow_closed_by_server: u64,
    /// Slow sockets answered 503 at connect (over a cap).
    slow_refused: u64,
    standalone: TargetResult,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &SlowlorisArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.connections == 0 || args.sources == 0 || args.sources > 250 {
        bail!("--rate and --connections must be at least 1, --sources 1 to 250");
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let bin = args.common.server_bin.clone().unwrap_or_else(default_server_bin);
    if let Some(warning) = check_server_bin(&bin)? {
        h.note(&warning);
    }
    let redis = RedisProcess::start(&args.redis_server)?;
    let key = BenchKey::generate()?;
    let mut cfg = bench_config(1, &key);
    cfg.delivery.redis_url = redis.url();
    cfg.cluster.enabled = true;
    cfg.server.admin_listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    // Room for the slow sockets and the load; each source stays under its cap.
    cfg.http.max_connections = args.slow + args.connections + 64;
    cfg.http.max_connections_per_ip = args.slow.div_ceil(u32::from(args.sources)).max(64) + 1;
    let node = ServerProcess::start(&bin, &cfg, &h)?;
    let dir = TempDir::new("longlink-bench-slowloris")?;
    let dispatcher = start_dispatcher(&bin, &cfg, dir.path(), &redis.url())?;
    wait_listed(dispatcher.addr, 1, &h)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (closed, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let attacker = {
        let (stop, closed, refused) = (stop.clone(), closed.clone(), refused.clone());
        let (target, slow, sources, every) =
            (dispatcher.addr, args.slow as usize, args.sources, Duration::from_secs(args.byte_every_s.max(1)));
        std::thread::spawn(move || slowloris(target, slow, sources, every, &stop, &closed, &refused))
    };
    // Let the slow sockets pile up first.
    std::thread::sleep(Duration::from_secs(2));
    h.note(&format!("{} slow sockets open; loading the dispatcher at {} req/s", args.slow, args.rate));
    let load_args = DispatchArgs {
        rate: args.rate,
        seconds: args.seconds,
        connections: args.connections,
        nodes: 1,
        redis_server: args.redis_server.clone(),
        common: args.common.clone(),
    };
    let result = load(dispatcher.addr, &load_args, &mut h);
    stop.store(true, Ordering::Relaxed);
    let opened = attacker.join().map_err(|_| anyhow::anyhow!("slowloris thread panicked"))??;
    let standalone = result?;
    drop(dispatcher);
    node.stop()?;
    h.note(&format!("{opened} slow sockets opened in all"));
    let rec = SlowlorisRecord {
        scenario: "slowloris",
        rate_per_sec: args.rate,
        seconds: args.seconds,
        connections: args.connections,
        slow_sockets: args.slow,
        slow_closed_by_server: closed.load(Ordering::Relaxed),
        slow_refused: refused.load(Ordering::Relaxed),
        standalone,
        run: RunInfo::now(h.elapsed()),
    };
    record::emit(&rec, &args.common.out())
}

fn open_slow(target: SocketAddr, source: u8) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, source], 0)).into())?;
    socket.connect_timeout(&target.into(), Duration::from_secs(2))?;
    let mut s: TcpStream = socket.into();
    s.write_all(b"GET /v1/dispatch?uid=slow HTTP/1.1\r\n")?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Keeps `slow` sockets trickling bytes until `stop`; returns how many it
/// opened. Bounded: one pass over the sockets per `every`.
fn slowloris(
    target: SocketAddr,
    slow: usize,
    sources: u8,
    every: Duration,
    stop: &AtomicBool,
    closed: &AtomicU64,
    refused: &AtomicU64,
) -> anyhow::Result<u64> {
    let source = |i: usize| 2 + (i % usize::from(sources)) as u8;
    let mut opened = 0u64;
    let mut socks: Vec<Option<TcpStream>> = (0..slow).map(|_| None).collect();
    while !stop.load(Ordering::Relaxed) {
        let pass = Instant::now();
        for (i, slot) in socks.iter_mut().enumerate() {
            if let Some(s) = slot {
                let mut buf = [0u8; 256];
                let gone = match s.read(&mut buf) {
                    Ok(0) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Ok(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => s.write_all(b"x").is_err(),
                    Err(_) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                };
                if gone {
                    *slot = None;
                }
            }
            if slot.is_none()
                && let Ok(s) = open_slow(target, source(i))
            {
                opened += 1;
                *slot = Some(s);
            }
        }
        while pass.elapsed() < every && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(opened)
}
