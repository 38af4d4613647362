//! TLS configuration: certificate chain and key from PEM files, ALPN, and
//! reloading without a restart.
//!
//! [`CertStore`] holds the current `Arc<ServerConfig>` and a generation
//! number. Each shard keeps a [`ShardServerConfig`]: accepting a connection
//! costs one atomic load; the store's lock is taken once per shard per
//! reload, never per connection. Connections keep the config they started
//! with; new ones get the new one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// ALPN protocol id of the longlink binary protocol over TLS (client port,
/// push port, node links).
pub const ALPN_LONGLINK: &[u8] = b"longlink/1";
/// ALPN for `wss` (browsers offer `http/1.1`).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read PEM file {path}: {source}")]
    Pem { path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{0}: no certificate in the file")]
    NoCertificate(PathBuf),
    #[error("TLS setup refused the certificate or key ({cert}, {key}): {source}")]
    Rustls { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("CA file {path}: {source}")]
    BadCa { path: PathBuf, source: rustls::Error },
}

/// Where a server's certificate and key live, and the ALPN ids it offers.
#[derive(Clone, Debug)]
pub struct ServerTlsSettings {
    /// PEM: leaf certificate first, then intermediates.
    pub cert_chain: PathBuf,
    /// PEM: PKCS#8, PKCS#1 or SEC1 private key.
    pub private_key: PathBuf,
    /// Offered ALPN ids in preference order; empty = no ALPN. A client that
    /// offers ALPN but none of these is refused (rustls'
    /// `no_application_protocol` alert).
    pub alpn: Vec<Vec<u8>>,
    /// Let TLS 1.3 connections move to the compact record layer
    /// ([`super::compact`]) after the handshake (sets rustls'
    /// `enable_secret_extraction`).
    pub compact_idle: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem_err = |source| TlsConfigError::Pem { path: path.to_owned(), source };
    let certs =
        CertificateDer::pem_file_iter(path).map_err(pem_err)?.collect::<Result<Vec<_>, _>>().map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Builds a server config from the files (read now, in full).
pub fn load_server_config(settings: &ServerTlsSettings) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let certs = read_certs(&settings.cert_chain)?;
    let key = PrivateKeyDer::from_pem_file(&settings.private_key)
        .map_err(|source| TlsConfigError::Pem { path: settings.private_key.clone(), source })?;
    let rustls_err = |source| TlsConfigError::Rustls {
        cert: settings.cert_chain.clone(),
        key: settings.private_key.clone(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rustls_err)?;
    config.alpn_protocols = settings.alpn.clone();
    config.enable_secret_extraction = settings.compact_idle;
    Ok(Arc::new(config))
}

/// A client config trusting the CAs in `ca_file` (node-to-node and push
/// links to a private CA), offering `alpn`.
pub fn load_client_config(ca_file: &Path, alpn: Vec<Vec<u8>>) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert).map_err(|source| TlsConfigError::BadCa { path: ca_file.to_owned(), source })?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsConfigError::BadCa { path: ca_file.to_owned(), source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(Arc::new(config))
}

/// The current server config of one listener (`tls_listen`, `wss_listen`,
/// push), shared by all shards.
#[derive(Debug)]
pub struct CertStore {
    settings: ServerTlsSettings,
    current: Mutex<Arc<ServerConfig>>,
    /// Bumped after `current` changes; shards compare it on accept.
    generation: AtomicU64,
}

impl CertStore {
    /// Loads the files; fails if they are unusable (startup refuses to run).
    pub fn load(settings: ServerTlsSettings) -> Result<Arc<CertStore>, TlsConfigError> {
        let config = load_server_config(&settings)?;
        Ok(Arc::new(CertStore { settings, current: Mutex::new(config), generation: AtomicU64::new(0) }))
    }

    /// Re-reads the files (on SIGHUP or an admin call). On error the old
    /// config stays in force and the error says which file is wrong.
    /// Returns the new generation.
    pub fn reload(&self) -> Result<u64, TlsConfigError> {
        let config = load_server_config(&self.settings)?;
        // A poisoned lock only means a panic elsewhere while holding it; the
        // Arc inside is always whole.
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(self.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A per-shard handle.
    pub fn shard_handle(self: &Arc<Self>) -> ShardServerConfig {
        let generation = self.generation();
        let config = self.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
        ShardServerConfig { store: Arc::clone(self), generation, config }
    }
}

/// One shard's cached copy of a [`CertStore`]'s config.
#[derive(Debug)]
pub struct ShardServerConfig {
    store: Arc<CertStore>,
    generation: u64,
    config: Arc<ServerConfig>,
}

impl ShardServerConfig {
    /// The config for a connection accepted now.
    pub fn current(&mut self) -> &Arc<ServerConfig> {
        let generation = self.store.generation();
        if generation != self.generation {
            // Read the config before recording the generation: a reload
            // racing with this only makes the next accept look again.
            self.config = self.store.current.lock().unwrap_or_else(PoisonError::into_inner).clone();
            self.generation = generation;
        }
        &self.config
    }
}
