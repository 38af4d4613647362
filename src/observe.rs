//! Per-shard series for operating a node (single node and cluster alike):
//! push latency, disconnects and push-port refusals by
//! code, outbound queue bytes, sessions by platform and app version.
//!
//! Every counter is a per-shard atomic written by its shard only; the admin
//! thread reads them. Session labels come from clients, so they are
//! sanitized and capped ([`SESSION_KINDS`] distinct pairs per process,
//! then "other"): a client cannot grow the exposition.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::proto::ErrorCode;
use crate::stats::{AtomicHistogram, DISCONNECT_CODES};

/// Distinct (platform, app version) pairs counted per process.
pub const SESSION_KINDS: usize = 64;
/// Longest label value kept (longer ones are cut).
const MAX_LABEL_BYTES: usize = 32;

/// Push-port refusal codes counted separately (others count as "OTHER").
pub const REFUSAL_CODES: [ErrorCode; 5] = [
    ErrorCode::Unauthenticated,
    ErrorCode::PermissionDenied,
    ErrorCode::BadFrame,
    ErrorCode::LimitExceeded,
    ErrorCode::FrameTooLarge,
];

/// One shard's operations counters.
#[derive(Debug)]
pub struct OpsCounters {
    /// Push-port requests from read to answer (this shard's part in
    /// cluster mode).
    pub push_latency: AtomicHistogram,
    /// Sessions ended, by [`DISCONNECT_CODES`] index (last: other codes).
    pub disconnects: [AtomicU64; DISCONNECT_CODES.len() + 1],
    /// Push-port requests refused with an error, by [`REFUSAL_CODES`]
    /// index (last: other codes). Unauthenticated connections and denied
    /// requests are in `ShardCounters::push_refused` / `push_denied`.
    pub request_errors: [AtomicU64; REFUSAL_CODES.len() + 1],
    /// Bytes waiting in this shard's outbound queues (sessions and
    /// backend links), published each timer tick.
    pub queued_bytes: AtomicU64,
    /// Sessions by [`session_kinds`] index (last: "other").
    pub sessions_by_kind: [AtomicU64; SESSION_KINDS + 1],
}

impl Default for OpsCounters {
    fn default() -> Self {
        OpsCounters {
            push_latency: AtomicHistogram::default(),
            disconnects: Default::default(),
            request_errors: Default::default(),
            queued_bytes: AtomicU64::new(0),
            sessions_by_kind: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl OpsCounters {
    pub(crate) fn session_up(&self, platform: &str, version: &str) {
        self.sessions_by_kind[kind_index(platform, version)].fetch_add(1, Ordering::Relaxed);
    }

    /// A session left the indexes: its kind and why it ended.
    pub(crate) fn session_gone(&self, platform: Option<&str>, version: Option<&str>, code: ErrorCode) {
        let slot = &self.sessions_by_kind[kind_index(platform.unwrap_or(""), version.unwrap_or(""))];
        // Never below zero, should the pair have been counted elsewhere.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let i = DISCONNECT_CODES.iter().position(|&c| c == code).unwrap_or(DISCONNECT_CODES.len());
        self.disconnects[i].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_error(&self, code: i32) {
        let i = REFUSAL_CODES.iter().position(|&c| c as i32 == code).unwrap_or(REFUSAL_CODES.len());
        self.request_errors[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A (platform, app version) pair, filled once.
type KindSlot = OnceLock<(Box<str>, Box<str>)>;

/// The label pairs seen so far, by index; filled once each, never freed.
fn kinds() -> &'static [KindSlot; SESSION_KINDS] {
    static KINDS: OnceLock<[KindSlot; SESSION_KINDS]> = OnceLock::new();
    KINDS.get_or_init(|| std::array::from_fn(|_| OnceLock::new()))
}

/// The (platform, app version) label pairs by index ([`SESSION_KINDS`] is
/// "other").
pub fn session_kinds() -> impl Iterator<Item = (usize, &'static str, &'static str)> {
    kinds().iter().enumerate().filter_map(|(i, k)| k.get().map(|(p, v)| (i, &**p, &**v)))
}

/// A label value as exported: printable ASCII letters, digits and `._-+`
/// kept, anything else `_`, cut at [`MAX_LABEL_BYTES`]; empty is "unknown".
pub fn sanitize(value: &str) -> std::borrow::Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+');
    if value.is_empty() {
        return "unknown".into();
    }
    if value.len() <= MAX_LABEL_BYTES && value.chars().all(ok) {
        return value.into();
    }
    value.chars().take(MAX_LABEL_BYTES).map(|c| if ok(c) { c } else { '_' }).collect::<String>().into()
}

/// The index of a pair, taking a free one for a new pair while there is one.
fn kind_index(platform: &str, version: &str) -> usize {
    let (platform, version) = (sanitize(platform), sanitize(version));
    let same = |k: &(Box<str>, Box<str>)| *k.0 == *platform && *k.1 == *version;
    for (i, slot) in kinds().iter().enumerate() {
        match slot.get() {
            Some(k) if same(k) => return i,
            Some(_) => {}
            None => {
                // Another shard may fill it first: then it is theirs unless
                // it is the same pair.
                let _ = slot.set((platform.as_ref().into(), version.as_ref().into()));
                if slot.get().is_some_and(same) {
                    return i;
                }
            }
        }
    }
    SESSION_KINDS
}

impl OpsCounters {
    /// Publishes the gauges a shard keeps locally (each timer tick, on the
    /// shard's thread).
    pub(crate) fn publish_ops_gauges(&self) {
        self.queued_bytes.store(crate::conn::outq::thread_queued_bytes(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_sanitized_and_bounded() {
        assert_eq!(sanitize("ios"), "ios");
        assert_eq!(sanitize(""), "unknown");
        assert_eq!(sanitize("a\"b}\n{c"), "a_b___c");
        assert_eq!(sanitize(&"x".repeat(100)).len(), MAX_LABEL_BYTES);
        let c = OpsCounters::default();
        for i in 0..SESSION_KINDS * 2 {
            c.session_up("test-flood", &format!("v{i}"));
        }
        let total: u64 = c.sessions_by_kind.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        assert_eq!(total, SESSION_KINDS as u64 * 2);
        assert!(c.sessions_by_kind[SESSION_KINDS].load(Ordering::Relaxed) >= SESSION_KINDS as u64, "overflow in other");
        assert!(session_kinds().count() <= SESSION_KINDS);
        c.session_gone(Some("test-flood"), Some("v0"), ErrorCode::Slow);
        c.session_gone(Some("never-seen"), Some("x"), ErrorCode::Kicked);
        let slow = DISCONNECT_CODES.iter().position(|&c| c == ErrorCode::Slow).unwrap();
        assert_eq!(c.disconnects[slow].load(Ordering::Relaxed), 1);
    }
}
