//! The shard's state: the session slab (`Conn`, its lazily allocated
//! `ConnIo`), the device and user indexes, the home shard's user
//! directory, the broadcast queue and the feature components' state.
//! Everything here is owned by one executor and reached through
//! `Shard::state`; nothing in this file does I/O or reads the clock.

use super::*;
/// Outbound queue and input leftovers: allocated only while in use.
#[derive(Default)]
pub(super) struct ConnIo {
    pub(super) out: OutQueue,
    /// When the socket stopped taking our writes (cleared when it drains).
    pub(super) stalled_since: Option<Millis>,
    /// An incomplete frame carried over to the next read.
    pub(super) partial: Vec<u8>,
    /// Set when the session must move to another shard.
    pub(super) handoff: Option<(ShardId, Box<Login>)>,
    /// Registered, waiting for the user's home shard to record it before
    /// `AuthOk` goes out.
    pub(super) awaiting_dir: Option<Box<Login>>,
    /// Listed in the shard's flush list ([`ShardCtx::deliver_batched`]).
    pub(super) in_flush: bool,
    /// WebSocket upgrade, decoder mid-frame, handshake token.
    pub(super) ws: Option<Box<WsState>>,
}

impl ConnIo {
    pub(super) fn is_idle(&self) -> bool {
        self.out.is_empty()
            && self.partial.is_empty()
            && self.handoff.is_none()
            && self.awaiting_dir.is_none()
            && self.ws.as_ref().is_none_or(|ws| ws.is_idle())
    }
}

/// One connection's slot. Every field is paid per connection.
pub(super) struct Conn {
    pub(super) session: Session,
    /// The connection task's waker, to wake it when another task queues
    /// frames or closes it.
    pub(super) waker: Option<Waker>,
    /// user, device, app, platform and client version, concatenated; the
    /// first four lengths are in `lens`. Set once authenticated.
    pub(super) ident: Option<Box<str>>,
    pub(super) io: Option<Box<ConnIo>>,
    pub(super) generation: u32,
    /// Next session of the same user on this shard (intrusive list).
    pub(super) next_of_user: u32,
    /// The socket, for writing to an idle session without waking its task
    /// (see [`crate::conn::fd`]: the task takes it back to close the socket).
    pub(super) fd: SlotFd,
    /// Unix seconds when the session was accepted.
    pub(super) connected_at: u32,
    pub(super) lens: [u8; 4],
    /// Capability bits from Auth (every defined bit fits in a byte).
    pub(super) capabilities: u8,
    /// The write side has been shut down after the final flush.
    pub(super) write_shut: bool,
    /// The transport below framing.
    pub(super) link: Link,
}

impl Conn {
    pub(super) fn io(&mut self) -> &mut ConnIo {
        self.io.get_or_insert_with(Box::default)
    }

    pub(super) fn release_io_if_idle(&mut self) {
        if self.io.as_ref().is_some_and(|io| io.is_idle()) {
            self.io = None;
        }
    }

    pub(super) fn wake(&self) {
        if let Some(w) = &self.waker {
            w.wake_by_ref();
        }
    }

    pub(super) fn set_ident(&mut self, login: &Login) {
        let parts = [&login.user, &login.device, &login.app, &login.platform];
        let mut text = String::with_capacity(parts.iter().map(|p| p.len()).sum::<usize>() + login.client_version.len());
        for (len, part) in self.lens.iter_mut().zip(parts) {
            // Session::on_auth rejects ids longer than MAX_ID_BYTES.
            *len = u8::try_from(part.len()).unwrap_or(u8::MAX);
            text.push_str(&part[..usize::from(*len)]);
        }
        text.push_str(&login.client_version);
        // The token's group patterns follow, each after a NUL (no field
        // holds one): they cost nothing for tokens without them.
        for group in &login.groups {
            text.push('\0');
            text.push_str(group);
        }
        self.ident = Some(text.into_boxed_str());
    }

    /// The group patterns of the session's token.
    pub(super) fn group_claims(&self) -> impl Iterator<Item = &str> {
        let text = self.ident.as_deref().unwrap_or("");
        let tail = text.find('\0').map_or("", |i| &text[i + 1..]);
        tail.split('\0').filter(|g| !g.is_empty())
    }

