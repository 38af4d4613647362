//! Accepting client connections and the connection task: reads into the
//! shard's scratch buffer, frames, the session's actions, writes, the
//! hand-off of a connection to its owner shard and its adoption there.

use super::links::{flush_tls, handshake_token};
use super::*;
use crate::admission::{Admitted, Refusal, RefusalLog};
use crate::protocol::limits::{Escaped, MAX_AUTH_BODY_BYTES};

/// The task of one connection, written by hand: an `async` block around
/// the stream keeps several copies of it in its state (448 bytes against
/// 136 here), and this is paid by every idle connection.
pub(super) struct ConnTask {
    shard: Rc<Shard>,
    key: ConnKey,
    /// Taken when the task finishes.
    socket: Option<Socket>,
    /// A TLS connection's session and sealed records (`None` otherwise).
    tls: Option<Box<TlsLink>>,
    /// Its charge in the per-source table, released when it closes.
    admitted: Admitted,
}

impl ConnTask {
    /// The task of a session taken over from another process.
    pub(super) fn new(shard: Rc<Shard>, key: ConnKey, socket: Socket, admitted: Admitted) -> ConnTask {
        ConnTask { shard, key, socket: Some(socket), tls: None, admitted }
    }
}

impl std::future::Future for ConnTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(socket) = this.socket.as_mut() else { return Poll::Ready(()) };
        // Hook: handed over in an in-place upgrade; a failed upgrade wakes
        // the task again (TLS sessions run on to close).
        if this.shard.upgrade.frozen() && this.tls.is_none() {
            this.shard.park_conn(this.key, cx.waker());
            return Poll::Pending;
        }
        // The connection's span: what is logged while the connection is
        // served (its frames, the session, upstream and delivery work they
        // start) carries the shard and connection id. Made per poll and
        // never kept, so an idle connection pays no byte for it; at the
        // default `info` level `debug_span!` is one check of the level
        // filter and the span is never built.
        let _span = tracing::debug_span!("conn", shard = %this.shard.id, conn = %ConnId::new(this.shard.id, this.key))
            .entered();
        let Poll::Ready(mut exit) = this.shard.poll_conn(this.key, socket.stream(), &mut this.tls, cx) else {
            return Poll::Pending;
        };
        if let Exit::Handoff(_, transit) = &mut exit {
            transit.tls = this.tls.take();
            transit.admitted = this.admitted;
        } else {
            this.shard.cfg.admission.release(this.admitted);
        }
        if let Some(socket) = this.socket.take() {
            this.shard.finish_conn(this.key, socket, exit);
        }
        Poll::Ready(())
    }
}

/// How a connection task ended.
pub(super) enum Exit {
    Closed,
    /// Authenticated here, owned by another shard: move it there.
    Handoff(ShardId, Box<Transit>),
}

/// The session part of an [`Adoption`], before the fd is attached.
pub(super) struct Transit {
    session: Session,
    login: Login,
    leftover: Vec<u8>,
    link: Link,
    ws: Option<Box<WsState>>,
    tls: Option<Box<TlsLink>>,
    admitted: Admitted,
}

impl Shard {
    // ---- accepting ------------------------------------------------------

