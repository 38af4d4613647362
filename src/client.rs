//! The client side: a state machine with no I/O ([`ClientSession`]) and a
//! glommio driver ([`Connection`]) that pumps it over TCP.
//!
//! The session sends `Auth`, waits for `AuthOk`, pings at the negotiated
//! interval and treats a missing `Pong` as a dead link. Server errors and
//! kicks come back as typed [`ClientError`]s carrying the code and whether
//! reconnecting is allowed.
//!
//! At-least-once messages: the client declares ACK support in `Auth`
//! (by default), drops messages whose sequence it has already seen
//! (counted: [`ClientSession::duplicates`]), and acknowledges a message once
//! the application has handled it, which [`Connection::next_event`] takes
//! to be when the application asks for the next event (or calls
//! [`Connection::ack_now`]). Acks are cumulative: one goes out before the
//! connection waits for the network, or after `ack_every` messages handled
//! in a burst. Nothing is persisted: [`Connection::last_seq`] is the last
//! sequence handled; an application that stores it and passes it back in
//! [`ClientOptions::last_seq`] resumes after it, across reconnects and
//! restarts. It stores [`Connection::store_incarnation`] with it (passed
//! back in [`ClientOptions::store_incarnation`]): when the node's store
//! lost its contents since, the node says what the client may have missed.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use crate::protocol::codec::{self, CodecError, Flags, Frame};
use crate::protocol::codes;
use crate::protocol::proto::{self, ErrorCode};
use crate::protocol::time::Millis;

/// What the client tells the server in `Auth`.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    pub token: String,
    /// Optional; checked against the token's device.
    pub device: String,
    pub platform: String,
    pub client_version: String,
    /// Bit set of `proto::Capability` values; [`ClientOptions::new`] sets
    /// `CAPABILITY_ACK`. Without it the node sends stored messages once and
    /// never resends them.
    pub capabilities: u32,
    /// The last at-least-once sequence the application handled (0: none):
    /// the node replays what follows it.
    pub last_seq: u64,
    /// The node store's incarnation adopted last ([`ClientSession::store_incarnation`];
    /// 0: none). Persist it with `last_seq`.
    pub store_incarnation: u64,
    /// Requested heartbeat interval in ms (0 = server default).
    pub heartbeat_ms: u32,
    /// How long to wait for `AuthOk` and for each `Pong`, in ms.
    pub response_timeout_ms: u64,
    /// Acknowledge after this many handled messages even while more are
    /// already buffered (an ACK also goes out whenever the connection is
    /// about to wait for the network). 0 is taken as 1.
    pub ack_every: u32,
}

impl ClientOptions {
    pub fn new(token: impl Into<String>) -> ClientOptions {
        ClientOptions {
            token: token.into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            response_timeout_ms: 10_000,
            capabilities: proto::Capability::Ack as u32,
            ack_every: 16,
            ..Default::default()
        }
    }
}

/// Something the application should know about.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientEvent {
    Connected(proto::AuthOk),
    /// A heartbeat answer, with the measured round trip.
    Pong {
        rtt_ms: u64,
    },
    /// The node asks the client to reconnect elsewhere.
    GoAway {
        endpoint: String,
        reason: String,
    },
    /// A message pushed by a backend.
    Message(proto::Message),
    /// The answer to a Request, when it arrives while the application waits
    /// for something else (see [`Connection::request`]).
    Response(proto::Response),
    /// The node cannot replay the at-least-once messages `from_seq..=to_seq`
    /// (retention exceeded, or its store lost them): fetch what was missed
    /// from the business backend. Handling this event moves
    /// [`Connection::last_seq`] to `to_seq`.
    ResyncRequired {
        from_seq: u64,
        to_seq: u64,
    },
    /// The node's answer to a Join or Leave that arrived while the
    /// application waited for something else.
    GroupResult(proto::GroupResult),
    /// The node took a Refresh: the session's token now expires then.
    Refreshed {
        token_expires_ms: u64,
    },
}

/// Why the connection ended (or could not start).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame from server: {0}")]
    Codec(#[from] CodecError),
    #[error("server closed the session: {code:?} ({reason})")]
    Closed { code: ErrorCode, reason: String, reconnect: bool },
    #[error("kicked: {code:?} ({reason})")]
    Kicked { code: ErrorCode, reason: String },
    #[error("no answer from the server within {0} ms")]
    Timeout(u64),
    #[error("connection closed by the server without an error frame")]
    Eof,
    #[error("unexpected {0:?} frame from the server")]
    Unexpected(proto::FrameKind),
    /// No Response to request `request_id` within the caller's wait. The
    /// connection stays usable; a late answer arrives as
    /// [`ClientEvent::Response`].
    #[error("no response to request {request_id} within {waited_ms} ms")]
    NoResponse { request_id: u64, waited_ms: u64 },
}

