//! The admin and dispatcher HTTP sidecar of a cluster node:
//! `GET /v1/dispatch` ([`crate::dispatcher`]), `GET /metrics` (Prometheus
//! text), `GET /healthz` (200 while the node is registered and not
//! draining), `POST /drain` (start a graceful drain).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::cluster::{ClusterShared, DISCONNECT_CODES, HIST_BOUNDS_US, PUSH_RESULTS};
use crate::dispatcher::{CachedNodes, DispatchConfig, Dispatcher};
use crate::http::{HttpServer, Request, Response};
use crate::metrics::Exposition;
use crate::protocol::token::Keyring;
use crate::shard::ShardCounters;

/// Concurrent admin/dispatcher connections (one thread each).
const MAX_CONNECTIONS: usize = 256;
/// How often the dispatcher's copy of the node list is refreshed.
const NODES_REFRESH: Duration = Duration::from_millis(250);

/// Starts the sidecar on `addr`.
pub fn start(
    addr: SocketAddr,
    cluster: Arc<ClusterShared>,
    counters: Vec<Arc<ShardCounters>>,
    dispatch: DispatchConfig,
    keyring: Keyring,
) -> std::io::Result<HttpServer> {
    let router = cluster.router.clone();
    let nodes = CachedNodes::start(NODES_REFRESH, move || futures_lite::future::block_on(router.nodes()).ok())?;
    let dispatcher = Dispatcher::new(dispatch, keyring, nodes);
    let handler = move |req: &Request| -> Response {
        match (req.method.as_str(), req.path.as_str()) {
            (_, "/v1/dispatch") => dispatcher.dispatch(req, crate::protocol::token::now_unix_secs()),
            ("GET", "/metrics") => {
                Response::new(200, "text/plain; version=0.0.4; charset=utf-8", metrics(&cluster, &counters))
            }
            ("GET", "/healthz") => health(&cluster),
            ("POST", "/drain") => {
                cluster.request_drain();
                Response::json(202, &json!({"draining": true, "node": cluster.node}))
            }
            (_, "/drain") => Response::json(405, &json!({"error": "use POST"})),
            _ => Response::json(404, &json!({"error": "not found"})),
        }
    };
    HttpServer::start(addr, MAX_CONNECTIONS, Arc::new(handler))
}

