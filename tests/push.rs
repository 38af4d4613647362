//! Downstream push through the push port, over real TCP with 2 shards.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use longlink::backend::{BackendError, PushClient};
use longlink::protocol::ids::owner_shard;
use longlink::protocol::proto::{ErrorCode, PushStatus};

fn backend(server: &longlink::server::Server) -> PushClient {
    let mut b = PushClient::connect(server.push_addr(), Duration::from_secs(5), &push_key()).expect("push port");
    b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    b
}

fn pairs(user: impl Fn(usize) -> String, device: impl Fn(usize) -> String, n: usize) -> Vec<(String, String)> {
    (0..n).map(|i| (user(i), device(i))).collect()
}

fn status(code: i32) -> PushStatus {
    PushStatus::try_from(code).unwrap_or(PushStatus::Unspecified)
}

#[test]
fn unicast_reaches_devices_on_both_shards_and_batch_results_are_per_target() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(&server);
    let devices = pairs(|i| format!("u{i}"), |i| format!("uni-{i}"), 8);
    let owners: HashSet<_> = devices.iter().map(|(_, d)| owner_shard(d, 2)).collect();
    assert_eq!(owners.len(), 2, "the devices must live on both shards");
    run(async move {
        let mut conns = connect_all(addr, &cfg, &devices).await;
        // One request per device: whichever shard reads the request, half of
        // these cross to the other shard.
        for (i, (_, device)) in devices.iter().enumerate() {
            let reply = push.push_devices(&[device.as_str()], Bytes::from(format!("to {device}"))).unwrap();
            assert_eq!(status(reply.results[0].status), PushStatus::Delivered, "{device}");
            let m = next_message(&mut conns[i]).await;
            assert_eq!(m.payload, Bytes::from(format!("to {device}")));
        }
        // Batch: online, offline, online, invalid.
        let batch = [devices[0].1.as_str(), "nobody-here", devices[5].1.as_str(), ""];
        let reply = push.push_devices(&batch, Bytes::from_static(b"batch")).unwrap();
        let got: Vec<_> = reply.results.iter().map(|r| (r.target.as_str(), status(r.status))).collect();
        assert_eq!(
            got,
            [
                (batch[0], PushStatus::Delivered),
                ("nobody-here", PushStatus::NotOnline),
                (batch[2], PushStatus::Delivered),
                ("", PushStatus::Rejected),
            ]
        );
        assert_eq!((reply.delivered, reply.not_online), (2, 1));
        assert_eq!(next_message(&mut conns[0]).await.payload, Bytes::from_static(b"batch"));
        assert_eq!(next_message(&mut conns[5]).await.payload, Bytes::from_static(b"batch"));
        for c in &mut conns[1..5] {
            assert_nothing_queued(c).await;
        }
    });
    server.shutdown();
}

#[test]
fn a_user_with_three_devices_on_different_shards_receives_on_all() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(&server);
    let devices = pairs(|_| "carol".into(), |i| format!("carol-dev-{i}"), 3);
    let owners: HashSet<_> = devices.iter().map(|(_, d)| owner_shard(d, 2)).collect();
    assert_eq!(owners.len(), 2);
    run(async move {
        let mut conns = connect_all(addr, &cfg, &devices).await;
        let reply = push.push_users(&["carol", "dave"], Bytes::from_static(b"hi carol")).unwrap();
        assert_eq!(reply.results[0].sessions, 3);
        assert_eq!(status(reply.results[0].status), PushStatus::Delivered);
        assert_eq!(status(reply.results[1].status), PushStatus::NotOnline);
        for c in &mut conns {
            assert_eq!(next_message(c).await.payload, Bytes::from_static(b"hi carol"));
        }
        // One device leaves: the user index follows.
        let gone = conns.remove(1);
        gone.close().await;
        assert!(wait_until(Duration::from_secs(5), || {
            push.push_users(&["carol"], Bytes::from_static(b"again")).unwrap().results[0].sessions == 2
        }));
    });
    server.shutdown();
}

