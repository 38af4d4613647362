//! At-least-once delivery end to end: a real node (2 shards) on port 0, the
//! client library, the push port; a real redis-server and a node process for
//! the crash test.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use longlink::backend::{BackendError, PushClient, Reply, Request};
use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::config::Config;
use longlink::delivery::reliable::ReliableCounters;
use longlink::protocol::codec::{self, Frame, Header};
use longlink::protocol::ids::owner_shard;
use longlink::protocol::proto::{self, DeliveryState, ErrorCode, PushStatus};
use longlink::server::Server;

const WAIT: Duration = Duration::from_secs(20);

fn config() -> Config {
    let mut cfg = test_config(2);
    // Resends are exercised by the tests that lower this.
    cfg.delivery.retry_base_ms = 2_000;
    cfg
}

fn backend(addr: SocketAddr) -> PushClient {
    let mut b = PushClient::connect(addr, Duration::from_secs(5), &push_key()).expect("push port");
    b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    b
}

fn status(code: i32) -> PushStatus {
    PushStatus::try_from(code).unwrap_or(PushStatus::Unspecified)
}

/// Pushes `payload` at-least-once to one device; returns its result.
fn push_one(push: &mut PushClient, device: &str, payload: String) -> proto::TargetResult {
    let reply = push.push_devices_at_least_once(&[device], Bytes::from(payload)).expect("push");
    assert_eq!(reply.message_id, reply.results[0].message_id);
    reply.results.into_iter().next().expect("one result")
}

fn total(server: &Server, counter: impl Fn(&ReliableCounters) -> &AtomicU64) -> u64 {
    server.counters().iter().map(|c| counter(&c.reliable).load(Ordering::Relaxed)).sum()
}

fn options(cfg: &Config, device: &str, last_seq: u64) -> ClientOptions {
    let mut opts = ClientOptions::new(token(cfg, &format!("user-of-{device}"), device));
    opts.last_seq = last_seq;
    opts
}

async fn connect(addr: SocketAddr, opts: ClientOptions) -> Connection {
    Connection::connect(addr, opts).await.expect("client authenticates").0
}

/// The next Message or ResyncRequired (heartbeat events skipped).
async fn next_delivery(conn: &mut Connection) -> ClientEvent {
    loop {
        match conn.next_event().await.expect("connection stays up") {
            ev @ (ClientEvent::Message(_) | ClientEvent::ResyncRequired { .. }) => return ev,
            _ => continue,
        }
    }
}

fn text(m: &proto::Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

#[test]
fn offline_device_receives_its_backlog_in_order_and_status_follows_the_message() {
    let cfg = config();
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    let results: Vec<_> = (0..10).map(|i| push_one(&mut push, "off-1", format!("m{i}"))).collect();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(status(r.status), PushStatus::Stored, "{r:?}");
        assert_eq!(r.sessions, 0, "offline: nothing sent yet");
        assert_eq!(r.seq, results[0].seq + i as u64, "sequences are consecutive");
    }
    let ids: Vec<u64> = results.iter().map(|r| r.message_id).collect();
    let s = push.delivery_status(&ids[..1]).unwrap();
    assert_eq!(s.statuses[0].state, DeliveryState::Stored as i32);
    assert_eq!((s.statuses[0].device.as_str(), s.statuses[0].seq), ("off-1", results[0].seq));

    let live_seq = results[9].seq + 1;
    let (mut push, last) = run(async move {
        let mut conn = connect(addr, options(&cfg, "off-1", 0)).await;
        for (i, r) in results.iter().enumerate() {
            let ClientEvent::Message(m) = next_delivery(&mut conn).await else { panic!("no resync expected") };
            assert_eq!((text(&m), m.seq, m.message_id), (format!("m{i}"), r.seq, r.message_id));
        }
        conn.ack_now().await.unwrap();
        // Online now: sent at once.
        let r = push_one(&mut push, "off-1", "live".into());
        assert_eq!((status(r.status), r.sessions), (PushStatus::Stored, 1));
        let ClientEvent::Message(m) = next_delivery(&mut conn).await else { panic!() };
        assert_eq!((text(&m), m.seq), ("live".to_string(), results[9].seq + 1));
        conn.ack_now().await.unwrap();
        assert_nothing_queued(&mut conn).await;
        (push, conn.last_seq())
    });
    assert_eq!(last, live_seq);
    let acked = wait_until(WAIT, || {
        push.delivery_status(&ids).unwrap().statuses.iter().all(|s| s.state == DeliveryState::Acked as i32)
    });
    assert!(acked, "{:?}", push.delivery_status(&ids).unwrap());
    for s in push.delivery_status(&ids).unwrap().statuses {
        assert!(s.stored_at_ms > 0 && s.stored_at_ms <= s.sent_at_ms && s.sent_at_ms <= s.acked_at_ms, "{s:?}");
    }
    let unknown = push.delivery_status(&[12345]).unwrap();
    assert_eq!(unknown.statuses[0].state, DeliveryState::Unknown as i32);
    assert_eq!(total(&server, |c| &c.retries), 0);
    server.shutdown();
}

