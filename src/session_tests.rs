//! Unit tests of `session.rs`.

use super::*;
use crate::protocol::token::Key;

const T0_UNIX: i64 = 1_800_000_000;

fn params() -> Params {
    let keyring = Keyring::new(vec![Key::new("k1", vec![7u8; 32]).unwrap()], None).unwrap();
    Params {
        keyring,
        clock_leeway_secs: 30,
        auth_timeout_ms: 10_000,
        heartbeat_min_ms: 5_000,
        heartbeat_default_ms: 30_000,
        heartbeat_max_ms: 270_000,
        idle_timeout_factor: 3,
        close_linger_ms: 2_000,
        max_id_bytes: 128,
        control: ControlBudget::OFF,
    }
}

/// Simulated clock: monotonic ms since start plus a fixed wall-clock origin.
fn at(ms: u64) -> Now {
    Now { mono: Millis(ms), unix_ms: T0_UNIX * 1000 + ms as i64 }
}

fn auth_frame(token: String) -> Frame {
    Frame::Auth(proto::Auth { token, heartbeat_ms: 20_000, client_version: "1.0".into(), ..Default::default() })
}

fn token(p: &Params, iat: i64, exp: i64) -> String {
    p.keyring.mint("alice", "phone", "chat", iat, exp)
}

fn closed_with(out: &[Action]) -> Option<ErrorCode> {
    out.iter().find_map(|a| match a {
        Action::Close(code) => Some(*code),
        _ => None,
    })
}

fn authenticate(p: &Params, s: &mut Session, now: Now) -> Login {
    let mut out = Vec::new();
    s.handle_frame(now, auth_frame(token(p, T0_UNIX, T0_UNIX + 3600)), p, &mut out);
    let [Action::Authenticated(login)] = &out[..] else { panic!("{out:?}") };
    (**login).clone()
}

#[test]
fn valid_token_activates_with_negotiated_heartbeat() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(5));
    assert_eq!((login.user.as_str(), login.device.as_str()), ("alice", "phone"));
    assert_eq!(login.heartbeat_ms, 20_000);
    assert_eq!(s.phase(), Phase::Authenticated);
    let mut out = Vec::new();
    s.activate(at(6), &login, proto::AuthOk { conn_id: 9, ..Default::default() }, &p, &mut out);
    let [Action::Send(Frame::AuthOk(ok))] = &out[..] else { panic!("{out:?}") };
    assert_eq!((ok.conn_id, ok.heartbeat_ms, ok.idle_timeout_ms), (9, 20_000, 60_000));
    assert_eq!(ok.server_time_ms, (T0_UNIX * 1000 + 6) as u64);
    assert_eq!(s.phase(), Phase::Active);
}

#[test]
fn control_frames_past_the_budget_close_with_rate_limited() {
    // 10 a second (one per 100 ms) after a burst of 3.
    let p = Params { control: ControlBudget::new(10, 3), ..params() };
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(5));
    let mut out = Vec::new();
    s.activate(at(6), &login, proto::AuthOk::default(), &p, &mut out);
    let idle_deadline = |s: &Session, now: u64| s.deadline() == Millis(now + 60_000);
    let join = || Frame::Join(proto::GroupMembership { group: "g".into() });
    for (t, frame) in [(1_000, Frame::Ping), (1_000, join()), (1_000, Frame::Ping)] {
        out.clear();
        s.handle_frame(at(t), frame, &p, &mut out);
        assert_eq!(closed_with(&out), None, "within the burst");
    }
    // The level leaks one frame per 100 ms, from the last frame on; an
    // Ack in between is no control frame and leaks as well.
    out.clear();
    s.handle_frame(at(1_050), Frame::Ack(proto::Ack { seq: 1 }), &p, &mut out);
    s.handle_frame(at(1_100), Frame::Ping, &p, &mut out);
    assert_eq!(closed_with(&out), None);
    assert!(idle_deadline(&s, 1_100), "the deadline is intact: {:?}", s.deadline());
    // Another one 50 ms later is too soon.
    out.clear();
    s.handle_frame(at(1_150), Frame::Ping, &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::RateLimited));
    assert!(matches!(&out[0], Action::Send(Frame::Error(e)) if e.reconnect));

    // Spread out, any number passes.
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(5));
    s.activate(at(6), &login, proto::AuthOk::default(), &p, &mut out);
    for i in 0..1_000u64 {
        out.clear();
        s.handle_frame(at(1_000 + i * 100), Frame::Ping, &p, &mut out);
        assert_eq!(out, vec![Action::Send(Frame::Pong)], "ping {i}");
    }
}

#[test]
fn bad_signature_is_invalid_token() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let mut t = token(&p, T0_UNIX, T0_UNIX + 60);
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    let mut out = Vec::new();
    s.handle_frame(at(1), auth_frame(t), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::InvalidToken));
    assert!(matches!(&out[0], Action::Send(Frame::Error(e)) if !e.reconnect));
    assert_eq!(s.phase(), Phase::Closing);
}

