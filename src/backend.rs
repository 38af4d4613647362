//! Blocking client for the push port: what backends, the `longlink push`
//! family of commands and the bench use to push messages, manage groups,
//! kick sessions and ask who is online.
//!
//! It runs on `std::net::TcpStream`, so a backend needs no particular async
//! runtime. Requests are pipelined: [`PushClient::send`] buffers a request
//! and returns the id the client gave it, [`PushClient::recv`] returns the
//! next reply in the order the node completes them. The convenience calls
//! ([`PushClient::push`] and friends) send one request and wait for its
//! reply, keeping replies to other requests for later `recv` calls.
//! [`PushClient::split`] gives a sender and a receiver for two threads.
//!
//! Over TLS (a node's `push.tls_listen`), [`PushClient::connect_tls`]
//! verifies the node's certificate against a CA file ([`PushTls`]) before
//! the push key is used; the push auth handshake then runs inside TLS.
//!
//! ```no_run
//! use longlink::backend::PushClient;
//! # fn main() -> Result<(), longlink::backend::BackendError> {
//! // The key's id and secret (`id:hexsecret`), e.g. from the node's
//! // `.longlink/push-key` or the operator.
//! let key = longlink::backend::PushKey::new("chat-2026", vec![7; 32]).expect("valid key");
//! let mut client = PushClient::connect("127.0.0.1:7101", std::time::Duration::from_secs(5), &key)?;
//! let reply = client.push_devices(&["phone-1", "tablet-7"], "hello".into())?;
//! for r in &reply.results {
//!     println!("{} {:?}", r.target, r.status());
//! }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};

use crate::protocol::codec::{self, CodecError, Flags, Frame};
use crate::protocol::codes;
use crate::protocol::proto::{self, ErrorCode, FrameKind};
/// A push key: its id and secret (`id:hexsecret` in files and env vars,
/// [`crate::push::auth::parse_credential`]).
pub use crate::protocol::token::Key as PushKey;
pub use split::{PushReceiver, PushSender};
pub use tls::PushTls;
use tls::{Conn, tls_error};

mod split;
mod tls;

/// Default limit on a reply body. Presence replies for many targets are far
/// larger than anything a client sends, hence more than the node's 64 KiB.
pub const DEFAULT_MAX_REPLY_BYTES: u32 = 16 * 1024 * 1024;
/// Default limit on a request body: the node's default `max_frame_bytes`.
/// The node closes the whole connection on a larger frame, so the client
/// refuses it up front instead.
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = codec::DEFAULT_MAX_BODY;
/// Default bound on replies to other requests kept while a convenience call
/// waits for its own.
pub const DEFAULT_MAX_BUFFERED_REPLIES: usize = 16 * 1024;
/// [`PushSender::send`] writes the buffer out once it holds this much.
const FLUSH_AT_BYTES: usize = 64 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 64 * 1024;

/// Why a push-port call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// TLS failed: the CA file, the node's certificate (another CA, another
    /// name), or a peer that does not speak TLS (a plain push port).
    #[error("TLS: {0}")]
    Tls(String),
    /// The node sent bytes that are not a frame (or a body that does not
    /// decode). Nothing after it can be trusted.
    #[error("bad frame from the node: {0}")]
    Codec(#[from] CodecError),
    /// A well-formed frame that has no place on the push port.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The node sent an `Error` frame and closed the connection.
    #[error("node closed the connection: {} ({reason})", .code.as_str_name())]
    Closed { code: ErrorCode, reason: String },
    /// The node answered this request with a `RequestError`; the connection
    /// stays usable.
    #[error("node rejected the request: {} ({reason})", .code.as_str_name())]
    Rejected { code: ErrorCode, reason: String },
    #[error("connection closed by the node")]
    Eof,
    /// No byte arrived within the read timeout. Bytes already read are kept:
    /// calling `recv` again resumes where the read stopped.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// Not sent: the node would close the connection on a frame this large.
    #[error("request body of {len} bytes exceeds the limit of {max} (the node's max_frame_bytes)")]
    RequestTooLarge { len: usize, max: u32 },
    /// A convenience call read more than this many replies to other
    /// (pipelined) requests while waiting; drain them with `recv`.
    #[error("more than {0} replies to other requests arrived while waiting for a reply")]
    Backlog(usize),
}

