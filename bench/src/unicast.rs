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
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The `unicast` result record (README.md describes every field).
#[derive(Debug, Serialize)]
struct UnicastRecord {
    scenario: &'static str,
    connections: u32,
    connected: u32,
    shards: u16,
    workers: u32,
    backends: u32,
    payload_bytes: usize,
    rate_per_sec: f64,
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
    if args.rate <= 0.0 || args.duration_s <= 0.0 {
        bail!("--rate and --duration-s must be positive");
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let (mut cfg, key) = Rig::config(&args.common)?;
    cfg.session.heartbeat_default_ms = NO_PING_HEARTBEAT_MS;
    let load = LoadOptions {
        connections: args.connections,
        heartbeat_ms: NO_PING_HEARTBEAT_MS,
        join_group: None,
        churn_per_sec: 0.0,
        reconnect: false,
        device_prefix: "uni-".into(),
    };
    let mut rig = Rig::start(&mut h, &args.common, &cfg, &key, &load)?;
    match measure(args, &mut h, &mut rig) {
        Ok(mut rec) => {
            rec.server_clean_exit = rig.finish(&mut h)?;
            rec.run = RunInfo::now(h.elapsed());
            record::emit(&rec, &args.common.out())?;
            if rec.lost > 0 || rec.replies_missing > 0 {
                bail!("{} messages lost, {} replies missing", rec.lost, rec.replies_missing);
            }
            Ok(())
        }
        Err(err) => Err(with_log_tail(err, &rig.log_tail())),
    }
}

fn measure(args: &UnicastArgs, h: &mut Harness, rig: &mut Rig) -> anyhow::Result<UnicastRecord> {
    let devices = Arc::new(rig.device_ids());
    let addr = rig.push_addr()?;
    let plan = |seconds: f64| PushPlan {
        addr,
        connections: args.backends,
        rate_per_sec: args.rate,
        count: (args.rate * seconds).round() as u64,
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
        connections: args.connections,
        connected: rig.connected.connected,
        shards: rig.shards,
        workers: rig.specs.len() as u32,
        backends: args.backends,
        payload_bytes: args.payload_bytes.max(latency::STAMP_BYTES),
        rate_per_sec: args.rate,
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
