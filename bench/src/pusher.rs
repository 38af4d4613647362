//! The backend side of the push scenarios: open-loop push load over one or
//! more push-port connections, each split ([`PushClient::split`]) into a
//! sender thread and a reply thread so the rate is never bound by round
//! trips.
//!
//! The sender of connection `b` of `B` sends the pushes with global index
//! `k = i * B + b` at `start + k / rate`, whatever the replies do (open
//! loop). Each payload is stamped with that **intended** send time, so a
//! sender that falls behind shows up as latency instead of hiding it
//! (no coordinated omission); how late the sender actually was is kept in
//! its own histogram.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use hdrhistogram::Histogram;
use longlink::backend::{BackendError, PushClient, PushReceiver, PushSender, Reply, Request};
use longlink::protocol::proto::{self, PushStatus};

use crate::latency::{self, mono_ns, stamp_payload};
use crate::rng::Rng;
use crate::sys;

/// Send times kept per connection for reply latency, indexed by request id
/// modulo this; far more than the node lets one backend have in flight.
const SENT_AT_RING: usize = 1 << 18;
/// How often the reply thread wakes to check whether it is done.
const REPLY_POLL: Duration = Duration::from_millis(100);
/// Lead time before the first send, so every sender starts on schedule.
const START_LEAD_NS: u64 = 20_000_000;

/// Whom each push goes to.
#[derive(Debug, Clone)]
pub enum Target {
    /// One device per push, chosen uniformly at random from the list.
    RandomDevice(Arc<Vec<String>>),
    Group(String),
    Broadcast,
}

/// An open-loop push load.
#[derive(Debug, Clone)]
pub struct PushPlan {
    pub addr: SocketAddr,
    /// Push-port connections (each with a sender and a reply thread).
    pub connections: u32,
    /// Pushes per second over all connections; 0 sends as fast as the
    /// node accepts them.
    pub rate_per_sec: f64,
    /// Pushes in total.
    pub count: u64,
    pub target: Target,
    /// Payload size (at least the 16-byte stamp).
    pub payload_bytes: usize,
    /// How long to wait for missing replies after the last send.
    pub reply_grace: Duration,
}

/// What the backend saw, summed over its connections.
#[derive(Debug)]
pub struct PushOutcome {
    pub sent: u64,
    pub replies: u64,
    /// Requests answered DELIVERED (per device target for device pushes).
    pub delivered: u64,
    /// Sessions the node queued the messages to (sum of `PushReply.delivered`):
    /// how many messages the clients should receive.
    pub sessions: u64,
    pub not_online: u64,
    pub rejected: u64,
    /// Broadcasts accepted for pacing.
    pub accepted: u64,
    /// `RequestError` replies and replies of the wrong kind, by code.
    pub request_errors: BTreeMap<String, u64>,
    /// Connections that failed (their pushes may be unanswered).
    pub connection_errors: Vec<String>,
    pub first_send_mono_ns: u64,
    pub last_send_mono_ns: u64,
    /// Intended send -> reply read by the backend, ns.
    pub reply_hist: Histogram<u64>,
    /// Actual send - intended send, ns: how far the generator lagged.
    pub lag_hist: Histogram<u64>,
}

impl PushOutcome {
    fn new() -> PushOutcome {
        PushOutcome {
            sent: 0,
            replies: 0,
            delivered: 0,
            sessions: 0,
            not_online: 0,
            rejected: 0,
            accepted: 0,
            request_errors: BTreeMap::new(),
            connection_errors: Vec::new(),
            first_send_mono_ns: 0,
            last_send_mono_ns: 0,
            reply_hist: latency::new_histogram(),
            lag_hist: latency::new_histogram(),
        }
    }

    /// Pushes sent per second, first send to last send.
    pub fn achieved_rate(&self) -> f64 {
        let span = self.last_send_mono_ns.saturating_sub(self.first_send_mono_ns) as f64 / 1e9;
        if self.sent < 2 || span <= 0.0 { 0.0 } else { (self.sent - 1) as f64 / span }
    }

