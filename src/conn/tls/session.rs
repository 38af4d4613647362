//! One TLS connection over rustls 0.23's unbuffered API, with buffers the
//! caller owns.
//!
//! - In: the driver reads ciphertext into its scratch buffer and calls
//!   [`TlsSession::read`]; rustls decrypts records in place there. Complete
//!   records are consumed; [`Progress::consumed`] says how many bytes, and
//!   the driver keeps the rest (a partial record, at most one record long)
//!   as it keeps a partial longlink frame over TCP.
//! - Out: handshake records and encrypted data are appended to a `Vec<u8>`
//!   the driver passes in and then sends (it becomes a `Bytes` for the
//!   out-queue without a copy).
//! - Plaintext goes to a callback (the longlink framing, or the WebSocket
//!   decoder for wss).
//!
//! Idle, a session is the rustls connection state and nothing else: this
//! wrapper holds no buffer. (rustls 0.23 still moves each decrypted record
//! into a short-lived `Vec` it frees when the record is handed over; its
//! `ReadTraffic` notes in-place delivery as future work.)

use std::sync::Arc;

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};

/// Largest TLS record overhead we reserve for before asking rustls
/// (TLS 1.2 AES-GCM: 5 header + 8 nonce + 16 tag; TLS 1.3: 5 + 1 + 16).
const RECORD_OVERHEAD: usize = 32;
/// Largest plaintext per record (RFC 8446 5.1).
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// First guess for a handshake record; grown to what rustls asks for.
const HANDSHAKE_GUESS: usize = 4 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The peer broke the protocol or the handshake failed (bad certificate,
    /// no common ALPN, ...). rustls has queued an alert when it could: send
    /// `out`, then close.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the handshake is not finished: no application data yet")]
    NotReady,
    #[error("the connection is closed for writing")]
    Closed,
    #[error("TLS record encryption failed: {0}")]
    Encrypt(String),
    /// The compact TLS 1.3 record layer failed (an alert went to `out`).
    #[error("TLS record layer: {0}")]
    Record(#[from] super::compact::RecordError),
    /// Early data is never enabled in our configs; seeing it is a bug.
    #[error("unexpected TLS state {0}")]
    Unexpected(&'static str),
}

/// What one call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input to drop from its front; the rest is an incomplete
    /// record to keep for the next read.
    pub consumed: usize,
    /// The handshake is done: application data can flow.
    pub established: bool,
    /// The peer sent close_notify: no more data will come.
    pub peer_closed: bool,
    /// Both sides sent close_notify.
    pub closed: bool,
}

/// What to do when the connection is ready for application data.
enum Write<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// The two rustls unbuffered connection types, behind one `process` call.
pub trait Unbuffered {
    type Data;
    /// Until this is false no application data may be written.
    fn handshaking(&self) -> bool;
    fn version(&self) -> Option<rustls::ProtocolVersion>;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Unbuffered for UnbufferedServerConnection {
    type Data = rustls::server::ServerConnectionData;
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.protocol_version()
    }
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Unbuffered for UnbufferedClientConnection {
    type Data = rustls::client::ClientConnectionData;
    fn handshaking(&self) -> bool {
        self.is_handshaking()
    }
    fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.protocol_version()
    }
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// A TLS connection: server side for accepted sockets, client side for
/// node-to-node and push links.
pub struct TlsSession<C> {
    conn: C,
    /// The config allows secret extraction, so the session can move to the
    /// compact record layer.
    extractable: bool,
    /// The peer's close_notify arrived: later input is swallowed.
    peer_closed: bool,
}

pub type ServerTls = TlsSession<UnbufferedServerConnection>;
pub type ClientTls = TlsSession<UnbufferedClientConnection>;

impl ServerTls {
    pub fn server(config: Arc<ServerConfig>) -> Result<ServerTls, TlsError> {
        let extractable = config.enable_secret_extraction;
        Ok(TlsSession { conn: UnbufferedServerConnection::new(config)?, extractable, peer_closed: false })
    }

    /// The ALPN id both sides agreed on, after the handshake.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Whether the compact record layer will take this
    /// session: TLS 1.3, handshake done, config with
    /// [`super::ServerTlsSettings::compact_idle`]. Check it first:
    /// `from_session` consumes the session even when it refuses.
    pub fn can_compact(&self) -> bool {
        self.extractable && !self.conn.is_handshaking() && self.conn.protocol_version() == Some(TLS13)
    }
}

impl ClientTls {
    /// Starts a handshake with `server_name` (DNS name or IP literal);
    /// the ClientHello is produced by the first [`TlsSession::read`] with
    /// empty input.
    pub fn client(config: Arc<ClientConfig>, server_name: &str) -> Result<ClientTls, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::Rustls(rustls::Error::General(format!("bad server name {server_name:?}"))))?;
        let extractable = config.enable_secret_extraction;
        Ok(TlsSession { conn: UnbufferedClientConnection::new(config, name)?, extractable, peer_closed: false })
    }

    pub fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}

