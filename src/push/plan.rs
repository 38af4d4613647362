//! Checks of push requests before anything is sent, and the per-target
//! results they start from (pure: no shard, no I/O).

use super::*;

/// A target string is usable as an id.
pub(super) fn valid_id(id: &str) -> Result<(), crate::protocol::limits::IdError> {
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
