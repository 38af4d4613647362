//! Scenario `idle`: how much server memory an idle authenticated
//! connection costs, and how fast a node accepts a crowd of them.
//!
//! Steps: start the server; open and close a warm-up batch (one-time
//! allocations of executors, slabs and indexes happen there, not in the
//! measurement); take the settled RSS as the baseline; open N connections
//! from worker processes and hold them without pinging; take the settled
//! RSS again. `rss_bytes_per_conn = (after - baseline) / connections held`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use crate::harness::{CommonArgs, Harness};
use crate::pool::{ConnectSummary, WorkerPool, plan_workers};
use crate::record::{self, RunInfo, round};
use crate::server::{BenchKey, ServerProcess, bench_config, check_server_bin, default_server_bin};
use crate::source::{FIRST_WORKER_OCTET, SourcePlan};
use crate::sys::{self, KernelMem};
use crate::worker::WorkerSpec;

/// Heartbeat the clients ask for: the server's default maximum (4.5 min),
/// so the idle timeout (3x) is far beyond any run and nobody pings.
const IDLE_HEARTBEAT_MS: u32 = 270_000;
/// Open files the server needs besides connections (listeners, io_uring
/// rings, eventfds, stdio), with room to spare.
const SERVER_FD_MARGIN: u64 = 200;
/// Second octet of the warm-up worker's source addresses.
const WARMUP_OCTET: u8 = FIRST_WORKER_OCTET - 1;
/// How long the server may take to drop the warm-up connections.
const WARMUP_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT_MS: u64 = 5_000;
const AUTH_TIMEOUT_MS: u64 = 10_000;

#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Idle connections to open and hold. Several (comma-separated, e.g.
    /// 2000,5000,10000,19000) measure a scale curve: one fresh server and
    /// one record per size, then the curve on stderr.
    #[arg(long, value_delimiter = ',', required = true)]
    pub connections: Vec<u32>,
    /// Connections opened and closed before the baseline is taken.
    #[arg(long, default_value_t = 200)]
    pub warmup: u32,
    /// How the clients connect: plain TCP, WebSocket, TLS or WebSocket over
    /// TLS (each on its own listener).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: crate::links::Transport,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The `idle` result record (README.md describes every field).
#[derive(Debug, Serialize)]
struct IdleRecord {
    scenario: &'static str,
    /// tcp, ws, tls or wss.
    transport: crate::links::Transport,
    connections: u32,
    connected: u32,
    shards: u16,
    workers: u32,
    in_flight_per_worker: u32,
    connects_per_sec: f64,
    connect_phase_s: f64,
    server_rss_startup_bytes: u64,
    server_rss_baseline_bytes: u64,
    server_rss_after_bytes: u64,
    rss_bytes_per_conn: f64,
    rss_settled: bool,
    server_conns_held: i64,
    server_clean_exit: bool,
    failures: u32,
    failure_reasons: BTreeMap<String, u32>,
    warmup_connections: u32,
    kernel: KernelRecord,
    #[serde(flatten)]
    run: RunInfo,
}

/// Host-wide kernel memory around the hold; context only.
#[derive(Debug, Serialize)]
struct KernelRecord {
    note: &'static str,
    slab_delta_bytes: i64,
    slab_bytes_per_conn_both_ends: f64,
    tcp_buffer_delta_bytes: i64,
    tcp_sockets_inuse_before: u64,
    tcp_sockets_inuse_after: u64,
}

impl KernelRecord {
    fn new(before: KernelMem, after: KernelMem, conns: u32) -> KernelRecord {
        let slab_delta = after.slab_bytes as i64 - before.slab_bytes as i64;
        KernelRecord {
            note: "host-wide kernel memory, client and server sockets together; not part of rss_bytes_per_conn",
            slab_delta_bytes: slab_delta,
            slab_bytes_per_conn_both_ends: round(slab_delta as f64 / f64::from(conns.max(1)), 1),
            tcp_buffer_delta_bytes: after.tcp_buffer_bytes as i64 - before.tcp_buffer_bytes as i64,
            tcp_sockets_inuse_before: before.tcp_sockets_inuse,
            tcp_sockets_inuse_after: after.tcp_sockets_inuse,
        }
    }
}