/// A request to the node. The client fills in `request_id`.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Push(proto::PushRequest),
    Group(proto::GroupUpdate),
    Kick(proto::KickRequest),
    Presence(proto::PresenceQuery),
    Status(proto::DeliveryStatusQuery),
}

impl Request {
    pub fn request_id(&self) -> u64 {
        match self {
            Request::Push(r) => r.request_id,
            Request::Group(r) => r.request_id,
            Request::Kick(r) => r.request_id,
            Request::Presence(r) => r.request_id,
            Request::Status(r) => r.request_id,
        }
    }

    fn set_request_id(&mut self, id: u64) {
        match self {
            Request::Push(r) => r.request_id = id,
            Request::Group(r) => r.request_id = id,
            Request::Kick(r) => r.request_id = id,
            Request::Presence(r) => r.request_id = id,
            Request::Status(r) => r.request_id = id,
        }
    }

    fn body_len(&self) -> usize {
        use prost::Message as _;
        match self {
            Request::Push(r) => r.encoded_len(),
            Request::Group(r) => r.encoded_len(),
            Request::Kick(r) => r.encoded_len(),
            Request::Presence(r) => r.encoded_len(),
            Request::Status(r) => r.encoded_len(),
        }
    }

    /// The frame kind a successful answer has.
    fn reply_kind(&self) -> FrameKind {
        match self {
            Request::Push(_) => FrameKind::PushReply,
            Request::Group(_) | Request::Kick(_) => FrameKind::AdminReply,
            Request::Presence(_) => FrameKind::PresenceReply,
            Request::Status(_) => FrameKind::DeliveryStatusReply,
        }
    }

    fn into_frame(self) -> Frame {
        match self {
            Request::Push(r) => Frame::PushRequest(r),
            Request::Group(r) => Frame::GroupUpdate(r),
            Request::Kick(r) => Frame::KickRequest(r),
            Request::Presence(r) => Frame::PresenceQuery(r),
            Request::Status(r) => Frame::DeliveryStatusQuery(r),
        }
    }
}

/// A reply from the node, matched to its request by `request_id`.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Push(proto::PushReply),
    /// Answers group updates and kicks.
    Admin(proto::AdminReply),
    Presence(proto::PresenceReply),
    Status(proto::DeliveryStatusReply),
    /// The node could not read the request; `request_id` 0 when even the id
    /// was unreadable.
    Error(proto::RequestError),
}

impl Reply {
    pub fn request_id(&self) -> u64 {
        match self {
            Reply::Push(r) => r.request_id,
            Reply::Admin(r) => r.request_id,
            Reply::Presence(r) => r.request_id,
            Reply::Status(r) => r.request_id,
            Reply::Error(r) => r.request_id,
        }
    }

    pub fn kind(&self) -> FrameKind {
        match self {
            Reply::Push(_) => FrameKind::PushReply,
            Reply::Admin(_) => FrameKind::AdminReply,
            Reply::Presence(_) => FrameKind::PresenceReply,
            Reply::Status(_) => FrameKind::DeliveryStatusReply,
            Reply::Error(_) => FrameKind::RequestError,
        }
    }

    fn from_frame(frame: Frame) -> Result<Reply, BackendError> {
        match frame {
            Frame::PushReply(r) => Ok(Reply::Push(r)),
            Frame::AdminReply(r) => Ok(Reply::Admin(r)),
            Frame::PresenceReply(r) => Ok(Reply::Presence(r)),
            Frame::DeliveryStatusReply(r) => Ok(Reply::Status(r)),
            Frame::RequestError(r) => Ok(Reply::Error(r)),
            Frame::Error(e) => Err(BackendError::Closed { code: codes::from_wire(e.code), reason: e.reason }),
            other => Err(BackendError::Protocol(format!("unexpected {:?} frame on the push port", other.kind()))),
        }
    }
}

