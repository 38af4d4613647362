//! Group membership on one shard.
//!
//! Membership belongs to sessions: a session joins and leaves groups (by its
//! own frame or a backend's request) and leaves all of them when it closes.
//! Sessions that never join a group cost nothing here.

use std::collections::HashMap;

pub use crate::config::ClientGroupsConfig;

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
///
/// Laid out for many members and few groups per session (issue 15: the
/// hash set per group plus a map of boxed names per session cost ~200 B per
/// member): each group is a vector of member slots, and each session's
/// first membership is 8 bytes in a vector indexed by slot that says where
/// it sits in that group's vector, so leaving is a swap-remove. A member
/// costs ~12-16 B; fan-out walks a plain slice. The rare sessions in more
/// than one group keep their further memberships in `more`.
#[derive(Default)]
pub struct Groups {
    /// Group name -> index into `groups`.
    ids: HashMap<Box<str>, u32>,
    /// By group index; emptied entries are reused through `free`.
    groups: Vec<Group>,
    free: Vec<u32>,
    /// By session slot: its first membership, or [`Membership::NONE`]. Only
    /// grows to the highest slot that joined a group.
    first: Vec<Membership>,
    /// Memberships after the first, of sessions in several groups.
    more: HashMap<u32, Vec<Membership>>,
    /// Sessions with at least one group.
    sessions: usize,
}

#[derive(Default)]
struct Group {
    name: Box<str>,
    members: Vec<u32>,
}

/// A session's membership: the group's index and the session's position
/// in that group's member vector.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Membership {
    group: u32,
    pos: u32,
}

impl Membership {
    const NONE: Membership = Membership { group: u32::MAX, pos: u32::MAX };
}

/// Why a join was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum JoinError {
    TooManyGroups { limit: usize },
}

impl Groups {
    /// Adds `slot` to `group`; joining twice is a no-op.
    pub fn join(&mut self, slot: u32, group: &str, limit: usize) -> Result<(), JoinError> {
        let existing = self.ids.get(group).copied();
        if let Some(gid) = existing
            && self.find(slot, gid).is_some()
        {
            return Ok(());
        }
        if self.group_count_of(slot) >= limit {
            return Err(JoinError::TooManyGroups { limit });
        }
        let gid = match existing {
            Some(gid) => gid,
            None => self.new_group(group),
        };
        let members = &mut self.groups[gid as usize].members;
        let m = Membership { group: gid, pos: members.len() as u32 };
        members.push(slot);
        let i = slot as usize;
        if self.first.len() <= i {
            self.first.resize(i + 1, Membership::NONE);
        }
        if self.first[i] == Membership::NONE {
            self.first[i] = m;
            self.sessions += 1;
        } else {
            self.more.entry(slot).or_default().push(m);
        }
        Ok(())
    }

    /// Removes `slot` from `group`; returns whether it was a member.
    pub fn leave(&mut self, slot: u32, group: &str) -> bool {
        let Some(&gid) = self.ids.get(group) else { return false };
        let Some(m) = self.find(slot, gid) else { return false };
        self.forget(slot, gid);
        self.remove_member(m);
        true
    }

