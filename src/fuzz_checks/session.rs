//! The client session ([`Session`]): bytes as a client would send them,
//! cut into reads, mixed with the passing of time and with what the shard
//! does to a session (activate it, kick it, close it, lose the peer).
//!
//! Input: a program of one-byte opcodes with their operands (see
//! [`check`]). The harness plays the shard's part as `ShardCtx::handle_input`
//! does: split frames off the bytes read, decode them, feed them in, stop
//! reading while the session waits for activation, discard input once it
//! is closing. A fuzzer cannot forge an HMAC, so the program may ask the
//! harness to mint a token (valid or not, with any times and ids) and send
//! an `Auth` frame carrying it.
//!
//! Invariants:
//! - nothing but `Error` or `Kicked` (each followed by its `Close`) goes out
//!   before `AuthOk`; nothing at all after `Close`; one `AuthOk` at most;
//! - `Authenticated` only for a token the harness minted and that is valid
//!   at the session's clock (signature, times with the leeway, device, id
//!   lengths), and always for such a token;
//! - `Join`, `Leave`, `Request`, `Ack` and `Pong` only once active, with
//!   names within the limits;
//! - phases only move forward; a deadline that passed is acted on; every
//!   session reaches `Closed` once enough time passes;
//! - input kept between reads stays below one frame.

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::BytesMut;

use super::Input;
use crate::protocol::codec::{self, CodecError, Flags, Frame, HEADER_LEN, Peer};
use crate::protocol::codes;
use crate::protocol::proto::{self, ErrorCode};
use crate::protocol::time::{Millis, Now};
use crate::protocol::token::{Key, Keyring};
use crate::session::{Action, Login, Params, Phase, Session};

/// Unix ms at the start of most programs (2027-01-15).
const T0_UNIX_MS: i64 = 1_800_000_000_000;
const LEEWAY_SECS: u32 = 30;

struct Fixture {
    params: Params,
    /// Signs with the ring's current key.
    current: Keyring,
    /// Signs with the ring's older key (still accepted).
    old: Keyring,
    /// Same key id as the current key, other secret: forged tokens.
    forger: Keyring,
    /// A key id the ring does not know.
    stranger: Keyring,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = |id: &str, byte: u8| Key::new(id, vec![byte; 32]).expect("valid test key");
        let ring = |keys, signing| Keyring::new(keys, signing).expect("valid test ring");
        let params = Params {
            keyring: ring(vec![key("k1", 1), key("k0", 2)], Some("k1")),
            clock_leeway_secs: LEEWAY_SECS,
            auth_timeout_ms: 10_000,
            heartbeat_min_ms: 5_000,
            heartbeat_default_ms: 30_000,
            heartbeat_max_ms: 270_000,
            idle_timeout_factor: 3,
            close_linger_ms: 2_000,
            // Small, so the fuzzer reaches the limit easily.
            max_id_bytes: 40,
            control: crate::session::ControlBudget::new(10, 20),
        };
        Fixture {
            current: params.keyring.clone(),
            old: ring(vec![key("k1", 1), key("k0", 2)], Some("k0")),
            forger: ring(vec![key("k1", 3)], None),
            stranger: ring(vec![key("k9", 1)], None),
            params,
        }
    })
}

/// What a minted token says, and whether the ring accepts its signature.
#[derive(Clone, Debug)]
struct Minted {
    user: String,
    device: String,
    app: String,
    issued_at: i64,
    expires_at: i64,
    signed: bool,
}

fn rank(phase: Phase) -> u8 {
    match phase {
        Phase::Handshaking => 0,
        Phase::Authenticated => 1,
        Phase::Active => 2,
        Phase::Closing => 3,
        Phase::Closed => 4,
    }
}

/// What the next call may emit, besides `Error`/`Kicked` + `Close`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Trigger {
    /// A decoded client frame.
    Frame,
    /// `Ping` in the active phase: one `Pong`.
    Ping,
    /// `Auth` in the handshake: `Authenticated` exactly when `true`.
    Auth(bool),
    /// `activate()`: one `AuthOk` when the session was authenticated.
    Activate,
    /// Timeouts, kicks, closes, codec errors: only the close pair.
    Other,
}

