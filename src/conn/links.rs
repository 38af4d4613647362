//! The listeners of the transports beside plain TCP: WebSocket
//! (`server.ws_listen`), one SO_REUSEPORT socket per shard like the
//! client port.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use crate::config::Config;
use crate::conn::tls_config::listen_addr;
use crate::conn::transport::Link;
use crate::server::ServerError;

/// Bound addresses of the transport listeners that are on.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkAddrs {
    pub ws: Option<SocketAddr>,
}

/// Every transport listener, one socket per shard.
pub struct LinkListeners {
    pub addrs: LinkAddrs,
    /// By shard: (the link its connections start on, listening socket).
    pub per_shard: Vec<Vec<(Link, OwnedFd)>>,
}

impl LinkListeners {
    /// Binds the listeners that are configured; logs the `[ws]` warnings.
    pub fn bind(config: &Config, shards: u16) -> Result<LinkListeners, ServerError> {
        let server = &config.server;
        let mut per_shard: Vec<Vec<(Link, OwnedFd)>> = (0..shards).map(|_| Vec::new()).collect();
        let mut addrs = LinkAddrs::default();
        if let Some(addr) = listen_addr("server.ws_listen", &server.ws_listen)? {
            let (bound, fds) = crate::server::bind_reuseport(addr, shards, server.listen_backlog)?;
            for (shard, fd) in per_shard.iter_mut().zip(fds) {
                shard.push((Link::WsUpgrade, fd));
            }
            addrs.ws = Some(bound);
            for warning in crate::conn::tls_config::handshake_config(config).warnings() {
                tracing::warn!("{warning}");
            }
        }
        Ok(LinkListeners { addrs, per_shard })
    }
}
