//! Deterministic tests of the [`Agent`]: simulated time and a simulated
//! link between the agent and simulated nodes, each running the real
//! server-side protocol state machine ([`session::Session`]: token check,
//! heartbeat answers, idle timeout, kicks) plus the device's timeline in
//! the real store ([`MemoryStore`]: append, resume after `Auth.last_seq`,
//! acks) and an upstream that answers requests and remembers each
//! `client_msg_id` once.
//!
//! The link carries whole byte chunks (what the agent asked to send), in
//! order, with a delay and jitter. It fails the ways a TCP path fails: a
//! reset (both ends notice), a stall (a segment lost for good: that
//! direction goes silent for the rest of the connection, nobody is told),
//! half-open (nothing gets through either way, closes go unnoticed), a
//! delay spike, a refused or black-holed connect. It never drops one frame
//! and delivers the next: TCP cannot. Nothing here reads a clock or sleeps.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use futures_lite::future::block_on;

use super::Rng;
use super::agent::*;
use crate::client::ClientOptions;
use crate::delivery::store::{MemoryStore, NewMessage, Retention, TimelineStore};
use crate::protocol::codec::{self, Frame};
use crate::protocol::proto::{self, ErrorCode};
use crate::protocol::time::{Millis, Now};
use crate::protocol::token::{Key, Keyring};
use crate::session::{self, Params};

const T0_UNIX_MS: i64 = 1_800_000_000_000;

fn params() -> Params {
    Params {
        keyring: Keyring::new(vec![Key::new("k", vec![9; 32]).unwrap()], None).unwrap(),
        clock_leeway_secs: 30,
        auth_timeout_ms: 10_000,
        heartbeat_min_ms: 5_000,
        heartbeat_default_ms: 30_000,
        heartbeat_max_ms: 90_000,
        idle_timeout_factor: 3,
        close_linger_ms: 1_000,
        max_id_bytes: 128,
        control: session::ControlBudget::OFF,
    }
}

fn at(ms: Millis) -> Now {
    Now { mono: ms, unix_ms: T0_UNIX_MS + ms.0 as i64 }
}

fn unix_ms(ms: Millis) -> u64 {
    at(ms).unix_ms_u64()
}

/// The device of the token the agent logs in with.
const DEVICE: &str = "phone";

impl Timeline {
    /// The device processed everything up to `seq`.
    fn ack(&mut self, seq: u64, now: Millis) {
        if seq > 0 {
            let _ = block_on(self.store.ack(DEVICE, seq, unix_ms(now)));
        }
        self.acked = self.acked.max(seq);
    }
}

/// How a simulated node behaves toward new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reach {
    Up,
    /// Connection refused.
    Refused,
    /// SYNs vanish: the connect never completes.
    Blackhole,
}

/// One simulated node (by endpoint name).
struct Node {
    name: String,
    reach: Reach,
    /// Pings seen, with their times (heartbeat spacing).
    pings: Vec<Millis>,
    /// Every Request frame seen: (client_msg_id, retransmission flag).
    requests: Vec<(u64, bool)>,
    /// Answer requests (false: the backend is stuck).
    answer: bool,
}

/// The device's timeline, shared by the nodes (like the Redis store).
struct Timeline {
    /// The server's store; its sequences start at 1 (boot time 0).
    store: MemoryStore,
    /// Messages pushed so far.
    pushed: u64,
    /// Highest sequence the device acknowledged (what the store was told).
    acked: u64,
    /// Auth.last_seq of every login, in order.
    resumed_from: Vec<u64>,
}

/// The one connection (the agent has at most one at a time).
struct Conn {
    link: LinkId,
    node: usize,
    session: session::Session,
    active: bool,
    rbuf: BytesMut,
    /// In flight, with delivery times.
    to_server: VecDeque<(Millis, Bytes)>,
    to_client: VecDeque<(Millis, Bytes)>,
    /// The server decided to close; the client notices after the queue.
    server_closing: bool,
    /// A segment was lost for good in this direction.
    stalled_up: bool,
    stalled_down: bool,
}

struct Sim {
    now: Millis,
    agent: Agent,
    params: Params,
    nodes: Vec<Node>,
    timeline: Timeline,
    conn: Option<Conn>,
    /// A connect in progress: (when it resolves, link, node, accepted).
    connecting: Option<(Millis, LinkId, usize, bool)>,
    /// Answer to the next Lookup (None: the dispatcher is down).
    dispatcher: Option<Dispatch>,
    /// Lookups get no answer at all.
    silent_dispatcher: bool,
    lookups: u32,
    rng: Rng,
    /// Chance per thousand frames that the direction stalls.
    stall_permille: u64,
    delay_ms: u64,
    jitter_ms: u64,
    /// Added to the delay toward the client (a spike).
    down_extra_ms: u64,
    /// Nothing comes back, nothing arrives, closes go unnoticed.
    half_open: bool,
    /// Events the application saw.
    events: Vec<Event>,
    /// (time, endpoint) of every connect the agent asked for.
    connects: Vec<(Millis, String)>,
    /// The application handles messages as they come.
    auto_handle: bool,
}

