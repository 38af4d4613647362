//! The Redis timeline store (cluster mode).
//!
//! Shards never talk to Redis themselves: they hand requests to a sidecar
//! thread over a bounded channel (`try_send`: a full channel sheds the
//! request as [`StoreError::Overloaded`]) and await the answer on a oneshot.
//! The sidecar drains the channel in batches and sends each batch as one
//! pipeline of Lua scripts, so many requests share one round trip.
//!
//! Layout per device (`{device}` is a hash tag, so a device's keys share a
//! slot): `P:seq:{device}` the last sequence (never expires: sequences are
//! never reused; a missing counter starts at `now_ms * 1000`, above any
//! earlier run), `P:tl:{device}` a sorted set scored by sequence, `P:meta:{device}`
//! the floor (lowest retained sequence) and the acknowledged sequence; idle
//! timelines expire. `P:msg:<id>` holds a message's status for the status
//! query, with its own TTL.

use std::thread;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Receiver;
use redis::Value;

use crate::redis_link::{self, NotSent, RedisLink, SidecarHandle, as_u64, take_batch};
use crate::store::{NewMessage, Replay, Retention, Status, StoreError, StoreFuture, Stored, TimelineStore};

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
}

enum Op {
    Append { device: String, msg: NewMessage, now_ms: u64 },
    Replay { device: String, after: u64, limit: usize, now_ms: u64 },
    Ack { device: String, seq: u64, now_ms: u64 },
    MarkSent { device: String, seq: u64, now_ms: u64 },
    Status { message_id: u64 },
}

enum Answer {
    Seq(u64),
    Replay(Replay),
    Done,
    Status(Option<Status>),
}

type Job = redis_link::Job<Op, Answer, StoreError>;

/// A handle to the sidecar; cheap to clone into every shard.
#[derive(Clone)]
pub struct RedisStore {
    sidecar: SidecarHandle<Op, Answer, StoreError>,
}

impl RedisStore {
    /// Starts the sidecar thread. It connects lazily and reconnects on
    /// failure; requests made while Redis is down fail with `Unavailable`.
    pub fn start(cfg: RedisStoreConfig) -> std::io::Result<RedisStore> {
        let (sidecar, rx) = SidecarHandle::channel();
        thread::Builder::new().name("longlink-redis-store".into()).spawn(move || Sidecar::new(cfg).run(rx))?;
        Ok(RedisStore { sidecar })
    }

