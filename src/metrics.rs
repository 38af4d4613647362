//! Prometheus text exposition (format 0.0.4) for the admin endpoint.
//!
//! Shards keep plain counters; the admin sidecar reads them and writes
//! them here. Each family is written once with its HELP and TYPE lines,
//! then one sample per label set.

use std::fmt::Write as _;

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