impl Sim {
    fn new(names: &[&str], tweak: impl FnOnce(&mut AgentConfig)) -> Sim {
        let params = params();
        let token = params.keyring.mint("alice", "phone", "chat", T0_UNIX_MS / 1000, T0_UNIX_MS / 1000 + 86_400);
        let mut opts = ClientOptions::new(token);
        opts.response_timeout_ms = 5_000;
        opts.ack_every = 4;
        let mut cfg = AgentConfig::new(opts);
        cfg.endpoints = names.iter().map(|n| n.to_string()).collect();
        cfg.connect_timeout_ms = 5_000;
        cfg.backoff_min_ms = 200;
        cfg.backoff_base_ms = 1_000;
        cfg.backoff_max_ms = 30_000;
        cfg.request_retry_ms = 2_000;
        cfg.seed = 42;
        tweak(&mut cfg);
        let nodes = names
            .iter()
            .map(|n| Node { name: n.to_string(), reach: Reach::Up, pings: vec![], requests: vec![], answer: true })
            .collect();
        Sim {
            now: Millis(0),
            agent: Agent::new(cfg, Millis(0)).unwrap(),
            params,
            nodes,
            timeline: Timeline {
                store: MemoryStore::new(Retention::default(), 0),
                pushed: 0,
                acked: 0,
                resumed_from: Vec::new(),
            },
            conn: None,
            connecting: None,
            dispatcher: None,
            silent_dispatcher: false,
            lookups: 0,
            rng: Rng::new(7),
            stall_permille: 0,
            delay_ms: 20,
            jitter_ms: 0,
            down_extra_ms: 0,
            half_open: false,
            events: Vec::new(),
            connects: Vec::new(),
            auto_handle: true,
        }
    }

    fn node(&mut self, name: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap()
    }

    /// Whether a frame in this direction is lost (and the direction with it).
    fn lost(&mut self, up: bool) -> bool {
        let stall = self.stall_permille > 0 && self.rng.below_or_eq(999) < self.stall_permille;
        let Some(c) = &mut self.conn else { return true };
        let stalled = if up { &mut c.stalled_up } else { &mut c.stalled_down };
        *stalled |= stall;
        self.half_open || *stalled
    }

    fn arrival(&mut self, queue_last: Option<Millis>, extra: u64) -> Millis {
        let jitter = if self.jitter_ms > 0 { self.rng.below_or_eq(self.jitter_ms) } else { 0 };
        // In order, like TCP.
        self.now.add_ms(self.delay_ms + jitter + extra).max(queue_last.unwrap_or_default())
    }

    /// Carries out the agent's actions.
    fn pump(&mut self) {
        while let Some(action) = self.agent.poll_action() {
            match action {
                Action::Lookup { .. } => {
                    self.lookups += 1;
                    if self.silent_dispatcher {
                        continue;
                    }
                    let answer = self.dispatcher.clone().ok_or("dispatcher unreachable");
                    self.agent.handle_dispatch(self.now, answer);
                }
                Action::Connect { link, endpoint } => {
                    self.connects.push((self.now, endpoint.clone()));
                    self.drop_conn();
                    let node = self.nodes.iter().position(|n| n.name == endpoint).expect("known endpoint");
                    let when = self.now.add_ms(self.delay_ms);
                    self.connecting = match self.nodes[node].reach {
                        Reach::Up => Some((when, link, node, true)),
                        Reach::Refused => Some((when, link, node, false)),
                        Reach::Blackhole => None,
                    };
                }
                Action::Send { link, bytes } => {
                    if self.conn.as_ref().is_some_and(|c| c.link == link) && !self.lost(true) {
                        let last = self.conn.as_ref().and_then(|c| c.to_server.back().map(|x| x.0));
                        let when = self.arrival(last, 0);
                        self.conn.as_mut().unwrap().to_server.push_back((when, bytes));
                    }
                }
                Action::Close { link } => {
                    if self.conn.as_ref().is_some_and(|c| c.link == link) {
                        self.drop_conn();
                    }
                    if self.connecting.is_some_and(|c| c.1 == link) {
                        self.connecting = None;
                    }
                }
                Action::Event(ev) => {
                    if self.auto_handle {
                        match &ev {
                            Event::Message(m) if m.seq != 0 => self.agent.message_handled(self.now, m.seq),
                            Event::ResyncRequired { to_seq, .. } => self.agent.message_handled(self.now, *to_seq),
                            _ => {}
                        }
                    }
                    self.events.push(ev);
                }
            }
        }
    }