impl ClientError {
    /// Whether a reconnect may succeed.
    pub fn reconnect_allowed(&self) -> bool {
        match self {
            ClientError::Closed { reconnect, .. } => *reconnect,
            ClientError::Kicked { code, .. } => codes::reconnect_allowed(*code),
            ClientError::Io(_) | ClientError::Timeout(_) | ClientError::Eof | ClientError::NoResponse { .. } => true,
            ClientError::Codec(_) | ClientError::Unexpected(_) => false,
        }
    }

    /// The server's code, when the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Closed { code, .. } | ClientError::Kicked { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// What [`ClientSession::poll_timer`] found due.
#[derive(Clone, Debug, PartialEq)]
pub enum Due {
    Nothing,
    /// A heartbeat to send ([`Frame::Ping`]; the session counts it as sent).
    Ping,
    /// The outstanding Ping went unanswered within the response timeout.
    PongMissed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientPhase {
    Authenticating,
    Active,
}

/// Client protocol state; time is passed in.
#[derive(Debug)]
pub struct ClientSession {
    opts: ClientOptions,
    phase: ClientPhase,
    heartbeat_ms: u64,
    /// When the next Ping is due (active only).
    next_ping: Millis,
    /// When the outstanding Ping (sent at `.0`) must be answered by (`.1`).
    awaiting_pong: Option<(Millis, Millis)>,
    /// Auth must be answered by then.
    auth_deadline: Millis,
    /// Highest sequence accepted from the wire; anything at or below it is
    /// a duplicate.
    received_seq: u64,
    /// Highest sequence the application handled ([`ClientSession::last_seq`]).
    handled_seq: u64,
    /// Highest sequence acknowledged to the node (Auth.last_seq counts).
    acked_seq: u64,
    /// Messages handled since the last Ack.
    unacked: u32,
    /// Duplicate messages dropped.
    duplicates: u64,
    /// The store incarnation adopted (see [`ClientSession::store_incarnation`]).
    store_incarnation: u64,
    /// A changed incarnation from this session's AuthOk, adopted once a
    /// message or resync of this session (sequence above `.1`) is handled.
    offered_incarnation: Option<(u64, u64)>,
}

impl ClientSession {
    /// Starts a session: returns it with the `Auth` frame to send first.
    pub fn new(opts: ClientOptions, now: Millis) -> (ClientSession, Frame) {
        let auth = Frame::Auth(proto::Auth {
            token: opts.token.clone(),
            device: opts.device.clone(),
            platform: opts.platform.clone(),
            client_version: opts.client_version.clone(),
            capabilities: opts.capabilities,
            last_seq: opts.last_seq,
            heartbeat_ms: opts.heartbeat_ms,
            store_incarnation: opts.store_incarnation,
        });
        let auth_deadline = now.add_ms(opts.response_timeout_ms);
        let last = opts.last_seq;
        let store_incarnation = opts.store_incarnation;
        (
            ClientSession {
                opts,
                phase: ClientPhase::Authenticating,
                heartbeat_ms: 0,
                next_ping: Millis(u64::MAX),
                awaiting_pong: None,
                auth_deadline,
                received_seq: last,
                handled_seq: last,
                acked_seq: last,
                unacked: 0,
                duplicates: 0,
                store_incarnation,
                offered_incarnation: None,
            },
            auth,
        )
    }

    pub fn phase(&self) -> ClientPhase {
        self.phase
    }

    /// The last at-least-once sequence the application handled: persist it
    /// and pass it in [`ClientOptions::last_seq`] to resume after it.
    pub fn last_seq(&self) -> u64 {
        self.handled_seq
    }

    /// Duplicate at-least-once messages received and dropped.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The node store's incarnation to persist with [`ClientSession::last_seq`]
    /// and pass back in [`ClientOptions::store_incarnation`]. A changed one
    /// (the store lost its contents) is adopted only once the application
    /// handled a message or resync of this connection: the node sends the
    /// resync first, so a connection lost before it cannot hide the gap.
    pub fn store_incarnation(&self) -> u64 {
        self.store_incarnation
    }

