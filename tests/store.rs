//! The timeline store contract, checked against both implementations: the
//! embedded memory store and the Redis store (a real redis-server).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{RedisServer, wait_until};
use futures_lite::future::block_on;
use longlink::delivery::store::{ExpiredBy, MemoryStore, NewMessage, Retention, Status, TimelineStore};
use longlink::delivery::store_redis::{RedisStore, RedisStoreConfig};

const NOW: u64 = 1_800_000_000_000;

fn msg(id: u64) -> NewMessage {
    NewMessage { message_id: id, service_id: "chat".into(), payload: Bytes::from(format!("m{id}")), expires_at_ms: 0 }
}

fn redis_store(redis: &RedisServer, retention: Retention) -> RedisStore {
    RedisStore::start(RedisStoreConfig {
        url: redis.url(),
        prefix: "lltest".into(),
        retention,
        idle_ttl_secs: 3600,
        status_ttl_secs: 3600,
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(2),
        connections: 2,
    })
    .expect("sidecar starts")
}

/// Runs `check` against a fresh memory store and a fresh Redis store.
fn both(retention: Retention, check: impl Fn(&dyn TimelineStore, &str)) {
    check(&MemoryStore::new(retention, NOW), "memory");
    let redis = RedisServer::start();
    check(&redis_store(&redis, retention), "redis");
}

#[test]
fn append_replay_ack_and_status() {
    both(Retention::default(), |s, name| {
        let seqs: Vec<u64> = (1..=5).map(|i| block_on(s.append("d", msg(i), NOW)).unwrap().seq).collect();
        assert_eq!(seqs[0], NOW * 1000 + 1, "{name}: sequences start above earlier runs");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{name}: {seqs:?}");
        let r = block_on(s.replay("d", seqs[1], 10, NOW)).unwrap();
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), &seqs[2..], "{name}");
        assert_eq!(r.messages[0].payload, Bytes::from_static(b"m3"), "{name}");
        assert_eq!(r.messages[0].service_id, "chat");
        assert_eq!(r.missing, None, "{name}");

        assert!(matches!(block_on(s.status(4)).unwrap(), Some(Status::Stored { .. })), "{name}");
        block_on(s.mark_sent("d", seqs[3], 4, NOW + 1)).unwrap();
        assert!(
            matches!(block_on(s.status(4)).unwrap(), Some(Status::Sent { sent_at_ms: 1_800_000_000_001, .. })),
            "{name}"
        );
        block_on(s.ack("d", seqs[3], NOW + 2)).unwrap();
        let r = block_on(s.replay("d", seqs[3], 10, NOW + 3)).unwrap();
        assert_eq!(r.messages.len(), 1, "{name}");
        assert_eq!(r.missing, None, "{name}: acknowledged messages are not missing");
        assert!(
            matches!(block_on(s.status(4)).unwrap(), Some(Status::Acked { acked_at_ms: 1_800_000_000_002, .. })),
            "{name}"
        );
        assert_eq!(block_on(s.status(999)).unwrap(), None, "{name}");
        // Other devices have their own sequences.
        let e = block_on(s.append("e", msg(6), NOW)).unwrap();
        assert_eq!((e.seq, e.oldest), (NOW * 1000 + 1, NOW * 1000 + 1), "{name}");
        // "d" still holds seqs[4]: a new message there is not the oldest.
        let d = block_on(s.append("d", msg(7), NOW + 4)).unwrap();
        assert_eq!((d.seq, d.oldest), (seqs[4] + 1, seqs[4]), "{name}");
    });
}

#[test]
fn retention_overflow_is_reported_as_a_missing_range() {
    let retention = Retention { max_messages: 3, ..Default::default() };
    both(retention, |s, name| {
        let seqs: Vec<u64> = (1..=6).map(|i| block_on(s.append("d", msg(i), NOW)).unwrap().seq).collect();
        let r = block_on(s.replay("d", seqs[0], 10, NOW)).unwrap();
        assert_eq!(r.missing, Some((seqs[1], seqs[2])), "{name}");
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), &seqs[3..], "{name}");
        assert!(matches!(block_on(s.status(2)).unwrap(), Some(Status::Expired { .. })), "{name}");
    });
}

#[test]
fn unknown_history_is_reported_not_silently_skipped() {
    both(Retention::default(), |s, name| {
        // A client that processed sequence 42 of a timeline this store does
        // not have (a restarted memory store, a flushed Redis).
        let r = block_on(s.replay("d", 42, 10, NOW)).unwrap();
        assert_eq!(r.missing, Some((43, NOW * 1000)), "{name}");
        assert_eq!(block_on(s.replay("fresh", 0, 10, NOW)).unwrap().missing, None, "{name}");
    });
}

