//! Prometheus text exposition (format 0.0.4) for the admin endpoint.
//!
//! Shards keep plain counters; the admin sidecar reads them and writes
//! them here ([`node_exposition`]). Each family is written once with its
//! HELP and TYPE lines, then one sample per label set.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::cluster::{ClusterShared, DISCONNECT_CODES, HIST_BOUNDS_US, PUSH_RESULTS};
use crate::shard::ShardCounters;

/// Builds one exposition document.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

/// A label set: `[("shard", "0"), ("code", "SLOW")]`.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// A counter family with one sample per label set.
    pub fn counter<'a>(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels<'a>, u64)>) {
        self.family(name, help, "counter", samples);
    }

    /// A gauge family with one sample per label set.
    pub fn gauge<'a>(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels<'a>, u64)>) {
        self.family(name, help, "gauge", samples);
    }

    fn family<'a>(&mut self, name: &str, help: &str, kind: &str, samples: impl IntoIterator<Item = (Labels<'a>, u64)>) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            self.sample(name, labels, &value.to_string());
        }
    }

    /// A histogram from an hdrhistogram of values in `unit_per_second`ths
    /// of a second (e.g. 1e6 for microseconds), reported in seconds with the
    /// given bucket bounds (seconds).
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: Labels<'_>,
        hist: &hdrhistogram::Histogram<u64>,
        unit_per_second: f64,
        bounds_secs: &[f64],
    ) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        let mut iter = hist.iter_recorded().peekable();
        for &bound in bounds_secs {
            let limit = (bound * unit_per_second) as u64;
            while let Some(v) = iter.peek() {
                if v.value_iterated_to() > limit {
                    break;
                }
                cumulative += v.count_at_value();
                iter.next();
            }
            let le = format_f64(bound);
            self.bucket(name, labels, &le, cumulative);
        }
        self.bucket(name, labels, "+Inf", hist.len());
        let sum: f64 = hist.iter_recorded().map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64).sum();
        self.sample(&format!("{name}_sum"), labels, &format_f64(sum / unit_per_second));
        self.sample(&format!("{name}_count"), labels, &hist.len().to_string());
    }

    fn bucket(&mut self, name: &str, labels: Labels<'_>, le: &str, count: u64) {
        let mut all: Vec<(&str, &str)> = labels.to_vec();
        all.push(("le", le));
        self.sample(&format!("{name}_bucket"), &all, &count.to_string());
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, value: &str) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n").replace('"', "\\\"")
}

fn format_f64(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.1}") } else { format!("{v}") }
}

/// The node's exposition: every shard's counters and liveness, and in
/// cluster mode the cluster's.
pub fn node_exposition(counters: &[Arc<ShardCounters>], cluster: Option<&ClusterShared>) -> String {
    let mut e = Exposition::new();
    shard_families(&mut e, counters);
    liveness_families(&mut e, counters);
    ops_families(&mut e, counters);
    if let Some(cluster) = cluster {
        cluster_families(&mut e, cluster);
    }
    e.finish()
}

