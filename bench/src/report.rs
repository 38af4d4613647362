//! `longlink-bench report`: reads result records (JSON lines from one or
//! more files) and writes a markdown report with a table per scenario and
//! SVG plots next to it: latency percentiles per run, deliveries/s per
//! run, achieved against configured broadcast rate, RSS over time for
//! soak runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use crate::svg::{BarChart, BarSeries, LineChart, LineSeries, short_num};

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Result files (JSON lines). Default: bench/runs/results.jsonl.
    pub files: Vec<PathBuf>,
    /// Markdown file to write; the SVG plots go next to it.
    /// Default: bench/runs/report.md.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep only the last N runs of each scenario (plots stay readable).
    #[arg(long, default_value_t = 20)]
    pub last: usize,
}

/// Scenarios in report order; others are listed at the end.
const ORDER: [&str; 5] = ["unicast", "fanout", "broadcast", "soak", "idle"];

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let runs_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("runs");
    let files = if args.files.is_empty() { vec![runs_dir.join("results.jsonl")] } else { args.files.clone() };
    let out = args.out.clone().unwrap_or_else(|| runs_dir.join("report.md"));
    let mut records = Vec::new();
    let mut skipped = 0;
    for file in &files {
        let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) if v.get("scenario").is_some() => records.push(v),
                _ => skipped += 1,
            }
        }
    }
    let report = build(&records, &files, args.last);
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, svg) in &report.svgs {
        let path = dir.join(name);
        fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    fs::write(&out, &report.markdown).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote {} ({} records, {} plots{})",
        out.display(),
        records.len(),
        report.svgs.len(),
        if skipped > 0 { format!(", {skipped} unreadable lines skipped") } else { String::new() }
    );
    Ok(())
}

/// The markdown text and the SVG files it links to (name -> content).
pub struct Report {
    pub markdown: String,
    pub svgs: Vec<(String, String)>,
}

