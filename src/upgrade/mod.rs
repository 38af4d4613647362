//! In-place upgrade: a running node hands its listeners, its client
//! sockets with their sessions and its memory-store timelines to a new
//! process started from its own binary, and exits once the new one
//! confirms. No client is disconnected.
//!
//! ```text
//! old (SIGUSR2)                                  new (same args, LONGLINK_UPGRADE_FD)
//!   spawn /proc/self/exe ------------------------->
//!   Hello{format, version, shards} --------------->  refuses an unknown format,
//!   <---------------------------------- HelloReply   another shard count, cluster mode
//!   shards: Quiesce (pause accepting, answer
//!     pushes in flight, close push connections)
//!   shards: Freeze (the hand-over point)
//!   Chunks: listeners, sessions, store + fds ----->  Server::start_inherited: restores
//!   <------------------------------- Confirm{pid}    sessions, then serves
//!   exit 0
//! ```
//! Any failure before the confirmation (refusal, a binary that does not
//! start, crashes or stays silent past the deadline) leaves the old
//! process serving: its shards resume and it logs why. The hand-over
//! travels over a `SOCK_SEQPACKET` pair with SCM_RIGHTS
//! ([`crate::conn::fd_pass`]), encoded by [`wire`].
//!
//! Not carried over: TLS sessions (closed with GOING_AWAY: their rustls
//! state stays behind), WebSocket sessions in the middle of their upgrade
//! or of a frame, push-port connections (closed with GOING_AWAY after
//! their requests are answered; backends reconnect), upstream links (the
//! new process dials them), requests to service backends in flight, and
//! broadcasts still being paced. Cluster mode is refused.

pub(crate) mod codec;
pub mod wire;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::Config;
use crate::conn::fd_pass;
pub(crate) use crate::conn::listen::ListenerPool;
use crate::delivery::store::StoreImage;
use wire::{Handover, Hello, ListenerKind, SessionRecord, ShardImage};

/// Names the inherited hand-over socket in the new process's environment.
pub const FD_ENV: &str = "LONGLINK_UPGRADE_FD";
/// Overrides the binary started (default: this process's own, re-read
/// from disk). For packaging and tests.
pub const EXE_ENV: &str = "LONGLINK_UPGRADE_EXE";
/// Tests only: the hello announces this format instead of ours.
pub const FORMAT_ENV: &str = "LONGLINK_UPGRADE_TEST_FORMAT";
/// Tests only: `after-state` makes the new process exit 1 once it has
/// received everything (after the old one froze, a second later).
pub const FAIL_ENV: &str = "LONGLINK_UPGRADE_TEST_FAIL";

/// How long the new binary has to answer the hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long shards have to pause and answer their push requests, on top
/// of the push reply deadline.
const QUIESCE_SLACK: Duration = Duration::from_secs(5);
/// How long shards have to freeze and copy their sessions out.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the new process has to start serving after the hand-over.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already running")]
    Busy,
    #[error("cluster mode is not upgraded in place (drain the node instead)")]
    Cluster,
    #[error("cannot start the new binary {path}: {source}")]
    Spawn { path: String, source: std::io::Error },
    #[error("the new process refused the hand-over: {0}")]
    Refused(String),
    #[error("the new process failed: {0}")]
    Child(String),
    #[error("hand-over socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Decode(#[from] codec::DecodeError),
    #[error("shards did not {0} in time")]
    Shards(&'static str),
}

/// A command to one shard (see `shard/upgrade.rs`).
pub(crate) enum Command {
    Quiesce,
    Freeze,
    Resume,
}

/// A shard's answer to a [`Command`].
pub(crate) enum Report {
    Quiesced { pending_left: usize },
    Frozen { shard: u16, image: ShardImage, fds: Vec<OwnedFd> },
    Resumed,
}

/// A shard's end of the coordinator's channels.
pub(crate) struct ShardLink {
    pub commands: futures_channel::mpsc::UnboundedReceiver<Command>,
    pub reports: crossbeam_channel::Sender<Report>,
}

/// What a shard of the new process starts from.
#[derive(Default)]
pub(crate) struct ShardRestore {
    pub sessions: Vec<(SessionRecord, OwnedFd)>,
    pub store: Option<StoreImage>,
    pub revoked: Vec<(bool, String, i64)>,
}

