//! A TLS 1.3 server connection after its handshake, in the smallest state
//! we can keep: the record layer runs here (ring AEAD) and rustls keeps only
//! what key updates need (`kernel::KernelConnection`). It is the user-space
//! twin of the kTLS seam: the same hand-over from rustls, with the record
//! crypto here instead of in the kernel.
//!
//! Why: an idle connection on rustls' record layer costs about 3.3 KiB, most
//! of it two expanded AEAD keys and post-handshake state. Here the expanded
//! keys exist only while the connection is busy ([`CompactTls::release_idle`]
//! wipes and frees them; the raw keys stay), so an idle connection keeps a
//! few hundred bytes.
//!
//! Scope, on purpose: server side, TLS 1.3 only (no explicit nonces, one
//! record format); the only post-handshake message a client may send is
//! KeyUpdate (RFC 8446 4.6.3), each ending its record. Anything else is
//! fatal, with an alert. Records are decrypted in place in the caller's
//! buffer.
//!
//! The limits rustls' own record layer enforces are kept (security review of
//! the scratch crate, findings 1, 2, 6, 7, 8): at most
//! [`MAX_KEY_UPDATES_WITHOUT_DATA`] KeyUpdates between application-data
//! records; input after close_notify is swallowed; no record after a fatal
//! alert or our close_notify; the inner plaintext length is checked before
//! the padding is stripped; key material is wiped when freed.

use std::mem::MaybeUninit;

use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, SupportedCipherSuite};
use zeroize::Zeroize;

use super::session::{Progress, ServerTls, TlsError};

const HEADER_LEN: usize = 5;
const TAG_LEN: usize = 16;
/// TLS 1.3 outer record type of every protected record.
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;
/// RFC 8446 5.2: at most 2^14 + 256 bytes of ciphertext per record.
const MAX_CIPHERTEXT: usize = (1 << 14) + 256;
/// RFC 8446 5.1: at most 2^14 bytes of content per record.
const MAX_PLAINTEXT: usize = 1 << 14;
/// KeyUpdates accepted with no application data between them; the next one
/// is fatal. rustls' own limit (`TemperCounters`, after BoringSSL): each
/// costs two HKDF derivations, two key schedules and, if requested, a reply
/// written while the peer may not be reading.
pub const MAX_KEY_UPDATES_WITHOUT_DATA: u8 = 32;

/// Alert descriptions we send (RFC 8446 6).
mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const DECODE_ERROR: u8 = 50;
    pub const INTERNAL_ERROR: u8 = 80;
}

/// Why a compact connection failed. An alert was appended to `out` where
/// one could be sent; the connection is then closed for good.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {0} bytes exceeds the TLS 1.3 limit")]
    Overflow(usize),
    #[error("unexpected outer record type {0} or version")]
    BadHeader(u8),
    #[error("record failed authentication")]
    BadMac,
    #[error("record with no content type")]
    Empty,
    #[error("peer sent alert {0}")]
    PeerAlert(u8),
    #[error("unsupported post-handshake message {0}")]
    Handshake(u8),
    #[error("malformed post-handshake message")]
    Decode,
    #[error("more than {MAX_KEY_UPDATES_WITHOUT_DATA} key updates without application data")]
    TooManyKeyUpdates,
    #[error("rustls refused the key update: {0}")]
    KeyUpdate(String),
    #[error("record sequence number exhausted")]
    SequenceExhausted,
    /// A fatal alert was sent or received before: nothing more may be
    /// read or written.
    #[error("the TLS connection failed earlier")]
    Failed,
    /// We sent close_notify: nothing more may be written.
    #[error("close_notify was sent")]
    Closed,
}

/// Cipher of a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Cipher {
    fn algorithm(self) -> (&'static ring::aead::Algorithm, usize) {
        match self {
            Cipher::Aes128Gcm => (&ring::aead::AES_128_GCM, 16),
            Cipher::Aes256Gcm => (&ring::aead::AES_256_GCM, 32),
            Cipher::Chacha20Poly1305 => (&ring::aead::CHACHA20_POLY1305, 32),
        }
    }
}

/// Frees an expanded key after overwriting its memory: ring's key holds the
/// traffic key itself (ChaCha20 as is, an AES schedule starts with it), and
/// a freed block is handed to the next allocation of its size (finding 6).
fn wipe(key: Box<ring::aead::LessSafeKey>) {
    let raw = Box::into_raw(key);
    // SAFETY: `raw` comes from `Box::into_raw`, so it is valid, aligned and
    // ours alone. It is dropped in place once, then its bytes are
    // overwritten, then the allocation is freed with the same layout
    // through a `MaybeUninit` box, which runs no destructor.
    unsafe {
        std::ptr::drop_in_place(raw);
        std::slice::from_raw_parts_mut(raw.cast::<u8>(), size_of::<ring::aead::LessSafeKey>()).zeroize();
        drop(Box::from_raw(raw.cast::<MaybeUninit<ring::aead::LessSafeKey>>()));
    }
}

