//! One shard: everything a single glommio executor (one core) owns.
//!
//! A shard accepts on its own SO_REUSEPORT listener, keeps its sessions in a
//! slab, indexes them by device and by user, and drives every deadline from
//! one timer wheel. Nothing here is shared with other threads except rare
//! counters; other shards reach it only through the channel mesh.
//!
//! Each connection is one task that waits in [`Shard::poll_conn`]. It reads
//! into the shard's scratch buffer, so an idle connection holds no read
//! buffer: only an incomplete frame is copied out and kept. Outbound frames
//! wait in a per-connection queue bounded in bytes, allocated only while
//! something is queued.
//!
//! Owner shard: a device lives on `owner_shard(device)`. A connection that
//! authenticates on another shard is handed over (fd, session, login and any
//! bytes already read) through the mesh, and the owner sends `AuthOk`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_lite::AsyncWrite;
use glommio::channels::channel_mesh::Senders;
use glommio::net::TcpStream;
use hashbrown::HashTable;
use slab::Slab;
use tracing::{debug, info, warn};

use crate::codec::{self, Frame};
use crate::codes;
use crate::ids::{ConnId, ConnKey, ShardId, owner_shard, stable_hash};
use crate::proto::{self, ErrorCode, FrameKind};
use crate::session::{Action, Login, Millis, Now, Params, Phase, Session};
use crate::wheel::Wheel;

/// Reads handled in one poll of a connection before yielding to others.
const READS_PER_POLL: usize = 8;
/// Buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// Sessions handled by the timer sweep before it yields.
const SWEEP_BATCH: usize = 1024;
/// Buckets in the timer wheel (span = slots x tick).
const WHEEL_SLOTS: usize = 4096;
/// Longest id string (user, device, app, platform, version) in bytes; the
/// compact identity record stores lengths in one byte each.
pub const MAX_ID_BYTES: usize = 255;
/// Sentinel for "no next session of the same user".
const NO_CONN: u32 = u32::MAX;

/// Messages between shards.
pub enum ShardMsg {
    /// A connection authenticated on the sending shard belongs to the
    /// receiver (the device's owner shard).
    Adopt(Box<Adoption>),
}

/// A connection in transit to its owner shard.
pub struct Adoption {
    fd: OwnedFd,
    session: Session,
    login: Login,
    /// Bytes read after the Auth frame, not yet processed.
    leftover: Vec<u8>,
}

/// Counters readable from other threads (tests, stats logs). Only rare
/// events are counted here; nothing per frame.
#[derive(Debug, Default)]
pub struct ShardCounters {
    pub accepted: AtomicU64,
    pub authenticated: AtomicU64,
    pub handed_off: AtomicU64,
    pub adopted: AtomicU64,
    pub replaced: AtomicU64,
    pub closed: AtomicU64,
    pub active: AtomicU64,
    /// Sessions closed because their outbound queue overflowed.
    pub slow_closed: AtomicU64,
}

/// Everything a shard needs to start, built on the main thread.
#[derive(Clone)]
pub struct ShardConfig {
    pub params: Params,
    pub max_frame_bytes: u32,
    pub outbound_queue_bytes: u32,
    pub read_buffer_bytes: usize,
    pub wheel_tick_ms: u64,
    pub max_connections: u32,
    pub accept_rate_per_sec: u32,
    pub node: String,
}

/// The identity of an authenticated session in one allocation: user,
/// device, app, platform, then the client version, with the first four
/// lengths in `lens`.
struct Ident {
    text: Box<str>,
    lens: [u8; 4],
}

impl Ident {
    fn new(login: &Login) -> Ident {
        let parts = [&login.user, &login.device, &login.app, &login.platform];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + login.client_version.len());
        let mut lens = [0u8; 4];
        for (len, part) in lens.iter_mut().zip(parts) {
            // Session::on_auth rejects longer ids before we get here.
            *len = u8::try_from(part.len()).unwrap_or(u8::MAX);
            text.push_str(&part[..usize::from(*len)]);
        }
        text.push_str(&login.client_version);
        Ident { text: text.into_boxed_str(), lens }
    }

    fn field(&self, i: usize) -> &str {
        let start: usize = self.lens[..i].iter().map(|&l| usize::from(l)).sum();
        let end = if i < 4 { start + usize::from(self.lens[i]) } else { self.text.len() };
        &self.text[start..end]
    }

    pub fn user(&self) -> &str {
        self.field(0)
    }

    pub fn device(&self) -> &str {
        self.field(1)
    }
}

