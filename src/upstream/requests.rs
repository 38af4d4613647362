//! Client requests on a shard: admission, dedup, forwarding, answers; the
//! periodic task (timeouts, paused connections, events).

use super::*;

// ---- client side ------------------------------------------------------

/// Rate-limit check for one Request frame of active connection `key`;
/// false pauses reading from it.
pub(crate) fn admit_request<H: UpstreamHost>(h: &mut H, key: ConnKey, now: Millis) -> bool {
    let info = if h.upstream().conns.contains_key(&key) { Bytes::new() } else { encoded_conn_info(h, key) };
    let (up, c) = h.parts();
    up.admit(key, now, c, move || info)
}

pub(super) fn encoded_conn_info<H: UpstreamHost>(h: &H, key: ConnKey) -> Bytes {
    h.conn_info(key).map(|i| Bytes::from(i.encode_to_vec())).unwrap_or_default()
}

/// Handles a client's Request: answers it at once (unknown service,
/// BUSY, no backend, dedup replay) or forwards it.
pub(crate) fn on_client_request<H: UpstreamHost>(h: &mut H, key: ConnKey, now: Now, req: proto::Request) {
    bump(&h.counters().requests);
    let Some(&service) = h.upstream().by_id.get(&req.service_id) else {
        let reason = format!("unknown service {:?}", req.service_id);
        return reply_now(h, key, req.request_id, Outcome::error(ErrorCode::Unavailable, reason));
    };
    let enabled = h.upstream().settings.dedup_window_ms > 0;
    let (up, device) = h.with_device(key);
    let seen = up.dedup.lookup(device.unwrap_or(""), service, req.client_msg_id, enabled);
    let dedup = match seen {
        Seen::Done(outcome) => {
            bump(&h.counters().dedup_replayed);
            return answer_to(h, key, response_frame(req.request_id, &outcome));
        }
        Seen::InFlight(id) => {
            if let Some(p) = h.upstream().pending.get_mut(&id)
                && p.waiters.len() < MAX_WAITERS
            {
                p.waiters.push((key, req.request_id));
                bump(&h.counters().dedup_joined);
                return;
            }
            let reason = "too many retries waiting for the first attempt".to_owned();
            return reply_now(h, key, req.request_id, Outcome::error(ErrorCode::Busy, reason));
        }
        Seen::New(k) => Some(k),
        Seen::Untracked => None,
    };
    let svc = &h.upstream().services[usize::from(service)];
    if svc.inflight >= svc.settings.max_inflight {
        let reason = format!("service {:?} has {} requests in flight", svc.settings.id, svc.inflight);
        return reply_now(h, key, req.request_id, Outcome::error(ErrorCode::Busy, reason));
    }
    let Some(link) = h.upstream().pick_link(service) else {
        let reason = format!("no backend of service {:?} is up", req.service_id);
        return reply_now(h, key, req.request_id, Outcome::error(ErrorCode::Unavailable, reason));
    };
    let up = h.upstream();
    up.next_id += 1;
    let id = up.next_id;
    let info = match up.conns.get(&key) {
        Some(c) => c.info.clone(),
        None => encoded_conn_info(h, key),
    };
    let device: Option<Box<str>> = dedup.map(|_| h.device_of(key).unwrap_or("").into());
    let up = h.upstream();
    let svc = &mut up.services[usize::from(service)];
    let timeout_ms = svc.settings.timeout_ms;
    let frame = encode_upstream_request(id, &req.service_id, &info, req.client_msg_id, &req.body, timeout_ms);
    svc.inflight += 1;
    svc.deadlines.push_back((now.mono.add_ms(u64::from(timeout_ms)), id));
    up.pending.insert(id, Pending { conn: key, request_id: req.request_id, service, link, dedup, waiters: Vec::new() });
    if let (Some(k), Some(device)) = (dedup, device) {
        up.dedup.insert(k, device, service, id, now.mono);
    }
    up.send_on(link, frame);
    up.kick();
    bump(&h.counters().forwarded);
}

/// Queues a Response for session `key`, to be written at the end of the
/// pass ([`flush`]).
pub(super) fn answer_to<H: UpstreamHost>(h: &mut H, key: ConnKey, frame: Bytes) {
    if h.respond(key, frame) {
        h.upstream().dirty_conns.push(key);
    }
}

