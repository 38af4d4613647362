//! Accepting client connections and the connection task: reads into the
//! shard's scratch buffer, frames, the session's actions, writes, the
//! hand-off of a connection to its owner shard and its adoption there.

use std::os::fd::OwnedFd;

use super::links::{flush_tls, on_tls_read, on_ws_read, tls_session};
use super::*;
use crate::admission::{Admitted, Refusal, RefusalLog};
use crate::upgrade::wire::{RecordPhase, SessionRecord};

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
            this.shard.state.borrow_mut().park_conn(this.key, cx.waker());
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
                true => match tls_session(self, link) {
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
                let flushed = if let Some(t) = tls.as_deref_mut() {
                    // Sealed records first, then the frames queued since,
                    // sealed as one batch once those are out.
                    let io = conn.io.get_or_insert_with(Box::default);
                    Some(flush_tls(t, &mut io.out, stream, cx))
                } else {
                    conn.io.as_mut().map(|io| io.out.flush(stream, cx))
                };
                if let (Some(flushed), Some(io)) = (flushed, conn.io.as_mut()) {
                    match flushed {
                        Err(err) => {
                            debug!(shard = %self.id, tls = tls.is_some(), error = %err, "write failed");
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
                    _ if let Some(t) = tls.as_deref_mut() => Some(on_tls_read(self, key, t, &mut buf[..n], draining)),
                    Link::Plain if !draining => {
                        self.on_bytes(key, &buf[..n]);
                        Some(Ok(()))
                    }
                    Link::Plain => Some(Ok(())),
                    Link::WsUpgrade | Link::Ws | Link::Tls | Link::WssUpgrade | Link::Wss => {
                        Some(on_ws_read(self, key, &mut buf[..n], draining))
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
        let consumed = self.ctx(&mut st).handle_input(key, input);
        let rest = &input[consumed..];
        if let Some(conn) = st.conn(key) {
            if !rest.is_empty() && conn.session.phase() != Phase::Closing {
                let io = conn.io();
                io.partial.clear();
                io.partial.extend_from_slice(rest);
            }
            conn.release_io_if_idle();
        }
        // Upstream requests (and immediate answers) of this read go
        // out together.
        crate::upstream::flush(&mut self.ctx(&mut st));
    }

    /// Removes the slot of `key`; returns its socket handle.
    pub(super) fn remove_conn(&self, key: ConnKey) -> Option<SlotFd> {
        let mut st = self.state.borrow_mut();
        st.conn(key)?;
        self.ctx(&mut st).unindex(key.index, ErrorCode::Unspecified);
        st.upstream.forget_conn(key);
        let conn = st.conns.remove(key.index as usize);
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        Some(conn.fd)
    }

    /// New process: takes in the sessions the old one handed over (before
    /// this shard accepts anything).
    pub(crate) fn restore(self: &Rc<Self>, sessions: Vec<(SessionRecord, OwnedFd)>) {
        let count = sessions.len();
        for (record, fd) in sessions {
            let now = self.now();
            // Counted against its source's limits here too, so that an
            // upgrade does not hand a source a fresh allowance.
            let admitted = match socket2::SockRef::from(&fd).peer_addr().ok().and_then(|a| a.as_socket()) {
                Some(peer) => self.cfg.admission.carry_over(peer.ip()),
                None => crate::admission::Admitted::NONE,
            };
            let (socket, slot_fd) = Socket::adopt(fd);
            let link = if record.ws { Link::Ws } else { Link::Plain };
            let phase = match record.phase {
                RecordPhase::Handshaking => Phase::Handshaking,
                RecordPhase::Active => Phase::Active,
                RecordPhase::Authenticated => Phase::Authenticated,
            };
            let deadline = now.mono.add_ms(record.deadline_in_ms);
            let session = Session::restored(phase, now.mono, deadline, record.idle_timeout_ms, record.expires_in_ms);
            let capabilities = record.login.as_ref().map_or(0, |l| l.capabilities);
            let key = {
                let mut st = self.state.borrow_mut();
                let key = insert_conn(&mut st, session, slot_fd, now, capabilities, link);
                if let Some(conn) = st.conn(key) {
                    conn.connected_at = record.connected_at;
                    if !record.out.is_empty() {
                        conn.io().out.push(Bytes::from(record.out));
                    }
                    if !record.partial.is_empty() {
                        conn.io().partial = record.partial;
                    }
                }
                match (record.phase, record.login) {
                    (RecordPhase::Handshaking, _) => {}
                    (RecordPhase::Active, Some(login)) => {
                        self.ctx(&mut st).restore_active(key, now, &login, &record.groups, record.delivery)
                    }
                    // As an adoption: registered, then activated (AuthOk).
                    (RecordPhase::Authenticated, Some(login)) => self.ctx(&mut st).register(key, now, &login),
                    (_, None) => {
                        // Not a record the old process writes; let the
                        // session time out rather than guess who it is.
                        if let Some(conn) = st.conn(key) {
                            conn.session.closed_by_peer();
                        }
                    }
                }
                // Whole frames waiting behind a pause, if any.
                if st.conn_ref(key).is_some_and(|c| c.is_active()) {
                    self.ctx(&mut st).resume_input(key);
                }
                key
            };
            glommio::spawn_local(ConnTask::new(self.clone(), key, socket, admitted)).detach();
        }
        if count > 0 {
            info!(shard = %self.id, sessions = count, "sessions taken over");
        }
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
            self.ctx(&mut st).register(key, now, &login);
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
pub(super) const SERVICE_UNAVAILABLE: &[u8] =
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
