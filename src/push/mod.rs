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

pub mod auth;
#[cfg(test)]
mod component_tests;
mod deadlines;
mod plan;
mod port;
mod reply;

pub(crate) use deadlines::{Alarm, Deadlines, Expiry};
pub(crate) use plan::{check_group_update, check_push, target_results};
pub(crate) use port::{
    accept_loop, arm_deadline, expire, merge_part, start_group_update, start_kick, start_presence, start_push,
};
use reply::*;
pub(crate) use reply::{Pending, request_id, summarize};

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use glommio::net::{TcpListener, TcpStream};
use prost::Message as _;
use slab::Slab;
use tracing::{debug, warn};

use crate::conn::OutQueue;
use crate::mesh::{Origin, Outgoing, Part, PresencePart, PresenceQuery, ShardMsg, UserAction};
use crate::protocol::codec::{self, CodecError, Flags, Frame, Peer};
use crate::protocol::codes::{self, request_error};
use crate::protocol::ids::home_shard;
use crate::protocol::ids::{ConnKey, ShardId, owner_shard};
use crate::protocol::limits::{MAX_ID_BYTES, check_id};
use crate::protocol::proto::{self, ErrorCode, FrameKind, PushStatus};
use crate::protocol::time::{Millis, Now};

/// Reads handled in one poll of a backend connection before yielding.
const READS_PER_POLL: usize = 8;

/// Push-port limits a shard enforces.
#[derive(Clone, Copy, Debug)]
pub struct PushLimits {
    pub max_inflight_per_backend: u32,
    pub max_targets_per_request: u32,
    pub max_request_bytes: u32,
    /// Every request is answered within this, in ms.
    pub reply_timeout_ms: u64,
    /// This shard's share of the node's broadcast rate, deliveries/s.
    pub broadcast_rate_per_sec: u32,
    /// Bytes of broadcasts each shard may hold (`shard::broadcast_cost`).
    pub broadcast_queue_bytes: u64,
}

/// The push port of one shard: its backend connections, the requests they
/// have in flight (merged here as their parts come in) and when each must
/// be answered. It lives in the shard's state; its entry points (in
/// `port.rs`) take a [`PortHost`], the small context the shard gives it.
#[derive(Default)]
pub(crate) struct PushPort {
    backends: Slab<Backend>,
    /// Requests from this shard's backends waiting for parts of their answer.
    pending: HashMap<u64, Pending>,
    /// When each of those must be answered at the latest.
    deadlines: Deadlines,
}

impl PushPort {
    fn backend(&mut self, key: ConnKey) -> Option<&mut Backend> {
        self.backends.get_mut(key.index as usize).filter(|b| b.generation == key.generation)
    }

    /// Queues the reply to a finished request on its backend connection.
    pub(crate) fn reply(&mut self, backend: ConnKey, frame: Bytes) {
        let Some(b) = self.backend(backend) else {
            return; // the backend went away; its answer has nowhere to go
        };
        b.out.push(frame);
        b.inflight = b.inflight.saturating_sub(1);
        if let Some(w) = &b.waker {
            w.wake_by_ref();
        }
    }

    /// Counts a request answered later through [`PushPort::reply`] by other
    /// code (the cluster) as in flight on its backend connection.
    pub(crate) fn hold(&mut self, backend: ConnKey) {
        if let Some(b) = self.backend(backend) {
            b.inflight += 1;
        }
    }

    /// Answers that cannot wait for other shards (bad requests).
    fn reply_now(&mut self, backend: ConnKey, frame: Frame) {
        if let Some(b) = self.backend(backend) {
            b.out.push(frame.to_bytes());
        }
    }

    /// Backend (and node-listener) connections held.
    pub(crate) fn connections(&self) -> usize {
        self.backends.len()
    }

    /// Requests of this shard's backends not answered yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Closes every backend connection once its queue is flushed.
    pub(crate) fn close_all(&mut self) {
        for (_, b) in self.backends.iter_mut() {
            b.close();
        }
    }

    /// Queues `frame` (the reason) on every backend connection, then closes
    /// it (the in-place upgrade sends backends to the new process this way).
    pub(crate) fn close_all_with(&mut self, frame: Bytes) {
        for (_, b) in self.backends.iter_mut() {
            b.close_with(frame.clone());
        }
    }
}