/// The per-shard counter families.
fn shard_families(e: &mut Exposition, counters: &[Arc<ShardCounters>]) {
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
    family(e, "longlink_connections", "Authenticated sessions per shard.", true, &|c| &c.active);
    family(e, "longlink_accepted_total", "TCP connections accepted.", false, &|c| &c.accepted);
    family(e, "longlink_authenticated_total", "Sessions authenticated.", false, &|c| &c.authenticated);
    family(e, "longlink_closed_total", "Connections closed.", false, &|c| &c.closed);
    family(e, "longlink_replaced_total", "Sessions replaced by a newer login.", false, &|c| &c.replaced);
    family(e, "longlink_slow_closed_total", "Sessions closed as SLOW.", false, &|c| &c.slow_closed);
    family(e, "longlink_delivered_total", "Message frames handed to sessions.", false, &|c| &c.delivered);
    family(e, "longlink_frames_in_total", "Frames read from clients.", false, &|c| &c.frames_in);
    family(e, "longlink_bytes_in_total", "Bytes read from clients.", false, &|c| &c.bytes_in);
    family(e, "longlink_frames_out_total", "Frames sent or queued to clients.", false, &|c| &c.frames_out);
    family(e, "longlink_bytes_out_total", "Bytes sent or queued to clients.", false, &|c| &c.bytes_out);
    family(e, "longlink_push_requests_total", "Push-port requests read.", false, &|c| &c.push_requests);
    let push_refused: Vec<_> = counters
        .iter()
        .zip(&shards)
        .flat_map(|(c, s)| {
            [
                ("UNAUTHENTICATED", &c.push_refused),
                ("AUTH_TIMEOUT", &c.push_auth_timeouts),
                ("PERMISSION_DENIED", &c.push_denied),
            ]
            .map(|(code, n)| ([("shard", s.as_str()), ("code", code)], load(n)))
        })
        .collect();
    e.counter(
        "longlink_push_refused_total",
        "Push-port and node-listener refusals by code: connections without a valid credential \
         (or past the authenticating limit), silent until the auth deadline, requests the key has no right for.",
        push_refused.iter().map(|(l, v)| (&l[..], *v)),
    );
    let refused: Vec<_> = counters
        .iter()
        .zip(&shards)
        .flat_map(|(c, s)| {
            crate::admission::Refusal::ALL
                .map(|r| ([("shard", s.as_str()), ("reason", r.as_str())], load(&c.admission_refused[r as usize])))
        })
        .collect();
    e.counter(
        "longlink_admission_refused_total",
        "Client connections closed at accept by a per-source limit (server.max_connections_per_ip and friends).",
        refused.iter().map(|(l, v)| (&l[..], *v)),
    );
    family(
        e,
        "longlink_push_timeouts_total",
        "Push-port requests answered at push.reply_timeout_ms with answers missing.",
        false,
        &|c| &c.push_timeouts,
    );
    family(
        e,
        "longlink_push_late_answers_total",
        "Answers of shards or nodes that came after their request was answered (dropped).",
        false,
        &|c| &c.push_late_answers,
    );
    family(e, "longlink_broadcast_expired_total", "Broadcast deliveries dropped by TTL.", false, &|c| {
        &c.broadcast_expired
    });
    family(e, "longlink_broadcast_rejected_total", "Broadcasts refused: a shard's queue was full.", false, &|c| {
        &c.broadcast_rejected
    });
    family(e, "longlink_broadcast_queued_bytes", "Bytes of broadcasts queued per shard.", true, &|c| {
        &c.broadcast_queued_bytes
    });
    family(
        e,
        "longlink_mesh_backpressure_total",
        "Times a push-port connection paused because the mesh to other shards was backed up.",
        false,
        &|c| &c.mesh_backpressure,
    );
    family(e, "longlink_reliable_stored_total", "At-least-once copies stored.", false, &|c| &c.reliable.stored);
    family(e, "longlink_reliable_sent_total", "At-least-once first sends.", false, &|c| &c.reliable.sent);
    family(e, "longlink_reliable_retries_total", "At-least-once resends.", false, &|c| &c.reliable.retries);
    family(e, "longlink_reliable_acked_total", "At-least-once messages acknowledged.", false, &|c| &c.reliable.acked);
    family(e, "longlink_reliable_store_errors_total", "Timeline store failures.", false, &|c| &c.reliable.store_errors);
    family(e, "longlink_upstream_requests_total", "Client requests to services.", false, &|c| &c.upstream.requests);
}