impl<C: Unbuffered> TlsSession<C> {
    /// Processes the ciphertext in `incoming` (decrypting in place), hands
    /// each plaintext record to `on_plaintext`, and appends whatever must be
    /// sent (handshake records, alerts) to `out`. Call it with empty input
    /// to start a client handshake. Whatever lands in `out` must be sent,
    /// on error too (it may be an alert telling the peer why).
    ///
    /// - While the handshake runs, records go to rustls one at a time, and
    ///   the call returns right after the one that ends it when the session
    ///   can move to the compact layer ([`ServerTls::can_compact`]): what
    ///   follows (data, a KeyUpdate sent with the client's Finished) is for
    ///   that layer. Otherwise rustls would answer such a KeyUpdate itself
    ///   and park the reply for its next write, which the hand-over drops
    ///   (security review finding 10).
    /// - After the peer's close_notify, every input is consumed and dropped
    ///   (RFC 8446 6.1) and `peer_closed` is reported on every call: the
    ///   caller carries nothing (finding 2).
    pub fn read(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
        on_plaintext: &mut dyn FnMut(&[u8]),
    ) -> Result<Progress, TlsError> {
        let mut progress = Progress::default();
        // End of the input fed to rustls so far (a record boundary).
        let mut fed = 0;
        // rustls parses a handshake message spanning records again from its
        // first record at each call, so record by record costs the square
        // of the record count: a real client's flight is a few records, a
        // peer fragmenting its ClientHello into thousands gets the rest
        // in one call.
        let mut singles = MAX_HANDSHAKE_RECORDS_ONE_BY_ONE;
        while !self.peer_closed && self.conn.handshaking() {
            let end = match singles.checked_sub(1) {
                Some(left) => {
                    singles = left;
                    next_record_end(incoming, fed).unwrap_or(incoming.len())
                }
                None => incoming.len(),
            };
            let (p, _) =
                pump(&mut self.conn, &mut incoming[progress.consumed..end], out, Write::Nothing, on_plaintext)?;
            self.absorb(&mut progress, p);
            fed = end;
            if end == incoming.len() || p.closed {
                return Ok(self.finish(progress, incoming.len()));
            }
            if !self.conn.handshaking() && self.extractable && self.conn.version() == Some(TLS13) {
                return Ok(progress);
            }
        }
        if !self.peer_closed {
            let rest = &mut incoming[progress.consumed..];
            let (p, _) = pump(&mut self.conn, rest, out, Write::Nothing, on_plaintext)?;
            self.absorb(&mut progress, p);
        }
        Ok(self.finish(progress, incoming.len()))
    }

    fn absorb(&mut self, progress: &mut Progress, p: Progress) {
        progress.consumed += p.consumed;
        progress.established |= p.established;
        progress.closed |= p.closed;
        self.peer_closed |= p.peer_closed;
    }

    /// After close_notify: all of the input is consumed, and said so.
    fn finish(&self, mut progress: Progress, len: usize) -> Progress {
        if self.peer_closed {
            progress.consumed = len;
            progress.peer_closed = true;
        }
        progress
    }

    /// Encrypts `plaintext` into `out` (records of at most 16 KiB).
    /// `Err(NotReady)` before the handshake ends, with nothing done: the
    /// driver holds application frames until [`Progress::established`].
    pub fn write(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        // Pumping here would push the handshake forward into an `out` the
        // caller may not send when it sees an error.
        if self.conn.handshaking() {
            return Err(TlsError::NotReady);
        }
        match pump(&mut self.conn, &mut [], out, Write::Data(plaintext), &mut |_| {})? {
            (_, true) => Ok(()),
            (p, false) if p.closed => Err(TlsError::Closed),
            _ => Err(TlsError::NotReady),
        }
    }

    /// Appends a close_notify alert to `out` (before closing the socket).
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        if self.conn.handshaking() {
            return Err(TlsError::NotReady);
        }
        match pump(&mut self.conn, &mut [], out, Write::CloseNotify, &mut |_| {})? {
            (_, true) => Ok(()),
            _ => Err(TlsError::NotReady),
        }
    }

    pub fn into_inner(self) -> C {
        self.conn
    }

    /// The rustls connection, for what this wrapper does not expose.
    pub fn rustls(&self) -> &C {
        &self.conn
    }
}

/// Handshake records of one read given to rustls one at a time (see
/// [`TlsSession::read`]).
const MAX_HANDSHAKE_RECORDS_ONE_BY_ONE: u32 = 16;

const TLS13: rustls::ProtocolVersion = rustls::ProtocolVersion::TLSv1_3;

/// The end of the complete record that starts at `at` in `input`, if it is
/// all there.
fn next_record_end(input: &[u8], at: usize) -> Option<usize> {
    let header = input.get(at..)?.first_chunk::<5>()?;
    let end = at + 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (end <= input.len()).then_some(end)
}

