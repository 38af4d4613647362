//! The files under deploy/ checked against the real node: every metric the
//! Grafana dashboard queries is in the /metrics output of a single node
//! (and, for the panels under the "Cluster" row, of a cluster node); the
//! systemd unit (its settings, and `systemd-analyze verify` where
//! installed); `serve`'s readiness notification to systemd.

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

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/systemd/longlink.service");

/// `key=value` lines of a unit's `[section]`, comments and blanks skipped.
fn unit_section(text: &str, section: &str) -> Vec<(String, String)> {
    let mut current = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

#[test]
fn the_systemd_unit_has_the_limits_restart_reload_and_upgrade_settings() {
    let text = std::fs::read_to_string(UNIT).expect("unit file");
    let service = unit_section(&text, "Service");
    let get = |k: &str| service.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    assert_eq!(get("Restart"), Some("on-failure"));
    assert_eq!(get("ExecReload"), Some("/bin/kill -HUP $MAINPID"));
    // The upgraded process names itself the main one (MAINPID=).
    assert_eq!(get("Type"), Some("notify"));
    assert_eq!(get("NotifyAccess"), Some("all"));
    assert_eq!(get("KillMode"), Some("mixed"), "SIGTERM (drain) to the main process only");
    assert_eq!(get("LimitMEMLOCK"), Some("infinity"));
    let nofile: u64 = get("LimitNOFILE").and_then(|v| v.parse().ok()).expect("LimitNOFILE");
    assert!(nofile >= 1_048_576, "LimitNOFILE {nofile}");
    let stop_secs: u64 =
        get("TimeoutStopSec").and_then(|v| v.trim_end_matches('s').parse().ok()).expect("TimeoutStopSec");
    let drain_ms = longlink::config::Config::default().cluster.drain_deadline_ms;
    assert!(stop_secs * 1000 > drain_ms, "systemd must not kill a drain before its deadline");
    assert!(get("ExecStart").is_some_and(|v| v.contains(" serve --config ")));
    assert!(text.contains("SIGUSR2"), "the upgrade path is documented");
    assert_eq!(unit_section(&text, "Install"), [("WantedBy".to_owned(), "multi-user.target".to_owned())]);

    // systemd's own check, where it is installed: no warning about the
    // unit (it exits 0 on unknown keys, so its output is what counts).
    let Ok(out) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        println!("systemd-analyze not installed: the key checks above only");
        return;
    };
    assert!(out.status.success());
    let dir = TempDir::new("unit");
    let unit = dir.0.join("longlink.service");
    // It checks that ExecStart's binary exists: point it at the built one.
    std::fs::write(&unit, text.replace("/usr/local/bin/longlink", env!("CARGO_BIN_EXE_longlink"))).expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr.lines().filter(|l| l.contains("longlink.service")).collect();
    assert!(out.status.success() && about_unit.is_empty(), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn serve_tells_systemd_it_is_ready_and_its_pid() {
    use std::io::BufRead;
    let dir = TempDir::new("notify");
    let socket_path = dir.0.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let config = dir.0.join("longlink.toml");
    std::fs::write(&config, toml::to_string(&test_config(1)).expect("toml")).expect("write");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn longlink");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert!(lines.next().and_then(Result::ok).is_some_and(|l| l.starts_with("listening ")));
    let mut buf = [0u8; 256];
    let got = socket.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got.expect("a notification"), format!("READY=1\nMAINPID={}", child.id()));
}
