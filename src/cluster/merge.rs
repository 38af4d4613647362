//! Merging the replies of several nodes to one cluster-wide request.

use super::*;

/// Which outcome of one target wins when nodes answer differently.
pub(super) fn status_rank(status: i32) -> u8 {
    match PushStatus::try_from(status) {
        Ok(PushStatus::Rejected) => 4,
        Ok(PushStatus::Stored) => 3,
        Ok(PushStatus::Delivered) => 2,
        Ok(PushStatus::NotOnline) => 1,
        _ => 0,
    }
}

/// Folds another node's result for the same target into `acc`.
pub(super) fn combine(acc: &mut proto::TargetResult, r: proto::TargetResult) {
    if status_rank(r.status) > status_rank(acc.status) {
        acc.status = r.status;
        acc.reason = r.reason;
        acc.retryable = r.retryable;
    }
    acc.sessions += r.sessions;
    acc.copies.extend(r.copies);
    if r.seq != 0 {
        acc.seq = r.seq;
        acc.message_id = r.message_id;
    }
}

/// Merges two nodes' replies to the same cluster-wide request.
pub(super) fn merge(acc: Frame, other: Frame) -> Result<Frame, proto::RequestError> {
    match (acc, other) {
        (Frame::RequestError(e), _) | (_, Frame::RequestError(e)) => Err(e),
        (Frame::PushReply(mut a), Frame::PushReply(b)) => {
            if a.results.is_empty() {
                // Group or broadcast: counts.
                a.delivered += b.delivered;
                let rejected = PushStatus::Rejected as i32;
                if b.status == rejected {
                    // One node refused (a full broadcast queue, its deadline):
                    // the reply says so even if others took it, with every
                    // node's reason.
                    a.reason = match (a.status == rejected, a.reason.is_empty()) {
                        (true, false) => format!("{}; {}", a.reason, b.reason),
                        _ => b.reason,
                    };
                    a.retryable = b.retryable || (a.status == rejected && a.retryable);
                    a.status = rejected;
                } else if a.status == PushStatus::NotOnline as i32 && b.delivered > 0 {
                    a.status = PushStatus::Delivered as i32;
                }
                return Ok(Frame::PushReply(a));
            }
            for (acc, r) in a.results.iter_mut().zip(b.results) {
                combine(acc, r);
            }
            Ok(Frame::PushReply(summarize(a.results, true, a.message_id)))
        }
        (Frame::PresenceReply(mut a), Frame::PresenceReply(b)) => {
            // Devices and users are listed once per query entry, in order.
            for (acc, d) in a.devices.iter_mut().zip(b.devices) {
                if d.online && !acc.online {
                    *acc = d;
                }
            }
            for (acc, u) in a.users.iter_mut().zip(b.users) {
                acc.devices.extend(u.devices);
            }
            for (acc, g) in a.groups.iter_mut().zip(b.groups) {
                acc.online += g.online;
            }
            // Shard i of every node adds up; the total is the cluster's.
            if a.connections_per_shard.len() < b.connections_per_shard.len() {
                a.connections_per_shard.resize(b.connections_per_shard.len(), 0);
            }
            for (acc, n) in a.connections_per_shard.iter_mut().zip(b.connections_per_shard) {
                *acc += n;
            }
            a.connections_total += b.connections_total;
            Ok(Frame::PresenceReply(a))
        }
        (Frame::AdminReply(mut a), Frame::AdminReply(b)) => {
            for (acc, r) in a.results.iter_mut().zip(b.results) {
                combine(acc, r);
            }
            Ok(Frame::AdminReply(a))
        }
        (a, b) => {
            warn!(left = ?a.kind(), right = ?b.kind(), "replies of different kinds; keeping the first");
            Ok(a)
        }
    }
}
