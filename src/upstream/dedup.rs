//! The dedup window: a client's retry of a request (same device, same
//! client message id) is answered from here, never forwarded twice.

use super::*;

/// (hash of the device, client_msg_id).
pub(super) type DedupKey = (u64, u64);

pub(super) enum DedupState {
    InFlight(u64),
    Done(Outcome),
}

pub(super) struct DedupEntry {
    /// Tells this entry apart from an older one under the same key in `order`.
    pub(super) seq: u64,
    /// Checked on lookup: a hash collision must never replay another
    /// device's answer.
    pub(super) device: Box<str>,
    pub(super) service: u16,
    pub(super) state: DedupState,
}

impl DedupEntry {
    pub(super) fn bytes(&self) -> usize {
        DEDUP_ENTRY_OVERHEAD
            + self.device.len()
            + match &self.state {
                DedupState::Done(o) => o.stored_bytes(),
                DedupState::InFlight(_) => 0,
            }
    }
}

/// What the dedup table knows about a request.
#[derive(Debug, PartialEq)]
pub(super) enum Seen {
    /// First attempt: forward it and record it under this key.
    New(DedupKey),
    /// Answered before: replay.
    Done(Outcome),
    /// The first attempt is still in flight (pending id).
    InFlight(u64),
    /// Not deduplicable (no client_msg_id, dedup off, or a key collision).
    Untracked,
}

/// The dedup table of one shard: bounded by entries and bytes, expired in
/// insertion order.
#[derive(Default)]
pub(super) struct Dedup {
    pub(super) entries: HashMap<DedupKey, DedupEntry>,
    /// (inserted at, key, seq), oldest first.
    pub(super) order: VecDeque<(Millis, DedupKey, u64)>,
    pub(super) next_seq: u64,
    pub(super) bytes: usize,
}

impl Dedup {
    pub(super) fn lookup(&self, device: &str, service: u16, client_msg_id: u64, enabled: bool) -> Seen {
        if client_msg_id == 0 || !enabled {
            return Seen::Untracked;
        }
        let key = (stable_hash(device), client_msg_id);
        match self.entries.get(&key) {
            None => Seen::New(key),
            Some(e) if &*e.device != device || e.service != service => Seen::Untracked,
            Some(DedupEntry { state: DedupState::Done(o), .. }) => Seen::Done(o.clone()),
            Some(DedupEntry { state: DedupState::InFlight(id), .. }) => Seen::InFlight(*id),
        }
    }

    pub(super) fn insert(&mut self, key: DedupKey, device: Box<str>, service: u16, pending: u64, now: Millis) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let entry = DedupEntry { seq, device, service, state: DedupState::InFlight(pending) };
        self.bytes += entry.bytes();
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.bytes();
        }
        self.order.push_back((now, key, seq));
    }

    /// Records the answer of pending request `id`, if its entry is still there.
    pub(super) fn finish(&mut self, key: DedupKey, id: u64, outcome: &Outcome) {
        if let Some(e) = self.entries.get_mut(&key)
            && matches!(e.state, DedupState::InFlight(p) if p == id)
        {
            self.bytes += outcome.stored_bytes();
            e.state = DedupState::Done(outcome.clone());
        }
    }

    /// Drops entries older than the window (answered ones; one still in
    /// flight is kept until it is answered) and evicts the oldest while over
    /// a cap. Returns how many were evicted by a cap.
    pub(super) fn trim(&mut self, now: Millis, window_ms: u64, max_entries: usize, max_bytes: usize) -> u64 {
        let mut evicted = 0;
        while let Some(&(at, key, seq)) = self.order.front() {
            let expired = now.0 >= at.0.saturating_add(window_ms);
            let over = self.entries.len() > max_entries || self.bytes > max_bytes;
            if !expired && !over {
                break;
            }
            self.order.pop_front();
            let Some(e) = self.entries.get(&key).filter(|e| e.seq == seq) else { continue };
            if expired && !over && matches!(e.state, DedupState::InFlight(_)) {
                self.order.push_back((now, key, seq));
                continue;
            }
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= e.bytes();
                evicted += u64::from(!expired);
            }
        }
        evicted
    }

    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}
