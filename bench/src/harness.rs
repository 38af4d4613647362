//! What every scenario shares: the options common to all of them, the
//! overall deadline, Ctrl-C handling and the progress line on stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::source::DEFAULT_PER_ADDRESS;
use crate::sys;

/// Options every scenario takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Server shards (executors). Default: one per core of this host.
    #[arg(long)]
    pub shards: Option<u16>,
    /// Client worker processes. Default: enough to keep each at or under
    /// --max-per-worker connections.
    #[arg(long)]
    pub workers: Option<u32>,
    /// Most connections one worker process holds (each is one open file).
    #[arg(long, default_value_t = 9000)]
    pub max_per_worker: u32,
    /// Connects (TCP + Auth) in progress at once in each worker.
    #[arg(long, default_value_t = 256)]
    pub in_flight: u32,
    /// Connections opened from one 127.x.y.z source address before the
    /// worker moves to the next.
    #[arg(long, default_value_t = DEFAULT_PER_ADDRESS)]
    pub conns_per_source: u32,
    /// The `longlink` binary to start. Default: target/release/longlink.
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// JSON-lines file the result record is appended to.
    /// Default: bench/runs/results.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Abort the whole run after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
}

impl CommonArgs {
    pub fn shards(&self) -> u16 {
        self.shards.unwrap_or_else(|| u16::try_from(sys::host_cores()).unwrap_or(u16::MAX))
    }

    pub fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("runs/results.jsonl"))
    }
}

/// The run's deadline, interrupt flag and progress output.
pub struct Harness {
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    /// Set by SIGINT/SIGTERM; every wait loop checks it, so the guards
    /// (workers, server) are dropped on the normal error path.
    interrupted: Arc<AtomicBool>,
    progress: Progress,
}

impl Harness {
    pub fn new(timeout: Duration) -> anyhow::Result<Harness> {
        let interrupted = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, interrupted.clone()).context("installing signal handlers")?;
        }
        let started = Instant::now();
        Ok(Harness { started, deadline: started + timeout, timeout, interrupted, progress: Progress::new() })
    }

    /// Fails once the run is interrupted or past its deadline.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        if Instant::now() >= self.deadline {
            bail!("overall timeout of {} s reached (raise it with --timeout-s)", self.timeout.as_secs());
        }
        Ok(())
    }

    /// Restarts the deadline: `--timeout-s` from now (for runs made of
    /// several phases, each bounded on its own).
    pub fn rearm(&mut self) {
        self.deadline = Instant::now() + self.timeout;
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Redraws the progress line.
    pub fn progress(&mut self, line: &str) {
        self.progress.update(line);
    }

    /// Prints a step on its own line (after the progress line).
    pub fn note(&mut self, line: &str) {
        self.progress.note(line);
    }
}

/// One line on stderr, redrawn in place on a terminal; elsewhere (logs,
/// CI) printed at most every few seconds.
struct Progress {
    tty: bool,
    /// A progress line is on screen and not yet ended by a newline.
    open: bool,
    last: Option<Instant>,
}

impl Progress {
    const EVERY_TTY: Duration = Duration::from_millis(100);
    const EVERY_LOG: Duration = Duration::from_secs(2);

    fn new() -> Progress {
        Progress { tty: sys::stderr_is_tty(), open: false, last: None }
    }

    fn update(&mut self, line: &str) {
        let every = if self.tty { Self::EVERY_TTY } else { Self::EVERY_LOG };
        if self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        if self.tty {
            eprint!("\r{line}\x1b[K");
            self.open = true;
        } else {
            eprintln!("{line}");
        }
    }

    fn note(&mut self, line: &str) {
        if self.open {
            eprintln!();
            self.open = false;
        }
        self.last = None;
        eprintln!("{line}");
    }
}
