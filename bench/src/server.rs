//! The server under test: a real `longlink serve` process with a config
//! the bench writes, ready once it prints `listening ADDR` (and `push ADDR`). Dropping a
//! [`ServerProcess`] stops it (SIGTERM, then SIGKILL) and removes its
//! temporary directory.

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use longlink::config::{AuthConfig, ClusterConfig, Config, KeyConfig, ServerConfig};
use longlink::groups::ClientGroupsConfig;
use longlink::protocol::token;
use longlink::push::auth::{PushAuthConfig, PushKeyConfig};

use crate::harness::Harness;
use crate::sys;
use crate::worker::KeySpec;

/// How long `longlink serve` may take to print `listening`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for `push ADDR` after `listening ADDR`.
const PUSH_LINE_GRACE: Duration = Duration::from_millis(500);
/// How long the server may take to exit after SIGTERM (it lingers to flush
/// closing sessions; see session.close_linger_ms).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// RSS sampling while waiting for it to settle.
const RSS_POLL: Duration = Duration::from_millis(200);
/// Two readings this far apart must agree for RSS to count as settled.
const RSS_WINDOW: Duration = Duration::from_secs(1);
/// ... within this fraction.
const RSS_TOLERANCE: f64 = 0.005;
/// Give up waiting for RSS to settle after this long.
const RSS_MAX_WAIT: Duration = Duration::from_secs(10);

/// The default server binary: `longlink` next to this binary when this is
/// a release build, else `<workspace>/target/release/longlink`.
pub fn default_server_bin() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
        && dir.file_name().is_some_and(|n| n == "release")
    {
        return dir.join("longlink");
    }
    workspace_dir().join("target/release/longlink")
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Fails with advice when `bin` is missing; warns when it is older than the
/// server's sources (`cargo run -p longlink-bench` does not rebuild it).
pub fn check_server_bin(bin: &Path) -> anyhow::Result<Option<String>> {
    let meta = match fs::metadata(bin) {
        Ok(meta) => meta,
        Err(_) => bail!(
            "server binary {} not found: build it with `cargo build --release` (or pass --server-bin PATH)",
            bin.display()
        ),
    };
    let built = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let src = workspace_dir().join("src");
    let newest =
        fs::read_dir(&src).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()?.modified().ok()).max();
    Ok(newest.filter(|&t| t > built).map(|_| {
        format!(
            "warning: {} is older than {}; run `cargo build --release` to measure the current code",
            bin.display(),
            src.display()
        )
    }))
}

/// Makes `cmd`'s child die with SIGKILL when this process dies, so no
/// server or worker outlives a crashed or killed bench.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A freshly generated signing key shared by the server config and the
/// workers that mint tokens.
pub struct BenchKey {
    id: String,
    secret: [u8; 32],
}

impl BenchKey {
    pub fn generate() -> anyhow::Result<BenchKey> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
        Ok(BenchKey { id: "bench".into(), secret })
    }

    pub fn config(&self) -> KeyConfig {
        KeyConfig { id: self.id.clone(), secret_hex: token::encode_hex(&self.secret) }
    }

    pub fn spec(&self) -> KeySpec {
        KeySpec { id: self.id.clone(), secret_hex: token::encode_hex(&self.secret) }
    }
}

/// A node config for benchmarks: loopback on a port the kernel picks, no
/// accept rate or per-source admission limit, the bench key, `shards` shards. Scenarios adjust it
/// further before [`ServerProcess::start`].
pub fn bench_config(shards: u16, key: &BenchKey) -> Config {
    let loopback_any_port = SocketAddr::from(([127, 0, 0, 1], 0));
    Config {
        node_name: "bench".into(),
        server: ServerConfig {
            client_listen: loopback_any_port,
            push_listen: loopback_any_port,
            admin_listen: loopback_any_port,
            shards,
            accept_rate_per_sec: 0,
            // Load clients spread over many 127.x.y.z sources, thousands
            // from each: the per-source admission limits are for the
            // internet, not for a bench (they reset most connects).
            max_connections_per_ip: 0,
            max_connections_per_net: 0,
            accepts_per_ip_per_sec: 0,
            accepts_per_net_per_sec: 0,
            ..ServerConfig::default()
        },
        auth: AuthConfig { keys: vec![key.config()], ..AuthConfig::default() },
        push_auth: PushAuthConfig {
            keys: vec![PushKeyConfig {
                id: BENCH_PUSH_KEY_ID.into(),
                secret_hex: token::encode_hex(&BENCH_PUSH_SECRET),
                rights: ["push", "broadcast", "groups", "kick", "presence", "status"].map(String::from).to_vec(),
                service_ids: Vec::new(),
            }],
            ..PushAuthConfig::default()
        },
        // Several cluster nodes share this host (the dispatch bench).
        cluster: ClusterConfig { node_listen: loopback_any_port, ..ClusterConfig::default() },
        // Bench clients join the groups they are pushed to.
        client_groups: ClientGroupsConfig { allow: vec!["*".into()] },
        ..Config::default()
    }
}

