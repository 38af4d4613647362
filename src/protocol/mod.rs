//! The wire protocol and what every side of it shares: the server, the
//! client SDK and the backends' push client. No I/O, no runtime.
//!
//! - [`codec`]: the 8-byte frame header and the protobuf bodies ([`proto`]).
//! - [`codes`]: the one table of error and disconnect codes.
//! - [`ids`]: id newtypes, the stable hash, owner and home shards.
//! - [`limits`]: id lengths and the one id check.
//! - [`time`]: [`time::Millis`] and [`time::Now`], passed into sans-IO code.
//! - [`token`]: HMAC-SHA256 connect tokens and the key ring.

pub mod codec;
pub mod codes;
pub mod ids;
pub mod limits;
pub mod proto;
pub mod time;
pub mod token;
