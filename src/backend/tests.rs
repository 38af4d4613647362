use std::net::{SocketAddr, TcpListener};
use std::thread;

use super::*;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The test's peer: one accepted connection on a std listener, read and
/// answered by a script running on its own thread.
struct FakeNode {
    stream: TcpStream,
    rbuf: BytesMut,
}

impl FakeNode {
    fn start(script: impl FnOnce(FakeNode) + Send + 'static) -> (SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let node = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            script(FakeNode { stream, rbuf: BytesMut::new() });
        });
        (addr, node)
    }

    /// The next request frame; panics if the client closes first.
    fn read(&mut self) -> Frame {
        loop {
            if let Some((h, body)) = codec::split_frame(&self.rbuf, codec::DEFAULT_MAX_BODY).unwrap() {
                let frame = Frame::decode(h, body).unwrap();
                self.rbuf.advance(h.frame_len());
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "client closed before sending a whole request");
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Blocks until the client closes its side.
    fn wait_for_close(&mut self) {
        let mut chunk = [0u8; 4096];
        while self.stream.read(&mut chunk).unwrap_or(0) > 0 {}
    }

    fn write(&mut self, frames: &[Frame]) {
        let mut buf = BytesMut::new();
        for f in frames {
            f.encode_into(&mut buf, Flags::default());
        }
        self.stream.write_all(&buf).unwrap();
    }
}

fn id_of(frame: &Frame) -> u64 {
    match frame {
        Frame::PushRequest(r) => r.request_id,
        Frame::GroupUpdate(r) => r.request_id,
        Frame::KickRequest(r) => r.request_id,
        Frame::PresenceQuery(r) => r.request_id,
        Frame::DeliveryStatusQuery(r) => r.request_id,
        other => panic!("not a request: {other:?}"),
    }
}

fn push_reply(request_id: u64, delivered: u64) -> Frame {
    Frame::PushReply(proto::PushReply { request_id, delivered, ..Default::default() })
}

fn push_req(device: &str) -> Request {
    Request::Push(proto::PushRequest {
        targets: Some(proto::Targets { devices: vec![device.into()], ..Default::default() }),
        payload: Bytes::from_static(b"hi"),
        ..Default::default()
    })
}

fn connect(addr: SocketAddr) -> PushClient {
    // The fake node asks for no credential.
    let mut client = PushClient::from_stream(TcpStream::connect(addr).unwrap()).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client
}

#[test]
fn pipelined_requests_get_replies_in_completion_order() {
    let (addr, node) = FakeNode::start(|mut n| {
        // All three requests arrive before any reply is written.
        let reqs: Vec<Frame> = (0..3).map(|_| n.read()).collect();
        let ids: Vec<u64> = reqs.iter().map(id_of).collect();
        assert_eq!(ids, [1, 2, 3]);
        n.write(&[push_reply(3, 30), push_reply(1, 10), push_reply(2, 20)]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    for (i, device) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(client.send(push_req(device)).unwrap(), i as u64 + 1);
    }
    client.flush().unwrap();
    let got: Vec<(u64, u64)> = (0..3)
        .map(|_| match client.recv().unwrap() {
            Reply::Push(r) => (r.request_id, r.delivered),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, [(3, 30), (1, 10), (2, 20)]);
    drop(client);
    node.join().unwrap();
}

#[test]
fn convenience_call_keeps_other_replies_for_recv() {
    let (addr, node) = FakeNode::start(|mut n| {
        let first = n.read();
        let second = n.read();
        assert!(matches!(first, Frame::PushRequest(_)));
        let Frame::PresenceQuery(q) = second else { panic!("{second:?}") };
        assert_eq!(q.devices, ["d1"]);
        assert_eq!(q.groups, ["g"]);
        // The pipelined push completes first.
        n.write(&[
            push_reply(1, 7),
            Frame::PresenceReply(proto::PresenceReply {
                request_id: 2,
                connections_total: 5,
                connections_per_shard: vec![2, 3],
                ..Default::default()
            }),
        ]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    assert_eq!(client.send(push_req("x")).unwrap(), 1);
    let presence = client.presence(&["d1"], &[], &["g"]).unwrap();
    assert_eq!(presence.request_id, 2);
    assert_eq!(presence.connections_per_shard, [2, 3]);
    assert_eq!(
        client.recv().unwrap(),
        Reply::Push(proto::PushReply { request_id: 1, delivered: 7, ..Default::default() })
    );
    drop(client);
    node.join().unwrap();
}

#[test]
fn convenience_calls_wait_for_their_own_id() {
    // A reply to an id nobody waits for (as if from an earlier pipelined
    // request) comes first; each call still gets its own.
    let (addr, node) = FakeNode::start(|mut n| {
        let kick = n.read();
        let Frame::KickRequest(k) = &kick else { panic!("{kick:?}") };
        assert_eq!(k.code, ErrorCode::Replaced as i32);
        assert_eq!(k.users, ["u1"]);
        n.write(&[
            Frame::AdminReply(proto::AdminReply { request_id: 99, ..Default::default() }),
            Frame::AdminReply(proto::AdminReply {
                request_id: 1,
                results: vec![proto::TargetResult {
                    target: "u1".into(),
                    status: proto::PushStatus::Delivered as i32,
                    sessions: 2,
                    ..Default::default()
                }],
            }),
        ]);
        let group = n.read();
        let Frame::GroupUpdate(g) = &group else { panic!("{group:?}") };
        assert_eq!((g.request_id, g.group.as_str()), (2, "g"));
        assert_eq!((g.add_devices.len(), g.remove_devices.len()), (1, 0));
        n.write(&[Frame::AdminReply(proto::AdminReply { request_id: 2, ..Default::default() })]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    let kicked = client.kick_users(&["u1"], ErrorCode::Replaced, "moved").unwrap();
    assert_eq!(kicked.results[0].sessions, 2);
    let updated = client.group_update("g", &["a"], &[]).unwrap();
    assert_eq!(updated.request_id, 2);
    assert_eq!(client.recv().unwrap().request_id(), 99);
    drop(client);
    node.join().unwrap();
}

#[test]
fn request_error_is_rejected_and_the_connection_stays_usable() {
    let (addr, node) = FakeNode::start(|mut n| {
        let id = id_of(&n.read());
        n.write(&[Frame::RequestError(proto::RequestError {
            request_id: id,
            code: ErrorCode::BadFrame as i32,
            reason: "no targets".into(),
        })]);
        let id = id_of(&n.read());
        n.write(&[push_reply(id, 1)]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    let err = client.push_devices::<&str>(&[], Bytes::new()).unwrap_err();
    assert!(
        matches!(&err, BackendError::Rejected { code: ErrorCode::BadFrame, reason } if reason == "no targets"),
        "{err:?}"
    );
    assert_eq!(client.push_devices(&["d"], Bytes::new()).unwrap().delivered, 1);
    drop(client);
    node.join().unwrap();
}

#[test]
fn error_frame_then_close_is_closed_with_the_nodes_code() {
    let (addr, node) = FakeNode::start(|mut n| {
        n.read();
        n.write(&[Frame::Error(codes::error_body(ErrorCode::Shutdown, "bye"))]);
    });
    let mut client = connect(addr);
    let err = client.broadcast(Bytes::from_static(b"x")).unwrap_err();
    assert!(matches!(&err, BackendError::Closed { code: ErrorCode::Shutdown, reason } if reason == "bye"), "{err:?}");
    assert_eq!(err.to_string(), "node closed the connection: SHUTDOWN (bye)");
    node.join().unwrap();
}

#[test]
fn close_without_a_reply_is_eof() {
    let (addr, node) = FakeNode::start(|mut n| {
        n.read();
    });
    let mut client = connect(addr);
    let err = client.push_group("g", Bytes::new()).unwrap_err();
    assert!(matches!(err, BackendError::Eof), "{err:?}");
    node.join().unwrap();
}

#[test]
fn client_port_frames_and_mismatched_replies_are_protocol_errors() {
    let (addr, node) = FakeNode::start(|mut n| {
        n.read();
        n.write(&[Frame::Pong]);
        let id = id_of(&n.read());
        // A push answered with an admin reply.
        n.write(&[Frame::AdminReply(proto::AdminReply { request_id: id, ..Default::default() })]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    let err = client.push_users(&["u"], Bytes::new()).unwrap_err();
    assert!(matches!(&err, BackendError::Protocol(m) if m.contains("Pong")), "{err:?}");
    let err = client.push_users(&["u"], Bytes::new()).unwrap_err();
    assert!(matches!(&err, BackendError::Protocol(m) if m.contains("AdminReply")), "{err:?}");
    drop(client);
    node.join().unwrap();
}

#[test]
fn large_replies_are_read_and_the_limit_is_enforced() {
    let devices: Vec<proto::DevicePresence> = (0..20_000)
        .map(|i| proto::DevicePresence { device: format!("device-{i}"), online: true, ..Default::default() })
        .collect();
    let big = proto::PresenceReply { request_id: 1, devices, ..Default::default() };
    let expected = big.clone();
    let (addr, node) = FakeNode::start(move |mut n| {
        n.read();
        n.write(&[Frame::PresenceReply(big.clone())]);
        let id = id_of(&n.read());
        // The client stops reading at this frame's header and closes, so
        // the write may fail part way.
        let frame = Frame::PresenceReply(proto::PresenceReply { request_id: id, ..big });
        let _ = n.stream.write_all(&frame.to_bytes());
        n.wait_for_close();
    });
    let mut client = connect(addr);
    let reply = client.presence::<&str>(&[], &[], &[]).unwrap();
    assert!(prost::Message::encoded_len(&reply) > 256 * 1024);
    assert_eq!(reply, expected);
    client.set_max_reply_bytes(64 * 1024);
    let err = client.presence::<&str>(&[], &[], &[]).unwrap_err();
    assert!(matches!(err, BackendError::Codec(CodecError::TooLarge { max: 65_536, .. })), "{err:?}");
    drop(client);
    node.join().unwrap();
}

#[test]
fn oversized_request_is_refused_before_it_is_sent() {
    let (addr, node) = FakeNode::start(|mut n| {
        let Frame::PushRequest(r) = n.read() else { panic!() };
        // The refused request used no id.
        assert_eq!(r.request_id, 1);
        n.write(&[push_reply(1, 1)]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    client.set_max_request_bytes(100);
    let err = client.push_devices(&["d"], Bytes::from(vec![0u8; 200])).unwrap_err();
    assert!(matches!(err, BackendError::RequestTooLarge { max: 100, .. }), "{err:?}");
    assert_eq!(client.push_devices(&["d"], Bytes::from(vec![0u8; 50])).unwrap().delivered, 1);
    drop(client);
    node.join().unwrap();
}

#[test]
fn backlog_overflow_is_an_error() {
    let (addr, node) = FakeNode::start(|mut n| {
        for _ in 0..4 {
            n.read();
        }
        n.write(&[push_reply(1, 0), push_reply(2, 0), push_reply(3, 0)]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    client.set_max_buffered_replies(2);
    for _ in 0..3 {
        client.send(push_req("d")).unwrap();
    }
    let err = client.push_devices(&["d"], Bytes::new()).unwrap_err();
    assert!(matches!(err, BackendError::Backlog(2)), "{err:?}");
    // Nothing was lost: the kept replies are still there.
    let ids: Vec<u64> = (0..3).map(|_| client.recv().unwrap().request_id()).collect();
    assert_eq!(ids, [1, 2, 3]);
    drop(client);
    node.join().unwrap();
}

#[test]
fn read_timeout_is_typed_and_recoverable() {
    let (addr, node) = FakeNode::start(|mut n| {
        let id = id_of(&n.read());
        // The client has timed out once it sends its second request.
        let second = id_of(&n.read());
        n.write(&[push_reply(id, 4), push_reply(second, 5)]);
        n.wait_for_close();
    });
    let mut client = connect(addr);
    client.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    client.send(push_req("d")).unwrap();
    client.flush().unwrap();
    let err = client.recv().unwrap_err();
    assert!(matches!(err, BackendError::Timeout(d) if d == Duration::from_millis(20)), "{err:?}");
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    assert_eq!(client.push_devices(&["d"], Bytes::new()).unwrap().delivered, 5);
    assert_eq!(client.recv().unwrap().request_id(), 1);
    drop(client);
    node.join().unwrap();
}

#[test]
fn split_halves_pipeline_across_threads() {
    const N: u64 = 5_000;
    let (addr, node) = FakeNode::start(|mut n| {
        for _ in 0..N {
            let id = id_of(&n.read());
            n.write(&[push_reply(id, id)]);
        }
        n.wait_for_close();
    });
    let (mut tx, mut rx) = connect(addr).split().unwrap();
    let sender = thread::spawn(move || {
        for _ in 0..N {
            tx.send(push_req("device-with-a-longer-name")).unwrap();
        }
        tx.flush().unwrap();
        tx
    });
    let mut seen = vec![false; N as usize + 1];
    for _ in 0..N {
        let Reply::Push(r) = rx.recv().unwrap() else { panic!() };
        assert_eq!(r.request_id, r.delivered);
        assert!(!std::mem::replace(&mut seen[r.request_id as usize], true), "duplicate {}", r.request_id);
    }
    assert!(seen[1..].iter().all(|&s| s));
    drop(sender.join().unwrap());
    drop(rx);
    node.join().unwrap();
}