#[test]
fn backlog_beyond_retention_gives_resync_required_with_the_missing_range() {
    let mut cfg = config();
    cfg.delivery.retention_messages = 5;
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    run(async move {
        let mut conn = connect(addr, options(&cfg, "ret-1", 0)).await;
        let first = push_one(&mut push, "ret-1", "first".into());
        let ClientEvent::Message(m) = next_delivery(&mut conn).await else { panic!() };
        assert_eq!(m.seq, first.seq);
        conn.ack_now().await.unwrap();
        let last_seq = conn.last_seq();
        assert_eq!(last_seq, first.seq);
        conn.close().await;
        assert!(wait_until(WAIT, || !push.presence(&["ret-1"], &[], &[]).unwrap().devices[0].online));

        // Eight while offline; the timeline keeps the last five.
        let r: Vec<_> = (0..8).map(|i| push_one(&mut push, "ret-1", format!("off{i}"))).collect();
        assert!(r.iter().all(|r| status(r.status) == PushStatus::Stored));
        let mut conn = connect(addr, options(&cfg, "ret-1", last_seq)).await;
        let ev = next_delivery(&mut conn).await;
        assert_eq!(ev, ClientEvent::ResyncRequired { from_seq: r[0].seq, to_seq: r[2].seq });
        for (i, expected) in r.iter().enumerate().skip(3) {
            let ClientEvent::Message(m) = next_delivery(&mut conn).await else { panic!() };
            assert_eq!((text(&m), m.seq), (format!("off{i}"), expected.seq));
        }
        conn.ack_now().await.unwrap();
        assert_eq!(conn.last_seq(), r[7].seq);
        assert_nothing_queued(&mut conn).await;
        let s = push.delivery_status(&[r[0].message_id, r[7].message_id]).unwrap();
        assert_eq!(s.statuses[0].state, DeliveryState::Expired as i32);
        // A client resuming after the resync is not told again.
        conn.close().await;
        let mut conn = connect(addr, options(&cfg, "ret-1", r[7].seq)).await;
        assert_nothing_queued(&mut conn).await;
    });
    assert_eq!(total(&server, |c| &c.resyncs), 1);
    server.shutdown();
}

#[test]
fn a_client_without_ack_support_gets_stored_messages_once_and_no_retries() {
    let mut cfg = config();
    cfg.delivery.retry_base_ms = 50;
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    let stored: Vec<_> = (0..2).map(|i| push_one(&mut push, "old-1", format!("s{i}"))).collect();
    let ids = run(async move {
        let mut opts = options(&cfg, "old-1", 0);
        opts.capabilities = 0;
        let mut conn = connect(addr, opts).await;
        let mut ids: Vec<u64> = stored.iter().map(|r| r.message_id).collect();
        for i in 0..2 {
            let ClientEvent::Message(m) = next_delivery(&mut conn).await else { panic!() };
            assert_eq!(text(&m), format!("s{i}"));
        }
        for i in 0..3 {
            let r = push_one(&mut push, "old-1", format!("l{i}"));
            assert_eq!((status(r.status), r.sessions), (PushStatus::Stored, 1));
            ids.push(r.message_id);
            let ClientEvent::Message(m) = next_delivery(&mut conn).await else { panic!() };
            assert_eq!(text(&m), format!("l{i}"));
        }
        // Eight times N: an ACK-capable client would have seen resends.
        glommio::timer::sleep(Duration::from_millis(400)).await;
        assert_nothing_queued(&mut conn).await;
        conn.close().await;
        // Nothing is replayed to the next session either.
        let mut opts = options(&cfg, "old-1", 0);
        opts.capabilities = 0;
        let mut conn = connect(addr, opts).await;
        assert_nothing_queued(&mut conn).await;
        let s = push.delivery_status(&ids).unwrap();
        assert!(s.statuses.iter().all(|s| s.state == DeliveryState::Acked as i32), "{s:?}");
        ids
    });
    assert_eq!(ids.len(), 5);
    assert_eq!(total(&server, |c| &c.retries), 0);
    assert_eq!(total(&server, |c| &c.sent_unacked), 5);
    assert_eq!(total(&server, |c| &c.tracked_devices), 0, "never entered the retry queue");
    server.shutdown();
}

#[test]
fn a_message_that_could_not_be_sent_to_a_client_without_ack_support_waits_for_its_next_connect() {
    let mut cfg = config();
    // A small queue: the client that stops reading is cut off after a few
    // large messages.
    cfg.session.outbound_queue_bytes = 128 * 1024;
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    run(async move {
        let mut opts = options(&cfg, "old-2", 0);
        opts.capabilities = 0;
        // Connected and never read from: its socket fills, then its queue.
        let stuck = connect(addr, opts.clone()).await;
        let payload = "x".repeat(60_000);
        let mut failed = None;
        for _ in 0..2_000 {
            let r = push_one(&mut push, "old-2", payload.clone());
            assert_eq!(status(r.status), PushStatus::Stored, "{r:?}");
            if r.sessions == 0 {
                // The session was active, the send failed (queue full) and
                // the session was closed as SLOW.
                failed = Some(r.seq);
                break;
            }
        }
        let failed = failed.expect("the client that never reads is cut off");
        drop(stuck);
        assert!(wait_until(WAIT, || !push.presence(&["old-2"], &[], &[]).unwrap().devices[0].online));
        // The message that never went out is the first one the next
        // session gets: it was not acknowledged in the store.
        let mut conn = connect(addr, opts).await;
        conn.ping().await.unwrap();
        let ClientEvent::Message(m) = conn.next_event().await.unwrap() else {
            panic!("the unsent message was dropped from the timeline");
        };
        assert_eq!(m.seq, failed);
    });
    server.shutdown();
}

