//! Listening sockets: one SO_REUSEPORT socket per shard and port, and the
//! pool of sockets an in-place upgrade hands over (filled by
//! [`crate::upgrade`], taken by the server and [`super::links`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

/// Which listener an fd is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Client,
    Push,
    Admin,
    Ws,
    Tls,
    Wss,
    /// The push port over TLS (`push.tls_listen`).
    PushTls,
}

/// Listening sockets by kind, one per shard (one for the admin port).
#[derive(Default)]
pub(crate) struct ListenerPool {
    by_kind: HashMap<ListenerKind, Vec<OwnedFd>>,
}

impl ListenerPool {
    /// Adds a handed-over socket of `kind` (in shard order).
    pub(crate) fn add(&mut self, kind: ListenerKind, fd: OwnedFd) {
        self.by_kind.entry(kind).or_default().push(fd);
    }

    /// The sockets of `kind`; `None` when none were handed over.
    pub fn take(&mut self, kind: ListenerKind) -> Option<Vec<OwnedFd>> {
        self.by_kind.remove(&kind)
    }

    /// The sockets of `kind`, checked to be `count` listening TCP sockets,
    /// with their bound address.
    pub fn take_group(
        &mut self,
        kind: ListenerKind,
        count: u16,
    ) -> Option<std::io::Result<(std::net::SocketAddr, Vec<OwnedFd>)>> {
        let fds = self.take(kind)?;
        if fds.len() != usize::from(count) {
            let msg = format!("{} {kind:?} listeners handed over for {count} shards", fds.len());
            return Some(Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)));
        }
        let addr = fds
            .first()
            .and_then(|fd| socket2::SockRef::from(fd).local_addr().ok())
            .and_then(|a| a.as_socket())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "handed-over listener has no address")
            });
        Some(addr.map(|addr| (addr, fds)))
    }
}

/// A listening socket that could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `count` listening sockets to one address with SO_REUSEPORT (the
/// kernel spreads connections over them). With port 0 the first socket
/// picks the port and the others join it.
pub(crate) fn bind_reuseport(
    addr: SocketAddr,
    count: u16,
    backlog: u32,
) -> Result<(SocketAddr, Vec<OwnedFd>), ListenError> {
    let err = |source| ListenError { addr, source };
    let mut bound = addr;
    let mut fds = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let socket =
            Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP)).map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        // Inherited by accepted sockets: frames are small and latency matters.
        socket.set_nodelay(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&bound.into()).map_err(err)?;
        socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX)).map_err(err)?;
        if let Some(local) = socket.local_addr().map_err(err)?.as_socket() {
            bound = local;
        }
        fds.push(OwnedFd::from(socket));
    }
    Ok((bound, fds))
}
