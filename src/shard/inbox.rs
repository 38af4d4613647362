//! Messages from other shards (the mesh): adoptions, deliveries, user
//! directory updates, presence, group and kick requests.

use super::*;

impl ShardCtx<'_> {
    /// Every message but `Adopt` (which needs to spawn a task).
    pub(super) fn handle(&mut self, msg: ShardMsg) {
        let now = self.shard.now();
        match msg {
            ShardMsg::Adopt(_) => {}
            ShardMsg::StoreDevices { origin, items, msg } => reliable::store_copies(self, now, origin, items, msg),
            ShardMsg::DeliveryStatus { origin, ids } => reliable::status_part(self, origin, ids),
            ShardMsg::Users { origin, items, action: UserAction::Store(msg) } => {
                let mut copies = Vec::new();
                for (idx, user) in items {
                    let before = copies.len();
                    for slot in self.st.user_slots(&user) {
                        let Some(device) = slot_device(&self.st.conns, slot).map(str::to_owned) else { continue };
                        let message_id = self.shard.next_message_id(self.st);
                        copies.push((idx, device, message_id));
                    }
                    if copies.len() == before {
                        // No session left here: answered with no copy.
                        copies.push((idx, String::new(), 0));
                    }
                }
                reliable::store_copies(self, now, origin, copies, msg);
            }
            ShardMsg::Devices { origin, items, frame } => {
                let reached = items
                    .iter()
                    .map(|(idx, device)| {
                        let slot = self.st.device_slot(device);
                        (*idx, u32::from(slot.is_some_and(|slot| self.deliver(slot, &frame))))
                    })
                    .collect();
                self.shard.answer(self.st, origin, Part::Sessions(reached));
            }
            ShardMsg::UserLookup { origin, items, action } => {
                let mut per_shard: Vec<Vec<(u32, String)>> = vec![Vec::new(); usize::from(self.shard.shards)];
                let mut targets = Vec::with_capacity(items.len());
                for (idx, user) in items {
                    let mut holders = 0;
                    for shard in self.st.user_dir.shards(stable_hash(&user), self.shard.shards) {
                        if let Some(batch) = per_shard.get_mut(shard.index()) {
                            batch.push((idx, user.clone()));
                            holders += 1;
                        }
                    }
                    targets.push((idx, holders));
                }
                let parts = per_shard.iter().filter(|b| !b.is_empty()).count() as u32;
                self.shard.answer(self.st, origin, Part::Expect { parts, targets });
                for (shard, items) in per_shard.into_iter().enumerate() {
                    if !items.is_empty() {
                        let msg = ShardMsg::Users { origin, items, action: action.clone() };
                        self.shard.route(self.st, ShardId(shard as u16), msg);
                    }
                }
            }
            ShardMsg::Users { origin, items, action } => {
                let mut reached = Vec::new();
                for (idx, user) in items {
                    let mut n = 0;
                    for slot in self.st.user_slots(&user) {
                        let ok = match &action {
                            UserAction::Deliver(frame) => self.deliver(slot, frame),
                            UserAction::Kick { code, reason } => {
                                let key = self.st.key_of(slot);
                                self.kick(key, now, *code, reason.clone());
                                true
                            }
                            // Handled above; nothing reaches here.
                            UserAction::Store(_) => false,
                        };
                        n += u32::from(ok);
                    }
                    reached.push((idx, n));
                }
                self.shard.answer(self.st, origin, Part::Sessions(reached));
            }
            ShardMsg::Group { origin, group, frame } => {
                // A shard-local copy: the refcount of a shared buffer would
                // bounce between cores on every member.
                let frame = if origin.shard == self.shard.id { frame } else { Bytes::copy_from_slice(&frame) };
                let members: Vec<u32> = self.st.groups.members(&group).collect();
                let reached = if members.len() <= INLINE_FANOUT && self.st.flush.is_empty() {
                    members.into_iter().filter(|&slot| self.deliver(slot, &frame)).count()
                } else {
                    let n = members.into_iter().filter(|&slot| self.deliver_batched(slot, &frame)).count();
                    self.shard.kick_flusher(self.st);
                    n
                };
                self.shard.answer(self.st, origin, Part::Count(reached as u64));
            }
            ShardMsg::Broadcast { origin, frame, expires_at } => {
                let frame = if origin.shard == self.shard.id { frame } else { Bytes::copy_from_slice(&frame) };
                let targeted = self.st.conns.iter().filter(|(_, c)| c.is_active()).count();
                self.st.broadcasts.push_back(BroadcastJob { frame, cursor: 0, expires_at });
                self.shard.answer(self.st, origin, Part::Count(targeted as u64));
                if !self.shard.pacing.get() {
                    let _ = self.shard.pacer_wake.try_send(());
                }
            }
            ShardMsg::GroupUpdate { origin, group, items, add } => {
                let limit = self.shard.cfg.max_groups_per_session as usize;
                let mut reached = Vec::new();
                for (idx, device) in items {
                    let ok = self.st.device_slot(&device).is_some_and(|slot| {
                        if add {
                            self.st.groups.join(slot, &group, limit).is_ok()
                        } else {
                            self.st.groups.leave(slot, &group)
                        }
                    });
                    reached.push((idx, u32::from(ok)));
                }
                self.st.publish_group_counts(&self.shard.counters);
                self.shard.answer(self.st, origin, Part::Sessions(reached));
            }
            ShardMsg::KickDevices { origin, items, code, reason } => {
                let mut reached = Vec::new();
                for (idx, device) in items {
                    let slot = self.st.device_slot(&device);
                    if let Some(slot) = slot {
                        let key = self.st.key_of(slot);
                        self.kick(key, now, code, reason.clone());
                    }
                    reached.push((idx, u32::from(slot.is_some())));
                }
                self.shard.answer(self.st, origin, Part::Sessions(reached));
            }
            ShardMsg::Revoke { devices, users, not_before, loaded } => {
                self.st.revoked.record(&devices, &users, not_before, now.unix_secs());
                if loaded {
                    self.st.revoked.loaded();
                    crate::cluster::on_revocations_loaded(self.shard);
                }
            }
            ShardMsg::Presence { origin, query } => {
                let part = self.st.presence(self.shard.id, &query);
                self.shard.answer(self.st, origin, Part::Presence(Box::new(part)));
            }
            ShardMsg::UserDir { user_hash, shard, present, ack } => {
                self.st.user_dir.set(user_hash, shard, present);
                if let Some(key) = ack {
                    self.shard.route(self.st, shard, ShardMsg::UserDirAck { key });
                }
            }
            ShardMsg::UserDirAck { key } => {
                let login = self.st.conn(key).and_then(|c| c.io.as_mut()).and_then(|io| io.awaiting_dir.take());
                // A session kicked or closed meanwhile has nothing to activate.
                if let Some(login) = login
                    && self.st.conn(key).is_some_and(|c| c.session.phase() == Phase::Authenticated)
                {
                    self.activate(key, now, &login);
                    self.resume_input(key);
                }
            }
            ShardMsg::Part { token, part } => crate::push::merge_part(self, token, part),
        }
    }
}

