//! Scenario `soak`: steady load for minutes; does the server's memory
//! stay flat?
//!
//! N clients ping on a short heartbeat, a fraction of them close and
//! reconnect (the same device) every second, and a backend pushes to
//! random devices at a steady rate. The server's RSS is sampled every few
//! seconds into the record with the clients' counters; the record gives
//! RSS start/end/max and the least-squares slope.
//!
//! With churn, a message the node queued to a session the client was
//! closing is lost by design (at-most-once QoS), so `lost` is an upper
//! bound, not a bug count; without churn it should be 0.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::drive::{CountedCpu, CpuMeter, CpuSplit, LoadOptions, Reasons, Rig, cpu_line, with_log_tail};
use crate::harness::{CommonArgs, Harness};
use crate::latency::{self, LatencySummary};
use crate::pusher::{PushPlan, Pusher, Target};
use crate::record::{self, RunInfo, round};

#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Clients to connect.
    #[arg(long, default_value_t = 5_000)]
    pub connections: u32,
    /// Length of the soak, minutes.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// Client heartbeat interval, ms (the server's minimum is lowered to it).
    #[arg(long, default_value_t = 5_000)]
    pub ping_ms: u32,
    /// Unicast pushes per second to random devices.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
    /// Fraction of the clients that disconnect and reconnect per second.
    #[arg(long, default_value_t = 0.01)]
    pub churn: f64,
    /// Seconds between two RSS samples.
    #[arg(long, default_value_t = 5.0)]
    pub sample_s: f64,
    /// Push-port connections.
    #[arg(long, default_value_t = 1)]
    pub backends: u32,
    /// Payload size in bytes (the first 16 are the timestamp and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// One sample during the soak.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    t_s: f64,
    rss_bytes: u64,
    server_fds: u64,
    clients_connected: u32,
    received: u64,
}

/// The `soak` result record (README.md describes every field).
#[derive(Debug, Serialize)]
struct SoakRecord {
    scenario: &'static str,
    connections: u32,
    connected: u32,
    shards: u16,
    workers: u32,
    minutes: f64,
    ping_ms: u32,
    rate_per_sec: f64,
    churn_per_sec: f64,
    pushes_sent: u64,
    achieved_rate_per_sec: f64,
    replies_delivered: u64,
    replies_not_online: u64,
    replies_missing: u64,
    request_errors: Reasons,
    messages_expected: u64,
    messages_received: u64,
    lost_upper_bound: u64,
    churned: u64,
    reconnects: u64,
    reconnect_failures: u64,
    client_disconnects: Reasons,
    pongs: u64,
    latency_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    /// Server CPU per push and per delivery over the measured window.
    counted_cpu: CountedCpu,
    /// `[t_s, rss_bytes]` every `--sample-s` seconds from the start of the load.
    rss_samples: Vec<(f64, u64)>,
    rss_start_bytes: u64,
    rss_end_bytes: u64,
    rss_max_bytes: u64,
    rss_slope_bytes_per_min: f64,
    rss_slope_second_half_bytes_per_min: f64,
    server_fds_start: u64,
    server_fds_end: u64,
    samples: Vec<Sample>,
    server_clean_exit: bool,
    latency_hist: String,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &SoakArgs) -> anyhow::Result<()> {
    if args.minutes <= 0.0 || args.rate < 0.0 || !(0.0..1.0).contains(&args.churn) || args.sample_s <= 0.0 {
        bail!("need --minutes > 0, --rate >= 0, 0 <= --churn < 1, --sample-s > 0");
    }
    // The soak itself plus connect, drain and stop.
    let timeout = args.common.timeout_s.max((args.minutes * 60.0) as u64 + 300);
    let mut h = Harness::new(Duration::from_secs(timeout))?;
    let (mut cfg, key) = Rig::config(&args.common)?;
    cfg.session.heartbeat_min_ms = cfg.session.heartbeat_min_ms.min(args.ping_ms);
    cfg.session.heartbeat_default_ms = args.ping_ms;
    let load = LoadOptions {
        connections: args.connections,
        heartbeat_ms: args.ping_ms,
        join_group: None,
        churn_per_sec: args.churn,
        reconnect: true,
        device_prefix: "soak-".into(),
        transport: crate::links::Transport::Tcp,
        link_addr: None,
    };
    let mut rig = Rig::start(&mut h, &args.common, &cfg, &key, &load)?;
    match measure(args, &mut h, &mut rig) {
        Ok(mut rec) => {
            rec.server_clean_exit = rig.finish(&mut h)?;
            rec.run = RunInfo::now(h.elapsed());
            record::emit(&rec, &args.common.out())?;
            Ok(())
        }
        Err(err) => Err(with_log_tail(err, &rig.log_tail())),
    }
}

