//! An example service backend: what a business backend behind longlink
//! looks like on the wire, used by `longlink echo-backend`, the tests, the
//! bench and the README.
//!
//! It listens for the node's upstream connections (same framing as
//! clients), answers every `UpstreamRequest` with its body (an echo),
//! acknowledges every `ConnectionEvents` batch and logs its events, and
//! counts what it saw so tests can check that a request reached it once.
//! Plain threads, one per connection: a backend needs no particular runtime.
//!
//! For tests it can stall (hold answers until released) and withhold
//! event acks.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tracing::{debug, info, warn};

use crate::protocol::codec::{self, Flags, Frame};
use crate::protocol::proto::{self, ConnectionEventKind};

/// Largest frame body the echo backend accepts.
const MAX_BODY: u32 = 16 * 1024 * 1024;
/// Requests kept for inspection (oldest dropped first).
const RECENT: usize = 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// What the backend has seen so far.
#[derive(Clone, Debug, Default)]
pub struct EchoStats {
    /// Requests per service id.
    pub requests: HashMap<String, u64>,
    /// Times each (device, client_msg_id) arrived (requests with an id only).
    pub by_client_msg_id: HashMap<(String, u64), u64>,
    /// The latest requests, oldest first (at most 1,024).
    pub recent: VecDeque<proto::UpstreamRequest>,
    /// Every connection event, in arrival order.
    pub events: Vec<proto::ConnectionEvent>,
    /// Event batches received (re-sent ones included).
    pub event_batches: u64,
    /// Connections accepted from nodes.
    pub connections: u64,
}

impl EchoStats {
    pub fn requests_for(&self, service: &str) -> u64 {
        self.requests.get(service).copied().unwrap_or(0)
    }

    pub fn times_seen(&self, device: &str, client_msg_id: u64) -> u64 {
        self.by_client_msg_id.get(&(device.to_owned(), client_msg_id)).copied().unwrap_or(0)
    }
}

/// A connection's write side, shared with whoever releases held answers.
type Writer = Arc<Mutex<TcpStream>>;

