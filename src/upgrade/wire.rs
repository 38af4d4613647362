//! What the old process tells the new one, and the answers: a versioned
//! hello, the hand-over itself (listeners, sessions, memory-store
//! timelines, as one blob sent in chunks with the fds beside it), and the
//! confirmation. Encoded with [`super::codec`]; every count and length is
//! bounded on decode.

use bytes::Bytes;

use super::codec::{DecodeError, Reader, Writer};
use crate::delivery::store::{StoreImage, Stored, TimelineImage};
use crate::session::Login;

/// The hand-over format. Bump it whenever anything below changes; a new
/// binary refuses a format it does not speak (the old one keeps serving).
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 4] = b"LLUP";

/// Datagram kinds on the hand-over socket.
pub const HELLO: u8 = 1;
pub const HELLO_REPLY: u8 = 2;
pub const CHUNK: u8 = 3;
pub const CONFIRM: u8 = 4;

/// Bytes of blob per chunk datagram (well under the socket buffer).
pub const CHUNK_BYTES: usize = 48 * 1024;
/// Largest datagram either side sends or accepts.
pub const MAX_DATAGRAM: usize = CHUNK_BYTES + 64;
/// Largest hand-over blob a new process accepts.
pub const MAX_BLOB: usize = 4 << 30;
/// Most fds a hand-over may carry (sessions and listeners).
pub const MAX_FDS: usize = 4 << 20;

const MAX_ID: usize = 1024;
const MAX_GROUPS: usize = 4096;
const MAX_QUEUE: usize = 64 << 20;
const MAX_SESSIONS_PER_SHARD: usize = 4 << 20;
const MAX_TIMELINES: usize = 16 << 20;
const MAX_MESSAGES: usize = 1 << 20;
const MAX_PAYLOAD: usize = 64 << 20;

/// The old process's greeting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub format: u32,
    /// The old binary's version, for the logs.
    pub binary: String,
    pub shards: u16,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(HELLO);
        w.buf.extend_from_slice(MAGIC);
        w.u32(self.format);
        w.str(&self.binary);
        w.u16(self.shards);
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<Hello, DecodeError> {
        let mut r = Reader::new(buf);
        expect_kind(&mut r, HELLO)?;
        let magic = [r.u8("magic")?, r.u8("magic")?, r.u8("magic")?, r.u8("magic")?];
        if &magic != MAGIC {
            return Err(DecodeError::Unknown { what: "magic", value: u64::from(u32::from_le_bytes(magic)) });
        }
        let format = r.u32("format")?;
        let binary = r.str("binary version", MAX_ID)?.to_owned();
        let shards = r.u16("shards")?;
        Ok(Hello { format, binary, shards })
    }
}

/// The new process's answer to the hello: go on, or why not.
pub fn encode_reply(kind: u8, outcome: &Result<u32, String>) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(kind);
    match outcome {
        Ok(pid) => {
            w.u8(1);
            w.u32(*pid);
        }
        Err(reason) => {
            w.u8(0);
            w.str(reason);
        }
    }
    w.buf
}

/// Decodes [`encode_reply`]: the new pid (0 for a hello reply), or the
/// reason given.
pub fn decode_reply(kind: u8, buf: &[u8]) -> Result<Result<u32, String>, DecodeError> {
    let mut r = Reader::new(buf);
    expect_kind(&mut r, kind)?;
    Ok(match r.u8("outcome")? {
        1 => Ok(r.u32("pid")?),
        _ => Err(r.str("reason", 64 * 1024)?.to_owned()),
    })
}

fn expect_kind(r: &mut Reader<'_>, kind: u8) -> Result<(), DecodeError> {
    let got = r.u8("kind")?;
    if got != kind {
        return Err(DecodeError::Unknown { what: "message kind", value: u64::from(got) });
    }
    Ok(())
}

/// Which listener an fd is: defined with the listeners ([`crate::conn::listen`]),
/// encoded here.
pub use crate::conn::listen::ListenerKind;

