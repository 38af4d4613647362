//! The compact TLS 1.3 record layer (`conn::tls::compact`) and the rustls
//! session wrapper against a real rustls client, in memory: the findings of
//! the security review of the scratch transport crate (REVIEW.md there,
//! tests `review_*`), each fixed here, and the behaviour it found sound.
//! Where a test needs a record rustls would never send, it seals it with
//! the client's extracted traffic key (`ClientTx`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::TempDir;
use longlink::conn::tls::compact::{CompactTls, MAX_KEY_UPDATES_WITHOUT_DATA, RecordError};
use longlink::conn::tls::config::{self, ALPN_LONGLINK};
use longlink::conn::tls::{Progress, ServerRecords, ServerTls, ServerTlsSettings, TlsError};
use rustls::{ClientConnection, ConnectionTrafficSecrets};

/// A self-signed "localhost" certificate in `dir`: (cert, key).
fn write_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.join("c.crt"), dir.join("c.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

fn server_cfg(dir: &TempDir, compact_idle: bool) -> (Arc<rustls::ServerConfig>, PathBuf) {
    let (cert_chain, private_key) = write_cert(&dir.0);
    let s = ServerTlsSettings {
        cert_chain: cert_chain.clone(),
        private_key,
        alpn: vec![ALPN_LONGLINK.to_vec()],
        compact_idle,
    };
    (config::load_server_config(&s).unwrap(), cert_chain)
}

fn client_cfg(ca: &Path, extract: bool) -> Arc<rustls::ClientConfig> {
    let base = config::load_client_config(ca, vec![ALPN_LONGLINK.to_vec()]).unwrap();
    let mut c = (*base).clone();
    c.enable_secret_extraction = extract;
    Arc::new(c)
}

fn new_client(ca: &Path, extract: bool) -> ClientConnection {
    ClientConnection::new(client_cfg(ca, extract), "localhost".try_into().unwrap()).unwrap()
}

fn flush(client: &mut ClientConnection) -> Vec<u8> {
    let mut wire = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut wire).unwrap();
    }
    wire
}

/// Feeds the server's output to the client.
fn deliver(client: &mut ClientConnection, out: &[u8]) -> Result<(), rustls::Error> {
    let mut rd = out;
    while !rd.is_empty() {
        client.read_tls(&mut rd).unwrap();
        client.process_new_packets()?;
    }
    Ok(())
}

/// Our server session and a rustls client, handshake done on both sides,
/// then the server moved to the compact layer.
fn compact_pair(extract: bool) -> (CompactTls, ClientConnection) {
    let dir = TempDir::new("tls-compact");
    let (cfg, ca) = server_cfg(&dir, true);
    let mut client = new_client(&ca, extract);
    let mut server = ServerTls::server(cfg).unwrap();
    for _ in 0..10 {
        let mut wire = flush(&mut client);
        let mut out = Vec::new();
        let p = server.read(&mut wire, &mut out, &mut |_| {}).unwrap();
        assert_eq!(p.consumed, wire.len(), "the client sent nothing after its Finished");
        deliver(&mut client, &out).unwrap();
        if server.can_compact() && !client.is_handshaking() {
            return (CompactTls::from_session(server).unwrap(), client);
        }
    }
    panic!("handshake did not finish");
}

/// The client's transmit direction, taken out of rustls, to seal any
/// TLS 1.3 record (RFC 8446 5.2, 5.3).
struct ClientTx {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl ClientTx {
    fn take(client: ClientConnection) -> ClientTx {
        let (seq, tx) = client.dangerous_extract_secrets().unwrap().tx;
        let (alg, key, iv): (&'static ring::aead::Algorithm, &[u8], &[u8]) = match &tx {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key.as_ref(), iv.as_ref()),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key.as_ref(), iv.as_ref()),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&ring::aead::CHACHA20_POLY1305, key.as_ref(), iv.as_ref())
            }
            _ => panic!("cipher"),
        };
        let key = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(alg, key).unwrap());
        ClientTx { key, iv: iv.try_into().unwrap(), seq }
    }

    /// One record whose TLSInnerPlaintext is exactly `inner`.
    fn seal_inner(&mut self, inner: &[u8]) -> Vec<u8> {
        let len = inner.len() + 16;
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        let mut body = inner.to_vec();
        self.key
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(header),
                &mut body,
            )
            .unwrap();
        let mut rec = header.to_vec();
        rec.extend_from_slice(&body);
        rec
    }
}