/// One direction's keys: the raw key and IV always, the expanded AEAD key
/// only while in use.
struct Direction {
    cipher: Cipher,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
    /// Expanded key (about 560 B with ring); `None` while idle.
    expanded: Option<Box<ring::aead::LessSafeKey>>,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Direction, TlsError> {
        let (cipher, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Cipher::Chacha20Poly1305, key, iv),
            _ => return Err(TlsError::Unexpected("cipher without a compact record layer")),
        };
        let (_, len) = cipher.algorithm();
        let (key, iv) = (key.as_ref(), iv.as_ref());
        if key.len() != len || iv.len() != 12 {
            return Err(TlsError::Unexpected("traffic secret of an unexpected length"));
        }
        let mut d = Direction { cipher, key: [0; 32], iv: [0; 12], seq, expanded: None };
        d.key[..len].copy_from_slice(key);
        d.iv.copy_from_slice(iv);
        Ok(d)
    }

    fn key(&mut self) -> Result<&ring::aead::LessSafeKey, RecordError> {
        if self.expanded.is_none() {
            let (alg, len) = self.cipher.algorithm();
            // The length was checked against the cipher in `new`.
            let unbound = ring::aead::UnboundKey::new(alg, &self.key[..len])
                .map_err(|_| RecordError::KeyUpdate("key length of the cipher".into()))?;
            self.expanded = Some(Box::new(ring::aead::LessSafeKey::new(unbound)));
        }
        self.expanded.as_deref().ok_or(RecordError::Failed)
    }

    fn release(&mut self) {
        if let Some(key) = self.expanded.take() {
            wipe(key);
        }
    }

    /// RFC 8446 5.3: the IV XOR the 64-bit sequence number; then counts it.
    fn next_nonce(&mut self) -> Result<ring::aead::Nonce, RecordError> {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
        Ok(ring::aead::Nonce::assume_unique_for_key(nonce))
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        // Replaced at each key update, dropped at close: no traffic key is
        // left in freed memory.
        self.release();
        self.key.zeroize();
        self.iv.zeroize();
    }
}

/// Where a connection is in its life (RFC 8446 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// We sent close_notify: reads go on, writes are refused.
    SentClose,
    /// A fatal alert went either way: everything is refused.
    Failed,
}

/// A TLS 1.3 server connection after the handshake, record layer in user
/// space. Made by [`CompactTls::from_session`].
pub struct CompactTls {
    kernel: KernelConnection<ServerConnectionData>,
    tx: Direction,
    rx: Direction,
    /// Records one tx key may protect before we update it.
    tx_limit: u64,
    state: State,
    /// The peer's close_notify arrived: later input is swallowed.
    peer_closed: bool,
    /// KeyUpdates still accepted before the next application data.
    key_updates_left: u8,
}

