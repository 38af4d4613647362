//! The parent's side of the worker processes: plan how many, spawn them
//! (this binary re-invoked as `worker`), follow their JSON lines, release
//! them by closing their stdin, reap them. Dropping a [`WorkerPool`] kills
//! whatever is still running.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use crossbeam_channel::Receiver;

use crate::harness::Harness;
use crate::worker::{WorkerMsg, WorkerSpec};

/// How often wait loops wake to check the deadline and the server.
const POLL: Duration = Duration::from_millis(100);
/// How long released workers get to close their connections and exit.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(20);

/// Splits `total` connections over workers: `requested` of them, or as
/// few as keep each at or under `max_per_worker`. Counts differ by at most one.
pub fn plan_workers(total: u32, requested: Option<u32>, max_per_worker: u32) -> anyhow::Result<Vec<u32>> {
    if total == 0 {
        bail!("--connections must be at least 1");
    }
    let max_per_worker = max_per_worker.max(1);
    let workers = requested.unwrap_or_else(|| total.div_ceil(max_per_worker)).clamp(1, total);
    let per = total.div_ceil(workers);
    if per > max_per_worker {
        bail!(
            "{workers} workers would hold {per} connections each, more than --max-per-worker {max_per_worker} \
             (each connection is an open file; use more --workers)"
        );
    }
    Ok((0..workers).map(|w| total / workers + u32::from(w < total % workers)).collect())
}

/// Something a worker said, or its end.
#[derive(Debug)]
pub enum WorkerEvent {
    Msg(WorkerMsg),
    /// A stdout line that is not a [`WorkerMsg`].
    Garbage(String),
    /// Stdout closed: the worker exited (or is about to).
    Eof,
}

struct Worker {
    child: Child,
    /// Closing it releases the worker.
    stdin: Option<ChildStdin>,
    /// Reaped: `child.wait` returned.
    reaped: bool,
}

/// Running workers and the merged stream of their stdout lines.
pub struct WorkerPool {
    workers: Vec<Worker>,
    events: Receiver<(usize, WorkerEvent)>,
}

/// The connect phase, summed over every worker.
#[derive(Debug, Default, Clone)]
pub struct ConnectSummary {
    pub connected: u32,
    pub failed: u32,
    pub failures: BTreeMap<String, u32>,
    pub first_connect_unix_us: u64,
    pub last_auth_ok_unix_us: u64,
}

impl ConnectSummary {
    /// Authenticated connections per second from the first connect (any
    /// worker) to the last AuthOk (any worker).
    pub fn connects_per_sec(&self) -> f64 {
        let span_us = self.last_auth_ok_unix_us.saturating_sub(self.first_connect_unix_us);
        if span_us == 0 { 0.0 } else { f64::from(self.connected) * 1e6 / span_us as f64 }
    }

    pub fn span_s(&self) -> f64 {
        self.last_auth_ok_unix_us.saturating_sub(self.first_connect_unix_us) as f64 / 1e6
    }
}

impl WorkerPool {
    /// Starts one worker per spec and hands each its spec.
    pub fn spawn(specs: &[WorkerSpec]) -> anyhow::Result<WorkerPool> {
        WorkerPool::spawn_kind("worker", specs)
    }

