//! The per-session budget of control frames (Ping, Refresh, Join, Leave),
//! against a real node over raw sockets: a flood is closed with
//! RATE_LIMITED while the node keeps serving other sessions.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use longlink::protocol::codec::Frame;
use longlink::protocol::codes::from_wire;
use longlink::protocol::proto::{self, ErrorCode};

fn login(node: &NodeProcess, token: String) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(node.client_addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&Frame::Auth(proto::Auth { token, ..Default::default() }).to_bytes()).expect("auth");
    let mut buf = Vec::new();
    let answer = read_frame_blocking(&mut s, &mut buf);
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    (s, buf)
}

/// Sends `count` copies of `frame` in one write, then reads until the node
/// closes: how many answers came, and the close code.
fn flood(s: &mut TcpStream, buf: &mut Vec<u8>, frame: &Frame, count: usize) -> (usize, Option<ErrorCode>) {
    let one = frame.to_bytes();
    let bytes: Vec<u8> = std::iter::repeat_n(&one[..], count).flatten().copied().collect();
    // The node may close before it read everything.
    let _ = s.write_all(&bytes);
    let mut answers = 0;
    while let Some(frame) = read_frame_blocking(s, buf) {
        match frame {
            Frame::Error(e) => return (answers, Some(from_wire(e.code))),
            _ => answers += 1,
        }
        assert!(answers <= count, "more answers than frames");
    }
    (answers, None)
}

#[test]
fn a_control_frame_flood_is_closed_rate_limited_while_others_are_served() {
    let mut cfg = test_config(2);
    cfg.session.control_frames_per_sec = 10;
    cfg.session.control_frames_burst = 20;
    let node = NodeProcess::start(&cfg);
    let (mut calm, mut calm_buf) = login(&node, token(&cfg, "calm", "calm-1"));

    for (i, frame) in [
        Frame::Ping,
        Frame::Join(proto::GroupMembership { group: "room".into() }),
        Frame::Leave(proto::GroupMembership { group: "room".into() }),
        Frame::Refresh(proto::Refresh { token: token(&cfg, "noisy", "noisy-3") }),
    ]
    .iter()
    .enumerate()
    {
        let (mut noisy, mut buf) = login(&node, token(&cfg, "noisy", &format!("noisy-{i}")));
        let (answers, code) = flood(&mut noisy, &mut buf, frame, 2_000);
        assert_eq!(code, Some(ErrorCode::RateLimited), "{frame:?}: {answers} answers");
        // The burst (and what leaked meanwhile), not the flood.
        assert!(answers < 100, "{frame:?}: {answers} answers");

        // The other session is served all along.
        calm.write_all(&Frame::Ping.to_bytes()).expect("ping");
        let pong = read_frame_blocking(&mut calm, &mut calm_buf);
        assert!(matches!(pong, Some(Frame::Pong)), "{pong:?}");
    }
}
