//! Group membership on one shard.
//!
//! Membership belongs to sessions: a session joins and leaves groups (by its
//! own frame or a backend's request) and leaves all of them when it closes.
//! Sessions that never join a group cost nothing here.

use std::collections::HashMap;

use hashbrown::HashSet;

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