#[test]
fn a_store_that_does_not_answer_cannot_hold_a_push_past_the_reply_deadline() {
    let redis = RedisServer::start();
    let mut cfg = config();
    cfg.delivery.redis_url = redis.url();
    // Redis would keep the append waiting for 30 s; the backend gets its
    // answer after one.
    cfg.delivery.redis_timeout_ms = 30_000;
    cfg.push.reply_timeout_ms = 1_000;
    // One request in flight per backend: a request whose budget leaked
    // would stop the node from reading the next one.
    cfg.push.max_inflight_per_backend = 1;
    let server = start(&cfg);
    let mut push = backend(server.push_addr());
    push.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let r = push_one(&mut push, "stall-1", "before".into());
    assert_eq!(status(r.status), PushStatus::Stored, "{r:?}");
    let signal = |sig| {
        // SAFETY: kill(2) of our own redis-server child.
        unsafe { libc::kill(redis.pid() as i32, sig) };
    };
    signal(libc::SIGSTOP);
    for i in 0..2 {
        let r = push_one(&mut push, "stall-1", format!("during {i}"));
        assert_eq!((status(r.status), r.retryable), (PushStatus::Rejected, true), "{r:?}");
        assert!(r.reason.contains("did not answer within 1000 ms"), "{}", r.reason);
    }
    signal(libc::SIGCONT);
    let shard_total = |f: fn(&longlink::shard::ShardCounters) -> &AtomicU64| -> u64 {
        server.counters().iter().map(|c| f(c).load(Ordering::Relaxed)).sum()
    };
    assert_eq!(shard_total(|c| &c.push_timeouts), 2);
    // The store answers once Redis runs again: too late, dropped, counted.
    assert!(wait_until(WAIT, || shard_total(|c| &c.push_late_answers) == 2));
    let r = push_one(&mut push, "stall-1", "after".into());
    assert_eq!(status(r.status), PushStatus::Stored, "{r:?}");
    server.shutdown();
}

/// Connects (no messages) and returns the store incarnation adopted. A
/// Redis store that could not reach Redis at start learns it with the
/// first replay (AuthOk says 0 until then): connect again.
async fn seen_incarnation(addr: SocketAddr, opts: ClientOptions) -> u64 {
    for _ in 0..20 {
        let (conn, ok) = Connection::connect(addr, opts.clone()).await.expect("client authenticates");
        assert_eq!(conn.store_incarnation(), ok.store_incarnation, "a first one is adopted at once");
        conn.close().await;
        if ok.store_incarnation != 0 {
            return ok.store_incarnation;
        }
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
    panic!("AuthOk never named the store incarnation");
}

/// The first event of a session that resumes, proven to come before any
/// answer to a Ping (ResyncRequired, a Message, or nothing: the Pong).
async fn first_after_auth(addr: SocketAddr, opts: ClientOptions) -> (Connection, ClientEvent) {
    let mut conn = connect(addr, opts).await;
    conn.ping().await.unwrap();
    let ev = conn.next_event().await.expect("connection stays up");
    (conn, ev)
}

#[test]
fn memory_store_lost_by_kill_9_a_resuming_device_is_told_what_it_may_have_missed() {
    let cfg = config();
    let node = NodeProcess::start(&cfg);
    let opts = options(&cfg, "inc-1", 0);
    let first_run = run(seen_incarnation(node.client_addr, opts.clone()));
    // Three messages for the device while it is offline, then the node dies
    // with its memory store.
    let mut push = backend(node.push_addr);
    let stored: Vec<u64> = (0..3).map(|i| push_one(&mut push, "inc-1", format!("lost {i}")).seq).collect();
    drop(push);
    drop(node);
    let node = NodeProcess::start(&cfg);
    run(async move {
        // A fresh install (never saw the store) has nothing to miss.
        let (fresh, ev) = first_after_auth(node.client_addr, options(&cfg, "inc-2", 0)).await;
        assert!(matches!(ev, ClientEvent::Pong { .. }), "{ev:?}");
        fresh.close().await;
        // The device that saw the earlier store resumes from 0.
        let mut o = opts.clone();
        o.store_incarnation = first_run;
        let (mut conn, ev) = first_after_auth(node.client_addr, o.clone()).await;
        let ClientEvent::ResyncRequired { from_seq, to_seq } = ev else { panic!("silent loss: {ev:?}") };
        assert_eq!(from_seq, 1);
        assert!(stored.iter().all(|&s| s <= to_seq), "{stored:?} within ..={to_seq}");
        assert_eq!(conn.store_incarnation(), first_run, "adopted only once the resync is handled");
        assert!(matches!(conn.next_event().await.unwrap(), ClientEvent::Pong { .. }));
        let now_seen = conn.store_incarnation();
        assert!(now_seen != first_run && now_seen != 0, "the new store adopted");
        assert_eq!(conn.last_seq(), to_seq);
        conn.close().await;
        // Resuming again with what it adopted: nothing more to tell.
        let mut o = options(&cfg, "inc-1", to_seq);
        o.store_incarnation = now_seen;
        let (_, ev) = first_after_auth(node.client_addr, o).await;
        assert!(matches!(ev, ClientEvent::Pong { .. }), "{ev:?}");
    });
}

#[test]
fn redis_store_that_lost_its_data_a_resuming_device_is_told_what_it_may_have_missed() {
    let redis = RedisServer::start();
    let mut cfg = config();
    cfg.delivery.redis_url = redis.url();
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    let opts = options(&cfg, "inc-r", 0);
    let before = run(seen_incarnation(addr, opts.clone()));
    let srv = &server;
    let stored: Vec<u64> = (0..3).map(|i| push_one(&mut push, "inc-r", format!("lost {i}")).seq).collect();
    // Redis loses everything (a restart without persistence, a flush).
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
    run(async move {
        let mut o = opts.clone();
        o.store_incarnation = before;
        let mut conn = connect(addr, o).await;
        // The Redis replay answers after a while: wait for what comes first.
        let ev = futures_lite::future::or(async { Some(next_delivery(&mut conn).await) }, async {
            glommio::timer::sleep(WAIT).await;
            None
        })
        .await;
        let Some(ClientEvent::ResyncRequired { from_seq, to_seq }) = ev else { panic!("silent loss: {ev:?}") };
        assert_eq!(from_seq, 1);
        assert!(stored.iter().all(|&s| s <= to_seq), "{stored:?} within ..={to_seq}");
        conn.ack_now().await.unwrap();
        conn.close().await;
        // The store's new incarnation is what AuthOk names from now on; the
        // client, resumed past the gap, is not told again (the gap's upper
        // bound once was "now", so a resume a millisecond later was).
        let replays = total(srv, |c| &c.replays);
        let mut o = options(&cfg, "inc-r", to_seq);
        o.store_incarnation = before;
        let (mut conn, ok) = Connection::connect(addr, o).await.unwrap();
        assert!(ok.store_incarnation != before && ok.store_incarnation != 0);
        // Whatever the resume sends is queued once its timeline read is done.
        let started = Instant::now();
        while total(srv, |c| &c.replays) == replays {
            assert!(started.elapsed() < WAIT, "the resume's timeline read never completed");
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        assert_nothing_queued(&mut conn).await;
        conn.close().await;
        // A client that took the new incarnation, with a message stored
        // since: the message, and no gap between the one it was told of and
        // the device's new counter (nothing was issued there).
        let seq = push_one(&mut push, "inc-r", "after the loss".into()).seq;
        let mut o = options(&cfg, "inc-r", to_seq);
        o.store_incarnation = ok.store_incarnation;
        let mut conn = connect(addr, o).await;
        match next_delivery(&mut conn).await {
            ClientEvent::Message(m) => assert_eq!((m.seq, &m.payload[..]), (seq, &b"after the loss"[..])),
            other => panic!("expected the new message, got {other:?}"),
        }
    });
    server.shutdown();
}

/// A client speaking raw frames, to see flags and withhold ACKs.
struct RawClient {
    stream: glommio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr, token: String) -> RawClient {
        RawClient::resume(addr, token, 0).await.0
    }

    /// Connects after `last_seq`; also returns what came within 300 ms
    /// after AuthOk.
    async fn resume(addr: SocketAddr, token: String, last_seq: u64) -> (RawClient, Vec<(Header, Frame)>) {
        use futures_lite::AsyncWriteExt;
        let mut stream = glommio::net::TcpStream::connect(addr).await.unwrap();
        let auth = proto::Auth { token, capabilities: proto::Capability::Ack as u32, last_seq, ..Default::default() };
        stream.write_all(&Frame::Auth(auth).to_bytes()).await.unwrap();
        let mut raw = RawClient { stream, buf: Vec::new() };
        let mut frames = raw.read_for(Duration::from_millis(300)).await;
        assert!(matches!(frames.first(), Some((_, Frame::AuthOk(_)))), "{frames:?}");
        frames.remove(0);
        (raw, frames)
    }

    async fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both).await;
    }

    /// Reads until `done` holds for everything read so far (or `WAIT`
    /// passes: then it panics, naming `what`).
    async fn read_until(
        &mut self,
        mut seen: Vec<(Header, Frame)>,
        what: &str,
        done: impl Fn(&[(Header, Frame)]) -> bool,
    ) -> Vec<(Header, Frame)> {
        let deadline = Instant::now() + WAIT;
        while !done(&seen) {
            assert!(Instant::now() < deadline, "no {what} within {WAIT:?}: {seen:?}");
            seen.extend(self.read_for(Duration::from_millis(20)).await);
        }
        seen
    }

    async fn send(&mut self, frame: Frame) {
        use futures_lite::AsyncWriteExt;
        self.stream.write_all(&frame.to_bytes()).await.unwrap();
    }

    /// Every frame that arrives within `window`.
    async fn read_for(&mut self, window: Duration) -> Vec<(Header, Frame)> {
        use futures_lite::AsyncReadExt;
        let deadline = Instant::now() + window;
        let mut chunk = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let read = futures_lite::future::or(async { Some(self.stream.read(&mut chunk).await) }, async {
                glommio::timer::sleep(left).await;
                None
            })
            .await;
            match read {
                Some(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                Some(_) => panic!("server closed the raw client"),
                None => break,
            }
        }
        let mut out = Vec::new();
        let mut rest = &self.buf[..];
        while let Ok(Some((h, body))) = codec::split_frame(rest, codec::DEFAULT_MAX_BODY) {
            out.push((h, Frame::decode(h, body).unwrap()));
            rest = &rest[h.frame_len()..];
        }
        let used = self.buf.len() - rest.len();
        self.buf.drain(..used);
        out
    }
}

