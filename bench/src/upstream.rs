//! Scenario `upstream`: the round trip of a client request through
//! longlink to a service backend and back, against the same request sent
//! straight to the backend, in the same run.
//!
//! Starts `longlink echo-backend` and a node whose one service ("echo")
//! points at it. For each rate, two open-loop phases (warm-up, then
//! measured): `direct` sends `UpstreamRequest` frames to the echo backend,
//! `longlink` sends client `Request` frames to the node, which forwards them
//! over its own pipelined backend connections. Every body starts with its
//! intended send time (CLOCK_MONOTONIC), so a late sender shows up as
//! latency instead of hiding it (no coordinated omission). The difference
//! between the two phases is what longlink adds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use longlink::config::ServiceConfig;
use longlink::protocol::codec::{self, Flags, Frame};
use longlink::protocol::ids::owner_shard;
use longlink::protocol::proto;
use serde::Serialize;

use crate::harness::Harness;
use crate::latency::{self, LatencySummary};
use crate::record::{self, RunInfo, round};
use crate::server::{self, BenchKey, ServerProcess};
use crate::sys;

/// The service the node forwards to the echo backend.
const SERVICE: &str = "echo";
/// How long readers wait for the last answers after the senders stop.
const DRAIN: Duration = Duration::from_secs(5);
/// The target from the issue: added p99 at 10k requests/s.
const TARGET_ADDED_P99_US: f64 = 200.0;

#[derive(Debug, Clone, clap::Args)]
pub struct UpstreamArgs {
    /// Request rates to measure, requests/s over all connections (open
    /// loop); each is run directly and through longlink.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    pub rates: Vec<f64>,
    /// Length of each measured phase, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// Unmeasured warm-up at the same rate before each path's first slice,
    /// seconds.
    #[arg(long, default_value_t = 2.0)]
    pub warmup_s: f64,
    /// The measured time of each path is cut into this many slices, run
    /// alternately (direct, longlink, direct, ...), so that anything else
    /// happening on the host weighs on both paths alike.
    #[arg(long, default_value_t = 5)]
    pub slices: u32,
    /// Connections per phase (client connections to the node, or backend
    /// connections to the echo backend), each with a sender and a reader
    /// thread.
    #[arg(long, default_value_t = 2)]
    pub connections: u32,
    /// Request body size in bytes (the first 16 are the timestamp and
    /// sequence number).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Node connections to the backend per shard (`pool_size`).
    #[arg(long, default_value_t = 1)]
    pub pool_size: u32,
    /// Server shards. Default: one per core of this host.
    #[arg(long)]
    pub shards: Option<u16>,
    /// The `longlink` binary (server and echo backend). Default:
    /// target/release/longlink.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// JSON-lines file the record is appended to. Default:
    /// bench/runs/results.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Abort the whole run after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
}

/// One phase's outcome.
#[derive(Debug, Serialize)]
struct PhaseResult {
    /// Requests sent in the measured part, and answers received for them.
    sent: u64,
    received: u64,
    /// Answers whose status was not OK.
    errors: u64,
    achieved_rate_per_sec: f64,
    /// Intended send time to answer received.
    latency_us: LatencySummary,
    /// How late the senders were against the schedule.
    sender_lag_us: LatencySummary,
    /// CPU seconds used during the measured part by the node (0 for
    /// `direct`) and by the echo backend.
    server_cpu_s: f64,
    backend_cpu_s: f64,
}

#[derive(Debug, Serialize)]
struct RatePoint {
    rate_per_sec: f64,
    direct: PhaseResult,
    longlink: PhaseResult,
    /// longlink minus direct.
    added_p50_us: f64,
    added_p99_us: f64,
    added_p999_us: f64,
}

