//! The peer worker: the bench binary re-invoked as `longlink-bench
//! peer-worker` (hidden). The NATS and MQTT counterpart of the
//! [load worker](crate::loadworker), with the same structure: one glommio
//! executor, `in_flight` connects at a time from the worker's 127.x.y.z
//! sources, a task per connection that reads it and times every message
//! (payload stamp -> receipt, CLOCK_MONOTONIC) into one hdrhistogram per
//! worker, and the same JSON-lines protocol: [`WorkerMsg`] for the connect
//! phase and release, `stats` / `report` / `reset` answered with
//! [`LoadMsg`].
//!
//! A client subscribes to its own subject (`{prefix}{worker}-{n}`, like a
//! longlink device id) or to one shared subject, and waits for the
//! server's confirmation (NATS PONG after SUB + PING, MQTT SUBACK) before
//! it counts as connected.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, BufRead as _};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd as _, IntoRawFd as _};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures_lite::{AsyncReadExt as _, AsyncWriteExt as _};
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{mqtt, nats};
use crate::latency::{self, mono_ns, read_stamp};
use crate::loadworker::{LoadCounts, LoadMsg};
use crate::source::SourcePlan;
use crate::sys;
use crate::worker::{WorkerMsg, count_reason, emit, unix_us};

const PROGRESS_EVERY: Duration = Duration::from_millis(100);
/// Read buffer of a connection; grows only up to the codec's bounds.
const READ_CHUNK: usize = 4096;
/// MQTT keepalive the clients announce: longer than any run, so nobody
/// pings (as longlink's clients in the push scenarios; mosquitto cuts a
/// client after 1.5 keepalives of silence).
const MQTT_KEEPALIVE_S: u16 = 3600;

/// Which protocol a peer worker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Nats,
    Mqtt,
}

/// What each client subscribes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Subscription {
    /// Its own subject `{prefix}{worker}-{n}`.
    Own { prefix: String },
    /// One subject for everybody.
    Shared { subject: String },
}

/// What one peer worker does; the first line of its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerSpec {
    pub index: u32,
    pub protocol: Protocol,
    pub server: SocketAddr,
    pub connections: u32,
    pub in_flight: u32,
    pub source: SourcePlan,
    pub subscription: Subscription,
    /// Bound on one connect + subscribe, ms.
    pub connect_timeout_ms: u64,
}

/// The own subject of client `n` of worker `index` (same form as a
/// longlink device id, see [`crate::worker::device_id`]).
pub fn own_subject(prefix: &str, index: u32, n: u32) -> String {
    format!("{prefix}{index}-{n}")
}

#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Nats(#[from] nats::NatsError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error("closed by the server")]
    Closed,
    #[error("connect + subscribe timed out")]
    Timeout,
}

/// Entry point of `longlink-bench peer-worker`.
pub fn run() -> anyhow::Result<()> {
    let result = run_inner();
    if let Err(err) = &result {
        emit(&WorkerMsg::Fatal { message: format!("{err:#}") });
    }
    result
}

fn run_inner() -> anyhow::Result<()> {
    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).context("reading the peer worker spec from stdin")?;
    let spec: PeerSpec = serde_json::from_str(&line).context("parsing the peer worker spec")?;
    sys::raise_fd_limit()?;
    let _ = sys::raise_memlock_limit();
    let ex = LocalExecutorBuilder::new(Placement::Unbound)
        .name("bench-peer-worker")
        .io_memory(64 * 1024)
        .ring_depth(4096)
        .make()
        .map_err(|e| anyhow!("starting the peer worker executor: {e}"))?;
    ex.run(async move {
        let ctx = Rc::new(Ctx::new(spec));
        let slots: Vec<_> = (0..ctx.spec.connections).map(|n| glommio::spawn_local(slot(ctx.clone(), n))).collect();
        let reporter = glommio::spawn_local(report_connect_progress(ctx.clone()));
        commands(&ctx).await;
        drop(reporter);
        let held = ctx.st.borrow().counts.connected_now;
        // Dropping a task handle cancels the task, which closes its connection.
        drop(slots);
        emit(&WorkerMsg::Closed { held });
    });
    Ok(())
}

struct Ctx {
    spec: PeerSpec,
    gate: Semaphore,
    st: RefCell<State>,
}

struct State {
    counts: LoadCounts,
    hist: Histogram<u64>,
    attempts_done: u32,
    connected: u32,
    failed: u32,
    failures: BTreeMap<String, u32>,
    started: Option<Instant>,
    first_connect_unix_us: Option<u64>,
    last_connected_unix_us: u64,
}

