//! The push port on a shard: accepting backends, reading their pipelined
//! requests, splitting each over the shards, merging the answers,
//! answering. Everything here works on the [`PushPort`] through a
//! [`PortHost`]; the socket tasks enter the shard through a [`PortShard`].

use super::*;

/// Why a request is refused while the node hands over to a new process.
const UPGRADING: &str = "node upgrading; retry";

/// Accepts backend connections on the push port (or, `Listener::Node`,
/// other nodes on the node listener) until shutdown. With `tls`
/// (`push.tls_listen`, or the node listener with `cluster.tls`) each
/// connection is served over TLS with the certificate in force at accept.
pub(crate) async fn accept_loop<S: PortShard>(
    shard: Rc<S>,
    listener: TcpListener,
    role: auth::Listener,
    mut tls: Option<crate::conn::tls::ShardServerConfig>,
) {
    while let Some(accepted) = shard.accept_or_stop(&listener).await {
        match accepted {
            Ok(stream) => {
                let stream = match tls.as_mut() {
                    None => PipeStream::plain(stream),
                    Some(tls) => match PipeStream::tls_server(stream, tls.current().clone()) {
                        Ok(stream) => stream,
                        Err(err) => {
                            let id = shard.enter(|h| h.shard_id());
                            warn!(shard = %id, error = %err, "cannot start a TLS session");
                            continue;
                        }
                    },
                };
                let Some(key) = shard.enter(|h| admit_backend(h, role)) else {
                    // Too many still authenticating: the newcomer waits
                    // for nothing and costs nothing.
                    shard.enter(|h| h.count(PortEvent::Refused));
                    continue;
                };
                let id = shard.enter(|h| h.shard_id());
                debug!(shard = %id, peer = ?stream.tcp().peer_addr().ok(), ?role, "backend connected");
                glommio::spawn_local(run_backend(Rc::clone(&shard), key, stream)).detach();
            }
            Err(err) => {
                let id = shard.enter(|h| h.shard_id());
                warn!(shard = %id, error = %err, "push accept failed; pausing 100 ms");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A slot for a new backend connection, its challenge queued; `None`
/// when the shard has `max_unauthenticated` of them authenticating.
pub(super) fn admit_backend<H: PortHost>(h: &mut H, listener: auth::Listener) -> Option<ConnKey> {
    let pa = h.port_auth();
    let authenticating =
        h.port().backends.iter().filter(|(_, b)| matches!(b.auth, BackendAuth::Challenged { .. })).count();
    if authenticating >= pa.max_unauthenticated as usize {
        return None;
    }
    let challenge = match auth::new_challenge() {
        Ok(c) => c,
        Err(err) => {
            warn!(shard = %h.shard_id(), error = %err, "no randomness for a push challenge");
            return None;
        }
    };
    let mut out = OutQueue::default();
    let nonce = challenge.nonce.clone();
    out.push(Frame::PushChallenge(challenge).to_bytes());
    let generation = h.next_token() as u32;
    let deadline = h.now().mono.add_ms(pa.auth_timeout_ms);
    let index = h.port().backends.insert(Backend {
        generation,
        out,
        inflight: 0,
        waker: None,
        closing: false,
        listener,
        auth: BackendAuth::Challenged { nonce },
        deadline,
    });
    Some(ConnKey { index: index as u32, generation })
}

async fn run_backend<S: PortShard>(shard: Rc<S>, key: ConnKey, mut stream: PipeStream) {
    let mut rbuf = BytesMut::new();
    std::future::poll_fn(|cx| poll_backend(&*shard, key, &mut stream, &mut rbuf, cx)).await;
    let id = shard.enter(|h| {
        let port = h.port();
        if port.backends.get(key.index as usize).is_some_and(|b| b.generation == key.generation) {
            let mut b = port.backends.remove(key.index as usize);
            // TLS: close_notify after what is left, as far as it goes now.
            stream.close(&mut b.out);
        }
        h.shard_id()
    });
    debug!(shard = %id, "backend disconnected");
}

/// Answers the requests whose deadline passed with what they have and
/// closes backend connections past their auth or idle deadline (from the
/// shard's timer tick).
pub(crate) fn expire<H: PortHost>(h: &mut H) {
    expire_requests(h);
    expire_backends(h);
}

fn expire_backends<H: PortHost>(h: &mut H) {
    let now = h.now().mono;
    let idle_ms = h.port_auth().idle_timeout_ms;
    let mut auth_timeouts = 0;
    for (_, b) in h.port().backends.iter_mut() {
        if b.closing || b.deadline > now {
            continue;
        }
        let code = match b.auth {
            BackendAuth::Challenged { .. } => {
                auth_timeouts += 1;
                ErrorCode::AuthTimeout
            }
            // Busy is not idle: the wait starts again.
            BackendAuth::Granted { .. } if b.inflight > 0 => {
                b.deadline = now.add_ms(idle_ms);
                continue;
            }
            BackendAuth::Granted { .. } => ErrorCode::IdleTimeout,
        };
        b.out.push(Frame::Error(codes::error_body(code, "")).to_bytes());
        b.close();
    }
    for _ in 0..auth_timeouts {
        h.count(PortEvent::AuthTimeout);
    }
}

/// The connection's first frame: a PushAuth that answers its challenge
/// grants the key's rights (true); anything else closes it
/// (UNAUTHENTICATED).
fn on_auth(
    b: &mut Backend,
    pa: &auth::PortAuth,
    now: Millis,
    shard: ShardId,
    nonce: &[u8],
    frame: Result<Frame, CodecError>,
) -> bool {
    let ring = pa.ring(b.listener);
    let granted = match (frame, ring) {
        (Ok(Frame::PushAuth(a)), Some(ring)) => ring.verify(nonce, &a).map_err(|e| e.to_string()),
        (Ok(Frame::PushAuth(_)), None) => Err("this listener takes no keys".into()),
        (Ok(other), _) => Err(auth::AuthError::NotAuth(format!("{:?}", other.kind())).to_string()),
        (Err(err), _) => Err(err.to_string()),
    };
    match granted {
        Ok(grant) => {
            let ok = proto::PushAuthOk { rights: grant.rights.names(), service_ids: grant.service_ids.clone() };
            b.out.push(Frame::PushAuthOk(ok).to_bytes());
            b.auth = BackendAuth::Granted { rights: grant.rights, service_ids: grant.service_ids.clone().into() };
            b.deadline = now.add_ms(pa.idle_timeout_ms);
            debug!(shard = %shard, key = %grant.key.id(), "backend authenticated");
            true
        }
        Err(reason) => {
            let error = Frame::Error(codes::error_body(ErrorCode::Unauthenticated, reason));
            b.out.push(error.to_bytes());
            b.closing = true;
            false
        }
    }
}

/// What one step of [`poll_backend`] with the state borrowed decided.
enum Step {
    Done,
    Wait,
    /// Read at most this many bytes.
    Read(usize),
}

fn poll_backend<S: PortShard>(
    shard: &S,
    key: ConnKey,
    stream: &mut PipeStream,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<()> {
    for _ in 0..READS_PER_POLL {
        let want = match shard.enter(|h| backend_step(h, key, stream, rbuf, cx, 16 * 1024)) {
            Step::Done => return Poll::Ready(()),
            Step::Wait => return Poll::Pending,
            Step::Read(want) => want,
        };
        // Over TLS: one record, read whole to be decrypted.
        match stream.poll_read(cx, rbuf, want) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(false)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(true)) => {}
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Flushes the connection's replies and handles every whole request read,
/// up to the in-flight bound; says how much to read next.
fn backend_step<H: PortHost>(
    h: &mut H,
    key: ConnKey,
    stream: &mut PipeStream,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
    chunk: usize,
) -> Step {
    let max_inflight = h.limits().max_inflight_per_backend;
    let Some(b) = h.port().backend(key) else {
        return Step::Done;
    };
    if stream.flush(&mut b.out, cx).is_err() || (b.closing && stream.flushed(&b.out)) {
        return Step::Done;
    }
    if !b.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        b.waker = Some(cx.waker().clone());
    }
    if b.closing {
        return Step::Wait;
    }
    // Handle every whole request already read, up to the bound.
    loop {
        let Some(b) = h.port().backends.get_mut(key.index as usize) else { return Step::Done };
        if b.inflight >= max_inflight {
            // Backpressure: a reply wakes us.
            return Step::Wait;
        }
        if h.mesh_congested(cx.waker()) {
            // Backpressure from slow shards: the outbox wakes us once its
            // FIFOs have drained.
            return Step::Wait;
        }
        let max_request_bytes = h.limits().max_request_bytes;
        let Some(b) = h.port().backends.get_mut(key.index as usize) else { return Step::Done };
        let max_body = match b.auth {
            BackendAuth::Challenged { .. } => auth::MAX_AUTH_BODY,
            BackendAuth::Granted { .. } => max_request_bytes,
        };
        match codec::split_frame(rbuf, max_body) {
            Ok(None) => break,
            Ok(Some((header, body))) => {
                let len = header.frame_len();
                let frame = Frame::decode_from(Peer::Backend, header, body);
                rbuf.advance(len);
                match &b.auth {
                    BackendAuth::Challenged { nonce } => {
                        let nonce = nonce.clone();
                        let (pa, now, id) = (h.port_auth(), h.now().mono, h.shard_id());
                        let Some(b) = h.port().backends.get_mut(key.index as usize) else { return Step::Done };
                        if !on_auth(b, &pa, now, id, &nonce, frame) {
                            h.count(PortEvent::Refused);
                            rbuf.clear();
                            break;
                        }
                    }
                    BackendAuth::Granted { rights, service_ids } => {
                        let (rights, service_ids) = (*rights, service_ids.clone());
                        let idle_ms = h.port_auth().idle_timeout_ms;
                        let deadline = h.now().mono.add_ms(idle_ms);
                        if let Some(b) = h.port().backends.get_mut(key.index as usize) {
                            b.deadline = deadline;
                        }
                        on_granted_request(h, key, rights, &service_ids, frame);
                    }
                }
            }
            Err(err) => {
                // The frame boundary is lost: say why and close. Before
                // auth, every refusal is UNAUTHENTICATED.
                let code = match b.auth {
                    BackendAuth::Challenged { .. } => ErrorCode::Unauthenticated,
                    BackendAuth::Granted { .. } => err.code(),
                };
                let error = Frame::Error(codes::error_body(code, err.to_string()));
                b.out.push(error.to_bytes());
                b.closing = true;
                rbuf.clear();
                break;
            }
        }
    }
    match h.port().backends.get(key.index as usize) {
        // Over TLS, what rustls answered (alerts, KeyUpdates) counts as
        // queued: nothing more is read until it is written.
        Some(b) if b.closing || !stream.flushed(&b.out) => {
            // Flush replies (or the error) before reading more.
            cx.waker().wake_by_ref();
            Step::Wait
        }
        // Before auth, read no more than the largest PushAuth frame.
        Some(Backend { auth: BackendAuth::Challenged { .. }, .. }) => {
            Step::Read((codec::HEADER_LEN + auth::MAX_AUTH_BODY as usize).saturating_sub(rbuf.len()).max(1))
        }
        _ => Step::Read(chunk),
    }
}

/// A request on an authenticated connection: carried out only when the
/// key's rights allow it, else answered PERMISSION_DENIED.
fn on_granted_request<H: PortHost>(
    h: &mut H,
    backend: ConnKey,
    rights: auth::Rights,
    service_ids: &[String],
    frame: Result<Frame, CodecError>,
) {
    if let Ok(f) = &frame
        && let Err(reason) = auth::authorize(rights, service_ids, f)
    {
        h.count(PortEvent::Request);
        h.count(PortEvent::Denied);
        let id = request_id(f);
        return h.port().reply_now(backend, Frame::RequestError(request_error(id, auth::DENIED, reason)));
    }
    on_request(h, backend, frame);
}

pub(super) fn on_request<H: PortHost>(h: &mut H, backend: ConnKey, frame: Result<Frame, CodecError>) {
    h.count(PortEvent::Request);
    let frame = match frame {
        Ok(frame) => frame,
        Err(err) => {
            h.count(PortEvent::RequestError(err.code() as i32));
            let error = request_error(0, err.code(), err.to_string());
            return h.port().reply_now(backend, Frame::RequestError(error));
        }
    };
    // During an in-place upgrade requests are refused, retryable.
    if h.upgrading() {
        let error = request_error(request_id(&frame), ErrorCode::Unavailable, UPGRADING);
        return h.port().reply_now(backend, Frame::RequestError(error));
    }
    // In cluster mode the cluster answers backends' requests.
    let Some(frame) = h.cluster_takes(backend, frame) else { return };
    let accepted = match frame {
        Frame::PushRequest(req) => start_push(h, backend, req),
        Frame::GroupUpdate(req) => start_group_update(h, backend, req),
        Frame::KickRequest(req) => start_kick(h, backend, req),
        Frame::PresenceQuery(req) => start_presence(h, backend, req),
        Frame::DeliveryStatusQuery(req) => start_status(h, backend, req),
        other => Err(request_error(0, ErrorCode::BadFrame, format!("{:?} is not a push-port request", other.kind()))),
    };
    if let Err(error) = accepted {
        h.count(PortEvent::RequestError(error.code));
        h.port().reply_now(backend, Frame::RequestError(error));
    }
}

/// Registers a pending request; the origin holds one "lookup" until it
/// has sent every part, so early answers cannot complete it.
fn begin<H: PortHost>(h: &mut H, backend: ConnKey, request_id: u64, kind: PendingKind) -> Origin {
    let token = h.next_token();
    let started = h.now().mono;
    let pending = Pending { backend, request_id, lookups: 1, expected: 0, done: 0, kind, started };
    h.port().pending.insert(token, pending);
    arm_deadline(h, Expiry::Request(token));
    if let Some(b) = h.port().backends.get_mut(backend.index as usize) {
        b.inflight += 1;
    }
    Origin { shard: h.shard_id(), token }
}

/// Files `what` to end one `push.reply_timeout_ms` from now.
pub(crate) fn arm_deadline<H: PortHost>(h: &mut H, what: Expiry) {
    let at = h.now().mono.add_ms(h.limits().reply_timeout_ms);
    let port = h.port();
    port.deadlines.sweep(&port.pending);
    port.deadlines.push(at, what);
}

/// Answers the requests whose deadline passed with what they have.
fn expire_requests<H: PortHost>(h: &mut H) {
    let now = h.now().mono;
    let mut due = Vec::new();
    h.port().deadlines.take_due(now, &mut due);
    if due.is_empty() {
        return;
    }
    let (shards, timeout_ms) = (h.shards(), h.limits().reply_timeout_ms);
    for what in due {
        match what {
            Expiry::Request(token) => {
                let Some(pending) = h.port().pending.remove(&token) else { continue };
                h.count(PortEvent::Timeout);
                h.count(PortEvent::Answered(pending.started.elapsed_to(now)));
                let (backend, frame) = pending.expire(shards, timeout_ms);
                send_reply(h, backend, frame);
            }
            Expiry::Alarm(alarm) => alarm.fire(),
        }
    }
}

/// The reply of a finished request goes to its backend, or for the local
/// part of a cluster request to its merge.
fn send_reply<H: PortHost>(h: &mut H, backend: ConnKey, frame: Frame) {
    if let Some(frame) = h.local_part(backend, frame) {
        h.port().reply(backend, frame.to_bytes());
    }
}

/// Merges part of an answer into a pending request; replies when whole.
pub(crate) fn merge_part<H: PortHost>(h: &mut H, token: u64, part: Part) {
    let Some(pending) = h.port().pending.get_mut(&token) else {
        // Answered at its deadline already.
        h.count(PortEvent::LateAnswer);
        return;
    };
    pending.merge(part);
    finish_if_done(h, token);
}

fn finish_if_done<H: PortHost>(h: &mut H, token: u64) {
    let port = h.port();
    if !port.pending.get(&token).is_some_and(Pending::is_done) {
        return;
    }
    let Some(pending) = port.pending.remove(&token) else { return };
    h.count(PortEvent::Answered(pending.started.elapsed_to(h.now().mono)));
    let (backend, frame) = pending.finish();
    send_reply(h, backend, frame);
}

/// Done sending parts: the request completes when its answers are in.
fn end<H: PortHost>(h: &mut H, origin: Origin) {
    if let Some(p) = h.port().pending.get_mut(&origin.token) {
        p.lookups -= 1;
    }
    finish_if_done(h, origin.token);
}

/// Sends one part that will be answered with one [`Part`].
fn send_part<H: PortHost>(h: &mut H, origin: Origin, to: ShardId, msg: ShardMsg) {
    if let Some(p) = h.port().pending.get_mut(&origin.token) {
        p.expected += 1;
        p.awaits(&msg);
    }
    h.route(to, msg);
}

/// Sends a user lookup, answered with `Part::Expect` by the home shard.
fn send_lookup<H: PortHost>(h: &mut H, origin: Origin, to: ShardId, msg: ShardMsg) {
    if let Some(p) = h.port().pending.get_mut(&origin.token) {
        p.lookups += 1;
        p.awaits(&msg);
    }
    h.route(to, msg);
}

/// Splits `(index, id)` pairs by `shard_of(id)`, skipping rejected ones.
pub(super) fn by_shard(
    shards: u16,
    results: &[proto::TargetResult],
    offset: usize,
    ids: &[String],
    shard_of: fn(&str, u16) -> ShardId,
) -> Vec<Vec<(u32, String)>> {
    let mut batches = vec![Vec::new(); usize::from(shards)];
    for (i, id) in ids.iter().enumerate() {
        let idx = offset + i;
        if results[idx].status != PushStatus::Rejected as i32 {
            batches[shard_of(id, shards).index()].push((idx as u32, id.clone()));
        }
    }
    batches
}

pub(crate) fn start_push<H: PortHost>(
    h: &mut H,
    backend: ConnKey,
    req: proto::PushRequest,
) -> Result<(), proto::RequestError> {
    let id = req.request_id;
    let targets = req.targets.unwrap_or_default();
    let reliable = check_push(id, &targets, req.qos, h.limits().max_targets_per_request as usize)?;
    let message = proto::Message {
        payload: req.payload,
        service_id: req.service_id,
        message_id: h.next_message_id(),
        // At-least-once copies carry a sequence: count its largest size.
        seq: if reliable { u64::MAX } else { 0 },
    };
    if message.encoded_len() > h.max_frame_bytes() as usize {
        return Err(request_error(
            id,
            ErrorCode::FrameTooLarge,
            format!(
                "message of {} bytes exceeds the client frame limit of {}",
                message.encoded_len(),
                h.max_frame_bytes()
            ),
        ));
    }
    if reliable {
        let expires_at_ms = match req.ttl_ms {
            0 => 0,
            ttl => h.now().unix_ms.max(0) as u64 + u64::from(ttl),
        };
        let msg = Arc::new(Outgoing { service_id: message.service_id, payload: message.payload, expires_at_ms });
        start_reliable_push(h, backend, id, targets, msg);
        return Ok(());
    }
    let message_id = message.message_id;
    let frame = codec::encode(FrameKind::Message, Flags::default(), &message);

    if targets.broadcast || !targets.group.is_empty() {
        let broadcast = targets.broadcast;
        // Room on every shard first (all or none), so a refused
        // broadcast reached nobody and may simply be sent again.
        let refused = if broadcast { h.reserve_broadcast(frame.len()).err() } else { None };
        if refused.is_some() {
            let kind = PendingKind::Count { broadcast, delivered: 0, message_id, refused };
            let origin = begin(h, backend, id, kind);
            end(h, origin);
            return Ok(());
        }
        let kind = PendingKind::Count { broadcast, delivered: 0, message_id, refused: None };
        let origin = begin(h, backend, id, kind);
        let expires_at = (req.ttl_ms > 0).then(|| Instant::now() + Duration::from_millis(u64::from(req.ttl_ms)));
        for shard in 0..h.shards() {
            let msg = if broadcast {
                ShardMsg::Broadcast { origin, frame: frame.clone(), expires_at }
            } else {
                ShardMsg::Group { origin, group: targets.group.clone(), frame: frame.clone() }
            };
            send_part(h, origin, ShardId(shard), msg);
        }
        end(h, origin);
        return Ok(());
    }

    let devices = !targets.devices.is_empty();
    let ids = if devices { targets.devices } else { targets.users };
    let results = target_results(ids.iter());
    let batches = by_shard(h.shards(), &results, 0, &ids, if devices { owner_shard } else { home_shard });
    let kind = Pending::targets(results, false, !devices, message_id);
    let origin = begin(h, backend, id, kind);
    for (shard, items) in batches.into_iter().enumerate() {
        if items.is_empty() {
            continue;
        }
        let to = ShardId(shard as u16);
        if devices {
            send_part(h, origin, to, ShardMsg::Devices { origin, items, frame: frame.clone() });
        } else {
            let action = UserAction::Deliver(frame.clone());
            send_lookup(h, origin, to, ShardMsg::UserLookup { origin, items, action });
        }
    }
    end(h, origin);
    Ok(())
}

/// At-least-once device or user push: every device copy is appended to
/// its timeline on the device's owner shard, which answers with the
/// sequences ([`Part::Stored`]).
fn start_reliable_push<H: PortHost>(h: &mut H, backend: ConnKey, id: u64, targets: proto::Targets, msg: Arc<Outgoing>) {
    let devices = !targets.devices.is_empty();
    let ids = if devices { targets.devices } else { targets.users };
    let results = target_results(ids.iter());
    let batches = by_shard(h.shards(), &results, 0, &ids, if devices { owner_shard } else { home_shard });
    let kind = Pending::targets(results, false, !devices, 0);
    let origin = begin(h, backend, id, kind);
    for (shard, items) in batches.into_iter().enumerate() {
        if items.is_empty() {
            continue;
        }
        let to = ShardId(shard as u16);
        if devices {
            // Each device's copy has its own id, so its status can be asked.
            let items = items.into_iter().map(|(idx, device)| (idx, device, h.next_message_id())).collect();
            send_part(h, origin, to, ShardMsg::StoreDevices { origin, items, msg: msg.clone() });
        } else {
            let action = UserAction::Store(msg.clone());
            send_lookup(h, origin, to, ShardMsg::UserLookup { origin, items, action });
        }
    }
    end(h, origin);
}

fn start_status<H: PortHost>(
    h: &mut H,
    backend: ConnKey,
    req: proto::DeliveryStatusQuery,
) -> Result<(), proto::RequestError> {
    let max_targets = h.limits().max_targets_per_request as usize;
    if req.message_ids.len() > max_targets {
        let reason = format!("more than {max_targets} message ids");
        return Err(request_error(req.request_id, ErrorCode::LimitExceeded, reason));
    }
    let statuses =
        req.message_ids.iter().map(|&message_id| proto::MessageStatus { message_id, ..Default::default() }).collect();
    let origin = begin(h, backend, req.request_id, PendingKind::Status { statuses });
    let ids = Arc::new(req.message_ids);
    // A shared store (Redis) knows every id: one shard asks it. Memory
    // stores know the devices of their own shard: ask them all.
    let shards = if h.store_is_shared() { vec![h.shard_id()] } else { (0..h.shards()).map(ShardId).collect() };
    for shard in shards {
        send_part(h, origin, shard, ShardMsg::DeliveryStatus { origin, ids: ids.clone() });
    }
    end(h, origin);
    Ok(())
}

pub(crate) fn start_group_update<H: PortHost>(
    h: &mut H,
    backend: ConnKey,
    req: proto::GroupUpdate,
) -> Result<(), proto::RequestError> {
    let id = req.request_id;
    check_group_update(&req, h.limits().max_targets_per_request as usize)?;
    let results = target_results(req.add_devices.iter().chain(&req.remove_devices));
    let adds = by_shard(h.shards(), &results, 0, &req.add_devices, owner_shard);
    let removes = by_shard(h.shards(), &results, req.add_devices.len(), &req.remove_devices, owner_shard);
    let kind = Pending::targets(results, true, false, 0);
    let origin = begin(h, backend, id, kind);
    for (add, batches) in [(true, adds), (false, removes)] {
        for (shard, items) in batches.into_iter().enumerate() {
            if !items.is_empty() {
                let msg = ShardMsg::GroupUpdate { origin, group: req.group.clone(), items, add };
                send_part(h, origin, ShardId(shard as u16), msg);
            }
        }
    }
    end(h, origin);
    Ok(())
}

pub(crate) fn start_kick<H: PortHost>(
    h: &mut H,
    backend: ConnKey,
    req: proto::KickRequest,
) -> Result<(), proto::RequestError> {
    let id = req.request_id;
    let max_targets = h.limits().max_targets_per_request as usize;
    if req.devices.len() + req.users.len() > max_targets {
        return Err(request_error(id, ErrorCode::LimitExceeded, format!("more than {max_targets} targets")));
    }
    let code = match codes::from_wire(req.code) {
        ErrorCode::Unspecified if req.revoke => ErrorCode::Revoked,
        ErrorCode::Unspecified => ErrorCode::Kicked,
        code => code,
    };
    if req.revoke {
        // Every shard refuses the old tokens from now on (any of them
        // may take a login of these users and devices); then the kick
        // below ends the live sessions.
        let not_before = crate::protocol::token::now_unix_secs();
        let (devices, users): (Arc<[String]>, Arc<[String]>) = (req.devices.clone().into(), req.users.clone().into());
        for shard in 0..h.shards() {
            let msg = ShardMsg::Revoke { devices: devices.clone(), users: users.clone(), not_before, loaded: false };
            h.route(ShardId(shard), msg);
        }
    }
    let results = target_results(req.devices.iter().chain(&req.users));
    let devices = by_shard(h.shards(), &results, 0, &req.devices, owner_shard);
    let users = by_shard(h.shards(), &results, req.devices.len(), &req.users, home_shard);
    let kind = Pending::targets(results, true, false, 0);
    let origin = begin(h, backend, id, kind);
    for (shard, items) in devices.into_iter().enumerate() {
        if !items.is_empty() {
            let msg = ShardMsg::KickDevices { origin, items, code, reason: req.reason.clone() };
            send_part(h, origin, ShardId(shard as u16), msg);
        }
    }
    for (shard, items) in users.into_iter().enumerate() {
        if !items.is_empty() {
            let action = UserAction::Kick { code, reason: req.reason.clone() };
            send_lookup(h, origin, ShardId(shard as u16), ShardMsg::UserLookup { origin, items, action });
        }
    }
    end(h, origin);
    Ok(())
}

pub(crate) fn start_presence<H: PortHost>(
    h: &mut H,
    backend: ConnKey,
    req: proto::PresenceQuery,
) -> Result<(), proto::RequestError> {
    let max_targets = h.limits().max_targets_per_request as usize;
    if req.devices.len() + req.users.len() + req.groups.len() > max_targets {
        let reason = format!("more than {max_targets} targets");
        return Err(request_error(req.request_id, ErrorCode::LimitExceeded, reason));
    }
    let query = Arc::new(PresenceQuery { devices: req.devices, users: req.users, groups: req.groups });
    let kind = PendingKind::Presence { query: query.clone(), shards: h.shards(), parts: Vec::new() };
    let origin = begin(h, backend, req.request_id, kind);
    for shard in 0..h.shards() {
        send_part(h, origin, ShardId(shard), ShardMsg::Presence { origin, query: query.clone() });
    }
    end(h, origin);
    Ok(())
}
