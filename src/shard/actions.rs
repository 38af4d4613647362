//! Carrying out a session's actions, inside one borrow of the state
//! ([`ShardCtx`]): frames handed to the session and what it asks back
//! (send, close, register, join, leave, requests, acks, refresh).

use super::driver::{PONG, SERVICE_UNAVAILABLE};
use super::links::handshake_token;
use super::*;
use crate::protocol::limits::{Escaped, MAX_AUTH_BODY_BYTES};

impl ShardCtx<'_> {
    /// Handles frames that waited in the input leftovers: behind Auth for
    /// activation, or behind a rate-limited Request.
    pub(crate) fn resume_input(&mut self, key: ConnKey) {
        let Some(partial) = self.st.conn(key).and_then(|c| c.io.as_mut()).map(|io| std::mem::take(&mut io.partial))
        else {
            return;
        };
        let consumed = self.handle_input(key, &partial);
        if let Some(conn) = self.st.conn(key) {
            if consumed < partial.len() && conn.session.phase() != Phase::Closing {
                conn.io().partial.extend_from_slice(&partial[consumed..]);
            }
            conn.release_io_if_idle();
        }
        crate::upstream::flush(self);
    }

    /// Returns how many bytes of `input` were consumed.
    pub(super) fn handle_input(&mut self, key: ConnKey, input: &[u8]) -> usize {
        let mut pos = 0;
        let now = self.shard.now();
        let mut actions = std::mem::take(&mut self.st.actions);
        let consumed = loop {
            let Some(conn) = self.st.conn(key) else { break input.len() };
            if !conn.session.wants_input() {
                // Closing: discard the rest. Authenticated (hand-off): keep it.
                break if conn.session.phase() == Phase::Authenticated { pos } else { input.len() };
            }
            let active = conn.is_active();
            // Before Auth nothing longer than an Auth frame is waited for.
            let max_body = match conn.session.phase() {
                Phase::Handshaking => MAX_AUTH_BODY_BYTES.min(self.shard.cfg.max_frame_bytes),
                _ => self.shard.cfg.max_frame_bytes,
            };
            match codec::split_frame(&input[pos..], max_body) {
                Ok(None) => break pos,
                Ok(Some((header, body))) => {
                    // Rate limit: a Request over the budget stays in the
                    // leftovers, and reading pauses.
                    if header.kind == FrameKind::Request
                        && active
                        && !crate::upstream::admit_request(self, key, now.mono)
                    {
                        break pos;
                    }
                    let Some(conn) = self.st.conn(key) else { break input.len() };
                    pos += header.frame_len();
                    self.shard.counters.frames_in.fetch_add(1, Ordering::Relaxed);
                    match Frame::decode_from(Peer::Client, header, body) {
                        Ok(mut frame) => {
                            if let Frame::Auth(auth) = &mut frame {
                                handshake_token(conn, auth);
                            }
                            conn.session.handle_frame(now, frame, &self.shard.live().params, &mut actions)
                        }
                        Err(err) => conn.session.handle_codec_error(now, &err, &self.shard.live().params, &mut actions),
                    }
                }
                Err(err) => {
                    pos = input.len();
                    conn.session.handle_codec_error(now, &err, &self.shard.live().params, &mut actions);
                }
            }
            self.apply(key, now, &mut actions);
        };
        self.st.actions = actions;
        consumed
    }

    /// Carries out a session's actions for connection `key`.
    pub(super) fn apply(&mut self, key: ConnKey, now: Now, actions: &mut Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Send(frame) => self.queue_frame(key, &frame),
                Action::Close(code) => self.on_close(key, code),
                Action::Authenticated(_) if !self.st.revoked.is_loaded() => {
                    // Cluster mode, the stored revocations not read yet
                    // (Redis unreachable since the start): fail closed.
                    let why = "the node has not read the cluster's revocations yet; try again".to_owned();
                    self.close_conn(key, now, ErrorCode::Unavailable, why);
                }
                Action::Authenticated(login)
                    if self.st.revoked.refuses(&login.user, &login.device, login.issued_at) =>
                {
                    let why = "the token was revoked; get one issued after the revocation".to_owned();
                    self.close_conn(key, now, ErrorCode::Revoked, why);
                }
                Action::Authenticated(login) => {
                    self.shard.counters.authenticated.fetch_add(1, Ordering::Relaxed);
                    let owner = owner_shard(&login.device, self.shard.shards);
                    if owner == self.shard.id {
                        self.register(key, now, &login);
                    } else if let Some(conn) = self.st.conn(key) {
                        conn.io().handoff = Some((owner, login));
                    }
                }
                Action::Join(group) => {
                    let allowed = self.st.conn(key).is_some_and(|c| {
                        crate::groups::join_allowed(&group, &self.shard.cfg.join_policy, c.group_claims())
                    });
                    if !allowed {
                        let reason = "neither the token nor the node's policy allows this group".to_owned();
                        let denied = group_result(group, true, ErrorCode::PermissionDenied, reason);
                        self.queue_frame(key, &denied);
                        continue;
                    }
                    let limit = self.shard.cfg.max_groups_per_session as usize;
                    if self.st.groups.join(key.index, &group, limit).is_err() {
                        let reason = format!("at most {limit} groups per session");
                        let refused = group_result(group, true, ErrorCode::LimitExceeded, reason.clone());
                        self.queue_frame(key, &refused);
                        let mut more = Vec::new();
                        if let Some(conn) = self.st.conn(key) {
                            conn.session.close(
                                now,
                                ErrorCode::LimitExceeded,
                                reason,
                                &self.shard.live().params,
                                &mut more,
                            );
                        }
                        self.apply(key, now, &mut more);
                    } else {
                        self.queue_frame(key, &group_result(group, true, ErrorCode::Unspecified, String::new()));
                    }
                    self.st.publish_group_counts(&self.shard.counters);
                }
                Action::Leave(group) => {
                    self.st.groups.leave(key.index, &group);
                    self.queue_frame(key, &group_result(group, false, ErrorCode::Unspecified, String::new()));
                    self.st.publish_group_counts(&self.shard.counters);
                }
                Action::Request(request) => crate::upstream::on_client_request(self, key, now, request),
                Action::Ack(seq) => reliable::on_ack(self, key, now, seq),
                Action::Refresh(refresh) => {
                    let Some(conn) = self.st.conn(key) else { continue };
                    // The same user and device only: a token of another
                    // identity never takes over a running session.
                    let same =
                        conn.field(0) == Some(refresh.user.as_str()) && conn.field(1) == Some(refresh.device.as_str());
                    let refused = match same {
                        false => Some((ErrorCode::InvalidToken, "the Refresh token names another user or device")),
                        true if self.st.revoked.refuses(&refresh.user, &refresh.device, refresh.issued_at) => {
                            Some((ErrorCode::Revoked, "the token was revoked"))
                        }
                        true => None,
                    };
                    let mut more = Vec::new();
                    if let Some(conn) = self.st.conn(key) {
                        match refused {
                            Some((code, why)) => {
                                conn.session.close(now, code, why.into(), &self.shard.live().params, &mut more)
                            }
                            None => {
                                conn.session.refreshed(now, refresh.expires_at, &self.shard.live().params, &mut more)
                            }
                        }
                    }
                    self.apply(key, now, &mut more);
                }
            }
        }
    }

    pub(super) fn on_close(&mut self, key: ConnKey, code: ErrorCode) {
        let Some(conn) = self.st.conn(key) else { return };
        // After the longlink Error or Kicked frame, the WebSocket close that
        // carries the code (an upgrade still in progress gets an HTTP error).
        match conn.link.form() {
            Link::Plain | Link::Tls | Link::WssUpgrade | Link::Wss => {}
            Link::WsUpgrade => {
                let status = match code {
                    ErrorCode::AuthTimeout => ws::HandshakeError::Timeout.response(),
                    _ => SERVICE_UNAVAILABLE.to_vec(),
                };
                conn.io().out.push(Bytes::from(status));
            }
            Link::Ws => {
                // Reason "<code> <NAME>", e.g. "2003 REPLACED".
                conn.io().out.push(ws::encode::encode_longlink_close(code as i32, code.as_str_name()));
            }
        }
        let deadline = conn.session.deadline();
        conn.wake();
        let device = Escaped(conn.device().unwrap_or(""));
        debug!(shard = %self.shard.id, conn = %ConnId::new(self.shard.id, key), %device, ?code, "closing");
        // A closing session leaves the indexes now: a new login of the same
        // device must not see it, and pushes must not count it.
        self.unindex(key.index, code);
        self.st.wheel.insert(key, deadline);
    }

    pub(super) fn queue_frame(&mut self, key: ConnKey, frame: &Frame) {
        let bytes = match frame {
            Frame::Pong => Bytes::from_static(&PONG),
            other => other.to_bytes(),
        };
        self.shard.counters.count_out(bytes.len());
        self.queue_bytes(key, bytes);
    }

    /// Queues an encoded frame; a full queue closes the session with SLOW.
    /// Returns whether the frame was queued.
    pub(super) fn queue_bytes(&mut self, key: ConnKey, bytes: Bytes) -> bool {
        let queued = self.enqueue(key, bytes);
        if queued && let Some(conn) = self.st.conn(key) {
            conn.wake();
        }
        queued
    }

    /// Queues bytes already in their wire form (a WebSocket control frame,
    /// the upgrade's answer, a frame partly written by a direct send), with
    /// the queue's bound. Wakes the task.
    pub(super) fn queue_raw(&mut self, key: ConnKey, bytes: Bytes) -> bool {
        let limit = self.shard.cfg.outbound_queue_bytes as usize;
        let Some(conn) = self.st.conn(key) else { return false };
        let io = conn.io();
        if io.out.bytes() + bytes.len() > limit && !io.out.is_empty() {
            let dropped = io.out.cut();
            self.close_slow(key, dropped, format!("outbound queue above {limit} bytes"));
            return false;
        }
        io.out.push(bytes);
        conn.wake();
        true
    }

    /// Closes session `key` from the server side with an `Error` frame.
    pub(crate) fn close_conn(&mut self, key: ConnKey, now: Now, code: ErrorCode, reason: String) {
        let mut actions = Vec::new();
        if let Some(conn) = self.st.conn(key) {
            conn.session.close(now, code, reason, &self.shard.live().params, &mut actions);
        }
        self.apply(key, now, &mut actions);
    }
}

/// The answer to a client's JOIN (`join`) or LEAVE.
fn group_result(group: String, join: bool, code: ErrorCode, reason: String) -> Frame {
    Frame::GroupResult(proto::GroupResult { group, join, code: code as i32, reason })
}
