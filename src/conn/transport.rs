//! The seam below framing: what a transport does between the socket and
//! the frame codec.
//!
//! Today there is one transport, [`Plain`] TCP, where socket bytes are
//! frame bytes. WebSocket and TLS plug in here (issue 14):
//! - Inbound, [`Transport::inbound`] turns what one read put in the shard's
//!   scratch buffer into frame bytes, in place (TLS decrypts in the
//!   caller's buffer, as rustls's unbuffered API does; WebSocket unmasks
//!   and strips headers). Nothing is buffered between reads but the
//!   transport's own per-connection state, which lives in the session's
//!   slot: it must stay small while idle (Plain: zero bytes).
//! - Outbound, [`Transport::message`] makes a message's wire form once,
//!   so a fan-out queues the same `Bytes` to every session of the
//!   transport (WebSocket: the header is built once per message); a
//!   per-connection step (TLS sealing) belongs where the queue is written
//!   (`OutQueue`).
//! - A connection handed to its owner shard carries its transport state
//!   with the session (`Transit`).
//!
//! The shard is generic over the transport rather than calling it through
//! `dyn`: the plain path compiles to what it was before the seam.

use bytes::Bytes;

/// Why a transport gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("transport protocol violation: {0}")]
    Protocol(&'static str),
}

/// A byte transport below framing (see the module doc).
pub trait Transport {
    /// Per-connection state, kept in the session's slot.
    type State: Default;

    /// Frame bytes from the bytes one read put in `wire`.
    fn inbound<'a>(state: &mut Self::State, wire: &'a mut [u8]) -> Result<&'a [u8], TransportError>;

    /// The wire form of one encoded message frame, made once per message.
    fn message(frame: Bytes) -> Bytes;
}

/// Plain TCP: socket bytes are frame bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Plain;

impl Transport for Plain {
    type State = ();

    #[inline(always)]
    fn inbound<'a>(_: &mut (), wire: &'a mut [u8]) -> Result<&'a [u8], TransportError> {
        Ok(wire)
    }

    #[inline(always)]
    fn message(frame: Bytes) -> Bytes {
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_passes_bytes_through() {
        let mut wire = *b"frame";
        assert_eq!(Plain::inbound(&mut (), &mut wire).unwrap(), b"frame");
        let frame = Bytes::from_static(b"msg");
        assert_eq!(Plain::message(frame.clone()).as_ptr(), frame.as_ptr(), "no copy");
    }
}