impl CompactTls {
    /// Takes over a session whose handshake is complete (TLS 1.3, config
    /// with `enable_secret_extraction`, all it produced already in the
    /// caller's `out`). Check [`ServerTls::can_compact`] first: this
    /// consumes the session even when it refuses.
    pub fn from_session(session: ServerTls) -> Result<CompactTls, TlsError> {
        let (secrets, kernel) = session.into_inner().dangerous_into_kernel_connection()?;
        if kernel.protocol_version() != ProtocolVersion::TLSv1_3 {
            return Err(TlsError::Unexpected("compact record layer is TLS 1.3 only"));
        }
        let tx_limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            _ => return Err(TlsError::Unexpected("compact record layer is TLS 1.3 only")),
        };
        Ok(CompactTls {
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
            kernel,
            tx_limit,
            state: State::Open,
            peer_closed: false,
            key_updates_left: MAX_KEY_UPDATES_WITHOUT_DATA,
        })
    }

    /// Wipes and drops the expanded keys; the next record rebuilds them (an
    /// AES or ChaCha key setup, well under a microsecond). Call when the
    /// connection goes idle.
    pub fn release_idle(&mut self) {
        self.tx.release();
        self.rx.release();
    }

    /// The peer's close_notify arrived.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Decrypts the complete records in `incoming` in place and hands each
    /// plaintext to `on_plaintext`; an incomplete record stays (see
    /// [`Progress::consumed`]: at most one record is left). Alerts and
    /// KeyUpdate answers go to `out`, which must be sent before anything
    /// sealed later. After close_notify every input is consumed and dropped
    /// (RFC 8446 6.1) and `peer_closed` is reported on every call.
    pub fn read(
        &mut self,
        incoming: &mut [u8],
        out: &mut Vec<u8>,
        on_plaintext: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Progress, RecordError> {
        if self.state == State::Failed {
            return Err(RecordError::Failed);
        }
        let mut progress = Progress { established: true, ..Progress::default() };
        while !self.peer_closed {
            let rest = &mut incoming[progress.consumed..];
            let Some(header) = rest.first_chunk::<HEADER_LEN>().copied() else { break };
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if header[0] != APPLICATION_DATA || header[1..3] != [3, 3] {
                return Err(self.fail(out, alert::UNEXPECTED_MESSAGE, RecordError::BadHeader(header[0])));
            }
            if len > MAX_CIPHERTEXT {
                return Err(self.fail(out, alert::RECORD_OVERFLOW, RecordError::Overflow(len)));
            }
            if rest.len() < HEADER_LEN + len {
                break;
            }
            let body = &mut rest[HEADER_LEN..HEADER_LEN + len];
            let nonce = match self.rx.next_nonce() {
                Ok(nonce) => nonce,
                Err(err) => return Err(self.fail(out, alert::INTERNAL_ERROR, err)),
            };
            let key = match self.rx.key() {
                Ok(key) => key,
                Err(err) => return Err(self.fail(out, alert::INTERNAL_ERROR, err)),
            };
            let Ok(inner) = key.open_in_place(nonce, ring::aead::Aad::from(header), body) else {
                return Err(self.fail(out, alert::BAD_RECORD_MAC, RecordError::BadMac));
            };
            // RFC 8446 5.4: TLSInnerPlaintext (content, type, padding) is at
            // most 2^14 + 1 bytes, checked before the padding goes.
            if inner.len() > MAX_PLAINTEXT + 1 {
                let len = inner.len();
                return Err(self.fail(out, alert::RECORD_OVERFLOW, RecordError::Overflow(len)));
            }
            // Zero padding follows the real content type.
            let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
                return Err(self.fail(out, alert::UNEXPECTED_MESSAGE, RecordError::Empty));
            };
            let kind = inner[type_at];
            let content = &mut inner[..type_at];
            match kind {
                APPLICATION_DATA => {
                    self.key_updates_left = MAX_KEY_UPDATES_WITHOUT_DATA;
                    if !content.is_empty() {
                        on_plaintext(content);
                    }
                }
                ALERT => match content {
                    [_, alert::CLOSE_NOTIFY] => {
                        self.peer_closed = true;
                    }
                    [_, desc] => {
                        // Any other alert ends the connection, whatever its
                        // level; it gets no answer.
                        self.state = State::Failed;
                        return Err(RecordError::PeerAlert(*desc));
                    }
                    _ => return Err(self.fail(out, alert::DECODE_ERROR, RecordError::Decode)),
                },
                HANDSHAKE => {
                    // A KeyUpdate is 5 bytes and must end its record (a key
                    // change: what follows would be under the old key).
                    // Empty (RFC 8446 5.1), split or several messages: refused.
                    let Ok(msg) = <[u8; 5]>::try_from(&content[..]) else {
                        let (description, err) = match content.first() {
                            Some(&typ) if typ != KEY_UPDATE => (alert::UNEXPECTED_MESSAGE, RecordError::Handshake(typ)),
                            _ => (alert::DECODE_ERROR, RecordError::Decode),
                        };
                        return Err(self.fail(out, description, err));
                    };
                    self.key_update(msg, out)?;
                }
                _ => return Err(self.fail(out, alert::UNEXPECTED_MESSAGE, RecordError::BadHeader(kind))),
            }
            progress.consumed += HEADER_LEN + len;
        }
        if self.peer_closed {
            // Data after a closure alert is ignored (RFC 8446 6.1): consumed,
            // so the caller carries nothing.
            progress.consumed = incoming.len();
            progress.peer_closed = true;
        }
        Ok(progress)
    }

    /// A post-handshake message from the client: only KeyUpdate.
    fn key_update(&mut self, msg: [u8; 5], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let [typ, 0, 0, 1, requested] = msg else {
            return Err(match msg[0] {
                KEY_UPDATE => self.fail(out, alert::DECODE_ERROR, RecordError::Decode),
                typ => self.fail(out, alert::UNEXPECTED_MESSAGE, RecordError::Handshake(typ)),
            });
        };
        if typ != KEY_UPDATE {
            return Err(self.fail(out, alert::UNEXPECTED_MESSAGE, RecordError::Handshake(typ)));
        }
        if requested > 1 {
            return Err(self.fail(out, alert::DECODE_ERROR, RecordError::Decode));
        }
        // Requested or not, each one costs key derivations: bounded.
        let Some(left) = self.key_updates_left.checked_sub(1) else {
            return Err(self.fail(out, alert::UNEXPECTED_MESSAGE, RecordError::TooManyKeyUpdates));
        };
        self.key_updates_left = left;
        let next = match self.kernel.update_rx_secret() {
            Ok(next) => next,
            Err(e) => return Err(self.fail(out, alert::INTERNAL_ERROR, RecordError::KeyUpdate(e.to_string()))),
        };
        match Direction::new(next) {
            Ok(rx) => self.rx = rx,
            Err(e) => return Err(self.fail(out, alert::INTERNAL_ERROR, RecordError::KeyUpdate(e.to_string()))),
        }
        // After our close_notify nothing more is sent; the peer gets no
        // answer, and none is owed once the connection is closing.
        if requested == 1 && self.state == State::Open {
            self.update_tx(out)?;
        }
        Ok(())
    }

    /// Sends KeyUpdate(update_not_requested) under the old key, then
    /// switches to the next one.
    fn update_tx(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal(out, HANDSHAKE, &[&[KEY_UPDATE, 0, 0, 1, 0]])?;
        let next = match self.kernel.update_tx_secret() {
            Ok(next) => next,
            Err(e) => return Err(self.poison(RecordError::KeyUpdate(e.to_string()))),
        };
        match Direction::new(next) {
            Ok(tx) => self.tx = tx,
            Err(e) => return Err(self.poison(RecordError::KeyUpdate(e.to_string()))),
        }
        Ok(())
    }

    /// Encrypts `plaintext` into `out` as records of at most 16 KiB.
    pub fn write(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        for chunk in plaintext.chunks(MAX_PLAINTEXT) {
            self.write_parts(&[chunk], out)?;
        }
        Ok(())
    }

    /// Encrypts the concatenation of `parts` (at most 16 KiB in all) as one
    /// record, without joining them first. Longer input falls back to
    /// [`Self::write`].
    pub fn write_parts(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.writable()?;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total > MAX_PLAINTEXT {
            return self.write(&parts.concat(), out);
        }
        // Leave one record under the old key for the KeyUpdate itself.
        if self.tx.seq.saturating_add(1) >= self.tx_limit {
            self.update_tx(out)?;
        }
        self.seal(out, APPLICATION_DATA, parts)
    }

    /// Appends close_notify; nothing may be written after it.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.writable()?;
        self.seal(out, ALERT, &[&[1, alert::CLOSE_NOTIFY]])?;
        self.state = State::SentClose;
        Ok(())
    }

    fn writable(&self) -> Result<(), RecordError> {
        match self.state {
            State::Open => Ok(()),
            State::SentClose => Err(RecordError::Closed),
            State::Failed => Err(RecordError::Failed),
        }
    }

    /// One protected record: header, content (`parts` in order, at most
    /// 16 KiB), inner type, tag; encrypted in place at the end of `out`.
    fn seal(&mut self, out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> Result<(), RecordError> {
        let content_len: usize = parts.iter().map(|p| p.len()).sum();
        let len = content_len + 1 + TAG_LEN;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.tx.next_nonce().map_err(|e| self.poison(e))?;
        let start = out.len();
        out.reserve(HEADER_LEN + len);
        out.extend_from_slice(&header);
        for part in parts {
            out.extend_from_slice(part);
        }
        out.push(kind);
        let sealed = match self.tx.key() {
            Ok(key) => key
                .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(header), &mut out[start + HEADER_LEN..])
                .map_err(|_| RecordError::Overflow(content_len)),
            Err(err) => Err(err),
        };
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(tag.as_ref());
                Ok(())
            }
            Err(err) => {
                // The sequence number is spent: no later record can follow.
                out.truncate(start);
                Err(self.poison(err))
            }
        }
    }

    /// Marks the connection failed; returns `err`.
    fn poison(&mut self, err: RecordError) -> RecordError {
        self.state = State::Failed;
        err
    }

    /// Fatal alert (unless we already sent close_notify or failed), then the
    /// connection is failed for good.
    fn fail(&mut self, out: &mut Vec<u8>, description: u8, err: RecordError) -> RecordError {
        if self.state == State::Open {
            let _ = self.seal(out, ALERT, &[&[2, description]]);
        }
        self.poison(err)
    }
}
