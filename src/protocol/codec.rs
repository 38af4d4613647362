//! Framing: an 8-byte header, then a protobuf body.
//!
//! ```text
//! byte 0    magic 0x4C ('L')
//! byte 1    protocol version (1)
//! byte 2    frame kind (proto `FrameKind`)
//! byte 3    flags (bit 0: retransmission; other bits reserved, sent as 0)
//! byte 4..8 body length, u32 big-endian
//! ```
//!
//! [`decode_header`] looks at a buffer and answers "a whole frame is here",
//! "need more bytes" or a [`CodecError`]. It checks the announced length
//! against the caller's limit before anything is allocated.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::proto::{self, FrameKind};

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// First header byte of every frame.
pub const MAGIC: u8 = 0x4C;
/// Protocol version in header byte 1.
pub const VERSION: u8 = 1;
/// Default limit on a frame body, in bytes (config `max_frame_bytes`).
pub const DEFAULT_MAX_BODY: u32 = 64 * 1024;

/// Header flag bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(pub u8);

impl Flags {
    /// The frame repeats one sent before (client retry or server retransmission).
    pub const RETRANSMISSION: Flags = Flags(0b0000_0001);

    pub fn is_retransmission(self) -> bool {
        self.0 & Self::RETRANSMISSION.0 != 0
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub flags: Flags,
    /// Body length in bytes, already checked against the limit.
    pub body_len: u32,
}

impl Header {
    /// Header plus body length.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len as usize
    }
}

/// Why bytes could not be read as a frame. Each maps to one error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("bad magic byte {0:#04x}: not a longlink frame")]
    BadMagic(u8),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame body of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("frame kind {0:?} must not carry a body")]
    UnexpectedBody(FrameKind),
    #[error("malformed {kind:?} body: {source}")]
    BadBody { kind: FrameKind, source: prost::DecodeError },
    #[error("frame kind {0:?} is not valid here")]
    WrongKind(FrameKind),
}

impl CodecError {
    /// The code sent to the peer before closing.
    pub fn code(&self) -> proto::ErrorCode {
        match self {
            CodecError::TooLarge { .. } => proto::ErrorCode::FrameTooLarge,
            CodecError::UnsupportedVersion(_) => proto::ErrorCode::UnsupportedVersion,
            _ => proto::ErrorCode::BadFrame,
        }
    }
}

/// Reads a header from the front of `buf`. `Ok(None)` means fewer than
/// [`HEADER_LEN`] bytes are there. The body may still be incomplete: compare
/// [`Header::frame_len`] with `buf.len()`.
pub fn decode_header(buf: &[u8], max_body: u32) -> Result<Option<Header>, CodecError> {
    let Some(raw) = buf.first_chunk::<HEADER_LEN>() else {
        // Reject garbage as early as the first byte, without waiting for 8.
        if let Some(&b) = buf.first()
            && b != MAGIC
        {
            return Err(CodecError::BadMagic(b));
        }
        return Ok(None);
    };
    if raw[0] != MAGIC {
        return Err(CodecError::BadMagic(raw[0]));
    }
    if raw[1] != VERSION {
        return Err(CodecError::UnsupportedVersion(raw[1]));
    }
    let kind = match FrameKind::try_from(i32::from(raw[2])) {
        Ok(FrameKind::Unspecified) | Err(_) => return Err(CodecError::UnknownKind(raw[2])),
        Ok(kind) => kind,
    };
    let body_len = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    if body_len > max_body {
        return Err(CodecError::TooLarge { len: body_len, max: max_body });
    }
    Ok(Some(Header { kind, flags: Flags(raw[3]), body_len }))
}

/// Splits the first whole frame off `buf`: `Ok(None)` means "need more".
pub fn split_frame(buf: &[u8], max_body: u32) -> Result<Option<(Header, &[u8])>, CodecError> {
    match decode_header(buf, max_body)? {
        Some(h) if buf.len() >= h.frame_len() => Some((h, &buf[HEADER_LEN..h.frame_len()])),
        _ => None,
    }
    .map_or(Ok(None), |f| Ok(Some(f)))
}

fn put_header(dst: &mut impl BufMut, kind: FrameKind, flags: Flags, body_len: usize) {
    // Bodies are produced by this process and are far below 4 GiB; a body
    // that large would be a bug, not input.
    let len = u32::try_from(body_len).expect("frame body below 4 GiB");
    dst.put_slice(&[MAGIC, VERSION, kind as u8, flags.0]);
    dst.put_u32(len);
}

