//! Identifier newtypes, so a shard index can never be passed as a slot index.

use std::fmt;

/// Most shards a node runs: message ids carry the shard in 8 bits
/// ([`crate::delivery::MessageIds`]).
pub const MAX_SHARDS: u16 = 256;

/// Index of a shard (one glommio executor, one core) within this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A session's place in its shard's slab. The generation tells a reused
/// slot apart from the session that held it before, so a stale key (in the
/// timer wheel, in a queued message) never reaches the wrong connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub index: u32,
    pub generation: u32,
}

/// A connection id unique within the node while the node runs: the shard in
/// the top 16 bits, the low 16 bits of the slot generation, then the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

impl ConnId {
    pub fn new(shard: ShardId, key: ConnKey) -> ConnId {
        ConnId(u64::from(shard.0) << 48 | u64::from(key.generation & 0xffff) << 32 | u64::from(key.index))
    }

    pub fn shard(self) -> ShardId {
        ShardId((self.0 >> 48) as u16)
    }

    pub fn index(self) -> u32 {
        self.0 as u32
    }

    /// Low 16 bits of the generation, as carried in the id.
    pub fn gen16(self) -> u16 {
        (self.0 >> 32) as u16
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.shard(), self.index(), self.gen16())
    }
}

/// Stable 64-bit hash of an id string: FNV-1a with a splitmix finalizer so
/// the low bits (used for `% shards`) are well mixed. Stable across
/// processes and versions: the cluster router stores shard numbers.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The shard that owns `device` on a node with `shards` shards.
pub fn owner_shard(device: &str, shards: u16) -> ShardId {
    ShardId((stable_hash(device) % u64::from(shards.max(1))) as u16)
}

/// The home shard of a user: it keeps the user's directory entry.
pub fn home_shard(user: &str, shards: u16) -> ShardId {
    owner_shard(user, shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_id_packs_and_unpacks() {
        let id = ConnId::new(ShardId(3), ConnKey { index: 77, generation: 0x1_0005 });
        assert_eq!(id.shard(), ShardId(3));
        assert_eq!(id.index(), 77);
        assert_eq!(id.gen16(), 5);
    }

    #[test]
    fn owner_shard_is_stable_and_spreads() {
        assert_eq!(stable_hash("device-1"), stable_hash("device-1"));
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[owner_shard(&format!("device-{i}"), 4).index()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
    }
}
