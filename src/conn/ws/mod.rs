//! WebSocket transport (RFC 6455), server side, sans-IO.
//!
//! Each binary message carries one or more whole longlink frames, so after
//! [`decode::Decoder`] the bytes go to the same framing code as over TCP.
//! Text messages and extensions are refused; no permessage-deflate. The
//! connection task (`shard::task`) does the I/O.

pub mod close;
pub mod decode;
pub mod encode;
pub mod handshake;

pub use close::CloseCode;
pub use decode::{Decoded, Decoder, WsError};
pub use encode::{FrameHeader, SharedFrame};
pub use handshake::{Accepted, HandshakeConfig, HandshakeError, HeadReader};