    /// Accepts client connections until [`Shard::begin_shutdown`].
    pub async fn accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener) {
        self.accept_link_loop(listener, Link::Plain).await;
    }

    /// [`Shard::accept_loop`] for a listener of another transport.
    pub async fn accept_link_loop(self: Rc<Self>, listener: glommio::net::TcpListener, link: Link) {
        let mut bucket = AcceptBucket::new(self.live().accept_rate_per_sec);
        let mut refusals = RefusalLog::default();
        while let Some(accepted) = self.accept_or_stop(&listener).await {
            bucket.set_rate(self.live().accept_rate_per_sec);
            match accepted {
                Ok(stream) => match self.admit(&stream) {
                    Ok(admitted) => self.on_accept(stream, link, admitted),
                    Err((refusal, peer)) => refusals.note(self.id, refusal, peer, Instant::now()),
                },
                Err(err) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning.
                    warn!(shard = %self.id, error = %err, "accept failed; pausing 100 ms");
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
            }
            if let Some(wait) = bucket.take(Instant::now()) {
                glommio::timer::sleep(wait).await;
            }
        }
        debug!(shard = %self.id, "stopped accepting clients");
    }

    /// The next accepted connection, or `None` once the shard stops.
    pub(crate) async fn accept_or_stop(
        &self,
        listener: &glommio::net::TcpListener,
    ) -> Option<glommio::Result<TcpStream, ()>> {
        loop {
            // Hook: accepting pauses during an in-place upgrade (a stop
            // still ends it).
            let stopped = futures_lite::future::or(
                async {
                    self.upgrade.until_paused(false).await;
                    false
                },
                async {
                    let _ = self.stop_accepting.acquire(1).await;
                    true
                },
            )
            .await;
            if stopped {
                return None;
            }
            let accepted = futures_lite::future::or(async { Some(Some(listener.accept().await)) }, async {
                futures_lite::future::or(
                    async {
                        let _ = self.stop_accepting.acquire(1).await;
                        Some(None)
                    },
                    async {
                        self.upgrade.until_paused(true).await;
                        None
                    },
                )
                .await
            })
            .await;
            if let Some(accepted) = accepted {
                if let Some(Ok(stream)) = &accepted {
                    crate::conn::fd_pass::set_cloexec(fd::stream_fd(stream));
                }
                return accepted;
            }
        }
    }

    /// Charges a fresh connection to its source, or counts its refusal and
    /// resets it (an RST leaves no TIME_WAIT behind on this side).
    fn admit(&self, stream: &TcpStream) -> Result<Admitted, (Refusal, std::net::IpAddr)> {
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        // No address (the peer is already gone): nothing to charge it to.
        let Ok(peer) = stream.peer_addr() else { return Ok(Admitted::NONE) };
        let now_secs = u64::try_from(self.now().unix_secs()).unwrap_or(0);
        self.cfg.admission.admit(peer.ip(), now_secs).map_err(|refusal| {
            self.counters.admission_refused[refusal as usize].fetch_add(1, Ordering::Relaxed);
            let _ = socket2::SockRef::from(&fd::stream_fd(stream)).set_linger(Some(Duration::ZERO));
            (refusal, peer.ip())
        })
    }

    pub(super) fn on_accept(self: &Rc<Self>, stream: TcpStream, link: Link, admitted: Admitted) {
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            if st.conns.len() >= self.live().max_connections as usize {
                drop(st);
                debug!(shard = %self.id, "connection limit reached; refusing");
                // Best effort: the socket is fresh, a small frame fits.
                // (Over TLS nothing can be said before a handshake.)
                let bytes = match link {
                    Link::Plain => {
                        Frame::Error(codes::error_body(ErrorCode::ServerError, "connection limit reached")).to_bytes()
                    }
                    Link::WsUpgrade | Link::Ws => Bytes::from_static(SERVICE_UNAVAILABLE),
                    Link::Tls | Link::WssUpgrade | Link::Wss => {
                        self.cfg.admission.release(admitted);
                        return;
                    }
                };
                let _ = fd::send(fd::stream_fd(&stream), &bytes);
                self.cfg.admission.release(admitted);
                return;
            }
            let tls = match link.is_tls() {
                false => None,
                true => match self.tls_session(link) {
                    Some(session) => Some(Box::new(TlsLink::new(session))),
                    None => {
                        self.cfg.admission.release(admitted);
                        return;
                    }
                },
            };
            let session = Session::new(now.mono, &self.live().params);
            let (socket, slot_fd) = Socket::new(stream);
            let key = insert_conn(&mut st, session, slot_fd, now, 0, link);
            if link.form() == Link::WsUpgrade
                && let Some(conn) = st.conn(key)
            {
                // The head must be complete by the auth deadline (the
                // session's own timer); the reader bounds its size.
                let upgrade = Some(crate::conn::ws::HeadReader::new(&self.cfg.ws, Instant::now()));
                conn.io().ws = Some(Box::new(WsState { upgrade, ..WsState::default() }));
            }
            (key, socket, tls)
        };
        let (key, socket, tls) = key;
        let shard = self.clone();
        glommio::spawn_local(ConnTask { shard, key, socket: Some(socket), tls, admitted }).detach();
    }

    // ---- the connection task ----------------------------------------------

    /// Ends a connection task: the slot goes, then the socket (closed, or
    /// handed to its owner shard).
    pub(super) fn finish_conn(&self, key: ConnKey, socket: Socket, exit: Exit) {
        // The slot goes first: it holds the fd handle deliveries write to,
        // which closing takes back.
        let Some(slot_fd) = self.remove_conn(key) else {
            // Invariant: only this task removes its slot.
            debug_assert!(false, "connection slot removed by someone else");
            return;
        };
        match exit {
            Exit::Closed => socket.close(slot_fd),
            Exit::Handoff(owner, transit) => match socket.hand_over(slot_fd) {
                Ok(fd) => {
                    let Transit { session, login, leftover, link, ws, tls, admitted } = *transit;
                    self.counters.handed_off.fetch_add(1, Ordering::Relaxed);
                    let adoption = Adoption { fd, session, login, leftover, link, ws, tls, admitted };
                    self.outbox.send(owner, ShardMsg::Adopt(Box::new(adoption)));
                }
                Err(err) => {
                    self.cfg.admission.release(transit.admitted);
                    warn!(shard = %self.id, error = %err, "dup failed; dropping connection");
                }
            },
        }
    }

    pub(super) fn poll_conn(
        &self,
        key: ConnKey,
        stream: &mut TcpStream,
        tls: &mut Option<Box<TlsLink>>,
        cx: &mut Context<'_>,
    ) -> Poll<Exit> {
        for _ in 0..READS_PER_POLL {
            let draining = {
                let mut st = self.state.borrow_mut();
                let now = self.now().mono;
                let Some(conn) = st.conn(key) else {
                    return Poll::Ready(Exit::Closed);
                };
                let mut stalled_now = false;
                if let Some(t) = tls.as_deref_mut() {
                    // Sealed records first, then the frames queued since,
                    // sealed as one batch once those are out.
                    let io = conn.io.get_or_insert_with(Box::default);
                    match flush_tls(t, &mut io.out, stream, cx) {
                        Err(err) => {
                            debug!(shard = %self.id, error = %err, "TLS write failed");
                            conn.session.closed_by_peer();
                            return Poll::Ready(Exit::Closed);
                        }
                        Ok(true) => io.stalled_since = None,
                        Ok(false) if io.stalled_since.is_none() => {
                            io.stalled_since = Some(now);
                            stalled_now = true;
                        }
                        Ok(false) => {}
                    }
                    conn.release_io_if_idle();
                } else if let Some(io) = conn.io.as_mut() {
                    match io.out.flush(stream, cx) {
                        Err(err) => {
                            debug!(shard = %self.id, error = %err, "write failed");
                            conn.session.closed_by_peer();
                            return Poll::Ready(Exit::Closed);
                        }
                        Ok(true) => io.stalled_since = None,
                        Ok(false) if io.stalled_since.is_none() => {
                            io.stalled_since = Some(now);
                            stalled_now = true;
                        }
                        Ok(false) => {}
                    }
                    conn.release_io_if_idle();
                }
                match conn.session.phase() {
                    Phase::Closed => return Poll::Ready(Exit::Closed),
                    Phase::Closing => {
                        let flushed = conn.io.as_ref().is_none_or(|io| io.out.is_empty())
                            && tls.as_ref().is_none_or(|t| t.cipher.is_empty());
                        if let Some(t) = tls.as_deref_mut()
                            && flushed
                            && !t.sent_close
                        {
                            // close_notify, then the half-close below once
                            // it is written.
                            let mut out = Vec::new();
                            let _ = t.session.close_notify(&mut out);
                            t.sent_close = true;
                            if !out.is_empty() {
                                t.cipher.push(Bytes::from(out));
                                continue;
                            }
                        }
                        if flushed && !conn.write_shut {
                            // Half-close so the Error frame arrives before FIN;
                            // keep reading until the peer closes or the linger ends.
                            conn.write_shut = true;
                            fd::shutdown_write(fd::stream_fd(stream));
                        }
                    }
                    // What is queued (a WebSocket 101) goes out before the
                    // socket moves: the queue stays here.
                    Phase::Authenticated
                        if conn.io.as_ref().is_none_or(|io| io.out.is_empty())
                            && tls.as_ref().is_none_or(|t| t.cipher.is_empty()) =>
                    {
                        if let Some((owner, transit)) = take_handoff(conn) {
                            return Poll::Ready(Exit::Handoff(owner, transit));
                        }
                    }
                    Phase::Handshaking | Phase::Active | Phase::Authenticated => {}
                }
                if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    conn.waker = Some(cx.waker().clone());
                }
                let draining = !conn.session.wants_input();
                let link = conn.link;
                let awaiting_activation = conn.session.phase() == Phase::Authenticated;
                if stalled_now {
                    // The sweep closes the session as SLOW if the socket is
                    // still full by then.
                    st.wheel.insert(key, now.add_ms(self.cfg.write_timeout_ms));
                }
                // Leave the bytes in the socket while the session waits for
                // its activation (the user directory's ack: reading now would
                // discard frames pipelined behind Auth; the AuthOk queued at
                // activation wakes this task), or while the rate limit pauses
                // it (the upstream task resumes and wakes it).
                if awaiting_activation || (!draining && st.upstream.is_paused(key)) {
                    return Poll::Pending;
                }
                (draining, link)
            };
            let (draining, link) = draining;

            let mut buf = std::mem::take(&mut *self.scratch.borrow_mut());
            let read = futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, &mut buf);
            let result = match read {
                Poll::Pending => None,
                Poll::Ready(Ok(0)) => Some(Err(())),
                Poll::Ready(Ok(n)) => match link {
                    _ if let Some(t) = tls.as_deref_mut() => Some(self.on_tls_read(key, t, &mut buf[..n], draining)),
                    Link::Plain if !draining => {
                        self.on_bytes(key, &buf[..n]);
                        Some(Ok(()))
                    }
                    Link::Plain => Some(Ok(())),
                    Link::WsUpgrade | Link::Ws | Link::Tls | Link::WssUpgrade | Link::Wss => {
                        Some(self.on_ws_read(key, &mut buf[..n], draining))
                    }
                },
                Poll::Ready(Err(err)) => {
                    debug!(shard = %self.id, error = %err, "read failed");
                    Some(Err(()))
                }
            };
            *self.scratch.borrow_mut() = buf;
            match result {
                None => return Poll::Pending,
                Some(Ok(())) => {}
                Some(Err(())) => {
                    if let Some(conn) = self.state.borrow_mut().conn(key) {
                        conn.session.closed_by_peer();
                    }
                    return Poll::Ready(Exit::Closed);
                }
            }
        }
        // Fairness: let other connections run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Decodes and handles every whole frame in `data` (after any partial
    /// frame kept from the last read); keeps the incomplete tail.
    pub(super) fn on_bytes(&self, key: ConnKey, data: &[u8]) {
        self.counters.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut st = self.state.borrow_mut();
        let Some(conn) = st.conn(key) else { return };
        let mut carried = conn.io.as_mut().map(|io| std::mem::take(&mut io.partial)).unwrap_or_default();
        let input: &[u8] = if carried.is_empty() {
            data
        } else {
            carried.extend_from_slice(data);
            &carried
        };
        let consumed = self.handle_input(&mut st, key, input);
        let rest = &input[consumed..];
        if let Some(conn) = st.conn(key) {
            if !rest.is_empty() && conn.session.phase() != Phase::Closing {
                let io = conn.io();
                io.partial.clear();
                io.partial.extend_from_slice(rest);
            }
            conn.release_io_if_idle();
        }
        // Hook: upstream requests (and immediate answers) of this read go
        // out together.
        self.flush_upstream(&mut st);
    }

    /// Handles frames that waited in the input leftovers: behind Auth for
    /// activation, or behind a rate-limited Request.
    pub(crate) fn resume_input(&self, st: &mut State, key: ConnKey) {
        let Some(partial) = st.conn(key).and_then(|c| c.io.as_mut()).map(|io| std::mem::take(&mut io.partial)) else {
            return;
        };
        let consumed = self.handle_input(st, key, &partial);
        if let Some(conn) = st.conn(key) {
            if consumed < partial.len() && conn.session.phase() != Phase::Closing {
                conn.io().partial.extend_from_slice(&partial[consumed..]);
            }
            conn.release_io_if_idle();
        }
        self.flush_upstream(st);
    }

    /// Returns how many bytes of `input` were consumed.
    pub(super) fn handle_input(&self, st: &mut State, key: ConnKey, input: &[u8]) -> usize {
        let mut pos = 0;
        let now = self.now();
        let mut actions = std::mem::take(&mut st.actions);
        let consumed = loop {
            let Some(conn) = st.conn(key) else { break input.len() };
            if !conn.session.wants_input() {
                // Closing: discard the rest. Authenticated (hand-off): keep it.
                break if conn.session.phase() == Phase::Authenticated { pos } else { input.len() };
            }
            let active = conn.is_active();
            // Before Auth nothing longer than an Auth frame is waited for.
            let max_body = match conn.session.phase() {
                Phase::Handshaking => MAX_AUTH_BODY_BYTES.min(self.cfg.max_frame_bytes),
                _ => self.cfg.max_frame_bytes,
            };
            match codec::split_frame(&input[pos..], max_body) {
                Ok(None) => break pos,
                Ok(Some((header, body))) => {
                    // Rate limit: a Request over the budget stays in the
                    // leftovers, and reading pauses.
                    if header.kind == FrameKind::Request && active && !self.admit_request(st, key, now.mono) {
                        break pos;
                    }
                    let Some(conn) = st.conn(key) else { break input.len() };
                    pos += header.frame_len();
                    self.counters.frames_in.fetch_add(1, Ordering::Relaxed);
                    match Frame::decode_from(Peer::Client, header, body) {
                        Ok(mut frame) => {
                            if let Frame::Auth(auth) = &mut frame {
                                handshake_token(conn, auth);
                            }
                            conn.session.handle_frame(now, frame, &self.live().params, &mut actions)
                        }
                        Err(err) => conn.session.handle_codec_error(now, &err, &self.live().params, &mut actions),
                    }
                }
                Err(err) => {
                    pos = input.len();
                    conn.session.handle_codec_error(now, &err, &self.live().params, &mut actions);
                }
            }
            self.apply(st, key, now, &mut actions);
        };
        st.actions = actions;
        consumed
    }

    /// Carries out a session's actions for connection `key`.
    pub(super) fn apply(&self, st: &mut State, key: ConnKey, now: Now, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Send(frame) => self.queue_frame(st, key, &frame),
                Action::Close(code) => self.on_close(st, key, code),
                Action::Authenticated(_) if !st.revoked.is_loaded() => {
                    // Cluster mode, the stored revocations not read yet
                    // (Redis unreachable since the start): fail closed.
                    let why = "the node has not read the cluster's revocations yet; try again".to_owned();
                    self.close_conn(st, key, now, ErrorCode::Unavailable, why);
                }
                Action::Authenticated(login) if st.revoked.refuses(&login.user, &login.device, login.issued_at) => {
                    let why = "the token was revoked; get one issued after the revocation".to_owned();
                    self.close_conn(st, key, now, ErrorCode::Revoked, why);
                }
                Action::Authenticated(login) => {
                    self.counters.authenticated.fetch_add(1, Ordering::Relaxed);
                    let owner = owner_shard(&login.device, self.shards);
                    if owner == self.id {
                        self.register(st, key, now, &login);
                    } else if let Some(conn) = st.conn(key) {
                        conn.io().handoff = Some((owner, login));
                    }
                }
                Action::Join(group) => {
                    let allowed = st
                        .conn(key)
                        .is_some_and(|c| crate::groups::join_allowed(&group, &self.cfg.join_policy, c.group_claims()));
                    if !allowed {
                        let reason = "neither the token nor the node's policy allows this group".to_owned();
                        let denied = group_result(group, true, ErrorCode::PermissionDenied, reason);
                        self.queue_frame(st, key, &denied);
                        continue;
                    }
                    let limit = self.cfg.max_groups_per_session as usize;
                    if st.groups.join(key.index, &group, limit).is_err() {
                        let reason = format!("at most {limit} groups per session");
                        let refused = group_result(group, true, ErrorCode::LimitExceeded, reason.clone());
                        self.queue_frame(st, key, &refused);
                        let mut more = Vec::new();
                        if let Some(conn) = st.conn(key) {
                            conn.session.close(now, ErrorCode::LimitExceeded, reason, &self.live().params, &mut more);
                        }
                        self.apply(st, key, now, &mut more);
                    } else {
                        self.queue_frame(st, key, &group_result(group, true, ErrorCode::Unspecified, String::new()));
                    }
                    self.publish_group_counts(st);
                }
                Action::Leave(group) => {
                    st.groups.leave(key.index, &group);
                    self.queue_frame(st, key, &group_result(group, false, ErrorCode::Unspecified, String::new()));
                    self.publish_group_counts(st);
                }
                Action::Request(request) => self.on_client_request(st, key, now, request),
                Action::Ack(seq) => reliable::on_ack(&mut self.ctx(st), key, now, seq),
                Action::Refresh(refresh) => {
                    let Some(conn) = st.conn(key) else { continue };
                    // The same user and device only: a token of another
                    // identity never takes over a running session.
                    let same =
                        conn.field(0) == Some(refresh.user.as_str()) && conn.field(1) == Some(refresh.device.as_str());
                    let refused = match same {
                        false => Some((ErrorCode::InvalidToken, "the Refresh token names another user or device")),
                        true if st.revoked.refuses(&refresh.user, &refresh.device, refresh.issued_at) => {
                            Some((ErrorCode::Revoked, "the token was revoked"))
                        }
                        true => None,
                    };
                    let mut more = Vec::new();
                    if let Some(conn) = st.conn(key) {
                        match refused {
                            Some((code, why)) => {
                                conn.session.close(now, code, why.into(), &self.live().params, &mut more)
                            }
                            None => conn.session.refreshed(now, refresh.expires_at, &self.live().params, &mut more),
                        }
                    }
                    self.apply(st, key, now, &mut more);
                }
            }
        }
    }

    pub(super) fn on_close(&self, st: &mut State, key: ConnKey, code: ErrorCode) {
        let Some(conn) = st.conn(key) else { return };
        // After the longlink Error or Kicked frame, the WebSocket close that
        // carries the code (an upgrade still in progress gets an HTTP error).
        match conn.link.form() {
            Link::Plain | Link::Tls | Link::WssUpgrade | Link::Wss => {}
            Link::WsUpgrade => {
                let status = match code {
                    ErrorCode::AuthTimeout => ws::HandshakeError::Timeout.response(),
                    _ => SERVICE_UNAVAILABLE.to_vec(),
                };
                conn.io().out.push(Bytes::from(status));
            }
            Link::Ws => {
                // Reason "<code> <NAME>", e.g. "2003 REPLACED".
                conn.io().out.push(ws::encode::encode_longlink_close(code as i32, code.as_str_name()));
            }
        }
        let deadline = conn.session.deadline();
        conn.wake();
        let device = Escaped(conn.device().unwrap_or(""));
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), %device, ?code, "closing");
        // A closing session leaves the indexes now: a new login of the same
        // device must not see it, and pushes must not count it.
        self.unindex(st, key.index, code);
        st.wheel.insert(key, deadline);
    }

    pub(super) fn queue_frame(&self, st: &mut State, key: ConnKey, frame: &Frame) {
        let bytes = match frame {
            Frame::Pong => Bytes::from_static(&PONG),
            other => other.to_bytes(),
        };
        self.count_out(bytes.len());
        self.queue_bytes(st, key, bytes);
    }

    /// Queues an encoded frame; a full queue closes the session with SLOW.
    /// Returns whether the frame was queued.
    pub(super) fn queue_bytes(&self, st: &mut State, key: ConnKey, bytes: Bytes) -> bool {
        let queued = self.enqueue(st, key, bytes);
        if queued && let Some(conn) = st.conn(key) {
            conn.wake();
        }
        queued
    }

    /// Queues bytes already in their wire form (a WebSocket control frame,
    /// the upgrade's answer, a frame partly written by a direct send), with
    /// the queue's bound. Wakes the task.
    pub(super) fn queue_raw(&self, st: &mut State, key: ConnKey, bytes: Bytes) -> bool {
        let limit = self.cfg.outbound_queue_bytes as usize;
        let Some(conn) = st.conn(key) else { return false };
        let io = conn.io();
        if io.out.bytes() + bytes.len() > limit && !io.out.is_empty() {
            let dropped = io.out.cut();
            self.close_slow(st, key, dropped, format!("outbound queue above {limit} bytes"));
            return false;
        }
        io.out.push(bytes);
        conn.wake();
        true
    }

    /// Closes session `key` from the server side with an `Error` frame.
    pub(crate) fn close_conn(&self, st: &mut State, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        let mut actions = Vec::new();
        if let Some(conn) = st.conn(key) {
            conn.session.close(now, code, reason, &self.live().params, &mut actions);
        }
        self.apply(st, key, now, &mut actions);
    }

    /// The common parameters of session `key`, for upstream requests and
    /// connection events. The client address comes from the socket (it is
    /// not kept per connection).
    pub(crate) fn conn_info(&self, st: &State, key: ConnKey) -> Option<proto::ConnInfo> {
        let conn = st.conn_ref(key)?;
        let field = |i| conn.field(i).unwrap_or_default().to_owned();
        Some(proto::ConnInfo {
            user: field(0),
            device: field(1),
            app: field(2),
            platform: field(3),
            client_version: field(4),
            conn_id: ConnId::new(self.id, key).0,
            node: self.cfg.node.clone(),
            client_addr: fd::peer_addr(conn.fd.get()).map(|a| a.to_string()).unwrap_or_default(),
        })
    }

    pub(super) fn adopt(self: &Rc<Self>, adoption: Adoption) {
        let Adoption { fd, session, login, leftover, link, ws, tls, admitted } = adoption;
        if self.stopping.get() {
            self.cfg.admission.release(admitted);
            return; // dropping the fd closes it; the client reconnects
        }
        // The sending shard closed its own copy.
        let (socket, slot_fd) = Socket::adopt(fd);
        self.counters.adopted.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            let key = insert_conn(&mut st, session, slot_fd, now, login.capabilities, link);
            if let Some(ws) = ws
                && let Some(conn) = st.conn(key)
            {
                conn.io().ws = Some(ws);
            }
            self.register(&mut st, key, now, &login);
            key
        };
        // Frames that arrived right behind Auth on the old shard; their
        // answers wait in the queue for the task's first poll.
        if !leftover.is_empty() {
            self.on_bytes(key, &leftover);
        }
        glommio::spawn_local(ConnTask { shard: self.clone(), key, socket: Some(socket), tls, admitted }).detach();
    }
}

