//! Passing file descriptors between processes (SCM_RIGHTS over a Unix
//! socket), for the in-place upgrade ([`crate::upgrade`]). The unsafe code
//! beside [`super::fd`]'s, kept apart so the upgrade's wire code has no
//! raw fds.
//!
//! Every message is one `SOCK_SEQPACKET` datagram: the kernel keeps the
//! boundaries, and the fds it carries arrive with exactly its bytes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// At most this many fds ride on one message (the kernel's SCM_MAX_FD is
/// 253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// A connected `SOCK_SEQPACKET` pair, close-on-exec; [`inheritable`] makes
/// one end survive `exec`.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both fds are open and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Clears close-on-exec on `fd` (the child's end of the hand-over socket,
/// right before spawning it). The spawn itself is a `posix_spawn` (no
/// `fork` of the running node: its io_uring rings and threads stay alone).
pub fn inheritable(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a borrowed, open fd.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// In a process just started by an upgrade, before it opens anything:
/// closes every descriptor above stderr but `keep`. Whatever else the old
/// process let through `exec` (a socket without close-on-exec) would
/// otherwise stay open here for good, holding that connection open.
pub fn close_all_but(keep: RawFd) {
    let keep = keep.max(3) as libc::c_uint;
    // SAFETY: closes numbers nobody in this process owns yet (called
    // first thing, single-threaded); `keep` stays open.
    unsafe {
        if keep > 3 {
            libc::close_range(3, keep - 1, 0);
        }
        libc::close_range(keep + 1, libc::c_uint::MAX, 0);
    }
}

/// Marks an accepted socket close-on-exec (glommio's fast accept path
/// uses plain `accept`): a program the node starts inherits none.
pub fn set_cloexec(fd: BorrowedFd<'_>) {
    // SAFETY: fcntl on a borrowed, open fd.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Takes ownership of an fd number given to this process at `exec` (the
/// hand-over socket named by the environment), marking it close-on-exec.
/// Checks that it is an open Unix socket first.
pub fn inherited_socket(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the flags of the number; an unused number fails.
    if raw < 3 || unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw} is not open")));
    }
    // SAFETY: an all-zero sockaddr_storage is valid; getsockname fills it.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` describe a buffer we own.
    let rc = unsafe { libc::getsockname(raw, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) };
    if rc != 0 || i32::from(addr.ss_family) != libc::AF_UNIX {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("fd {raw} is not a Unix socket")));
    }
    // SAFETY: the number is open (checked), was given to us at exec for
    // this purpose and nothing else in the process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: fcntl on the fd we now own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(fd)
}

/// Sends `data` with `fds` attached as one message. Blocks (the socket is
/// blocking; the peer reads promptly or the caller's timeout ends it).
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds for one message"));
    }
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((fds.len() * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is CMSG_SPACE(n fds) bytes, so the
        // first header and its data fit; every fd is open (borrowed).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * std::mem::size_of::<RawFd>()) as u32) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: msg points at `iov` and `control`, both alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == data.len() {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::WriteZero, "hand-over message cut short"))
            };
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message into `buf`: its length and the fds that came with
/// it (owned, close-on-exec). A message larger than `buf`, or with more fds
/// than [`MAX_FDS_PER_MESSAGE`], is an error (the fds that did arrive are
/// closed). Length 0 means the peer closed.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: msg points at `iov` and `control`, both alive for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with
    // well-formed headers; each SCM_RIGHTS payload is an array of fds now
    // open in this process, owned by nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-over message truncated"));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fds_travel_with_their_message() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, w) = std::io::pipe().unwrap();
        send(a.as_fd(), b"hello", &[w.as_fd()]).unwrap();
        drop(w);
        let mut buf = [0u8; 64];
        let (n, fds) = recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received fd is the pipe's write end: writing reaches `r`.
        let mut w2 = std::fs::File::from(fds.into_iter().next().unwrap());
        use std::io::{Read, Write};
        w2.write_all(b"x").unwrap();
        drop(w2);
        let mut got = String::new();
        let mut r = r;
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "x");
    }

    #[test]
    fn a_message_larger_than_the_buffer_is_an_error() {
        let (a, b) = seqpacket_pair().unwrap();
        send(a.as_fd(), &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 10];
        assert!(recv(b.as_fd(), &mut buf).is_err());
    }
}