pub fn run(args: &IdleArgs) -> anyhow::Result<()> {
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let mut curve = Vec::new();
    for &n in &args.connections {
        h.rearm();
        curve.push((n, run_one(args, n, &mut h)?));
    }
    if curve.len() > 1 {
        h.note(&scale_curve_line(&curve));
    }
    Ok(())
}

/// `2000: 912 B, 5000: 905 B, ...; max/min 1.01` (bytes per connection by size).
fn scale_curve_line(curve: &[(u32, f64)]) -> String {
    let points: Vec<String> = curve.iter().map(|(n, b)| format!("{n}: {b:.0} B")).collect();
    let (min, max) = curve.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &(_, b)| (lo.min(b), hi.max(b)));
    let spread = if min > 0.0 { format!("{:.2}", max / min) } else { "-".to_owned() };
    format!("scale curve (server RSS per connection): {}; max/min {spread}", points.join(", "))
}

/// One size: a fresh server, `connections` idle clients; returns the
/// server's RSS per connection.
fn run_one(args: &IdleArgs, connections: u32, h: &mut Harness) -> anyhow::Result<f64> {
    let fd_limit = sys::raise_fd_limit()?;
    let _ = sys::raise_memlock_limit();
    let shards = args.common.shards();
    let counts = plan_workers(connections, args.common.workers, args.common.max_per_worker)?;
    if counts.len() > usize::from(u8::MAX - FIRST_WORKER_OCTET) {
        bail!("at most {} workers (one 127.x.0.0/16 source range each)", u8::MAX - FIRST_WORKER_OCTET);
    }
    // The server inherits this process's (raised) limit.
    if u64::from(connections) + SERVER_FD_MARGIN > fd_limit {
        bail!(
            "{} connections need about {} open files in the server, but the limit is {fd_limit} \
             (hard RLIMIT_NOFILE); use --connections {} or less",
            connections,
            u64::from(connections) + SERVER_FD_MARGIN,
            fd_limit.saturating_sub(SERVER_FD_MARGIN)
        );
    }
    let bin = args.common.server_bin.clone().unwrap_or_else(default_server_bin);
    if let Some(warning) = check_server_bin(&bin)? {
        h.note(&warning);
    }

    let key = BenchKey::generate()?;
    let mut cfg = bench_config(shards, &key);
    cfg.session.heartbeat_default_ms = IDLE_HEARTBEAT_MS;
    let cert_dir = std::env::temp_dir().join(format!("longlink-bench-certs-{}", std::process::id()));
    let (link_addr, ca_der) = crate::links::configure(&mut cfg, args.transport, &cert_dir)?;
    let mut server = ServerProcess::start(&bin, &cfg, h)?;
    server.set_link(link_addr, ca_der);
    let push = server.push_addr().map_or_else(|| "none".to_owned(), |a| a.to_string());
    h.note(&format!(
        "server pid {} listening on {} (push {push}) with {shards} shards ({})",
        server.pid(),
        server.addr(),
        bin.display()
    ));

    match measure(args, connections, h, &mut server, &key, &counts, shards) {
        Ok(mut rec) => {
            let status = server.stop()?;
            rec.server_clean_exit = status.success();
            if !status.success() {
                h.note(&format!("warning: server exited with {status} after SIGTERM"));
            }
            rec.run = RunInfo::now(h.elapsed());
            record::emit(&rec, &args.common.out())?;
            if rec.failures > 0 {
                bail!("{} of {} connections failed: {:?}", rec.failures, rec.connections, rec.failure_reasons);
            }
            Ok(rec.rss_bytes_per_conn)
        }
        Err(err) => {
            let text = format!("{err:#}");
            if text.contains("server stderr") { Err(err) } else { Err(anyhow!("{text}{}", server.log_tail())) }
        }
    }
}

fn spec(server: &ServerProcess, key: &BenchKey, args: &IdleArgs, index: u32, count: u32, octet: u8) -> WorkerSpec {
    WorkerSpec {
        index,
        server: server.link_addr(),
        connections: count,
        in_flight: args.common.in_flight,
        source: SourcePlan { octet, per_address: args.common.conns_per_source },
        key: key.spec(),
        heartbeat_ms: IDLE_HEARTBEAT_MS,
        connect_timeout_ms: CONNECT_TIMEOUT_MS,
        auth_timeout_ms: AUTH_TIMEOUT_MS,
        device_prefix: if octet == WARMUP_OCTET { "warm-".into() } else { "idle-".into() },
        transport: args.transport,
        ca_der: server.ca_der().to_vec(),
    }
}

