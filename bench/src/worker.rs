//! The worker process: the bench binary re-invoked as `longlink-bench
//! worker` (hidden). It opens its share of the client connections on one
//! glommio executor and talks to the parent in JSON lines.
//!
//! Protocol:
//! 1. The parent writes one [`WorkerSpec`] line on the worker's stdin (the
//!    signing key travels there, not on the command line).
//! 2. The worker connects and authenticates `connections` clients,
//!    `in_flight` at a time, printing [`WorkerMsg::Progress`] at most every
//!    100 ms and one [`WorkerMsg::Connected`] at the end.
//! 3. It holds every connection until its stdin reaches EOF, then closes
//!    them, prints [`WorkerMsg::Closed`] and exits 0. Any further stdin
//!    lines are reserved for commands of later scenarios.
//!
//! A fatal problem prints [`WorkerMsg::Fatal`] and exits 1.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, BufRead as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use glommio::{LocalExecutorBuilder, Placement};
use longlink::client::{ClientError, ClientOptions, Connection};
use longlink::protocol::token::{self, Keyring};
use serde::{Deserialize, Serialize};

use crate::source::SourcePlan;
use crate::sys;

/// Lifetime of the tokens workers mint; longer than any run.
const TOKEN_TTL_SECS: i64 = 3600;
/// Least time between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Distinct failure reasons kept; the rest are counted under "other".
const MAX_REASONS: usize = 16;

/// What one worker does; the first line of its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Position among the run's workers (device ids include it).
    pub index: u32,
    pub server: SocketAddr,
    pub connections: u32,
    /// Connects (TCP + Auth) in progress at once.
    pub in_flight: u32,
    pub source: SourcePlan,
    pub key: KeySpec,
    /// Heartbeat interval requested in Auth; the server clamps it to its
    /// bounds. Clients of the idle scenario never ping.
    pub heartbeat_ms: u32,
    /// Bound on the (blocking) TCP connect of one connection, in ms.
    pub connect_timeout_ms: u64,
    /// How long to wait for AuthOk, in ms.
    pub auth_timeout_ms: u64,
    /// Device and user ids are `{device_prefix}{index}-{n}`, unique per run.
    pub device_prefix: String,
    /// Idle scenario: how the clients connect (`server` is that listener).
    #[serde(default)]
    pub transport: crate::links::Transport,
    /// DER of the CA that signed the server's certificate (TLS, wss).
    #[serde(default)]
    pub ca_der: Vec<u8>,
}

/// The key workers sign tokens with.
#[derive(Clone, Serialize, Deserialize)]
pub struct KeySpec {
    pub id: String,
    pub secret_hex: String,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec").field("id", &self.id).field("secret_hex", &"<redacted>").finish()
    }
}

impl KeySpec {
    pub fn keyring(&self) -> anyhow::Result<Keyring> {
        let secret = token::decode_hex(&self.secret_hex).context("key secret is not hex")?;
        let key = token::Key::new(self.id.as_str(), secret)?;
        Ok(Keyring::new(vec![key], None)?)
    }
}

/// A line a worker prints on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    /// Connections authenticated and failed so far.
    Progress {
        connected: u32,
        failed: u32,
    },
    /// Every connection was attempted; the successful ones are now held.
    Connected {
        connected: u32,
        failed: u32,
        /// Failure reason -> count.
        failures: BTreeMap<String, u32>,
        /// Wall clock (unix µs) when the first connect started, comparable
        /// across workers on one host.
        first_connect_unix_us: u64,
        /// Wall clock (unix µs) of the last AuthOk (0 if none).
        last_auth_ok_unix_us: u64,
        /// Seconds from the first connect to the last attempt's end.
        elapsed_s: f64,
    },
    /// Stdin closed: the held connections were closed.
    Closed {
        held: u32,
    },
    Fatal {
        message: String,
    },
}

/// Entry point of `longlink-bench worker`.
pub fn run() -> anyhow::Result<()> {
    let result = run_inner();
    if let Err(err) = &result {
        emit(&WorkerMsg::Fatal { message: format!("{err:#}") });
    }
    result
}