    pub fn missing_replies(&self) -> u64 {
        self.sent.saturating_sub(self.replies)
    }

    fn add(&mut self, other: PushOutcome) -> anyhow::Result<()> {
        self.sent += other.sent;
        self.replies += other.replies;
        self.delivered += other.delivered;
        self.sessions += other.sessions;
        self.not_online += other.not_online;
        self.rejected += other.rejected;
        self.accepted += other.accepted;
        for (k, v) in other.request_errors {
            *self.request_errors.entry(k).or_default() += v;
        }
        self.connection_errors.extend(other.connection_errors);
        if other.first_send_mono_ns != 0
            && (self.first_send_mono_ns == 0 || other.first_send_mono_ns < self.first_send_mono_ns)
        {
            self.first_send_mono_ns = other.first_send_mono_ns;
        }
        self.last_send_mono_ns = self.last_send_mono_ns.max(other.last_send_mono_ns);
        self.reply_hist.add(&other.reply_hist).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        self.lag_hist.add(&other.lag_hist).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        Ok(())
    }
}

/// State one connection's two threads share.
struct Link {
    sent: AtomicU64,
    replies: AtomicU64,
    /// Set when the sender has sent everything (or gave up).
    sender_done: AtomicBool,
    sender_done_at_ns: AtomicU64,
    /// Intended send time by request id (modulo the ring).
    sent_at: Vec<AtomicU64>,
}

/// A push load in progress.
pub struct Pusher {
    links: Vec<Arc<Link>>,
    stop: Arc<AtomicBool>,
    senders: Vec<JoinHandle<anyhow::Result<PushOutcome>>>,
    receivers: Vec<JoinHandle<anyhow::Result<PushOutcome>>>,
}

