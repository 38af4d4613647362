//! Sidecar threads: the blocking Redis work beside the shards. A shard
//! never talks to Redis itself; it sends a job over a bounded channel to a
//! sidecar thread and awaits a completion (see [`redis_link`]). The
//! timeline store (`delivery::store_redis`), the router and the node lease
//! (`router`, `router::lease`) each run one.
//!
//! The router stays its own top-level folder: it is a cluster component
//! (routes, epochs, node registry) used by the shards, the dispatcher, the
//! SDK's node picking and the CLI, of which the sidecar thread is only the
//! way it reaches Redis, just as for the Redis store under `delivery/`.

pub mod redis_link;