#[test]
fn the_incarnation_names_the_contents_and_base_bounds_what_a_resume_may_have_missed() {
    both(Retention::default(), |s, name| {
        let r = block_on(s.replay("d", 0, 10, NOW)).unwrap();
        assert!(r.incarnation != 0 && r.incarnation == s.incarnation(), "{name}: {r:?}");
        assert_eq!(r.base, NOW * 1000, "{name}: nothing issued yet for the device");
        let first = block_on(s.append("d", msg(1), NOW + 7)).unwrap().seq;
        let r = block_on(s.replay("d", 0, 10, NOW + 8)).unwrap();
        assert!(r.base < first && r.base >= NOW * 1000, "{name}: {} < {first}", r.base);
        // A sequence of an earlier life of the store: the gap up to this
        // one's first sequence is reported even with a timeline here now.
        let r = block_on(s.replay("d", 42, 10, NOW + 8)).unwrap();
        assert_eq!((r.missing, r.messages.len()), (Some((43, first - 1)), 1), "{name}");
    });
    // Redis loses its data: a new incarnation.
    let redis = RedisServer::start();
    let store = redis_store(&redis, Retention::default());
    let before = block_on(store.replay("d", 0, 10, NOW)).unwrap().incarnation;
    let mut conn = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
    let after = block_on(store.replay("d", 0, 10, NOW)).unwrap().incarnation;
    assert!(after != before && after != 0);
    assert_eq!(store.incarnation(), after, "AuthOk names the new one from now on");
}

#[test]
fn replays_without_an_ack_expire_after_the_limit_and_an_ack_starts_over() {
    let retention = Retention { max_unacked_replays: 2, ..Default::default() };
    both(retention, |s, name| {
        let seqs: Vec<u64> = (1..=4).map(|i| block_on(s.append("d", msg(i), NOW)).unwrap().seq).collect();
        // A session cut before any resend does not count.
        assert_eq!(block_on(s.resume("d", 0, 3, NOW)).unwrap().messages.len(), 3, "{name}");
        // Two sessions replay the first three (their window) and keep them
        // unacknowledged past a resend.
        for _ in 0..2 {
            let r = block_on(s.resume("d", 0, 3, NOW)).unwrap();
            assert_eq!((r.messages.len(), r.missing), (3, None), "{name}");
            block_on(s.count_replay("d", seqs[2])).unwrap();
        }
        // The next session: those three expire, reported missing; the
        // fourth message (never sent) goes out.
        let r = block_on(s.resume("d", 0, 3, NOW)).unwrap();
        assert_eq!(r.missing, Some((seqs[0], seqs[2])), "{name}");
        assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [seqs[3]], "{name}");
        let Some(Status::Expired { by, .. }) = block_on(s.status(1)).unwrap() else { panic!("{name}: not expired") };
        assert_eq!(by, ExpiredBy::Unacknowledged { replays: 2 }, "{name}");
        assert_eq!(by.to_string(), "not acknowledged after 2 replays to the device");
        // An ACK starts the count over: two more sessions may replay.
        let more: Vec<u64> = (5..=6).map(|i| block_on(s.append("d", msg(i), NOW)).unwrap().seq).collect();
        block_on(s.count_replay("d", seqs[3])).unwrap();
        block_on(s.ack("d", seqs[3], NOW)).unwrap();
        for _ in 0..2 {
            let r = block_on(s.resume("d", seqs[3], 10, NOW)).unwrap();
            let got: Vec<u64> = r.messages.iter().map(|m| m.seq).collect();
            assert_eq!((r.missing, got), (None, more.clone()), "{name}");
            block_on(s.count_replay("d", more[1])).unwrap();
        }
    });
}

