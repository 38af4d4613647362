//! longlink: a long-connection gateway.
//!
//! Map of the crate, following the design (DESIGN.md):
//! - [`protocol`]: what server, SDK and push client share, no I/O: the
//!   frame codec and protobuf bodies, error codes, id newtypes and limits,
//!   `Millis`/`Now`, connect tokens.
//! - [`config`]: TOML config with documented defaults and `validate()`.
//! - [`session`]: the server's per-connection protocol state machine (no I/O, no clock).
//! - [`wheel`]: the per-shard coarse timer wheel that drives every deadline.
//! - [`shard`]: one executor's world: the `Shard` and its loops (timers,
//!   reload, shutdown, pacer, flusher, drain and upgrade drivers) in
//!   `shard/mod.rs`, the connection driver (accept, the connection task,
//!   hand-off, adoption) in `shard/driver.rs`: the only two files with
//!   `impl Shard`. What runs inside one borrow of its `State` (sessions,
//!   indexes, user directory, broadcast queue; `shard/state.rs`) is
//!   `impl ShardCtx`, by feature: a session's actions, output,
//!   registration, messages from other shards, the upgrade's freeze; the
//!   drain is a component (`shard/drain.rs`) with no I/O.
//! - [`conn`]: the only code that touches socket fds: the task's socket and
//!   the slot's handle, the outbound queue, the transport seam below framing.
//! - [`mesh`]: messages between shards.
//! - [`push`]: the push port: backend credentials and rights ([`push::auth`]), checks, backend requests split over shards,
//!   replies merged and summarized, reply deadlines; a component
//!   (`PushPort`) called through a small `PortHost` context the shard
//!   implements (`shard/hosts_features.rs`); `push` does not depend on `shard`.
//! - [`delivery`]: at-least-once delivery: the per-device window and
//!   resend schedule (`delivery` itself), timelines ([`delivery::store`],
//!   in memory or [`delivery::store_redis`]), and the component that ties
//!   them to sessions ([`delivery::reliable`]: ACKs, resends, resume),
//!   called through a small `Host` context the shard implements
//!   (`shard/hosts.rs`); `delivery` does not depend on `shard`.
//! - [`admission`]: per-source connection limits on the client listeners.
//! - [`groups`]: per-shard group membership; [`rate`]: the one token bucket.
//! - [`server`]: binds the listeners, starts the shards and wires the mesh
//!   between them, serves the admin port.
//! - [`liveness`]: per-shard turn counter and stall gauge.
//! - [`observe`]: per-shard series for operators (latencies, codes, queue
//!   bytes, sessions by platform and version).
//! - [`reload`]: SIGHUP and `POST /reload`: the config re-read and applied live.
//! - [`revocation`]: revoked users and devices, per shard.
//! - [`trim`]: freed memory given back after many connections closed.
//! - [`client`]: client session state machine and its glommio driver.
//! - [`sdk`]: the client SDK: reconnects, drift, smart heartbeat, resume,
//!   retried requests (sans-IO agent, glommio driver, blocking facade).
//! - [`backend`]: blocking client for the push port (backends, CLI, bench).
//! - [`upstream`]: client requests forwarded to service backends over
//!   persistent links, connection events, dedup of retries, per-connection
//!   rate limit; a component (`Upstream`) called through `UpstreamHost`
//!   (`shard/hosts_features.rs`); `upstream` does not depend on `shard`.
//! - [`echo`]: an example service backend (tests, bench, README).
//! - [`sidecar`]: the machinery of the threads beside the shards that talk
//!   to Redis: one lazily connected link with its scripts, the job channel
//!   and the completions a shard awaits. The Redis store and the router run
//!   on it.
//! - Cluster mode: [`router`] (routes with epochs, node leases, in Redis, on
//!   sidecar threads; [`router::lease`] on its own thread), [`cluster`] (route claims, pushes
//!   forwarded between nodes, merged replies, drain, cluster counters; the
//!   claim bookkeeping is a component, `cluster::Routes`; the rest is still
//!   `impl Shard` and imports `shard`).
//! - [`http`]: beside the shards, on threads: the admin port of every node
//!   (/metrics, /healthz; /v1/dispatch and /drain in cluster mode), the
//!   dispatcher, the Prometheus writer.

pub mod admission;
pub mod backend;
pub mod client;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod echo;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod groups;
pub mod http;
pub mod liveness;
pub mod mesh;
pub mod observe;
pub mod protocol;
pub mod push;
pub mod rate;
pub mod reload;
pub mod revocation;
pub mod router;
pub mod sdk;
pub mod server;
pub mod session;
pub mod shard;
pub mod sidecar;
pub mod trim;
pub mod upgrade;
pub mod upstream;
pub mod wheel;
