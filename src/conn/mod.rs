//! Client and peer sockets: the only code that touches their file
//! descriptors.
//!
//! - [`fd`]: every unsafe fd operation; the connection task's [`fd::Socket`]
//!   and the slot's [`fd::SlotFd`], which make "the slot goes before the
//!   socket" a matter of types instead of call order.
//! - [`outq`]: the bounded outbound queue of encoded frames, written with
//!   one vectored `sendmsg`.
//! - [`transport`]: the seam below framing where WebSocket and TLS plug in.
//! - [`ws`]: WebSocket (RFC 6455), sans-IO: handshake, in-place decoder,
//!   encoder with a header built once per shared frame, close codes.
//! - [`tls`]: rustls' unbuffered API over caller-owned buffers, PEM
//!   config with ALPN, reloadable certificates.
//!
//! The read side of a client connection (scratch-buffer reads, partial
//! frames) is driven by the shard's connection task (`Shard::poll_conn`).

pub(crate) mod fd;
pub(crate) mod fd_pass;
pub mod links;
pub mod listen;
pub mod outq;
pub mod tls;
pub mod tls_config;
pub mod transport;
pub mod ws;

pub use outq::OutQueue;
