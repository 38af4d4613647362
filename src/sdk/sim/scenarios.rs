//! The scenarios the simulator runs, each a test.

use super::*;

#[test]
fn connects_to_the_first_endpoint_and_drifts_when_it_is_refused_or_silent() {
    let mut sim = Sim::new(&["a", "b", "c"], |_| {});
    sim.node("a").reach = Reach::Refused;
    sim.node("b").reach = Reach::Blackhole;
    assert!(sim.run_until_cond(60_000, Sim::is_up));
    assert_eq!(sim.agent.connected_to(), Some("c"));
    let tried: Vec<&str> = sim.connects.iter().map(|(_, e)| e.as_str()).collect();
    assert_eq!(tried, ["a", "b", "c"]);
    let d = sim.disconnects();
    assert!(matches!(d[0], Disconnect::ConnectFailed(_)), "{d:?}");
    assert_eq!(d[1], &Disconnect::ConnectTimeout(5_000));
    // Each retry waited a backoff inside the bounds, never 0.
    for w in sim.connects.windows(2) {
        let gap = w[1].0.0 - w[0].0.0;
        assert!(gap >= 200, "tight retry: {gap} ms");
    }
}

#[test]
fn an_unreachable_cluster_is_retried_with_growing_jittered_backoff_never_in_a_tight_loop() {
    let mut sim = Sim::new(&["a", "b"], |_| {});
    sim.node("a").reach = Reach::Refused;
    sim.node("b").reach = Reach::Refused;
    sim.run_until(600_000);
    let n = sim.connects.len();
    // 10 minutes, a 30 s cap: a few dozen attempts, not thousands.
    assert!((10..=120).contains(&n), "{n} attempts in 10 minutes");
    let gaps: Vec<u64> = sim.connects.windows(2).map(|w| w[1].0.0 - w[0].0.0).collect();
    assert!(gaps.iter().all(|&g| (200..=30_000 + 20).contains(&g)), "{gaps:?}");
    // Later gaps are longer on average than the first ones (exponential).
    let early: u64 = gaps[..4].iter().sum::<u64>() / 4;
    let late: u64 = gaps[gaps.len() - 8..].iter().sum::<u64>() / 8;
    assert!(late > 2 * early, "early {early} ms, late {late} ms");
    // The retry_in_ms the application saw is the gap that followed.
    let announced: Vec<u64> = sim
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Disconnected { retry_in_ms, .. } => *retry_in_ms,
            _ => None,
        })
        .collect();
    for (gap, said) in gaps.iter().zip(&announced) {
        assert_eq!(*gap, said + 20, "connect resolves after the 20 ms link delay");
    }
    // The node comes back: the agent gets there.
    sim.node("b").reach = Reach::Up;
    assert!(sim.run_until_cond(120_000, Sim::is_up));
}

#[test]
fn a_reconnectable_kick_reconnects_after_backoff_and_a_terminal_one_stops() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    let t = sim.now;
    sim.kick(ErrorCode::Shutdown);
    assert!(sim.run_until_cond(60_000, |s| s.connected_count() == 2));
    assert!(sim.events.iter().any(|e| matches!(e, Event::Kicked { code: ErrorCode::Shutdown, .. })));
    let Some(Event::Disconnected { reason, retry_in_ms: Some(wait) }) =
        sim.events.iter().find(|e| matches!(e, Event::Disconnected { .. }))
    else {
        panic!("{:?}", sim.events)
    };
    assert_eq!(reason.code(), Some(ErrorCode::Shutdown));
    assert!(*wait >= 200);
    assert!(sim.connects[1].0.0 >= t.0 + 200);

    let id = sim.agent.request(sim.now, "chat", Bytes::from_static(b"x"), 60_000).unwrap();
    sim.node("a").answer = false;
    sim.run_until(sim.now.0 + 100);
    sim.kick(ErrorCode::Replaced);
    sim.run_until(sim.now.0 + 600_000);
    assert!(sim.agent.is_stopped());
    assert_eq!(sim.connects.len(), 2, "no reconnect after a terminal code");
    let last = sim.disconnects().last().cloned().cloned();
    assert_eq!(last.as_ref().and_then(Disconnect::code), Some(ErrorCode::Replaced));
    let last = sim.events.iter().rev().find(|e| matches!(e, Event::Disconnected { .. }));
    assert!(matches!(last, Some(Event::Disconnected { retry_in_ms: None, .. })), "{last:?}");
    assert_eq!(
        sim.responses(),
        [(
            id,
            Err(RequestError::Stopped(Disconnect::Kicked {
                code: ErrorCode::Replaced,
                reason: "the device logged in on another connection".into()
            }))
        )]
    );
    assert!(matches!(sim.agent.request(sim.now, "chat", Bytes::new(), 1), Err(SdkError::Stopped(_))));
}