fn measure(args: &SoakArgs, h: &mut Harness, rig: &mut Rig) -> anyhow::Result<SoakRecord> {
    let settled = rig.server.wait_rss_settled(h)?;
    h.note(&format!("RSS at start {:.1} MiB (settled: {})", settled.rss_bytes as f64 / 1048576.0, settled.stable));
    let fds_start = rig.server.open_fds()?;
    let seconds = args.minutes * 60.0;
    let plan = PushPlan {
        addr: rig.push_addr()?,
        connections: args.backends,
        rate_per_sec: args.rate,
        count: (args.rate * seconds).round() as u64,
        target: Target::RandomDevice(Arc::new(rig.device_ids())),
        payload_bytes: args.payload_bytes,
        reply_grace: Duration::from_secs(5),
    };
    let cpu = CpuMeter::start(rig.server.pid(), rig.pool.pids());
    let pusher = Pusher::start(&plan)?;
    let started = Instant::now();
    let every = Duration::from_secs_f64(args.sample_s);
    let mut samples = Vec::new();
    let mut next = started;
    // With no pushes (rate 0) the pusher is done at once; the soak still lasts.
    while started.elapsed().as_secs_f64() < seconds || !pusher.is_finished() {
        h.check()?;
        rig.server.check_alive()?;
        if Instant::now() >= next {
            let stats = rig.stats(h)?;
            let s = Sample {
                t_s: round(started.elapsed().as_secs_f64(), 1),
                rss_bytes: rig.server.rss_bytes()?,
                server_fds: rig.server.open_fds()?,
                clients_connected: stats.connected_now,
                received: stats.received,
            };
            samples.push(s);
            let (sent, _) = pusher.progress();
            h.progress(&format!(
                "[soak] {:.0}/{seconds:.0} s  RSS {:.1} MiB  fds {}  connected {}  sent {sent}  received {}  churned {}",
                s.t_s,
                s.rss_bytes as f64 / 1048576.0,
                s.server_fds,
                s.clients_connected,
                s.received,
                stats.churned
            ));
            next += every;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = pusher.finish()?;
    let cpu = cpu.read();
    h.note(&cpu_line(&cpu));
    rig.wait_received(h, out.sessions, Duration::from_secs(2), Duration::from_secs(10))?;
    let (counts, hist) = rig.report(h)?;
    let counted_cpu = CountedCpu::of(&cpu, out.sent, counts.received);
    h.note(&counted_cpu.line());
    let rss: Vec<(f64, u64)> = samples.iter().map(|s| (s.t_s, s.rss_bytes)).collect();
    let half = rss.len() / 2;
    let latency_us = LatencySummary::of(&hist);
    let slope = slope_per_min(&rss);
    h.note(&format!(
        "RSS {:.1} -> {:.1} MiB (max {:.1}), slope {slope:.0} B/min; received {} of {}; latency {}",
        rss.first().map_or(0, |r| r.1) as f64 / 1048576.0,
        rss.last().map_or(0, |r| r.1) as f64 / 1048576.0,
        rss.iter().map(|r| r.1).max().unwrap_or(0) as f64 / 1048576.0,
        counts.received,
        out.sessions,
        latency_us.line()
    ));
    Ok(SoakRecord {
        scenario: "soak",
        connections: args.connections,
        connected: rig.connected.connected,
        shards: rig.shards,
        workers: rig.specs.len() as u32,
        minutes: args.minutes,
        ping_ms: args.ping_ms,
        rate_per_sec: args.rate,
        churn_per_sec: args.churn,
        pushes_sent: out.sent,
        achieved_rate_per_sec: round(out.achieved_rate(), 1),
        replies_delivered: out.delivered,
        replies_not_online: out.not_online,
        replies_missing: out.missing_replies(),
        request_errors: out.request_errors.clone(),
        messages_expected: out.sessions,
        messages_received: counts.received,
        lost_upper_bound: out.sessions.saturating_sub(counts.received),
        churned: counts.churned,
        reconnects: counts.reconnects,
        reconnect_failures: counts.reconnect_failures,
        client_disconnects: counts.disconnects.clone(),
        pongs: counts.pongs,
        latency_us,
        cpu,
        counted_cpu,
        rss_start_bytes: rss.first().map_or(0, |r| r.1),
        rss_end_bytes: rss.last().map_or(0, |r| r.1),
        rss_max_bytes: rss.iter().map(|r| r.1).max().unwrap_or(0),
        rss_slope_bytes_per_min: round(slope, 0),
        rss_slope_second_half_bytes_per_min: round(slope_per_min(&rss[half..]), 0),
        rss_samples: rss,
        server_fds_start: fds_start,
        server_fds_end: rig.server.open_fds()?,
        samples,
        server_clean_exit: false,
        latency_hist: latency::encode(&hist)?,
        run: RunInfo::now(h.elapsed()),
    })
}

/// Least-squares slope of `(t_s, bytes)` points, in bytes per minute.
pub fn slope_per_min(points: &[(f64, u64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, y) in points {
        num += (t - mean_t) * (y as f64 - mean_y);
        den += (t - mean_t).powi(2);
    }
    if den == 0.0 { 0.0 } else { num / den * 60.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_flat_data() {
        let line: Vec<(f64, u64)> = (0..10).map(|i| (f64::from(i) * 6.0, 1000 + 100 * i as u64)).collect();
        assert!((slope_per_min(&line) - 1000.0).abs() < 1e-6);
        assert_eq!(slope_per_min(&[(0.0, 5), (60.0, 5)]), 0.0);
        assert_eq!(slope_per_min(&[(0.0, 5)]), 0.0);
    }
}