fn measure(
    args: &IdleArgs,
    connections: u32,
    h: &mut Harness,
    server: &mut ServerProcess,
    key: &BenchKey,
    counts: &[u32],
    shards: u16,
) -> anyhow::Result<IdleRecord> {
    let startup_rss = server.rss_bytes()?;
    let startup_fds = server.open_fds()?;

    if args.warmup > 0 {
        let mut pool = WorkerPool::spawn(&[spec(server, key, args, 0, args.warmup, WARMUP_OCTET)])?;
        let warm = pool.wait_connected(h, "warm-up", &mut || server.check_alive())?;
        if warm.failed > 0 {
            bail!("warm-up: {} of {} connections failed: {:?}", warm.failed, args.warmup, warm.failures);
        }
        pool.release(h)?;
        server.wait_fds_at_most(startup_fds, WARMUP_CLOSE_TIMEOUT, h).context("after the warm-up")?;
    }
    let baseline = server.wait_rss_settled(h)?;
    let baseline_fds = server.open_fds()?;
    let kernel_before = KernelMem::read()?;
    h.note(&format!(
        "baseline RSS {} (start-up {}, after {} warm-up connections; settled: {})",
        mib(baseline.rss_bytes),
        mib(startup_rss),
        args.warmup,
        baseline.stable
    ));

    let specs: Vec<WorkerSpec> = counts
        .iter()
        .enumerate()
        .map(|(i, &n)| spec(server, key, args, i as u32, n, FIRST_WORKER_OCTET + i as u8))
        .collect();
    let mut pool = WorkerPool::spawn(&specs)?;
    let summary: ConnectSummary = pool.wait_connected(h, "idle", &mut || server.check_alive())?;
    h.note(&format!(
        "{} connected, {} failed in {:.2} s ({:.0} connects/s)",
        summary.connected,
        summary.failed,
        summary.span_s(),
        summary.connects_per_sec()
    ));

    let after = server.wait_rss_settled(h)?;
    let after_fds = server.open_fds()?;
    let kernel_after = KernelMem::read()?;
    let server_conns_held = after_fds as i64 - baseline_fds as i64;
    if server_conns_held != i64::from(summary.connected) {
        h.note(&format!(
            "warning: the server holds {server_conns_held} more open files than at the baseline, \
             but {} connections were authenticated",
            summary.connected
        ));
    }
    let per_conn = (after.rss_bytes as f64 - baseline.rss_bytes as f64) / f64::from(summary.connected.max(1));
    h.note(&format!(
        "server RSS {} -> {}: {per_conn:.0} B per connection (settled: {}, after {:.1} s)",
        mib(baseline.rss_bytes),
        mib(after.rss_bytes),
        after.stable,
        after.waited.as_secs_f64()
    ));
    let held = pool.release(h)?;
    if held != summary.connected {
        h.note(&format!("warning: workers closed {held} connections but reported {} connected", summary.connected));
    }

    Ok(IdleRecord {
        scenario: "idle",
        transport: args.transport,
        connections,
        connected: summary.connected,
        shards,
        workers: counts.len() as u32,
        in_flight_per_worker: args.common.in_flight,
        connects_per_sec: round(summary.connects_per_sec(), 0),
        connect_phase_s: round(summary.span_s(), 3),
        server_rss_startup_bytes: startup_rss,
        server_rss_baseline_bytes: baseline.rss_bytes,
        server_rss_after_bytes: after.rss_bytes,
        rss_bytes_per_conn: round(per_conn, 1),
        rss_settled: baseline.stable && after.stable,
        server_conns_held,
        server_clean_exit: false,
        failures: summary.failed,
        failure_reasons: summary.failures,
        warmup_connections: args.warmup,
        kernel: KernelRecord::new(kernel_before, kernel_after, summary.connected),
        run: RunInfo::now(h.elapsed()),
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_curve_reports_each_size_and_the_spread() {
        let line = scale_curve_line(&[(2000, 900.0), (19_000, 990.0)]);
        assert_eq!(line, "scale curve (server RSS per connection): 2000: 900 B, 19000: 990 B; max/min 1.10");
    }
}
