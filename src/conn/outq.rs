//! An outbound queue of encoded frames, written with one vectored `sendmsg`.
//!
//! Frames are `Bytes`, so a fan-out queues the same buffer for every
//! recipient; a backlog of frames for one socket goes out in one syscall.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_lite::AsyncWrite;
use glommio::net::TcpStream;

use super::fd::{self, MAX_IOVECS};

thread_local! {
    /// Bytes queued in every `OutQueue` of this thread (one shard), for
    /// the queue-bytes gauge: a plain cell, no atomics per frame.
    static QUEUED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Bytes waiting in the outbound queues of the calling thread.
pub fn thread_queued_bytes() -> u64 {
    QUEUED.with(|q| q.get())
}

#[derive(Default)]
pub struct OutQueue {
    frames: VecDeque<Bytes>,
    /// Bytes queued and not yet written.
    bytes: usize,
    /// Bytes of `frames.front()` already written.
    front_written: usize,
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        self.set_bytes(0);
    }
}

impl OutQueue {
    /// Every change of `bytes` goes through here (the thread's total).
    fn set_bytes(&mut self, bytes: usize) {
        let (old, new) = (self.bytes as u64, bytes as u64);
        QUEUED.with(|q| q.set(q.get().saturating_add(new).saturating_sub(old)));
        self.bytes = bytes;
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn push(&mut self, frame: Bytes) {
        self.set_bytes(self.bytes + frame.len());
        self.frames.push_back(frame);
    }

    /// Queues `frame` of which the first `written` bytes already went out
    /// (a direct send the socket took only part of). The queue must be
    /// empty: the frame is then its partly written front, which
    /// [`OutQueue::cut`] keeps.
    pub fn push_written(&mut self, frame: Bytes, written: usize) {
        debug_assert!(self.frames.is_empty() && written < frame.len());
        let written = if self.frames.is_empty() { written.min(frame.len()) } else { 0 };
        self.set_bytes(self.bytes + frame.len() - written);
        self.front_written = written;
        self.frames.push_back(frame);
    }

    /// Drops every frame not yet started; returns how many were dropped.
    /// A front frame already partly on the wire stays (only its unwritten
    /// tail is queued): the peer must get it whole, or the stream is
    /// desynchronised for good (it would read the next frame's bytes as
    /// this frame's body).
    pub fn cut(&mut self) -> usize {
        let keep = usize::from(self.front_written > 0);
        let dropped = self.frames.len().saturating_sub(keep);
        self.frames.truncate(keep);
        self.set_bytes(self.frames.front().map_or(0, |f| f.len() - self.front_written));
        if keep == 0 {
            self.front_written = 0;
        }
        dropped
    }

    /// Appends the unwritten bytes of every frame to `dst` and empties the
    /// queue (a TLS connection seals them as one batch).
    pub fn drain_into(&mut self, dst: &mut Vec<u8>) {
        for (i, frame) in self.frames.drain(..).enumerate() {
            dst.extend_from_slice(if i == 0 { &frame[self.front_written..] } else { &frame[..] });
        }
        self.set_bytes(0);
        self.front_written = 0;
    }

    /// The unwritten bytes of every frame, appended to `dst`; the queue
    /// stays as it is (the in-place upgrade copies it).
    pub fn copy_into(&self, dst: &mut Vec<u8>) {
        for (i, frame) in self.frames.iter().enumerate() {
            dst.extend_from_slice(if i == 0 { &frame[self.front_written..] } else { &frame[..] });
        }
    }

    /// Drops everything queued, a partly written frame too (the stream is
    /// abandoned); returns how many frames were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.frames.len();
        self.frames.clear();
        self.set_bytes(0);
        self.front_written = 0;
        n
    }

    /// Writes as much as the socket takes. Returns `Ok(true)` when the queue
    /// is empty; `Ok(false)` means the socket is full and the task will be
    /// woken when it drains.
    pub fn flush(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> io::Result<bool> {
        while !self.frames.is_empty() {
            match self.writev(fd::stream_fd(stream)) {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Arm write readiness through glommio (it retries the send
                    // itself first; account for whatever it writes).
                    let front = self.frames.front().map(|f| f.slice(self.front_written..)).unwrap_or_default();
                    match Pin::new(&mut *stream).poll_write(cx, &front) {
                        Poll::Pending => return Ok(false),
                        Poll::Ready(Ok(n)) => self.advance(n),
                        Poll::Ready(Err(e)) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes as much as the socket takes now, outside the owner's task:
    /// `Ok(true)` when the queue is empty, `Ok(false)` when the socket is
    /// full (the owner's task must then [`OutQueue::flush`] to arm write
    /// readiness).
    pub fn write_now(&mut self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        while !self.frames.is_empty() {
            match self.writev(fd) {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn writev(&self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (i, frame) in self.frames.iter().take(MAX_IOVECS).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { &frame[self.front_written..] } else { &frame[..] });
            n += 1;
        }
        fd::send_vectored(fd, &slices[..n])
    }

    fn advance(&mut self, mut written: usize) {
        self.set_bytes(self.bytes - written.min(self.bytes));
        while written > 0 {
            let Some(front) = self.frames.front() else { break };
            let left = front.len() - self.front_written;
            if written >= left {
                written -= left;
                self.front_written = 0;
                self.frames.pop_front();
            } else {
                self.front_written += written;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_tracks_partial_frames() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"defg"));
        assert_eq!(q.bytes(), 7);
        q.advance(2);
        assert_eq!((q.len(), q.bytes(), q.front_written), (2, 5, 2));
        q.advance(2);
        assert_eq!((q.len(), q.bytes(), q.front_written), (1, 3, 1));
        q.advance(3);
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn cut_keeps_only_the_unwritten_tail_of_a_started_frame() {
        let mut q = OutQueue::default();
        for f in [&b"abcd"[..], b"efg", b"hi"] {
            q.push(Bytes::copy_from_slice(f));
        }
        q.advance(1);
        assert_eq!(q.cut(), 2);
        assert_eq!((q.len(), q.bytes(), q.front_written), (1, 3, 1));
        q.push(Bytes::from_static(b"E"));
        assert_eq!(q.bytes(), 4);

        // Nothing started: everything goes.
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"abc"));
        q.push(Bytes::from_static(b"de"));
        assert_eq!(q.cut(), 2);
        assert!(q.is_empty() && q.bytes() == 0);

        // A frame a direct send wrote in part counts as started.
        let mut q = OutQueue::default();
        q.push_written(Bytes::from_static(b"abcdef"), 4);
        assert_eq!(q.bytes(), 2);
        q.push(Bytes::from_static(b"gh"));
        assert_eq!(q.cut(), 1);
        assert_eq!((q.len(), q.bytes(), q.front_written), (1, 2, 4));
    }
}
