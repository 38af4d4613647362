//! TLS on the client port (`tls_listen`) and WebSocket over TLS
//! (`wss_listen`): a test CA made here, rustls' ordinary (buffered) client
//! on the other end, pushes sent with the `longlink` CLI.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use longlink::config::Config;
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::proto;
use rustls::pki_types::{CertificateDer, ServerName};

const WAIT: Duration = Duration::from_secs(20);

/// A CA and a leaf for "localhost" signed by it, as PEM files in `dir`.
struct Pki {
    ca: CertificateDer<'static>,
    /// The CA certificate as PEM (for `--ca`, `cluster.tls_ca_file`).
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn make_pki(dir: &Path, stem: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf named like its issuer for
    // self-signed.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("longlink test CA {stem}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf_params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let cert_file = dir.join(format!("{stem}.crt"));
    let key_file = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_file, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    let ca_file = dir.join(format!("{stem}-ca.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    Pki { ca: ca.der().clone(), ca_file, cert_file, key_file }
}

fn config(pki: &Pki) -> Config {
    let mut cfg = test_config(2);
    cfg.server.tls_listen = "127.0.0.1:0".into();
    cfg.server.wss_listen = "127.0.0.1:0".into();
    cfg.tls.cert_file = pki.cert_file.clone();
    cfg.tls.key_file = pki.key_file.clone();
    cfg
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(cfg)
}

/// Connects and completes the handshake (or returns its error).
fn connect(addr: SocketAddr, ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let sock = TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(WAIT))?;
    let conn = rustls::ClientConnection::new(client_config(ca, alpn), ServerName::try_from("localhost").unwrap())
        .map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

fn auth(token: &str) -> Vec<u8> {
    Frame::Auth(proto::Auth { token: token.to_owned(), heartbeat_ms: 20_000, ..Default::default() }).to_bytes().to_vec()
}

/// Reads longlink frames from a byte stream.
struct Frames<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: Read> Frames<S> {
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

fn cli(args: &[&str]) {
    let out = cli_output(args);
    assert!(out.status.success(), "longlink {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn cli_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(args)
        .env("RUST_LOG", "warn")
        // The push key of the tests' config (see common::push_key).
        .env("LONGLINK_PUSH_KEY", format!("{PUSH_KEY_ID}:{PUSH_KEY_HEX}"))
        .output()
        .unwrap()
}

fn expect_message<S: Read>(f: &mut Frames<S>, payload: &[u8]) {
    match f.recv() {
        Frame::Message(m) => assert_eq!(&m.payload[..], payload),
        other => panic!("expected a Message, got {other:?}"),
    }
}

/// An authenticated TLS client of `device`.
fn tls_client(
    server: &longlink::server::Server,
    cfg: &Config,
    ca: &CertificateDer<'static>,
    device: &str,
) -> Frames<Tls> {
    let addr = server.links().tls.expect("tls_listen is on");
    let mut tls = connect(addr, ca, &[b"longlink/1"]).expect("handshake");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"longlink/1"[..]));
    tls.write_all(&auth(&token(cfg, "u", device))).unwrap();
    let mut f = Frames { s: tls, buf: Vec::new() };
    assert!(matches!(f.recv(), Frame::AuthOk(_)));
    f
}

#[test]
fn tls_client_authenticates_and_receives_a_cli_push() {
    let dir = TempDir::new("tls");
    let pki = make_pki(&dir.0, "a");
    let cfg = config(&pki);
    let server = start(&cfg);
    let push = server.push_addr().to_string();
    // Two shards, 16 devices: some sessions are handed off to their owner
    // shard with their TLS session (1 in 65536 runs would see none).
    let mut clients: Vec<_> = (0..16).map(|i| tls_client(&server, &cfg, &pki.ca, &format!("tls-{i}"))).collect();
    let handed: u64 = server.counters().iter().map(|c| c.handed_off.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(handed > 0, "some TLS sessions moved to their owner shard");
    for (i, c) in clients.iter_mut().enumerate() {
        cli(&["push", "--server", &push, "--device", &format!("tls-{i}"), "over tls"]);
        expect_message(c, b"over tls");
    }
    // A group push reaches every TLS member (each sealed with its own keys),
    // several frames in a row too.
    let devices: Vec<String> = (0..16).map(|i| format!("tls-{i}")).collect();
    cli(&["group", "join", "--server", &push, "--group", "g", &devices.join(",")]);
    for n in 0..3 {
        cli(&["push", "--server", &push, "--group", "g", &format!("group {n}")]);
    }
    for c in &mut clients {
        for n in 0..3 {
            expect_message(c, format!("group {n}").as_bytes());
        }
    }
    // Heartbeat over TLS.
    clients[0].s.write_all(&Frame::Ping.to_bytes()).unwrap();
    assert!(matches!(clients[0].recv(), Frame::Pong));
    server.shutdown();
}

#[test]
fn wss_upgrade_auth_with_protocol_token_and_push() {
    let dir = TempDir::new("wss");
    let pki = make_pki(&dir.0, "a");
    let cfg = config(&pki);
    let server = start(&cfg);
    let addr = server.links().wss.expect("wss_listen is on");
    let mut tls = connect(addr, &pki.ca, &[b"http/1.1"]).expect("handshake");
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let tok = token(&cfg, "u", "wss-1");
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: longlink.v1, longlink.token.{tok}\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tls.read(&mut chunk).unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    buf.drain(..end);
    // Auth without a token, as one masked binary message.
    let payload = auth("");
    let mut frame = vec![0x82, 0x80 | payload.len() as u8, 1, 2, 3, 4];
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]));
    tls.write_all(&frame).unwrap();
    // Server messages: unmasked binary frames, each one longlink frame.
    let mut next_message = |buf: &mut Vec<u8>| -> Frame {
        loop {
            if buf.len() >= 2 && buf[1] < 126 && buf.len() >= 2 + usize::from(buf[1]) {
                assert_eq!(buf[0], 0x82);
                let len = usize::from(buf[1]);
                let frames = decode_all(&buf[2..2 + len]);
                buf.drain(..2 + len);
                return frames.into_iter().next().expect("a frame");
            }
            if buf.len() >= 4 && buf[1] == 126 {
                let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                if buf.len() >= 4 + len {
                    let frames = decode_all(&buf[4..4 + len]);
                    buf.drain(..4 + len);
                    return frames.into_iter().next().expect("a frame");
                }
            }
            let n = tls.read(&mut chunk).unwrap();
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    assert!(matches!(next_message(&mut buf), Frame::AuthOk(_)));
    let push = server.push_addr().to_string();
    cli(&["push", "--server", &push, "--device", "wss-1", "over wss"]);
    match next_message(&mut buf) {
        Frame::Message(m) => assert_eq!(&m.payload[..], b"over wss"),
        other => panic!("{other:?}"),
    }
    server.shutdown();
}

#[test]
fn a_certificate_from_another_ca_or_no_common_alpn_is_refused() {
    let dir = TempDir::new("tls-bad");
    let pki = make_pki(&dir.0, "a");
    let other = make_pki(&dir.0, "other");
    let cfg = config(&pki);
    let server = start(&cfg);
    let addr = server.links().tls.unwrap();
    let err = connect(addr, &other.ca, &[b"longlink/1"]).expect_err("the client refuses an unknown issuer");
    assert!(err.to_string().contains("certificate"), "{err}");
    // ALPN offered without ours: no_application_protocol.
    let err = connect(addr, &pki.ca, &[b"h2"]).expect_err("no common ALPN");
    assert!(err.to_string().to_lowercase().contains("noapplicationprotocol"), "{err}");
    // No ALPN at all is fine (plain TLS clients).
    assert!(connect(addr, &pki.ca, &[]).is_ok());
    server.shutdown();
}

#[test]
fn reloaded_certificates_serve_new_connections_and_keep_old_ones() {
    let dir = TempDir::new("tls-reload");
    let first = make_pki(&dir.0, "first");
    let cfg = config(&first);
    let server = start(&cfg);
    let addr = server.links().tls.unwrap();
    let mut old = tls_client(&server, &cfg, &first.ca, "before-reload");
    // New files in the same place, from another CA.
    let second = make_pki(&dir.0, "second");
    std::fs::copy(&second.cert_file, &first.cert_file).unwrap();
    std::fs::copy(&second.key_file, &first.key_file).unwrap();
    server.reload_tls().expect("reload");
    assert!(connect(addr, &first.ca, &[]).is_err(), "new connections get the new certificate");
    let mut new = tls_client(&server, &cfg, &second.ca, "after-reload");
    // A bad file keeps the certificate in force.
    std::fs::write(&first.key_file, "not a key").unwrap();
    assert!(server.reload_tls().is_err());
    assert!(connect(addr, &second.ca, &[]).is_ok());
    // The connection from before the reload still works.
    let push = server.push_addr().to_string();
    cli(&["push", "--server", &push, "--device", "before-reload", "still here"]);
    expect_message(&mut old, b"still here");
    cli(&["push", "--server", &push, "--device", "after-reload", "new cert"]);
    expect_message(&mut new, b"new cert");
    server.shutdown();
}

/// Interop through a real node with the compact TLS 1.3 record layer (on by
/// default): a rustls client asks for key updates again and again (our
/// answer moves our key too), over more rounds than the limit of KeyUpdates
/// without data; pushes arrive under the new keys, on sessions handed off
/// to their owner shard too; a TLS 1.2 client stays on rustls' layer. Then
/// close_notify both ways: the node answers the client's, and sends its own
/// before closing after a protocol error.
#[test]
fn compact_tls13_key_updates_both_ways_pushes_and_close_notify() {
    let dir = TempDir::new("tls-compact");
    let pki = make_pki(&dir.0, "a");
    let cfg = config(&pki);
    let server = start(&cfg);
    let push = server.push_addr().to_string();
    let mut clients: Vec<_> = (0..8).map(|i| tls_client(&server, &cfg, &pki.ca, &format!("ku-{i}"))).collect();
    let handed: u64 = server.counters().iter().map(|c| c.handed_off.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(handed > 0, "some TLS sessions moved to their owner shard");
    for c in &mut clients {
        assert_eq!(c.s.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        for _ in 0..40 {
            c.s.conn.refresh_traffic_keys().unwrap();
            c.s.write_all(&Frame::Ping.to_bytes()).unwrap();
            assert!(matches!(c.recv(), Frame::Pong));
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        cli(&["push", "--server", &push, "--device", &format!("ku-{i}"), "after key updates"]);
        expect_message(c, b"after key updates");
    }

    // TLS 1.2: rustls' record layer, same frames.
    let addr = server.links().tls.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let mut v12 = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    v12.alpn_protocols = vec![b"longlink/1".to_vec()];
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(v12), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(&auth(&token(&cfg, "u", "tls12"))).unwrap();
    assert_eq!(tls.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    let mut old = Frames { s: tls, buf: Vec::new() };
    assert!(matches!(old.recv(), Frame::AuthOk(_)));
    cli(&["push", "--server", &push, "--device", "tls12", "over tls 1.2"]);
    expect_message(&mut old, b"over tls 1.2");

    // The client's close_notify is answered with the node's: a clean end
    // (rustls reports a close without close_notify as UnexpectedEof).
    let mut c = clients.pop().unwrap();
    c.s.conn.send_close_notify();
    c.s.flush().unwrap();
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).expect("the node's close_notify");
    assert!(rest.is_empty());

    // A protocol error: the Error frame, then close_notify.
    let mut c = clients.pop().unwrap();
    c.s.write_all(&[0xff; 64]).unwrap();
    assert!(matches!(c.recv(), Frame::Error(_)));
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).expect("the node's close_notify after its Error frame");
    server.shutdown();
}

/// OpenSSL's client through a real node (TLS 1.3, the compact layer):
/// authenticates and receives a push.
#[test]
fn openssl_s_client_authenticates_and_receives_a_push() {
    use base64::Engine;
    use std::process::{Command, Stdio};
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl not installed; skipped");
        return;
    }
    let dir = TempDir::new("tls-openssl");
    let pki = make_pki(&dir.0, "a");
    let cfg = config(&pki);
    let server = start(&cfg);
    let addr = server.links().tls.unwrap();
    let ca_file = dir.0.join("ca.pem");
    let b64 = base64::engine::general_purpose::STANDARD.encode(pki.ca.as_ref());
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
    std::fs::write(&ca_file, format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n")))
        .unwrap();
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-tls1_3", "-verify_return_error", "-servername", "localhost"])
        .args(["-alpn", "longlink/1", "-connect", &addr.to_string(), "-CAfile"])
        .arg(&ca_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _child = Kill(child);
    stdin.write_all(&auth(&token(&cfg, "u", "openssl"))).unwrap();
    stdin.flush().unwrap();
    let mut f = Frames { s: stdout, buf: Vec::new() };
    assert!(matches!(f.recv(), Frame::AuthOk(_)));
    let push = server.push_addr().to_string();
    cli(&["push", "--server", &push, "--device", "openssl", "to openssl"]);
    expect_message(&mut f, b"to openssl");
    stdin.write_all(&Frame::Ping.to_bytes()).unwrap();
    stdin.flush().unwrap();
    assert!(matches!(f.recv(), Frame::Pong));
    drop(stdin);
    server.shutdown();
}

/// A node with the push port over TLS too (`push.tls_listen`).
fn push_tls_config(pki: &Pki) -> Config {
    let mut cfg = config(pki);
    cfg.push.tls_listen = "127.0.0.1:0".into();
    cfg
}

fn push_tls(ca_file: &Path) -> longlink::backend::PushTls {
    longlink::backend::PushTls::from_ca_file(ca_file, "localhost").expect("CA file")
}

/// The push port over TLS: the CLI (`--tls --ca --server-name`) and the
/// library's `connect_tls` push to clients; pipelined requests and rustls'
/// KeyUpdates (the node answers each) run inside TLS; the plain push port
/// keeps serving beside it.
#[test]
fn a_push_over_the_tls_push_port_is_delivered() {
    let dir = TempDir::new("push-tls");
    let pki = make_pki(&dir.0, "a");
    let cfg = push_tls_config(&pki);
    let server = start(&cfg);
    let addr = server.links().push_tls.expect("push.tls_listen is on");
    let mut c = tls_client(&server, &cfg, &pki.ca, "push-tls");
    let ca = pki.ca_file.to_str().unwrap();
    cli(&[
        "push",
        "--server",
        &addr.to_string(),
        "--tls",
        "--ca",
        ca,
        "--server-name",
        "localhost",
        "--device",
        "push-tls",
        "sealed",
    ]);
    expect_message(&mut c, b"sealed");
    // The server name defaults to the host of --server.
    let by_name = format!("localhost:{}", addr.port());
    cli(&["push", "--server", &by_name, "--tls", "--ca", ca, "--device", "push-tls", "by name"]);
    expect_message(&mut c, b"by name");
    // Env vars as for the key.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
        .args(["push", "--server", &by_name, "--device", "push-tls", "from env"])
        .env("LONGLINK_PUSH_KEY", format!("{PUSH_KEY_ID}:{PUSH_KEY_HEX}"))
        .env("LONGLINK_PUSH_TLS", "true")
        .env("LONGLINK_PUSH_CA", ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    expect_message(&mut c, b"from env");

    let mut client = longlink::backend::PushClient::connect_tls(addr, WAIT, &push_key(), &push_tls(&pki.ca_file))
        .expect("TLS push client");
    client.set_read_timeout(Some(WAIT)).unwrap();
    for n in 0..20 {
        let reply = client.push_devices(&["push-tls"], format!("lib {n}").into()).expect("push");
        assert_eq!(reply.results[0].status(), proto::PushStatus::Delivered);
    }
    for n in 0..20 {
        expect_message(&mut c, format!("lib {n}").as_bytes());
    }
    // Pipelined: many requests in few records, replies in many.
    let ids: Vec<u64> = (0..200)
        .map(|n| {
            let req = proto::PushRequest {
                targets: Some(proto::Targets { devices: vec!["push-tls".into()], ..Default::default() }),
                payload: format!("pipe {n}").into(),
                ..Default::default()
            };
            client.send(longlink::backend::Request::Push(req)).unwrap()
        })
        .collect();
    client.flush().unwrap();
    for _ in &ids {
        assert!(matches!(client.recv().unwrap(), longlink::backend::Reply::Push(_)));
    }
    for n in 0..200 {
        expect_message(&mut c, format!("pipe {n}").as_bytes());
    }

    // KeyUpdates asked of the node (update_requested) on a raw rustls
    // connection: each is answered, and requests keep working under the
    // new keys.
    let conn = rustls::ClientConnection::new(
        client_config(&pki.ca, &[b"longlink-push/1"]),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut raw = Frames { s: rustls::StreamOwned::new(conn, sock), buf: Vec::new() };
    let Frame::PushChallenge(challenge) = raw.recv() else { panic!("challenge first") };
    assert_eq!(raw.s.conn.alpn_protocol(), Some(&b"longlink-push/1"[..]));
    let auth = Frame::PushAuth(longlink::push::auth::answer(&push_key(), &challenge));
    raw.s.write_all(&auth.to_bytes()).unwrap();
    assert!(matches!(raw.recv(), Frame::PushAuthOk(_)));
    for n in 0..40u64 {
        raw.s.conn.refresh_traffic_keys().unwrap();
        let query = proto::PresenceQuery { request_id: n + 1, devices: vec!["push-tls".into()], ..Default::default() };
        raw.s.write_all(&Frame::PresenceQuery(query).to_bytes()).unwrap();
        assert!(matches!(raw.recv(), Frame::PresenceReply(_)));
    }

    // The plain push port still serves.
    cli(&["push", "--server", &server.push_addr().to_string(), "--device", "push-tls", "plain"]);
    expect_message(&mut c, b"plain");
    server.shutdown();
}

/// A client that does not speak TLS on the TLS push port gets a TLS alert
/// and the connection closes, at once when it sends bytes, at the auth
/// deadline when it waits for a challenge that never comes in the clear;
/// a TLS client on the plain push port fails its handshake. The node keeps
/// serving.
#[test]
fn a_plain_client_on_the_tls_push_port_is_refused() {
    use std::io::Read as _;
    let dir = TempDir::new("push-tls-plain");
    let pki = make_pki(&dir.0, "a");
    let mut cfg = push_tls_config(&pki);
    cfg.push_auth.auth_timeout_ms = 500;
    let server = start(&cfg);
    let addr = server.links().push_tls.unwrap();

    // Bytes in the clear (a PushAuth, as a plain backend that does not
    // wait would send): an alert record, then the end.
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let auth = Frame::PushAuth(proto::PushAuth { key_id: "p1".into(), mac: vec![0; 32].into() });
    sock.write_all(&auth.to_bytes()).unwrap();
    let mut got = Vec::new();
    sock.read_to_end(&mut got).expect("closed by the node");
    assert_eq!(got.first(), Some(&0x15), "a TLS alert record: {got:?}");
    assert!(got.len() <= 16, "nothing but the alert: {got:?}");

    // A plain client that waits for the challenge: nothing in the clear,
    // closed at the auth deadline.
    let err = longlink::backend::PushClient::connect(addr, WAIT, &push_key()).expect_err("refused");
    assert!(matches!(err, longlink::backend::BackendError::Eof), "{err}");
    let out = cli_output(&["push", "--server", &addr.to_string(), "--device", "x", "in the clear"]);
    assert_eq!(out.status.code(), Some(1));

    // A TLS client on the plain push port: the handshake fails there.
    let err =
        longlink::backend::PushClient::connect_tls(server.push_addr(), WAIT, &push_key(), &push_tls(&pki.ca_file))
            .expect_err("no TLS on the plain port");
    assert!(matches!(err, longlink::backend::BackendError::Tls(_) | longlink::backend::BackendError::Eof), "{err}");

    // The node serves on.
    let mut c = tls_client(&server, &cfg, &pki.ca, "still");
    cli(&[
        "push",
        "--server",
        &addr.to_string(),
        "--tls",
        "--ca",
        pki.ca_file.to_str().unwrap(),
        "--server-name",
        "localhost",
        "--device",
        "still",
        "ok",
    ]);
    expect_message(&mut c, b"ok");
    server.shutdown();
}

/// A CA that did not sign the node's certificate, or a name the
/// certificate does not carry: refused before the push key is used.
#[test]
fn a_push_client_with_a_bad_ca_is_refused() {
    let dir = TempDir::new("push-tls-ca");
    let pki = make_pki(&dir.0, "a");
    let other = make_pki(&dir.0, "other");
    let cfg = push_tls_config(&pki);
    let server = start(&cfg);
    let addr = server.links().push_tls.unwrap();
    let err = longlink::backend::PushClient::connect_tls(addr, WAIT, &push_key(), &push_tls(&other.ca_file))
        .expect_err("unknown issuer");
    assert!(matches!(&err, longlink::backend::BackendError::Tls(why) if why.contains("certificate")), "{err}");
    let wrong_name = longlink::backend::PushTls::from_ca_file(&pki.ca_file, "push.example.com").unwrap();
    let err = longlink::backend::PushClient::connect_tls(addr, WAIT, &push_key(), &wrong_name).expect_err("wrong name");
    assert!(matches!(&err, longlink::backend::BackendError::Tls(why) if why.contains("certificate")), "{err}");
    let out = cli_output(&[
        "push",
        "--server",
        &addr.to_string(),
        "--tls",
        "--ca",
        other.ca_file.to_str().unwrap(),
        "--server-name",
        "localhost",
        "--device",
        "x",
        "m",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"), "{}", String::from_utf8_lossy(&out.stderr));
    // Not a CA file at all.
    let out = cli_output(&[
        "push",
        "--server",
        &addr.to_string(),
        "--tls",
        "--ca",
        pki.key_file.to_str().unwrap(),
        "--device",
        "x",
        "m",
    ]);
    assert!(!out.status.success());
    // --ca without --tls is a usage error.
    let out = cli_output(&[
        "push",
        "--server",
        &addr.to_string(),
        "--ca",
        pki.ca_file.to_str().unwrap(),
        "--device",
        "x",
        "m",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // The refusals were TLS-level: none reached the push auth.
    let refused: u64 =
        server.counters().iter().map(|c| c.push_refused.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert_eq!(refused, 0);
    server.shutdown();
}

/// A cluster node (a real `longlink serve` process) with node links over
/// TLS (`cluster.tls`) or not.
fn cluster_node(redis: &RedisServer, pki: &Pki, name: &str, index: u16, tls: bool) -> (NodeProcess, Config) {
    cluster_node_trusting(redis, pki, &pki.ca_file, name, index, tls)
}

/// As [`cluster_node`], verifying the other nodes against `ca_file`.
fn cluster_node_trusting(
    redis: &RedisServer,
    pki: &Pki,
    ca_file: &Path,
    name: &str,
    index: u16,
    tls: bool,
) -> (NodeProcess, Config) {
    let mut cfg = test_config(2);
    cfg.node_name = name.into();
    cfg.delivery.redis_url = redis.url();
    cfg.delivery.node_index = index;
    cfg.cluster.enabled = true;
    cfg.cluster.forward_timeout_ms = 2_000;
    cfg.push.reply_timeout_ms = 10_000;
    cfg.push_auth.auth_timeout_ms = 1_000;
    cfg.server.ws_listen = String::new();
    cfg.tls.cert_file = pki.cert_file.clone();
    cfg.tls.key_file = pki.key_file.clone();
    cfg.cluster.tls = tls;
    cfg.cluster.tls_ca_file = ca_file.to_owned();
    // The nodes advertise 127.0.0.1; the test certificate names localhost.
    cfg.cluster.tls_server_name = "localhost".into();
    (NodeProcess::start(&cfg), cfg)
}

/// A plain-TCP client of `device` on `addr`, authenticated.
fn plain_client(addr: SocketAddr, cfg: &Config, device: &str) -> Frames<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(&auth(&token(cfg, "u", device))).unwrap();
    let mut f = Frames { s, buf: Vec::new() };
    assert!(matches!(f.recv(), Frame::AuthOk(_)));
    f
}

/// Pushes to `device` through `push` until the reply says `want` (the
/// device's route reaches Redis shortly after its login); the last status.
fn push_until(push: SocketAddr, device: &str, payload: &str, want: proto::PushStatus) -> proto::PushStatus {
    let mut client = push_client(push);
    client.set_read_timeout(Some(WAIT)).unwrap();
    let mut last = proto::PushStatus::Unspecified;
    wait_until(WAIT, || {
        let reply = client.push_devices(&[device], payload.to_owned().into()).expect("push reply");
        last = reply.results[0].status();
        last == want
    });
    last
}

/// `cluster.tls`: node a forwards a push from its backend to a client on
/// node b over a TLS node link that verified b's certificate; a node link
/// without TLS (node c, `cluster.tls` off) gets nothing through b's TLS
/// node listener, nor does a TLS node that trusts another CA (node d), and
/// a plain link opened by hand is closed unauthenticated.
#[test]
fn cluster_node_links_over_tls_forward_pushes_and_refuse_plain_links() {
    let dir = TempDir::new("cluster-tls");
    let pki = make_pki(&dir.0, "a");
    let redis = RedisServer::start();
    let (a, _) = cluster_node(&redis, &pki, "a", 0, true);
    let (b, cfg) = cluster_node(&redis, &pki, "b", 1, true);
    let (c, _) = cluster_node(&redis, &pki, "c", 2, false);
    let other = make_pki(&dir.0, "other");
    let (d, _) = cluster_node_trusting(&redis, &pki, &other.ca_file, "d", 3, true);
    let mut on_b = plain_client(b.client_addr, &cfg, "on-b");
    let status = push_until(a.push_addr, "on-b", "via a", proto::PushStatus::Delivered);
    assert_eq!(status, proto::PushStatus::Delivered);
    // Attempts made before the route reached Redis were not delivered.
    match on_b.recv() {
        Frame::Message(m) => assert_eq!(&m.payload[..], b"via a"),
        other => panic!("expected the forwarded push, got {other:?}"),
    }
    // Node c dials b without TLS: b's listener waits for a ClientHello and
    // closes the link at its auth deadline; c answers retryable.
    let mut from_c = push_client(c.push_addr);
    from_c.set_read_timeout(Some(WAIT)).unwrap();
    let reply = from_c.push_devices(&["on-b"], "via c".into()).expect("reply");
    assert_ne!(reply.results[0].status(), proto::PushStatus::Delivered, "{reply:?}");
    assert!(reply.results[0].retryable, "{reply:?}");
    // Node d does not trust b's certificate: its link fails the handshake.
    let mut from_d = push_client(d.push_addr);
    from_d.set_read_timeout(Some(WAIT)).unwrap();
    let reply = from_d.push_devices(&["on-b"], "via d".into()).expect("reply");
    assert_ne!(reply.results[0].status(), proto::PushStatus::Delivered, "{reply:?}");
    assert!(reply.results[0].retryable, "{reply:?}");
    // By hand, with the right cluster secret but no TLS: refused.
    let node_b = b.node_addr.expect("node listener");
    let err = longlink::backend::PushClient::connect(node_b, WAIT, &cluster_key()).expect_err("plain link refused");
    assert!(matches!(err, longlink::backend::BackendError::Eof), "{err}");
    // Still forwarding over TLS.
    let status = push_until(a.push_addr, "on-b", "again", proto::PushStatus::Delivered);
    assert_eq!(status, proto::PushStatus::Delivered);
    match on_b.recv() {
        Frame::Message(m) => assert_eq!(&m.payload[..], b"again"),
        other => panic!("expected the forwarded push, got {other:?}"),
    }
    drop((a, b, c, d));
}

/// The push port's certificate is reloaded with the others: new push
/// connections get the new one, an open one keeps working.
#[test]
fn the_tls_push_port_reloads_its_certificate() {
    let dir = TempDir::new("push-tls-reload");
    let first = make_pki(&dir.0, "first");
    let cfg = push_tls_config(&first);
    let server = start(&cfg);
    let addr = server.links().push_tls.unwrap();
    let mut c = tls_client(&server, &cfg, &first.ca, "reload");
    let mut old =
        longlink::backend::PushClient::connect_tls(addr, WAIT, &push_key(), &push_tls(&first.ca_file)).unwrap();
    let second = make_pki(&dir.0, "second");
    std::fs::copy(&second.cert_file, &first.cert_file).unwrap();
    std::fs::copy(&second.key_file, &first.key_file).unwrap();
    server.reload_tls().expect("reload");
    let err = longlink::backend::PushClient::connect_tls(addr, WAIT, &push_key(), &push_tls(&first.ca_file))
        .expect_err("new connections get the new certificate");
    assert!(matches!(err, longlink::backend::BackendError::Tls(_)), "{err}");
    let mut new =
        longlink::backend::PushClient::connect_tls(addr, WAIT, &push_key(), &push_tls(&second.ca_file)).unwrap();
    new.push_devices(&["reload"], "new cert".into()).unwrap();
    expect_message(&mut c, b"new cert");
    old.push_devices(&["reload"], "old cert".into()).unwrap();
    expect_message(&mut c, b"old cert");
    server.shutdown();
}

/// Memory of unauthenticated connections on the TLS push port, measured on
/// a real node process: 1,500 backends that finished the TLS handshake and
/// hold the challenge unanswered cost a few KB each (the handshake's
/// buffers are gone; the compact record layer and the pending challenge
/// stay), far below the one-record bound SECURITY.md states.
#[test]
fn unauthenticated_tls_push_connections_cost_a_few_kb() {
    const CONNS: usize = 1_500;
    let dir = TempDir::new("push-tls-memory");
    let pki = make_pki(&dir.0, "a");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap();
    drop(free);
    let mut cfg = push_tls_config(&pki);
    cfg.server.tls_listen = String::new();
    cfg.server.wss_listen = String::new();
    cfg.server.ws_listen = String::new();
    cfg.push.tls_listen = port.to_string();
    cfg.push_auth.max_unauthenticated_per_shard = 4_000;
    cfg.push_auth.auth_timeout_ms = 120_000;
    let node = NodeProcess::start(&cfg);
    let tls = client_config(&pki.ca, &[b"longlink-push/1"]);
    // Warm up (first connections allocate per-shard state), then measure.
    let mut open = Vec::with_capacity(CONNS + 10);
    let handshake = |open: &mut Vec<_>| {
        let sock = TcpStream::connect(port).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let conn = rustls::ClientConnection::new(tls.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut f = Frames { s: rustls::StreamOwned::new(conn, sock), buf: Vec::new() };
        assert!(matches!(f.recv(), Frame::PushChallenge(_)));
        open.push(f);
    };
    for _ in 0..10 {
        handshake(&mut open);
    }
    let before = node.rss_bytes();
    for _ in 0..CONNS {
        handshake(&mut open);
    }
    let after = node.rss_bytes();
    let per = after.saturating_sub(before) / CONNS as u64;
    eprintln!("{CONNS} unauthenticated TLS push connections: RSS {before} -> {after} bytes, {per} bytes each");
    assert!(per < 16 * 1024, "{per} bytes per unauthenticated TLS push connection");
    drop(open);
}

/// The inodes of the sockets listening on `port` (IPv4, from /proc/net/tcp).
fn listening_inodes(port: u16) -> Vec<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let mut inodes: Vec<u64> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect();
    inodes.sort_unstable();
    inodes
}

/// The push port over TLS is handed over by an in-place upgrade like the
/// plain listeners: the new process accepts on the very sockets the old one
/// listened on (not new ones bound beside them, whose old neighbours would
/// drop what waited in their accept queues), and serves on them.
#[test]
fn an_upgrade_hands_over_the_tls_push_port() {
    let dir = TempDir::new("push-tls-upgrade");
    let pki = make_pki(&dir.0, "a");
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap();
    drop(free);
    let mut cfg = push_tls_config(&pki);
    cfg.server.tls_listen = String::new();
    cfg.server.wss_listen = String::new();
    cfg.push.tls_listen = port.to_string();
    let node = NodeProcess::start(&cfg);
    let before = listening_inodes(port.port());
    assert_eq!(before.len(), cfg.shard_count() as usize, "one socket per shard: {before:?}");
    let out = cli_output(&["upgrade", "--pid", &node.child.id().to_string(), "--timeout-secs", "90"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "upgrade: {text} {}", String::from_utf8_lossy(&out.stderr));
    let outcome: serde_json::Value = serde_json::from_str(text.trim()).expect("upgrade prints JSON");
    let new_pid = outcome["new_pid"].as_u64().expect("new pid") as i32;
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the process our upgrade started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _new = Kill(new_pid);
    assert_eq!(listening_inodes(port.port()), before, "the same listening sockets after the upgrade");
    // And the new process serves on them: the TLS handshake, then the
    // push port's challenge.
    let tls = client_config(&pki.ca, &[b"longlink-push/1"]);
    let sock = TcpStream::connect(port).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let conn = rustls::ClientConnection::new(tls, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut f = Frames { s: rustls::StreamOwned::new(conn, sock), buf: Vec::new() };
    assert!(matches!(f.recv(), Frame::PushChallenge(_)));
}
