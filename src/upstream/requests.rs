//! Client requests on a shard: admission, dedup, forwarding, answers; the
//! periodic task (timeouts, paused connections, events).

use super::*;

impl Shard {
    // ---- client side ------------------------------------------------------

    /// Rate-limit check for one Request frame of active connection `key`;
    /// false pauses reading from it.
    pub(crate) fn admit_request(&self, st: &mut State, key: ConnKey, now: Millis) -> bool {
        let info = if st.upstream.conns.contains_key(&key) { Bytes::new() } else { self.encoded_conn_info(st, key) };
        st.upstream.admit(key, now, &self.counters.upstream, move || info)
    }

    pub(super) fn encoded_conn_info(&self, st: &State, key: ConnKey) -> Bytes {
        st.conn_info(self.id, &self.cfg.node, key).map(|i| Bytes::from(i.encode_to_vec())).unwrap_or_default()
    }

    /// Handles a client's Request: answers it at once (unknown service,
    /// BUSY, no backend, dedup replay) or forwards it.
    pub(crate) fn on_client_request(&self, st: &mut State, key: ConnKey, now: Now, req: proto::Request) {
        let c = &self.counters.upstream;
        bump(&c.requests);
        let Some(&service) = st.upstream.by_id.get(&req.service_id) else {
            let reason = format!("unknown service {:?}", req.service_id);
            return self.reply_now(st, key, req.request_id, Outcome::error(ErrorCode::Unavailable, reason));
        };
        let enabled = st.upstream.settings.dedup_window_ms > 0;
        let seen = st.upstream.dedup.lookup(st.device_of(key).unwrap_or(""), service, req.client_msg_id, enabled);
        let dedup = match seen {
            Seen::Done(outcome) => {
                bump(&c.dedup_replayed);
                return self.answer_to(st, key, response_frame(req.request_id, &outcome));
            }
            Seen::InFlight(id) => {
                if let Some(p) = st.upstream.pending.get_mut(&id)
                    && p.waiters.len() < MAX_WAITERS
                {
                    p.waiters.push((key, req.request_id));
                    bump(&c.dedup_joined);
                    return;
                }
                let reason = "too many retries waiting for the first attempt".to_owned();
                return self.reply_now(st, key, req.request_id, Outcome::error(ErrorCode::Busy, reason));
            }
            Seen::New(k) => Some(k),
            Seen::Untracked => None,
        };
        let up = &mut st.upstream;
        let svc = &up.services[usize::from(service)];
        if svc.inflight >= svc.settings.max_inflight {
            let reason = format!("service {:?} has {} requests in flight", svc.settings.id, svc.inflight);
            return self.reply_now(st, key, req.request_id, Outcome::error(ErrorCode::Busy, reason));
        }
        let Some(link) = up.pick_link(service) else {
            let reason = format!("no backend of service {:?} is up", req.service_id);
            return self.reply_now(st, key, req.request_id, Outcome::error(ErrorCode::Unavailable, reason));
        };
        up.next_id += 1;
        let id = up.next_id;
        let info = match up.conns.get(&key) {
            Some(c) => c.info.clone(),
            None => self.encoded_conn_info(st, key),
        };
        let device: Option<Box<str>> = dedup.map(|_| st.device_of(key).unwrap_or("").into());
        let up = &mut st.upstream;
        let svc = &mut up.services[usize::from(service)];
        let timeout_ms = svc.settings.timeout_ms;
        let frame = encode_upstream_request(id, &req.service_id, &info, req.client_msg_id, &req.body, timeout_ms);
        svc.inflight += 1;
        svc.deadlines.push_back((now.mono.add_ms(u64::from(timeout_ms)), id));
        up.pending
            .insert(id, Pending { conn: key, request_id: req.request_id, service, link, dedup, waiters: Vec::new() });
        if let (Some(k), Some(device)) = (dedup, device) {
            up.dedup.insert(k, device, service, id, now.mono);
        }
        up.send_on(link, frame);
        up.kick();
        bump(&c.forwarded);
    }

    /// Queues a Response for session `key`, to be written at the end of the
    /// pass ([`Shard::flush_upstream`]).
    pub(super) fn answer_to(&self, st: &mut State, key: ConnKey, frame: Bytes) {
        if self.ctx(st).respond(key, frame) {
            st.upstream.dirty_conns.push(key);
        }
    }

    /// Writes every request and answer queued in this pass: one `writev`
    /// per backend link and per client session.
    pub(crate) fn flush_upstream(&self, st: &mut State) {
        st.upstream.flush_links();
        if st.upstream.dirty_conns.is_empty() {
            return;
        }
        let mut keys = std::mem::take(&mut st.upstream.dirty_conns);
        keys.sort_unstable_by_key(|k| (k.index, k.generation));
        keys.dedup();
        self.ctx(st).flush_responses(&keys);
        keys.clear();
        st.upstream.dirty_conns = keys;
    }

    /// Sends `outcome` to the client and counts it.
    pub(super) fn reply_now(&self, st: &mut State, key: ConnKey, request_id: u64, outcome: Outcome) {
        self.count_outcome(&outcome);
        self.answer_to(st, key, response_frame(request_id, &outcome));
    }

