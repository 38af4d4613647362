//! Persistent, pipelined connections to service backends.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LinkState {
    Down,
    Up,
}

/// One persistent connection to one backend.
pub(super) struct Link {
    pub(super) service: u16,
    pub(super) addr: SocketAddr,
    pub(super) state: LinkState,
    /// The socket while up, for writing outside the link's task (the
    /// task takes it back to close the socket).
    pub(super) fd: Option<SlotFd>,
    pub(super) out: OutQueue,
    /// Listed in `Upstream::dirty_links`.
    pub(super) dirty: bool,
    pub(super) waker: Option<Waker>,
    /// A reload removed its backend or service: it closes and stays down.
    pub(super) retired: bool,
}

impl Link {
    pub(super) fn new(service: u16, addr: SocketAddr) -> Link {
        Link {
            service,
            addr,
            state: LinkState::Down,
            fd: None,
            dirty: false,
            out: OutQueue::default(),
            waker: None,
            retired: false,
        }
    }

    pub(super) fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}

/// A link's read buffer: allocated and zeroed once, then reused (a
/// per-read `resize` would zero 64 KiB per read on the hot path).
pub(super) struct ReadBuf {
    pub(super) data: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl ReadBuf {
    pub(super) fn new() -> ReadBuf {
        ReadBuf { data: vec![0; READ_CHUNK], start: 0, end: 0 }
    }

    /// Room to read into: compacts, and grows only when one incomplete
    /// frame (its length already checked against the limit) fills it all.
    pub(super) fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else {
                self.data.resize(self.data.len() * 2, 0);
            }
        }
        &mut self.data[self.end..]
    }

    pub(super) fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
}

impl Shard {
    // ---- backend links ----------------------------------------------------

    /// Tries every backend link once (concurrently, each bounded by the
    /// connect timeout), then starts the link tasks and the periodic task.
    /// The shard reports ready after this, so the first requests find the
    /// backends that are up.
    pub async fn start_upstream(self: &Rc<Self>) {
        let (addrs, timeout): (Vec<(u32, SocketAddr)>, Duration) = {
            let st = self.state.borrow();
            let addrs = st.upstream.links.iter().map(|(i, l)| (i as u32, l.addr)).collect();
            (addrs, st.upstream.settings.connect_timeout)
        };
        let attempts: Vec<_> = addrs
            .into_iter()
            .map(|(idx, addr)| (idx, glommio::spawn_local(async move { connect(addr, timeout).await })))
            .collect();
        for (idx, attempt) in attempts {
            let first = attempt.await;
            glommio::spawn_local(Rc::clone(self).run_link(idx, Some(first))).detach();
        }
        glommio::spawn_local(Rc::clone(self).upstream_loop()).detach();
    }

