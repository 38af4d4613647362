//! The record layer of one server connection: rustls' (the handshake, TLS
//! 1.2 for its whole life, or `compact_idle` off), or the compact TLS 1.3
//! one, which takes over the moment a handshake that allows it ends.
//!
//! kTLS would be a third variant here (see the module docs of `tls`).

use super::compact::CompactTls;
use super::session::{Progress, ServerTls, TlsError};

// The large variant is the one an idle connection is in; boxing it would add
// an allocation per connection, and the small one is short-lived.
#[allow(clippy::large_enum_variant)]
pub enum ServerRecords {
    Session(Box<ServerTls>),
    /// Inline: the state an idle TLS 1.3 connection keeps (one allocation
    /// less per connection).
    Compact(CompactTls),
    /// The move to the compact layer failed: the connection is dead.
    Failed,
}

impl ServerRecords {
    pub fn new(session: ServerTls) -> ServerRecords {
        ServerRecords::Session(Box::new(session))
    }

    pub fn is_handshaking(&self) -> bool {
        match self {
            ServerRecords::Session(s) => s.is_handshaking(),
            ServerRecords::Compact(_) | ServerRecords::Failed => false,
        }
    }

    /// Whether the compact layer runs the records.
    pub fn is_compact(&self) -> bool {
        matches!(self, ServerRecords::Compact(_))
    }

    /// As [`ServerTls::read`]. When the handshake ends in this input and the
    /// session may move, the compact layer takes over and reads the rest.
    pub fn read(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
        on_plaintext: &mut dyn FnMut(&[u8]),
    ) -> Result<Progress, TlsError> {
        let first = match self {
            ServerRecords::Session(s) => {
                let p = s.read(incoming, out, on_plaintext)?;
                if !s.can_compact() {
                    return Ok(p);
                }
                p
            }
            ServerRecords::Compact(c) => return Ok(c.read(incoming, out, &mut |p| on_plaintext(p))?),
            ServerRecords::Failed => return Err(TlsError::Closed),
        };
        let ServerRecords::Session(session) = std::mem::replace(self, ServerRecords::Failed) else {
            return Err(TlsError::Unexpected("record layer changed during a read"));
        };
        let mut compact = CompactTls::from_session(*session)?;
        let rest = compact.read(&mut incoming[first.consumed..], out, &mut |p| on_plaintext(p));
        *self = ServerRecords::Compact(compact);
        let rest = rest?;
        Ok(Progress {
            consumed: first.consumed + rest.consumed,
            established: true,
            peer_closed: rest.peer_closed,
            closed: false,
        })
    }

    /// Encrypts `plaintext` into `out`; `Err(NotReady)` during the handshake.
    pub fn write(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        match self {
            ServerRecords::Session(s) => s.write(plaintext, out),
            ServerRecords::Compact(c) => Ok(c.write(plaintext, out)?),
            ServerRecords::Failed => Err(TlsError::Closed),
        }
    }

    /// Appends close_notify to `out`.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        match self {
            ServerRecords::Session(s) => s.close_notify(out),
            ServerRecords::Compact(c) => Ok(c.close_notify(out)?),
            ServerRecords::Failed => Err(TlsError::Closed),
        }
    }

    /// Drops what an idle connection does not need (the compact layer's
    /// expanded keys).
    pub fn release_idle(&mut self) {
        if let ServerRecords::Compact(c) = self {
            c.release_idle();
        }
    }
}