/// The push key of every bench node (bound to loopback only, so a fixed
/// secret gives nothing away).
const BENCH_PUSH_KEY_ID: &str = "bench-push";
const BENCH_PUSH_SECRET: [u8; 32] = [0x42; 32];

/// The credential the bench's push clients use.
pub fn bench_push_key() -> longlink::backend::PushKey {
    // Invariant: a fixed valid id and a 32-byte secret.
    longlink::backend::PushKey::new(BENCH_PUSH_KEY_ID, BENCH_PUSH_SECRET.to_vec()).expect("valid bench push key")
}

/// Settled resident memory.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub rss_bytes: u64,
    /// False when RSS still moved after [`RSS_MAX_WAIT`].
    pub stable: bool,
    pub waited: Duration,
}

/// A running `longlink serve`.
pub struct ServerProcess {
    child: Child,
    pid: u32,
    /// Client port, from the `listening ADDR` line.
    addr: SocketAddr,
    /// Push port, from the `push ADDR` line.
    push_addr: Option<SocketAddr>,
    /// Config file and server stderr; removed on drop.
    dir: TempDir,
    /// Set once the exit status has been collected.
    exited: Option<ExitStatus>,
    /// Where `idle --transport` clients connect, and the CA of its
    /// certificate (TLS).
    link: Option<SocketAddr>,
    ca_der: Vec<u8>,
}

impl ServerProcess {
    /// Records the listener `idle --transport` clients use.
    pub fn set_link(&mut self, link: Option<SocketAddr>, ca_der: Vec<u8>) {
        self.link = link;
        self.ca_der = ca_der;
    }

