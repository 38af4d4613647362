//! The reply to one push request, merged from its parts (shards, and in
//! cluster mode nodes) as they answer.

use super::*;

/// Added to a user target's count of awaited answers while its home shard
/// has not said how many shards hold its sessions (more than any count of
/// shards, so a part that arrives first cannot make it look complete).
pub(super) const AWAIT_LOOKUP: i32 = 1 << 16;

/// A request waiting on its origin shard for the parts of its answer.
pub(crate) struct Pending {
    pub(super) backend: ConnKey,
    pub(super) request_id: u64,
    /// Answers still to come from home shards (user lookups), plus one while
    /// the origin is still sending parts.
    pub(super) lookups: u32,
    pub(super) expected: u64,
    pub(super) done: u64,
    pub(super) kind: PendingKind,
    /// When the request was read (for the push latency).
    pub(crate) started: Millis,
}

pub(super) enum PendingKind {
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
    pub(super) fn targets(results: Vec<proto::TargetResult>, admin: bool, users: bool, message_id: u64) -> PendingKind {
        let awaiting = vec![0; results.len()];
        PendingKind::Targets { results, awaiting, admin, users, message_id }
    }

    /// Counts the answers `msg` (about to be sent) owes per target.
    pub(super) fn awaits(&mut self, msg: &ShardMsg) {
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
                // A target no shard stored or rejected was delivered to its
                // sessions, or to none.
                for r in &mut results {
                    if r.status != PushStatus::Rejected as i32 && r.status != PushStatus::Stored as i32 {
                        r.status = if r.sessions > 0 { PushStatus::Delivered } else { PushStatus::NotOnline } as i32;
                    }
                }
                if admin {
                    Frame::AdminReply(proto::AdminReply { request_id, results })
                } else {
                    // At-least-once ids are per copy; one device target has one.
                    let message_id = match &results[..] {
                        [only] if message_id == 0 && !users => only.message_id,
                        _ => message_id,
                    };
                    Frame::PushReply(proto::PushReply { request_id, ..summarize(results, users, message_id) })
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

pub(super) fn presence_reply(request_id: u64, query: &PresenceQuery, shards: u16, parts: Vec<PresencePart>) -> Frame {
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

/// A push reply from its per-target results, each with its final status:
/// the totals and the overall status (`request_id` is the caller's). The
/// one summary of a push, for a node's shards and for the cluster's nodes.
pub(crate) fn summarize(results: Vec<proto::TargetResult>, users: bool, message_id: u64) -> proto::PushReply {
    let (mut delivered, mut not_online, mut stored) = (0u64, 0u64, 0u64);
    for r in &results {
        match PushStatus::try_from(r.status) {
            Ok(PushStatus::Delivered) => delivered += u64::from(r.sessions),
            Ok(PushStatus::Stored) => {
                delivered += u64::from(r.sessions);
                stored += if users { r.copies.len() as u64 } else { 1 };
            }
            Ok(PushStatus::NotOnline) => not_online += 1,
            Ok(PushStatus::Rejected) => stored += r.copies.len() as u64,
            _ => {}
        }
    }
    let status = if stored > 0 {
        PushStatus::Stored
    } else if delivered > 0 {
        PushStatus::Delivered
    } else {
        PushStatus::NotOnline
    };
    proto::PushReply {
        request_id: 0,
        results,
        delivered,
        not_online,
        status: status as i32,
        reason: String::new(),
        message_id,
        stored,
        retryable: false,
    }
}

/// The request id a request or reply frame carries (0 for other frames).
pub(crate) fn request_id(frame: &Frame) -> u64 {
    match frame {
        Frame::DeliveryStatusQuery(r) => r.request_id,
        Frame::PushRequest(r) => r.request_id,
        Frame::GroupUpdate(r) => r.request_id,
        Frame::KickRequest(r) => r.request_id,
        Frame::PresenceQuery(r) => r.request_id,
        Frame::PresenceReply(r) => r.request_id,
        Frame::PushReply(r) => r.request_id,
        Frame::AdminReply(r) => r.request_id,
        Frame::RequestError(r) => r.request_id,
        _ => 0,
    }
}