#[test]
fn go_away_moves_at_once_to_the_named_endpoint_but_not_twice_in_a_row() {
    let mut sim = Sim::new(&["a", "b", "c"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    let t = sim.now;
    sim.go_away("c");
    assert!(sim.run_until_cond(10_000, |s| s.connected_count() == 2));
    assert_eq!(sim.agent.connected_to(), Some("c"));
    assert_eq!(sim.connects.last().unwrap(), &(t.add_ms(20), "c".to_owned()), "no backoff");
    // Right away again (no round trip proved the new link): backoff this time.
    let t = sim.now;
    sim.go_away("b");
    assert!(sim.run_until_cond(60_000, |s| s.connected_count() == 3));
    assert_eq!(sim.agent.connected_to(), Some("b"));
    assert!(sim.connects.last().unwrap().0.0 >= t.0 + 20 + 200);
}

#[test]
fn a_draining_node_that_closes_with_going_away_is_left_at_once() {
    let mut sim = Sim::new(&["a", "b"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    let t = sim.now;
    sim.kick(ErrorCode::GoingAway);
    assert!(sim.run_until_cond(10_000, |s| s.connected_count() == 2));
    assert_eq!(sim.agent.connected_to(), Some("b"));
    assert_eq!(sim.connects.last().unwrap(), &(t.add_ms(20), "b".to_owned()), "no backoff");
}

#[test]
fn heartbeat_lengthens_after_three_pongs_and_probes_then_reconnects_on_a_half_open_link() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    sim.run_until(1_500_000);
    let pings = sim.nodes[0].pings.clone();
    let gaps: Vec<u64> = pings.windows(2).map(|w| w[1].0 - w[0].0).collect();
    // Starts at the server's minimum (5 s + the 40 ms round trip) and climbs
    // in steps after every 3 pongs, up to the negotiated 90 s.
    assert!(gaps[0] < 5_100, "{gaps:?}");
    assert!(gaps.windows(2).all(|w| w[1] + 100 >= w[0]), "never shrinks on a good link: {gaps:?}");
    assert!(*gaps.last().unwrap() >= 90_000, "{gaps:?}");
    assert_eq!(sim.agent.heartbeat().proven_ms(), 90_000);
    assert_eq!(sim.connected_count(), 1, "the server's idle timeout never fired");

    // Half-open: the next ping goes unanswered, so does the probe.
    sim.half_open = true;
    let t = sim.now;
    assert!(sim.run_until_cond(300_000, |s| s.disconnects().contains(&&Disconnect::NoPong)));
    // At most one interval, the ping's timeout and the probe's timeout.
    assert!(sim.now.0 - t.0 <= 90_000 + 2 * 5_000 + 100, "{} ms", sim.now.0 - t.0);
    sim.half_open = false;
    assert!(sim.run_until_cond(60_000, |s| s.connected_count() == 2));
}

#[test]
fn a_late_pong_shrinks_the_interval_and_the_probe_keeps_the_link() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    sim.run_until(200_000);
    let before = sim.agent.heartbeat_interval_ms();
    assert!(before > 5_000);
    // A delay spike: the next Pong comes 6 s late, after the 5 s timeout.
    let pings = sim.nodes[0].pings.len();
    sim.down_extra_ms = 6_000;
    assert!(sim.run_until_cond(200_000, |s| s.nodes[0].pings.len() > pings));
    sim.down_extra_ms = 0;
    assert!(sim.run_until_cond(20_000, |s| s.agent.heartbeat_interval_ms() == 0), "probing");
    assert!(sim.run_until_cond(20_000, |s| s.agent.heartbeat_interval_ms() != 0));
    assert!(sim.agent.heartbeat_interval_ms() < before, "shrunk below {before}");
    assert_eq!(sim.nodes[0].pings.len(), pings + 2, "the ping and one probe");
    assert_eq!(sim.connected_count(), 1, "the probe came back: same link");
}

#[test]
fn background_uses_the_proven_interval_and_returning_pings_once() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    sim.run_until(120_000);
    let fg = sim.agent.heartbeat_interval_ms();
    let proven = sim.agent.heartbeat().proven_ms();
    sim.agent.set_foreground(sim.now, false);
    assert_eq!(sim.agent.heartbeat_interval_ms(), proven);
    assert!(proven < fg);
    let t = sim.now;
    sim.run_until(t.0 + 10 * u64::from(proven));
    let pings: Vec<u64> = sim.nodes[0].pings.iter().filter(|p| **p > t).map(|p| p.0).collect();
    let gaps: Vec<u64> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| g.abs_diff(u64::from(proven) + 40) <= 1), "{gaps:?} vs {proven}");
    // Back to the foreground: one ping now.
    let before = sim.nodes[0].pings.len();
    let t = sim.now;
    sim.agent.set_foreground(t, true);
    sim.run_until(t.0 + 30);
    assert_eq!(sim.nodes[0].pings.len(), before + 1);
    assert_eq!(sim.nodes[0].pings.last(), Some(&t.add_ms(20)));
}

