//! Scenario `reliable`: at-least-once unicast against at-most-once, in the
//! same run.
//!
//! Three modes, each on a fresh node: at-most-once (today's pushes),
//! at-least-once with the embedded memory store, and at-least-once with
//! the Redis store (a `redis-server` this scenario starts on a free port).
//! N clients (in this process, on one glommio executor thread) connect with
//! ACK support; a backend connection pushes to a uniformly random device at
//! each `--rates` value, open loop, every payload stamped with its intended
//! send time (CLOCK_MONOTONIC). A client that receives a message records
//! push -> receive, acknowledges it at once ([`Connection::ack_now`]) and
//! records push -> ACK written. The reply thread records push -> PushReply.
//! A warm-up at the same rate comes first and is not measured.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use longlink::backend::{BackendError, PushClient, Reply, Request};
use longlink::client::{ClientEvent, ClientOptions, Connection};
use longlink::protocol::proto::{self, PushStatus, Qos};
use serde::Serialize;

use crate::drive::{CpuMeter, CpuSplit, NO_PING_HEARTBEAT_MS, cpu_line};
use crate::harness::{CommonArgs, Harness};
use crate::latency::{self, LatencySummary, mono_ns, read_stamp, stamp_payload};
use crate::record::{self, RunInfo, round};
use crate::rng::Rng;
use crate::server::{BenchKey, ServerProcess, TempDir, bench_config, check_server_bin, default_server_bin};
use crate::sys;

/// Send times kept for reply latency, indexed by request id modulo this.
const SENT_AT_RING: usize = 1 << 18;

#[derive(Debug, Clone, clap::Args)]
pub struct ReliableArgs {
    /// Clients to connect (each one device).
    #[arg(long, default_value_t = 1000)]
    pub connections: u32,
    /// Pushes per second to measure at, comma-separated (open loop).
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    pub rates: Vec<f64>,
    /// Measured time per rate and mode, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Unmeasured warm-up before each measurement, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// Payload size in bytes (the first 16 are the timestamp and sequence).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// `delivery.window` of the node.
    #[arg(long, default_value_t = 32)]
    pub window: u32,
    /// Modes to run, in this order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "at-most-once,memory,redis")]
    pub modes: Vec<Mode>,
    /// The redis-server binary for the Redis mode.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// What is measured: `--modes` values, and the record's `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum Mode {
    /// At-most-once pushes (no store).
    #[serde(rename = "at_most_once")]
    AtMostOnce,
    /// At-least-once with the embedded memory store.
    #[serde(rename = "at_least_once_memory")]
    Memory,
    /// At-least-once with the Redis store (starts redis-server).
    #[serde(rename = "at_least_once_redis")]
    Redis,
}

impl Mode {
    fn qos(self) -> Qos {
        if self == Mode::AtMostOnce { Qos::AtMostOnce } else { Qos::AtLeastOnce }
    }
}

