//! The frame decoder: [`split_frame`] on arbitrary bytes, then
//! [`Frame::decode`] on every whole frame.
//!
//! Input: one byte picks the body limit, the rest is the byte stream.
//! Invariants:
//! - the header is read exactly as proto/README.md says; an error names
//!   the byte that caused it; fewer bytes than a frame is "need more";
//! - the announced length is checked against the limit before anything is
//!   allocated (`split_frame` allocates nothing at all);
//! - decoding what a client may send, as the client port does, allocates
//!   no more than the body's size (plus a constant): the header's length
//!   and the body's contents cannot make the server allocate more;
//! - what decodes re-encodes to a frame that decodes to the same value,
//!   and encoding is stable (encode(decode(encode(x))) == encode(x)).

use bytes::BytesMut;

use super::Input;
use super::alloc::measure;
use crate::protocol::codec::{
    self, CodecError, DEFAULT_MAX_BODY, Frame, HEADER_LEN, Header, MAGIC, Peer, VERSION, split_frame,
};
use crate::protocol::proto::{ErrorCode, FrameKind};

/// Slack over the body size for what decoding a client frame may allocate
/// (decode errors carry a small boxed description).
const ALLOC_SLACK: usize = 1024;

pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    // Small limits make "too large" reachable with short inputs.
    let max_body = match input.u8() % 4 {
        0 => DEFAULT_MAX_BODY,
        1 => 0,
        2 => 64,
        _ => 1024,
    };
    let mut rest = input.rest();
    loop {
        let (split, usage) = measure(|| split_frame(rest, max_body));
        if let Some(usage) = usage {
            assert_eq!(usage.largest, 0, "split_frame allocated");
        }
        match split {
            Ok(None) => {
                check_incomplete(rest, max_body);
                break;
            }
            Err(err) => {
                check_error(rest, max_body, &err);
                break;
            }
            Ok(Some((header, body))) => {
                check_header(rest, max_body, header, body);
                check_body(header, body);
                rest = &rest[header.frame_len()..];
            }
        }
    }
}

/// `Ok(None)`: a valid start of a frame that is not all there yet.
fn check_incomplete(buf: &[u8], max_body: u32) {
    if let Some(&first) = buf.first() {
        assert_eq!(first, MAGIC, "need-more on a bad first byte");
    }
    if buf.len() >= HEADER_LEN {
        let header = codec::decode_header(buf, max_body).expect("need-more on a bad header").expect("8 bytes");
        assert!(buf.len() < header.frame_len(), "need-more with a whole frame present");
    }
}

fn check_error(buf: &[u8], max_body: u32, err: &CodecError) {
    match *err {
        CodecError::BadMagic(b) => assert!(buf[0] == b && b != MAGIC, "{err}"),
        CodecError::UnsupportedVersion(v) => assert!(buf[0] == MAGIC && buf[1] == v && v != VERSION, "{err}"),
        CodecError::UnknownKind(k) => {
            assert!(buf[..2] == [MAGIC, VERSION] && buf[2] == k, "{err}");
            assert!(matches!(FrameKind::try_from(i32::from(k)), Err(_) | Ok(FrameKind::Unspecified)), "{err}");
        }
        CodecError::TooLarge { len, max } => {
            assert_eq!(len, u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]), "{err}");
            assert!(max == max_body && len > max, "{err}");
        }
        _ => panic!("split_frame returned a body error: {err}"),
    }
    let expected = match err {
        CodecError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        CodecError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
        _ => ErrorCode::BadFrame,
    };
    assert_eq!(err.code(), expected);
}

fn check_header(buf: &[u8], max_body: u32, header: Header, body: &[u8]) {
    assert!(header.body_len <= max_body);
    assert_eq!(body.len(), header.body_len as usize);
    assert_eq!(&buf[..4], &[MAGIC, VERSION, header.kind as u8, header.flags.0]);
    assert_eq!(&buf[HEADER_LEN..header.frame_len()], body);
    // Every cut short of the whole frame needs more bytes.
    for cut in (0..=HEADER_LEN).chain([header.frame_len() - 1]) {
        if cut < header.frame_len() {
            assert_eq!(split_frame(&buf[..cut], max_body), Ok(None), "cut at {cut}");
        }
    }
    // The limit is inclusive.
    assert!(matches!(split_frame(buf, header.body_len), Ok(Some((h, _))) if h == header));
    if header.body_len > 0 {
        let too_small = header.body_len - 1;
        assert_eq!(split_frame(buf, too_small), Err(CodecError::TooLarge { len: header.body_len, max: too_small }));
    }
}

/// What the client port does with a client's frame (`ShardCtx::handle_input`).
fn decode_from_client(header: Header, body: &[u8]) -> Result<Frame, CodecError> {
    Frame::decode_from(Peer::Client, header, body)
}

fn check_body(header: Header, body: &[u8]) {
    let (from_client, usage) = measure(|| decode_from_client(header, body));
    if let Some(usage) = usage {
        let bound = body.len() + ALLOC_SLACK;
        assert!(
            usage.peak <= bound && usage.largest <= bound,
            "decoding a {:?} frame of {} bytes from a client allocated {usage:?} (bound {bound})",
            header.kind,
            body.len(),
        );
    }
    let decoded = Frame::decode(header, body);
    if let Ok(frame) = &from_client {
        assert_eq!(decoded.as_ref(), Ok(frame), "the client decode differs");
    }
    match decoded {
        Ok(frame) => check_round_trip(header, &frame),
        Err(err) => {
            match &err {
                CodecError::BadBody { kind, .. } | CodecError::UnexpectedBody(kind) | CodecError::WrongKind(kind) => {
                    assert_eq!(*kind, header.kind)
                }
                other => panic!("Frame::decode returned a header error: {other}"),
            }
            assert_eq!(err.code(), ErrorCode::BadFrame);
        }
    }
}

fn check_round_trip(header: Header, frame: &Frame) {
    assert_eq!(frame.kind(), header.kind);
    let mut encoded = BytesMut::new();
    frame.encode_into(&mut encoded, header.flags);
    let (again, body) =
        split_frame(&encoded, u32::MAX).expect("an encoded frame splits").expect("an encoded frame is whole");
    assert_eq!(again.frame_len(), encoded.len());
    assert_eq!((again.kind, again.flags), (header.kind, header.flags));
    let decoded = Frame::decode(again, body).expect("an encoded frame decodes");
    assert_eq!(&decoded, frame, "round trip");
    let mut twice = BytesMut::new();
    decoded.encode_into(&mut twice, header.flags);
    assert_eq!(twice, encoded, "encoding is not stable");
}
