//! The publisher for the peers, the counterpart of longlink's backend
//! pusher ([`crate::pusher`]): `connections` plain TCP connections from
//! this process, one sender thread each, open loop (message `k` is due at
//! `start + k / rate`, whatever the server does), every payload stamped
//! with its **intended** send time, everything due written in one flush.
//! NATS PUB and MQTT PUBLISH QoS 0 have no per-message answer, so there is
//! no reply thread; at the end the sender asks for a round trip (NATS PING
//! -> PONG, MQTT PINGREQ -> PINGRESP), which the server answers only after
//! it has processed every message before it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hdrhistogram::Histogram;

use super::peerworker::Protocol;
use super::{mqtt, nats};
use crate::latency::{self, mono_ns, stamp_payload};
use crate::rng::Rng;
use crate::sys;

/// Lead time before the first send, so every sender starts on schedule.
const START_LEAD_NS: u64 = 20_000_000;
/// How long the server may take to answer the handshake and the final round trip.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Whom each message goes to.
#[derive(Debug, Clone)]
pub enum PeerTarget {
    /// One subject per message, uniformly at random (unicast).
    RandomSubject(Arc<Vec<String>>),
    /// One subject for every message (fan-out).
    Subject(String),
}

#[derive(Debug, Clone)]
pub struct PublishPlan {
    pub protocol: Protocol,
    pub addr: SocketAddr,
    pub connections: u32,
    /// Messages per second over all connections; 0: as fast as possible.
    pub rate_per_sec: f64,
    pub count: u64,
    pub target: PeerTarget,
    pub payload_bytes: usize,
}

/// What the publisher did, summed over its connections.
#[derive(Debug)]
pub struct PublishOutcome {
    pub sent: u64,
    pub first_send_mono_ns: u64,
    pub last_send_mono_ns: u64,
    /// Every connection got its final round trip answered.
    pub confirmed: bool,
    pub errors: Vec<String>,
    pub lag_hist: Histogram<u64>,
}

impl PublishOutcome {
    pub fn achieved_rate(&self) -> f64 {
        let span = self.last_send_mono_ns.saturating_sub(self.first_send_mono_ns) as f64 / 1e9;
        if self.sent < 2 || span <= 0.0 { 0.0 } else { (self.sent - 1) as f64 / span }
    }
}

/// A publish load in progress.
pub struct Publisher {
    sent: Vec<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<PublishOutcome>>,
}