impl ListenerKind {
    fn to_u8(self) -> u8 {
        match self {
            ListenerKind::Client => 0,
            ListenerKind::Push => 1,
            ListenerKind::Admin => 2,
            ListenerKind::Ws => 3,
            ListenerKind::Tls => 4,
            ListenerKind::Wss => 5,
            ListenerKind::PushTls => 6,
        }
    }

    fn from_u8(v: u8) -> Result<ListenerKind, DecodeError> {
        Ok(match v {
            0 => ListenerKind::Client,
            1 => ListenerKind::Push,
            2 => ListenerKind::Admin,
            3 => ListenerKind::Ws,
            4 => ListenerKind::Tls,
            5 => ListenerKind::Wss,
            6 => ListenerKind::PushTls,
            _ => return Err(DecodeError::Unknown { what: "listener kind", value: u64::from(v) }),
        })
    }
}

/// Where a handed-over session was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordPhase {
    /// Connected, no Auth yet.
    Handshaking,
    /// AuthOk sent.
    Active,
    /// Auth verified, not yet registered or activated: the new process
    /// registers it (as an adoption from another shard) and sends AuthOk.
    Authenticated,
}

/// One client session, without its socket (the fd travels beside it).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionRecord {
    /// The shard that takes it in the new process.
    pub shard: u16,
    /// Over WebSocket (after the upgrade), else plain TCP.
    pub ws: bool,
    pub phase: RecordPhase,
    /// Time left until the session's deadline (auth, idle), in ms.
    pub deadline_in_ms: u64,
    pub idle_timeout_ms: u32,
    /// Time left on its token, in ms (`None`: never expires).
    pub expires_in_ms: Option<u64>,
    /// Unix seconds when the client connected.
    pub connected_at: u32,
    /// Who it is (Active, Authenticated).
    pub login: Option<Login>,
    /// Groups it joined.
    pub groups: Vec<String>,
    /// At-least-once delivery in progress: the client's cumulative ACK and
    /// the learned recovery time.
    pub delivery: Option<(u64, Option<u32>)>,
    /// Bytes queued for the client and not yet written, in wire form.
    pub out: Vec<u8>,
    /// An incomplete frame read from the client.
    pub partial: Vec<u8>,
}

/// Everything one shard hands over.
#[derive(Debug, Default)]
pub struct ShardImage {
    pub sessions: Vec<SessionRecord>,
    /// The shard's memory store (embedded default).
    pub store: Option<StoreImage>,
    /// Revoked users and devices, `(is_user, id, not_before)`: a revoked
    /// token must stay refused after an upgrade.
    pub revoked: Vec<(bool, String, i64)>,
}

/// The hand-over blob: listeners, then shards (fds in this order: one per
/// listener, then one per session).
#[derive(Debug, Default)]
pub struct Handover {
    pub listeners: Vec<(ListenerKind, u16)>,
    pub shards: Vec<ShardImage>,
}

impl Handover {
    pub fn fd_count(&self) -> usize {
        self.listeners.len() + self.shards.iter().map(|s| s.sessions.len()).sum::<usize>()
    }

    pub fn encode(&self, w: &mut Writer) {
        w.u32(self.listeners.len() as u32);
        for (kind, shard) in &self.listeners {
            w.u8(kind.to_u8());
            w.u16(*shard);
        }
        w.u16(self.shards.len() as u16);
        for shard in &self.shards {
            match &shard.store {
                Some(store) => {
                    w.u8(1);
                    encode_store(w, store);
                }
                None => w.u8(0),
            }
            w.u32(shard.sessions.len() as u32);
            for s in &shard.sessions {
                encode_session(w, s);
            }
            w.u32(shard.revoked.len() as u32);
            for (is_user, id, not_before) in &shard.revoked {
                w.u8(u8::from(*is_user));
                w.str(id);
                w.u64(*not_before as u64);
            }
        }
    }

