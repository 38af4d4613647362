//! The socket of a pipelined link: the push port (`push.tls_listen`), the
//! node listener and a node's links to the others (`cluster.tls`). Plain
//! TCP or TLS behind one type, so the push port's and the node link's
//! loops only say "flush this queue" and "read into this buffer".
//!
//! Over TLS the frames of the caller's plain queue are sealed when they are
//! flushed, as one batch, behind whatever rustls queued before them
//! (handshake records, alerts, KeyUpdate answers). Those sealed records are
//! the link's own queued bytes ([`PipeStream::queued_bytes`]): the push
//! port reads nothing more until they are written, so a peer that asks for
//! answers without reading them gets no more than one read's worth queued.
//!
//! Bounds: a record is read whole before it is decrypted, so a link carries
//! at most one incomplete record (rustls and the compact layer refuse a
//! longer record header) and, during the handshake, at most
//! [`MAX_TLS_HANDSHAKE_TAIL`] bytes. The handshake has the caller's
//! deadline (the push port's auth deadline, the node link's auth timeout).

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use glommio::net::TcpStream;
use rustls::{ClientConfig, ServerConfig};

use super::{ClientTls, Progress, ServerRecords, ServerTls, TlsError};
use crate::conn::OutQueue;
use crate::conn::transport::MAX_TLS_HANDSHAKE_TAIL;

/// ALPN id of the push port over TLS.
pub const ALPN_PUSH: &[u8] = b"longlink-push/1";
/// ALPN id of the node listener over TLS.
pub const ALPN_NODE: &[u8] = b"longlink-node/1";

/// Ciphertext asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;

/// The record layer of either side.
// The whole pipe is boxed once per link; boxing the server side again
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Records {
    /// Accepted: rustls for the handshake, then the compact layer when the
    /// config allows it (as on the client TLS port).
    Server(ServerRecords),
    /// Dialed: rustls' record layer throughout.
    Client(Box<ClientTls>),
}

impl Records {
    fn is_handshaking(&self) -> bool {
        match self {
            Records::Server(s) => s.is_handshaking(),
            Records::Client(c) => c.is_handshaking(),
        }
    }

    fn read(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
        on_plaintext: &mut dyn FnMut(&[u8]),
    ) -> Result<Progress, TlsError> {
        match self {
            Records::Server(s) => s.read(incoming, out, on_plaintext),
            Records::Client(c) => c.read(incoming, out, on_plaintext),
        }
    }

    fn write(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        match self {
            Records::Server(s) => s.write(plaintext, out),
            Records::Client(c) => c.write(plaintext, out),
        }
    }

    fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        match self {
            Records::Server(s) => s.close_notify(out),
            Records::Client(c) => c.close_notify(out),
        }
    }

    fn alpn(&self) -> Option<&[u8]> {
        match self {
            Records::Server(ServerRecords::Session(s)) => s.alpn(),
            Records::Client(c) => c.alpn(),
            Records::Server(_) => None,
        }
    }
}

/// One TLS link's state beside its socket.
struct TlsPipe {
    records: Records,
    /// An incomplete record from the last read.
    tail: Vec<u8>,
    /// Sealed records not yet written, in seal order (a record's sequence
    /// number is spent once sealed: never dropped or sealed again).
    cipher: OutQueue,
    sent_close: bool,
}

impl TlsPipe {
    /// Seals every frame of `plain` behind what is already sealed; nothing
    /// during the handshake or after close_notify.
    fn seal(&mut self, plain: &mut OutQueue) -> Result<(), TlsError> {
        if plain.is_empty() || self.records.is_handshaking() || self.sent_close {
            return Ok(());
        }
        let mut text = Vec::with_capacity(plain.bytes());
        plain.drain_into(&mut text);
        let mut sealed = Vec::with_capacity(text.len() + 64);
        self.records.write(&text, &mut sealed)?;
        self.cipher.push(Bytes::from(sealed));
        Ok(())
    }

    /// Decrypts `input` (after the carried tail); plaintext is appended to
    /// `plain`, what rustls answers is queued sealed. `Ok(false)`: the peer
    /// sent close_notify.
    fn read(&mut self, input: &mut [u8], plain: &mut BytesMut) -> Result<bool, TlsError> {
        let mut carried = std::mem::take(&mut self.tail);
        let input: &mut [u8] = if carried.is_empty() {
            input
        } else {
            carried.extend_from_slice(input);
            &mut carried
        };
        let mut out = Vec::new();
        let read = self.records.read(input, &mut out, &mut |p| plain.extend_from_slice(p));
        if !out.is_empty() {
            self.cipher.push(Bytes::from(out));
        }
        let progress = read?;
        let rest = &input[progress.consumed.min(input.len())..];
        if self.records.is_handshaking() && rest.len() > MAX_TLS_HANDSHAKE_TAIL {
            return Err(TlsError::Unexpected("handshake message too large"));
        }
        self.tail = rest.to_vec();
        if progress.peer_closed {
            return Ok(false);
        }
        Ok(true)
    }
}

