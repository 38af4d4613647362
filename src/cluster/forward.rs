//! Requests from backends answered by the cluster: device targets
//! forwarded to the node holding them, the rest to every live node, the
//! parts merged ([`super::merge`]) by the reply deadline.

use super::*;

// ---- requests from backends ------------------------------------------

/// Hook: a push-port request. In cluster mode a backend's push, group
/// update, kick or presence query is answered by the cluster; returns
/// the frame when this shard should handle it alone.
pub(crate) fn intercept<S: ClusterShard>(
    shard: &S,
    h: &mut S::Host<'_>,
    backend: ConnKey,
    frame: Frame,
) -> Option<Frame> {
    let Some(local) = local(shard) else { return Some(frame) };
    let forwarded = match &frame {
        Frame::PushRequest(r) => r.forwarded,
        Frame::GroupUpdate(r) => r.forwarded,
        Frame::KickRequest(r) => r.forwarded,
        Frame::PresenceQuery(r) => r.forwarded,
        _ => return Some(frame),
    };
    if forwarded {
        local.shared.counters.forwarded_in.fetch_add(1, Ordering::Relaxed);
        return match frame {
            Frame::KickRequest(kick) if !kick.conn_ids.is_empty() => {
                queue_request(h, &local, backend, Queued::Kick(kick));
                None
            }
            other => Some(other),
        };
    }
    queue_request(h, &local, backend, Queued::Request(frame));
    None
}

/// Holds `backend`'s request and arms its deadline; the task that
/// answers it starts once the caller's state borrow has ended
/// ([`start_queued`]).
fn queue_request<S: ClusterShard>(h: &mut S::Host<'_>, local: &Rc<Local<S>>, backend: ConnKey, what: Queued) {
    h.port().hold(backend);
    // The reply goes out by the push-port deadline, whatever is missing.
    let alarm = Rc::new(Alarm::default());
    crate::push::arm_deadline(h, Expiry::Alarm(alarm.clone()));
    local.queued.borrow_mut().push((backend, what, alarm));
}

/// Starts the tasks of the requests [`intercept`] took,
/// outside any state borrow (glommio polls a new task at once, so one
/// spawned inside the borrow would have to wait a turn first).
pub(crate) fn start_queued<S: ClusterShard>(shard: &S) {
    let Some(local) = local(shard) else { return };
    if local.queued.borrow().is_empty() {
        return;
    }
    let Some(shard) = shard.me() else { return };
    let mut queued = std::mem::take(&mut *local.queued.borrow_mut());
    for (backend, what, alarm) in queued.drain(..) {
        let (shard, local) = (shard.clone(), local.clone());
        match what {
            Queued::Kick(kick) => glommio::spawn_local(async move {
                let request_id = kick.request_id;
                let reply = match alarm.before(kick_if_same_session(&shard, &local, kick)).await {
                    Some(reply) => reply,
                    None => Frame::AdminReply(proto::AdminReply { request_id, results: Vec::new() }),
                };
                shard.enter(|h| h.port().reply(backend, reply.to_bytes()));
            }),
            Queued::Request(frame) => glommio::spawn_local(async move {
                let started = Instant::now();
                let reply = cluster_request(&shard, &local, frame, &alarm).await;
                let counters = &local.shared.counters;
                counters.request_latency.record(started.elapsed());
                counters.requests.fetch_add(1, Ordering::Relaxed);
                counters.count_reply(&reply);
                shard.enter(|h| {
                    if alarm.rang() {
                        h.count(PortEvent::Timeout);
                    }
                    h.port().reply(backend, reply.to_bytes());
                });
            }),
        }
        .detach();
    }
    // The emptied queue goes back, its room kept for the next requests.
    let mut slot = local.queued.borrow_mut();
    if slot.is_empty() {
        *slot = queued;
    }
}

/// Hook: the reply of a finished request; the local part of a cluster
/// request goes back to its merge instead of a backend.
pub(crate) fn local_reply<S: ClusterShard>(shard: &S, backend: ConnKey, frame: Frame) -> Option<Frame> {
    if backend.index != LOCAL_PART {
        return Some(frame);
    }
    let local = local(shard)?;
    let waiting = local.merges.borrow_mut().remove(&backend.generation);
    if let Some(tx) = waiting {
        let _ = tx.send(frame);
    }
    None
}