    fn call(&self, op: Op) -> StoreFuture<'static, Answer> {
        Box::pin(self.sidecar.call(op, |e| match e {
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
    fn append<'a>(&'a self, device: &'a str, msg: NewMessage, now_ms: u64) -> StoreFuture<'a, u64> {
        let f = self.call(Op::Append { device: device.to_owned(), msg, now_ms });
        expect(f, |a| if let Answer::Seq(s) = a { Some(s) } else { None })
    }

    fn replay<'a>(&'a self, device: &'a str, after_seq: u64, limit: usize, now_ms: u64) -> StoreFuture<'a, Replay> {
        let f = self.call(Op::Replay { device: device.to_owned(), after: after_seq, limit, now_ms });
        expect(f, |a| if let Answer::Replay(r) = a { Some(r) } else { None })
    }

    fn ack<'a>(&'a self, device: &'a str, seq: u64, now_ms: u64) -> StoreFuture<'a, ()> {
        let f = self.call(Op::Ack { device: device.to_owned(), seq, now_ms });
        expect(f, |a| matches!(a, Answer::Done).then_some(()))
    }

    fn mark_sent<'a>(&'a self, device: &'a str, seq: u64, now_ms: u64) -> StoreFuture<'a, ()> {
        let f = self.call(Op::MarkSent { device: device.to_owned(), seq, now_ms });
        expect(f, |a| matches!(a, Answer::Done).then_some(()))
    }

    fn status(&self, message_id: u64) -> StoreFuture<'_, Option<Status>> {
        let f = self.call(Op::Status { message_id });
        expect(f, |a| if let Answer::Status(s) = a { Some(s) } else { None })
    }
}

/// Drops timeline entries beyond the count or age limit, marking them
/// expired. Shared by the scripts below.
const TRIM_LUA: &str = r#"
local function trim(tl, meta, now, maxn, maxage, msgp, status_ttl)
  local function drop(m)
    local s, mid = string.match(m, '^(%d+):(%d+):')
    redis.call('ZREMRANGEBYSCORE', tl, s, s)
    redis.call('HSET', meta, 'floor', string.format('%.0f', tonumber(s) + 1))
    redis.call('HSET', msgp .. mid, 'expired', 1)
    redis.call('EXPIRE', msgp .. mid, status_ttl)
  end
  while redis.call('ZCARD', tl) > maxn do
    drop(redis.call('ZRANGE', tl, 0, 0)[1])
  end
  while true do
    local first = redis.call('ZRANGE', tl, 0, 0)[1]
    if not first then break end
    local _, _, stored, exp = string.match(first, '^(%d+):(%d+):(%d+):(%d+):')
    if now - tonumber(stored) > maxage or (tonumber(exp) ~= 0 and now >= tonumber(exp)) then
      drop(first)
    else
      break
    end
  end
end
"#;

/// KEYS: seq, tl, meta. ARGV: id, now, expires_at, service, payload, maxn,
/// maxage, idle_ttl, msg prefix, status_ttl, device, base_seq.
const APPEND_LUA: &str = r#"
local seqkey, tl, meta = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[2])
if redis.call('EXISTS', seqkey) == 0 then
  redis.call('SET', seqkey, ARGV[12])
  redis.call('HSET', meta, 'floor', string.format('%.0f', tonumber(ARGV[12]) + 1), 'acked', ARGV[12])
end
local seq = string.format('%.0f', redis.call('INCR', seqkey))
local member = seq .. ':' .. ARGV[1] .. ':' .. ARGV[2] .. ':' .. ARGV[3] .. ':' .. #ARGV[4] .. ':' .. ARGV[4] .. ARGV[5]
redis.call('ZADD', tl, seq, member)
redis.call('HSET', ARGV[9] .. ARGV[1], 'device', ARGV[11], 'seq', seq, 'stored_at', ARGV[2])
redis.call('EXPIRE', ARGV[9] .. ARGV[1], tonumber(ARGV[10]))
trim(tl, meta, now, tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[9], tonumber(ARGV[10]))
redis.call('EXPIRE', tl, tonumber(ARGV[8]))
redis.call('EXPIRE', meta, tonumber(ARGV[8]))
return seq
"#;

/// KEYS: seq, tl, meta. ARGV: after, limit, now, maxn, maxage, msg prefix,
/// status_ttl. Returns {counter, floor, acked, members...} ('0' = absent).
const REPLAY_LUA: &str = r#"
local seqkey, tl, meta = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[3])
trim(tl, meta, now, tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7]))
local out = {redis.call('GET', seqkey) or '0', redis.call('HGET', meta, 'floor') or '0', redis.call('HGET', meta, 'acked') or '0'}
local members = redis.call('ZRANGEBYSCORE', tl, '(' .. ARGV[1], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(members) do
  local _, _, _, exp = string.match(m, '^(%d+):(%d+):(%d+):(%d+):')
  if tonumber(exp) == 0 or now < tonumber(exp) then table.insert(out, m) end
end
return out
"#;

/// KEYS: tl, meta. ARGV: seq, now, msg prefix, status_ttl.
const ACK_LUA: &str = r#"
local tl, meta = KEYS[1], KEYS[2]
local acked = redis.call('HGET', meta, 'acked')
if not acked or tonumber(ARGV[1]) > tonumber(acked) then redis.call('HSET', meta, 'acked', ARGV[1]) end
local gone = redis.call('ZRANGEBYSCORE', tl, '-inf', ARGV[1])
for _, m in ipairs(gone) do
  local s, mid = string.match(m, '^(%d+):(%d+):')
  redis.call('HSET', ARGV[3] .. mid, 'acked_at', ARGV[2])
  redis.call('HSETNX', ARGV[3] .. mid, 'sent_at', ARGV[2])
  redis.call('EXPIRE', ARGV[3] .. mid, tonumber(ARGV[4]))
  redis.call('HSET', meta, 'floor', string.format('%.0f', tonumber(s) + 1))
end
redis.call('ZREMRANGEBYSCORE', tl, '-inf', ARGV[1])
return 1
"#;

/// KEYS: tl. ARGV: seq, now, msg prefix.
const MARK_SENT_LUA: &str = r#"
local m = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], ARGV[1])[1]
if m then
  local _, mid = string.match(m, '^(%d+):(%d+):')
  redis.call('HSETNX', ARGV[3] .. mid, 'sent_at', ARGV[2])
end
return 1
"#;

/// Indexes of the scripts in the link.
const APPEND: usize = 0;
const REPLAY: usize = 1;
const ACK: usize = 2;
const MARK_SENT: usize = 3;

struct Sidecar {
    cfg: RedisStoreConfig,
    link: RedisLink,
}

