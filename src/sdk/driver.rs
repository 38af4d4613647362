//! The glommio driver: runs an [`Agent`] over real TCP (and the dispatcher
//! over HTTP when one is configured).
//!
//! [`Client::next_event`] is the one loop: it carries out the agent's
//! actions (writes, connects, lookups), then waits for whichever comes
//! first: bytes, a connect or lookup result, a command from a [`Handle`],
//! or the agent's next deadline. Application calls in the same task
//! (`request`, `message_handled`, ...) take effect at the next call of
//! `next_event`; other threads use a [`Handle`].

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use futures_lite::{AsyncReadExt, AsyncWriteExt, StreamExt};
use glommio::net::TcpStream;

use super::agent::{Action, Agent, AgentConfig, Event, LinkId, RequestError, RequestId, SdkError};
use super::dispatch::{self, DispatchError, DispatcherConfig};
use crate::protocol::proto;
use crate::protocol::time::Millis;

/// What a [`Client`] needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub agent: AgentConfig,
    /// Ask this dispatcher for endpoints and a token (sets
    /// `agent.dispatcher`); `agent.endpoints` stay the fallback.
    pub dispatcher: Option<DispatcherConfig>,
    /// Called (on a blocking thread) when the session's token nears its
    /// expiry ([`Event::TokenExpiring`], which the application sees too);
    /// the token it returns goes to the node in a Refresh. Without it the
    /// application answers the event with [`Handle::refresh_token`].
    pub token_refresher: Option<TokenRefresher>,
}

impl ClientConfig {
    /// Fixed endpoints, no dispatcher.
    pub fn fixed(agent: AgentConfig) -> ClientConfig {
        ClientConfig { agent, dispatcher: None, token_refresher: None }
    }
}

/// The application's source of fresh tokens for the same user and device
/// (its business login, `longlink token`, ...). An error is reported as
/// [`Event::TokenRefreshFailed`]; the session then ends with
/// `TOKEN_EXPIRED` and reconnects with whatever token it has by then.
#[derive(Clone)]
pub struct TokenRefresher(pub Arc<dyn Fn() -> Result<String, String> + Send + Sync>);

impl std::fmt::Debug for TokenRefresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenRefresher")
    }
}

/// What connect and lookup tasks report back.
enum Inbox {
    Connected(LinkId, io::Result<TcpStream>),
    Dispatched(Result<super::Dispatch, DispatchError>),
    Token(Result<String, String>),
}

/// A call from another thread (see [`Handle`]).
pub(crate) enum Command {
    Request {
        service: String,
        body: Bytes,
        timeout: Duration,
        accepted: oneshot::Sender<Result<RequestId, SdkError>>,
        /// Where the Response goes instead of the event stream.
        answer: Option<crossbeam_channel::Sender<Result<proto::Response, RequestError>>>,
    },
    Handled(u64),
    Foreground(bool),
    NetworkChanged(String),
    SetToken(String),
    RefreshToken(String),
    Close,
}

/// Read chunk per wake-up.
const READ_CHUNK: usize = 16 * 1024;
/// Commands waiting for the driver at most.
const COMMAND_QUEUE: usize = 64;

/// An SDK client on a glommio executor. See the module docs.
pub struct Client {
    agent: Agent,
    epoch: Instant,
    dispatcher: Option<DispatcherConfig>,
    token_refresher: Option<TokenRefresher>,
    /// The socket of the agent's current link.
    stream: Option<(LinkId, TcpStream)>,
    /// The link whose connect is in flight.
    connecting: Option<LinkId>,
    inbox_tx: mpsc::UnboundedSender<Inbox>,
    inbox_rx: mpsc::UnboundedReceiver<Inbox>,
    commands: Option<mpsc::Receiver<Command>>,
    /// Requests whose Response goes to a waiting thread.
    waiters: HashMap<RequestId, crossbeam_channel::Sender<Result<proto::Response, RequestError>>>,
    /// Events produced but not returned yet (what one read produced).
    events: VecDeque<Event>,
    rbuf: Box<[u8]>,
    /// Longest a write may block (the response timeout).
    write_timeout: Duration,
}

