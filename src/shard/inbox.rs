//! Messages from other shards (the mesh): adoptions, deliveries, user
//! directory updates, presence, group and kick requests.

use super::*;

impl Shard {
    // ---- mesh -------------------------------------------------------------

    /// Handles a message from another shard.
    pub fn on_message(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt(adoption) => self.adopt(*adoption),
            other => {
                let mut st = self.state.borrow_mut();
                self.handle(&mut st, other);
            }
        }
    }

    /// Sends `msg` to shard `to`, or handles it right here when `to` is us.
    pub(crate) fn route(&self, st: &mut State, to: ShardId, msg: ShardMsg) {
        if to == self.id { self.handle(st, msg) } else { self.outbox.send(to, msg) }
    }

    /// Reserves room for a broadcast of `frame_len` bytes in the queue of
    /// every shard, or in none: a broadcast refused by one shard must not
    /// reach the sessions of the others, so that sending it again is safe.
    /// Each shard's pacer releases its share when the job is done.
    pub(crate) fn reserve_broadcast(&self, frame_len: usize) -> Result<(), String> {
        let cost = broadcast_cost(frame_len);
        let limit = self.live().push.broadcast_queue_bytes;
        let shards = &self.cfg.node_counters;
        for (i, counters) in shards.iter().enumerate() {
            let queued = &counters.broadcast_queued_bytes;
            if let Err(held) =
                queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| (q + cost <= limit).then_some(q + cost))
            {
                for earlier in &shards[..i] {
                    earlier.broadcast_queued_bytes.fetch_sub(cost, Ordering::AcqRel);
                }
                self.counters.broadcast_rejected.fetch_add(1, Ordering::Relaxed);
                return Err(format!(
                    "broadcast queue of shard {i} is full ({held} of {limit} bytes queued \
                     (push.broadcast_queue_bytes_per_shard)); send it again later"
                ));
            }
        }
        Ok(())
    }

    /// Whether the mesh toward other shards is too backed up to read more
    /// push-port requests; if so, `waker` is woken when it has drained.
    pub(crate) fn mesh_congested(&self, waker: &Waker) -> bool {
        let congested = self.outbox.congested(waker);
        if congested {
            self.counters.mesh_backpressure.fetch_add(1, Ordering::Relaxed);
        }
        congested
    }

    /// Sends part of an answer back to the request's origin.
    pub(crate) fn answer(&self, st: &mut State, origin: Origin, part: Part) {
        if origin.shard == self.id {
            self.merge_part(st, origin.token, part);
        } else {
            self.outbox.send(origin.shard, ShardMsg::Part { token: origin.token, part });
        }
    }

    /// Every message but `Adopt` (which needs to spawn a task).
    pub(super) fn handle(&self, st: &mut State, msg: ShardMsg) {
        let now = self.now();
        match msg {
            ShardMsg::Adopt(_) => {}
            ShardMsg::StoreDevices { origin, items, msg } => {
                reliable::store_copies(&mut self.ctx(st), now, origin, items, msg)
            }
            ShardMsg::DeliveryStatus { origin, ids } => reliable::status_part(&mut self.ctx(st), origin, ids),
            ShardMsg::Users { origin, items, action: UserAction::Store(msg) } => {
                let mut copies = Vec::new();
                for (idx, user) in items {
                    let before = copies.len();
                    for slot in st.user_slots(&user) {
                        let Some(device) = slot_device(&st.conns, slot).map(str::to_owned) else { continue };
                        let message_id = self.next_message_id(st);
                        copies.push((idx, device, message_id));
                    }
                    if copies.len() == before {
                        // No session left here: answered with no copy.
                        copies.push((idx, String::new(), 0));
                    }
                }
                reliable::store_copies(&mut self.ctx(st), now, origin, copies, msg);
            }
            ShardMsg::Devices { origin, items, frame } => {
                let reached = items
                    .iter()
                    .map(|(idx, device)| {
                        let slot = st.device_slot(device);
                        (*idx, u32::from(slot.is_some_and(|slot| self.deliver(st, slot, &frame))))
                    })
                    .collect();
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::UserLookup { origin, items, action } => {
                let mut per_shard: Vec<Vec<(u32, String)>> = vec![Vec::new(); usize::from(self.shards)];
                let mut targets = Vec::with_capacity(items.len());
                for (idx, user) in items {
                    let mut holders = 0;
                    for shard in st.user_dir.shards(stable_hash(&user), self.shards) {
                        if let Some(batch) = per_shard.get_mut(shard.index()) {
                            batch.push((idx, user.clone()));
                            holders += 1;
                        }
                    }
                    targets.push((idx, holders));
                }
                let parts = per_shard.iter().filter(|b| !b.is_empty()).count() as u32;
                self.answer(st, origin, Part::Expect { parts, targets });
                for (shard, items) in per_shard.into_iter().enumerate() {
                    if !items.is_empty() {
                        let msg = ShardMsg::Users { origin, items, action: action.clone() };
                        self.route(st, ShardId(shard as u16), msg);
                    }
                }
            }
            ShardMsg::Users { origin, items, action } => {
                let mut reached = Vec::new();
                for (idx, user) in items {
                    let mut n = 0;
                    for slot in st.user_slots(&user) {
                        let ok = match &action {
                            UserAction::Deliver(frame) => self.deliver(st, slot, frame),
                            UserAction::Kick { code, reason } => {
                                let key = st.key_of(slot);
                                self.kick(st, key, now, *code, reason.clone());
                                true
                            }
                            // Handled above; nothing reaches here.
                            UserAction::Store(_) => false,
                        };
                        n += u32::from(ok);
                    }
                    reached.push((idx, n));
                }
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::Group { origin, group, frame } => {
                // A shard-local copy: the refcount of a shared buffer would
                // bounce between cores on every member.
                let frame = if origin.shard == self.id { frame } else { Bytes::copy_from_slice(&frame) };
                let members: Vec<u32> = st.groups.members(&group).collect();
                let reached = if members.len() <= INLINE_FANOUT && st.flush.is_empty() {
                    members.into_iter().filter(|&slot| self.deliver(st, slot, &frame)).count()
                } else {
                    let n = members.into_iter().filter(|&slot| self.deliver_batched(st, slot, &frame)).count();
                    self.kick_flusher(st);
                    n
                };
                self.answer(st, origin, Part::Count(reached as u64));
            }
            ShardMsg::Broadcast { origin, frame, expires_at } => {
                let frame = if origin.shard == self.id { frame } else { Bytes::copy_from_slice(&frame) };
                let targeted = st.conns.iter().filter(|(_, c)| c.is_active()).count();
                st.broadcasts.push_back(BroadcastJob { frame, cursor: 0, expires_at });
                self.answer(st, origin, Part::Count(targeted as u64));
                if !self.pacing.get() {
                    let _ = self.pacer_wake.try_send(());
                }
            }
            ShardMsg::GroupUpdate { origin, group, items, add } => {
                let limit = self.cfg.max_groups_per_session as usize;
                let mut reached = Vec::new();
                for (idx, device) in items {
                    let ok = st.device_slot(&device).is_some_and(|slot| {
                        if add { st.groups.join(slot, &group, limit).is_ok() } else { st.groups.leave(slot, &group) }
                    });
                    reached.push((idx, u32::from(ok)));
                }
                self.publish_group_counts(st);
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::KickDevices { origin, items, code, reason } => {
                let mut reached = Vec::new();
                for (idx, device) in items {
                    let slot = st.device_slot(&device);
                    if let Some(slot) = slot {
                        let key = st.key_of(slot);
                        self.kick(st, key, now, code, reason.clone());
                    }
                    reached.push((idx, u32::from(slot.is_some())));
                }
                self.answer(st, origin, Part::Sessions(reached));
            }
            ShardMsg::Revoke { devices, users, not_before, loaded } => {
                st.revoked.record(&devices, &users, not_before, now.unix_secs());
                if loaded {
                    st.revoked.loaded();
                    self.cluster_on_revocations_loaded();
                }
            }
            ShardMsg::Presence { origin, query } => {
                let part = self.presence(st, &query);
                self.answer(st, origin, Part::Presence(Box::new(part)));
            }
            ShardMsg::UserDir { user_hash, shard, present, ack } => {
                st.user_dir.set(user_hash, shard, present);
                if let Some(key) = ack {
                    self.route(st, shard, ShardMsg::UserDirAck { key });
                }
            }
            ShardMsg::UserDirAck { key } => {
                let login = st.conn(key).and_then(|c| c.io.as_mut()).and_then(|io| io.awaiting_dir.take());
                // A session kicked or closed meanwhile has nothing to activate.
                if let Some(login) = login
                    && st.conn(key).is_some_and(|c| c.session.phase() == Phase::Authenticated)
                {
                    self.activate(st, key, now, &login);
                    self.resume_input(st, key);
                }
            }
            ShardMsg::Part { token, part } => self.merge_part(st, token, part),
        }
    }

    /// Merges part of an answer into a pending request; replies when whole.
    pub(crate) fn merge_part(&self, st: &mut State, token: u64, part: Part) {
        let Some(pending) = st.pending.get_mut(&token) else {
            // Answered at its deadline already.
            self.counters.push_late_answers.fetch_add(1, Ordering::Relaxed);
            return;
        };
        pending.merge(part);
        self.finish_if_done(st, token);
    }

    pub(crate) fn finish_if_done(&self, st: &mut State, token: u64) {
        if !st.pending.get(&token).is_some_and(Pending::is_done) {
            return;
        }
        let Some(pending) = st.pending.remove(&token) else { return };
        self.counters.ops.push_latency.record(pending.started.elapsed_to(self.now().mono));
        let (backend, frame) = pending.finish();
        // Hook: the local part of a cluster request goes to its merge.
        let Some(frame) = self.cluster_local_reply(backend, frame) else { return };
        crate::push::reply(st, backend, frame.to_bytes());
    }

    pub(super) fn presence(&self, st: &mut State, query: &PresenceQuery) -> PresencePart {
        let describe = |conn: &Conn, slot: u32, generation: u32| proto::DevicePresence {
            device: conn.device().unwrap_or_default().to_owned(),
            online: true,
            shard: u32::from(self.id.0),
            connected_at_ms: u64::from(conn.connected_at) * 1000,
            client_version: conn.field(4).unwrap_or_default().to_owned(),
            platform: conn.field(3).unwrap_or_default().to_owned(),
            user: conn.user().unwrap_or_default().to_owned(),
            conn_id: ConnId::new(self.id, ConnKey { index: slot, generation }).0,
        };
        let mut part = PresencePart {
            shard: self.id,
            connections: st.conns.iter().filter(|(_, c)| c.is_active()).count() as u64,
            ..Default::default()
        };
        for (i, device) in query.devices.iter().enumerate() {
            if let Some(slot) = st.device_slot(device) {
                let conn = &st.conns[slot as usize];
                part.devices.push((i as u32, describe(conn, slot, conn.generation)));
            }
        }
        for (i, user) in query.users.iter().enumerate() {
            let sessions: Vec<_> = st
                .user_slots(user)
                .into_iter()
                .map(|slot| {
                    let conn = &st.conns[slot as usize];
                    describe(conn, slot, conn.generation)
                })
                .collect();
            if !sessions.is_empty() {
                part.users.push((i as u32, sessions));
            }
        }
        for (i, group) in query.groups.iter().enumerate() {
            part.groups.push((i as u32, st.groups.count(group) as u64));
        }
        part
    }

    /// Allocates a message id, unique across shards, restarts and (with
    /// distinct `delivery.node_index`) nodes.
    pub(crate) fn next_message_id(&self, st: &mut State) -> u64 {
        let unix_ms = self.now().unix_ms.max(0) as u64;
        st.message_ids.next(unix_ms)
    }
}