/// Outbound queue and input leftovers: allocated only while in use.
#[derive(Default)]
struct ConnIo {
    out: VecDeque<Bytes>,
    out_bytes: usize,
    /// Bytes of `out.front()` already written.
    front_written: usize,
    /// An incomplete frame carried over to the next read.
    partial: Vec<u8>,
    /// Set when the session must move to another shard.
    handoff: Option<(ShardId, Box<Login>)>,
}

impl ConnIo {
    fn is_idle(&self) -> bool {
        self.out.is_empty() && self.partial.is_empty() && self.handoff.is_none()
    }
}

/// One connection's slot. Every field is paid per connection.
struct Conn {
    session: Session,
    /// The connection task's waker, to wake it when another task queues
    /// frames or closes it.
    waker: Option<Waker>,
    /// Set once authenticated (kept for logs after unindexing).
    ident: Option<Ident>,
    io: Option<Box<ConnIo>>,
    generation: u32,
    /// Next session of the same user on this shard (intrusive list).
    next_of_user: u32,
    /// Capability bits from Auth (all defined bits fit in a byte).
    capabilities: u8,
    /// The write side has been shut down after the final flush.
    write_shut: bool,
}

impl Conn {
    fn io(&mut self) -> &mut ConnIo {
        self.io.get_or_insert_with(Box::default)
    }

    fn release_io_if_idle(&mut self) {
        if self.io.as_ref().is_some_and(|io| io.is_idle()) {
            self.io = None;
        }
    }

    fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }
}

/// The shard's mutable state, behind one `RefCell`. Never borrowed across
/// an await.
struct State {
    conns: Slab<Conn>,
    /// Slot index by device id (hash of the device string; equality checked
    /// against the slot's identity, so only 4 bytes per entry).
    devices: HashTable<u32>,
    /// Head slot of each user's list of sessions on this shard.
    users: HashTable<u32>,
    wheel: Wheel,
    next_gen: u32,
    /// Reused action buffer.
    actions: Vec<Action>,
}

impl State {
    fn conn(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key.index as usize).filter(|c| c.generation == key.generation)
    }

    fn device_slot(&self, device: &str) -> Option<u32> {
        let conns = &self.conns;
        self.devices.find(stable_hash(device), |&i| slot_device(conns, i) == Some(device)).copied()
    }
}

fn slot_ident(conns: &Slab<Conn>, i: u32) -> Option<&Ident> {
    conns.get(i as usize).and_then(|c| c.ident.as_ref())
}

fn slot_device(conns: &Slab<Conn>, i: u32) -> Option<&str> {
    slot_ident(conns, i).map(Ident::device)
}

fn slot_user(conns: &Slab<Conn>, i: u32) -> Option<&str> {
    slot_ident(conns, i).map(Ident::user)
}

/// How a connection task ended.
enum Exit {
    Closed,
    /// Authenticated here, owned by another shard: move it there.
    Handoff(ShardId, Box<Transit>),
}

/// The session part of an [`Adoption`], before the fd is attached.
struct Transit {
    session: Session,
    login: Login,
    leftover: Vec<u8>,
}

/// One executor's shard.
pub struct Shard {
    id: ShardId,
    shards: u16,
    cfg: ShardConfig,
    state: RefCell<State>,
    /// Read buffer shared by every connection of the shard.
    scratch: RefCell<Vec<u8>>,
    mesh: Senders<ShardMsg>,
    counters: Arc<ShardCounters>,
    /// Monotonic origin of [`Millis`].
    epoch: Instant,
    /// Closed when the shard stops accepting.
    stop_accepting: Rc<glommio::sync::Semaphore>,
    stopping: Cell<bool>,
}

impl Shard {
    pub fn new(
        id: ShardId,
        shards: u16,
        cfg: ShardConfig,
        mesh: Senders<ShardMsg>,
        counters: Arc<ShardCounters>,
    ) -> Rc<Shard> {
        let epoch = Instant::now();
        Rc::new(Shard {
            id,
            shards,
            state: RefCell::new(State {
                conns: Slab::new(),
                devices: HashTable::new(),
                users: HashTable::new(),
                wheel: Wheel::new(cfg.wheel_tick_ms, WHEEL_SLOTS, Millis(0)),
                next_gen: 0,
                actions: Vec::new(),
            }),
            scratch: RefCell::new(vec![0; cfg.read_buffer_bytes]),
            cfg,
            mesh,
            counters,
            epoch,
            stop_accepting: Rc::new(glommio::sync::Semaphore::new(0)),
            stopping: Cell::new(false),
        })
    }

