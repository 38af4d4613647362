//! The SDK's long-lived state machine: what a client does across
//! connections, with no I/O and no clock (quinn's shape: `handle_*(now, ..)`
//! in, [`Agent::poll_action`] and [`Agent::poll_timeout`] out).
//!
//! One [`Agent`] lives as long as the application wants a connection. It
//! owns the policies of [`super`] (endpoint drift, backoff with full jitter,
//! the smart heartbeat), the resume point (last handled sequence, and the
//! highest one handed out, so a replay is never seen twice), upstream
//! requests waiting for their Response (with their `client_msg_id` and
//! retry deadlines), foreground/background and network changes. A
//! [`ClientSession`] speaks the protocol of one connection at a time.
//!
//! ```text
//!  Waiting --at--> [LookingUp --dispatch-->] Connecting --connected--> Up --AuthOk--> Up(active)
//!     ^                                          |                     |
//!     +---- backoff (or at once: GoAway, network change) <-- failure --+
//!  any failure with a terminal code, or close() --> Stopped
//! ```
//!
//! Every connection attempt gets a fresh [`LinkId`]; inputs for an older
//! link are ignored, so a driver never has to worry about late callbacks.

mod internals;

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};

use super::{Backoff, Endpoints, Rng, SmartHeartbeat};
use crate::client::{ClientError, ClientEvent, ClientOptions, ClientSession, Due};
use crate::protocol::codec::{self, Flags, Frame};
use crate::protocol::codes;
use crate::protocol::limits::{MAX_ID_BYTES, check_id};
use crate::protocol::proto::{self, ErrorCode};
use crate::protocol::time::Millis;

/// One connection attempt (the driver's socket for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// An upstream request, named by its `client_msg_id` (unique per device,
/// kept across retries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Settings of an [`Agent`]. [`AgentConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// What goes into `Auth` (token, device, platform, version,
    /// capabilities, ack batching, response timeout). `last_seq` is the
    /// resume point at start; `heartbeat_ms` 0 asks for the longest interval
    /// the server allows (the smart heartbeat stays inside it).
    pub client: ClientOptions,
    /// host:port endpoints, in order of preference. Used as they are when
    /// no dispatcher is configured, and as the fallback when it cannot be
    /// reached.
    pub endpoints: Vec<String>,
    /// Ask the dispatcher ([`Action::Lookup`]) for endpoints and a token
    /// before the first connect, after every endpoint failed in a row, on
    /// `TOKEN_EXPIRED`, on a network change and on a GoAway naming no
    /// endpoint.
    pub dispatcher: bool,
    /// The network type the dispatcher is told (`net=`), e.g. "wifi".
    pub net: String,
    /// A TCP connect that has not completed by then counts as failed.
    pub connect_timeout_ms: u64,
    /// Backoff between attempts: every wait is at least `backoff_min_ms`,
    /// the first at most `backoff_base_ms`, doubling up to `backoff_max_ms`.
    /// A dispatcher's `reconnect` bounds replace min and max.
    pub backoff_min_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Heartbeat bounds until a server (dispatcher or AuthOk) gives its own.
    pub heartbeat_min_ms: u32,
    pub heartbeat_max_ms: u32,
    /// An upstream request unanswered for this long is sent again (same
    /// `client_msg_id`, retransmission flag); so is one answered BUSY.
    pub request_retry_ms: u64,
    /// Upstream requests waiting for an answer at most; more are refused.
    pub max_pending_requests: usize,
    /// A handled message is acknowledged at once when the application has
    /// no other message of ours in hand, after `ClientOptions::ack_every`
    /// handled ones, and at the latest this long after it was handled.
    pub ack_delay_ms: u64,
    /// Largest frame body accepted from the server.
    pub max_frame_bytes: u32,
    /// Seed of the jitter and of the first `client_msg_id` (tests fix it).
    pub seed: u64,
}

