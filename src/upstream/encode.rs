//! Encoding of upstream frames without building their protobuf structs
//! (the connection's `ConnInfo` is spliced in as bytes).

use super::*;

/// Response frame bytes for the client.
pub(super) fn response_frame(request_id: u64, o: &Outcome) -> Bytes {
    let r = proto::Response { request_id, status: o.status, body: o.body.clone(), reason: o.reason.clone() };
    codec::encode(FrameKind::Response, Flags::default(), &r)
}

// ---- hand-encoded UpstreamRequest --------------------------------------------
//
// The connection's parameters are encoded once per connection and spliced
// into every request (a nested message is a length-delimited field on the
// wire), instead of cloning eight strings per request.

pub(super) fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

pub(super) fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8(v as u8 | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// Key byte of field `tag` (< 16) with wire type 0 (varint) or 2 (bytes).
pub(super) fn key(tag: u8, wire_type: u8) -> u8 {
    tag << 3 | wire_type
}

pub(super) fn varint_field_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + varint_len(v) }
}

pub(super) fn bytes_field_len(len: usize) -> usize {
    if len == 0 { 0 } else { 1 + varint_len(len as u64) + len }
}

pub(super) fn put_varint_field(dst: &mut BytesMut, tag: u8, v: u64) {
    if v != 0 {
        dst.put_u8(key(tag, 0));
        put_varint(dst, v);
    }
}

pub(super) fn put_bytes_field(dst: &mut BytesMut, tag: u8, bytes: &[u8]) {
    if !bytes.is_empty() {
        dst.put_u8(key(tag, 2));
        put_varint(dst, bytes.len() as u64);
        dst.put_slice(bytes);
    }
}

/// One `UPSTREAM_REQUEST` frame; `conn` is an encoded `ConnInfo`.
pub(super) fn encode_upstream_request(
    id: u64,
    service: &str,
    conn: &[u8],
    client_msg_id: u64,
    body: &[u8],
    timeout_ms: u32,
) -> Bytes {
    let len = varint_field_len(id)
        + bytes_field_len(service.len())
        + bytes_field_len(conn.len())
        + varint_field_len(client_msg_id)
        + bytes_field_len(body.len())
        + varint_field_len(u64::from(timeout_ms));
    let mut dst = BytesMut::with_capacity(codec::HEADER_LEN + len);
    codec::encode_with(&mut dst, FrameKind::UpstreamRequest, Flags::default(), len, |dst| {
        put_varint_field(dst, 1, id);
        put_bytes_field(dst, 2, service.as_bytes());
        put_bytes_field(dst, 3, conn);
        put_varint_field(dst, 4, client_msg_id);
        put_bytes_field(dst, 5, body);
        put_varint_field(dst, 6, u64::from(timeout_ms));
    });
    dst.freeze()
}