/// A link's socket, plain or TLS.
pub struct PipeStream {
    stream: TcpStream,
    tls: Option<Box<TlsPipe>>,
}

impl PipeStream {
    pub fn plain(stream: TcpStream) -> PipeStream {
        PipeStream { stream, tls: None }
    }

    /// An accepted connection on a TLS listener; the handshake runs in the
    /// first reads and flushes.
    pub fn tls_server(stream: TcpStream, config: Arc<ServerConfig>) -> Result<PipeStream, TlsError> {
        let records = Records::Server(ServerRecords::new(ServerTls::server(config)?));
        Ok(PipeStream::with(stream, records))
    }

    /// A dialed connection verifying the server's certificate for
    /// `server_name`; the ClientHello is queued.
    pub fn tls_client(stream: TcpStream, config: Arc<ClientConfig>, server_name: &str) -> Result<PipeStream, TlsError> {
        let mut client = ClientTls::client(config, server_name)?;
        let mut hello = Vec::new();
        client.read(&mut [], &mut hello, &mut |_| {})?;
        let mut pipe = PipeStream::with(stream, Records::Client(Box::new(client)));
        if let Some(t) = pipe.tls.as_mut() {
            t.cipher.push(Bytes::from(hello));
        }
        Ok(pipe)
    }

