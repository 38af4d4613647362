use super::*;

#[test]
fn terminal_reasons_stop_and_the_others_reconnect() {
    let kicked = |code| Disconnect::Kicked { code, reason: String::new() };
    assert!(kicked(ErrorCode::Shutdown).reconnect_allowed());
    assert!(!kicked(ErrorCode::Replaced).reconnect_allowed());
    let error = |code| {
        let e = codes::error_body(code, "");
        Disconnect::Error { code, reason: e.reason, reconnect: e.reconnect }
    };
    assert!(error(ErrorCode::TokenExpired).reconnect_allowed());
    assert!(!error(ErrorCode::InvalidToken).reconnect_allowed());
    assert_eq!(error(ErrorCode::InvalidToken).code(), Some(ErrorCode::InvalidToken));
    for transient in [
        Disconnect::ConnectFailed(String::new()),
        Disconnect::ConnectTimeout(1),
        Disconnect::AuthTimeout(1),
        Disconnect::NoPong,
        Disconnect::Lost(String::new()),
        Disconnect::Dispatcher(String::new()),
        Disconnect::NetworkChanged,
        Disconnect::GoAway { endpoint: String::new(), reason: String::new() },
    ] {
        assert!(transient.reconnect_allowed() && transient.code().is_none(), "{transient:?}");
    }
    assert!(!Disconnect::Protocol(String::new()).reconnect_allowed());
    assert!(!Disconnect::ClosedByApp.reconnect_allowed());
}

/// The Auth frame among the actions queued so far.
fn sent_auth(agent: &mut Agent) -> proto::Auth {
    while let Some(action) = agent.poll_action() {
        if let Action::Send { bytes, .. } = action
            && let Ok(Some((h, body))) = codec::split_frame(&bytes, codec::DEFAULT_MAX_BODY)
            && let Ok(Frame::Auth(auth)) = Frame::decode(h, body)
        {
            return auth;
        }
    }
    panic!("no Auth sent");
}

#[test]
fn the_store_incarnation_is_sent_and_a_changed_one_adopted_once_its_resync_is_handled() {
    let mut opts = ClientOptions::new("t");
    opts.store_incarnation = 7;
    let cfg = AgentConfig { endpoints: vec!["a:1".into()], ..AgentConfig::new(opts) };
    let mut agent = Agent::new(cfg, Millis(0)).unwrap();
    agent.handle_connected(Millis(1), LinkId(1));
    assert_eq!(sent_auth(&mut agent).store_incarnation, 7);
    let ok = proto::AuthOk { heartbeat_ms: 30_000, store_incarnation: 9, ..Default::default() };
    agent.handle_bytes(Millis(2), LinkId(1), &Frame::AuthOk(ok).to_bytes());
    assert_eq!(agent.store_incarnation(), 7, "not before the resync is handled");
    let resync = proto::ResyncRequired { from_seq: 1, to_seq: 500 };
    agent.handle_bytes(Millis(3), LinkId(1), &Frame::ResyncRequired(resync).to_bytes());
    agent.message_handled(Millis(4), 500);
    assert_eq!((agent.store_incarnation(), agent.last_seq()), (9, 500));
    // The next session says so.
    agent.handle_closed(Millis(5), LinkId(1), "reset");
    agent.handle_timeout(Millis(600_000));
    let Some(Action::Connect { link, .. }) =
        std::iter::from_fn(|| agent.poll_action()).find(|a| matches!(a, Action::Connect { .. }))
    else {
        panic!("reconnects");
    };
    agent.handle_connected(Millis(600_001), link);
    let auth = sent_auth(&mut agent);
    assert_eq!((auth.store_incarnation, auth.last_seq), (9, 500));
}

#[test]
fn an_agent_needs_somewhere_to_connect() {
    let cfg = AgentConfig::new(ClientOptions::new("t"));
    assert_eq!(Agent::new(cfg.clone(), Millis(0)).err(), Some(SdkError::NoEndpoints));
    let mut agent = Agent::new(AgentConfig { endpoints: vec!["a:1".into()], ..cfg }, Millis(0)).unwrap();
    assert_eq!(agent.poll_action(), Some(Action::Connect { link: LinkId(1), endpoint: "a:1".into() }));
    assert_eq!(agent.poll_timeout(), Some(Millis(10_000)), "the connect timeout");
    // A stale link is ignored.
    agent.handle_connected(Millis(1), LinkId(7));
    agent.handle_closed(Millis(1), LinkId(7), "x");
    assert_eq!(agent.poll_action(), None);
}