/// Header-only Pong, shared by every session.
pub(super) static PONG: [u8; codec::HEADER_LEN] = [codec::MAGIC, codec::VERSION, FrameKind::Pong as u8, 0, 0, 0, 0, 0];

pub(super) fn insert_conn(
    st: &mut State,
    session: Session,
    fd: SlotFd,
    now: Now,
    capabilities: u32,
    link: Link,
) -> ConnKey {
    st.next_gen = st.next_gen.wrapping_add(1);
    let generation = st.next_gen;
    let deadline = session.deadline();
    let index = st.conns.insert(Conn {
        session,
        waker: None,
        ident: None,
        io: None,
        generation,
        next_of_user: NO_CONN,
        fd,
        connected_at: u32::try_from(now.unix_secs()).unwrap_or(0),
        lens: [0; 4],
        capabilities: capabilities as u8,
        write_shut: false,
        link,
    }) as u32;
    let key = ConnKey { index, generation };
    st.wheel.insert(key, deadline);
    key
}

pub(super) fn take_handoff(conn: &mut Conn) -> Option<(ShardId, Box<Transit>)> {
    let io = conn.io.as_mut()?;
    let (owner, login) = io.handoff.take()?;
    let leftover = std::mem::take(&mut io.partial);
    let ws = io.ws.take();
    let link = conn.link;
    let transit =
        Transit { session: conn.session, login: *login, leftover, link, ws, tls: None, admitted: Admitted::NONE };
    Some((owner, Box::new(transit)))
}

