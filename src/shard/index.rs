//! Registration of authenticated sessions: the device and user indexes,
//! the user directory on the user's home shard, replacing older logins.

use super::*;
use crate::protocol::limits::Escaped;

impl ShardCtx<'_> {
    // ---- registration -----------------------------------------------------

    /// Makes `key` the device's session on this shard: replaces an older
    /// login, indexes it, and activates it.
    pub(super) fn register(&mut self, key: ConnKey, now: Now, login: &Login) {
        if let Some(old) = self.st.device_slot(&login.device) {
            let old_key = self.st.key_of(old);
            self.shard.counters.replaced.fetch_add(1, Ordering::Relaxed);
            self.kick(old_key, now, ErrorCode::Replaced, String::new());
        }
        if !self.st.index_device(key, login) {
            return;
        }
        self.shard.counters.active.fetch_add(1, Ordering::Relaxed);
        self.shard.counters.ops.session_up(&login.platform, &login.client_version);
        if self.link_user(key, &login.user) {
            if let Some(conn) = self.st.conn(key) {
                conn.io().awaiting_dir = Some(Box::new(login.clone()));
            }
        } else {
            self.activate(key, now, login);
        }
    }

    /// Sends `AuthOk`: the session is indexed and reachable.
    pub(super) fn activate(&mut self, key: ConnKey, now: Now, login: &Login) {
        let shard = self.shard;
        let ok = proto::AuthOk {
            conn_id: ConnId::new(shard.id, key).0,
            shard: u32::from(shard.id.0),
            node: shard.cfg.node.clone(),
            store_incarnation: shard.store.incarnation(),
            ..Default::default()
        };
        let mut actions = std::mem::take(&mut self.st.actions);
        if let Some(conn) = self.st.conn(key) {
            conn.session.activate(now, login, ok, &shard.live().params, &mut actions);
            let deadline = conn.session.deadline();
            self.st.wheel.insert(key, deadline);
        }
        let (user, device) = (Escaped(&login.user), Escaped(&login.device));
        debug!(shard = %shard.id, conn = %ConnId::new(shard.id, key), %user, %device, "authenticated");
        self.apply(key, now, &mut actions);
        self.st.actions = actions;
        // Hook: stored messages since the client's last sequence follow AuthOk.
        reliable::resume(self, key, now, login);
        // Subscribed backends learn the session is online.
        crate::upstream::conn_event(self, key, ConnectionEventKind::Online, ErrorCode::Unspecified);
        // Hook: cluster mode claims the device's route.
        shard.cluster_on_active(self.st, key, login);
    }

    /// Ends a session with a Kicked frame; it leaves the indexes at once.
    pub(super) fn kick(&mut self, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        let mut actions = Vec::new();
        if let Some(conn) = self.st.conn(key) {
            conn.session.kick(now, code, reason, &self.shard.live().params, &mut actions);
        }
        self.apply(key, now, &mut actions);
    }

    /// Links the session into its user's list. Returns true when the
    /// user's home shard (another shard) must first record this shard in
    /// its directory; it acknowledges with `UserDirAck`.
    pub(super) fn link_user(&mut self, key: ConnKey, user: &str) -> bool {
        let shard = self.shard;
        let Some(hash) = self.st.link_user(key, user) else { return false };
        let home = home_shard(user, shard.shards);
        let remote = home != shard.id;
        let ack = remote.then_some(key);
        shard.route(self.st, home, ShardMsg::UserDir { user_hash: hash, shard: shard.id, present: true, ack });
        remote
    }

    /// Removes slot `slot` from the device, user and group indexes (the
    /// identity stays on the slot for logs until the slot is removed).
    /// `code` says why the session ended (`Unspecified`: the peer left).
    pub(super) fn unindex(&mut self, slot: u32, code: ErrorCode) {
        let shard = self.shard;
        let st = &mut *self.st;
        let Some(conn) = st.conns.get(slot as usize) else { return };
        let (Some(device), Some(user)) = (conn.device(), conn.user()) else { return };
        let (device_hash, user_hash) = (stable_hash(device), stable_hash(user));
        let Ok(entry) = st.devices.find_entry(device_hash, |&i| i == slot) else {
            return; // not indexed (already unindexed, or replaced)
        };
        entry.remove();
        // Hook: cluster mode releases the device's route.
        shard.cluster_on_gone(slot, device, code);
        shard.counters.ops.session_gone(conn.field(3), conn.field(4), code);
        let home = home_shard(user, shard.shards);
        let next = conn.next_of_user;
        let mut user_gone = false;
        match st.users.find_entry(user_hash, |&i| i == slot) {
            Ok(mut head) if next != NO_CONN => *head.get_mut() = next,
            Ok(head) => {
                head.remove();
                user_gone = true;
            }
            Err(_) => {
                // Not the head: unlink from its predecessor.
                let user = user.to_owned();
                let mut cur = st.user_head(&user).unwrap_or(NO_CONN);
                while cur != NO_CONN {
                    let n = st.conns[cur as usize].next_of_user;
                    if n == slot {
                        st.conns[cur as usize].next_of_user = next;
                        break;
                    }
                    cur = n;
                }
            }
        }
        st.conns[slot as usize].next_of_user = NO_CONN;
        st.groups.leave_all(slot);
        // Offline: nothing is resent; the timeline keeps what was not acked.
        st.reliable.forget(slot);
        st.publish_group_counts(&shard.counters);
        shard.counters.active.fetch_sub(1, Ordering::Relaxed);
        if user_gone && !st.hash_in_use(user_hash) {
            shard.route(st, home, ShardMsg::UserDir { user_hash, shard: shard.id, present: false, ack: None });
        }
        // This point is reached once per indexed session, so
        // subscribed backends get exactly one end event for each ONLINE.
        let key = st.key_of(slot);
        if st.conn_ref(key).is_some_and(|c| c.session.was_activated()) {
            let kind =
                if code == ErrorCode::Replaced { ConnectionEventKind::Replaced } else { ConnectionEventKind::Offline };
            crate::upstream::conn_event(self, key, kind, code);
        }
    }
}