/// A replaced login's kick: only the sessions that still have the
/// connection ids the kicker's route named (a newer login of the device
/// here stays).
pub(super) async fn kick_if_same_session<S: ClusterShard>(
    shard: &Rc<S>,
    local: &Rc<Local<S>>,
    mut kick: proto::KickRequest,
) -> Frame {
    let request_id = kick.request_id;
    let query = proto::PresenceQuery { devices: kick.devices.clone(), forwarded: true, ..Default::default() };
    let Frame::PresenceReply(presence) = run_locally(shard, local, Frame::PresenceQuery(query)).await else {
        return Frame::RequestError(request_error(0, ErrorCode::ServerError, "presence lookup failed"));
    };
    let same: Vec<String> = presence
        .devices
        .into_iter()
        .zip(&kick.conn_ids)
        .filter(|(d, conn_id)| d.online && d.conn_id == **conn_id)
        .map(|(d, _)| d.device)
        .collect();
    if same.is_empty() {
        return Frame::AdminReply(proto::AdminReply { request_id, results: Vec::new() });
    }
    kick.devices = same;
    kick.conn_ids.clear();
    with_request_id(run_locally(shard, local, Frame::KickRequest(kick)).await, request_id)
}

pub(super) async fn cluster_request<S: ClusterShard>(
    shard: &Rc<S>,
    local: &Rc<Local<S>>,
    frame: Frame,
    alarm: &Alarm,
) -> Frame {
    let request_id = request_id(&frame);
    let reply = match frame {
        Frame::PushRequest(req) if is_device_push(&req) => push_devices(shard, local, req, alarm).await,
        Frame::KickRequest(req) if req.revoke => revoke_everywhere(shard, local, req, alarm).await,
        other => everywhere(shard, local, other, alarm).await,
    };
    with_request_id(reply, request_id)
}

/// A revocation: stored in Redis first (nodes started later, and any
/// the kick below does not reach, read it from there), then recorded
/// and its sessions kicked on every live node. Not stored (Redis
/// unreachable): still applied on the live nodes, but every target is
/// answered REJECTED, retryable, so the backend sends it again (a
/// revocation sent twice covers the same tokens and more).
pub(super) async fn revoke_everywhere<S: ClusterShard>(
    shard: &Rc<S>,
    local: &Rc<Local<S>>,
    req: proto::KickRequest,
    alarm: &Alarm,
) -> Frame {
    if req.devices.len() + req.users.len() > shard.limits().max_targets_per_request as usize {
        // Refused as a whole, as by a single node; nothing stored.
        return run_locally(shard, local, Frame::KickRequest(req)).await;
    }
    let keep_secs = shard.enter(|h| h.revocation_keep_secs());
    let not_before = crate::protocol::token::now_unix_secs();
    let store = local.shared.router.revoke(req.devices.clone(), req.users.clone(), not_before, keep_secs);
    let failure = match alarm.before(store).await {
        Some(Ok(())) => None,
        Some(Err(err)) => Some(err.to_string()),
        None => Some("the router did not answer in time".to_owned()),
    };
    let counters = &local.shared.counters;
    if let Some(err) = &failure {
        counters.revocation_store_failures.fetch_add(1, Ordering::Relaxed);
        warn!(%err, "revocation not stored in Redis; applied on the live nodes only");
    } else {
        counters.revocations_stored.fetch_add(1, Ordering::Relaxed);
    }
    let mut reply = everywhere(shard, local, Frame::KickRequest(req), alarm).await;
    if let (Some(err), Frame::AdminReply(r)) = (failure, &mut reply) {
        for result in &mut r.results {
            result.status = PushStatus::Rejected as i32;
            result.reason = format!("revocation not stored in Redis ({err}); send it again");
            result.retryable = true;
        }
    }
    reply
}

/// Why targets are REJECTED when the deadline passed first.
pub(super) fn late_reason<S: ClusterShard>(shard: &S, who: &str) -> String {
    format!("{who} did not answer within {} ms", shard.limits().reply_timeout_ms)
}