fn run_inner() -> anyhow::Result<()> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).context("reading the worker spec from stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("parsing the worker spec")?;
    sys::raise_fd_limit()?;
    let _ = sys::raise_memlock_limit();
    let keyring = spec.key.keyring()?;
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-worker")
        .io_memory(64 * 1024)
        .ring_depth(4096)
        .make()
        .map_err(|e| anyhow!("starting the worker executor: {e}"))?;
    ex.run(async move {
        let tally = connect_all(&spec, keyring).await;
        emit(&tally.borrow().connected_msg());
        // Hold until the parent closes our stdin; the blocking read runs on
        // glommio's helper thread so the executor stays parked meanwhile.
        let _ = glommio::executor().spawn_blocking(|| io::copy(&mut io::stdin().lock(), &mut io::sink())).await;
        let conns = std::mem::take(&mut tally.borrow_mut().conns);
        let links = std::mem::take(&mut tally.borrow_mut().links);
        let held = (conns.len() + links.len()) as u32;
        drop((conns, links));
        emit(&WorkerMsg::Closed { held });
    });
    Ok(())
}

/// Outcome of the connect phase; the held connections live here.
#[derive(Default)]
struct Tally {
    conns: Vec<Connection>,
    /// Connections over WebSocket or TLS (`--transport`).
    links: Vec<crate::links::Held>,
    failed: u32,
    failures: BTreeMap<String, u32>,
    started: Option<Instant>,
    first_connect_unix_us: Option<u64>,
    last_auth_ok_unix_us: u64,
}

impl Tally {
    fn connected_msg(&self) -> WorkerMsg {
        WorkerMsg::Connected {
            connected: (self.conns.len() + self.links.len()) as u32,
            failed: self.failed,
            failures: self.failures.clone(),
            first_connect_unix_us: self.first_connect_unix_us.unwrap_or(0),
            last_auth_ok_unix_us: self.last_auth_ok_unix_us,
            elapsed_s: self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
        }
    }

    fn fail(&mut self, reason: String) {
        self.failed += 1;
        count_reason(&mut self.failures, reason);
    }
}

/// Counts `reason` in `reasons`, keeping at most [`MAX_REASONS`] distinct
/// ones (the rest count as "other").
pub(crate) fn count_reason<N: Default + std::ops::AddAssign + From<u8>>(
    reasons: &mut BTreeMap<String, N>,
    reason: String,
) {
    let reason = if reasons.len() < MAX_REASONS || reasons.contains_key(&reason) { reason } else { "other".to_owned() };
    *reasons.entry(reason).or_default() += N::from(1);
}

async fn connect_all(spec: &WorkerSpec, keyring: Keyring) -> Rc<RefCell<Tally>> {
    let tally = Rc::new(RefCell::new(Tally::default()));
    let next = Rc::new(Cell::new(0u32));
    let connectors: Vec<_> = (0..spec.in_flight.clamp(1, spec.connections.max(1)))
        .map(|_| glommio::spawn_local(connector(spec.clone(), keyring.clone(), next.clone(), tally.clone())))
        .collect();
    // Dropping the reporter's handle below cancels it.
    let reporter = glommio::spawn_local({
        let tally = tally.clone();
        async move {
            let mut last = (u32::MAX, u32::MAX);
            loop {
                glommio::timer::sleep(PROGRESS_EVERY).await;
                let now = {
                    let t = tally.borrow();
                    ((t.conns.len() + t.links.len()) as u32, t.failed)
                };
                if now != last {
                    emit(&WorkerMsg::Progress { connected: now.0, failed: now.1 });
                    last = now;
                }
            }
        }
    });
    for task in connectors {
        task.await;
    }
    drop(reporter);
    tally
}

