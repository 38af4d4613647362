//! Server-to-client frames. Server frames are never masked (RFC 6455 5.1), so
//! a frame is a 2-10 byte header in front of the payload, unchanged: the
//! header for a shared fan-out frame is built once and the same
//! (header, body) pair goes to every member with `writev`.

use bytes::{BufMut, Bytes, BytesMut};

use super::close::{self, CloseCode};

/// Longest server frame header: 2 bytes + a 64-bit length, no mask.
pub const MAX_HEADER_LEN: usize = 10;
/// Longest control-frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

const FIN: u8 = 0x80;
pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// The header of one unfragmented server frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    bytes: [u8; MAX_HEADER_LEN],
    len: u8,
}

impl FrameHeader {
    fn new(opcode: u8, payload_len: usize) -> FrameHeader {
        let mut bytes = [0u8; MAX_HEADER_LEN];
        bytes[0] = FIN | opcode;
        let len = if payload_len < 126 {
            bytes[1] = payload_len as u8;
            2
        } else if let Ok(short) = u16::try_from(payload_len) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
            10
        };
        FrameHeader { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Header of a binary message of `payload_len` bytes (one or more whole
/// longlink frames).
pub fn binary_header(payload_len: usize) -> FrameHeader {
    FrameHeader::new(OP_BINARY, payload_len)
}

/// Appends a binary frame carrying `payload` to `dst`: for a frame that goes
/// to one connection, so it leaves as one contiguous buffer.
pub fn encode_binary_into(dst: &mut BytesMut, payload: &[u8]) {
    let header = binary_header(payload.len());
    dst.reserve(header.as_bytes().len() + payload.len());
    dst.put_slice(header.as_bytes());
    dst.put_slice(payload);
}

/// A fan-out frame as it goes to every WebSocket member: the header is built
/// once, and both halves are shared `Bytes` (a member costs two reference
/// counts and two iovecs, no copy).
#[derive(Clone, Debug)]
pub struct SharedFrame {
    pub header: Bytes,
    pub body: Bytes,
}

impl SharedFrame {
    /// Wraps an encoded longlink frame (or several) in one binary message.
    pub fn new(body: Bytes) -> SharedFrame {
        let header = Bytes::copy_from_slice(binary_header(body.len()).as_bytes());
        SharedFrame { header, body }
    }

    /// Bytes on the wire for one member.
    pub fn wire_len(&self) -> usize {
        self.header.len() + self.body.len()
    }
}

fn control(opcode: u8, payload: &[u8]) -> Bytes {
    // Callers pass at most 125 bytes (a pong echoes a checked ping; close
    // reasons are cut by `encode_close`): more would be a bug here.
    debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut out = BytesMut::with_capacity(2 + payload.len());
    out.put_slice(FrameHeader::new(opcode, payload.len()).as_bytes());
    out.put_slice(payload);
    out.freeze()
}

/// The answer to a ping: the same application data (RFC 6455 5.5.3).
pub fn encode_pong(payload: &[u8]) -> Bytes {
    control(OP_PONG, payload)
}

/// A server ping (liveness probe of a silent browser).
pub fn encode_ping(payload: &[u8]) -> Bytes {
    control(OP_PING, payload)
}

/// A Close frame with `code` and `reason` (cut at a character boundary to
/// fit 123 bytes).
pub fn encode_close(code: CloseCode, reason: &str) -> Bytes {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.0.to_be_bytes());
    let mut reason_len = reason.len().min(close::MAX_REASON_BYTES);
    while !reason.is_char_boundary(reason_len) {
        reason_len -= 1;
    }
    payload[2..2 + reason_len].copy_from_slice(&reason.as_bytes()[..reason_len]);
    control(OP_CLOSE, &payload[..2 + reason_len])
}

/// A Close frame with no status (the answer to a Close that had none).
pub fn encode_close_empty() -> Bytes {
    control(OP_CLOSE, &[])
}

/// A Close frame for a longlink error code: status per [`close::from_longlink`],
/// reason `"<code> <summary>"`.
pub fn encode_longlink_close(code: i32, summary: &str) -> Bytes {
    encode_close(close::from_longlink(code), &close::longlink_reason(code, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_follow_the_three_size_classes() {
        assert_eq!(binary_header(0).as_bytes(), [0x82, 0]);
        assert_eq!(binary_header(125).as_bytes(), [0x82, 125]);
        assert_eq!(binary_header(126).as_bytes(), [0x82, 126, 0, 126]);
        assert_eq!(binary_header(65535).as_bytes(), [0x82, 126, 0xff, 0xff]);
        assert_eq!(binary_header(65536).as_bytes(), [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn rfc6455_unmasked_examples() {
        // RFC 6455 5.7: a single-frame unmasked text message "Hello" is
        // 0x81 0x05 "Hello"; ours are binary (0x82), an unmasked ping with
        // "Hello" is 0x89 0x05 "Hello".
        let mut dst = BytesMut::new();
        encode_binary_into(&mut dst, b"Hello");
        assert_eq!(&dst[..], b"\x82\x05Hello");
        assert_eq!(&encode_ping(b"Hello")[..], b"\x89\x05Hello");
        assert_eq!(&encode_pong(b"Hello")[..], b"\x8a\x05Hello");
        // 256 bytes binary: 0x82 0x7E 0x0100 [256 bytes].
        dst.clear();
        encode_binary_into(&mut dst, &[7u8; 256]);
        assert_eq!(&dst[..4], [0x82, 0x7e, 0x01, 0x00]);
        assert_eq!(dst.len(), 260);
    }

    #[test]
    fn shared_frame_builds_one_header_for_all_members() {
        let body = Bytes::from(vec![1u8; 300]);
        let frame = SharedFrame::new(body.clone());
        let copies: Vec<SharedFrame> = (0..3).map(|_| frame.clone()).collect();
        for c in &copies {
            // Same allocation, not a copy.
            assert_eq!(c.header.as_ptr(), frame.header.as_ptr());
            assert_eq!(c.body.as_ptr(), body.as_ptr());
        }
        assert_eq!(&frame.header[..], [0x82, 126, 1, 44]);
        assert_eq!(frame.wire_len(), 304);
    }

    #[test]
    fn close_frames_carry_code_and_cut_reason() {
        let f = encode_close(CloseCode::PROTOCOL_ERROR, "bad");
        assert_eq!(&f[..], b"\x88\x05\x03\xeabad");
        let f = encode_longlink_close(2002, "invalid token");
        assert_eq!(f[0], 0x88);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4502);
        assert_eq!(&f[4..], b"2002 invalid token");
        let long = "ü".repeat(100);
        let f = encode_close(CloseCode::NORMAL, &long);
        assert!(f.len() <= 2 + MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
        assert_eq!(&encode_close_empty()[..], [0x88, 0]);
    }
}
