//! Scenario `fanout`: group multicast throughput and delivery latency.
//!
//! M clients join one group (their own Join frame, right after AuthOk);
//! the bench waits until the node counts M online members, sends a small
//! unmeasured warm-up, then the backend pushes K messages to the group at
//! R per second (`--rate 0`: all at once). Deliveries/s is every delivery
//! divided by the time from the first send to the last receive.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use longlink::backend::PushClient;
use serde::Serialize;

use crate::drive::{
    CountedCpu, CpuMeter, CpuSplit, LoadOptions, NO_PING_HEARTBEAT_MS, Reasons, Rig, cpu_line, run_push, with_log_tail,
};
use crate::harness::{CommonArgs, Harness};
use crate::latency::{self, LatencySummary};
use crate::pusher::{PushPlan, Target};
use crate::record::{self, RunInfo, round};

/// How long the node may take to count every Join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Group members (clients).
    #[arg(long, default_value_t = 10_000)]
    pub members: u32,
    /// Messages pushed to the group.
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Group pushes per second; 0 sends them all at once.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Unmeasured group pushes before the measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Payload size in bytes (the first 16 are the timestamp and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Group name.
    #[arg(long, default_value = "bench-fanout")]
    pub group: String,
    /// How the clients connect: plain TCP or WebSocket (`server.ws_listen`
    /// on a free loopback port).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: crate::links::Transport,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The `fanout` result record (README.md describes every field).
#[derive(Debug, Serialize)]
struct FanoutRecord {
    scenario: &'static str,
    /// tcp or ws.
    transport: crate::links::Transport,
    members: u32,
    connected: u32,
    joined: u64,
    shards: u16,
    workers: u32,
    payload_bytes: usize,
    messages: u64,
    rate_per_sec: f64,
    pushes_sent: u64,
    replies_delivered: u64,
    replies_missing: u64,
    request_errors: Reasons,
    deliveries_expected: u64,
    deliveries_received: u64,
    lost: u64,
    deliveries_per_sec: f64,
    first_send_to_last_receive_s: f64,
    send_span_s: f64,
    latency_us: LatencySummary,
    push_reply_latency_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    /// Server CPU per push and per delivery over the measured window.
    counted_cpu: CountedCpu,
    server_rss_before_bytes: u64,
    server_rss_after_bytes: u64,
    server_clean_exit: bool,
    client_disconnects: Reasons,
    latency_hist: String,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &FanoutArgs) -> anyhow::Result<()> {
    if args.messages == 0 || args.rate < 0.0 {
        bail!("--messages must be at least 1 and --rate at least 0");
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
        connections: args.members,
        heartbeat_ms: NO_PING_HEARTBEAT_MS,
        join_group: Some(args.group.clone()),
        churn_per_sec: 0.0,
        reconnect: false,
        device_prefix: "fan-".into(),
        transport: args.transport,
        link_addr,
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

/// Polls the node's online member count of `group` until it reaches `want`.
pub fn wait_members(h: &mut Harness, rig: &mut Rig, group: &str, want: u64) -> anyhow::Result<u64> {
    let mut client = PushClient::connect(rig.push_addr()?, Duration::from_secs(5), &crate::server::bench_push_key())
        .context("presence client")?;
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        h.check()?;
        rig.server.check_alive()?;
        let reply = client.presence::<&str>(&[], &[], &[group]).context("presence query")?;
        let online = reply.groups.first().map_or(0, |g| g.online);
        h.progress(&format!("[join] {online} of {want} members online in {group:?}"));
        if online >= want {
            return Ok(online);
        }
        if Instant::now() >= deadline {
            bail!("only {online} of {want} members joined {group:?} within {} s", JOIN_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn measure(args: &FanoutArgs, h: &mut Harness, rig: &mut Rig) -> anyhow::Result<FanoutRecord> {
    let joined = wait_members(h, rig, &args.group, u64::from(rig.connected.connected))?;
    let addr = rig.push_addr()?;
    let plan = |count: u64| PushPlan {
        addr,
        connections: 1,
        rate_per_sec: args.rate,
        count,
        target: Target::Group(args.group.clone()),
        payload_bytes: args.payload_bytes,
        // The node answers a group push after its local deliveries; under a
        // burst the replies can trail the sends by many seconds.
        reply_grace: Duration::from_secs(120),
    };
    if args.warmup > 0 {
        let out = run_push(h, rig, &plan(args.warmup), "warm-up")?;
        rig.wait_received(h, out.sessions, Duration::from_secs(2), Duration::from_secs(10))?;
        rig.reset(h)?;
    }
    let rss_before = rig.server.rss_bytes()?;
    let cpu = CpuMeter::start(rig.server.pid(), rig.pool.pids());
    let out = run_push(h, rig, &plan(args.messages), "fanout")?;
    // Without every reply, expect each member to get each push.
    let expected = if out.missing_replies() == 0 { out.sessions } else { out.sent * joined };
    let counts = rig.wait_received(h, expected, Duration::from_secs(3), Duration::from_secs(60))?;
    let cpu = cpu.read();
    let (counts_final, hist) = rig.report(h)?;
    debug_assert!(counts_final.received >= counts.received);
    let span_s = counts_final.last_recv_mono_ns.saturating_sub(out.first_send_mono_ns) as f64 / 1e9;
    let rate = if span_s > 0.0 { counts_final.received as f64 / span_s } else { 0.0 };
    let latency_us = LatencySummary::of(&hist);
    h.note(&format!(
        "{} group pushes to {joined} members: {} of {} deliveries in {span_s:.3} s = {rate:.0}/s; latency {}",
        out.sent,
        counts_final.received,
        expected,
        latency_us.line()
    ));
    h.note(&cpu_line(&cpu));
    let counted_cpu = CountedCpu::of(&cpu, out.sent, counts_final.received);
    h.note(&counted_cpu.line());
    Ok(FanoutRecord {
        scenario: "fanout",
        transport: args.transport,
        members: args.members,
        connected: rig.connected.connected,
        joined,
        shards: rig.shards,
        workers: rig.specs.len() as u32,
        payload_bytes: args.payload_bytes.max(latency::STAMP_BYTES),
        messages: args.messages,
        rate_per_sec: args.rate,
        pushes_sent: out.sent,
        replies_delivered: out.delivered,
        replies_missing: out.missing_replies(),
        request_errors: out.request_errors.clone(),
        deliveries_expected: expected,
        deliveries_received: counts_final.received,
        lost: expected.saturating_sub(counts_final.received),
        deliveries_per_sec: round(rate, 0),
        first_send_to_last_receive_s: round(span_s, 4),
        send_span_s: round(out.last_send_mono_ns.saturating_sub(out.first_send_mono_ns) as f64 / 1e9, 4),
        latency_us,
        push_reply_latency_us: LatencySummary::of(&out.reply_hist),
        cpu,
        counted_cpu,
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rig.server.rss_bytes()?,
        server_clean_exit: false,
        client_disconnects: counts_final.disconnects,
        latency_hist: latency::encode(&hist)?,
        run: RunInfo::now(h.elapsed()),
    })
}
