//! Unit tests of `server.rs`.

use super::*;

#[test]
fn mesh_memory_stays_linear_in_the_shard_count() {
    assert_eq!(mesh_capacity(1), 1024);
    assert_eq!(mesh_capacity(2), 1024);
    assert_eq!(mesh_capacity(17), 1024);
    assert_eq!(mesh_capacity(18), 512);
    assert_eq!(mesh_capacity(100), 128);
    assert_eq!(mesh_capacity(256), 64);
    for shards in 2..=crate::protocol::ids::MAX_SHARDS {
        let slots = (usize::from(shards) - 1) * mesh_capacity(shards);
        assert!(slots <= MESH_SLOTS_PER_SHARD.max(255 * MIN_MESH_CAPACITY), "{shards}: {slots}");
    }
}