impl State {
    /// Gives slot `key` its identity and indexes it by device (an older
    /// session of the device is replaced first); false when the slot is gone.
    pub(super) fn index_device(&mut self, key: ConnKey, login: &Login) -> bool {
        let Some(conn) = self.conn(key) else { return false };
        conn.set_ident(login);
        conn.capabilities = login.capabilities as u8;
        let conns = &self.conns;
        self.devices
            .insert_unique(stable_hash(&login.device), key.index, |&i| slot_device(conns, i).map_or(0, stable_hash));
        true
    }

    /// Links the session into its user's list. Returns the user's hash
    /// when no session of that hash was on this shard before: the user's
    /// home shard must then record this shard in its directory.
    pub(super) fn link_user(&mut self, key: ConnKey, user: &str) -> Option<u64> {
        let slot = key.index;
        let hash = stable_hash(user);
        let conns = &self.conns;
        if let Some(head) = self.users.find_mut(hash, |&i| slot_user(conns, i) == Some(user)) {
            let old_head = std::mem::replace(head, slot);
            self.conns[slot as usize].next_of_user = old_head;
            return None;
        }
        let first_of_hash = !self.hash_in_use(hash);
        self.conns[slot as usize].next_of_user = NO_CONN;
        let conns = &self.conns;
        self.users.insert_unique(hash, slot, |&i| slot_user(conns, i).map_or(0, stable_hash));
        first_of_hash.then_some(hash)
    }

    /// Publishes the group gauges.
    pub(super) fn publish_group_counts(&self, counters: &ShardCounters) {
        counters.groups.store(self.groups.group_count() as u64, Ordering::Relaxed);
        counters.group_sessions.store(self.groups.session_count() as u64, Ordering::Relaxed);
    }
}