/// The `upstream` result record.
#[derive(Debug, Serialize)]
struct UpstreamRecord {
    scenario: &'static str,
    shards: u16,
    connections: u32,
    pool_size: u32,
    body_bytes: usize,
    duration_s: f64,
    warmup_s: f64,
    slices: u32,
    points: Vec<RatePoint>,
    target_added_p99_us: f64,
    /// `added_p99_us` at the 10,000/s point, when one was measured.
    added_p99_at_10k_us: Option<f64>,
    target_met: Option<bool>,
    #[serde(flatten)]
    run: RunInfo,
}

pub fn run(args: &UpstreamArgs) -> anyhow::Result<()> {
    if args.rates.is_empty() || args.rates.iter().any(|r| !r.is_finite() || *r <= 0.0) {
        bail!("--rates must list positive rates, e.g. 10000,50000");
    }
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let mut harness = Harness::new(Duration::from_secs(args.timeout_s))?;
    let bin = args.server_bin.clone().unwrap_or_else(server::default_server_bin);
    if let Some(warning) = server::check_server_bin(&bin)? {
        harness.note(&warning);
    }
    sys::raise_memlock_limit()?;
    let shards = args.shards.unwrap_or_else(|| u16::try_from(sys::host_cores()).unwrap_or(u16::MAX));
    let started = Instant::now();

    let backend = EchoProcess::start(&bin)?;
    let key = BenchKey::generate()?;
    let mut cfg = server::bench_config(shards, &key);
    cfg.upstream.rate_limit_per_sec = 0;
    cfg.upstream.services = vec![ServiceConfig {
        id: SERVICE.into(),
        backends: vec![backend.addr.to_string()],
        timeout_ms: 10_000,
        max_inflight_per_shard: 1 << 20,
        pool_size: args.pool_size,
        subscribe_events: false,
    }];
    let mut node = ServerProcess::start(&bin, &cfg, &harness)?;
    harness.note(&format!("node {} (pid {}), echo backend {}", node.addr(), node.pid(), backend.addr));
    let keyring = key.spec().keyring()?;

    let mut points = Vec::new();
    let slices = args.slices.max(1);
    let slice = secs(args.duration_s) / slices;
    for &rate in &args.rates {
        let plan = Plan { rate, args: args.clone() };
        let mut direct = Phase::open(&Path::Direct(backend.addr), args.connections, None, backend.pid)?;
        let clients = Path::Longlink { addr: node.addr(), keyring: &keyring, shards };
        let mut via = Phase::open(&clients, args.connections, Some(node.pid()), backend.pid)?;
        for (i, phase) in [&mut direct, &mut via].into_iter().enumerate() {
            harness.note(&format!("{rate}/s {} warm-up ...", ["direct", "longlink"][i]));
            plan.run(&harness, phase, secs(args.warmup_s), false)?;
        }
        for n in 0..slices {
            harness.progress(&format!("{rate}/s slice {}/{slices}", n + 1));
            plan.run(&harness, &mut direct, slice, true)?;
            plan.run(&harness, &mut via, slice, true)?;
            node.check_alive()?;
        }
        let (direct, via) = (direct.result(secs(args.duration_s)), via.result(secs(args.duration_s)));
        harness.note(&format!("{rate}/s direct   {}", direct.latency_us.line()));
        harness.note(&format!("{rate}/s longlink {}", via.latency_us.line()));
        points.push(RatePoint {
            rate_per_sec: rate,
            added_p50_us: round(via.latency_us.p50_us - direct.latency_us.p50_us, 1),
            added_p99_us: round(via.latency_us.p99_us - direct.latency_us.p99_us, 1),
            added_p999_us: round(via.latency_us.p999_us - direct.latency_us.p999_us, 1),
            direct,
            longlink: via,
        });
    }
    node.stop()?;
    drop(backend);

    let at_10k = points.iter().find(|p| (p.rate_per_sec - 10_000.0).abs() < 1.0).map(|p| p.added_p99_us);
    let record = UpstreamRecord {
        scenario: "upstream",
        shards,
        connections: args.connections,
        pool_size: args.pool_size,
        body_bytes: args.body_bytes,
        duration_s: args.duration_s,
        warmup_s: args.warmup_s,
        slices,
        points,
        target_added_p99_us: TARGET_ADDED_P99_US,
        added_p99_at_10k_us: at_10k,
        target_met: at_10k.map(|added| added < TARGET_ADDED_P99_US),
        run: RunInfo::now(started.elapsed()),
    };
    record::emit(&record, &args.out.clone().unwrap_or_else(default_out))
}