    /// Starts one `longlink-bench <subcommand>` process per spec (another
    /// kind of worker, e.g. `load-worker`) and hands each its spec. The
    /// worker must speak [`WorkerMsg`] for the connect phase and release;
    /// its other lines arrive as [`WorkerEvent::Garbage`] for the scenario
    /// to parse.
    pub fn spawn_kind<S: serde::Serialize>(subcommand: &str, specs: &[S]) -> anyhow::Result<WorkerPool> {
        let exe = std::env::current_exe().context("locating the bench binary to re-run as a worker")?;
        let (tx, events) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool { workers: Vec::with_capacity(specs.len()), events };
        for (i, spec) in specs.iter().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.arg(subcommand).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
            crate::server::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().with_context(|| format!("starting worker {i} ({})", exe.display()))?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            // In the pool before anything can fail, so Drop kills it.
            pool.workers.push(Worker { child, stdin: None, reaped: false });
            let line = serde_json::to_string(spec)?;
            writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .with_context(|| format!("sending worker {i} its spec"))?;
            pool.workers[i].stdin = Some(stdin);
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("worker-{i}-stdout"))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        let event = match serde_json::from_str(&line) {
                            Ok(msg) => WorkerEvent::Msg(msg),
                            Err(_) => WorkerEvent::Garbage(line),
                        };
                        if tx.send((i, event)).is_err() {
                            return;
                        }
                    }
                    let _ = tx.send((i, WorkerEvent::Eof));
                })
                .context("starting a worker reader thread")?;
        }
        Ok(pool)
    }

    /// Writes `line` (a command) to every worker's stdin.
    pub fn send_all(&mut self, line: &str) -> anyhow::Result<()> {
        for (i, w) in self.workers.iter_mut().enumerate() {
            let stdin = w.stdin.as_mut().with_context(|| format!("worker {i} was already released"))?;
            writeln!(stdin, "{line}").and_then(|()| stdin.flush()).with_context(|| format!("writing to worker {i}"))?;
        }
        Ok(())
    }

    /// Process ids of the workers (for CPU accounting).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// The next event from any worker, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<(usize, WorkerEvent)> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Waits until every worker has reported [`WorkerMsg::Connected`],
    /// drawing a progress line. `alive` runs between events and fails the
    /// wait when the server is gone.
    pub fn wait_connected(
        &self,
        harness: &mut Harness,
        label: &str,
        alive: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<ConnectSummary> {
        let n = self.workers.len();
        let mut progress = vec![(0u32, 0u32); n];
        let mut done: Vec<Option<ConnectSummary>> = vec![None; n];
        while done.iter().any(Option::is_none) {
            harness.check()?;
            alive()?;
            let Some((w, event)) = self.recv_timeout(POLL) else { continue };
            match event {
                WorkerEvent::Msg(WorkerMsg::Progress { connected, failed }) => progress[w] = (connected, failed),
                WorkerEvent::Msg(WorkerMsg::Connected {
                    connected,
                    failed,
                    failures,
                    first_connect_unix_us,
                    last_auth_ok_unix_us,
                    ..
                }) => {
                    progress[w] = (connected, failed);
                    done[w] = Some(ConnectSummary {
                        connected,
                        failed,
                        failures,
                        first_connect_unix_us,
                        last_auth_ok_unix_us,
                    });
                }
                WorkerEvent::Msg(WorkerMsg::Fatal { message }) => bail!("worker {w} failed: {message}"),
                WorkerEvent::Msg(WorkerMsg::Closed { .. }) => bail!("worker {w} closed its connections early"),
                WorkerEvent::Garbage(line) => bail!("worker {w} printed something unexpected: {line:?}"),
                WorkerEvent::Eof => bail!("worker {w} exited before it finished connecting"),
            }
            let connected: u32 = progress.iter().map(|p| p.0).sum();
            let failed: u32 = progress.iter().map(|p| p.1).sum();
            let finished = done.iter().filter(|d| d.is_some()).count();
            harness.progress(&format!(
                "[{label}] connected {connected}  failed {failed}  workers done {finished}/{n}  {:.1} s",
                harness.elapsed().as_secs_f64()
            ));
        }
        let mut total = ConnectSummary { first_connect_unix_us: u64::MAX, ..ConnectSummary::default() };
        for s in done.into_iter().flatten() {
            total.connected += s.connected;
            total.failed += s.failed;
            for (reason, count) in s.failures {
                *total.failures.entry(reason).or_default() += count;
            }
            if s.first_connect_unix_us != 0 {
                total.first_connect_unix_us = total.first_connect_unix_us.min(s.first_connect_unix_us);
            }
            total.last_auth_ok_unix_us = total.last_auth_ok_unix_us.max(s.last_auth_ok_unix_us);
        }
        if total.first_connect_unix_us == u64::MAX {
            total.first_connect_unix_us = 0;
        }
        Ok(total)
    }

    /// Closes every worker's stdin (they close their connections and exit)
    /// and waits for them. Returns the connections they reported holding.
    pub fn release(&mut self, harness: &Harness) -> anyhow::Result<u32> {
        for w in &mut self.workers {
            w.stdin = None;
        }
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        let mut held = 0;
        let mut ended = vec![false; self.workers.len()];
        while ended.iter().any(|e| !e) {
            harness.check()?;
            if Instant::now() >= deadline {
                bail!("workers did not exit within {} s of being released", RELEASE_TIMEOUT.as_secs());
            }
            match self.recv_timeout(POLL) {
                Some((_, WorkerEvent::Msg(WorkerMsg::Closed { held: h }))) => held += h,
                Some((w, WorkerEvent::Msg(WorkerMsg::Fatal { message }))) => bail!("worker {w} failed: {message}"),
                Some((w, WorkerEvent::Eof)) => ended[w] = true,
                Some(_) | None => {}
            }
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            let status = w.child.wait().with_context(|| format!("reaping worker {i}"))?;
            w.reaped = true;
            if !status.success() {
                bail!("worker {i} exited with {status}");
            }
        }
        Ok(held)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if !w.reaped {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_even_splits_under_the_cap() {
        assert_eq!(plan_workers(19_000, None, 9000).unwrap(), vec![6334, 6333, 6333]);
        assert_eq!(plan_workers(10, Some(4), 9000).unwrap(), vec![3, 3, 2, 2]);
        assert_eq!(plan_workers(3, Some(8), 9000).unwrap(), vec![1, 1, 1]);
        assert!(plan_workers(19_000, Some(2), 9000).is_err());
        assert!(plan_workers(0, None, 9000).is_err());
    }

    #[test]
    fn connect_rate_spans_first_connect_to_last_auth_ok() {
        let s = ConnectSummary {
            connected: 1000,
            first_connect_unix_us: 1_000_000,
            last_auth_ok_unix_us: 1_500_000,
            ..Default::default()
        };
        assert_eq!(s.connects_per_sec(), 2000.0);
        assert_eq!(s.span_s(), 0.5);
    }
}
