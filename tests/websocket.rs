//! WebSocket transport end to end: a raw RFC 6455 client written here (no
//! browser, no WebSocket library) against a real node, pushes sent with the
//! `longlink` CLI.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use longlink::config::Config;
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::proto;

/// Bound on every wait (never an assertion on timing).
const WAIT: Duration = Duration::from_secs(20);
/// The RFC 6455 1.3 sample key and its accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const OP_CONT: u8 = 0x0;
const OP_BINARY: u8 = 0x2;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A WebSocket client over a blocking socket.
struct Ws {
    s: TcpStream,
    /// Bytes read but not yet taken (WebSocket level).
    buf: Vec<u8>,
    /// Longlink bytes of binary messages not yet decoded.
    frames: Vec<u8>,
}

/// The server's answer to an upgrade request.
struct Answer {
    status: u16,
    head: String,
    ws: Ws,
}

fn upgrade(addr: SocketAddr, target: &str, protocols: &str, origin: Option<&str>) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if !protocols.is_empty() {
        req.push_str(&format!("Sec-WebSocket-Protocol: {protocols}\r\n"));
    }
    if let Some(origin) = origin {
        req.push_str(&format!("Origin: {origin}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_answer(s)
}

fn read_answer(mut s: TcpStream) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = s.read(&mut chunk).expect("read the answer");
        assert!(n > 0, "closed before an HTTP answer: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status code");
    Answer { status, head, ws: Ws { s, buf: buf[end..].to_vec(), frames: Vec::new() } }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Upgrades and checks the 101.
fn open(addr: SocketAddr, target: &str, protocols: &str) -> Ws {
    let a = upgrade(addr, target, protocols, None);
    assert_eq!(a.status, 101, "{}", a.head);
    assert_eq!(header(&a.head, "sec-websocket-accept"), Some(ACCEPT));
    assert_eq!(header(&a.head, "sec-websocket-protocol"), Some("longlink.v1"), "only the subprotocol, never a token");
    a.ws
}

impl Ws {
    fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xffff => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        self.s.write_all(&out).unwrap();
    }

    fn send_binary(&mut self, payload: &[u8]) {
        self.send_frame(true, OP_BINARY, payload, true);
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.s.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next WebSocket frame from the server: (fin, opcode, payload);
    /// `None` once the socket is closed.
    fn next_ws(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are never masked");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let fin = self.buf[0] & 0x80 != 0;
                    let op = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((fin, op, payload));
                }
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// The next longlink frame; answers nothing, panics on a close.
    fn recv(&mut self) -> Frame {
        loop {
            if let Ok(Some((h, body))) = codec::split_frame(&self.frames, codec::DEFAULT_MAX_BODY) {
                let frame = Frame::decode(h, body).expect("server frame");
                self.frames.drain(..h.frame_len());
                return frame;
            }
            match self.next_ws() {
                Some((_, OP_BINARY | OP_CONT, payload)) => self.frames.extend_from_slice(&payload),
                Some((_, OP_PONG, _)) => {}
                other => panic!("expected a binary message, got {other:?}"),
            }
        }
    }

    /// Reads until the server's Close frame: (status, reason), with the
    /// longlink frames that came before it.
    fn until_close(&mut self) -> (u16, String, Vec<Frame>) {
        let mut frames = Vec::new();
        loop {
            match self.next_ws() {
                Some((_, OP_BINARY | OP_CONT, payload)) => {
                    self.frames.extend_from_slice(&payload);
                    frames.extend(decode_all(&self.frames));
                    self.frames.clear();
                }
                Some((_, OP_CLOSE, payload)) => {
                    assert!(payload.len() >= 2, "close with a status");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (code, String::from_utf8(payload[2..].to_vec()).expect("UTF-8 reason"), frames);
                }
                Some(_) => {}
                None => panic!("closed without a Close frame; frames {frames:?}"),
            }
        }
    }

    /// Whether the server closed the TCP connection (EOF).
    fn closed(&mut self) -> bool {
        while self.fill() {}
        true
    }
}

fn auth(token: &str) -> Vec<u8> {
    Frame::Auth(proto::Auth {
        token: token.to_owned(),
        heartbeat_ms: 20_000,
        client_version: "ws-test".into(),
        ..Default::default()
    })
    .to_bytes()
    .to_vec()
}

fn expect_auth_ok(ws: &mut Ws) {
    match ws.recv() {
        Frame::AuthOk(_) => {}
        other => panic!("expected AuthOk, got {other:?}"),
    }
}

fn ws_addr(server: &longlink::server::Server) -> SocketAddr {
    server.links().ws.expect("ws_listen is on")
}

/// Runs the `longlink` CLI with `args`; returns its stdout.
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run longlink");
    assert!(out.status.success(), "longlink {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn expect_message(ws: &mut Ws, payload: &[u8]) {
    loop {
        match ws.recv() {
            Frame::Message(m) => {
                assert_eq!(&m.payload[..], payload);
                return;
            }
            Frame::Pong => {}
            other => panic!("expected a Message, got {other:?}"),
        }
    }
}

fn config(shards: u16) -> Config {
    test_config(shards)
}

#[test]
fn token_in_the_query_authenticates_and_a_cli_push_arrives() {
    let cfg = config(1);
    let server = start(&cfg);
    let tok = token(&cfg, "u1", "web-1");
    let mut ws = open(ws_addr(&server), &format!("/v1/ws?token={tok}"), "longlink.v1");
    // An Auth frame without a token takes the one of the handshake.
    ws.send_binary(&auth(""));
    expect_auth_ok(&mut ws);
    let push = server.push_addr().to_string();
    cli(&["push", "--server", &push, "--device", "web-1", "hello over ws"]);
    expect_message(&mut ws, b"hello over ws");
    server.shutdown();
}

#[test]
fn token_in_a_subprotocol_entry_or_in_the_auth_frame() {
    let cfg = config(1);
    let server = start(&cfg);
    let addr = ws_addr(&server);
    let tok = token(&cfg, "u1", "web-2");
    let mut ws = open(addr, "/v1/ws", &format!("longlink.v1, longlink.token.{tok}"));
    ws.send_binary(&auth(""));
    expect_auth_ok(&mut ws);

    let tok = token(&cfg, "u1", "web-3");
    let mut ws = open(addr, "/v1/ws", "longlink.v1");
    ws.send_binary(&auth(&tok));
    expect_auth_ok(&mut ws);

    // A bad handshake token is refused like a bad Auth token: the Error
    // frame, then a Close whose status and reason carry INVALID_TOKEN.
    let mut ws = open(addr, "/v1/ws?token=not-a-token", "longlink.v1");
    ws.send_binary(&auth(""));
    let (code, reason, frames) = ws.until_close();
    assert_eq!(close_code(&frames), Some(proto::ErrorCode::InvalidToken));
    assert_eq!((code, reason.as_str()), (4502, "2002 INVALID_TOKEN"));

    // No subprotocol offered: refused at the upgrade.
    let a = upgrade(addr, "/v1/ws", "", None);
    assert_eq!(a.status, 400, "{}", a.head);
    server.shutdown();
}

#[test]
fn unmasked_client_frame_is_closed_with_1002() {
    let cfg = config(1);
    let server = start(&cfg);
    let mut ws = open(ws_addr(&server), "/v1/ws", "longlink.v1");
    ws.send_frame(true, OP_BINARY, &auth(&token(&cfg, "u", "d")), false);
    let (code, _, frames) = ws.until_close();
    assert_eq!(code, 1002);
    assert!(frames.is_empty(), "nothing was taken from an unmasked frame: {frames:?}");
    assert!(ws.closed());
    server.shutdown();
}

#[test]
fn message_over_max_frame_bytes_is_closed_with_1009_and_text_with_1003() {
    let mut cfg = config(1);
    cfg.server.max_frame_bytes = 1024;
    let server = start(&cfg);
    let addr = ws_addr(&server);
    let mut ws = open(addr, "/v1/ws", "longlink.v1");
    // One longlink frame of the largest body with its header fits...
    // ...one byte more does not, and is refused from the header alone.
    ws.send_frame(true, OP_BINARY, &vec![0u8; 1024 + 8 + 1], true);
    let (code, _, _) = ws.until_close();
    assert_eq!(code, 1009);

    // Across fragments too.
    let mut ws = open(addr, "/v1/ws", "longlink.v1");
    // A longlink header announcing the largest body, so the framing waits
    // for the rest while the message grows past its bound.
    let mut first = vec![codec::MAGIC, codec::VERSION, proto::FrameKind::Auth as u8, 0];
    first.extend_from_slice(&1024u32.to_be_bytes());
    first.resize(1000, 0);
    ws.send_frame(false, OP_BINARY, &first, true);
    ws.send_frame(true, OP_CONT, &[0u8; 100], true);
    let (code, _, _) = ws.until_close();
    assert_eq!(code, 1009);

    let mut ws = open(addr, "/v1/ws", "longlink.v1");
    ws.send_frame(true, OP_TEXT, b"hi", true);
    let (code, _, _) = ws.until_close();
    assert_eq!(code, 1003);
    server.shutdown();
}

#[test]
fn fragmented_message_is_reassembled_and_pings_are_answered() {
    let cfg = config(1);
    let server = start(&cfg);
    let mut ws = open(ws_addr(&server), "/v1/ws", "longlink.v1");
    let mut bytes = auth(&token(&cfg, "u", "frag-1"));
    bytes.extend_from_slice(&Frame::Ping.to_bytes());
    let (a, rest) = bytes.split_at(3);
    let (b, c) = rest.split_at(rest.len() / 2);
    ws.send_frame(false, OP_BINARY, a, true);
    // A control frame between fragments is allowed (RFC 6455 5.4).
    ws.send_frame(true, OP_PING, b"are you there", true);
    ws.send_frame(false, OP_CONT, b, true);
    ws.send_frame(true, OP_CONT, c, true);
    let mut saw = (false, false, false);
    while !(saw.0 && saw.1 && saw.2) {
        match ws.next_ws().expect("open") {
            (true, OP_PONG, payload) => {
                assert_eq!(payload, b"are you there");
                saw.0 = true;
            }
            (_, OP_BINARY, payload) => {
                ws.frames.extend_from_slice(&payload);
                for f in decode_all(&ws.frames) {
                    match f {
                        Frame::AuthOk(_) => saw.1 = true,
                        Frame::Pong => saw.2 = true,
                        other => panic!("unexpected {other:?}"),
                    }
                }
                ws.frames.clear();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A Close from the client is echoed.
    ws.send_frame(true, OP_CLOSE, &1000u16.to_be_bytes(), true);
    let (code, _, _) = ws.until_close();
    assert_eq!(code, 1000);
    assert!(ws.closed());
    server.shutdown();
}

#[test]
fn kick_closes_with_the_longlink_code_in_status_and_reason() {
    let cfg = config(1);
    let server = start(&cfg);
    let mut ws = open(ws_addr(&server), "/v1/ws", "longlink.v1");
    ws.send_binary(&auth(&token(&cfg, "u", "kick-1")));
    expect_auth_ok(&mut ws);
    let push = server.push_addr().to_string();
    cli(&["kick", "--server", &push, "--device", "kick-1", "--code", "REPLACED"]);
    let (code, reason, frames) = ws.until_close();
    assert_eq!(close_code(&frames), Some(proto::ErrorCode::Replaced), "the Kicked frame comes first");
    assert_eq!((code, reason.as_str()), (4503, "2003 REPLACED"));
    assert!(ws.closed());
    server.shutdown();
}

#[test]
fn origin_outside_the_allow_list_is_refused() {
    let mut cfg = config(1);
    cfg.ws.allowed_origins = vec!["https://app.example.com".into()];
    let server = start(&cfg);
    let addr = ws_addr(&server);
    let a = upgrade(addr, "/v1/ws", "longlink.v1", Some("https://evil.example.com"));
    assert_eq!(a.status, 403, "{}", a.head);
    let a = upgrade(addr, "/v1/ws", "longlink.v1", None);
    assert_eq!(a.status, 403, "no Origin is not a pass: {}", a.head);
    let a = upgrade(addr, "/v1/ws", "longlink.v1", Some("https://app.example.com"));
    assert_eq!(a.status, 101, "{}", a.head);
    let a = upgrade(addr, "/elsewhere", "longlink.v1", Some("https://app.example.com"));
    assert_eq!(a.status, 404, "{}", a.head);
    server.shutdown();
}

#[test]
fn slow_or_oversized_handshake_is_closed() {
    let cfg = config(1);
    let server = start(&cfg);
    let addr = ws_addr(&server);
    // Half a head, then nothing: the auth deadline (600 ms here) ends it.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    let a = read_answer(s);
    assert_eq!(a.status, 408, "{}", a.head);
    let mut ws = a.ws;
    assert!(ws.closed());
    assert!(started.elapsed() < WAIT);

    // A head over ws.max_head_bytes (8 KiB): 431.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut head = b"GET /v1/ws HTTP/1.1\r\nX-Pad: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 9000));
    let _ = s.write_all(&head);
    let a = read_answer(s);
    assert_eq!(a.status, 431, "{}", a.head);
    server.shutdown();
}

/// A plain TCP client: Auth, then frames.
struct Tcp {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Tcp {
    fn connect(addr: SocketAddr, token: &str) -> Tcp {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(&auth(token)).unwrap();
        let mut t = Tcp { s, buf: Vec::new() };
        assert!(matches!(t.recv(), Frame::AuthOk(_)));
        t
    }

    fn recv(&mut self) -> Frame {
        loop {
            if let Ok(Some((h, body))) = codec::split_frame(&self.buf, codec::DEFAULT_MAX_BODY) {
                let f = Frame::decode(h, body).unwrap();
                self.buf.drain(..h.frame_len());
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = self.s.read(&mut chunk).expect("read");
            assert!(n > 0, "closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[test]
fn group_push_reaches_tcp_and_websocket_members_on_every_shard() {
    // Four shards: devices are owned by different shards, so most of these
    // WebSocket sessions are handed off to their owner after Auth.
    let cfg = config(4);
    let server = start(&cfg);
    let addr = ws_addr(&server);
    let push = server.push_addr().to_string();
    let mut members = Vec::new();
    let mut devices = Vec::new();
    for i in 0..8 {
        let device = format!("ws-dev-{i}");
        let mut ws = open(addr, "/v1/ws", "longlink.v1");
        // Auth and a Ping in one message: the Ping rides along in the
        // hand-off's leftovers.
        let mut bytes = auth(&token(&cfg, "u-ws", &device));
        bytes.extend_from_slice(&Frame::Ping.to_bytes());
        ws.send_binary(&bytes);
        expect_auth_ok(&mut ws);
        assert!(matches!(ws.recv(), Frame::Pong));
        members.push(ws);
        devices.push(device);
    }
    let handed: u64 = server.counters().iter().map(|c| c.handed_off.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(handed > 0, "some sessions moved to their owner shard");
    let mut tcp = Tcp::connect(server.client_addr(), &token(&cfg, "u-tcp", "tcp-dev"));
    devices.push("tcp-dev".into());
    cli(&["group", "join", "--server", &push, "--group", "room", &devices.join(",")]);
    cli(&["push", "--server", &push, "--group", "room", "to the room"]);
    for ws in &mut members {
        expect_message(ws, b"to the room");
    }
    match tcp.recv() {
        Frame::Message(m) => assert_eq!(&m.payload[..], b"to the room"),
        other => panic!("expected the group message over TCP, got {other:?}"),
    }
    // Unicast to each handed-off session, through its owner shard.
    for (ws, device) in members.iter_mut().zip(&devices) {
        cli(&["push", "--server", &push, "--device", device, &format!("for {device}")]);
        expect_message(ws, format!("for {device}").as_bytes());
    }
    server.shutdown();
}
