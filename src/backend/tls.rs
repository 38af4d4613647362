//! The push client's TLS: the node's CAs and name ([`PushTls`]) and the
//! socket, plain or TLS ([`Conn`]).

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use super::BackendError;

/// How to reach a node's push port over TLS: the CAs that may sign its
/// certificate and the name it must carry.
#[derive(Clone)]
pub struct PushTls {
    pub(super) config: Arc<rustls::ClientConfig>,
    pub(super) server_name: rustls::pki_types::ServerName<'static>,
}

impl PushTls {
    /// Trusts the CA certificates in the PEM file `ca_file`; the node's
    /// certificate must name `server_name` (a DNS name or an IP address).
    /// Offers ALPN "longlink-push/1".
    pub fn from_ca_file(ca_file: &Path, server_name: &str) -> Result<PushTls, BackendError> {
        let alpn = vec![crate::conn::tls::pipe::ALPN_PUSH.to_vec()];
        let config = crate::conn::tls::config::load_client_config(ca_file, alpn)
            .map_err(|e| BackendError::Tls(e.to_string()))?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .map_err(|_| BackendError::Tls(format!("{server_name:?} is not a DNS name or IP address")))?;
        Ok(PushTls { config, server_name })
    }
}

impl fmt::Debug for PushTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushTls").field("server_name", &self.server_name).finish()
    }
}

/// A push-port socket: plain TCP, or rustls' client over it.
pub(super) enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// An i/o error that carries a rustls error (a bad certificate, a peer
/// that is not TLS) as [`BackendError::Tls`].
pub(super) fn tls_error(e: io::Error) -> BackendError {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(tls) => BackendError::Tls(tls.to_string()),
        None => BackendError::Io(e),
    }
}
