//! Client-to-server frames, decoded in the caller's buffer.
//!
//! [`Decoder::decode`] takes the bytes of one read (the shard's scratch
//! buffer) and rewrites them in place: the unmasked payload of binary frames
//! is moved to the front of the buffer, so `buf[..data_len]` is plain
//! longlink stream bytes, ready for the same framing code as TCP. Headers
//! and control frames are cut out. Payload is streamed: a frame split across
//! reads costs no buffer, only its remaining length and mask position.
//!
//! What the decoder keeps between reads (see [`Decoder`]) is a few dozen
//! bytes and, only while a control frame is split across reads, a boxed
//! 126-byte payload.

use super::close::CloseCode;
use super::encode::{self, MAX_CONTROL_PAYLOAD, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};

/// The message bound for a node's `max_frame_bytes`: one longlink frame of
/// the largest body with its 8-byte header. A client batching frames keeps
/// each message under it, as over TCP a read never needs more.
pub fn max_message_bytes(max_frame_bytes: u32) -> u32 {
    max_frame_bytes.saturating_add(LONGLINK_HEADER_LEN)
}

/// longlink's `codec::HEADER_LEN`.
const LONGLINK_HEADER_LEN: u32 = 8;

/// Longest client frame header: 2 + 8 (length) + 4 (mask).
const MAX_CLIENT_HEADER: usize = 14;

/// Why the client's bytes are not an acceptable WebSocket stream. Each maps to
/// the close status sent before closing ([`WsError::close_code`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WsError {
    #[error("client frame is not masked")]
    Unmasked,
    #[error("reserved header bits {0:#04x} set (no extension negotiated)")]
    ReservedBits(u8),
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("text messages are not accepted: longlink frames are binary")]
    Text,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload of {0} bytes (at most 125)")]
    ControlTooLong(u8),
    #[error("continuation frame outside a message")]
    UnexpectedContinuation,
    #[error("new message before the previous one ended")]
    UnfinishedMessage,
    #[error("payload length {0} not in its shortest encoding")]
    NonMinimalLength(u64),
    #[error("64-bit payload length with the most significant bit set")]
    LengthHighBit,
    #[error("message of at least {len} bytes exceeds the limit of {max}")]
    TooBig { len: u64, max: u32 },
    #[error("close payload of 1 byte")]
    CloseTooShort,
    #[error("close status {0} is not valid on the wire")]
    BadCloseCode(u16),
    #[error("close reason is not UTF-8")]
    BadCloseReason,
}

