//! A small HTTP/1.1 server for the sidecars (dispatcher, admin). It never
//! runs on a shard.
//!
//! One thread runs an epoll loop over every connection, so an idle or slow
//! socket costs a slab entry, not a thread. Every request head (and its
//! body) must arrive whole within `header_timeout` of the moment the server
//! starts waiting for it, or the connection is closed: a client sending a
//! byte every few seconds (slowloris) holds its slot only that long. Each
//! source address may hold `max_per_ip` connections, the server
//! `max_connections`; more are answered 503 and closed at once.
//!
//! Handlers run on the loop and must not block; one that has to (an auth
//! hook, Redis) returns [`Reply::Blocking`], run by a small pool of worker
//! threads behind a bounded queue (full: 503), so the loop keeps serving.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::{debug, warn};

/// Largest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How often the loop looks for connections past their deadline.
const SWEEP: Duration = Duration::from_millis(100);
/// Connections accepted per turn of the loop before requests get a turn
/// (a burst of connects must not stall the answers).
const ACCEPT_BATCH: usize = 64;
/// Late connections closed per sweep; more wait for the next (a wave of
/// slow sockets reaching their deadline together must not stall the loop).
const CLOSE_BATCH: usize = 256;
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// A parsed request.
#[derive(Debug, Default, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client's address (`None` only for requests built in tests).
    pub peer: Option<SocketAddr>,
}

impl Request {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A response to send.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response { status, content_type, body: body.into() }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response::new(status, "application/json", value.to_string())
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body.into())
    }
}

/// What a handler gives back: an answer now, or work that may block, run
/// on a worker thread (the loop never waits for it).
pub enum Reply {
    Now(Response),
    Blocking(Box<dyn FnOnce() -> Response + Send>),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Now(r)
    }
}

/// Runs on the event loop: must return at once (see [`Reply::Blocking`]).
pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// Bounds of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections held at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections one source address may hold at once.
    pub max_per_ip: usize,
    /// A request head and body must arrive within this of the moment the
    /// server starts waiting for them (also the keep-alive idle limit and
    /// the time a client has to read an answer).
    pub header_timeout: Duration,
    /// Threads running [`Reply::Blocking`] work.
    pub workers: usize,
    /// Blocking work waiting for a worker; more is answered 503.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1024,
            max_per_ip: 64,
            header_timeout: Duration::from_secs(10),
            workers: 4,
            queue: 256,
        }
    }
}

/// A running server; dropping it does not stop it (see [`HttpServer::stop`]).
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    /// Servers stopped with this one (a node's separate dispatch listener).
    linked: Vec<HttpServer>,
}

impl HttpServer {
    /// Binds `addr` and serves `handler` with at most `max_connections`
    /// concurrent connections and the other [`Limits`] at their defaults.
    pub fn start(addr: SocketAddr, max_connections: usize, handler: Handler) -> io::Result<HttpServer> {
        HttpServer::serve(TcpListener::bind(addr)?, max_connections, handler)
    }

    /// [`HttpServer::start`] on a listener bound earlier (a node binds
    /// every listener before it starts anything, so a taken port fails the
    /// start at once).
    pub fn serve(listener: TcpListener, max_connections: usize, handler: Handler) -> io::Result<HttpServer> {
        HttpServer::serve_with(listener, Limits { max_connections, ..Limits::default() }, handler)
    }

