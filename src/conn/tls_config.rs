//! Config sections `[ws]` and `[tls]`, and the checks of the transport
//! listeners in `[server]` (`ws_listen`, `tls_listen`, `wss_listen`), of
//! `push.tls_listen` and of `cluster.tls`.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{Config, ConfigError, ServerConfig, config_struct, invalid};
use crate::conn::ws::HandshakeConfig;

config_struct! {
    /// `[ws]`: the WebSocket upgrade (server.ws_listen, server.wss_listen).
    pub struct WsConfig {
        /// Request path of the WebSocket endpoint. Default: "/v1/ws".
        pub path: String = "/v1/ws".into(),
        /// Subprotocol a client must offer; the only one the server
        /// answers with. Default: "longlink.v1".
        pub subprotocol: String = "longlink.v1".into(),
        /// Exact `Origin` values allowed, e.g. "https://app.example.com".
        /// Default: [] (any origin; logged as a warning at start).
        pub allowed_origins: Vec<String> = Vec::new(),
        /// Largest upgrade request head (request line and headers), in
        /// bytes; larger gets 431. Default: 8192. Allowed: 256 to 65536.
        /// The head must arrive within session.auth_timeout_ms (408).
        pub max_head_bytes: usize = 8 * 1024,
    }
}

config_struct! {
    /// `[tls]`: certificates for server.tls_listen, server.wss_listen,
    /// push.tls_listen and (cluster.tls) cluster.node_listen.
    pub struct TlsConfig {
        /// PEM file with the certificate chain, leaf first. Default: "".
        pub cert_file: PathBuf = PathBuf::new(),
        /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
        /// Default: "".
        pub key_file: PathBuf = PathBuf::new(),
        /// TLS 1.3 connections move to the compact record layer after
        /// the handshake: about 1 KiB per idle connection instead of
        /// about 3.5 KiB on rustls' record layer. TLS 1.2 stays on
        /// rustls either way. Default: true.
        pub compact_idle: bool = true,
    }
}

/// A listener setting: "" is off, anything else must be an address.
pub fn listen_addr(field: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| invalid(field, format!("{value:?} is not an address like \"0.0.0.0:7104\"")))
}

/// Checks `server.ws_listen`, `tls_listen`, `wss_listen`.
pub(crate) fn validate_listeners(server: &ServerConfig) -> Result<(), ConfigError> {
    listen_addr("server.ws_listen", &server.ws_listen)?;
    listen_addr("server.tls_listen", &server.tls_listen)?;
    listen_addr("server.wss_listen", &server.wss_listen)?;
    Ok(())
}

/// Cross-section checks: `[ws]` values, and `[tls]` files when a TLS
/// listener is on (their contents are read at start).
pub(crate) fn validate(config: &Config) -> Result<(), ConfigError> {
    handshake_config(config).validate().map_err(|message| invalid("ws", message))?;
    listen_addr("push.tls_listen", &config.push.tls_listen)?;
    let node_tls = config.cluster.enabled && config.cluster.tls;
    let tls_on = !config.server.tls_listen.is_empty()
        || !config.server.wss_listen.is_empty()
        || !config.push.tls_listen.is_empty()
        || node_tls;
    const WHEN: &str = "required when server.tls_listen, server.wss_listen, push.tls_listen or cluster.tls is set";
    if tls_on && config.tls.cert_file.as_os_str().is_empty() {
        return Err(invalid("tls.cert_file", WHEN));
    }
    if tls_on && config.tls.key_file.as_os_str().is_empty() {
        return Err(invalid("tls.key_file", WHEN));
    }
    if node_tls && config.cluster.tls_ca_file.as_os_str().is_empty() {
        return Err(invalid("cluster.tls_ca_file", "required with cluster.tls (the CA that signs the nodes)"));
    }
    Ok(())
}

/// The handshake settings of a node. The head must be complete within the
/// auth deadline (one timer per connection).
pub fn handshake_config(config: &Config) -> HandshakeConfig {
    HandshakeConfig {
        path: config.ws.path.clone(),
        subprotocol: config.ws.subprotocol.clone(),
        allowed_origins: config.ws.allowed_origins.clone(),
        max_head_bytes: config.ws.max_head_bytes,
        timeout_ms: config.session.auth_timeout_ms.clamp(100, 60_000),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn field_of(toml: &str) -> String {
        match Config::from_toml_str(toml).and_then(|c| c.validate()) {
            Ok(()) => String::new(),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn push_and_node_tls_need_their_files() {
        assert!(field_of("[push]\ntls_listen = \"127.0.0.1:7111\"").contains("tls.cert_file"));
        assert!(field_of("[push]\ntls_listen = \"nowhere\"").contains("push.tls_listen"));
        let cluster = "[delivery]\nredis_url = \"redis://127.0.0.1:1/\"\n[cluster]\nenabled = true\ntls = true\n";
        let files = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        assert!(field_of(cluster).contains("tls.cert_file"));
        assert!(field_of(&format!("{cluster}{files}")).contains("cluster.tls_ca_file"));
        // Off unless the node is a cluster node.
        assert_eq!(field_of("[cluster]\ntls = true\n"), "");
    }
}
