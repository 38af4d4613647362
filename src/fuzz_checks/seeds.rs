//! Seed inputs for each target, made from real frames, requests and
//! configs, so fuzzing starts from what the code sees in use.
//! `tests/fuzz_corpus.rs` checks them and writes them to `fuzz/seeds/`.

use bytes::Bytes;

use crate::config::Config;
use crate::protocol::codec::Frame;
use crate::protocol::proto;

/// `(name, input)` pairs for `target` (a name in [`super::TARGETS`]).
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "frame" => frames(),
        "session" => sessions(),
        "push" => push(),
        "http" => http(),
        "config" => configs(),
        "ws_decoder" => named(super::ws::seeds_decoder()),
        "ws_handshake" => named(super::ws::seeds_handshake()),
        _ => Vec::new(),
    }
}

fn named(items: Vec<(&str, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    items.into_iter().map(|(name, bytes)| (name.to_owned(), bytes)).collect()
}

/// One frame of every kind, as the server, clients and backends send them.
pub fn sample_frames() -> Vec<Frame> {
    let conn = proto::ConnInfo {
        user: "alice".into(),
        device: "phone-1".into(),
        app: "chat".into(),
        platform: "ios".into(),
        client_version: "1.2.3".into(),
        conn_id: 0x0001_0000_0005,
        node: "node-1".into(),
        client_addr: "10.0.0.5:50123".into(),
    };
    let result = proto::TargetResult {
        target: "alice".into(),
        status: proto::PushStatus::Stored as i32,
        sessions: 1,
        copies: vec![proto::StoredCopy { device: "phone-1".into(), seq: 1_800_000_000_000_001, message_id: 77 }],
        ..Default::default()
    };
    let device = proto::DevicePresence {
        device: "phone-1".into(),
        online: true,
        shard: 1,
        connected_at_ms: 1_800_000_000_000,
        client_version: "1.2.3".into(),
        platform: "ios".into(),
        user: "alice".into(),
        conn_id: 5,
    };
    vec![
        Frame::Auth(proto::Auth {
            token: "CgVhbGljZRIHcGhvbmUtMQ.c2lnbmF0dXJl".into(),
            device: "phone-1".into(),
            platform: "android".into(),
            client_version: "1.2.3".into(),
            capabilities: 1,
            last_seq: 1_800_000_000_000_042,
            heartbeat_ms: 30_000,
            store_incarnation: 99,
        }),
        Frame::AuthOk(proto::AuthOk {
            conn_id: 7,
            heartbeat_min_ms: 5_000,
            heartbeat_max_ms: 270_000,
            heartbeat_ms: 30_000,
            idle_timeout_ms: 90_000,
            server_time_ms: 1_800_000_000_000,
            shard: 1,
            node: "node-1".into(),
            store_incarnation: 99,
            token_expires_ms: 1_800_003_600_000,
        }),
        Frame::Error(proto::Error {
            code: proto::ErrorCode::IdleTimeout as i32,
            reason: "idle".into(),
            reconnect: true,
        }),
        Frame::Ping,
        Frame::Pong,
        Frame::Kicked(proto::Kicked { code: proto::ErrorCode::Replaced as i32, reason: "replaced".into() }),
        Frame::GoAway(proto::GoAway { endpoint: "10.0.0.2:7100".into(), reason: "drain".into() }),
        Frame::Message(proto::Message {
            payload: Bytes::from_static(b"hello"),
            service_id: "chat".into(),
            message_id: 2_873_641_234_567,
            seq: 1_800_000_000_000_001,
        }),
        Frame::Ack(proto::Ack { seq: 1_800_000_000_000_001 }),
        Frame::ResyncRequired(proto::ResyncRequired { from_seq: 3, to_seq: 9 }),
        Frame::Join(proto::GroupMembership { group: "room-1".into() }),
        Frame::Leave(proto::GroupMembership { group: "room-1".into() }),
        Frame::PushRequest(proto::PushRequest {
            request_id: 1,
            targets: Some(proto::Targets { devices: vec!["phone-1".into(), "tablet-2".into()], ..Default::default() }),
            payload: Bytes::from_static(b"hi"),
            service_id: "chat".into(),
            ttl_ms: 60_000,
            qos: proto::Qos::AtLeastOnce as i32,
            forwarded: false,
        }),
        Frame::PushReply(proto::PushReply {
            request_id: 1,
            results: vec![result.clone()],
            delivered: 1,
            stored: 1,
            status: proto::PushStatus::Stored as i32,
            ..Default::default()
        }),
        Frame::GroupUpdate(proto::GroupUpdate {
            request_id: 2,
            group: "room-1".into(),
            add_devices: vec!["phone-1".into()],
            remove_devices: vec!["tablet-2".into()],
            forwarded: false,
        }),
        Frame::KickRequest(proto::KickRequest {
            request_id: 3,
            devices: vec!["phone-1".into()],
            users: vec!["bob".into()],
            code: proto::ErrorCode::Kicked as i32,
            reason: "logged out".into(),
            forwarded: true,
            revoke: false,
            conn_ids: vec![5],
        }),
        Frame::PresenceQuery(proto::PresenceQuery {
            request_id: 4,
            devices: vec!["phone-1".into()],
            users: vec!["alice".into()],
            groups: vec!["room-1".into()],
            forwarded: false,
        }),
        Frame::PresenceReply(proto::PresenceReply {
            request_id: 4,
            devices: vec![device.clone()],
            users: vec![proto::UserPresence { user: "alice".into(), devices: vec![device] }],
            groups: vec![proto::GroupCount { group: "room-1".into(), online: 2 }],
            connections_per_shard: vec![3, 4],
            connections_total: 7,
        }),
        Frame::AdminReply(proto::AdminReply { request_id: 2, results: vec![result] }),
        Frame::RequestError(proto::RequestError {
            request_id: 5,
            code: proto::ErrorCode::LimitExceeded as i32,
            reason: "more than 1000 targets".into(),
        }),
        Frame::DeliveryStatusQuery(proto::DeliveryStatusQuery { request_id: 6, message_ids: vec![77, 78] }),
        Frame::DeliveryStatusReply(proto::DeliveryStatusReply {
            request_id: 6,
            statuses: vec![proto::MessageStatus {
                message_id: 77,
                state: proto::DeliveryState::Acked as i32,
                device: "phone-1".into(),
                seq: 5,
                stored_at_ms: 1,
                sent_at_ms: 2,
                acked_at_ms: 3,
                reason: String::new(),
            }],
        }),
        Frame::Request(proto::Request {
            service_id: "chat".into(),
            request_id: 3,
            client_msg_id: 77,
            body: Bytes::from_static(b"{\"q\":1}"),
        }),
        Frame::Response(proto::Response {
            request_id: 3,
            status: 0,
            body: Bytes::from_static(b"{\"a\":1}"),
            reason: String::new(),
        }),
        Frame::UpstreamRequest(proto::UpstreamRequest {
            id: 9,
            service_id: "chat".into(),
            conn: Some(conn.clone()),
            client_msg_id: 77,
            body: Bytes::from_static(b"q"),
            timeout_ms: 5_000,
        }),
        Frame::UpstreamResponse(proto::UpstreamResponse {
            id: 9,
            status: 0,
            body: Bytes::from_static(b"a"),
            reason: String::new(),
        }),
        Frame::ConnectionEvents(proto::ConnectionEvents {
            batch_id: 4,
            service_id: "chat".into(),
            events: vec![proto::ConnectionEvent {
                kind: proto::ConnectionEventKind::Online as i32,
                conn: Some(conn),
                at_ms: 1,
                code: 0,
            }],
        }),
        Frame::EventsAck(proto::EventsAck { batch_id: 4 }),
    ]
}

fn frames() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut all = vec![0];
    for frame in sample_frames() {
        let bytes = frame.to_bytes();
        all.extend_from_slice(&bytes);
        out.push((format!("{:?}", frame.kind()), [&[0][..], &bytes].concat()));
    }
    out.push(("all-kinds".into(), all));
    // The example from proto/README.md, and the limits.
    out.extend(named(vec![
        ("readme-kicked", vec![0, 0x4C, 0x01, 0x06, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0xD3, 0x0F]),
        ("four-gib-header", vec![0, 0x4C, 0x01, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF]),
        ("http-on-the-client-port", b"\0GET / HTTP/1.1\r\n\r\n".to_vec()),
    ]));
    out
}

