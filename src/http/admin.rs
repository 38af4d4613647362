//! The admin endpoints every node serves on `server.admin_listen`
//! (127.0.0.1:7102 by default; keep it private):
//! `GET /metrics` (Prometheus text) and `GET /healthz` (200 while the node
//! serves) on every node; in cluster mode also `GET /v1/dispatch`
//! ([`crate::http::dispatcher`]) and `POST /drain` (start a graceful
//! drain), and /healthz answers for the node's place in the cluster.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::cluster::ClusterShared;
use crate::http::dispatcher::{CachedNodes, DispatchConfig, Dispatcher};
use crate::http::metrics::node_exposition;
use crate::http::{HttpServer, Request, Response};
use crate::protocol::token::Keyring;
use crate::shard::ShardCounters;

/// Concurrent admin/dispatcher connections (one thread each).
const MAX_CONNECTIONS: usize = 256;
/// How often the dispatcher's copy of the node list is refreshed.
const NODES_REFRESH: Duration = Duration::from_millis(250);

/// What the admin endpoints read.
pub struct AdminState {
    /// The node's name, as in AuthOk frames.
    pub node: String,
    pub counters: Vec<Arc<ShardCounters>>,
    /// Set once the node is told to stop.
    pub stop: Arc<AtomicBool>,
}

/// The cluster's part of the admin endpoints.
struct ClusterAdmin {
    cluster: Arc<ClusterShared>,
    dispatcher: Dispatcher,
}

/// Serves the admin endpoints on `listener`; `cluster` adds the cluster
/// ones (the dispatcher signs tokens with `keyring`).
pub fn serve(
    listener: TcpListener,
    state: AdminState,
    cluster: Option<(Arc<ClusterShared>, DispatchConfig, Keyring)>,
) -> std::io::Result<HttpServer> {
    let cluster = match cluster {
        None => None,
        Some((cluster, dispatch, keyring)) => {
            let router = cluster.router.clone();
            let nodes = CachedNodes::start(NODES_REFRESH, move || futures_lite::future::block_on(router.nodes()).ok())?;
            Some(ClusterAdmin { cluster, dispatcher: Dispatcher::new(dispatch, keyring, nodes) })
        }
    };
    let handler = move |req: &Request| -> Response {
        match (req.method.as_str(), req.path.as_str(), &cluster) {
            ("GET", "/metrics", c) => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                node_exposition(&state.counters, c.as_ref().map(|c| &*c.cluster)),
            ),
            ("GET", "/healthz", None) => health(&state),
            ("GET", "/healthz", Some(c)) => cluster_health(&c.cluster),
            (_, "/v1/dispatch", Some(c)) => c.dispatcher.dispatch(req, crate::protocol::token::now_unix_secs()),
            ("POST", "/drain", Some(c)) => {
                c.cluster.request_drain();
                Response::json(202, &json!({"draining": true, "node": c.cluster.node}))
            }
            (_, "/drain", Some(_)) => Response::json(405, &json!({"error": "use POST"})),
            _ => Response::json(404, &json!({"error": "not found"})),
        }
    };
    HttpServer::serve(listener, MAX_CONNECTIONS, Arc::new(handler))
}

/// A single node: healthy until it is told to stop.
fn health(state: &AdminState) -> Response {
    let (code, status) = if state.stop.load(Ordering::Relaxed) { (503, "stopping") } else { (200, "ok") };
    Response::json(code, &json!({"status": status, "node": state.node}))
}

fn cluster_health(cluster: &ClusterShared) -> Response {
    let state = cluster.router.state();
    let status = if state.is_fenced() {
        "fenced"
    } else if cluster.is_draining() {
        "draining"
    } else if !state.is_live() {
        "unregistered"
    } else {
        "ok"
    };
    let code = if status == "ok" { 200 } else { 503 };
    Response::json(code, &json!({"status": status, "node": cluster.node, "incarnation": cluster.incarnation}))
}