fn seqs(frames: &[(Header, Frame)], resent: bool) -> Vec<u64> {
    frames
        .iter()
        .filter(|(h, _)| h.flags.is_retransmission() == resent)
        .filter_map(|(_, f)| match f {
            Frame::Message(m) => Some(m.seq),
            _ => None,
        })
        .collect()
}

#[test]
fn the_window_bounds_what_is_in_flight_and_unacked_messages_are_resent_flagged() {
    let mut cfg = config();
    cfg.delivery.window = 4;
    cfg.delivery.retry_base_ms = 150;
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    let token = token(&cfg, "w", "win-1");
    run(async move {
        let mut raw = RawClient::connect(addr, token).await;
        let r: Vec<_> = (0..10).map(|i| push_one(&mut push, "win-1", format!("w{i}"))).collect();
        let s: Vec<u64> = r.iter().map(|r| r.seq).collect();
        let sent_now: Vec<u32> = r.iter().map(|r| r.sessions).collect();
        assert_eq!(sent_now, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], "the window holds 4");
        // First sends, then (after N = 150 ms) the same four again, flagged.
        let frames = raw.read_for(Duration::from_millis(400)).await;
        assert_eq!(seqs(&frames, false), &s[..4]);
        let resent = seqs(&frames, true);
        assert!(resent.len() >= 4 && resent[..4] == s[..4], "{resent:?}");
        // A cumulative ACK of two frees two slots.
        raw.send(Frame::Ack(proto::Ack { seq: s[1] })).await;
        let frames = raw.read_for(Duration::from_millis(100)).await;
        assert_eq!(seqs(&frames, false), &s[4..6]);
        raw.send(Frame::Ack(proto::Ack { seq: s[5] })).await;
        let frames = raw.read_for(Duration::from_millis(100)).await;
        assert_eq!(seqs(&frames, false), &s[6..10]);
        // An ACK beyond what was sent counts only what was sent.
        raw.send(Frame::Ack(proto::Ack { seq: s[9] + 100 })).await;
        let frames = raw.read_for(Duration::from_millis(400)).await;
        assert!(seqs(&frames, false).is_empty() && seqs(&frames, true).is_empty(), "{frames:?}");
        let late = push_one(&mut push, "win-1", "late".into());
        assert_eq!((late.seq, late.sessions), (s[9] + 1, 1));
    });
    assert!(total(&server, |c| &c.retries) >= 4);
    assert!(wait_until(WAIT, || total(&server, |c| &c.tracked_devices) == 0), "state left behind");
    server.shutdown();
}

