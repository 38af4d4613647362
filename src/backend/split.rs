//! The two halves of a split [`PushClient`](super::PushClient): one thread sends, another
//! receives.

use std::net::TcpStream;
use std::time::Duration;

use super::{BackendError, Reader, Reply, Request, Writer, set_read_timeout};

/// The sending half of a split [`PushClient`](super::PushClient).
#[derive(Debug)]
pub struct PushSender {
    pub(super) stream: TcpStream,
    pub(super) writer: Writer,
}

impl PushSender {
    /// As [`PushClient::send`](super::PushClient::send): buffers one request and returns its id.
    pub fn send(&mut self, req: Request) -> Result<u64, BackendError> {
        self.writer.send(&mut self.stream, req)
    }

    /// Writes out every buffered request. Call it when a burst ends: a
    /// dropped sender does not flush.
    pub fn flush(&mut self) -> Result<(), BackendError> {
        self.writer.flush(&mut self.stream)
    }

    /// See [`PushClient::set_max_request_bytes`](super::PushClient::set_max_request_bytes).
    pub fn set_max_request_bytes(&mut self, max: u32) {
        self.writer.max_request_bytes = max;
    }
}

/// The receiving half of a split [`PushClient`](super::PushClient).
#[derive(Debug)]
pub struct PushReceiver {
    pub(super) stream: TcpStream,
    pub(super) reader: Reader,
}

impl PushReceiver {
    /// As [`PushClient::recv`](super::PushClient::recv): the next reply in completion order.
    pub fn recv(&mut self) -> Result<Reply, BackendError> {
        self.reader.recv(&mut self.stream)
    }

    /// See [`PushClient::set_read_timeout`](super::PushClient::set_read_timeout). The socket option is shared
    /// with the sender's half, where it has no effect.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), BackendError> {
        set_read_timeout(&self.stream, &mut self.reader, timeout)
    }

    /// See [`PushClient::set_max_reply_bytes`](super::PushClient::set_max_reply_bytes).
    pub fn set_max_reply_bytes(&mut self, max: u32) {
        self.reader.max_reply_bytes = max;
    }
}
