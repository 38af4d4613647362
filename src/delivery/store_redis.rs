//! The Redis timeline store (cluster mode).
//!
//! Shards never talk to Redis themselves: they hand requests to a sidecar
//! thread over a bounded channel (`try_send`: a full channel sheds the
//! request as [`StoreError::Overloaded`]) and await the answer on a oneshot.
//! The sidecar drains the channel in batches and sends each batch as one
//! pipeline of Lua scripts, so many requests share one round trip.
//!
//! Layout per device (`{device}` is a hash tag, so a device's keys share a
//! slot): `P:seq:{device}` a hash of the last sequence, the floor (lowest
//! retained sequence) and the acknowledged sequence (never expires:
//! sequences are never reused; a missing counter starts at `now_ms * 1000`,
//! above any earlier run), `P:tl:{device}` a sorted set scored by sequence,
//! which expires when idle. `P:msg:<id>` holds a message's status for the status
//! query: it lives as long as the message may stay in its timeline, then
//! `status_ttl_secs` once the message is acknowledged or dropped.
//! `P:incarnation` names the store's contents: made once (SET NX) by the
//! first sidecar to miss it, so a Redis that lost its data gets a new one,
//! with its start time in `P:incarnation:since` (a device without a counter
//! gets nothing below start * 1000, so a resume past that missed nothing);
//! a counter records the sequence it started above (`base`), and the
//! sessions that replayed messages the device did not acknowledge
//! (`replays`, up to sequence `through`). `P:lrn:{device}` holds the
//! device's learned recovery time, with a TTL.
//!
//! Per message: one APPEND script, one plain `HSETNX` when it is first sent,
//! and one ACK script (an ACK covers every message up to its sequence).
//! Redis spends most of an EVALSHA in fixed overhead, so the scripts are
//! short, take few arguments (settings are baked into their text), and the
//! append trims by count only (age and TTL are trimmed on replay).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Receiver;
use redis::Value;

use crate::delivery::store::{
    Appended, ExpiredBy, NewMessage, Replay, Retention, Status, StoreError, StoreFuture, Stored, TimelineStore,
};
use crate::protocol::ids::stable_hash;
use crate::sidecar::redis_link::{self, NotSent, RedisLink, SidecarHandle, as_u64, take_batch};

/// Settings of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisStoreConfig {
    pub url: String,
    /// Key prefix, e.g. "ll".
    pub prefix: String,
    pub retention: Retention,
    /// A timeline untouched this long is deleted (its sequence counter stays).
    pub idle_ttl_secs: u64,
    /// How long a finished message's status stays queryable.
    pub status_ttl_secs: u64,
    pub connect_timeout: Duration,
    pub io_timeout: Duration,
    /// Connections (each with its own sidecar thread). A device's calls
    /// always use the same one, so they stay in order; several let Redis
    /// work on one pipeline while the next is being built.
    pub connections: usize,
}

enum Op {
    Append { device: String, msg: NewMessage, now_ms: u64 },
    Replay { device: String, after: u64, limit: usize, now_ms: u64, resume: bool },
    SetLearned { device: String, learned_ms: Option<u32> },
    CountReplay { device: String, through: u64 },
    Ack { device: String, seq: u64, now_ms: u64 },
    MarkSent { message_id: u64, now_ms: u64 },
    Status { message_id: u64 },
}

enum Answer {
    Appended(Appended),
    Replay(Replay),
    Done,
    Status(Option<Status>),
}

type Job = redis_link::Job<Op, Answer, StoreError>;

/// Handles to the sidecars; cheap to clone into every shard.
#[derive(Clone)]
pub struct RedisStore {
    sidecars: Vec<SidecarHandle<Op, Answer, StoreError>>,
    /// The incarnation last read from Redis (0 until then), for AuthOk.
    incarnation: Arc<AtomicU64>,
}

