//! Upstream: client requests forwarded to service backends, their answers
//! routed back, and connection events for the backends that subscribe.
//!
//! One client connection carries the requests of many services. Each shard
//! owns an [`Upstream`]: per service, persistent pipelined connections
//! ("links") to every backend (`pool_size` per backend), an in-flight
//! budget, and a FIFO of deadlines. Nothing is shared between services or
//! shards, so a stalled backend only fills its own service's budget: its
//! clients get BUSY at once, every other service goes on as before.
//!
//! ```text
//! client --Request--> shard: rate limit -> dedup -> budget -> pick a link that is up
//!                     --UpstreamRequest{id, common parameters}--> backend
//! client <--Response-- shard <--UpstreamResponse{id}-- backend  (or TIMEOUT from the tick)
//! ```
//!
//! - Timeouts: a service's timeout is uniform, so its deadlines are a FIFO
//!   checked by one periodic task per shard (`upstream_loop`); no
//!   timer per request.
//! - Failover: requests go round-robin to links that are up; a link that
//!   breaks fails its requests in flight with UNAVAILABLE (they may have been
//!   processed, so they are never re-sent) and reconnects with backoff.
//! - Dedup: (device, client_msg_id) -> the first attempt, in flight or
//!   answered, for `dedup_window_ms`. Keyed by device, not connection, so a
//!   retry after a reconnect (same owner shard) is caught too.
//! - Rate limit: a token bucket per connection, created on its first request
//!   and dropped once it is full again; an empty bucket pauses reading from
//!   the socket (the frame waits in the connection's input leftovers), and
//!   too much paused time closes it with RATE_LIMITED.
//! - Events: online/offline/replaced, queued per subscribed service (bounded,
//!   drops counted), one batch in flight per service and shard, re-sent until
//!   acknowledged while a backend is reachable.
//!
//! An idle connection costs nothing here: every table is keyed by
//! connections that sent a request recently.

#[cfg(test)]
mod component_tests;
mod dedup;
mod encode;
mod links;
mod rate;
mod reconfigure;
mod requests;

use dedup::*;
use encode::*;
use links::*;
use rate::*;
use requests::*;

pub(crate) use links::{run_link, start};
pub(crate) use requests::{admit_request, conn_event, flush, on_client_request};

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use prost::Message as _;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::config::UpstreamConfig;
use crate::conn::OutQueue;
use crate::conn::fd::{SlotFd, Socket};
use crate::protocol::codec::{self, Flags, Frame};
use crate::protocol::ids::ShardId;
use crate::protocol::ids::{ConnKey, stable_hash};
use crate::protocol::proto::{self, ConnectionEventKind, ErrorCode, FrameKind};
use crate::protocol::time::{Millis, Now};

/// How often the upstream task checks deadlines, paused connections and
/// event batches while any of them exists.
const TICK: Duration = Duration::from_millis(5);
/// How often idle rate-limit entries are looked for.
const SWEEP_EVERY_MS: u64 = 1_000;
/// Reads handled in one poll of a link before yielding.
const READS_PER_POLL: usize = 8;
/// Bytes asked of a link's socket per read.
const READ_CHUNK: usize = 64 * 1024;
/// Room for the fields around a body in a backend's frame.
const LINK_FRAME_SLACK: u32 = 64 * 1024;
/// Retries of one client_msg_id that may wait for its first attempt.
const MAX_WAITERS: usize = 16;
/// Accounted per dedup entry on top of the bytes it stores.
const DEDUP_ENTRY_OVERHEAD: usize = 96;

/// Why upstream settings could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream service {service:?}: cannot resolve backend {backend:?}: {source}")]
    Resolve { service: String, backend: String, source: io::Error },
    #[error("upstream service {service:?}: backend {backend:?} resolves to no address")]
    NoAddress { service: String, backend: String },
}