#[test]
fn network_change_reconnects_at_once_and_forgets_the_learned_interval() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    sim.run_until(200_000);
    assert!(sim.agent.heartbeat_interval_ms() > 5_000);
    let t = sim.now;
    sim.agent.network_changed(t, "cellular");
    assert!(sim.run_until_cond(10_000, |s| s.connected_count() == 2));
    assert_eq!(sim.connects.last().unwrap().0, t);
    assert_eq!(sim.disconnects(), [&Disconnect::NetworkChanged]);
    assert_eq!(sim.agent.heartbeat_interval_ms(), 5_000);
}

#[test]
fn resume_replays_only_what_was_not_handled_and_the_application_sees_each_message_once() {
    let mut sim = Sim::new(&["a"], |_| {});
    sim.auto_handle = false;
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    for _ in 0..6 {
        sim.push();
    }
    sim.run_until(sim.now.0 + 100);
    assert_eq!(sim.messages_seen(), [1, 2, 3, 4, 5, 6]);
    // The application handled 1..=3 (4..=6 are still in its hands).
    for seq in 1..=3 {
        sim.agent.message_handled(sim.now, seq);
    }
    sim.run_until(sim.now.0 + 100);
    assert_eq!(sim.timeline.acked, 0, "4..=6 are in the application's hands: the Ack waits a little");
    sim.run_until(sim.now.0 + 200);
    assert_eq!(sim.timeline.acked, 3, "acked once handled, not when received");
    sim.reset();
    assert!(sim.run_until_cond(60_000, |s| s.connected_count() == 2));
    sim.push();
    sim.run_until(sim.now.0 + 100);
    assert_eq!(sim.timeline.resumed_from, [0, 3]);
    // 4..=6 came again from the node and were dropped: the app has them.
    assert_eq!(sim.messages_seen(), [1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(sim.agent.duplicates(), 3);
    for seq in 4..=7 {
        sim.agent.message_handled(sim.now, seq);
    }
    sim.run_until(sim.now.0 + 100);
    assert_eq!((sim.timeline.acked, sim.agent.last_seq()), (7, 7));
}

#[test]
fn a_resync_gap_is_reported_and_its_end_becomes_the_resume_point_once_handled() {
    let mut sim = Sim::new(&["a"], |_| {});
    sim.auto_handle = false;
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    sim.push();
    sim.send_down(Frame::ResyncRequired(proto::ResyncRequired { from_seq: 2, to_seq: 9 }));
    sim.run_until(sim.now.0 + 100);
    let tail = &sim.events[sim.events.len() - 2..];
    assert!(matches!(&tail[0], Event::Message(m) if m.seq == 1), "{tail:?}");
    assert_eq!(tail[1], Event::ResyncRequired { from_seq: 2, to_seq: 9 });
    sim.agent.message_handled(sim.now, 1);
    sim.run_until(sim.now.0 + 300);
    assert_eq!(sim.timeline.acked, 1, "the gap is not handled yet");
    sim.agent.message_handled(sim.now, 9);
    sim.run_until(sim.now.0 + 100);
    assert_eq!((sim.timeline.acked, sim.agent.last_seq()), (9, 9));
    sim.reset();
    assert!(sim.run_until_cond(60_000, |s| s.connected_count() == 2));
    assert_eq!(sim.timeline.resumed_from, [0, 9]);
}

#[test]
fn requests_are_retried_with_the_same_client_msg_id_across_loss_and_reconnects() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    // The backend is stuck: the first attempt goes unanswered, the retry
    // follows after request_retry_ms.
    sim.node("a").answer = false;
    let id = sim.agent.request(sim.now, "chat", Bytes::from_static(b"hi"), 60_000).unwrap();
    sim.run_until(sim.now.0 + 4_100);
    assert_eq!(sim.nodes[0].requests, [(id.0, false), (id.0, true), (id.0, true)]);
    // The connection drops; the retry goes out on the next session.
    sim.reset();
    sim.node("a").answer = true;
    assert!(sim.run_until_cond(60_000, |s| !s.responses().is_empty()));
    assert_eq!(sim.nodes[0].requests.last(), Some(&(id.0, true)));
    let [(rid, Ok(r))] = &sim.responses()[..] else { panic!("{:?}", sim.responses()) };
    assert_eq!((*rid, &r.body[..]), (id, &b"re:hi"[..]));
    assert_eq!(sim.agent.pending_requests(), 0);
    sim.run_until(sim.now.0 + 10_000);
    assert_eq!(sim.responses().len(), 1);
    assert!(sim.nodes[0].requests.iter().all(|r| r.0 == id.0));

    // No answer before the deadline: a typed timeout.
    sim.node("a").answer = false;
    let id = sim.agent.request(sim.now, "chat", Bytes::new(), 5_000).unwrap();
    sim.run_until(sim.now.0 + 6_000);
    assert_eq!(sim.responses()[1], (id, Err(RequestError::TimedOut { attempts: 3 })));
}

#[test]
fn an_unanswered_retry_checks_the_link_at_once_instead_of_waiting_for_a_long_heartbeat() {
    let mut sim = Sim::new(&["a"], |_| {});
    assert!(sim.run_until_cond(10_000, Sim::is_up));
    sim.run_until(1_300_000);
    assert_eq!(sim.agent.heartbeat_interval_ms(), 90_000);
    // Right after a heartbeat, the way back stalls for good.
    let pings = sim.nodes[0].pings.len();
    assert!(sim.run_until_cond(100_000, |s| s.nodes[0].pings.len() > pings));
    sim.run_until(sim.now.0 + 100);
    sim.conn.as_mut().unwrap().stalled_down = true;
    let id = sim.agent.request(sim.now, "chat", Bytes::from_static(b"q"), 30_000).unwrap();
    // Retry after 2 s, a ping with it, 5 s for its Pong, 5 s for the probe:
    // reconnected and answered long before the next heartbeat (90 s).
    assert!(sim.run_until_cond(30_000, |s| !s.responses().is_empty()));
    assert!(matches!(&sim.responses()[0], (got, Ok(_)) if *got == id));
    assert_eq!(sim.disconnects(), [&Disconnect::NoPong]);
}

#[test]
fn requests_are_bounded_and_checked() {
    let mut sim = Sim::new(&["a"], |c| c.max_pending_requests = 2);
    let now = sim.now;
    assert_eq!(sim.agent.request(now, "", Bytes::new(), 1_000), Err(SdkError::BadService));
    let big = Bytes::from(vec![0u8; codec::DEFAULT_MAX_BODY as usize]);
    assert!(matches!(sim.agent.request(now, "chat", big, 1_000), Err(SdkError::TooLarge { .. })));
    let a = sim.agent.request(now, "chat", Bytes::new(), 60_000).unwrap();
    let b = sim.agent.request(now, "chat", Bytes::new(), 60_000).unwrap();
    assert_ne!(a, b);
    assert_eq!(sim.agent.request(now, "chat", Bytes::new(), 1_000), Err(SdkError::TooManyRequests(2)));
    // Made before the session: sent once it is up.
    assert!(sim.run_until_cond(10_000, |s| s.responses().len() == 2));
    assert_eq!(sim.nodes[0].requests, [(a.0, false), (b.0, false)]);
}

#[test]
fn the_dispatcher_gives_endpoints_and_token_and_its_failure_falls_back_to_the_fixed_list() {
    let mut sim = Sim::new(&["a", "b", "c"], |c| {
        c.dispatcher = true;
        c.endpoints = vec!["a".into()];
        c.client.token = "not a token".into();
    });
    // The first lookup fails: fixed list, with the (bad) configured token.
    sim.run_until(1);
    assert_eq!(sim.lookups, 1);
    assert!(sim.run_until_cond(30_000, |s| !s.connects.is_empty()));
    assert_eq!(sim.connects[0].1, "a");
    // INVALID_TOKEN is terminal.
    assert!(sim.run_until_cond(30_000, |s| s.agent.is_stopped()));

    let mut sim = Sim::new(&["a", "b", "c"], |c| {
        c.dispatcher = true;
        c.endpoints = vec![];
    });
    let token = sim.agent_token();
    sim.dispatcher = Some(Dispatch {
        endpoints: vec!["c".into(), "b".into()],
        token,
        heartbeat_min_ms: 5_000,
        heartbeat_max_ms: 90_000,
        reconnect_min_ms: 3_000,
        reconnect_max_ms: 4_000,
    });
    sim.node("c").reach = Reach::Refused;
    assert!(sim.run_until_cond(60_000, Sim::is_up));
    // The server's backoff bounds: the drift from c waited 3..=4 s.
    assert_eq!(sim.agent.backoff().bounds(), (3_000, 4_000));
    let gap = sim.connects[1].0.0 - sim.connects[0].0.0;
    assert!((3_020..=4_020).contains(&gap), "{gap}");
    assert_eq!(sim.agent.connected_to(), Some("b"), "drifted down the dispatcher's list");
    // A GoAway that names nowhere: ask the dispatcher again.
    let lookups = sim.lookups;
    sim.go_away("");
    assert!(sim.run_until_cond(60_000, |s| s.connected_count() == 2));
    assert_eq!(sim.lookups, lookups + 1);

    // A dispatcher that never answers: the lookup times out, and with no
    // endpoint to fall back on it is asked again after a backoff.
    let mut sim = Sim::new(&["a"], |c| {
        c.dispatcher = true;
        c.endpoints = vec![];
    });
    sim.silent_dispatcher = true;
    sim.run_until(30_000);
    let d = sim.disconnects();
    assert!(d.len() >= 2 && d.iter().all(|d| matches!(d, Disconnect::Dispatcher(_))), "{d:?}");
    assert_eq!(sim.lookups as usize, d.len() + 1, "one lookup in flight at a time");
    assert!(sim.connects.is_empty());
}

impl Sim {
    /// A valid token for the simulated nodes.
    fn agent_token(&self) -> String {
        self.params.keyring.mint("alice", "phone", "chat", T0_UNIX_MS / 1000, T0_UNIX_MS / 1000 + 86_400)
    }
}

#[test]
fn a_lossy_link_for_an_hour_delivers_every_message_once_in_order_and_answers_every_request() {
    let mut duplicates = 0;
    for seed in 1..=8 {
        let mut sim = Sim::new(&["a", "b"], |c| c.seed = seed);
        sim.rng = Rng::new(seed * 31);
        sim.stall_permille = 20;
        sim.delay_ms = 30;
        sim.jitter_ms = 200;
        // The application works through its messages once a minute, so
        // reconnects replay what it holds but has not handled yet.
        sim.auto_handle = false;
        let mut ids = Vec::new();
        for minute in 0..60u64 {
            let t = minute * 60_000;
            sim.run_until(t);
            if let Some(&seq) = sim.messages_seen().last() {
                sim.agent.message_handled(sim.now, seq);
            }
            for _ in 0..3 {
                sim.push();
            }
            if minute % 5 == 0 {
                ids.push(sim.agent.request(sim.now, "chat", Bytes::from(format!("r{minute}")), 120_000).unwrap());
            }
            match minute % 17 {
                3 => sim.reset(),
                7 => sim.half_open = true,
                9 => sim.half_open = false,
                11 => sim.agent.network_changed(sim.now, "wifi"),
                _ => {}
            }
        }
        // Heal and settle.
        sim.half_open = false;
        sim.stall_permille = 0;
        sim.run_until(sim.now.0 + 300_000);
        let last = sim.messages_seen().last().copied().unwrap_or(0);
        sim.agent.message_handled(sim.now, last);
        sim.run_until(sim.now.0 + 1_000);
        assert!(sim.is_up(), "seed {seed}: not connected at the end: {:?}", sim.events.last());
        let seen = sim.messages_seen();
        assert_eq!(seen, (1..=180).collect::<Vec<_>>(), "seed {seed}: every message once, in order");
        assert_eq!(sim.timeline.acked, 180, "seed {seed}");
        let mut answered: Vec<RequestId> = sim.responses().iter().filter(|r| r.1.is_ok()).map(|r| r.0).collect();
        answered.sort();
        ids.sort();
        assert_eq!(
            answered,
            ids,
            "seed {seed}: every request answered once: {:?}",
            sim.responses().iter().filter(|r| r.1.is_err()).collect::<Vec<_>>()
        );
        // Retries reuse the id: the nodes saw no other.
        let sent: std::collections::BTreeSet<u64> =
            sim.nodes.iter().flat_map(|n| n.requests.iter().map(|r| r.0)).collect();
        assert_eq!(sent, ids.iter().map(|i| i.0).collect(), "seed {seed}");
        // Never a tight loop: connects stay far below one per backoff floor.
        assert!(sim.connects.len() < 200, "seed {seed}: {} connects", sim.connects.len());
        duplicates += sim.agent.duplicates();
    }
    assert!(duplicates > 0, "replays happened and were dropped");
}