    pub fn id(&self) -> ShardId {
        self.id
    }

    fn now(&self) -> Now {
        let mono = Millis(self.epoch.elapsed().as_millis() as u64);
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Now { mono, unix_ms }
    }

    // ---- accepting ------------------------------------------------------

    /// Accepts until [`Shard::begin_shutdown`].
    pub async fn accept_loop(self: Rc<Self>, listener: glommio::net::TcpListener) {
        let mut bucket = AcceptBucket::new(self.cfg.accept_rate_per_sec);
        loop {
            let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
                let _ = self.stop_accepting.acquire(1).await;
                None
            })
            .await;
            let Some(accepted) = accepted else { break };
            match accepted {
                Ok(stream) => self.on_accept(stream),
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
        debug!(shard = %self.id, "stopped accepting");
    }

    fn on_accept(self: &Rc<Self>, stream: TcpStream) {
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            if st.conns.len() >= self.cfg.max_connections as usize {
                drop(st);
                debug!(shard = %self.id, "connection limit reached; refusing");
                // Best effort: the socket is fresh, a small frame fits.
                let bytes =
                    Frame::Error(codes::error_body(ErrorCode::ServerError, "connection limit reached")).to_bytes();
                let _ = nix_send(stream.as_raw_fd(), &bytes);
                return;
            }
            let session = Session::new(now.mono, &self.cfg.params);
            insert_conn(&mut st, session, 0)
        };
        let shard = self.clone();
        glommio::spawn_local(async move { shard.run_conn(key, stream).await }).detach();
    }

    // ---- the connection task ----------------------------------------------

    async fn run_conn(self: Rc<Self>, key: ConnKey, mut stream: TcpStream) {
        let exit = std::future::poll_fn(|cx| self.poll_conn(key, &mut stream, cx)).await;
        match exit {
            Exit::Closed => {
                drop(stream);
                self.remove_conn(key);
            }
            Exit::Handoff(owner, transit) => {
                self.remove_conn(key);
                match dup_fd(stream.as_raw_fd()) {
                    Ok(fd) => {
                        // Drop our stream (and its armed poll) before the
                        // owner starts using the duplicate.
                        drop(stream);
                        let Transit { session, login, leftover } = *transit;
                        let adoption = Box::new(Adoption { fd, session, login, leftover });
                        self.counters.handed_off.fetch_add(1, Ordering::Relaxed);
                        if self.mesh.send_to(owner.index(), ShardMsg::Adopt(adoption)).await.is_err() {
                            warn!(shard = %self.id, to = %owner, "hand-off failed: owner shard gone");
                        }
                    }
                    Err(err) => warn!(shard = %self.id, error = %err, "dup failed; dropping connection"),
                }
            }
        }
    }

    fn poll_conn(&self, key: ConnKey, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Exit> {
        for _ in 0..READS_PER_POLL {
            let draining = {
                let mut st = self.state.borrow_mut();
                let Some(conn) = st.conn(key) else {
                    return Poll::Ready(Exit::Closed);
                };
                if let Err(err) = flush(conn, stream, cx) {
                    debug!(shard = %self.id, error = %err, "write failed");
                    conn.session.closed_by_peer();
                    return Poll::Ready(Exit::Closed);
                }
                match conn.session.phase() {
                    Phase::Closed => return Poll::Ready(Exit::Closed),
                    Phase::Closing => {
                        let flushed = conn.io.as_ref().is_none_or(|io| io.out.is_empty());
                        if flushed && !conn.write_shut {
                            // Half-close so the Error frame arrives before FIN;
                            // keep reading until the peer closes or the linger ends.
                            conn.write_shut = true;
                            // SAFETY: shutdown(2) on a socket fd we own; no memory involved.
                            unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) };
                        }
                    }
                    Phase::Authenticated => {
                        if let Some(adoption) = take_handoff(conn) {
                            return Poll::Ready(Exit::Handoff(adoption.0, adoption.1));
                        }
                    }
                    Phase::Handshaking | Phase::Active => {}
                }
                if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    conn.waker = Some(cx.waker().clone());
                }
                !conn.session.wants_input()
            };

            let mut buf = std::mem::take(&mut *self.scratch.borrow_mut());
            let read = Pin::new(&mut *stream).poll_read_into(cx, &mut buf);
            let result = match read {
                Poll::Pending => None,
                Poll::Ready(Ok(0)) => Some(Err(())),
                Poll::Ready(Ok(n)) => {
                    if !draining {
                        self.on_bytes(key, &buf[..n]);
                    }
                    Some(Ok(()))
                }
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
    fn on_bytes(&self, key: ConnKey, data: &[u8]) {
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
    }

    /// Returns how many bytes of `input` were consumed.
    fn handle_input(&self, st: &mut State, key: ConnKey, input: &[u8]) -> usize {
        let mut pos = 0;
        let now = self.now();
        loop {
            let Some(conn) = st.conn(key) else { return input.len() };
            if !conn.session.wants_input() {
                // Closing: discard the rest. Authenticated (hand-off): keep it.
                return if conn.session.phase() == Phase::Authenticated { pos } else { input.len() };
            }
            let mut actions = std::mem::take(&mut st.actions);
            let conn = st.conn(key).expect("looked up above");
            match codec::split_frame(&input[pos..], self.cfg.max_frame_bytes) {
                Ok(None) => {
                    st.actions = actions;
                    return pos;
                }
                Ok(Some((header, body))) => {
                    pos += header.frame_len();
                    match Frame::decode(header, body) {
                        Ok(frame) => conn.session.handle_frame(now, frame, &self.cfg.params, &mut actions),
                        Err(err) => conn.session.handle_codec_error(now, &err, &self.cfg.params, &mut actions),
                    }
                }
                Err(err) => {
                    pos = input.len();
                    conn.session.handle_codec_error(now, &err, &self.cfg.params, &mut actions);
                }
            }
            self.apply(st, key, now, &mut actions);
            st.actions = actions;
        }
    }

    /// Carries out a session's actions for connection `key`.
    fn apply(&self, st: &mut State, key: ConnKey, now: Now, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Send(frame) => self.queue_frame(st, key, &frame),
                Action::Close(code) => {
                    let Some(conn) = st.conn(key) else { continue };
                    let deadline = conn.session.deadline();
                    conn.wake();
                    if let Some(ident) = &conn.ident {
                        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), device = ident.device(), ?code, "closing");
                    } else {
                        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), ?code, "closing before auth");
                    }
                    st.wheel.insert(key, deadline);
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
            }
        }
    }

    fn queue_frame(&self, st: &mut State, key: ConnKey, frame: &Frame) {
        let bytes = match frame {
            Frame::Pong => Bytes::from_static(&PONG),
            other => other.to_bytes(),
        };
        self.queue_bytes(st, key, bytes);
    }

    /// Queues an encoded frame; a full queue closes the session with SLOW.
    fn queue_bytes(&self, st: &mut State, key: ConnKey, bytes: Bytes) {
        let limit = self.cfg.outbound_queue_bytes as usize;
        let Some(conn) = st.conn(key) else { return };
        let io = conn.io();
        if io.out_bytes + bytes.len() > limit && !io.out.is_empty() {
            // The client is not reading. Drop the backlog and tell it why,
            // in the room the dropped frames leave.
            let dropped = io.out.len();
            io.out.clear();
            io.out_bytes = 0;
            io.front_written = 0;
            self.counters.slow_closed.fetch_add(1, Ordering::Relaxed);
            debug!(shard = %self.id, conn = %ConnId::new(self.id, key), dropped, "outbound queue full");
            let now = self.now();
            let mut actions = Vec::new();
            conn.session.close(
                now,
                ErrorCode::Slow,
                format!("outbound queue above {limit} bytes"),
                &self.cfg.params,
                &mut actions,
            );
            // Re-enter with an empty queue: the Error frame fits.
            self.apply(st, key, now, &mut actions);
            return;
        }
        io.out_bytes += bytes.len();
        io.out.push_back(bytes);
    }

    // ---- registration -----------------------------------------------------

    /// Makes `key` the device's session on this shard: replaces an older
    /// login, indexes it, and activates it.
    fn register(&self, st: &mut State, key: ConnKey, now: Now, login: &Login) {
        if let Some(old) = st.device_slot(&login.device) {
            let old_key = ConnKey { index: old, generation: st.conns[old as usize].generation };
            self.unindex(st, old);
            self.counters.replaced.fetch_add(1, Ordering::Relaxed);
            let mut actions = Vec::new();
            if let Some(conn) = st.conn(old_key) {
                conn.session.kick(now, ErrorCode::Replaced, String::new(), &self.cfg.params, &mut actions);
            }
            self.apply(st, old_key, now, &mut actions);
        }
        let Some(conn) = st.conn(key) else { return };
        conn.ident = Some(Ident::new(login));
        conn.capabilities = login.capabilities as u8;
        let hash = stable_hash(&login.device);
        let conns = &st.conns;
        st.devices.insert_unique(hash, key.index, |&i| slot_device(conns, i).map_or(0, stable_hash));
        self.link_user(st, key.index, &login.user);
        self.counters.active.fetch_add(1, Ordering::Relaxed);

        let ok = proto::AuthOk {
            conn_id: ConnId::new(self.id, key).0,
            shard: u32::from(self.id.0),
            node: self.cfg.node.clone(),
            ..Default::default()
        };
        let mut actions = std::mem::take(&mut st.actions);
        if let Some(conn) = st.conn(key) {
            conn.session.activate(now, login, ok, &self.cfg.params, &mut actions);
            let deadline = conn.session.deadline();
            st.wheel.insert(key, deadline);
        }
        debug!(shard = %self.id, conn = %ConnId::new(self.id, key), user = %login.user, device = %login.device, "authenticated");
        self.apply(st, key, now, &mut actions);
        st.actions = actions;
    }

    fn link_user(&self, st: &mut State, slot: u32, user: &str) {
        let hash = stable_hash(user);
        let conns = &st.conns;
        match st.users.find_mut(hash, |&i| slot_user(conns, i) == Some(user)) {
            Some(head) => {
                let old_head = std::mem::replace(head, slot);
                st.conns[slot as usize].next_of_user = old_head;
            }
            None => {
                st.conns[slot as usize].next_of_user = NO_CONN;
                let conns = &st.conns;
                st.users.insert_unique(hash, slot, |&i| slot_user(conns, i).map_or(0, stable_hash));
            }
        }
    }

    /// Removes slot `slot` from the device and user indexes.
    fn unindex(&self, st: &mut State, slot: u32) {
        let Some(ident) = st.conns.get_mut(slot as usize).and_then(|c| c.ident.take()) else {
            return;
        };
        let conns = &st.conns;
        // The identity is detached above, so match on the slot number.
        if let Ok(entry) = st.devices.find_entry(stable_hash(ident.device()), |&i| i == slot) {
            entry.remove();
        }
        let user_hash = stable_hash(ident.user());
        let next = conns[slot as usize].next_of_user;
        match st.users.find_entry(user_hash, |&i| i == slot) {
            Ok(mut head) if next != NO_CONN => *head.get_mut() = next,
            Ok(head) => {
                head.remove();
            }
            Err(_) => {
                // Not the head: unlink from its predecessor.
                if let Some(&head) = st.users.find(user_hash, |&i| slot_user(conns, i) == Some(ident.user())) {
                    let mut cur = head;
                    while cur != NO_CONN {
                        let n = st.conns[cur as usize].next_of_user;
                        if n == slot {
                            st.conns[cur as usize].next_of_user = next;
                            break;
                        }
                        cur = n;
                    }
                }
            }
        }
        st.conns[slot as usize].next_of_user = NO_CONN;
        // Keep the identity on the slot for logs until it is removed.
        st.conns[slot as usize].ident = Some(ident);
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
    }

    fn remove_conn(&self, key: ConnKey) {
        let mut st = self.state.borrow_mut();
        if st.conn(key).is_none() {
            return;
        }
        let indexed = {
            let conns = &st.conns;
            slot_device(conns, key.index)
                .is_some_and(|d| st.devices.find(stable_hash(d), |&i| i == key.index).is_some())
        };
        if indexed {
            self.unindex(&mut st, key.index);
        }
        st.conns.remove(key.index as usize);
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
    }

    // ---- mesh ---------------------------------------------------------------

    /// Handles a message from another shard.
    pub fn on_message(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt(adoption) => self.adopt(*adoption),
        }
    }

    fn adopt(self: &Rc<Self>, adoption: Adoption) {
        let Adoption { fd, session, login, leftover } = adoption;
        if self.stopping.get() {
            return; // dropping the fd closes it; the client reconnects
        }
        // SAFETY: `fd` is an owned, open TCP socket duplicated by the sending
        // shard, which closed its own copy; ownership moves into the stream.
        let stream = unsafe { TcpStream::from_raw_fd(into_raw(fd)) };
        self.counters.adopted.fetch_add(1, Ordering::Relaxed);
        let now = self.now();
        let key = {
            let mut st = self.state.borrow_mut();
            let key = insert_conn(&mut st, session, login.capabilities);
            if !leftover.is_empty() {
                st.conn(key).expect("just inserted").io().partial = leftover;
            }
            self.register(&mut st, key, now, &login);
            key
        };
        let shard = self.clone();
        glommio::spawn_local(async move {
            // Frames that arrived right behind Auth on the old shard.
            shard.replay_partial(key);
            shard.run_conn(key, stream).await
        })
        .detach();
    }

    fn replay_partial(&self, key: ConnKey) {
        let partial = {
            let mut st = self.state.borrow_mut();
            match st.conn(key).and_then(|c| c.io.as_mut()) {
                Some(io) if !io.partial.is_empty() => std::mem::take(&mut io.partial),
                _ => return,
            }
        };
        self.on_bytes(key, &partial);
    }

    // ---- timers and shutdown -------------------------------------------------

    /// Drives every deadline of the shard; returns after shutdown completes.
    pub async fn timer_loop(self: Rc<Self>, stop: Arc<AtomicBool>, shutdown_grace: Duration) {
        let tick = Duration::from_millis(self.cfg.wheel_tick_ms);
        let mut due = Vec::new();
        let mut shutdown_deadline: Option<Instant> = None;
        loop {
            glommio::timer::sleep(tick).await;
            if shutdown_deadline.is_none() && stop.load(Ordering::Relaxed) {
                self.begin_shutdown();
                shutdown_deadline = Some(Instant::now() + shutdown_grace);
            }
            self.state.borrow_mut().wheel.expire(self.now().mono, &mut due);
            for chunk in due.chunks(SWEEP_BATCH) {
                self.sweep(chunk);
                glommio::yield_if_needed().await;
            }
            due.clear();
            if let Some(deadline) = shutdown_deadline
                && (self.state.borrow().conns.is_empty() || Instant::now() >= deadline)
            {
                break;
            }
        }
    }

    fn sweep(&self, keys: &[ConnKey]) {
        let now = self.now();
        let mut st = self.state.borrow_mut();
        let mut actions = std::mem::take(&mut st.actions);
        for &key in keys {
            let Some(conn) = st.conn(key) else { continue };
            if conn.session.deadline() <= now.mono {
                conn.session.handle_timeout(now, &self.cfg.params, &mut actions);
                conn.wake();
                self.apply(&mut st, key, now, &mut actions);
            }
            let Some(conn) = st.conn(key) else { continue };
            if conn.session.phase() != Phase::Closed {
                let deadline = conn.session.deadline();
                st.wheel.insert(key, deadline);
            }
        }
        st.actions = actions;
    }

    /// Stops accepting and closes every session with SHUTDOWN.
    fn begin_shutdown(&self) {
        self.stopping.set(true);
        self.stop_accepting.close();
        let now = self.now();
        let mut st = self.state.borrow_mut();
        let keys: Vec<ConnKey> =
            st.conns.iter().map(|(i, c)| ConnKey { index: i as u32, generation: c.generation }).collect();
        info!(shard = %self.id, sessions = keys.len(), "shutting down");
        let mut actions = Vec::new();
        for key in keys {
            if let Some(conn) = st.conn(key) {
                conn.session.close(now, ErrorCode::Shutdown, String::new(), &self.cfg.params, &mut actions);
            }
            self.apply(&mut st, key, now, &mut actions);
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }
}