/// One mode at one rate.
#[derive(Debug, Serialize)]
struct Point {
    mode: Mode,
    rate_per_sec: f64,
    sent: u64,
    replies: u64,
    /// Replies (per target) by status.
    stored: u64,
    delivered: u64,
    not_online: u64,
    rejected: u64,
    request_errors: u64,
    achieved_rate_per_sec: f64,
    /// Replies per second, first send to last reply.
    answered_per_sec: f64,
    /// Messages the clients should get: STORED for at-least-once, the
    /// node's `delivered` count for at-most-once.
    messages_expected: u64,
    messages_received: u64,
    lost: u64,
    duplicates_removed: u64,
    push_to_receive_us: LatencySummary,
    /// Push -> the client wrote its Ack (at-least-once only).
    push_to_ack_us: LatencySummary,
    push_reply_us: LatencySummary,
    sender_lag_us: LatencySummary,
    #[serde(flatten)]
    cpu: CpuSplit,
    /// Server CPU per push, µs (its Redis sidecar threads included).
    server_cpu_per_push_us: f64,
    /// Server CPU per message a client received, µs.
    server_cpu_per_delivery_us: f64,
    /// redis-server CPU per push, µs (Redis mode; it is part of
    /// `other_cpu_percent`).
    redis_cpu_per_push_us: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ReliableRecord {
    scenario: &'static str,
    connections: u32,
    shards: u16,
    window: u32,
    payload_bytes: usize,
    duration_s: f64,
    warmup_s: f64,
    points: Vec<Point>,
    /// at-least-once p99 push->ACK minus at-most-once p99 push->receive,
    /// per store, at the first rate.
    added_p99_memory_us: Option<f64>,
    added_p99_redis_us: Option<f64>,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &ReliableArgs) -> anyhow::Result<()> {
    if args.rates.iter().any(|&r| r <= 0.0) || args.duration_s <= 0.0 {
        bail!("--rates and --duration-s must be positive");
    }
    let mut h = Harness::new(Duration::from_secs(args.common.timeout_s))?;
    sys::raise_fd_limit()?;
    let _ = sys::raise_memlock_limit();
    let bin = args.common.server_bin.clone().unwrap_or_else(default_server_bin);
    if let Some(warning) = check_server_bin(&bin)? {
        h.note(&warning);
    }
    let key = BenchKey::generate()?;
    let shards = args.common.shards();
    let modes = args.modes.iter().copied();
    let mut points = Vec::new();
    for mode in modes {
        let redis = match mode {
            Mode::Redis => Some(RedisProcess::start(&args.redis_server)?),
            _ => None,
        };
        let mut cfg = bench_config(shards, &key);
        cfg.session.heartbeat_default_ms = NO_PING_HEARTBEAT_MS;
        cfg.delivery.window = args.window;
        if let Some(redis) = &redis {
            cfg.delivery.redis_url = redis.url();
        }
        let mut server = ServerProcess::start(&bin, &cfg, &h)?;
        let push_addr = server.push_addr().context("the server printed no push address")?;
        let clients = Clients::start(server.addr(), &key, args.connections, &mut h)?;
        let redis_pid = redis.as_ref().map(|r| r.child.id());
        for &rate in &args.rates {
            let point = measure(args, (mode, rate), push_addr, &clients, (&mut server, redis_pid), &mut h)?;
            points.push(point);
        }
        clients.stop()?;
        server.stop()?;
        drop(redis);
    }
    let first_rate = args.rates[0];
    let p99 = |mode: Mode, f: fn(&Point) -> f64| {
        points.iter().find(|p| p.mode == mode && p.rate_per_sec == first_rate).map(f)
    };
    let base = p99(Mode::AtMostOnce, |p| p.push_to_receive_us.p99_us);
    let added = |mode| Some(round(p99(mode, |p| p.push_to_ack_us.p99_us)? - base?, 1));
    let rec = ReliableRecord {
        scenario: "reliable",
        connections: args.connections,
        shards,
        window: args.window,
        payload_bytes: args.payload_bytes.max(latency::STAMP_BYTES),
        duration_s: args.duration_s,
        warmup_s: args.warmup_s,
        added_p99_memory_us: added(Mode::Memory),
        added_p99_redis_us: added(Mode::Redis),
        points,
        run: RunInfo::now(h.elapsed()),
    };
    let lost: u64 = rec.points.iter().map(|p| p.lost).sum();
    record::emit(&rec, &args.common.out())?;
    if lost > 0 {
        bail!("{lost} messages lost");
    }
    Ok(())
}

fn measure(
    args: &ReliableArgs,
    (mode, rate): (Mode, f64),
    push_addr: SocketAddr,
    clients: &Clients,
    (server, redis_pid): (&mut ServerProcess, Option<u32>),
    h: &mut Harness,
) -> anyhow::Result<Point> {
    let plan = |seconds: f64| PushPlan {
        addr: push_addr,
        devices: clients.devices.clone(),
        rate,
        count: (rate * seconds).round() as u64,
        qos: mode.qos(),
        payload_bytes: args.payload_bytes,
    };
    if args.warmup_s > 0.0 {
        let warm = push(&plan(args.warmup_s), h, server)?;
        clients.wait_received(warm.expected(), h)?;
        clients.reset();
    }
    let cpu = CpuMeter::start(server.pid(), Vec::new());
    let redis_cpu0 = redis_pid.map(|p| sys::cpu_ns(p).unwrap_or(0));
    let out = push(&plan(args.duration_s), h, server)?;
    let cpu = cpu.read();
    let per_push = |cpu_ns: u64| round(cpu_ns as f64 / out.sent.max(1) as f64 / 1000.0, 1);
    let redis_cpu = redis_pid.zip(redis_cpu0).map(|(p, c0)| per_push(sys::cpu_ns(p).unwrap_or(0).saturating_sub(c0)));
    clients.wait_received(out.expected(), h)?;
    let stats = clients.take();
    let received = stats.received;
    let point = Point {
        mode,
        rate_per_sec: rate,
        sent: out.sent,
        replies: out.replies,
        stored: out.stored,
        delivered: out.delivered,
        not_online: out.not_online,
        rejected: out.rejected,
        request_errors: out.errors,
        achieved_rate_per_sec: round(out.achieved_rate(), 1),
        answered_per_sec: round(out.answered_rate(), 1),
        messages_expected: out.expected(),
        messages_received: received,
        lost: out.expected().saturating_sub(received),
        duplicates_removed: stats.duplicates,
        push_to_receive_us: LatencySummary::of(&stats.receive),
        push_to_ack_us: LatencySummary::of(&stats.ack),
        push_reply_us: LatencySummary::of(&out.reply_hist),
        sender_lag_us: LatencySummary::of(&out.lag_hist),
        cpu,
        server_cpu_per_push_us: per_push(cpu.server_cpu_ns),
        server_cpu_per_delivery_us: round(cpu.server_cpu_ns as f64 / received.max(1) as f64 / 1000.0, 1),
        redis_cpu_per_push_us: redis_cpu,
    };
    h.note(&format!(
        "{mode:?} at {rate:.0}/s: sent {} ({:.0}/s answered), received {received} of {}, receive p50/p99 {:.0}/{:.0} us, \
         ack p50/p99 {:.0}/{:.0} us, server {:.1} us/push, redis {:?} us/push",
        point.sent,
        point.answered_per_sec,
        point.messages_expected,
        point.push_to_receive_us.p50_us,
        point.push_to_receive_us.p99_us,
        point.push_to_ack_us.p50_us,
        point.push_to_ack_us.p99_us,
        point.server_cpu_per_push_us,
        point.redis_cpu_per_push_us,
    ));
    h.note(&cpu_line(&point.cpu));
    Ok(point)
}

// ---- clients ----------------------------------------------------------------

/// What the clients measured since the last reset.
struct Stats {
    receive: Histogram<u64>,
    ack: Histogram<u64>,
    received: u64,
    duplicates: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats { receive: latency::new_histogram(), ack: latency::new_histogram(), received: 0, duplicates: 0 }
    }
}