impl AgentConfig {
    pub fn new(client: ClientOptions) -> AgentConfig {
        AgentConfig {
            client,
            endpoints: Vec::new(),
            dispatcher: false,
            net: String::new(),
            connect_timeout_ms: 10_000,
            backoff_min_ms: 200,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            heartbeat_min_ms: 5_000,
            heartbeat_max_ms: 270_000,
            request_retry_ms: 5_000,
            max_pending_requests: 1_024,
            ack_delay_ms: 200,
            max_frame_bytes: codec::DEFAULT_MAX_BODY,
            seed: Rng::from_entropy().next_u64(),
        }
    }
}

/// What the dispatcher answered (see `crate::http::dispatcher`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dispatch {
    pub endpoints: Vec<String>,
    pub token: String,
    pub heartbeat_min_ms: u32,
    pub heartbeat_max_ms: u32,
    /// The server's reconnect backoff bounds (0: not given, keep ours).
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

/// Why a connection ended or could not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Disconnect {
    /// The dispatcher could not be asked or gave nothing usable.
    #[error("dispatcher: {0}")]
    Dispatcher(String),
    #[error("connect failed: {0}")]
    ConnectFailed(String),
    #[error("connect did not complete within {0} ms")]
    ConnectTimeout(u64),
    #[error("no AuthOk within {0} ms")]
    AuthTimeout(u64),
    /// The heartbeat and its probe went unanswered (a half-open link).
    #[error("no Pong to a heartbeat and its probe")]
    NoPong,
    #[error("the server closed the session: {code:?} ({reason})")]
    Error { code: ErrorCode, reason: String, reconnect: bool },
    #[error("kicked: {code:?} ({reason})")]
    Kicked { code: ErrorCode, reason: String },
    /// The server asked to move (to `endpoint`, or anywhere when empty).
    #[error("go away to {endpoint:?}: {reason}")]
    GoAway { endpoint: String, reason: String },
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the network changed")]
    NetworkChanged,
    #[error("closed by the application")]
    ClosedByApp,
}

impl Disconnect {
    /// The server's code, when it gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Disconnect::Error { code, .. } | Disconnect::Kicked { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the agent reconnects after it.
    pub fn reconnect_allowed(&self) -> bool {
        match self {
            Disconnect::Error { reconnect, .. } => *reconnect,
            Disconnect::Kicked { code, .. } => codes::reconnect_allowed(*code),
            Disconnect::Protocol(_) | Disconnect::ClosedByApp => false,
            _ => true,
        }
    }

    fn from_client(err: ClientError) -> Disconnect {
        match err {
            ClientError::Closed { code, reason, reconnect } => Disconnect::Error { code, reason, reconnect },
            ClientError::Kicked { code, reason } => Disconnect::Kicked { code, reason },
            ClientError::Timeout(ms) => Disconnect::AuthTimeout(ms),
            ClientError::Io(e) => Disconnect::Lost(e.to_string()),
            ClientError::Eof => Disconnect::Lost("closed by the server".into()),
            e @ (ClientError::Codec(_) | ClientError::Unexpected(_) | ClientError::NoResponse { .. }) => {
                Disconnect::Protocol(e.to_string())
            }
        }
    }
}

/// Why an upstream request got no Response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no response within the request's timeout ({attempts} attempts)")]
    TimedOut { attempts: u32 },
    #[error("the client stopped: {0}")]
    Stopped(Disconnect),
}

/// Why the agent refused an application call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SdkError {
    #[error("no endpoint and no dispatcher configured")]
    NoEndpoints,
    #[error("{0} requests are already waiting for an answer")]
    TooManyRequests(usize),
    #[error("service id must be 1 to {MAX_ID_BYTES} bytes")]
    BadService,
    #[error("request body of {len} bytes exceeds the frame limit of {max}")]
    TooLarge { len: usize, max: u32 },
    #[error("the client stopped: {0}")]
    Stopped(Disconnect),
}