#[test]
fn the_learned_recovery_time_is_kept_per_device_until_its_ttl() {
    let retention = Retention { learned_ttl_ms: 60_000, ..Default::default() };
    both(retention, |s, name| {
        let first = block_on(s.append("d", msg(1), NOW)).unwrap();
        assert_eq!(first.learned_ms, None, "{name}");
        block_on(s.set_learned("d", Some(2_500), NOW)).unwrap();
        assert_eq!(block_on(s.append("d", msg(2), NOW + 1)).unwrap().learned_ms, Some(2_500), "{name}");
        assert_eq!(block_on(s.replay("d", 0, 10, NOW + 2)).unwrap().learned_ms, Some(2_500), "{name}");
        assert_eq!(block_on(s.append("e", msg(3), NOW)).unwrap().learned_ms, None, "{name}: per device");
        block_on(s.set_learned("d", None, NOW + 3)).unwrap();
        assert_eq!(block_on(s.replay("d", 0, 10, NOW + 4)).unwrap().learned_ms, None, "{name}: forgotten");
    });
    // It ends with its TTL (memory: by the clock passed in; Redis: PX).
    let s = MemoryStore::new(retention, NOW);
    block_on(s.append("d", msg(1), NOW)).unwrap();
    block_on(s.set_learned("d", Some(900), NOW)).unwrap();
    assert_eq!(block_on(s.replay("d", 0, 1, NOW + 59_999)).unwrap().learned_ms, Some(900));
    assert_eq!(block_on(s.replay("d", 0, 1, NOW + 60_000)).unwrap().learned_ms, None);
    let redis = RedisServer::start();
    let store = redis_store(&redis, Retention { learned_ttl_ms: 300, ..Default::default() });
    block_on(store.set_learned("d", Some(900), NOW)).unwrap();
    assert!(redis.exists("lltest:lrn:{d}"));
    assert!(wait_until(Duration::from_secs(10), || !redis.exists("lltest:lrn:{d}")), "the TTL ends it");
}

#[test]
fn message_ttl_and_age_expire() {
    let retention = Retention { max_age_ms: 1_000, ..Default::default() };
    both(retention, |s, name| {
        let mut short = msg(1);
        short.expires_at_ms = NOW + 100;
        let first = block_on(s.append("d", short, NOW)).unwrap().seq;
        block_on(s.append("d", msg(2), NOW)).unwrap();
        let r = block_on(s.replay("d", 0, 10, NOW + 200)).unwrap();
        assert_eq!(r.messages.len(), 1, "{name}");
        assert_eq!(r.missing, Some((first, first)), "{name}");
        assert!(block_on(s.replay("d", 0, 10, NOW + 5_000)).unwrap().messages.is_empty(), "{name}");
    });
}

#[test]
fn an_idle_timeline_that_expired_is_reported_missing() {
    let redis = RedisServer::start();
    let store = RedisStore::start(RedisStoreConfig {
        url: redis.url(),
        prefix: "lltest".into(),
        retention: Retention::default(),
        idle_ttl_secs: 1,
        status_ttl_secs: 3600,
        connect_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(2),
        connections: 1,
    })
    .expect("sidecar starts");
    let seqs: Vec<u64> = (1..=3).map(|i| block_on(store.append("d", msg(i), NOW)).unwrap().seq).collect();
    block_on(store.ack("d", seqs[0], NOW)).unwrap();
    // The timeline expires after a second untouched; its counter stays.
    assert!(wait_until(Duration::from_secs(10), || !redis.exists("lltest:tl:{d}")), "the idle timeline expires");
    // A new message starts a new timeline before anyone reads the old one.
    let next = block_on(store.append("d", msg(4), NOW)).unwrap();
    assert_eq!((next.seq, next.oldest), (seqs[2] + 1, seqs[2] + 1), "sequences continue above the lost ones");
    let r = block_on(store.replay("d", seqs[0], 10, NOW)).unwrap();
    assert_eq!(r.missing, Some((seqs[1], seqs[2])));
    assert_eq!(r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [next.seq]);
    // With nothing appended after the expiry, the gap is reported too.
    let seqs: Vec<u64> = (5..=6).map(|i| block_on(store.append("e", msg(i), NOW)).unwrap().seq).collect();
    assert!(wait_until(Duration::from_secs(10), || !redis.exists("lltest:tl:{e}")), "the idle timeline expires");
    let r = block_on(store.replay("e", 0, 10, NOW)).unwrap();
    assert_eq!((r.messages.len(), r.missing), (0, Some((seqs[0], seqs[1]))));
}

#[test]
fn redis_down_gives_retryable_errors_and_recovers() {
    let redis = RedisServer::start();
    let port = redis.port;
    let store = redis_store(&redis, Retention::default());
    assert!(block_on(store.append("d", msg(1), NOW)).is_ok());
    drop(redis);
    let err = block_on(store.append("d", msg(2), NOW)).unwrap_err();
    assert!(matches!(err, longlink::delivery::store::StoreError::Unavailable(_)), "{err:?}");
    // A new redis-server on the same port: the sidecar reconnects and
    // reloads its scripts. (Data is gone, so sequences restart above NOW.)
    let _again = RedisServer::start_on(port);
    assert!(wait_until(Duration::from_secs(10), || block_on(store.append("d", msg(3), NOW + 5)).is_ok()));
}
