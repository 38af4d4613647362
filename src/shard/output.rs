//! A session's way out: queueing frames on its `OutQueue`, direct sends to
//! an idle socket, batched deliveries and the flusher's writes. These run
//! inside one borrow of the state ([`ShardCtx`]).

use super::*;

impl ShardCtx<'_> {
    /// [`ShardCtx::queue_bytes`] without waking the task.
    pub(super) fn enqueue(&mut self, key: ConnKey, bytes: Bytes) -> bool {
        let limit = self.shard.cfg.outbound_queue_bytes as usize;
        let st = &mut *self.st;
        let Some(link) = st.conn_ref(key).map(|c| c.link) else { return false };
        let Some(bytes) = st.wrapper.wrap(link, &bytes) else { return false };
        let Some(conn) = st.conn(key) else { return false };
        let closing = conn.session.phase() == Phase::Closing;
        let io = conn.io();
        if io.out.bytes() + bytes.len() > limit && !io.out.is_empty() {
            if closing {
                // The closing frame (Error, Kicked) does not fit behind what
                // is still queued: close without it.
                return false;
            }
            // The client is not reading. Drop the backlog (but finish a
            // frame already on the wire) and tell it why, if the Error
            // frame fits in the bound.
            let dropped = io.out.cut();
            self.close_slow(key, dropped, format!("outbound queue above {limit} bytes"));
            return false;
        }
        io.out.push(bytes);
        true
    }

    pub(super) fn close_slow(&mut self, key: ConnKey, dropped: usize, reason: String) {
        let shard = self.shard;
        shard.counters.slow_closed.fetch_add(1, Ordering::Relaxed);
        shard.counters.slow_dropped_frames.fetch_add(dropped as u64, Ordering::Relaxed);
        debug!(shard = %shard.id, conn = %ConnId::new(shard.id, key), dropped, %reason, "slow consumer");
        let now = shard.now();
        let mut actions = Vec::new();
        if let Some(conn) = self.st.conn(key) {
            conn.session.close(now, ErrorCode::Slow, reason, &shard.live().params, &mut actions);
        }
        self.apply(key, now, &mut actions);
    }

    /// Hands `frame` to an active session: written at once when nothing is
    /// queued ahead of it, else queued. Returns whether it was accepted.
    /// Counted as a delivered message.
    pub(crate) fn deliver(&mut self, slot: u32, frame: &Bytes) -> bool {
        let ok = self.send_to_slot(slot, frame);
        if ok {
            self.shard.counters.delivered.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// [`ShardCtx::deliver`] without counting (resends, control frames).
    pub(crate) fn send_to_slot(&mut self, slot: u32, frame: &Bytes) -> bool {
        let shard = self.shard;
        let st = &mut *self.st;
        let key = st.key_of(slot);
        let Some(conn) = st.conn_ref(key) else { return false };
        if !conn.is_active() {
            return false;
        }
        shard.counters.count_out(frame.len());
        let Some(wire) = st.wrapper.wrap(conn.link, frame) else { return false };
        let frame = &wire;
        let Some(conn) = st.conn(key) else { return false };
        // Over TLS every record is sealed by the connection's task.
        // Hook: nothing is written while the session is being handed over.
        let idle =
            conn.io.as_ref().is_none_or(|io| io.out.is_empty()) && !conn.link.is_tls() && !shard.upgrade.frozen();
        let written = if idle {
            // On an error, let the task find it on its own write.
            fd::send(conn.fd.get(), frame).unwrap_or(0)
        } else {
            0
        };
        if written == frame.len() {
            return true;
        }
        if written == 0 {
            // Already in its wire form: queued as it is.
            return self.queue_raw(key, frame.clone());
        }
        // Part of the frame is on the wire. The queue (empty: `idle`) takes
        // the whole frame marked as partly written, so that cutting a slow
        // client later finishes this frame instead of dropping its tail.
        conn.io().out.push_written(frame.clone(), written);
        conn.wake();
        true
    }

    /// Queues `frame` for an active session and lists the session for the
    /// flusher task, which writes each listed session's whole queue with one
    /// `writev` a chunk of sessions at a time, letting the executor poll
    /// for new work in between. A fan-out costs a queue push per member;
    /// when fan-outs arrive faster than the sockets are written, frames for
    /// the same session pile up and go out together: fewer syscalls per
    /// delivery exactly when the shard is behind. Counted as delivered.
    pub(crate) fn deliver_batched(&mut self, slot: u32, frame: &Bytes) -> bool {
        let key = self.st.key_of(slot);
        if !self.st.conn(key).is_some_and(|c| c.is_active()) || !self.enqueue(key, frame.clone()) {
            return false;
        }
        let counters = &self.shard.counters;
        counters.count_out(frame.len());
        if let Some(io) = self.st.conn(key).and_then(|c| c.io.as_mut())
            && !io.in_flush
        {
            io.in_flush = true;
            self.st.flush.push_back(key);
        }
        counters.delivered.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Queues an upstream `Response` frame for session `key` (dropped if
    /// the session is gone or closing) without waking its task: the
    /// upstream code writes every answer of one pass with one `writev` per
    /// session at the end of the pass ([`ShardCtx::flush_responses`]).
    pub(crate) fn respond(&mut self, key: ConnKey, frame: Bytes) -> bool {
        self.shard.counters.count_out(frame.len());
        self.st.conn(key).is_some_and(|c| c.is_active()) && self.enqueue(key, frame)
    }

    /// Writes what [`ShardCtx::respond`] queued for `keys`; a socket that
    /// is full (or failed) is left to its task, which is woken.
    pub(crate) fn flush_responses(&mut self, keys: &[ConnKey]) {
        let frozen = self.shard.upgrade.frozen();
        for &key in keys {
            let Some(conn) = self.st.conn(key) else { continue };
            let Some(io) = conn.io.as_mut() else { continue };
            io.in_flush = false;
            if io.out.is_empty() {
                conn.release_io_if_idle();
                continue;
            }
            if conn.link.is_tls() || frozen {
                conn.wake();
            } else if let Ok(true) = io.out.write_now(conn.fd.get()) {
                io.stalled_since = None;
                conn.release_io_if_idle();
            } else {
                conn.wake();
            }
        }
    }
}