struct Harness {
    params: &'static Params,
    session: Session,
    now: Now,
    max_frame: u32,
    /// Bytes read and not handled yet (`ConnIo::partial`).
    pending: Vec<u8>,
    /// The login waiting for `activate` (the shard registering it).
    login: Option<Login>,
    minted: HashMap<String, Minted>,
    auth_ok_sent: bool,
    close_sent: bool,
    authenticated: bool,
    peer_closed: bool,
}

/// Runs the program in `data`.
///
/// | opcode (byte % 8) | operands                                           |
/// |-------------------|----------------------------------------------------|
/// | 0 | read: a length-prefixed chunk of raw bytes                         |
/// | 1 | mint a token and send `Auth` with it (ids, times, damage, split)   |
/// | 2 | send one client frame (kind, fields, header flags, split)          |
/// | 3 | time passes (u16 ms x a factor), then the timer fires              |
/// | 4 | the shard activates the session (conn id)                          |
/// | 5 | the shard kicks the session (code, reason)                         |
/// | 6 | the shard closes the session (code, reason)                        |
/// | 7 | the peer goes away                                                 |
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let fixture = fixture();
    let max_frame = [codec::DEFAULT_MAX_BODY, 64, 1024][usize::from(input.u8() % 3)];
    let unix_ms = match input.u8() % 4 {
        0 => i64::MIN,
        1 => i64::MAX,
        2 => T0_UNIX_MS.wrapping_add(i64::from(input.u32() as i32) * 1000),
        _ => T0_UNIX_MS,
    };
    let mono = Millis(input.u32().into());
    let mut h = Harness {
        params: &fixture.params,
        session: Session::new(mono, &fixture.params),
        now: Now { mono, unix_ms },
        max_frame,
        pending: Vec::new(),
        login: None,
        minted: HashMap::new(),
        auth_ok_sent: false,
        close_sent: false,
        authenticated: false,
        peer_closed: false,
    };
    while !input.is_empty() {
        let opcode = input.u8() % 8;
        match opcode {
            0 => {
                let chunk = input.chunk();
                h.read(chunk);
            }
            1 => {
                let (bytes, split) = h.auth_frame(&mut input, fixture);
                h.read_in_two(&bytes, split);
            }
            2 => {
                let (bytes, split) = client_frame(&mut input);
                h.read_in_two(&bytes, split);
            }
            3 => {
                let step = u64::from(input.u16()) * [1, 10, 1_000][usize::from(input.u8() % 3)];
                h.advance(step);
            }
            4 => {
                let conn_id = input.u64();
                h.activate(conn_id);
            }
            5 | 6 => {
                let kick = opcode == 5;
                let code = codes::from_wire(i32::from(input.u16()));
                let reason = input.string(64);
                h.end(kick, code, reason);
            }
            _ => {
                h.session.closed_by_peer();
                h.peer_closed = true;
                h.after(Phase::Closed);
            }
        }
    }
    // Whatever happened, the session ends once enough time passes: at most
    // auth or idle timeout, then the linger.
    for _ in 0..3 {
        h.advance(1_000_000_000);
    }
    assert_eq!(h.session.phase(), Phase::Closed, "the session never ended");
}

impl Harness {
    fn read_in_two(&mut self, bytes: &[u8], split: usize) {
        let (a, b) = bytes.split_at(split.min(bytes.len()));
        self.read(a);
        self.read(b);
    }

    /// One read from the socket, handled as `Shard::poll_conn` and
    /// `ShardCtx::handle_input` do.
    fn read(&mut self, bytes: &[u8]) {
        match self.session.phase() {
            // The shard does not read until activation; the bytes wait.
            Phase::Authenticated => {
                self.pending.extend_from_slice(bytes);
                return;
            }
            // Read and dropped.
            Phase::Closing | Phase::Closed => return,
            Phase::Handshaking | Phase::Active => {}
        }
        self.pending.extend_from_slice(bytes);
        self.handle_pending();
    }