impl WsError {
    /// The status of the Close frame to send before closing (RFC 6455 7.4.1).
    pub fn close_code(&self) -> CloseCode {
        match self {
            WsError::Text => CloseCode::UNSUPPORTED_DATA,
            WsError::TooBig { .. } => CloseCode::MESSAGE_TOO_BIG,
            WsError::BadCloseReason => CloseCode::INVALID_PAYLOAD,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// A control frame's payload (at most 125 bytes), unmasked.
#[derive(Clone, Copy)]
pub struct ControlPayload {
    len: u8,
    bytes: [u8; MAX_CONTROL_PAYLOAD],
}

impl Default for ControlPayload {
    fn default() -> Self {
        ControlPayload { len: 0, bytes: [0; MAX_CONTROL_PAYLOAD] }
    }
}

impl ControlPayload {
    fn push(&mut self, data: &[u8]) {
        // The header check bounds a control payload to 125 bytes, so this
        // never cuts; `min` keeps the index in range regardless.
        let start = usize::from(self.len);
        let n = data.len().min(MAX_CONTROL_PAYLOAD - start);
        self.bytes[start..start + n].copy_from_slice(&data[..n]);
        self.len += n as u8;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for ControlPayload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlPayload({} bytes)", self.len)
    }
}

/// A Close frame from the client, already checked.
#[derive(Clone, Copy, Debug)]
pub struct PeerClose {
    /// `None` when the Close frame had no payload.
    pub code: Option<CloseCode>,
    payload: ControlPayload,
}

impl PeerClose {
    /// The reason text (checked UTF-8; may be empty).
    pub fn reason(&self) -> &str {
        std::str::from_utf8(self.payload.as_bytes().get(2..).unwrap_or_default()).unwrap_or_default()
    }

    /// The Close frame to answer with: the peer's status echoed (RFC 6455
    /// 5.5.1), no reason.
    pub fn reply(&self) -> bytes::Bytes {
        match self.code {
            Some(code) => encode::encode_close(code, ""),
            None => encode::encode_close_empty(),
        }
    }
}

/// What one [`Decoder::decode`] call produced.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Longlink stream bytes now at `buf[..data_len]`.
    pub data_len: usize,
    /// Send a pong with this payload. Only the latest ping of a read is
    /// answered (RFC 6455 5.5.3 allows it), so a ping flood costs one pong
    /// per read, not one per ping.
    pub pong: Option<ControlPayload>,
    /// The peer sent Close: send [`PeerClose::reply`], then close the
    /// socket. Bytes after the Close frame were ignored.
    pub close: Option<PeerClose>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// Between frames: reading a header.
    Header,
    /// Payload of a binary or continuation frame.
    Data { fin: bool },
    /// Payload of a control frame.
    Control { opcode: u8 },
}

/// Per-connection decoder state. Idle, it is this struct and nothing else:
/// no heap, no buffer.
#[derive(Debug)]
pub struct Decoder {
    /// Header bytes of a frame whose header was split across reads.
    head: [u8; MAX_CLIENT_HEADER],
    head_len: u8,
    frame: Frame,
    /// Payload bytes of the current frame not yet seen.
    remaining: u32,
    mask: [u8; 4],
    /// Offset into `mask` of the next payload byte.
    mask_pos: u8,
    /// A binary message is open (its last frame had FIN = 0).
    in_message: bool,
    /// Bytes of the open message so far, for the size limit across fragments.
    message_len: u32,
    /// A Close arrived: everything after it is ignored.
    peer_closed: bool,
    /// Payload of a control frame split across reads; `None` otherwise, so
    /// an idle connection holds no buffer.
    control: Option<Box<ControlPayload>>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            head: [0; MAX_CLIENT_HEADER],
            head_len: 0,
            frame: Frame::Header,
            remaining: 0,
            mask: [0; 4],
            mask_pos: 0,
            in_message: false,
            message_len: 0,
            peer_closed: false,
            control: None,
        }
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Whether the decoder is between frames with nothing carried: the
    /// connection may be handed off or parked.
    pub fn is_idle(&self) -> bool {
        self.frame == Frame::Header && self.head_len == 0 && !self.in_message && self.control.is_none()
    }

    /// Whether a Close has been received.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Decodes `buf` (the bytes of one read) in place. `max_message` bounds a
    /// binary message across its fragments, checked on each header before
    /// its payload is read. After an error the connection must be closed
    /// with [`WsError::close_code`].
    pub fn decode(&mut self, buf: &mut [u8], max_message: u32) -> Result<Decoded, WsError> {
        let mut out = Decoded::default();
        let mut read = 0;
        while read < buf.len() && !self.peer_closed {
            match self.frame {
                Frame::Header => {
                    let need = self.header_need()?;
                    let take = (need - usize::from(self.head_len)).min(buf.len() - read);
                    let start = usize::from(self.head_len);
                    self.head[start..start + take].copy_from_slice(&buf[read..read + take]);
                    self.head_len += take as u8;
                    read += take;
                    // The first two bytes may announce more header bytes.
                    if usize::from(self.head_len) == self.header_need()? {
                        self.start_frame(max_message)?;
                        if self.remaining == 0 {
                            self.end_frame(None, &mut out)?;
                        }
                    }
                }
                Frame::Data { .. } => {
                    let n = (self.remaining as usize).min(buf.len() - read);
                    // `data_len <= read`: the move goes towards the front and
                    // never overwrites bytes not yet read.
                    buf.copy_within(read..read + n, out.data_len);
                    unmask(&mut buf[out.data_len..out.data_len + n], self.mask, self.mask_pos);
                    out.data_len += n;
                    read += n;
                    self.advance(n);
                    if self.remaining == 0 {
                        self.end_frame(None, &mut out)?;
                    }
                }
                Frame::Control { .. } => {
                    let n = (self.remaining as usize).min(buf.len() - read);
                    let payload = &mut buf[read..read + n];
                    unmask(payload, self.mask, self.mask_pos);
                    read += n;
                    self.advance(n);
                    if self.remaining == 0 && self.control.is_none() {
                        // Whole payload in this read: no buffer needed.
                        let mut whole = ControlPayload::default();
                        whole.push(payload);
                        self.end_frame(Some(whole), &mut out)?;
                    } else {
                        self.control.get_or_insert_with(Box::default).push(payload);
                        if self.remaining == 0 {
                            let carried = self.control.take().map(|b| *b).unwrap_or_default();
                            self.end_frame(Some(carried), &mut out)?;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn advance(&mut self, n: usize) {
        self.remaining -= n as u32;
        self.mask_pos = ((usize::from(self.mask_pos) + n) & 3) as u8;
    }

    /// How many header bytes the frame being read has; checks the first two
    /// bytes as soon as they are there, so garbage is refused early.
    fn header_need(&self) -> Result<usize, WsError> {
        if self.head_len < 2 {
            return Ok(2);
        }
        let (b0, b1) = (self.head[0], self.head[1]);
        if b0 & 0x70 != 0 {
            return Err(WsError::ReservedBits(b0 & 0x70));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Unmasked);
        }
        let fin = b0 & 0x80 != 0;
        let len7 = b1 & 0x7f;
        match b0 & 0x0f {
            OP_TEXT => return Err(WsError::Text),
            OP_BINARY if self.in_message => return Err(WsError::UnfinishedMessage),
            OP_CONTINUATION if !self.in_message => return Err(WsError::UnexpectedContinuation),
            OP_BINARY | OP_CONTINUATION => {}
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(WsError::FragmentedControl);
                }
                if usize::from(len7) > MAX_CONTROL_PAYLOAD {
                    return Err(WsError::ControlTooLong(len7));
                }
            }
            other => return Err(WsError::UnknownOpcode(other)),
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Ok(2 + ext + 4)
    }

    /// Parses a complete header and enters its payload.
    fn start_frame(&mut self, max_message: u32) -> Result<(), WsError> {
        let head = &self.head[..usize::from(self.head_len)];
        let (b0, len7) = (head[0], head[1] & 0x7f);
        let (len, mask_at) = match len7 {
            126 => {
                let len = u64::from(u16::from_be_bytes([head[2], head[3]]));
                if len < 126 {
                    return Err(WsError::NonMinimalLength(len));
                }
                (len, 4)
            }
            127 => {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&head[2..10]);
                let len = u64::from_be_bytes(raw);
                if len >> 63 != 0 {
                    return Err(WsError::LengthHighBit);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(WsError::NonMinimalLength(len));
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        self.mask.copy_from_slice(&head[mask_at..mask_at + 4]);
        self.mask_pos = 0;
        self.head_len = 0;
        let opcode = b0 & 0x0f;
        if matches!(opcode, OP_CLOSE | OP_PING | OP_PONG) {
            // Checked by `header_need`: at most 125.
            self.remaining = len as u32;
            self.frame = Frame::Control { opcode };
            return Ok(());
        }
        let total = u64::from(self.message_len) + len;
        if total > u64::from(max_message) {
            return Err(WsError::TooBig { len: total, max: max_message });
        }
        // Fits in u32: bounded by `max_message` just above.
        self.remaining = len as u32;
        self.message_len = total as u32;
        self.in_message = true;
        self.frame = Frame::Data { fin: b0 & 0x80 != 0 };
        Ok(())
    }

    fn end_frame(&mut self, control: Option<ControlPayload>, out: &mut Decoded) -> Result<(), WsError> {
        match std::mem::replace(&mut self.frame, Frame::Header) {
            Frame::Header => {}
            Frame::Data { fin } => {
                if fin {
                    self.in_message = false;
                    self.message_len = 0;
                }
            }
            Frame::Control { opcode } => {
                let payload = control.unwrap_or_default();
                match opcode {
                    OP_PING => out.pong = Some(payload),
                    OP_CLOSE => {
                        out.close = Some(check_close(payload)?);
                        self.peer_closed = true;
                    }
                    // Unsolicited or answering our ping: liveness is the
                    // session's business (any input counts).
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

fn check_close(payload: ControlPayload) -> Result<PeerClose, WsError> {
    let bytes = payload.as_bytes();
    let code = match bytes {
        [] => None,
        [_] => return Err(WsError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(WsError::BadCloseCode(code.0));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::BadCloseReason);
            }
            Some(code)
        }
    };
    Ok(PeerClose { code, payload })
}

/// XORs `data` with `mask`, starting at `offset` into the mask.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: u8) {
    let o = usize::from(offset);
    let m = [mask[o & 3], mask[(o + 1) & 3], mask[(o + 2) & 3], mask[(o + 3) & 3]];
    let wide = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 64 * 1024 + 8;

    #[test]
    fn message_bound_follows_max_frame_bytes() {
        assert_eq!(max_message_bytes(64 * 1024), MAX);
        assert_eq!(max_message_bytes(u32::MAX), u32::MAX);
    }

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Result<(Vec<u8>, Decoded), WsError> {
        let mut buf = bytes.to_vec();
        let out = d.decode(&mut buf, MAX)?;
        Ok((buf[..out.data_len].to_vec(), out))
    }

    #[test]
    fn rfc6455_masked_hello() {
        // RFC 6455 5.7: "A single-frame masked text message": 0x81 0x85 0x37
        // 0xfa 0x21 0x3d 0x7f 0x9f 0x4d 0x51 0x58 ("Hello"). Text is refused;
        // the same bytes as a binary frame (0x82) decode to "Hello".
        let text = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(decode_all(&mut Decoder::new(), &text).err(), Some(WsError::Text));
        let mut binary = text;
        binary[0] = 0x82;
        let mut d = Decoder::new();
        let (data, out) = decode_all(&mut d, &binary).expect("valid frame");
        assert_eq!(data, b"Hello");
        assert!(out.pong.is_none() && out.close.is_none());
        assert!(d.is_idle());
    }

    #[test]
    fn rfc6455_masked_ping_is_answered_with_its_payload() {
        // RFC 6455 5.7: a masked ping "Hello" (the RFC shows the unmasked
        // form 0x89 0x05; a client must mask).
        let mut d = Decoder::new();
        let (data, out) = decode_all(&mut d, &frame(0x89, b"Hello", [0x37, 0xfa, 0x21, 0x3d])).expect("ping");
        assert!(data.is_empty());
        assert_eq!(out.pong.expect("pong").as_bytes(), b"Hello");
        assert_eq!(&encode::encode_pong(b"Hello")[..], b"\x8a\x05Hello");
    }

    #[test]
    fn rfc6455_fragmented_message_with_ping_in_the_middle() {
        // RFC 6455 5.4 / 5.7: "Hel" (FIN=0), a ping, "lo" (continuation, FIN=1).
        let mut wire = frame(0x02, b"Hel", [1, 2, 3, 4]);
        wire.extend(frame(0x89, b"p", [5, 6, 7, 8]));
        wire.extend(frame(0x80, b"lo", [9, 10, 11, 12]));
        let mut d = Decoder::new();
        let (data, out) = decode_all(&mut d, &wire).expect("fragments");
        assert_eq!(data, b"Hello");
        assert_eq!(out.pong.expect("pong").as_bytes(), b"p");
        assert!(d.is_idle());
    }

    #[test]
    fn every_split_point_gives_the_same_bytes() {
        // Big enough for the 16-bit length form, plus a control frame.
        let body: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut wire = frame(0x02, &body[..200], [0xde, 0xad, 0xbe, 0xef]);
        wire.extend(frame(0x89, b"ping!", [1, 2, 3, 4]));
        wire.extend(frame(0x80, &body[200..], [4, 3, 2, 1]));
        for a in 0..wire.len() {
            for b in [a, (a + 1).min(wire.len()), (a + 7).min(wire.len())] {
                let mut d = Decoder::new();
                let mut got = Vec::new();
                let mut pong = None;
                for part in [&wire[..a], &wire[a..b], &wire[b..]] {
                    let mut buf = part.to_vec();
                    let out = d.decode(&mut buf, MAX).expect("valid");
                    got.extend_from_slice(&buf[..out.data_len]);
                    pong = pong.or(out.pong);
                }
                assert_eq!(got, body, "split at {a}/{b}");
                assert_eq!(pong.expect("pong").as_bytes(), b"ping!");
                assert!(d.is_idle() && d.control.is_none());
            }
        }
    }

    #[test]
    fn idle_decoder_is_small_and_holds_no_heap() {
        assert!(std::mem::size_of::<Decoder>() <= 48, "{}", std::mem::size_of::<Decoder>());
        let mut d = Decoder::new();
        // A control frame split across reads borrows a box only until it ends.
        let wire = frame(0x89, b"abcdef", [1, 1, 1, 1]);
        let mut first = wire[..8].to_vec();
        d.decode(&mut first, MAX).expect("part");
        assert!(d.control.is_some());
        let mut rest = wire[8..].to_vec();
        d.decode(&mut rest, MAX).expect("rest");
        assert!(d.control.is_none() && d.is_idle());
    }

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        let err = decode_all(&mut Decoder::new(), b"\x82\x05Hello").expect_err("unmasked");
        assert_eq!(err, WsError::Unmasked);
        assert_eq!(err.close_code(), CloseCode::PROTOCOL_ERROR);
        // Refused on the first two bytes, before any more arrive.
        assert_eq!(Decoder::new().decode(&mut [0x82, 0x05], MAX).err(), Some(WsError::Unmasked));
    }

    #[test]
    fn oversized_length_is_refused_before_its_payload() {
        // 16 MiB announced, nothing of it sent.
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(16u64 << 20).to_be_bytes());
        wire.extend_from_slice(&[0; 4]);
        let err = decode_all(&mut Decoder::new(), &wire).expect_err("too big");
        assert!(matches!(err, WsError::TooBig { .. }));
        assert_eq!(err.close_code(), CloseCode::MESSAGE_TOO_BIG);
        // The bound holds across fragments: two halves of a too-big message.
        let half = vec![0u8; (MAX / 2 + 1) as usize];
        let mut wire = frame(0x02, &half, [1, 2, 3, 4]);
        wire.extend(frame(0x80, &half, [1, 2, 3, 4]));
        let err = decode_all(&mut Decoder::new(), &wire).expect_err("too big in total");
        assert!(matches!(err, WsError::TooBig { .. }));
        // Exactly the limit is fine.
        let exact = vec![0u8; MAX as usize];
        assert!(decode_all(&mut Decoder::new(), &frame(0x02, &exact, [1, 2, 3, 4])).is_ok());
    }

    #[test]
    fn length_with_high_bit_and_non_minimal_lengths_are_refused() {
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
        wire.extend_from_slice(&[0; 4]);
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::LengthHighBit));
        // 5 bytes in the 16-bit form.
        let wire = [0x82, 0x80 | 126, 0, 5, 0, 0, 0, 0];
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::NonMinimalLength(5)));
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&300u64.to_be_bytes());
        wire.extend_from_slice(&[0; 4]);
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::NonMinimalLength(300)));
    }