/// Sends of `seq` so far: (first sends, retransmissions).
fn sends_of(frames: &[(Header, Frame)], seq: u64) -> (usize, usize) {
    let of = |resent| {
        frames
            .iter()
            .filter(|(h, f)| h.flags.is_retransmission() == resent && matches!(f, Frame::Message(m) if m.seq == seq))
            .count()
    };
    (of(false), of(true))
}

/// Runs `check` with a node on the memory store and with one on Redis.
fn on_both_stores(mut cfg: Config, check: impl Fn(&Server, &Config, Option<&RedisServer>)) {
    let server = start(&cfg);
    check(&server, &cfg, None);
    server.shutdown();
    let redis = RedisServer::start();
    cfg.delivery.redis_url = redis.url();
    let server = start(&cfg);
    check(&server, &cfg, Some(&redis));
    server.shutdown();
}

/// How long after its first send the first retransmission of `seq` came.
async fn first_resend_after(raw: &mut RawClient, seq: u64) -> Duration {
    let frames = raw.read_until(Vec::new(), "first send", |f| sends_of(f, seq).0 == 1).await;
    let sent = Instant::now();
    raw.read_until(frames, "retransmission", |f| sends_of(f, seq).1 >= 1).await;
    sent.elapsed()
}

#[test]
fn a_device_keeps_its_learned_recovery_time_when_its_window_empties_and_when_it_reconnects() {
    let mut cfg = config();
    // N = 100 ms four times, then +1 s: a device whose ACK needs the fifth
    // resend has a recovery time of at least 1.5 s.
    cfg.delivery.retry_base_ms = 100;
    cfg.delivery.retry_fast = 4;
    cfg.delivery.retry_step_ms = 1_000;
    on_both_stores(cfg, |server, cfg, redis| {
        let (addr, mut push) = (server.client_addr(), backend(server.push_addr()));
        let token = token(cfg, "lr", "learn-1");
        run(async move {
            let mut raw = RawClient::connect(addr, token.clone()).await;
            let m1 = push_one(&mut push, "learn-1", "m1".into());
            raw.read_until(Vec::new(), "five resends", |f| sends_of(f, m1.seq).1 >= 5).await;
            raw.send(Frame::Ack(proto::Ack { seq: m1.seq })).await;
            // Its window is empty now; the next message waits the learned
            // time, not N, before its first resend.
            let m2 = push_one(&mut push, "learn-1", "m2".into());
            let waited = first_resend_after(&mut raw, m2.seq).await;
            assert!(waited >= Duration::from_millis(1_000), "window emptied: resent after {waited:?}");
            raw.send(Frame::Ack(proto::Ack { seq: m2.seq })).await;
            raw.close().await;
            assert!(wait_until(WAIT, || !push.presence(&["learn-1"], &[], &[]).unwrap().devices[0].online));
            if let Some(redis) = redis {
                assert!(redis.exists("ll:lrn:{learn-1}"), "kept with the timeline, with a TTL");
            }
            // A new session of the device starts from it too.
            let (mut raw, _) = RawClient::resume(addr, token, m2.seq).await;
            let m3 = push_one(&mut push, "learn-1", "m3".into());
            let waited = first_resend_after(&mut raw, m3.seq).await;
            assert!(waited >= Duration::from_millis(1_000), "reconnected: resent after {waited:?}");
        });
    });
}

#[test]
fn a_client_that_never_acks_gets_its_backlog_replayed_max_replays_times_then_expired_with_a_resync() {
    let mut cfg = config();
    cfg.delivery.max_replays = 2;
    on_both_stores(cfg, |server, cfg, _| {
        let (addr, mut push) = (server.client_addr(), backend(server.push_addr()));
        let token = token(cfg, "nr", "never-acks");
        run(async move {
            let r: Vec<_> = (0..3).map(|i| push_one(&mut push, "never-acks", format!("b{i}"))).collect();
            let seqs: Vec<u64> = r.iter().map(|r| r.seq).collect();
            // Session 0 is cut right after the backlog arrives (a flapping
            // network, no time to ACK): it does not count. Sessions 1 and
            // 2 keep it unacknowledged past a resend (N = 2 s): they do.
            for session in 0..3 {
                let (mut raw, frames) = RawClient::resume(addr, token.clone(), 0).await;
                let all = |f: &[(Header, Frame)]| seqs.iter().all(|&s| sends_of(f, s).0 == 1);
                let mut frames = raw.read_until(frames, "the backlog", all).await;
                if session > 0 {
                    frames = raw.read_until(frames, "a resend", |f| sends_of(f, seqs[0]).1 >= 1).await;
                }
                assert!(!frames.iter().any(|(_, f)| matches!(f, Frame::ResyncRequired(_))), "session {session}");
                raw.close().await;
                assert!(wait_until(WAIT, || !push.presence(&["never-acks"], &[], &[]).unwrap().devices[0].online));
            }
            // The next session: the backlog is not sent again; the client
            // is told it is gone.
            let (mut raw, frames) = RawClient::resume(addr, token, 0).await;
            let mut frames = raw
                .read_until(frames, "ResyncRequired", |f| f.iter().any(|(_, f)| matches!(f, Frame::ResyncRequired(_))))
                .await;
            raw.send(Frame::Ping).await;
            frames = raw.read_until(frames, "Pong", |f| f.iter().any(|(_, f)| matches!(f, Frame::Pong))).await;
            let resync = proto::ResyncRequired { from_seq: seqs[0], to_seq: seqs[2] };
            assert!(frames.iter().any(|(_, f)| *f == Frame::ResyncRequired(resync)), "{frames:?}");
            assert!(!frames.iter().any(|(_, f)| matches!(f, Frame::Message(_))), "replayed again: {frames:?}");
            let ids: Vec<u64> = r.iter().map(|r| r.message_id).collect();
            for s in push.delivery_status(&ids).unwrap().statuses {
                assert_eq!(s.state, DeliveryState::Expired as i32, "{s:?}");
                assert_eq!(s.reason, "not acknowledged after 2 replays to the device");
            }
            // Later messages flow as usual.
            let next = push_one(&mut push, "never-acks", "after".into());
            assert_eq!(next.sessions, 1);
            raw.read_until(Vec::new(), "the next message", |f| sends_of(f, next.seq).0 == 1).await;
        });
    });
}