    fn handle_pending(&mut self) {
        let input = std::mem::take(&mut self.pending);
        let mut pos = 0;
        loop {
            if !self.session.wants_input() {
                if self.session.phase() != Phase::Authenticated {
                    pos = input.len();
                }
                break;
            }
            match codec::split_frame(&input[pos..], self.max_frame) {
                Ok(None) => break,
                Ok(Some((header, body))) => {
                    pos += header.frame_len();
                    match Frame::decode_from(Peer::Client, header, body) {
                        Ok(frame) => self.frame(frame),
                        Err(err) => self.codec_error(&err),
                    }
                }
                Err(err) => {
                    pos = input.len();
                    self.codec_error(&err);
                }
            }
        }
        self.pending = input[pos..].to_vec();
        if self.session.wants_input() {
            assert!(
                self.pending.len() < HEADER_LEN + self.max_frame as usize,
                "{} bytes kept between reads",
                self.pending.len()
            );
        }
    }

    fn frame(&mut self, frame: Frame) {
        let phase = self.session.phase();
        let trigger = match (&frame, phase) {
            (Frame::Ping, Phase::Active) => Trigger::Ping,
            (Frame::Auth(auth), Phase::Handshaking) => Trigger::Auth(self.accepts(auth)),
            _ => Trigger::Frame,
        };
        let auth = match &frame {
            Frame::Auth(auth) => Some(auth.clone()),
            _ => None,
        };
        let mut out = Vec::new();
        self.session.handle_frame(self.now, frame, self.params, &mut out);
        self.observe(phase, trigger, &out);
        if let (Some(auth), Some(Action::Authenticated(login))) = (auth, out.first()) {
            let minted = &self.minted[&auth.token];
            assert_eq!(
                (&login.user, &login.device, &login.app, &login.platform, &login.client_version),
                (&minted.user, &minted.device, &minted.app, &auth.platform, &auth.client_version)
            );
            assert_eq!((login.capabilities, login.last_seq), (auth.capabilities, auth.last_seq));
            assert_eq!(login.heartbeat_ms, self.params.negotiate_heartbeat(auth.heartbeat_ms));
            self.login = Some((**login).clone());
        }
    }

    /// Whether the session must accept `auth`: the token specification
    /// (proto/README.md) and the session's checks, written out.
    fn accepts(&self, auth: &proto::Auth) -> bool {
        let Some(m) = self.minted.get(&auth.token) else { return false };
        let now = self.now.unix_secs();
        let leeway = i64::from(LEEWAY_SECS);
        let max = self.params.max_id_bytes;
        m.signed
            && !m.user.is_empty()
            && !m.device.is_empty()
            && m.expires_at > m.issued_at
            && m.issued_at <= now.saturating_add(leeway)
            && m.expires_at.saturating_add(leeway) >= now
            && (auth.device.is_empty() || auth.device == m.device)
            && [&m.user, &m.device, &m.app, &auth.platform, &auth.client_version]
                .iter()
                .all(|f| f.len() <= max && !f.chars().any(char::is_control))
    }

