//! HTTP beside the shards, never on them: a small blocking HTTP/1.1
//! server ([`server`]), the admin endpoints every node serves
//! ([`admin`]: /metrics and /healthz, plus /v1/dispatch and /drain in
//! cluster mode), the dispatcher ([`dispatcher`]) and the Prometheus text
//! writer ([`metrics`]).
//!
//! A listener is bound with the node's others (see `server::Listeners`)
//! and served here once the shards run; another listener with its own
//! handler is one more [`HttpServer::serve`] call.

pub mod admin;
pub mod dispatch_auth;
pub mod dispatcher;
pub mod guard;
pub mod metrics;
pub mod server;

pub use server::{Handler, HttpServer, Limits, Reply, Request, Response, parse_query};
pub(crate) use server::{MAX_HEAD, find_head_end, parse_head, percent_decode};