/// The answer to a WebSocket client the node cannot take (connection
/// limit, shutting down before the upgrade finished).
const SERVICE_UNAVAILABLE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// Token bucket capping accepts per second on one shard.
pub(super) struct AcceptBucket {
    rate: u32,
    bucket: TokenBucket,
    epoch: Instant,
}

impl AcceptBucket {
    pub(super) fn new(rate: u32) -> AcceptBucket {
        AcceptBucket { rate, bucket: TokenBucket::new(f64::from(rate), Millis(0)), epoch: Instant::now() }
    }

    /// A reload changed the rate.
    pub(super) fn set_rate(&mut self, rate: u32) {
        if rate != self.rate {
            *self = AcceptBucket::new(rate);
        }
    }

    /// Takes one token; returns how long to wait when the bucket is empty.
    pub(super) fn take(&mut self, now: Instant) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let rate = f64::from(self.rate);
        let ms = Millis(now.saturating_duration_since(self.epoch).as_millis() as u64);
        self.bucket.refill(ms, rate, rate);
        self.bucket.take_or_owe(rate)
    }
}

/// The answer to a client's JOIN (`join`) or LEAVE.
fn group_result(group: String, join: bool, code: ErrorCode, reason: String) -> Frame {
    Frame::GroupResult(proto::GroupResult { group, join, code: code as i32, reason })
}
