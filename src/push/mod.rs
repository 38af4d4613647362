//! The push port: backends connect here (same framing as clients), send
//! pipelined requests and get one reply per request.
//!
//! The shard that reads a request is its origin. It splits the request into
//! parts per owner shard (devices), per home shard (users), or one per
//! shard (groups, broadcast, presence), sends them over the mesh, and
//! merges the answers in a [`Pending`] entry; the reply goes out when every
//! part is in, or at `push.reply_timeout_ms` with what it has: targets whose
//! answer did not come are REJECTED with `retryable` set ([`Deadlines`]; a
//! late answer is dropped and counted). A backend connection has a bounded
//! number of requests in flight: at the bound the node stops reading from
//! it (backpressure).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use glommio::net::TcpStream;
use prost::Message as _;
use tracing::{debug, warn};

use crate::conn::OutQueue;
use crate::mesh::{Origin, Outgoing, Part, PresencePart, PresenceQuery, ShardMsg, UserAction};
use crate::protocol::codec::{self, CodecError, Flags, Frame, Peer};
use crate::protocol::codes;
use crate::protocol::ids::home_shard;
use crate::protocol::ids::{ConnKey, ShardId, owner_shard};
use crate::protocol::limits::{MAX_ID_BYTES, check_id};
use crate::protocol::proto::{self, ErrorCode, FrameKind, PushStatus};
use crate::protocol::time::Millis;
use crate::shard::{Shard, State};

/// Reads handled in one poll of a backend connection before yielding.
const READS_PER_POLL: usize = 8;

/// One backend connection's state on its shard.
pub(crate) struct Backend {
    generation: u32,
    out: OutQueue,
    /// Requests read and not yet answered.
    inflight: u32,
    waker: Option<Waker>,
    /// Flush what is queued, then close.
    closing: bool,
}

impl Backend {
    pub(crate) fn close(&mut self) {
        self.closing = true;
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}

/// Queues the reply to a finished request on its backend connection.
pub(crate) fn reply(st: &mut State, backend: ConnKey, frame: Bytes) {
    let Some(b) = st.backends.get_mut(backend.index as usize).filter(|b| b.generation == backend.generation) else {
        return; // the backend went away; its answer has nowhere to go
    };
    b.out.push(frame);
    b.inflight = b.inflight.saturating_sub(1);
    if let Some(w) = &b.waker {
        w.wake_by_ref();
    }
}

/// Counts a request answered later through [`reply`] by other code (the
/// cluster) as in flight on its backend connection.
pub(crate) fn hold(st: &mut State, backend: ConnKey) {
    if let Some(b) = st.backends.get_mut(backend.index as usize).filter(|b| b.generation == backend.generation) {
        b.inflight += 1;
    }
}

/// Answers that cannot wait for other shards (bad requests).
fn reply_now(st: &mut State, backend: ConnKey, frame: Frame) {
    if let Some(b) = st.backends.get_mut(backend.index as usize).filter(|b| b.generation == backend.generation) {
        b.out.push(frame.to_bytes());
    }
}

fn request_error(request_id: u64, code: ErrorCode, reason: impl Into<String>) -> proto::RequestError {
    proto::RequestError { request_id, code: code as i32, reason: reason.into() }
}

/// Push-port requests by deadline, on their origin shard. Every entry is
/// one `push.reply_timeout_ms` after its start, so the queue is in deadline
/// order and the shard's timer tick pops what is due: no timer per request.
#[derive(Default)]
pub(crate) struct Deadlines {
    queue: VecDeque<(Millis, Expiry)>,
}

/// What a deadline ends.
pub(crate) enum Expiry {
    /// A request in `State::pending` (nothing to do if it was answered).
    Request(u64),
    /// A request answered by a task (cluster mode), which waits on it.
    Alarm(Rc<Alarm>),
}

impl Expiry {
    /// Whether the deadline still matters.
    fn is_live(&self, pending: &std::collections::HashMap<u64, Pending>) -> bool {
        match self {
            Expiry::Request(token) => pending.contains_key(token),
            // The task holds the other reference while it waits.
            Expiry::Alarm(alarm) => Rc::strong_count(alarm) > 1,
        }
    }
}

/// Entries kept before answered ones are swept out early (their deadlines
/// otherwise keep them until they pass).
const DEADLINES_SWEEP_AT: usize = 1024;

impl Deadlines {
    pub(crate) fn push(&mut self, at: Millis, what: Expiry) {
        self.queue.push_back((at, what));
    }

    /// Moves the entries due at `now` into `out`.
    pub(crate) fn take_due(&mut self, now: Millis, out: &mut Vec<Expiry>) {
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, what)) = self.queue.pop_front() {
                out.push(what);
            }
        }
    }

    /// Drops the entries of requests already answered once they make up
    /// most of the queue: it stays in proportion to the requests in flight.
    fn sweep(&mut self, pending: &std::collections::HashMap<u64, Pending>) {
        if self.queue.len() >= DEADLINES_SWEEP_AT && self.queue.len() > 2 * (pending.len() + 64) {
            self.queue.retain(|(_, what)| what.is_live(pending));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.len()
    }
}

/// Rings once the deadline of a request answered by a task passes.
#[derive(Default)]
pub(crate) struct Alarm {
    fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Alarm {
    fn fire(&self) {
        self.fired.set(true);
        let waker = self.waker.borrow_mut().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the deadline passed.
    pub(crate) fn rang(&self) -> bool {
        self.fired.get()
    }

    /// `fut`'s output, or `None` when the alarm rings first.
    pub(crate) async fn before<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let rung = std::future::poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut slot = self.waker.borrow_mut();
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
            Poll::Pending
        });
        futures_lite::future::or(async { Some(fut.await) }, async {
            rung.await;
            None
        })
        .await
    }
}

/// Added to a user target's count of awaited answers while its home shard
/// has not said how many shards hold its sessions (more than any count of
/// shards, so a part that arrives first cannot make it look complete).
const AWAIT_LOOKUP: i32 = 1 << 16;

