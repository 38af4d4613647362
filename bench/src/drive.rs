//! What the push scenarios (unicast, fanout, broadcast, soak) share on the
//! parent's side: a [`Rig`] is a started server plus connected load
//! workers ([`crate::loadworker`]), with calls to query the workers, wait
//! for deliveries to arrive, merge their latency histograms and tear
//! everything down; [`CpuMeter`] measures the CPU the processes used.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;
use longlink::config::Config;

use crate::harness::{CommonArgs, Harness};
use crate::latency;
use crate::loadworker::{LoadCounts, LoadMsg, LoadSpec};
use crate::pool::{ConnectSummary, WorkerEvent, WorkerPool, plan_workers};
use crate::pusher::{PushOutcome, PushPlan, Pusher};
use crate::record::round;
use crate::server::{BenchKey, ServerProcess, bench_config, check_server_bin, default_server_bin};
use crate::source::{FIRST_WORKER_OCTET, SourcePlan};
use crate::sys;
use crate::worker::{WorkerMsg, WorkerSpec, device_id};

/// Open files the server needs besides connections.
const SERVER_FD_MARGIN: u64 = 200;
const CONNECT_TIMEOUT_MS: u64 = 5_000;
const AUTH_TIMEOUT_MS: u64 = 10_000;
/// How long workers get to answer a command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat for scenarios without pings: the server's default maximum, so
/// the idle timeout (3x) is far beyond any run.
pub const NO_PING_HEARTBEAT_MS: u32 = 270_000;

/// How the load workers behave.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub connections: u32,
    pub heartbeat_ms: u32,
    pub join_group: Option<String>,
    /// Fraction of connections that churn per second.
    pub churn_per_sec: f64,
    pub reconnect: bool,
    /// Device ids are `{prefix}{worker}-{n}`.
    pub device_prefix: String,
    /// How the clients connect (`tcp` or `ws`), and for `ws` the listener
    /// [`crate::links::configure`] turned on.
    pub transport: crate::links::Transport,
    pub link_addr: Option<std::net::SocketAddr>,
}

/// A server under test and the load workers connected to it.
pub struct Rig {
    /// Dropped after the pool (field order), so workers go first.
    pub pool: WorkerPool,
    pub server: ServerProcess,
    pub specs: Vec<LoadSpec>,
    pub connected: ConnectSummary,
    pub shards: u16,
}

impl Rig {
    /// A server config for `shards` shards with a fresh key; the caller
    /// adjusts it and passes both to [`Rig::start`].
    pub fn config(common: &CommonArgs) -> anyhow::Result<(Config, BenchKey)> {
        let key = BenchKey::generate()?;
        Ok((bench_config(common.shards(), &key), key))
    }

    /// Starts the server with `cfg`, spawns the load workers and waits
    /// until every client made its first connect attempt.
    pub fn start(
        h: &mut Harness,
        common: &CommonArgs,
        cfg: &Config,
        key: &BenchKey,
        load: &LoadOptions,
    ) -> anyhow::Result<Rig> {
        let fd_limit = sys::raise_fd_limit()?;
        let _ = sys::raise_memlock_limit();
        let counts = plan_workers(load.connections, common.workers, common.max_per_worker)?;
        if counts.len() > usize::from(u8::MAX - FIRST_WORKER_OCTET) {
            bail!("at most {} workers (one 127.x.0.0/16 source range each)", u8::MAX - FIRST_WORKER_OCTET);
        }
        if u64::from(load.connections) + SERVER_FD_MARGIN > fd_limit {
            bail!(
                "{} connections need about {} open files in the server, but the limit is {fd_limit}",
                load.connections,
                u64::from(load.connections) + SERVER_FD_MARGIN
            );
        }
        let bin = common.server_bin.clone().unwrap_or_else(default_server_bin);
        if let Some(warning) = check_server_bin(&bin)? {
            h.note(&warning);
        }
        let mut server = ServerProcess::start(&bin, cfg, h)?;
        let shards = cfg.server.shards;
        h.note(&format!(
            "server pid {} listening on {} (push {}) with {shards} shards ({})",
            server.pid(),
            server.addr(),
            server.push_addr().map_or_else(|| "none".to_owned(), |a| a.to_string()),
            bin.display()
        ));
        let seed = crate::rng::Rng::from_entropy().next_u64();
        let specs: Vec<LoadSpec> = counts
            .iter()
            .enumerate()
            .map(|(i, &n)| LoadSpec {
                worker: WorkerSpec {
                    index: i as u32,
                    server: load.link_addr.unwrap_or_else(|| server.addr()),
                    connections: n,
                    in_flight: common.in_flight,
                    source: SourcePlan { octet: FIRST_WORKER_OCTET + i as u8, per_address: common.conns_per_source },
                    key: key.spec(),
                    heartbeat_ms: load.heartbeat_ms,
                    connect_timeout_ms: CONNECT_TIMEOUT_MS,
                    auth_timeout_ms: AUTH_TIMEOUT_MS,
                    device_prefix: load.device_prefix.clone(),
                    transport: load.transport,
                    ca_der: Vec::new(),
                },
                join_group: load.join_group.clone(),
                churn_per_sec: load.churn_per_sec,
                reconnect: load.reconnect,
                seed,
            })
            .collect();
        let pool = WorkerPool::spawn_kind("load-worker", &specs)?;
        let connected = pool.wait_connected(h, "connect", &mut || server.check_alive())?;
        h.note(&format!(
            "{} connected, {} failed in {:.2} s ({:.0} connects/s) over {} workers",
            connected.connected,
            connected.failed,
            connected.span_s(),
            connected.connects_per_sec(),
            specs.len()
        ));
        if connected.failed > 0 {
            bail!("{} of {} connections failed: {:?}", connected.failed, load.connections, connected.failures);
        }
        Ok(Rig { pool, server, specs, connected, shards })
    }

