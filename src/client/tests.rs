use super::*;

fn active(now: Millis, heartbeat_ms: u32) -> ClientSession {
    let mut opts = ClientOptions::new("t");
    opts.response_timeout_ms = 5_000;
    let (mut s, auth) = ClientSession::new(opts, Millis(0));
    assert!(matches!(auth, Frame::Auth(_)));
    let ok = proto::AuthOk { heartbeat_ms, ..Default::default() };
    assert!(matches!(s.handle_frame(now, Frame::AuthOk(ok)), Ok(Some(ClientEvent::Connected(_)))));
    s
}

#[test]
fn pings_on_schedule_and_measures_rtt() {
    let mut s = active(Millis(0), 1_000);
    assert_eq!(s.poll_timeout(), Millis(1_000));
    assert_eq!(s.handle_timeout(Millis(999)).unwrap(), None);
    assert_eq!(s.handle_timeout(Millis(1_000)).unwrap(), Some(Frame::Ping));
    let ev = s.handle_frame(Millis(1_040), Frame::Pong).unwrap();
    assert_eq!(ev, Some(ClientEvent::Pong { rtt_ms: 40 }));
    assert_eq!(s.poll_timeout(), Millis(2_000));
}

fn message(seq: u64) -> Frame {
    Frame::Message(proto::Message { seq, message_id: seq + 1000, ..Default::default() })
}

#[test]
fn duplicates_are_dropped_and_counted_and_acks_are_cumulative() {
    let mut s = active(Millis(0), 10_000);
    let mut got = Vec::new();
    for seq in [11, 12, 12, 13, 11, 14] {
        if let Some(ClientEvent::Message(m)) = s.handle_frame(Millis(1), message(seq)).unwrap() {
            got.push(m.seq);
        }
    }
    assert_eq!(got, [11, 12, 13, 14]);
    assert_eq!(s.duplicates(), 2);
    // At-most-once messages (seq 0) are never duplicates.
    assert!(s.handle_frame(Millis(1), message(0)).unwrap().is_some());
    assert!(s.handle_frame(Millis(1), message(0)).unwrap().is_some());
    assert_eq!(s.poll_ack(true), None, "nothing handled yet");
    s.handled(11);
    s.handled(12);
    assert_eq!(s.poll_ack(false), None, "below ack_every: waits for more");
    assert_eq!(s.poll_ack(true), Some(Frame::Ack(proto::Ack { seq: 12 })));
    assert_eq!(s.poll_ack(true), None);
    assert_eq!(s.last_seq(), 12);
}

#[test]
fn ack_every_batches_and_resume_starts_from_last_seq() {
    let mut opts = ClientOptions::new("t");
    opts.last_seq = 100;
    opts.ack_every = 3;
    let (mut s, auth) = ClientSession::new(opts, Millis(0));
    let Frame::Auth(a) = auth else { panic!() };
    assert_eq!((a.last_seq, a.capabilities), (100, proto::Capability::Ack as u32));
    s.handle_frame(Millis(0), Frame::AuthOk(proto::AuthOk { heartbeat_ms: 1000, ..Default::default() })).unwrap();
    assert!(s.handle_frame(Millis(1), message(100)).unwrap().is_none(), "already handled before");
    for seq in 101..=103 {
        assert!(s.handle_frame(Millis(1), message(seq)).unwrap().is_some());
        s.handled(seq);
    }
    assert_eq!(s.poll_ack(false), Some(Frame::Ack(proto::Ack { seq: 103 })));
    // A gap the node cannot fill.
    let resync = Frame::ResyncRequired(proto::ResyncRequired { from_seq: 104, to_seq: 110 });
    let ev = s.handle_frame(Millis(2), resync).unwrap();
    assert_eq!(ev, Some(ClientEvent::ResyncRequired { from_seq: 104, to_seq: 110 }));
    s.handled(110);
    assert_eq!(s.last_seq(), 110);
}

#[test]
fn a_changed_store_incarnation_is_adopted_only_once_a_message_of_this_session_is_handled() {
    let mut opts = ClientOptions::new("t");
    opts.last_seq = 100;
    opts.store_incarnation = 7;
    let (mut s, auth) = ClientSession::new(opts, Millis(0));
    let Frame::Auth(a) = auth else { panic!() };
    assert_eq!(a.store_incarnation, 7, "sent back to the node");
    let ok = proto::AuthOk { heartbeat_ms: 1000, store_incarnation: 9, ..Default::default() };
    s.handle_frame(Millis(0), Frame::AuthOk(ok)).unwrap();
    assert_eq!(s.store_incarnation(), 7, "not before the node had its say");
    // A message handled before (from an earlier connection) does not count.
    s.handled(100);
    assert_eq!(s.store_incarnation(), 7);
    let resync = Frame::ResyncRequired(proto::ResyncRequired { from_seq: 101, to_seq: 5_000 });
    s.handle_frame(Millis(1), resync).unwrap();
    s.handled(5_000);
    assert_eq!(s.store_incarnation(), 9);
    // The first one seen, or the same again, is adopted at once.
    let (mut s, _) = ClientSession::new(ClientOptions::new("t"), Millis(0));
    let ok = proto::AuthOk { heartbeat_ms: 1000, store_incarnation: 9, ..Default::default() };
    s.handle_frame(Millis(0), Frame::AuthOk(ok)).unwrap();
    assert_eq!(s.store_incarnation(), 9);
}

#[test]
fn a_client_without_ack_support_never_acks() {
    let mut opts = ClientOptions::new("t");
    opts.capabilities = 0;
    let (mut s, _) = ClientSession::new(opts, Millis(0));
    s.handle_frame(Millis(0), Frame::AuthOk(proto::AuthOk { heartbeat_ms: 1000, ..Default::default() })).unwrap();
    s.handle_frame(Millis(1), message(5)).unwrap();
    s.handled(5);
    assert_eq!(s.poll_ack(true), None);
}

#[test]
fn missing_pong_is_a_timeout() {
    let mut s = active(Millis(0), 10_000);
    s.handle_timeout(Millis(10_000)).unwrap();
    // Half-open link: nothing comes back.
    assert!(s.handle_timeout(Millis(14_999)).is_ok());
    assert!(matches!(s.handle_timeout(Millis(15_000)), Err(ClientError::Timeout(5_000))));
}

#[test]
fn auth_timeout_and_server_errors_are_typed() {
    let (mut s, _) = ClientSession::new(ClientOptions::new("t"), Millis(0));
    assert!(matches!(s.handle_timeout(Millis(10_000)), Err(ClientError::Timeout(_))));
    let err = s.handle_frame(Millis(1), Frame::Error(codes::error_body(ErrorCode::TokenExpired, ""))).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TokenExpired));
    assert!(err.reconnect_allowed());
    let kicked = Frame::Kicked(proto::Kicked { code: ErrorCode::Replaced as i32, reason: String::new() });
    let err = s.handle_frame(Millis(1), kicked).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Replaced));
    assert!(!err.reconnect_allowed());
}