#[test]
fn expiry_and_not_yet_valid_respect_the_leeway() {
    let p = params();
    let cases = [
        // (issued_at, expires_at, expected close)
        (T0_UNIX - 100, T0_UNIX - 10, None), // expired 10 s ago: within 30 s leeway
        (T0_UNIX - 100, T0_UNIX - 31, Some(ErrorCode::TokenExpired)),
        (T0_UNIX + 20, T0_UNIX + 100, None), // 20 s in the future: within leeway
        (T0_UNIX + 31, T0_UNIX + 100, Some(ErrorCode::TokenNotYetValid)),
    ];
    for (iat, exp, want) in cases {
        let mut s = Session::new(Millis(0), &p);
        let mut out = Vec::new();
        s.handle_frame(at(0), auth_frame(token(&p, iat, exp)), &p, &mut out);
        assert_eq!(closed_with(&out), want, "iat {iat} exp {exp}");
        if want.is_some() {
            assert!(matches!(&out[0], Action::Send(Frame::Error(e)) if e.reconnect));
        }
    }
}

#[test]
fn frame_before_auth_is_bad_frame() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let mut out = Vec::new();
    s.handle_frame(at(1), Frame::Ping, &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::BadFrame));
    // Nothing after the close decision produces output.
    out.clear();
    s.handle_frame(at(2), auth_frame(token(&p, T0_UNIX, T0_UNIX + 60)), &p, &mut out);
    assert!(out.is_empty());
}

#[test]
fn auth_deadline() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let mut out = Vec::new();
    s.handle_timeout(at(9_999), &p, &mut out);
    assert!(out.is_empty());
    s.handle_timeout(at(10_000), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::AuthTimeout));
    // Linger then closed.
    out.clear();
    s.handle_timeout(at(12_000), &p, &mut out);
    assert_eq!(s.phase(), Phase::Closed);
}

#[test]
fn idle_timeout_counts_from_the_last_frame() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(0));
    let mut out = Vec::new();
    s.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
    // Pings every 50 s keep a 60 s idle timeout alive.
    for t in [50_000, 100_000, 150_000] {
        out.clear();
        s.handle_timeout(at(t), &p, &mut out);
        s.handle_frame(at(t), Frame::Ping, &p, &mut out);
        assert_eq!(out, vec![Action::Send(Frame::Pong)]);
    }
    out.clear();
    s.handle_timeout(at(209_999), &p, &mut out);
    assert!(out.is_empty());
    s.handle_timeout(at(210_000), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::IdleTimeout));
}

#[test]
fn replaced_login_gets_kicked() {
    let p = params();
    let mut old = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut old, at(0));
    let mut out = Vec::new();
    old.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
    out.clear();
    old.kick(at(5), ErrorCode::Replaced, String::new(), &p, &mut out);
    let [Action::Send(Frame::Kicked(k)), Action::Close(ErrorCode::Replaced)] = &out[..] else { panic!("{out:?}") };
    assert_eq!(k.code, ErrorCode::Replaced as i32);
    // A second kick is a no-op.
    out.clear();
    old.kick(at(6), ErrorCode::Replaced, String::new(), &p, &mut out);
    assert!(out.is_empty());
}

#[test]
fn second_auth_and_device_mismatch_are_rejected() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let mut out = Vec::new();
    let mut f = auth_frame(token(&p, T0_UNIX, T0_UNIX + 60));
    if let Frame::Auth(a) = &mut f {
        a.device = "tablet".into();
    }
    s.handle_frame(at(0), f, &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::InvalidToken));

    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(0));
    out.clear();
    s.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
    out.clear();
    s.handle_frame(at(1), auth_frame(token(&p, T0_UNIX, T0_UNIX + 60)), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::BadFrame));
}

#[test]
fn join_and_leave_become_actions_and_bad_names_close() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(0));
    let mut out = Vec::new();
    s.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
    out.clear();
    let join = |g: &str| Frame::Join(proto::GroupMembership { group: g.into() });
    s.handle_frame(at(1), join("room"), &p, &mut out);
    s.handle_frame(at(1), Frame::Leave(proto::GroupMembership { group: "room".into() }), &p, &mut out);
    assert_eq!(out, vec![Action::Join("room".into()), Action::Leave("room".into())]);
    out.clear();
    s.handle_frame(at(2), join(""), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::BadFrame));
}

