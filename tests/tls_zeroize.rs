//! Key hygiene of the compact TLS 1.3 record layer (security review of the
//! scratch transport crate, finding 6): `release_idle` and key updates
//! free ring's expanded keys, which hold the traffic key itself (ChaCha20
//! keeps the 32 bytes as they are). Freed blocks go to the next allocation
//! of their size, so they must be wiped first.
//!
//! This binary's allocator scans every block freed while armed for the
//! server's transmit key. Failed before the fix: `release_idle` freed a
//! block holding it.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::TempDir;
use longlink::conn::tls::compact::CompactTls;
use longlink::conn::tls::config::{self, ALPN_LONGLINK};
use longlink::conn::tls::{ServerTls, ServerTlsSettings};
use rustls::{ClientConnection, ConnectionTrafficSecrets};

struct Scan;

static ARMED: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicUsize = AtomicUsize::new(0);
static SCANNED: AtomicUsize = AtomicUsize::new(0);
static mut NEEDLE: [u8; 32] = [0; 32];

// SAFETY: forwards to the system allocator; the scan only reads a block
// that is still allocated.
unsafe impl GlobalAlloc for Scan {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::SeqCst) && layout.size() >= 32 {
            SCANNED.fetch_add(1, Ordering::SeqCst);
            // SAFETY: the block is ours until System.dealloc below; NEEDLE
            // is written before ARMED is set.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            let needle = unsafe { &*std::ptr::addr_of!(NEEDLE) };
            if block.windows(32).any(|w| w == needle) {
                FOUND.fetch_add(1, Ordering::SeqCst);
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Scan = Scan;

#[test]
fn released_and_replaced_keys_leave_no_traffic_key_in_freed_memory() {
    let dir = TempDir::new("tls-zeroize");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_chain, private_key) = (dir.0.join("c.crt"), dir.0.join("c.key"));
    std::fs::write(&cert_chain, ck.cert.pem()).unwrap();
    std::fs::write(&private_key, ck.key_pair.serialize_pem()).unwrap();
    let s = ServerTlsSettings {
        cert_chain: cert_chain.clone(),
        private_key,
        alpn: vec![ALPN_LONGLINK.to_vec()],
        compact_idle: true,
    };
    let cfg = config::load_server_config(&s).unwrap();
    // ChaCha20-Poly1305: a 32-byte key whose representation does not
    // depend on CPU features, so the scan is deterministic.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let mut ccfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    ccfg.alpn_protocols = vec![ALPN_LONGLINK.to_vec()];
    ccfg.enable_secret_extraction = true;

    let mut client = ClientConnection::new(Arc::new(ccfg), "localhost".try_into().unwrap()).unwrap();
    let mut server = ServerTls::server(cfg).unwrap();
    for _ in 0..10 {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut out = Vec::new();
        server.read(&mut wire, &mut out, &mut |_| {}).unwrap();
        let mut rd = &out[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        if server.can_compact() && !client.is_handshaking() {
            break;
        }
    }
    let mut tls = CompactTls::from_session(server).unwrap();
    let secrets = client.dangerous_extract_secrets().unwrap();
    let ConnectionTrafficSecrets::Chacha20Poly1305 { key, .. } = &secrets.rx.1 else { panic!("chacha") };
    // SAFETY: single writer, before ARMED is set.
    unsafe { (*std::ptr::addr_of_mut!(NEEDLE)).copy_from_slice(key.as_ref()) };

    // Busy: the expanded transmit key is built. Then the connection idles.
    tls.write(b"one frame", &mut Vec::new()).unwrap();
    ARMED.store(true, Ordering::SeqCst);
    tls.release_idle();
    ARMED.store(false, Ordering::SeqCst);
    assert!(SCANNED.load(Ordering::SeqCst) > 0, "release_idle freed the expanded key");
    assert_eq!(FOUND.load(Ordering::SeqCst), 0, "release_idle freed a heap block still holding the live transmit key");

    // The connection dropped while busy: the same.
    tls.write(b"another", &mut Vec::new()).unwrap();
    ARMED.store(true, Ordering::SeqCst);
    drop(tls);
    ARMED.store(false, Ordering::SeqCst);
    assert_eq!(FOUND.load(Ordering::SeqCst), 0, "dropping the connection freed the transmit key unwiped");
}