/// Runs rustls' state machine until it needs more input or has nothing more
/// to do. Returns the progress and whether `write` was carried out.
fn pump<C: Unbuffered>(
    conn: &mut C,
    incoming: &mut [u8],
    out: &mut Vec<u8>,
    mut write: Write<'_>,
    on_plaintext: &mut dyn FnMut(&[u8]),
) -> Result<(Progress, bool), TlsError> {
    let mut progress = Progress::default();
    let mut written = false;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[progress.consumed..]);
        let state = match state {
            Ok(state) => state,
            Err(err) => {
                // rustls may have queued an alert: let it out before closing.
                // Its deframer may still hold messages that point into this
                // input (the rest of a flight after a certificate it
                // refused): it must see the same input again, never an
                // empty one (rustls panics on that).
                progress.consumed += discard;
                drain_alert(conn, &mut incoming[progress.consumed..], out);
                return Err(err.into());
            }
        };
        let mut stop = false;
        match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record?;
                    discard += record.discard;
                    on_plaintext(record.payload);
                }
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                let start = out.len();
                out.resize(start + HANDSHAKE_GUESS, 0);
                let result = match encode.encode(&mut out[start..]) {
                    Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                        out.resize(start + required_size, 0);
                        encode.encode(&mut out[start..])
                    }
                    other => other,
                };
                match result {
                    Ok(n) => out.truncate(start + n),
                    Err(err) => {
                        out.truncate(start);
                        return Err(TlsError::Encrypt(err.to_string()));
                    }
                }
            }
            // `out` is sent by the driver after this call, in order, once:
            // what rustls asks of "transmit".
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::BlockedHandshake => stop = true,
            ConnectionState::WriteTraffic(mut traffic) => {
                progress.established = true;
                match std::mem::replace(&mut write, Write::Nothing) {
                    Write::Nothing => {}
                    Write::Data(data) => {
                        for chunk in data.chunks(MAX_RECORD_PLAINTEXT) {
                            encrypt(out, chunk.len() + RECORD_OVERHEAD, |buf| traffic.encrypt(chunk, buf))?;
                        }
                        written = true;
                    }
                    Write::CloseNotify => {
                        encrypt(out, RECORD_OVERHEAD, |buf| traffic.queue_close_notify(buf))?;
                        written = true;
                    }
                }
                // No complete record is left in `incoming` (rustls returns
                // this state only then), and the write is done.
                stop = true;
            }
            ConnectionState::PeerClosed => progress.peer_closed = true,
            ConnectionState::Closed => {
                progress.closed = true;
                stop = true;
            }
            ConnectionState::ReadEarlyData(_) => return Err(TlsError::Unexpected("early data")),
            _ => return Err(TlsError::Unexpected("unknown rustls state")),
        }
        progress.consumed += discard;
        if stop {
            return Ok((progress, written));
        }
    }
}

/// Encrypts with `f` into the end of `out`, growing it once if rustls says
/// the guess was short.
fn encrypt(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), TlsError> {
    let start = out.len();
    out.resize(start + guess, 0);
    let result = match f(&mut out[start..]) {
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(start + required_size, 0);
            f(&mut out[start..])
        }
        other => other,
    };
    match result {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(err) => {
            out.truncate(start);
            Err(TlsError::Encrypt(err.to_string()))
        }
    }
}

/// After an error, rustls hands out what it queued (records of the
/// flight it was building, then its alert) as EncodeTlsData, one chunk per
/// call, before it looks at any input. The calls stop at the alert (the
/// last record of a chunk is an alert, or encrypted): one more would
/// deframe again, which re-reads a bad record (a second fatal alert, which
/// rustls asserts against). `incoming` is what is left of the failed
/// call's input: a call that does deframe must see it, never an empty
/// input, because rustls' deframer may still point at handshake messages
/// in it (the rest of a flight after a refused certificate; rustls panics
/// on an input that no longer holds them). Bounded: four calls.
fn drain_alert<C: Unbuffered>(conn: &mut C, incoming: &mut [u8], out: &mut Vec<u8>) {
    let (len, mut at) = (incoming.len(), 0);
    for _ in 0..4 {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[at..]);
        at = (at + discard).min(len);
        let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else { return };
        let start = out.len();
        out.resize(start + HANDSHAKE_GUESS, 0);
        match encode.encode(&mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(_) => {
                out.truncate(start);
                return;
            }
        }
        if matches!(last_record_type(&out[start..]), None | Some(ALERT | APPLICATION_DATA)) {
            return;
        }
    }
}

const ALERT: u8 = 21;
const APPLICATION_DATA: u8 = 23;

/// The content type of the last whole record in `records`.
fn last_record_type(records: &[u8]) -> Option<u8> {
    let (mut at, mut last) = (0, None);
    while let Some(end) = next_record_end(records, at) {
        last = records.get(at).copied();
        at = end;
    }
    last
}