/// Writes every request and answer queued in this pass: one `writev`
/// per backend link and per client session.
pub(crate) fn flush<H: UpstreamHost>(h: &mut H) {
    h.upstream().flush_links();
    if h.upstream().dirty_conns.is_empty() {
        return;
    }
    let mut keys = std::mem::take(&mut h.upstream().dirty_conns);
    keys.sort_unstable_by_key(|k| (k.index, k.generation));
    keys.dedup();
    h.flush_responses(&keys);
    keys.clear();
    h.upstream().dirty_conns = keys;
}

/// Sends `outcome` to the client and counts it.
pub(super) fn reply_now<H: UpstreamHost>(h: &mut H, key: ConnKey, request_id: u64, outcome: Outcome) {
    count_outcome(h.counters(), &outcome);
    answer_to(h, key, response_frame(request_id, &outcome));
}

pub(super) fn count_outcome(c: &UpstreamCounters, o: &Outcome) {
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
pub(super) fn complete<H: UpstreamHost>(h: &mut H, id: u64, mut outcome: Outcome) {
    let max_frame_bytes = h.max_frame_bytes();
    let up = h.upstream();
    let Some(p) = up.pending.remove(&id) else {
        bump(&h.counters().late);
        return;
    };
    let svc = &mut up.services[usize::from(p.service)];
    svc.inflight = svc.inflight.saturating_sub(1);
    let frame = response_frame(p.request_id, &outcome);
    let frame = if frame.len() - codec::HEADER_LEN > max_frame_bytes as usize {
        let reason = format!(
            "the backend's answer of {} bytes exceeds the client frame limit of {}",
            outcome.body.len(),
            max_frame_bytes
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
        count_outcome(h.counters(), &outcome);
    }
    answer_to(h, p.conn, frame);
    for (conn, request_id) in p.waiters {
        answer_to(h, conn, response_frame(request_id, &outcome));
    }
}

/// Queues a connection event (ONLINE, OFFLINE, REPLACED) for subscribed
/// services; free when none subscribes.
pub(crate) fn conn_event<H: UpstreamHost>(h: &mut H, key: ConnKey, kind: ConnectionEventKind, code: ErrorCode) {
    if !h.upstream().wants_events() {
        return;
    }
    let Some(info) = h.conn_info(key) else { return };
    let at_ms = u64::try_from(h.now().unix_ms).unwrap_or(0);
    let event = proto::ConnectionEvent { kind: kind as i32, conn: Some(info), at_ms, code: code as i32 };
    let (up, c) = h.parts();
    up.push_event(event, c);
}

// ---- the periodic task ------------------------------------------------

/// Checks request deadlines, paused connections, event batches and
/// dedup expiry every few ms while any exists; sleeps otherwise.
pub(super) async fn upstream_loop<S: UpstreamShard>(shard: Rc<S>) {
    let Some(wake) = shard.enter(|h| h.upstream().wake_rx.take()) else { return };
    loop {
        let (busy, stopping) = shard.enter(|h| {
            let busy = tick(h);
            if !busy {
                h.upstream().ticking = false;
            }
            (busy, h.upstream().stopping)
        });
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
pub(super) fn tick<H: UpstreamHost>(h: &mut H) -> bool {
    let now = h.now();
    // Deadlines. Answered requests are popped from the front too, so the
    // FIFO stays about as long as what is in flight.
    for service in 0..h.upstream().services.len() {
        loop {
            let up = h.upstream();
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
                complete(h, id, Outcome::error(ErrorCode::Timeout, reason));
            }
        }
    }
    // Rate limit.
    for action in h.upstream().check_paused(now.mono) {
        match action {
            Unpause::Resume(key) => {
                h.resume(key);
            }
            Unpause::Close(key, paused_ms) => {
                bump(&h.counters().rate_closed);
                let reason = format!("paused {paused_ms} ms by the request rate limit");
                h.close_conn(key, now, ErrorCode::RateLimited, reason);
            }
        }
    }
    // Events.
    for service in 0..h.upstream().services.len() {
        let (up, c) = h.parts();
        up.pump_events(service as u16, now.mono, c);
    }
    // Dedup expiry and idle rate-limit entries.
    let s = &h.upstream().settings;
    let (window, max_entries, max_bytes) = (s.dedup_window_ms, s.dedup_max_entries, s.dedup_max_bytes);
    let evicted = h.upstream().dedup.trim(now.mono, window, max_entries, max_bytes);
    h.counters().dedup_evicted.fetch_add(evicted, Ordering::Relaxed);
    if now.mono.0 >= h.upstream().last_sweep.0 + SWEEP_EVERY_MS {
        h.upstream().last_sweep = now.mono;
        h.upstream().sweep_idle(now.mono);
    }
    flush(h);
    h.upstream().busy()
}
