//! The load worker: the bench binary re-invoked as `longlink-bench
//! load-worker` (hidden). Like the idle [`worker`](crate::worker) it opens
//! its share of the clients on one glommio executor, but every connection
//! then has a task that reads it: pushed messages are timed (their payload
//! starts with the sender's CLOCK_MONOTONIC stamp, see [`crate::latency`])
//! into one hdrhistogram per worker, heartbeats go out on the negotiated
//! interval, and connections may churn (close and reconnect the same
//! device) or rejoin after an unexpected close.
//!
//! Protocol (JSON lines, like the idle worker's):
//! 1. The parent writes one [`LoadSpec`] line on stdin.
//! 2. The worker connects (and joins `join_group`), printing
//!    [`WorkerMsg::Progress`] and one [`WorkerMsg::Connected`] when every
//!    client made its first attempt; the pool's `wait_connected` reads them.
//! 3. Then it answers commands, one per stdin line: `stats` prints a
//!    [`LoadMsg::Stats`], `report` a [`LoadMsg::Report`] (with the latency
//!    histogram, hdrhistogram V2 in base64), `reset` clears the counters
//!    and the histogram and prints [`LoadMsg::ResetDone`].
//! 4. Stdin EOF: it closes every connection, prints [`WorkerMsg::Closed`]
//!    and exits 0 (the pool's `release`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, BufRead as _};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use longlink::client::{ClientError, ClientEvent, Connection};
use longlink::protocol::token::Keyring;
use serde::{Deserialize, Serialize};

use crate::latency::{self, mono_ns, read_stamp};
use crate::rng::Rng;
use crate::sys;
use crate::worker::{self, WorkerMsg, WorkerSpec, count_reason, emit, unix_us};
use crate::wsload::WsConn;

/// Least time between two connect progress lines.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Pause before reconnecting after an unexpected close.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What one load worker does; the first line of its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Connect plan: server, count, sources, key, heartbeat, device ids.
    pub worker: WorkerSpec,
    /// Group every client joins right after AuthOk.
    pub join_group: Option<String>,
    /// Fraction of this worker's connections that close and reconnect (same
    /// device) per second; 0 for none. Lifetimes are exponential, so churn
    /// is a steady Poisson stream.
    pub churn_per_sec: f64,
    /// Reconnect (after 1 s) when the server or the network ends a
    /// connection; otherwise that client stays gone.
    pub reconnect: bool,
    /// Seed of the churn lifetimes.
    pub seed: u64,
}

/// A load worker's own stdout lines (the pool hands them over raw).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LoadMsg {
    /// Answer to `stats`: counters, no histogram.
    Stats(LoadCounts),
    /// Answer to `report`: counters and the latency histogram.
    Report(LoadCounts),
    /// Answer to `reset`.
    ResetDone,
}

impl LoadMsg {
    /// Parses a line the pool did not recognise as a [`WorkerMsg`].
    pub fn parse(line: &str) -> Option<LoadMsg> {
        serde_json::from_str(line).ok()
    }
}

/// Counters since the start or the last `reset`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadCounts {
    /// Pushed messages received.
    pub received: u64,
    /// Messages whose payload carried no stamp (not timed).
    pub unstamped: u64,
    /// CLOCK_MONOTONIC of the first and last message received (0: none).
    pub first_recv_mono_ns: u64,
    pub last_recv_mono_ns: u64,
    /// Connections authenticated right now.
    pub connected_now: u32,
    /// Deliberate close-and-reconnect cycles (churn).
    pub churned: u64,
    /// Successful reconnects (churn or after an unexpected close).
    pub reconnects: u64,
    /// Failed reconnect attempts.
    pub reconnect_failures: u64,
    /// Connections the server or network ended, by error text.
    pub disconnects: BTreeMap<String, u64>,
    /// Heartbeat answers received.
    pub pongs: u64,
    /// Push-to-receive latency in ns, hdrhistogram V2 + base64 (reports only).
    pub latency_hist: Option<String>,
}

/// Entry point of `longlink-bench load-worker`.
pub fn run() -> anyhow::Result<()> {
    let result = run_inner();
    if let Err(err) = &result {
        emit(&WorkerMsg::Fatal { message: format!("{err:#}") });
    }
    result
}

fn run_inner() -> anyhow::Result<()> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).context("reading the load worker spec from stdin")?;
    let spec: LoadSpec = serde_json::from_str(&line).context("parsing the load worker spec")?;
    sys::raise_fd_limit()?;
    let _ = sys::raise_memlock_limit();
    let keyring = spec.worker.key.keyring()?;
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-load-worker")
        .io_memory(64 * 1024)
        .ring_depth(4096)
        .make()
        .map_err(|e| anyhow!("starting the load worker executor: {e}"))?;
    ex.run(async move {
        let ctx = Rc::new(Ctx::new(spec, keyring));
        let slots: Vec<_> =
            (0..ctx.spec.worker.connections).map(|n| glommio::spawn_local(slot(ctx.clone(), n))).collect();
        let reporter = glommio::spawn_local(report_connect_progress(ctx.clone()));
        commands(&ctx).await;
        drop(reporter);
        let held = ctx.st.borrow().counts.connected_now;
        // Dropping a task handle cancels the task, which drops (closes) its connection.
        drop(slots);
        emit(&WorkerMsg::Closed { held });
    });
    Ok(())
}

