//! A small SVG chart writer for the report: grouped bar charts (linear or
//! log y axis) and line charts, with a title, axis labels with units, tick
//! labels, grid lines and a legend. Plain SVG 1.1 text, no scripts, no
//! external fonts, so it renders the same in browsers, GitHub and rsvg.

use std::fmt::Write as _;

/// Colours of series, in order (readable on white, distinguishable).
const PALETTE: [&str; 8] = ["#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#a463f2", "#9c6b4e", "#9498a0"];
const HEIGHT: f64 = 440.0;
const MARGIN_LEFT: f64 = 84.0;
const MARGIN_RIGHT: f64 = 24.0;
const MARGIN_TOP: f64 = 78.0;
const FONT: &str = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\"";

/// Bars of one series, one value per category (`None`: no bar).
#[derive(Debug, Clone)]
pub struct BarSeries {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// Categories on x, one bar per series in each.
#[derive(Debug, Clone)]
pub struct BarChart {
    pub title: String,
    /// Y axis label, with its unit.
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
    /// Logarithmic y axis (for latency percentiles spanning decades).
    pub log_y: bool,
}

/// A polyline of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct LineSeries {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<LineSeries>,
    /// Start the y axis at 0 (else at a padded minimum).
    pub y_from_zero: bool,
}

/// A y (or x) axis: maps values to pixels and lists its ticks.
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
    ticks: Vec<f64>,
}

impl Axis {
    fn linear(min: f64, max: f64) -> Axis {
        let (min, max) = if (max - min).abs() < f64::EPSILON { (min - 1.0, max + 1.0) } else { (min, max) };
        let ticks = nice_ticks(min, max, 5);
        Axis { lo: ticks[0], hi: *ticks.last().unwrap_or(&max), log: false, ticks }
    }

    fn log(min_positive: f64, max: f64) -> Axis {
        // A bar just above a decade line would be invisible: keep the
        // smallest value at least 0.3 decade above the axis start.
        let lo = (min_positive.max(1e-9).log10() - 0.3).floor();
        let hi = max.max(min_positive * 10.0).log10().ceil().max(lo + 1.0);
        let ticks = (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect();
        Axis { lo: 10f64.powf(lo), hi: 10f64.powf(hi), log: true, ticks }
    }

    /// Position of `v` between 0 (at `lo`) and 1 (at `hi`).
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.lo);
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }
}

/// About `target` round tick values covering `min..=max` (steps of 1, 2 or
/// 5 times a power of ten).
pub fn nice_ticks(min: f64, max: f64, target: usize) -> Vec<f64> {
    let range = (max - min).abs().max(f64::MIN_POSITIVE);
    let raw = range / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step =
        [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| range / s <= target as f64).unwrap_or(mag * 10.0);
    let first = (min / step).floor() * step;
    let last = (max / step).ceil() * step;
    let n = ((last - first) / step).round() as usize;
    (0..=n).map(|i| clean(first + i as f64 * step)).collect()
}

/// Rounds away binary noise such as 0.30000000000000004.
fn clean(v: f64) -> f64 {
    (v * 1e9).round() / 1e9
}

/// Short number for tick and bar labels: 1.5M, 12k, 0.25.
pub fn short_num(v: f64) -> String {
    let a = v.abs();
    let trim = |s: String| if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_owned() } else { s };
    if a >= 1e9 {
        trim(format!("{:.2}", v / 1e9)) + "G"
    } else if a >= 1e6 {
        trim(format!("{:.2}", v / 1e6)) + "M"
    } else if a >= 1e3 {
        trim(format!("{:.2}", v / 1e3)) + "k"
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.1}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

/// Escapes text for SVG content and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// `<svg>` start, white background and title.
fn open(out: &mut String, width: f64, title: &str) {
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{HEIGHT:.0}\" \
         viewBox=\"0 0 {width:.0} {HEIGHT:.0}\" {FONT} font-size=\"12\">"
    );
    let _ = writeln!(out, "<rect x=\"0\" y=\"0\" width=\"{width:.0}\" height=\"{HEIGHT:.0}\" fill=\"#ffffff\"/>");
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">{}</text>",
        width / 2.0,
        escape(title)
    );
}