/// A frame out of place during authentication; a node's `Error` says why.
fn unexpected(frame: Frame) -> BackendError {
    match frame {
        Frame::Error(e) => BackendError::Closed { code: codes::from_wire(e.code), reason: e.reason },
        other => BackendError::Protocol(format!("unexpected {:?} frame while authenticating", other.kind())),
    }
}

/// Request-side state, independent of the socket so that [`PushClient`] and
/// [`PushSender`] share it.
#[derive(Debug)]
struct Writer {
    /// Encoded requests not yet written to the socket.
    wbuf: BytesMut,
    /// Id for the next request. Starts at 1: the node uses 0 for "could not
    /// read the id".
    next_id: u64,
    /// Larger request bodies are refused before they reach the node.
    max_request_bytes: u32,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            wbuf: BytesMut::with_capacity(FLUSH_AT_BYTES),
            next_id: 1,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    fn send(&mut self, stream: &mut impl Write, mut req: Request) -> Result<u64, BackendError> {
        let len = req.body_len();
        if len > self.max_request_bytes as usize {
            return Err(BackendError::RequestTooLarge { len, max: self.max_request_bytes });
        }
        let id = self.next_id;
        self.next_id += 1;
        req.set_request_id(id);
        req.into_frame().encode_into(&mut self.wbuf, Flags::default());
        if self.wbuf.len() >= FLUSH_AT_BYTES {
            self.flush(stream)?;
        }
        Ok(id)
    }

    fn flush(&mut self, stream: &mut impl Write) -> Result<(), BackendError> {
        if !self.wbuf.is_empty() {
            stream.write_all(&self.wbuf)?;
            self.wbuf.clear();
        }
        Ok(())
    }
}

/// Reply-side state, independent of the socket so that [`PushClient`] and
/// [`PushReceiver`] share it.
#[derive(Debug)]
struct Reader {
    /// Bytes read but not yet decoded (at most one partial frame after a
    /// decode).
    rbuf: BytesMut,
    /// Replies read while a convenience call waited for another one; `recv`
    /// returns them first, in arrival order.
    backlog: VecDeque<Reply>,
    max_backlog: usize,
    /// Limit on one reply body, checked from the header before buffering it.
    max_reply_bytes: u32,
    /// Mirrors the socket's read timeout, for the error message.
    read_timeout: Option<Duration>,
}

impl Reader {
    fn new() -> Reader {
        Reader {
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            backlog: VecDeque::new(),
            max_backlog: DEFAULT_MAX_BUFFERED_REPLIES,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
            read_timeout: None,
        }
    }

    fn recv(&mut self, stream: &mut impl Read) -> Result<Reply, BackendError> {
        match self.backlog.pop_front() {
            Some(reply) => Ok(reply),
            None => self.read_reply(stream),
        }
    }

    /// Reads until the reply to `id` arrives, keeping the others.
    fn wait_for(&mut self, stream: &mut impl Read, id: u64) -> Result<Reply, BackendError> {
        if let Some(pos) = self.backlog.iter().position(|r| r.request_id() == id)
            && let Some(reply) = self.backlog.remove(pos)
        {
            return Ok(reply);
        }
        loop {
            let reply = self.read_reply(stream)?;
            if reply.request_id() == id {
                return Ok(reply);
            }
            self.backlog.push_back(reply);
            if self.backlog.len() > self.max_backlog {
                return Err(BackendError::Backlog(self.max_backlog));
            }
        }
    }

    fn read_reply(&mut self, stream: &mut impl Read) -> Result<Reply, BackendError> {
        Reply::from_frame(self.read_frame(stream)?)
    }

