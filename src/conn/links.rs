//! The listeners of the transports beside plain TCP: WebSocket
//! (`server.ws_listen`), TLS (`server.tls_listen`) and WebSocket over TLS
//! (`server.wss_listen`), one SO_REUSEPORT socket per shard like the client
//! port; the push port over TLS (`push.tls_listen`); and the certificate
//! stores of the TLS ones (the node listener's too, with `cluster.tls`).

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::config::Config;
use crate::conn::listen::{ListenError, ListenerKind, ListenerPool, bind_reuseport};
use crate::conn::tls::config::{ALPN_HTTP1, ALPN_LONGLINK};
use crate::conn::tls::pipe::{ALPN_NODE, ALPN_PUSH};
use crate::conn::tls::{CertStore, ServerTlsSettings, TlsConfigError};
use crate::conn::tls_config::listen_addr;
use crate::conn::transport::Link;

/// Why the transport listeners could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error(transparent)]
    Tls(TlsConfigError),
}

/// Bound addresses of the transport listeners that are on.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkAddrs {
    pub ws: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    /// `push.tls_listen`.
    pub push_tls: Option<SocketAddr>,
}

/// Every transport listener, one socket per shard.
pub struct LinkListeners {
    pub addrs: LinkAddrs,
    /// By shard: (the link its connections start on, listening socket).
    pub per_shard: Vec<Vec<(Link, OwnedFd)>>,
    /// Certificates of `tls_listen` and `wss_listen`.
    pub stores: TlsStores,
    /// By shard: the `push.tls_listen` socket (empty when off).
    pub push_tls: Vec<OwnedFd>,
}

/// The certificate stores of the TLS listeners; [`TlsStores::reload`]
/// re-reads the files.
#[derive(Clone, Debug, Default)]
pub struct TlsStores {
    pub tls: Option<Arc<CertStore>>,
    pub wss: Option<Arc<CertStore>>,
    /// `push.tls_listen`.
    pub push: Option<Arc<CertStore>>,
    /// The node listener, with `cluster.tls`.
    pub node: Option<Arc<CertStore>>,
}

impl TlsStores {
    /// Re-reads `[tls]` cert_file and key_file for every TLS listener:
    /// connections accepted from now on get the new certificate, those
    /// already open keep theirs. On an error the old certificate stays in
    /// force and the error names the file. (What triggers it, a signal or an
    /// admin call, is the caller's.)
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        for store in [&self.tls, &self.wss, &self.push, &self.node].into_iter().flatten() {
            store.reload()?;
        }
        Ok(())
    }
}

impl LinkListeners {
    /// Binds the listeners that are configured and loads their
    /// certificates; logs the `[ws]` warnings.
    pub fn bind(config: &Config, shards: u16) -> Result<LinkListeners, LinkError> {
        Self::bind_from(config, shards, None)
    }

    /// [`LinkListeners::bind`], taking the sockets an in-place upgrade
    /// handed over from `pool` when there are.
    pub(crate) fn bind_from(
        config: &Config,
        shards: u16,
        mut pool: Option<&mut ListenerPool>,
    ) -> Result<LinkListeners, LinkError> {
        let server = &config.server;
        let mut per_shard: Vec<Vec<(Link, OwnedFd)>> = (0..shards).map(|_| Vec::new()).collect();
        let mut addrs = LinkAddrs::default();
        let mut stores = TlsStores::default();
        let settings = |alpn: &[u8]| ServerTlsSettings {
            cert_chain: config.tls.cert_file.clone(),
            private_key: config.tls.key_file.clone(),
            alpn: vec![alpn.to_vec()],
            compact_idle: config.tls.compact_idle,
        };
        let listeners = [
            ("server.ws_listen", &server.ws_listen, Link::WsUpgrade),
            ("server.tls_listen", &server.tls_listen, Link::Tls),
            ("server.wss_listen", &server.wss_listen, Link::WssUpgrade),
        ];
        for (field, value, link) in listeners {
            let Some(addr) = listen_addr(field, value)? else { continue };
            let kind = match link {
                Link::Tls => ListenerKind::Tls,
                Link::WssUpgrade => ListenerKind::Wss,
                _ => ListenerKind::Ws,
            };
            let (bound, fds) = match pool.as_mut().and_then(|p| p.take_group(kind, shards)) {
                Some(taken) => taken.map_err(|source| ListenError { addr, source })?,
                None => bind_reuseport(addr, shards, server.listen_backlog)?,
            };
            for (shard, fd) in per_shard.iter_mut().zip(fds) {
                shard.push((link, fd));
            }
            match link {
                Link::Tls => {
                    addrs.tls = Some(bound);
                    stores.tls = Some(CertStore::load(settings(ALPN_LONGLINK)).map_err(LinkError::Tls)?);
                }
                Link::WssUpgrade => {
                    addrs.wss = Some(bound);
                    stores.wss = Some(CertStore::load(settings(ALPN_HTTP1)).map_err(LinkError::Tls)?);
                }
                _ => addrs.ws = Some(bound),
            }
            // In the log, not on stdout: the lines there are a fixed set
            // that scripts and tests read.
            tracing::info!(%bound, ?link, "transport listener");
        }
        // The push port over TLS (its sockets handed over by an in-place
        // upgrade like the others, so nothing in its accept queue is lost).
        let mut push_tls = Vec::new();
        if let Some(addr) = listen_addr("push.tls_listen", &config.push.tls_listen)? {
            let (bound, fds) = match pool.as_mut().and_then(|p| p.take_group(ListenerKind::PushTls, shards)) {
                Some(taken) => taken.map_err(|source| ListenError { addr, source })?,
                None => bind_reuseport(addr, shards, server.listen_backlog)?,
            };
            addrs.push_tls = Some(bound);
            push_tls = fds;
            stores.push = Some(CertStore::load(settings(ALPN_PUSH)).map_err(LinkError::Tls)?);
            tracing::info!(%bound, "push port over TLS");
        }
        if config.cluster.enabled && config.cluster.tls {
            stores.node = Some(CertStore::load(settings(ALPN_NODE)).map_err(LinkError::Tls)?);
        }
        if addrs.ws.is_some() || addrs.wss.is_some() {
            for warning in crate::conn::tls_config::handshake_config(config).warnings() {
                tracing::warn!("{warning}");
            }
        }
        Ok(LinkListeners { addrs, per_shard, stores, push_tls })
    }
}
