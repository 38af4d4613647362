//! The agent's internals: connecting, the session's events, retries of
//! requests, failures and backoff.

use super::*;

impl Agent {
    pub(super) fn link(&self) -> Option<LinkId> {
        match &self.state {
            State::Connecting { link, .. } => Some(*link),
            State::Up(up) => Some(up.link),
            _ => None,
        }
    }

    pub(super) fn event(&mut self, ev: Event) {
        self.out.push_back(Action::Event(ev));
    }

    pub(super) fn send(&mut self, link: LinkId, frame: &Frame, flags: Flags) {
        let mut buf = BytesMut::new();
        frame.encode_into(&mut buf, flags);
        self.out.push_back(Action::Send { link, bytes: buf.freeze() });
    }

    pub(super) fn adopt_heartbeat_bounds(&mut self, min_ms: u32, max_ms: u32) {
        let fresh = SmartHeartbeat::new(min_ms, max_ms);
        if (fresh.min_ms(), fresh.max_ms()) == (self.heartbeat.min_ms(), self.heartbeat.max_ms()) {
            self.heartbeat.reset_for_new_link();
        } else {
            let foreground = self.heartbeat.is_foreground();
            self.heartbeat = fresh;
            self.heartbeat.set_foreground(foreground);
        }
    }

    pub(super) fn rearm_heartbeat(&mut self, now: Millis) {
        let interval = self.heartbeat.interval_ms();
        if let State::Up(up) = &mut self.state
            && interval > 0
        {
            up.session.set_heartbeat(now, u64::from(interval));
        }
    }

    /// Starts the next attempt: a lookup or a connect.
    pub(super) fn attempt(&mut self, now: Millis) {
        if self.need_lookup || self.endpoints.is_empty() {
            // The connect timeout bounds the lookup too.
            self.state = State::LookingUp { deadline: now.add_ms(self.cfg.connect_timeout_ms) };
            self.out.push_back(Action::Lookup { net: self.cfg.net.clone() });
        } else {
            self.connect(now);
        }
    }

    pub(super) fn connect(&mut self, now: Millis) {
        let Some(endpoint) = self.endpoints.current().map(str::to_owned) else {
            return self.retry_later(now, Disconnect::ConnectFailed("no endpoint".into()));
        };
        self.next_link += 1;
        let link = LinkId(self.next_link);
        let deadline = now.add_ms(self.cfg.connect_timeout_ms);
        self.state = State::Connecting { link, endpoint: endpoint.clone(), deadline };
        self.out.push_back(Action::Connect { link, endpoint });
    }

    pub(super) fn on_session_event(&mut self, now: Millis, ev: ClientEvent) {
        match ev {
            ClientEvent::Connected(ok) => {
                let State::Up(up) = &mut self.state else { return };
                up.active = true;
                up.server_offset_ms = i64::try_from(ok.server_time_ms).unwrap_or(0) - now.0 as i64;
                up.schedule_refresh(now, ok.token_expires_ms);
                self.store_incarnation = up.session.store_incarnation();
                let endpoint = up.endpoint.clone();
                // The negotiated interval is the longest the server's idle
                // timeout covers.
                self.adopt_heartbeat_bounds(ok.heartbeat_min_ms, ok.heartbeat_ms.max(ok.heartbeat_min_ms));
                self.rearm_heartbeat(now);
                self.event(Event::Connected { endpoint, auth_ok: ok });
                // Handled while authenticating (after Auth.last_seq was sent).
                self.flush_ack(true);
                for p in self.pending.values_mut() {
                    p.next_try = Some(now);
                }
                self.requests_due(now);
            }
            ClientEvent::Pong { .. } => {
                self.heartbeat.on_pong();
                // A round trip made it: the link works, backoff starts over.
                self.backoff.reset();
                self.rushed = false;
                self.rearm_heartbeat(now);
            }
            ClientEvent::GoAway { endpoint, reason } => {
                self.fail(now, Disconnect::GoAway { endpoint, reason }, true);
            }
            ClientEvent::Message(m) => {
                self.delivered_seq = self.delivered_seq.max(m.seq);
                self.event(Event::Message(m));
            }
            ClientEvent::ResyncRequired { from_seq, to_seq } => {
                self.delivered_seq = self.delivered_seq.max(to_seq);
                self.event(Event::ResyncRequired { from_seq, to_seq });
            }
            // The SDK sends no Join or Leave.
            ClientEvent::GroupResult(_) => {}
            ClientEvent::Refreshed { token_expires_ms } => {
                if let State::Up(up) = &mut self.state {
                    up.schedule_refresh(now, token_expires_ms);
                }
                self.event(Event::TokenRefreshed { token_expires_ms });
            }
            ClientEvent::Response(r) => {
                let id = RequestId(r.request_id);
                let Some(p) = self.pending.get_mut(&id) else { return }; // late duplicate
                if codes::from_wire(r.status) == ErrorCode::Busy && now.add_ms(self.cfg.request_retry_ms) < p.deadline {
                    p.next_try = Some(now.add_ms(self.cfg.request_retry_ms));
                    return;
                }
                self.pending.remove(&id);
                self.event(Event::Response { id, result: Ok(r) });
            }
        }
    }