impl Pusher {
    /// Connects every push-port connection, then starts the threads.
    pub fn start(plan: &PushPlan) -> anyhow::Result<Pusher> {
        let connections = plan.connections.max(1);
        let mut clients = Vec::new();
        for b in 0..connections {
            let client = PushClient::connect(plan.addr, Duration::from_secs(5), &crate::server::bench_push_key())
                .with_context(|| format!("connecting backend {b} to the push port {}", plan.addr))?;
            clients.push(client.split().context("splitting a push client")?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let start = mono_ns() + START_LEAD_NS;
        let mut pusher = Pusher { links: Vec::new(), stop, senders: Vec::new(), receivers: Vec::new() };
        for (b, (tx, rx)) in clients.into_iter().enumerate() {
            let link = Arc::new(Link {
                sent: AtomicU64::new(0),
                replies: AtomicU64::new(0),
                sender_done: AtomicBool::new(false),
                sender_done_at_ns: AtomicU64::new(0),
                sent_at: (0..SENT_AT_RING).map(|_| AtomicU64::new(0)).collect(),
            });
            pusher.links.push(link.clone());
            let job = SendJob { plan: plan.clone(), index: b as u64, of: u64::from(connections), start };
            let (l, s) = (link.clone(), pusher.stop.clone());
            pusher.senders.push(
                std::thread::Builder::new()
                    .name(format!("push-send-{b}"))
                    .spawn(move || send_loop(job, tx, &l, &s))
                    .context("starting a push sender thread")?,
            );
            let (l, s, grace) = (link, pusher.stop.clone(), plan.reply_grace);
            pusher.receivers.push(
                std::thread::Builder::new()
                    .name(format!("push-recv-{b}"))
                    .spawn(move || reply_loop(rx, &l, &s, grace))
                    .context("starting a push reply thread")?,
            );
        }
        Ok(pusher)
    }

    /// (sent, replies) so far.
    pub fn progress(&self) -> (u64, u64) {
        self.links
            .iter()
            .fold((0, 0), |(s, r), l| (s + l.sent.load(Ordering::Relaxed), r + l.replies.load(Ordering::Relaxed)))
    }

    /// Every thread has finished (all sent and answered, or given up).
    pub fn is_finished(&self) -> bool {
        self.senders.iter().chain(&self.receivers).all(JoinHandle::is_finished)
    }

    /// Waits for every thread and sums what they saw.
    pub fn finish(mut self) -> anyhow::Result<PushOutcome> {
        let mut total = PushOutcome::new();
        let handles = std::mem::take(&mut self.senders).into_iter().chain(std::mem::take(&mut self.receivers));
        for handle in handles {
            let part = handle.join().map_err(|_| anyhow!("a push thread panicked"))??;
            total.add(part)?;
        }
        Ok(total)
    }
}

impl Drop for Pusher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct SendJob {
    plan: PushPlan,
    /// This connection's index and the number of connections.
    index: u64,
    of: u64,
    /// CLOCK_MONOTONIC of global push 0.
    start: u64,
}

impl SendJob {
    fn request(&self, rng: &mut Rng, k: u64, stamp: u64) -> Request {
        let targets = match &self.plan.target {
            Target::RandomDevice(devices) => {
                let d = &devices[rng.below(devices.len() as u64) as usize];
                proto::Targets { devices: vec![d.clone()], ..Default::default() }
            }
            Target::Group(g) => proto::Targets { group: g.clone(), ..Default::default() },
            Target::Broadcast => proto::Targets { broadcast: true, ..Default::default() },
        };
        // Default QoS, no TTL, no service id: a plain at-most-once push.
        Request::Push(proto::PushRequest {
            targets: Some(targets),
            payload: Bytes::from(stamp_payload(stamp, k, self.plan.payload_bytes)),
            ..Default::default()
        })
    }
}

fn send_loop(job: SendJob, mut tx: PushSender, link: &Link, stop: &AtomicBool) -> anyhow::Result<PushOutcome> {
    sys::tight_timer_slack();
    let mut out = PushOutcome::new();
    let result = send_all(&job, &mut tx, link, stop, &mut out);
    link.sender_done_at_ns.store(mono_ns(), Ordering::Relaxed);
    link.sender_done.store(true, Ordering::Release);
    if let Err(err) = result {
        out.connection_errors.push(format!("sender {}: {err}", job.index));
    }
    // The reply thread counts replies; the sender only counts sends.
    Ok(out)
}

fn send_all(
    job: &SendJob,
    tx: &mut PushSender,
    link: &Link,
    stop: &AtomicBool,
    out: &mut PushOutcome,
) -> Result<(), BackendError> {
    if matches!(job.plan.target, Target::RandomDevice(ref d) if d.is_empty()) {
        return Ok(());
    }
    let mut rng = Rng::from_entropy();
    let period_ns = if job.plan.rate_per_sec > 0.0 { 1e9 / job.plan.rate_per_sec } else { 0.0 };
    let intended = |k: u64| job.start + (k as f64 * period_ns) as u64;
    let mut k = job.index;
    while k < job.plan.count {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = mono_ns();
        let due = intended(k);
        if due > now {
            std::thread::sleep(Duration::from_nanos(due - now));
            continue;
        }
        // Everything due by now goes out in one write.
        while k < job.plan.count && (period_ns == 0.0 || intended(k) <= now) {
            let stamp = if period_ns == 0.0 { mono_ns() } else { intended(k) };
            let id = tx.send(job.request(&mut rng, k, stamp))?;
            link.sent_at[id as usize % SENT_AT_RING].store(stamp, Ordering::Relaxed);
            out.lag_hist.saturating_record(now.saturating_sub(stamp).max(1));
            if out.first_send_mono_ns == 0 {
                out.first_send_mono_ns = stamp;
            }
            out.last_send_mono_ns = stamp;
            out.sent += 1;
            k += job.of;
            if period_ns == 0.0 && out.sent.is_multiple_of(256) {
                break;
            }
        }
        tx.flush()?;
        link.sent.store(out.sent, Ordering::Release);
    }
    tx.flush()
}

fn reply_loop(mut rx: PushReceiver, link: &Link, stop: &AtomicBool, grace: Duration) -> anyhow::Result<PushOutcome> {
    let mut out = PushOutcome::new();
    rx.set_read_timeout(Some(REPLY_POLL)).context("setting the push reply timeout")?;
    loop {
        match rx.recv() {
            Ok(reply) => {
                let now = mono_ns();
                let sent_at = link.sent_at[reply.request_id() as usize % SENT_AT_RING].load(Ordering::Relaxed);
                if sent_at != 0 {
                    out.reply_hist.saturating_record(now.saturating_sub(sent_at).max(1));
                }
                tally(&mut out, reply);
                out.replies += 1;
                link.replies.store(out.replies, Ordering::Relaxed);
            }
            Err(BackendError::Timeout(_)) => {}
            Err(err) => {
                out.connection_errors.push(format!("replies: {err}"));
                return Ok(out);
            }
        }
        if link.sender_done.load(Ordering::Acquire) {
            let sent = link.sent.load(Ordering::Acquire);
            let since = mono_ns().saturating_sub(link.sender_done_at_ns.load(Ordering::Relaxed));
            if out.replies >= sent || since >= grace.as_nanos() as u64 || stop.load(Ordering::Relaxed) {
                return Ok(out);
            }
        }
    }
}

/// Counts one reply by its status.
fn tally(out: &mut PushOutcome, reply: Reply) {
    let status = |out: &mut PushOutcome, s: i32| match PushStatus::try_from(s) {
        Ok(PushStatus::Delivered) => out.delivered += 1,
        Ok(PushStatus::NotOnline) => out.not_online += 1,
        Ok(PushStatus::Rejected) => out.rejected += 1,
        Ok(PushStatus::Accepted) => out.accepted += 1,
        _ => *out.request_errors.entry(format!("status {s}")).or_default() += 1,
    };
    match reply {
        Reply::Push(r) => {
            out.sessions += r.delivered;
            if r.results.is_empty() {
                status(out, r.status);
            } else {
                for t in &r.results {
                    status(out, t.status);
                }
            }
        }
        Reply::Error(e) => {
            let code =
                proto::ErrorCode::try_from(e.code).map_or_else(|_| e.code.to_string(), |c| c.as_str_name().into());
            *out.request_errors.entry(code).or_default() += 1;
        }
        other => *out.request_errors.entry(format!("unexpected {:?}", other.kind())).or_default() += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: PushStatus) -> proto::TargetResult {
        proto::TargetResult { status: status as i32, sessions: 1, ..Default::default() }
    }

    #[test]
    fn replies_are_counted_by_status() {
        let mut out = PushOutcome::new();
        let device = |s| Reply::Push(proto::PushReply { results: vec![result(s)], delivered: 1, ..Default::default() });
        tally(&mut out, device(PushStatus::Delivered));
        tally(&mut out, device(PushStatus::NotOnline));
        tally(
            &mut out,
            Reply::Push(proto::PushReply {
                delivered: 500,
                status: PushStatus::Delivered as i32,
                ..Default::default()
            }),
        );
        tally(&mut out, Reply::Push(proto::PushReply { status: PushStatus::Accepted as i32, ..Default::default() }));
        tally(
            &mut out,
            Reply::Error(proto::RequestError { code: proto::ErrorCode::BadFrame as i32, ..Default::default() }),
        );
        assert_eq!((out.delivered, out.not_online, out.accepted), (2, 1, 1));
        assert_eq!(out.sessions, 502);
        assert_eq!(out.request_errors["BAD_FRAME"], 1);
    }

    #[test]
    fn outcomes_add_up() {
        let mut a = PushOutcome::new();
        a.sent = 3;
        a.first_send_mono_ns = 100;
        a.last_send_mono_ns = 200;
        a.reply_hist.record(1000).unwrap();
        let mut b = PushOutcome::new();
        b.sent = 2;
        b.first_send_mono_ns = 50;
        b.last_send_mono_ns = 1_000_000_050;
        b.reply_hist.record(2000).unwrap();
        a.add(b).unwrap();
        assert_eq!(a.sent, 5);
        assert_eq!((a.first_send_mono_ns, a.last_send_mono_ns), (50, 1_000_000_050));
        assert_eq!(a.reply_hist.len(), 2);
        assert!((a.achieved_rate() - 4.0).abs() < 1e-9);
    }
}