fn default_out() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("runs/results.jsonl")
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// Where a phase sends its requests.
enum Path<'a> {
    Direct(SocketAddr),
    Longlink { addr: SocketAddr, keyring: &'a longlink::protocol::token::Keyring, shards: u16 },
}

struct Plan {
    rate: f64,
    args: UpstreamArgs,
}

/// One path's connections and what its measured slices added up to.
struct Phase {
    streams: Vec<TcpStream>,
    direct: bool,
    node_pid: Option<u32>,
    backend_pid: u32,
    sent: u64,
    received: u64,
    errors: u64,
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    server_cpu_s: f64,
    backend_cpu_s: f64,
}

impl Phase {
    fn open(path: &Path<'_>, connections: u32, node_pid: Option<u32>, backend_pid: u32) -> anyhow::Result<Phase> {
        let streams = (0..connections).map(|i| open(path, i)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Phase {
            streams,
            direct: matches!(path, Path::Direct(_)),
            node_pid,
            backend_pid,
            sent: 0,
            received: 0,
            errors: 0,
            latency: latency::new_histogram(),
            lag: latency::new_histogram(),
            server_cpu_s: 0.0,
            backend_cpu_s: 0.0,
        })
    }

    fn result(&self, measured: Duration) -> PhaseResult {
        PhaseResult {
            sent: self.sent,
            received: self.received,
            errors: self.errors,
            achieved_rate_per_sec: round(self.sent as f64 / measured.as_secs_f64().max(1e-9), 1),
            latency_us: LatencySummary::of(&self.latency),
            sender_lag_us: LatencySummary::of(&self.lag),
            server_cpu_s: round(self.server_cpu_s, 3),
            backend_cpu_s: round(self.backend_cpu_s, 3),
        }
    }
}

/// What a connection's reader measured.
struct Received {
    received: u64,
    errors: u64,
    latency: Histogram<u64>,
}

/// Shared by a connection's sender and reader: the reader is done once the
/// sender has finished and every request it sent is answered.
#[derive(Default)]
struct Progress {
    sent_total: AtomicU64,
    sender_done: AtomicBool,
    /// Set by the parent after the drain time: stop waiting.
    give_up: AtomicBool,
}

