//! Admission on the client port, against a real node process: per-source
//! limits at accept, and what a client may make the node hold before it
//! has authenticated.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::proto::{self, ErrorCode, FrameKind};

/// A blocking connection to `to` from the loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: IpAddr = from.parse().expect("source address");
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(10))?;
    Ok(socket.into())
}

/// The sum of a /metrics family's samples whose labels contain `filter`.
fn metric(admin: SocketAddr, name: &str, filter: &str) -> u64 {
    let (_, body) = http(admin, "GET", "/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Auth with a valid token from `from`; the first frame the node answers.
fn login_from(from: &str, node: &NodeProcess, cfg: &longlink::config::Config, device: &str) -> Option<Frame> {
    let mut s = connect_from(from, node.client_addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = proto::Auth { token: token(cfg, "u", device), ..Default::default() };
    s.write_all(&Frame::Auth(auth).to_bytes()).ok()?;
    read_frame_blocking(&mut s, &mut Vec::new())
}

/// Whether the node closed `s` (EOF or reset) without sending anything.
fn closed_silently(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut byte = [0u8; 1];
    matches!(s.read(&mut byte), Ok(0) | Err(_))
}

#[test]
fn one_address_past_its_limit_is_refused_while_its_neighbour_is_served() {
    const LIMIT: u32 = 64;
    const ATTEMPTS: usize = 5_000;
    let mut cfg = test_config(2);
    cfg.session.auth_timeout_ms = 60_000;
    cfg.server.max_connections_per_ip = LIMIT;
    cfg.server.max_connections_per_net = 1_000;
    cfg.server.accepts_per_ip_per_sec = 0;
    cfg.server.accepts_per_net_per_sec = 0;
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin");

    // The attacker holds every connection it gets.
    let mut held = Vec::with_capacity(ATTEMPTS);
    for _ in 0..ATTEMPTS {
        match connect_from("127.0.0.2", node.client_addr) {
            Ok(s) => held.push(s),
            // Reset by the node before our side saw the connection up.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(err) => panic!("connect from 127.0.0.2: {err}"),
        }
    }
    let past = (ATTEMPTS - LIMIT as usize) as u64;
    assert!(
        wait_until(Duration::from_secs(60), || metric(admin, "longlink_admission_refused_total", "ip_connections")
            >= past),
        "refused at accept: {}",
        metric(admin, "longlink_admission_refused_total", "")
    );
    assert_eq!(metric(admin, "longlink_admission_refused_total", ""), past, "nothing else refused");
    assert!(closed_silently(held.last_mut().expect("held")), "a connection past the limit is closed at once");

    // Its neighbour in the same /24 logs in normally meanwhile.
    let answer = login_from("127.0.0.3", &node, &cfg, "neighbour");
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");

    // Closing gives the attacker's address its share back.
    drop(held);
    assert!(wait_until(Duration::from_secs(30), || {
        matches!(login_from("127.0.0.2", &node, &cfg, "again"), Some(Frame::AuthOk(_)))
    }));
}

#[test]
fn accepts_past_the_per_second_rate_are_refused() {
    let mut cfg = test_config(1);
    cfg.server.max_connections_per_ip = 0;
    cfg.server.max_connections_per_net = 0;
    cfg.server.accepts_per_ip_per_sec = 20;
    cfg.server.accepts_per_net_per_sec = 0;
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin");
    // 2,000 attempts: past 20 per second unless they took over 100 s.
    for _ in 0..2_000 {
        match connect_from("127.0.0.4", node.client_addr) {
            Ok(s) => drop(s),
            // Reset by the node before our side saw the connection up.
            Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
        }
    }
    assert!(wait_until(Duration::from_secs(30), || metric(admin, "longlink_admission_refused_total", "ip_rate") > 0));
    let answer = login_from("127.0.0.5", &node, &cfg, "other");
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
}

#[test]
fn host_address_is_exempt_by_default() {
    let mut cfg = test_config(1);
    cfg.server.max_connections_per_ip = 2;
    let node = NodeProcess::start(&cfg);
    let held: Vec<_> = (0..5).map(|_| connect_from("127.0.0.1", node.client_addr).expect("connect")).collect();
    let answer = login_from("127.0.0.1", &node, &cfg, "local");
    assert!(matches!(answer, Some(Frame::AuthOk(_))), "{answer:?}");
    assert_eq!(metric(node.admin_addr.expect("admin"), "longlink_admission_refused_total", ""), 0);
    drop(held);
}

/// A header announcing a body of `len` bytes of kind Auth.
fn auth_header(len: u32) -> Vec<u8> {
    let mut h = vec![codec::MAGIC, codec::VERSION, FrameKind::Auth as u8, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h
}

const PARTIALS: usize = 4_000;

/// Opens [`PARTIALS`] connections from `from`, each writing `bytes`.
fn open_partials(from: &str, node: &NodeProcess, bytes: &[u8]) -> Vec<TcpStream> {
    (0..PARTIALS)
        .map(|_| {
            let mut s = connect_from(from, node.client_addr).expect("connect");
            s.write_all(bytes).expect("write");
            s
        })
        .collect()
}

#[test]
fn partial_frames_before_auth_cost_little_and_are_given_back() {
    let mut cfg = test_config(1);
    // Held until they close, not until the deadline, so RSS can be read.
    cfg.session.auth_timeout_ms = 120_000;
    cfg.server.max_connections_per_ip = 0;
    cfg.server.max_connections_per_net = 0;
    cfg.server.accepts_per_ip_per_sec = 0;
    cfg.server.accepts_per_net_per_sec = 0;
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin");
    // Warm up: one session and a /metrics answer allocate what every later
    // one reuses.
    assert!(matches!(login_from("127.0.0.1", &node, &cfg, "warm"), Some(Frame::AuthOk(_))));
    metric(admin, "longlink_closed_total", "");
    let baseline = node.rss_bytes();
    assert!(baseline > 0, "reads /proc/<pid>/status");

    // 1. A header announcing 60 KiB (a valid frame size, but no Auth is
    // that long) and 30 KiB of it: refused as soon as the header is read.
    let mut big = auth_header(60 * 1024);
    big.resize(big.len() + 30 * 1024, b'x');
    let closed_before = metric(admin, "longlink_closed_total", "");
    let mut refused = open_partials("127.0.0.6", &node, &big);
    let all_closed = wait_until(Duration::from_secs(60), || {
        metric(admin, "longlink_closed_total", "") >= closed_before + PARTIALS as u64 - 1
    });
    let rss_big = node.rss_bytes();
    eprintln!("oversized partials: baseline {baseline} B, now {rss_big} B");
    assert!(all_closed, "every oversized partial frame is refused at its header");
    assert!(
        rss_big < baseline + 16 * 1024 * 1024,
        "4,000 oversized partial Auth frames held {} MB",
        (rss_big - baseline) / (1024 * 1024)
    );
    let mut buf = Vec::new();
    refused[0].set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let answer = read_frame_blocking(&mut refused[0], &mut buf);
    assert!(
        matches!(&answer, Some(Frame::Error(e)) if longlink::protocol::codes::from_wire(e.code) == ErrorCode::FrameTooLarge),
        "{answer:?}"
    );
    drop(refused);

    // 2. The longest Auth frame the node waits for, one byte short: held,
    // at most that much each.
    let max = longlink::protocol::limits::MAX_AUTH_BODY_BYTES;
    let mut partial = auth_header(max);
    partial.resize(partial.len() + max as usize - 1, b'x');
    let bytes_before = metric(admin, "longlink_bytes_in_total", "");
    let held = open_partials("127.0.0.7", &node, &partial);
    let expected = bytes_before + (PARTIALS * partial.len()) as u64;
    assert!(wait_until(Duration::from_secs(60), || metric(admin, "longlink_bytes_in_total", "") >= expected));
    let rss_held = node.rss_bytes();
    let per_conn = rss_held.saturating_sub(baseline) / PARTIALS as u64;
    eprintln!("max-size partials: {rss_held} B, {per_conn} B per connection (frame {} B)", partial.len());
    // The partial frame, the slot, the task and the allocator's rounding.
    assert!(per_conn < 3 * partial.len() as u64, "{per_conn} B per connection");

    // 3. They close: the memory goes back (the allocator keeps some: the
    // slab of slots does not shrink, and freed chunks may stay mapped).
    drop(held);
    let closed = closed_before + 2 * PARTIALS as u64 - 1;
    assert!(wait_until(Duration::from_secs(60), || metric(admin, "longlink_closed_total", "") >= closed));
    // Tolerance 8 MiB (a third of the rise): the slab of slots keeps its
    // size and the allocator keeps some pages. Measured: 1 to 2.6 MB.
    let mut rss_after = node.rss_bytes();
    wait_until(Duration::from_secs(10), || {
        rss_after = node.rss_bytes();
        rss_after < baseline + 8 * 1024 * 1024
    });
    eprintln!("after close: {rss_after} B (baseline {baseline} B, peak {rss_held} B)");
    assert!(
        rss_after < baseline + 8 * 1024 * 1024,
        "RSS {} MB above baseline after every partial closed",
        (rss_after - baseline) / (1024 * 1024)
    );
}

#[test]
fn push_port_refusals_are_counted_by_code() {
    let cfg = test_config(1);
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin");
    // A key the node does not know.
    let wrong = longlink::push::auth::parse_credential(&format!("nobody:{}", "ab".repeat(32))).expect("credential");
    let mut s = TcpStream::connect(node.push_addr).expect("push port");
    let answer = raw_push_auth(&mut s, &wrong);
    assert!(
        matches!(&answer, Some(Frame::Error(e)) if longlink::protocol::codes::from_wire(e.code) == ErrorCode::Unauthenticated),
        "{answer:?}"
    );
    // A known key without the right asked for.
    let reply = push_client(node.push_addr).revoke(&["d"], &[], "");
    assert!(reply.is_err(), "{reply:?}");
    assert!(wait_until(Duration::from_secs(10), || {
        metric(admin, "longlink_push_refused_total", "code=\"UNAUTHENTICATED\"") == 1
            && metric(admin, "longlink_push_refused_total", "code=\"PERMISSION_DENIED\"") == 1
    }));
}

#[test]
fn push_port_partial_frames_before_auth_cost_little_and_are_given_back() {
    let mut cfg = test_config(1);
    cfg.push_auth.auth_timeout_ms = 120_000;
    cfg.push_auth.max_unauthenticated_per_shard = 8_192;
    let node = NodeProcess::start(&cfg);
    let admin = node.admin_addr.expect("admin");
    metric(admin, "longlink_closed_total", "");
    let baseline = node.rss_bytes();
    // A PushAuth header announcing 120 bytes (a size a PushAuth may
    // have), and 100 of them: held until the auth deadline.
    let mut partial = vec![codec::MAGIC, codec::VERSION, FrameKind::PushAuth as u8, 0];
    partial.extend_from_slice(&120u32.to_be_bytes());
    partial.resize(partial.len() + 100, b'x');
    let held: Vec<TcpStream> = (0..PARTIALS)
        .map(|_| {
            let mut s = TcpStream::connect(node.push_addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            // Its challenge: the node holds a slot for it.
            let challenge = read_frame_blocking(&mut s, &mut Vec::new());
            assert!(matches!(challenge, Some(Frame::PushChallenge(_))), "{challenge:?}");
            s.write_all(&partial).expect("write");
            s
        })
        .collect();
    assert_eq!(metric(admin, "longlink_push_refused_total", ""), 0, "every one is held");
    let rss_held = node.rss_bytes();
    let per_conn = rss_held.saturating_sub(baseline) / PARTIALS as u64;
    eprintln!("push port: baseline {baseline} B, held {rss_held} B, {per_conn} B per connection");
    assert!(per_conn < 4 * 1024, "{per_conn} B per unauthenticated push connection");
    drop(held);
    // What is given back is small here: the slab of backend slots (about
    // 500 B each) keeps its size. Measured: +5.7 MB held, +4.1 MB after.
    let mut rss_after = node.rss_bytes();
    wait_until(Duration::from_secs(20), || {
        rss_after = node.rss_bytes();
        rss_after < rss_held
    });
    eprintln!("push port after close: {rss_after} B");
    assert!(rss_after <= rss_held, "RSS grew after close: {rss_after} B, held {rss_held} B");
}