/// N client connections on one glommio executor thread.
struct Clients {
    devices: Arc<Vec<String>>,
    stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl Clients {
    fn start(addr: SocketAddr, key: &BenchKey, n: u32, h: &mut Harness) -> anyhow::Result<Clients> {
        let ring = key.spec().keyring()?;
        let now = longlink::protocol::token::now_unix_secs();
        let devices: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("rel-{i}")).collect());
        let tokens: Vec<String> = devices.iter().map(|d| ring.mint(d, d, "bench", now, now + 86_400)).collect();
        let stats = Arc::new(Mutex::new(Stats::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stats, stop, connected, failed) = (stats.clone(), stop.clone(), connected.clone(), failed.clone());
            std::thread::Builder::new()
                .name("reliable-clients".into())
                .spawn(move || -> anyhow::Result<()> {
                    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                        .io_memory(256 * 1024)
                        .ring_depth(4096)
                        .make()
                        .map_err(|e| anyhow!("client executor: {e}"))?;
                    ex.run(async move {
                        for token in tokens {
                            let (stats, connected, failed) = (stats.clone(), connected.clone(), failed.clone());
                            glommio::spawn_local(async move {
                                let mut opts = ClientOptions::new(token);
                                opts.heartbeat_ms = NO_PING_HEARTBEAT_MS;
                                match Connection::connect(addr, opts).await {
                                    Ok((conn, _)) => {
                                        connected.fetch_add(1, Ordering::Relaxed);
                                        client_loop(conn, &stats).await;
                                    }
                                    Err(_) => {
                                        failed.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            })
                            .detach();
                        }
                        while !stop.load(Ordering::Relaxed) {
                            glommio::timer::sleep(Duration::from_millis(50)).await;
                        }
                    });
                    Ok(())
                })
                .context("starting the client thread")?
        };
        while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < u64::from(n) {
            h.check()?;
            h.progress(&format!("connecting: {} of {n}", connected.load(Ordering::Relaxed)));
            std::thread::sleep(Duration::from_millis(20));
        }
        if failed.load(Ordering::Relaxed) > 0 {
            bail!("{} of {n} clients failed to connect", failed.load(Ordering::Relaxed));
        }
        h.note(&format!("{n} clients connected"));
        Ok(Clients { devices, stats, stop, thread })
    }

    fn received(&self) -> u64 {
        self.stats.lock().map_or(0, |s| s.received)
    }

    /// Waits until `expected` messages arrived, or nothing arrives for 3 s.
    fn wait_received(&self, expected: u64, h: &mut Harness) -> anyhow::Result<()> {
        let mut last = (self.received(), Instant::now());
        loop {
            h.check()?;
            let now = self.received();
            if now >= expected {
                return Ok(());
            }
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(3) {
                return Ok(());
            }
            h.progress(&format!("waiting for deliveries: {now} of {expected}"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn reset(&self) {
        if let Ok(mut s) = self.stats.lock() {
            *s = Stats::new();
        }
    }

    fn take(&self) -> Stats {
        self.stats.lock().map_or_else(|_| Stats::new(), |mut s| std::mem::replace(&mut *s, Stats::new()))
    }

    fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("the client thread panicked"))?
    }
}

async fn client_loop(mut conn: Connection, stats: &Mutex<Stats>) {
    let mut dups = 0;
    while let Ok(ev) = conn.next_event().await {
        let ClientEvent::Message(m) = ev else { continue };
        let received_at = mono_ns();
        let stamp = read_stamp(&m.payload).map(|(t, _)| t);
        // Handled at once: acknowledge now.
        let acked = if m.seq != 0 && conn.ack_now().await.is_ok() { Some(mono_ns()) } else { None };
        let Ok(mut s) = stats.lock() else { return };
        if let Some(sent) = stamp {
            s.receive.saturating_record(received_at.saturating_sub(sent).max(1));
            if let Some(at) = acked {
                s.ack.saturating_record(at.saturating_sub(sent).max(1));
            }
        }
        s.received += 1;
        s.duplicates += conn.duplicates() - dups;
        dups = conn.duplicates();
    }
}

// ---- backend --------------------------------------------------------------

struct PushPlan {
    addr: SocketAddr,
    devices: Arc<Vec<String>>,
    rate: f64,
    count: u64,
    qos: Qos,
    payload_bytes: usize,
}

struct PushOut {
    sent: u64,
    replies: u64,
    stored: u64,
    delivered: u64,
    not_online: u64,
    rejected: u64,
    errors: u64,
    /// Sessions the node queued at-most-once messages to.
    sessions: u64,
    first_send_ns: u64,
    last_send_ns: u64,
    last_reply_ns: u64,
    reply_hist: Histogram<u64>,
    lag_hist: Histogram<u64>,
}

impl PushOut {
    fn new() -> PushOut {
        PushOut {
            sent: 0,
            replies: 0,
            stored: 0,
            delivered: 0,
            not_online: 0,
            rejected: 0,
            errors: 0,
            sessions: 0,
            first_send_ns: 0,
            last_send_ns: 0,
            last_reply_ns: 0,
            reply_hist: latency::new_histogram(),
            lag_hist: latency::new_histogram(),
        }
    }

    fn expected(&self) -> u64 {
        if self.stored > 0 { self.stored } else { self.sessions }
    }

    fn achieved_rate(&self) -> f64 {
        let span = self.last_send_ns.saturating_sub(self.first_send_ns) as f64 / 1e9;
        if self.sent < 2 || span <= 0.0 { 0.0 } else { (self.sent - 1) as f64 / span }
    }

    fn answered_rate(&self) -> f64 {
        let span = self.last_reply_ns.saturating_sub(self.first_send_ns) as f64 / 1e9;
        if span <= 0.0 { 0.0 } else { self.replies as f64 / span }
    }
}

/// Open-loop pushes: a sender thread sends push `k` at `start + k / rate`
/// (stamped with that intended time), a reply thread reads the replies.
fn push(plan: &PushPlan, h: &mut Harness, server: &mut ServerProcess) -> anyhow::Result<PushOut> {
    let client = PushClient::connect(plan.addr, Duration::from_secs(5), &crate::server::bench_push_key())
        .context("connecting to the push port")?;
    let (mut tx, mut rx) = client.split()?;
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new((0..SENT_AT_RING).map(|_| AtomicU64::new(0)).collect());
    let sender_done = Arc::new(AtomicU64::new(0));
    let (count, rate, qos, payload_bytes, devices) =
        (plan.count, plan.rate, plan.qos, plan.payload_bytes, plan.devices.clone());
    let sender = {
        let (sent_at, sender_done) = (sent_at.clone(), sender_done.clone());
        std::thread::spawn(move || -> Result<PushOut, BackendError> {
            sys::tight_timer_slack();
            let mut out = PushOut::new();
            let mut rng = Rng::from_entropy();
            let start = mono_ns() + 20_000_000;
            let period = 1e9 / rate;
            let mut k = 0;
            while k < count {
                let now = mono_ns();
                let due = start + (k as f64 * period) as u64;
                if due > now {
                    std::thread::sleep(Duration::from_nanos(due - now));
                    continue;
                }
                while k < count && start + (k as f64 * period) as u64 <= now {
                    let stamp = start + (k as f64 * period) as u64;
                    let device = &devices[rng.below(devices.len() as u64) as usize];
                    let id = tx.send(Request::Push(proto::PushRequest {
                        targets: Some(proto::Targets { devices: vec![device.clone()], ..Default::default() }),
                        payload: Bytes::from(stamp_payload(stamp, k, payload_bytes)),
                        qos: qos as i32,
                        ..Default::default()
                    }))?;
                    sent_at[id as usize % SENT_AT_RING].store(stamp, Ordering::Relaxed);
                    out.lag_hist.saturating_record(now.saturating_sub(stamp).max(1));
                    if out.first_send_ns == 0 {
                        out.first_send_ns = stamp;
                    }
                    out.last_send_ns = stamp;
                    out.sent += 1;
                    k += 1;
                }
                tx.flush()?;
            }
            tx.flush()?;
            sender_done.store(out.sent.max(1), Ordering::Release);
            Ok(out)
        })
    };
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut out = PushOut::new();
    let mut idle_since = Instant::now();
    loop {
        h.check()?;
        server.check_alive()?;
        match rx.recv() {
            Ok(reply) => {
                let now = mono_ns();
                let at = sent_at[reply.request_id() as usize % SENT_AT_RING].load(Ordering::Relaxed);
                if at != 0 {
                    out.reply_hist.saturating_record(now.saturating_sub(at).max(1));
                }
                out.last_reply_ns = now;
                out.replies += 1;
                idle_since = Instant::now();
                match reply {
                    Reply::Push(r) => {
                        out.sessions += r.delivered;
                        for t in &r.results {
                            match PushStatus::try_from(t.status) {
                                Ok(PushStatus::Stored) => out.stored += 1,
                                Ok(PushStatus::Delivered) => out.delivered += 1,
                                Ok(PushStatus::NotOnline) => out.not_online += 1,
                                Ok(PushStatus::Rejected) => out.rejected += 1,
                                _ => out.errors += 1,
                            }
                        }
                    }
                    _ => out.errors += 1,
                }
            }
            Err(BackendError::Timeout(_)) => {}
            Err(err) => return Err(err).context("reading push replies"),
        }
        let done = sender_done.load(Ordering::Acquire);
        if done > 0 && (out.replies >= count || idle_since.elapsed() >= Duration::from_secs(5)) {
            break;
        }
        h.progress(&format!("pushing: {} replies of {count}", out.replies));
    }
    let sent = sender.join().map_err(|_| anyhow!("the push sender panicked"))?.context("sending pushes")?;
    out.sent = sent.sent;
    out.first_send_ns = sent.first_send_ns;
    out.last_send_ns = sent.last_send_ns;
    out.lag_hist = sent.lag_hist;
    Ok(out)
}

// ---- redis ------------------------------------------------------------------

/// A `redis-server` on a free loopback port (no persistence), killed on drop.
pub(crate) struct RedisProcess {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl RedisProcess {
    pub(crate) fn start(bin: &str) -> anyhow::Result<RedisProcess> {
        let dir = TempDir::new("longlink-bench-redis")?;
        // Bind-and-release finds a free port; redis binds it right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null());
        crate::server::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {bin} (install redis-server, or leave redis out of --modes)"))?;
        let redis = RedisProcess { child, port, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.ping() {
            if Instant::now() >= deadline {
                bail!("redis-server on port {port} did not answer PING");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