/// What the application is told.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A session is up on `endpoint`.
    Connected { endpoint: String, auth_ok: proto::AuthOk },
    /// A pushed message. At-least-once messages (`seq != 0`) come once per
    /// process; call [`Agent::message_handled`] with `seq` once handled.
    Message(proto::Message),
    /// The node cannot replay `from_seq..=to_seq`: fetch it from the
    /// business backend, then call [`Agent::message_handled`] with `to_seq`.
    ResyncRequired { from_seq: u64, to_seq: u64 },
    /// The answer to [`Agent::request`] (a non-OK `status` is an answer too).
    Response { id: RequestId, result: Result<proto::Response, RequestError> },
    /// The server ended the session with `Kicked` (a `Disconnected`
    /// follows).
    Kicked { code: ErrorCode, reason: String },
    /// No session any more (or an attempt failed). `retry_in_ms` is when
    /// the next attempt starts; `None`: the agent stopped for good.
    Disconnected { reason: Disconnect, retry_in_ms: Option<u64> },
    /// The session's token expires at `token_expires_ms` (unix ms; a fifth
    /// of its lifetime is left): get a new one for the same user and
    /// device and call [`Agent::refresh_token`], or the node closes the
    /// session with `TOKEN_EXPIRED` then.
    TokenExpiring { token_expires_ms: u64 },
    /// The node took the new token.
    TokenRefreshed { token_expires_ms: u64 },
    /// The driver's token refresher failed (its error).
    TokenRefreshFailed(String),
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Ask the dispatcher, then call [`Agent::handle_dispatch`] (an answer
    /// later than `connect_timeout_ms` is ignored).
    Lookup {
        net: String,
    },
    /// Open a TCP connection, then call [`Agent::handle_connected`] (or
    /// [`Agent::handle_closed`] when it fails).
    Connect {
        link: LinkId,
        endpoint: String,
    },
    /// Write these bytes on the link.
    Send {
        link: LinkId,
        bytes: Bytes,
    },
    /// Close the link (the agent is done with it; no callback needed).
    Close {
        link: LinkId,
    },
    Event(Event),
}

/// An upstream request waiting for its answer.
#[derive(Debug)]
struct Pending {
    service: String,
    body: Bytes,
    deadline: Millis,
    /// When to send (again); `None` while there is no session to send on
    /// (it goes out when one becomes active).
    next_try: Option<Millis>,
    attempts: u32,
    /// The link of the last attempt.
    sent_on: Option<LinkId>,
}

/// One connection's state once TCP is up.
#[derive(Debug)]
struct Up {
    link: LinkId,
    endpoint: String,
    session: ClientSession,
    /// Bytes of an incomplete frame.
    rbuf: BytesMut,
    /// AuthOk arrived.
    active: bool,
    /// The node's unix ms minus our clock, from AuthOk (to place the
    /// token's expiry on our clock).
    server_offset_ms: i64,
    /// When to ask the application for a new token ([`Event::TokenExpiring`]).
    refresh_at: Option<Millis>,
    /// The session's token expiry (unix ms, 0: never), from AuthOk or RefreshOk.
    token_expires_ms: u64,
}

impl Up {
    /// Asks for a new token when a fifth of the time to `token_expires_ms`
    /// is left (at least a second ahead of it).
    fn schedule_refresh(&mut self, now: Millis, token_expires_ms: u64) {
        self.token_expires_ms = token_expires_ms;
        self.refresh_at = None;
        if token_expires_ms == 0 {
            return;
        }
        let server_now = now.0 as i64 + self.server_offset_ms;
        let left = (i64::try_from(token_expires_ms).unwrap_or(i64::MAX) - server_now).max(0) as u64;
        let lead = (left / 5).max(1_000).min(left);
        self.refresh_at = Some(now.add_ms(left - lead));
    }
}

#[derive(Debug)]
enum State {
    /// Next attempt at `at`.
    Waiting {
        at: Millis,
    },
    /// The dispatcher must answer by `deadline`.
    LookingUp {
        deadline: Millis,
    },
    Connecting {
        link: LinkId,
        endpoint: String,
        deadline: Millis,
    },
    Up(Box<Up>),
    Stopped(Disconnect),
}