/// What the upstream component needs of the shard that holds it.
pub(crate) trait UpstreamHost {
    /// The component itself (it lives in the shard's state).
    fn upstream(&mut self) -> &mut Upstream;
    fn counters(&self) -> &UpstreamCounters;
    /// The component and the counters beside it.
    fn parts(&mut self) -> (&mut Upstream, &UpstreamCounters);
    /// The component and the device of session `key` beside it.
    fn with_device(&mut self, key: ConnKey) -> (&mut Upstream, Option<&str>);
    fn device_of(&self, key: ConnKey) -> Option<&str>;
    fn shard_id(&self) -> ShardId;
    fn now(&self) -> Now;
    /// The client frame limit (an answer must fit in it).
    fn max_frame_bytes(&self) -> u32;
    /// Who session `key` is, for backends (once authenticated).
    fn conn_info(&self, key: ConnKey) -> Option<proto::ConnInfo>;
    /// Queues a Response for session `key`; true when it waits for
    /// [`UpstreamHost::flush_responses`].
    fn respond(&mut self, key: ConnKey, frame: Bytes) -> bool;
    /// Writes what [`UpstreamHost::respond`] queued: one write per session.
    fn flush_responses(&mut self, keys: &[ConnKey]);
    /// Reading from session `key` resumes (its rate-limit pause ended).
    fn resume(&mut self, key: ConnKey);
    fn close_conn(&mut self, key: ConnKey, now: Now, code: ErrorCode, reason: String);
}

/// The shard as the upstream tasks (links, the periodic task) see it:
/// entered (its state borrowed) for each step, never across an await.
pub(crate) trait UpstreamShard: 'static {
    type Host<'a>: UpstreamHost
    where
        Self: 'a;
    fn enter<R>(&self, f: impl FnOnce(&mut Self::Host<'_>) -> R) -> R;
}

/// One service, with its backends resolved.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    pub id: String,
    pub backends: Vec<SocketAddr>,
    pub timeout_ms: u32,
    pub max_inflight: u32,
    pub pool_size: u32,
    pub subscribe_events: bool,
}

/// `[upstream]` as a shard uses it.
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    pub services: Vec<ServiceSettings>,
    pub connect_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub dedup_window_ms: u64,
    pub dedup_max_entries: usize,
    pub dedup_max_bytes: usize,
    /// Requests per second per connection; 0 = unlimited.
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub close_after_paused_ms: u64,
    pub rate_window_ms: u64,
    pub events_batch_max: usize,
    pub events_queue_max: usize,
}

impl UpstreamSettings {
    /// Resolves every backend address (blocking DNS: call it at start-up).
    pub fn resolve(cfg: &UpstreamConfig) -> Result<UpstreamSettings, UpstreamError> {
        let mut services = Vec::with_capacity(cfg.services.len());
        for s in &cfg.services {
            let mut backends = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let err = |source| UpstreamError::Resolve { service: s.id.clone(), backend: b.clone(), source };
                let addr = b.to_socket_addrs().map_err(err)?.next();
                backends
                    .push(addr.ok_or_else(|| UpstreamError::NoAddress { service: s.id.clone(), backend: b.clone() })?);
            }
            services.push(ServiceSettings {
                id: s.id.clone(),
                backends,
                timeout_ms: s.timeout_ms,
                max_inflight: s.max_inflight_per_shard,
                pool_size: s.pool_size,
                subscribe_events: s.subscribe_events,
            });
        }
        Ok(UpstreamSettings {
            services,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            backoff_min: Duration::from_millis(cfg.reconnect_backoff_min_ms),
            backoff_max: Duration::from_millis(cfg.reconnect_backoff_max_ms),
            dedup_window_ms: cfg.dedup_window_ms,
            dedup_max_entries: cfg.dedup_max_entries_per_shard as usize,
            dedup_max_bytes: usize::try_from(cfg.dedup_max_bytes_per_shard).unwrap_or(usize::MAX),
            rate_per_sec: cfg.rate_limit_per_sec,
            rate_burst: cfg.rate_limit_burst,
            close_after_paused_ms: cfg.rate_limit_close_after_paused_ms,
            rate_window_ms: cfg.rate_limit_window_ms,
            events_batch_max: cfg.events_batch_max as usize,
            events_queue_max: cfg.events_queue_max as usize,
        })
    }
}