    fn read_frame(&mut self, stream: &mut impl Read) -> Result<Frame, BackendError> {
        loop {
            match codec::decode_header(&self.rbuf, self.max_reply_bytes)? {
                Some(header) if self.rbuf.len() >= header.frame_len() => {
                    let frame = Frame::decode(header, &self.rbuf[codec::HEADER_LEN..header.frame_len()]);
                    // The frame was intact, so the stream stays in step even
                    // when its body was bad.
                    self.rbuf.advance(header.frame_len());
                    return Ok(frame?);
                }
                // Room for the whole frame at once: a 16 MiB presence reply
                // must not be grown (and copied) chunk by chunk.
                Some(header) => self.rbuf.reserve(header.frame_len() - self.rbuf.len()),
                None => {}
            }
            self.fill(stream)?;
        }
    }

    fn fill(&mut self, stream: &mut impl Read) -> Result<(), BackendError> {
        let start = self.rbuf.len();
        self.rbuf.resize(start + READ_CHUNK, 0);
        loop {
            match stream.read(&mut self.rbuf[start..]) {
                Ok(n) => {
                    self.rbuf.truncate(start + n);
                    return if n == 0 { Err(BackendError::Eof) } else { Ok(()) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.rbuf.truncate(start);
                    return Err(match e.kind() {
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                            BackendError::Timeout(self.read_timeout.unwrap_or_default())
                        }
                        // TLS: the socket closed without close_notify.
                        io::ErrorKind::UnexpectedEof => BackendError::Eof,
                        _ => tls_error(e),
                    });
                }
            }
        }
    }
}

/// A connection to a node's push port.
pub struct PushClient {
    stream: Conn,
    writer: Writer,
    reader: Reader,
}