fn health(cluster: &ClusterShared) -> Response {
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

/// The exposition of every shard's and the cluster's counters.
pub fn metrics(cluster: &ClusterShared, counters: &[Arc<ShardCounters>]) -> String {
    let mut e = Exposition::new();
    let shards: Vec<String> = (0..counters.len()).map(|i| i.to_string()).collect();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let per_shard = |f: &dyn Fn(&ShardCounters) -> &AtomicU64| -> Vec<(Vec<(&str, &str)>, u64)> {
        counters.iter().zip(&shards).map(|(c, s)| (vec![("shard", s.as_str())], load(f(c)))).collect()
    };
    let family = |e: &mut Exposition, name: &str, help: &str, gauge: bool, f: &dyn Fn(&ShardCounters) -> &AtomicU64| {
        let samples = per_shard(f);
        let it = samples.iter().map(|(l, v)| (&l[..], *v));
        if gauge { e.gauge(name, help, it) } else { e.counter(name, help, it) }
    };
    family(&mut e, "longlink_connections", "Authenticated sessions per shard.", true, &|c| &c.active);
    family(&mut e, "longlink_accepted_total", "TCP connections accepted.", false, &|c| &c.accepted);
    family(&mut e, "longlink_authenticated_total", "Sessions authenticated.", false, &|c| &c.authenticated);
    family(&mut e, "longlink_closed_total", "Connections closed.", false, &|c| &c.closed);
    family(&mut e, "longlink_replaced_total", "Sessions replaced by a newer login.", false, &|c| &c.replaced);
    family(&mut e, "longlink_slow_closed_total", "Sessions closed as SLOW.", false, &|c| &c.slow_closed);
    family(&mut e, "longlink_delivered_total", "Message frames handed to sessions.", false, &|c| &c.delivered);
    family(&mut e, "longlink_frames_in_total", "Frames read from clients.", false, &|c| &c.frames_in);
    family(&mut e, "longlink_bytes_in_total", "Bytes read from clients.", false, &|c| &c.bytes_in);
    family(&mut e, "longlink_frames_out_total", "Frames sent or queued to clients.", false, &|c| &c.frames_out);
    family(&mut e, "longlink_bytes_out_total", "Bytes sent or queued to clients.", false, &|c| &c.bytes_out);
    family(&mut e, "longlink_push_requests_total", "Push-port requests read.", false, &|c| &c.push_requests);
    family(
        &mut e,
        "longlink_push_timeouts_total",
        "Push-port requests answered at push.reply_timeout_ms with answers missing.",
        false,
        &|c| &c.push_timeouts,
    );
    family(
        &mut e,
        "longlink_push_late_answers_total",
        "Answers of shards or nodes that came after their request was answered (dropped).",
        false,
        &|c| &c.push_late_answers,
    );
    family(&mut e, "longlink_broadcast_expired_total", "Broadcast deliveries dropped by TTL.", false, &|c| {
        &c.broadcast_expired
    });
    family(&mut e, "longlink_broadcast_rejected_total", "Broadcasts refused: a shard's queue was full.", false, &|c| {
        &c.broadcast_rejected
    });
    family(&mut e, "longlink_broadcast_queued_bytes", "Bytes of broadcasts queued per shard.", true, &|c| {
        &c.broadcast_queued_bytes
    });
    family(
        &mut e,
        "longlink_mesh_backpressure_total",
        "Times a push-port connection paused because the mesh to other shards was backed up.",
        false,
        &|c| &c.mesh_backpressure,
    );
    family(&mut e, "longlink_reliable_stored_total", "At-least-once copies stored.", false, &|c| &c.reliable.stored);
    family(&mut e, "longlink_reliable_sent_total", "At-least-once first sends.", false, &|c| &c.reliable.sent);
    family(&mut e, "longlink_reliable_retries_total", "At-least-once resends.", false, &|c| &c.reliable.retries);
    family(&mut e, "longlink_reliable_acked_total", "At-least-once messages acknowledged.", false, &|c| {
        &c.reliable.acked
    });
    family(&mut e, "longlink_reliable_store_errors_total", "Timeline store failures.", false, &|c| {
        &c.reliable.store_errors
    });
    family(&mut e, "longlink_upstream_requests_total", "Client requests to services.", false, &|c| {
        &c.upstream.requests
    });
    crate::liveness::expose(&mut e, counters);
    let k = &cluster.counters;
    let one = |v: &AtomicU64| [(&[][..], load(v))];
    e.counter("longlink_route_claims_total", "Routes claimed in the router.", one(&k.claims));
    e.counter("longlink_route_claim_failures_total", "Route claims that failed (retried).", one(&k.claim_failures));
    e.counter("longlink_route_releases_total", "Routes released.", one(&k.releases));
    e.counter("longlink_route_reasserts_total", "Routes re-asserted after a re-registration.", one(&k.reasserts));
    e.counter("longlink_remote_kicks_total", "Sessions on other nodes replaced by a login here.", one(&k.remote_kicks));
    e.counter("longlink_route_lookups_total", "Route lookups for pushes.", one(&k.lookups));
    e.counter("longlink_route_lookup_failures_total", "Route lookups that failed.", one(&k.lookup_failures));
    e.counter(
        "longlink_cluster_pushes_total",
        "Backend requests answered by the cluster, by result.",
        [
            (&[("result", "ok")][..], load(&k.requests).saturating_sub(load(&k.request_errors))),
            (&[("result", "error")][..], load(&k.request_errors)),
        ],
    );
    let results: Vec<[(&str, &str); 1]> = PUSH_RESULTS.iter().map(|r| [("result", r.as_str_name())]).collect();
    e.counter(
        "longlink_push_results_total",
        "Push targets answered by the cluster, by result (group and broadcast pushes count once).",
        results.iter().zip(&k.push_results).map(|(l, v)| (&l[..], load(v))),
    );
    e.counter(
        "longlink_forwarded_total",
        "Requests forwarded between nodes.",
        [
            (
                &[("direction", "out"), ("result", "ok")][..],
                load(&k.forwarded).saturating_sub(load(&k.forward_failures)),
            ),
            (&[("direction", "out"), ("result", "failed")][..], load(&k.forward_failures)),
            (&[("direction", "in"), ("result", "ok")][..], load(&k.forwarded_in)),
        ],
    );
    e.counter("longlink_go_away_total", "GoAway frames sent while draining.", one(&k.go_away_sent));
    let codes: Vec<&str> = DISCONNECT_CODES
        .iter()
        .map(|c| if *c == crate::protocol::proto::ErrorCode::Unspecified { "PEER_CLOSED" } else { c.as_str_name() })
        .chain(["OTHER"])
        .collect();
    let labels: Vec<[(&str, &str); 1]> = codes.iter().map(|c| [("code", *c)]).collect();
    e.counter(
        "longlink_disconnects_total",
        "Sessions ended, by code.",
        labels.iter().zip(&k.disconnects).map(|(l, v)| (&l[..], load(v))),
    );
    let bounds: Vec<f64> = HIST_BOUNDS_US.iter().map(|&us| us as f64 / 1e6).collect();
    for (name, help, h) in [
        ("longlink_router_latency_seconds", "Router round trips (claims, lookups).", &k.router_latency),
        ("longlink_forward_latency_seconds", "Requests forwarded to other nodes.", &k.forward_latency),
        ("longlink_cluster_push_latency_seconds", "Backend requests answered by the cluster.", &k.request_latency),
    ] {
        e.histogram(name, help, &[], &h.snapshot(), 1e6, &bounds);
    }
    let state = cluster.router.state();
    e.gauge("longlink_node_live", "1 while the node's lease is held.", [(&[][..], u64::from(state.is_live()))]);
    e.gauge("longlink_node_draining", "1 while the node drains.", [(&[][..], u64::from(cluster.is_draining()))]);
    e.finish()
}