    fn drop_conn(&mut self) {
        self.conn = None;
    }

    fn next_time(&self) -> Option<Millis> {
        let mut t = self.agent.poll_timeout();
        let mut consider = |x: Option<Millis>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        consider(self.connecting.map(|c| c.0));
        if let Some(c) = &self.conn {
            consider(c.to_server.front().map(|x| x.0));
            consider(c.to_client.front().map(|x| x.0));
            if c.session.phase() != session::Phase::Closed {
                consider(Some(c.session.deadline()));
            }
        }
        t
    }

    /// Runs the world until `until` (simulated ms from the start).
    fn run_until(&mut self, until: u64) {
        let until = Millis(until);
        let mut spin = 0;
        for _ in 0..1_000_000 {
            self.pump();
            let Some(next) = self.next_time() else { break };
            if next > until {
                break;
            }
            self.advance(next, &mut spin);
        }
        self.now = self.now.max(until);
        self.pump();
    }

    /// Runs until `cond` holds (or `limit` simulated ms pass); true if it held.
    fn run_until_cond(&mut self, limit: u64, mut cond: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now.0 + limit;
        let mut spin = 0;
        for _ in 0..1_000_000 {
            self.pump();
            if cond(self) {
                return true;
            }
            let Some(next) = self.next_time() else { break };
            if next.0 > end {
                break;
            }
            self.advance(next, &mut spin);
        }
        self.pump();
        cond(self)
    }

    /// Moves time to `next` and steps; panics if time stops moving (a
    /// timer that keeps firing without effect would be a busy loop).
    fn advance(&mut self, next: Millis, spin: &mut u32) {
        if next > self.now {
            self.now = next;
            *spin = 0;
        } else {
            *spin += 1;
            assert!(*spin < 1_000, "the simulation is stuck at {:?}", self.now);
        }
        self.step();
    }

    fn step(&mut self) {
        let now = self.now;
        if let Some((when, link, node, accepted)) = self.connecting
            && when <= now
        {
            self.connecting = None;
            if accepted {
                self.conn = Some(Conn {
                    link,
                    node,
                    session: session::Session::new(now, &self.params),
                    active: false,
                    rbuf: BytesMut::new(),
                    to_server: VecDeque::new(),
                    to_client: VecDeque::new(),
                    server_closing: false,
                    stalled_up: false,
                    stalled_down: false,
                });
                self.agent.handle_connected(now, link);
            } else {
                self.agent.handle_closed(now, link, "connection refused");
            }
            self.pump();
        }
        // Client -> server.
        while let Some(c) = &mut self.conn
            && c.to_server.front().is_some_and(|x| x.0 <= now)
        {
            let (_, bytes) = c.to_server.pop_front().unwrap();
            if !c.server_closing {
                c.rbuf.extend_from_slice(&bytes);
                self.server_read();
            }
        }
        // Server -> client.
        while let Some(c) = &mut self.conn
            && c.to_client.front().is_some_and(|x| x.0 <= now)
        {
            let (_, bytes) = c.to_client.pop_front().unwrap();
            let link = c.link;
            self.agent.handle_bytes(now, link, &bytes);
            self.pump();
        }
        if let Some(c) = &mut self.conn {
            let mut out = Vec::new();
            c.session.handle_timeout(at(now), &self.params, &mut out);
            self.server_actions(out);
        }
        if let Some(c) = &self.conn
            && c.server_closing
            && c.to_client.is_empty()
        {
            let link = c.link;
            let told = !self.half_open && !c.stalled_down;
            self.conn = None;
            if told {
                self.agent.handle_closed(now, link, "closed by the server");
            }
        }
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        self.pump();
    }

    fn server_read(&mut self) {
        loop {
            let Some(c) = &mut self.conn else { return };
            let Ok(Some((header, body))) = codec::split_frame(&c.rbuf, codec::DEFAULT_MAX_BODY) else { return };
            let len = header.frame_len();
            let frame = Frame::decode(header, body).expect("the agent encodes valid frames");
            let _ = c.rbuf.split_to(len);
            let node = c.node;
            match &frame {
                Frame::Ping => self.nodes[node].pings.push(self.now),
                Frame::Request(r) => {
                    self.nodes[node].requests.push((r.client_msg_id, header.flags.is_retransmission()))
                }
                _ => {}
            }
            let mut out = Vec::new();
            let c = self.conn.as_mut().unwrap();
            c.session.handle_frame(at(self.now), frame, &self.params, &mut out);
            self.server_actions(out);
        }
    }