struct Shared {
    stats: Mutex<EchoStats>,
    /// Signalled whenever `stats` changes.
    changed: Condvar,
    stalled: AtomicBool,
    ack_events: AtomicBool,
    /// Answers held while stalled, with the connection to send them on.
    held: Mutex<Vec<(Writer, Vec<u8>)>>,
    /// Every live connection, to shut them down on stop.
    conns: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in a connection thread must not take the backend down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running echo backend; dropping it stops it.
pub struct EchoBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl EchoBackend {
    /// Listens on `addr` (port 0 picks one) and serves until dropped.
    pub fn start(addr: impl ToSocketAddrs) -> io::Result<EchoBackend> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stats: Mutex::new(EchoStats::default()),
            changed: Condvar::new(),
            stalled: AtomicBool::new(false),
            ack_events: AtomicBool::new(true),
            held: Mutex::new(Vec::new()),
            conns: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new().name("echo-accept".into()).spawn(move || accept_loop(listener, shared))?
        };
        Ok(EchoBackend { addr, shared, accept: Some(accept) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the counters.
    pub fn stats(&self) -> EchoStats {
        lock(&self.shared.stats).clone()
    }

    /// Waits until `cond` holds for the counters or `limit` passes; returns
    /// whether it held (woken by every change, no polling).
    pub fn wait_for(&self, limit: Duration, mut cond: impl FnMut(&EchoStats) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut stats = lock(&self.shared.stats);
        loop {
            if cond(&stats) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            stats = self.shared.changed.wait_timeout(stats, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// While stalled, requests are read and counted but not answered; when
    /// released, the held answers go out.
    pub fn set_stalled(&self, stalled: bool) {
        // The flag changes under the `held` lock, so no answer is held after
        // the release has taken the list.
        let held = {
            let mut held = lock(&self.shared.held);
            self.shared.stalled.store(stalled, Ordering::SeqCst);
            if stalled { Vec::new() } else { std::mem::take(&mut *held) }
        };
        for (writer, bytes) in held {
            let _ = lock(&writer).write_all(&bytes);
        }
    }

    /// Whether event batches are acknowledged (default true). Without acks
    /// the node sends each batch again after the service's timeout.
    pub fn set_ack_events(&self, ack: bool) {
        self.shared.ack_events.store(ack, Ordering::SeqCst);
    }

    /// Closes the listener's connections and stops accepting.
    pub fn stop(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Unblock accept() with a connection of our own.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for conn in lock(&self.shared.conns).drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(err) => {
                warn!(error = %err, "echo backend: accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = stream.peer_addr().ok();
        let started = (|| {
            stream.set_nodelay(true)?;
            lock(&shared.conns).push(stream.try_clone()?);
            let writer = Arc::new(Mutex::new(stream.try_clone()?));
            let shared = shared.clone();
            std::thread::Builder::new().name("echo-conn".into()).spawn(move || serve(stream, writer, shared))
        })();
        match started {
            Ok(_) => {
                let mut stats = lock(&shared.stats);
                stats.connections += 1;
                shared.changed.notify_all();
                debug!(?peer, "echo backend: node connected");
            }
            Err(err) => warn!(error = %err, "echo backend: cannot serve a connection"),
        }
    }
}

fn serve(mut stream: TcpStream, writer: Writer, shared: Arc<Shared>) {
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut out = BytesMut::new();
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        rbuf.extend_from_slice(&chunk[..n]);
        loop {
            let (header, body) = match codec::split_frame(&rbuf, MAX_BODY) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(err) => {
                    warn!(error = %err, "echo backend: bad frame; closing");
                    return;
                }
            };
            let len = header.frame_len();
            let frame = Frame::decode(header, body);
            let _ = rbuf.split_to(len);
            match frame {
                Ok(Frame::UpstreamRequest(req)) => on_request(&shared, req, &mut out, &writer),
                Ok(Frame::ConnectionEvents(batch)) => on_events(&shared, batch, &mut out),
                Ok(other) => warn!(kind = ?other.kind(), "echo backend: unexpected frame; ignored"),
                Err(err) => warn!(error = %err, "echo backend: undecodable body; ignored"),
            }
        }
        if !out.is_empty() {
            if lock(&writer).write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
    }
}

fn on_request(shared: &Shared, req: proto::UpstreamRequest, out: &mut BytesMut, writer: &Writer) {
    let answer = proto::UpstreamResponse { id: req.id, status: 0, body: req.body.clone(), reason: String::new() };
    {
        let mut stats = lock(&shared.stats);
        *stats.requests.entry(req.service_id.clone()).or_default() += 1;
        if req.client_msg_id != 0 {
            let device = req.conn.as_ref().map(|c| c.device.clone()).unwrap_or_default();
            *stats.by_client_msg_id.entry((device, req.client_msg_id)).or_default() += 1;
        }
        if stats.recent.len() >= RECENT {
            stats.recent.pop_front();
        }
        stats.recent.push_back(req);
        shared.changed.notify_all();
    }
    let mut held = lock(&shared.held);
    if shared.stalled.load(Ordering::SeqCst) {
        let mut bytes = BytesMut::new();
        Frame::UpstreamResponse(answer).encode_into(&mut bytes, Flags::default());
        held.push((writer.clone(), bytes.to_vec()));
    } else {
        drop(held);
        Frame::UpstreamResponse(answer).encode_into(out, Flags::default());
    }
}

fn on_events(shared: &Shared, batch: proto::ConnectionEvents, out: &mut BytesMut) {
    for e in &batch.events {
        let kind = ConnectionEventKind::try_from(e.kind)
            .map_or("UNKNOWN", |k| k.as_str_name().trim_start_matches("CONNECTION_EVENT_KIND_"));
        let c = e.conn.clone().unwrap_or_default();
        info!(
            service = %batch.service_id,
            batch = batch.batch_id,
            kind,
            user = %c.user,
            device = %c.device,
            app = %c.app,
            platform = %c.platform,
            client_version = %c.client_version,
            conn_id = c.conn_id,
            node = %c.node,
            client_addr = %c.client_addr,
            code = e.code,
            "connection event"
        );
    }
    {
        let mut stats = lock(&shared.stats);
        stats.event_batches += 1;
        stats.events.extend(batch.events);
        shared.changed.notify_all();
    }
    if shared.ack_events.load(Ordering::SeqCst) {
        Frame::EventsAck(proto::EventsAck { batch_id: batch.batch_id }).encode_into(out, Flags::default());
    }
}