/// Runs `frame` through this node's own request handling and returns
/// its reply.
pub(super) async fn run_locally<S: ClusterShard>(shard: &Rc<S>, local: &Rc<Local<S>>, frame: Frame) -> Frame {
    let token = local.next_merge.get().wrapping_add(1);
    local.next_merge.set(token);
    let (tx, rx) = oneshot::channel();
    local.merges.borrow_mut().insert(token, tx);
    let pseudo = ConnKey { index: LOCAL_PART, generation: token };
    let accepted = shard.enter(|h| match frame {
        Frame::PushRequest(r) => crate::push::start_push(h, pseudo, r),
        Frame::GroupUpdate(r) => crate::push::start_group_update(h, pseudo, r),
        Frame::KickRequest(r) => crate::push::start_kick(h, pseudo, r),
        Frame::PresenceQuery(r) => crate::push::start_presence(h, pseudo, r),
        other => Err(request_error(0, ErrorCode::BadFrame, format!("{:?} is not clustered", other.kind()))),
    });
    if let Err(err) = accepted {
        local.merges.borrow_mut().remove(&token);
        return Frame::RequestError(err);
    }
    rx.await.unwrap_or_else(|_| Frame::RequestError(request_error(0, ErrorCode::ServerError, "request dropped")))
}