    /// Sends or expires the requests that are due.
    pub(super) fn requests_due(&mut self, now: Millis) {
        let link = self.up().filter(|u| u.active).map(|u| u.link);
        let retry = self.cfg.request_retry_ms.max(1);
        let mut expired = Vec::new();
        let mut sends = Vec::new();
        let mut doubt = false;
        for (id, p) in &mut self.pending {
            if now >= p.deadline {
                expired.push((*id, p.attempts));
                continue;
            }
            let Some(at) = p.next_try else { continue };
            if at > now {
                continue;
            }
            match link {
                Some(_) => {
                    let req = proto::Request {
                        service_id: p.service.clone(),
                        request_id: id.0,
                        client_msg_id: id.0,
                        body: p.body.clone(),
                    };
                    let flags = if p.attempts > 0 { Flags::RETRANSMISSION } else { Flags::default() };
                    sends.push((Frame::Request(req), flags));
                    doubt |= p.sent_on == link;
                    p.attempts += 1;
                    p.next_try = Some(now.add_ms(retry));
                    p.sent_on = link;
                }
                None => p.next_try = None,
            }
        }
        if let Some(link) = link {
            for (frame, flags) in sends {
                self.send(link, &frame, flags);
            }
            // No answer on this link: is it still there? A heartbeat now
            // finds a stalled link within the response timeout instead of
            // the (possibly long) heartbeat interval.
            if doubt
                && let State::Up(up) = &mut self.state
                && !up.session.awaiting_pong()
            {
                let ping = up.session.ping(now);
                self.send(link, &ping, Flags::default());
            }
        }
        for (id, attempts) in expired {
            self.pending.remove(&id);
            self.event(Event::Response { id, result: Err(RequestError::TimedOut { attempts }) });
        }
    }

    /// The current attempt or session ended. `close`: the agent noticed
    /// (the driver must close the socket); false when the driver told us.
    pub(super) fn fail(&mut self, now: Millis, reason: Disconnect, close: bool) {
        let (was_active, link) = match &self.state {
            State::Up(up) => (up.active, Some(up.link)),
            State::Connecting { link, .. } => (false, Some(*link)),
            _ => (false, None),
        };
        if let State::Up(up) = &self.state {
            self.duplicates += up.session.duplicates();
        }
        // The next Auth carries the resume point.
        self.ack_due = None;
        if close && let Some(link) = link {
            self.out.push_back(Action::Close { link });
        }
        // Requests wait for the next session.
        for p in self.pending.values_mut() {
            p.next_try = None;
        }
        if !reason.reconnect_allowed() {
            self.event(Event::Disconnected { reason: reason.clone(), retry_in_ms: None });
            return self.stop(reason);
        }
        let at_once = match &reason {
            Disconnect::GoAway { endpoint, .. } if !endpoint.is_empty() => {
                self.endpoints.go_away(endpoint);
                true
            }
            // The node drains and will not take us back: elsewhere, now.
            Disconnect::GoAway { .. }
            | Disconnect::Error { code: ErrorCode::GoingAway, .. }
            | Disconnect::Kicked { code: ErrorCode::GoingAway, .. } => {
                if self.cfg.dispatcher {
                    self.need_lookup = true;
                } else {
                    self.endpoints.fail();
                }
                true
            }
            Disconnect::NetworkChanged => true,
            Disconnect::Error { code: ErrorCode::TokenExpired, .. } => {
                self.need_lookup = self.cfg.dispatcher;
                false
            }
            // A session that was up is tried again where it was; an
            // endpoint that could not give one, we drift away from.
            _ if was_active => false,
            _ => {
                if self.endpoints.fail() && self.cfg.dispatcher {
                    self.need_lookup = true;
                }
                false
            }
        };
        // At once only once in a row: a server that keeps sending GoAway
        // (or a flapping network) still gets the backoff.
        if at_once && !self.rushed {
            self.rushed = true;
            self.event(Event::Disconnected { reason, retry_in_ms: Some(0) });
            self.state = State::Waiting { at: now };
            self.attempt(now);
        } else {
            self.retry_later(now, reason);
        }
    }

    pub(super) fn retry_later(&mut self, now: Millis, reason: Disconnect) {
        let delay = self.backoff.next_delay_ms(&mut self.rng);
        self.event(Event::Disconnected { reason, retry_in_ms: Some(delay) });
        self.state = State::Waiting { at: now.add_ms(delay) };
    }

    pub(super) fn stop(&mut self, reason: Disconnect) {
        self.state = State::Stopped(reason.clone());
        for (id, _) in std::mem::take(&mut self.pending) {
            self.event(Event::Response { id, result: Err(RequestError::Stopped(reason.clone())) });
        }
    }
}
