//! The SDK's side of `GET /v1/dispatch` (see `crate::http::dispatcher`): a small
//! blocking HTTP/1.1 request, run off the executor (the driver uses
//! `spawn_blocking`), bounded in time and in bytes.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::agent::Dispatch;

/// Where the dispatcher is and what the client tells it.
#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// host:port of the dispatcher's HTTP listener.
    pub addr: String,
    pub uid: String,
    pub device: String,
    pub platform: String,
    pub app: String,
    /// The client's credential for the dispatcher's auth hook, sent as the
    /// `Authorization` header (e.g. "Bearer <session>"). Never logged.
    pub authorization: String,
    /// A login ticket signed by the business (single use: give a fresh one
    /// before the SDK asks again, or let it keep the token it got).
    pub ticket: String,
    /// Bound on the whole exchange (connect, write, read).
    pub timeout: Duration,
}

impl DispatcherConfig {
    pub fn new(addr: impl Into<String>, uid: impl Into<String>, device: impl Into<String>) -> DispatcherConfig {
        DispatcherConfig {
            addr: addr.into(),
            uid: uid.into(),
            device: device.into(),
            platform: String::new(),
            app: String::new(),
            authorization: String::new(),
            ticket: String::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("dispatcher i/o: {0}")]
    Io(#[from] io::Error),
    #[error("dispatcher address {0:?} does not resolve")]
    NoAddress(String),
    #[error("dispatcher answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("bad dispatcher reply: {0}")]
    BadReply(String),
    #[error("the dispatcher credential contains a line break")]
    BadCredential,
}

/// Largest reply read (the JSON is a few hundred bytes).
const MAX_REPLY: u64 = 64 * 1024;

/// Asks the dispatcher for endpoints and a token.
pub fn lookup(cfg: &DispatcherConfig, net: &str) -> Result<Dispatch, DispatchError> {
    let addr = cfg.addr.to_socket_addrs()?.next().ok_or_else(|| DispatchError::NoAddress(cfg.addr.clone()))?;
    let mut stream = TcpStream::connect_timeout(&addr, cfg.timeout)?;
    stream.set_read_timeout(Some(cfg.timeout))?;
    stream.set_write_timeout(Some(cfg.timeout))?;
    let query = [("uid", &cfg.uid), ("device", &cfg.device), ("platform", &cfg.platform), ("app", &cfg.app)]
        .into_iter()
        .chain((!cfg.ticket.is_empty()).then_some(("ticket", &cfg.ticket)))
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .chain(std::iter::once(format!("net={}", encode(net))))
        .collect::<Vec<_>>()
        .join("&");
    // A header value cannot carry a line break (it would end the header).
    let authorization = match cfg.authorization.as_str() {
        "" => String::new(),
        a if a.contains(['\r', '\n']) => return Err(DispatchError::BadCredential),
        a => format!("authorization: {a}\r\n"),
    };
    let request =
        format!("GET /v1/dispatch?{query} HTTP/1.1\r\nhost: {}\r\n{authorization}connection: close\r\n\r\n", cfg.addr);
    stream.write_all(request.as_bytes())?;
    let mut reply = Vec::new();
    stream.take(MAX_REPLY).read_to_end(&mut reply)?;
    parse_reply(&reply)
}

fn parse_reply(reply: &[u8]) -> Result<Dispatch, DispatchError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(reply) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(DispatchError::BadReply("truncated".into())),
        Err(e) => return Err(DispatchError::BadReply(e.to_string())),
    };
    let body = &reply[head_len..];
    let status = parsed.code.unwrap_or(0);
    if status != 200 {
        return Err(DispatchError::Status { status, body: String::from_utf8_lossy(body).into_owned() });
    }
    let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| DispatchError::BadReply(e.to_string()))?;
    let endpoints: Vec<String> = json["endpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    if endpoints.is_empty() {
        return Err(DispatchError::BadReply("no endpoints".into()));
    }
    let ms = |name: &str| json["heartbeat"][name].as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    let reconnect = |name: &str| json["reconnect"][name].as_u64().unwrap_or(0);
    Ok(Dispatch {
        endpoints,
        token: json["token"].as_str().unwrap_or_default().to_owned(),
        heartbeat_min_ms: ms("min_ms"),
        heartbeat_max_ms: ms("max_ms"),
        reconnect_min_ms: reconnect("min_ms"),
        reconnect_max_ms: reconnect("max_ms"),
    })
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::KeyConfig;
    use crate::http::HttpServer;
    use crate::http::dispatch_auth::{DispatchAuth, DispatchAuthConfig, ReplayStore, sign_ticket};
    use crate::http::dispatcher::{DispatchConfig, Dispatcher, StaticNodes};
    use crate::protocol::token::{Key, Keyring, encode_hex, now_unix_secs};
    use crate::router::NodeInfo;

    #[test]
    fn asks_the_real_dispatcher_and_reads_its_answer() {
        let keyring = Keyring::new(vec![Key::new("k", vec![5; 32]).unwrap()], None).unwrap();
        let nodes: Vec<NodeInfo> = ["n1", "n2"]
            .iter()
            .map(|n| NodeInfo {
                name: (*n).into(),
                incarnation: 1,
                client_endpoint: format!("127.0.0.1:{}", if *n == "n1" { 7001 } else { 7002 }),
                node_endpoint: String::new(),
                draining: false,
                lease_expires_ms: u64::MAX,
            })
            .collect();
        let cfg = DispatchConfig {
            endpoints: 2,
            token_ttl_secs: 600,
            heartbeat_min_ms: 5_000,
            heartbeat_default_ms: 30_000,
            heartbeat_max_ms: 200_000,
        };
        let app_secret = [6u8; 32];
        let auth_cfg = DispatchAuthConfig {
            ticket_keys: vec![KeyConfig { id: "app".into(), secret_hex: encode_hex(&app_secret) }],
            ..DispatchAuthConfig::default()
        };
        let auth = DispatchAuth::new(&auth_cfg, ReplayStore::memory(16)).unwrap();
        let d = Arc::new(
            Dispatcher::new(cfg, keyring.clone(), Arc::new(StaticNodes(nodes)))
                .with_reconnect_bounds(300, 20_000)
                .with_auth(auth),
        );
        let server =
            HttpServer::start("127.0.0.1:0".parse().unwrap(), 4, Arc::new(move |r| d.dispatch(r, now_unix_secs())))
                .unwrap();
        // The uid comes from the ticket, not from the query.
        let mut q = DispatcherConfig::new(server.addr().to_string(), "mallory", "phone");
        q.app = "chat".into();
        let claims =
            serde_json::json!({"kid": "app", "uid": "alice &co", "exp": now_unix_secs() + 60, "nonce": "sdk-test-1"});
        q.ticket = sign_ticket(&app_secret, &claims);
        let got = lookup(&q, "wifi").unwrap();
        assert_eq!(got.endpoints.len(), 2);
        assert!(got.endpoints.iter().all(|e| e.starts_with("127.0.0.1:700")));
        assert_eq!((got.heartbeat_min_ms, got.heartbeat_max_ms), (5_000, 200_000));
        assert_eq!((got.reconnect_min_ms, got.reconnect_max_ms), (300, 20_000));
        let claims = keyring.verify(&got.token, crate::protocol::token::now_unix_secs(), 0).unwrap();
        assert_eq!((claims.user.as_str(), claims.device.as_str(), claims.app.as_str()), ("alice &co", "phone", "chat"));
        // Single use.
        assert!(matches!(lookup(&q, "wifi"), Err(DispatchError::Status { status: 401, .. })));
        q.ticket = String::new();
        assert!(matches!(lookup(&q, "wifi"), Err(DispatchError::Status { status: 401, .. })));
        server.stop();
    }

    #[test]
    fn bad_replies_are_typed_errors() {
        assert!(matches!(parse_reply(b"HTTP/1.1 200 OK\r\n\r\n{}"), Err(DispatchError::BadReply(_))));
        assert!(matches!(parse_reply(b"HTTP/1.1 200 OK\r\n\r\nnot json"), Err(DispatchError::BadReply(_))));
        assert!(matches!(parse_reply(b"HTTP/1.1 2"), Err(DispatchError::BadReply(_))));
        assert!(matches!(parse_reply(b"HTTP/1.1 503 x\r\n\r\nbusy"), Err(DispatchError::Status { status: 503, .. })));
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
