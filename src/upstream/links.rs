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

// ---- backend links ----------------------------------------------------

/// Tries every backend link once (concurrently, each bounded by the
/// connect timeout), then starts the link tasks and the periodic task.
/// The shard reports ready after this, so the first requests find the
/// backends that are up.
pub(crate) async fn start<S: UpstreamShard>(shard: &Rc<S>) {
    let (addrs, timeout): (Vec<(u32, SocketAddr)>, Duration) = shard.enter(|h| {
        let up = h.upstream();
        let addrs = up.links.iter().map(|(i, l)| (i as u32, l.addr)).collect();
        (addrs, up.settings.connect_timeout)
    });
    let attempts: Vec<_> = addrs
        .into_iter()
        .map(|(idx, addr)| (idx, glommio::spawn_local(async move { connect(addr, timeout).await })))
        .collect();
    for (idx, attempt) in attempts {
        let first = attempt.await;
        glommio::spawn_local(run_link(Rc::clone(shard), idx, Some(first))).detach();
    }
    glommio::spawn_local(upstream_loop(Rc::clone(shard))).detach();
}

/// Keeps link `idx` connected until shutdown: serves it while up,
/// reconnects with backoff while down.
pub(crate) async fn run_link<S: UpstreamShard>(shard: Rc<S>, idx: u32, mut first: Option<io::Result<TcpStream>>) {
    let Some((addr, service, min, max, timeout, id)) = shard.enter(|h| {
        let id = h.shard_id();
        let up = h.upstream();
        let l = up.links.get(idx as usize)?;
        let s = &up.settings;
        Some((
            l.addr,
            up.services[usize::from(l.service)].settings.id.clone(),
            s.backoff_min,
            s.backoff_max,
            s.connect_timeout,
            id,
        ))
    }) else {
        return;
    };
    let mut backoff = min;
    let mut failures = 0u64;
    loop {
        if shard.enter(|h| h.upstream().stopping || h.upstream().is_retired(idx)) {
            return;
        }
        let attempt = match first.take() {
            Some(result) => result,
            None => connect(addr, timeout).await,
        };
        match attempt {
            Ok(stream) => {
                shard.enter(|h| bump(&h.counters().backend_connects));
                info!(shard = %id, service = %service, backend = %addr, "backend connected");
                backoff = min;
                failures = 0;
                let (mut socket, slot_fd) = Socket::new(stream);
                shard.enter(|h| link_up(h, idx, slot_fd));
                let mut rbuf = ReadBuf::new();
                std::future::poll_fn(|cx| poll_link(&*shard, idx, socket.stream(), &mut rbuf, cx)).await;
                if let Some(slot_fd) = shard.enter(|h| link_down(h, idx)) {
                    socket.close(slot_fd);
                }
                if !shard.enter(|h| {
                    bump(&h.counters().backend_disconnects);
                    h.upstream().stopping
                }) {
                    warn!(shard = %id, service = %service, backend = %addr, "backend connection lost; reconnecting");
                }
            }
            Err(err) => {
                shard.enter(|h| bump(&h.counters().backend_connect_failures));
                failures += 1;
                // Once per outage at warn; the retries at debug.
                if failures == 1 {
                    warn!(shard = %id, service = %service, backend = %addr, error = %err, "backend down; retrying with backoff");
                } else {
                    debug!(shard = %id, service = %service, backend = %addr, error = %err, failures, "backend still down");
                }
            }
        }
        if shard.enter(|h| h.upstream().stopping) {
            return;
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(max);
    }
}

fn link_up<H: UpstreamHost>(h: &mut H, idx: u32, fd: SlotFd) {
    let now = h.now().mono;
    let (up, c) = h.parts();
    let Some(link) = up.links.get_mut(idx as usize) else { return };
    link.state = LinkState::Up;
    link.fd = Some(fd);
    let service = link.service;
    // Events that waited for a backend.
    up.pump_events(service, now, c);
    flush(h);
}

/// The link broke: its requests in flight are answered UNAVAILABLE (they
/// may have been processed, so they are not re-sent), its event batch
/// is re-sent on another link.
/// Returns the link's socket handle.
pub(super) fn link_down<H: UpstreamHost>(h: &mut H, idx: u32) -> Option<SlotFd> {
    let now = h.now().mono;
    let (up, c) = h.parts();
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
        bump(&c.events_resent_batches);
    }
    up.pump_events(service, now, c);
    for id in lost {
        let reason = "the backend connection broke; the request may or may not have been processed".to_owned();
        complete(h, id, Outcome::error(ErrorCode::Unavailable, reason));
    }
    flush(h);
    fd
}

fn poll_link<S: UpstreamShard>(
    shard: &S,
    idx: u32,
    stream: &mut TcpStream,
    rbuf: &mut ReadBuf,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let max_body = shard.enter(|h| h.max_frame_bytes()).saturating_add(LINK_FRAME_SLACK);
    for _ in 0..READS_PER_POLL {
        let ready = shard.enter(|h| {
            let up = h.upstream();
            let stopping = up.stopping;
            let Some(link) = up.links.get_mut(idx as usize) else { return false };
            if stopping || link.retired || link.out.flush(stream, cx).is_err() {
                return false;
            }
            if !link.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                link.waker = Some(cx.waker().clone());
            }
            true
        });
        if !ready {
            return Poll::Ready(());
        }
        let read = futures_lite::AsyncRead::poll_read(Pin::new(&mut *stream), cx, rbuf.spare());
        match read {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(n)) => rbuf.end += n,
        }
        match shard.enter(|h| on_link_bytes(h, idx, rbuf.filled(), max_body)) {
            Ok(consumed) => rbuf.start += consumed,
            Err(()) => return Poll::Ready(()),
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Handles every whole frame in `input`; returns the bytes consumed. An
/// error means the backend broke the protocol: drop the link.
pub(super) fn on_link_bytes<H: UpstreamHost>(h: &mut H, idx: u32, input: &[u8], max_body: u32) -> Result<usize, ()> {
    let now = h.now().mono;
    let id = h.shard_id();
    let mut pos = 0;
    let result = loop {
        match codec::split_frame(&input[pos..], max_body) {
            Ok(None) => break Ok(pos),
            Ok(Some((header, body))) => {
                pos += header.frame_len();
                match Frame::decode(header, body) {
                    Ok(Frame::UpstreamResponse(r)) => {
                        let outcome = Outcome { status: r.status, body: r.body, reason: r.reason };
                        if h.upstream().pending.get(&r.id).is_some_and(|p| p.link == idx) {
                            complete(h, r.id, outcome);
                        } else {
                            bump(&h.counters().late);
                        }
                    }
                    Ok(Frame::EventsAck(a)) => {
                        let (up, c) = h.parts();
                        up.on_events_ack(idx, a.batch_id, now, c)
                    }
                    Ok(other) => {
                        warn!(shard = %id, kind = ?other.kind(), "unexpected frame from a backend; dropping the link");
                        break Err(());
                    }
                    Err(err) => {
                        warn!(shard = %id, error = %err, "bad frame from a backend; dropping the link");
                        break Err(());
                    }
                }
            }
            Err(err) => {
                warn!(shard = %id, error = %err, "bad frame from a backend; dropping the link");
                break Err(());
            }
        }
    };
    // Every answer read in this pass goes out now, one write per client.
    flush(h);
    result
}

pub(super) async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, timeout).await.map_err(io::Error::from)?;
    stream.set_nodelay(true).map_err(io::Error::from)?;
    Ok(stream)
}