/// Upstream counters of one shard, readable from other threads.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Request frames from clients.
    pub requests: AtomicU64,
    /// Requests sent to a backend.
    pub forwarded: AtomicU64,
    /// Responses by status: OK from the backend; BUSY, UNAVAILABLE and
    /// TIMEOUT made by the node; anything else (backend statuses, too
    /// large) in `other`.
    pub ok: AtomicU64,
    pub busy: AtomicU64,
    pub unavailable: AtomicU64,
    pub timeouts: AtomicU64,
    pub other: AtomicU64,
    /// Answers that came after their request timed out or its link broke.
    pub late: AtomicU64,
    /// Retries answered from the dedup table, and retries that waited for
    /// their first attempt.
    pub dedup_replayed: AtomicU64,
    pub dedup_joined: AtomicU64,
    /// Dedup entries evicted early by the entry or byte cap.
    pub dedup_evicted: AtomicU64,
    /// Times a connection was paused by the rate limit, and connections
    /// closed with RATE_LIMITED.
    pub rate_paused: AtomicU64,
    pub rate_closed: AtomicU64,
    pub backend_connects: AtomicU64,
    pub backend_connect_failures: AtomicU64,
    pub backend_disconnects: AtomicU64,
    pub events_queued: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_acked: AtomicU64,
    /// Batches sent again (no ack in time, or the link broke).
    pub events_resent_batches: AtomicU64,
    /// Events dropped because the service's queue was full.
    pub events_dropped: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What a request ended with, as sent to the client (and kept for dedup).
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    status: i32,
    body: Bytes,
    reason: String,
}

impl Outcome {
    fn error(code: ErrorCode, reason: String) -> Outcome {
        Outcome { status: code as i32, body: Bytes::new(), reason }
    }

    fn stored_bytes(&self) -> usize {
        self.body.len() + self.reason.len()
    }
}

/// A request sent to a backend, waiting for its answer.
struct Pending {
    conn: ConnKey,
    /// The client's id, echoed in the Response.
    request_id: u64,
    service: u16,
    link: u32,
    dedup: Option<DedupKey>,
    /// Retries (same client_msg_id) waiting for this answer.
    waiters: Vec<(ConnKey, u64)>,
}

/// An encoded event batch waiting for its ack.
struct Batch {
    id: u64,
    frame: Bytes,
    count: u64,
    /// Where it was sent; `None` when it must be (re)sent.
    link: Option<u32>,
    sent_at: Millis,
}

#[derive(Default)]
struct EventQueue {
    queue: VecDeque<proto::ConnectionEvent>,
    inflight: Option<Batch>,
    next_batch: u64,
}

struct Service {
    settings: ServiceSettings,
    inflight: u32,
    /// (deadline, pending id), in sending order: deadlines only grow.
    deadlines: VecDeque<(Millis, u64)>,
    links: Vec<u32>,
    /// Round-robin cursor into `links`.
    next: usize,
    events: Option<EventQueue>,
}

/// A shard's upstream state, inside the shard's `State`.
pub(crate) struct Upstream {
    settings: UpstreamSettings,
    services: Vec<Service>,
    by_id: HashMap<String, u16>,
    links: Slab<Link>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    dedup: Dedup,
    conns: HashMap<ConnKey, ConnUp>,
    paused: Vec<ConnKey>,
    /// Links and sessions with frames queued in this pass, written at its
    /// end with one `writev` each ([`flush`]).
    dirty_links: Vec<u32>,
    dirty_conns: Vec<ConnKey>,
    last_sweep: Millis,
    /// The periodic task is running (else it waits for `wake`).
    ticking: bool,
    wake: LocalSender<()>,
    wake_rx: Option<LocalReceiver<()>>,
    stopping: bool,
}

