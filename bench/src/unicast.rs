//! Scenario `unicast`: push-to-receive latency of single-device pushes at
//! an open-loop rate.
//!
//! N clients connect from the load workers; backend connections push to a
//! uniformly random device at `--rate` pushes/s for `--duration-s`
//! seconds, each payload stamped with its intended send time. Workers time
//! every message into hdrhistograms, which the parent merges. A warm-up at
//! the same rate comes first and is not measured.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use crate::drive::{
    CountedCpu, CpuMeter, CpuSplit, LoadOptions, NO_PING_HEARTBEAT_MS, Reasons, Rig, cpu_line, run_push, with_log_tail,
};
use crate::harness::{CommonArgs, Harness};
use crate::latency::{self, LatencySummary};
use crate::pusher::{PushPlan, Target};
use crate::record::{self, RunInfo, round};
use crate::sys;

#[derive(Debug, Clone, clap::Args)]
pub struct UnicastArgs {
    /// Clients to connect.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u32,
    /// Pushes per second (open loop, all backend connections together).
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
    /// Length of the measured phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Unmeasured warm-up at the same rate before it, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Push-port connections, each with its own sender and reply thread.
    /// One keeps up with 50k/s here; more split the node's batching (see
    /// README.md).
    #[arg(long, default_value_t = 1)]
    pub backends: u32,
    /// Payload size in bytes (the first 16 are the timestamp and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Measure at each of these rates in turn, on the same node and
    /// clients (comma-separated; replaces --rate): one record per rate.
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// Pin this process, its push threads and its client workers to CPU 0
    /// and every server thread to CPU 1, so the server's CPU and the load
    /// generator's do not share a core (needs 2 CPUs; meant for --shards 1).
    #[arg(long)]
    pub pin: bool,
    /// How the clients connect: plain TCP or WebSocket (`server.ws_listen`
    /// on a free loopback port).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: crate::links::Transport,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// CPUs of `--pin`: the load generator's and the server's.
const PIN_BENCH_CPU: usize = 0;
const PIN_SERVER_CPU: usize = 1;

/// The `unicast` result record (README.md describes every field).
#[derive(Debug, Serialize)]
struct UnicastRecord {
    scenario: &'static str,
    /// tcp or ws.
    transport: crate::links::Transport,
    connections: u32,
    connected: u32,
    shards: u16,
    workers: u32,
    backends: u32,
    payload_bytes: usize,
    rate_per_sec: f64,
    /// `--pin`: bench and clients on CPU 0, server on CPU 1.
    pinned: bool,
    load_duration_s: f64,
    warmup_s: f64,
    pushes_sent: u64,
    achieved_rate_per_sec: f64,
    replies: u64,
    replies_delivered: u64,
    replies_not_online: u64,
    replies_rejected: u64,
    replies_missing: u64,
    request_errors: Reasons,
    backend_errors: Vec<String>,
    messages_expected: u64,
    messages_received: u64,
    lost: u64,
    latency_us: LatencySummary,
    push_reply_latency_us: LatencySummary,
    sender_lag_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    /// Server CPU per push and per delivery over the measured window.
    counted_cpu: CountedCpu,
    server_rss_before_bytes: u64,
    server_rss_after_bytes: u64,
    server_clean_exit: bool,
    client_disconnects: Reasons,
    /// Merged push-to-receive histogram (ns), hdrhistogram V2, base64.
    latency_hist: String,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &UnicastArgs) -> anyhow::Result<()> {
    let rates = if args.rates.is_empty() { vec![args.rate] } else { args.rates.clone() };
    if rates.iter().any(|&r| r <= 0.0) || args.duration_s <= 0.0 {
        bail!("--rate(s) and --duration-s must be positive");
    }
    if args.pin {
        if sys::host_cores() < 2 {
            bail!("--pin needs 2 CPUs (bench on CPU {PIN_BENCH_CPU}, server on CPU {PIN_SERVER_CPU})");
        }
        // Before any thread or child exists: they all inherit the mask.
        sys::pin_thread(0, PIN_BENCH_CPU)?;
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let (mut cfg, key) = Rig::config(&args.common)?;
    let link_dir = std::env::temp_dir().join(format!("longlink-bench-links-{}", std::process::id()));
    let link_addr = match args.transport {
        crate::links::Transport::Tcp => None,
        crate::links::Transport::Ws => crate::links::configure(&mut cfg, args.transport, &link_dir)?.0,
        other => anyhow::bail!("--transport {other:?}: push scenarios run over tcp or ws"),
    };
    cfg.session.heartbeat_default_ms = NO_PING_HEARTBEAT_MS;
    let load = LoadOptions {
        connections: args.connections,
        heartbeat_ms: NO_PING_HEARTBEAT_MS,
        join_group: None,
        churn_per_sec: 0.0,
        reconnect: false,
        device_prefix: "uni-".into(),
        transport: args.transport,
        link_addr,
    };
    let mut rig = Rig::start(&mut h, &args.common, &cfg, &key, &load)?;
    if args.pin {
        let threads = sys::pin_process(rig.server.pid(), PIN_SERVER_CPU)?;
        h.note(&format!(
            "pinned: bench and {} client workers on CPU {PIN_BENCH_CPU}, the server's {threads} threads on CPU \
             {PIN_SERVER_CPU}",
            rig.specs.len()
        ));
    }
    let mut records = Vec::new();
    for &rate in &rates {
        match measure(args, rate, &mut h, &mut rig) {
            Ok(rec) => records.push(rec),
            Err(err) => return Err(with_log_tail(err, &rig.log_tail())),
        }
    }
    let clean = rig.finish(&mut h)?;
    let (mut lost, mut missing) = (0, 0);
    for mut rec in records {
        rec.server_clean_exit = clean;
        rec.run = RunInfo::now(h.elapsed());
        record::emit(&rec, &args.common.out())?;
        lost += rec.lost;
        missing += rec.replies_missing;
    }
    if rates.len() > 1 {
        h.note("one record per rate above");
    }
    if lost > 0 || missing > 0 {
        bail!("{lost} messages lost, {missing} replies missing");
    }
    Ok(())
}

fn measure(args: &UnicastArgs, rate: f64, h: &mut Harness, rig: &mut Rig) -> anyhow::Result<UnicastRecord> {
    let devices = Arc::new(rig.device_ids());
    let addr = rig.push_addr()?;
    let plan = |seconds: f64| PushPlan {
        addr,
        connections: args.backends,
        rate_per_sec: rate,
        count: (rate * seconds).round() as u64,
        target: Target::RandomDevice(devices.clone()),
        payload_bytes: args.payload_bytes,
        reply_grace: Duration::from_secs(5),
    };
    if args.warmup_s > 0.0 {
        let warm = plan(args.warmup_s);
        let out = run_push(h, rig, &warm, "warm-up")?;
        rig.wait_received(h, out.sessions, Duration::from_secs(1), Duration::from_secs(5))?;
        rig.reset(h)?;
        h.note(&format!("warm-up: {} pushes at {:.0}/s", out.sent, out.achieved_rate()));
    }
    let rss_before = rig.server.rss_bytes()?;
    let cpu = CpuMeter::start(rig.server.pid(), rig.pool.pids());
    let out = run_push(h, rig, &plan(args.duration_s), "unicast")?;
    let cpu = cpu.read();
    rig.wait_received(h, out.sessions, Duration::from_secs(2), Duration::from_secs(10))?;
    let (counts, hist) = rig.report(h)?;
    let latency_us = LatencySummary::of(&hist);
    h.note(&format!(
        "sent {} at {:.0}/s: received {} of {} delivered; latency {}",
        out.sent,
        out.achieved_rate(),
        counts.received,
        out.sessions,
        latency_us.line()
    ));
    h.note(&cpu_line(&cpu));
    let counted_cpu = CountedCpu::of(&cpu, out.sent, counts.received);
    h.note(&counted_cpu.line());
    Ok(UnicastRecord {
        scenario: "unicast",
        transport: args.transport,
        connections: args.connections,
        connected: rig.connected.connected,
        shards: rig.shards,
        workers: rig.specs.len() as u32,
        backends: args.backends,
        payload_bytes: args.payload_bytes.max(latency::STAMP_BYTES),
        rate_per_sec: rate,
        pinned: args.pin,
        load_duration_s: args.duration_s,
        warmup_s: args.warmup_s,
        pushes_sent: out.sent,
        achieved_rate_per_sec: round(out.achieved_rate(), 1),
        replies: out.replies,
        replies_delivered: out.delivered,
        replies_not_online: out.not_online,
        replies_rejected: out.rejected,
        replies_missing: out.missing_replies(),
        request_errors: out.request_errors.clone(),
        backend_errors: out.connection_errors.clone(),
        messages_expected: out.sessions,
        messages_received: counts.received,
        lost: out.sessions.saturating_sub(counts.received),
        latency_us,
        push_reply_latency_us: LatencySummary::of(&out.reply_hist),
        sender_lag_us: LatencySummary::of(&out.lag_hist),
        cpu,
        counted_cpu,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rig.server.rss_bytes()?,
        server_clean_exit: false,
        client_disconnects: counts.disconnects,
        latency_hist: latency::encode(&hist)?,
        run: RunInfo::now(h.elapsed()),
    })
}