/// What the push port counts, for the host's counters.
#[derive(Clone, Copy, Debug)]
pub(crate) enum PortEvent {
    /// A request read from a backend.
    Request,
    /// A connection refused before or at authentication.
    Refused,
    /// A request the key has no right to (PERMISSION_DENIED).
    Denied,
    /// A connection silent past its auth deadline.
    AuthTimeout,
    /// A request answered at its deadline with answers missing.
    Timeout,
    /// An answer that came after its request was answered.
    LateAnswer,
    /// A request refused with this error code.
    RequestError(i32),
    /// A request answered this long after it was read.
    Answered(Duration),
}

/// What the push port needs of the shard that holds it.
pub(crate) trait PortHost {
    /// The component itself (it lives in the shard's state).
    fn port(&mut self) -> &mut PushPort;
    fn shard_id(&self) -> ShardId;
    fn shards(&self) -> u16;
    fn now(&self) -> Now;
    /// The live (reloadable) limits and credentials.
    fn limits(&self) -> PushLimits;
    fn port_auth(&self) -> Arc<auth::PortAuth>;
    /// The client frame limit (a message must fit in it).
    fn max_frame_bytes(&self) -> u32;
    fn count(&self, event: PortEvent);
    /// A token unique on this shard (request tokens, backend generations).
    fn next_token(&mut self) -> u64;
    fn next_message_id(&mut self) -> u64;
    /// Sends `msg` to shard `to`, or handles it at once when it is this one.
    fn route(&mut self, to: ShardId, msg: ShardMsg);
    /// Room for a broadcast of `frame_len` bytes on every shard, or none.
    fn reserve_broadcast(&self, frame_len: usize) -> Result<(), String>;
    /// Whether every shard shares one timeline store (Redis).
    fn store_is_shared(&mut self) -> bool;
    /// Whether the mesh is too backed up to read more requests; if so,
    /// `waker` is woken once it drained.
    fn mesh_congested(&self, waker: &Waker) -> bool;
    /// Requests are refused (retryable) during an in-place upgrade.
    fn upgrading(&self) -> bool;
    /// In cluster mode the cluster answers backends' requests: returns the
    /// frame when this shard should handle it alone.
    fn cluster_takes(&mut self, backend: ConnKey, frame: Frame) -> Option<Frame>;
    /// The reply of a finished request: the local part of a cluster request
    /// goes back to its merge; returns the frame when it is for a backend.
    fn local_part(&mut self, backend: ConnKey, frame: Frame) -> Option<Frame>;
}

/// The shard as the backend connection tasks see it: entered (its state
/// borrowed) for each step, never across an await.
pub(crate) trait PortShard: 'static {
    type Host<'a>: PortHost
    where
        Self: 'a;
    fn enter<R>(&self, f: impl FnOnce(&mut Self::Host<'_>) -> R) -> R;
    /// The next accepted connection, or `None` once the shard stops.
    fn accept_or_stop(&self, listener: &TcpListener) -> impl Future<Output = Option<glommio::Result<TcpStream, ()>>>;
}

/// One backend connection's state on its shard.
pub(crate) struct Backend {
    generation: u32,
    out: OutQueue,
    /// Requests read and not yet answered.
    inflight: u32,
    waker: Option<Waker>,
    /// Flush what is queued, then close.
    closing: bool,
    /// The listener it came in on (which keys it may use).
    listener: auth::Listener,
    /// Before its PushAuth: the nonce it must answer; after: its rights.
    auth: BackendAuth,
    /// The auth deadline, then the idle deadline (moved by each request).
    deadline: Millis,
}

/// Where a backend connection is in its authentication.
pub(crate) enum BackendAuth {
    Challenged { nonce: Bytes },
    Granted { rights: auth::Rights, service_ids: Rc<[String]> },
}

impl Backend {
    /// Queues `frame` (the reason), then closes.
    fn close_with(&mut self, frame: Bytes) {
        self.out.push(frame);
        self.close();
    }

    fn close(&mut self) {
        self.closing = true;
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::deadlines::DEADLINES_SWEEP_AT;
    use super::*;

    fn pending(kind: PendingKind) -> Pending {
        let (backend, started) = (ConnKey { index: 0, generation: 0 }, Millis(0));
        Pending { backend, request_id: 9, lookups: 1, expected: 0, done: 0, kind, started }
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
