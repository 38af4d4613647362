//! Scenario `broadcast`: does a paced broadcast run at the configured rate?
//!
//! The node is started with `push.broadcast_rate_per_sec = --broadcast-rate`
//! (shared evenly by its shards); N clients connect; the backend sends
//! `--broadcasts` broadcasts at once and the bench measures when the
//! deliveries arrive: achieved deliveries/s against the configured rate,
//! and completion time against the ideal `deliveries / rate`.

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
pub struct BroadcastArgs {
    /// Clients to connect.
    #[arg(long, default_value_t = 10_000)]
    pub connections: u32,
    /// The node's broadcast rate limit, deliveries/s (config
    /// `push.broadcast_rate_per_sec`).
    #[arg(long, default_value_t = 20_000)]
    pub broadcast_rate: u32,
    /// Broadcasts sent (all at once; the node queues and paces them).
    #[arg(long, default_value_t = 1)]
    pub broadcasts: u64,
    /// Payload size in bytes (the first 16 are the timestamp and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The `broadcast` result record (README.md describes every field).
#[derive(Debug, Serialize)]
struct BroadcastRecord {
    scenario: &'static str,
    connections: u32,
    connected: u32,
    shards: u16,
    workers: u32,
    payload_bytes: usize,
    broadcasts: u64,
    configured_rate_per_sec: u32,
    replies_accepted: u64,
    request_errors: Reasons,
    deliveries_expected: u64,
    deliveries_received: u64,
    lost: u64,
    completion_s: f64,
    ideal_completion_s: f64,
    deliveries_per_sec: f64,
    rate_ratio: f64,
    first_delivery_s: f64,
    latency_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    /// Server CPU per push and per delivery over the measured window.
    counted_cpu: CountedCpu,
    server_clean_exit: bool,
    client_disconnects: Reasons,
    latency_hist: String,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &BroadcastArgs) -> anyhow::Result<()> {
    if args.broadcasts == 0 || args.broadcast_rate == 0 {
        bail!("--broadcasts and --broadcast-rate must be at least 1");
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let (mut cfg, key) = Rig::config(&args.common)?;
    cfg.session.heartbeat_default_ms = NO_PING_HEARTBEAT_MS;
    cfg.push.broadcast_rate_per_sec = args.broadcast_rate;
    let load = LoadOptions {
        connections: args.connections,
        heartbeat_ms: NO_PING_HEARTBEAT_MS,
        join_group: None,
        churn_per_sec: 0.0,
        reconnect: false,
        device_prefix: "bc-".into(),
        transport: crate::links::Transport::Tcp,
        link_addr: None,
    };
    let mut rig = Rig::start(&mut h, &args.common, &cfg, &key, &load)?;
    match measure(args, &mut h, &mut rig) {
        Ok(mut rec) => {
            rec.server_clean_exit = rig.finish(&mut h)?;
            rec.run = RunInfo::now(h.elapsed());
            record::emit(&rec, &args.common.out())?;
            if rec.lost > 0 {
                bail!("{} deliveries lost", rec.lost);
            }
            Ok(())
        }
        Err(err) => Err(with_log_tail(err, &rig.log_tail())),
    }
}

fn measure(args: &BroadcastArgs, h: &mut Harness, rig: &mut Rig) -> anyhow::Result<BroadcastRecord> {
    let plan = PushPlan {
        addr: rig.push_addr()?,
        connections: 1,
        rate_per_sec: 0.0,
        count: args.broadcasts,
        target: Target::Broadcast,
        payload_bytes: args.payload_bytes,
        reply_grace: Duration::from_secs(10),
    };
    let cpu = CpuMeter::start(rig.server.pid(), rig.pool.pids());
    let out = run_push(h, rig, &plan, "broadcast")?;
    let ideal_s = out.sessions as f64 / f64::from(args.broadcast_rate);
    let max_wait = Duration::from_secs_f64(ideal_s * 3.0 + 10.0);
    rig.wait_received(h, out.sessions, Duration::from_secs(3), max_wait)?;
    let cpu = cpu.read();
    h.note(&cpu_line(&cpu));
    let (counts, hist) = rig.report(h)?;
    let counted_cpu = CountedCpu::of(&cpu, out.sent, counts.received);
    h.note(&counted_cpu.line());
    let completion_s = counts.last_recv_mono_ns.saturating_sub(out.first_send_mono_ns) as f64 / 1e9;
    let first_s = counts.first_recv_mono_ns.saturating_sub(out.first_send_mono_ns) as f64 / 1e9;
    let rate = if completion_s > 0.0 { counts.received as f64 / completion_s } else { 0.0 };
    let latency_us = LatencySummary::of(&hist);
    h.note(&format!(
        "{} deliveries of {} in {completion_s:.3} s (ideal {ideal_s:.3} s): {rate:.0}/s against {} configured",
        counts.received, out.sessions, args.broadcast_rate
    ));
    Ok(BroadcastRecord {
        scenario: "broadcast",
        connections: args.connections,
        connected: rig.connected.connected,
        shards: rig.shards,
        workers: rig.specs.len() as u32,
        payload_bytes: args.payload_bytes.max(latency::STAMP_BYTES),
        broadcasts: args.broadcasts,
        configured_rate_per_sec: args.broadcast_rate,
        replies_accepted: out.accepted,
        request_errors: out.request_errors.clone(),
        deliveries_expected: out.sessions,
        deliveries_received: counts.received,
        lost: out.sessions.saturating_sub(counts.received),
        completion_s: round(completion_s, 4),
        ideal_completion_s: round(ideal_s, 4),
        deliveries_per_sec: round(rate, 0),
        rate_ratio: round(rate / f64::from(args.broadcast_rate), 3),
        first_delivery_s: round(first_s, 4),
        latency_us,
        cpu,
        counted_cpu,
        server_clean_exit: false,
        client_disconnects: counts.disconnects,
        latency_hist: latency::encode(&hist)?,
        run: RunInfo::now(h.elapsed()),
    })
}