#[test]
fn user_targets_store_a_copy_per_online_device_and_groups_stay_at_most_once() {
    let cfg = config();
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(server.push_addr());
    let devices = ["ua-phone", "ua-tablet", "ua-watch"];
    assert!(devices.iter().map(|d| owner_shard(d, 2)).collect::<std::collections::HashSet<_>>().len() == 2);
    run(async move {
        let mut conns = Vec::new();
        for d in devices {
            let mut opts = ClientOptions::new(token(&cfg, "ua", d));
            opts.last_seq = 0;
            conns.push(connect(addr, opts).await);
        }
        let reply = push
            .push_request(proto::PushRequest {
                targets: Some(proto::Targets { users: vec!["ua".into(), "nobody".into()], ..Default::default() }),
                payload: Bytes::from_static(b"to all of ua"),
                qos: proto::Qos::AtLeastOnce as i32,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(status(reply.status), PushStatus::Stored);
        let r = &reply.results[0];
        assert_eq!((status(r.status), r.sessions, r.copies.len()), (PushStatus::Stored, 3, 3));
        assert_eq!(status(reply.results[1].status), PushStatus::NotOnline);
        assert_eq!(reply.stored, 3);
        for (conn, device) in conns.iter_mut().zip(devices) {
            let ClientEvent::Message(m) = next_delivery(conn).await else { panic!() };
            let copy = r.copies.iter().find(|c| c.device == device).expect("a copy per device");
            assert_eq!((m.seq, m.message_id), (copy.seq, copy.message_id));
        }
        let group = proto::PushRequest {
            targets: Some(proto::Targets { group: "g".into(), ..Default::default() }),
            qos: proto::Qos::AtLeastOnce as i32,
            ..Default::default()
        };
        let err = push.push_request(group).unwrap_err();
        assert!(matches!(err, BackendError::Rejected { code: ErrorCode::BadFrame, .. }), "{err:?}");
        let bad_qos = proto::PushRequest {
            targets: Some(proto::Targets { devices: vec!["ua-phone".into()], ..Default::default() }),
            qos: 9,
            ..Default::default()
        };
        assert!(push.push_request(bad_qos).is_err());
    });
    server.shutdown();
}

/// Reads at-least-once messages numbered 0.. on one device across
/// reconnects, as an application that persists the last sequence it
/// handled. `on_message` may end the connection (returns false).
struct Receiver {
    got: Vec<u64>,
    last_seq: u64,
    duplicates: u64,
    connections: u32,
}

#[test]
fn connection_cut_mid_stream_then_resume_delivers_every_message_once_in_order() {
    const N: u64 = 300;
    let mut cfg = config();
    // Short N: a client that dawdles sees resends on the wire.
    cfg.delivery.retry_base_ms = 100;
    let server = start(&cfg);
    let addr = server.client_addr();
    let push_addr = server.push_addr();
    let pusher = std::thread::spawn(move || {
        let mut push = backend(push_addr);
        for i in 0..N {
            let r = push_one(&mut push, "cut-1", i.to_string());
            assert_eq!(status(r.status), PushStatus::Stored);
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let rx = run(async move {
        let mut kicker = backend(push_addr);
        let mut rx = Receiver { got: Vec::new(), last_seq: 0, duplicates: 0, connections: 0 };
        while (rx.got.len() as u64) < N {
            let mut conn = connect(addr, options(&cfg, "cut-1", rx.last_seq)).await;
            rx.connections += 1;
            let ended = loop {
                match conn.next_event().await {
                    Ok(ClientEvent::Message(m)) => {
                        let n: u64 = text(&m).parse().unwrap();
                        assert_eq!(n, rx.got.len() as u64, "in order, once: got {n} after {:?}", rx.got.last());
                        rx.got.push(n);
                        // The application persists the sequence it handled.
                        rx.last_seq = m.seq;
                        match n {
                            // The client is killed: no ACK, the socket just closes.
                            60 | 200 => break None,
                            // The server ends the session (reconnect allowed).
                            130 => {
                                kicker.kick_devices(&["cut-1"], ErrorCode::Shutdown, "cut").unwrap();
                            }
                            // A slow handler: its message and those behind it are resent.
                            n if n % 50 == 25 => glommio::timer::sleep(Duration::from_millis(350)).await,
                            _ => {}
                        }
                        if rx.got.len() as u64 == N {
                            conn.ack_now().await.unwrap();
                            break None;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => break Some(err),
                }
            };
            rx.duplicates += conn.duplicates();
            if let Some(err) = ended {
                assert!(err.reconnect_allowed(), "{err:?}");
                assert_eq!(err.code(), Some(ErrorCode::Shutdown));
            }
        }
        rx
    });
    pusher.join().unwrap();
    assert_eq!(rx.got, (0..N).collect::<Vec<_>>());
    assert!(rx.connections >= 4, "{} connections", rx.connections);
    println!(
        "cut test: {N} messages over {} connections, {} duplicates on the wire removed, {} resends",
        rx.connections,
        rx.duplicates,
        total(&server, |c| &c.retries)
    );
    assert!(rx.duplicates > 0, "the slow handler should have caused resends");
    assert!(total(&server, |c| &c.retries) > 0);
    server.shutdown();
}

/// xorshift64*: deterministic randomness for the checker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct DeviceCheck {
    /// Numbers handed to the application, in order.
    got: Vec<u64>,
    order_violations: u64,
    duplicates: u64,
    disconnects: u64,
}

#[test]
fn checker_1000_devices_30000_pushes_random_disconnects_lose_nothing() {
    const DEVICES: usize = 1000;
    const PUSHES: usize = 30_000;
    let mut cfg = config();
    cfg.session.auth_timeout_ms = 10_000;
    cfg.delivery.retry_base_ms = 500;
    let server = start(&cfg);
    let addr = server.client_addr();
    let push_addr = server.push_addr();
    // The plan: which device each push goes to (numbered per device).
    let mut rng = Rng(0x5EED_0001);
    let plan: Vec<usize> = (0..PUSHES).map(|_| rng.below(DEVICES as u64) as usize).collect();
    let mut expected = vec![0u64; DEVICES];
    for &d in &plan {
        expected[d] += 1;
    }
    let expected = Arc::new(expected);
    let device = |d: usize| format!("chk-{d}");
    let rejected = Arc::new(AtomicU64::new(0));
    let kicks = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let pusher = {
        let (rejected, kicks) = (rejected.clone(), kicks.clone());
        std::thread::spawn(move || {
            let (mut tx, mut rxr) = backend(push_addr).split().unwrap();
            let replies = std::thread::spawn(move || {
                let mut stored = 0u64;
                let mut bad = 0u64;
                for _ in 0..PUSHES {
                    match rxr.recv().expect("reply") {
                        Reply::Push(r) if status(r.results[0].status) == PushStatus::Stored => stored += 1,
                        other => {
                            bad += 1;
                            eprintln!("not stored: {other:?}");
                        }
                    }
                }
                (stored, bad)
            });
            let mut kicker = backend(push_addr);
            let mut counters = vec![0u64; DEVICES];
            let mut rng = Rng(0x5EED_0002);
            for (k, &d) in plan.iter().enumerate() {
                let req = proto::PushRequest {
                    targets: Some(proto::Targets { devices: vec![device(d)], ..Default::default() }),
                    payload: Bytes::from(counters[d].to_string()),
                    qos: proto::Qos::AtLeastOnce as i32,
                    ..Default::default()
                };
                counters[d] += 1;
                tx.send(Request::Push(req)).unwrap();
                if k % 64 == 63 {
                    tx.flush().unwrap();
                }
                // Server-side disconnects too, now and then.
                if k % 500 == 250 {
                    tx.flush().unwrap();
                    let victim = device(rng.below(DEVICES as u64) as usize);
                    kicker.kick_devices(&[victim.as_str()], ErrorCode::Shutdown, "checker").unwrap();
                    kicks.fetch_add(1, Ordering::Relaxed);
                }
            }
            tx.flush().unwrap();
            let (_, bad) = replies.join().unwrap();
            rejected.store(bad, Ordering::Relaxed);
        })
    };
    let checks: Vec<DeviceCheck> = run(async {
        let cfg = Arc::new(cfg);
        let tasks: Vec<_> = (0..DEVICES)
            .map(|d| {
                let (cfg, expected) = (cfg.clone(), expected.clone());
                glommio::spawn_local(async move {
                    let want = expected[d];
                    let mut rng = Rng(0xC0FF_EE00 + d as u64);
                    let mut check = DeviceCheck::default();
                    let mut last_seq = 0;
                    // At most 4 client-side disconnects per device (bounded).
                    let mut cut_budget = 4;
                    while (check.got.len() as u64) < want {
                        let mut conn = match Connection::connect(addr, options(&cfg, &device(d), last_seq)).await {
                            Ok((conn, _)) => conn,
                            // Kicked by the checker before AuthOk arrived.
                            Err(err) if err.code() == Some(ErrorCode::Shutdown) => {
                                check.disconnects += 1;
                                continue;
                            }
                            Err(err) => panic!("chk-{d}: connect failed: {err:?}"),
                        };
                        let cut_after = if cut_budget > 0 { 1 + rng.below(15) } else { u64::MAX };
                        let mut this_conn = 0;
                        loop {
                            match conn.next_event().await {
                                Ok(ClientEvent::Message(m)) => {
                                    let n: u64 = text(&m).parse().unwrap();
                                    let next = check.got.len() as u64;
                                    if n != next {
                                        check.order_violations += 1;
                                    }
                                    if n >= next {
                                        check.got.push(n);
                                    }
                                    last_seq = m.seq;
                                    this_conn += 1;
                                    // Now and then a slow handler: resends, duplicates.
                                    if rng.below(150) == 0 {
                                        glommio::timer::sleep(Duration::from_millis(700)).await;
                                    }
                                    if check.got.len() as u64 == want {
                                        conn.ack_now().await.unwrap();
                                        break;
                                    }
                                    if this_conn == cut_after {
                                        cut_budget -= 1;
                                        check.disconnects += 1;
                                        break; // killed: the socket closes unacked
                                    }
                                }
                                Ok(ClientEvent::ResyncRequired { .. }) => panic!("chk-{d}: nothing may be missing"),
                                Ok(_) => {}
                                Err(ClientError::Kicked { code: ErrorCode::Shutdown, .. }) => {
                                    check.disconnects += 1;
                                    break;
                                }
                                Err(err) => panic!("chk-{d}: {err:?}"),
                            }
                        }
                        check.duplicates += conn.duplicates();
                    }
                    check
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await);
        }
        out
    });
    pusher.join().unwrap();
    let mut lost = 0;
    let mut order = 0;
    let (mut dups, mut disconnects) = (0, 0);
    for (d, c) in checks.iter().enumerate() {
        let want: Vec<u64> = (0..expected[d]).collect();
        if c.got != want {
            lost += expected[d].saturating_sub(c.got.len() as u64);
            eprintln!("chk-{d}: got {:?}", c.got);
        }
        order += c.order_violations;
        dups += c.duplicates;
        disconnects += c.disconnects;
    }
    println!(
        "checker: {DEVICES} devices, {PUSHES} pushes in {:.1} s: lost {lost}, order violations {order}, \
         duplicates removed {dups}, disconnects {disconnects} ({} by the server), resends {}, not stored {}",
        started.elapsed().as_secs_f64(),
        kicks.load(Ordering::Relaxed),
        total(&server, |c| &c.retries),
        rejected.load(Ordering::Relaxed),
    );
    assert_eq!(rejected.load(Ordering::Relaxed), 0);
    assert_eq!((lost, order), (0, 0));
    assert!(disconnects >= 1000, "{disconnects} disconnects");
    assert!(wait_until(WAIT, || total(&server, |c| &c.tracked_devices) == 0), "state left behind");
    server.shutdown();
}

#[test]
fn redis_store_survives_kill_9_of_the_node_and_the_client_resumes() {
    const DEVICES: usize = 8;
    const PUSHES: u64 = 600;
    let redis = RedisServer::start();
    let mut cfg = config();
    cfg.delivery.redis_url = redis.url();
    cfg.delivery.retry_base_ms = 300;
    let node = NodeProcess::start(&cfg);
    let client_addr = Arc::new(Mutex::new(node.client_addr));
    // Set when the clients have everything: the node may go.
    let done = Arc::new(AtomicBool::new(false));
    // Per device: every number attempted, and those the node said STORED.
    type Log = Vec<(Vec<u64>, Vec<u64>)>;
    let pusher = {
        let (client_addr, cfg, done) = (client_addr.clone(), cfg.clone(), done.clone());
        std::thread::spawn(move || -> (Log, u32) {
            let mut log: Log = vec![(Vec::new(), Vec::new()); DEVICES];
            let mut node = node;
            let mut push = backend(node.push_addr);
            let mut restarts = 0;
            let mut counters = [0u64; DEVICES];
            for k in 0..PUSHES {
                let d = (k as usize) % DEVICES;
                if k == PUSHES / 2 {
                    // kill -9 in the middle of the stream, then a new process.
                    let _ = node.child.kill();
                    let _ = node.child.wait();
                    node = NodeProcess::start(&cfg);
                    *client_addr.lock().unwrap() = node.client_addr;
                    push = backend(node.push_addr);
                    restarts += 1;
                }
                let n = counters[d];
                counters[d] += 1;
                log[d].0.push(n);
                match push.push_devices_at_least_once(&[format!("rk-{d}")], Bytes::from(n.to_string())) {
                    Ok(r) if status(r.results[0].status) == PushStatus::Stored => log[d].1.push(n),
                    Ok(r) => panic!("not stored: {r:?}"),
                    Err(e) => panic!("push failed: {e}"),
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            // Keep the node up until the clients are done.
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(node);
            (log, restarts)
        })
    };
    let received: Vec<(Vec<u64>, u64)> = {
        let client_addr = client_addr.clone();
        let cfg = cfg.clone();
        let done = done.clone();
        run(async move {
            let per_device = PUSHES / DEVICES as u64;
            let tasks: Vec<_> = (0..DEVICES)
                .map(|d| {
                    let (client_addr, cfg) = (client_addr.clone(), cfg.clone());
                    glommio::spawn_local(async move {
                        let mut got = Vec::new();
                        let (mut last_seq, mut dups) = (0, 0);
                        let deadline = Instant::now() + Duration::from_secs(60);
                        while (got.len() as u64) < per_device {
                            assert!(Instant::now() < deadline, "rk-{d}: stuck after {got:?}");
                            let addr = *client_addr.lock().unwrap();
                            let Ok((mut conn, _)) =
                                Connection::connect(addr, options(&cfg, &format!("rk-{d}"), last_seq)).await
                            else {
                                glommio::timer::sleep(Duration::from_millis(50)).await;
                                continue;
                            };
                            while let Ok(ev) = conn.next_event().await {
                                if let ClientEvent::Message(m) = ev {
                                    got.push(text(&m).parse::<u64>().unwrap());
                                    last_seq = m.seq;
                                    if got.len() as u64 == per_device {
                                        conn.ack_now().await.unwrap();
                                        break;
                                    }
                                } else if let ClientEvent::ResyncRequired { .. } = ev {
                                    panic!("rk-{d}: Redis kept everything; nothing may be missing");
                                }
                            }
                            dups += conn.duplicates();
                        }
                        (got, dups)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await);
            }
            done.store(true, Ordering::Relaxed);
            out
        })
    };
    let (log, restarts) = pusher.join().unwrap();
    assert_eq!(restarts, 1);
    let mut dups = 0;
    for (d, ((attempted, stored), (got, device_dups))) in log.iter().zip(&received).enumerate() {
        dups += device_dups;
        assert!(got.windows(2).all(|w| w[0] < w[1]), "rk-{d}: out of order: {got:?}");
        for n in stored {
            assert!(got.contains(n), "rk-{d}: STORED message {n} never arrived: {got:?}");
        }
        assert!(got.iter().all(|n| attempted.contains(n)), "rk-{d}: {got:?}");
    }
    println!("redis kill -9: {PUSHES} pushes, 1 restart, every STORED message arrived; {dups} duplicates removed");
    drop(redis);
}