impl Ctx {
    fn new(spec: PeerSpec) -> Ctx {
        let gate = Semaphore::new(u64::from(spec.in_flight.max(1)));
        Ctx {
            spec,
            gate,
            st: RefCell::new(State {
                counts: LoadCounts::default(),
                hist: latency::new_histogram(),
                attempts_done: 0,
                connected: 0,
                failed: 0,
                failures: BTreeMap::new(),
                started: None,
                first_connect_unix_us: None,
                last_connected_unix_us: 0,
            }),
        }
    }

    fn subject(&self, n: u32) -> String {
        match &self.spec.subscription {
            Subscription::Own { prefix } => own_subject(prefix, self.spec.index, n),
            Subscription::Shared { subject } => subject.clone(),
        }
    }

    fn attempted(&self, result: &Result<Conn, PeerError>) {
        let mut st = self.st.borrow_mut();
        match result {
            Ok(_) => {
                st.connected += 1;
                st.counts.connected_now += 1;
                st.last_connected_unix_us = unix_us();
            }
            Err(err) => {
                st.failed += 1;
                count_reason(&mut st.failures, err.to_string());
            }
        }
        st.attempts_done += 1;
        if st.attempts_done == self.spec.connections {
            emit(&WorkerMsg::Connected {
                connected: st.connected,
                failed: st.failed,
                failures: st.failures.clone(),
                first_connect_unix_us: st.first_connect_unix_us.unwrap_or(0),
                last_auth_ok_unix_us: st.last_connected_unix_us,
                elapsed_s: st.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            });
        }
    }

    fn on_payload(&self, payload: &[u8]) {
        let now = mono_ns();
        let mut st = self.st.borrow_mut();
        let c = &mut st.counts;
        c.received += 1;
        if c.first_recv_mono_ns == 0 {
            c.first_recv_mono_ns = now;
        }
        c.last_recv_mono_ns = now;
        match read_stamp(payload) {
            Some((sent, _seq)) => st.hist.saturating_record(now.saturating_sub(sent).max(1)),
            None => c.unstamped += 1,
        }
    }
}

/// A subscribed connection and the bytes read past the handshake.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

async fn slot(ctx: Rc<Ctx>, n: u32) {
    {
        let mut st = ctx.st.borrow_mut();
        st.started.get_or_insert_with(Instant::now);
        st.first_connect_unix_us.get_or_insert_with(unix_us);
    }
    let result = {
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = ctx.gate.acquire_permit(1).await;
        let timeout = Duration::from_millis(ctx.spec.connect_timeout_ms);
        futures_lite::future::or(connect(&ctx, n), async {
            glommio::timer::sleep(timeout).await;
            Err(PeerError::Timeout)
        })
        .await
    };
    ctx.attempted(&result);
    let Ok(mut conn) = result else { return };
    let err = read_until_error(&ctx, &mut conn).await;
    let mut st = ctx.st.borrow_mut();
    st.counts.connected_now -= 1;
    count_reason(&mut st.counts.disconnects, err.to_string());
}

/// TCP connect from the client's source address, then the protocol's
/// connect and subscribe, until the server confirmed the subscription.
async fn connect(ctx: &Ctx, n: u32) -> Result<Conn, PeerError> {
    let spec = &ctx.spec;
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(spec.server), socket2::Type::STREAM.cloexec(), None)?;
    socket.set_nodelay(true)?;
    socket.bind(&SocketAddr::new(IpAddr::V4(spec.source.address(n)), 0).into())?;
    // Blocking, like longlink's client: on loopback it completes at once.
    socket.connect_timeout(&spec.server.into(), Duration::from_millis(spec.connect_timeout_ms))?;
    socket.set_nonblocking(true)?;
    // SAFETY: the fd is an owned, connected, non-blocking TCP socket whose
    // ownership moves into the glommio stream.
    let stream = unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) };
    let mut conn = Conn { stream, buf: Vec::with_capacity(READ_CHUNK) };
    let subject = ctx.subject(n);
    let name = format!("w{}-{n}", spec.index);
    match spec.protocol {
        Protocol::Nats => {
            conn.stream.write_all(&nats::connect_and_subscribe(&name, Some(&subject))).await?;
            conn.stream.flush().await?;
            loop {
                conn.fill().await?;
                while let Some((event, used)) = nats::parse(&conn.buf)? {
                    let done = match event {
                        nats::Event::Pong => true,
                        nats::Event::Err(text) => return Err(nats::NatsError::Server(text).into()),
                        _ => false,
                    };
                    conn.buf.drain(..used);
                    if done {
                        return Ok(conn);
                    }
                }
            }
        }
        Protocol::Mqtt => {
            let mut hello = mqtt::connect(&name, MQTT_KEEPALIVE_S);
            hello.extend_from_slice(&mqtt::subscribe(1, &subject));
            conn.stream.write_all(&hello).await?;
            conn.stream.flush().await?;
            loop {
                conn.fill().await?;
                while let Some((packet, used)) = mqtt::parse(&conn.buf)? {
                    let done = match packet {
                        mqtt::Packet::ConnAck { return_code: 0 } => false,
                        mqtt::Packet::ConnAck { return_code } => {
                            return Err(mqtt::MqttError::Refused(return_code).into());
                        }
                        mqtt::Packet::SubAck { granted, .. } if granted.contains(&0x80) => {
                            return Err(mqtt::MqttError::SubscribeRefused.into());
                        }
                        mqtt::Packet::SubAck { .. } => true,
                        _ => false,
                    };
                    conn.buf.drain(..used);
                    if done {
                        return Ok(conn);
                    }
                }
            }
        }
    }
}