    fn acks(&self) -> bool {
        self.opts.capabilities & proto::Capability::Ack as u32 != 0
    }

    /// The application handled everything up to `seq` (a message's seq, or
    /// the end of a ResyncRequired range).
    pub fn handled(&mut self, seq: u64) {
        if seq > self.handled_seq {
            self.handled_seq = seq;
            self.unacked += 1;
        }
        if let Some((incarnation, after)) = self.offered_incarnation
            && seq > after
        {
            self.store_incarnation = incarnation;
            self.offered_incarnation = None;
        }
    }

    /// The Ack to send: always when something handled is unacknowledged and
    /// `now_or_batch` is true (the connection is about to wait), otherwise
    /// only once `ack_every` messages are waiting for one.
    pub fn poll_ack(&mut self, now_or_batch: bool) -> Option<Frame> {
        let batch = self.unacked >= self.opts.ack_every.max(1);
        if !self.acks() || self.handled_seq <= self.acked_seq || !(now_or_batch || batch) {
            return None;
        }
        self.acked_seq = self.handled_seq;
        self.unacked = 0;
        Some(Frame::Ack(proto::Ack { seq: self.handled_seq }))
    }

    pub fn handle_frame(&mut self, now: Millis, frame: Frame) -> Result<Option<ClientEvent>, ClientError> {
        match (self.phase, frame) {
            (ClientPhase::Authenticating, Frame::AuthOk(ok)) => {
                match ok.store_incarnation {
                    0 => {}
                    inc if self.store_incarnation == 0 || self.store_incarnation == inc => self.store_incarnation = inc,
                    inc => self.offered_incarnation = Some((inc, self.received_seq)),
                }
                self.phase = ClientPhase::Active;
                self.heartbeat_ms = u64::from(ok.heartbeat_ms.max(1));
                self.next_ping = now.add_ms(self.heartbeat_ms);
                Ok(Some(ClientEvent::Connected(ok)))
            }
            (ClientPhase::Active, Frame::Pong) => {
                let rtt_ms = self.awaiting_pong.take().map_or(0, |(sent, _)| now.0.saturating_sub(sent.0));
                Ok(Some(ClientEvent::Pong { rtt_ms }))
            }
            (_, Frame::Error(e)) => {
                Err(ClientError::Closed { code: codes::from_wire(e.code), reason: e.reason, reconnect: e.reconnect })
            }
            (_, Frame::Kicked(k)) => Err(ClientError::Kicked { code: codes::from_wire(k.code), reason: k.reason }),
            (ClientPhase::Active, Frame::GoAway(g)) => {
                Ok(Some(ClientEvent::GoAway { endpoint: g.endpoint, reason: g.reason }))
            }
            (ClientPhase::Active, Frame::Message(m)) if m.seq != 0 && m.seq <= self.received_seq => {
                // Resent (or replayed) and already seen: drop it.
                self.duplicates += 1;
                Ok(None)
            }
            (ClientPhase::Active, Frame::Message(m)) => {
                self.received_seq = self.received_seq.max(m.seq);
                Ok(Some(ClientEvent::Message(m)))
            }
            (ClientPhase::Active, Frame::ResyncRequired(r)) => {
                self.received_seq = self.received_seq.max(r.to_seq);
                Ok(Some(ClientEvent::ResyncRequired { from_seq: r.from_seq, to_seq: r.to_seq }))
            }
            (ClientPhase::Active, Frame::Response(r)) => Ok(Some(ClientEvent::Response(r))),
            (ClientPhase::Active, Frame::GroupResult(r)) => Ok(Some(ClientEvent::GroupResult(r))),
            (ClientPhase::Active, Frame::RefreshOk(r)) => {
                Ok(Some(ClientEvent::Refreshed { token_expires_ms: r.token_expires_ms }))
            }
            (_, other) => Err(ClientError::Unexpected(other.kind())),
        }
    }

    /// The next time [`ClientSession::handle_timeout`] must run.
    pub fn poll_timeout(&self) -> Millis {
        match self.phase {
            ClientPhase::Authenticating => self.auth_deadline,
            ClientPhase::Active => match self.awaiting_pong {
                Some((_, deadline)) => deadline.min(self.next_ping),
                None => self.next_ping,
            },
        }
    }