    /// The address clients connect to: the transport's listener, else the
    /// client port.
    pub fn link_addr(&self) -> SocketAddr {
        self.link.unwrap_or(self.addr)
    }

    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// Writes `cfg` (its data_dir moved into a temp dir), starts `bin serve`
    /// and waits for its `listening ADDR` and `push ADDR` lines.
    pub fn start(bin: &Path, cfg: &Config, harness: &Harness) -> anyhow::Result<ServerProcess> {
        let dir = TempDir::new("longlink-bench")?;
        let mut cfg = cfg.clone();
        cfg.data_dir = dir.path().join("data");
        cfg.validate().context("bench server config")?;
        let config_path = dir.path().join("longlink.toml");
        fs::write(&config_path, toml::to_string(&cfg).context("serializing the server config")?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let stderr = fs::File::create(dir.path().join("server.stderr")).context("creating the server log")?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--config").arg(&config_path).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        // The log goes to a file that ends up in error messages: no colours.
        cmd.env("NO_COLOR", "1");
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("server stdout")?;
        let mut server = ServerProcess {
            child,
            pid,
            addr: cfg.server.client_listen,
            push_addr: None,
            dir,
            exited: None,
            link: None,
            ca_der: Vec::new(),
        };

        // Forward stdout lines until the server exits, so it never blocks
        // on a full pipe; the address lines are the readiness signal.
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        std::thread::Builder::new()
            .name("server-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = tx.send(line);
                }
            })
            .context("starting the server reader thread")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut listening_since: Option<Instant> = None;
        loop {
            harness.check()?;
            server.check_alive()?;
            // `push ADDR` follows `listening` at once; a server without a
            // push port is ready a moment after `listening`.
            if server.push_addr.is_some() || listening_since.is_some_and(|t| t.elapsed() >= PUSH_LINE_GRACE) {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!("server printed no `listening` line within {} s{}", START_TIMEOUT.as_secs(), server.log_tail());
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => {
                    let parse = |addr: &str| -> anyhow::Result<SocketAddr> {
                        addr.trim().parse().with_context(|| format!("bad line from the server: {line:?}"))
                    };
                    if let Some(addr) = line.strip_prefix("listening ") {
                        server.addr = parse(addr)?;
                        listening_since = Some(Instant::now());
                    } else if let Some(addr) = line.strip_prefix("push ") {
                        server.push_addr = Some(parse(addr)?);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                // stdout closed: check_alive reports the exit next round.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The client port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The backend push port, if the server printed one.
    pub fn push_addr(&self) -> Option<SocketAddr> {
        self.push_addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        sys::rss_bytes(self.pid)
    }

    pub fn open_fds(&self) -> anyhow::Result<u64> {
        sys::open_fds(self.pid)
    }

    /// Fails (with the end of the server's log) if the server has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if self.exited.is_none()
            && let Some(status) = self.child.try_wait().context("checking the server process")?
        {
            self.exited = Some(status);
        }
        match self.exited {
            None => Ok(()),
            Some(status) => bail!("server exited unexpectedly ({status}){}", self.log_tail()),
        }
    }

    /// Samples RSS every 200 ms until two readings 1 s apart differ by less
    /// than 0.5 %, or 10 s pass.
    pub fn wait_rss_settled(&mut self, harness: &Harness) -> anyhow::Result<Settled> {
        let start = Instant::now();
        let mut samples: Vec<(Instant, u64)> = Vec::new();
        loop {
            harness.check()?;
            self.check_alive()?;
            let now = Instant::now();
            let rss = self.rss_bytes()?;
            let settled = samples
                .iter()
                .rev()
                .find(|(t, _)| now.duration_since(*t) >= RSS_WINDOW)
                .is_some_and(|&(_, before)| (rss.abs_diff(before) as f64) < RSS_TOLERANCE * rss.max(before) as f64);
            samples.push((now, rss));
            if settled || now.duration_since(start) >= RSS_MAX_WAIT {
                return Ok(Settled { rss_bytes: rss, stable: settled, waited: now.duration_since(start) });
            }
            std::thread::sleep(RSS_POLL);
        }
    }

    /// Waits until the server holds at most `fds` open files (closed
    /// connections are gone on its side too).
    pub fn wait_fds_at_most(&mut self, fds: u64, timeout: Duration, harness: &Harness) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            harness.check()?;
            self.check_alive()?;
            let now = self.open_fds()?;
            if now <= fds {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "server still has {now} open files {} s after the clients closed (expected <= {fds})",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for the exit; SIGKILL if it takes too long.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet
        // (so the pid cannot have been reused).
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the server")? {
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().context("reaping the server")?;
                self.exited = Some(status);
                bail!("server did not exit within {} s of SIGTERM; killed{}", STOP_TIMEOUT.as_secs(), self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of the server's stderr, formatted to append to an error.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.path().join("server.stderr")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(20)..];
        if tail.is_empty() {
            "; server stderr is empty".into()
        } else {
            format!("; last lines of server stderr:\n  {}", tail.join("\n  "))
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.exited.is_some() || matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: as in `stop`: our unreaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed (with its contents) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_config_is_valid_and_round_trips_through_toml() {
        let key = BenchKey::generate().unwrap();
        let cfg = bench_config(2, &key);
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), cfg);
        // The server and the workers agree on the key.
        let ring = key.spec().keyring().unwrap();
        let (server_ring, _) = cfg.keyring().unwrap();
        let now = token::now_unix_secs();
        assert!(server_ring.verify(&ring.mint("u", "d", "a", now, now + 60), now, 0).is_ok());
    }

    #[test]
    fn missing_server_bin_says_how_to_build_it() {
        let err = check_server_bin(Path::new("/nonexistent/longlink")).unwrap_err().to_string();
        assert!(err.contains("cargo build --release"), "{err}");
    }
}
