//! Group membership on one shard.
//!
//! Membership belongs to sessions: a session joins and leaves groups (by its
//! own frame or a backend's request) and leaves all of them when it closes.
//! Sessions that never join a group cost nothing here.

use std::collections::HashMap;

use hashbrown::HashSet;

crate::config::config_struct! {
    /// `[client_groups]`: which groups clients may JOIN by their own frame
    /// (backends add devices to any group with a push key's `groups`
    /// right). A JOIN is allowed when the group matches a pattern here or
    /// in the connect token's `groups` claim; every other JOIN is answered
    /// `GroupResult{PERMISSION_DENIED}`.
    pub struct ClientGroupsConfig {
        /// Groups any authenticated client may join: exact names, or
        /// prefixes written with a trailing '*' ("lobby-*"; "*" allows
        /// every group). Default: none (client JOIN off unless the token
        /// allows the group).
        pub allow: Vec<String> = Vec::new(),
    }
}

/// Groups a token's claim may name, at most.
pub const MAX_GROUP_CLAIMS: usize = 64;

/// Whether `group` matches `pattern`: equal, or `pattern` ends with '*' and
/// `group` starts with what precedes it.
pub fn matches(pattern: &str, group: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => group.starts_with(prefix),
        None => pattern == group,
    }
}

/// Whether a client may JOIN `group`: the node's policy or its token's claim.
pub fn join_allowed<'a>(group: &str, policy: &[String], claims: impl IntoIterator<Item = &'a str>) -> bool {
    policy.iter().any(|p| matches(p, group)) || claims.into_iter().any(|p| matches(p, group))
}

/// Members (session slots) of every group with at least one member here.
#[derive(Default)]
pub struct Groups {
    members: HashMap<Box<str>, HashSet<u32>>,
    /// Groups of each session that joined any, for cleanup on close.
    of_session: HashMap<u32, Vec<Box<str>>>,
}

/// Why a join was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    TooManyGroups { limit: usize },
}

impl Groups {
    /// Adds `slot` to `group`; joining twice is a no-op.
    pub fn join(&mut self, slot: u32, group: &str, limit: usize) -> Result<(), JoinError> {
        let mine = self.of_session.entry(slot).or_default();
        if mine.iter().any(|g| &**g == group) {
            return Ok(());
        }
        if mine.len() >= limit {
            if mine.is_empty() {
                self.of_session.remove(&slot);
            }
            return Err(JoinError::TooManyGroups { limit });
        }
        mine.push(group.into());
        self.members.entry(group.into()).or_default().insert(slot);
        Ok(())
    }

    /// Removes `slot` from `group`; returns whether it was a member.
    pub fn leave(&mut self, slot: u32, group: &str) -> bool {
        let Some(mine) = self.of_session.get_mut(&slot) else { return false };
        let Some(pos) = mine.iter().position(|g| &**g == group) else { return false };
        mine.swap_remove(pos);
        if mine.is_empty() {
            self.of_session.remove(&slot);
        }
        self.remove_member(group, slot);
        true
    }

    /// The groups `slot` joined (the in-place upgrade carries them over).
    pub fn of(&self, slot: u32) -> impl Iterator<Item = &str> + '_ {
        self.of_session.get(&slot).into_iter().flatten().map(|g| &**g)
    }

    /// Removes `slot` from every group (the session closed).
    pub fn leave_all(&mut self, slot: u32) {
        for group in self.of_session.remove(&slot).unwrap_or_default() {
            self.remove_member(&group, slot);
        }
    }

    fn remove_member(&mut self, group: &str, slot: u32) {
        if let Some(set) = self.members.get_mut(group) {
            set.remove(&slot);
            if set.is_empty() {
                self.members.remove(group);
            }
        }
    }

    /// Member slots of `group` on this shard.
    pub fn members(&self, group: &str) -> impl Iterator<Item = u32> + '_ {
        self.members.get(group).into_iter().flatten().copied()
    }

    pub fn count(&self, group: &str) -> usize {
        self.members.get(group).map_or(0, HashSet::len)
    }

    /// Number of groups with members here (for leak checks).
    pub fn group_count(&self) -> usize {
        self.members.len()
    }

    /// Number of sessions with at least one group (for leak checks).
    pub fn session_count(&self) -> usize {
        self.of_session.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_need_a_matching_policy_or_claim() {
        let policy = vec!["lobby".to_string(), "pub-*".to_string()];
        assert!(join_allowed("lobby", &policy, []));
        assert!(join_allowed("pub-7", &policy, []));
        assert!(!join_allowed("lobby-2", &policy, []));
        assert!(!join_allowed("room-1", &policy, []));
        assert!(join_allowed("room-1", &policy, ["room-*"]));
        assert!(join_allowed("vip", &[], ["vip"]));
        assert!(!join_allowed("vipx", &[], ["vip"]));
        assert!(!join_allowed("anything", &[], []), "off by default");
        assert!(join_allowed("anything", &["*".into()], []));
    }

    #[test]
    fn join_leave_and_cleanup_leave_no_residue() {
        let mut g = Groups::default();
        g.join(1, "a", 8).unwrap();
        g.join(1, "a", 8).unwrap();
        g.join(1, "b", 8).unwrap();
        g.join(2, "a", 8).unwrap();
        assert_eq!(g.count("a"), 2);
        assert!(g.leave(2, "a"));
        assert!(!g.leave(2, "a"));
        assert_eq!(g.members("a").collect::<Vec<_>>(), vec![1]);
        g.leave_all(1);
        assert_eq!((g.group_count(), g.session_count()), (0, 0));
    }

    #[test]
    fn join_limit() {
        let mut g = Groups::default();
        g.join(1, "a", 1).unwrap();
        assert_eq!(g.join(1, "b", 1), Err(JoinError::TooManyGroups { limit: 1 }));
        assert_eq!(g.join(2, "b", 0), Err(JoinError::TooManyGroups { limit: 0 }));
        assert_eq!(g.session_count(), 1);
    }
}
