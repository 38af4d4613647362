//! The seam below framing: what a transport does between the socket and
//! the frame codec.
//!
//! A shard serves several transports side by side, so the kind is a
//! per-connection [`Link`] in the session's slot (one byte), and the
//! per-connection state of a transport lives with the connection's other
//! busy-time state (dropped while idle: an idle WebSocket session keeps no
//! decoder, no buffer):
//! - Inbound, the connection task turns what one read put in the shard's
//!   scratch buffer into frame bytes, in place (WebSocket unmasks and
//!   strips headers: [`crate::conn::ws::Decoder`]).
//! - Outbound, [`Wrapper::wrap`] makes a message's wire form; a fan-out
//!   passes the same `Bytes` for every member, and the wire form is built
//!   once per message and shared (WebSocket: one header and one copy per
//!   message, not per member).
//! - A connection handed to its owner shard carries its link and transport
//!   state with the session (`Transit`).

use bytes::{Bytes, BytesMut};

use super::ws;

/// How a connection's bytes reach the frame codec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Link {
    /// Plain TCP: socket bytes are frame bytes.
    #[default]
    Plain,
    /// WebSocket, before the upgrade completed: nothing but the 101 (or an
    /// HTTP error) may be written.
    WsUpgrade,
    /// WebSocket: every frame goes out in a binary message.
    Ws,
}

impl Link {
    pub fn is_ws(self) -> bool {
        matches!(self, Link::WsUpgrade | Link::Ws)
    }
}

/// A WebSocket connection's state while it is busy (upgrading, mid-frame,
/// or holding a handshake token until Auth). `None` when idle.
#[derive(Debug, Default)]
pub struct WsState {
    /// The request head, until the upgrade is answered.
    pub upgrade: Option<ws::HeadReader>,
    pub decoder: ws::Decoder,
    /// Token from the URL or a subprotocol entry, for an Auth frame that
    /// carries none.
    pub token: Option<ws::handshake::Token>,
}

impl WsState {
    pub fn is_idle(&self) -> bool {
        self.upgrade.is_none() && self.decoder.is_idle() && self.token.is_none() && !self.decoder.peer_closed()
    }
}

/// Builds wire forms of outbound frames for a link, caching the last one
/// so that a fan-out (the same `Bytes` for every member) wraps once.
#[derive(Default)]
pub struct Wrapper {
    /// The last frame wrapped and its WebSocket message. Holding `source`
    /// keeps its allocation alive, so a pointer match is the same bytes.
    last: Option<(Bytes, Bytes)>,
}

impl Wrapper {
    /// The wire form of `frame` on `link`; `None` when nothing may be sent
    /// on it (an upgrade in progress).
    pub fn wrap(&mut self, link: Link, frame: &Bytes) -> Option<Bytes> {
        match link {
            Link::Plain => Some(frame.clone()),
            Link::WsUpgrade => None,
            Link::Ws => {
                if let Some((source, wire)) = &self.last
                    && source.as_ptr() == frame.as_ptr()
                    && source.len() == frame.len()
                {
                    return Some(wire.clone());
                }
                let mut out = BytesMut::new();
                ws::encode::encode_binary_into(&mut out, frame);
                let wire = out.freeze();
                self.last = Some((frame.clone(), wire.clone()));
                Some(wire)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_passes_frames_through() {
        let frame = Bytes::from_static(b"msg");
        let wire = Wrapper::default().wrap(Link::Plain, &frame).unwrap();
        assert_eq!(wire.as_ptr(), frame.as_ptr(), "no copy");
        assert!(Wrapper::default().wrap(Link::WsUpgrade, &frame).is_none());
    }

    #[test]
    fn websocket_fanout_wraps_once_per_message() {
        let mut w = Wrapper::default();
        let frame = Bytes::from(vec![7u8; 300]);
        let a = w.wrap(Link::Ws, &frame).unwrap();
        let b = w.wrap(Link::Ws, &frame.clone()).unwrap();
        assert_eq!(a.as_ptr(), b.as_ptr(), "second member shares the first one's message");
        assert_eq!(&a[..4], [0x82, 126, 1, 44]);
        assert_eq!(&a[4..], &frame[..]);
        // Another frame of the same length is another message.
        let other = Bytes::from(vec![8u8; 300]);
        let c = w.wrap(Link::Ws, &other).unwrap();
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(&c[4..], &other[..]);
    }
}
