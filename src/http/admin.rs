//! The admin endpoints every node serves on `server.admin_listen`
//! (127.0.0.1:7102 by default; keep it private):
//! `GET /metrics` (Prometheus text) and `GET /healthz` (200 while the node
//! serves) on every node, open; `POST /drain` (start a graceful drain, as
//! SIGTERM) and `POST /reload` (re-read the config, as SIGHUP; see
//! [`crate::reload`]), both needing the admin token ([`crate::http::guard`]);
//! in cluster mode also
//! `GET /v1/dispatch` ([`crate::http::dispatcher`]) unless it has a
//! listener of its own (`http.dispatch_listen`), and /healthz answers for
//! the node's place in the cluster.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::cluster::ClusterShared;
use crate::config::Config;
use crate::http::dispatch_auth::{DispatchAuth, ReplayStore};
use crate::http::dispatcher::{CachedNodes, DispatchConfig, Dispatcher};
use crate::http::guard::AdminGuard;
use crate::http::metrics::node_exposition;
use crate::http::{HttpServer, Reply, Request, Response};
use crate::protocol::token::{Keyring, now_unix_secs};
use crate::shard::ShardCounters;

/// How often the dispatcher's copy of the node list is refreshed.
const NODES_REFRESH: Duration = Duration::from_millis(250);

/// What the admin endpoints read.
pub struct AdminState {
    /// The node's name, as in AuthOk frames.
    pub node: String,
    pub counters: Vec<Arc<ShardCounters>>,
    /// Set once the node is told to stop.
    pub stop: Arc<AtomicBool>,
    /// Starts the node's drain (`POST /drain`, as SIGTERM).
    pub drain: Arc<dyn Fn() + Send + Sync>,
    /// `POST /reload`, as SIGHUP.
    pub reloader: Arc<crate::reload::Reloader>,
}

/// The cluster's part of the admin endpoints.
struct ClusterAdmin {
    cluster: Arc<ClusterShared>,
    /// On the admin port (`None` when it has its own listener).
    dispatcher: Option<Arc<Dispatcher>>,
}

/// The dispatcher of a node's config: ticket replays are shared through
/// the cluster's Redis.
pub fn cluster_dispatcher(
    config: &Config,
    cluster: &ClusterShared,
    keyring: Keyring,
) -> Result<Arc<Dispatcher>, crate::config::ConfigError> {
    let router = cluster.router.clone();
    let nodes = CachedNodes::start(NODES_REFRESH, move || futures_lite::future::block_on(router.nodes()).ok())
        .map_err(|e| crate::config::ConfigError::Invalid { field: "cluster", message: e.to_string() })?;
    let d = &config.delivery;
    let replay = ReplayStore::redis(&d.redis_url, &d.redis_prefix, Duration::from_millis(d.redis_timeout_ms));
    let auth = DispatchAuth::new(&config.dispatch, replay)?;
    Ok(Arc::new(Dispatcher::new(DispatchConfig::from_config(config), keyring, nodes).with_auth(auth)))
}

/// Serves the admin endpoints on `listener`; `cluster` adds the cluster
/// ones (the dispatcher signs tokens with `keyring`), on a listener of
/// their own when `http.dispatch_listen` is set (stopped with the admin
/// server).
pub fn serve(
    listener: TcpListener,
    state: AdminState,
    config: &Config,
    cluster: Option<(Arc<ClusterShared>, Keyring)>,
) -> std::io::Result<HttpServer> {
    let limits = config.http.limits();
    let mut own_dispatch = None;
    let cluster = match cluster {
        None => None,
        Some((cluster, keyring)) => {
            let dispatcher = cluster_dispatcher(config, &cluster, keyring).map_err(std::io::Error::other)?;
            match config.http.dispatch_addr() {
                Some(addr) => {
                    let d = dispatcher.clone();
                    let handler = move |req: &Request| -> Reply {
                        match req.path.as_str() {
                            "/v1/dispatch" => d.dispatch(req, now_unix_secs()),
                            _ => Response::json(404, &json!({"error": "not found"})).into(),
                        }
                    };
                    own_dispatch = Some(HttpServer::serve_with(TcpListener::bind(addr)?, limits, Arc::new(handler))?);
                    Some(ClusterAdmin { cluster, dispatcher: None })
                }
                None => Some(ClusterAdmin { cluster, dispatcher: Some(dispatcher) }),
            }
        }
    };
    let guard = AdminGuard::new(&config.http);
    let handler = move |req: &Request| -> Reply {
        let r = match (req.method.as_str(), req.path.as_str(), &cluster) {
            ("GET", "/metrics", c) => Response::new(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                node_exposition(&state.counters, c.as_ref().map(|c| &*c.cluster)),
            ),
            ("GET", "/healthz", None) => health(&state),
            ("GET", "/healthz", Some(c)) => cluster_health(&c.cluster),
            (_, "/v1/dispatch", Some(ClusterAdmin { dispatcher: Some(d), .. })) => {
                return d.dispatch(req, now_unix_secs());
            }
            (_, "/drain", _) => match guard.check(req) {
                Some(refusal) => refusal,
                None => {
                    tracing::info!(peer = ?req.peer, "drain requested over the admin port");
                    (state.drain)();
                    Response::json(202, &json!({"draining": true, "node": state.node}))
                }
            },
            (_, "/reload", _) => match guard.check(req) {
                Some(refusal) => refusal,
                None => {
                    tracing::info!(peer = ?req.peer, "reload requested over the admin port");
                    match state.reloader.reload() {
                        Ok(report) => Response::json(200, &report.to_json()),
                        Err(e) => Response::json(422, &json!({"reloaded": false, "error": e.to_string()})),
                    }
                }
            },
            _ => Response::json(404, &json!({"error": "not found"})),
        };
        r.into()
    };
    let admin = HttpServer::serve_with(listener, limits, Arc::new(handler))?;
    Ok(match own_dispatch {
        Some(d) => admin.with_linked(d),
        None => admin,
    })
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