impl RedisStore {
    /// Starts the sidecar threads. They connect lazily and reconnect on
    /// failure; requests made while Redis is down fail with `Unavailable`.
    pub fn start(cfg: RedisStoreConfig) -> std::io::Result<RedisStore> {
        let mut sidecars = Vec::new();
        let incarnation = Arc::new(AtomicU64::new(0));
        // Known before the first client connects, when Redis is reachable
        // (else the first replay learns it).
        let mut link = RedisLink::new("timeline store", &cfg.url, cfg.connect_timeout, cfg.io_timeout, Vec::new());
        learn_incarnation(&mut link, &cfg.prefix, random_candidate(), &incarnation);
        for i in 0..cfg.connections.max(1) {
            let (sidecar, rx) = SidecarHandle::channel();
            let cfg = cfg.clone();
            let incarnation = incarnation.clone();
            thread::Builder::new()
                .name(format!("longlink-redis-store-{i}"))
                .spawn(move || Sidecar::new(cfg, incarnation).run(rx))?;
            sidecars.push(sidecar);
        }
        Ok(RedisStore { sidecars, incarnation })
    }

    /// Queues `op` on the connection of `route` (a device: its calls stay
    /// in order).
    fn call(&self, route: u64, op: Op) -> StoreFuture<'static, Answer> {
        let sidecar = &self.sidecars[(route % self.sidecars.len() as u64) as usize];
        Box::pin(sidecar.call(op, |e| match e {
            NotSent::Full => StoreError::Overloaded,
            NotSent::Stopped => StoreError::Unavailable("store sidecar stopped".into()),
        }))
    }
}

fn expect<T: 'static>(f: StoreFuture<'static, Answer>, pick: fn(Answer) -> Option<T>) -> StoreFuture<'static, T> {
    Box::pin(async move {
        let answer = f.await?;
        pick(answer).ok_or_else(|| StoreError::Protocol("unexpected answer kind".into()))
    })
}

impl TimelineStore for RedisStore {
    fn append<'a>(&'a self, device: &'a str, msg: NewMessage, now_ms: u64) -> StoreFuture<'a, Appended> {
        let f = self.call(stable_hash(device), Op::Append { device: device.to_owned(), msg, now_ms });
        expect(f, |a| if let Answer::Appended(s) = a { Some(s) } else { None })
    }

    fn replay<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay> {
        let op = Op::Replay { device: device.to_owned(), after: after_seq, limit, now_ms, resume: false };
        expect(self.call(stable_hash(device), op), |a| if let Answer::Replay(r) = a { Some(r) } else { None })
    }

    fn resume<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay> {
        let op = Op::Replay { device: device.to_owned(), after: after_seq, limit, now_ms, resume: true };
        expect(self.call(stable_hash(device), op), |a| if let Answer::Replay(r) = a { Some(r) } else { None })
    }

    fn count_replay<'a>(&'a self, device: &'a str, through_seq: u64) -> StoreFuture<'a, ()> {
        let f = self.call(stable_hash(device), Op::CountReplay { device: device.to_owned(), through: through_seq });
        expect(f, |a| matches!(a, Answer::Done).then_some(()))
    }

    fn set_learned<'a>(&'a self, device: &'a str, learned_ms: Option<u32>, _now_ms: u64) -> StoreFuture<'a, ()> {
        let f = self.call(stable_hash(device), Op::SetLearned { device: device.to_owned(), learned_ms });
        expect(f, |a| matches!(a, Answer::Done).then_some(()))
    }

    fn ack<'a>(&'a self, device: &'a str, seq: u64, now_ms: u64) -> StoreFuture<'a, ()> {
        let f = self.call(stable_hash(device), Op::Ack { device: device.to_owned(), seq, now_ms });
        expect(f, |a| matches!(a, Answer::Done).then_some(()))
    }

    fn mark_sent<'a>(&'a self, device: &'a str, _seq: u64, message_id: u64, now_ms: u64) -> StoreFuture<'a, ()> {
        // On the device's connection: after its append, before its ACK.
        let f = self.call(stable_hash(device), Op::MarkSent { message_id, now_ms });
        expect(f, |a| matches!(a, Answer::Done).then_some(()))
    }

    fn status(&self, message_id: u64) -> StoreFuture<'_, Option<Status>> {
        let f = self.call(message_id, Op::Status { message_id });
        expect(f, |a| if let Answer::Status(s) = a { Some(s) } else { None })
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Relaxed)
    }
}