    /// Fires due timers: returns a Ping to send, or the error that ends the
    /// session (a missed Pong is fatal here; see [`ClientSession::poll_timer`]
    /// for a caller that probes first).
    pub fn handle_timeout(&mut self, now: Millis) -> Result<Option<Frame>, ClientError> {
        match self.poll_timer(now)? {
            Due::Nothing => Ok(None),
            Due::Ping => Ok(Some(Frame::Ping)),
            Due::PongMissed => Err(ClientError::Timeout(self.opts.response_timeout_ms)),
        }
    }

    /// Fires due timers and reports a missed Pong instead of ending the
    /// session, so an adaptive heartbeat can probe before giving up. Errors
    /// only when `AuthOk` did not come in time.
    pub fn poll_timer(&mut self, now: Millis) -> Result<Due, ClientError> {
        match self.phase {
            ClientPhase::Authenticating if now >= self.auth_deadline => {
                Err(ClientError::Timeout(self.opts.response_timeout_ms))
            }
            ClientPhase::Authenticating => Ok(Due::Nothing),
            ClientPhase::Active => {
                if let Some((_, deadline)) = self.awaiting_pong
                    && now >= deadline
                {
                    self.awaiting_pong = None;
                    return Ok(Due::PongMissed);
                }
                if now >= self.next_ping {
                    self.ping(now);
                    return Ok(Due::Ping);
                }
                Ok(Due::Nothing)
            }
        }
    }

    /// Sends a heartbeat now (also used for an explicit ping).
    pub fn ping(&mut self, now: Millis) -> Frame {
        self.next_ping = now.add_ms(self.heartbeat_ms);
        if self.awaiting_pong.is_none() {
            self.awaiting_pong = Some((now, now.add_ms(self.opts.response_timeout_ms)));
        }
        Frame::Ping
    }

    /// Changes the heartbeat interval (an adaptive heartbeat's choice inside
    /// the negotiated one); the next Ping is due `interval_ms` after `now`.
    pub fn set_heartbeat(&mut self, now: Millis, interval_ms: u64) {
        self.heartbeat_ms = interval_ms.max(1);
        self.next_ping = now.add_ms(self.heartbeat_ms);
    }

    /// Whether a Ping is waiting for its Pong.
    pub fn awaiting_pong(&self) -> bool {
        self.awaiting_pong.is_some()
    }

    /// Messages up to `seq` already reached the application over an earlier
    /// connection (it has not handled them yet, so `last_seq` is below):
    /// their replay on this one is dropped as duplicates.
    pub fn skip_through(&mut self, seq: u64) {
        self.received_seq = self.received_seq.max(seq);
    }
}

/// A live client connection driven on a glommio executor.
pub struct Connection {
    stream: TcpStream,
    session: ClientSession,
    rbuf: BytesMut,
    wbuf: BytesMut,
    events: VecDeque<ClientEvent>,
    epoch: Instant,
    max_frame_bytes: u32,
    /// Id for the next Request this connection sends.
    next_request_id: u64,
    /// Sequence of the last event handed to the application (a Message, or
    /// the end of a ResyncRequired range): handled once it asks for more.
    in_app: Option<u64>,
}

impl Connection {
    /// Connects, authenticates and returns after `AuthOk`.
    pub async fn connect(addr: SocketAddr, opts: ClientOptions) -> Result<(Connection, proto::AuthOk), ClientError> {
        let stream = TcpStream::connect(addr).await.map_err(io::Error::from)?;
        Self::handshake(stream, opts).await
    }