    /// Serves `handler` on `listener` within `limits`.
    pub fn serve_with(listener: TcpListener, limits: Limits, handler: Handler) -> io::Result<HttpServer> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new()?);
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(limits.queue.max(1));
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
        for i in 0..limits.workers.max(1) {
            let (jobs, done, wake) = (jobs_rx.clone(), done_tx.clone(), wake.clone());
            thread::Builder::new().name(format!("longlink-http-w{i}")).spawn(move || {
                // Ends when the loop drops the sending side.
                for job in jobs {
                    let response = catch_unwind(AssertUnwindSafe(job.work))
                        .unwrap_or_else(|_| Response::text(500, "internal error\n"));
                    if done.send(Done { conn: job.conn, response }).is_err() {
                        return;
                    }
                    wake.notify();
                }
            })?;
        }
        let mut event_loop = EventLoop::new(listener, limits, handler, jobs_tx, done_rx, wake.clone(), stop.clone())?;
        thread::Builder::new().name("longlink-http".into()).spawn(move || {
            if let Err(e) = event_loop.run() {
                warn!(error = %e, "http server stopped");
            }
        })?;
        Ok(HttpServer { addr, stop, wake, linked: Vec::new() })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops `other` whenever this server stops.
    pub fn with_linked(mut self, other: HttpServer) -> HttpServer {
        self.linked.push(other);
        self
    }

    /// The addresses of the servers linked to this one.
    pub fn linked_addrs(&self) -> Vec<SocketAddr> {
        self.linked.iter().map(HttpServer::addr).collect()
    }

    /// Stops the server: the loop closes every connection and ends.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify();
        self.linked.iter().for_each(HttpServer::stop);
    }
}

/// A connection's slab key and generation: an answer for a connection that
/// closed meanwhile (its key reused) is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConnRef {
    key: usize,
    generation: u64,
}

struct Job {
    conn: ConnRef,
    work: Box<dyn FnOnce() -> Response + Send>,
}

struct Done {
    conn: ConnRef,
    response: Response,
}

/// An eventfd, to wake the loop from the workers and from `stop`.
struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full
        // counter (EAGAIN) still leaves the loop woken, so the result is ignored.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own eventfd.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