/// See the module docs.
#[derive(Debug)]
pub struct Agent {
    cfg: AgentConfig,
    endpoints: Endpoints,
    backoff: Backoff,
    rng: Rng,
    heartbeat: SmartHeartbeat,
    state: State,
    /// Ask the dispatcher before the next connect.
    need_lookup: bool,
    next_link: u64,
    /// Highest at-least-once sequence handed to the application.
    delivered_seq: u64,
    /// Highest sequence the application handled: the resume point.
    handled_seq: u64,
    /// The node store's incarnation adopted (sent in Auth; see
    /// `ClientSession::store_incarnation`).
    store_incarnation: u64,
    /// An Ack is owed by then (see `AgentConfig::ack_delay_ms`).
    ack_due: Option<Millis>,
    pending: BTreeMap<RequestId, Pending>,
    next_msg_id: u64,
    /// Duplicates dropped by sessions that ended.
    duplicates: u64,
    /// The last reconnect skipped the backoff; the next one may not until a
    /// round trip succeeds.
    rushed: bool,
    out: VecDeque<Action>,
}

impl Agent {
    /// Starts the agent: its first action (a lookup or a connect) is ready.
    pub fn new(cfg: AgentConfig, now: Millis) -> Result<Agent, SdkError> {
        if cfg.endpoints.is_empty() && !cfg.dispatcher {
            return Err(SdkError::NoEndpoints);
        }
        let mut rng = Rng::new(cfg.seed);
        // Random start, so ids stay unique per device across restarts; the
        // top bit clear leaves room to count up, and never 0 (no id).
        let next_msg_id = (rng.next_u64() >> 1) | 1;
        let mut agent = Agent {
            endpoints: Endpoints::new(cfg.endpoints.clone()),
            backoff: Backoff::new(cfg.backoff_min_ms, cfg.backoff_base_ms, cfg.backoff_max_ms),
            heartbeat: SmartHeartbeat::new(cfg.heartbeat_min_ms, cfg.heartbeat_max_ms),
            rng,
            state: State::Waiting { at: now },
            need_lookup: cfg.dispatcher,
            next_link: 0,
            delivered_seq: cfg.client.last_seq,
            handled_seq: cfg.client.last_seq,
            store_incarnation: cfg.client.store_incarnation,
            ack_due: None,
            pending: BTreeMap::new(),
            next_msg_id,
            duplicates: 0,
            rushed: false,
            out: VecDeque::new(),
            cfg,
        };
        agent.attempt(now);
        Ok(agent)
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// When [`Agent::handle_timeout`] must run next (`None`: stopped).
    pub fn poll_timeout(&self) -> Option<Millis> {
        let state = match &self.state {
            State::Waiting { at } => Some(*at),
            State::LookingUp { deadline } => Some(*deadline),
            State::Connecting { deadline, .. } => Some(*deadline),
            State::Up(up) => {
                Some(up.refresh_at.map_or(up.session.poll_timeout(), |r| r.min(up.session.poll_timeout())))
            }
            State::Stopped(_) => return None,
        };
        let requests = self.pending.values().map(|p| p.next_try.map_or(p.deadline, |t| t.min(p.deadline))).min();
        [state, requests, self.ack_due].into_iter().flatten().min()
    }

    /// The resume point: the last sequence the application handled.
    /// Persist it and pass it in `ClientOptions::last_seq` after a restart.
    pub fn last_seq(&self) -> u64 {
        self.handled_seq
    }

    /// The node store's incarnation: persist it with [`Agent::last_seq`] and
    /// pass it in `ClientOptions::store_incarnation` after a restart.
    pub fn store_incarnation(&self) -> u64 {
        self.store_incarnation
    }

    /// Duplicate at-least-once messages dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates + self.up().map_or(0, |u| u.session.duplicates())
    }

    /// The endpoint of the session, when one is active.
    pub fn connected_to(&self) -> Option<&str> {
        self.up().filter(|u| u.active).map(|u| u.endpoint.as_str())
    }