impl Upstream {
    pub(crate) fn new(settings: UpstreamSettings) -> Upstream {
        let (wake, wake_rx) = local_channel::new_bounded(1);
        let mut links = Slab::new();
        let mut by_id = HashMap::new();
        let services = settings
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                by_id.insert(s.id.clone(), i as u16);
                let mut ids = Vec::new();
                for _ in 0..s.pool_size {
                    for &addr in &s.backends {
                        ids.push(links.insert(Link::new(i as u16, addr)) as u32);
                    }
                }
                Service {
                    settings: s.clone(),
                    inflight: 0,
                    deadlines: VecDeque::new(),
                    links: ids,
                    next: 0,
                    events: s.subscribe_events.then(EventQueue::default),
                }
            })
            .collect();
        Upstream {
            settings,
            services,
            by_id,
            links,
            pending: HashMap::new(),
            next_id: 0,
            dedup: Dedup::default(),
            conns: HashMap::new(),
            paused: Vec::new(),
            dirty_links: Vec::new(),
            dirty_conns: Vec::new(),
            last_sweep: Millis(0),
            ticking: false,
            wake,
            wake_rx: Some(wake_rx),
            stopping: false,
        }
    }

    /// Makes sure the periodic task runs.
    fn kick(&mut self) {
        if !self.ticking {
            self.ticking = true;
            let _ = self.wake.try_send(());
        }
    }

    /// Whether any service wants connection events.
    pub(crate) fn wants_events(&self) -> bool {
        self.services.iter().any(|s| s.events.is_some())
    }

    /// Whether reading from `key` is paused by the rate limit.
    pub(crate) fn is_paused(&self, key: ConnKey) -> bool {
        self.conns.get(&key).is_some_and(|c| c.paused_since.is_some())
    }

    /// Takes a token for one request of connection `key`. `info` builds the
    /// connection's parameters when it has no entry yet. False: the
    /// connection is paused and the request must wait.
    pub(crate) fn admit(
        &mut self,
        key: ConnKey,
        now: Millis,
        counters: &UpstreamCounters,
        info: impl FnOnce() -> Bytes,
    ) -> bool {
        let (rate, burst) = (self.settings.rate_per_sec, self.settings.rate_burst);
        let entry = self.conns.entry(key).or_insert_with(|| ConnUp {
            info: info(),
            bucket: crate::rate::TokenBucket::new(f64::from(burst), now),
            paused_since: None,
            window_start: now,
            paused_in_window_ms: 0,
        });
        if rate == 0 {
            return true;
        }
        if entry.paused_since.is_some() {
            return false;
        }
        entry.refill(now, rate, burst);
        if entry.bucket.try_take() {
            return true;
        }
        entry.paused_since = Some(now);
        self.paused.push(key);
        bump(&counters.rate_paused);
        self.kick();
        false
    }

    /// The connection is gone: drop its entry.
    pub(crate) fn forget_conn(&mut self, key: ConnKey) {
        if self.conns.remove(&key).is_some_and(|c| c.paused_since.is_some()) {
            self.paused.retain(|&k| k != key);
        }
    }

    /// Paused connections that may read again or must be closed.
    fn check_paused(&mut self, now: Millis) -> Vec<Unpause> {
        let s = &self.settings;
        let mut out = Vec::new();
        let conns = &mut self.conns;
        self.paused.retain(|key| {
            let Some(c) = conns.get_mut(key) else { return false };
            let Some(since) = c.paused_since else { return false };
            let paused = c.paused_ms(now, s.rate_window_ms);
            if paused >= s.close_after_paused_ms {
                c.paused_since = None;
                out.push(Unpause::Close(*key, paused));
                return false;
            }
            c.refill(now, s.rate_per_sec, s.rate_burst);
            if c.bucket.tokens() >= 1.0 {
                c.paused_in_window_ms += now.0.saturating_sub(since.0);
                c.paused_since = None;
                out.push(Unpause::Resume(*key));
                return false;
            }
            true
        });
        out
    }

    /// Drops entries equivalent to none: not paused, bucket full again, no
    /// paused time left in the window.
    fn sweep_idle(&mut self, now: Millis) {
        let s = &self.settings;
        self.conns.retain(|_, c| {
            if c.paused_since.is_some() {
                return true;
            }
            c.refill(now, s.rate_per_sec, s.rate_burst);
            let full = s.rate_per_sec == 0 || c.bucket.tokens() >= f64::from(s.rate_burst);
            !(full && c.paused_ms(now, s.rate_window_ms) == 0)
        });
    }

    /// A link of `service` that is up, round-robin.
    fn pick_link(&mut self, service: u16) -> Option<u32> {
        let svc = &mut self.services[usize::from(service)];
        let n = svc.links.len();
        for i in 0..n {
            let idx = svc.links[(svc.next + i) % n];
            if self.links.get(idx as usize).is_some_and(|l| l.state == LinkState::Up) {
                svc.next = (svc.next + i + 1) % n;
                return Some(idx);
            }
        }
        None
    }

    /// Queues `frame` on link `idx`; the end of the pass writes it
    /// ([`Upstream::flush_links`]), with every other frame queued meanwhile.
    fn send_on(&mut self, idx: u32, frame: Bytes) {
        let Some(link) = self.links.get_mut(idx as usize) else { return };
        link.out.push(frame);
        if !link.dirty {
            link.dirty = true;
            self.dirty_links.push(idx);
        }
    }

    /// Writes what this pass queued on each link; a full (or failed) socket
    /// is left to the link's task.
    fn flush_links(&mut self) {
        for idx in self.dirty_links.drain(..) {
            let Some(link) = self.links.get_mut(idx as usize) else { continue };
            link.dirty = false;
            if link.out.is_empty() {
                continue;
            }
            let written = link.fd.as_ref().map(|fd| link.out.write_now(fd.get()));
            if !matches!(written, Some(Ok(true))) {
                link.wake();
            }
        }
    }

    /// Queues a connection event for every subscribed service.
    fn push_event(&mut self, event: proto::ConnectionEvent, counters: &UpstreamCounters) {
        let max = self.settings.events_queue_max;
        for svc in &mut self.services {
            let Some(q) = svc.events.as_mut() else { continue };
            if q.queue.len() >= max {
                q.queue.pop_front();
                bump(&counters.events_dropped);
            }
            q.queue.push_back(event.clone());
            bump(&counters.events_queued);
        }
        self.kick();
    }

    /// Sends the next event batch of `service` when none is in flight (or
    /// re-sends one whose ack is overdue).
    fn pump_events(&mut self, service: u16, now: Millis, counters: &UpstreamCounters) {
        let svc = &mut self.services[usize::from(service)];
        let timeout = u64::from(svc.settings.timeout_ms);
        let Some(q) = svc.events.as_mut() else { return };
        let due = match &q.inflight {
            Some(b) => b.link.is_none() || now.0 >= b.sent_at.0.saturating_add(timeout),
            None => !q.queue.is_empty(),
        };
        if !due {
            return;
        }
        // Events wait in the (bounded) queue until a backend is up.
        let Some(idx) = self.pick_link(service) else { return };
        let batch_max = self.settings.events_batch_max;
        let svc = &mut self.services[usize::from(service)];
        let Some(q) = svc.events.as_mut() else { return };
        let b = match &mut q.inflight {
            Some(b) => {
                if b.link.is_some() {
                    bump(&counters.events_resent_batches);
                }
                b
            }
            None => {
                let n = q.queue.len().min(batch_max);
                q.next_batch += 1;
                let msg = proto::ConnectionEvents {
                    batch_id: q.next_batch,
                    service_id: svc.settings.id.clone(),
                    events: q.queue.drain(..n).collect(),
                };
                let frame = codec::encode(FrameKind::ConnectionEvents, Flags::default(), &msg);
                q.inflight.insert(Batch { id: msg.batch_id, frame, count: n as u64, link: None, sent_at: now })
            }
        };
        b.link = Some(idx);
        b.sent_at = now;
        let (frame, count) = (b.frame.clone(), b.count);
        counters.events_sent.fetch_add(count, Ordering::Relaxed);
        self.send_on(idx, frame);
    }

    fn on_events_ack(&mut self, link: u32, batch_id: u64, now: Millis, counters: &UpstreamCounters) {
        let Some(service) = self.links.get(link as usize).map(|l| l.service) else { return };
        let Some(q) = self.services[usize::from(service)].events.as_mut() else { return };
        if q.inflight.as_ref().is_some_and(|b| b.id == batch_id) {
            if let Some(b) = q.inflight.take() {
                counters.events_acked.fetch_add(b.count, Ordering::Relaxed);
            }
            self.pump_events(service, now, counters);
        }
    }

    /// Whether the periodic task has anything to watch.
    fn busy(&self) -> bool {
        !self.pending.is_empty()
            || !self.paused.is_empty()
            || !self.conns.is_empty()
            || !self.dedup.is_empty()
            || self
                .services
                .iter()
                .any(|s| s.events.as_ref().is_some_and(|q| !q.queue.is_empty() || q.inflight.is_some()))
    }

    /// Stops every link and the periodic task (shutdown).
    pub(crate) fn stop(&mut self) {
        self.stopping = true;
        for (_, link) in self.links.iter() {
            link.wake();
        }
        self.ticking = true;
        let _ = self.wake.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(body: &'static [u8]) -> Outcome {
        Outcome { status: 0, body: Bytes::from_static(body), reason: String::new() }
    }

    #[test]
    fn hand_encoded_request_decodes_as_the_proto_message() {
        let info = proto::ConnInfo {
            user: "alice".into(),
            device: "phone".into(),
            conn_id: 1 << 50,
            client_addr: "127.0.0.1:5000".into(),
            ..Default::default()
        };
        for (client_msg_id, body) in [(0u64, &b""[..]), (300, &b"hello"[..]), (u64::MAX, &[7u8; 200][..])] {
            let frame = encode_upstream_request(u64::MAX - 1, "chat", &info.encode_to_vec(), client_msg_id, body, 5000);
            let (header, raw) = codec::split_frame(&frame, codec::DEFAULT_MAX_BODY).unwrap().unwrap();
            assert_eq!(header.frame_len(), frame.len());
            let Frame::UpstreamRequest(r) = Frame::decode(header, raw).unwrap() else { panic!("kind") };
            let want = proto::UpstreamRequest {
                id: u64::MAX - 1,
                service_id: "chat".into(),
                conn: Some(info.clone()),
                client_msg_id,
                body: Bytes::copy_from_slice(body),
                timeout_ms: 5000,
            };
            assert_eq!(r, want);
            // Canonical: the same bytes prost would write.
            assert_eq!(raw, &want.encode_to_vec()[..]);
        }
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    #[test]
    fn dedup_replays_joins_and_never_crosses_devices() {
        let mut d = Dedup::default();
        let Seen::New(k) = d.lookup("phone", 0, 42, true) else { panic!() };
        d.insert(k, "phone".into(), 0, 7, Millis(0));
        assert_eq!(d.lookup("phone", 0, 42, true), Seen::InFlight(7));
        assert_eq!(d.lookup("phone", 0, 0, true), Seen::Untracked, "no client_msg_id");
        assert_eq!(d.lookup("phone", 0, 42, false), Seen::Untracked, "dedup off");
        assert!(matches!(d.lookup("tablet", 0, 42, true), Seen::New(_)), "another device");
        assert_eq!(d.lookup("phone", 1, 42, true), Seen::Untracked, "same id, other service");
        d.finish(k, 8, &outcome(b"wrong attempt"));
        assert_eq!(d.lookup("phone", 0, 42, true), Seen::InFlight(7));
        d.finish(k, 7, &outcome(b"answer"));
        assert_eq!(d.lookup("phone", 0, 42, true), Seen::Done(outcome(b"answer")));
        // A colliding hash with another device name is not a hit.
        d.entries.get_mut(&k).unwrap().device = "other".into();
        assert_eq!(d.lookup("phone", 0, 42, true), Seen::Untracked);
    }

    #[test]
    fn dedup_expires_by_window_and_evicts_by_caps() {
        let mut d = Dedup::default();
        for i in 1..=10u64 {
            let Seen::New(k) = d.lookup("dev", 0, i, true) else { panic!() };
            d.insert(k, "dev".into(), 0, i, Millis(i));
            d.finish(k, i, &outcome(b"0123456789"));
        }
        // Entry cap 8: the two oldest go, counted as evictions.
        assert_eq!(d.trim(Millis(10), 1000, 8, usize::MAX), 2);
        assert!(matches!(d.lookup("dev", 0, 1, true), Seen::New(_)));
        assert!(matches!(d.lookup("dev", 0, 3, true), Seen::Done(_)));
        // Window: entries inserted at 3..=5 are expired at 1005; not evictions.
        assert_eq!(d.trim(Millis(1005), 1000, 8, usize::MAX), 0);
        assert_eq!(d.entries.len(), 5);
        // Byte cap.
        let one = d.bytes / d.entries.len();
        assert_eq!(d.trim(Millis(1005), 1000, 100, one * 2), 3);
        assert_eq!(d.bytes, one * 2);
        // An entry still in flight outlives the window until it is answered.
        let Seen::New(k) = d.lookup("dev", 0, 99, true) else { panic!() };
        d.insert(k, "dev".into(), 0, 99, Millis(2000));
        d.trim(Millis(5000), 1000, 100, usize::MAX);
        assert_eq!(d.lookup("dev", 0, 99, true), Seen::InFlight(99));
        // Requeued at 5000, its answer is kept one more window from then.
        d.finish(k, 99, &outcome(b"late"));
        d.trim(Millis(5999), 1000, 100, usize::MAX);
        assert_eq!(d.lookup("dev", 0, 99, true), Seen::Done(outcome(b"late")));
        d.trim(Millis(6000), 1000, 100, usize::MAX);
        assert!(matches!(d.lookup("dev", 0, 99, true), Seen::New(_)));
    }

    fn settings(rate: u32, burst: u32) -> UpstreamSettings {
        let cfg = UpstreamConfig {
            rate_limit_per_sec: rate,
            rate_limit_burst: burst,
            rate_limit_close_after_paused_ms: 500,
            rate_limit_window_ms: 10_000,
            ..UpstreamConfig::default()
        };
        UpstreamSettings::resolve(&cfg).unwrap()
    }

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .make()
            .expect("executor")
            .run(f)
    }

    #[test]
    fn bucket_pauses_resumes_closes_and_is_dropped_when_full() {
        run(async {
            let c = UpstreamCounters::default();
            let mut up = Upstream::new(settings(100, 3));
            let key = ConnKey { index: 1, generation: 1 };
            for _ in 0..3 {
                assert!(up.admit(key, Millis(0), &c, Bytes::new));
            }
            assert!(!up.admit(key, Millis(0), &c, Bytes::new));
            assert!(up.is_paused(key));
            assert!(!up.admit(key, Millis(100), &c, Bytes::new), "stays paused until the tick resumes it");
            assert!(up.check_paused(Millis(5)).is_empty(), "less than one token after 5 ms");
            assert!(matches!(up.check_paused(Millis(10))[..], [Unpause::Resume(k)] if k == key));
            assert!(up.admit(key, Millis(10), &c, Bytes::new));
            // Flood: paused again and again until 500 ms of pause add up.
            let mut t = 10;
            let mut closed = false;
            while t < 2_000 && !closed {
                while up.admit(key, Millis(t), &c, Bytes::new) {}
                t += 10;
                closed = up.check_paused(Millis(t)).iter().any(|u| matches!(u, Unpause::Close(..)));
            }
            assert!(closed && (500..700).contains(&t), "closed at {t}");
            // A calm connection's entry goes once its bucket is full again.
            let calm = ConnKey { index: 2, generation: 1 };
            assert!(up.admit(calm, Millis(3_000), &c, Bytes::new));
            up.sweep_idle(Millis(3_001));
            assert!(up.conns.contains_key(&calm));
            up.sweep_idle(Millis(3_020));
            assert!(!up.conns.contains_key(&calm));
            up.forget_conn(key);
            assert!(up.conns.is_empty() && up.paused.is_empty());
        });
    }

    #[test]
    fn without_a_rate_the_entry_only_caches_the_parameters() {
        run(async {
            let c = UpstreamCounters::default();
            let mut up = Upstream::new(settings(0, 1));
            let key = ConnKey { index: 1, generation: 1 };
            for _ in 0..1000 {
                assert!(up.admit(key, Millis(0), &c, || Bytes::from_static(b"info")));
            }
            assert_eq!(up.conns[&key].info, Bytes::from_static(b"info"));
            up.sweep_idle(Millis(1));
            assert!(up.conns.is_empty());
        });
    }
}
