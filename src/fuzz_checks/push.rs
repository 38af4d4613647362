//! The push port's request handling before any part of a request leaves
//! the shard: framing at `push.max_request_bytes`, decoding, and the
//! checks that answer a bad request at once ([`crate::push`]).
//!
//! Input: a byte for the request limit, one for `max_targets_per_request`,
//! two for a shard count, then the backend's byte stream. Invariants:
//! - decoding what a backend may send allocates at most a small multiple
//!   of the frame (repeated ids: a `String` per id);
//! - a refused request is answered with its own `request_id`, a code and a
//!   reason of bounded size, whatever it carried;
//! - an accepted push names exactly one kind of target, within the limit,
//!   with a known QoS that suits the target; accepted group updates name
//!   a usable group; invalid target ids are REJECTED one by one, valid
//!   ones map to a shard that exists.

use super::Input;
use super::alloc::measure;
use crate::protocol::codec::{self, CodecError, Frame, Header, Peer};
use crate::protocol::ids::home_shard;
use crate::protocol::ids::owner_shard;
use crate::protocol::limits::MAX_ID_BYTES;
use crate::protocol::proto::{self, ErrorCode, PushStatus};
use crate::push::{check_group_update, check_push, target_results};

/// Decoding a backend's request may cost this many bytes per byte: each
/// id of two bytes on the wire (tag, length) becomes a 24-byte `String`,
/// in a `Vec` that may have twice the room it needs.
const ALLOC_FACTOR: usize = 32;
const ALLOC_SLACK: usize = 1024;
/// Largest encoded `RequestError` answer.
const MAX_ERROR_BYTES: usize = 512;

pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let max_request = [1024, 64 * 1024][usize::from(input.u8() % 2)];
    let max_targets = [1, 4, 1000][usize::from(input.u8() % 3)];
    let shards = input.u16().max(1);
    let mut rest = input.rest();
    while let Ok(Some((header, body))) = codec::split_frame(rest, max_request) {
        rest = &rest[header.frame_len()..];
        let (frame, usage) = measure(|| decode_from_backend(header, body));
        if let Some(usage) = usage {
            let bound = ALLOC_FACTOR * body.len() + ALLOC_SLACK;
            assert!(
                usage.peak <= bound,
                "decoding a {:?} request of {} bytes allocated {usage:?} (bound {bound})",
                header.kind,
                body.len()
            );
        }
        match frame {
            Ok(Frame::PushRequest(req)) => check_push_request(&req, max_targets, shards),
            Ok(Frame::GroupUpdate(req)) => {
                let checked = check_group_update(&req, max_targets);
                check_answer(req.request_id, &checked);
                if checked.is_ok() {
                    assert!(!req.group.is_empty() && req.group.len() <= MAX_ID_BYTES);
                    assert!(req.add_devices.len() + req.remove_devices.len() <= max_targets);
                    check_targets(&[req.add_devices, req.remove_devices].concat(), shards);
                }
            }
            Ok(_) | Err(_) => {}
        }
    }
}

/// What the push port does with a backend's frame (`Shard::poll_backend`).
fn decode_from_backend(header: Header, body: &[u8]) -> Result<Frame, CodecError> {
    Frame::decode_from(Peer::Backend, header, body)
}

fn check_push_request(req: &proto::PushRequest, max_targets: usize, shards: u16) {
    let targets = req.targets.clone().unwrap_or_default();
    let checked = check_push(req.request_id, &targets, req.qos, max_targets);
    check_answer(req.request_id, &checked);
    let Ok(reliable) = checked else { return };
    let kinds = [!targets.devices.is_empty(), !targets.users.is_empty(), !targets.group.is_empty(), targets.broadcast];
    assert_eq!(kinds.iter().filter(|&&k| k).count(), 1, "{targets:?}");
    assert!(targets.devices.len() + targets.users.len() <= max_targets);
    assert_eq!(reliable, req.qos == proto::Qos::AtLeastOnce as i32);
    assert!(reliable || req.qos == proto::Qos::AtMostOnce as i32);
    if reliable {
        assert!(targets.group.is_empty() && !targets.broadcast);
    }
    if !targets.group.is_empty() {
        assert!(targets.group.len() <= MAX_ID_BYTES);
    }
    check_targets(&targets.devices, shards);
    for user in &targets.users {
        assert!(home_shard(user, shards).0 < shards);
    }
}

/// Per-target results: one per id, in order, REJECTED exactly when the id
/// is empty, too long or not printable; every other id has an owner shard.
fn check_targets(ids: &[String], shards: u16) {
    let results = target_results(ids.iter());
    assert_eq!(results.len(), ids.len());
    for (id, r) in ids.iter().zip(&results) {
        assert_eq!(&r.target, id);
        let valid = !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control);
        assert_eq!(r.status == PushStatus::Rejected as i32, !valid, "{r:?}");
        if valid {
            assert!(owner_shard(id, shards).0 < shards);
        } else {
            assert!(!r.reason.is_empty());
        }
    }
}

/// A refusal names the request and stays small.
fn check_answer<T>(request_id: u64, checked: &Result<T, proto::RequestError>) {
    let Err(err) = checked else { return };
    assert_eq!(err.request_id, request_id);
    assert!([ErrorCode::BadFrame, ErrorCode::LimitExceeded].iter().any(|c| *c as i32 == err.code), "code {}", err.code);
    assert!(!err.reason.is_empty());
    let answer = Frame::RequestError(err.clone()).to_bytes();
    assert!(answer.len() <= MAX_ERROR_BYTES, "an answer of {} bytes", answer.len());
}