impl PushClient {
    /// Connects to the first address of `addr` that answers within `timeout`
    /// (each) and authenticates with `key` (the node's answer is awaited
    /// for up to `timeout` too). Name resolution itself is not bounded by
    /// `timeout`.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration, key: &PushKey) -> Result<PushClient, BackendError> {
        PushClient::connect_with(addr, timeout, key, None)
    }

    /// [`PushClient::connect`] over TLS (a node's `push.tls_listen`): the
    /// TLS handshake, bounded by `timeout` too, verifies the node's
    /// certificate before the key is used.
    pub fn connect_tls(
        addr: impl ToSocketAddrs,
        timeout: Duration,
        key: &PushKey,
        tls: &PushTls,
    ) -> Result<PushClient, BackendError> {
        PushClient::connect_with(addr, timeout, key, Some(tls))
    }

    /// [`PushClient::connect`], over TLS when `tls` is given.
    pub fn connect_with(
        addr: impl ToSocketAddrs,
        timeout: Duration,
        key: &PushKey,
        tls: Option<&PushTls>,
    ) -> Result<PushClient, BackendError> {
        let mut last_err = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => {
                    let mut client = PushClient::from_stream(stream)?;
                    client.set_read_timeout(Some(timeout))?;
                    if let Some(tls) = tls {
                        client.start_tls(tls, timeout)?;
                    }
                    client.authenticate(key)?;
                    client.set_read_timeout(None)?;
                    return Ok(client);
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing"))
            .into())
    }

    /// Answers the node's challenge with `key` (the first thing on a new
    /// connection; [`PushClient::connect`] does it). Returns the rights the
    /// node granted. A refused key is [`BackendError::Closed`] with
    /// UNAUTHENTICATED.
    pub fn authenticate(&mut self, key: &PushKey) -> Result<proto::PushAuthOk, BackendError> {
        let challenge = match self.reader.read_frame(&mut self.stream)? {
            Frame::PushChallenge(c) => c,
            other => return Err(unexpected(other)),
        };
        let auth = Frame::PushAuth(crate::push::auth::answer(key, &challenge));
        self.stream.write_all(&auth.to_bytes())?;
        match self.reader.read_frame(&mut self.stream)? {
            Frame::PushAuthOk(ok) => Ok(ok),
            other => Err(unexpected(other)),
        }
    }

    /// Wraps a connected stream (for callers that set up sockets
    /// themselves); call [`PushClient::authenticate`] before any request.
    pub fn from_stream(stream: TcpStream) -> Result<PushClient, BackendError> {
        // Requests are small and latency matters more than packet count;
        // pipelined sends are batched by the write buffer instead.
        stream.set_nodelay(true)?;
        Ok(PushClient { stream: Conn::Plain(stream), writer: Writer::new(), reader: Reader::new() })
    }

    /// Runs the TLS handshake on a fresh plain connection (before
    /// [`PushClient::authenticate`]); reads and writes are bounded by
    /// `timeout` meanwhile.
    fn start_tls(&mut self, tls: &PushTls, timeout: Duration) -> Result<(), BackendError> {
        let Conn::Plain(sock) = &self.stream else {
            return Err(BackendError::Protocol("TLS is already on".into()));
        };
        let sock = sock.try_clone()?;
        sock.set_write_timeout(Some(timeout))?;
        let conn = rustls::ClientConnection::new(Arc::clone(&tls.config), tls.server_name.clone())
            .map_err(|e| BackendError::Tls(e.to_string()))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            match tls.conn.complete_io(&mut tls.sock) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(BackendError::Timeout(timeout));
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(BackendError::Eof),
                Err(e) => return Err(tls_error(e)),
            }
        }
        tls.sock.set_write_timeout(None)?;
        self.stream = Conn::Tls(Box::new(tls));
        Ok(())
    }

    /// How long one read may wait; `None` waits forever. A call that times
    /// out returns [`BackendError::Timeout`] and can be retried.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), BackendError> {
        set_read_timeout(self.stream.tcp(), &mut self.reader, timeout)
    }

    /// Limit on one reply body (default [`DEFAULT_MAX_REPLY_BYTES`]).
    pub fn set_max_reply_bytes(&mut self, max: u32) {
        self.reader.max_reply_bytes = max;
    }

    /// Limit on one request body (default [`DEFAULT_MAX_REQUEST_BYTES`]);
    /// raise it to the node's `max_frame_bytes` when that is larger.
    pub fn set_max_request_bytes(&mut self, max: u32) {
        self.writer.max_request_bytes = max;
    }

    /// Bound on replies kept for later while a convenience call waits
    /// (default [`DEFAULT_MAX_BUFFERED_REPLIES`]).
    pub fn set_max_buffered_replies(&mut self, max: usize) {
        self.reader.max_backlog = max;
    }

    /// Buffers one request and returns its id. Requests go out when the
    /// buffer passes 64 KiB, on [`PushClient::flush`], or with the next
    /// convenience call. Do not pipeline without reading: the node stops
    /// reading a backend whose replies pile up, so send and `recv` in turn,
    /// or [`PushClient::split`] across two threads.
    pub fn send(&mut self, req: Request) -> Result<u64, BackendError> {
        self.writer.send(&mut self.stream, req)
    }

    /// Writes out every buffered request.
    pub fn flush(&mut self) -> Result<(), BackendError> {
        self.writer.flush(&mut self.stream)
    }

    /// The next reply, in the order the node completed them (replies kept
    /// by a convenience call come first). Does not flush.
    pub fn recv(&mut self) -> Result<Reply, BackendError> {
        self.reader.recv(&mut self.stream)
    }

    /// A sender and a receiver on the same connection, for two threads. Any
    /// buffered requests and kept replies move with them.
    /// Not over TLS (one TLS session cannot be driven from two threads
    /// without a lock): use a connection per thread there.
    pub fn split(self) -> Result<(PushSender, PushReceiver), BackendError> {
        let Conn::Plain(stream) = self.stream else {
            return Err(BackendError::Protocol("split is not available over TLS; use a connection per thread".into()));
        };
        let read_half = stream.try_clone()?;
        Ok((PushSender { stream, writer: self.writer }, PushReceiver { stream: read_half, reader: self.reader }))
    }

    /// Pushes `payload` to `targets` and waits for the per-target results.
    pub fn push(
        &mut self,
        targets: proto::Targets,
        payload: Bytes,
        service_id: &str,
        ttl_ms: u32,
    ) -> Result<proto::PushReply, BackendError> {
        let req = proto::PushRequest {
            request_id: 0,
            targets: Some(targets),
            payload,
            service_id: service_id.to_owned(),
            ttl_ms,
            qos: proto::Qos::AtMostOnce as i32,
            forwarded: false,
        };
        self.push_request(req)
    }

    /// Sends a push request as given (any QoS, TTL, targets) and waits for
    /// its reply.
    pub fn push_request(&mut self, req: proto::PushRequest) -> Result<proto::PushReply, BackendError> {
        match self.call(Request::Push(req))? {
            Reply::Push(r) => Ok(r),
            other => Err(wrong_reply(FrameKind::PushReply, &other)),
        }
    }

    /// At-least-once batch unicast: each device's copy is stored in its
    /// timeline (result STORED with its `seq` and `message_id`), sent now
    /// if the device is online, resent until acknowledged and replayed when
    /// the device reconnects.
    pub fn push_devices_at_least_once<S: AsRef<str>>(
        &mut self,
        devices: &[S],
        payload: Bytes,
    ) -> Result<proto::PushReply, BackendError> {
        self.push_request(proto::PushRequest {
            targets: Some(proto::Targets { devices: strings(devices), ..Default::default() }),
            payload,
            qos: proto::Qos::AtLeastOnce as i32,
            ..Default::default()
        })
    }

    /// Where at-least-once messages are (stored, sent, acknowledged with
    /// times, expired, or unknown): one status per id, in order.
    pub fn delivery_status(&mut self, message_ids: &[u64]) -> Result<proto::DeliveryStatusReply, BackendError> {
        let req = proto::DeliveryStatusQuery { request_id: 0, message_ids: message_ids.to_vec() };
        match self.call(Request::Status(req))? {
            Reply::Status(r) => Ok(r),
            other => Err(wrong_reply(FrameKind::DeliveryStatusReply, &other)),
        }
    }

    /// Batch unicast: one result per device, in order.
    pub fn push_devices<S: AsRef<str>>(
        &mut self,
        devices: &[S],
        payload: Bytes,
    ) -> Result<proto::PushReply, BackendError> {
        self.push(proto::Targets { devices: strings(devices), ..Default::default() }, payload, "", 0)
    }

    /// Every online device of each user: one result per user, in order.
    pub fn push_users<S: AsRef<str>>(&mut self, users: &[S], payload: Bytes) -> Result<proto::PushReply, BackendError> {
        self.push(proto::Targets { users: strings(users), ..Default::default() }, payload, "", 0)
    }

    /// Every online member of `group`; the reply carries counts.
    pub fn push_group(&mut self, group: &str, payload: Bytes) -> Result<proto::PushReply, BackendError> {
        self.push(proto::Targets { group: group.to_owned(), ..Default::default() }, payload, "", 0)
    }

    /// Every session on the node, at the node's pace; the reply says
    /// ACCEPTED and deliveries follow.
    pub fn broadcast(&mut self, payload: Bytes) -> Result<proto::PushReply, BackendError> {
        self.push(proto::Targets { broadcast: true, ..Default::default() }, payload, "", 0)
    }

    /// Adds `add` to `group` and removes `remove` from it: one result per
    /// device, adds then removes.
    pub fn group_update<S: AsRef<str>>(
        &mut self,
        group: &str,
        add: &[S],
        remove: &[S],
    ) -> Result<proto::AdminReply, BackendError> {
        let req = proto::GroupUpdate {
            request_id: 0,
            group: group.to_owned(),
            add_devices: strings(add),
            remove_devices: strings(remove),
            forwarded: false,
        };
        self.admin(Request::Group(req))
    }

    /// Ends the sessions of `devices`; the clients get `Kicked{code, reason}`.
    pub fn kick_devices<S: AsRef<str>>(
        &mut self,
        devices: &[S],
        code: ErrorCode,
        reason: &str,
    ) -> Result<proto::AdminReply, BackendError> {
        let req = proto::KickRequest {
            devices: strings(devices),
            code: code as i32,
            reason: reason.to_owned(),
            ..Default::default()
        };
        self.admin(Request::Kick(req))
    }

    /// Revokes the tokens of `devices` and `users` issued until now: the
    /// node refuses them at Auth and Refresh (`REVOKED`, terminal) and
    /// ends their live sessions with `Kicked{REVOKED}`. Needs the key's
    /// `revoke` right.
    pub fn revoke<S: AsRef<str>>(
        &mut self,
        devices: &[S],
        users: &[S],
        reason: &str,
    ) -> Result<proto::AdminReply, BackendError> {
        let req = proto::KickRequest {
            devices: strings(devices),
            users: strings(users),
            reason: reason.to_owned(),
            revoke: true,
            ..Default::default()
        };
        self.admin(Request::Kick(req))
    }

    /// Ends every session of each of `users`.
    pub fn kick_users<S: AsRef<str>>(
        &mut self,
        users: &[S],
        code: ErrorCode,
        reason: &str,
    ) -> Result<proto::AdminReply, BackendError> {
        let req = proto::KickRequest {
            users: strings(users),
            code: code as i32,
            reason: reason.to_owned(),
            ..Default::default()
        };
        self.admin(Request::Kick(req))
    }

    /// Who of these is online, group member counts, and the node's
    /// connection counts (always present, even for an empty query).
    pub fn presence<S: AsRef<str>>(
        &mut self,
        devices: &[S],
        users: &[S],
        groups: &[S],
    ) -> Result<proto::PresenceReply, BackendError> {
        let req = proto::PresenceQuery {
            request_id: 0,
            devices: strings(devices),
            users: strings(users),
            groups: strings(groups),
            forwarded: false,
        };
        match self.call(Request::Presence(req))? {
            Reply::Presence(r) => Ok(r),
            other => Err(wrong_reply(FrameKind::PresenceReply, &other)),
        }
    }

    fn admin(&mut self, req: Request) -> Result<proto::AdminReply, BackendError> {
        match self.call(req)? {
            Reply::Admin(r) => Ok(r),
            other => Err(wrong_reply(FrameKind::AdminReply, &other)),
        }
    }

    /// Sends `req` (with anything buffered before it) and waits for its
    /// reply, which is never [`Reply::Error`] and always of the kind that
    /// answers `req`.
    fn call(&mut self, req: Request) -> Result<Reply, BackendError> {
        let expected = req.reply_kind();
        let id = self.send(req)?;
        self.flush()?;
        match self.reader.wait_for(&mut self.stream, id)? {
            Reply::Error(e) => Err(BackendError::Rejected { code: codes::from_wire(e.code), reason: e.reason }),
            reply if reply.kind() == expected => Ok(reply),
            other => Err(wrong_reply(expected, &other)),
        }
    }
}

impl fmt::Debug for PushClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushClient")
            .field("peer", &self.stream.tcp().peer_addr().ok())
            .field("tls", &matches!(self.stream, Conn::Tls(_)))
            .field("next_id", &self.writer.next_id)
            .field("unsent_bytes", &self.writer.wbuf.len())
            .field("kept_replies", &self.reader.backlog.len())
            .finish()
    }
}

fn set_read_timeout(stream: &TcpStream, reader: &mut Reader, timeout: Option<Duration>) -> Result<(), BackendError> {
    stream.set_read_timeout(timeout)?;
    reader.read_timeout = timeout;
    Ok(())
}

fn strings<S: AsRef<str>>(items: &[S]) -> Vec<String> {
    items.iter().map(|s| s.as_ref().to_owned()).collect()
}

fn wrong_reply(expected: FrameKind, got: &Reply) -> BackendError {
    BackendError::Protocol(format!(
        "request {} answered with {:?} instead of {expected:?}",
        got.request_id(),
        got.kind()
    ))
}

#[cfg(test)]
mod tests;