/// A request waiting on its origin shard for the parts of its answer.
pub(crate) struct Pending {
    backend: ConnKey,
    request_id: u64,
    /// Answers still to come from home shards (user lookups), plus one while
    /// the origin is still sending parts.
    lookups: u32,
    expected: u64,
    done: u64,
    kind: PendingKind,
}

enum PendingKind {
    /// Per-target results (device/user pushes, group updates, kicks).
    Targets {
        results: Vec<proto::TargetResult>,
        /// Answers still owed per target (see [`AWAIT_LOOKUP`]); a target
        /// with a non-zero count when the deadline passes is REJECTED.
        awaiting: Vec<i32>,
        admin: bool,
        /// User targets (stored copies are listed per device).
        users: bool,
        /// The message id of an at-most-once push (0: per target).
        message_id: u64,
    },
    /// Group push (`broadcast == false`) or broadcast: sessions reached.
    Count {
        broadcast: bool,
        delivered: u64,
        message_id: u64,
        /// Why a broadcast was not queued (a shard's queue was full).
        refused: Option<String>,
    },
    Presence {
        query: Arc<PresenceQuery>,
        shards: u16,
        parts: Vec<PresencePart>,
    },
    /// Delivery status query: one status per id, the first shard that
    /// knows an id wins.
    Status {
        statuses: Vec<proto::MessageStatus>,
    },
}

impl Pending {
    fn targets(results: Vec<proto::TargetResult>, admin: bool, users: bool, message_id: u64) -> PendingKind {
        let awaiting = vec![0; results.len()];
        PendingKind::Targets { results, awaiting, admin, users, message_id }
    }

    /// Counts the answers `msg` (about to be sent) owes per target.
    fn awaits(&mut self, msg: &ShardMsg) {
        let PendingKind::Targets { awaiting, .. } = &mut self.kind else { return };
        let mut add = |idx: u32, n: i32| {
            if let Some(a) = awaiting.get_mut(idx as usize) {
                *a += n;
            }
        };
        match msg {
            ShardMsg::Devices { items, .. }
            | ShardMsg::GroupUpdate { items, .. }
            | ShardMsg::KickDevices { items, .. } => items.iter().for_each(|(i, _)| add(*i, 1)),
            ShardMsg::StoreDevices { items, .. } => items.iter().for_each(|(i, _, _)| add(*i, 1)),
            ShardMsg::UserLookup { items, .. } => items.iter().for_each(|(i, _)| add(*i, AWAIT_LOOKUP)),
            _ => {}
        }
    }