impl Conn {
    /// Reads more bytes into the buffer (the codecs bound how much a
    /// message may take, so the buffer stays bounded too).
    async fn fill(&mut self) -> Result<(), PeerError> {
        let len = self.buf.len();
        self.buf.resize(len + READ_CHUNK, 0);
        let got = self.stream.read(&mut self.buf[len..]).await;
        match got {
            Ok(0) => {
                self.buf.truncate(len);
                Err(PeerError::Closed)
            }
            Ok(k) => {
                self.buf.truncate(len + k);
                Ok(())
            }
            Err(err) => {
                self.buf.truncate(len);
                Err(err.into())
            }
        }
    }
}

async fn read_until_error(ctx: &Ctx, conn: &mut Conn) -> PeerError {
    loop {
        if let Err(err) = conn.fill().await {
            return err;
        }
        let mut consumed = 0;
        let mut ping = false;
        match ctx.spec.protocol {
            Protocol::Nats => loop {
                match nats::parse(&conn.buf[consumed..]) {
                    Ok(Some((event, used))) => {
                        match event {
                            nats::Event::Msg(payload) => ctx.on_payload(payload),
                            nats::Event::Ping => ping = true,
                            nats::Event::Err(text) => return nats::NatsError::Server(text).into(),
                            _ => {}
                        }
                        consumed += used;
                    }
                    Ok(None) => break,
                    Err(err) => return err.into(),
                }
            },
            Protocol::Mqtt => loop {
                match mqtt::parse(&conn.buf[consumed..]) {
                    Ok(Some((packet, used))) => {
                        if let mqtt::Packet::Publish { payload, .. } = packet {
                            ctx.on_payload(payload);
                        }
                        consumed += used;
                    }
                    Ok(None) => break,
                    Err(err) => return err.into(),
                }
            },
        }
        conn.buf.drain(..consumed);
        if ping && let Err(err) = conn.stream.write_all(nats::PONG).await {
            return err.into();
        }
    }
}

async fn report_connect_progress(ctx: Rc<Ctx>) {
    let mut last = (u32::MAX, u32::MAX);
    loop {
        glommio::timer::sleep(PROGRESS_EVERY).await;
        let st = ctx.st.borrow();
        if st.attempts_done >= ctx.spec.connections {
            return;
        }
        let now = (st.connected, st.failed);
        if now != last {
            emit(&WorkerMsg::Progress { connected: now.0, failed: now.1 });
            last = now;
        }
    }
}

/// Answers stdin commands until EOF (as the load worker does).
async fn commands(ctx: &Ctx) {
    loop {
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
    fn own_subjects_match_longlink_device_ids() {
        assert_eq!(own_subject("uni-", 2, 17), "uni-2-17");
        let spec = PeerSpec {
            index: 1,
            protocol: Protocol::Mqtt,
            server: "127.0.0.1:1883".parse().unwrap(),
            connections: 2,
            in_flight: 1,
            source: SourcePlan { octet: 10, per_address: 1000 },
            subscription: Subscription::Shared { subject: "fan".into() },
            connect_timeout_ms: 1000,
        };
        let line = serde_json::to_string(&spec).unwrap();
        let back: PeerSpec = serde_json::from_str(&line).unwrap();
        assert_eq!(Ctx::new(back).subject(1), "fan");
    }
}