    pub fn decode(buf: &[u8], max_shards: u16) -> Result<Handover, DecodeError> {
        let mut r = Reader::new(buf);
        let n = r.count("listeners", 1024, 3)?;
        let mut listeners = Vec::with_capacity(n);
        for _ in 0..n {
            listeners.push((ListenerKind::from_u8(r.u8("listener kind")?)?, r.u16("listener shard")?));
        }
        let shards = r.u16("shards")?;
        if shards > max_shards {
            return Err(DecodeError::TooLong {
                what: "shards",
                len: usize::from(shards),
                max: usize::from(max_shards),
            });
        }
        let mut out = Vec::with_capacity(usize::from(shards));
        for _ in 0..shards {
            let store = match r.u8("store flag")? {
                0 => None,
                _ => Some(decode_store(&mut r)?),
            };
            let n = r.count("sessions", MAX_SESSIONS_PER_SHARD, 32)?;
            let mut sessions = Vec::with_capacity(n);
            for _ in 0..n {
                sessions.push(decode_session(&mut r)?);
            }
            let n = r.count("revocations", MAX_SESSIONS_PER_SHARD, 13)?;
            let mut revoked = Vec::with_capacity(n);
            for _ in 0..n {
                let is_user = r.u8("revocation kind")? != 0;
                let id = r.str("revoked id", MAX_ID)?.to_owned();
                revoked.push((is_user, id, r.u64("not before")? as i64));
            }
            out.push(ShardImage { sessions, store, revoked });
        }
        if !r.is_empty() {
            return Err(DecodeError::Unknown { what: "trailing bytes", value: 0 });
        }
        Ok(Handover { listeners, shards: out })
    }
}

fn encode_session(w: &mut Writer, s: &SessionRecord) {
    w.u16(s.shard);
    w.u8(u8::from(s.ws));
    w.u8(match s.phase {
        RecordPhase::Handshaking => 0,
        RecordPhase::Active => 1,
        RecordPhase::Authenticated => 2,
    });
    w.u64(s.deadline_in_ms);
    w.u32(s.idle_timeout_ms);
    w.u64(s.expires_in_ms.unwrap_or(u64::MAX));
    w.u32(s.connected_at);
    match &s.login {
        Some(l) => {
            w.u8(1);
            for field in [&l.user, &l.device, &l.app, &l.platform, &l.client_version] {
                w.str(field);
            }
            w.u32(l.capabilities);
            w.u64(l.last_seq);
            w.u32(l.heartbeat_ms);
            w.u64(l.store_incarnation);
            w.u64(l.expires_at as u64);
            w.u64(l.issued_at as u64);
            w.u32(l.groups.len() as u32);
            for g in &l.groups {
                w.str(g);
            }
        }
        None => w.u8(0),
    }
    w.u32(s.groups.len() as u32);
    for g in &s.groups {
        w.str(g);
    }
    match s.delivery {
        Some((acked, learned)) => {
            w.u8(1);
            w.u64(acked);
            w.u8(u8::from(learned.is_some()));
            w.u32(learned.unwrap_or(0));
        }
        None => w.u8(0),
    }
    w.bytes(&s.out);
    w.bytes(&s.partial);
}