/// Finding 1: KeyUpdate requests without application data between them
/// are bounded like rustls' (32), then a fatal alert. Failed before the
/// fix: all 200 were honoured, 5400 bytes of replies queued.
#[test]
fn key_update_requests_are_bounded_like_rustls() {
    let (mut tls, mut client) = compact_pair(false);
    let mut wire = Vec::new();
    for _ in 0..200 {
        client.refresh_traffic_keys().unwrap();
        wire.extend(flush(&mut client));
    }
    let mut out = Vec::new();
    let result = tls.read(&mut wire, &mut out, &mut |_| panic!("no data was sent"));
    assert_eq!(result, Err(RecordError::TooManyKeyUpdates), "{} bytes of replies", out.len());
    // The 32 replies, then the alert (unexpected_message), all readable.
    let err = deliver(&mut client, &out).unwrap_err();
    assert!(format!("{err:?}").contains("UnexpectedMessage"), "{err:?}");
    // Nothing more after the alert.
    assert!(tls.write(b"x", &mut Vec::new()).is_err());
}

/// Application data between KeyUpdates resets the count: a client that
/// updates its keys as it sends is never cut off. Both directions move.
#[test]
fn key_updates_with_data_between_go_on_both_ways() {
    let (mut tls, mut client) = compact_pair(false);
    for round in 0..(u32::from(MAX_KEY_UPDATES_WITHOUT_DATA) + 8) {
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(format!("m{round}").as_bytes()).unwrap();
        let mut wire = flush(&mut client);
        let mut out = Vec::new();
        let mut got = Vec::new();
        let p = tls.read(&mut wire, &mut out, &mut |p| got.extend_from_slice(p)).unwrap();
        assert_eq!(p.consumed, wire.len());
        assert_eq!(got, format!("m{round}").as_bytes());
        // Our reply to the request, then data under our new key.
        tls.write(format!("r{round}").as_bytes(), &mut out).unwrap();
        tls.release_idle();
        deliver(&mut client, &out).unwrap();
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut client.reader(), &mut buf).unwrap();
        assert_eq!(&buf[..n], format!("r{round}").as_bytes());
    }
}

/// Finding 2 (compact layer): input after close_notify is consumed and
/// dropped, `peer_closed` on every call. Failed before the fix: 1 MiB
/// carried, `consumed` 0.
#[test]
fn input_after_close_notify_is_ignored_not_carried() {
    let (mut tls, mut client) = compact_pair(false);
    client.send_close_notify();
    let mut wire = flush(&mut client);
    let p = tls.read(&mut wire, &mut Vec::new(), &mut |_| {}).unwrap();
    assert!(p.peer_closed);
    let mut carried = Vec::new();
    for _ in 0..16 {
        carried.extend_from_slice(&[0x17; 64 * 1024]);
        let p = tls.read(&mut carried, &mut Vec::new(), &mut |_| panic!("data after close_notify")).unwrap();
        assert!(p.peer_closed, "said on every call");
        carried.drain(..p.consumed);
    }
    assert!(carried.is_empty(), "carried {} bytes after close_notify", carried.len());
    // Half-close: we may still write, then close.
    let mut out = Vec::new();
    tls.write(b"last", &mut out).unwrap();
    tls.close_notify(&mut out).unwrap();
}