impl Client {
    /// Starts the client (its first connect or lookup begins at the first
    /// [`Client::next_event`]). Must run inside a glommio executor.
    pub fn new(mut cfg: ClientConfig) -> Result<Client, SdkError> {
        cfg.agent.dispatcher = cfg.dispatcher.is_some();
        let epoch = Instant::now();
        let write_timeout = Duration::from_millis(cfg.agent.client.response_timeout_ms.max(1));
        let agent = Agent::new(cfg.agent, Millis(0))?;
        let (inbox_tx, inbox_rx) = mpsc::unbounded();
        Ok(Client {
            agent,
            epoch,
            dispatcher: cfg.dispatcher,
            token_refresher: cfg.token_refresher,
            stream: None,
            connecting: None,
            inbox_tx,
            inbox_rx,
            commands: None,
            waiters: HashMap::new(),
            events: VecDeque::new(),
            rbuf: vec![0; READ_CHUNK].into_boxed_slice(),
            write_timeout,
        })
    }

    fn now(&self) -> Millis {
        Millis(self.epoch.elapsed().as_millis() as u64)
    }

    /// A handle for other threads. Creating a second one replaces the first
    /// one's channel (its calls then fail with `Stopped`).
    pub fn handle(&mut self) -> Handle {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        self.commands = Some(rx);
        Handle { tx }
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// See [`Agent::request`].
    pub fn request(&mut self, service: &str, body: Bytes, timeout: Duration) -> Result<RequestId, SdkError> {
        let now = self.now();
        self.agent.request(now, service, body, timeout.as_millis() as u64)
    }

    /// See [`Agent::message_handled`].
    pub fn message_handled(&mut self, seq: u64) {
        let now = self.now();
        self.agent.message_handled(now, seq);
    }

    /// See [`Agent::set_foreground`].
    pub fn set_foreground(&mut self, foreground: bool) {
        let now = self.now();
        self.agent.set_foreground(now, foreground);
    }

    /// See [`Agent::network_changed`].
    pub fn network_changed(&mut self, net: &str) {
        let now = self.now();
        self.agent.network_changed(now, net);
    }

    pub fn set_token(&mut self, token: String) {
        self.agent.set_token(token);
    }

    /// Stops: the next [`Client::next_event`] calls return the final
    /// `Disconnected`, then `None`.
    pub fn close(&mut self) {
        let now = self.now();
        self.agent.close(now);
    }

    /// The next event; `None` once the client stopped (after a terminal
    /// code or [`Client::close`]) and every event was returned.
    ///
    /// Not cancel-safe while it writes: do not race it against other
    /// futures; call it from one loop.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            self.run_actions().await;
            if let Some(ev) = self.events.pop_front() {
                return Some(ev);
            }
            if self.agent.is_stopped() {
                self.stream = None;
                return None;
            }
            self.wait().await;
        }
    }

    /// Carries out what the agent asked for, collecting its events.
    async fn run_actions(&mut self) {
        while let Some(action) = self.agent.poll_action() {
            match action {
                Action::Event(Event::Response { id, result }) if self.waiters.contains_key(&id) => {
                    if let Some(tx) = self.waiters.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                Action::Event(ev) => {
                    if let (Event::TokenExpiring { .. }, Some(refresher)) = (&ev, &self.token_refresher) {
                        let (refresher, tx) = (refresher.clone(), self.inbox_tx.clone());
                        glommio::spawn_local(async move {
                            let token = glommio::executor().spawn_blocking(move || (refresher.0)()).await;
                            let _ = tx.unbounded_send(Inbox::Token(token));
                        })
                        .detach();
                    }
                    self.events.push_back(ev)
                }
                Action::Send { link, bytes } => {
                    let Some((l, stream)) = &mut self.stream else { continue };
                    if *l != link {
                        continue;
                    }
                    // A peer that stops reading must not stall the timers
                    // forever: a write that cannot finish in time ends the link.
                    let limit = self.write_timeout;
                    let written = futures_lite::future::or(async { Some(stream.write_all(&bytes).await) }, async {
                        glommio::timer::sleep(limit).await;
                        None
                    })
                    .await;
                    let failed = match written {
                        Some(Ok(())) => None,
                        Some(Err(e)) => Some(e.to_string()),
                        None => Some(format!("write blocked for {} ms", limit.as_millis())),
                    };
                    if let Some(why) = failed {
                        self.stream = None;
                        let now = self.now();
                        self.agent.handle_closed(now, link, &why);
                    }
                }
                Action::Close { link } => {
                    if self.stream.as_ref().is_some_and(|(l, _)| *l == link)
                        && let Some((_, stream)) = self.stream.take()
                    {
                        let _ = stream.shutdown(std::net::Shutdown::Both).await;
                    }
                    if self.connecting == Some(link) {
                        self.connecting = None;
                    }
                }
                Action::Connect { link, endpoint } => {
                    self.stream = None;
                    self.connecting = Some(link);
                    let tx = self.inbox_tx.clone();
                    glommio::spawn_local(async move {
                        let result = connect(&endpoint).await;
                        let _ = tx.unbounded_send(Inbox::Connected(link, result));
                    })
                    .detach();
                }
                Action::Lookup { net } => {
                    let tx = self.inbox_tx.clone();
                    match self.dispatcher.clone() {
                        Some(cfg) => {
                            glommio::spawn_local(async move {
                                let result =
                                    glommio::executor().spawn_blocking(move || dispatch::lookup(&cfg, &net)).await;
                                let _ = tx.unbounded_send(Inbox::Dispatched(result));
                            })
                            .detach();
                        }
                        None => {
                            let now = self.now();
                            self.agent.handle_dispatch(now, Err::<super::Dispatch, _>("no dispatcher configured"));
                        }
                    }
                }
            }
        }
    }

    /// Waits for one input and feeds it to the agent.
    async fn wait(&mut self) {
        enum Wake {
            Read(io::Result<usize>),
            Inbox(Option<Inbox>),
            Command(Option<Command>),
            Timer,
        }
        let now = self.now();
        let sleep = self.agent.poll_timeout().map(|t| Duration::from_millis(t.0.saturating_sub(now.0)));
        let Client { stream, inbox_rx, commands, rbuf, .. } = self;
        let read = async {
            match stream {
                Some((_, s)) => Wake::Read(s.read(rbuf).await),
                None => futures_lite::future::pending().await,
            }
        };
        let inbox = async { Wake::Inbox(inbox_rx.next().await) };
        let command = async {
            match commands {
                Some(rx) => Wake::Command(rx.next().await),
                None => futures_lite::future::pending().await,
            }
        };
        let timer = async {
            match sleep {
                Some(d) => glommio::timer::sleep(d).await,
                None => futures_lite::future::pending().await,
            }
            Wake::Timer
        };
        let wake =
            futures_lite::future::or(read, futures_lite::future::or(inbox, futures_lite::future::or(command, timer)))
                .await;
        let now = self.now();
        match wake {
            Wake::Read(result) => {
                let Some((link, _)) = &self.stream else { return };
                let link = *link;
                match result {
                    Ok(0) => {
                        self.stream = None;
                        self.agent.handle_closed(now, link, "closed by the server");
                    }
                    Ok(n) => self.agent.handle_bytes(now, link, &self.rbuf[..n]),
                    Err(e) => {
                        self.stream = None;
                        self.agent.handle_closed(now, link, &e.to_string());
                    }
                }
            }
            Wake::Inbox(Some(Inbox::Connected(link, result))) => {
                if self.connecting != Some(link) {
                    return; // given up on (timeout, close): drop the socket
                }
                self.connecting = None;
                match result {
                    Ok(s) => {
                        self.stream = Some((link, s));
                        self.agent.handle_connected(now, link);
                    }
                    Err(e) => self.agent.handle_closed(now, link, &e.to_string()),
                }
            }
            Wake::Inbox(Some(Inbox::Dispatched(result))) => self.agent.handle_dispatch(now, result),
            Wake::Inbox(Some(Inbox::Token(Ok(token)))) => self.agent.refresh_token(now, token),
            Wake::Inbox(Some(Inbox::Token(Err(why)))) => self.events.push_back(Event::TokenRefreshFailed(why)),
            // The client holds a sender itself: never closed.
            Wake::Inbox(None) => {}
            Wake::Command(Some(cmd)) => self.command(now, cmd),
            Wake::Command(None) => self.commands = None,
            Wake::Timer => {}
        }
        let now = self.now();
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
    }

    fn command(&mut self, now: Millis, cmd: Command) {
        match cmd {
            Command::Request { service, body, timeout, accepted, answer } => {
                let result = self.agent.request(now, &service, body, timeout.as_millis() as u64);
                if let (Ok(id), Some(answer)) = (&result, answer) {
                    self.waiters.insert(*id, answer);
                }
                let _ = accepted.send(result);
            }
            Command::Handled(seq) => self.agent.message_handled(now, seq),
            Command::Foreground(fg) => self.agent.set_foreground(now, fg),
            Command::NetworkChanged(net) => self.agent.network_changed(now, &net),
            Command::SetToken(token) => self.agent.set_token(token),
            Command::RefreshToken(token) => self.agent.refresh_token(now, token),
            Command::Close => self.agent.close(now),
        }
    }
}