/// Header-only Pong, shared by every session.
static PONG: [u8; codec::HEADER_LEN] = [codec::MAGIC, codec::VERSION, FrameKind::Pong as u8, 0, 0, 0, 0, 0];

fn insert_conn(st: &mut State, session: Session, capabilities: u32) -> ConnKey {
    st.next_gen = st.next_gen.wrapping_add(1);
    let generation = st.next_gen;
    let deadline = session.deadline();
    let index = st.conns.insert(Conn {
        session,
        generation,
        ident: None,
        io: None,
        waker: None,
        next_of_user: NO_CONN,
        capabilities: capabilities as u8,
        write_shut: false,
    }) as u32;
    let key = ConnKey { index, generation };
    st.wheel.insert(key, deadline);
    key
}

fn take_handoff(conn: &mut Conn) -> Option<(ShardId, Box<Transit>)> {
    let io = conn.io.as_mut()?;
    let (owner, login) = io.handoff.take()?;
    let leftover = std::mem::take(&mut io.partial);
    Some((owner, Box::new(Transit { session: conn.session, login: *login, leftover })))
}

/// Writes queued frames with `writev`; registers for writability when the
/// socket is full.
fn flush(conn: &mut Conn, stream: &mut TcpStream, cx: &mut Context<'_>) -> io::Result<()> {
    let Some(io) = conn.io.as_mut() else { return Ok(()) };
    while !io.out.is_empty() {
        let mut iov: [libc::iovec; MAX_IOVECS] =
            [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOVECS];
        let mut n = 0;
        for (i, buf) in io.out.iter().take(MAX_IOVECS).enumerate() {
            let slice = if i == 0 { &buf[io.front_written..] } else { &buf[..] };
            iov[i] = libc::iovec { iov_base: slice.as_ptr() as *mut libc::c_void, iov_len: slice.len() };
            n += 1;
        }
        // SAFETY: every iovec points into a live `Bytes` held by `io.out`
        // for the duration of the call; the fd is the stream's own socket.
        let written = unsafe { libc::writev(stream.as_raw_fd(), iov.as_ptr(), n as libc::c_int) };
        if written < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    // Arm write readiness through glommio (it retries the send
                    // itself first; account for whatever it writes).
                    let front = io.out.front().expect("non-empty").slice(io.front_written..);
                    match Pin::new(&mut *stream).poll_write(cx, &front) {
                        Poll::Pending => return Ok(()),
                        Poll::Ready(Ok(w)) => advance(io, w),
                        Poll::Ready(Err(e)) => return Err(e),
                    }
                    continue;
                }
                _ => return Err(err),
            }
        }
        advance(io, written as usize);
    }
    conn.release_io_if_idle();
    Ok(())
}

