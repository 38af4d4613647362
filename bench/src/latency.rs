//! Latency measurement shared by the backend side (parent) and the load
//! workers: the monotonic clock, the timestamp every pushed payload
//! carries, and hdrhistogram helpers (record, serialize for the trip to
//! the parent, merge, summarize).
//!
//! CLOCK_MONOTONIC is one clock for every process on a host, so a stamp
//! taken in the parent's push thread and a reading in a worker process
//! give a push-to-receive latency without any clock sync.

use anyhow::{Context, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use serde::Serialize;

use crate::record::round;

/// Bytes of the stamp at the start of every pushed payload.
pub const STAMP_BYTES: usize = 16;
/// Highest latency a histogram holds, in ns (one hour); more is clamped.
const MAX_TRACKABLE_NS: u64 = 3_600_000_000_000;
/// Significant decimal digits kept: 0.1 % resolution at any magnitude.
const SIGFIG: u8 = 3;

/// CLOCK_MONOTONIC in nanoseconds, comparable across processes on one host.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we pass; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A payload of `len` bytes (at least [`STAMP_BYTES`]) that starts with
/// the send time and a sequence number, both little-endian u64; the rest
/// is filler.
pub fn stamp_payload(sent_mono_ns: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(STAMP_BYTES)];
    p[..8].copy_from_slice(&sent_mono_ns.to_le_bytes());
    p[8..16].copy_from_slice(&seq.to_le_bytes());
    p
}

/// The send time and sequence number of a stamped payload.
pub fn read_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let ts = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((ts, seq))
}

/// An empty latency histogram in ns (1 ns to 1 h, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    // Invariant: constant, valid bounds (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, SIGFIG).expect("valid histogram bounds")
}

/// hdrhistogram V2 serialization, base64 (the form that travels in JSON).
pub fn encode(h: &Histogram<u64>) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).map_err(|e| anyhow!("serializing a histogram: {e:?}"))?;
    Ok(BASE64.encode(buf))
}

pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = BASE64.decode(text).context("histogram is not base64")?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| anyhow!("deserializing a histogram: {e:?}"))
}

/// Adds every encoded histogram into one.
pub fn merge<'a>(encoded: impl IntoIterator<Item = &'a str>) -> anyhow::Result<Histogram<u64>> {
    let mut total = new_histogram();
    for text in encoded {
        let h = decode(text)?;
        total.add(&h).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
    }
    Ok(total)
}

/// Percentiles of a latency histogram, in microseconds (recorded in ns).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        let us = |ns: u64| round(ns as f64 / 1000.0, 1);
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                min_us: 0.0,
                mean_us: 0.0,
                p50_us: 0.0,
                p90_us: 0.0,
                p99_us: 0.0,
                p999_us: 0.0,
                max_us: 0.0,
            };
        }
        LatencySummary {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: round(h.mean() / 1000.0, 1),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }

    /// One line for progress output.
    pub fn line(&self) -> String {
        format!(
            "n={} p50 {:.0} µs  p90 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  max {:.0} µs",
            self.count, self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_short_payloads_have_none() {
        let p = stamp_payload(123_456_789, 42, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(read_stamp(&p), Some((123_456_789, 42)));
        assert_eq!(stamp_payload(1, 2, 3).len(), STAMP_BYTES);
        assert_eq!(read_stamp(&p[..15]), None);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = mono_ns();
        let b = mono_ns();
        assert!(b >= a && a > 0);
    }

    #[test]
    fn merged_histograms_equal_one_histogram_of_all_values() {
        let mut all = new_histogram();
        let mut parts = Vec::new();
        for w in 0..3u64 {
            let mut h = new_histogram();
            for i in 0..1000u64 {
                let v = 1_000 + w * 7_919 + i * 997;
                h.record(v).unwrap();
                all.record(v).unwrap();
            }
            parts.push(encode(&h).unwrap());
        }
        let merged = merge(parts.iter().map(String::as_str)).unwrap();
        assert_eq!(merged.len(), 3000);
        assert_eq!(merged, all);
        assert_eq!(LatencySummary::of(&merged), LatencySummary::of(&all));
    }

    #[test]
    fn summary_is_in_microseconds() {
        let mut h = new_histogram();
        for ns in 1..=1000u64 {
            h.record(ns * 1000).unwrap(); // 1..=1000 µs
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
        assert_eq!(LatencySummary::of(&new_histogram()).count, 0);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(decode("not base64!").is_err());
        assert!(decode(&BASE64.encode(b"garbage bytes")).is_err());
    }
}