#[test]
fn group_push_reaches_every_member_once_and_leavers_leave_no_residue() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(&server);
    let members = pairs(|i| format!("gu{i}"), |i| format!("gdev-{i}"), 20);
    let outsider = pairs(|_| "out".into(), |_| "outsider".into(), 1);
    let counters = server.counters().to_vec();
    run(async move {
        let mut conns = connect_all(addr, &cfg, &members).await;
        let mut outsider = connect_all(addr, &cfg, &outsider).await.remove(0);
        // Half join by their own frame, half are added by the backend.
        for c in &mut conns[..10] {
            c.join("room").await.unwrap();
            assert_nothing_queued(c).await; // the Join is processed
        }
        let added: Vec<&str> = members[10..].iter().map(|(_, d)| d.as_str()).collect();
        let reply = push.group_update("room", &added, &[]).unwrap();
        assert!(reply.results.iter().all(|r| status(r.status) == PushStatus::Delivered), "{reply:?}");
        let p = push.presence::<&str>(&[], &[], &["room"]).unwrap();
        assert_eq!(p.groups[0].online, 20);

        let mut ids = Vec::new();
        for n in 0..10 {
            let reply = push.push_group("room", Bytes::from(format!("g{n}"))).unwrap();
            assert_eq!(reply.delivered, 20);
            ids.push(n);
        }
        for c in &mut conns {
            let mut seen = Vec::new();
            for _ in 0..10 {
                seen.push(next_message(c).await.payload);
            }
            let want: Vec<Bytes> = ids.iter().map(|n| Bytes::from(format!("g{n}"))).collect();
            assert_eq!(seen, want, "each message once, in order");
            assert_nothing_queued(c).await;
        }
        assert_nothing_queued(&mut outsider).await;

        // Members leave: by frame, by backend, by disconnecting.
        conns[0].leave("room").await.unwrap();
        assert_nothing_queued(&mut conns[0]).await;
        push.group_update::<&str>("room", &[], &[&members[10].1]).unwrap();
        let dropped = conns.remove(19);
        dropped.close().await;
        assert!(wait_until(Duration::from_secs(5), || {
            push.presence::<&str>(&[], &[], &["room"]).unwrap().groups[0].online == 17
        }));
        let reply = push.push_group("room", Bytes::from_static(b"after")).unwrap();
        assert_eq!(reply.delivered, 17);
        assert_nothing_queued(&mut conns[0]).await;
        assert_nothing_queued(&mut conns[10]).await;
        for c in conns.into_iter() {
            c.close().await;
        }
    });
    assert!(wait_until(Duration::from_secs(5), || {
        counters.iter().all(|c| c.groups.load(Ordering::Relaxed) == 0 && c.group_sessions.load(Ordering::Relaxed) == 0)
    }));
    server.shutdown();
}