    pub(crate) fn merge(&mut self, part: Part) {
        match (part, &mut self.kind) {
            (Part::Sessions(reached), PendingKind::Targets { results, awaiting, .. }) => {
                // Every target of the part is listed, reached or not.
                for (idx, n) in reached {
                    if let Some(r) = results.get_mut(idx as usize) {
                        r.sessions += n;
                    }
                    if let Some(a) = awaiting.get_mut(idx as usize) {
                        *a -= 1;
                    }
                }
                self.done += 1;
            }
            (Part::Count(n), PendingKind::Count { delivered, .. }) => {
                *delivered += n;
                self.done += 1;
            }
            (Part::Presence(p), PendingKind::Presence { parts, .. }) => {
                parts.push(*p);
                self.done += 1;
            }
            (Part::Stored(copies), PendingKind::Targets { results, awaiting, users, .. }) => {
                // One part answers for each of its targets once, whatever
                // the number of copies (a user's devices on that shard).
                let mut previous = None;
                for c in copies {
                    if previous != Some(c.idx)
                        && let Some(a) = awaiting.get_mut(c.idx as usize)
                    {
                        *a -= 1;
                    }
                    previous = Some(c.idx);
                    let Some(r) = results.get_mut(c.idx as usize) else { continue };
                    if let Some(reason) = c.error {
                        // One failed copy fails the target: the backend must
                        // retry it (copies already stored are listed).
                        r.status = PushStatus::Rejected as i32;
                        r.reason = reason;
                        r.retryable = c.retryable;
                    } else if c.device.is_empty() {
                        // A user with no session on that shard any more.
                    } else {
                        if r.status != PushStatus::Rejected as i32 {
                            r.status = PushStatus::Stored as i32;
                        }
                        r.sessions += c.sessions;
                        if *users {
                            r.copies.push(proto::StoredCopy { device: c.device, seq: c.seq, message_id: c.message_id });
                        } else {
                            r.seq = c.seq;
                            r.message_id = c.message_id;
                        }
                    }
                }
                self.done += 1;
            }
            (Part::Status(found), PendingKind::Status { statuses }) => {
                for (idx, status) in found {
                    if let Some(slot) = statuses.get_mut(idx as usize)
                        && slot.state == proto::DeliveryState::Unknown as i32
                    {
                        *slot = status;
                    }
                }
                self.done += 1;
            }
            (Part::Expect { parts, targets }, kind) => {
                self.lookups = self.lookups.saturating_sub(1);
                self.expected += u64::from(parts);
                if let PendingKind::Targets { awaiting, .. } = kind {
                    for (idx, n) in targets {
                        if let Some(a) = awaiting.get_mut(idx as usize) {
                            *a += i32::try_from(n).unwrap_or(i32::MAX) - AWAIT_LOOKUP;
                        }
                    }
                }
            }
            // A part of the wrong shape is a bug in the sender; count it so
            // the request still completes.
            (other, _) => {
                warn!(?other, "mismatched answer part");
                self.done += 1;
            }
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.lookups == 0 && self.done >= self.expected
    }

    /// The deadline passed before every part came: the reply with what is
    /// in, every target still owed an answer REJECTED (retryable: it may
    /// succeed when sent again; copies already stored are listed).
    pub(crate) fn expire(mut self, shards: u16, timeout_ms: u64) -> (ConnKey, Frame) {
        let missing = self.expected.saturating_sub(self.done) + u64::from(self.lookups);
        if let PendingKind::Targets { results, awaiting, users, .. } = &mut self.kind {
            for (r, owed) in results.iter_mut().zip(awaiting.iter()) {
                if *owed == 0 || r.status == PushStatus::Rejected as i32 {
                    continue;
                }
                r.status = PushStatus::Rejected as i32;
                r.retryable = true;
                r.reason = if *users || *owed >= AWAIT_LOOKUP {
                    format!("the shards holding this user's sessions did not all answer within {timeout_ms} ms")
                } else {
                    format!("shard {} did not answer within {timeout_ms} ms", owner_shard(&r.target, shards))
                };
            }
        }
        let (backend, mut frame) = self.finish();
        if let Frame::PushReply(r) = &mut frame
            && r.results.is_empty()
        {
            // Group or broadcast: `delivered` counts the shards that answered.
            r.status = PushStatus::Rejected as i32;
            r.retryable = true;
            r.reason = format!("{missing} shard answers missing after {timeout_ms} ms; delivered counts the others");
        }
        (backend, frame)
    }

    /// The backend to answer and the reply frame.
    pub(crate) fn finish(self) -> (ConnKey, Frame) {
        let request_id = self.request_id;
        let frame = match self.kind {
            PendingKind::Targets { mut results, admin, users, message_id, .. } => {
                let (mut delivered, mut not_online, mut stored) = (0u64, 0u64, 0u64);
                for r in &mut results {
                    if r.status == PushStatus::Rejected as i32 {
                        stored += r.copies.len() as u64;
                        continue;
                    }
                    if r.status == PushStatus::Stored as i32 {
                        stored += if users { r.copies.len() as u64 } else { 1 };
                        delivered += u64::from(r.sessions);
                        continue;
                    }
                    if r.sessions > 0 {
                        r.status = PushStatus::Delivered as i32;
                        delivered += u64::from(r.sessions);
                    } else {
                        r.status = PushStatus::NotOnline as i32;
                        not_online += 1;
                    }
                }
                if admin {
                    Frame::AdminReply(proto::AdminReply { request_id, results })
                } else {
                    let status = if stored > 0 {
                        PushStatus::Stored
                    } else if delivered > 0 {
                        PushStatus::Delivered
                    } else {
                        PushStatus::NotOnline
                    };
                    // At-least-once ids are per copy; one device target has one.
                    let message_id = match &results[..] {
                        [only] if message_id == 0 && !users => only.message_id,
                        _ => message_id,
                    };
                    Frame::PushReply(proto::PushReply {
                        request_id,
                        results,
                        delivered,
                        not_online,
                        status: status as i32,
                        reason: String::new(),
                        message_id,
                        stored,
                        retryable: false,
                    })
                }
            }
            PendingKind::Count { message_id, refused: Some(reason), .. } => Frame::PushReply(proto::PushReply {
                request_id,
                status: PushStatus::Rejected as i32,
                reason,
                retryable: true,
                message_id,
                ..Default::default()
            }),
            PendingKind::Count { broadcast, delivered, message_id, refused: None } => {
                let status = match (broadcast, delivered) {
                    (true, _) => PushStatus::Accepted,
                    (false, 0) => PushStatus::NotOnline,
                    (false, _) => PushStatus::Delivered,
                };
                Frame::PushReply(proto::PushReply {
                    request_id,
                    delivered,
                    status: status as i32,
                    message_id,
                    ..Default::default()
                })
            }
            PendingKind::Presence { query, shards, parts } => presence_reply(request_id, &query, shards, parts),
            PendingKind::Status { statuses } => {
                Frame::DeliveryStatusReply(proto::DeliveryStatusReply { request_id, statuses })
            }
        };
        (self.backend, frame)
    }
}

fn presence_reply(request_id: u64, query: &PresenceQuery, shards: u16, parts: Vec<PresencePart>) -> Frame {
    let mut reply = proto::PresenceReply {
        request_id,
        devices: query
            .devices
            .iter()
            .map(|d| proto::DevicePresence { device: d.clone(), ..Default::default() })
            .collect(),
        users: query.users.iter().map(|u| proto::UserPresence { user: u.clone(), devices: Vec::new() }).collect(),
        groups: query.groups.iter().map(|g| proto::GroupCount { group: g.clone(), online: 0 }).collect(),
        connections_per_shard: vec![0; usize::from(shards)],
        connections_total: 0,
    };
    for part in parts {
        if let Some(c) = reply.connections_per_shard.get_mut(part.shard.index()) {
            *c = part.connections;
        }
        reply.connections_total += part.connections;
        for (i, d) in part.devices {
            if let Some(slot) = reply.devices.get_mut(i as usize) {
                *slot = d;
            }
        }
        for (i, sessions) in part.users {
            if let Some(u) = reply.users.get_mut(i as usize) {
                u.devices.extend(sessions);
            }
        }
        for (i, n) in part.groups {
            if let Some(g) = reply.groups.get_mut(i as usize) {
                g.online += n;
            }
        }
    }
    Frame::PresenceReply(reply)
}

/// A target string is usable as an id.
fn valid_id(id: &str) -> Result<(), crate::protocol::limits::IdError> {
    check_id(id, MAX_ID_BYTES)
}

/// Per-target results for `ids`, with invalid ones already REJECTED.
pub(crate) fn target_results<'a>(ids: impl Iterator<Item = &'a String>) -> Vec<proto::TargetResult> {
    ids.map(|id| {
        let mut r = proto::TargetResult { target: id.clone(), ..Default::default() };
        if let Err(reason) = valid_id(id) {
            r.status = PushStatus::Rejected as i32;
            r.reason = reason.to_string();
        }
        r
    })
    .collect()
}