/// Adds the per-shard liveness families to `e`: the turn counter and the
/// stall gauge (alert on the gauge staying above a few seconds, or on the
/// counter not moving).
fn liveness_families(e: &mut Exposition, counters: &[Arc<ShardCounters>]) {
    let now = Instant::now();
    let shards: Vec<String> = (0..counters.len()).map(|i| i.to_string()).collect();
    let labels: Vec<[(&str, &str); 1]> = shards.iter().map(|s| [("shard", s.as_str())]).collect();
    e.counter(
        "longlink_shard_turns_total",
        "Runs of the shard's timer loop; stops moving when the shard stops turning.",
        counters.iter().zip(&labels).map(|(c, l)| (&l[..], c.liveness.turns())),
    );
    e.gauge(
        "longlink_shard_stalled_ms",
        "Milliseconds the shard's timer loop has been due without running (about 0 while the shard turns).",
        counters.iter().zip(&labels).map(|(c, l)| (&l[..], c.liveness.stalled_ms(now))),
    );
}

/// The families of [`crate::observe`]: latencies, codes, queue bytes and
/// sessions by platform and version, summed over shards except the queue.
fn ops_families(e: &mut Exposition, counters: &[Arc<ShardCounters>]) {
    use crate::observe::{REFUSAL_CODES, SESSION_KINDS, session_kinds};
    use crate::protocol::proto::ErrorCode;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let sum = |f: &dyn Fn(&ShardCounters) -> u64| counters.iter().map(|c| f(c)).sum::<u64>();
    let bounds: Vec<f64> = HIST_BOUNDS_US.iter().map(|&us| us as f64 / 1e6).collect();
    for (name, help, pick) in [
        (
            "longlink_push_latency_seconds",
            "Push-port requests from read to answer (in cluster mode this node's part).",
            (|c: &ShardCounters| &c.ops.push_latency) as fn(&ShardCounters) -> &crate::cluster::AtomicHistogram,
        ),
        (
            "longlink_reliable_ack_latency_seconds",
            "At-least-once messages from stored to acknowledged by the client.",
            |c: &ShardCounters| &c.reliable.ack_latency,
        ),
    ] {
        let mut merged = crate::cluster::AtomicHistogram::default().snapshot();
        merged.reset();
        for c in counters {
            let _ = merged.add(pick(c).snapshot());
        }
        e.histogram(name, help, &[], &merged, 1e6, &bounds);
    }
    e.counter(
        "longlink_reliable_given_up_total",
        "At-least-once resends given up (max retries reached; left to the timeline for the next session).",
        [(&[][..], sum(&|c| load(&c.reliable.given_up)))],
    );
    e.counter(
        "longlink_reliable_resyncs_total",
        "ResyncRequired frames sent (messages expired or dropped before the client got them).",
        [(&[][..], sum(&|c| load(&c.reliable.resyncs)))],
    );
    e.counter(
        "longlink_reliable_replays_total",
        "Timeline reads handled (a session's resume, or a refill of its window).",
        [(&[][..], sum(&|c| load(&c.reliable.replays)))],
    );
    let codes: Vec<&str> = DISCONNECT_CODES
        .iter()
        .map(|c| if *c == ErrorCode::Unspecified { "PEER_CLOSED" } else { c.as_str_name() })
        .chain(["OTHER"])
        .collect();
    let labels: Vec<[(&str, &str); 1]> = codes.iter().map(|c| [("code", *c)]).collect();
    e.counter(
        "longlink_disconnects_total",
        "Sessions ended, by code.",
        labels.iter().enumerate().map(|(i, l)| (&l[..], sum(&|c| load(&c.ops.disconnects[i])))),
    );
    let refusal_names: Vec<&str> = REFUSAL_CODES.iter().map(|c| c.as_str_name()).chain(["OTHER"]).collect();
    let labels: Vec<[(&str, &str); 1]> = refusal_names.iter().map(|c| [("code", *c)]).collect();
    let refusals = |i: usize| {
        sum(&|c| {
            let extra = match REFUSAL_CODES.get(i) {
                Some(ErrorCode::Unauthenticated) => load(&c.push_refused),
                Some(ErrorCode::PermissionDenied) => load(&c.push_denied),
                _ => 0,
            };
            load(&c.ops.request_errors[i]) + extra
        })
    };
    e.counter(
        "longlink_push_refusals_total",
        "Push-port connections and requests refused, by code (UNAUTHENTICATED: no valid credential).",
        labels.iter().enumerate().map(|(i, l)| (&l[..], refusals(i))),
    );
    let shards: Vec<String> = (0..counters.len()).map(|i| i.to_string()).collect();
    let labels: Vec<[(&str, &str); 1]> = shards.iter().map(|s| [("shard", s.as_str())]).collect();
    e.gauge(
        "longlink_queued_bytes",
        "Bytes waiting in the shard's outbound queues (sessions and backend links).",
        counters.iter().zip(&labels).map(|(c, l)| (&l[..], load(&c.ops.queued_bytes))),
    );
    let kinds: Vec<(usize, [(&str, &str); 2])> = session_kinds()
        .map(|(i, p, v)| (i, [("platform", p), ("app_version", v)]))
        .chain([(SESSION_KINDS, [("platform", "other"), ("app_version", "other")])])
        .collect();
    e.gauge(
        "longlink_sessions",
        "Sessions by platform and app version (at most 64 pairs per process, then \"other\").",
        kinds.iter().map(|(i, l)| (&l[..], sum(&|c| load(&c.ops.sessions_by_kind[*i])))),
    );
}