/// The new process's inheritance, and the way to confirm it.
pub struct Inherited {
    pub(crate) listeners: ListenerPool,
    pub(crate) shards: Vec<ShardRestore>,
    sock: OwnedFd,
}

impl Inherited {
    /// Tells the old process this one serves; it exits.
    pub fn confirm(self) {
        let reply = wire::encode_reply(wire::CONFIRM, &Ok(std::process::id()));
        if let Err(err) = fd_pass::send(self.sock.as_fd(), &reply, &[]) {
            warn!(error = %err, "could not confirm the hand-over; the old process will resume");
        }
    }

    /// Tells the old process why this one could not start (it resumes).
    pub fn fail(self, reason: &str) {
        let _ = fd_pass::send(self.sock.as_fd(), &wire::encode_reply(wire::CONFIRM, &Err(reason.to_owned())), &[]);
    }
}

// ---- old process ------------------------------------------------------

/// The old process's side: held by the server, run on SIGUSR2.
pub struct Upgrader {
    commands: Vec<futures_channel::mpsc::UnboundedSender<Command>>,
    reports: crossbeam_channel::Receiver<Report>,
    /// Duplicates of every listening socket, by kind and shard.
    listeners: Vec<(ListenerKind, u16, OwnedFd)>,
    shards: u16,
    cluster: bool,
    reply_timeout: Duration,
    running: std::sync::atomic::AtomicBool,
}

impl Upgrader {
    /// The coordinator and one [`ShardLink`] per shard.
    pub(crate) fn new(
        shards: u16,
        cluster: bool,
        reply_timeout: Duration,
        listeners: Vec<(ListenerKind, u16, OwnedFd)>,
    ) -> (Upgrader, Vec<ShardLink>) {
        let (report_tx, reports) = crossbeam_channel::unbounded();
        let mut commands = Vec::new();
        let mut links = Vec::new();
        for _ in 0..shards {
            let (tx, rx) = futures_channel::mpsc::unbounded();
            commands.push(tx);
            links.push(ShardLink { commands: rx, reports: report_tx.clone() });
        }
        let running = std::sync::atomic::AtomicBool::new(false);
        (Upgrader { commands, reports, listeners, shards, cluster, reply_timeout, running }, links)
    }