/// Builds a `session` program (see [`super::session::check`]).
struct Program(Vec<u8>);

impl Program {
    /// Default frame limit, wall clock at T0, monotonic clock at 1000 ms.
    fn new() -> Program {
        let mut p = Program(vec![0, 3]);
        p.0.extend_from_slice(&1000u32.to_le_bytes());
        p
    }

    fn string(&mut self, s: &str) -> &mut Self {
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    fn time(&mut self, relative_secs: i32) -> &mut Self {
        self.0.push(if i8::try_from(relative_secs).is_ok() { 2 } else { 4 });
        self.0.extend_from_slice(&relative_secs.to_le_bytes());
        self
    }

    /// A token for alice's phone valid from `issued` to `expires` seconds
    /// from now, sent whole in one read.
    fn auth(&mut self, issued: i32, expires: i32) -> &mut Self {
        self.0.push(1);
        self.string("alice").string("phone-1").string("chat").time(issued).time(expires);
        self.0.extend_from_slice(&[3, 2, 0, 0, 1]); // signing key, no damage, Auth.device = token's
        self.string("android").string("1.2.3");
        self.0.extend_from_slice(&1u32.to_le_bytes()); // capabilities
        self.0.extend_from_slice(&0u64.to_le_bytes()); // last_seq
        self.0.extend_from_slice(&20_000u32.to_le_bytes()); // heartbeat
        self.0.extend_from_slice(&[0, 0xff, 0xff]); // flags, split past the end
        self
    }

    fn activate(&mut self) -> &mut Self {
        self.0.push(4);
        self.0.extend_from_slice(&9u64.to_le_bytes());
        self
    }

    /// A client frame: `kind` as in `client_frame`, then its operands.
    fn frame(&mut self, kind: u8, operands: &[u8]) -> &mut Self {
        self.0.push(2);
        self.0.push(kind);
        self.0.extend_from_slice(operands);
        self.0.extend_from_slice(&[0, 0xff, 0xff]);
        self
    }

    fn wait_ms(&mut self, ms: u16) -> &mut Self {
        self.0.push(3);
        self.0.extend_from_slice(&ms.to_le_bytes());
        self.0.push(0);
        self
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.push(0);
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }

    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

fn sessions() -> Vec<(String, Vec<u8>)> {
    let join = [&[4u8][..], b"room"].concat();
    let mut request = vec![4u8];
    request.extend_from_slice(b"chat");
    request.extend_from_slice(&1u64.to_le_bytes());
    request.extend_from_slice(&77u64.to_le_bytes());
    request.extend_from_slice(&[2, b'h', b'i']);
    let ack = 42u64.to_le_bytes();
    named(vec![
        (
            "login-ping-join-request-ack",
            Program::new()
                .auth(-10, 3600)
                .activate()
                .frame(0, &[])
                .frame(1, &join)
                .frame(3, &request)
                .frame(4, &ack)
                .wait_ms(50_000)
                .frame(0, &[])
                .done(),
        ),
        ("frames-behind-auth", Program::new().auth(-10, 3600).frame(0, &[]).frame(1, &join).activate().done()),
        ("expired-token", Program::new().auth(-7200, -3600).done()),
        // Still valid: exactly at the edges of the 30 s leeway.
        ("expired-at-the-leeway-edge", Program::new().auth(-40, -30).activate().done()),
        ("issued-at-the-leeway-edge", Program::new().auth(30, 3600).activate().done()),
        ("ping-before-auth", Program::new().frame(0, &[]).auth(-10, 3600).done()),
        ("idle-timeout", Program::new().auth(0, 60).activate().wait_ms(60_000).wait_ms(60_000).done()),
        ("garbage", Program::new().raw(b"GET / HTTP/1.1\r\n\r\n").done()),
        ("kicked-while-registering", {
            let mut p = Program::new();
            p.auth(-10, 3600);
            p.0.extend_from_slice(&[5, 0xd3, 0x07, 0]); // kick: REPLACED (2003), no reason
            p.done()
        }),
    ])
}

fn push() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut all = vec![1, 2, 4, 0];
    for frame in sample_frames() {
        let bytes = frame.to_bytes();
        all.extend_from_slice(&bytes);
        if matches!(
            frame,
            Frame::PushRequest(_)
                | Frame::GroupUpdate(_)
                | Frame::KickRequest(_)
                | Frame::PresenceQuery(_)
                | Frame::DeliveryStatusQuery(_)
        ) {
            // 64 KiB requests, up to 1000 targets, 4 shards.
            out.push((format!("{:?}", frame.kind()), [&[1, 2, 4, 0][..], &bytes].concat()));
        }
    }
    out.push(("all-kinds".into(), all));
    let targets = |t: proto::Targets, qos: proto::Qos| {
        Frame::PushRequest(proto::PushRequest {
            request_id: 9,
            targets: Some(t),
            payload: Bytes::from_static(b"p"),
            qos: qos as i32,
            ..Default::default()
        })
        .to_bytes()
    };
    let users = proto::Targets { users: vec!["alice".into(), String::new()], ..Default::default() };
    let group = proto::Targets { group: "room-1".into(), ..Default::default() };
    let broadcast = proto::Targets { broadcast: true, ..Default::default() };
    for (name, bytes) in [
        ("push-users", targets(users, proto::Qos::AtMostOnce)),
        ("push-group-reliable", targets(group, proto::Qos::AtLeastOnce)),
        ("push-broadcast", targets(broadcast, proto::Qos::AtMostOnce)),
    ] {
        out.push((name.into(), [&[1, 2, 4, 0][..], &bytes].concat()));
    }
    out
}

fn http() -> Vec<(String, Vec<u8>)> {
    named(vec![
        ("dispatch", b"\x02GET /v1/dispatch?uid=alice&device=phone%201&platform=ios&net=wifi HTTP/1.1\r\nhost: 127.0.0.1:7102\r\n\r\n".to_vec()),
        (
            "keep-alive-then-close",
            b"\x02GET /metrics HTTP/1.1\r\nhost: a\r\n\r\nPOST /drain HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}GET /healthz HTTP/1.1\r\nconnection: close\r\n\r\n".to_vec(),
        ),
        ("http-1.0", b"\x01GET /healthz HTTP/1.0\n\n".to_vec()),
        ("long-line", [&b"\x00GET /"[..], &[b'a'; 300], b" HTTP/1.1\r\n\r\n"].concat()),
    ])
}

fn configs() -> Vec<(String, Vec<u8>)> {
    let keys = "[auth]\nsigning_key = \"2025-02\"\n\
                [[auth.keys]]\nid = \"2025-01\"\nsecret_hex = \"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\"\n\
                [[auth.keys]]\nid = \"2025-02\"\nsecret_hex = \"ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100\"\n";
    let cluster = "node_name = \"node-1\"\n[cluster]\nenabled = true\nadmin_listen = \"127.0.0.1:7102\"\n\
                   client_endpoint = \"10.0.0.1:7100\"\n[delivery]\nredis_url = \"redis://10.0.0.7:6379/\"\nnode_index = 3\n";
    let services = "[upstream]\nrate_limit_per_sec = 0\n[[upstream.services]]\nid = \"chat\"\n\
                    backends = [\"127.0.0.1:7200\", \"[::1]:7200\"]\ntimeout_ms = 50\nsubscribe_events = true\n";
    named(vec![
        ("generated", Config::default_toml().into_bytes()),
        ("keys", keys.as_bytes().to_vec()),
        ("cluster", cluster.as_bytes().to_vec()),
        ("services", services.as_bytes().to_vec()),
        ("bad-secret", b"[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"0011\"\n".to_vec()),
    ])
}