/// Height of one legend row.
const LEGEND_ROW: f64 = 18.0;

/// Legend entries under the title, wrapped into rows that fit `width`;
/// returns the top of the plot area below them.
fn legend(out: &mut String, names: &[&str], x0: f64, width: f64) -> f64 {
    let entry_w = |name: &str| 16.0 + 7.0 * name.chars().count() as f64 + 18.0;
    let (mut x, mut y) = (x0, 40.0);
    for (i, name) in names.iter().enumerate() {
        if x > x0 && x + entry_w(name) > width - MARGIN_RIGHT {
            x = x0;
            y += LEGEND_ROW;
        }
        let _ = writeln!(out, "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/>", colour(i));
        let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>", x + 16.0, y + 10.5, escape(name));
        x += entry_w(name);
    }
    MARGIN_TOP + (y - 40.0)
}

/// Y axis: grid lines, tick labels and the rotated label.
fn y_axis(out: &mut String, axis: &Axis, plot: (f64, f64, f64, f64), label: &str) {
    let (left, top, width, height) = plot;
    for &t in &axis.ticks {
        let y = top + height * (1.0 - axis.frac(t));
        let _ = writeln!(
            out,
            "<line x1=\"{left:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>",
            left + width
        );
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + 4.0,
            short_num(t)
        );
    }
    if axis.log {
        // Unlabelled minor grid lines at 2x and 5x each decade.
        for &t in &axis.ticks {
            for m in [2.0, 5.0] {
                let v = t * m;
                if v < axis.hi {
                    let y = top + height * (1.0 - axis.frac(v));
                    let _ = writeln!(
                        out,
                        "<line x1=\"{left:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#f2f2f2\"/>",
                        left + width
                    );
                }
            }
        }
    }
    let cy = top + height / 2.0;
    let _ = writeln!(
        out,
        "<text x=\"18\" y=\"{cy:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {cy:.1})\">{}</text>",
        escape(label)
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left:.1}\" y1=\"{top:.1}\" x2=\"{left:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        top + height
    );
    let _ = writeln!(
        out,
        "<line x1=\"{left:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
        top + height,
        left + width,
        top + height
    );
}