/// Everything the connection tasks share.
struct Ctx {
    spec: LoadSpec,
    keyring: Keyring,
    /// Connects (TCP + Auth) in progress at once.
    gate: Semaphore,
    st: RefCell<State>,
}

struct State {
    counts: LoadCounts,
    hist: Histogram<u64>,
    rng: Rng,
    /// Connect phase (first attempt of every client), for [`WorkerMsg::Connected`].
    first_attempts_done: u32,
    first_connected: u32,
    first_failed: u32,
    first_failures: BTreeMap<String, u32>,
    started: Option<Instant>,
    first_connect_unix_us: Option<u64>,
    last_auth_ok_unix_us: u64,
}

impl Ctx {
    fn new(spec: LoadSpec, keyring: Keyring) -> Ctx {
        let gate = Semaphore::new(u64::from(spec.worker.in_flight.max(1)));
        let rng = Rng::new(spec.seed ^ u64::from(spec.worker.index).wrapping_mul(0x9E37_79B9));
        Ctx {
            spec,
            keyring,
            gate,
            st: RefCell::new(State {
                counts: LoadCounts::default(),
                hist: latency::new_histogram(),
                rng,
                first_attempts_done: 0,
                first_connected: 0,
                first_failed: 0,
                first_failures: BTreeMap::new(),
                started: None,
                first_connect_unix_us: None,
                last_auth_ok_unix_us: 0,
            }),
        }
    }

    /// Connects client `n` (and joins the group), `in_flight` at a time.
    async fn connect(&self, n: u32) -> Result<LoadConn, ClientError> {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = self.gate.acquire_permit(1).await;
        let w = &self.spec.worker;
        if w.transport == crate::links::Transport::Ws {
            let token = worker::token_for(w, &self.keyring, n);
            let source = std::net::IpAddr::V4(w.source.address(n));
            let timeout = Duration::from_millis(w.connect_timeout_ms);
            let mut conn = WsConn::connect(w.server, source, timeout, token, w.heartbeat_ms).await?;
            if let Some(group) = &self.spec.join_group {
                conn.join(group).await?;
            }
            return Ok(LoadConn::Ws(conn));
        }
        let mut conn = worker::connect_one(w, &self.keyring, n).await?;
        if let Some(group) = &self.spec.join_group {
            conn.join(group).await?;
        }
        Ok(LoadConn::Native(Box::new(conn)))
    }

    fn first_attempt(&self, result: &Result<LoadConn, ClientError>) {
        let mut st = self.st.borrow_mut();
        match result {
            Ok(_) => {
                st.first_connected += 1;
                st.counts.connected_now += 1;
                st.last_auth_ok_unix_us = unix_us();
            }
            Err(err) => {
                st.first_failed += 1;
                count_reason(&mut st.first_failures, err.to_string());
            }
        }
        st.first_attempts_done += 1;
        if st.first_attempts_done == self.spec.worker.connections {
            emit(&WorkerMsg::Connected {
                connected: st.first_connected,
                failed: st.first_failed,
                failures: st.first_failures.clone(),
                first_connect_unix_us: st.first_connect_unix_us.unwrap_or(0),
                last_auth_ok_unix_us: st.last_auth_ok_unix_us,
                elapsed_s: st.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            });
        }
    }

    /// How long a connection lives before it churns; `None`: until the end.
    fn lifetime(&self) -> Option<Duration> {
        let rate = self.spec.churn_per_sec;
        (rate > 0.0).then(|| Duration::from_secs_f64(self.st.borrow_mut().rng.exponential(1.0 / rate)))
    }

    fn on_event(&self, event: ClientEvent) {
        let mut st = self.st.borrow_mut();
        match event {
            ClientEvent::Message(m) => {
                let now = mono_ns();
                let c = &mut st.counts;
                c.received += 1;
                if c.first_recv_mono_ns == 0 {
                    c.first_recv_mono_ns = now;
                }
                c.last_recv_mono_ns = now;
                match read_stamp(&m.payload) {
                    Some((sent, _seq)) => st.hist.saturating_record(now.saturating_sub(sent).max(1)),
                    None => c.unstamped += 1,
                }
            }
            ClientEvent::Pong { .. } => st.counts.pongs += 1,
            _ => {}
        }
    }
}

/// A load client: the SDK's connection over TCP, or the bench's WebSocket
/// client.
enum LoadConn {
    Native(Box<Connection>),
    Ws(WsConn),
}

