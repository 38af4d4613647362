//! Result records: one JSON object per run, printed as the only line on
//! stdout and appended to a JSON-lines file. Every scenario's record
//! flattens a [`RunInfo`] into its own fields.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use crate::sys;

/// Fields every record carries: when, on what code and what host.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Wall time of the whole run (start-up and clean-up included), seconds.
    pub duration_s: f64,
    /// End of the run, UTC, RFC 3339.
    pub timestamp: String,
    /// `git rev-parse --short HEAD` of the workspace, if available.
    pub git_commit: Option<String>,
    /// Whether tracked files differ from that commit.
    pub git_dirty: Option<bool>,
    /// CPUs available to the bench (server and clients share them).
    pub host_cores: usize,
}

impl RunInfo {
    pub fn now(duration: Duration) -> RunInfo {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let git = |args: &[&str]| Command::new("git").args(args).current_dir(dir).output().ok();
        let git_commit = git(&["rev-parse", "--short", "HEAD"])
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        // diff-index only reads (unlike `git status`, it never rewrites the index).
        let git_dirty = git(&["diff-index", "--quiet", "HEAD", "--"]).and_then(|o| match o.status.code() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        });
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        RunInfo {
            duration_s: round(duration.as_secs_f64(), 3),
            timestamp: rfc3339(unix),
            git_commit,
            git_dirty,
            host_cores: sys::host_cores(),
        }
    }
}

/// Prints `record` as one line on stdout and appends it to `out`
/// (creating its directory).
pub fn emit(record: &impl Serialize, out: &Path) -> anyhow::Result<()> {
    let line = serde_json::to_string(record)?;
    println!("{line}");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file =
        OpenOptions::new().create(true).append(true).open(out).with_context(|| format!("opening {}", out.display()))?;
    writeln!(file, "{line}").with_context(|| format!("appending to {}", out.display()))?;
    Ok(())
}

/// `x` rounded to `digits` decimals (records stay readable).
pub fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds (civil-from-days, proleptic
/// Gregorian calendar).
fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn appends_one_line_per_record() {
        let dir = crate::server::TempDir::new("record-test").unwrap();
        let out = dir.path().join("runs/results.jsonl");
        emit(&serde_json::json!({"a": 1}), &out).unwrap();
        emit(&serde_json::json!({"a": 2}), &out).unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn rounds() {
        assert_eq!(round(1.23456, 2), 1.23);
    }
}