impl Sidecar {
    fn new(cfg: RedisStoreConfig) -> Sidecar {
        let with_trim = |body: &str| redis::Script::new(&format!("{TRIM_LUA}\n{body}"));
        let scripts = vec![
            with_trim(APPEND_LUA),
            with_trim(REPLAY_LUA),
            redis::Script::new(ACK_LUA),
            redis::Script::new(MARK_SENT_LUA),
        ];
        let link = RedisLink::new("timeline store", &cfg.url, cfg.connect_timeout, cfg.io_timeout, scripts);
        Sidecar { cfg, link }
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

    fn keys(&self, device: &str) -> [String; 3] {
        let p = &self.cfg.prefix;
        [format!("{p}:seq:{{{device}}}"), format!("{p}:tl:{{{device}}}"), format!("{p}:meta:{{{device}}}")]
    }

    fn msg_prefix(&self) -> String {
        format!("{}:msg:", self.cfg.prefix)
    }

    fn pipeline(&self, batch: &[Job]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let r = &self.cfg.retention;
        let msgp = self.msg_prefix();
        for job in batch {
            match &job.op {
                Op::Append { device, msg, now_ms } => {
                    let [seq, tl, meta] = self.keys(device);
                    let mut inv = self.link.script(APPEND).prepare_invoke();
                    inv.key(seq).key(tl).key(meta);
                    inv.arg(msg.message_id)
                        .arg(now_ms)
                        .arg(msg.expires_at_ms)
                        .arg(&msg.service_id)
                        .arg(msg.payload.as_ref())
                        .arg(r.max_messages)
                        .arg(r.max_age_ms)
                        .arg(self.cfg.idle_ttl_secs)
                        .arg(&msgp)
                        .arg(self.cfg.status_ttl_secs)
                        .arg(device)
                        .arg(now_ms.saturating_mul(1000));
                    pipe.invoke_script(&inv);
                }
                Op::Replay { device, after, limit, now_ms } => {
                    let [seq, tl, meta] = self.keys(device);
                    let mut inv = self.link.script(REPLAY).prepare_invoke();
                    inv.key(seq).key(tl).key(meta);
                    inv.arg(after).arg(limit).arg(now_ms).arg(r.max_messages).arg(r.max_age_ms).arg(&msgp);
                    inv.arg(self.cfg.status_ttl_secs);
                    pipe.invoke_script(&inv);
                }
                Op::Ack { device, seq, now_ms } => {
                    let [_, tl, meta] = self.keys(device);
                    let mut inv = self.link.script(ACK).prepare_invoke();
                    inv.key(tl).key(meta).arg(seq).arg(now_ms).arg(&msgp).arg(self.cfg.status_ttl_secs);
                    pipe.invoke_script(&inv);
                }
                Op::MarkSent { device, seq, now_ms } => {
                    let [_, tl, _] = self.keys(device);
                    let mut inv = self.link.script(MARK_SENT).prepare_invoke();
                    inv.key(tl).arg(seq).arg(now_ms).arg(&msgp);
                    pipe.invoke_script(&inv);
                }
                Op::Status { message_id } => {
                    pipe.cmd("HGETALL").arg(format!("{msgp}{message_id}"));
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
            Op::Append { .. } => as_u64(&value).map(Answer::Seq).ok_or_else(|| bad("append")),
            Op::Ack { .. } | Op::MarkSent { .. } => Ok(Answer::Done),
            Op::Replay { after, now_ms, .. } => {
                let Value::Array(items) = &value else { return Err(bad("replay")) };
                let (Some(counter), Some(floor), Some(acked)) =
                    (items.first().and_then(as_u64), items.get(1).and_then(as_u64), items.get(2).and_then(as_u64))
                else {
                    return Err(bad("replay"));
                };
                let mut messages = Vec::new();
                for item in &items[3..] {
                    messages.push(parse_member(item).ok_or_else(|| bad("replay member"))?);
                }
                let missing = if counter == 0 {
                    // No counter: this device never had at-least-once
                    // messages, or Redis lost them.
                    (*after > 0).then_some((after + 1, now_ms.saturating_mul(1000)))
                } else {
                    // An idle timeline expired with its meta: all of it is gone.
                    let floor = if floor == 0 { counter + 1 } else { floor };
                    let gone_up_to = floor.saturating_sub(1);
                    let from = (*after).max(acked) + 1;
                    (from <= gone_up_to).then_some((from, gone_up_to))
                };
                Ok(Answer::Replay(Replay { messages, missing }))
            }
            Op::Status { .. } => Ok(Answer::Status(parse_status(&value))),
        }
    }
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

fn parse_status(v: &Value) -> Option<Status> {
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
    Some(match (get("expired").is_some(), sent, acked) {
        (_, sent, Some(acked_at_ms)) => {
            Status::Acked { device, seq, stored_at_ms, sent_at_ms: sent.unwrap_or(acked_at_ms), acked_at_ms }
        }
        (true, _, None) => Status::Expired { device, seq },
        (false, Some(sent_at_ms), None) => Status::Sent { device, seq, stored_at_ms, sent_at_ms },
        (false, None, None) => Status::Stored { device, seq, stored_at_ms },
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
