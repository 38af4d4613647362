//! Scenario `dispatch`: dispatcher latency at an open-loop request rate.
//!
//! Starts a redis-server and `--nodes` cluster nodes (`serve` with
//! `[cluster]` on, one shard each), and the standalone `longlink
//! dispatcher`; then sends `GET /v1/dispatch?uid=..&device=..` at `--rate`
//! requests/s for `--seconds` over `--connections` keep-alive connections
//! (one thread each), to a node's admin sidecar and to the standalone
//! dispatcher in turn. Latency is measured from each request's scheduled
//! send time, so a stall counts for every request it delays.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::harness::{CommonArgs, Harness};
use crate::latency::{self, LatencySummary};
use crate::record::{self, RunInfo, round};
use crate::reliable::RedisProcess;
use crate::server::{BenchKey, ServerProcess, TempDir, bench_config, check_server_bin, default_server_bin};

#[derive(Debug, Clone, clap::Args)]
pub struct DispatchArgs {
    /// Requests per second (open loop, spread over the connections).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Seconds of load per target.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Keep-alive connections (one sender thread each).
    #[arg(long, default_value_t = 16)]
    pub connections: u32,
    /// Cluster nodes started (each lists itself in Redis).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One target's figures.
#[derive(Debug, Serialize)]
pub(crate) struct TargetResult {
    requests: u64,
    errors: u64,
    achieved_rate_per_sec: f64,
    latency_us: LatencySummary,
    latency_hist: String,
}

#[derive(Debug, Serialize)]
struct DispatchRecord {
    scenario: &'static str,
    rate_per_sec: u32,
    seconds: u64,
    connections: u32,
    nodes: u32,
    /// A node's admin sidecar.
    sidecar: TargetResult,
    /// `longlink dispatcher`.
    standalone: TargetResult,
    #[serde(flatten)]
    run: RunInfo,
}

/// The standalone dispatcher process, killed on drop.
pub(crate) struct DispatcherProcess {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Drop for DispatcherProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn run(args: &DispatchArgs) -> anyhow::Result<()> {
    if args.rate == 0 || args.connections == 0 || args.nodes == 0 {
        bail!("--rate, --connections and --nodes must be at least 1");
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let bin = args.common.server_bin.clone().unwrap_or_else(default_server_bin);
    if let Some(warning) = check_server_bin(&bin)? {
        h.note(&warning);
    }
    let redis = RedisProcess::start(&args.redis_server)?;
    let key = BenchKey::generate()?;
    let mut nodes = Vec::new();
    let mut admin = Vec::new();
    let mut base_cfg = bench_config(1, &key);
    base_cfg.delivery.redis_url = redis.url();
    base_cfg.cluster.enabled = true;
    for i in 0..args.nodes {
        let mut cfg = base_cfg.clone();
        cfg.node_name = format!("bench-{i}");
        cfg.delivery.node_index = (i % 16) as u16;
        let port = free_port()?;
        cfg.server.admin_listen = SocketAddr::from(([127, 0, 0, 1], port));
        nodes.push(ServerProcess::start(&bin, &cfg, &h)?);
        admin.push(cfg.server.admin_listen);
    }
    let dir = TempDir::new("longlink-bench-dispatcher")?;
    let standalone = start_dispatcher(&bin, &base_cfg, dir.path(), &redis.url())?;
    for addr in admin.iter().chain([&standalone.addr]) {
        wait_listed(*addr, args.nodes.min(base_cfg.cluster.dispatch_endpoints) as usize, &h)?;
    }
    h.note(&format!("{} nodes registered; loading the sidecar of bench-0 at {} req/s", args.nodes, args.rate));
    let sidecar = load(admin[0], args, &mut h)?;
    h.note(&format!("loading the standalone dispatcher at {} req/s", args.rate));
    let standalone_result = load(standalone.addr, args, &mut h)?;
    drop(standalone);
    for node in nodes {
        node.stop()?;
    }
    let rec = DispatchRecord {
        scenario: "dispatch",
        rate_per_sec: args.rate,
        seconds: args.seconds,
        connections: args.connections,
        nodes: args.nodes,
        sidecar,
        standalone: standalone_result,
        run: RunInfo::now(h.elapsed()),
    };
    record::emit(&rec, &args.common.out())
}

pub(crate) fn start_dispatcher(
    bin: &Path,
    cfg: &longlink::config::Config,
    dir: &Path,
    redis: &str,
) -> anyhow::Result<DispatcherProcess> {
    let mut cfg = cfg.clone();
    cfg.data_dir = dir.join("data");
    let path = dir.join("dispatcher.toml");
    std::fs::write(&path, toml::to_string(&cfg)?).with_context(|| format!("writing {}", path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(["dispatcher", "--listen", "127.0.0.1:0", "--redis", redis, "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    crate::server::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {} dispatcher", bin.display()))?;
    let stdout = child.stdout.take().context("dispatcher stdout")?;
    let line = BufReader::new(stdout).lines().next().context("dispatcher printed nothing")??;
    let addr = line.strip_prefix("dispatcher ").with_context(|| format!("unexpected line {line:?}"))?.parse()?;
    Ok(DispatcherProcess { child, addr })
}

/// Waits until `addr` lists `endpoints` endpoints.
pub(crate) fn wait_listed(addr: SocketAddr, endpoints: usize, h: &Harness) -> anyhow::Result<()> {
    loop {
        h.check()?;
        if let Ok(mut c) = Client::connect(addr)
            && let Ok((200, body)) = c.get("/v1/dispatch?uid=probe&device=probe")
            && serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["endpoints"].as_array().map(Vec::len))
                .is_some_and(|n| n >= endpoints)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Open-loop load on one target.
pub(crate) fn load(addr: SocketAddr, args: &DispatchArgs, h: &mut Harness) -> anyhow::Result<TargetResult> {
    let per_thread = f64::from(args.rate) / f64::from(args.connections);
    let interval = Duration::from_secs_f64(1.0 / per_thread);
    let total_per_thread = (per_thread * args.seconds as f64) as u64;
    let start = Instant::now() + Duration::from_millis(100);
    let connections = args.connections;
    let threads: Vec<_> = (0..connections)
        .map(|t| {
            std::thread::spawn(move || -> anyhow::Result<(hdrhistogram::Histogram<u64>, u64, u64)> {
                let mut client = Client::connect(addr)?;
                let mut hist = latency::new_histogram();
                let (mut ok, mut errors) = (0u64, 0u64);
                // Stagger the threads over one interval.
                let offset = interval.mul_f64(f64::from(t) / f64::from(connections));
                for i in 0..total_per_thread {
                    let scheduled = start + offset + interval.mul_f64(i as f64);
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let uid = (u64::from(t) << 32) | i;
                    let path = format!("/v1/dispatch?uid=u{uid}&device=d{uid}&platform=android&net=wifi");
                    match client.get(&path) {
                        Ok((200, _)) => ok += 1,
                        Ok(_) => errors += 1,
                        Err(_) => {
                            errors += 1;
                            client = Client::connect(addr)?;
                        }
                    }
                    let _ = hist.record(scheduled.elapsed().as_nanos().max(1) as u64);
                }
                Ok((hist, ok, errors))
            })
        })
        .collect();
    let mut hist = latency::new_histogram();
    let (mut ok, mut errors) = (0, 0);
    for t in threads {
        let (th, o, e) = t.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        hist.add(&th)?;
        ok += o;
        errors += e;
    }
    h.check()?;
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let summary = LatencySummary::of(&hist);
    h.note(&format!("p50 {} µs, p99 {} µs, {} errors", summary.p50_us, summary.p99_us, errors));
    Ok(TargetResult {
        requests: ok + errors,
        errors,
        achieved_rate_per_sec: round((ok + errors) as f64 / elapsed, 1),
        latency_us: summary,
        latency_hist: latency::encode(&hist)?,
    })
}

/// A blocking keep-alive HTTP/1.1 client (GET only).
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    fn get(&mut self, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        // One write per request (`write!` would send each piece on its own).
        let request = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        self.writer.write_all(request.as_bytes())?;
        let mut status = 0u16;
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if status == 0 {
                status = l.split(' ').nth(1).and_then(|s| s.parse().ok()).context("bad status line")?;
            } else if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }
}