    fn server_actions(&mut self, actions: Vec<session::Action>) {
        let mut queue: VecDeque<session::Action> = actions.into();
        while let Some(a) = queue.pop_front() {
            let Some(c) = &mut self.conn else { return };
            match a {
                session::Action::Send(frame) => self.send_down(frame),
                session::Action::Authenticated(login) => {
                    self.timeline.resumed_from.push(login.last_seq);
                    // Auth.last_seq acknowledges too.
                    self.timeline.ack(login.last_seq, self.now);
                    let mut out = Vec::new();
                    let ok = proto::AuthOk {
                        conn_id: c.link.0,
                        node: self.nodes[c.node].name.clone(),
                        ..Default::default()
                    };
                    c.session.activate(at(self.now), &login, ok, &self.params, &mut out);
                    c.active = true;
                    queue.extend(out);
                    // Replay what follows the client's last sequence.
                    let replay = block_on(self.timeline.store.resume(DEVICE, login.last_seq, 1_000, unix_ms(self.now)))
                        .unwrap_or_default();
                    if let Some((from_seq, to_seq)) = replay.missing {
                        let gap = proto::ResyncRequired { from_seq, to_seq };
                        queue.push_back(session::Action::Send(Frame::ResyncRequired(gap)));
                    }
                    for m in replay.messages {
                        let (seq, message_id, service_id, payload) = (m.seq, m.message_id, m.service_id, m.payload);
                        let m = proto::Message { seq, message_id, service_id, payload };
                        queue.push_back(session::Action::Send(Frame::Message(m)));
                    }
                }
                session::Action::Close(_) => c.server_closing = true,
                session::Action::Ack(seq) => self.timeline.ack(seq, self.now),
                session::Action::Request(r) => {
                    let node = c.node;
                    if self.nodes[node].answer {
                        let body = Bytes::from(format!("re:{}", String::from_utf8_lossy(&r.body)));
                        self.send_down(Frame::Response(proto::Response {
                            request_id: r.request_id,
                            body,
                            ..Default::default()
                        }));
                    }
                }
                session::Action::Refresh(r) => {
                    let mut out = Vec::new();
                    c.session.refreshed(at(self.now), r.expires_at, &self.params, &mut out);
                    queue.extend(out);
                }
                session::Action::Join(_) | session::Action::Leave(_) => {}
            }
        }
    }

    fn send_down(&mut self, frame: Frame) {
        if self.lost(false) {
            return;
        }
        let last = self.conn.as_ref().and_then(|c| c.to_client.back().map(|x| x.0));
        let when = self.arrival(last, self.down_extra_ms);
        if let Some(c) = &mut self.conn {
            c.to_client.push_back((when, frame.to_bytes()));
        }
    }

    // ---- what a backend or operator does to the node ----------------------

    /// Stores an at-least-once message and sends it if the device is online.
    fn push(&mut self) -> u64 {
        let n = self.timeline.pushed + 1;
        let new = NewMessage {
            message_id: 1_000 + n,
            service_id: String::new(),
            payload: Bytes::from(format!("m{n}")),
            expires_at_ms: 0,
        };
        let appended = block_on(self.timeline.store.append(DEVICE, new.clone(), unix_ms(self.now)));
        let seq = appended.expect("the memory store has room").seq;
        self.timeline.pushed = n;
        assert_eq!(seq, n, "sequences start at 1");
        let m = proto::Message { seq, message_id: new.message_id, service_id: new.service_id, payload: new.payload };
        if self.conn.as_ref().is_some_and(|c| c.active && !c.server_closing) {
            self.send_down(Frame::Message(m));
        }
        seq
    }

    fn kick(&mut self, code: ErrorCode) {
        let mut out = Vec::new();
        if let Some(c) = &mut self.conn {
            c.session.kick(at(self.now), code, String::new(), &self.params, &mut out);
        }
        self.server_actions(out);
    }

    fn go_away(&mut self, endpoint: &str) {
        self.send_down(Frame::GoAway(proto::GoAway { endpoint: endpoint.into(), reason: "draining".into() }));
        if let Some(c) = &mut self.conn {
            c.server_closing = true;
        }
    }

    /// The network drops the connection (both sides notice).
    fn reset(&mut self) {
        if let Some(c) = self.conn.take() {
            self.agent.handle_closed(self.now, c.link, "connection reset");
        }
    }

    // ---- what the application saw -----------------------------------------

    fn connected_count(&self) -> usize {
        self.events.iter().filter(|e| matches!(e, Event::Connected { .. })).count()
    }

    fn messages_seen(&self) -> Vec<u64> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.seq),
                _ => None,
            })
            .collect()
    }

    fn disconnects(&self) -> Vec<&Disconnect> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Disconnected { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    fn responses(&self) -> Vec<(RequestId, Result<proto::Response, RequestError>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Response { id, result } => Some((*id, result.clone())),
                _ => None,
            })
            .collect()
    }

    fn is_up(&self) -> bool {
        self.agent.connected_to().is_some()
    }
}

mod scenarios;
