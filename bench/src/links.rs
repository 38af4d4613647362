//! `idle --transport ws|tls|wss`: the server side is configured here (a
//! listener on a free loopback port, a test CA for TLS) and the worker side
//! connects with blocking sockets: upgrade, TLS handshake, Auth, AuthOk.
//! Only the server's memory is measured, so the client side stays simple.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use longlink::config::Config;
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::proto;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};

/// How a bench client reaches the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Ws,
    Tls,
    Wss,
}

/// A connection held open by a worker.
pub enum Held {
    Plain(#[allow(dead_code)] TcpStream),
    Tls(#[allow(dead_code)] Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

/// Turns on the listener of `transport` on a free loopback port (with a
/// test CA's certificate in `dir` for TLS). Returns the address clients
/// connect to (`None`: the client port) and the CA certificate.
pub fn configure(cfg: &mut Config, transport: Transport, dir: &Path) -> anyhow::Result<(Option<SocketAddr>, Vec<u8>)> {
    cfg.server.ws_listen = String::new();
    if transport == Transport::Tcp {
        return Ok((None, Vec::new()));
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut ca = Vec::new();
    match transport {
        Transport::Tcp => {}
        Transport::Ws => cfg.server.ws_listen = addr.to_string(),
        Transport::Tls | Transport::Wss => {
            if transport == Transport::Tls {
                cfg.server.tls_listen = addr.to_string();
            } else {
                cfg.server.wss_listen = addr.to_string();
            }
            use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
            let ca_key = KeyPair::generate()?;
            let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_cert = ca_params.self_signed(&ca_key)?;
            let leaf_key = KeyPair::generate()?;
            let leaf = CertificateParams::new(vec!["localhost".to_owned()])?.signed_by(&leaf_key, &ca_cert, &ca_key)?;
            std::fs::create_dir_all(dir)?;
            cfg.tls.cert_file = dir.join("chain.pem");
            cfg.tls.key_file = dir.join("key.pem");
            std::fs::write(&cfg.tls.cert_file, leaf.pem())?;
            std::fs::write(&cfg.tls.key_file, leaf_key.serialize_pem())?;
            ca = ca_cert.der().to_vec();
        }
    }
    Ok((Some(addr), ca))
}

/// Connects from `source`, authenticates with `token` over `transport`.
pub fn connect(
    transport: Transport,
    server: SocketAddr,
    source: IpAddr,
    ca: &[u8],
    token: &str,
    connect_timeout: Duration,
    auth_timeout: Duration,
) -> anyhow::Result<Held> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(server), socket2::Type::STREAM.cloexec(), None)?;
    socket.set_nodelay(true)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&server.into(), connect_timeout)?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(auth_timeout))?;
    let auth = Frame::Auth(proto::Auth {
        token: token.to_owned(),
        heartbeat_ms: 270_000,
        platform: "bench".into(),
        ..Default::default()
    })
    .to_bytes();
    match transport {
        Transport::Tcp => bail!("plain TCP goes through longlink::client"),
        Transport::Ws => {
            ws_auth(&mut stream, &auth)?;
            Ok(Held::Plain(stream))
        }
        Transport::Tls | Transport::Wss => {
            let alpn: &[u8] = if transport == Transport::Tls { b"longlink/1" } else { b"http/1.1" };
            let conn = rustls::ClientConnection::new(client_config(ca, alpn)?, ServerName::try_from("localhost")?)?;
            let mut tls = rustls::StreamOwned::new(conn, stream);
            if transport == Transport::Tls {
                tls.write_all(&auth)?;
                read_auth_ok(&mut tls, &mut Vec::new(), false)?;
            } else {
                ws_auth(&mut tls, &auth)?;
            }
            Ok(Held::Tls(Box::new(tls)))
        }
    }
}

fn client_config(ca: &[u8], alpn: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// The upgrade, then Auth as one masked binary message, then AuthOk.
fn ws_auth<S: Read + Write>(s: &mut S, auth: &[u8]) -> anyhow::Result<()> {
    s.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: longlink.v1\r\n\r\n",
    )?;
    let mut buf = Vec::new();
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        fill(s, &mut buf)?;
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&buf[..end.min(64)]));
    }
    buf.drain(..end);
    let mask = [0x5a, 0xa5, 0x3c, 0xc3];
    let mut frame = vec![0x82];
    if auth.len() < 126 {
        frame.push(0x80 | auth.len() as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(auth.len() as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(auth.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame)?;
    read_auth_ok(s, &mut buf, true)
}

fn fill<S: Read>(s: &mut S, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    // The executor's timer signals interrupt blocking reads.
    let n = loop {
        match s.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => break other.context("reading")?,
        }
    };
    if n == 0 {
        bail!("closed by the server");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads until AuthOk; `ws`: the bytes are WebSocket frames (each server
/// message carries whole longlink frames).
fn read_auth_ok<S: Read>(s: &mut S, buf: &mut Vec<u8>, ws: bool) -> anyhow::Result<()> {
    let mut frames = Vec::new();
    loop {
        if ws {
            while buf.len() >= 2 {
                let (len, at) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                    126 | 127 => break,
                    n => (usize::from(n), 2),
                };
                if buf.len() < at + len {
                    break;
                }
                frames.extend_from_slice(&buf[at..at + len]);
                buf.drain(..at + len);
            }
        } else {
            frames.append(buf);
        }
        if let Some((h, body)) = codec::split_frame(&frames, codec::DEFAULT_MAX_BODY)? {
            return match Frame::decode(h, body)? {
                Frame::AuthOk(_) => Ok(()),
                other => Err(anyhow!("expected AuthOk, got {other:?}")),
            };
        }
        fill(s, buf)?;
    }
}