impl Publisher {
    /// Connects (and handshakes) every connection, then starts the senders.
    pub fn start(plan: &PublishPlan) -> anyhow::Result<Publisher> {
        let connections = plan.connections.max(1);
        let mut streams = Vec::new();
        for b in 0..connections {
            streams.push(handshake(plan, b).with_context(|| format!("publisher {b} to {}", plan.addr))?);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let start = mono_ns() + START_LEAD_NS;
        let mut publisher = Publisher { sent: Vec::new(), stop, threads: Vec::new() };
        for (b, stream) in streams.into_iter().enumerate() {
            let sent = Arc::new(AtomicU64::new(0));
            publisher.sent.push(sent.clone());
            let job = Job { plan: plan.clone(), index: b as u64, of: u64::from(connections), start };
            let stop = publisher.stop.clone();
            publisher.threads.push(
                std::thread::Builder::new()
                    .name(format!("publish-{b}"))
                    .spawn(move || send_loop(&job, stream, &sent, &stop))
                    .context("starting a publisher thread")?,
            );
        }
        Ok(publisher)
    }

    pub fn sent(&self) -> u64 {
        self.sent.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }

    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    pub fn finish(mut self) -> anyhow::Result<PublishOutcome> {
        let mut total = PublishOutcome {
            sent: 0,
            first_send_mono_ns: 0,
            last_send_mono_ns: 0,
            confirmed: true,
            errors: Vec::new(),
            lag_hist: latency::new_histogram(),
        };
        for t in std::mem::take(&mut self.threads) {
            let part = t.join().map_err(|_| anyhow!("a publisher thread panicked"))?;
            total.sent += part.sent;
            if part.first_send_mono_ns != 0
                && (total.first_send_mono_ns == 0 || part.first_send_mono_ns < total.first_send_mono_ns)
            {
                total.first_send_mono_ns = part.first_send_mono_ns;
            }
            total.last_send_mono_ns = total.last_send_mono_ns.max(part.last_send_mono_ns);
            total.confirmed &= part.confirmed;
            total.errors.extend(part.errors);
            total.lag_hist.add(&part.lag_hist).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        }
        Ok(total)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

struct Job {
    plan: PublishPlan,
    index: u64,
    of: u64,
    start: u64,
}

/// Connects and says hello: NATS INFO <- CONNECT + PING -> PONG; MQTT
/// CONNECT -> CONNACK.
fn handshake(plan: &PublishPlan, b: u32) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&plan.addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let name = format!("bench-publisher-{b}");
    match plan.protocol {
        Protocol::Nats => {
            stream.write_all(&nats::connect_and_subscribe(&name, None))?;
            await_answer(&mut stream, Protocol::Nats)?;
        }
        Protocol::Mqtt => {
            // Keepalive 0: no timeout for the publisher's connection.
            stream.write_all(&mqtt::connect(&name, 0))?;
            await_answer(&mut stream, Protocol::Mqtt)?;
        }
    }
    Ok(stream)
}

/// Reads until the NATS PONG or the MQTT CONNACK/PINGRESP.
fn await_answer(stream: &mut TcpStream, protocol: Protocol) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("closed by the server");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        loop {
            let done = match protocol {
                Protocol::Nats => match nats::parse(&buf[consumed..])? {
                    Some((nats::Event::Pong, used)) => {
                        consumed += used;
                        true
                    }
                    Some((nats::Event::Err(text), _)) => bail!("server error: {text}"),
                    Some((_, used)) => {
                        consumed += used;
                        false
                    }
                    None => break,
                },
                Protocol::Mqtt => match mqtt::parse(&buf[consumed..])? {
                    Some((mqtt::Packet::ConnAck { return_code }, used)) => {
                        if return_code != 0 {
                            bail!(mqtt::MqttError::Refused(return_code));
                        }
                        consumed += used;
                        true
                    }
                    Some((mqtt::Packet::PingResp, used)) => {
                        consumed += used;
                        true
                    }
                    Some((_, used)) => {
                        consumed += used;
                        false
                    }
                    None => break,
                },
            };
            if done {
                return Ok(());
            }
        }
        buf.drain(..consumed);
        if Instant::now() >= deadline {
            bail!("no answer within {} s", ANSWER_TIMEOUT.as_secs());
        }
    }
}

fn send_loop(job: &Job, mut stream: TcpStream, sent: &AtomicU64, stop: &AtomicBool) -> PublishOutcome {
    sys::tight_timer_slack();
    let mut out = PublishOutcome {
        sent: 0,
        first_send_mono_ns: 0,
        last_send_mono_ns: 0,
        confirmed: false,
        errors: Vec::new(),
        lag_hist: latency::new_histogram(),
    };
    match send_all(job, &mut stream, sent, stop, &mut out) {
        Ok(()) => {
            let ping = match job.plan.protocol {
                Protocol::Nats => nats::PING,
                Protocol::Mqtt => mqtt::PINGREQ,
            };
            let confirmed = stream
                .write_all(ping)
                .map_err(anyhow::Error::from)
                .and_then(|()| await_answer(&mut stream, job.plan.protocol));
            match confirmed {
                Ok(()) => out.confirmed = true,
                Err(err) => out.errors.push(format!("publisher {}: final round trip: {err:#}", job.index)),
            }
        }
        Err(err) => out.errors.push(format!("publisher {}: {err}", job.index)),
    }
    if job.plan.protocol == Protocol::Mqtt {
        let _ = stream.write_all(mqtt::DISCONNECT);
    }
    out
}