/// Finding 2 (rustls session layer: TLS 1.2, or `compact_idle` off).
/// Failed before the fix: 1 MiB carried.
#[test]
fn session_input_after_close_notify_is_not_carried() {
    let dir = TempDir::new("tls-session-close");
    let (cfg, ca) = server_cfg(&dir, false);
    let mut client = new_client(&ca, false);
    let mut server = ServerTls::server(cfg).unwrap();
    for _ in 0..10 {
        let mut wire = flush(&mut client);
        let mut out = Vec::new();
        server.read(&mut wire, &mut out, &mut |_| {}).unwrap();
        deliver(&mut client, &out).unwrap();
        if !server.is_handshaking() && !client.is_handshaking() {
            break;
        }
    }
    client.writer().write_all(b"last words").unwrap();
    client.send_close_notify();
    let mut wire = flush(&mut client);
    let mut got = Vec::new();
    let p = server.read(&mut wire, &mut Vec::new(), &mut |p| got.extend_from_slice(p)).unwrap();
    assert!(p.peer_closed);
    assert_eq!(got, b"last words");
    let mut carried = Vec::new();
    for _ in 0..16 {
        carried.extend_from_slice(&[0x17; 64 * 1024]);
        let p = server.read(&mut carried, &mut Vec::new(), &mut |_| {}).unwrap();
        assert!(p.peer_closed, "said on every call");
        carried.drain(..p.consumed);
    }
    assert!(carried.is_empty(), "carried {} bytes after close_notify", carried.len());
}

/// Finding 7: nothing is sealed after our fatal alert, nor after our
/// close_notify; a later read is refused. Failed before the fix: `write`
/// sealed application data after bad_record_mac.
#[test]
fn no_records_after_a_fatal_alert_or_our_close_notify() {
    let (mut tls, mut client) = compact_pair(false);
    client.writer().write_all(b"genuine").unwrap();
    let mut wire = flush(&mut client);
    let last = wire.len() - 1;
    wire[last] ^= 1;
    let mut out = Vec::new();
    assert_eq!(tls.read(&mut wire, &mut out, &mut |_| {}), Err(RecordError::BadMac));
    assert!(!out.is_empty(), "the alert");
    let mut after = Vec::new();
    assert_eq!(tls.write(b"fan-out frame queued earlier", &mut after), Err(RecordError::Failed));
    assert_eq!(tls.close_notify(&mut after), Err(RecordError::Failed));
    assert_eq!(tls.read(&mut [23, 3, 3, 0, 1, 0], &mut after, &mut |_| {}), Err(RecordError::Failed));
    assert!(after.is_empty(), "{} bytes sealed after the alert", after.len());

    let (mut tls, _client) = compact_pair(false);
    let mut out = Vec::new();
    tls.close_notify(&mut out).unwrap();
    let len = out.len();
    assert_eq!(tls.write(b"late", &mut out), Err(RecordError::Closed));
    assert_eq!(tls.close_notify(&mut out), Err(RecordError::Closed));
    assert_eq!(out.len(), len, "nothing after close_notify");
}

/// Finding 8: TLSInnerPlaintext over 2^14 + 1 bytes is record_overflow,
/// checked before the padding is stripped. Failed before the fix: 2^14
/// content + type + 200 bytes of padding was accepted.
#[test]
fn inner_plaintext_over_2_pow_14_plus_1_is_record_overflow() {
    let (mut tls, client) = compact_pair(true);
    let mut tx = ClientTx::take(client);
    let mut inner = vec![b'a'; 1 << 14];
    inner.push(23);
    inner.extend_from_slice(&[0; 200]);
    let mut rec = tx.seal_inner(&inner);
    assert!(rec.len() - 5 <= (1 << 14) + 256, "within the ciphertext limit");
    let mut out = Vec::new();
    let result = tls.read(&mut rec, &mut out, &mut |_| panic!("no plaintext"));
    assert_eq!(result, Err(RecordError::Overflow(inner.len())));
    assert!(!out.is_empty(), "record_overflow alert");
    // Padding up to exactly 2^14 + 1 inner bytes is fine.
    let (mut tls, client) = compact_pair(true);
    let mut tx = ClientTx::take(client);
    let mut inner = vec![7u8; (1 << 14) - 10];
    inner.push(23);
    inner.extend_from_slice(&[0; 10]);
    let mut rec = tx.seal_inner(&inner);
    let mut got = 0;
    tls.read(&mut rec, &mut Vec::new(), &mut |p| got += p.len()).unwrap();
    assert_eq!(got, (1 << 14) - 10);
}