/// Sends `frame` to node `node` (its run `incarnation` or a later one;
/// 0: any) and waits for its reply.
pub(super) async fn forward<S: ClusterShard>(
    shard: &S,
    local: &Rc<Local<S>>,
    node: &str,
    incarnation: u64,
    frame: Frame,
) -> Result<Frame, ForwardError> {
    let counters = &local.shared.counters;
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = match peer(shard, local, node, incarnation).await {
        Some(link) => link.call(frame, local.shared.forward_timeout).await,
        None => Err(ForwardError::NotLive),
    };
    counters.forward_latency.record(started.elapsed());
    if result.is_err() {
        counters.forward_failures.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// The link to `node`, run `incarnation` or later (a node restarted
/// under its name may listen elsewhere: the old link and the old
/// endpoint are not used for the new run).
pub(super) async fn peer<S: ClusterShard>(
    shard: &S,
    local: &Rc<Local<S>>,
    node: &str,
    incarnation: u64,
) -> Option<Rc<PeerLink>> {
    let existing = local.peers.borrow().get(node).cloned();
    if let Some(link) = existing.filter(|l| l.is_usable() && l.incarnation >= incarnation) {
        return Some(link);
    }
    let known = |local: &Local<S>| {
        local
            .nodes
            .borrow()
            .iter()
            .find(|n| n.name == node && n.incarnation >= incarnation)
            .map(|n| (n.node_endpoint.clone(), n.incarnation))
    };
    let (endpoint, incarnation) = match known(local) {
        Some(known) => known,
        None => {
            // It may have joined (or restarted) since the last refresh.
            refresh_nodes(shard, local).await;
            known(local)?
        }
    };
    let link = Rc::new(PeerLink::new(node.to_owned(), incarnation, shard.late_answers()));
    local.peers.borrow_mut().insert(node.to_owned(), link.clone());
    let (key, tls) = (local.shared.node_key.clone(), local.shared.node_tls.clone());
    glommio::spawn_local(link.clone().run(endpoint, key, tls)).detach();
    Some(link)
}

/// Device targets: each goes where its route says.
pub(super) async fn push_devices<S: ClusterShard>(
    shard: &Rc<S>,
    local: &Rc<Local<S>>,
    req: proto::PushRequest,
    alarm: &Alarm,
) -> Frame {
    let devices = req.targets.as_ref().map(|t| t.devices.clone()).unwrap_or_default();
    if devices.len() > shard.limits().max_targets_per_request as usize {
        // Refused as a whole, as by a single node.
        return run_locally(shard, local, Frame::PushRequest(req)).await;
    }
    let mut results: Vec<proto::TargetResult> =
        devices.iter().map(|d| proto::TargetResult { target: d.clone(), ..Default::default() }).collect();
    let all: Vec<usize> = (0..devices.len()).collect();
    let reliable = req.qos == proto::Qos::AtLeastOnce as i32;
    let started = Instant::now();
    let counters = &local.shared.counters;
    counters.lookups.fetch_add(1, Ordering::Relaxed);
    let Some(routes) = alarm.before(local.shared.router.lookup(devices.clone())).await else {
        reject(&mut results, &all, &late_reason(&**shard, "the router"), true);
        return Frame::PushReply(summarize(results, false, 0));
    };
    counters.router_latency.record(started.elapsed());
    let mut here = Vec::new();
    // Per node: the latest run its routes name, and the targets.
    let mut remote: HashMap<String, (u64, Vec<usize>)> = HashMap::new();
    let router_error = match routes {
        Ok(routes) => {
            for (i, route) in routes.into_iter().enumerate() {
                match route {
                    Some(r) if r.node != local.shared.node => {
                        let entry = remote.entry(r.node).or_default();
                        entry.0 = entry.0.max(r.incarnation);
                        entry.1.push(i);
                    }
                    _ => here.push(i),
                }
            }
            None
        }
        Err(err) => {
            counters.lookup_failures.fetch_add(1, Ordering::Relaxed);
            here.extend(0..devices.len());
            Some(err)
        }
    };
    let subset = |idx: &[usize], forwarded: bool| {
        let mut r = req.clone();
        r.targets =
            Some(proto::Targets { devices: idx.iter().map(|&i| devices[i].clone()).collect(), ..Default::default() });
        r.forwarded = forwarded;
        Frame::PushRequest(r)
    };
    let mut parts: Vec<(Vec<usize>, String, PartTask)> = Vec::new();
    if !here.is_empty() {
        let (who, frame) = (format!("node {}", shard.node()), subset(&here, false));
        let (shard, local) = (shard.clone(), local.clone());
        parts.push((here, who, spawn(async move { Ok(run_locally(&shard, &local, frame).await) })));
    }
    for (node, (incarnation, idx)) in remote {
        let (shard, l, frame) = (shard.clone(), local.clone(), subset(&idx, true));
        let fallback = reliable.then(|| subset(&idx, false));
        parts.push((
            idx,
            format!("node {node}"),
            spawn(async move {
                let err = match forward(&*shard, &l, &node, incarnation, frame).await {
                    Ok(reply) => return Ok(reply),
                    Err(err) => err,
                };
                match fallback {
                    // Its node is alive but did not answer in time: it
                    // may have stored the copy and sent it to the device.
                    // A copy stored here would reach the device only when
                    // it reconnects (its node is never told), while the
                    // backend takes it as stored: it retries instead.
                    Some(_) if matches!(err, ForwardError::Timeout(_)) => {
                        Err(format!("node {node} did not answer: {err}"))
                    }
                    // Its node is gone: the copy waits in the shared
                    // timeline for the device to resume anywhere.
                    Some(frame) => {
                        debug!(%node, %err, "forward failed; storing in the timeline here");
                        Ok(run_locally(&shard, &l, frame).await)
                    }
                    None => Err(format!("node {node} unreachable: {err}")),
                }
            }),
        ));
    }
    let mut message_id = 0;
    for (idx, who, handle) in parts {
        // The part keeps running when the deadline passes; its late
        // answer is dropped (and counted where it arrives).
        let Some(answer) = alarm.before(handle).await else {
            reject(&mut results, &idx, &late_reason(&**shard, &who), true);
            continue;
        };
        match answer {
            Some(Ok(Frame::PushReply(r))) => {
                if message_id == 0 {
                    message_id = r.message_id;
                }
                for (i, res) in idx.iter().zip(r.results) {
                    results[*i] = res;
                }
            }
            Some(Ok(Frame::RequestError(e))) => return Frame::RequestError(e),
            Some(Ok(other)) => {
                let reason = format!("unexpected {:?} from a node", other.kind());
                reject(&mut results, &idx, &reason, false);
            }
            // The node could not be asked, or did not answer: the push
            // may succeed when sent again.
            Some(Err(reason)) => reject(&mut results, &idx, &reason, true),
            None => reject(&mut results, &idx, "request task lost", true),
        }
    }
    if let Some(err) = router_error {
        // Not here, and nobody can say where: the backend should retry.
        for r in results.iter_mut().filter(|r| r.status == PushStatus::NotOnline as i32) {
            r.status = PushStatus::Rejected as i32;
            r.reason = err.to_string();
            r.retryable = true;
        }
    }
    if let [only] = &results[..]
        && only.message_id != 0
    {
        message_id = only.message_id;
    }
    Frame::PushReply(summarize(results, false, message_id))
}

/// User, group and broadcast pushes, group updates, kicks and presence
/// queries: every live node handles its own sessions; the replies are
/// merged.
pub(super) async fn everywhere<S: ClusterShard>(
    shard: &Rc<S>,
    local: &Rc<Local<S>>,
    frame: Frame,
    alarm: &Alarm,
) -> Frame {
    // A node that joined a moment ago may hold targets already.
    if let Some(Ok(nodes)) = alarm.before(local.shared.router.nodes_fresh(FRESH_NODES)).await {
        *local.nodes.borrow_mut() = nodes;
    }
    let others: Vec<String> =
        local.nodes.borrow().iter().filter(|n| n.name != local.shared.node).map(|n| n.name.clone()).collect();
    let mut handles = Vec::with_capacity(others.len() + 1);
    {
        let (name, shard, l, f) = (shard.node().to_owned(), shard.clone(), local.clone(), frame.clone());
        handles.push((name, spawn(async move { Ok(run_locally(&shard, &l, f).await) })));
    }
    for node in others {
        let (shard, l) = (shard.clone(), local.clone());
        let mut f = frame.clone();
        set_forwarded(&mut f);
        let name = node.clone();
        handles.push((name, spawn(async move { forward(&*shard, &l, &node, 0, f).await })));
    }
    let mut merged: Option<Frame> = None;
    // Nodes that may hold targets but did not answer in time.
    let mut silent = Vec::new();
    for (node, handle) in handles {
        let Some(answer) = alarm.before(handle).await else {
            silent.push(node);
            continue;
        };
        match answer {
            Some(Ok(reply)) => {
                merged = Some(match merged {
                    None => reply,
                    Some(acc) => match merge(acc, reply) {
                        Ok(m) => m,
                        Err(e) => return Frame::RequestError(e),
                    },
                })
            }
            // Alive but slow: it may hold targets.
            Some(Err(ForwardError::Timeout(_))) => silent.push(node),
            // That node's sessions are gone with it.
            Some(Err(err)) => warn!(%node, %err, "a node did not answer a cluster-wide request"),
            None => {}
        }
    }
    if silent.is_empty() {
        return merged
            .unwrap_or_else(|| Frame::RequestError(request_error(0, ErrorCode::ServerError, "no node answered")));
    }
    let reason = late_reason(&**shard, &format!("node {}", silent.join(", node ")));
    incomplete(merged.unwrap_or_else(|| blank_reply(&frame)), &reason)
}

/// A part of a cluster request running as its own task: its reply, or why
/// its node could not be asked.
pub(super) type PartTask = glommio::task::JoinHandle<Result<Frame, String>>;

pub(super) fn spawn<T: 'static>(fut: impl std::future::Future<Output = T> + 'static) -> glommio::task::JoinHandle<T> {
    glommio::spawn_local(fut).detach()
}

pub(super) fn is_device_push(req: &proto::PushRequest) -> bool {
    req.targets
        .as_ref()
        .is_some_and(|t| !t.devices.is_empty() && t.users.is_empty() && t.group.is_empty() && !t.broadcast)
}

pub(super) fn reject(results: &mut [proto::TargetResult], idx: &[usize], reason: &str, retryable: bool) {
    for &i in idx {
        if let Some(r) = results.get_mut(i) {
            r.status = PushStatus::Rejected as i32;
            r.reason = reason.to_owned();
            r.retryable = retryable;
        }
    }
}

/// A cluster-wide reply some nodes did not contribute to in time: targets
/// found nowhere may be on those nodes (REJECTED, retryable); a group or
/// broadcast push is REJECTED, retryable, with the sessions counted so far.
pub(super) fn incomplete(mut reply: Frame, reason: &str) -> Frame {
    let mark = |results: &mut Vec<proto::TargetResult>| {
        for r in results.iter_mut().filter(|r| r.status == PushStatus::NotOnline as i32) {
            r.status = PushStatus::Rejected as i32;
            r.reason = reason.to_owned();
            r.retryable = true;
        }
    };
    match &mut reply {
        Frame::PushReply(r) if r.results.is_empty() => {
            r.status = PushStatus::Rejected as i32;
            r.reason = format!("{reason}; delivered counts the nodes that did");
            r.retryable = true;
        }
        Frame::PushReply(r) => {
            mark(&mut r.results);
            let (users, message_id) = (true, r.message_id);
            *r = proto::PushReply {
                request_id: r.request_id,
                ..summarize(std::mem::take(&mut r.results), users, message_id)
            };
        }
        Frame::AdminReply(r) => mark(&mut r.results),
        _ => {}
    }
    reply
}

/// The reply to a cluster-wide request when no node answered in time:
/// every target not found (see [`incomplete`]).
pub(super) fn blank_reply(request: &Frame) -> Frame {
    let not_online = |ids: &[String]| -> Vec<proto::TargetResult> {
        ids.iter()
            .map(|id| proto::TargetResult {
                target: id.clone(),
                status: PushStatus::NotOnline as i32,
                ..Default::default()
            })
            .collect()
    };
    match request {
        Frame::PushRequest(r) => {
            let t = r.targets.clone().unwrap_or_default();
            let results = not_online(if t.devices.is_empty() { &t.users } else { &t.devices });
            let status = if t.broadcast { PushStatus::Accepted } else { PushStatus::NotOnline };
            if results.is_empty() {
                Frame::PushReply(proto::PushReply { status: status as i32, ..Default::default() })
            } else {
                Frame::PushReply(summarize(results, true, 0))
            }
        }
        Frame::GroupUpdate(r) => {
            let ids: Vec<String> = r.add_devices.iter().chain(&r.remove_devices).cloned().collect();
            Frame::AdminReply(proto::AdminReply { request_id: 0, results: not_online(&ids) })
        }
        Frame::KickRequest(r) => {
            let ids: Vec<String> = r.devices.iter().chain(&r.users).cloned().collect();
            Frame::AdminReply(proto::AdminReply { request_id: 0, results: not_online(&ids) })
        }
        Frame::PresenceQuery(q) => Frame::PresenceReply(proto::PresenceReply {
            devices: q
                .devices
                .iter()
                .map(|d| proto::DevicePresence { device: d.clone(), ..Default::default() })
                .collect(),
            users: q.users.iter().map(|u| proto::UserPresence { user: u.clone(), devices: Vec::new() }).collect(),
            groups: q.groups.iter().map(|g| proto::GroupCount { group: g.clone(), online: 0 }).collect(),
            ..Default::default()
        }),
        other => Frame::RequestError(request_error(
            0,
            ErrorCode::ServerError,
            format!("{:?} is not clustered", other.kind()),
        )),
    }
}

pub(super) fn set_request_id(frame: &mut Frame, id: u64) {
    match frame {
        Frame::PushRequest(r) => r.request_id = id,
        Frame::GroupUpdate(r) => r.request_id = id,
        Frame::KickRequest(r) => r.request_id = id,
        Frame::PresenceQuery(r) => r.request_id = id,
        Frame::PresenceReply(r) => r.request_id = id,
        Frame::PushReply(r) => r.request_id = id,
        Frame::AdminReply(r) => r.request_id = id,
        Frame::RequestError(r) => r.request_id = id,
        _ => {}
    }
}

pub(super) fn with_request_id(mut frame: Frame, id: u64) -> Frame {
    set_request_id(&mut frame, id);
    frame
}

pub(super) fn set_forwarded(frame: &mut Frame) {
    match frame {
        Frame::PushRequest(r) => r.forwarded = true,
        Frame::GroupUpdate(r) => r.forwarded = true,
        Frame::KickRequest(r) => r.forwarded = true,
        Frame::PresenceQuery(r) => r.forwarded = true,
        _ => {}
    }
}