/// The checks of a push request that need no shard (the fuzz targets run
/// them too). `Ok(true)`: an at-least-once push.
pub(crate) fn check_push(
    id: u64,
    targets: &proto::Targets,
    qos: i32,
    max_targets: usize,
) -> Result<bool, proto::RequestError> {
    let kinds = [!targets.devices.is_empty(), !targets.users.is_empty(), !targets.group.is_empty(), targets.broadcast];
    if kinds.iter().filter(|&&k| k).count() != 1 {
        return Err(request_error(
            id,
            ErrorCode::BadFrame,
            "set exactly one of targets.devices, targets.users, targets.group, targets.broadcast",
        ));
    }
    if targets.devices.len() + targets.users.len() > max_targets {
        return Err(request_error(id, ErrorCode::LimitExceeded, format!("more than {max_targets} targets")));
    }
    let reliable = match proto::Qos::try_from(qos) {
        Ok(proto::Qos::AtMostOnce) => false,
        Ok(proto::Qos::AtLeastOnce) => true,
        Err(_) => return Err(request_error(id, ErrorCode::BadFrame, format!("unknown qos {qos}"))),
    };
    if reliable && (targets.broadcast || !targets.group.is_empty()) {
        return Err(request_error(
            id,
            ErrorCode::BadFrame,
            "qos AT_LEAST_ONCE is for device and user targets; group and broadcast pushes are at-most-once",
        ));
    }
    if !targets.group.is_empty()
        && let Err(reason) = valid_id(&targets.group)
    {
        return Err(request_error(id, ErrorCode::BadFrame, format!("group: {reason}")));
    }
    Ok(reliable)
}

/// The checks of a group update that need no shard.
pub(crate) fn check_group_update(req: &proto::GroupUpdate, max_targets: usize) -> Result<(), proto::RequestError> {
    let id = req.request_id;
    if let Err(reason) = valid_id(&req.group) {
        return Err(request_error(id, ErrorCode::BadFrame, format!("group: {reason}")));
    }
    if req.add_devices.len() + req.remove_devices.len() > max_targets {
        return Err(request_error(id, ErrorCode::LimitExceeded, format!("more than {max_targets} devices")));
    }
    Ok(())
}