#[test]
fn a_large_group_is_written_in_batches_and_every_member_gets_every_message_once_in_order() {
    // About 200 members per shard: above the size written inline, so each
    // push is queued for the shard's flusher, and pushes sent while it is
    // still writing join the same queues.
    const MEMBERS: usize = 400;
    const PUSHES: usize = 30;
    let mut cfg = test_config(2);
    cfg.session.auth_timeout_ms = 10_000;
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(&server);
    let members = pairs(|i| format!("lu{i}"), |i| format!("ldev-{i}"), MEMBERS);
    let counters = server.counters().to_vec();
    run(async move {
        let conns = connect_all(addr, &cfg, &members).await;
        let devices: Vec<&str> = members.iter().map(|(_, d)| d.as_str()).collect();
        let reply = push.group_update("big", &devices, &[]).unwrap();
        assert!(reply.results.iter().all(|r| status(r.status) == PushStatus::Delivered), "{reply:?}");
        for n in 0..PUSHES {
            let reply = push.push_group("big", Bytes::from(format!("m{n}"))).unwrap();
            assert_eq!(reply.delivered, MEMBERS as u64);
        }
        let want: Vec<Bytes> = (0..PUSHES).map(|n| Bytes::from(format!("m{n}"))).collect();
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let want = want.clone();
                glommio::spawn_local(async move {
                    let mut seen = Vec::with_capacity(want.len());
                    for _ in 0..want.len() {
                        seen.push(next_message(&mut c).await.payload);
                    }
                    assert_eq!(seen, want, "each message once, in order");
                    assert_nothing_queued(&mut c).await;
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
    let delivered: u64 = counters.iter().map(|c| c.delivered.load(Ordering::Relaxed)).sum();
    assert_eq!(delivered, (MEMBERS * PUSHES) as u64);
    // The flusher wrote them (a write carries every frame queued by then).
    let writes: u64 = counters.iter().map(|c| c.fanout_writes.load(Ordering::Relaxed)).sum();
    assert!((MEMBERS as u64..=delivered).contains(&writes), "{writes} flusher writes");
    server.shutdown();
}

#[test]
fn broadcast_to_5000_connections_arrives_once_each_at_the_configured_pace() {
    let mut cfg = test_config(2);
    cfg.push.broadcast_rate_per_sec = 10_000;
    // 5,000 clients authenticate at once on a debug build.
    cfg.session.auth_timeout_ms = 10_000;
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(&server);
    let all = pairs(|i| format!("b{i}"), |i| format!("bdev-{i}"), 5000);
    let (first, last, per_conn) = run(async move {
        let conns = connect_all(addr, &cfg, &all).await;
        let start = Instant::now();
        let reply = push.broadcast(Bytes::from_static(b"everyone")).unwrap();
        assert_eq!(status(reply.status), PushStatus::Accepted);
        assert_eq!(reply.delivered, 5000);
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                glommio::spawn_local(async move {
                    let m = next_message(&mut c).await;
                    let at = start.elapsed();
                    assert_eq!(m.payload, Bytes::from_static(b"everyone"));
                    assert_nothing_queued(&mut c).await; // exactly once
                    at
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await);
        }
        times.sort();
        (times[0], times[times.len() - 1], times.len())
    });
    assert_eq!(per_conn, 5000);
    // 5,000 deliveries at 10,000/s take about 500 ms; without pacing they
    // would take a few ms. Half the paced time is a safe lower bound.
    assert!(last - first >= Duration::from_millis(250), "delivered in {:?}: not paced", last - first);
    server.shutdown();
}

#[test]
fn a_client_that_never_reads_is_closed_as_slow_without_growing_memory() {
    // A node of its own, so its RSS is the server's alone.
    let cfg = test_config(2);
    let node = NodeProcess::start(&cfg);
    let addr = node.client_addr;
    let mut push = PushClient::connect(node.push_addr, Duration::from_secs(5), &push_key()).unwrap();
    push.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let devices = pairs(|i| format!("s{i}"), |i| format!("slowtest-{i}"), 2);
    let (stuck, healthy) = (devices[0].1.clone(), devices[1].1.clone());
    let node = run(async move {
        let mut conns = connect_all(addr, &cfg, &devices).await;
        // Warm up the path (first allocations) before taking the baseline.
        for _ in 0..50 {
            push.push_devices(&[healthy.as_str()], Bytes::from_static(b"warm")).unwrap();
            next_message(&mut conns[1]).await;
        }
        let rss_before = node.rss_bytes();
        let payload = Bytes::from(vec![b'x'; 2048]);
        let (mut healthy_got, mut cut_off_at, mut peak) = (0, None, 0);
        for n in 0..10_000u32 {
            let reply = push.push_devices(&[stuck.as_str()], payload.clone()).unwrap();
            if status(reply.results[0].status) != PushStatus::Delivered && cut_off_at.is_none() {
                cut_off_at = Some(n);
            }
            if n % 500 == 0 {
                // The healthy client keeps receiving throughout.
                push.push_devices(&[healthy.as_str()], Bytes::from_static(b"ok")).unwrap();
                assert_eq!(next_message(&mut conns[1]).await.payload, Bytes::from_static(b"ok"));
                healthy_got += 1;
                peak = peak.max(node.rss_bytes());
            }
        }
        assert_eq!(healthy_got, 20);
        assert!(cut_off_at.is_some(), "the stuck client was never cut off");
        // 10,000 x 2 KiB = 20 MiB were pushed at it; its queue is bounded
        // at 1 MiB, so the server grows by little more than that.
        let growth = peak.saturating_sub(rss_before);
        assert!(growth < 6 << 20, "server RSS grew by {growth} bytes");
        let err = loop {
            match conns[0].next_event().await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        // Its socket buffers were full of messages; after them, the close
        // (SLOW when the Error frame made it out before the linger ended).
        assert!(matches!(err.code(), Some(ErrorCode::Slow) | None), "{err:?}");
        let p = push.presence(&[stuck.as_str()], &[], &[]).unwrap();
        assert!(!p.devices[0].online);
        node
    });
    drop(node);
}

/// A client socket with a tiny receive buffer, authenticated by hand; the
/// test decides when (if ever) it reads.
struct RawClient {
    device: String,
    stream: std::net::TcpStream,
    /// Bytes read after AuthOk, until EOF.
    received: Vec<u8>,
}

impl RawClient {
    fn connect(addr: std::net::SocketAddr, cfg: &longlink::config::Config, device: &str) -> RawClient {
        use std::io::Write;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Set before connecting, so the window the node sees stays tiny.
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let auth = longlink::protocol::codec::Frame::Auth(longlink::protocol::proto::Auth {
            token: token(cfg, &format!("user-{device}"), device),
            // Long heartbeats: the node must not close it as idle meanwhile.
            heartbeat_ms: 120_000,
            ..Default::default()
        });
        stream.write_all(&auth.to_bytes()).unwrap();
        let mut client = RawClient { device: device.to_owned(), stream, received: Vec::new() };
        let frames = client.read_frames(1);
        assert!(matches!(frames[..], [longlink::protocol::codec::Frame::AuthOk(_)]), "{device}: {frames:?}");
        client
    }

    /// Reads exactly `n` whole frames (the node sends nothing unasked
    /// before the pushes start).
    fn read_frames(&mut self, n: usize) -> Vec<longlink::protocol::codec::Frame> {
        use std::io::Read;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while decode_all(&buf).len() < n {
            match self.stream.read(&mut byte) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(1) => buf.push(byte[0]),
                other => panic!("{}: no AuthOk: {other:?}", self.device),
            }
        }
        decode_all(&buf)
    }

    /// Reads everything the node sends, until it closes the connection.
    fn read_to_end(&mut self) {
        use std::io::Read;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("{}: read failed after {} bytes: {e}", self.device, self.received.len()),
            }
        }
    }

    /// Checks every byte read: whole, well-formed frames only; Message
    /// payloads exactly the first ones the node accepted for this device,
    /// in order; then at most one Error{SLOW}; then nothing.
    fn check_stream(&self, accepted: &[Bytes], max_body: u32) {
        use longlink::protocol::codec::{self, Frame};
        let device = &self.device;
        let mut buf = &self.received[..];
        let mut messages = 0;
        let mut error = None;
        while !buf.is_empty() {
            assert!(error.is_none(), "{device}: bytes after the Error frame: {:?}", &buf[..buf.len().min(32)]);
            let (header, body) = match codec::split_frame(buf, max_body) {
                Ok(Some(split)) => split,
                Ok(None) => panic!("{device}: the stream ends inside a frame ({} bytes left)", buf.len()),
                Err(e) => panic!("{device}: undecodable header after {messages} messages: {e}"),
            };
            match Frame::decode(header, body) {
                Ok(Frame::Message(m)) => {
                    let expected = accepted.get(messages);
                    assert_eq!(Some(&m.payload), expected, "{device}: message #{messages} corrupt or out of order");
                    messages += 1;
                }
                Ok(Frame::Error(e)) => error = Some(e),
                other => panic!("{device}: unexpected frame after {messages} messages: {other:?}"),
            }
            buf = &buf[header.frame_len()..];
        }
        if let Some(e) = error {
            assert_eq!(longlink::protocol::codes::from_wire(e.code), ErrorCode::Slow, "{device}: {e:?}");
        }
        assert!(messages < accepted.len(), "{device}: never cut off ({messages} messages)");
    }
}

/// A payload of 40 to 900 bytes, different for every round.
fn numbered_payload(n: usize) -> Bytes {
    let mut text = format!("m{n:06}-");
    while text.len() < 40 + (n * 37) % 861 {
        text.push(char::from(b'a' + (text.len() % 26) as u8));
    }
    Bytes::from(text)
}

#[test]
fn cutting_slow_clients_never_corrupts_their_streams() {
    // Clients that never read, with a 4 KiB receive buffer, get pushes
    // until the node cuts them off; then they read everything the node
    // sent. Half are cut because their queue is full, half because their
    // socket stays blocked past the write timeout.
    use longlink::backend::{Reply, Request};
    const CLIENTS: usize = 20;
    // About 6 MB per client: more than the kernel's socket buffers (the
    // node's send buffer grows up to net.ipv4.tcp_wmem's 4 MiB).
    const ROUNDS: usize = 12_000;
    for by_timeout in [false, true] {
        let mut cfg = test_config(2);
        cfg.session.close_linger_ms = 60_000; // the clients read only once pushes stop
        if by_timeout {
            // A queue that never fills: only the write deadline cuts.
            cfg.session.outbound_queue_bytes = 64 << 20;
            cfg.session.write_timeout_ms = 200;
        } else {
            cfg.server.max_frame_bytes = 1024;
            cfg.session.outbound_queue_bytes = 4096;
            cfg.session.write_timeout_ms = 600_000;
        }
        let server = start(&cfg);
        let tag = if by_timeout { "timeout" } else { "queue" };
        let mut clients: Vec<RawClient> =
            (0..CLIENTS).map(|i| RawClient::connect(server.client_addr(), &cfg, &format!("cut-{tag}-{i}"))).collect();
        let devices: Vec<String> = clients.iter().map(|c| c.device.clone()).collect();
        // Pipelined: one request per round to every client.
        let (mut sender, mut receiver) = backend(&server).split().unwrap();
        let sending = std::thread::spawn(move || {
            let ids: Vec<u64> = (0..ROUNDS)
                .map(|n| {
                    let targets = longlink::protocol::proto::Targets { devices: devices.clone(), ..Default::default() };
                    let req = longlink::protocol::proto::PushRequest {
                        targets: Some(targets),
                        payload: numbered_payload(n),
                        ..Default::default()
                    };
                    sender.send(Request::Push(req)).unwrap()
                })
                .collect();
            sender.flush().unwrap();
            (sender, ids)
        });
        let mut replies = std::collections::HashMap::new();
        for _ in 0..ROUNDS {
            match receiver.recv().unwrap() {
                Reply::Push(r) => replies.insert(r.request_id, r),
                other => panic!("{other:?}"),
            };
        }
        let (_sender, ids) = sending.join().unwrap();
        // What the node accepted for each client, in the order it queued them.
        let mut accepted: Vec<Vec<Bytes>> = vec![Vec::new(); CLIENTS];
        for (n, id) in ids.iter().enumerate() {
            for (i, r) in replies[id].results.iter().enumerate() {
                if status(r.status) == PushStatus::Delivered {
                    accepted[i].push(numbered_payload(n));
                }
            }
        }
        let slow = |server: &longlink::server::Server| {
            server.counters().iter().map(|c| c.slow_closed.load(Ordering::Relaxed)).sum::<u64>()
        };
        assert!(
            wait_until(Duration::from_secs(30), || slow(&server) == CLIENTS as u64),
            "{tag}: {} of {CLIENTS} clients cut",
            slow(&server)
        );
        for (client, accepted) in clients.iter_mut().zip(&accepted) {
            client.read_to_end();
            client.check_stream(accepted, cfg.server.max_frame_bytes);
        }
        // Closed on this side too, so the node's sessions end now, not at
        // the linger.
        drop(clients);
        server.shutdown();
    }
}

#[test]
fn broadcasts_beyond_the_queue_bound_are_rejected_as_retryable_and_memory_stays_bounded() {
    use longlink::backend::{Reply, Request};
    const BROADCASTS: usize = 3_000;
    let mut cfg = test_config(2);
    // One delivery per second per shard: queued broadcasts stay queued.
    cfg.push.broadcast_rate_per_sec = 2;
    let node = NodeProcess::start(&cfg);
    let devices = ["bq-0", "bq-1", "bq-2", "bq-3"];
    assert_eq!(devices.iter().map(|d| owner_shard(d, 2)).collect::<HashSet<_>>().len(), 2);
    let _clients: Vec<RawClient> = devices.iter().map(|d| RawClient::connect(node.client_addr, &cfg, d)).collect();
    let mut push = PushClient::connect(node.push_addr, Duration::from_secs(5), &push_key()).unwrap();
    push.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let rss_before = node.rss_bytes();
    let payload = Bytes::from(vec![b'b'; 60_000]);
    let (mut sender, mut receiver) = push.split().unwrap();
    let sending = std::thread::spawn(move || {
        for _ in 0..BROADCASTS {
            let targets = longlink::protocol::proto::Targets { broadcast: true, ..Default::default() };
            let req = longlink::protocol::proto::PushRequest {
                targets: Some(targets),
                payload: payload.clone(),
                ..Default::default()
            };
            sender.send(Request::Push(req)).unwrap();
        }
        sender.flush().unwrap();
        sender
    });
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..BROADCASTS {
        let Reply::Push(r) = receiver.recv().unwrap() else { panic!("not a push reply") };
        match status(r.status) {
            PushStatus::Accepted => accepted += 1,
            PushStatus::Rejected => {
                assert!(r.retryable && r.reason.contains("broadcast queue"), "{r:?}");
                rejected += 1;
            }
            other => panic!("{other:?}: {r:?}"),
        }
    }
    let _sender = sending.join().unwrap();
    let growth = node.rss_bytes().saturating_sub(rss_before);
    // 8 MiB per shard holds about 140 of them (a few more as the pacer
    // finishes some).
    assert!(accepted > 0 && accepted < 400 && rejected > 0, "accepted {accepted}, rejected {rejected}");
    // Unbounded, 3,000 x 60 KB on each of 2 shards: 360 MB.
    assert!(growth < 64 << 20, "node RSS grew by {} MiB", growth >> 20);
}

#[test]
fn kick_presence_and_malformed_requests() {
    let cfg = test_config(2);
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut push = backend(&server);
    let devices = vec![
        ("erin".to_string(), "erin-phone".to_string()),
        ("erin".to_string(), "erin-tablet".to_string()),
        ("frank".to_string(), "frank-phone".to_string()),
    ];
    let mut push = run(async move {
        let mut conns = connect_all(addr, &cfg, &devices).await;
        let p = push.presence(&["erin-phone", "ghost"], &["erin", "nobody"], &[]).unwrap();
        assert!(p.devices[0].online && !p.devices[1].online);
        assert_eq!(p.devices[0].user, "erin");
        assert_eq!(p.devices[0].shard, u32::from(owner_shard("erin-phone", 2).0));
        assert!(p.devices[0].connected_at_ms > 0);
        assert_eq!(p.users[0].devices.len(), 2);
        assert!(p.users[1].devices.is_empty());
        assert_eq!(p.connections_total, 3);
        assert_eq!(p.connections_per_shard.iter().sum::<u64>(), 3);

        let r = push.kick_devices(&["frank-phone", "ghost"], ErrorCode::Kicked, "bye").unwrap();
        let s: Vec<_> = r.results.iter().map(|r| status(r.status)).collect();
        assert_eq!(s, [PushStatus::Delivered, PushStatus::NotOnline]);
        let err = conns[2].next_event().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Kicked));
        assert!(err.to_string().contains("bye"));

        let r = push.kick_users(&["erin"], ErrorCode::Kicked, "all of erin").unwrap();
        assert_eq!(r.results[0].sessions, 2);
        for c in &mut conns[..2] {
            assert_eq!(c.next_event().await.unwrap_err().code(), Some(ErrorCode::Kicked));
        }
        let p = push.presence::<&str>(&[], &["erin"], &[]).unwrap();
        assert!(p.users[0].devices.is_empty());
        push
    });

    // Malformed requests get a RequestError and the connection stays open.
    let err = push.push(longlink::protocol::proto::Targets::default(), Bytes::from_static(b"x"), "", 0).unwrap_err();
    assert!(matches!(err, BackendError::Rejected { code: ErrorCode::BadFrame, .. }), "{err:?}");
    let both = longlink::protocol::proto::Targets { devices: vec!["a".into()], broadcast: true, ..Default::default() };
    assert!(matches!(push.push(both, Bytes::new(), "", 0), Err(BackendError::Rejected { .. })));
    push.set_max_request_bytes(1 << 20);
    let too_big = push.push_devices(&["a"], Bytes::from(vec![0u8; 70_000])).unwrap_err();
    assert!(matches!(too_big, BackendError::Rejected { code: ErrorCode::FrameTooLarge, .. }), "{too_big:?}");
    // A garbage body inside an intact frame boundary.
    let mut raw = std::net::TcpStream::connect(server.push_addr()).unwrap();
    let ok = raw_push_auth(&mut raw, &push_key());
    assert!(matches!(ok, Some(longlink::protocol::codec::Frame::PushAuthOk(_))), "{ok:?}");
    use std::io::{Read, Write};
    let mut frame = vec![0x4C, 1, 32, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
    // ... followed by a valid presence query on the same connection.
    let mut query = bytes::BytesMut::new();
    longlink::protocol::codec::Frame::PresenceQuery(longlink::protocol::proto::PresenceQuery {
        request_id: 7,
        ..Default::default()
    })
    .encode_into(&mut query, longlink::protocol::codec::Flags::default());
    frame.extend_from_slice(&query);
    raw.write_all(&frame).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while decode_all(&buf).len() < 2 {
        // std's read does not retry EINTR (signals reach this thread).
        let n = match raw.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other.unwrap(),
        };
        assert!(n > 0, "push connection closed: {:?}", decode_all(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let frames = decode_all(&buf);
    assert!(
        matches!(&frames[0], longlink::protocol::codec::Frame::RequestError(e) if e.code == ErrorCode::BadFrame as i32)
    );
    assert!(matches!(&frames[1], longlink::protocol::codec::Frame::PresenceReply(r) if r.request_id == 7));
    // A broken frame boundary: an Error frame, then the node closes.
    raw.write_all(b"GARBAGE!").unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    let frames = decode_all(&rest);
    assert!(
        matches!(frames.last(), Some(longlink::protocol::codec::Frame::Error(e)) if e.code == ErrorCode::BadFrame as i32)
    );
    // Other backends are unaffected.
    assert!(push.presence::<&str>(&[], &[], &[]).is_ok());
    server.shutdown();
}