    /// Field `i` of the identity: 0 user, 1 device, 2 app, 3 platform, 4 version.
    pub(super) fn field(&self, i: usize) -> Option<&str> {
        let text = self.ident.as_deref()?;
        let start: usize = self.lens[..i].iter().map(|&l| usize::from(l)).sum();
        let end = if i < 4 {
            start + usize::from(self.lens[i])
        } else {
            text[start..].find('\0').map_or(text.len(), |n| start + n)
        };
        text.get(start..end)
    }

    pub(super) fn user(&self) -> Option<&str> {
        self.field(0)
    }

    pub(super) fn device(&self) -> Option<&str> {
        self.field(1)
    }

    pub(super) fn is_active(&self) -> bool {
        self.session.phase() == Phase::Active
    }

    /// Whether the client declared it acknowledges messages.
    pub(super) fn acks(&self) -> bool {
        u32::from(self.capabilities) & proto::Capability::Ack as u32 != 0
    }
}

/// A home shard's directory of users: which shards hold sessions of each
/// user, by user hash. One 64-bit word covers 64 shards: shards 0-63 sit
/// in `low`, one word per user as on any node of up to 64 shards; higher
/// shards (hosts with more cores) in `high`, a word only for the users
/// with sessions among those 64.
#[derive(Default)]
pub(super) struct UserDir {
    pub(super) low: HashMap<u64, u64>,
    /// (user hash, word number >= 1) -> shards `64 * word ..` holding sessions.
    pub(super) high: HashMap<(u64, u16), u64>,
}

impl UserDir {
    /// Records that `shard` holds (or no longer holds) sessions of the user.
    pub(super) fn set(&mut self, user_hash: u64, shard: ShardId, present: bool) {
        let (word, bit) = (shard.0 / 64, 1u64 << (shard.0 % 64));
        fn update<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u64>, key: K, bit: u64, present: bool) {
            if present {
                *map.entry(key).or_insert(0) |= bit;
            } else if let Some(mask) = map.get_mut(&key) {
                *mask &= !bit;
                if *mask == 0 {
                    map.remove(&key);
                }
            }
        }
        if word == 0 {
            update(&mut self.low, user_hash, bit, present);
        } else {
            update(&mut self.high, (user_hash, word), bit, present);
        }
    }

    /// The shards (below `shards`) holding sessions of the user.
    pub(super) fn shards(&self, user_hash: u64, shards: u16) -> Vec<ShardId> {
        let mut out = Vec::new();
        for word in 0..shards.div_ceil(64) {
            let mut mask =
                if word == 0 { self.low.get(&user_hash).copied() } else { self.high.get(&(user_hash, word)).copied() }
                    .unwrap_or(0);
            while mask != 0 {
                let bit = mask.trailing_zeros() as u16;
                mask &= mask - 1;
                out.push(ShardId(word * 64 + bit));
            }
        }
        out
    }
}

/// What one queued broadcast costs a shard's queue: its frame and its job.
pub(crate) fn broadcast_cost(frame_len: usize) -> u64 {
    frame_len as u64 + 64
}

/// A broadcast being paced out over this shard's sessions.
pub(super) struct BroadcastJob {
    pub(super) frame: Bytes,
    /// Next slab slot to visit.
    pub(super) cursor: usize,
    /// After this the rest is dropped (and counted as expired).
    pub(super) expires_at: Option<Instant>,
}

/// The shard's mutable state, behind one `RefCell`. Never borrowed across
/// an await.
pub(crate) struct State {
    pub(super) conns: Slab<Conn>,
    /// Slot index by device id (hash of the device string; equality checked
    /// against the slot's identity, so only 4 bytes per entry).
    pub(super) devices: HashTable<u32>,
    /// Head slot of each user's list of sessions on this shard.
    pub(super) users: HashTable<u32>,
    /// Home-shard directory: user hash -> set of shards holding sessions.
    pub(super) user_dir: UserDir,
    pub(super) groups: Groups,
    pub(super) wheel: Wheel,
    pub(super) next_gen: u32,
    /// Reused action buffer.
    pub(super) actions: Vec<Action>,
    pub(super) broadcasts: VecDeque<BroadcastJob>,
    /// Backend connections and their requests ([`crate::push`]).
    pub(crate) port: PushPort,
    /// Sessions with frames queued by a fan-out, in the order they were
    /// queued, for the flusher task ([`ShardCtx::deliver_batched`]).
    pub(super) flush: VecDeque<ConnKey>,
    pub(super) next_token: u64,
    pub(crate) message_ids: MessageIds,
    /// At-least-once delivery of online devices ([`crate::delivery::reliable`]).
    pub(crate) reliable: Reliable,
    /// Requests to service backends and connection events ([`crate::upstream`]).
    pub(crate) upstream: Upstream,
    /// Wire forms of outbound frames, for links other than plain TCP.
    pub(super) wrapper: Wrapper,
    /// Users and devices whose older tokens are refused.
    pub(crate) revoked: crate::revocation::Revocations,
}