    /// The groups `slot` joined (the in-place upgrade carries them over).
    pub fn of(&self, slot: u32) -> impl Iterator<Item = &str> + '_ {
        let first = self.first.get(slot as usize).copied().filter(|m| *m != Membership::NONE);
        let more = self.more.get(&slot).into_iter().flatten().copied();
        first.into_iter().chain(more).filter_map(|m| self.groups.get(m.group as usize)).map(|g| &*g.name)
    }

    /// Removes `slot` from every group (the session closed).
    pub fn leave_all(&mut self, slot: u32) {
        let Some(first) = self.first.get_mut(slot as usize) else { return };
        let m = std::mem::replace(first, Membership::NONE);
        if m == Membership::NONE {
            return;
        }
        self.sessions -= 1;
        self.remove_member(m);
        for m in self.more.remove(&slot).unwrap_or_default() {
            self.remove_member(m);
        }
    }

    /// Member slots of `group` on this shard.
    pub fn members(&self, group: &str) -> impl Iterator<Item = u32> + '_ {
        self.members_of(group).iter().copied()
    }

    pub fn count(&self, group: &str) -> usize {
        self.members_of(group).len()
    }

    /// Number of groups with members here (for leak checks).
    pub fn group_count(&self) -> usize {
        self.ids.len()
    }

    /// Number of sessions with at least one group (for leak checks).
    pub fn session_count(&self) -> usize {
        self.sessions
    }

    fn members_of(&self, group: &str) -> &[u32] {
        self.ids.get(group).map_or(&[], |&gid| &self.groups[gid as usize].members)
    }

    fn new_group(&mut self, name: &str) -> u32 {
        let gid = match self.free.pop() {
            Some(gid) => gid,
            None => {
                self.groups.push(Group::default());
                (self.groups.len() - 1) as u32
            }
        };
        self.groups[gid as usize].name = name.into();
        self.ids.insert(name.into(), gid);
        gid
    }

    fn group_count_of(&self, slot: u32) -> usize {
        match self.first.get(slot as usize) {
            Some(&m) if m != Membership::NONE => 1 + self.more.get(&slot).map_or(0, Vec::len),
            _ => 0,
        }
    }

    /// The membership of `slot` in group `gid`.
    fn find(&self, slot: u32, gid: u32) -> Option<Membership> {
        let first = *self.first.get(slot as usize)?;
        if first == Membership::NONE {
            return None;
        }
        if first.group == gid {
            return Some(first);
        }
        self.more.get(&slot)?.iter().find(|m| m.group == gid).copied()
    }

    /// The membership of `slot` in group `gid`, to update its position.
    fn find_mut(&mut self, slot: u32, gid: u32) -> Option<&mut Membership> {
        let first = self.first.get_mut(slot as usize)?;
        if first.group == gid {
            return Some(first);
        }
        self.more.get_mut(&slot)?.iter_mut().find(|m| m.group == gid)
    }

    /// Drops `slot`'s record of its membership in `gid` (which it has).
    fn forget(&mut self, slot: u32, gid: u32) {
        let i = slot as usize;
        if self.first[i].group == gid {
            // Promote a further membership, if any, into the inline one.
            match self.more.get_mut(&slot).and_then(Vec::pop) {
                Some(next) => self.first[i] = next,
                None => {
                    self.first[i] = Membership::NONE;
                    self.sessions -= 1;
                }
            }
        } else if let Some(more) = self.more.get_mut(&slot) {
            more.retain(|m| m.group != gid);
        }
        if self.more.get(&slot).is_some_and(Vec::is_empty) {
            self.more.remove(&slot);
        }
    }

    /// Takes the member at `m` out of its group's vector (swap-remove),
    /// fixing the position of the member moved into its place; frees the
    /// group when it empties.
    fn remove_member(&mut self, m: Membership) {
        let group = &mut self.groups[m.group as usize];
        let pos = m.pos as usize;
        group.members.swap_remove(pos);
        if let Some(&moved) = group.members.get(pos)
            && let Some(moved) = self.find_mut(moved, m.group)
        {
            moved.pos = m.pos;
        }
        let group = &mut self.groups[m.group as usize];
        if group.members.is_empty() {
            self.ids.remove(&group.name);
            *group = Group::default();
            self.free.push(m.group);
        } else if group.members.capacity() > 64 && group.members.len() < group.members.capacity() / 4 {
            // A group that shrank a lot gives most of its vector back.
            let half = group.members.capacity() / 2;
            group.members.shrink_to(half);
        }
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

    /// Random joins, leaves and closes against a plain model: every
    /// swap-remove must leave each member's recorded position right, or a
    /// later leave removes the wrong session.
    #[test]
    fn random_operations_match_a_model() {
        use std::collections::{BTreeMap, BTreeSet};
        let mut g = Groups::default();
        let mut model: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let limit = 3;
        for _ in 0..6_000 {
            let slot = next(200) as u32;
            let group = format!("g{}", next(6));
            let mine = model.values().filter(|m| m.contains(&slot)).count();
            match next(10) {
                0..=4 => {
                    let res = g.join(slot, &group, limit);
                    let already = model.get(&group).is_some_and(|m| m.contains(&slot));
                    if already || mine < limit {
                        assert_eq!(res, Ok(()));
                        model.entry(group).or_default().insert(slot);
                    } else {
                        assert_eq!(res, Err(JoinError::TooManyGroups { limit }));
                    }
                }
                5..=8 => {
                    let was = model.get_mut(&group).is_some_and(|m| m.remove(&slot));
                    assert_eq!(g.leave(slot, &group), was);
                }
                _ => {
                    g.leave_all(slot);
                    model.values_mut().for_each(|m| {
                        m.remove(&slot);
                    });
                }
            }
            model.retain(|_, m| !m.is_empty());
            for (name, members) in &model {
                let mut got: Vec<u32> = g.members(name).collect();
                got.sort_unstable();
                assert_eq!(got, members.iter().copied().collect::<Vec<_>>(), "members of {name}");
            }
            assert_eq!(g.group_count(), model.len());
            let sessions: BTreeSet<u32> = model.values().flatten().copied().collect();
            assert_eq!(g.session_count(), sessions.len());
        }
        for slot in 0..200 {
            g.leave_all(slot);
        }
        assert_eq!((g.group_count(), g.session_count(), g.more.len()), (0, 0, 0));
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
