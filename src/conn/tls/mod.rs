//! TLS with rustls 0.23 (ring provider) for the client TCP port
//! (`tls_listen`), WebSocket (`wss_listen`), the push port
//! (`push.tls_listen`) and node-to-node links (`cluster.tls`).
//!
//! [`session`] wraps the unbuffered API so every buffer belongs to the
//! driver; [`config`] loads PEM files, sets ALPN and reloads certificates;
//! [`pipe`] is the socket of a push-port or node link, plain or TLS;
//! [`compact`] runs a TLS 1.3 server connection's records after the
//! handshake in a few hundred bytes while idle; [`records`] is the one a
//! connection uses.
//!
//! The compact layer is our own TLS 1.3 record protection (ring AEAD, nonce
//! = IV xor sequence number, KeyUpdate both ways through rustls' kernel
//! API); the handshake, certificates and key schedule stay rustls'. It
//! keeps the limits rustls' record layer has (the scratch crate's security
//! review, findings 1, 2, 6, 7, 8, 10; tests in `tests/tls_compact.rs`,
//! `tests/tls_zeroize.rs`, and interop with rustls, OpenSSL and Chromium
//! through a real node in `tests/tls.rs` and the browser test). Turning
//! `tls.compact_idle` off keeps every session on rustls' record layer, at
//! about 3.5 KiB per idle connection instead of about 1 KiB.
//!
//! kTLS seam: after the handshake, rustls' `dangerous_into_kernel_connection`
//! hands the traffic secrets over; with `TCP_ULP "tls"` and `TLS_TX`/`TLS_RX`
//! on the socket, reads and writes would be plain bytes again and fan-out
//! encode-once. This host's kernel has no TLS ULP (ENOENT), so that path is
//! not written: it could not be tested here.

pub mod compact;
pub mod config;
pub mod pipe;
pub mod records;
pub mod session;

pub use compact::{CompactTls, RecordError};
pub use config::{CertStore, ServerTlsSettings, ShardServerConfig, TlsConfigError};
pub use pipe::PipeStream;
pub use records::ServerRecords;
pub use session::{ClientTls, Progress, ServerTls, TlsError, TlsSession};