/// Opens a TCP connection to `endpoint` (host:port). Names other than an
/// IP address are resolved off the executor.
async fn connect(endpoint: &str) -> io::Result<TcpStream> {
    let addr: SocketAddr = match endpoint.parse() {
        Ok(addr) => addr,
        Err(_) => {
            let name = endpoint.to_owned();
            glommio::executor()
                .spawn_blocking(move || std::net::ToSocketAddrs::to_socket_addrs(&name).map(|mut a| a.next()))
                .await?
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{endpoint} does not resolve")))?
        }
    };
    let stream = TcpStream::connect(addr).await.map_err(io::Error::from)?;
    stream.set_nodelay(true).map_err(io::Error::from)?;
    Ok(stream)
}

/// Calls into a [`Client`] from any thread (blocking until the driver took
/// them; the driver takes them whenever it waits).
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    pub(crate) fn send(&self, cmd: Command) -> Result<(), SdkError> {
        let mut tx = self.tx.clone();
        futures_lite::future::block_on(async move {
            futures_lite::future::poll_fn(|cx| tx.poll_ready(cx)).await?;
            tx.start_send(cmd)
        })
        .map_err(|_| SdkError::Stopped(super::Disconnect::ClosedByApp))
    }

    /// See [`Agent::request`]: returns the id once the agent took it.
    pub fn request(&self, service: &str, body: Bytes, timeout: Duration) -> Result<RequestId, SdkError> {
        let (accepted, rx) = oneshot::channel();
        self.send(Command::Request { service: service.into(), body, timeout, accepted, answer: None })?;
        futures_lite::future::block_on(rx).unwrap_or(Err(SdkError::Stopped(super::Disconnect::ClosedByApp)))
    }

    /// Sends a request and waits for its answer (it does not come as an
    /// event). Waits at most `timeout` plus a second for the driver.
    pub fn call(&self, service: &str, body: Bytes, timeout: Duration) -> Result<proto::Response, CallError> {
        let (accepted, rx) = oneshot::channel();
        let (answer, answered) = crossbeam_channel::bounded(1);
        self.send(Command::Request { service: service.into(), body, timeout, accepted, answer: Some(answer) })?;
        futures_lite::future::block_on(rx).unwrap_or(Err(SdkError::Stopped(super::Disconnect::ClosedByApp)))?;
        match answered.recv_timeout(timeout + Duration::from_secs(1)) {
            Ok(result) => Ok(result?),
            Err(_) => Err(CallError::Request(RequestError::TimedOut { attempts: 0 })),
        }
    }

    pub fn message_handled(&self, seq: u64) -> Result<(), SdkError> {
        self.send(Command::Handled(seq))
    }

    pub fn set_foreground(&self, foreground: bool) -> Result<(), SdkError> {
        self.send(Command::Foreground(foreground))
    }

    pub fn network_changed(&self, net: &str) -> Result<(), SdkError> {
        self.send(Command::NetworkChanged(net.into()))
    }

    pub fn set_token(&self, token: String) -> Result<(), SdkError> {
        self.send(Command::SetToken(token))
    }

    /// The answer to [`Event::TokenExpiring`]: see [`Agent::refresh_token`].
    pub fn refresh_token(&self, token: String) -> Result<(), SdkError> {
        self.send(Command::RefreshToken(token))
    }

    pub fn close(&self) -> Result<(), SdkError> {
        self.send(Command::Close)
    }

    /// Asks for a close without waiting for room in the queue.
    pub(crate) fn try_close(&self) {
        let _ = self.tx.clone().try_send(Command::Close);
    }
}

/// Why [`Handle::call`] got no Response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Refused(#[from] SdkError),
    #[error(transparent)]
    Request(#[from] RequestError),
}
