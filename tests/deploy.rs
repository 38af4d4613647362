//! The files under deploy/ checked against the real node: every metric the
//! Grafana dashboard queries is in the /metrics output of a single node
//! (and, for the panels under the "Cluster" row, of a cluster node).

mod common;

use std::collections::BTreeSet;

use common::*;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/longlink.json");

/// PromQL words that are not metric names: operators, and aggregations
/// (which may be followed by `by (...)` rather than by their parentheses).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The metric names an expression selects: label matchers (`{...}`),
/// ranges (`[...]`), strings, grouping clauses (`by (...)`) and function
/// calls are removed; what remains and is not a number or keyword is a
/// metric name.
fn metric_names(expr: &str) -> Vec<String> {
    // Drop strings, label matchers and ranges.
    let mut plain = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut quote: Option<char> = None;
    for c in expr.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace == 0 && depth_bracket == 0 => plain.push(c),
            _ => {}
        }
        if matches!(c, '{' | '}' | '[' | ']') && depth_brace == 0 && depth_bracket == 0 {
            plain.push(' ');
        }
    }
    // Words, each with what follows it (a '(' makes it a function or a
    // grouping clause).
    let mut out = Vec::new();
    let chars: Vec<char> = plain.chars().collect();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let lower = word.to_ascii_lowercase();
            if matches!(lower.as_str(), "by" | "without" | "on" | "ignoring" | "group_left" | "group_right") {
                // The label list in the parentheses that follow.
                skip_group = next == Some(&'(');
                continue;
            }
            if next == Some(&'(') || KEYWORDS.contains(&lower.as_str()) {
                continue;
            }
            out.push(word);
        } else if c.is_ascii_digit() || c == '.' {
            // A number (with an exponent, or a duration like 5m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c == '(' && skip_group {
            // Skip "(label, label)".
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            i += 1;
            skip_group = false;
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `/metrics` text exports `name`: its own TYPE line, or (a
/// `_bucket`, `_sum` or `_count` series) its histogram's.
fn exported(metrics: &str, name: &str) -> bool {
    let typed = |n: &str, kind: Option<&str>| {
        metrics.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("#")
                && w.next() == Some("TYPE")
                && w.next() == Some(n)
                && kind.is_none_or(|k| w.next() == Some(k))
        })
    };
    if typed(name, None) {
        return true;
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| typed(base, Some("histogram"))))
}

/// Every (panel title, metric name, cluster-only) the dashboard queries,
/// with the template variables' queries as panel "$variables". Panels
/// after the row titled "Cluster" are cluster-only.
fn dashboard_metrics() -> Vec<(String, String, bool)> {
    let text = std::fs::read_to_string(DASHBOARD).expect("read deploy/grafana/longlink.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    for v in vars {
        if let Some(def) = v["definition"].as_str() {
            let inner = def.trim().strip_prefix("label_values(").and_then(|s| s.split(',').next()).unwrap_or(def);
            for name in metric_names(inner) {
                out.push(("$variables".to_owned(), name, false));
            }
        }
    }
    let mut cluster = false;
    let panels = dash["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "the dashboard has panels");
    for p in panels {
        let title = p["title"].as_str().unwrap_or("").to_owned();
        if p["type"] == "row" {
            cluster = title == "Cluster";
            continue;
        }
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title:?} has targets"));
        assert!(!targets.is_empty(), "panel {title:?} queries something");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel {title:?}: no metric in {expr:?}");
            for name in names {
                out.push((title.clone(), name, cluster));
            }
        }
    }
    out
}

#[test]
fn the_metric_name_extractor_strips_functions_matchers_ranges_and_grouping() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, instance) (rate(a_b_bucket{instance=~"$instance", x="y{z}"}[$__rate_interval])))"#
        ),
        ["a_b_bucket"]
    );
    assert_eq!(
        metric_names("sum(rate(x_sum[5m])) / sum without (shard) (rate(x_count[5m])) > 1e3"),
        ["x_sum", "x_count"]
    );
    assert_eq!(metric_names("max by (instance, shard) (up) or on (instance) other"), ["up", "other"]);
    assert_eq!(metric_names("longlink_node_live"), ["longlink_node_live"]);
    let text = "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n# TYPE g gauge\ng 1\n";
    assert!(exported(text, "h_bucket") && exported(text, "h_count") && exported(text, "g"));
    assert!(!exported(text, "g_count") && !exported(text, "h_total") && !exported(text, "gg"));
}

#[test]
fn every_metric_on_the_grafana_dashboard_is_exported_by_a_real_node() {
    let queried = dashboard_metrics();
    let distinct: BTreeSet<&str> = queried.iter().map(|(_, n, _)| n.as_str()).collect();
    // Guards the extractor: the dashboard queries dozens of series.
    assert!(distinct.len() >= 30, "only {} metric names found: {distinct:?}", distinct.len());
    for name in &distinct {
        assert!(name.starts_with("longlink_"), "{name:?} is not a longlink metric");
    }

    // A single node (not cluster mode).
    let single = NodeProcess::start(&test_config(2));
    let (status, single_metrics) = http(single.admin_addr.expect("admin"), "GET", "/metrics");
    assert_eq!(status, 200);
    drop(single);

    // A cluster node (its own Redis).
    let redis = RedisServer::start();
    let mut cfg = test_config(2);
    cfg.cluster.enabled = true;
    cfg.delivery.redis_url = redis.url();
    let node = NodeProcess::start(&cfg);
    let (status, cluster_metrics) = http(node.admin_addr.expect("admin"), "GET", "/metrics");
    assert_eq!(status, 200);

    let mut missing = Vec::new();
    for (panel, name, cluster_only) in &queried {
        let (metrics, mode) = if *cluster_only { (&cluster_metrics, "cluster") } else { (&single_metrics, "single") };
        if !exported(metrics, name) {
            missing.push(format!("{panel}: {name} (not in a {mode} node's /metrics)"));
        }
    }
    assert!(missing.is_empty(), "dashboard metrics not exported:\n{}", missing.join("\n"));
    println!("{} dashboard metrics checked against real nodes", distinct.len());
}