impl LoadConn {
    async fn next_event(&mut self) -> Result<ClientEvent, ClientError> {
        match self {
            LoadConn::Native(c) => c.next_event().await,
            LoadConn::Ws(c) => c.next_event().await,
        }
    }

    async fn close(self) {
        match self {
            LoadConn::Native(c) => c.close().await,
            LoadConn::Ws(c) => c.close().await,
        }
    }
}

/// One client for the whole run: connect, read until it churns or the
/// connection ends, reconnect when the spec says so.
async fn slot(ctx: Rc<Ctx>, n: u32) {
    {
        let mut st = ctx.st.borrow_mut();
        st.started.get_or_insert_with(Instant::now);
        st.first_connect_unix_us.get_or_insert_with(unix_us);
    }
    let first = ctx.connect(n).await;
    ctx.first_attempt(&first);
    let Ok(mut conn) = first else { return };
    loop {
        let ended = match ctx.lifetime() {
            None => Some(read_until_error(&ctx, &mut conn).await),
            Some(life) => {
                futures_lite::future::or(async { Some(read_until_error(&ctx, &mut conn).await) }, async {
                    glommio::timer::sleep(life).await;
                    None
                })
                .await
            }
        };
        ctx.st.borrow_mut().counts.connected_now -= 1;
        match ended {
            None => {
                conn.close().await;
                ctx.st.borrow_mut().counts.churned += 1;
            }
            Some(err) => {
                count_reason(&mut ctx.st.borrow_mut().counts.disconnects, err.to_string());
                drop(conn);
                if !ctx.spec.reconnect {
                    return;
                }
                glommio::timer::sleep(RECONNECT_DELAY).await;
            }
        }
        conn = loop {
            match ctx.connect(n).await {
                Ok(c) => break c,
                Err(_) => {
                    ctx.st.borrow_mut().counts.reconnect_failures += 1;
                    glommio::timer::sleep(RECONNECT_DELAY).await;
                }
            }
        };
        let mut st = ctx.st.borrow_mut();
        st.counts.reconnects += 1;
        st.counts.connected_now += 1;
    }
}

async fn read_until_error(ctx: &Ctx, conn: &mut LoadConn) -> ClientError {
    loop {
        match conn.next_event().await {
            Ok(event) => ctx.on_event(event),
            Err(err) => return err,
        }
    }
}

/// Connect progress lines until every client made its first attempt.
async fn report_connect_progress(ctx: Rc<Ctx>) {
    let mut last = (u32::MAX, u32::MAX);
    loop {
        glommio::timer::sleep(PROGRESS_EVERY).await;
        let st = ctx.st.borrow();
        if st.first_attempts_done >= ctx.spec.worker.connections {
            return;
        }
        let now = (st.first_connected, st.first_failed);
        if now != last {
            emit(&WorkerMsg::Progress { connected: now.0, failed: now.1 });
            last = now;
        }
    }
}

/// Answers stdin commands until EOF.
async fn commands(ctx: &Ctx) {
    loop {
        // The blocking read runs on glommio's helper thread; the executor
        // keeps serving the connections meanwhile.
        let line = glommio::executor()
            .spawn_blocking(|| {
                let mut line = String::new();
                io::stdin().lock().read_line(&mut line).map(|n| (n, line))
            })
            .await;
        let Ok((n, line)) = line else { return };
        if n == 0 {
            return;
        }
        let mut st = ctx.st.borrow_mut();
        match line.trim() {
            "stats" => emit(&LoadMsg::Stats(st.counts.clone())),
            "report" => {
                let mut counts = st.counts.clone();
                match latency::encode(&st.hist) {
                    Ok(text) => counts.latency_hist = Some(text),
                    Err(err) => emit(&WorkerMsg::Fatal { message: format!("{err:#}") }),
                }
                emit(&LoadMsg::Report(counts));
            }
            "reset" => {
                let connected_now = st.counts.connected_now;
                st.counts = LoadCounts { connected_now, ..LoadCounts::default() };
                st.hist.reset();
                emit(&LoadMsg::ResetDone);
            }
            other => emit(&WorkerMsg::Fatal { message: format!("unknown command {other:?}") }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_messages_are_tagged_and_not_worker_messages() {
        let line = serde_json::to_string(&LoadMsg::Stats(LoadCounts { received: 5, ..Default::default() })).unwrap();
        assert!(line.starts_with(r#"{"type":"stats","received":5"#), "{line}");
        assert!(serde_json::from_str::<WorkerMsg>(&line).is_err());
        assert_eq!(LoadMsg::parse(&line), Some(LoadMsg::Stats(LoadCounts { received: 5, ..Default::default() })));
        assert_eq!(LoadMsg::parse(r#"{"type":"reset_done"}"#), Some(LoadMsg::ResetDone));
        assert_eq!(LoadMsg::parse("garbage"), None);
    }
}
