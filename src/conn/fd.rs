//! Every unsafe touch of a socket's file descriptor, in one place.
//!
//! A shard writes to an idle session's socket straight from a delivery,
//! without waking the session's task (one `send(2)`, no wake-up). The
//! session's slot therefore keeps a way to reach the socket while the task
//! owns it. That handle is a [`SlotFd`]: made once per socket by
//! [`Socket::new`], not `Clone`, readable only as a [`BorrowedFd`] tied to
//! a borrow of the slot, and needed back by [`Socket::close`] and
//! [`Socket::hand_over`], the ways a socket is given up. So the socket
//! cannot be closed through this API while a slot still holds its
//! [`SlotFd`]: a fd number reused by the next connection is never written
//! with another client's frames. (A task dropped without finishing, which
//! only happens when its executor is torn down with every slot, closes the
//! socket as it goes.)

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use glommio::net::TcpStream;

/// A connection task's socket.
pub(crate) struct Socket {
    stream: TcpStream,
}

/// The slot's handle on its session's socket (see the module doc).
#[derive(Debug)]
pub(crate) struct SlotFd(RawFd);

impl SlotFd {
    /// A handle on no socket, for tests that build slots by hand (a
    /// syscall on it fails with EBADF).
    #[cfg(test)]
    pub(crate) fn unused() -> SlotFd {
        SlotFd(RawFd::MAX)
    }

    /// The socket, for as long as the slot is borrowed.
    pub(crate) fn get(&self) -> BorrowedFd<'_> {
        // SAFETY: `self` was made by `Socket::new` for a socket that stays
        // open until this handle is given back (`Socket::close`,
        // `Socket::hand_over` take it), so it is open for this borrow.
        unsafe { BorrowedFd::borrow_raw(self.0) }
    }
}

impl Socket {
    /// Takes ownership of an accepted stream; the [`SlotFd`] goes into the
    /// connection's slot.
    pub(crate) fn new(stream: TcpStream) -> (Socket, SlotFd) {
        let fd = SlotFd(stream.as_raw_fd());
        (Socket { stream }, fd)
    }

    /// A socket handed over by another shard ([`Socket::hand_over`]).
    pub(crate) fn adopt(fd: OwnedFd) -> (Socket, SlotFd) {
        // SAFETY: `fd` is an open TCP socket and owned: ownership moves
        // into the stream, which closes it.
        Socket::new(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
    }

    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The socket, for as long as the task's borrow lasts.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        stream_fd(&self.stream)
    }

    /// Closes the socket; takes back the slot's handle, so nothing can
    /// write to the fd number once it is reused.
    pub(crate) fn close(self, slot: SlotFd) {
        debug_assert_eq!(slot.0, self.stream.as_raw_fd(), "another socket's slot handle");
        drop(self.stream);
    }

    /// The socket as an owned fd for another shard; the slot's handle is
    /// taken back. glommio streams cannot give their fd up, so this is a
    /// duplicate and the stream (with any poll it armed) is closed before
    /// the duplicate is used.
    pub(crate) fn hand_over(self, slot: SlotFd) -> io::Result<OwnedFd> {
        debug_assert_eq!(slot.0, self.stream.as_raw_fd(), "another socket's slot handle");
        let dup = dup(self.fd());
        drop(self.stream);
        dup
    }
}

/// A glommio stream's fd, borrowed from the stream (glommio streams are
/// `AsRawFd` only).
pub(crate) fn stream_fd(stream: &TcpStream) -> BorrowedFd<'_> {
    // SAFETY: the stream owns its fd and keeps it open while borrowed.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

/// A listening socket bound by the server, for one executor.
pub(crate) fn listener(fd: OwnedFd) -> glommio::net::TcpListener {
    // SAFETY: `fd` is an owned listening TCP socket; ownership moves into
    // the listener.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// A connected client socket as a glommio stream.
pub(crate) fn connected(fd: OwnedFd) -> TcpStream {
    // SAFETY: `fd` is an owned, connected TCP socket; ownership moves into
    // the stream.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// A duplicate of `fd`, close-on-exec.
fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// Sends `frame` right away if the socket takes it (never blocks, never
/// raises SIGPIPE). Returns the bytes written, 0 when the socket is full.
pub(crate) fn send(fd: BorrowedFd<'_>, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: sends from a valid slice on an open socket (the borrow).
    let n = unsafe {
        libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(err) }
    } else {
        Ok(n as usize)
    }
}

/// One vectored, non-blocking `sendmsg` of `slices`; `WouldBlock` when
/// the socket is full.
pub(crate) fn send_vectored(fd: BorrowedFd<'_>, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // `IoSlice` is ABI-compatible with `iovec` on Unix; sendmsg only reads.
    msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = slices.len().min(MAX_IOVECS);
    // Accepted sockets are blocking (glommio passes MSG_DONTWAIT per
    // call), so the flags matter: never block the shard, never SIGPIPE.
    // SAFETY: every iovec points into a slice borrowed for the call; `fd`
    // is open (the borrow).
    let written = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if written < 0 { Err(io::Error::last_os_error()) } else { Ok(written as usize) }
}

/// Buffers handed to one `sendmsg`.
pub(crate) const MAX_IOVECS: usize = 64;

/// Shuts the write side (FIN after what is queued in the kernel).
pub(crate) fn shutdown_write(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write);
}

/// The peer address of a socket.
pub(crate) fn peer_addr(fd: BorrowedFd<'_>) -> Option<std::net::SocketAddr> {
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}