#[test]
fn requests_become_actions_touch_the_idle_deadline_and_need_a_service() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(0));
    let mut out = Vec::new();
    assert!(!s.was_activated());
    s.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
    assert!(s.was_activated());
    out.clear();
    let req = proto::Request { service_id: "chat".into(), request_id: 1, ..Default::default() };
    s.handle_frame(at(50_000), Frame::Request(req.clone()), &p, &mut out);
    assert_eq!(out, vec![Action::Request(req)]);
    // The idle timeout (60 s) now counts from 50 s.
    out.clear();
    s.handle_timeout(at(100_000), &p, &mut out);
    assert!(out.is_empty());
    let unnamed = proto::Request { request_id: 2, ..Default::default() };
    s.handle_frame(at(100_001), Frame::Request(unnamed), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::BadFrame));
}

#[test]
fn acks_become_actions_and_touch_the_idle_deadline() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let login = authenticate(&p, &mut s, at(0));
    let mut out = Vec::new();
    s.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
    out.clear();
    s.handle_frame(at(50_000), Frame::Ack(proto::Ack { seq: 42 }), &p, &mut out);
    assert_eq!(out, vec![Action::Ack(42)]);
    out.clear();
    s.handle_timeout(at(100_000), &p, &mut out);
    assert!(out.is_empty(), "the Ack moved the idle deadline to 110 s");
}

#[test]
fn heartbeat_is_clamped() {
    let p = params();
    assert_eq!(p.negotiate_heartbeat(0), 30_000);
    assert_eq!(p.negotiate_heartbeat(1), 5_000);
    assert_eq!(p.negotiate_heartbeat(u32::MAX), 270_000);
}

#[test]
fn token_expiry_closes_an_active_session_unless_refreshed() {
    let p = params();
    let login_at = |s: &mut Session| {
        let mut out = Vec::new();
        s.handle_frame(at(0), auth_frame(token(&p, T0_UNIX, T0_UNIX + 100)), &p, &mut out);
        let [Action::Authenticated(login)] = &out[..] else { panic!("{out:?}") };
        let login = (**login).clone();
        out.clear();
        s.activate(at(0), &login, proto::AuthOk::default(), &p, &mut out);
        let [Action::Send(Frame::AuthOk(ok))] = &out[..] else { panic!("{out:?}") };
        assert_eq!(ok.token_expires_ms, (T0_UNIX as u64 + 100) * 1000);
    };
    // Expires at 100 s, closed past the 30 s leeway, pings or not.
    let mut s = Session::new(Millis(0), &p);
    login_at(&mut s);
    let mut out = Vec::new();
    for t in [50_000, 100_000] {
        s.handle_frame(at(t), Frame::Ping, &p, &mut out);
    }
    assert_eq!(s.deadline(), Millis(130_000), "the expiry comes before the idle deadline");
    out.clear();
    s.handle_timeout(at(129_999), &p, &mut out);
    assert!(out.is_empty());
    s.handle_timeout(at(130_000), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::TokenExpired));
    assert!(matches!(&out[0], Action::Send(Frame::Error(e)) if e.reconnect));

    // A Refresh moves it.
    let mut s = Session::new(Millis(0), &p);
    login_at(&mut s);
    out.clear();
    let refresh = |tok: String| Frame::Refresh(proto::Refresh { token: tok });
    s.handle_frame(at(90_000), refresh(token(&p, T0_UNIX + 90, T0_UNIX + 1000)), &p, &mut out);
    let [Action::Refresh(r)] = &out[..] else { panic!("{out:?}") };
    assert_eq!((r.user.as_str(), r.device.as_str(), r.expires_at), ("alice", "phone", T0_UNIX + 1000));
    let expires_at = r.expires_at;
    out.clear();
    s.refreshed(at(90_000), expires_at, &p, &mut out);
    let [Action::Send(Frame::RefreshOk(ok))] = &out[..] else { panic!("{out:?}") };
    assert_eq!(ok.token_expires_ms, (T0_UNIX as u64 + 1000) * 1000);
    out.clear();
    s.handle_frame(at(130_000), Frame::Ping, &p, &mut out);
    s.handle_timeout(at(130_000), &p, &mut out);
    assert_eq!(out, vec![Action::Send(Frame::Pong)]);
    assert_eq!(s.deadline(), Millis(190_000), "the idle deadline again");

    // A bad Refresh token closes with its code.
    out.clear();
    let mut bad = token(&p, T0_UNIX, T0_UNIX + 1000);
    bad.push('x');
    s.handle_frame(at(131_000), refresh(bad), &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::InvalidToken));
}

#[test]
fn refresh_before_auth_is_bad_frame() {
    let p = params();
    let mut s = Session::new(Millis(0), &p);
    let mut out = Vec::new();
    let f = Frame::Refresh(proto::Refresh { token: token(&p, T0_UNIX, T0_UNIX + 60) });
    s.handle_frame(at(1), f, &p, &mut out);
    assert_eq!(closed_with(&out), Some(ErrorCode::BadFrame));
}

#[test]
fn session_stays_small() {
    assert!(std::mem::size_of::<Session>() <= 16);
}
