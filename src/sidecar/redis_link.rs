//! One sync Redis connection owned by a sidecar thread: connects lazily,
//! loads the sidecar's Lua scripts, reconnects with a backoff after a
//! failure, and reloads the scripts when Redis forgot them (a restart).
//! Shared by the timeline store and the router sidecars.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::Duration;

use redis::Value;
use tracing::{info, warn};

pub struct RedisLink {
    url: String,
    connect_timeout: Duration,
    io_timeout: Duration,
    /// What the link is for, in logs.
    role: &'static str,
    scripts: Vec<redis::Script>,
    conn: Option<redis::Connection>,
    /// Consecutive connection failures, for the reconnect backoff.
    failures: u32,
}

/// Why a round trip failed: Redis could not be reached or answered badly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redis unavailable: {0}")]
pub struct Unavailable(pub String);

impl RedisLink {
    pub fn new(
        role: &'static str,
        url: &str,
        connect_timeout: Duration,
        io_timeout: Duration,
        scripts: Vec<redis::Script>,
    ) -> RedisLink {
        RedisLink { url: url.to_owned(), connect_timeout, io_timeout, role, scripts, conn: None, failures: 0 }
    }

    pub fn script(&self, i: usize) -> &redis::Script {
        &self.scripts[i]
    }

    fn connect(&mut self) -> Result<&mut redis::Connection, Unavailable> {
        if self.conn.is_none() {
            if self.failures > 0 {
                // Back off while Redis is down, without spinning.
                thread::sleep(Duration::from_millis(50u64 << self.failures.min(5)));
            }
            let unavailable = |e: redis::RedisError| Unavailable(e.to_string());
            let connected = redis::Client::open(self.url.as_str())
                .and_then(|c| c.get_connection_with_timeout(self.connect_timeout))
                .and_then(|c| {
                    c.set_read_timeout(Some(self.io_timeout))?;
                    c.set_write_timeout(Some(self.io_timeout))?;
                    Ok(c)
                })
                .and_then(|mut c| {
                    if !self.scripts.is_empty() {
                        let mut load = redis::pipe();
                        for s in &self.scripts {
                            load.load_script(s);
                        }
                        load.query::<Vec<String>>(&mut c)?;
                    }
                    Ok(c)
                });
            match connected {
                Ok(conn) => {
                    if self.failures > 0 {
                        info!(role = self.role, url = %self.url, "redis reachable again");
                    }
                    self.failures = 0;
                    self.conn = Some(conn);
                }
                Err(e) => {
                    if self.failures == 0 {
                        warn!(role = self.role, url = %self.url, error = %e, "redis unavailable");
                    }
                    self.failures += 1;
                    return Err(unavailable(e));
                }
            }
        }
        self.conn.as_mut().ok_or_else(|| Unavailable("no connection".into()))
    }

    /// Sends `pipe` and returns one value per command (errors as
    /// `Value::ServerError`, so one bad command does not fail the rest).
    pub fn query(&mut self, pipe: &redis::Pipeline) -> Result<Vec<Value>, Unavailable> {
        let run = |link: &mut RedisLink| {
            let conn = link.connect()?;
            pipe.query::<Vec<Value>>(conn).map_err(|e| Unavailable(e.to_string()))
        };
        match run(self) {
            Ok(values) if values.iter().any(is_noscript) => {
                // Redis restarted and lost the scripts: nothing that needed
                // them ran. Reload and run the pipeline once more.
                self.conn = None;
                run(self).inspect_err(|_| self.conn = None)
            }
            Ok(values) => Ok(values),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }
}

fn is_noscript(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if format!("{e:?}").contains("NOSCRIPT"))
}

/// A reply as an unsigned integer (integer or numeric string replies).
pub fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// A reply as a UTF-8 string.
pub fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A request to a sidecar thread and where its answer goes.
pub struct Job<Op, Answer, E> {
    pub op: Op,
    pub reply: futures_channel::oneshot::Sender<Result<Answer, E>>,
}

/// Why a request never reached its sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSent {
    /// The queue is full: the request is shed, never waited for.
    Full,
    /// The sidecar thread is gone.
    Stopped,
}