    /// Runs one upgrade. On success the new process serves and this one
    /// should exit; on failure this one serves on.
    pub fn run(&self) -> Result<u32, UpgradeError> {
        use std::sync::atomic::Ordering;
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::Busy);
        }
        let result = self.run_once();
        self.running.store(false, Ordering::Release);
        result
    }

    fn run_once(&self) -> Result<u32, UpgradeError> {
        if self.cluster {
            return Err(UpgradeError::Cluster);
        }
        let (mine, theirs) = fd_pass::seqpacket_pair()?;
        let mut child = spawn_child(&theirs)?;
        drop(theirs);
        let mut outcome = self.hand_over(&mine, child.id());
        if let Err(err) = &outcome {
            // A child that died explains a broken socket better than the
            // socket does.
            if !matches!(err, UpgradeError::Refused(_)) {
                let deadline = Instant::now() + Duration::from_millis(500);
                while Instant::now() < deadline {
                    if let Ok(Some(status)) = child.try_wait() {
                        outcome = Err(UpgradeError::Child(format!("exited ({status}) before confirming: {err}")));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if let Err(err) = &outcome {
            warn!(error = %err, "upgrade failed; serving on");
            // Our own child: it may be alive (silent, slow).
            let _ = child.kill();
            let _ = child.wait();
        }
        // On success the child is reaped by init once we exit.
        outcome
    }

    fn hand_over(&self, sock: &OwnedFd, pid: u32) -> Result<u32, UpgradeError> {
        let sref = socket2::SockRef::from(sock);
        sref.set_read_timeout(Some(HELLO_TIMEOUT))?;
        sref.set_write_timeout(Some(HELLO_TIMEOUT))?;
        let format = std::env::var(FORMAT_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(wire::FORMAT_VERSION);
        let hello = Hello { format, binary: env!("CARGO_PKG_VERSION").to_owned(), shards: self.shards };
        fd_pass::send(sock.as_fd(), &hello.encode(), &[])?;
        let mut buf = vec![0u8; wire::MAX_DATAGRAM];
        let n = recv_some(sock, &mut buf, "the hello")?;
        wire::decode_reply(wire::HELLO_REPLY, &buf[..n])?.map_err(UpgradeError::Refused)?;
        info!(pid, "new process accepted the hand-over; quiescing");

        let quiesce = self.reply_timeout + QUIESCE_SLACK;
        let quiesced = match self.command(|| Command::Quiesce, quiesce, "quiesce") {
            Ok(reports) => reports,
            Err(err) => {
                self.resume();
                return Err(err);
            }
        };
        let left: usize = quiesced
            .into_iter()
            .map(|r| match r {
                Report::Quiesced { pending_left, .. } => pending_left,
                _ => 0,
            })
            .sum();
        if left > 0 {
            warn!(left, "push requests still unanswered at the hand-over (their backends see the connection close)");
        }
        let frozen_at = Instant::now();
        let frozen = match self.command(|| Command::Freeze, FREEZE_TIMEOUT, "freeze") {
            Ok(frozen) => frozen,
            Err(err) => {
                self.resume();
                return Err(err);
            }
        };
        let result = self.send_state(sock, frozen).and_then(|()| {
            sref.set_read_timeout(Some(CONFIRM_TIMEOUT))?;
            let n = recv_some(sock, &mut buf, "the confirmation")?;
            wire::decode_reply(wire::CONFIRM, &buf[..n])?.map_err(UpgradeError::Child)
        });
        match &result {
            Ok(pid) => info!(pid, frozen_ms = frozen_at.elapsed().as_millis() as u64, "the new process serves"),
            Err(_) => self.resume(),
        }
        result
    }

    /// Sends `command` to every shard; waits for all their reports.
    fn command(
        &self,
        command: fn() -> Command,
        limit: Duration,
        what: &'static str,
    ) -> Result<Vec<Report>, UpgradeError> {
        // Reports left over from a command that timed out (their fds,
        // duplicates, close here).
        while self.reports.try_recv().is_ok() {}
        for tx in &self.commands {
            let _ = tx.unbounded_send(command());
        }
        let deadline = Instant::now() + limit;
        let mut reports = Vec::with_capacity(self.commands.len());
        while reports.len() < self.commands.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(report) => reports.push(report),
                Err(_) => return Err(UpgradeError::Shards(what)),
            }
        }
        Ok(reports)
    }

    fn resume(&self) {
        if self.command(|| Command::Resume, FREEZE_TIMEOUT, "resume").is_err() {
            warn!("not every shard confirmed it resumed");
        }
    }

    /// The listeners, then every frozen shard's sessions and store.
    fn send_state(&self, sock: &OwnedFd, frozen: Vec<Report>) -> Result<(), UpgradeError> {
        let mut shards: Vec<(ShardImage, Vec<OwnedFd>)> =
            (0..self.shards).map(|_| (ShardImage::default(), Vec::new())).collect();
        for report in frozen {
            if let Report::Frozen { shard, image, fds } = report
                && let Some(slot) = shards.get_mut(usize::from(shard))
            {
                *slot = (image, fds);
            }
        }
        let mut handover = Handover::default();
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        for (kind, shard, fd) in &self.listeners {
            handover.listeners.push((*kind, *shard));
            fds.push(fd.as_fd());
        }
        let mut session_fds = Vec::new();
        for (image, shard_fds) in shards {
            handover.shards.push(image);
            session_fds.push(shard_fds);
        }
        for fd in session_fds.iter().flatten() {
            fds.push(fd.as_fd());
        }
        let mut w = codec::Writer::default();
        handover.encode(&mut w);
        let sessions: usize = handover.shards.iter().map(|s| s.sessions.len()).sum();
        info!(sessions, bytes = w.len(), fds = fds.len(), "handing over");
        socket2::SockRef::from(sock).set_write_timeout(Some(CONFIRM_TIMEOUT))?;
        send_chunks(sock, &w.buf, &fds)?;
        Ok(())
    }
}

/// Spawns this binary (re-read from disk) with our arguments and the
/// hand-over socket.
fn spawn_child(theirs: &OwnedFd) -> Result<std::process::Child, UpgradeError> {
    let path = match std::env::var_os(EXE_ENV) {
        Some(p) => std::path::PathBuf::from(p),
        None => own_binary()?,
    };
    fd_pass::inheritable(theirs.as_fd())?;
    let child = std::process::Command::new(&path)
        .args(std::env::args_os().skip(1))
        .env(FD_ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn { path: path.display().to_string(), source })?;
    info!(pid = child.id(), path = %path.display(), "started the new binary");
    Ok(child)
}

/// The path of this binary on disk: the file there now, not the one this
/// process was started from (replaced by a deploy, `/proc/self/exe` says
/// "(deleted)").
fn own_binary() -> Result<std::path::PathBuf, UpgradeError> {
    let link = std::fs::read_link("/proc/self/exe")?;
    let text = link.to_string_lossy();
    Ok(match text.strip_suffix(" (deleted)") {
        Some(path) => std::path::PathBuf::from(path),
        None => link,
    })
}

fn recv_some(sock: &OwnedFd, buf: &mut [u8], what: &str) -> Result<usize, UpgradeError> {
    match fd_pass::recv(sock.as_fd(), buf) {
        Ok((0, _)) => Err(UpgradeError::Child(format!("exited before {what}"))),
        Ok((n, _)) => Ok(n),
        Err(err) if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(UpgradeError::Child(format!("no answer to {what} in time")))
        }
        Err(err) => Err(UpgradeError::Io(err)),
    }
}

/// Sends `blob` in chunk datagrams with `fds` spread over them; the last
/// is flagged.
fn send_chunks(sock: &OwnedFd, blob: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), UpgradeError> {
    let by_bytes = blob.len().div_ceil(wire::CHUNK_BYTES);
    let by_fds = fds.len().div_ceil(fd_pass::MAX_FDS_PER_MESSAGE);
    let count = by_bytes.max(by_fds).max(1);
    let mut msg = Vec::with_capacity(wire::MAX_DATAGRAM);
    for i in 0..count {
        let bytes = blob.get(i * wire::CHUNK_BYTES..).unwrap_or(&[]);
        let bytes = &bytes[..bytes.len().min(wire::CHUNK_BYTES)];
        let fds = fds.get(i * fd_pass::MAX_FDS_PER_MESSAGE..).unwrap_or(&[]);
        let fds = &fds[..fds.len().min(fd_pass::MAX_FDS_PER_MESSAGE)];
        msg.clear();
        msg.push(wire::CHUNK);
        msg.push(u8::from(i + 1 == count));
        msg.extend_from_slice(bytes);
        fd_pass::send(sock.as_fd(), &msg, fds)?;
    }
    Ok(())
}

// ---- new process ------------------------------------------------------

/// In a process started by an upgrade: answers the hello, receives the
/// hand-over. `Ok(None)` in a process started any other way.
pub fn receive(config: &Config) -> Result<Option<Inherited>, UpgradeError> {
    let Ok(raw) = std::env::var(FD_ENV) else { return Ok(None) };
    let raw = raw.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad fd number"))?;
    let sock = fd_pass::inherited_socket(raw)?;
    fd_pass::close_all_but(raw);
    let sref = socket2::SockRef::from(&sock);
    sref.set_read_timeout(Some(CONFIRM_TIMEOUT))?;
    sref.set_write_timeout(Some(CONFIRM_TIMEOUT))?;
    let mut buf = vec![0u8; wire::MAX_DATAGRAM];
    let (n, _) = fd_pass::recv(sock.as_fd(), &mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the old process sent no hello").into());
    }
    let hello = Hello::decode(&buf[..n])?;
    let refusal = if hello.format != wire::FORMAT_VERSION {
        Some(format!(
            "hand-over format {} of longlink {} is not spoken by longlink {} (format {})",
            hello.format,
            hello.binary,
            env!("CARGO_PKG_VERSION"),
            wire::FORMAT_VERSION
        ))
    } else if hello.shards != config.shard_count() {
        Some(format!("the old process has {} shards, this config {}", hello.shards, config.shard_count()))
    } else if config.cluster.enabled {
        Some("cluster mode is not upgraded in place".to_owned())
    } else {
        None
    };
    if let Some(reason) = refusal {
        let _ = fd_pass::send(sock.as_fd(), &wire::encode_reply(wire::HELLO_REPLY, &Err(reason.clone())), &[]);
        return Err(UpgradeError::Refused(reason));
    }
    fd_pass::send(sock.as_fd(), &wire::encode_reply(wire::HELLO_REPLY, &Ok(0)), &[])?;
    let (blob, mut fds) = receive_chunks(&sock, &mut buf)?;
    if std::env::var(FAIL_ENV).is_ok_and(|v| v == "after-state") {
        // A second in which the old process stays frozen, as with a slow
        // start, then the failure.
        std::thread::sleep(Duration::from_secs(1));
        warn!("{FAIL_ENV}=after-state: exiting as a failed new binary would");
        std::process::exit(1);
    }
    let handover = Handover::decode(&blob, hello.shards)?;
    if handover.fd_count() != fds.len() {
        let msg = format!("{} fds arrived for {} sockets", fds.len(), handover.fd_count());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg).into());
    }
    let mut rest = fds.split_off(handover.listeners.len());
    let mut listeners = ListenerPool::default();
    for ((kind, _), fd) in handover.listeners.into_iter().zip(fds) {
        listeners.add(kind, fd);
    }
    let mut shards: Vec<ShardRestore> = (0..hello.shards).map(|_| ShardRestore::default()).collect();
    for (index, image) in handover.shards.into_iter().enumerate() {
        let tail = rest.split_off(image.sessions.len().min(rest.len()));
        let session_fds = std::mem::replace(&mut rest, tail);
        for (record, fd) in image.sessions.into_iter().zip(session_fds) {
            // Sessions go to the shard the record names (a hand-off between
            // shards may have been under way); a record naming no shard
            // closes its socket here (dropped).
            if let Some(shard) = shards.get_mut(usize::from(record.shard)) {
                shard.sessions.push((record, fd));
            }
        }
        // A store stays with its shard: devices have the same owner shards
        // (same shard count).
        if let Some(shard) = shards.get_mut(index) {
            shard.store = image.store;
            shard.revoked = image.revoked;
        }
    }
    let sessions: usize = shards.iter().map(|s| s.sessions.len()).sum();
    info!(sessions, old = %hello.binary, "hand-over received");
    Ok(Some(Inherited { listeners, shards, sock }))
}

