//! `longlink-bench compare`: the same idle, unicast and fan-out loads
//! against longlink, nats-server and mosquitto in one run (issue 15).
//!
//! Per server and phase: a fresh server process (longlink with the bench
//! config, the peers with the configs in [`nats::server_config`] and
//! [`mqtt::server_config`]), clients in worker processes with the same
//! structure and the same latency method (longlink: [`crate::loadworker`];
//! peers: [`peerworker`], a NATS or MQTT client per connection), spread
//! over 127.x.y.z sources, and a publisher in this process (longlink: the
//! push port, [`crate::pusher`]; peers: [`publish`]) sending stamped
//! payloads open loop.
//!
//! - idle: N clients subscribed to one shared group/subject/topic; server
//!   RSS per connection = (settled RSS after - settled RSS before) / N,
//!   after a warm-up batch was opened and closed.
//! - unicast: N clients each subscribed to their own subject (longlink: its
//!   device id); messages to a uniformly random client at a fixed rate;
//!   p50/p99, losses, server CPU per push.
//! - fan-out: M clients on one shared subject (longlink: one group); K
//!   messages at R/s; deliveries/s, p99, server CPU per delivery, losses.
//!
//! The figures go into one JSON record, a printed table with the ratios,
//! and a markdown table appended to `--report`.

pub mod mqtt;
pub mod nats;
pub mod peer;
pub mod peerworker;
pub mod publish;

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use longlink::backend::PushClient;
use serde::Serialize;

use crate::drive::{CountedCpu, CpuMeter, CpuSplit, NO_PING_HEARTBEAT_MS, sum_counts};
use crate::harness::{CommonArgs, Harness};
use crate::latency::{self, LatencySummary};
use crate::loadworker::{LoadCounts, LoadMsg, LoadSpec};
use crate::pool::{ConnectSummary, WorkerEvent, WorkerPool, plan_workers};
use crate::pusher::{PushPlan, Pusher, Target};
use crate::record::{self, RunInfo, round};
use crate::server::{BenchKey, ServerProcess, bench_config, check_server_bin, default_server_bin};
use crate::source::{FIRST_WORKER_OCTET, SourcePlan};
use crate::sys;
use crate::worker::{WorkerMsg, WorkerSpec, device_id};
use peer::{PeerKind, PeerProcess};
use peerworker::{PeerSpec, Protocol, Subscription, own_subject};
use publish::{PeerTarget, PublishPlan, Publisher};

/// Open files a server needs besides connections.
const SERVER_FD_MARGIN: u64 = 200;
const CONNECT_TIMEOUT_MS: u64 = 10_000;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connects in flight over all workers towards mosquitto: it listens with
/// a backlog of 100, and a full accept queue drops SYNs, which the client
/// retries after 1 s (at 256 in flight, 300 connects/s instead of 5,000).
const MOSQUITTO_IN_FLIGHT_TOTAL: u32 = 64;
/// Second octet of the warm-up worker's sources (below the workers').
const WARMUP_OCTET: u8 = FIRST_WORKER_OCTET - 1;
const SHARED_SUBJECT: &str = "bench-fanout";
/// RSS settling: two readings this far apart within this fraction.
const RSS_WINDOW: Duration = Duration::from_secs(1);
const RSS_TOLERANCE: f64 = 0.005;
const RSS_MAX_WAIT: Duration = Duration::from_secs(10);

/// A server to compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Which {
    #[serde(rename = "longlink")]
    Longlink,
    #[serde(rename = "nats-server")]
    Nats,
    #[serde(rename = "mosquitto")]
    Mosquitto,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Longlink => "longlink",
            Which::Nats => "nats-server",
            Which::Mosquitto => "mosquitto",
        }
    }

    fn peer(self) -> Option<PeerKind> {
        match self {
            Which::Longlink => None,
            Which::Nats => Some(PeerKind::Nats),
            Which::Mosquitto => Some(PeerKind::Mosquitto),
        }
    }
}

/// A phase of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Idle,
    Unicast,
    Fanout,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Servers to run, in this order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "longlink,nats,mosquitto")]
    pub servers: Vec<Which>,
    /// Phases to run for each server (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "idle,unicast,fanout")]
    pub phases: Vec<Phase>,
    /// idle: clients subscribed to one shared group/subject/topic.
    #[arg(long, default_value_t = 19_000)]
    pub idle_connections: u32,
    /// idle: clients opened and closed before the RSS baseline.
    #[arg(long, default_value_t = 200)]
    pub idle_warmup: u32,
    /// unicast: clients, each subscribed to its own subject.
    #[arg(long, default_value_t = 10_000)]
    pub unicast_connections: u32,
    /// unicast: messages per second (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    pub unicast_rate: f64,
    /// unicast: measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub unicast_duration_s: f64,
    /// unicast: unmeasured warm-up seconds at the same rate.
    #[arg(long, default_value_t = 2.0)]
    pub unicast_warmup_s: f64,
    /// fan-out: clients on one shared subject (longlink: one group).
    #[arg(long, default_value_t = 10_000)]
    pub fanout_members: u32,
    /// fan-out: messages sent to the shared subject.
    #[arg(long, default_value_t = 100)]
    pub fanout_messages: u64,
    /// fan-out: messages per second; 0 sends them all at once.
    #[arg(long, default_value_t = 100.0)]
    pub fanout_rate: f64,
    /// Payload size in bytes (the first 16 are the timestamp and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Publisher connections (longlink: push-port connections).
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// The nats-server binary. Default: on PATH, else /usr/sbin/nats-server.
    #[arg(long)]
    pub nats_bin: Option<PathBuf>,
    /// The mosquitto binary. Default: on PATH, else /usr/sbin/mosquitto.
    #[arg(long)]
    pub mosquitto_bin: Option<PathBuf>,
    /// Do not install missing peers (scripts/install-peers, apt-get).
    #[arg(long)]
    pub no_install: bool,
    /// Markdown file the comparison table is appended to.
    /// Default: bench/runs/compare.md.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Note written above the table (e.g. the host's load).
    #[arg(long, default_value = "")]
    pub note: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