impl State {
    pub(super) fn conn(&mut self, key: ConnKey) -> Option<&mut Conn> {
        self.conns.get_mut(key.index as usize).filter(|c| c.generation == key.generation)
    }

    pub(crate) fn key_of(&self, slot: u32) -> ConnKey {
        ConnKey { index: slot, generation: self.conns.get(slot as usize).map_or(0, |c| c.generation) }
    }

    /// What reliable delivery needs to know of session `key`: its device,
    /// whether it is active (AuthOk sent, not closing) and whether it ACKs.
    pub(crate) fn delivery_target(&self, key: ConnKey) -> Option<(&str, bool, bool)> {
        let conn = self.conn_ref(key)?;
        Some((conn.device()?, conn.is_active(), conn.acks()))
    }

    /// Files `key` in the timer wheel for `deadline` (another deadline than
    /// the session's, e.g. a resend).
    pub(crate) fn wake_at(&mut self, key: ConnKey, deadline: Millis) {
        self.wheel.insert(key, deadline);
    }

    pub(crate) fn device_slot(&self, device: &str) -> Option<u32> {
        let conns = &self.conns;
        self.devices.find(stable_hash(device), |&i| slot_device(conns, i) == Some(device)).copied()
    }

    pub(super) fn user_head(&self, user: &str) -> Option<u32> {
        let conns = &self.conns;
        self.users.find(stable_hash(user), |&i| slot_user(conns, i) == Some(user)).copied()
    }

    /// Slots of every session of `user` on this shard.
    pub(crate) fn user_slots(&self, user: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cur = self.user_head(user).unwrap_or(NO_CONN);
        while cur != NO_CONN {
            out.push(cur);
            cur = self.conns.get(cur as usize).map_or(NO_CONN, |c| c.next_of_user);
        }
        out
    }

    /// Whether another user with the same hash has sessions here (64-bit
    /// collisions are possible in principle; the directory keys by hash).
    pub(super) fn hash_in_use(&self, hash: u64) -> bool {
        let conns = &self.conns;
        self.users.iter_hash(hash).any(|&i| slot_user(conns, i).is_some_and(|u| stable_hash(u) == hash))
    }

    pub(crate) fn next_token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    pub(super) fn conn_ref(&self, key: ConnKey) -> Option<&Conn> {
        self.conns.get(key.index as usize).filter(|c| c.generation == key.generation)
    }

    /// The device id of session `key` (once authenticated).
    pub(crate) fn device_of(&self, key: ConnKey) -> Option<&str> {
        self.conn_ref(key).and_then(Conn::device)
    }

    /// Keys of the active sessions (cluster drain).
    pub(crate) fn active_keys(&self) -> Vec<ConnKey> {
        self.conns
            .iter()
            .filter(|(_, c)| c.is_active())
            .map(|(i, c)| ConnKey { index: i as u32, generation: c.generation })
            .collect()
    }

    /// The user of session `key` (once authenticated).
    pub(crate) fn user_of(&self, key: ConnKey) -> Option<&str> {
        self.conn_ref(key).and_then(Conn::user)
    }

    /// Wakes the task of connection `key` (e.g. to read again).
    pub(crate) fn wake_conn(&self, key: ConnKey) {
        if let Some(conn) = self.conn_ref(key) {
            conn.wake();
        }
    }

    /// The common parameters of session `key`, for upstream requests and
    /// connection events. The client address comes from the socket (it is
    /// not kept per connection).
    pub(crate) fn conn_info(&self, here: ShardId, node: &str, key: ConnKey) -> Option<proto::ConnInfo> {
        let conn = self.conn_ref(key)?;
        let field = |i| conn.field(i).unwrap_or_default().to_owned();
        Some(proto::ConnInfo {
            user: field(0),
            device: field(1),
            app: field(2),
            platform: field(3),
            client_version: field(4),
            conn_id: ConnId::new(here, key).0,
            node: node.to_owned(),
            client_addr: fd::peer_addr(conn.fd.get()).map(|a| a.to_string()).unwrap_or_default(),
        })
    }
}