fn advance(io: &mut ConnIo, mut written: usize) {
    io.out_bytes -= written.min(io.out_bytes);
    while written > 0 {
        let Some(front) = io.out.front() else { break };
        let left = front.len() - io.front_written;
        if written >= left {
            written -= left;
            io.front_written = 0;
            io.out.pop_front();
        } else {
            io.front_written += written;
            written = 0;
        }
    }
}

/// Token bucket capping accepts per second on one shard.
struct AcceptBucket {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl AcceptBucket {
    fn new(rate: u32) -> AcceptBucket {
        AcceptBucket { rate, tokens: f64::from(rate), last: Instant::now() }
    }

    /// Takes one token; returns how long to wait when the bucket is empty.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        if self.rate == 0 {
            return None;
        }
        let rate = f64::from(self.rate);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        self.tokens -= 1.0;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / rate))
    }
}

trait PollReadInto {
    fn poll_read_into(self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
}

impl PollReadInto for Pin<&mut TcpStream> {
    fn poll_read_into(self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        futures_lite::AsyncRead::poll_read(self, cx, buf)
    }
}

fn dup_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid fd returns a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn into_raw(fd: OwnedFd) -> RawFd {
    use std::os::fd::IntoRawFd;
    fd.into_raw_fd()
}

fn nix_send(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: sends from a valid slice on a socket fd we hold.
    unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ident_packs_fields() {
        let login = Login {
            user: "alice".into(),
            device: "phone-1".into(),
            app: "chat".into(),
            platform: "ios".into(),
            client_version: "2.0.1".into(),
            capabilities: 0,
            last_seq: 0,
            heartbeat_ms: 0,
        };
        let id = Ident::new(&login);
        assert_eq!(
            (id.user(), id.device(), id.field(2), id.field(3), id.field(4)),
            ("alice", "phone-1", "chat", "ios", "2.0.1")
        );
    }

    #[test]
    fn accept_bucket_paces() {
        let t0 = Instant::now();
        let mut b = AcceptBucket::new(10);
        for _ in 0..10 {
            assert_eq!(b.take(t0), None);
        }
        let wait = b.take(t0).expect("empty bucket waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert_eq!(AcceptBucket::new(0).take(t0), None);
    }

    #[test]
    fn conn_slot_is_small() {
        // Each byte here is multiplied by every idle connection.
        assert!(std::mem::size_of::<Conn>() <= 80, "{}", std::mem::size_of::<Conn>());
    }
}