/// The cluster's families (route claims, forwards, drain, latencies).
fn cluster_families(e: &mut Exposition, cluster: &ClusterShared) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
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
    e.counter(
        "longlink_revocations_stored_total",
        "Revocations taken here, by whether Redis stored them (failed: applied on the live nodes only).",
        [
            (&[("result", "ok")][..], load(&k.revocations_stored)),
            (&[("result", "failed")][..], load(&k.revocation_store_failures)),
        ],
    );
    e.counter(
        "longlink_revocation_sync_failures_total",
        "Reads of the cluster's stored revocations that failed (retried every second).",
        one(&k.revocation_sync_failures),
    );
    e.gauge(
        "longlink_revocations_loaded",
        "1 once the cluster's stored revocations were read (logins are refused UNAVAILABLE before).",
        [(&[][..], u64::from(cluster.revocations_loaded()))],
    );
    // Disconnects by code are in `ops_families`, for every node.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_labels() {
        let mut e = Exposition::new();
        e.counter(
            "longlink_pushes_total",
            "Push requests.",
            [(&[("result", "ok")][..], 3), (&[("result", "bad\"x")][..], 1)],
        );
        e.gauge("longlink_connections", "Sessions.", [(&[("shard", "0")][..], 7)]);
        let text = e.finish();
        assert!(text.contains("# TYPE longlink_pushes_total counter\n"));
        assert!(text.contains("longlink_pushes_total{result=\"ok\"} 3\n"));
        assert!(text.contains("longlink_pushes_total{result=\"bad\\\"x\"} 1\n"));
        assert!(text.contains("longlink_connections{shard=\"0\"} 7\n"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for us in [50u64, 200, 900, 5_000, 20_000] {
            h.record(us).unwrap();
        }
        let mut e = Exposition::new();
        e.histogram("longlink_push_latency_seconds", "Push latency.", &[], &h, 1e6, &[0.0001, 0.001, 0.01]);
        let text = e.finish();
        assert!(text.contains("longlink_push_latency_seconds_bucket{le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("longlink_push_latency_seconds_bucket{le=\"0.001\"} 3\n"), "{text}");
        assert!(text.contains("longlink_push_latency_seconds_bucket{le=\"0.01\"} 4\n"), "{text}");
        assert!(text.contains("longlink_push_latency_seconds_bucket{le=\"+Inf\"} 5\n"));
        assert!(text.contains("longlink_push_latency_seconds_count 5\n"));
    }
}