/// A number at a dotted path (`latency_us.p99_us`).
fn num(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A table cell: the number at `path` formatted with `digits` decimals
/// and thousands separators, or "-".
fn cell(v: &Value, path: &str, digits: usize) -> String {
    num(v, path).map_or_else(|| "-".to_owned(), |x| thousands(x, digits))
}

fn thousands(x: f64, digits: usize) -> String {
    let s = format!("{:.*}", digits, x.abs());
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    let sign = if x < 0.0 && s.chars().any(|c| c != '0' && c != '.') { "-" } else { "" };
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

fn mib(v: &Value, path: &str) -> String {
    num(v, path).map_or_else(|| "-".to_owned(), |b| format!("{:.1}", b / 1_048_576.0))
}

/// `YYYY-MM-DD HH:MM` of the record's timestamp.
fn when(v: &Value) -> String {
    text(v, "timestamp").replace('T', " ").chars().take(16).collect()
}

fn commit(v: &Value) -> String {
    let c = text(v, "git_commit");
    if v.get("git_dirty").and_then(Value::as_bool) == Some(true) { format!("{c}+") } else { c.to_owned() }
}

/// Short description of a run, for chart categories.
fn label(scenario: &str, v: &Value, i: usize) -> String {
    let shards = num(v, "shards").map_or(String::new(), |s| format!(" {s}sh"));
    let what = match scenario {
        "unicast" => format!("{}/s{shards}", short_num(num(v, "rate_per_sec").unwrap_or(0.0))),
        "fanout" => {
            let rate = num(v, "rate_per_sec").unwrap_or(0.0);
            let rate = if rate > 0.0 { format!("{}/s", short_num(rate)) } else { "burst".into() };
            format!("{}x{} {rate}{shards}", short_num(num(v, "members").unwrap_or(0.0)), cell(v, "messages", 0))
        }
        "broadcast" => format!("{}/s{shards}", short_num(num(v, "configured_rate_per_sec").unwrap_or(0.0))),
        "soak" => format!(
            "{} min{shards} ping {}s {}/s churn {}%",
            short_num(num(v, "minutes").unwrap_or(0.0)),
            short_num(num(v, "ping_ms").unwrap_or(0.0) / 1000.0),
            short_num(num(v, "rate_per_sec").unwrap_or(0.0)),
            short_num(num(v, "churn_per_sec").unwrap_or(0.0) * 100.0)
        ),
        _ => shards.trim().to_owned(),
    };
    format!("#{} {what}", i + 1)
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

fn percentile_chart(title: &str, runs: &[(String, &Value)], path: &str) -> BarChart {
    // Runs that timed nothing (e.g. a soak without pushes) have no bars.
    let runs: Vec<&(String, &Value)> =
        runs.iter().filter(|(_, v)| num(v, &format!("{path}.count")).is_none_or(|n| n > 0.0)).collect();
    let mut series: Vec<BarSeries> =
        [("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"), ("p99.9", "p999_us"), ("max", "max_us")]
            .iter()
            .map(|(name, key)| BarSeries {
                name: (*name).into(),
                values: runs.iter().map(|(_, v)| num(v, &format!("{path}.{key}"))).collect(),
            })
            .collect();
    // Seconds-long latencies read better in ms.
    let max = series.iter().flat_map(|s| s.values.iter().flatten()).fold(0.0f64, |a, &b| a.max(b));
    let unit = if max >= 100_000.0 {
        for v in series.iter_mut().flat_map(|s| s.values.iter_mut().flatten()) {
            *v /= 1000.0;
        }
        "ms"
    } else {
        "µs"
    };
    BarChart {
        title: title.into(),
        y_label: format!("latency ({unit}, log scale)"),
        categories: runs.iter().map(|(l, _)| l.clone()).collect(),
        series,
        log_y: true,
    }
}

/// Builds the report from parsed records.
pub fn build(records: &[Value], sources: &[PathBuf], last: usize) -> Report {
    let mut by: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for r in records {
        by.entry(text(r, "scenario")).or_default().push(r);
    }
    for runs in by.values_mut() {
        let skip = runs.len().saturating_sub(last.max(1));
        runs.drain(..skip);
    }
    let mut md = String::from("# longlink benchmark report\n\n");
    let _ = writeln!(
        md,
        "Generated by `longlink-bench report` from {}. Runs are numbered per scenario in file order; \
         `commit+` means the work tree differed from that commit. CPU: 100 % is one core busy; server, \
         clients and backend share this host's cores, and \"other CPU\" is what the rest of the host used \
         meanwhile (a busy host skews every figure). Latency is push (intended send time) to client receive, \
         CLOCK_MONOTONIC on one host, hdrhistogram percentiles merged over all client workers.\n",
        sources.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", ")
    );
    let mut svgs = Vec::new();
    let empty = Vec::new();
    let labelled = |name: &str| -> Vec<(String, &Value)> {
        by.get(name).unwrap_or(&empty).iter().enumerate().map(|(i, v)| (label(name, v, i), *v)).collect()
    };

    let unicast = labelled("unicast");
    if !unicast.is_empty() {
        md.push_str("## unicast: push-to-receive latency\n\n");
        md.push_str("Pushes to one random device each at an open-loop rate; see bench/README.md.\n\n");
        svgs.push((
            "unicast-latency.svg".to_owned(),
            percentile_chart("unicast: push-to-receive latency per run", &unicast, "latency_us").render(),
        ));
        md.push_str("![unicast latency percentiles](unicast-latency.svg)\n\n");
        let rows: Vec<Vec<String>> = unicast
            .iter()
            .map(|(l, v)| {
                vec![
                    l.clone(),
                    when(v),
                    commit(v),
                    cell(v, "connected", 0),
                    cell(v, "backends", 0),
                    cell(v, "rate_per_sec", 0),
                    cell(v, "achieved_rate_per_sec", 0),
                    cell(v, "pushes_sent", 0),
                    cell(v, "lost", 0),
                    cell(v, "latency_us.p50_us", 0),
                    cell(v, "latency_us.p90_us", 0),
                    cell(v, "latency_us.p99_us", 0),
                    cell(v, "latency_us.p999_us", 0),
                    cell(v, "latency_us.max_us", 0),
                    cell(v, "push_reply_latency_us.p99_us", 0),
                    cell(v, "server_cpu.percent", 0),
                    cell(v, "counted_cpu.server_cpu_per_push_us", 2),
                    cell(v, "clients_cpu.percent", 0),
                    cell(v, "other_cpu_percent", 0),
                ]
            })
            .collect();
        table(
            &mut md,
            &[
                "run",
                "time (UTC)",
                "commit",
                "clients",
                "backends",
                "rate/s",
                "achieved/s",
                "sent",
                "lost",
                "p50 µs",
                "p90 µs",
                "p99 µs",
                "p99.9 µs",
                "max µs",
                "reply p99 µs",
                "server CPU %",
                "server µs/push",
                "clients CPU %",
                "other CPU %",
            ],
            &rows,
        );
    }

    let fanout = labelled("fanout");
    if !fanout.is_empty() {
        md.push_str("## fanout: group multicast\n\n");
        md.push_str(
            "Deliveries/s = all deliveries / (last receive - first send). Labels: members x messages, push rate.\n\n",
        );
        let chart = BarChart {
            title: "fanout: deliveries per second per run".into(),
            y_label: "deliveries/s".into(),
            categories: fanout.iter().map(|(l, _)| l.clone()).collect(),
            series: vec![BarSeries {
                name: "deliveries/s".into(),
                values: fanout.iter().map(|(_, v)| num(v, "deliveries_per_sec")).collect(),
            }],
            log_y: false,
        };
        svgs.push(("fanout-deliveries.svg".to_owned(), chart.render()));
        svgs.push((
            "fanout-latency.svg".to_owned(),
            percentile_chart("fanout: push-to-delivery latency per run", &fanout, "latency_us").render(),
        ));
        md.push_str("![fanout deliveries per second](fanout-deliveries.svg)\n\n");
        md.push_str("![fanout latency percentiles](fanout-latency.svg)\n\n");
        let rows: Vec<Vec<String>> = fanout
            .iter()
            .map(|(l, v)| {
                vec![
                    l.clone(),
                    when(v),
                    commit(v),
                    cell(v, "shards", 0),
                    cell(v, "joined", 0),
                    cell(v, "messages", 0),
                    cell(v, "rate_per_sec", 0),
                    cell(v, "deliveries_received", 0),
                    cell(v, "lost", 0),
                    cell(v, "deliveries_per_sec", 0),
                    cell(v, "first_send_to_last_receive_s", 3),
                    cell(v, "latency_us.p50_us", 0),
                    cell(v, "latency_us.p99_us", 0),
                    cell(v, "latency_us.max_us", 0),
                    cell(v, "server_cpu.percent", 0),
                    cell(v, "counted_cpu.server_cpu_per_delivery_us", 3),
                    cell(v, "clients_cpu.percent", 0),
                    cell(v, "other_cpu_percent", 0),
                ]
            })
            .collect();
        table(
            &mut md,
            &[
                "run",
                "time (UTC)",
                "commit",
                "shards",
                "members",
                "messages",
                "rate/s",
                "deliveries",
                "lost",
                "deliveries/s",
                "span s",
                "p50 µs",
                "p99 µs",
                "max µs",
                "server CPU %",
                "server µs/delivery",
                "clients CPU %",
                "other CPU %",
            ],
            &rows,
        );
    }

    let broadcast = labelled("broadcast");
    if !broadcast.is_empty() {
        md.push_str("## broadcast: paced delivery\n\n");
        md.push_str("One broadcast to every client with the node's rate limit set; achieved = deliveries / (last receive - send).\n\n");
        let chart = BarChart {
            title: "broadcast: achieved vs configured rate".into(),
            y_label: "deliveries/s".into(),
            categories: broadcast.iter().map(|(l, _)| l.clone()).collect(),
            series: vec![
                BarSeries {
                    name: "configured".into(),
                    values: broadcast.iter().map(|(_, v)| num(v, "configured_rate_per_sec")).collect(),
                },
                BarSeries {
                    name: "achieved".into(),
                    values: broadcast.iter().map(|(_, v)| num(v, "deliveries_per_sec")).collect(),
                },
            ],
            log_y: false,
        };
        svgs.push(("broadcast-rate.svg".to_owned(), chart.render()));
        md.push_str("![broadcast achieved vs configured rate](broadcast-rate.svg)\n\n");
        let rows: Vec<Vec<String>> = broadcast
            .iter()
            .map(|(l, v)| {
                vec![
                    l.clone(),
                    when(v),
                    commit(v),
                    cell(v, "shards", 0),
                    cell(v, "connected", 0),
                    cell(v, "configured_rate_per_sec", 0),
                    cell(v, "deliveries_per_sec", 0),
                    cell(v, "rate_ratio", 3),
                    cell(v, "completion_s", 3),
                    cell(v, "ideal_completion_s", 3),
                    cell(v, "deliveries_received", 0),
                    cell(v, "lost", 0),
                    cell(v, "server_cpu.percent", 0),
                    cell(v, "other_cpu_percent", 0),
                ]
            })
            .collect();
        table(
            &mut md,
            &[
                "run",
                "time (UTC)",
                "commit",
                "shards",
                "clients",
                "configured/s",
                "achieved/s",
                "ratio",
                "completion s",
                "ideal s",
                "deliveries",
                "lost",
                "server CPU %",
                "other CPU %",
            ],
            &rows,
        );
    }

    let soak = labelled("soak");
    if !soak.is_empty() {
        md.push_str("## soak: memory under steady load\n\n");
        md.push_str("Pings, unicast pushes and churn for minutes; server RSS sampled every few seconds. `lost ≤` counts messages queued to sessions the clients were closing (churn), an upper bound.\n\n");
        let chart = LineChart {
            title: "soak: server RSS over time".into(),
            x_label: "time since load start (min)".into(),
            y_label: "server RSS (MiB)".into(),
            series: soak
                .iter()
                .map(|(l, v)| LineSeries {
                    name: l.clone(),
                    points: v
                        .get("rss_samples")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|p| Some((p.get(0)?.as_f64()? / 60.0, p.get(1)?.as_f64()? / 1_048_576.0)))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            y_from_zero: true,
        };
        svgs.push(("soak-rss.svg".to_owned(), chart.render()));
        svgs.push((
            "soak-latency.svg".to_owned(),
            percentile_chart("soak: push-to-receive latency per run", &soak, "latency_us").render(),
        ));
        md.push_str("![soak RSS over time](soak-rss.svg)\n\n![soak latency percentiles](soak-latency.svg)\n\n");
        let rows: Vec<Vec<String>> = soak
            .iter()
            .map(|(l, v)| {
                vec![
                    l.clone(),
                    when(v),
                    commit(v),
                    cell(v, "connected", 0),
                    cell(v, "ping_ms", 0),
                    cell(v, "rate_per_sec", 0),
                    cell(v, "churn_per_sec", 3),
                    mib(v, "rss_start_bytes"),
                    mib(v, "rss_end_bytes"),
                    mib(v, "rss_max_bytes"),
                    cell(v, "rss_slope_bytes_per_min", 0),
                    cell(v, "rss_slope_second_half_bytes_per_min", 0),
                    cell(v, "messages_received", 0),
                    cell(v, "lost_upper_bound", 0),
                    cell(v, "reconnects", 0),
                    cell(v, "latency_us.p99_us", 0),
                    cell(v, "server_cpu.percent", 0),
                    cell(v, "other_cpu_percent", 0),
                ]
            })
            .collect();
        table(
            &mut md,
            &[
                "run",
                "time (UTC)",
                "commit",
                "clients",
                "ping ms",
                "push/s",
                "churn/s",
                "RSS start MiB",
                "RSS end MiB",
                "RSS max MiB",
                "slope B/min",
                "2nd-half slope B/min",
                "received",
                "lost ≤",
                "reconnects",
                "p99 µs",
                "server CPU %",
                "other CPU %",
            ],
            &rows,
        );
    }

    let idle = labelled("idle");
    if !idle.is_empty() {
        md.push_str("## idle: memory per idle connection\n\n");
        let rows: Vec<Vec<String>> = idle
            .iter()
            .map(|(l, v)| {
                vec![
                    l.clone(),
                    when(v),
                    commit(v),
                    cell(v, "shards", 0),
                    cell(v, "connected", 0),
                    cell(v, "rss_bytes_per_conn", 1),
                    cell(v, "connects_per_sec", 0),
                ]
            })
            .collect();
        table(&mut md, &["run", "time (UTC)", "commit", "shards", "connections", "RSS B/conn", "connects/s"], &rows);
    }

    let others: Vec<String> = by
        .iter()
        .filter(|(name, _)| !ORDER.contains(name))
        .map(|(name, runs)| format!("`{name}` ({} runs)", runs.len()))
        .collect();
    if !others.is_empty() {
        let _ = writeln!(md, "Other scenarios in the input, not tabulated here: {}.", others.join(", "));
    }
    Report { markdown: md, svgs }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unicast(rate: f64, p99: f64) -> Value {
        serde_json::json!({
            "scenario": "unicast", "shards": 2, "connected": 10000, "rate_per_sec": rate,
            "achieved_rate_per_sec": rate, "pushes_sent": 50000, "lost": 0,
            "latency_us": {"p50_us": 80.5, "p90_us": 150.0, "p99_us": p99, "p999_us": 2000.0, "max_us": 5000.0},
            "push_reply_latency_us": {"p99_us": 300.0},
            "server_cpu": {"percent": 55.0}, "clients_cpu": {"percent": 40.0},
            "counted_cpu": {"server_cpu_per_push_us": 20.3},
            "timestamp": "2026-11-22T01:02:03Z", "git_commit": "abc1234", "git_dirty": true
        })
    }

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(1_234_567.0, 0), "1,234,567");
        assert_eq!(thousands(999.0, 0), "999");
        assert_eq!(thousands(1234.5, 1), "1,234.5");
        assert_eq!(thousands(-1234.0, 0), "-1,234");
        assert_eq!(thousands(-0.0001, 0), "0");
    }

    #[test]
    fn unicast_runs_get_a_table_row_and_a_chart() {
        let records = vec![unicast(5000.0, 700.0), unicast(50000.0, 950.0)];
        let r = build(&records, &[PathBuf::from("results.jsonl")], 20);
        let md = &r.markdown;
        assert!(md.contains("## unicast"));
        assert!(md.contains("![unicast latency percentiles](unicast-latency.svg)"));
        let row = md.lines().find(|l| l.starts_with("| #2 50k/s 2sh")).expect(md);
        assert!(row.contains("| 2026-11-22 01:02 | abc1234+ | 10,000 | - | 50,000 |"), "{row}");
        assert!(row.contains("| 950 |"), "{row}");
        assert!(row.contains("| 55 | 20.30 | 40 |"), "server CPU %, µs per push, clients CPU %: {row}");
        assert_eq!(r.svgs.len(), 1);
        let (name, svg) = &r.svgs[0];
        assert_eq!(name, "unicast-latency.svg");
        assert!(svg.contains(">#1 5k/s 2sh</text>") && svg.contains("p99.9"));
        assert_eq!(svg.matches("<title>").count(), 10, "5 percentiles x 2 runs");
    }

    #[test]
    fn soak_runs_plot_rss_over_time_and_unknown_scenarios_are_listed() {
        let soak = serde_json::json!({
            "scenario": "soak", "minutes": 10.0, "rss_samples": [[0.0, 10485760], [300.0, 11534336], [600.0, 11534336]],
            "rss_start_bytes": 10485760, "rss_end_bytes": 11534336, "rss_max_bytes": 11534336
        });
        let other = serde_json::json!({"scenario": "upstream"});
        let r = build(&[soak, other], &[], 20);
        assert!(r.markdown.contains("| 10.0 | 11.0 | 11.0 |"), "{}", r.markdown);
        assert!(r.markdown.contains("`upstream` (1 runs)"));
        let rss = &r.svgs.iter().find(|(n, _)| n == "soak-rss.svg").unwrap().1;
        assert!(rss.contains("time since load start (min)"));
        let points = rss.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(points.split(' ').count(), 3);
    }

    #[test]
    fn second_long_latencies_are_plotted_in_ms() {
        let mut slow = unicast(5000.0, 2_000_000.0);
        slow["latency_us"]["max_us"] = serde_json::json!(9_000_000.0);
        let fast = unicast(5000.0, 900.0);
        let slow_chart = percentile_chart("t", &[("a".into(), &slow)], "latency_us");
        assert_eq!(slow_chart.y_label, "latency (ms, log scale)");
        assert_eq!(slow_chart.series[2].values[0], Some(2000.0), "p99 in ms");
        let fast_chart = percentile_chart("t", &[("a".into(), &fast)], "latency_us");
        assert_eq!(fast_chart.y_label, "latency (µs, log scale)");
        assert_eq!(fast_chart.series[2].values[0], Some(900.0));
    }

    #[test]
    fn keeps_only_the_last_runs_per_scenario() {
        let records: Vec<Value> = (0..5).map(|i| unicast(1000.0 * f64::from(i + 1), 100.0)).collect();
        let r = build(&records, &[], 2);
        assert!(!r.markdown.contains("| #3 "));
        assert!(r.markdown.contains("| #2 5k/s 2sh"), "{}", r.markdown);
    }
}