    /// Every client's device id.
    pub fn device_ids(&self) -> Vec<String> {
        self.specs.iter().flat_map(|s| (0..s.worker.connections).map(|n| device_id(&s.worker, n))).collect()
    }

    pub fn push_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.server.push_addr().context("the server printed no `push ADDR` line (no push port)")
    }

    /// Sends `command` to every worker and returns one answer from each.
    pub fn ask(&mut self, h: &Harness, command: &str) -> anyhow::Result<Vec<LoadMsg>> {
        self.pool.send_all(command)?;
        let n = self.specs.len();
        let mut answers: Vec<Option<LoadMsg>> = vec![None; n];
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while answers.iter().any(Option::is_none) {
            h.check()?;
            self.server.check_alive()?;
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

    /// Counters summed over the workers.
    pub fn stats(&mut self, h: &Harness) -> anyhow::Result<LoadCounts> {
        Ok(sum_counts(self.ask(h, "stats")?.into_iter().filter_map(|m| match m {
            LoadMsg::Stats(c) => Some(c),
            _ => None,
        })))
    }

    /// Counters summed over the workers and their merged latency histogram.
    pub fn report(&mut self, h: &Harness) -> anyhow::Result<(LoadCounts, Histogram<u64>)> {
        let reports: Vec<LoadCounts> = self
            .ask(h, "report")?
            .into_iter()
            .filter_map(|m| match m {
                LoadMsg::Report(c) => Some(c),
                _ => None,
            })
            .collect();
        if reports.len() != self.specs.len() {
            bail!("expected {} reports, got {}", self.specs.len(), reports.len());
        }
        let hist = latency::merge(reports.iter().filter_map(|r| r.latency_hist.as_deref()))?;
        Ok((sum_counts(reports), hist))
    }

    /// Clears every worker's counters and histogram.
    pub fn reset(&mut self, h: &Harness) -> anyhow::Result<()> {
        let answers = self.ask(h, "reset")?;
        if answers.iter().all(|a| *a == LoadMsg::ResetDone) { Ok(()) } else { Err(anyhow!("bad reset answers")) }
    }

    /// Polls the workers until they received `expected` messages in total,
    /// or nothing arrived for `quiet`, or `max` passed. Returns the last counts.
    pub fn wait_received(
        &mut self,
        h: &mut Harness,
        expected: u64,
        quiet: Duration,
        max: Duration,
    ) -> anyhow::Result<LoadCounts> {
        let start = Instant::now();
        let mut last = (u64::MAX, Instant::now());
        loop {
            let c = self.stats(h)?;
            h.progress(&format!("[drain] received {} of {expected}", c.received));
            if c.received >= expected || start.elapsed() >= max {
                return Ok(c);
            }
            if c.received != last.0 {
                last = (c.received, Instant::now());
            } else if last.1.elapsed() >= quiet {
                return Ok(c);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Releases the workers, stops the server; true when it exited cleanly.
    pub fn finish(self, h: &mut Harness) -> anyhow::Result<bool> {
        let Rig { mut pool, server, .. } = self;
        pool.release(h)?;
        let status = server.stop()?;
        if !status.success() {
            h.note(&format!("warning: server exited with {status} after SIGTERM"));
        }
        Ok(status.success())
    }

    /// The end of the server's log, to append to an error.
    pub fn log_tail(&self) -> String {
        self.server.log_tail()
    }
}

/// Runs a push load to the end, drawing progress and checking the run's
/// deadline and the server meanwhile.
pub fn run_push(h: &mut Harness, rig: &mut Rig, plan: &PushPlan, label: &str) -> anyhow::Result<PushOutcome> {
    let pusher = Pusher::start(plan)?;
    let started = Instant::now();
    while !pusher.is_finished() {
        h.check()?;
        rig.server.check_alive()?;
        let (sent, replies) = pusher.progress();
        h.progress(&format!(
            "[{label}] sent {sent} of {}  replies {replies}  {:.1} s",
            plan.count,
            started.elapsed().as_secs_f64()
        ));
        std::thread::sleep(Duration::from_millis(50));
    }
    pusher.finish()
}

/// Adds up counters from several workers.
pub fn sum_counts(parts: impl IntoIterator<Item = LoadCounts>) -> LoadCounts {
    let mut t = LoadCounts::default();
    for c in parts {
        t.received += c.received;
        t.unstamped += c.unstamped;
        if c.first_recv_mono_ns != 0 && (t.first_recv_mono_ns == 0 || c.first_recv_mono_ns < t.first_recv_mono_ns) {
            t.first_recv_mono_ns = c.first_recv_mono_ns;
        }
        t.last_recv_mono_ns = t.last_recv_mono_ns.max(c.last_recv_mono_ns);
        t.connected_now += c.connected_now;
        t.churned += c.churned;
        t.reconnects += c.reconnects;
        t.reconnect_failures += c.reconnect_failures;
        for (k, v) in c.disconnects {
            *t.disconnects.entry(k).or_default() += v;
        }
        t.pongs += c.pongs;
    }
    t
}

/// CPU used over an interval by the server, the client workers, this
/// process (the backend's push threads) and everything else on the host.
/// Process CPU is counted in ns ([`sys::cpu_ns`]), so CPU per message is
/// meaningful even over a short window.
pub struct CpuMeter {
    server: u32,
    clients: Vec<u32>,
    start: Vec<u64>,
    host_start: f64,
    t0: Instant,
}

/// CPU use over an interval; 100 % is one core busy.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct CpuUse {
    pub cpu_s: f64,
    pub percent: f64,
}

/// Where the host's CPU went during a measurement (flattened into records).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CpuSplit {
    pub server_cpu: CpuUse,
    /// The server's CPU (user + system, all its threads) in ns, unrounded:
    /// the numerator of [`CountedCpu`].
    pub server_cpu_ns: u64,
    pub clients_cpu: CpuUse,
    /// The bench process itself: push sender and reply threads.
    pub backend_cpu: CpuUse,
    /// Host CPU used by anything else (other programs on the box); large
    /// values mean the figures were measured on a busy host.
    pub other_cpu_percent: f64,
}

impl CpuMeter {
    pub fn start(server: u32, clients: Vec<u32>) -> CpuMeter {
        let pids = std::iter::once(server).chain(clients.iter().copied()).chain([std::process::id()]);
        let start = pids.map(|p| sys::cpu_ns(p).unwrap_or(0)).collect();
        CpuMeter { server, clients, start, host_start: sys::host_busy_seconds().unwrap_or(0.0), t0: Instant::now() }
    }

    /// CPU used since `start` (a process that exited counts nothing).
    pub fn read(&self) -> CpuSplit {
        let wall = self.t0.elapsed().as_secs_f64().max(1e-9);
        let pids: Vec<u32> =
            std::iter::once(self.server).chain(self.clients.iter().copied()).chain([std::process::id()]).collect();
        let used_ns: Vec<u64> = pids
            .iter()
            .zip(&self.start)
            .map(|(&p, &s)| sys::cpu_ns(p).map_or(0, |now| now.saturating_sub(s)))
            .collect();
        let used: Vec<f64> = used_ns.iter().map(|&ns| ns as f64 / 1e9).collect();
        let host = sys::host_busy_seconds().map_or(0.0, |h| (h - self.host_start).max(0.0));
        let n = used.len();
        let clients: f64 = used[1..n - 1].iter().sum();
        let ours: f64 = used.iter().sum();
        let usage = |cpu_s: f64| CpuUse { cpu_s: round(cpu_s, 3), percent: round(cpu_s / wall * 100.0, 1) };
        CpuSplit {
            server_cpu: usage(used[0]),
            server_cpu_ns: used_ns[0],
            clients_cpu: usage(clients),
            backend_cpu: usage(used[n - 1]),
            other_cpu_percent: round(((host - ours) / wall * 100.0).max(0.0), 1),
        }
    }
}

/// Server CPU per message over a measured window (issue 15's "counted
/// CPU"): the server's user + system CPU divided by the pushes the backend
/// sent and by the deliveries the clients received in that window.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CountedCpu {
    pub pushes: u64,
    pub deliveries: u64,
    /// µs of server CPU per push sent (null without pushes).
    pub server_cpu_per_push_us: Option<f64>,
    /// µs of server CPU per message received by a client (null without deliveries).
    pub server_cpu_per_delivery_us: Option<f64>,
}

impl CountedCpu {
    pub fn new(server_cpu_ns: u64, pushes: u64, deliveries: u64) -> CountedCpu {
        let per = |n: u64| (n > 0).then(|| round(server_cpu_ns as f64 / n as f64 / 1000.0, 3));
        CountedCpu {
            pushes,
            deliveries,
            server_cpu_per_push_us: per(pushes),
            server_cpu_per_delivery_us: per(deliveries),
        }
    }

    pub fn of(cpu: &CpuSplit, pushes: u64, deliveries: u64) -> CountedCpu {
        CountedCpu::new(cpu.server_cpu_ns, pushes, deliveries)
    }

    /// One progress line.
    pub fn line(&self) -> String {
        let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} µs"));
        format!(
            "server CPU per push {} ({} pushes), per delivery {} ({} deliveries)",
            us(self.server_cpu_per_push_us),
            self.pushes,
            us(self.server_cpu_per_delivery_us),
            self.deliveries
        )
    }
}