/// Appends one frame to `dst`.
pub fn encode_into<M: prost::Message>(dst: &mut BytesMut, kind: FrameKind, flags: Flags, body: &M) {
    let len = body.encoded_len();
    dst.reserve(HEADER_LEN + len);
    put_header(dst, kind, flags, len);
    body.encode_raw(dst);
}

/// Appends one frame whose body `write` puts into `dst` by hand; it must
/// write exactly `body_len` bytes (hot paths that splice pre-encoded parts).
pub fn encode_with(
    dst: &mut BytesMut,
    kind: FrameKind,
    flags: Flags,
    body_len: usize,
    write: impl FnOnce(&mut BytesMut),
) {
    dst.reserve(HEADER_LEN + body_len);
    put_header(dst, kind, flags, body_len);
    let start = dst.len();
    write(dst);
    // A mismatch would desynchronise the peer's framing: a bug, not input.
    assert_eq!(dst.len() - start, body_len, "hand-encoded {kind:?} body length");
}

/// Encodes one frame into its own buffer, ready to be shared by many writers.
pub fn encode<M: prost::Message>(kind: FrameKind, flags: Flags, body: &M) -> Bytes {
    let mut dst = BytesMut::with_capacity(HEADER_LEN + body.encoded_len());
    encode_into(&mut dst, kind, flags, body);
    dst.freeze()
}

/// A header-only frame (Ping, Pong).
pub fn encode_empty(kind: FrameKind, flags: Flags) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    put_header(&mut &mut out[..], kind, flags, 0);
    out
}

/// Declares [`Frame`]: one variant per frame kind with a protobuf body,
/// plus the header-only kinds, and the decode/encode/kind tables for them.
macro_rules! frames {
    (
        bodies { $($kind:ident($body:ty)),* $(,)? }
        empty { $($ekind:ident),* $(,)? }
    ) => {
        /// A decoded frame. Kinds without a body are unit variants.
        #[derive(Clone, Debug, PartialEq)]
        pub enum Frame {
            $($kind($body),)*
            $($ekind,)*
        }

        impl Frame {
            pub fn kind(&self) -> FrameKind {
                match self {
                    $(Frame::$kind(_) => FrameKind::$kind,)*
                    $(Frame::$ekind => FrameKind::$ekind,)*
                }
            }

            /// Decodes the body that follows `header`.
            pub fn decode(header: Header, body: &[u8]) -> Result<Frame, CodecError> {
                let kind = header.kind;
                match kind {
                    $(FrameKind::$kind => <$body as prost::Message>::decode(body)
                        .map(Frame::$kind)
                        .map_err(|source| CodecError::BadBody { kind, source }),)*
                    $(FrameKind::$ekind if body.is_empty() => Ok(Frame::$ekind),)*
                    $(FrameKind::$ekind => Err(CodecError::UnexpectedBody(kind)),)*
                    other => Err(CodecError::WrongKind(other)),
                }
            }

            /// Appends this frame, header and body, to `dst`.
            pub fn encode_into(&self, dst: &mut BytesMut, flags: Flags) {
                match self {
                    $(Frame::$kind(m) => encode_into(dst, FrameKind::$kind, flags, m),)*
                    $(Frame::$ekind => dst.put_slice(&encode_empty(FrameKind::$ekind, flags)),)*
                }
            }
        }
    };
}

frames! {
    bodies {
        Auth(proto::Auth),
        AuthOk(proto::AuthOk),
        Error(proto::Error),
        Kicked(proto::Kicked),
        Message(proto::Message),
        Ack(proto::Ack),
        ResyncRequired(proto::ResyncRequired),
        Join(proto::GroupMembership),
        Leave(proto::GroupMembership),
        GoAway(proto::GoAway),
        GroupResult(proto::GroupResult),
        Refresh(proto::Refresh),
        RefreshOk(proto::RefreshOk),
        PushChallenge(proto::PushChallenge),
        PushAuth(proto::PushAuth),
        PushAuthOk(proto::PushAuthOk),
        PushRequest(proto::PushRequest),
        PushReply(proto::PushReply),
        GroupUpdate(proto::GroupUpdate),
        KickRequest(proto::KickRequest),
        PresenceQuery(proto::PresenceQuery),
        PresenceReply(proto::PresenceReply),
        AdminReply(proto::AdminReply),
        RequestError(proto::RequestError),
        DeliveryStatusQuery(proto::DeliveryStatusQuery),
        DeliveryStatusReply(proto::DeliveryStatusReply),
        Request(proto::Request),
        Response(proto::Response),
        UpstreamRequest(proto::UpstreamRequest),
        UpstreamResponse(proto::UpstreamResponse),
        ConnectionEvents(proto::ConnectionEvents),
        EventsAck(proto::EventsAck),
    }
    empty { Ping, Pong }
}