/// Opens connections one after another, taking the next number from `next`.
async fn connector(spec: WorkerSpec, keyring: Keyring, next: Rc<Cell<u32>>, tally: Rc<RefCell<Tally>>) {
    loop {
        let n = next.get();
        if n >= spec.connections {
            return;
        }
        next.set(n + 1);
        {
            let mut t = tally.borrow_mut();
            t.started.get_or_insert_with(Instant::now);
            t.first_connect_unix_us.get_or_insert_with(unix_us);
        }
        if spec.transport != crate::links::Transport::Tcp {
            // Blocking connect and handshake: only the server is measured.
            let id = device_id(&spec, n);
            let now = token::now_unix_secs();
            let result = crate::links::connect(
                spec.transport,
                spec.server,
                IpAddr::V4(spec.source.address(n)),
                &spec.ca_der,
                &keyring.mint(&id, &id, "bench", now, now + TOKEN_TTL_SECS),
                Duration::from_millis(spec.connect_timeout_ms),
                Duration::from_millis(spec.auth_timeout_ms),
            );
            {
                let mut t = tally.borrow_mut();
                match result {
                    Ok(held) => {
                        t.links.push(held);
                        t.last_auth_ok_unix_us = unix_us();
                    }
                    Err(err) => t.fail(format!("{err:#}")),
                }
            }
            futures_lite::future::yield_now().await;
            continue;
        }
        let result = connect_one(&spec, &keyring, n).await;
        let mut t = tally.borrow_mut();
        match result {
            Ok(conn) => {
                t.conns.push(conn);
                t.last_auth_ok_unix_us = unix_us();
            }
            Err(err) => t.fail(err.to_string()),
        }
    }
}

/// The device (and user) id of the worker's `n`-th connection.
pub(crate) fn device_id(spec: &WorkerSpec, n: u32) -> String {
    format!("{}{}-{n}", spec.device_prefix, spec.index)
}

/// Connects and authenticates the worker's `n`-th client (device
/// [`device_id`], source address from the spec's plan). Load workers call
/// it again with the same `n` to reconnect the same device.
/// The token client `n` authenticates with.
pub(crate) fn token_for(spec: &WorkerSpec, keyring: &Keyring, n: u32) -> String {
    let id = device_id(spec, n);
    let now = token::now_unix_secs();
    keyring.mint(&id, &id, "bench", now, now + TOKEN_TTL_SECS)
}

pub(crate) async fn connect_one(spec: &WorkerSpec, keyring: &Keyring, n: u32) -> Result<Connection, ClientError> {
    let id = device_id(spec, n);
    let now = token::now_unix_secs();
    let mut opts = ClientOptions::new(keyring.mint(&id, &id, "bench", now, now + TOKEN_TTL_SECS));
    opts.platform = "bench".into();
    opts.heartbeat_ms = spec.heartbeat_ms;
    opts.response_timeout_ms = spec.auth_timeout_ms;
    let source = IpAddr::V4(spec.source.address(n));
    let connect_timeout = Duration::from_millis(spec.connect_timeout_ms);
    let (conn, _ok) = Connection::connect_from(spec.server, source, connect_timeout, opts).await?;
    Ok(conn)
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Prints one JSON line on stdout (a [`WorkerMsg`], or a load worker's own
/// message) and flushes it.
pub(crate) fn emit(msg: &impl Serialize) {
    // A parent that went away closes the pipe; PDEATHSIG ends us soon after.
    if let Ok(line) = serde_json::to_string(msg) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_lines() {
        let line = serde_json::to_string(&WorkerMsg::Progress { connected: 3, failed: 1 }).unwrap();
        assert_eq!(line, r#"{"type":"progress","connected":3,"failed":1}"#);
        assert_eq!(serde_json::from_str::<WorkerMsg>(&line).unwrap(), WorkerMsg::Progress { connected: 3, failed: 1 });
    }

    #[test]
    fn key_spec_debug_is_redacted() {
        let key = KeySpec { id: "bench".into(), secret_hex: "00".repeat(32) };
        assert!(!format!("{key:?}").contains("0000"));
        assert!(key.keyring().is_ok());
    }

    #[test]
    fn failure_reasons_are_bounded() {
        let mut t = Tally::default();
        for i in 0..100 {
            t.fail(format!("reason {i}"));
        }
        t.fail("reason 0".into());
        assert_eq!(t.failed, 101);
        assert_eq!(t.failures.len(), MAX_REASONS + 1);
        assert_eq!(t.failures["reason 0"], 2);
        assert_eq!(t.failures["other"], 100 - MAX_REASONS as u32);
    }
}