/// Drives the server as the shard does: `ServerRecords` (rustls, then the
/// compact layer), carrying what was not consumed.
fn drive(server: &mut ServerRecords, carried: &mut Vec<u8>, out: &mut Vec<u8>, plain: &mut Vec<u8>) -> Progress {
    let p = server.read(carried, out, &mut |p| plain.extend_from_slice(p)).unwrap();
    carried.drain(..p.consumed);
    p
}

/// Finding 10: a KeyUpdate(update_requested) sent with the client's
/// Finished reaches the compact layer, which answers it. Failed before the
/// fix (records were all fed to rustls at once): rustls answered, parked
/// the reply, the hand-over dropped it, and the client could not decrypt
/// our next record (DecryptError).
#[test]
fn key_update_in_the_finished_flight_survives_compaction() {
    let dir = TempDir::new("tls-ku-finished");
    let (cfg, ca) = server_cfg(&dir, true);
    let mut client = new_client(&ca, false);
    let mut server = ServerRecords::new(ServerTls::server(cfg).unwrap());
    let mut carried = Vec::new();
    let mut plain = Vec::new();
    let mut asked = false;
    for _ in 0..10 {
        if !client.is_handshaking() && !asked {
            // The client's Finished is queued, not sent: the key update
            // and data go in the same flight.
            client.refresh_traffic_keys().unwrap();
            client.writer().write_all(b"early").unwrap();
            asked = true;
        }
        carried.extend(flush(&mut client));
        let mut out = Vec::new();
        drive(&mut server, &mut carried, &mut out, &mut plain);
        deliver(&mut client, &out).unwrap();
        if server.is_compact() && asked {
            break;
        }
    }
    assert!(server.is_compact());
    assert!(carried.is_empty());
    assert_eq!(plain, b"early", "data behind the KeyUpdate, under the client's new key");
    let mut out = Vec::new();
    server.write(b"hello", &mut out).unwrap();
    deliver(&mut client, &out).expect("the client reads the compact layer's first record");
    let mut buf = [0u8; 8];
    let n = std::io::Read::read(&mut client.reader(), &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");
}

/// TLS 1.2 stays on rustls' record layer, with `compact_idle` on.
#[test]
fn tls12_stays_on_rustls() {
    let dir = TempDir::new("tls-12");
    let (cfg, ca) = server_cfg(&dir, true);
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let mut ccfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ccfg.alpn_protocols = vec![ALPN_LONGLINK.to_vec()];
    let mut client = ClientConnection::new(Arc::new(ccfg), "localhost".try_into().unwrap()).unwrap();
    let mut server = ServerRecords::new(ServerTls::server(cfg).unwrap());
    let (mut carried, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        if !client.is_handshaking() && plain.is_empty() {
            client.writer().write_all(b"v12").unwrap();
        }
        carried.extend(flush(&mut client));
        let mut out = Vec::new();
        drive(&mut server, &mut carried, &mut out, &mut plain);
        deliver(&mut client, &out).unwrap();
        if plain == b"v12" {
            break;
        }
    }
    assert_eq!(plain, b"v12");
    assert!(!server.is_compact());
    let mut out = Vec::new();
    server.write(b"ok", &mut out).unwrap();
    deliver(&mut client, &out).unwrap();
}

/// Feeds each record to a fresh connection; returns the result and the
/// alert bytes queued.
fn one_record(inner: &[u8]) -> (Result<Progress, RecordError>, Vec<u8>) {
    let (mut tls, client) = compact_pair(true);
    let mut tx = ClientTx::take(client);
    let mut rec = tx.seal_inner(inner);
    let mut out = Vec::new();
    let r = tls.read(&mut rec, &mut out, &mut |_| panic!("no plaintext expected"));
    (r, out)
}

/// Behaviour the review found sound, pinned.
#[test]
fn inner_content_type_and_post_handshake_rules() {
    assert_eq!(one_record(&[0; 40]).0, Err(RecordError::Empty));
    assert!(matches!(one_record(&[1, 20]).0, Err(RecordError::BadHeader(20))));
    assert!(matches!(one_record(&[1, 24]).0, Err(RecordError::BadHeader(24))));
    for typ in [4u8, 1, 20, 13] {
        assert_eq!(one_record(&[typ, 0, 0, 1, 0, 22]).0, Err(RecordError::Handshake(typ)));
    }
    assert!(one_record(&[24, 0, 0, 1, 2, 22]).0.is_err());
    assert!(one_record(&[24, 0, 0, 1, 0, 24, 0, 0, 1, 0, 22]).0.is_err());
    assert!(one_record(&[24, 0, 0, 1, 22]).0.is_err());
    assert!(one_record(&[22]).0.is_err());
    assert!(one_record(&[24, 0, 0, 2, 0, 0, 22]).0.is_err());
    let (r, out) = one_record(&[1, 90, 21]);
    assert_eq!(r, Err(RecordError::PeerAlert(90)));
    assert!(out.is_empty(), "no answer to an alert");
    let (r, _) = one_record(&[1, 0, 21, 0, 0, 0]);
    assert!(r.unwrap().peer_closed);
    // Outer header: plaintext CCS / alert / handshake after the handshake,
    // a record shorter than a tag, an oversized header.
    for typ in [20u8, 21, 22] {
        let (mut tls, _c) = compact_pair(false);
        let mut rec = vec![typ, 3, 3, 0, 1, 1];
        assert_eq!(tls.read(&mut rec, &mut Vec::new(), &mut |_| {}), Err(RecordError::BadHeader(typ)));
    }
    let (mut tls, _c) = compact_pair(false);
    assert_eq!(tls.read(&mut [23, 3, 3, 0, 5, 1, 2, 3, 4, 5], &mut Vec::new(), &mut |_| {}), Err(RecordError::BadMac));
    let (mut tls, _c) = compact_pair(false);
    assert!(matches!(tls.read(&mut [23, 3, 3, 0x50, 0], &mut Vec::new(), &mut |_| {}), Err(RecordError::Overflow(_))));
    // A replayed record fails: nonces advance.
    let (mut tls, client) = compact_pair(true);
    let mut tx = ClientTx::take(client);
    let rec = tx.seal_inner(b"data\x17");
    let mut twice = rec.clone();
    twice.extend_from_slice(&rec);
    let mut seen = 0;
    assert_eq!(tls.read(&mut twice, &mut Vec::new(), &mut |_| seen += 1), Err(RecordError::BadMac));
    assert_eq!(seen, 1);
}

/// Errors of the wrapper keep their cause.
#[test]
fn records_wrapper_refuses_writes_during_the_handshake() {
    let dir = TempDir::new("tls-notready");
    let (cfg, _) = server_cfg(&dir, true);
    let mut server = ServerRecords::new(ServerTls::server(cfg).unwrap());
    assert!(matches!(server.write(b"x", &mut Vec::new()), Err(TlsError::NotReady)));
}

/// A client that fragments its flights into many small records (more than
/// are fed to rustls one by one per read) still completes the handshake,
/// and its data behind the Finished arrives.
#[test]
fn handshake_in_many_small_records() {
    let dir = TempDir::new("tls-fragments");
    let (cfg, ca) = server_cfg(&dir, true);
    let mut c = (*client_cfg(&ca, false)).clone();
    c.max_fragment_size = Some(32);
    // A ClientHello of about 1 KiB: more than 16 records of 32 bytes.
    c.alpn_protocols = (0..24).map(|i| format!("padding-protocol-{i:08}").into_bytes()).collect();
    c.alpn_protocols.push(ALPN_LONGLINK.to_vec());
    let mut client = ClientConnection::new(Arc::new(c), "localhost".try_into().unwrap()).unwrap();
    let mut server = ServerRecords::new(ServerTls::server(cfg).unwrap());
    let (mut carried, mut plain) = (Vec::new(), Vec::new());
    let mut sent = false;
    let mut records = 0;
    for _ in 0..10 {
        if !client.is_handshaking() && !sent {
            client.writer().write_all(&[b'z'; 300]).unwrap();
            sent = true;
        }
        let wire = flush(&mut client);
        records = records.max(wire.len() / 37);
        carried.extend(wire);
        let mut out = Vec::new();
        drive(&mut server, &mut carried, &mut out, &mut plain);
        deliver(&mut client, &out).unwrap();
        if plain.len() == 300 {
            break;
        }
    }
    assert_eq!(plain, vec![b'z'; 300]);
    assert!(server.is_compact());
    assert!(records > 16, "the ClientHello came in {records} records");
}

/// A dialing side (node links) that refuses the server's certificate:
/// rustls stops in the middle of the server's flight with the rest of it
/// still in its deframer; the alert must come out without rustls being
/// shown an empty input (it panicked there, killing the node's shard).
#[test]
fn a_refused_certificate_mid_flight_is_an_error_with_an_alert() {
    let dir = TempDir::new("tls-refused-cert");
    let (server_config, _) = server_cfg(&dir, true);
    let other = TempDir::new("tls-refused-cert-other");
    let (other_ca, _) = write_cert(&other.0);
    let mut server = ServerTls::server(server_config).unwrap();
    let client_config = config::load_client_config(&other_ca, vec![ALPN_LONGLINK.to_vec()]).unwrap();
    let mut client = longlink::conn::tls::ClientTls::client(client_config, "localhost").unwrap();
    let mut hello = Vec::new();
    client.read(&mut [], &mut hello, &mut |_| {}).unwrap();
    let mut flight = Vec::new();
    server.read(&mut hello, &mut flight, &mut |_| {}).unwrap();
    let mut alert = Vec::new();
    let err = client.read(&mut flight, &mut alert, &mut |_| {}).expect_err("unknown issuer");
    assert!(err.to_string().contains("certificate"), "{err}");
    // The alert, encrypted under the handshake keys (after the
    // middlebox-compatibility ChangeCipherSpec).
    assert_eq!(alert.get(6), Some(&0x17), "an alert record for the server: {alert:?}");
}

/// A ClientHello (offering no common ALPN) with another handshake message
/// behind it in the same record: rustls' deframer still points at
/// that message when the alert is collected, which must not panic (it
/// did when rustls was shown an empty input: a remote crash of a shard
/// from one record, before any credential).
#[test]
fn a_refused_client_hello_with_a_message_behind_it_in_its_record() {
    let dir = TempDir::new("tls-refused-hello");
    let (server_config, cert) = server_cfg(&dir, true);
    let h2 = config::load_client_config(&cert, vec![b"h2".to_vec()]).unwrap();
    let mut client = ClientConnection::new(h2, "localhost".try_into().unwrap()).unwrap();
    let mut record = flush(&mut client);
    assert_eq!(record[0], 0x16, "one handshake record: {:?}", &record[..5]);
    // A Finished of length 0 behind the ClientHello, in the same record.
    record.extend_from_slice(&[20, 0, 0, 0]);
    let len = u16::from_be_bytes([record[3], record[4]]) + 4;
    record[3..5].copy_from_slice(&len.to_be_bytes());
    let mut server = ServerTls::server(server_config).unwrap();
    let mut alert = Vec::new();
    // rustls refuses a message left behind the ClientHello when its keys
    // change (KeyEpochWithPendingFragment) or the ALPN: either way an alert.
    server.read(&mut record, &mut alert, &mut |_| {}).expect_err("refused");
    assert_eq!(alert.first(), Some(&0x15), "the alert: {alert:?}");
}