    fn with(stream: TcpStream, records: Records) -> PipeStream {
        let tls = TlsPipe { records, tail: Vec::new(), cipher: OutQueue::default(), sent_close: false };
        PipeStream { stream, tls: Some(Box::new(tls)) }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Over TLS, whether the handshake is still running.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.records.is_handshaking())
    }

    /// The ALPN id agreed on (TLS, handshake done, before the compact layer
    /// took over on the server side).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tls.as_ref().and_then(|t| t.records.alpn())
    }

    /// Bytes sealed and not yet written: handshake records, alerts and
    /// KeyUpdate answers, and frames already sealed.
    pub fn queued_bytes(&self) -> usize {
        self.tls.as_ref().map_or(0, |t| t.cipher.bytes())
    }

    /// Writes `plain` (sealed first over TLS) as far as the socket takes it.
    /// `Ok(true)`: nothing that can go now is left (over TLS, frames wait
    /// during the handshake); `Ok(false)`: the socket is full and the task
    /// is woken when it drains.
    pub fn flush(&mut self, plain: &mut OutQueue, cx: &mut Context<'_>) -> io::Result<bool> {
        let Some(t) = self.tls.as_deref_mut() else { return plain.flush(&mut self.stream, cx) };
        loop {
            if !t.cipher.flush(&mut self.stream, cx)? {
                return Ok(false);
            }
            if plain.is_empty() || t.records.is_handshaking() || t.sent_close {
                return Ok(true);
            }
            t.seal(plain).map_err(io::Error::other)?;
        }
    }

    /// Whether everything of `plain` that will ever go out has gone: a
    /// closing link may be dropped now. (Frames queued during a handshake
    /// that never finished cannot go out.)
    pub fn flushed(&self, plain: &OutQueue) -> bool {
        match self.tls.as_deref() {
            None => plain.is_empty(),
            Some(t) => t.cipher.is_empty() && (plain.is_empty() || t.records.is_handshaking() || t.sent_close),
        }
    }

    /// Reads once from the socket, at most `limit` bytes on a plain link
    /// (one record's worth over TLS, which is read whole before it is
    /// decrypted), appending plaintext to `rbuf`. `Ok(false)`: the peer
    /// closed (EOF or close_notify). A TLS error is an `Err` after the
    /// alert rustls queued was written as far as the socket takes it.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, rbuf: &mut BytesMut, limit: usize) -> Poll<io::Result<bool>> {
        let mut chunk = [0u8; READ_CHUNK];
        let want = if self.tls.is_some() { READ_CHUNK } else { limit.clamp(1, READ_CHUNK) };
        let n = match futures_lite::AsyncRead::poll_read(std::pin::Pin::new(&mut self.stream), cx, &mut chunk[..want]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Ok(false)),
            Poll::Ready(Ok(n)) => n,
        };
        let Some(t) = self.tls.as_deref_mut() else {
            rbuf.extend_from_slice(&chunk[..n]);
            return Poll::Ready(Ok(true));
        };
        match t.read(&mut chunk[..n], rbuf) {
            Ok(open) => Poll::Ready(Ok(open)),
            Err(err) => {
                let _ = t.cipher.write_now(crate::conn::fd::stream_fd(&self.stream));
                Poll::Ready(Err(io::Error::other(err)))
            }
        }
    }

    /// Queues close_notify (TLS, handshake done, once) and writes what is
    /// sealed as far as the socket takes it now: the last thing before the
    /// socket is dropped.
    pub fn close(&mut self, plain: &mut OutQueue) {
        // Plain TCP: what is left is dropped, as it always was.
        let Some(t) = self.tls.as_deref_mut() else { return };
        let _ = t.seal(plain);
        if !t.sent_close && !t.records.is_handshaking() {
            let mut out = Vec::new();
            if t.records.close_notify(&mut out).is_ok() && !out.is_empty() {
                t.cipher.push(Bytes::from(out));
            }
            t.sent_close = true;
        }
        let _ = t.cipher.write_now(crate::conn::fd::stream_fd(&self.stream));
    }

    /// Runs the client handshake to its end (the caller bounds it in time).
    /// Plaintext that arrives with its last flight goes to `rbuf`.
    pub async fn handshake(&mut self, rbuf: &mut BytesMut) -> io::Result<()> {
        let mut nothing = OutQueue::default();
        std::future::poll_fn(|cx| {
            loop {
                if let Err(err) = self.flush(&mut nothing, cx) {
                    return Poll::Ready(Err(err));
                }
                if !self.is_handshaking() {
                    return Poll::Ready(Ok(()));
                }
                match self.poll_read(cx, rbuf, READ_CHUNK) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Ready(Ok(false)) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed during the TLS handshake",
                        )));
                    }
                    Poll::Ready(Ok(true)) => {}
                }
            }
        })
        .await
    }

    /// Writes `bytes` whole (after the handshake over TLS).
    pub async fn write_all(&mut self, bytes: Bytes) -> io::Result<()> {
        if self.is_handshaking() {
            return Err(io::Error::other(TlsError::NotReady));
        }
        let mut queue = OutQueue::default();
        queue.push(bytes);
        std::future::poll_fn(|cx| match self.flush(&mut queue, cx) {
            Err(err) => Poll::Ready(Err(err)),
            Ok(true) if queue.is_empty() => Poll::Ready(Ok(())),
            Ok(true) => Poll::Ready(Err(io::Error::other(TlsError::Closed))),
            Ok(false) => Poll::Pending,
        })
        .await
    }

    /// Reads once into `rbuf` (sealed answers written first); `Ok(false)`
    /// when the peer closed.
    pub async fn read_some(&mut self, rbuf: &mut BytesMut) -> io::Result<bool> {
        let mut nothing = OutQueue::default();
        std::future::poll_fn(|cx| {
            if let Err(err) = self.flush(&mut nothing, cx) {
                return Poll::Ready(Err(err));
            }
            self.poll_read(cx, rbuf, READ_CHUNK)
        })
        .await
    }
}

/// How a node dials the other nodes' listeners over TLS (`cluster.tls`):
/// the CAs that sign their certificates and the name to check.
#[derive(Clone)]
pub struct DialTls {
    config: Arc<ClientConfig>,
    /// `cluster.tls_server_name`; `None`: the host of each endpoint.
    server_name: Option<String>,
}

impl DialTls {
    /// Trusts the CAs in `ca_file`, offers ALPN [`ALPN_NODE`].
    pub fn load(ca_file: &std::path::Path, server_name: &str) -> Result<DialTls, super::TlsConfigError> {
        let config = super::config::load_client_config(ca_file, vec![ALPN_NODE.to_vec()])?;
        let server_name = (!server_name.is_empty()).then(|| server_name.to_owned());
        Ok(DialTls { config, server_name })
    }

    /// Starts TLS on a connection to `endpoint` (`host:port`).
    pub fn start(&self, stream: TcpStream, endpoint: &str) -> Result<PipeStream, TlsError> {
        let name = match &self.server_name {
            Some(name) => name.as_str(),
            None => host_of(endpoint),
        };
        PipeStream::tls_client(stream, Arc::clone(&self.config), name)
    }
}

impl std::fmt::Debug for DialTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DialTls").field("server_name", &self.server_name).finish()
    }
}

/// The host of `host:port` (`[v6]:port` too).
pub fn host_of(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(host, _)| host);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}