pub(super) fn slot_device(conns: &Slab<Conn>, i: u32) -> Option<&str> {
    conns.get(i as usize).and_then(Conn::device)
}

pub(super) fn slot_user(conns: &Slab<Conn>, i: u32) -> Option<&str> {
    conns.get(i as usize).and_then(Conn::user)
}

#[cfg(test)]
mod tests {
    use super::super::driver::{AcceptBucket, ConnTask};
    use super::*;
    use crate::protocol::limits::MAX_ID_BYTES;
    use crate::session::Params;

    #[test]
    fn ident_packs_fields() {
        let login = Login {
            user: "alice".into(),
            device: "phone-1".into(),
            app: "chat".into(),
            platform: "ios".into(),
            client_version: "2.0.1".into(),
            capabilities: 0,
            last_seq: 0,
            heartbeat_ms: 0,
            store_incarnation: 0,
            groups: vec!["room-*".into(), "vip".into()],
            expires_at: 0,
            issued_at: 0,
        };
        let mut conn = Conn {
            session: Session::new(Millis(0), &test_params()),
            waker: None,
            ident: None,
            io: None,
            generation: 0,
            next_of_user: NO_CONN,
            fd: SlotFd::unused(),
            connected_at: 0,
            lens: [0; 4],
            capabilities: 0,
            write_shut: false,
            link: Link::Plain,
        };
        conn.set_ident(&login);
        let fields: Vec<_> = (0..5).map(|i| conn.field(i).unwrap()).collect();
        assert_eq!(fields, ["alice", "phone-1", "chat", "ios", "2.0.1"]);
        assert_eq!(conn.group_claims().collect::<Vec<_>>(), ["room-*", "vip"]);
    }

    fn test_params() -> Params {
        let key = crate::protocol::token::Key::new("k", vec![1; 32]).unwrap();
        Params {
            keyring: crate::protocol::token::Keyring::new(vec![key], None).unwrap(),
            clock_leeway_secs: 0,
            auth_timeout_ms: 1000,
            heartbeat_min_ms: 1,
            heartbeat_default_ms: 1,
            heartbeat_max_ms: 1,
            idle_timeout_factor: 2,
            close_linger_ms: 1,
            max_id_bytes: MAX_ID_BYTES,
            control: crate::session::ControlBudget::OFF,
        }
    }

    #[test]
    fn accept_bucket_paces() {
        let t0 = Instant::now();
        let mut b = AcceptBucket::new(10);
        for _ in 0..10 {
            assert_eq!(b.take(t0), None);
        }
        let wait = b.take(t0).expect("empty bucket waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert_eq!(AcceptBucket::new(0).take(t0), None);
    }

    #[test]
    fn user_directory_holds_every_shard_of_a_large_host() {
        let mut dir = UserDir::default();
        for shard in [0, 5, 63, 64, 130, 255] {
            dir.set(7, ShardId(shard), true);
        }
        dir.set(8, ShardId(64), true);
        let ids = |v: Vec<ShardId>| v.into_iter().map(|s| s.0).collect::<Vec<_>>();
        assert_eq!(ids(dir.shards(7, 256)), [0, 5, 63, 64, 130, 255]);
        assert_eq!(ids(dir.shards(7, 64)), [0, 5, 63], "a 64-shard node looks at one word");
        for shard in [0, 64, 255] {
            dir.set(7, ShardId(shard), false);
        }
        assert_eq!(ids(dir.shards(7, 256)), [5, 63, 130]);
        assert_eq!(ids(dir.shards(8, 256)), [64]);
        for shard in [5, 63, 130] {
            dir.set(7, ShardId(shard), false);
        }
        dir.set(8, ShardId(64), false);
        assert!(dir.low.is_empty() && dir.high.is_empty(), "nothing left behind");
    }

    #[test]
    fn conn_task_is_small() {
        // Every idle connection holds one.
        assert!(std::mem::size_of::<ConnTask>() <= 160, "{}", std::mem::size_of::<ConnTask>());
    }

    #[test]
    fn conn_slot_is_small() {
        // Each byte here is multiplied by every idle connection.
        assert!(std::mem::size_of::<Conn>() <= 80, "{}", std::mem::size_of::<Conn>());
    }
}