    /// Keeps link `idx` connected until shutdown: serves it while up,
    /// reconnects with backoff while down.
    pub(crate) async fn run_link(self: Rc<Self>, idx: u32, mut first: Option<io::Result<TcpStream>>) {
        let (addr, service, min, max, timeout) = {
            let st = self.state.borrow();
            let Some(l) = st.upstream.links.get(idx as usize) else { return };
            let s = &st.upstream.settings;
            (
                l.addr,
                st.upstream.services[usize::from(l.service)].settings.id.clone(),
                s.backoff_min,
                s.backoff_max,
                s.connect_timeout,
            )
        };
        let mut backoff = min;
        let mut failures = 0u64;
        loop {
            if self.state.borrow().upstream.stopping || self.state.borrow().upstream.is_retired(idx) {
                return;
            }
            let attempt = match first.take() {
                Some(result) => result,
                None => connect(addr, timeout).await,
            };
            match attempt {
                Ok(stream) => {
                    bump(&self.counters.upstream.backend_connects);
                    info!(shard = %self.id, service = %service, backend = %addr, "backend connected");
                    backoff = min;
                    failures = 0;
                    let (mut socket, slot_fd) = Socket::new(stream);
                    self.link_up(idx, slot_fd);
                    let mut rbuf = ReadBuf::new();
                    std::future::poll_fn(|cx| self.poll_link(idx, socket.stream(), &mut rbuf, cx)).await;
                    if let Some(slot_fd) = self.link_down(idx) {
                        socket.close(slot_fd);
                    }
                    bump(&self.counters.upstream.backend_disconnects);
                    if !self.state.borrow().upstream.stopping {
                        warn!(shard = %self.id, service = %service, backend = %addr, "backend connection lost; reconnecting");
                    }
                }
                Err(err) => {
                    bump(&self.counters.upstream.backend_connect_failures);
                    failures += 1;
                    // Once per outage at warn; the retries at debug.
                    if failures == 1 {
                        warn!(shard = %self.id, service = %service, backend = %addr, error = %err, "backend down; retrying with backoff");
                    } else {
                        debug!(shard = %self.id, service = %service, backend = %addr, error = %err, failures, "backend still down");
                    }
                }
            }
            if self.state.borrow().upstream.stopping {
                return;
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(max);
        }
    }

    pub(super) fn link_up(&self, idx: u32, fd: SlotFd) {
        let mut st = self.state.borrow_mut();
        let now = self.now().mono;
        let up = &mut st.upstream;
        let Some(link) = up.links.get_mut(idx as usize) else { return };
        link.state = LinkState::Up;
        link.fd = Some(fd);
        let service = link.service;
        // Events that waited for a backend.
        up.pump_events(service, now, &self.counters.upstream);
        self.flush_upstream(&mut st);
    }

    /// The link broke: its requests in flight are answered UNAVAILABLE (they
    /// may have been processed, so they are not re-sent), its event batch
    /// is re-sent on another link.
    /// Returns the link's socket handle.
    pub(super) fn link_down(&self, idx: u32) -> Option<SlotFd> {
        let mut st = self.state.borrow_mut();
        let now = self.now().mono;
        let up = &mut st.upstream;
        let link = up.links.get_mut(idx as usize)?;
        link.state = LinkState::Down;
        let fd = link.fd.take();
        link.out.clear();
        let service = link.service;
        let lost: Vec<u64> = up.pending.iter().filter(|(_, p)| p.link == idx).map(|(&id, _)| id).collect();
        if let Some(b) = up.services[usize::from(service)].events.as_mut().and_then(|q| q.inflight.as_mut())
            && b.link == Some(idx)
        {
            b.link = None;
            bump(&self.counters.upstream.events_resent_batches);
        }
        up.pump_events(service, now, &self.counters.upstream);
        for id in lost {
            let reason = "the backend connection broke; the request may or may not have been processed".to_owned();
            self.complete(&mut st, id, Outcome::error(ErrorCode::Unavailable, reason));
        }
        self.flush_upstream(&mut st);
        fd
    }

    pub(super) fn poll_link(
        &self,
        idx: u32,
        stream: &mut TcpStream,
        rbuf: &mut ReadBuf,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let max_body = self.cfg.max_frame_bytes.saturating_add(LINK_FRAME_SLACK);
        for _ in 0..READS_PER_POLL {
            {
                let mut st = self.state.borrow_mut();
                let stopping = st.upstream.stopping;
                let Some(link) = st.upstream.links.get_mut(idx as usize) else { return Poll::Ready(()) };
                if stopping || link.retired || link.out.flush(stream, cx).is_err() {
                    return Poll::Ready(());
                }
                if !link.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    link.waker = Some(cx.waker().clone());
                }
            }
            let read = futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, rbuf.spare());
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(n)) => rbuf.end += n,
            }
            match self.on_link_bytes(idx, rbuf.filled(), max_body) {
                Ok(consumed) => rbuf.start += consumed,
                Err(()) => return Poll::Ready(()),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles every whole frame in `input`; returns the bytes consumed. An
    /// error means the backend broke the protocol: drop the link.
    pub(super) fn on_link_bytes(&self, idx: u32, input: &[u8], max_body: u32) -> Result<usize, ()> {
        let mut st = self.state.borrow_mut();
        let now = self.now().mono;
        let mut pos = 0;
        let result = loop {
            match codec::split_frame(&input[pos..], max_body) {
                Ok(None) => break Ok(pos),
                Ok(Some((header, body))) => {
                    pos += header.frame_len();
                    match Frame::decode(header, body) {
                        Ok(Frame::UpstreamResponse(r)) => {
                            let outcome = Outcome { status: r.status, body: r.body, reason: r.reason };
                            if st.upstream.pending.get(&r.id).is_some_and(|p| p.link == idx) {
                                self.complete(&mut st, r.id, outcome);
                            } else {
                                bump(&self.counters.upstream.late);
                            }
                        }
                        Ok(Frame::EventsAck(a)) => {
                            st.upstream.on_events_ack(idx, a.batch_id, now, &self.counters.upstream)
                        }
                        Ok(other) => {
                            warn!(shard = %self.id, kind = ?other.kind(), "unexpected frame from a backend; dropping the link");
                            break Err(());
                        }
                        Err(err) => {
                            warn!(shard = %self.id, error = %err, "bad frame from a backend; dropping the link");
                            break Err(());
                        }
                    }
                }
                Err(err) => {
                    warn!(shard = %self.id, error = %err, "bad frame from a backend; dropping the link");
                    break Err(());
                }
            }
        };
        // Every answer read in this pass goes out now, one write per client.
        self.flush_upstream(&mut st);
        result
    }
}

pub(super) async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, timeout).await.map_err(io::Error::from)?;
    stream.set_nodelay(true).map_err(io::Error::from)?;
    Ok(stream)
}