/// Settings every script needs, baked into the script text when the
/// sidecar starts (fewer arguments to pass and convert per call; Redis
/// spends most of an EVALSHA in fixed overhead). `{MSGP}` and friends are
/// replaced by [`Sidecar::new`]. MSG_TTL: how long a status record lives
/// while its message may still be in a timeline.
const PRELUDE_LUA: &str = r#"
local MAXN, MAXAGE, STATUS_TTL, IDLE_TTL, MSG_TTL = {MAXN}, {MAXAGE}, {STATUS_TTL}, {IDLE_TTL}, {MSG_TTL}
local MAXREPLAYS = {MAXREPLAYS}
local MSGP = '{MSGP}'
local INCARNATION = '{INCK}'
-- The store's incarnation, made once (candidate: a random number of the
-- caller) when Redis has none: a Redis that lost its data gets a new one.
-- Its start time (ms) is kept beside it, set by the first read that finds
-- none: every sequence it issues for a device without a counter yet is above
-- start * 1000, a bound that does not move (a resumed client past it has
-- missed nothing). A start recorded late only widens a reported gap.
-- Returns {incarnation, start}.
local function incarnation(candidate, now)
  local cur = redis.call('GET', INCARNATION)
  if not cur then
    redis.call('SET', INCARNATION, candidate)
    cur = candidate
  end
  local since = redis.call('GET', INCARNATION .. ':since')
  if not since then
    redis.call('SET', INCARNATION .. ':since', now)
    since = now
  end
  return {cur, since}