fn receive_chunks(sock: &OwnedFd, buf: &mut [u8]) -> Result<(Vec<u8>, Vec<OwnedFd>), UpgradeError> {
    let mut blob = Vec::new();
    let mut fds = Vec::new();
    loop {
        let (n, more) = fd_pass::recv(sock.as_fd(), buf)?;
        if n == 0 {
            return Err(
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the old process closed the hand-over").into()
            );
        }
        let mut r = codec::Reader::new(&buf[..n]);
        let kind = r.u8("kind")?;
        if kind != wire::CHUNK {
            return Err(codec::DecodeError::Unknown { what: "message kind", value: u64::from(kind) }.into());
        }
        let last = r.u8("last")? != 0;
        let data = &buf[2..n];
        if blob.len() + data.len() > wire::MAX_BLOB || fds.len() + more.len() > wire::MAX_FDS {
            return Err(codec::DecodeError::TooLong {
                what: "hand-over",
                len: blob.len() + data.len(),
                max: wire::MAX_BLOB,
            }
            .into());
        }
        blob.extend_from_slice(data);
        fds.extend(more);
        if last {
            return Ok((blob, fds));
        }
    }
}

/// Where `longlink upgrade --pid` finds the outcome of an upgrade of
/// process `pid`.
pub fn status_path(pid: u32) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("longlink-upgrade-{pid}.json"))
}

/// Writes the outcome for `longlink upgrade` (atomically: a temp file
/// renamed). The temp dir is shared with other users: the file is created
/// new (`O_EXCL` never follows a planted symlink) and readable by the
/// owner only; `rename` replaces a planted link itself, not its target.
pub fn write_status(outcome: &Result<u32, UpgradeError>) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pid = std::process::id();
    let body = match outcome {
        Ok(new_pid) => serde_json::json!({"ok": true, "old_pid": pid, "new_pid": new_pid}),
        Err(err) => serde_json::json!({"ok": false, "old_pid": pid, "error": err.to_string()}),
    };
    let path = status_path(pid);
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(body.to_string().as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        warn!(path = %path.display(), "could not write the upgrade status");
    }
}