/// The side a frame comes from, where the node decodes untrusted input.
/// Each side sends only some kinds (proto/longlink.proto).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A client on the client port.
    Client,
    /// A backend (or another node) on the push port.
    Backend,
}

impl Peer {
    /// Whether this side may send `kind`.
    pub fn sends(self, kind: FrameKind) -> bool {
        use FrameKind as K;
        match self {
            Peer::Client => {
                matches!(kind, K::Auth | K::Error | K::Ping | K::Ack | K::Request | K::Join | K::Leave | K::Refresh)
            }
            Peer::Backend => matches!(
                kind,
                K::PushAuth
                    | K::PushRequest
                    | K::GroupUpdate
                    | K::KickRequest
                    | K::PresenceQuery
                    | K::DeliveryStatusQuery
            ),
        }
    }
}

impl Frame {
    /// [`Frame::decode`] for input from `peer`: a kind it never sends is
    /// refused from the header, before its body is decoded. Decoding costs
    /// up to ~100 times a body's size in bodies of repeated messages (a
    /// 64 KiB `ConnectionEvents` body of empty events takes 6 MiB), which
    /// the kinds a peer sends do not have.
    pub fn decode_from(peer: Peer, header: Header, body: &[u8]) -> Result<Frame, CodecError> {
        if !peer.sends(header.kind) {
            return Err(CodecError::WrongKind(header.kind));
        }
        Frame::decode(header, body)
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut dst = BytesMut::new();
        self.encode_into(&mut dst, Flags::default());
        dst.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Auth(proto::Auth {
                token: "t.k".into(),
                device: "d1".into(),
                platform: "android".into(),
                client_version: "1.2.3".into(),
                capabilities: 1,
                last_seq: 42,
                heartbeat_ms: 30_000,
                store_incarnation: 9,
            }),
            Frame::AuthOk(proto::AuthOk {
                conn_id: 7,
                heartbeat_min_ms: 1,
                heartbeat_max_ms: 2,
                heartbeat_ms: 3,
                idle_timeout_ms: 4,
                server_time_ms: 5,
                shard: 1,
                node: "n".into(),
                store_incarnation: 9,
                token_expires_ms: 10,
            }),
            Frame::Error(proto::Error {
                code: proto::ErrorCode::BadFrame as i32,
                reason: "x".into(),
                reconnect: false,
            }),
            Frame::Ping,
            Frame::Pong,
            Frame::Kicked(proto::Kicked { code: proto::ErrorCode::Replaced as i32, reason: "r".into() }),
            Frame::GoAway(proto::GoAway { endpoint: "127.0.0.1:1".into(), reason: "drain".into() }),
            Frame::Refresh(proto::Refresh { token: "t".into() }),
            Frame::RefreshOk(proto::RefreshOk { token_expires_ms: 11 }),
            Frame::Message(proto::Message {
                payload: Bytes::from_static(b"hello"),
                service_id: "chat".into(),
                message_id: 1,
                seq: 0,
            }),
            Frame::Ack(proto::Ack { seq: 1_800_000_000_000_042 }),
            Frame::ResyncRequired(proto::ResyncRequired { from_seq: 3, to_seq: 9 }),
            Frame::Join(proto::GroupMembership { group: "g".into() }),
            Frame::Leave(proto::GroupMembership { group: "g".into() }),
            Frame::GroupResult(proto::GroupResult {
                group: "g".into(),
                join: true,
                code: proto::ErrorCode::PermissionDenied as i32,
                reason: "no".into(),
            }),
            Frame::PushChallenge(proto::PushChallenge { nonce: Bytes::from_static(&[7; 32]) }),
            Frame::PushAuth(proto::PushAuth { key_id: "k".into(), mac: Bytes::from_static(&[9; 32]) }),
            Frame::PushAuthOk(proto::PushAuthOk { rights: vec!["push".into()], service_ids: vec!["chat".into()] }),
            Frame::PushRequest(proto::PushRequest {
                request_id: 1,
                targets: Some(proto::Targets { devices: vec!["d".into()], ..Default::default() }),
                payload: Bytes::from_static(b"p"),
                service_id: "s".into(),
                ttl_ms: 5,
                qos: proto::Qos::AtLeastOnce as i32,
                forwarded: true,
            }),
            Frame::PushReply(proto::PushReply {
                request_id: 1,
                delivered: 2,
                message_id: 77,
                stored: 1,
                results: vec![proto::TargetResult {
                    target: "u".into(),
                    status: proto::PushStatus::Stored as i32,
                    copies: vec![proto::StoredCopy { device: "d".into(), seq: 5, message_id: 77 }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            Frame::GroupUpdate(proto::GroupUpdate { request_id: 1, group: "g".into(), ..Default::default() }),
            Frame::KickRequest(proto::KickRequest { request_id: 1, devices: vec!["d".into()], ..Default::default() }),
            Frame::PresenceQuery(proto::PresenceQuery { request_id: 1, ..Default::default() }),
            Frame::PresenceReply(proto::PresenceReply { request_id: 1, connections_total: 3, ..Default::default() }),
            Frame::AdminReply(proto::AdminReply { request_id: 1, ..Default::default() }),
            Frame::RequestError(proto::RequestError { request_id: 1, code: 2000, reason: "x".into() }),
            Frame::DeliveryStatusQuery(proto::DeliveryStatusQuery { request_id: 2, message_ids: vec![7, 8] }),
            Frame::DeliveryStatusReply(proto::DeliveryStatusReply {
                request_id: 2,
                statuses: vec![proto::MessageStatus {
                    message_id: 7,
                    state: proto::DeliveryState::Acked as i32,
                    device: "d".into(),
                    seq: 5,
                    stored_at_ms: 1,
                    sent_at_ms: 2,
                    acked_at_ms: 3,
                    reason: String::new(),
                }],
            }),
            Frame::Request(proto::Request {
                service_id: "chat".into(),
                request_id: 3,
                client_msg_id: 77,
                body: Bytes::from_static(b"q"),
            }),
            Frame::Response(proto::Response {
                request_id: 3,
                status: proto::ErrorCode::Busy as i32,
                body: Bytes::from_static(b"a"),
                reason: "r".into(),
            }),
            Frame::UpstreamRequest(proto::UpstreamRequest {
                id: 9,
                service_id: "chat".into(),
                conn: Some(conn_info()),
                client_msg_id: 77,
                body: Bytes::from_static(b"q"),
                timeout_ms: 5000,
            }),
            Frame::UpstreamResponse(proto::UpstreamResponse {
                id: 9,
                status: 0,
                body: Bytes::from_static(b"a"),
                reason: String::new(),
            }),
            Frame::ConnectionEvents(proto::ConnectionEvents {
                batch_id: 4,
                service_id: "chat".into(),
                events: vec![proto::ConnectionEvent {
                    kind: proto::ConnectionEventKind::Online as i32,
                    conn: Some(conn_info()),
                    at_ms: 1,
                    code: 0,
                }],
            }),
            Frame::EventsAck(proto::EventsAck { batch_id: 4 }),
        ]
    }

    fn conn_info() -> proto::ConnInfo {
        proto::ConnInfo {
            user: "u".into(),
            device: "d".into(),
            app: "a".into(),
            platform: "ios".into(),
            client_version: "1".into(),
            conn_id: 5,
            node: "n".into(),
            client_addr: "127.0.0.1:5".into(),
        }
    }

    #[test]
    fn every_frame_kind_round_trips() {
        for frame in all_frames() {
            let bytes = frame.to_bytes();
            let (header, body) = split_frame(&bytes, DEFAULT_MAX_BODY).unwrap().unwrap();
            assert_eq!(header.frame_len(), bytes.len());
            assert_eq!(Frame::decode(header, body).unwrap(), frame);
        }
    }

    #[test]
    fn every_kind_with_a_body_or_none_is_covered() {
        let kinds: std::collections::HashSet<_> = all_frames().iter().map(Frame::kind).collect();
        for n in 1..=u8::MAX {
            if let Ok(kind) = FrameKind::try_from(i32::from(n)) {
                let h = Header { kind, flags: Flags::default(), body_len: 0 };
                if Frame::decode(h, &[]).is_ok() {
                    assert!(kinds.contains(&kind), "{kind:?} decodes but is not round-tripped");
                }
            }
        }
    }

    #[test]
    fn incomplete_input_needs_more() {
        let bytes = all_frames()[0].to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(split_frame(&bytes[..cut], DEFAULT_MAX_BODY), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn ping_is_header_only() {
        let bytes = Frame::Ping.to_bytes();
        assert_eq!(&bytes[..], &[MAGIC, VERSION, FrameKind::Ping as u8, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn four_gib_header_is_rejected_from_the_header_alone() {
        let header = [MAGIC, VERSION, FrameKind::Auth as u8, 0, 0xff, 0xff, 0xff, 0xff];
        let err = split_frame(&header, DEFAULT_MAX_BODY).unwrap_err();
        assert_eq!(err, CodecError::TooLarge { len: u32::MAX, max: DEFAULT_MAX_BODY });
        assert_eq!(err.code(), proto::ErrorCode::FrameTooLarge);
    }

    #[test]
    fn bad_magic_version_kind_and_body() {
        assert_eq!(split_frame(b"GET / HTTP/1.1", 10), Err(CodecError::BadMagic(b'G')));
        assert_eq!(split_frame(b"G", 10), Err(CodecError::BadMagic(b'G')));
        assert_eq!(split_frame(&[MAGIC, 9, 4, 0, 0, 0, 0, 0], 10), Err(CodecError::UnsupportedVersion(9)));
        assert_eq!(split_frame(&[MAGIC, 1, 200, 0, 0, 0, 0, 0], 10), Err(CodecError::UnknownKind(200)));
        let ping_with_body = [MAGIC, 1, FrameKind::Ping as u8, 0, 0, 0, 0, 1, 0];
        let (h, body) = split_frame(&ping_with_body, 10).unwrap().unwrap();
        assert_eq!(Frame::decode(h, body), Err(CodecError::UnexpectedBody(FrameKind::Ping)));
    }

    #[test]
    fn random_garbage_never_panics() {
        // xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = Vec::new();
        for round in 0..20_000 {
            buf.clear();
            let len = (next() % 64) as usize;
            buf.extend((0..len).map(|_| next() as u8));
            // Half the rounds start with a valid magic/version so the body
            // decoders see garbage too.
            if round % 2 == 0 && buf.len() >= 3 {
                buf[0] = MAGIC;
                buf[1] = VERSION;
                buf[2] %= 16;
            }
            let mut rest = &buf[..];
            while let Ok(Some((h, body))) = split_frame(rest, 1024) {
                let _ = Frame::decode(h, body);
                rest = &rest[h.frame_len()..];
            }
        }
    }

    #[test]
    fn peers_kinds_are_refused_before_their_body_is_decoded() {
        for n in 1..=u8::MAX {
            let Ok(kind) = FrameKind::try_from(i32::from(n)) else { continue };
            // A body that does not decode as anything.
            let h = Header { kind, flags: Flags::default(), body_len: 1 };
            for peer in [Peer::Client, Peer::Backend] {
                match Frame::decode_from(peer, h, &[0xff]) {
                    Err(CodecError::WrongKind(k)) => assert!(k == kind && !peer.sends(kind)),
                    other => assert!(peer.sends(kind), "{peer:?} {kind:?}: {other:?}"),
                }
            }
        }
        assert!(Peer::Client.sends(FrameKind::Auth) && !Peer::Client.sends(FrameKind::ConnectionEvents));
        assert!(Peer::Backend.sends(FrameKind::PushRequest) && !Peer::Backend.sends(FrameKind::PresenceReply));
    }

    #[test]
    fn retransmission_flag_survives() {
        let mut dst = BytesMut::new();
        Frame::Ping.encode_into(&mut dst, Flags::RETRANSMISSION);
        let h = decode_header(&dst, 0).unwrap().unwrap();
        assert!(h.flags.is_retransmission());
    }
}