/// The shards' side of a sidecar: a bounded queue (`try_send`, so a shard
/// never blocks) and a oneshot per request.
pub struct SidecarHandle<Op, Answer, E> {
    tx: crossbeam_channel::Sender<Job<Op, Answer, E>>,
}

impl<Op, Answer, E> Clone for SidecarHandle<Op, Answer, E> {
    fn clone(&self) -> Self {
        SidecarHandle { tx: self.tx.clone() }
    }
}

/// The sidecar thread's end of the queue.
pub type JobReceiver<Op, Answer, E> = crossbeam_channel::Receiver<Job<Op, Answer, E>>;

/// Requests waiting for a sidecar before new ones are shed.
const SIDECAR_QUEUE: usize = 65_536;
/// Requests a sidecar takes into one pipeline at most.
const SIDECAR_BATCH: usize = 512;

impl<Op: Send + 'static, Answer: Send + 'static, E: Send + 'static> SidecarHandle<Op, Answer, E> {
    /// A handle and the receiving end for the sidecar thread.
    pub fn channel() -> (Self, JobReceiver<Op, Answer, E>) {
        let (tx, rx) = crossbeam_channel::bounded(SIDECAR_QUEUE);
        (SidecarHandle { tx }, rx)
    }

    /// Queues `op`; the future resolves with the sidecar's answer.
    pub fn call(
        &self,
        op: Op,
        not_sent: fn(NotSent) -> E,
    ) -> impl std::future::Future<Output = Result<Answer, E>> + 'static {
        let (reply, answer) = futures_channel::oneshot::channel();
        let sent = self.tx.try_send(Job { op, reply });
        async move {
            match sent {
                Ok(()) => ForeignWake::new(answer).await.unwrap_or_else(|_| Err(not_sent(NotSent::Stopped))),
                Err(crossbeam_channel::TrySendError::Full(_)) => Err(not_sent(NotSent::Full)),
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(not_sent(NotSent::Stopped)),
            }
        }
    }
}

/// A future completed by another thread (a sidecar's oneshot), polled so
/// that the task's own waker is cloned and dropped only on the task's
/// thread; the other thread sees an `Arc` relay and only wakes by
/// reference through it.
///
/// Why: glommio lets a foreign thread wake a task, but when the foreign
/// thread drops the last clone of a task's waker it decrements the count to
/// zero and increments it again, and the task may be freed in between
/// (observed here as heap corruption in a node, `malloc(): unaligned tcache
/// chunk detected`, about once in 100 three-node starts).
pub struct ForeignWake<F> {
    fut: F,
    relay: Arc<Relay>,
}

struct Relay {
    /// The task's waker; taken out on the task's thread before the relay can
    /// be dropped anywhere else.
    waker: Mutex<Option<Waker>>,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The lock keeps the task's thread from dropping the waker while it
        // is used here.
        if let Ok(slot) = self.waker.lock()
            && let Some(waker) = slot.as_ref()
        {
            waker.wake_by_ref();
        }
    }
}

impl<F> ForeignWake<F> {
    pub fn new(fut: F) -> ForeignWake<F> {
        ForeignWake { fut, relay: Arc::new(Relay { waker: Mutex::new(None) }) }
    }

    fn forget_waker(&self) {
        // Dropped here, on the task's thread.
        let old = self.relay.waker.lock().ok().and_then(|mut slot| slot.take());
        drop(old);
    }
}

impl<F: Future + Unpin> Future for ForeignWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let old = match self.relay.waker.lock() {
            Ok(mut slot) if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) => slot.replace(cx.waker().clone()),
            _ => None,
        };
        drop(old);
        let relay = Waker::from(self.relay.clone());
        let polled = Pin::new(&mut self.fut).poll(&mut Context::from_waker(&relay));
        if polled.is_ready() {
            self.forget_waker();
        }
        polled
    }
}

impl<F> Drop for ForeignWake<F> {
    fn drop(&mut self) {
        self.forget_waker();
    }
}

/// `first` and whatever else is queued right now, up to one pipeline's worth.
pub fn take_batch<T>(rx: &crossbeam_channel::Receiver<T>, first: T) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < SIDECAR_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch
}