fn send_all(
    job: &Job,
    stream: &mut TcpStream,
    sent: &AtomicU64,
    stop: &AtomicBool,
    out: &mut PublishOutcome,
) -> std::io::Result<()> {
    if matches!(job.plan.target, PeerTarget::RandomSubject(ref all) if all.is_empty()) {
        return Ok(());
    }
    let mut rng = Rng::from_entropy();
    let period_ns = if job.plan.rate_per_sec > 0.0 { 1e9 / job.plan.rate_per_sec } else { 0.0 };
    let intended = |k: u64| job.start + (k as f64 * period_ns) as u64;
    let mut buf = Vec::with_capacity(64 * 1024);
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
        buf.clear();
        while k < job.plan.count && (period_ns == 0.0 || intended(k) <= now) {
            let stamp = if period_ns == 0.0 { mono_ns() } else { intended(k) };
            let payload = stamp_payload(stamp, k, job.plan.payload_bytes);
            let subject = match &job.plan.target {
                PeerTarget::RandomSubject(all) => &all[rng.below(all.len() as u64) as usize],
                PeerTarget::Subject(s) => s,
            };
            match job.plan.protocol {
                Protocol::Nats => nats::publish(&mut buf, subject, &payload),
                Protocol::Mqtt => mqtt::publish(&mut buf, subject, &payload),
            }
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
        stream.write_all(&buf)?;
        sent.store(out.sent, Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Interop with the real servers (Debian packages, installed by
    //! scripts/test and scripts/install-peers): the bench's own NATS and
    //! MQTT codecs, publisher and peer config against nats-server and
    //! mosquitto.

    use std::io::Read as _;

    use super::*;
    use crate::compare::peer::{PeerKind, PeerProcess, default_bin};
    use crate::harness::Harness;

    /// Subscribes a plain blocking client to `subject`, publishes 5 stamped
    /// messages with [`Publisher`], and checks the subscriber gets all 5
    /// with their stamps, in order.
    fn round_trip(kind: PeerKind) {
        let h = Harness::new(Duration::from_secs(60)).unwrap();
        let bin = default_bin(kind);
        let peer = PeerProcess::start(kind, &bin, &h)
            .unwrap_or_else(|e| panic!("{e:#} (install the peers with scripts/install-peers)"));
        let protocol = if kind == PeerKind::Nats { Protocol::Nats } else { Protocol::Mqtt };
        let mut sub = TcpStream::connect(peer.addr()).unwrap();
        sub.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        // Reads and parses until `until` accepts an event; keeps message payloads.
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        let pump =
            |sub: &mut TcpStream, buf: &mut Vec<u8>, payloads: &mut Vec<Vec<u8>>, until: &dyn Fn(&str) -> bool| {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    assert!(Instant::now() < deadline, "no answer from {}", kind.name());
                    loop {
                        let parsed = match protocol {
                            Protocol::Nats => nats::parse(buf).unwrap().map(|(e, n)| {
                                if let nats::Event::Msg(p) = &e {
                                    payloads.push(p.to_vec());
                                }
                                (format!("{e:?}"), n)
                            }),
                            Protocol::Mqtt => mqtt::parse(buf).unwrap().map(|(p, n)| {
                                if let mqtt::Packet::Publish { payload, .. } = &p {
                                    payloads.push(payload.to_vec());
                                }
                                (format!("{p:?}"), n)
                            }),
                        };
                        let Some((event, used)) = parsed else { break };
                        buf.drain(..used);
                        if until(&event) {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    let n = sub.read(&mut chunk).unwrap();
                    assert!(n > 0, "{} closed the subscriber", kind.name());
                    buf.extend_from_slice(&chunk[..n]);
                }
            };
        match protocol {
            Protocol::Nats => {
                sub.write_all(&nats::connect_and_subscribe("test-sub", Some("subj-1"))).unwrap();
                pump(&mut sub, &mut buf, &mut payloads, &|e| e == "Pong");
            }
            Protocol::Mqtt => {
                let mut hello = mqtt::connect("test-sub", 60);
                hello.extend_from_slice(&mqtt::subscribe(1, "subj-1"));
                sub.write_all(&hello).unwrap();
                pump(&mut sub, &mut buf, &mut payloads, &|e| e.starts_with("SubAck"));
            }
        }
        let publisher = Publisher::start(&PublishPlan {
            protocol,
            addr: peer.addr(),
            connections: 1,
            rate_per_sec: 0.0,
            count: 5,
            target: PeerTarget::Subject("subj-1".into()),
            payload_bytes: 64,
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !publisher.is_finished() {
            assert!(Instant::now() < deadline, "publisher did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = publisher.finish().unwrap();
        assert_eq!((out.sent, out.confirmed), (5, true), "{:?}", out.errors);
        while payloads.len() < 5 {
            pump(&mut sub, &mut buf, &mut payloads, &|e| e.starts_with("Msg") || e.starts_with("Publish"));
        }
        let seqs: Vec<u64> = payloads.iter().map(|p| crate::latency::read_stamp(p).unwrap().1).collect();
        assert_eq!(seqs, [0, 1, 2, 3, 4]);
        assert!(payloads.iter().all(|p| p.len() == 64));
        assert!(peer.stop().unwrap());
    }

    #[test]
    fn nats_publisher_reaches_a_subscriber_on_a_real_nats_server() {
        round_trip(PeerKind::Nats);
    }

    #[test]
    fn mqtt_publisher_reaches_a_subscriber_on_a_real_mosquitto() {
        round_trip(PeerKind::Mosquitto);
    }
}
