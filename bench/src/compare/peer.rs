//! The peer servers under test: `nats-server` and `mosquitto`, started by
//! the bench with a config it writes into a temporary directory, on a free
//! loopback port, ready once that port accepts a TCP connection.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{mqtt, nats};
use crate::harness::Harness;
use crate::server::{TempDir, die_with_parent};

/// How long a peer may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Which peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PeerKind {
    #[serde(rename = "nats-server")]
    Nats,
    #[serde(rename = "mosquitto")]
    Mosquitto,
}

impl PeerKind {
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::Nats => "nats-server",
            PeerKind::Mosquitto => "mosquitto",
        }
    }

    /// The config file the bench writes for a server on `port`.
    pub fn config(self, port: u16) -> String {
        match self {
            PeerKind::Nats => nats::server_config(port),
            PeerKind::Mosquitto => mqtt::server_config(port),
        }
    }

    /// `nats-server: v2.9.10`, `mosquitto version 2.0.11`, or why not.
    pub fn version(self, bin: &Path) -> String {
        let arg = match self {
            PeerKind::Nats => "--version",
            // mosquitto prints its version at the top of the usage text.
            PeerKind::Mosquitto => "-h",
        };
        match Command::new(bin).arg(arg).stdin(Stdio::null()).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
                text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_owned()
            }
            Err(err) => format!("unknown ({err})"),
        }
    }
}

/// Fails with the install command when `bin` cannot be run.
pub fn check_peer_bin(bin: &Path) -> anyhow::Result<()> {
    let run = Command::new(bin).arg("--help").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if let Err(err) = run {
        bail!(
            "cannot run {} ({err}): install the peers with `scripts/install-peers` \
             (apt-get install nats-server mosquitto) or pass the binary's path",
            bin.display()
        );
    }
    Ok(())
}

/// Runs `scripts/install-peers` (Debian packages nats-server and mosquitto).
pub fn install_peers() -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-peers");
    let status = Command::new("bash").arg(&script).stdin(Stdio::null()).status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("{} exited with {s}", script.display()),
        Err(err) => bail!("running {}: {err}", script.display()),
    }
}

/// A running peer server.
pub struct PeerProcess {
    pub kind: PeerKind,
    child: Child,
    pid: u32,
    addr: SocketAddr,
    dir: TempDir,
    exited: Option<std::process::ExitStatus>,
    /// The config file's text, for the record.
    pub config: String,
}

impl PeerProcess {
    pub fn start(kind: PeerKind, bin: &Path, harness: &Harness) -> anyhow::Result<PeerProcess> {
        let port = free_port()?;
        let dir = TempDir::new("longlink-bench-peer")?;
        let config = kind.config(port);
        let config_path = dir.path().join("peer.conf");
        fs::write(&config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;
        let log = fs::File::create(dir.path().join("server.stderr")).context("creating the peer log")?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&config_path).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut peer = PeerProcess { kind, child, pid, addr, dir, exited: None, config };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            harness.check()?;
            peer.check_alive()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(peer);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not accept on {addr} within {} s{}",
                    kind.name(),
                    START_TIMEOUT.as_secs(),
                    peer.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if self.exited.is_none()
            && let Some(status) = self.child.try_wait().context("checking the peer process")?
        {
            self.exited = Some(status);
        }
        match self.exited {
            None => Ok(()),
            Some(status) => bail!("{} exited unexpectedly ({status}){}", self.kind.name(), self.log_tail()),
        }
    }

    /// SIGTERM, then wait; SIGKILL if it takes too long. True when it
    /// exited by itself in time (nats-server exits 1 after SIGTERM by design).
    pub fn stop(mut self) -> anyhow::Result<bool> {
        if let Some(status) = self.exited {
            return Ok(status.success());
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the peer")? {
                self.exited = Some(status);
                return Ok(true);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait().context("reaping the peer")?;
                self.exited = Some(status);
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

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

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if self.exited.is_some() || matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now (the kernel's pick; the
/// peer binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// The default binary of a peer: on PATH, else Debian's /usr/sbin.
pub fn default_bin(kind: PeerKind) -> PathBuf {
    let name = kind.name();
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| PathBuf::from("/usr/sbin").join(name))
}