impl Shard {
    /// Accepts backend connections on the push port until shutdown.
    pub async fn push_accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener) {
        while let Some(accepted) = self.accept_or_stop(&listener).await {
            match accepted {
                Ok(stream) => {
                    let key = {
                        let mut st = self.state.borrow_mut();
                        let generation = st.next_token() as u32;
                        let index = st.backends.insert(Backend {
                            generation,
                            out: OutQueue::default(),
                            inflight: 0,
                            waker: None,
                            closing: false,
                        });
                        ConnKey { index: index as u32, generation }
                    };
                    debug!(shard = %self.id, peer = ?stream.peer_addr().ok(), "backend connected");
                    glommio::spawn_local(Rc::clone(&self).run_backend(key, stream)).detach();
                }
                Err(err) => {
                    warn!(shard = %self.id, error = %err, "push accept failed; pausing 100 ms");
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn run_backend(self: Rc<Self>, key: ConnKey, mut stream: TcpStream) {
        let mut rbuf = BytesMut::new();
        std::future::poll_fn(|cx| self.poll_backend(key, &mut stream, &mut rbuf, cx)).await;
        let mut st = self.state.borrow_mut();
        if st.backends.get(key.index as usize).is_some_and(|b| b.generation == key.generation) {
            st.backends.remove(key.index as usize);
        }
        debug!(shard = %self.id, "backend disconnected");
    }

    fn poll_backend(
        &self,
        key: ConnKey,
        stream: &mut TcpStream,
        rbuf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let max_inflight = self.cfg.push.max_inflight_per_backend;
        for _ in 0..READS_PER_POLL {
            {
                let mut st = self.state.borrow_mut();
                let Some(b) = st.backends.get_mut(key.index as usize).filter(|b| b.generation == key.generation) else {
                    return Poll::Ready(());
                };
                if b.out.flush(stream, cx).is_err() || (b.closing && b.out.is_empty()) {
                    return Poll::Ready(());
                }
                if !b.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    b.waker = Some(cx.waker().clone());
                }
                if b.closing {
                    return Poll::Pending;
                }
                // Handle every whole request already read, up to the bound.
                loop {
                    let Some(b) = st.backends.get_mut(key.index as usize) else { return Poll::Ready(()) };
                    if b.inflight >= max_inflight {
                        // Backpressure: a reply wakes us.
                        return Poll::Pending;
                    }
                    if self.mesh_congested(cx.waker()) {
                        // Backpressure from slow shards: the outbox wakes us
                        // once its FIFOs have drained.
                        return Poll::Pending;
                    }
                    match codec::split_frame(rbuf, self.cfg.push.max_request_bytes) {
                        Ok(None) => break,
                        Ok(Some((header, body))) => {
                            let len = header.frame_len();
                            let frame = Frame::decode_from(Peer::Backend, header, body);
                            rbuf.advance(len);
                            self.on_request(&mut st, key, frame);
                        }
                        Err(err) => {
                            // The frame boundary is lost: say why and close.
                            let error = Frame::Error(codes::error_body(err.code(), err.to_string()));
                            b.out.push(error.to_bytes());
                            b.closing = true;
                            rbuf.clear();
                            break;
                        }
                    }
                }
                if st.backends.get(key.index as usize).is_some_and(|b| b.closing || !b.out.is_empty()) {
                    // Flush replies (or the error) before reading more.
                    drop(st);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, &mut chunk) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => rbuf.extend_from_slice(&chunk[..n]),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn on_request(&self, st: &mut State, backend: ConnKey, frame: Result<Frame, CodecError>) {
        self.counters.push_requests.fetch_add(1, Ordering::Relaxed);
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => {
                return reply_now(st, backend, Frame::RequestError(request_error(0, err.code(), err.to_string())));
            }
        };
        // Hook: in cluster mode the cluster answers backends' requests.
        let Some(frame) = self.cluster_intercept(st, backend, frame) else { return };
        let accepted = match frame {
            Frame::PushRequest(req) => self.start_push(st, backend, req),
            Frame::GroupUpdate(req) => self.start_group_update(st, backend, req),
            Frame::KickRequest(req) => self.start_kick(st, backend, req),
            Frame::PresenceQuery(req) => self.start_presence(st, backend, req),
            Frame::DeliveryStatusQuery(req) => self.start_status(st, backend, req),
            other => {
                Err(request_error(0, ErrorCode::BadFrame, format!("{:?} is not a push-port request", other.kind())))
            }
        };
        if let Err(error) = accepted {
            reply_now(st, backend, Frame::RequestError(error));
        }
    }

    /// Registers a pending request; the origin holds one "lookup" until it
    /// has sent every part, so early answers cannot complete it.
    fn begin(&self, st: &mut State, backend: ConnKey, request_id: u64, kind: PendingKind) -> Origin {
        let token = st.next_token();
        st.pending.insert(token, Pending { backend, request_id, lookups: 1, expected: 0, done: 0, kind });
        self.arm_deadline(st, Expiry::Request(token));
        if let Some(b) = st.backends.get_mut(backend.index as usize) {
            b.inflight += 1;
        }
        Origin { shard: self.id, token }
    }

    /// Files `what` to end one `push.reply_timeout_ms` from now.
    pub(crate) fn arm_deadline(&self, st: &mut State, what: Expiry) {
        let at = self.now().mono.add_ms(self.cfg.push.reply_timeout_ms);
        st.deadlines.sweep(&st.pending);
        st.deadlines.push(at, what);
    }

    /// Answers the requests whose deadline passed with what they have (from
    /// the shard's timer tick).
    pub(crate) fn expire_requests(&self) {
        let now = self.now().mono;
        let mut due = Vec::new();
        let mut st = self.state.borrow_mut();
        st.deadlines.take_due(now, &mut due);
        for what in due {
            match what {
                Expiry::Request(token) => {
                    let Some(pending) = st.pending.remove(&token) else { continue };
                    self.counters.push_timeouts.fetch_add(1, Ordering::Relaxed);
                    let (backend, frame) = pending.expire(self.shards(), self.cfg.push.reply_timeout_ms);
                    // Hook: the local part of a cluster request goes to its merge.
                    if let Some(frame) = self.cluster_local_reply(backend, frame) {
                        reply(&mut st, backend, frame.to_bytes());
                    }
                }
                Expiry::Alarm(alarm) => alarm.fire(),
            }
        }
    }

    /// Done sending parts: the request completes when its answers are in.
    fn end(&self, st: &mut State, origin: Origin) {
        if let Some(p) = st.pending.get_mut(&origin.token) {
            p.lookups -= 1;
        }
        self.finish_if_done(st, origin.token);
    }

    /// Sends one part that will be answered with one [`Part`].
    fn send_part(&self, st: &mut State, origin: Origin, to: ShardId, msg: ShardMsg) {
        if let Some(p) = st.pending.get_mut(&origin.token) {
            p.expected += 1;
            p.awaits(&msg);
        }
        self.route(st, to, msg);
    }

    /// Sends a user lookup, answered with `Part::Expect` by the home shard.
    fn send_lookup(&self, st: &mut State, origin: Origin, to: ShardId, msg: ShardMsg) {
        if let Some(p) = st.pending.get_mut(&origin.token) {
            p.lookups += 1;
            p.awaits(&msg);
        }
        self.route(st, to, msg);
    }

    /// Splits `(index, id)` pairs by `shard_of(id)`, skipping rejected ones.
    fn by_shard(
        &self,
        results: &[proto::TargetResult],
        offset: usize,
        ids: &[String],
        shard_of: fn(&str, u16) -> ShardId,
    ) -> Vec<Vec<(u32, String)>> {
        let mut batches = vec![Vec::new(); usize::from(self.shards())];
        for (i, id) in ids.iter().enumerate() {
            let idx = offset + i;
            if results[idx].status != PushStatus::Rejected as i32 {
                batches[shard_of(id, self.shards()).index()].push((idx as u32, id.clone()));
            }
        }
        batches
    }

    pub(crate) fn start_push(
        &self,
        st: &mut State,
        backend: ConnKey,
        req: proto::PushRequest,
    ) -> Result<(), proto::RequestError> {
        let id = req.request_id;
        let targets = req.targets.unwrap_or_default();
        let reliable = check_push(id, &targets, req.qos, self.cfg.push.max_targets_per_request as usize)?;
        let message = proto::Message {
            payload: req.payload,
            service_id: req.service_id,
            message_id: self.next_message_id(st),
            // At-least-once copies carry a sequence: count its largest size.
            seq: if reliable { u64::MAX } else { 0 },
        };
        if message.encoded_len() > self.cfg.max_frame_bytes as usize {
            return Err(request_error(
                id,
                ErrorCode::FrameTooLarge,
                format!(
                    "message of {} bytes exceeds the client frame limit of {}",
                    message.encoded_len(),
                    self.cfg.max_frame_bytes
                ),
            ));
        }
        if reliable {
            let expires_at_ms = match req.ttl_ms {
                0 => 0,
                ttl => self.now().unix_ms.max(0) as u64 + u64::from(ttl),
            };
            let msg = Arc::new(Outgoing { service_id: message.service_id, payload: message.payload, expires_at_ms });
            self.start_reliable_push(st, backend, id, targets, msg);
            return Ok(());
        }
        let message_id = message.message_id;
        let frame = codec::encode(FrameKind::Message, Flags::default(), &message);

        if targets.broadcast || !targets.group.is_empty() {
            let broadcast = targets.broadcast;
            // Room on every shard first (all or none), so a refused
            // broadcast reached nobody and may simply be sent again.
            let refused = if broadcast { self.reserve_broadcast(frame.len()).err() } else { None };
            if refused.is_some() {
                let kind = PendingKind::Count { broadcast, delivered: 0, message_id, refused };
                let origin = self.begin(st, backend, id, kind);
                self.end(st, origin);
                return Ok(());
            }
            let kind = PendingKind::Count { broadcast, delivered: 0, message_id, refused: None };
            let origin = self.begin(st, backend, id, kind);
            let expires_at = (req.ttl_ms > 0).then(|| Instant::now() + Duration::from_millis(u64::from(req.ttl_ms)));
            for shard in 0..self.shards() {
                let msg = if broadcast {
                    ShardMsg::Broadcast { origin, frame: frame.clone(), expires_at }
                } else {
                    ShardMsg::Group { origin, group: targets.group.clone(), frame: frame.clone() }
                };
                self.send_part(st, origin, ShardId(shard), msg);
            }
            self.end(st, origin);
            return Ok(());
        }

        let devices = !targets.devices.is_empty();
        let ids = if devices { targets.devices } else { targets.users };
        let results = target_results(ids.iter());
        let batches = self.by_shard(&results, 0, &ids, if devices { owner_shard } else { home_shard });
        let kind = Pending::targets(results, false, !devices, message_id);
        let origin = self.begin(st, backend, id, kind);
        for (shard, items) in batches.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let to = ShardId(shard as u16);
            if devices {
                self.send_part(st, origin, to, ShardMsg::Devices { origin, items, frame: frame.clone() });
            } else {
                let action = UserAction::Deliver(frame.clone());
                self.send_lookup(st, origin, to, ShardMsg::UserLookup { origin, items, action });
            }
        }
        self.end(st, origin);
        Ok(())
    }

    /// At-least-once device or user push: every device copy is appended to
    /// its timeline on the device's owner shard, which answers with the
    /// sequences ([`Part::Stored`]).
    fn start_reliable_push(
        &self,
        st: &mut State,
        backend: ConnKey,
        id: u64,
        targets: proto::Targets,
        msg: Arc<Outgoing>,
    ) {
        let devices = !targets.devices.is_empty();
        let ids = if devices { targets.devices } else { targets.users };
        let results = target_results(ids.iter());
        let batches = self.by_shard(&results, 0, &ids, if devices { owner_shard } else { home_shard });
        let kind = Pending::targets(results, false, !devices, 0);
        let origin = self.begin(st, backend, id, kind);
        for (shard, items) in batches.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let to = ShardId(shard as u16);
            if devices {
                // Each device's copy has its own id, so its status can be asked.
                let items = items.into_iter().map(|(idx, device)| (idx, device, self.next_message_id(st))).collect();
                self.send_part(st, origin, to, ShardMsg::StoreDevices { origin, items, msg: msg.clone() });
            } else {
                let action = UserAction::Store(msg.clone());
                self.send_lookup(st, origin, to, ShardMsg::UserLookup { origin, items, action });
            }
        }
        self.end(st, origin);
    }

    fn start_status(
        &self,
        st: &mut State,
        backend: ConnKey,
        req: proto::DeliveryStatusQuery,
    ) -> Result<(), proto::RequestError> {
        let max_targets = self.cfg.push.max_targets_per_request as usize;
        if req.message_ids.len() > max_targets {
            let reason = format!("more than {max_targets} message ids");
            return Err(request_error(req.request_id, ErrorCode::LimitExceeded, reason));
        }
        let statuses = req
            .message_ids
            .iter()
            .map(|&message_id| proto::MessageStatus { message_id, ..Default::default() })
            .collect();
        let origin = self.begin(st, backend, req.request_id, PendingKind::Status { statuses });
        let ids = Arc::new(req.message_ids);
        // A shared store (Redis) knows every id: one shard asks it. Memory
        // stores know the devices of their own shard: ask them all.
        let shards = if self.store_is_shared() { vec![self.id] } else { (0..self.shards()).map(ShardId).collect() };
        for shard in shards {
            self.send_part(st, origin, shard, ShardMsg::DeliveryStatus { origin, ids: ids.clone() });
        }
        self.end(st, origin);
        Ok(())
    }

    pub(crate) fn start_group_update(
        &self,
        st: &mut State,
        backend: ConnKey,
        req: proto::GroupUpdate,
    ) -> Result<(), proto::RequestError> {
        let id = req.request_id;
        check_group_update(&req, self.cfg.push.max_targets_per_request as usize)?;
        let results = target_results(req.add_devices.iter().chain(&req.remove_devices));
        let adds = self.by_shard(&results, 0, &req.add_devices, owner_shard);
        let removes = self.by_shard(&results, req.add_devices.len(), &req.remove_devices, owner_shard);
        let kind = Pending::targets(results, true, false, 0);
        let origin = self.begin(st, backend, id, kind);
        for (add, batches) in [(true, adds), (false, removes)] {
            for (shard, items) in batches.into_iter().enumerate() {
                if !items.is_empty() {
                    let msg = ShardMsg::GroupUpdate { origin, group: req.group.clone(), items, add };
                    self.send_part(st, origin, ShardId(shard as u16), msg);
                }
            }
        }
        self.end(st, origin);
        Ok(())
    }

    pub(crate) fn start_kick(
        &self,
        st: &mut State,
        backend: ConnKey,
        req: proto::KickRequest,
    ) -> Result<(), proto::RequestError> {
        let id = req.request_id;
        let max_targets = self.cfg.push.max_targets_per_request as usize;
        if req.devices.len() + req.users.len() > max_targets {
            return Err(request_error(id, ErrorCode::LimitExceeded, format!("more than {max_targets} targets")));
        }
        let code = match codes::from_wire(req.code) {
            ErrorCode::Unspecified => ErrorCode::Kicked,
            code => code,
        };
        let results = target_results(req.devices.iter().chain(&req.users));
        let devices = self.by_shard(&results, 0, &req.devices, owner_shard);
        let users = self.by_shard(&results, req.devices.len(), &req.users, home_shard);
        let kind = Pending::targets(results, true, false, 0);
        let origin = self.begin(st, backend, id, kind);
        for (shard, items) in devices.into_iter().enumerate() {
            if !items.is_empty() {
                let msg = ShardMsg::KickDevices { origin, items, code, reason: req.reason.clone() };
                self.send_part(st, origin, ShardId(shard as u16), msg);
            }
        }
        for (shard, items) in users.into_iter().enumerate() {
            if !items.is_empty() {
                let action = UserAction::Kick { code, reason: req.reason.clone() };
                self.send_lookup(st, origin, ShardId(shard as u16), ShardMsg::UserLookup { origin, items, action });
            }
        }
        self.end(st, origin);
        Ok(())
    }

    pub(crate) fn start_presence(
        &self,
        st: &mut State,
        backend: ConnKey,
        req: proto::PresenceQuery,
    ) -> Result<(), proto::RequestError> {
        let max_targets = self.cfg.push.max_targets_per_request as usize;
        if req.devices.len() + req.users.len() + req.groups.len() > max_targets {
            let reason = format!("more than {max_targets} targets");
            return Err(request_error(req.request_id, ErrorCode::LimitExceeded, reason));
        }
        let query = Arc::new(PresenceQuery { devices: req.devices, users: req.users, groups: req.groups });
        let kind = PendingKind::Presence { query: query.clone(), shards: self.shards(), parts: Vec::new() };
        let origin = self.begin(st, backend, req.request_id, kind);
        for shard in 0..self.shards() {
            self.send_part(st, origin, ShardId(shard), ShardMsg::Presence { origin, query: query.clone() });
        }
        self.end(st, origin);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(kind: PendingKind) -> Pending {
        Pending { backend: ConnKey { index: 0, generation: 0 }, request_id: 9, lookups: 1, expected: 0, done: 0, kind }
    }

    #[test]
    fn early_answers_do_not_complete_a_request_still_being_sent() {
        let results = target_results(["a".to_string(), "b".to_string(), String::new()].iter());
        let mut p = pending(Pending::targets(results, false, false, 5));
        p.expected = 1;
        p.merge(Part::Sessions(vec![(0, 1)]));
        assert!(!p.is_done(), "the origin still holds its guard");
        p.lookups -= 1;
        assert!(p.is_done());
        let (_, frame) = p.finish();
        let Frame::PushReply(reply) = frame else { panic!() };
        let statuses: Vec<_> = reply.results.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [PushStatus::Delivered as i32, PushStatus::NotOnline as i32, PushStatus::Rejected as i32]);
        assert_eq!((reply.delivered, reply.not_online), (1, 1));
    }

    #[test]
    fn user_parts_can_arrive_before_the_home_shard_says_how_many() {
        let results = target_results(["u".to_string()].iter());
        let mut p = pending(Pending::targets(results, false, true, 5));
        p.lookups += 1; // one home shard asked
        p.lookups -= 1; // origin done sending
        p.merge(Part::Sessions(vec![(0, 2)])); // holder answered first
        assert!(!p.is_done());
        p.merge(Part::Expect { parts: 2, targets: vec![(0, 2)] });
        assert!(!p.is_done());
        p.merge(Part::Sessions(vec![(0, 1)]));
        assert!(p.is_done());
        let (_, Frame::PushReply(reply)) = p.finish() else { panic!() };
        assert_eq!(reply.results[0].sessions, 3);
    }

    #[test]
    fn stored_copies_merge_per_device_and_per_user() {
        use crate::mesh::CopyResult;
        let copy = |idx, device: &str, seq, sessions| CopyResult {
            idx,
            device: device.into(),
            seq,
            message_id: seq + 100,
            sessions,
            error: None,
            retryable: false,
        };
        // Devices: online, offline, failed store.
        let results = target_results(["a".to_string(), "b".to_string(), "c".to_string()].iter());
        let mut p = pending(Pending::targets(results, false, false, 0));
        p.expected = 2;
        p.lookups = 0;
        p.merge(Part::Stored(vec![copy(0, "a", 7, 1), copy(1, "b", 3, 0)]));
        let failed =
            CopyResult { error: Some("store overloaded: request shed".into()), retryable: true, ..copy(2, "c", 0, 0) };
        p.merge(Part::Stored(vec![failed]));
        let (_, Frame::PushReply(r)) = p.finish() else { panic!() };
        let got: Vec<_> = r.results.iter().map(|r| (r.status, r.seq, r.message_id, r.sessions)).collect();
        let stored = PushStatus::Stored as i32;
        assert_eq!(got, [(stored, 7, 107, 1), (stored, 3, 103, 0), (PushStatus::Rejected as i32, 0, 0, 0)]);
        assert!(r.results[2].retryable && r.results[2].reason.contains("overloaded"));
        assert_eq!((r.status, r.stored, r.delivered, r.message_id), (stored, 2, 1, 0));

        // A user with two devices on two shards; one device target alone
        // reports its id for the whole request.
        let results = target_results(["u".to_string()].iter());
        let mut p = pending(Pending::targets(results, false, true, 0));
        p.expected = 2;
        p.lookups = 0;
        p.merge(Part::Stored(vec![copy(0, "u-phone", 4, 1)]));
        p.merge(Part::Stored(vec![copy(0, "u-tablet", 9, 0)]));
        let (_, Frame::PushReply(r)) = p.finish() else { panic!() };
        assert_eq!(r.results[0].copies.len(), 2);
        assert_eq!((r.results[0].sessions, r.stored, r.message_id), (1, 2, 0));
        let results = target_results(["a".to_string()].iter());
        let mut p = pending(Pending::targets(results, false, false, 0));
        p.expected = 1;
        p.lookups = 0;
        p.merge(Part::Stored(vec![copy(0, "a", 7, 1)]));
        let (_, Frame::PushReply(r)) = p.finish() else { panic!() };
        assert_eq!(r.message_id, 107);
    }

    #[test]
    fn deadlines_pop_in_order_at_their_time_and_answered_ones_are_swept() {
        let mut d = Deadlines::default();
        let mut pending = std::collections::HashMap::new();
        let alarm = Rc::new(Alarm::default());
        d.push(Millis(1_000), Expiry::Request(1));
        d.push(Millis(1_000), Expiry::Alarm(alarm.clone()));
        d.push(Millis(1_500), Expiry::Request(2));
        let mut due = Vec::new();
        d.take_due(Millis(999), &mut due);
        assert!(due.is_empty(), "nothing before its time");
        d.take_due(Millis(1_200), &mut due);
        assert!(matches!(due[..], [Expiry::Request(1), Expiry::Alarm(_)]));
        assert!(!alarm.fired.get());
        if let Expiry::Alarm(a) = &due[1] {
            a.fire();
        }
        assert!(alarm.fired.get());
        due.clear();
        d.take_due(Millis(5_000), &mut due);
        assert!(matches!(due[..], [Expiry::Request(2)]));
        // Answered requests leave their entries behind until swept: the
        // queue stays in proportion to what is in flight.
        pending.insert(7, pending_with(9));
        for token in 0..10_000u64 {
            d.sweep(&pending);
            d.push(Millis(10_000 + token), Expiry::Request(token));
        }
        assert!(d.len() < 2 * DEADLINES_SWEEP_AT, "{} entries", d.len());
        d.take_due(Millis(u64::MAX), &mut due);
        assert!(due.iter().any(|e| matches!(e, Expiry::Request(7))), "a live request is never swept");
    }

    fn pending_with(request_id: u64) -> Pending {
        Pending { request_id, ..pending(PendingKind::Status { statuses: Vec::new() }) }
    }

    #[test]
    fn an_alarm_stops_a_wait_that_would_never_end() {
        let alarm = Alarm::default();
        let mut cx = Context::from_waker(Waker::noop());
        let mut wait = Box::pin(alarm.before(std::future::pending::<()>()));
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        alarm.fire();
        assert_eq!(wait.as_mut().poll(&mut cx), Poll::Ready(None));
        let mut ready = Box::pin(alarm.before(std::future::ready(5)));
        assert_eq!(ready.as_mut().poll(&mut cx), Poll::Ready(Some(5)), "an answer in hand wins");
    }

    #[test]
    fn at_the_deadline_targets_without_an_answer_are_rejected_as_retryable() {
        // Three devices on two shards; the part for shard 1 never comes.
        let ids = ["a".to_string(), "b".to_string(), "c".to_string()];
        let shard_of = |d: &str| owner_shard(d, 2);
        let mut p = pending(Pending::targets(target_results(ids.iter()), false, false, 5));
        let mut parts: [Vec<(u32, String)>; 2] = Default::default();
        for (i, d) in ids.iter().enumerate() {
            parts[shard_of(d).index()].push((i as u32, d.clone()));
        }
        for items in &parts {
            p.expected += 1;
            p.awaits(&ShardMsg::Devices {
                origin: Origin { shard: ShardId(0), token: 1 },
                items: items.clone(),
                frame: Bytes::new(),
            });
        }
        p.lookups = 0;
        let answered: Vec<(u32, u32)> = parts[0].iter().map(|(i, _)| (*i, 1)).collect();
        p.merge(Part::Sessions(answered));
        assert!(!p.is_done());
        let (_, Frame::PushReply(r)) = p.expire(2, 5_000) else { panic!() };
        for (res, d) in r.results.iter().zip(&ids) {
            if shard_of(d) == ShardId(0) {
                assert_eq!((res.status, res.retryable), (PushStatus::Delivered as i32, false), "{res:?}");
            } else {
                assert_eq!((res.status, res.retryable), (PushStatus::Rejected as i32, true), "{res:?}");
                assert_eq!(res.reason, "shard 1 did not answer within 5000 ms");
            }
        }

        // A user whose home shard never said where its sessions are, and
        // one whose holders all answered (one of them before the count).
        let users = ["u1".to_string(), "u2".to_string()];
        let mut p = pending(Pending::targets(target_results(users.iter()), false, true, 5));
        let origin = Origin { shard: ShardId(0), token: 1 };
        for (i, u) in users.iter().enumerate() {
            p.lookups += 1;
            let action = UserAction::Deliver(Bytes::new());
            p.awaits(&ShardMsg::UserLookup { origin, items: vec![(i as u32, u.clone())], action });
        }
        p.lookups -= 1;
        p.merge(Part::Sessions(vec![(1, 1)]));
        p.merge(Part::Expect { parts: 2, targets: vec![(1, 2)] });
        p.merge(Part::Sessions(vec![(1, 2)]));
        let (_, Frame::PushReply(r)) = p.expire(2, 100) else { panic!() };
        assert_eq!((r.results[0].status, r.results[0].retryable), (PushStatus::Rejected as i32, true));
        assert_eq!((r.results[1].status, r.results[1].sessions), (PushStatus::Delivered as i32, 3));

        // A group push: what the shards that answered reached, REJECTED.
        let mut p = pending(PendingKind::Count { broadcast: false, delivered: 0, message_id: 3, refused: None });
        p.expected = 2;
        p.lookups = 0;
        p.merge(Part::Count(4));
        let (_, Frame::PushReply(r)) = p.expire(2, 100) else { panic!() };
        assert_eq!((r.status, r.retryable, r.delivered), (PushStatus::Rejected as i32, true, 4));
        assert!(r.reason.contains("1 shard answers missing"), "{}", r.reason);
    }

    #[test]
    fn status_parts_fill_unknown_ids_first_come() {
        let statuses = vec![proto::MessageStatus { message_id: 1, ..Default::default() }; 2];
        let mut p = pending(PendingKind::Status { statuses });
        p.expected = 2;
        p.lookups = 0;
        let acked =
            proto::MessageStatus { message_id: 1, state: proto::DeliveryState::Acked as i32, ..Default::default() };
        p.merge(Part::Status(vec![(1, acked.clone())]));
        p.merge(Part::Status(vec![]));
        let (_, Frame::DeliveryStatusReply(r)) = p.finish() else { panic!() };
        assert_eq!(r.statuses[0].state, proto::DeliveryState::Unknown as i32);
        assert_eq!(r.statuses[1], acked);
    }

    #[test]
    fn presence_merges_shards() {
        let query = Arc::new(PresenceQuery {
            devices: vec!["d1".into(), "d2".into()],
            users: vec![],
            groups: vec!["g".into()],
        });
        let mut p = pending(PendingKind::Presence { query, shards: 2, parts: Vec::new() });
        p.expected = 2;
        p.lookups = 0;
        let online = proto::DevicePresence { device: "d2".into(), online: true, shard: 1, ..Default::default() };
        p.merge(Part::Presence(Box::new(PresencePart {
            shard: ShardId(0),
            connections: 3,
            groups: vec![(0, 2)],
            ..Default::default()
        })));
        p.merge(Part::Presence(Box::new(PresencePart {
            shard: ShardId(1),
            connections: 4,
            devices: vec![(1, online)],
            groups: vec![(0, 1)],
            ..Default::default()
        })));
        let (_, Frame::PresenceReply(r)) = p.finish() else { panic!() };
        assert_eq!(r.connections_per_shard, vec![3, 4]);
        assert_eq!(r.connections_total, 7);
        assert!(!r.devices[0].online && r.devices[1].online);
        assert_eq!(r.groups[0].online, 3);
    }
}