// ---- figures ------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct IdleFigures {
    connections: u32,
    connected: u32,
    server_rss_baseline_bytes: u64,
    server_rss_after_bytes: u64,
    rss_bytes_per_conn: f64,
    rss_settled: bool,
    connects_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
struct UnicastFigures {
    connections: u32,
    connected: u32,
    rate_per_sec: f64,
    sent: u64,
    achieved_rate_per_sec: f64,
    received: u64,
    lost: u64,
    latency_us: LatencySummary,
    sender_lag_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    counted_cpu: CountedCpu,
    publisher_errors: Vec<String>,
    client_disconnects: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
struct FanoutFigures {
    members: u32,
    connected: u32,
    messages: u64,
    rate_per_sec: f64,
    sent: u64,
    deliveries_expected: u64,
    deliveries_received: u64,
    lost: u64,
    deliveries_per_sec: f64,
    first_send_to_last_receive_s: f64,
    latency_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    counted_cpu: CountedCpu,
    publisher_errors: Vec<String>,
    client_disconnects: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct ServerResult {
    server: &'static str,
    version: String,
    /// The config file the bench wrote (longlink: TOML).
    config: String,
    idle: Option<IdleFigures>,
    unicast: Option<UnicastFigures>,
    fanout: Option<FanoutFigures>,
    /// Phases that failed, with the error.
    errors: Vec<String>,
}

/// One figure of one peer against longlink.
#[derive(Debug, Serialize, PartialEq)]
struct Ratio {
    figure: &'static str,
    peer: &'static str,
    longlink: f64,
    peer_value: f64,
    /// How many times better longlink is (>1: longlink better), whichever
    /// direction is better for this figure.
    longlink_advantage: f64,
}

#[derive(Debug, Serialize)]
struct CompareRecord {
    scenario: &'static str,
    shards: u16,
    payload_bytes: usize,
    phases: Vec<Phase>,
    idle_connections: u32,
    unicast_connections: u32,
    unicast_rate_per_sec: f64,
    unicast_duration_s: f64,
    fanout_members: u32,
    fanout_messages: u64,
    fanout_rate_per_sec: f64,
    publishers: u32,
    /// /proc/loadavg when the run started and ended.
    load_average_start: String,
    load_average_end: String,
    servers: Vec<ServerResult>,
    ratios: Vec<Ratio>,
    table_markdown: String,
    #[serde(flatten)]
    run: RunInfo,
}

// ---- run ----------------------------------------------------------------------

pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    if args.unicast_rate <= 0.0 || args.unicast_duration_s <= 0.0 || args.fanout_messages == 0 || args.fanout_rate < 0.0
    {
        bail!("--unicast-rate and --unicast-duration-s must be positive, --fanout-messages at least 1");
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    let fd_limit = sys::raise_fd_limit()?;
    let _ = sys::raise_memlock_limit();
    let biggest = args.idle_connections.max(args.unicast_connections).max(args.fanout_members);
    if u64::from(biggest) + SERVER_FD_MARGIN > fd_limit {
        bail!("{biggest} connections need about {} open files per server; the limit is {fd_limit}", biggest + 200);
    }
    let load_start = loadavg();
    h.note(&format!("load average at start: {load_start}"));
    let ll_bin = args.common.server_bin.clone().unwrap_or_else(default_server_bin);
    let mut results = Vec::new();
    for &which in &args.servers {
        let mut res = ServerResult {
            server: which.name(),
            version: String::new(),
            config: String::new(),
            idle: None,
            unicast: None,
            fanout: None,
            errors: Vec::new(),
        };
        let bin = match which.peer() {
            None => {
                if let Some(warning) = check_server_bin(&ll_bin)? {
                    h.note(&warning);
                }
                res.version = format!("longlink {}", RunInfo::now(Duration::ZERO).git_commit.unwrap_or_default());
                ll_bin.clone()
            }
            Some(kind) => {
                let bin = match kind {
                    PeerKind::Nats => args.nats_bin.clone(),
                    PeerKind::Mosquitto => args.mosquitto_bin.clone(),
                }
                .unwrap_or_else(|| peer::default_bin(kind));
                if peer::check_peer_bin(&bin).is_err() && !args.no_install {
                    h.note(&format!("{} missing: running scripts/install-peers (apt-get)", kind.name()));
                    peer::install_peers()?;
                }
                peer::check_peer_bin(&bin)?;
                res.version = kind.version(&bin);
                bin
            }
        };
        for &phase in &args.phases {
            h.rearm();
            h.note(&format!("== {} {phase:?}", which.name()));
            let outcome = match phase {
                Phase::Idle => idle(args, &mut h, which, &bin).map(|(f, cfg)| {
                    res.idle = Some(f);
                    cfg
                }),
                Phase::Unicast => unicast(args, &mut h, which, &bin).map(|(f, cfg)| {
                    res.unicast = Some(f);
                    cfg
                }),
                Phase::Fanout => fanout(args, &mut h, which, &bin).map(|(f, cfg)| {
                    res.fanout = Some(f);
                    cfg
                }),
            };
            match outcome {
                Ok(cfg) => res.config = cfg,
                Err(err) => {
                    if format!("{err:#}").contains("interrupted") {
                        return Err(err);
                    }
                    h.note(&format!("{} {phase:?} failed: {err:#}", which.name()));
                    res.errors.push(format!("{phase:?}: {err:#}"));
                }
            }
        }
        results.push(res);
    }
    let ratios = ratios(&results);
    let table = markdown_table(&results, &ratios);
    eprintln!("\n{table}");
    let rec = CompareRecord {
        scenario: "compare",
        shards: args.common.shards(),
        payload_bytes: args.payload_bytes.max(latency::STAMP_BYTES),
        phases: args.phases.clone(),
        idle_connections: args.idle_connections,
        unicast_connections: args.unicast_connections,
        unicast_rate_per_sec: args.unicast_rate,
        unicast_duration_s: args.unicast_duration_s,
        fanout_members: args.fanout_members,
        fanout_messages: args.fanout_messages,
        fanout_rate_per_sec: args.fanout_rate,
        publishers: args.publishers,
        load_average_start: load_start,
        load_average_end: loadavg(),
        servers: results,
        ratios,
        table_markdown: table,
        run: RunInfo::now(h.elapsed()),
    };
    append_report(args, &rec)?;
    record::emit(&rec, &args.common.out())?;
    let failed: Vec<&String> = rec.servers.iter().flat_map(|s| &s.errors).collect();
    if !failed.is_empty() {
        bail!("{} phase(s) failed: {failed:?}", failed.len());
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---- servers and clients ------------------------------------------------------

/// The server under test.
enum Sut {
    Longlink(ServerProcess),
    Peer(PeerProcess),
}

impl Sut {
    /// Starts `which`; returns it with the text of its config.
    fn start(
        which: Which,
        bin: &std::path::Path,
        shards: u16,
        key: &BenchKey,
        h: &Harness,
    ) -> anyhow::Result<(Sut, String)> {
        match which.peer() {
            None => {
                let mut cfg = bench_config(shards, key);
                cfg.session.heartbeat_default_ms = NO_PING_HEARTBEAT_MS;
                let text = toml::to_string(&cfg).context("serializing the longlink config")?;
                Ok((Sut::Longlink(ServerProcess::start(bin, &cfg, h)?), text))
            }
            Some(kind) => {
                let p = PeerProcess::start(kind, bin, h)?;
                let text = p.config.clone();
                Ok((Sut::Peer(p), text))
            }
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Sut::Longlink(s) => s.pid(),
            Sut::Peer(p) => p.pid(),
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        match self {
            Sut::Longlink(s) => s.addr(),
            Sut::Peer(p) => p.addr(),
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self {
            Sut::Longlink(s) => s.check_alive(),
            Sut::Peer(p) => p.check_alive(),
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Sut::Longlink(s) => s.log_tail(),
            Sut::Peer(p) => p.log_tail(),
        }
    }

    fn stop(self) -> anyhow::Result<bool> {
        match self {
            Sut::Longlink(s) => Ok(s.stop()?.success()),
            Sut::Peer(p) => p.stop(),
        }
    }

    /// Settled RSS, as [`ServerProcess::wait_rss_settled`] does it.
    fn settled_rss(&mut self, h: &Harness) -> anyhow::Result<(u64, bool)> {
        let start = Instant::now();
        let mut samples: Vec<(Instant, u64)> = Vec::new();
        loop {
            h.check()?;
            self.check_alive()?;
            let now = Instant::now();
            let rss = sys::rss_bytes(self.pid())?;
            let settled = samples
                .iter()
                .rev()
                .find(|(t, _)| now.duration_since(*t) >= RSS_WINDOW)
                .is_some_and(|&(_, before)| (rss.abs_diff(before) as f64) < RSS_TOLERANCE * rss.max(before) as f64);
            samples.push((now, rss));
            if settled || now.duration_since(start) >= RSS_MAX_WAIT {
                return Ok((rss, settled));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What the clients subscribe to in a phase.
#[derive(Clone, Copy)]
enum Shape {
    /// Each its own subject / device id.
    Own,
    /// One shared subject / group.
    Shared,
}

/// A server under test and its client workers.
struct Rig {
    /// Dropped before the server (field order).
    pool: WorkerPool,
    sut: Sut,
    workers: usize,
    connected: ConnectSummary,
    /// Device ids / own subjects of every client (Shape::Own).
    ids: Vec<String>,
}

impl Rig {
    /// Spawns the client workers for `sut` and waits until every client is
    /// connected and subscribed.
    #[allow(clippy::too_many_arguments)]
    fn connect(
        h: &mut Harness,
        common: &CommonArgs,
        sut: Sut,
        which: Which,
        key: &BenchKey,
        connections: u32,
        shape: Shape,
        (octet, prefix): (u8, &str),
    ) -> anyhow::Result<Rig> {
        let counts = plan_workers(connections, common.workers, common.max_per_worker)?;
        if usize::from(octet) + counts.len() > usize::from(u8::MAX) {
            bail!("too many workers for the 127.x source ranges");
        }
        let source = |i: usize| SourcePlan { octet: octet + i as u8, per_address: common.conns_per_source };
        let in_flight = match which {
            Which::Mosquitto => (MOSQUITTO_IN_FLIGHT_TOTAL / counts.len() as u32).clamp(1, common.in_flight),
            _ => common.in_flight,
        };
        let mut ids = Vec::new();
        let pool = match which.peer() {
            None => {
                let specs: Vec<LoadSpec> = counts
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| LoadSpec {
                        worker: WorkerSpec {
                            index: i as u32,
                            server: sut.addr(),
                            connections: n,
                            in_flight,
                            source: source(i),
                            key: key.spec(),
                            heartbeat_ms: NO_PING_HEARTBEAT_MS,
                            connect_timeout_ms: CONNECT_TIMEOUT_MS,
                            auth_timeout_ms: CONNECT_TIMEOUT_MS,
                            device_prefix: prefix.to_owned(),
                            transport: crate::links::Transport::Tcp,
                            ca_der: Vec::new(),
                        },
                        join_group: matches!(shape, Shape::Shared).then(|| SHARED_SUBJECT.to_owned()),
                        churn_per_sec: 0.0,
                        reconnect: false,
                        seed: 1,
                    })
                    .collect();
                ids.extend(specs.iter().flat_map(|s| (0..s.worker.connections).map(|n| device_id(&s.worker, n))));
                WorkerPool::spawn_kind("load-worker", &specs)?
            }
            Some(kind) => {
                let specs: Vec<PeerSpec> = counts
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| PeerSpec {
                        index: i as u32,
                        protocol: if kind == PeerKind::Nats { Protocol::Nats } else { Protocol::Mqtt },
                        server: sut.addr(),
                        connections: n,
                        in_flight,
                        source: source(i),
                        subscription: match shape {
                            Shape::Own => Subscription::Own { prefix: prefix.to_owned() },
                            Shape::Shared => Subscription::Shared { subject: SHARED_SUBJECT.to_owned() },
                        },
                        connect_timeout_ms: CONNECT_TIMEOUT_MS,
                    })
                    .collect();
                ids.extend(specs.iter().flat_map(|s| (0..s.connections).map(|n| own_subject(prefix, s.index, n))));
                WorkerPool::spawn_kind("peer-worker", &specs)?
            }
        };
        let mut rig = Rig { pool, sut, workers: counts.len(), connected: ConnectSummary::default(), ids };
        let Rig { pool, sut, .. } = &mut rig;
        rig.connected = pool.wait_connected(h, "connect", &mut || sut.check_alive())?;
        h.note(&format!(
            "{} connected, {} failed in {:.2} s ({:.0}/s) over {} workers",
            rig.connected.connected,
            rig.connected.failed,
            rig.connected.span_s(),
            rig.connected.connects_per_sec(),
            rig.workers
        ));
        if rig.connected.failed > 0 {
            bail!("{} of {connections} connections failed: {:?}", rig.connected.failed, rig.connected.failures);
        }
        Ok(rig)
    }

    fn ask(&mut self, h: &Harness, command: &str) -> anyhow::Result<Vec<LoadMsg>> {
        self.pool.send_all(command)?;
        let mut answers: Vec<Option<LoadMsg>> = vec![None; self.workers];
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while answers.iter().any(Option::is_none) {
            h.check()?;
            self.sut.check_alive()?;
            if Instant::now() >= deadline {
                bail!("workers did not answer `{command}` within {} s", ANSWER_TIMEOUT.as_secs());
            }
            let Some((w, event)) = self.pool.recv_timeout(Duration::from_millis(100)) else { continue };
            match event {
                WorkerEvent::Garbage(line) => match LoadMsg::parse(&line) {
                    Some(msg) => answers[w] = Some(msg),
                    None => bail!("worker {w} printed something unexpected: {line:?}"),
                },
                WorkerEvent::Msg(WorkerMsg::Fatal { message }) => bail!("worker {w} failed: {message}"),
                WorkerEvent::Msg(other) => bail!("worker {w} sent {other:?} while answering `{command}`"),
                WorkerEvent::Eof => bail!("worker {w} exited"),
            }
        }
        Ok(answers.into_iter().flatten().collect())
    }

    fn stats(&mut self, h: &Harness) -> anyhow::Result<LoadCounts> {
        Ok(sum_counts(self.ask(h, "stats")?.into_iter().filter_map(|m| match m {
            LoadMsg::Stats(c) => Some(c),
            _ => None,
        })))
    }

    fn report(&mut self, h: &Harness) -> anyhow::Result<(LoadCounts, Histogram<u64>)> {
        let reports: Vec<LoadCounts> = self
            .ask(h, "report")?
            .into_iter()
            .filter_map(|m| match m {
                LoadMsg::Report(c) => Some(c),
                _ => None,
            })
            .collect();
        if reports.len() != self.workers {
            bail!("expected {} reports, got {}", self.workers, reports.len());
        }
        let hist = latency::merge(reports.iter().filter_map(|r| r.latency_hist.as_deref()))?;
        Ok((sum_counts(reports), hist))
    }

    fn reset(&mut self, h: &Harness) -> anyhow::Result<()> {
        let answers = self.ask(h, "reset")?;
        if answers.iter().all(|a| *a == LoadMsg::ResetDone) { Ok(()) } else { Err(anyhow!("bad reset answers")) }
    }

    /// Polls until `expected` messages arrived, nothing arrived for
    /// `quiet`, or `max` passed.
    fn wait_received(&mut self, h: &mut Harness, expected: u64, quiet: Duration, max: Duration) -> anyhow::Result<u64> {
        let start = Instant::now();
        let mut last = (u64::MAX, Instant::now());
        loop {
            let c = self.stats(h)?;
            h.progress(&format!("[drain] received {} of {expected}", c.received));
            if c.received >= expected || start.elapsed() >= max {
                return Ok(c.received);
            }
            if c.received != last.0 {
                last = (c.received, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return Ok(c.received);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Releases the workers and stops the server.
    fn finish(self, h: &mut Harness) -> anyhow::Result<()> {
        let Rig { mut pool, sut, .. } = self;
        pool.release(h)?;
        if !sut.stop()? {
            h.note("warning: the server did not exit cleanly after SIGTERM");
        }
        Ok(())
    }

    /// Waits until longlink counts `want` online members of the shared group
    /// (peers confirmed every subscription before reporting connected).
    fn wait_members(&mut self, h: &mut Harness, push: Option<std::net::SocketAddr>, want: u64) -> anyhow::Result<()> {
        let Some(push) = push else { return Ok(()) };
        let mut client = PushClient::connect(push, Duration::from_secs(5), &crate::server::bench_push_key())
            .context("presence client")?;
        client.set_read_timeout(Some(Duration::from_secs(10)))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            h.check()?;
            self.sut.check_alive()?;
            let reply = client.presence::<&str>(&[], &[], &[SHARED_SUBJECT]).context("presence query")?;
            let online = reply.groups.first().map_or(0, |g| g.online);
            if online >= want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("only {online} of {want} members joined within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A message load on longlink's push port or a peer's publisher.
enum Load {
    Longlink(Pusher),
    Peer(Publisher),
}

/// What a load did, in the terms every server shares.
struct LoadOutcome {
    sent: u64,
    first_send_mono_ns: u64,
    achieved_rate: f64,
    errors: Vec<String>,
    lag_hist: Histogram<u64>,
}

impl Load {
    fn start(
        rig: &Rig,
        push: Option<std::net::SocketAddr>,
        args: &CompareArgs,
        plan: (Shape, f64, u64),
    ) -> anyhow::Result<Load> {
        let (shape, rate, count) = plan;
        match (&rig.sut, push) {
            (Sut::Longlink(_), Some(addr)) => Ok(Load::Longlink(Pusher::start(&PushPlan {
                addr,
                connections: args.publishers,
                rate_per_sec: rate,
                count,
                target: match shape {
                    Shape::Own => Target::RandomDevice(Arc::new(rig.ids.clone())),
                    Shape::Shared => Target::Group(SHARED_SUBJECT.to_owned()),
                },
                payload_bytes: args.payload_bytes,
                reply_grace: Duration::from_secs(60),
            })?)),
            (Sut::Longlink(_), None) => bail!("longlink printed no push address"),
            (Sut::Peer(p), _) => Ok(Load::Peer(Publisher::start(&PublishPlan {
                protocol: if p.kind == PeerKind::Nats { Protocol::Nats } else { Protocol::Mqtt },
                addr: p.addr(),
                connections: args.publishers,
                rate_per_sec: rate,
                count,
                target: match shape {
                    Shape::Own => PeerTarget::RandomSubject(Arc::new(rig.ids.clone())),
                    Shape::Shared => PeerTarget::Subject(SHARED_SUBJECT.to_owned()),
                },
                payload_bytes: args.payload_bytes,
            })?)),
        }
    }

    fn sent(&self) -> u64 {
        match self {
            Load::Longlink(p) => p.progress().0,
            Load::Peer(p) => p.sent(),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Load::Longlink(p) => p.is_finished(),
            Load::Peer(p) => p.is_finished(),
        }
    }

    /// Runs the load to its end, checking the deadline and the server.
    fn run(self, h: &mut Harness, rig: &mut Rig, label: &str, count: u64) -> anyhow::Result<LoadOutcome> {
        let started = Instant::now();
        while !self.is_finished() {
            h.check()?;
            rig.sut.check_alive()?;
            h.progress(&format!("[{label}] sent {} of {count}  {:.1} s", self.sent(), started.elapsed().as_secs_f64()));
            std::thread::sleep(Duration::from_millis(50));
        }
        match self {
            Load::Longlink(p) => {
                let out = p.finish()?;
                let mut errors = out.connection_errors.clone();
                if out.missing_replies() > 0 {
                    errors.push(format!("{} push replies missing", out.missing_replies()));
                }
                if out.not_online > 0 || out.rejected > 0 || !out.request_errors.is_empty() {
                    errors.push(format!(
                        "{} not online, {} rejected, errors {:?}",
                        out.not_online, out.rejected, out.request_errors
                    ));
                }
                Ok(LoadOutcome {
                    sent: out.sent,
                    first_send_mono_ns: out.first_send_mono_ns,
                    achieved_rate: out.achieved_rate(),
                    errors,
                    lag_hist: out.lag_hist,
                })
            }
            Load::Peer(p) => {
                let out = p.finish()?;
                let mut errors = out.errors.clone();
                if !out.confirmed && errors.is_empty() {
                    errors.push("final round trip not answered".into());
                }
                Ok(LoadOutcome {
                    sent: out.sent,
                    first_send_mono_ns: out.first_send_mono_ns,
                    achieved_rate: out.achieved_rate(),
                    errors,
                    lag_hist: out.lag_hist,
                })
            }
        }
    }
}

fn push_addr(sut: &Sut) -> Option<std::net::SocketAddr> {
    match sut {
        Sut::Longlink(s) => s.push_addr(),
        Sut::Peer(_) => None,
    }
}

// ---- phases -------------------------------------------------------------------

fn idle(
    args: &CompareArgs,
    h: &mut Harness,
    which: Which,
    bin: &std::path::Path,
) -> anyhow::Result<(IdleFigures, String)> {
    let key = BenchKey::generate()?;
    let (mut sut, config) = Sut::start(which, bin, args.common.shards(), &key, h)?;
    let startup_fds = sys::open_fds(sut.pid())?;
    if args.idle_warmup > 0 {
        let warm =
            Rig::connect(h, &args.common, sut, which, &key, args.idle_warmup, Shape::Shared, (WARMUP_OCTET, "warm-"))?;
        let Rig { mut pool, sut: s, .. } = warm;
        pool.release(h)?;
        sut = s;
        let deadline = Instant::now() + Duration::from_secs(10);
        while sys::open_fds(sut.pid())? > startup_fds {
            h.check()?;
            if Instant::now() >= deadline {
                bail!("the server still holds warm-up connections 10 s after they closed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (baseline, stable0) = sut.settled_rss(h)?;
    let mut rig = Rig::connect(
        h,
        &args.common,
        sut,
        which,
        &key,
        args.idle_connections,
        Shape::Shared,
        (FIRST_WORKER_OCTET, "idle-"),
    )?;
    let push = push_addr(&rig.sut);
    rig.wait_members(h, push, u64::from(rig.connected.connected))?;
    let (after, stable1) = rig.sut.settled_rss(h)?;
    let n = rig.connected.connected;
    let per_conn = (after as f64 - baseline as f64) / f64::from(n.max(1));
    h.note(&format!("{}: RSS {baseline} -> {after} B: {per_conn:.0} B per subscribed connection", which.name()));
    let figures = IdleFigures {
        connections: args.idle_connections,
        connected: n,
        server_rss_baseline_bytes: baseline,
        server_rss_after_bytes: after,
        rss_bytes_per_conn: round(per_conn, 1),
        rss_settled: stable0 && stable1,
        connects_per_sec: round(rig.connected.connects_per_sec(), 0),
    };
    rig.finish(h)?;
    Ok((figures, config))
}

fn unicast(
    args: &CompareArgs,
    h: &mut Harness,
    which: Which,
    bin: &std::path::Path,
) -> anyhow::Result<(UnicastFigures, String)> {
    let key = BenchKey::generate()?;
    let (sut, config) = Sut::start(which, bin, args.common.shards(), &key, h)?;
    let mut rig = Rig::connect(
        h,
        &args.common,
        sut,
        which,
        &key,
        args.unicast_connections,
        Shape::Own,
        (FIRST_WORKER_OCTET, "uni-"),
    )?;
    let result = (|| {
        let push = push_addr(&rig.sut);
        let count = |s: f64| (args.unicast_rate * s).round() as u64;
        if args.unicast_warmup_s > 0.0 {
            let n = count(args.unicast_warmup_s);
            let warm =
                Load::start(&rig, push, args, (Shape::Own, args.unicast_rate, n))?.run(h, &mut rig, "warm-up", n)?;
            rig.wait_received(h, warm.sent, Duration::from_secs(2), Duration::from_secs(10))?;
            rig.reset(h)?;
        }
        let n = count(args.unicast_duration_s);
        let load = Load::start(&rig, push, args, (Shape::Own, args.unicast_rate, n))?;
        let cpu = CpuMeter::start(rig.sut.pid(), rig.pool.pids());
        let out = load.run(h, &mut rig, "unicast", n)?;
        rig.wait_received(h, out.sent, Duration::from_secs(3), Duration::from_secs(30))?;
        let cpu = cpu.read();
        let (counts, hist) = rig.report(h)?;
        let latency_us = LatencySummary::of(&hist);
        let counted_cpu = CountedCpu::of(&cpu, out.sent, counts.received);
        h.note(&format!(
            "{}: sent {} at {:.0}/s, received {}; latency {}; {}",
            which.name(),
            out.sent,
            out.achieved_rate,
            counts.received,
            latency_us.line(),
            counted_cpu.line()
        ));
        Ok(UnicastFigures {
            connections: args.unicast_connections,
            connected: rig.connected.connected,
            rate_per_sec: args.unicast_rate,
            sent: out.sent,
            achieved_rate_per_sec: round(out.achieved_rate, 1),
            received: counts.received,
            lost: out.sent.saturating_sub(counts.received),
            latency_us,
            sender_lag_us: LatencySummary::of(&out.lag_hist),
            cpu,
            counted_cpu,
            publisher_errors: out.errors,
            client_disconnects: counts.disconnects,
        })
    })();
    let tail = rig.sut.log_tail();
    rig.finish(h)?;
    result.map(|f| (f, config)).map_err(|e: anyhow::Error| anyhow!("{e:#}{tail}"))
}

fn fanout(
    args: &CompareArgs,
    h: &mut Harness,
    which: Which,
    bin: &std::path::Path,
) -> anyhow::Result<(FanoutFigures, String)> {
    let key = BenchKey::generate()?;
    let (sut, config) = Sut::start(which, bin, args.common.shards(), &key, h)?;
    let mut rig = Rig::connect(
        h,
        &args.common,
        sut,
        which,
        &key,
        args.fanout_members,
        Shape::Shared,
        (FIRST_WORKER_OCTET, "fan-"),
    )?;
    let result = (|| {
        let push = push_addr(&rig.sut);
        let members = u64::from(rig.connected.connected);
        rig.wait_members(h, push, members)?;
        // Two unmeasured messages first, as the fanout scenario does.
        let warm =
            Load::start(&rig, push, args, (Shape::Shared, args.fanout_rate, 2))?.run(h, &mut rig, "warm-up", 2)?;
        rig.wait_received(h, warm.sent * members, Duration::from_secs(2), Duration::from_secs(10))?;
        rig.reset(h)?;
        let n = args.fanout_messages;
        let load = Load::start(&rig, push, args, (Shape::Shared, args.fanout_rate, n))?;
        let cpu = CpuMeter::start(rig.sut.pid(), rig.pool.pids());
        let out = load.run(h, &mut rig, "fanout", n)?;
        let expected = out.sent * members;
        rig.wait_received(h, expected, Duration::from_secs(3), Duration::from_secs(60))?;
        let cpu = cpu.read();
        let (counts, hist) = rig.report(h)?;
        let span_s = counts.last_recv_mono_ns.saturating_sub(out.first_send_mono_ns) as f64 / 1e9;
        let rate = if span_s > 0.0 { counts.received as f64 / span_s } else { 0.0 };
        let latency_us = LatencySummary::of(&hist);
        let counted_cpu = CountedCpu::of(&cpu, out.sent, counts.received);
        h.note(&format!(
            "{}: {} messages to {members}: {} of {expected} deliveries in {span_s:.3} s = {rate:.0}/s; latency {}; {}",
            which.name(),
            out.sent,
            counts.received,
            latency_us.line(),
            counted_cpu.line()
        ));
        Ok(FanoutFigures {
            members: args.fanout_members,
            connected: rig.connected.connected,
            messages: n,
            rate_per_sec: args.fanout_rate,
            sent: out.sent,
            deliveries_expected: expected,
            deliveries_received: counts.received,
            lost: expected.saturating_sub(counts.received),
            deliveries_per_sec: round(rate, 0),
            first_send_to_last_receive_s: round(span_s, 4),
            latency_us,
            cpu,
            counted_cpu,
            publisher_errors: out.errors,
            client_disconnects: counts.disconnects,
        })
    })();
    let tail = rig.sut.log_tail();
    rig.finish(h)?;
    result.map(|f| (f, config)).map_err(|e: anyhow::Error| anyhow!("{e:#}{tail}"))
}

// ---- ratios and table ---------------------------------------------------------

/// A figure of the table: name, unit, whether lower is better, and how to
/// read it from a server's results.
struct Figure {
    name: &'static str,
    lower_is_better: bool,
    digits: usize,
    get: fn(&ServerResult) -> Option<f64>,
}

const FIGURES: [Figure; 9] = [
    Figure {
        name: "idle: server RSS per subscribed connection (B)",
        lower_is_better: true,
        digits: 0,
        get: |s| s.idle.as_ref().map(|f| f.rss_bytes_per_conn),
    },
    Figure {
        name: "unicast: p50 (µs)",
        lower_is_better: true,
        digits: 0,
        get: |s| s.unicast.as_ref().map(|f| f.latency_us.p50_us),
    },
    Figure {
        name: "unicast: p99 (µs)",
        lower_is_better: true,
        digits: 0,
        get: |s| s.unicast.as_ref().map(|f| f.latency_us.p99_us),
    },
    Figure {
        name: "unicast: server CPU per push (µs)",
        lower_is_better: true,
        digits: 2,
        get: |s| s.unicast.as_ref().and_then(|f| f.counted_cpu.server_cpu_per_push_us),
    },
    Figure {
        name: "unicast: lost",
        lower_is_better: true,
        digits: 0,
        get: |s| s.unicast.as_ref().map(|f| f.lost as f64),
    },
    Figure {
        name: "fan-out: deliveries/s",
        lower_is_better: false,
        digits: 0,
        get: |s| s.fanout.as_ref().map(|f| f.deliveries_per_sec),
    },
    Figure {
        name: "fan-out: p99 (µs)",
        lower_is_better: true,
        digits: 0,
        get: |s| s.fanout.as_ref().map(|f| f.latency_us.p99_us),
    },
    Figure {
        name: "fan-out: server CPU per delivery (µs)",
        lower_is_better: true,
        digits: 3,
        get: |s| s.fanout.as_ref().and_then(|f| f.counted_cpu.server_cpu_per_delivery_us),
    },
    Figure {
        name: "fan-out: lost",
        lower_is_better: true,
        digits: 0,
        get: |s| s.fanout.as_ref().map(|f| f.lost as f64),
    },
];

fn ratios(results: &[ServerResult]) -> Vec<Ratio> {
    let Some(ll) = results.iter().find(|s| s.server == "longlink") else { return Vec::new() };
    let mut out = Vec::new();
    for fig in &FIGURES {
        let Some(l) = (fig.get)(ll) else { continue };
        for peer in results.iter().filter(|s| s.server != "longlink") {
            let Some(p) = (fig.get)(peer) else { continue };
            let adv = if fig.lower_is_better { p / l } else { l / p };
            if adv.is_finite() {
                out.push(Ratio {
                    figure: fig.name,
                    peer: peer.server,
                    longlink: l,
                    peer_value: p,
                    longlink_advantage: round(adv, 2),
                });
            }
        }
    }
    out
}

/// The comparison as a markdown table: a column per server, then
/// longlink's advantage over each peer.
fn markdown_table(results: &[ServerResult], ratios: &[Ratio]) -> String {
    let peers: Vec<&str> = results.iter().map(|s| s.server).filter(|&s| s != "longlink").collect();
    let mut header: Vec<String> = vec!["figure".into()];
    header.extend(results.iter().map(|s| s.server.to_owned()));
    let has_ll = results.iter().any(|s| s.server == "longlink");
    if has_ll {
        header.extend(peers.iter().map(|p| format!("longlink advantage vs {p}")));
    }
    let mut md = String::new();
    let _ = writeln!(md, "| {} |", header.join(" | "));
    let _ = writeln!(md, "|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for fig in &FIGURES {
        let mut row = vec![fig.name.to_owned()];
        row.extend(results.iter().map(|s| (fig.get)(s).map_or_else(|| "-".to_owned(), |v| num(v, fig.digits))));
        if has_ll {
            row.extend(peers.iter().map(|p| {
                ratios
                    .iter()
                    .find(|r| r.figure == fig.name && r.peer == *p)
                    .map_or_else(|| "-".to_owned(), |r| format!("{:.2}x", r.longlink_advantage))
            }));
        }
        let _ = writeln!(md, "| {} |", row.join(" | "));
    }
    md
}

fn num(x: f64, digits: usize) -> String {
    let s = format!("{x:.digits$}");
    // Thousands separators on the integer part.
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, int) = int.strip_prefix('-').map_or(("", int), |i| ("-", i));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

fn append_report(args: &CompareArgs, rec: &CompareRecord) -> anyhow::Result<()> {
    let path = args.report.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("runs/compare.md"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## compare {} ({}{})\n",
        rec.run.timestamp,
        rec.run.git_commit.as_deref().unwrap_or("?"),
        if rec.run.git_dirty == Some(true) { "+" } else { "" }
    );
    let _ = writeln!(
        md,
        "{} shards for longlink; idle {} conns; unicast {} clients at {}/s for {} s; fan-out {} members x {} msgs at \
         {}/s; payload {} B; {} publisher connection(s); load average {} -> {}.{}\n",
        rec.shards,
        rec.idle_connections,
        rec.unicast_connections,
        rec.unicast_rate_per_sec,
        rec.unicast_duration_s,
        rec.fanout_members,
        rec.fanout_messages,
        rec.fanout_rate_per_sec,
        rec.payload_bytes,
        rec.publishers,
        rec.load_average_start,
        rec.load_average_end,
        if args.note.is_empty() { String::new() } else { format!(" {}", args.note) }
    );
    for s in &rec.servers {
        let _ = writeln!(md, "- {}: {}", s.server, s.version);
        for e in &s.errors {
            let first = e.lines().next().unwrap_or("");
            let _ = writeln!(md, "  - failed: {first}");
        }
    }
    md.push('\n');
    md.push_str(&rec.table_markdown);
    md.push('\n');
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(md.as_bytes()).with_context(|| format!("appending to {}", path.display()))?;
    eprintln!("table appended to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &'static str, rss: f64, cpu_per_push: f64, rate: f64) -> ServerResult {
        let summary = |p99: f64| LatencySummary {
            count: 1,
            min_us: 1.0,
            mean_us: 1.0,
            p50_us: 1.0,
            p90_us: 1.0,
            p99_us: p99,
            p999_us: p99,
            max_us: p99,
        };
        let cpu = CpuSplit {
            server_cpu: crate::drive::CpuUse { cpu_s: 0.0, percent: 0.0 },
            server_cpu_ns: 0,
            clients_cpu: crate::drive::CpuUse { cpu_s: 0.0, percent: 0.0 },
            backend_cpu: crate::drive::CpuUse { cpu_s: 0.0, percent: 0.0 },
            other_cpu_percent: 0.0,
        };
        ServerResult {
            server: name,
            version: String::new(),
            config: String::new(),
            idle: Some(IdleFigures {
                connections: 10,
                connected: 10,
                server_rss_baseline_bytes: 0,
                server_rss_after_bytes: 0,
                rss_bytes_per_conn: rss,
                rss_settled: true,
                connects_per_sec: 0.0,
            }),
            unicast: None,
            fanout: Some(FanoutFigures {
                members: 10,
                connected: 10,
                messages: 1,
                rate_per_sec: 1.0,
                sent: 1,
                deliveries_expected: 10,
                deliveries_received: 10,
                lost: 0,
                deliveries_per_sec: rate,
                first_send_to_last_receive_s: 1.0,
                latency_us: summary(100.0),
                cpu,
                counted_cpu: CountedCpu::new((cpu_per_push * 1000.0) as u64, 1, 10),
                publisher_errors: Vec::new(),
                client_disconnects: Default::default(),
            }),
            errors: Vec::new(),
        }
    }

    #[test]
    fn ratios_say_how_many_times_better_longlink_is_in_either_direction() {
        let results =
            vec![server("longlink", 1000.0, 20.0, 600_000.0), server("nats-server", 20_000.0, 40.0, 300_000.0)];
        let r = ratios(&results);
        let get = |f: &str| r.iter().find(|x| x.figure.starts_with(f)).unwrap().longlink_advantage;
        assert_eq!(get("idle"), 20.0);
        // Higher is better for deliveries/s: 600k against 300k is 2x.
        assert_eq!(get("fan-out: deliveries"), 2.0);
        assert_eq!(get("fan-out: server CPU"), 2.0);
        // Unicast was not run: no ratio, and "-" in the table.
        assert!(r.iter().all(|x| !x.figure.starts_with("unicast")));
        let md = markdown_table(&results, &r);
        assert!(md.starts_with("| figure | longlink | nats-server | longlink advantage vs nats-server |"), "{md}");
        assert!(md.contains("| idle: server RSS per subscribed connection (B) | 1,000 | 20,000 | 20.00x |"), "{md}");
        assert!(md.contains("| unicast: p50 (µs) | - | - | - |"), "{md}");
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(num(1_234_567.891, 2), "1,234,567.89");
        assert_eq!(num(-1234.0, 0), "-1,234");
        assert_eq!(num(12.5, 1), "12.5");
    }
}
