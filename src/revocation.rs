//! Revoked users and devices: tokens issued at or before a "not before"
//! time are refused at Auth and Refresh (`REVOKED`, terminal).
//!
//! Each shard keeps its own copy (a revocation is sent to every shard), so
//! the check at Auth takes no lock. An entry is kept only as long as a
//! token issued before it could still be valid (the node's longest token
//! lifetime plus the clock leeway), then dropped.
//!
//! In cluster mode the revocations are also kept in Redis (the router's
//! revocation log, [`crate::router::Router::revoke`]) for as long: a node
//! reads the whole log before it takes logins (until then they are refused
//! with `UNAVAILABLE`, retryable) and then reads what was added every
//! second, so a node started after a revocation, or one the revoking node
//! could not reach, refuses the old tokens too.

use std::collections::HashMap;

/// One shard's revocations. See the module docs.
#[derive(Debug, Default)]
pub struct Revocations {
    devices: HashMap<String, i64>,
    users: HashMap<String, i64>,
    /// How long an entry matters, in seconds.
    keep_secs: i64,
    /// Cluster mode: the revocations stored in Redis have not been read
    /// yet, so no login can be judged.
    awaiting_load: bool,
}

impl Revocations {
    pub fn new(keep_secs: i64) -> Revocations {
        Revocations { keep_secs, ..Revocations::default() }
    }

    /// The longest time an entry matters (the longest token lifetime plus
    /// the clock leeway), in seconds.
    pub fn keep_secs(&self) -> i64 {
        self.keep_secs
    }

    /// Cluster mode: logins wait for [`Revocations::loaded`].
    pub fn await_load(&mut self) {
        self.awaiting_load = true;
    }

    /// The revocations stored in the cluster have all been recorded here.
    pub fn loaded(&mut self) {
        self.awaiting_load = false;
    }

    /// Whether logins can be judged (see [`Revocations::await_load`]).
    pub fn is_loaded(&self) -> bool {
        !self.awaiting_load
    }

    /// Records that tokens of `devices` and `users` issued at or before
    /// `not_before` (unix seconds) are refused; drops entries that no
    /// longer matter at `now`.
    pub fn record(&mut self, devices: &[String], users: &[String], not_before: i64, now: i64) {
        let keep = |t: &mut i64| t.saturating_add(self.keep_secs) >= now;
        self.devices.retain(|_, t| keep(t));
        self.users.retain(|_, t| keep(t));
        for (map, ids) in [(&mut self.devices, devices), (&mut self.users, users)] {
            for id in ids {
                let t = map.entry(id.clone()).or_insert(not_before);
                *t = (*t).max(not_before);
            }
        }
    }

    /// Whether a token of `user` and `device` issued at `issued_at` is revoked.
    pub fn refuses(&self, user: &str, device: &str, issued_at: i64) -> bool {
        let hit = |t: Option<&i64>| t.is_some_and(|&t| issued_at <= t);
        hit(self.devices.get(device)) || hit(self.users.get(user))
    }

    /// Every entry, `(is_user, id, not_before)`: the in-place upgrade
    /// hands them to the new process.
    pub fn entries(&self) -> Vec<(bool, String, i64)> {
        let devices = self.devices.iter().map(|(id, &t)| (false, id.clone(), t));
        devices.chain(self.users.iter().map(|(id, &t)| (true, id.clone(), t))).collect()
    }

    /// Takes in entries from [`Revocations::entries`] of the old process.
    pub fn restore(&mut self, entries: Vec<(bool, String, i64)>) {
        for (is_user, id, not_before) in entries {
            let map = if is_user { &mut self.users } else { &mut self.devices };
            let t = map.entry(id).or_insert(not_before);
            *t = (*t).max(not_before);
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len() + self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Stored revocations grouped by their time, `(not_before, devices,
/// users)`, for [`Revocations::record`].
pub fn by_time(entries: Vec<crate::router::StoredRevocation>) -> Vec<(i64, Vec<String>, Vec<String>)> {
    let mut groups: Vec<(i64, Vec<String>, Vec<String>)> = Vec::new();
    for e in entries {
        let i = match groups.iter().position(|g| g.0 == e.not_before) {
            Some(i) => i,
            None => {
                groups.push((e.not_before, Vec::new(), Vec::new()));
                groups.len() - 1
            }
        };
        let group = &mut groups[i];
        if e.is_user { group.2.push(e.id) } else { group.1.push(e.id) }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_issued_up_to_not_before_are_refused_until_they_expire() {
        let mut r = Revocations::new(100);
        r.record(&["phone".into()], &["bob".into()], 1_000, 1_000);
        assert!(r.refuses("alice", "phone", 1_000));
        assert!(!r.refuses("alice", "phone", 1_001), "issued after the revocation");
        assert!(r.refuses("bob", "tablet", 900));
        assert!(!r.refuses("carol", "tablet", 900));
        // Later than not_before + the longest lifetime: forgotten.
        r.record(&[], &["dave".into()], 1_200, 1_200);
        assert_eq!(r.len(), 1);
        assert!(!r.refuses("alice", "phone", 1_000));
    }
}