fn decode_session(r: &mut Reader<'_>) -> Result<SessionRecord, DecodeError> {
    let shard = r.u16("session shard")?;
    let ws = r.u8("session link")? != 0;
    let phase = match r.u8("session phase")? {
        0 => RecordPhase::Handshaking,
        1 => RecordPhase::Active,
        2 => RecordPhase::Authenticated,
        v => return Err(DecodeError::Unknown { what: "session phase", value: u64::from(v) }),
    };
    let deadline_in_ms = r.u64("deadline")?;
    let idle_timeout_ms = r.u32("idle timeout")?;
    let expires_in_ms = Some(r.u64("token expiry")?).filter(|&ms| ms != u64::MAX);
    let connected_at = r.u32("connected at")?;
    let login = match r.u8("login flag")? {
        0 => None,
        _ => {
            let mut field = |what| r.str(what, MAX_ID).map(str::to_owned);
            let (user, device, app, platform, client_version) =
                (field("user")?, field("device")?, field("app")?, field("platform")?, field("client version")?);
            let capabilities = r.u32("capabilities")?;
            let last_seq = r.u64("last seq")?;
            let heartbeat_ms = r.u32("heartbeat")?;
            let store_incarnation = r.u64("incarnation")?;
            // Unix seconds, signed, carried as their two's complement.
            let expires_at = r.u64("token expires at")? as i64;
            let issued_at = r.u64("token issued at")? as i64;
            let groups = strings(r, "token groups")?;
            Some(Login {
                user,
                device,
                app,
                platform,
                client_version,
                capabilities,
                last_seq,
                heartbeat_ms,
                store_incarnation,
                groups,
                expires_at,
                issued_at,
            })
        }
    };
    let groups = strings(r, "groups")?;
    let delivery = match r.u8("delivery flag")? {
        0 => None,
        _ => {
            let acked = r.u64("acked")?;
            let has = r.u8("learned flag")? != 0;
            let learned = r.u32("learned")?;
            Some((acked, has.then_some(learned)))
        }
    };
    let out = r.bytes("queued output", MAX_QUEUE)?.to_vec();
    let partial = r.bytes("partial input", MAX_QUEUE)?.to_vec();
    Ok(SessionRecord {
        shard,
        ws,
        phase,
        deadline_in_ms,
        idle_timeout_ms,
        expires_in_ms,
        connected_at,
        login,
        groups,
        delivery,
        out,
        partial,
    })
}

fn strings(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<String>, DecodeError> {
    let n = r.count(what, MAX_GROUPS, 4)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(r.str(what, MAX_ID)?.to_owned());
    }
    Ok(out)
}

fn encode_store(w: &mut Writer, s: &StoreImage) {
    w.u64(s.base_seq);
    w.u64(s.incarnation);
    w.u64(s.reuse_floor);
    w.u32(s.timelines.len() as u32);
    for t in &s.timelines {
        w.str(&t.device);
        w.u64(t.floor);
        w.u64(t.last);
        w.u64(t.acked);
        w.u32(t.replays);
        w.u64(t.replayed_through);
        let (has, ms, until) = t.learned.map_or((0, 0, 0), |(ms, until)| (1, ms, until));
        w.u8(has);
        w.u32(ms);
        w.u64(until);
        w.u32(t.messages.len() as u32);
        for (m, sent) in &t.messages {
            w.u64(m.seq);
            w.u64(m.message_id);
            w.str(&m.service_id);
            w.bytes(&m.payload);
            w.u64(m.stored_at_ms);
            w.u64(m.expires_at_ms);
            w.u8(u8::from(sent.is_some()));
            w.u64(sent.unwrap_or(0));
        }
    }
}