    pub(super) fn count_outcome(&self, o: &Outcome) {
        let c = &self.counters.upstream;
        let counter = match ErrorCode::try_from(o.status) {
            Ok(ErrorCode::Unspecified) => &c.ok,
            Ok(ErrorCode::Busy) => &c.busy,
            Ok(ErrorCode::Unavailable) => &c.unavailable,
            Ok(ErrorCode::Timeout) => &c.timeouts,
            _ => &c.other,
        };
        bump(counter);
    }

    /// Ends pending request `id` with `outcome`: answers the client and the
    /// retries waiting for it, and keeps the answer for dedup (a TIMEOUT or
    /// a broken link too: the backend may have processed the request, so a
    /// retry must not be forwarded again).
    pub(super) fn complete(&self, st: &mut State, id: u64, mut outcome: Outcome) {
        let up = &mut st.upstream;
        let Some(p) = up.pending.remove(&id) else {
            bump(&self.counters.upstream.late);
            return;
        };
        let svc = &mut up.services[usize::from(p.service)];
        svc.inflight = svc.inflight.saturating_sub(1);
        let frame = response_frame(p.request_id, &outcome);
        let frame = if frame.len() - codec::HEADER_LEN > self.cfg.max_frame_bytes as usize {
            let reason = format!(
                "the backend's answer of {} bytes exceeds the client frame limit of {}",
                outcome.body.len(),
                self.cfg.max_frame_bytes
            );
            outcome = Outcome::error(ErrorCode::ServerError, reason);
            response_frame(p.request_id, &outcome)
        } else {
            frame
        };
        if let Some(k) = p.dedup {
            up.dedup.finish(k, id, &outcome);
        }
        for _ in 0..=p.waiters.len() {
            self.count_outcome(&outcome);
        }
        self.answer_to(st, p.conn, frame);
        for (conn, request_id) in p.waiters {
            self.answer_to(st, conn, response_frame(request_id, &outcome));
        }
    }

    /// Queues a connection event (ONLINE, OFFLINE, REPLACED) for subscribed
    /// services; free when none subscribes.
    pub(crate) fn conn_event(&self, st: &mut State, key: ConnKey, kind: ConnectionEventKind, code: ErrorCode) {
        if !st.upstream.wants_events() {
            return;
        }
        let Some(info) = st.conn_info(self.id, &self.cfg.node, key) else { return };
        let at_ms = u64::try_from(self.now().unix_ms).unwrap_or(0);
        let event = proto::ConnectionEvent { kind: kind as i32, conn: Some(info), at_ms, code: code as i32 };
        st.upstream.push_event(event, &self.counters.upstream);
    }

    // ---- the periodic task ------------------------------------------------

    /// Checks request deadlines, paused connections, event batches and
    /// dedup expiry every few ms while any exists; sleeps otherwise.
    pub async fn upstream_loop(self: Rc<Self>) {
        let Some(wake) = self.state.borrow_mut().upstream.wake_rx.take() else { return };
        loop {
            let (busy, stopping) = {
                let mut st = self.state.borrow_mut();
                let busy = self.upstream_tick(&mut st);
                if !busy {
                    st.upstream.ticking = false;
                }
                (busy, st.upstream.stopping)
            };
            if stopping {
                return;
            }
            if busy {
                glommio::timer::sleep(TICK).await;
            } else if wake.recv().await.is_none() {
                return;
            }
        }
    }

    /// One round of the periodic task; returns whether it has more to watch.
    pub(super) fn upstream_tick(&self, st: &mut State) -> bool {
        let now = self.now();
        let c = &self.counters.upstream;
        // Deadlines. Answered requests are popped from the front too, so the
        // FIFO stays about as long as what is in flight.
        for service in 0..st.upstream.services.len() {
            loop {
                let up = &mut st.upstream;
                let svc = &mut up.services[service];
                let Some(&(deadline, id)) = svc.deadlines.front() else { break };
                let answered = !up.pending.contains_key(&id);
                if deadline > now.mono && !answered {
                    break;
                }
                svc.deadlines.pop_front();
                let timeout_ms = svc.settings.timeout_ms;
                if !answered {
                    let reason = format!("no answer within {timeout_ms} ms");
                    self.complete(st, id, Outcome::error(ErrorCode::Timeout, reason));
                }
            }
        }
        // Rate limit.
        for action in st.upstream.check_paused(now.mono) {
            match action {
                Unpause::Resume(key) => {
                    self.ctx(st).resume_input(key);
                    st.wake_conn(key);
                }
                Unpause::Close(key, paused_ms) => {
                    bump(&c.rate_closed);
                    let reason = format!("paused {paused_ms} ms by the request rate limit");
                    self.ctx(st).close_conn(key, now, ErrorCode::RateLimited, reason);
                }
            }
        }
        // Events.
        for service in 0..st.upstream.services.len() {
            st.upstream.pump_events(service as u16, now.mono, c);
        }
        // Dedup expiry and idle rate-limit entries.
        let s = &st.upstream.settings;
        let (window, max_entries, max_bytes) = (s.dedup_window_ms, s.dedup_max_entries, s.dedup_max_bytes);
        let evicted = st.upstream.dedup.trim(now.mono, window, max_entries, max_bytes);
        c.dedup_evicted.fetch_add(evicted, Ordering::Relaxed);
        if now.mono.0 >= st.upstream.last_sweep.0 + SWEEP_EVERY_MS {
            st.upstream.last_sweep = now.mono;
            st.upstream.sweep_idle(now.mono);
        }
        self.flush_upstream(st);
        st.upstream.busy()
    }
}