impl State {
    /// This shard's part of a presence answer: the queried devices, users
    /// and groups it holds.
    pub(super) fn presence(&self, shard: ShardId, query: &PresenceQuery) -> PresencePart {
        let describe = |conn: &Conn, slot: u32, generation: u32| proto::DevicePresence {
            device: conn.device().unwrap_or_default().to_owned(),
            online: true,
            shard: u32::from(shard.0),
            connected_at_ms: u64::from(conn.connected_at) * 1000,
            client_version: conn.field(4).unwrap_or_default().to_owned(),
            platform: conn.field(3).unwrap_or_default().to_owned(),
            user: conn.user().unwrap_or_default().to_owned(),
            conn_id: ConnId::new(shard, ConnKey { index: slot, generation }).0,
        };
        let mut part = PresencePart {
            shard,
            connections: self.conns.iter().filter(|(_, c)| c.is_active()).count() as u64,
            ..Default::default()
        };
        for (i, device) in query.devices.iter().enumerate() {
            if let Some(slot) = self.device_slot(device) {
                let conn = &self.conns[slot as usize];
                part.devices.push((i as u32, describe(conn, slot, conn.generation)));
            }
        }
        for (i, user) in query.users.iter().enumerate() {
            let sessions: Vec<_> = self
                .user_slots(user)
                .into_iter()
                .map(|slot| {
                    let conn = &self.conns[slot as usize];
                    describe(conn, slot, conn.generation)
                })
                .collect();
            if !sessions.is_empty() {
                part.users.push((i as u32, sessions));
            }
        }
        for (i, group) in query.groups.iter().enumerate() {
            part.groups.push((i as u32, self.groups.count(group) as u64));
        }
        part
    }
}