fn decode_store(r: &mut Reader<'_>) -> Result<StoreImage, DecodeError> {
    let base_seq = r.u64("base seq")?;
    let incarnation = r.u64("incarnation")?;
    let reuse_floor = r.u64("reuse floor")?;
    let n = r.count("timelines", MAX_TIMELINES, 16)?;
    let mut timelines = Vec::with_capacity(n);
    for _ in 0..n {
        let device = r.str("device", MAX_ID)?.to_owned();
        let floor = r.u64("floor")?;
        let last = r.u64("last")?;
        let acked = r.u64("acked")?;
        let replays = r.u32("replays")?;
        let replayed_through = r.u64("replayed through")?;
        let has = r.u8("learned flag")? != 0;
        let ms = r.u32("learned")?;
        let until = r.u64("learned until")?;
        let count = r.count("messages", MAX_MESSAGES, 40)?;
        let mut messages = Vec::with_capacity(count);
        for _ in 0..count {
            let seq = r.u64("seq")?;
            let message_id = r.u64("message id")?;
            let service_id = r.str("service id", MAX_ID)?.to_owned();
            let payload = Bytes::copy_from_slice(r.bytes("payload", MAX_PAYLOAD)?);
            let stored_at_ms = r.u64("stored at")?;
            let expires_at_ms = r.u64("expires at")?;
            let sent_flag = r.u8("sent flag")? != 0;
            let sent = r.u64("sent at")?;
            let stored = Stored { seq, message_id, service_id, payload, stored_at_ms, expires_at_ms };
            messages.push((stored, sent_flag.then_some(sent)));
        }
        timelines.push(TimelineImage {
            device,
            floor,
            last,
            acked,
            replays,
            replayed_through,
            learned: has.then_some((ms, until)),
            messages,
        });
    }
    Ok(StoreImage { base_seq, incarnation, reuse_floor, timelines })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> Login {
        Login {
            user: "u".into(),
            device: "d".into(),
            app: "a".into(),
            platform: "p".into(),
            client_version: "1".into(),
            capabilities: 1,
            last_seq: 9,
            heartbeat_ms: 1000,
            store_incarnation: 5,
            groups: vec!["room-*".into()],
            expires_at: 1_900_000_000,
            issued_at: -5,
        }
    }

    #[test]
    fn a_handover_round_trips() {
        let session = SessionRecord {
            shard: 1,
            ws: true,
            phase: RecordPhase::Active,
            deadline_in_ms: 1234,
            idle_timeout_ms: 3000,
            expires_in_ms: Some(60_000),
            connected_at: 7,
            login: Some(login()),
            groups: vec!["room".into()],
            delivery: Some((42, Some(250))),
            out: b"queued".to_vec(),
            partial: b"par".to_vec(),
        };
        let store = StoreImage {
            base_seq: 100,
            incarnation: 3,
            reuse_floor: 0,
            timelines: vec![TimelineImage {
                device: "d".into(),
                floor: 101,
                last: 102,
                acked: 100,
                replays: 0,
                replayed_through: 0,
                learned: None,
                messages: vec![(
                    Stored {
                        seq: 101,
                        message_id: 77,
                        service_id: "s".into(),
                        payload: Bytes::from_static(b"hi"),
                        stored_at_ms: 1,
                        expires_at_ms: 0,
                    },
                    Some(2),
                )],
            }],
        };
        let h = Handover {
            listeners: vec![(ListenerKind::Client, 0), (ListenerKind::Admin, 0)],
            shards: vec![
                ShardImage::default(),
                ShardImage {
                    sessions: vec![session.clone()],
                    store: Some(store),
                    revoked: vec![(true, "u".into(), 17), (false, "d".into(), -1)],
                },
            ],
        };
        let mut w = Writer::default();
        h.encode(&mut w);
        let back = Handover::decode(&w.buf, 2).unwrap();
        assert_eq!(back.listeners, h.listeners);
        assert_eq!(back.shards[1].sessions, vec![session]);
        assert_eq!(back.shards[1].store.as_ref().unwrap().timelines[0].messages[0].0.message_id, 77);
        assert_eq!(back.shards[1].revoked, vec![(true, "u".into(), 17), (false, "d".into(), -1)]);
        assert_eq!(back.fd_count(), 3);
        // Every prefix is refused cleanly, never a panic or a huge allocation.
        for cut in 0..w.buf.len() {
            assert!(Handover::decode(&w.buf[..cut], 2).is_err(), "prefix {cut}");
        }
        assert!(Handover::decode(&w.buf, 1).is_err(), "more shards than the new node has");
    }

    #[test]
    fn the_hello_names_its_format() {
        let hello = Hello { format: FORMAT_VERSION, binary: "0.1.0".into(), shards: 2 };
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        let mut bad = Hello { format: 1, binary: String::new(), shards: 1 }.encode();
        bad[1] = b'X';
        assert!(Hello::decode(&bad).is_err());
        let reply = encode_reply(HELLO_REPLY, &Err("format 9 not spoken".into()));
        assert_eq!(decode_reply(HELLO_REPLY, &reply), Ok(Err("format 9 not spoken".into())));
        assert!(decode_reply(CONFIRM, &reply).is_err());
    }
}