end
-- Drops the n oldest entries of a timeline, marking them expired (why: 1
-- retention count, 2 age, 3 the push's TTL, 4 replays without an ACK).
local function drop_oldest(tl, seqkey, n, why)
  local gone = redis.call('ZRANGE', tl, 0, n - 1)
  local last
  for _, m in ipairs(gone) do
    local s, mid = string.match(m, '^(%d+):(%d+):')
    redis.call('HSET', MSGP .. mid, 'expired', why)
    redis.call('EXPIRE', MSGP .. mid, STATUS_TTL)
    last = s
  end
  redis.call('ZREMRANGEBYRANK', tl, 0, n - 1)
  if last then redis.call('HSET', seqkey, 'floor', string.format('%.0f', tonumber(last) + 1)) end
end
"#;

/// KEYS: seq, tl, learned. ARGV: id, now, expires_at, service, payload,
/// base_seq, device. Returns {seq, oldest sequence still in the timeline,
/// learned recovery time ('0': none)}. Trims by count only; age and TTL are
/// trimmed when the timeline is read.
const APPEND_LUA: &str = r#"
local seqkey, tl = KEYS[1], KEYS[2]
local learned = redis.call('GET', KEYS[3]) or '0'
local seq = redis.call('HINCRBY', seqkey, 'last', 1)
if seq == 1 then
  -- A new counter (or Redis lost it): start above every earlier run.
  seq = tonumber(ARGV[6]) + 1
  local s = string.format('%.0f', seq)
  redis.call('HSET', seqkey, 'last', s, 'floor', s, 'acked', ARGV[6], 'base', ARGV[6])
end
local s = string.format('%.0f', seq)
redis.call('ZADD', tl, s, s .. ':' .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. #ARGV[4] .. ':' .. ARGV[4] .. ARGV[5])
redis.call('HSET', MSGP .. ARGV[1], 'device', ARGV[7], 'seq', s, 'stored_at', ARGV[2])
redis.call('EXPIRE', MSGP .. ARGV[1], MSG_TTL)
local n = redis.call('ZCARD', tl)
if n == 1 then
  -- A new timeline key: everything before this message was acknowledged
  -- (Redis deletes an empty sorted set) or expired with an idle timeline.
  redis.call('EXPIRE', tl, IDLE_TTL)
  redis.call('HSET', seqkey, 'floor', s)
  return {s, s, learned}
end
if n > MAXN then drop_oldest(tl, seqkey, n - MAXN, 1) end
-- Idle expiry: refreshed once a tenth of it has run down.
if redis.call('TTL', tl) < IDLE_TTL - IDLE_TTL / 10 then redis.call('EXPIRE', tl, IDLE_TTL) end
local first = redis.call('ZRANGE', tl, 0, 0, 'WITHSCORES')
return {s, first[2] or s, learned}
"#;

/// KEYS: seq, tl, learned. ARGV: after, limit, now, incarnation candidate,
/// resume (1: a session starts: expire what was replayed MAXREPLAYS times
/// without an ACK). Returns {counter, floor, acked, incarnation, base,
/// learned, incarnation start ms, members...} ('0' = absent).
const REPLAY_LUA: &str = r#"
local seqkey, tl = KEYS[1], KEYS[2]
local now = tonumber(ARGV[3])
local resume = ARGV[5] == '1' and MAXREPLAYS > 0
local n = redis.call('ZCARD', tl)
if n > MAXN then drop_oldest(tl, seqkey, n - MAXN, 1) end
while true do
  local first = redis.call('ZRANGE', tl, 0, 0)[1]
  if not first then break end
  local _, _, stored, exp = string.match(first, '^(%d+):(%d+):(%d+):(%d+):')
  if tonumber(exp) ~= 0 and now >= tonumber(exp) then
    drop_oldest(tl, seqkey, 1, 3)
  elseif now - tonumber(stored) > MAXAGE then
    drop_oldest(tl, seqkey, 1, 2)
  else
    break
  end
end
if resume then
  local r = redis.call('HMGET', seqkey, 'replays', 'through')
  local through = tonumber(r[2] or '0')
  if tonumber(r[1] or '0') >= MAXREPLAYS and through > tonumber(ARGV[1]) then
    -- Replayed MAXREPLAYS times, never acknowledged: they go.
    local k = redis.call('ZCOUNT', tl, '-inf', through)
    if k > 0 then drop_oldest(tl, seqkey, k, 4) end
    local floor = tonumber(redis.call('HGET', seqkey, 'floor') or '0')
    if floor <= through then redis.call('HSET', seqkey, 'floor', string.format('%.0f', through + 1)) end
    redis.call('HDEL', seqkey, 'replays', 'through')
  end
end
local c = redis.call('HMGET', seqkey, 'last', 'floor', 'acked', 'base')
local inc = incarnation(ARGV[4], ARGV[3])
local out = {c[1] or '0', c[2] or '0', c[3] or '0', inc[1], c[4] or '0', redis.call('GET', KEYS[3]) or '0', inc[2]}
-- No timeline (all acknowledged, or expired when idle): nothing up to the
-- counter can be replayed.
if c[1] and redis.call('EXISTS', tl) == 0 then out[2] = string.format('%.0f', tonumber(c[1]) + 1) end
local members = redis.call('ZRANGEBYSCORE', tl, '(' .. ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(members) do
  local _, _, _, exp = string.match(m, '^(%d+):(%d+):(%d+):(%d+):')
  if tonumber(exp) == 0 or now < tonumber(exp) then table.insert(out, m) end
end
return out
"#;

/// KEYS: seq. ARGV: through. One more session replayed the device's
/// messages up to `through` without an ACK.
const COUNT_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'replays', 1)
local through = tonumber(redis.call('HGET', KEYS[1], 'through') or '0')
if tonumber(ARGV[1]) > through then redis.call('HSET', KEYS[1], 'through', ARGV[1]) end
return 1
"#;

/// KEYS: seq, tl. ARGV: seq, now.
const ACK_LUA: &str = r#"
local seqkey, tl = KEYS[1], KEYS[2]
local acked = redis.call('HGET', seqkey, 'acked')
-- Everything up to an earlier, higher ACK is gone already; no counter: no
-- timeline either.
if not acked or tonumber(ARGV[1]) <= tonumber(acked) then return 1 end
local gone = redis.call('ZRANGEBYSCORE', tl, '-inf', ARGV[1])
for _, m in ipairs(gone) do
  local mid = string.match(m, '^%d+:(%d+):')
  redis.call('HSET', MSGP .. mid, 'acked_at', ARGV[2])
  redis.call('EXPIRE', MSGP .. mid, STATUS_TTL)
end
-- The device acknowledges again: replays count from zero.
redis.call('HDEL', seqkey, 'replays', 'through')
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', tl, '-inf', ARGV[1])
  local last = string.match(gone[#gone], '^(%d+):')
  redis.call('HSET', seqkey, 'acked', ARGV[1], 'floor', string.format('%.0f', tonumber(last) + 1))
else
  redis.call('HSET', seqkey, 'acked', ARGV[1])
end
return 1
"#;

/// Indexes of the scripts in the link.
const APPEND: usize = 0;
const REPLAY: usize = 1;
const ACK: usize = 2;
const COUNT: usize = 3;

struct Sidecar {
    cfg: RedisStoreConfig,
    link: RedisLink,
    /// `P:msg:` (status records).
    msg_prefix: String,
    /// Shared with the store handles: the incarnation last read.
    incarnation: Arc<AtomicU64>,
    /// This sidecar's candidate should Redis have no incarnation.
    candidate: u64,
}

impl Sidecar {
    fn new(cfg: RedisStoreConfig, incarnation: Arc<AtomicU64>) -> Sidecar {
        let msg_prefix = format!("{}:msg:", cfg.prefix);
        let r = &cfg.retention;
        // The prefix goes into a Lua string literal: keep it to safe bytes.
        let quoted = quoted_prefix(&msg_prefix);
        let prelude = PRELUDE_LUA
            .replace("{MAXN}", &r.max_messages.to_string())
            .replace("{MAXAGE}", &r.max_age_ms.to_string())
            .replace("{STATUS_TTL}", &cfg.status_ttl_secs.to_string())
            .replace("{IDLE_TTL}", &cfg.idle_ttl_secs.to_string())
            .replace("{MSG_TTL}", &(cfg.idle_ttl_secs.max(r.max_age_ms / 1000) + cfg.status_ttl_secs).to_string())
            .replace("{MAXREPLAYS}", &r.max_unacked_replays.to_string())
            .replace("{MSGP}", &quoted)
            .replace("{INCK}", &format!("{}:incarnation", quoted_prefix(&cfg.prefix)));
        let script = |body: &str| redis::Script::new(&format!("{prelude}\n{body}"));
        let scripts = vec![script(APPEND_LUA), script(REPLAY_LUA), script(ACK_LUA), script(COUNT_LUA)];
        let link = RedisLink::new("timeline store", &cfg.url, cfg.connect_timeout, cfg.io_timeout, scripts);
        Sidecar { cfg, link, msg_prefix: quoted, incarnation, candidate: random_candidate() }
    }

    fn run(mut self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let batch = take_batch(&rx, first);
            let answers = self.execute(&batch);
            for (job, answer) in batch.into_iter().zip(answers) {
                let _ = job.reply.send(answer);
            }
        }
    }

    fn execute(&mut self, batch: &[Job]) -> Vec<Result<Answer, StoreError>> {
        let pipe = self.pipeline(batch);
        match self.link.query(&pipe) {
            Ok(values) => batch
                .iter()
                .zip(values.into_iter().chain(std::iter::repeat(Value::Nil)))
                .map(|(job, v)| self.answer(&job.op, v))
                .collect(),
            Err(e) => batch.iter().map(|_| Err(StoreError::Unavailable(e.0.clone()))).collect(),
        }
    }

    /// The device's counter hash (last, floor, acked; never expires), its
    /// timeline and its learned recovery time.
    fn keys(&self, device: &str) -> [String; 3] {
        let p = &self.cfg.prefix;
        [format!("{p}:seq:{{{device}}}"), format!("{p}:tl:{{{device}}}"), format!("{p}:lrn:{{{device}}}")]
    }

    /// One command per job, in order.
    fn pipeline(&self, batch: &[Job]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in batch {
            match &job.op {
                Op::Append { device, msg, now_ms } => {
                    let [seq, tl, learned] = self.keys(device);
                    let mut inv = self.link.script(APPEND).prepare_invoke();
                    inv.key(seq).key(tl).key(learned);
                    inv.arg(msg.message_id)
                        .arg(now_ms)
                        .arg(msg.expires_at_ms)
                        .arg(&msg.service_id)
                        .arg(msg.payload.as_ref())
                        .arg(now_ms.saturating_mul(1000))
                        .arg(device);
                    pipe.invoke_script(&inv);
                }
                Op::Replay { device, after, limit, now_ms, resume } => {
                    let [seq, tl, learned] = self.keys(device);
                    let mut inv = self.link.script(REPLAY).prepare_invoke();
                    inv.key(seq).key(tl).key(learned);
                    inv.arg(after).arg(limit).arg(now_ms).arg(self.candidate).arg(u8::from(*resume));
                    pipe.invoke_script(&inv);
                }
                Op::CountReplay { device, through } => {
                    let [seq, _, _] = self.keys(device);
                    let mut inv = self.link.script(COUNT).prepare_invoke();
                    inv.key(seq).arg(through);
                    pipe.invoke_script(&inv);
                }
                Op::SetLearned { device, learned_ms } => {
                    let [_, _, key] = self.keys(device);
                    match learned_ms {
                        Some(ms) => {
                            pipe.cmd("SET").arg(key).arg(ms).arg("PX").arg(self.cfg.retention.learned_ttl_ms.max(1))
                        }
                        None => pipe.cmd("DEL").arg(key),
                    };
                }
                Op::Ack { device, seq, now_ms } => {
                    let [seq_key, tl, _] = self.keys(device);
                    let mut inv = self.link.script(ACK).prepare_invoke();
                    inv.key(seq_key).key(tl).arg(seq).arg(now_ms);
                    pipe.invoke_script(&inv);
                }
                Op::MarkSent { message_id, now_ms } => {
                    // The record outlives the message (see APPEND_LUA), so
                    // this never recreates one without its TTL.
                    pipe.cmd("HSETNX").arg(format!("{}{message_id}", self.msg_prefix)).arg("sent_at").arg(now_ms);
                }
                Op::Status { message_id } => {
                    pipe.cmd("HGETALL").arg(format!("{}{message_id}", self.msg_prefix));
                }
            }
        }
        pipe
    }

    fn answer(&self, op: &Op, value: Value) -> Result<Answer, StoreError> {
        if let Value::ServerError(e) = &value {
            return Err(StoreError::Protocol(format!("{e:?}")));
        }
        let bad = |what: &str| StoreError::Protocol(format!("unexpected reply to {what}: {value:?}"));
        match op {
            Op::Append { .. } => match &value {
                Value::Array(items) => match (items.first().and_then(as_u64), items.get(1).and_then(as_u64)) {
                    (Some(seq), Some(oldest)) => {
                        let learned_ms = learned(items.get(2));
                        Ok(Answer::Appended(Appended { seq, oldest, learned_ms }))
                    }
                    _ => Err(bad("append")),
                },
                _ => Err(bad("append")),
            },
            Op::Ack { .. } | Op::MarkSent { .. } | Op::SetLearned { .. } | Op::CountReplay { .. } => Ok(Answer::Done),
            Op::Replay { after, now_ms, .. } => {
                let Value::Array(items) = &value else { return Err(bad("replay")) };
                let field = |i: usize| items.get(i).and_then(as_u64);
                let (Some(counter), Some(floor), Some(acked), Some(incarnation), Some(base)) =
                    (field(0), field(1), field(2), field(3), field(4))
                else {
                    return Err(bad("replay"));
                };
                self.incarnation.store(incarnation, Ordering::Relaxed);
                let learned_ms = learned(items.get(5));
                // No counter: nothing this incarnation issued for the device,
                // and whatever it issues later starts above its start (or,
                // when that is unknown, above now).
                let start = field(6).filter(|&s| s > 0).map(|s| s.saturating_mul(1000));
                let horizon = start.unwrap_or(now_ms.saturating_mul(1000));
                let mut messages = Vec::new();
                for item in items.iter().skip(7) {
                    messages.push(parse_member(item).ok_or_else(|| bad("replay member"))?);
                }
                let missing = if counter == 0 {
                    // No counter: this device never had at-least-once
                    // messages, or Redis lost them. A client resumed past
                    // the horizon (told of the gap already) missed nothing.
                    (*after > 0 && *after < horizon).then_some((after + 1, horizon))
                } else {
                    // No floor recorded: all of the timeline is gone.
                    let floor = if floor == 0 { counter + 1 } else { floor };
                    let gone_up_to = floor.saturating_sub(1);
                    // A sequence from before this counter was never
                    // acknowledged here: from an earlier life of the store,
                    // the client may have missed what followed it; from this
                    // life (a gap's end it was told of), nothing was issued
                    // between it and the counter's start.
                    let known = if *after > 0 && *after < base {
                        if start.is_some_and(|s| *after >= s) { base.max(acked) } else { *after }
                    } else {
                        (*after).max(acked)
                    };
                    let from = known + 1;
                    (from <= gone_up_to).then_some((from, gone_up_to))
                };
                let base = if counter == 0 { horizon } else { base };
                Ok(Answer::Replay(Replay { messages, missing, incarnation, base, learned_ms }))
            }
            Op::Status { .. } => Ok(Answer::Status(parse_status(&value, self.cfg.retention.max_unacked_replays))),
        }
    }
}

/// A new store incarnation, should Redis have none (never 0).
fn random_candidate() -> u64 {
    let mut seed = [0u8; 8];
    // Without randomness, the time still tells stores apart.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    (getrandom::fill(&mut seed).map_or(now, |()| u64::from_le_bytes(seed)) >> 1).max(1)
}

/// Reads (or makes) the store incarnation into `into`; nothing when Redis
/// cannot be reached.
fn learn_incarnation(link: &mut RedisLink, prefix: &str, candidate: u64, into: &AtomicU64) {
    let key = format!("{}:incarnation", quoted_prefix(prefix));
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(&key).arg(candidate).arg("NX").ignore();
    pipe.cmd("GET").arg(&key);
    if let Ok(values) = link.query(&pipe)
        && let Some(inc) = values.last().and_then(as_u64)
    {
        into.store(inc, Ordering::Relaxed);
    }
}

/// `prefix` kept to the bytes that may go into a Lua string literal.
fn quoted_prefix(prefix: &str) -> String {
    prefix.chars().filter(|c| c.is_ascii_graphic() && *c != '\'' && *c != '\\').collect()
}

/// `seq:id:stored_at:expires_at:service_len:service` then the payload.
fn parse_member(v: &Value) -> Option<Stored> {
    let Value::BulkString(raw) = v else { return None };
    let mut fields = [0u64; 5];
    let mut pos = 0;
    for f in &mut fields {
        let end = pos + raw[pos..].iter().position(|&b| b == b':')?;
        *f = std::str::from_utf8(&raw[pos..end]).ok()?.parse().ok()?;
        pos = end + 1;
    }
    let service_len = usize::try_from(fields[4]).ok()?;
    let service = std::str::from_utf8(raw.get(pos..pos + service_len)?).ok()?.to_owned();
    Some(Stored {
        seq: fields[0],
        message_id: fields[1],
        stored_at_ms: fields[2],
        expires_at_ms: fields[3],
        service_id: service,
        payload: Bytes::copy_from_slice(&raw[pos + service_len..]),
    })
}

/// A learned recovery time as the scripts return it ('0': none).
fn learned(v: Option<&Value>) -> Option<u32> {
    v.and_then(as_u64).and_then(|ms| u32::try_from(ms).ok()).filter(|&ms| ms > 0)
}

/// `replays`: the limit in force, named in the reason of messages that
/// expired unacknowledged.
fn parse_status(v: &Value, replays: u32) -> Option<Status> {
    let Value::Array(items) = v else { return None };
    let get = |name: &str| -> Option<String> {
        items.chunks(2).find_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(val)] if k.as_slice() == name.as_bytes() => {
                String::from_utf8(val.clone()).ok()
            }
            _ => None,
        })
    };
    let device = get("device")?;
    let num = |s: Option<String>| s.and_then(|s| s.parse::<u64>().ok());
    let seq = num(get("seq"))?;
    let stored_at_ms = num(get("stored_at")).unwrap_or(0);
    let sent = num(get("sent_at"));
    let acked = num(get("acked_at"));
    let expired = get("expired").map(|why| match why.as_str() {
        "2" => ExpiredBy::Age,
        "3" => ExpiredBy::Ttl,
        "4" => ExpiredBy::Unacknowledged { replays },
        _ => ExpiredBy::Retention,
    });
    Some(match (expired, sent, acked) {
        (_, sent, Some(acked_at_ms)) => {
            Status::Acked { device, seq, stored_at_ms, sent_at_ms: sent.unwrap_or(acked_at_ms), acked_at_ms }
        }
        (Some(by), _, None) => Status::Expired { device, seq, by },
        (None, Some(sent_at_ms), None) => Status::Sent { device, seq, stored_at_ms, sent_at_ms },
        (None, None, None) => Status::Stored { device, seq, stored_at_ms },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_with_binary_payloads() {
        let mut raw = b"42:99:1000:0:4:chat".to_vec();
        raw.extend_from_slice(&[0, b':', 255]);
        let m = parse_member(&Value::BulkString(raw)).unwrap();
        assert_eq!((m.seq, m.message_id, m.stored_at_ms, m.expires_at_ms), (42, 99, 1000, 0));
        assert_eq!(m.service_id, "chat");
        assert_eq!(&m.payload[..], &[0, b':', 255]);
        assert!(parse_member(&Value::BulkString(b"1:2:3".to_vec())).is_none());
    }
}