/// An epoll instance (level-triggered).
struct Epoll(OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` lives across the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> io::Result<usize> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `events` is valid for writes of its length, which is passed.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
        }
        Ok(n as usize)
    }
}

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head and body (deadline running).
    Reading,
    /// A worker has the request; `close` once answered.
    Handling { close: bool },
    /// Writing the answer (deadline running); then close or read the next.
    Writing { close: bool },
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    generation: u64,
    /// Bytes read and not yet consumed (at most one head and body).
    input: Vec<u8>,
    /// How much of `input` was searched for the head's end already.
    scanned: usize,
    output: Vec<u8>,
    written: usize,
    phase: Phase,
    deadline: Instant,
    /// The epoll interest currently registered.
    interest: u32,
}

struct EventLoop {
    epoll: Epoll,
    listener: TcpListener,
    limits: Limits,
    handler: Handler,
    jobs: crossbeam_channel::Sender<Job>,
    done: crossbeam_channel::Receiver<Done>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    conns: Slab<Conn>,
    per_ip: HashMap<IpAddr, usize>,
    next_generation: u64,
    accept_paused_until: Option<Instant>,
}

impl EventLoop {
    fn new(
        listener: TcpListener,
        limits: Limits,
        handler: Handler,
        jobs: crossbeam_channel::Sender<Job>,
        done: crossbeam_channel::Receiver<Done>,
        wake: Arc<EventFd>,
        stop: Arc<AtomicBool>,
    ) -> io::Result<EventLoop> {
        let epoll = Epoll::new()?;
        epoll.ctl(libc::EPOLL_CTL_ADD, listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
        epoll.ctl(libc::EPOLL_CTL_ADD, wake.0.as_raw_fd(), libc::EPOLLIN as u32, WAKE)?;
        Ok(EventLoop {
            epoll,
            listener,
            limits,
            handler,
            jobs,
            done,
            wake,
            stop,
            conns: Slab::new(),
            per_ip: HashMap::new(),
            next_generation: 0,
            accept_paused_until: None,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut next_sweep = Instant::now() + SWEEP;
        while !self.stop.load(Ordering::Relaxed) {
            let n = self.epoll.wait(&mut events, SWEEP)?;
            for ev in &events[..n] {
                let (token, flags) = (ev.u64, ev.events);
                match token {
                    LISTENER => self.accept(),
                    WAKE => self.wake.drain(),
                    key => self.ready(key as usize, flags),
                }
            }
            while let Ok(done) = self.done.try_recv() {
                self.answered(done);
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + SWEEP;
                self.sweep(now);
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors (or similar): stop polling the
                    // listener for a moment instead of spinning on it.
                    debug!(error = %e, "http accept failed; pausing");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    let _ = self.epoll.ctl(libc::EPOLL_CTL_MOD, self.listener.as_raw_fd(), 0, LISTENER);
                    return;
                }
            };
            let ip = peer.ip().to_canonical();
            let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
            let refusal = if self.conns.len() >= self.limits.max_connections {
                Some("too many connections\n")
            } else if from_ip >= self.limits.max_per_ip {
                Some("too many connections from your address\n")
            } else {
                None
            };
            if let Some(why) = refusal {
                // Best effort, never waiting: the socket is closed right after.
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write_all(&encode_response(&Response::text(503, why), false));
                continue;
            }
            if stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true)).is_err() {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let fd = stream.as_raw_fd();
            if self.epoll.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, key as u64).is_err() {
                continue;
            }
            entry.insert(Conn {
                stream,
                peer,
                generation,
                input: Vec::new(),
                scanned: 0,
                output: Vec::new(),
                written: 0,
                phase: Phase::Reading,
                deadline: Instant::now() + self.limits.header_timeout,
                interest: libc::EPOLLIN as u32,
            });
            *self.per_ip.entry(ip).or_insert(0) += 1;
        }
    }

    fn ready(&mut self, key: usize, flags: u32) {
        let Some(conn) = self.conns.get(key) else { return };
        match conn.phase {
            Phase::Reading => self.read(key),
            Phase::Writing { .. } => self.write(key),
            Phase::Handling { .. } => {
                if flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                    self.close(key);
                }
            }
        }
    }

    fn read(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let mut chunk = [0u8; 4096];
        // One head plus one body at most; pipelined extra waits in the socket.
        let cap = MAX_HEAD + 1 + MAX_BODY;
        loop {
            let room = cap.saturating_sub(conn.input.len()).min(chunk.len());
            if room == 0 {
                break;
            }
            match (&conn.stream).read(&mut chunk[..room]) {
                Ok(0) => return self.close(key),
                Ok(n) => conn.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.close(key),
            }
        }
        self.process(key);
    }

    /// Handles the request in `input` if it is complete.
    fn process(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let found = find_head_end(&conn.input, conn.scanned);
        // Only a search that found nothing moves on: a head whose body is
        // still coming must be found again on the next read.
        if found.is_none() {
            conn.scanned = conn.input.len();
        }
        let head_end = match found {
            Some(end) if end <= MAX_HEAD => end,
            Some(_) => return self.fail(key, 431, "request head too large\n"),
            None if conn.input.len() > MAX_HEAD => return self.fail(key, 431, "request head too large\n"),
            None => return,
        };
        let head = match parse_head(&conn.input[..head_end]) {
            Ok(head) => head,
            Err(msg) => return self.fail(key, 400, msg),
        };
        if conn.input.len() < head_end + head.body_len {
            return;
        }
        let body = conn.input[head_end..head_end + head.body_len].to_vec();
        conn.input.drain(..head_end + head.body_len);
        conn.scanned = 0;
        let close = head.close || self.stop.load(Ordering::Relaxed);
        let request = Request {
            method: head.method,
            path: head.path,
            query: head.query,
            headers: head.headers,
            body,
            peer: Some(conn.peer),
        };
        let conn_ref = ConnRef { key, generation: conn.generation };
        let handler = self.handler.clone();
        match catch_unwind(AssertUnwindSafe(|| handler(&request))) {
            Ok(Reply::Now(response)) => self.respond(key, &response, close),
            Ok(Reply::Blocking(work)) => {
                if let Err(e) = self.jobs.try_send(Job { conn: conn_ref, work }) {
                    drop(e);
                    return self.respond(key, &Response::text(503, "busy\n"), close);
                }
                let Some(conn) = self.conns.get_mut(key) else { return };
                // Nothing more is read until this one is answered, so
                // answers go out in request order.
                conn.phase = Phase::Handling { close };
                self.set_interest(key, 0);
            }
            Err(_) => self.respond(key, &Response::text(500, "internal error\n"), true),
        }
    }

    fn answered(&mut self, done: Done) {
        let Some(conn) = self.conns.get_mut(done.conn.key) else { return };
        let Phase::Handling { close } = conn.phase else { return };
        if conn.generation != done.conn.generation {
            return;
        }
        let close = close || self.stop.load(Ordering::Relaxed);
        self.respond(done.conn.key, &done.response, close);
    }

    fn fail(&mut self, key: usize, status: u16, msg: &str) {
        self.respond(key, &Response::text(status, msg), true);
    }

    fn respond(&mut self, key: usize, response: &Response, close: bool) {
        let timeout = self.limits.header_timeout;
        let Some(conn) = self.conns.get_mut(key) else { return };
        conn.output = encode_response(response, !close);
        conn.written = 0;
        conn.phase = Phase::Writing { close };
        conn.deadline = Instant::now() + timeout;
        self.write(key);
    }

    fn write(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        let Phase::Writing { close } = conn.phase else { return };
        while conn.written < conn.output.len() {
            match (&conn.stream).write(&conn.output[conn.written..]) {
                Ok(0) => return self.close(key),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.set_interest(key, libc::EPOLLOUT as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(key),
            }
        }
        if close {
            return self.close(key);
        }
        conn.output = Vec::new();
        conn.written = 0;
        conn.phase = Phase::Reading;
        conn.deadline = Instant::now() + self.limits.header_timeout;
        self.set_interest(key, libc::EPOLLIN as u32);
        // A pipelined request may already be here.
        if !self.conns.get(key).is_some_and(|c| c.input.is_empty()) {
            self.process(key);
        }
    }

    fn set_interest(&mut self, key: usize, interest: u32) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.interest == interest {
            return;
        }
        conn.interest = interest;
        let fd = conn.stream.as_raw_fd();
        if self.epoll.ctl(libc::EPOLL_CTL_MOD, fd, interest, key as u64).is_err() {
            self.close(key);
        }
    }

    fn close(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let conn = self.conns.remove(key);
        let _ = self.epoll.ctl(libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, 0);
        let ip = conn.peer.ip().to_canonical();
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        if self.accept_paused_until.is_some() {
            self.resume_accept();
        }
    }

    /// Closes connections past their deadline; resumes a paused accept.
    fn sweep(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.phase, Phase::Handling { .. }) && c.deadline <= now)
            .map(|(key, _)| key)
            .take(CLOSE_BATCH)
            .collect();
        for key in late {
            self.close(key);
        }
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.resume_accept();
        }
    }

    fn resume_accept(&mut self) {
        self.accept_paused_until = None;
        let _ = self.epoll.ctl(libc::EPOLL_CTL_MOD, self.listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER);
    }
}

/// Where the head in `input` ends (after its blank line), if it is there;
/// `input[..scanned]` was searched before (a slow client's bytes are not
/// searched again on every read).
pub(crate) fn find_head_end(input: &[u8], scanned: usize) -> Option<usize> {
    let window = &input[..input.len().min(MAX_HEAD + 4)];
    (scanned.saturating_sub(3)..window.len()).find_map(|i| {
        if window[i..].starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if window[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// What a request head says, parsed: all `serve` needs before the body.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    /// Percent-decoded, without the query.
    pub(crate) path: String,
    pub(crate) query: HashMap<String, String>,
    /// Names lowercased.
    pub(crate) headers: Vec<(String, String)>,
    /// Content-Length, at most [`MAX_BODY`].
    pub(crate) body_len: usize,
    /// The client asked to close after this request (or speaks HTTP/1.0).
    pub(crate) close: bool,
}

/// Parses a head from [`read_head`]; the error is the 400 answer's text.
pub(crate) fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("malformed request"),
    }
    let header = |name: &str| {
        parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
    };
    let body_len: usize = match header("content-length").map(|v| v.trim().parse()) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(_) => return Err("bad or too large content-length"),
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) || parsed.version == Some(0);
    let target = parsed.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let headers = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();
    Ok(Head {
        method: parsed.method.unwrap_or("GET").to_owned(),
        path: percent_decode(path),
        query: parse_query(query),
        headers,
        body_len,
        close,
    })
}

fn encode_response(r: &Response, keep_alive: bool) -> Vec<u8> {
    let reason = match r.status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&r.body);
    out
}

/// `a=1&b=x%20y` into a map (the last of repeated keys wins).
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    // from_str_radix also takes a sign: "%+5" is not an escape.
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