/// One progress line about CPU use.
pub fn cpu_line(c: &CpuSplit) -> String {
    format!(
        "CPU (100 % = one core): server {:.0} %, clients {:.0} %, backend {:.0} %, rest of the host {:.0} %",
        c.server_cpu.percent, c.clients_cpu.percent, c.backend_cpu.percent, c.other_cpu_percent
    )
}

/// Appends the server's log tail to an error unless it is already there.
pub fn with_log_tail(err: anyhow::Error, tail: &str) -> anyhow::Error {
    let text = format!("{err:#}");
    if text.contains("server stderr") { err } else { anyhow!("{text}{tail}") }
}

/// Disconnect reasons with their counts, for records.
pub type Reasons = BTreeMap<String, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_with_earliest_first_and_latest_last_receive() {
        let a = LoadCounts {
            received: 3,
            first_recv_mono_ns: 10,
            last_recv_mono_ns: 30,
            disconnects: [("eof".to_owned(), 1)].into(),
            ..Default::default()
        };
        let b = LoadCounts {
            received: 4,
            first_recv_mono_ns: 5,
            last_recv_mono_ns: 20,
            disconnects: [("eof".to_owned(), 2)].into(),
            ..Default::default()
        };
        let idle = LoadCounts::default();
        let t = sum_counts([a, b, idle]);
        assert_eq!(t.received, 7);
        assert_eq!((t.first_recv_mono_ns, t.last_recv_mono_ns), (5, 30));
        assert_eq!(t.disconnects["eof"], 3);
    }

    #[test]
    fn counted_cpu_divides_server_nanoseconds_per_message() {
        let c = CountedCpu::new(20_300_000, 1000, 4000);
        assert_eq!(c.server_cpu_per_push_us, Some(20.3));
        assert_eq!(c.server_cpu_per_delivery_us, Some(5.075));
        let none = CountedCpu::new(1_000, 0, 0);
        assert_eq!((none.server_cpu_per_push_us, none.server_cpu_per_delivery_us), (None, None));
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["server_cpu_per_push_us"], 20.3);
    }
}
