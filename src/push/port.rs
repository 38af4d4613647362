//! The push port on a shard: accepting backends, reading their pipelined
//! requests, splitting each over the shards, answering.

use super::*;

/// Why a request is refused while the node hands over to a new process.
const UPGRADING: &str = "node upgrading; retry";

impl Shard {
    /// Accepts backend connections on the push port (or, `Listener::Node`,
    /// other nodes on the node listener) until shutdown.
    pub async fn push_accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener, role: auth::Listener) {
        while let Some(accepted) = self.accept_or_stop(&listener).await {
            match accepted {
                Ok(stream) => {
                    let Some(key) = self.admit_backend(role) else {
                        // Too many still authenticating: the newcomer waits
                        // for nothing and costs nothing.
                        self.counters.push_refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    debug!(shard = %self.id, peer = ?stream.peer_addr().ok(), ?role, "backend connected");
                    glommio::spawn_local(Rc::clone(&self).run_backend(key, stream)).detach();
                }
                Err(err) => {
                    warn!(shard = %self.id, error = %err, "push accept failed; pausing 100 ms");
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A slot for a new backend connection, its challenge queued; `None`
    /// when the shard has `max_unauthenticated` of them authenticating.
    fn admit_backend(&self, listener: auth::Listener) -> Option<ConnKey> {
        let live = self.live();
        let pa = &live.push_auth;
        let mut st = self.state.borrow_mut();
        let authenticating =
            st.backends.iter().filter(|(_, b)| matches!(b.auth, BackendAuth::Challenged { .. })).count();
        if authenticating >= pa.max_unauthenticated as usize {
            return None;
        }
        let challenge = match auth::new_challenge() {
            Ok(c) => c,
            Err(err) => {
                warn!(shard = %self.id, error = %err, "no randomness for a push challenge");
                return None;
            }
        };
        let mut out = OutQueue::default();
        let nonce = challenge.nonce.clone();
        out.push(Frame::PushChallenge(challenge).to_bytes());
        let generation = st.next_token() as u32;
        let index = st.backends.insert(Backend {
            generation,
            out,
            inflight: 0,
            waker: None,
            closing: false,
            listener,
            auth: BackendAuth::Challenged { nonce },
            deadline: self.now().mono.add_ms(pa.auth_timeout_ms),
        });
        Some(ConnKey { index: index as u32, generation })
    }

    pub(super) async fn run_backend(self: Rc<Self>, key: ConnKey, mut stream: TcpStream) {
        let mut rbuf = BytesMut::new();
        std::future::poll_fn(|cx| self.poll_backend(key, &mut stream, &mut rbuf, cx)).await;
        let mut st = self.state.borrow_mut();
        if st.backends.get(key.index as usize).is_some_and(|b| b.generation == key.generation) {
            st.backends.remove(key.index as usize);
        }
        debug!(shard = %self.id, "backend disconnected");
    }

    /// Closes backend connections past their auth or idle deadline (from
    /// the shard's timer tick).
    pub(crate) fn expire_backends(&self, st: &mut State, now: Millis) {
        let idle_ms = self.live().push_auth.idle_timeout_ms;
        for (_, b) in st.backends.iter_mut() {
            if b.closing || b.deadline > now {
                continue;
            }
            let code = match b.auth {
                BackendAuth::Challenged { .. } => {
                    self.counters.push_auth_timeouts.fetch_add(1, Ordering::Relaxed);
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
    }

    /// The connection's first frame: a PushAuth that answers its challenge
    /// grants the key's rights; anything else closes it (UNAUTHENTICATED).
    fn on_auth(&self, b: &mut Backend, nonce: &[u8], frame: Result<Frame, CodecError>) {
        let live = self.live();
        let ring = live.push_auth.ring(b.listener);
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
                b.deadline = self.now().mono.add_ms(self.live().push_auth.idle_timeout_ms);
                debug!(shard = %self.id, key = %grant.key.id(), "backend authenticated");
            }
            Err(reason) => {
                self.counters.push_refused.fetch_add(1, Ordering::Relaxed);
                let error = Frame::Error(codes::error_body(ErrorCode::Unauthenticated, reason));
                b.out.push(error.to_bytes());
                b.closing = true;
            }
        }
    }

    pub(super) fn poll_backend(
        &self,
        key: ConnKey,
        stream: &mut TcpStream,
        rbuf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let max_inflight = self.live().push.max_inflight_per_backend;
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
                    let max_body = match b.auth {
                        BackendAuth::Challenged { .. } => auth::MAX_AUTH_BODY,
                        BackendAuth::Granted { .. } => self.live().push.max_request_bytes,
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
                                    self.on_auth(b, &nonce, frame);
                                    if b.closing {
                                        rbuf.clear();
                                        break;
                                    }
                                }
                                BackendAuth::Granted { rights, service_ids } => {
                                    let (rights, service_ids) = (*rights, service_ids.clone());
                                    b.deadline = self.now().mono.add_ms(self.live().push_auth.idle_timeout_ms);
                                    self.on_granted_request(&mut st, key, rights, &service_ids, frame);
                                }
                            }
                        }
                        Err(err) => {
                            // The frame boundary is lost: say why and close.
                            // Before auth, every refusal is UNAUTHENTICATED.
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
                if st.backends.get(key.index as usize).is_some_and(|b| b.closing || !b.out.is_empty()) {
                    // Flush replies (or the error) before reading more.
                    drop(st);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            // Before auth, read no more than the largest PushAuth frame.
            let want = {
                let st = self.state.borrow();
                match st.backends.get(key.index as usize).map(|b| &b.auth) {
                    Some(BackendAuth::Challenged { .. }) => {
                        (codec::HEADER_LEN + auth::MAX_AUTH_BODY as usize).saturating_sub(rbuf.len()).max(1)
                    }
                    _ => chunk.len(),
                }
            };
            match futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, &mut chunk[..want]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => rbuf.extend_from_slice(&chunk[..n]),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A request on an authenticated connection: carried out only when the
    /// key's rights allow it, else answered PERMISSION_DENIED.
    fn on_granted_request(
        &self,
        st: &mut State,
        backend: ConnKey,
        rights: auth::Rights,
        service_ids: &[String],
        frame: Result<Frame, CodecError>,
    ) {
        if let Ok(f) = &frame
            && let Err(reason) = auth::authorize(rights, service_ids, f)
        {
            self.counters.push_requests.fetch_add(1, Ordering::Relaxed);
            self.counters.push_denied.fetch_add(1, Ordering::Relaxed);
            let id = crate::cluster::request_id(f);
            return reply_now(st, backend, Frame::RequestError(request_error(id, auth::DENIED, reason)));
        }
        self.on_request(st, backend, frame);
    }

    pub(super) fn on_request(&self, st: &mut State, backend: ConnKey, frame: Result<Frame, CodecError>) {
        self.counters.push_requests.fetch_add(1, Ordering::Relaxed);
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => {
                self.counters.ops.request_error(err.code() as i32);
                return reply_now(st, backend, Frame::RequestError(request_error(0, err.code(), err.to_string())));
            }
        };
        // Hook: during an in-place upgrade requests are refused, retryable.
        if self.upgrade.quiescing() {
            let error = request_error(crate::cluster::request_id(&frame), ErrorCode::Unavailable, UPGRADING);
            return reply_now(st, backend, Frame::RequestError(error));
        }
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
            self.counters.ops.request_error(error.code);
            reply_now(st, backend, Frame::RequestError(error));
        }
    }

    /// Registers a pending request; the origin holds one "lookup" until it
    /// has sent every part, so early answers cannot complete it.
    pub(super) fn begin(&self, st: &mut State, backend: ConnKey, request_id: u64, kind: PendingKind) -> Origin {
        let token = st.next_token();
        let started = self.now().mono;
        st.pending.insert(token, Pending { backend, request_id, lookups: 1, expected: 0, done: 0, kind, started });
        self.arm_deadline(st, Expiry::Request(token));
        if let Some(b) = st.backends.get_mut(backend.index as usize) {
            b.inflight += 1;
        }
        Origin { shard: self.id, token }
    }

    /// Files `what` to end one `push.reply_timeout_ms` from now.
    pub(crate) fn arm_deadline(&self, st: &mut State, what: Expiry) {
        let at = self.now().mono.add_ms(self.live().push.reply_timeout_ms);
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
                    self.counters.ops.push_latency.record(pending.started.elapsed_to(now));
                    let (backend, frame) = pending.expire(self.shards(), self.live().push.reply_timeout_ms);
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
    pub(super) fn end(&self, st: &mut State, origin: Origin) {
        if let Some(p) = st.pending.get_mut(&origin.token) {
            p.lookups -= 1;
        }
        self.finish_if_done(st, origin.token);
    }

    /// Sends one part that will be answered with one [`Part`].
    pub(super) fn send_part(&self, st: &mut State, origin: Origin, to: ShardId, msg: ShardMsg) {
        if let Some(p) = st.pending.get_mut(&origin.token) {
            p.expected += 1;
            p.awaits(&msg);
        }
        self.route(st, to, msg);
    }

    /// Sends a user lookup, answered with `Part::Expect` by the home shard.
    pub(super) fn send_lookup(&self, st: &mut State, origin: Origin, to: ShardId, msg: ShardMsg) {
        if let Some(p) = st.pending.get_mut(&origin.token) {
            p.lookups += 1;
            p.awaits(&msg);
        }
        self.route(st, to, msg);
    }

    /// Splits `(index, id)` pairs by `shard_of(id)`, skipping rejected ones.
    pub(super) fn by_shard(
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
        let reliable = check_push(id, &targets, req.qos, self.live().push.max_targets_per_request as usize)?;
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
    pub(super) fn start_reliable_push(
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

    pub(super) fn start_status(
        &self,
        st: &mut State,
        backend: ConnKey,
        req: proto::DeliveryStatusQuery,
    ) -> Result<(), proto::RequestError> {
        let max_targets = self.live().push.max_targets_per_request as usize;
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
        let shards =
            if st.reliable.store_is_shared() { vec![self.id] } else { (0..self.shards()).map(ShardId).collect() };
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
        check_group_update(&req, self.live().push.max_targets_per_request as usize)?;
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
        let max_targets = self.live().push.max_targets_per_request as usize;
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
            let (devices, users): (Arc<[String]>, Arc<[String]>) =
                (req.devices.clone().into(), req.users.clone().into());
            for shard in 0..self.shards() {
                let msg =
                    ShardMsg::Revoke { devices: devices.clone(), users: users.clone(), not_before, loaded: false };
                self.route(st, ShardId(shard), msg);
            }
        }
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
        let max_targets = self.live().push.max_targets_per_request as usize;
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
