//! Bytes an idle TLS connection keeps in its connection task: the
//! `TlsLink` (record layer, sealed queue, record tail) and everything it
//! owns on the heap, measured with a counting allocator as the difference
//! its drop makes. The compact TLS 1.3 layer keeps the idle TLS connection
//! under the 2 KiB the issue asks for (with the ~940 B every connection
//! costs over plain TCP); rustls' record layer (`compact_idle` off) does
//! not.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use common::TempDir;
use longlink::conn::OutQueue;
use longlink::conn::tls::config::{self, ALPN_LONGLINK};
use longlink::conn::tls::{ServerTls, ServerTlsSettings};
use longlink::conn::transport::TlsLink;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// An idle server `TlsLink` after a handshake, a frame each way and
/// `release_idle`, as the connection task holds it; returns the bytes it
/// holds (heap and its own box) and whether it runs the compact layer.
fn idle_link(compact_idle: bool) -> (isize, bool) {
    let dir = TempDir::new("tls-idle-mem");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert_chain, private_key) = (dir.0.join("c.crt"), dir.0.join("c.key"));
    std::fs::write(&cert_chain, ck.cert.pem()).unwrap();
    std::fs::write(&private_key, ck.key_pair.serialize_pem()).unwrap();
    let settings = ServerTlsSettings {
        cert_chain: cert_chain.clone(),
        private_key,
        alpn: vec![ALPN_LONGLINK.to_vec()],
        compact_idle,
    };
    let cfg = config::load_server_config(&settings).unwrap();
    let ccfg = config::load_client_config(&cert_chain, vec![ALPN_LONGLINK.to_vec()]).unwrap();
    let mut client = rustls::ClientConnection::new(ccfg, "localhost".try_into().unwrap()).unwrap();
    let mut link = Box::new(TlsLink::new(ServerTls::server(Arc::clone(&cfg)).unwrap()));
    let mut got = Vec::new();
    for _ in 0..10 {
        if !client.is_handshaking() && got.is_empty() {
            client.writer().write_all(b"ping").unwrap();
        }
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let mut out = Vec::new();
        let p = link.session.read(&mut wire, &mut out, &mut |p| got.extend_from_slice(p)).unwrap();
        assert_eq!(p.consumed, wire.len());
        let mut plain = OutQueue::default();
        if got == b"ping" {
            plain.push(bytes::Bytes::from_static(b"pong"));
            link.seal(&mut plain).unwrap();
        }
        let mut rd = &out[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
        }
        if got == b"ping" {
            break;
        }
    }
    assert_eq!(got, b"ping");
    // What the sealed queue holds goes to the socket; then the task idles.
    link.cipher = Default::default();
    link.release_idle();
    let compact = link.session.is_compact();
    drop(cfg);
    let before = LIVE.load(Ordering::SeqCst);
    drop(link);
    (before - LIVE.load(Ordering::SeqCst), compact)
}

#[test]
fn an_idle_tls13_connection_keeps_about_a_kilobyte() {
    let (bytes, compact) = idle_link(true);
    assert!(compact, "TLS 1.3 with compact_idle moved to the compact layer");
    eprintln!("idle TlsLink, compact layer: {bytes} B");
    // 2 KiB minus the ~940 B of a plain TCP connection (960 B measured
    // with rustls 0.23.46; bench/README.md has the server's RSS).
    assert!(bytes <= 1_100, "an idle compact TLS connection holds {bytes} B");

    let (bytes, compact) = idle_link(false);
    assert!(!compact);
    eprintln!("idle TlsLink, rustls' record layer: {bytes} B");
    assert!(bytes > 2_000, "rustls' record layer measured as {bytes} B (the comparison is void)");
}