impl Plan {
    /// Sends at the plan's rate on `phase`'s connections for `length`;
    /// `measure` adds the slice to the phase's results (else a warm-up).
    fn run(&self, harness: &Harness, phase: &mut Phase, length: Duration, measure: bool) -> anyhow::Result<()> {
        let n = phase.streams.len() as u64;
        let period_ns = (1e9 / self.rate * n as f64) as u64;
        // Start a little ahead so every thread is waiting when the clock starts.
        let start_ns = latency::mono_ns() + 20_000_000;
        let end_ns = start_ns + length.as_nanos() as u64;
        let measure_ns = if measure { start_ns } else { u64::MAX };
        let mut threads = Vec::new();
        for (i, stream) in phase.streams.iter().enumerate() {
            let (writer, reader) = (stream.try_clone()?, stream.try_clone()?);
            let progress = Arc::new(Progress::default());
            let job = SendJob {
                first_ns: start_ns + period_ns * i as u64 / n,
                period_ns,
                measure_ns,
                end_ns,
                direct: phase.direct,
                body: self.args.body_bytes,
                progress: progress.clone(),
            };
            let sender = std::thread::Builder::new()
                .name(format!("send-{i}"))
                .spawn(move || send_loop(writer, job))
                .context("starting a sender")?;
            let shared = progress.clone();
            let reader = std::thread::Builder::new()
                .name(format!("recv-{i}"))
                .spawn(move || recv_loop(reader, measure_ns, &shared))
                .context("starting a reader")?;
            threads.push((sender, reader, progress));
        }
        // CPU is read at the slice's edges.
        let cpu = |pid: Option<u32>| pid.map_or(Ok(0.0), sys::cpu_seconds);
        wait_until_ns(start_ns, harness)?;
        let (node0, backend0) = (cpu(phase.node_pid)?, cpu(Some(phase.backend_pid))?);
        wait_until_ns(end_ns, harness)?;
        let (node1, backend1) = (cpu(phase.node_pid)?, cpu(Some(phase.backend_pid))?);
        let mut readers = Vec::new();
        let mut sent = 0;
        let mut lag = latency::new_histogram();
        for (sender, reader, progress) in threads {
            let out = sender.join().map_err(|_| anyhow::anyhow!("a sender panicked"))??;
            sent += out.sent;
            lag.add(&out.lag).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
            readers.push((reader, progress));
        }
        let deadline = Instant::now() + DRAIN;
        while readers.iter().any(|(r, _)| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got = Vec::new();
        for (reader, progress) in readers {
            progress.give_up.store(true, Ordering::Relaxed);
            got.push(reader.join().map_err(|_| anyhow::anyhow!("a reader panicked"))??);
        }
        if !measure {
            return Ok(());
        }
        phase.sent += sent;
        phase.lag.add(&lag).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        for r in got {
            phase.received += r.received;
            phase.errors += r.errors;
            phase.latency.add(&r.latency).map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        }
        phase.server_cpu_s += node1 - node0;
        phase.backend_cpu_s += backend1 - backend0;
        Ok(())
    }
}

fn wait_until_ns(t: u64, harness: &Harness) -> anyhow::Result<()> {
    loop {
        harness.check()?;
        let now = latency::mono_ns();
        if now >= t {
            return Ok(());
        }
        std::thread::sleep(Duration::from_nanos((t - now).min(50_000_000)));
    }
}

/// Opens connection `i` of a phase: a backend connection, or an
/// authenticated client whose device lives on shard `i % shards`.
fn open(path: &Path<'_>, i: u32) -> anyhow::Result<TcpStream> {
    match path {
        Path::Direct(addr) => {
            let s = TcpStream::connect(addr).with_context(|| format!("connecting to the echo backend {addr}"))?;
            s.set_nodelay(true)?;
            Ok(s)
        }
        Path::Longlink { addr, keyring, shards } => {
            let want = longlink::protocol::ids::ShardId((i % u32::from(*shards)) as u16);
            let device = (0..)
                .map(|k| format!("upstream-bench-{i}-{k}"))
                .find(|d| owner_shard(d, *shards) == want)
                .unwrap_or_default();
            let now = longlink::protocol::token::now_unix_secs();
            let token = keyring.mint(&format!("bench-user-{i}"), &device, "bench", now, now + 3600);
            let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to the node {addr}"))?;
            s.set_nodelay(true)?;
            let auth = proto::Auth { token, heartbeat_ms: 270_000, ..Default::default() };
            let mut b = BytesMut::new();
            Frame::Auth(auth).encode_into(&mut b, Flags::default());
            s.write_all(&b)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            match read_frame(&mut s, &mut BytesMut::new())? {
                Frame::AuthOk(_) => {}
                other => bail!("node answered Auth with {other:?}"),
            }
            s.set_read_timeout(None)?;
            Ok(s)
        }
    }
}

fn read_frame(s: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<Frame> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((h, body)) = codec::split_frame(buf, codec::DEFAULT_MAX_BODY)? {
            let frame = Frame::decode(h, body)?;
            let _ = buf.split_to(h.frame_len());
            return Ok(frame);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct SendJob {
    first_ns: u64,
    period_ns: u64,
    measure_ns: u64,
    end_ns: u64,
    direct: bool,
    body: usize,
    progress: Arc<Progress>,
}

struct Sent {
    /// Requests due in the measured part.
    sent: u64,
    lag: Histogram<u64>,
}

/// Sends on schedule; when behind, everything due goes out in one write.
fn send_loop(mut s: TcpStream, job: SendJob) -> anyhow::Result<Sent> {
    sys::tight_timer_slack();
    // What longlink would add for a typical client; sent on the direct path
    // too, so both carry the same bytes to the backend.
    let conn = proto::ConnInfo {
        user: "bench-user-0".into(),
        device: "upstream-bench-0-0".into(),
        app: "bench".into(),
        platform: String::new(),
        client_version: "0.1.0".into(),
        conn_id: 1 << 48,
        node: "bench".into(),
        client_addr: "127.0.0.1:40000".into(),
    };
    let mut out = Sent { sent: 0, lag: latency::new_histogram() };
    let mut buf = BytesMut::new();
    let mut seq = 0u64;
    let mut due = job.first_ns;
    while due < job.end_ns {
        let now = latency::mono_ns();
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
            continue;
        }
        buf.clear();
        while due <= now && due < job.end_ns {
            seq += 1;
            let body = Bytes::from(latency::stamp_payload(due, seq, job.body));
            let frame = if job.direct {
                Frame::UpstreamRequest(proto::UpstreamRequest {
                    id: seq,
                    service_id: SERVICE.into(),
                    conn: Some(conn.clone()),
                    client_msg_id: 0,
                    body,
                    timeout_ms: 10_000,
                })
            } else {
                Frame::Request(proto::Request { service_id: SERVICE.into(), request_id: seq, client_msg_id: 0, body })
            };
            frame.encode_into(&mut buf, Flags::default());
            if due >= job.measure_ns {
                out.sent += 1;
                let _ = out.lag.record(now - due + 1);
            }
            due += job.period_ns;
        }
        s.write_all(&buf).context("sending requests")?;
        job.progress.sent_total.store(seq, Ordering::Release);
    }
    job.progress.sender_done.store(true, Ordering::Release);
    Ok(out)
}

/// Times every answer to a request due in the measured part; returns once
/// every request the sender sent is answered (or the parent gives up).
fn recv_loop(mut s: TcpStream, measure_ns: u64, progress: &Progress) -> anyhow::Result<Received> {
    s.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut out = Received { received: 0, errors: 0, latency: latency::new_histogram() };
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut answered = 0u64;
    loop {
        match s.read(&mut chunk) {
            Ok(0) => bail!("connection closed by the peer"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
        let now = latency::mono_ns();
        while let Some((h, body)) = codec::split_frame(&buf, codec::DEFAULT_MAX_BODY)? {
            let (status, body) = match Frame::decode(h, body)? {
                Frame::Response(r) => (r.status, r.body),
                Frame::UpstreamResponse(r) => (r.status, r.body),
                other => bail!("unexpected {:?} frame", other.kind()),
            };
            let _ = buf.split_to(h.frame_len());
            answered += 1;
            let Some((stamp, _)) = latency::read_stamp(&body) else { continue };
            if stamp < measure_ns {
                continue;
            }
            out.received += 1;
            if status != 0 {
                out.errors += 1;
            }
            let _ = out.latency.record(now.saturating_sub(stamp).max(1));
        }
        let finished =
            progress.sender_done.load(Ordering::Acquire) && answered >= progress.sent_total.load(Ordering::Acquire);
        if finished || progress.give_up.load(Ordering::Relaxed) {
            return Ok(out);
        }
    }
}

/// `longlink echo-backend` in its own process (a backend is another
/// program in production too).
struct EchoProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl EchoProcess {
    fn start(bin: &std::path::Path) -> anyhow::Result<EchoProcess> {
        use std::io::BufRead;
        let mut cmd = Command::new(bin);
        cmd.args(["echo-backend", "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        server::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {} echo-backend", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("echo backend stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).context("reading the echo backend's address")?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("echo backend printed {line:?}, not `listening ADDR`"))?
            .parse()
            .context("echo backend address")?;
        Ok(EchoProcess { child, pid, addr })
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
