//! One pipelined connection from a shard to another node's node listener,
//! authenticated with the cluster secret (over TLS with `cluster.tls`: the
//! other node's certificate is verified first).

use super::*;
use crate::conn::tls::PipeStream;

/// Why a forwarded request got no reply. Every case may pass: the
/// backend may send the push again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("not live")]
    NotLive,
    #[error("too much queued for this node")]
    Queued,
    #[error("connection failed")]
    Failed,
    #[error("connection lost")]
    Lost,
    #[error("no answer within {0} ms")]
    Timeout(u64),
}

/// One pipelined connection from a shard to another node's push port.
pub(crate) struct PeerLink {
    node: String,
    /// The run of the node it was opened to.
    pub(super) incarnation: u64,
    inner: RefCell<PeerInner>,
    /// Where replies that come after their caller gave up are counted.
    late_answers: LateAnswers,
}

#[derive(Default)]
pub(super) struct PeerInner {
    out: OutQueue,
    waiting: HashMap<u64, oneshot::Sender<Frame>>,
    next_id: u64,
    waker: Option<Waker>,
    /// Set when the connection failed: the link is replaced on next use.
    failed: bool,
}

impl PeerLink {
    pub(super) fn new(node: String, incarnation: u64, late_answers: LateAnswers) -> PeerLink {
        PeerLink { node, incarnation, inner: RefCell::default(), late_answers }
    }

    pub(super) fn is_usable(&self) -> bool {
        !self.inner.borrow().failed
    }

    /// Sends `frame` (its request id is replaced) and waits for the reply.
    pub(super) async fn call(&self, mut frame: Frame, timeout: Duration) -> Result<Frame, ForwardError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut inner = self.inner.borrow_mut();
            if inner.failed {
                return Err(ForwardError::Failed);
            }
            if inner.out.bytes() > PEER_QUEUE_BYTES {
                return Err(ForwardError::Queued);
            }
            inner.next_id += 1;
            let id = inner.next_id;
            set_request_id(&mut frame, id);
            inner.out.push(frame.to_bytes());
            inner.waiting.insert(id, tx);
            if let Some(w) = &inner.waker {
                w.wake_by_ref();
            }
            id
        };
        let answer = futures_lite::future::or(async { Some(rx.await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        match answer {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(_)) => Err(ForwardError::Lost),
            None => {
                self.inner.borrow_mut().waiting.remove(&id);
                Err(ForwardError::Timeout(timeout.as_millis() as u64))
            }
        }
    }

    pub(super) async fn run(
        self: Rc<Self>,
        endpoint: String,
        key: crate::protocol::token::Key,
        tls: Option<crate::conn::tls::pipe::DialTls>,
    ) {
        let connected = TcpStream::connect_timeout(endpoint.as_str(), Duration::from_secs(2)).await;
        let stream = match connected {
            Ok(s) => s,
            Err(err) => {
                warn!(node = %self.node, %endpoint, error = %err, "cannot connect to node");
                return self.fail();
            }
        };
        let _ = stream.set_nodelay(true);
        let mut stream = match &tls {
            None => PipeStream::plain(stream),
            Some(tls) => match tls.start(stream, &endpoint) {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(node = %self.node, %endpoint, error = %err, "cannot start TLS to node");
                    return self.fail();
                }
            },
        };
        let mut rbuf = BytesMut::new();
        let handshake = futures_lite::future::or(authenticate(&mut stream, &key, &mut rbuf), async {
            glommio::timer::sleep(AUTH_TIMEOUT).await;
            Err(format!("no answer within {AUTH_TIMEOUT:?}"))
        });
        if let Err(why) = handshake.await {
            warn!(node = %self.node, %endpoint, %why, "node link not authenticated");
            return self.fail();
        }
        debug!(node = %self.node, %endpoint, "connected to node");
        std::future::poll_fn(|cx| self.poll(&mut stream, &mut rbuf, cx)).await;
        debug!(node = %self.node, "link to node closed");
        self.fail();
    }

    pub(super) fn fail(&self) {
        let mut inner = self.inner.borrow_mut();
        inner.failed = true;
        // Dropping the senders tells every waiting call.
        inner.waiting.clear();
        inner.out.clear();
    }

    pub(super) fn poll(&self, stream: &mut PipeStream, rbuf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<()> {
        for _ in 0..8 {
            {
                let mut inner = self.inner.borrow_mut();
                if stream.flush(&mut inner.out, cx).is_err() {
                    return Poll::Ready(());
                }
                if !inner.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    inner.waker = Some(cx.waker().clone());
                }
                loop {
                    match codec::split_frame(rbuf, PEER_MAX_FRAME) {
                        Ok(None) => break,
                        Ok(Some((header, body))) => {
                            let len = header.frame_len();
                            let frame = Frame::decode(header, body);
                            let _ = rbuf.split_to(len);
                            let Ok(frame) = frame else { return Poll::Ready(()) };
                            match inner.waiting.remove(&request_id(&frame)) {
                                Some(tx) => {
                                    let _ = tx.send(frame);
                                }
                                // Its caller stopped waiting (forward timeout).
                                None => {
                                    (self.late_answers)();
                                }
                            }
                        }
                        Err(err) => {
                            warn!(node = %self.node, error = %err, "bad frame from node");
                            return Poll::Ready(());
                        }
                    }
                }
            }
            match stream.poll_read(cx, rbuf, 16 * 1024) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(false)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(true)) => {}
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Time a node has to accept a link's credential.
const AUTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers the node listener's challenge with the cluster secret (after
/// the TLS handshake, with `cluster.tls`).
async fn authenticate(
    stream: &mut PipeStream,
    key: &crate::protocol::token::Key,
    rbuf: &mut BytesMut,
) -> Result<(), String> {
    if stream.is_tls() {
        stream.handshake(rbuf).await.map_err(|e| format!("TLS: {e}"))?;
    }
    let Frame::PushChallenge(challenge) = read_frame(stream, rbuf).await? else {
        return Err("the node sent no challenge".into());
    };
    let auth = Frame::PushAuth(crate::push::auth::answer(key, &challenge));
    stream.write_all(auth.to_bytes()).await.map_err(|e| e.to_string())?;
    match read_frame(stream, rbuf).await? {
        Frame::PushAuthOk(_) => Ok(()),
        Frame::Error(e) => {
            Err(format!("refused: {} ({})", crate::protocol::codes::from_wire(e.code).as_str_name(), e.reason))
        }
        other => Err(format!("unexpected {:?}", other.kind())),
    }
}

/// The next whole frame of a handshake.
async fn read_frame(stream: &mut PipeStream, rbuf: &mut BytesMut) -> Result<Frame, String> {
    loop {
        if let Some((header, body)) = codec::split_frame(rbuf, PEER_MAX_FRAME).map_err(|e| e.to_string())? {
            let len = header.frame_len();
            let frame = Frame::decode(header, body).map_err(|e| e.to_string());
            let _ = rbuf.split_to(len);
            return frame;
        }
        match stream.read_some(rbuf).await {
            Ok(false) => return Err("connection closed".into()),
            Ok(true) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}