    #[test]
    fn control_frames_must_be_short_and_whole() {
        // A ping announcing 126 bytes (16-bit length form).
        let wire = [0x89, 0x80 | 126, 0, 126, 0, 0, 0, 0];
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::ControlTooLong(126)));
        // A ping with FIN = 0.
        let wire = frame(0x09, b"x", [0; 4]);
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::FragmentedControl));
    }

    #[test]
    fn fragment_order_is_enforced() {
        let wire = frame(0x80, b"x", [0; 4]);
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::UnexpectedContinuation));
        let mut wire = frame(0x02, b"x", [0; 4]);
        wire.extend(frame(0x82, b"y", [0; 4]));
        assert_eq!(decode_all(&mut Decoder::new(), &wire).err(), Some(WsError::UnfinishedMessage));
        assert_eq!(
            decode_all(&mut Decoder::new(), &frame(0xc2, b"x", [0; 4])).err(),
            Some(WsError::ReservedBits(0x40))
        );
        assert_eq!(decode_all(&mut Decoder::new(), &frame(0x83, b"x", [0; 4])).err(), Some(WsError::UnknownOpcode(3)));
    }

    #[test]
    fn close_is_checked_echoed_and_ends_input() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut wire = frame(0x88, &payload, [7, 7, 7, 7]);
        wire.extend(frame(0x82, b"ignored", [0; 4]));
        let mut d = Decoder::new();
        let (data, out) = decode_all(&mut d, &wire).expect("close");
        assert!(data.is_empty());
        let close = out.close.expect("close");
        assert_eq!((close.code, close.reason()), (Some(CloseCode::NORMAL), "bye"));
        assert_eq!(&close.reply()[..], b"\x88\x02\x03\xe8");
        assert!(d.peer_closed());
        // An empty Close is answered with an empty Close.
        let (_, out) = decode_all(&mut Decoder::new(), &frame(0x88, b"", [1, 2, 3, 4])).expect("empty close");
        assert_eq!(&out.close.expect("close").reply()[..], b"\x88\x00");
    }

    #[test]
    fn bad_close_payloads_are_refused() {
        let mut bad_utf8 = 1000u16.to_be_bytes().to_vec();
        bad_utf8.extend_from_slice(&[0xc3, 0x28]);
        let err = decode_all(&mut Decoder::new(), &frame(0x88, &bad_utf8, [1, 2, 3, 4])).expect_err("utf8");
        assert_eq!(err, WsError::BadCloseReason);
        assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
        assert_eq!(decode_all(&mut Decoder::new(), &frame(0x88, b"x", [0; 4])).err(), Some(WsError::CloseTooShort));
        let reserved = 1005u16.to_be_bytes();
        assert_eq!(
            decode_all(&mut Decoder::new(), &frame(0x88, &reserved, [0; 4])).err(),
            Some(WsError::BadCloseCode(1005))
        );
    }

    #[test]
    fn unmask_matches_the_bytewise_definition_at_every_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for offset in 0..4u8 {
            for len in [0, 1, 7, 8, 9, 31] {
                let data: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
                let mut fast = data.clone();
                unmask(&mut fast, mask, offset);
                let slow: Vec<u8> =
                    data.iter().enumerate().map(|(i, b)| b ^ mask[(i + usize::from(offset)) % 4]).collect();
                assert_eq!(fast, slow, "offset {offset} len {len}");
            }
        }
    }
}
