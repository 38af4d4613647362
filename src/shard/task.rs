//! Accepting client connections and the connection task: reads into the
//! shard's scratch buffer, frames, the session's actions, writes, the
//! hand-off of a connection to its owner shard and its adoption there.

use super::*;

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
}

impl std::future::Future for ConnTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(socket) = this.socket.as_mut() else { return Poll::Ready(()) };
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
}

impl Shard {
    // ---- accepting ------------------------------------------------------

    /// Accepts client connections until [`Shard::begin_shutdown`].
    pub async fn accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener) {
        self.accept_link_loop(listener, Link::Plain).await;
    }

    /// [`Shard::accept_loop`] for a listener of another transport.
    pub async fn accept_link_loop(self: Rc<Self>, listener: glommio::net::TcpListener, link: Link) {
        let mut bucket = AcceptBucket::new(self.cfg.accept_rate_per_sec);
        while let Some(accepted) = self.accept_or_stop(&listener).await {
            match accepted {
                Ok(stream) => self.on_accept(stream, link),
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
        futures_lite::future::or(async { Some(listener.accept().await) }, async {
            let _ = self.stop_accepting.acquire(1).await;
            None
        })
        .await
    }

    pub(super) fn on_accept(self: &Rc<Self>, stream: TcpStream, link: Link) {
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            if st.conns.len() >= self.cfg.max_connections as usize {
                drop(st);
                debug!(shard = %self.id, "connection limit reached; refusing");
                // Best effort: the socket is fresh, a small frame fits.
                // (Over TLS nothing can be said before a handshake.)
                let bytes = match link {
                    Link::Plain => {
                        Frame::Error(codes::error_body(ErrorCode::ServerError, "connection limit reached")).to_bytes()
                    }
                    Link::WsUpgrade | Link::Ws => Bytes::from_static(SERVICE_UNAVAILABLE),
                    Link::Tls | Link::WssUpgrade | Link::Wss => return,
                };
                let _ = fd::send(fd::stream_fd(&stream), &bytes);
                return;
            }
            let tls = match link.is_tls() {
                false => None,
                true => match self.tls_session(link) {
                    Some(session) => Some(Box::new(TlsLink::new(session))),
                    None => return,
                },
            };
            let session = Session::new(now.mono, &self.cfg.params);
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
        glommio::spawn_local(ConnTask { shard, key, socket: Some(socket), tls }).detach();
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
                    let Transit { session, login, leftover, link, ws, tls } = *transit;
                    self.counters.handed_off.fetch_add(1, Ordering::Relaxed);
                    let adoption = Adoption { fd, session, login, leftover, link, ws, tls };
                    self.outbox.send(owner, ShardMsg::Adopt(Box::new(adoption)));
                }
                Err(err) => warn!(shard = %self.id, error = %err, "dup failed; dropping connection"),
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
            match codec::split_frame(&input[pos..], self.cfg.max_frame_bytes) {
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
                            conn.session.handle_frame(now, frame, &self.cfg.params, &mut actions)
                        }
                        Err(err) => conn.session.handle_codec_error(now, &err, &self.cfg.params, &mut actions),
                    }
                }
                Err(err) => {
                    pos = input.len();
                    conn.session.handle_codec_error(now, &err, &self.cfg.params, &mut actions);
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
                            conn.session.close(now, ErrorCode::LimitExceeded, reason, &self.cfg.params, &mut more);
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
                Action::Ack(seq) => self.on_ack(st, key, now, seq),
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
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), device = conn.device().unwrap_or(""), ?code, "closing");
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

    /// The bytes of one read on a WebSocket connection: the upgrade's
    /// request head until it is answered, then frames, unmasked in place in
    /// the scratch buffer and handed to framing like TCP bytes. `Err` closes
    /// the connection now (after a best-effort write of what is queued: the
    /// HTTP error or the Close frame).
    pub(super) fn on_ws_read(&self, key: ConnKey, buf: &mut [u8], draining: bool) -> Result<(), ()> {
        let max = ws::decode::max_message_bytes(self.cfg.max_frame_bytes);
        let mut guard = self.state.borrow_mut();
        let Some(conn) = guard.conn(key) else { return Err(()) };
        let mut state = conn.io().ws.take().unwrap_or_default();
        let mut start = 0;
        if let Some(head) = state.upgrade.as_mut() {
            let parsed = match head.feed(buf) {
                Ok(ws::handshake::Feed::Incomplete) => {
                    conn.io().ws = Some(state);
                    return Ok(());
                }
                Ok(ws::handshake::Feed::Complete { consumed }) => {
                    start = consumed;
                    ws::handshake::parse_request(head.head(), &self.cfg.ws)
                }
                Err(err) => Err(err),
            };
            state.upgrade = None;
            match parsed {
                Ok(accepted) => {
                    conn.link = conn.link.upgraded();
                    conn.io().out.push(Bytes::from(accepted.response()));
                    state.token = accepted.token;
                }
                Err(err) => {
                    debug!(shard = %self.id, error = %err, "WebSocket upgrade refused");
                    let io = conn.io.get_or_insert_with(Box::default);
                    io.out.push(Bytes::from(err.response()));
                    // Over TLS the caller seals and writes it.
                    if !conn.link.is_tls() {
                        let _ = io.out.write_now(conn.fd.get());
                    }
                    return Err(());
                }
            }
        }
        let data = &mut buf[start..];
        let (data_len, close) = match state.decoder.decode(data, max) {
            Ok(out) => {
                if let Some(ping) = out.pong {
                    // One pong per read at most (the decoder keeps the last
                    // ping), and none past the queue's bound.
                    let io = conn.io();
                    if io.out.bytes() < self.cfg.outbound_queue_bytes as usize {
                        io.out.push(ws::encode::encode_pong(ping.as_bytes()));
                    }
                }
                (out.data_len, out.close.map(|c| c.reply()))
            }
            Err(err) => {
                debug!(shard = %self.id, error = %err, "WebSocket protocol error");
                (0, Some(ws::encode::encode_close(err.close_code(), &err.to_string())))
            }
        };
        if !state.is_idle() || close.is_some() {
            conn.io().ws = Some(state);
        }
        conn.wake();
        if data_len > 0 && !draining {
            drop(guard);
            self.on_bytes(key, &data[..data_len]);
            guard = self.state.borrow_mut();
        }
        let Some(close) = close else { return Ok(()) };
        // The peer closed or broke the protocol: our Close goes after what
        // is queued, as far as the socket takes it now; then the socket
        // closes.
        if let Some(conn) = guard.conn(key) {
            let io = conn.io.get_or_insert_with(Box::default);
            io.out.push(close);
            if !conn.link.is_tls() {
                let _ = io.out.write_now(conn.fd.get());
            }
        }
        Err(())
    }

    /// The bytes of one read on a TLS connection: records decrypted in
    /// place (after any incomplete record kept from the last read), the
    /// plaintext handed to framing (or, for wss, to the WebSocket side).
    /// What rustls answers (handshake, alerts) is queued as sealed. `Err`
    /// closes the connection now, after a best-effort write of what is
    /// queued.
    pub(super) fn on_tls_read(&self, key: ConnKey, t: &mut TlsLink, buf: &mut [u8], draining: bool) -> Result<(), ()> {
        let mut carried = std::mem::take(&mut t.tail);
        let input: &mut [u8] = if carried.is_empty() {
            buf
        } else {
            carried.extend_from_slice(buf);
            &mut carried
        };
        let mut plain = std::mem::take(&mut *self.plain_scratch.borrow_mut());
        plain.clear();
        let mut out = Vec::new();
        let read = t.session.read(input, &mut out, &mut |p| plain.extend_from_slice(p));
        if !out.is_empty() {
            t.cipher.push(Bytes::from(out));
        }
        let mut result = match read {
            Ok(progress) => {
                let rest = &input[progress.consumed.min(input.len())..];
                if t.session.is_handshaking() && rest.len() > MAX_TLS_HANDSHAKE_TAIL {
                    debug!(shard = %self.id, carried = rest.len(), "TLS handshake message too large");
                    Err(())
                } else {
                    t.tail = rest.to_vec();
                    // Input after close_notify is never read (review
                    // finding 2): the connection ends here.
                    if progress.peer_closed { Err(()) } else { Ok(()) }
                }
            }
            Err(err) => {
                debug!(shard = %self.id, error = %err, "TLS failed");
                Err(())
            }
        };
        let link = self.state.borrow().conn_ref(key).map(|c| c.link);
        if !plain.is_empty() {
            match link.map(Link::form) {
                Some(Link::Plain) if !draining => self.on_bytes(key, &plain),
                Some(Link::WsUpgrade | Link::Ws) if self.on_ws_read(key, &mut plain, draining).is_err() => {
                    result = Err(());
                }
                _ => {}
            }
        }
        if plain.capacity() <= self.cfg.read_buffer_bytes * 2 {
            *self.plain_scratch.borrow_mut() = plain;
        }
        if result.is_err() {
            // The alert, an HTTP error or a Close frame: as far as the socket
            // takes it now.
            let mut st = self.state.borrow_mut();
            if let Some(conn) = st.conn(key) {
                if let Some(io) = conn.io.as_mut() {
                    let _ = t.seal(&mut io.out);
                }
                let _ = t.cipher.write_now(conn.fd.get());
            }
        }
        t.release_idle();
        result
    }

    /// The server session for a connection accepted on a TLS listener, with
    /// the certificate in force now.
    fn tls_session(&self, link: Link) -> Option<crate::conn::tls::ServerTls> {
        let mut handles = self.tls_configs.borrow_mut();
        let handle = match link {
            Link::Tls => handles.0.as_mut(),
            _ => handles.1.as_mut(),
        }?;
        match crate::conn::tls::ServerTls::server(handle.current().clone()) {
            Ok(session) => Some(session),
            Err(err) => {
                warn!(shard = %self.id, error = %err, "cannot start a TLS session");
                None
            }
        }
    }

    /// [`Shard::queue_bytes`] without waking the task.
    pub(super) fn enqueue(&self, st: &mut State, key: ConnKey, bytes: Bytes) -> bool {
        let limit = self.cfg.outbound_queue_bytes as usize;
        let Some(link) = st.conn_ref(key).map(|c| c.link) else { return false };
        let Some(bytes) = st.wrapper.wrap(link, &bytes) else { return false };
        let Some(conn) = st.conn(key) else { return false };
        let closing = conn.session.phase() == Phase::Closing;
        let io = conn.io();
        if io.out.bytes() + bytes.len() > limit && !io.out.is_empty() {
            if closing {
                // The closing frame (Error, Kicked) does not fit behind what
                // is still queued: close without it.
                return false;
            }
            // The client is not reading. Drop the backlog (but finish a
            // frame already on the wire) and tell it why, if the Error
            // frame fits in the bound.
            let dropped = io.out.cut();
            self.close_slow(st, key, dropped, format!("outbound queue above {limit} bytes"));
            return false;
        }
        io.out.push(bytes);
        true
    }

    pub(super) fn close_slow(&self, st: &mut State, key: ConnKey, dropped: usize, reason: String) {
        self.counters.slow_closed.fetch_add(1, Ordering::Relaxed);
        self.counters.slow_dropped_frames.fetch_add(dropped as u64, Ordering::Relaxed);
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), dropped, %reason, "slow consumer");
        let now = self.now();
        let mut actions = Vec::new();
        if let Some(conn) = st.conn(key) {
            conn.session.close(now, ErrorCode::Slow, reason, &self.cfg.params, &mut actions);
        }
        self.apply(st, key, now, &mut actions);
    }

    /// Hands `frame` to an active session: written at once when nothing is
    /// queued ahead of it, else queued. Returns whether it was accepted.
    /// Counted as a delivered message.
    pub(crate) fn deliver(&self, st: &mut State, slot: u32, frame: &Bytes) -> bool {
        let ok = self.send_to_slot(st, slot, frame);
        if ok {
            self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// [`Shard::deliver`] without counting (resends, control frames).
    pub(crate) fn send_to_slot(&self, st: &mut State, slot: u32, frame: &Bytes) -> bool {
        let key = st.key_of(slot);
        let Some(conn) = st.conn_ref(key) else { return false };
        if !conn.is_active() {
            return false;
        }
        self.count_out(frame.len());
        let Some(wire) = st.wrapper.wrap(conn.link, frame) else { return false };
        let frame = &wire;
        let Some(conn) = st.conn(key) else { return false };
        // Over TLS every record is sealed by the connection's task.
        let idle = conn.io.as_ref().is_none_or(|io| io.out.is_empty()) && !conn.link.is_tls();
        let written = if idle {
            // On an error, let the task find it on its own write.
            fd::send(conn.fd.get(), frame).unwrap_or(0)
        } else {
            0
        };
        if written == frame.len() {
            return true;
        }
        if written == 0 {
            // Already in its wire form: queued as it is.
            return self.queue_raw(st, key, frame.clone());
        }
        // Part of the frame is on the wire. The queue (empty: `idle`) takes
        // the whole frame marked as partly written, so that cutting a slow
        // client later finishes this frame instead of dropping its tail.
        conn.io().out.push_written(frame.clone(), written);
        conn.wake();
        true
    }

    /// Queues `frame` for an active session and lists the session for the
    /// flusher task, which writes each listed session's whole queue with one
    /// `writev` a chunk of sessions at a time, letting the executor poll
    /// for new work in between. A fan-out costs a queue push per member;
    /// when fan-outs arrive faster than the sockets are written, frames for
    /// the same session pile up and go out together: fewer syscalls per
    /// delivery exactly when the shard is behind. Counted as delivered.
    pub(crate) fn deliver_batched(&self, st: &mut State, slot: u32, frame: &Bytes) -> bool {
        let key = st.key_of(slot);
        if !st.conn(key).is_some_and(|c| c.is_active()) || !self.enqueue(st, key, frame.clone()) {
            return false;
        }
        self.count_out(frame.len());
        if let Some(io) = st.conn(key).and_then(|c| c.io.as_mut())
            && !io.in_flush
        {
            io.in_flush = true;
            st.flush.push_back(key);
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Starts the flusher task if sessions wait in the flush list.
    pub(super) fn kick_flusher(&self, st: &State) {
        if !st.flush.is_empty() && !self.flushing.get() {
            let _ = self.flush_wake.try_send(());
        }
    }

    /// Writes the queues of listed sessions, a chunk at a time, until the
    /// list is empty; then waits to be woken again.
    pub async fn flusher_loop(self: Rc<Self>) {
        let Some(wake) = self.flush_rx.borrow_mut().take() else { return };
        let mut chunk = Vec::with_capacity(FLUSH_CHUNK);
        while wake.recv().await.is_some() {
            self.flushing.set(true);
            loop {
                {
                    let mut st = self.state.borrow_mut();
                    let n = st.flush.len().min(FLUSH_CHUNK);
                    chunk.extend(st.flush.drain(..n));
                    self.flush_responses(&mut st, &chunk);
                    self.counters.fanout_writes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                if chunk.is_empty() {
                    break;
                }
                chunk.clear();
                // Other tasks run before the next chunk; fan-outs that arrive
                // meanwhile (the executor polls its rings at the latest when
                // its preemption timer fires) join the queues being written.
                // Measured: a zero timer here instead polls more often and
                // coalesces less (p99 ~710 ms instead of ~390 ms at 1M/s).
                futures_lite::future::yield_now().await;
            }
            self.flushing.set(false);
        }
    }

    /// Queues an upstream `Response` frame for session `key` (dropped if
    /// the session is gone or closing) without waking its task: the
    /// upstream code writes every answer of one pass with one `writev` per
    /// session at the end of the pass ([`Shard::flush_responses`]).
    pub(crate) fn respond(&self, st: &mut State, key: ConnKey, frame: Bytes) -> bool {
        self.count_out(frame.len());
        st.conn(key).is_some_and(|c| c.is_active()) && self.enqueue(st, key, frame)
    }

    pub(super) fn count_out(&self, bytes: usize) {
        self.counters.frames_out.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Writes what [`Shard::respond`] queued for `keys`; a socket that is
    /// full (or failed) is left to its task, which is woken.
    pub(crate) fn flush_responses(&self, st: &mut State, keys: &[ConnKey]) {
        for &key in keys {
            let Some(conn) = st.conn(key) else { continue };
            let Some(io) = conn.io.as_mut() else { continue };
            io.in_flush = false;
            if io.out.is_empty() {
                conn.release_io_if_idle();
                continue;
            }
            if conn.link.is_tls() {
                conn.wake();
            } else if let Ok(true) = io.out.write_now(conn.fd.get()) {
                io.stalled_since = None;
                conn.release_io_if_idle();
            } else {
                conn.wake();
            }
        }
    }

    /// Closes session `key` from the server side with an `Error` frame.
    pub(crate) fn close_conn(&self, st: &mut State, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        let mut actions = Vec::new();
        if let Some(conn) = st.conn(key) {
            conn.session.close(now, code, reason, &self.cfg.params, &mut actions);
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
        let Adoption { fd, session, login, leftover, link, ws, tls } = adoption;
        if self.stopping.get() {
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
        glommio::spawn_local(ConnTask { shard: self.clone(), key, socket: Some(socket), tls }).detach();
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
    Some((owner, Box::new(Transit { session: conn.session, login: *login, leftover, link, ws, tls: None })))
}

/// Writes a TLS connection's sealed records, then seals what was queued
/// since and writes that: `Ok(true)` when both are empty, `Ok(false)` when
/// the socket is full (write readiness is armed).
fn flush_tls(
    t: &mut TlsLink,
    plain: &mut OutQueue,
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
) -> std::io::Result<bool> {
    loop {
        if !t.cipher.flush(stream, cx)? {
            return Ok(false);
        }
        if plain.is_empty() || t.session.is_handshaking() || t.sent_close {
            t.release_idle();
            return Ok(true);
        }
        t.seal(plain).map_err(std::io::Error::other)?;
    }
}

/// An Auth frame without a token takes the one of the WebSocket handshake
/// (browsers cannot set headers); it is checked like any other. The
/// handshake token is dropped at the first Auth either way.
fn handshake_token(conn: &mut Conn, auth: &mut proto::Auth) {
    let Some(token) = conn.io.as_mut().and_then(|io| io.ws.as_mut()).and_then(|ws| ws.token.take()) else { return };
    if auth.token.is_empty() {
        auth.token = token.expose().to_owned();
    }
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