    fn codec_error(&mut self, err: &CodecError) {
        let phase = self.session.phase();
        let mut out = Vec::new();
        self.session.handle_codec_error(self.now, err, self.params, &mut out);
        self.observe(phase, Trigger::Other, &out);
        if let [Action::Send(Frame::Error(e)), Action::Close(_)] = &out[..] {
            assert_eq!(e.code, err.code() as i32);
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now.mono = self.now.mono.add_ms(ms);
        self.now.unix_ms = self.now.unix_ms.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX));
        let phase = self.session.phase();
        let mut out = Vec::new();
        self.session.handle_timeout(self.now, self.params, &mut out);
        self.observe(phase, Trigger::Other, &out);
        // A due deadline is acted on, or the timer wheel would spin.
        assert!(
            self.session.phase() == Phase::Closed || self.session.deadline() > self.now.mono,
            "deadline {:?} left behind at {:?} in {:?}",
            self.session.deadline(),
            self.now.mono,
            self.session.phase()
        );
    }

    fn activate(&mut self, conn_id: u64) {
        let phase = self.session.phase();
        let login = self.login.take().unwrap_or_else(|| Login {
            user: "u".into(),
            device: "d".into(),
            app: String::new(),
            platform: String::new(),
            client_version: String::new(),
            capabilities: 0,
            last_seq: 0,
            heartbeat_ms: self.params.heartbeat_default_ms,
            store_incarnation: 0,
            groups: Vec::new(),
            expires_at: i64::MAX,
            issued_at: 0,
        });
        let mut out = Vec::new();
        let ok = proto::AuthOk { conn_id, ..Default::default() };
        self.session.activate(self.now, &login, ok, self.params, &mut out);
        self.observe(phase, Trigger::Activate, &out);
        if phase == Phase::Authenticated {
            let [Action::Send(Frame::AuthOk(ok))] = &out[..] else { panic!("activation sent {out:?}") };
            let p = self.params;
            assert_eq!(ok.conn_id, conn_id);
            assert!((p.heartbeat_min_ms..=p.heartbeat_max_ms).contains(&ok.heartbeat_ms), "{ok:?}");
            assert_eq!(ok.heartbeat_ms, login.heartbeat_ms);
            assert_eq!(ok.idle_timeout_ms, login.heartbeat_ms * p.idle_timeout_factor);
            assert_eq!(self.session.deadline(), self.now.mono.add_ms(ok.idle_timeout_ms.into()));
            // Frames that arrived behind Auth are read now.
            self.handle_pending();
        } else {
            assert!(out.is_empty(), "activation in {phase:?} sent {out:?}");
        }
    }

    fn end(&mut self, kick: bool, code: ErrorCode, reason: String) {
        let phase = self.session.phase();
        let mut out = Vec::new();
        if kick {
            self.session.kick(self.now, code, reason, self.params, &mut out);
        } else {
            self.session.close(self.now, code, reason, self.params, &mut out);
        }
        self.observe(phase, Trigger::Other, &out);
        if !matches!(phase, Phase::Closing | Phase::Closed) {
            assert_eq!(out.last(), Some(&Action::Close(code)), "{out:?}");
        }
    }

    /// Checks what one call emitted, given the phase before it.
    fn observe(&mut self, before: Phase, trigger: Trigger, out: &[Action]) {
        let active_before = before == Phase::Active;
        let mut authenticated = false;
        for (i, action) in out.iter().enumerate() {
            assert!(!self.close_sent, "{action:?} after Close");
            assert!(!self.peer_closed, "{action:?} after the peer went away");
            match action {
                Action::Send(Frame::AuthOk(_)) => {
                    assert!(trigger == Trigger::Activate && !self.auth_ok_sent, "unexpected AuthOk");
                    self.auth_ok_sent = true;
                }
                Action::Send(Frame::Error(proto::Error { code, .. }) | Frame::Kicked(proto::Kicked { code, .. })) => {
                    let close = out.get(i + 1);
                    assert!(
                        matches!(close, Some(Action::Close(c)) if *c as i32 == *code),
                        "{action:?} is not followed by its Close: {out:?}"
                    );
                }
                Action::Send(Frame::Pong) => {
                    assert!(trigger == Trigger::Ping && self.auth_ok_sent && out.len() == 1, "unexpected Pong");
                }
                Action::Send(other) => panic!("the session sent {:?}", other.kind()),
                Action::Close(_) => {
                    assert!(
                        matches!(out[..i].last(), Some(Action::Send(Frame::Error(_) | Frame::Kicked(_)))),
                        "Close without Error or Kicked: {out:?}"
                    );
                    self.close_sent = true;
                }
                Action::Authenticated(login) => {
                    assert!(matches!(trigger, Trigger::Auth(true)), "authenticated {login:?} ({trigger:?})");
                    assert!(!self.authenticated && before == Phase::Handshaking);
                    self.authenticated = true;
                    authenticated = true;
                }
                Action::Join(name) | Action::Leave(name) => self.check_active(active_before, name),
                Action::Request(r) => self.check_active(active_before, &r.service_id),
                Action::Ack(_) => self.check_active(active_before, "-"),
                Action::Refresh(r) => self.check_active(active_before, &r.device),
            }
        }
        if trigger == Trigger::Auth(true) {
            assert!(authenticated, "a valid Auth was refused: {out:?}");
        }
        let after = self.session.phase();
        self.after(after);
        assert!(rank(after) >= rank(before), "phase went back from {before:?} to {after:?}");
    }

    fn check_active(&self, active_before: bool, name: &str) {
        assert!(active_before && self.auth_ok_sent, "client action before activation");
        assert!(!name.is_empty() && name.len() <= self.params.max_id_bytes, "name of {} bytes", name.len());
    }

    /// State the session must be in, given what it emitted so far.
    fn after(&self, phase: Phase) {
        if self.close_sent {
            assert!(matches!(phase, Phase::Closing | Phase::Closed), "{phase:?} after Close");
        }
        if self.auth_ok_sent {
            assert!(self.session.was_activated());
        }
        if matches!(phase, Phase::Closing) {
            assert!(self.close_sent, "closing without a Close");
        }
    }

    /// Mints a token as the program says and encodes an `Auth` frame with it.
    fn auth_frame(&mut self, input: &mut Input, fixture: &Fixture) -> (Vec<u8>, usize) {
        let (user, device, app) = (input.string(48), input.string(48), input.string(48));
        let now = self.now.unix_secs();
        // Fixed width, so a change of mode does not shift what follows.
        let at = |input: &mut Input| match (input.u8() % 8, input.u32()) {
            (0, _) => i64::MIN,
            (1, _) => i64::MAX,
            // Seconds from now: the leeway's edges are in reach.
            (2 | 3, secs) => now.saturating_add(i64::from(secs as u8 as i8)),
            (_, secs) => now.saturating_add(i64::from(secs as i32)),
        };
        let (issued_at, expires_at) = (at(input), at(input));
        let (ring, signed) = match input.u8() % 8 {
            0 => (&fixture.old, true),
            1 => (&fixture.forger, false),
            2 => (&fixture.stranger, false),
            _ => (&fixture.current, true),
        };
        let mut token = ring.mint(&user, &device, &app, issued_at, expires_at);
        let minted = Minted { user, device, app, issued_at, expires_at, signed };
        // Damage: flip one byte, or cut the token.
        let damage = input.u8();
        let at_byte = usize::from(input.u16()) % token.len().max(1);
        let mut token_bytes = std::mem::take(&mut token).into_bytes();
        match damage % 8 {
            0 => token_bytes[at_byte] ^= 1 << (damage >> 5),
            1 => token_bytes.truncate(at_byte),
            _ => {}
        }
        let token = String::from_utf8_lossy(&token_bytes).into_owned();
        if damage % 8 > 1 {
            self.minted.insert(token.clone(), minted.clone());
        }
        let device = match input.u8() % 4 {
            0 => input.string(48),
            1 => minted.device.clone(),
            _ => String::new(),
        };
        let auth = proto::Auth {
            token,
            device,
            platform: input.string(48),
            client_version: input.string(48),
            capabilities: input.u32(),
            last_seq: input.u64(),
            heartbeat_ms: input.u32(),
            store_incarnation: input.u64(),
        };
        let flags = Flags(input.u8());
        let split = usize::from(input.u16());
        let mut bytes = BytesMut::new();
        Frame::Auth(auth).encode_into(&mut bytes, flags);
        (bytes.to_vec(), split)
    }
}

/// One frame as a client might send it, well-formed or of a kind a client
/// must not send.
fn client_frame(input: &mut Input) -> (Vec<u8>, usize) {
    let frame = match input.u8() % 8 {
        0 => Frame::Ping,
        1 => Frame::Join(proto::GroupMembership { group: input.string(48) }),
        2 => Frame::Leave(proto::GroupMembership { group: input.string(48) }),
        3 => Frame::Request(proto::Request {
            service_id: input.string(48),
            request_id: input.u64(),
            client_msg_id: input.u64(),
            body: input.chunk().to_vec().into(),
        }),
        4 => Frame::Ack(proto::Ack { seq: input.u64() }),
        5 => Frame::Pong,
        6 => Frame::Error(codes::error_body(codes::from_wire(i32::from(input.u16())), input.string(16))),
        _ => Frame::Message(proto::Message {
            payload: input.chunk().to_vec().into(),
            service_id: input.string(16),
            message_id: input.u64(),
            seq: input.u64(),
        }),
    };
    let flags = Flags(input.u8());
    let split = usize::from(input.u16());
    let mut bytes = BytesMut::new();
    frame.encode_into(&mut bytes, flags);
    (bytes.to_vec(), split)
}