impl BarChart {
    pub fn render(&self) -> String {
        let n_cat = self.categories.len().max(1);
        let n_ser = self.series.len().max(1);
        let group_w = (18.0 * n_ser as f64 + 16.0).max(48.0);
        let longest = self.categories.iter().map(|c| c.chars().count()).max().unwrap_or(0) as f64;
        // Category labels are rotated 35 degrees; leave room below for them.
        let bottom = (longest * 6.2 * 0.6 + 30.0).clamp(60.0, 200.0);
        // ... and room on the left for the first one, which leans that way.
        let left = MARGIN_LEFT.max(longest * 6.2 * 0.82 + 8.0 - group_w / 2.0);
        let width = (left + MARGIN_RIGHT + group_w * n_cat as f64).max(640.0);
        let plot_w = width - left - MARGIN_RIGHT;
        let values: Vec<f64> = self.series.iter().flat_map(|s| s.values.iter().flatten().copied()).collect();
        let max = values.iter().copied().fold(0.0f64, f64::max);
        let axis = if self.log_y {
            let min_pos = values.iter().copied().filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
            Axis::log(if min_pos.is_finite() { min_pos } else { 1.0 }, max.max(1.0))
        } else {
            Axis::linear(0.0, max.max(1.0))
        };
        let mut out = String::new();
        open(&mut out, width, &self.title);
        let names: Vec<&str> = self.series.iter().map(|s| s.name.as_str()).collect();
        let top = legend(&mut out, &names, left, width);
        let plot_h = HEIGHT - top - bottom;
        y_axis(&mut out, &axis, (left, top, plot_w, plot_h), &self.y_label);
        let slot = plot_w / n_cat as f64;
        let bar_w = ((slot - 12.0) / n_ser as f64).clamp(2.0, 40.0);
        let base = top + plot_h;
        for (c, cat) in self.categories.iter().enumerate() {
            let group_x = left + slot * c as f64 + (slot - bar_w * n_ser as f64) / 2.0;
            for (s, series) in self.series.iter().enumerate() {
                let Some(Some(v)) = series.values.get(c) else { continue };
                let h = (plot_h * axis.frac(*v)).clamp(0.0, plot_h);
                let x = group_x + bar_w * s as f64;
                let _ = writeln!(
                    out,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                    base - h,
                    (bar_w - 1.0).max(1.0),
                    colour(s),
                    escape(&series.name),
                    short_num(*v)
                );
                // Value labels only where they fit above their bar.
                if bar_w >= 26.0 {
                    let _ = writeln!(
                        out,
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\" fill=\"#444\">{}</text>",
                        x + bar_w / 2.0,
                        base - h - 3.0,
                        short_num(*v)
                    );
                }
            }
            let cx = left + slot * (c as f64 + 0.5);
            let ly = base + 14.0;
            let _ = writeln!(
                out,
                "<text x=\"{cx:.1}\" y=\"{ly:.1}\" text-anchor=\"end\" transform=\"rotate(-35 {cx:.1} {ly:.1})\">{}</text>",
                escape(cat)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

impl LineChart {
    pub fn render(&self) -> String {
        let width = 900.0;
        let bottom = 56.0;
        let plot_w = width - MARGIN_LEFT - MARGIN_RIGHT;
        let pts: Vec<(f64, f64)> = self.series.iter().flat_map(|s| s.points.iter().copied()).collect();
        let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| pts.iter().map(pick).fold(init, f);
        let (x_min, x_max) = (fold(f64::min, f64::INFINITY, |p| p.0), fold(f64::max, f64::NEG_INFINITY, |p| p.0));
        let (y_min, y_max) = (fold(f64::min, f64::INFINITY, |p| p.1), fold(f64::max, f64::NEG_INFINITY, |p| p.1));
        let (x_min, x_max) = if pts.is_empty() { (0.0, 1.0) } else { (x_min, x_max) };
        let (y_min, y_max) = if pts.is_empty() { (0.0, 1.0) } else { (y_min, y_max) };
        let x_axis = Axis::linear(x_min, x_max);
        let y_axis_ = if self.y_from_zero {
            Axis::linear(0.0, y_max.max(f64::MIN_POSITIVE))
        } else {
            let pad = ((y_max - y_min) * 0.1).max(y_max.abs() * 0.01);
            Axis::linear(y_min - pad, y_max + pad)
        };
        let mut out = String::new();
        open(&mut out, width, &self.title);
        let names: Vec<&str> = self.series.iter().map(|s| s.name.as_str()).collect();
        let top = legend(&mut out, &names, MARGIN_LEFT, width);
        let plot_h = HEIGHT - top - bottom;
        y_axis(&mut out, &y_axis_, (MARGIN_LEFT, top, plot_w, plot_h), &self.y_label);
        let base = top + plot_h;
        for &t in &x_axis.ticks {
            let x = MARGIN_LEFT + plot_w * x_axis.frac(t);
            let _ = writeln!(
                out,
                "<line x1=\"{x:.1}\" y1=\"{base:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>",
                base + 5.0
            );
            let _ = writeln!(
                out,
                "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                base + 19.0,
                short_num(t)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            MARGIN_LEFT + plot_w / 2.0,
            HEIGHT - 12.0,
            escape(&self.x_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let coords: Vec<String> = s
                .points
                .iter()
                .map(|&(x, y)| {
                    format!(
                        "{:.1},{:.1}",
                        MARGIN_LEFT + plot_w * x_axis.frac(x),
                        top + plot_h * (1.0 - y_axis_.frac(y))
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
                colour(i),
                coords.join(" "),
                escape(&s.name)
            );
        }
        out.push_str("</svg>\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 1000.0, 5), vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        assert_eq!(nice_ticks(0.0, 7.3, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(nice_ticks(0.1, 0.35, 5), vec![0.1, 0.15, 0.2, 0.25, 0.3, 0.35]);
        let t = nice_ticks(31.2, 33.9, 5);
        assert!(t[0] <= 31.2 && *t.last().unwrap() >= 33.9, "{t:?}");
    }

    #[test]
    fn log_axis_spans_whole_decades() {
        let a = Axis::log(42.0, 1800.0);
        assert_eq!(a.ticks, vec![10.0, 100.0, 1000.0, 10_000.0]);
        assert!((a.frac(100.0) - 1.0 / 3.0).abs() < 1e-9);
        assert!((a.frac(10_000.0) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_num(1_500_000.0), "1.5M");
        assert_eq!(short_num(12_000.0), "12k");
        assert_eq!(short_num(250.0), "250");
        assert_eq!(short_num(5_000.0), "5k");
        assert_eq!(short_num(2.5), "2.5");
        assert_eq!(short_num(0.0), "0");
        assert_eq!(short_num(0.125), "0.125");
    }

    #[test]
    fn long_legends_wrap_and_push_the_plot_down() {
        let names: Vec<String> = (0..6).map(|i| format!("series number {i} with a long name")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut out = String::new();
        let top = legend(&mut out, &refs, MARGIN_LEFT, 900.0);
        assert!(top > MARGIN_TOP, "{top}");
        let mut one = String::new();
        assert_eq!(legend(&mut one, &["p50", "p99"], MARGIN_LEFT, 900.0), MARGIN_TOP);
        // Every entry stays inside the chart.
        for line in out.lines().filter(|l| l.starts_with("<rect")) {
            let x: f64 = line.split("x=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap();
            assert!(x < 900.0 - MARGIN_RIGHT, "{line}");
        }
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
    }

    #[test]
    fn bar_chart_has_one_bar_per_value_and_labels() {
        let chart = BarChart {
            title: "Latency <unicast>".into(),
            y_label: "latency (µs, log scale)".into(),
            categories: vec!["run 1".into(), "run 2".into()],
            series: vec![
                BarSeries { name: "p50".into(), values: vec![Some(80.0), Some(90.0)] },
                BarSeries { name: "p99".into(), values: vec![Some(700.0), None] },
            ],
            log_y: true,
        };
        let svg = chart.render();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Latency &lt;unicast&gt;"));
        assert!(svg.contains("latency (µs, log scale)"));
        assert_eq!(svg.matches("<title>").count(), 3, "three bars");
        assert!(svg.contains(">run 2</text>"));
        assert!(svg.contains(">1k</text>"), "log decade tick");
        // The 700 bar is taller than the 80 one.
        let heights: Vec<f64> = svg
            .lines()
            .filter(|l| l.contains("<title>"))
            .map(|l| l.split("height=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap())
            .collect();
        assert!(heights[2] > heights[0], "{heights:?}");
    }

    #[test]
    fn line_chart_draws_every_series() {
        let chart = LineChart {
            title: "RSS".into(),
            x_label: "time (min)".into(),
            y_label: "RSS (MiB)".into(),
            series: vec![
                LineSeries { name: "a".into(), points: vec![(0.0, 10.0), (1.0, 11.0), (2.0, 10.5)] },
                LineSeries { name: "b".into(), points: vec![(0.0, 20.0), (2.0, 20.0)] },
            ],
            y_from_zero: true,
        };
        let svg = chart.render();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("time (min)") && svg.contains("RSS (MiB)"));
        // Three points in the first series.
        let first = svg.lines().find(|l| l.contains("<polyline")).unwrap();
        assert_eq!(first.split("points=\"").nth(1).unwrap().split('"').next().unwrap().split(' ').count(), 3);
    }
}