    /// The endpoint the agent is on or will try next.
    pub fn current_endpoint(&self) -> Option<&str> {
        self.endpoints.current()
    }

    /// The smart heartbeat's interval now, in ms (0: a probe is due).
    pub fn heartbeat_interval_ms(&self) -> u32 {
        self.heartbeat.interval_ms()
    }

    pub fn heartbeat(&self) -> &SmartHeartbeat {
        &self.heartbeat
    }

    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// Requests waiting for an answer.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.state, State::Stopped(_))
    }

    fn up(&self) -> Option<&Up> {
        match &self.state {
            State::Up(up) => Some(up),
            _ => None,
        }
    }

    // ---- inputs from the driver ----------------------------------------

    /// The dispatcher answered (or could not be asked).
    pub fn handle_dispatch<E: std::fmt::Display>(&mut self, now: Millis, result: Result<Dispatch, E>) {
        if !matches!(self.state, State::LookingUp { .. }) {
            return;
        }
        match result {
            Ok(d) if !d.endpoints.is_empty() => {
                self.endpoints.replace(d.endpoints);
                if !d.token.is_empty() {
                    self.cfg.client.token = d.token;
                }
                if d.heartbeat_max_ms > 0 {
                    self.adopt_heartbeat_bounds(d.heartbeat_min_ms, d.heartbeat_max_ms);
                }
                if d.reconnect_max_ms > 0 {
                    self.backoff.set_bounds(d.reconnect_min_ms, d.reconnect_max_ms);
                }
                self.need_lookup = false;
                self.connect(now);
            }
            other => {
                let why = match other {
                    Ok(_) => "the dispatcher returned no endpoint".to_owned(),
                    Err(e) => e.to_string(),
                };
                // Fall back to the endpoints already known (fixed or from an
                // earlier answer); ask again once those fail.
                self.need_lookup = self.endpoints.is_empty();
                self.retry_later(now, Disconnect::Dispatcher(why));
            }
        }
    }

    /// The TCP connection of `link` is up.
    pub fn handle_connected(&mut self, now: Millis, link: LinkId) {
        let State::Connecting { link: l, endpoint, .. } = &self.state else { return };
        if *l != link {
            return;
        }
        let endpoint = endpoint.clone();
        let mut opts = self.cfg.client.clone();
        opts.last_seq = self.handled_seq;
        opts.store_incarnation = self.store_incarnation;
        if opts.heartbeat_ms == 0 {
            // The longest the server allows: the smart heartbeat climbs
            // toward it, and the server's idle timeout covers it.
            opts.heartbeat_ms = u32::MAX;
        }
        let (mut session, auth) = ClientSession::new(opts, now);
        session.skip_through(self.delivered_seq);
        let up = Up {
            link,
            endpoint,
            session,
            rbuf: BytesMut::new(),
            active: false,
            server_offset_ms: 0,
            refresh_at: None,
            token_expires_ms: 0,
        };
        self.state = State::Up(Box::new(up));
        self.send(link, &auth, Flags::default());
    }

    /// Bytes arrived on `link`.
    pub fn handle_bytes(&mut self, now: Millis, link: LinkId, bytes: &[u8]) {
        match &mut self.state {
            State::Up(up) if up.link == link => up.rbuf.extend_from_slice(bytes),
            _ => return,
        }
        loop {
            let State::Up(up) = &mut self.state else { return };
            let frame = match codec::split_frame(&up.rbuf, self.cfg.max_frame_bytes) {
                Ok(None) => return,
                Ok(Some((header, body))) => {
                    let len = header.frame_len();
                    let frame = Frame::decode(header, body);
                    let _ = up.rbuf.split_to(len);
                    frame
                }
                Err(e) => Err(e),
            };
            let result = match frame {
                Ok(frame) => up.session.handle_frame(now, frame),
                Err(e) => Err(ClientError::Codec(e)),
            };
            match result {
                Ok(None) => {}
                Ok(Some(ev)) => self.on_session_event(now, ev),
                Err(err) => {
                    if let ClientError::Kicked { code, reason } = &err {
                        self.event(Event::Kicked { code: *code, reason: reason.clone() });
                    }
                    self.fail(now, Disconnect::from_client(err), true);
                    return;
                }
            }
            if !matches!(&self.state, State::Up(up) if up.link == link) {
                return; // the event ended the link (GoAway)
            }
        }
    }

    /// `link` closed or failed (connect refused, reset, EOF).
    pub fn handle_closed(&mut self, now: Millis, link: LinkId, why: &str) {
        let reason = match &self.state {
            State::Connecting { link: l, .. } if *l == link => Disconnect::ConnectFailed(why.to_owned()),
            State::Up(up) if up.link == link => Disconnect::Lost(why.to_owned()),
            _ => return,
        };
        self.fail(now, reason, false);
    }

    /// Time passed: fires whatever is due.
    pub fn handle_timeout(&mut self, now: Millis) {
        match &mut self.state {
            State::Waiting { at } if now >= *at => self.attempt(now),
            State::LookingUp { deadline } if now >= *deadline => {
                self.need_lookup = self.endpoints.is_empty();
                let why = format!("no answer within {} ms", self.cfg.connect_timeout_ms);
                self.retry_later(now, Disconnect::Dispatcher(why));
            }
            State::Connecting { deadline, .. } if now >= *deadline => {
                self.fail(now, Disconnect::ConnectTimeout(self.cfg.connect_timeout_ms), true)
            }
            State::Up(up) if up.refresh_at.is_some_and(|r| now >= r) => {
                up.refresh_at = None;
                let token_expires_ms = up.token_expires_ms;
                self.event(Event::TokenExpiring { token_expires_ms });
                return self.handle_timeout(now);
            }
            State::Up(up) => match up.session.poll_timer(now) {
                Err(err) => self.fail(now, Disconnect::from_client(err), true),
                Ok(Due::Nothing) => {}
                Ok(Due::Ping) => {
                    let link = up.link;
                    self.send(link, &Frame::Ping, Flags::default());
                }
                Ok(Due::PongMissed) => {
                    if self.heartbeat.on_missed() {
                        self.fail(now, Disconnect::NoPong, true);
                    } else {
                        // Probe at once; its Pong (or its absence) decides.
                        let probe = up.session.ping(now);
                        let link = up.link;
                        self.send(link, &probe, Flags::default());
                    }
                }
            },
            _ => {}
        }
        if self.ack_due.is_some_and(|t| now >= t) {
            self.flush_ack(true);
        }
        self.requests_due(now);
    }

    // ---- application calls ----------------------------------------------

    /// Sends an upstream request to `service`; its answer comes as
    /// [`Event::Response`] within `timeout_ms`. Sent again (same
    /// `client_msg_id`) after `request_retry_ms` without an answer, after a
    /// BUSY answer, and on the next session when the connection drops: the
    /// node forwards it to the backend once.
    pub fn request(&mut self, now: Millis, service: &str, body: Bytes, timeout_ms: u64) -> Result<RequestId, SdkError> {
        if let State::Stopped(why) = &self.state {
            return Err(SdkError::Stopped(why.clone()));
        }
        if check_id(service, MAX_ID_BYTES).is_err() {
            return Err(SdkError::BadService);
        }
        // Service id, ids and tags: a few dozen bytes on top of the body.
        let max = self.cfg.max_frame_bytes;
        if body.len() + service.len() + 32 > max as usize {
            return Err(SdkError::TooLarge { len: body.len(), max });
        }
        if self.pending.len() >= self.cfg.max_pending_requests {
            return Err(SdkError::TooManyRequests(self.pending.len()));
        }
        let id = RequestId(self.next_msg_id);
        self.next_msg_id = self.next_msg_id.wrapping_add(1).max(1);
        let active = self.up().is_some_and(|u| u.active);
        let p = Pending {
            service: service.to_owned(),
            body,
            deadline: now.add_ms(timeout_ms),
            next_try: active.then_some(now),
            attempts: 0,
            sent_on: None,
        };
        self.pending.insert(id, p);
        self.requests_due(now);
        Ok(id)
    }

    /// The application handled the message with sequence `seq` (or the
    /// resync range ending at `seq`), and every one before it: handle
    /// at-least-once messages in the order they come.
    pub fn message_handled(&mut self, now: Millis, seq: u64) {
        if seq <= self.handled_seq {
            return;
        }
        self.handled_seq = seq;
        let caught_up = self.handled_seq >= self.delivered_seq;
        let State::Up(up) = &mut self.state else { return };
        up.session.handled(seq);
        self.store_incarnation = up.session.store_incarnation();
        if !up.active {
            return; // no Ack before AuthOk; it goes out once active
        }
        // Ack at once when the application has nothing else of ours in
        // hand, else in batches (`ack_every`), or after `ack_delay_ms`.
        if !self.flush_ack(caught_up) && self.ack_due.is_none() {
            self.ack_due = Some(now.add_ms(self.cfg.ack_delay_ms));
        }
    }

    /// Sends the Ack the session owes, if any (see `ClientSession::poll_ack`).
    fn flush_ack(&mut self, now_or_batch: bool) -> bool {
        let State::Up(up) = &mut self.state else {
            self.ack_due = None;
            return false;
        };
        let Some(ack) = up.session.poll_ack(now_or_batch) else {
            if now_or_batch {
                self.ack_due = None;
            }
            return false;
        };
        let link = up.link;
        self.ack_due = None;
        self.send(link, &ack, Flags::default());
        true
    }

    /// The application moved to the foreground or the background.
    pub fn set_foreground(&mut self, now: Millis, foreground: bool) {
        let returning = self.heartbeat.set_foreground(foreground);
        let State::Up(up) = &mut self.state else { return };
        if !up.active {
            return;
        }
        if returning {
            // One heartbeat on return: the link may have died meanwhile.
            let ping = up.session.ping(now);
            let link = up.link;
            self.send(link, &ping, Flags::default());
        }
        self.rearm_heartbeat(now);
    }

    /// The device changed networks (`net`: e.g. "wifi", "cellular"): the
    /// old socket is likely dead and nothing learned about it holds, so
    /// reconnect now.
    pub fn network_changed(&mut self, now: Millis, net: &str) {
        self.cfg.net = net.to_owned();
        self.heartbeat.reset_network();
        self.backoff.reset();
        self.rushed = false;
        self.need_lookup = self.cfg.dispatcher;
        match self.state {
            State::Up(_) | State::Connecting { .. } => self.fail(now, Disconnect::NetworkChanged, true),
            State::Waiting { .. } => self.attempt(now),
            State::LookingUp { .. } | State::Stopped(_) => {}
        }
    }

    /// A new token for the next connects (e.g. after `TOKEN_EXPIRED` when no
    /// dispatcher is configured).
    pub fn set_token(&mut self, token: String) {
        self.cfg.client.token = token;
    }

    /// A new token (the answer to [`Event::TokenExpiring`]): used by the
    /// next connects, and sent to the node at once when a session is up so
    /// that it outlives the old token.
    pub fn refresh_token(&mut self, _now: Millis, token: String) {
        self.cfg.client.token = token.clone();
        if let State::Up(up) = &self.state
            && up.active
        {
            let link = up.link;
            self.send(link, &Frame::Refresh(proto::Refresh { token }), Flags::default());
        }
    }

    /// Stops for good: closes the connection, fails waiting requests.
    pub fn close(&mut self, _now: Millis) {
        if let Some(link) = self.link() {
            self.out.push_back(Action::Close { link });
        }
        if !self.is_stopped() {
            self.event(Event::Disconnected { reason: Disconnect::ClosedByApp, retry_in_ms: None });
            self.stop(Disconnect::ClosedByApp);
        }
    }
}

#[cfg(test)]
mod tests;