    /// Like [`Connection::connect`] but from a chosen source address (load
    /// tests spread connections over many 127.x.y.z sources). The TCP
    /// connect itself blocks for at most `connect_timeout`; on loopback it
    /// completes at once.
    pub async fn connect_from(
        addr: SocketAddr,
        source: IpAddr,
        connect_timeout: Duration,
        opts: ClientOptions,
    ) -> Result<(Connection, proto::AuthOk), ClientError> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM.cloexec(), None)?;
        socket.set_nodelay(true)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&addr.into(), connect_timeout)?;
        socket.set_nonblocking(true)?;
        let stream = crate::conn::fd::connected(socket.into());
        Self::handshake(stream, opts).await
    }

    async fn handshake(stream: TcpStream, opts: ClientOptions) -> Result<(Connection, proto::AuthOk), ClientError> {
        let epoch = Instant::now();
        let (session, auth) = ClientSession::new(opts, Millis(0));
        let mut conn = Connection {
            stream,
            session,
            rbuf: BytesMut::with_capacity(4096),
            wbuf: BytesMut::new(),
            events: VecDeque::new(),
            epoch,
            max_frame_bytes: codec::DEFAULT_MAX_BODY,
            next_request_id: 1,
            in_app: None,
        };
        conn.send(&auth).await?;
        match conn.next_event().await? {
            ClientEvent::Connected(ok) => Ok((conn, ok)),
            other => Err(ClientError::Unexpected(match other {
                ClientEvent::Pong { .. } => proto::FrameKind::Pong,
                ClientEvent::Message(_) => proto::FrameKind::Message,
                ClientEvent::Response(_) => proto::FrameKind::Response,
                ClientEvent::ResyncRequired { .. } => proto::FrameKind::ResyncRequired,
                _ => proto::FrameKind::GoAway,
            })),
        }
    }

    fn now(&self) -> Millis {
        Millis(self.epoch.elapsed().as_millis() as u64)
    }

    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// The last at-least-once sequence the application handled (see
    /// [`ClientSession::last_seq`]).
    pub fn last_seq(&self) -> u64 {
        self.session.last_seq()
    }

    /// Duplicate at-least-once messages received and dropped.
    pub fn duplicates(&self) -> u64 {
        self.session.duplicates()
    }

    /// The node store's incarnation to persist with [`Connection::last_seq`]
    /// (see [`ClientSession::store_incarnation`]).
    pub fn store_incarnation(&self) -> u64 {
        self.session.store_incarnation()
    }

    /// Marks the event last returned by [`Connection::next_event`] as
    /// handled and acknowledges everything handled, now, instead of when
    /// the application next asks for an event.
    pub async fn ack_now(&mut self) -> Result<(), ClientError> {
        self.mark_handled();
        match self.session.poll_ack(true) {
            Some(ack) => self.send(&ack).await,
            None => Ok(()),
        }
    }

    fn mark_handled(&mut self) {
        if let Some(seq) = self.in_app.take() {
            self.session.handled(seq);
        }
    }

    /// Hands `ev` to the application, remembering its sequence.
    fn hand_to_app(&mut self, ev: ClientEvent) -> ClientEvent {
        self.in_app = match &ev {
            ClientEvent::Message(m) if m.seq != 0 => Some(m.seq),
            ClientEvent::ResyncRequired { to_seq, .. } => Some(*to_seq),
            _ => None,
        };
        ev
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr().map_err(io::Error::from)
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.send_with_flags(frame, Flags::default()).await
    }

    /// Sends one frame with header flags (e.g. [`Flags::RETRANSMISSION`]).
    pub async fn send_with_flags(&mut self, frame: &Frame, flags: Flags) -> Result<(), ClientError> {
        self.wbuf.clear();
        frame.encode_into(&mut self.wbuf, flags);
        self.stream.write_all(&self.wbuf).await?;
        Ok(())
    }

    /// A fresh request id for [`Connection::send_request`].
    pub fn next_request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    /// Sends a request to service `service` and waits up to `timeout` for
    /// its Response. Events that arrive meanwhile (messages, other
    /// responses) are kept for [`Connection::next_event`]. A Response with a
    /// non-OK `status` (BUSY, TIMEOUT, ...) is returned as `Ok`: the node
    /// answered and the connection is fine.
    pub async fn request(
        &mut self,
        service: &str,
        body: bytes::Bytes,
        timeout: Duration,
    ) -> Result<proto::Response, ClientError> {
        let request_id = self.next_request_id();
        let req = proto::Request { service_id: service.into(), request_id, client_msg_id: 0, body };
        self.send_request(&req, false).await?;
        self.wait_response(request_id, timeout).await
    }

    /// Sends `req` as is (pipelining: send several, then wait for each).
    /// Give a retry the first attempt's `client_msg_id` and set
    /// `retransmission`: the node answers it from its dedup window instead of
    /// forwarding it again.
    pub async fn send_request(&mut self, req: &proto::Request, retransmission: bool) -> Result<(), ClientError> {
        let flags = if retransmission { Flags::RETRANSMISSION } else { Flags::default() };
        self.send_with_flags(&Frame::Request(req.clone()), flags).await
    }

    /// Waits up to `timeout` for the Response to `request_id`, keeping other
    /// events for [`Connection::next_event`].
    pub async fn wait_response(&mut self, request_id: u64, timeout: Duration) -> Result<proto::Response, ClientError> {
        let is_it = |ev: &ClientEvent| matches!(ev, ClientEvent::Response(r) if r.request_id == request_id);
        if let Some(pos) = self.events.iter().position(is_it)
            && let Some(ClientEvent::Response(r)) = self.events.remove(pos)
        {
            return Ok(r);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_event(Some(deadline)).await? {
                None => {
                    let waited_ms = timeout.as_millis() as u64;
                    return Err(ClientError::NoResponse { request_id, waited_ms });
                }
                Some(ClientEvent::Response(r)) if r.request_id == request_id => return Ok(r),
                Some(other) => self.events.push_back(other),
            }
        }
    }

    /// Writes raw bytes (tests use this to send malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Joins a group: the node delivers the group's pushes to this session.
    /// Returns the node's answer: `code` 0 when joined, PERMISSION_DENIED
    /// when neither the token nor the node's policy allows the group.
    /// Events that arrive meanwhile are kept for [`Connection::next_event`].
    pub async fn join(&mut self, group: &str) -> Result<proto::GroupResult, ClientError> {
        self.send(&Frame::Join(proto::GroupMembership { group: group.into() })).await?;
        self.group_result(group, true).await
    }

    /// Leaves a group; returns the node's answer.
    pub async fn leave(&mut self, group: &str) -> Result<proto::GroupResult, ClientError> {
        self.send(&Frame::Leave(proto::GroupMembership { group: group.into() })).await?;
        self.group_result(group, false).await
    }

    async fn group_result(&mut self, group: &str, join: bool) -> Result<proto::GroupResult, ClientError> {
        loop {
            match self.read_event(None).await? {
                Some(ClientEvent::GroupResult(r)) if r.group == group && r.join == join => return Ok(r),
                Some(other) => self.events.push_back(other),
                None => {}
            }
        }
    }

    /// Sends a Ping now; its Pong arrives through [`Connection::next_event`].
    pub async fn ping(&mut self) -> Result<(), ClientError> {
        let frame = self.session.ping(self.now());
        self.send(&frame).await
    }

    /// Waits for the next event, sending heartbeats as they fall due.
    /// Returns the error that ended the session. Calling it again means the
    /// event it returned last was handled (at-least-once messages are
    /// acknowledged from then on).
    pub async fn next_event(&mut self) -> Result<ClientEvent, ClientError> {
        self.mark_handled();
        if let Some(ack) = self.session.poll_ack(false) {
            self.send(&ack).await?;
        }
        if let Some(ev) = self.events.pop_front() {
            return Ok(self.hand_to_app(ev));
        }
        loop {
            if let Some(ev) = self.read_event(None).await? {
                return Ok(self.hand_to_app(ev));
            }
        }
    }

    /// Reads frames until one makes an event, sending heartbeats as they
    /// fall due; `None` once `deadline` passes.
    async fn read_event(&mut self, deadline: Option<Instant>) -> Result<Option<ClientEvent>, ClientError> {
        loop {
            if let Some((header, body)) = codec::split_frame(&self.rbuf, self.max_frame_bytes)? {
                let len = header.frame_len();
                let frame = Frame::decode(header, body)?;
                let _ = self.rbuf.split_to(len);
                let now = self.now();
                if let Some(ev) = self.session.handle_frame(now, frame)? {
                    return Ok(Some(ev));
                }
                continue;
            }
            // About to wait for the network: acknowledge what was handled.
            if let Some(ack) = self.session.poll_ack(true) {
                self.send(&ack).await?;
            }
            let wake = self.session.poll_timeout();
            let now = self.now();
            if wake <= now {
                if let Some(ping) = self.session.handle_timeout(now)? {
                    self.send(&ping).await?;
                }
                continue;
            }
            let mut wait = Duration::from_millis(wake.0 - now.0);
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                wait = wait.min(left);
            }
            let mut chunk = [0u8; 4096];
            let read = futures_lite::future::or(async { Some(self.stream.read(&mut chunk).await) }, async {
                glommio::timer::sleep(wait).await;
                None
            })
            .await;
            match read {
                None => {}
                Some(Ok(0)) => return Err(ClientError::Eof),
                Some(Ok(n)) => self.rbuf.extend_from_slice(&chunk[..n]),
                Some(Err(e)) => return Err(ClientError::Io(e)),
            }
        }
    }

    /// Closes the connection from the client side.
    pub async fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both).await;
    }
}

#[cfg(test)]
mod tests;
