//! The HTTP/1.1 upgrade (RFC 6455 4.2).
//!
//! [`HeadReader`] collects the request head across reads, bounded in bytes
//! (431 past the limit) and in time (408 past the deadline the driver
//! passes in: this module reads no clock). [`parse_request`] checks it and
//! answers [`Accepted`] (write [`Accepted::response`], then speak frames) or
//! a [`HandshakeError`] whose [`HandshakeError::response`] is the HTTP error
//! to write before closing.
//!
//! Browsers cannot set headers on a WebSocket, so a connect token may come
//! as a `Sec-WebSocket-Protocol` entry `longlink.token.<token>` or as the
//! `token` query parameter. It is only carried to the session, which
//! verifies it exactly like the token of an Auth frame.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

/// RFC 6455 1.3: appended to the client's key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Most headers a request may have; a browser sends about 15.
const MAX_HEADERS: usize = 32;
/// Subprotocol entries starting with this carry a connect token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "longlink.token.";

/// Handshake settings (config `[server]` `ws_*`).
#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    /// Request path of the endpoint, e.g. `/v1/ws`.
    pub path: String,
    /// The subprotocol the client must offer and the server answers with.
    pub subprotocol: String,
    /// Exact `Origin` values allowed (`https://app.example.com`); empty
    /// allows any origin (see [`HandshakeConfig::warnings`]).
    pub allowed_origins: Vec<String>,
    /// Limit on the request head (request line + headers), in bytes.
    pub max_head_bytes: usize,
    /// Time from accept to a complete head, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            path: "/v1/ws".to_owned(),
            subprotocol: "longlink.v1".to_owned(),
            allowed_origins: Vec::new(),
            max_head_bytes: 8 * 1024,
            timeout_ms: 5_000,
        }
    }
}

impl HandshakeConfig {
    /// Checks values a user could get wrong; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("server.ws_path {:?} must start with '/'", self.path));
        }
        if self.subprotocol.is_empty() || !self.subprotocol.bytes().all(is_tchar) {
            return Err(format!("server.ws_subprotocol {:?} must be a non-empty HTTP token", self.subprotocol));
        }
        if !(256..=64 * 1024).contains(&self.max_head_bytes) {
            return Err(format!("server.ws_max_head_bytes {} must be in 256..=65536", self.max_head_bytes));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(format!("server.ws_handshake_timeout_ms {} must be in 100..=60000", self.timeout_ms));
        }
        Ok(())
    }

    /// Settings that work but deserve a log line at startup.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.allowed_origins.is_empty() {
            out.push(
                "server.ws_allowed_origins is empty: any web page can open a WebSocket session with a token it holds"
                    .to_owned(),
            );
        }
        out
    }
}

/// Why an upgrade was refused. Each maps to an HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("request head larger than {max} bytes")]
    HeadTooLarge { max: usize },
    #[error("no complete request head before the deadline")]
    Timeout,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("method {0:?} is not GET")]
    NotGet(String),
    #[error("no WebSocket endpoint at this path")]
    NotFound,
    #[error("missing or duplicate header {0}")]
    Header(&'static str),
    #[error("not a WebSocket upgrade (Upgrade/Connection headers)")]
    NotUpgrade,
    #[error("Sec-WebSocket-Key is not 16 bytes of base64")]
    BadKey,
    #[error("unsupported Sec-WebSocket-Version (only 13)")]
    UnsupportedVersion,
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("client does not offer subprotocol {0:?}")]
    NoSubprotocol(String),
    #[error("bad token parameter: {0}")]
    BadToken(&'static str),
    #[error("a request body is not allowed")]
    Body,
}

impl HandshakeError {
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::HeadTooLarge { .. } => 431,
            HandshakeError::Timeout => 408,
            HandshakeError::NotGet(_) => 405,
            HandshakeError::NotFound => 404,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::OriginNotAllowed => 403,
            _ => 400,
        }
    }

    /// The HTTP response to write before closing. The body is the error
    /// text: it helps whoever debugs a client and reveals nothing the
    /// client did not send.
    pub fn response(&self) -> Vec<u8> {
        let reason = match self.status() {
            404 => "Not Found",
            405 => "Method Not Allowed",
            403 => "Forbidden",
            408 => "Request Timeout",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Bad Request",
        };
        let body = self.to_string();
        let extra = match self {
            HandshakeError::UnsupportedVersion => "Sec-WebSocket-Version: 13\r\n",
            HandshakeError::NotGet(_) => "Allow: GET\r\n",
            _ => "",
        };
        format!(
            "HTTP/1.1 {} {reason}\r\n{extra}Connection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            self.status(),
            body.len()
        )
        .into_bytes()
    }
}

/// A connect token from the URL or a subprotocol entry. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

/// An accepted upgrade.
#[derive(Debug)]
pub struct Accepted {
    /// `Sec-WebSocket-Accept` value.
    accept: String,
    subprotocol: String,
    /// Token from the query or a subprotocol entry, for the session.
    pub token: Option<Token>,
    /// The client's `Origin`, if any (for logs on the connection span).
    pub origin: Option<String>,
}

impl Accepted {
    /// The 101 response. Only the configured subprotocol is echoed, never
    /// the token entry.
    pub fn response(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            self.accept, self.subprotocol
        )
        .into_bytes()
    }
}

/// Collects a request head across reads, bounded in bytes and time.
/// `Debug` shows sizes only: the head may hold a token (`?token=`, a
/// `longlink.token.` protocol entry).
pub struct HeadReader {
    head: Vec<u8>,
    /// Where the search for the blank line resumes, so a head sent a byte at
    /// a time costs linear, not quadratic, work.
    scanned: usize,
    max: usize,
    deadline: Instant,
}

impl std::fmt::Debug for HeadReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeadReader {{ head: <{} bytes>, max: {} }}", self.head.len(), self.max)
    }
}

/// What [`HeadReader::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Feed {
    /// The head is not complete yet.
    Incomplete,
    /// The head is complete; `data[consumed..]` of the last feed came after
    /// it (frames sent early) and belongs to the WebSocket decoder.
    Complete { consumed: usize },
}

impl HeadReader {
    /// Starts reading at `now` (the accept time).
    pub fn new(cfg: &HandshakeConfig, now: Instant) -> HeadReader {
        HeadReader {
            head: Vec::new(),
            scanned: 0,
            max: cfg.max_head_bytes,
            deadline: now + Duration::from_millis(cfg.timeout_ms),
        }
    }

    /// When the driver must give up on this head (arm the timer wheel).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `Err(Timeout)` once `now` is past the deadline.
    pub fn check_deadline(&self, now: Instant) -> Result<(), HandshakeError> {
        if now >= self.deadline { Err(HandshakeError::Timeout) } else { Ok(()) }
    }

    /// Adds the bytes of one read. Never holds more than the limit.
    pub fn feed(&mut self, data: &[u8]) -> Result<Feed, HandshakeError> {
        let room = self.max - self.head.len();
        let take = data.len().min(room);
        self.head.extend_from_slice(&data[..take]);
        let from = self.scanned.saturating_sub(3);
        if let Some(at) = find_blank_line(&self.head[from..]) {
            let end = from + at + 4;
            // Bytes past the head go back to the caller, not into the head.
            let consumed = take - (self.head.len() - end);
            self.head.truncate(end);
            self.scanned = end;
            return Ok(Feed::Complete { consumed });
        }
        self.scanned = self.head.len();
        if self.head.len() >= self.max {
            return Err(HandshakeError::HeadTooLarge { max: self.max });
        }
        Ok(Feed::Incomplete)
    }

    /// The complete head (after [`Feed::Complete`]).
    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Checks a complete request head against `cfg`.
pub fn parse_request(head: &[u8], cfg: &HandshakeConfig) -> Result<Accepted, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        // httparse also ends a head at a bare LF LF; bytes between there and
        // the CRLFCRLF the reader stopped at would be dropped silently (a
        // parser differential with a proxy in front): refuse.
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(httparse::Status::Complete(_)) => return Err(HandshakeError::Malformed("bytes after the end of the head")),
        Ok(httparse::Status::Partial) => return Err(HandshakeError::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::Malformed("too many headers")),
        Err(_) => return Err(HandshakeError::Malformed("not an HTTP/1.1 request")),
    }
    let method = req.method.unwrap_or_default();
    if method != "GET" {
        return Err(HandshakeError::NotGet(method.chars().take(16).collect()));
    }
    if req.version != Some(1) {
        return Err(HandshakeError::Malformed("HTTP version below 1.1"));
    }
    let target = req.path.unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != cfg.path {
        return Err(HandshakeError::NotFound);
    }

    let headers = req.headers;
    single(headers, "host")?;
    if headers.iter().any(|h| h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
        || headers.iter().any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(HandshakeError::Body);
    }
    if !has_token(headers, "upgrade", "websocket") || !has_token(headers, "connection", "upgrade") {
        return Err(HandshakeError::NotUpgrade);
    }
    if single(headers, "sec-websocket-version")? != b"13" {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = single(headers, "sec-websocket-key")?;
    if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(HandshakeError::BadKey);
    }

    let origin = match headers.iter().filter(|h| h.name.eq_ignore_ascii_case("origin")).count() {
        0 => None,
        1 => std::str::from_utf8(single(headers, "origin")?).ok().map(str::to_owned),
        _ => return Err(HandshakeError::Header("Origin")),
    };
    if !cfg.allowed_origins.is_empty() {
        // Browsers always send Origin; a missing one is a non-browser
        // client, which the allow-list is there to keep out too.
        let ok = origin.as_deref().is_some_and(|o| cfg.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
        if !ok {
            return Err(HandshakeError::OriginNotAllowed);
        }
    }

    let mut offered = false;
    let mut token = None;
    for entry in list_values(headers, "sec-websocket-protocol") {
        if entry == cfg.subprotocol.as_bytes() {
            offered = true;
        } else if let Some(t) = entry.strip_prefix(TOKEN_PROTOCOL_PREFIX.as_bytes()) {
            set_token(&mut token, t.to_vec())?;
        }
    }
    if !offered {
        return Err(HandshakeError::NoSubprotocol(cfg.subprotocol.clone()));
    }
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("token=") {
            set_token(&mut token, percent_decode(value.as_bytes())?)?;
        }
    }

    Ok(Accepted { accept: accept_key(key), subprotocol: cfg.subprotocol.clone(), token, origin })
}

fn set_token(slot: &mut Option<Token>, raw: Vec<u8>) -> Result<(), HandshakeError> {
    if slot.is_some() {
        return Err(HandshakeError::BadToken("more than one token"));
    }
    if raw.is_empty() {
        return Err(HandshakeError::BadToken("empty token"));
    }
    let text = String::from_utf8(raw).map_err(|_| HandshakeError::BadToken("not UTF-8"))?;
    *slot = Some(Token(text));
    Ok(())
}

/// The value of a header that must appear exactly once.
fn single<'h>(headers: &[httparse::Header<'h>], name: &'static str) -> Result<&'h [u8], HandshakeError> {
    let mut found = headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name));
    match (found.next(), found.next()) {
        (Some(h), None) => Ok(h.value),
        _ => Err(HandshakeError::Header(name)),
    }
}

/// Comma-separated entries of every header `name`, trimmed.
fn list_values<'h>(headers: &'h [httparse::Header<'h>], name: &'static str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|v| v.trim_ascii())
        .filter(|v| !v.is_empty())
}

fn has_token(headers: &[httparse::Header<'_>], name: &'static str, token: &str) -> bool {
    list_values(headers, name).any(|v| v.eq_ignore_ascii_case(token.as_bytes()))
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 3986 percent-decoding. `+` stays `+` (tokens are base64url; a
/// standard-base64 `+` left unescaped must not turn into a space).
pub fn percent_decode(raw: &[u8]) -> Result<Vec<u8>, HandshakeError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(HandshakeError::BadToken("truncated %-escape"))?;
            let hi = hex_value(hex[0]).ok_or(HandshakeError::BadToken("bad %-escape"))?;
            let lo = hex_value(hex[1]).ok_or(HandshakeError::BadToken("bad %-escape"))?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review finding: the head reader's Debug must not show the token.
    #[test]
    fn head_reader_debug_hides_the_token() {
        let mut reader = HeadReader::new(&HandshakeConfig::default(), Instant::now());
        let head = b"GET /v1/ws?token=SECRETTOKEN HTTP/1.1\r\nSec-WebSocket-Protocol: longlink.token.SECRETTOKEN\r\n";
        assert_eq!(reader.feed(head), Ok(Feed::Incomplete));
        let shown = format!("{reader:?}");
        assert!(!shown.contains("SECRET") && !shown.contains("83, 69, 67"), "{shown}");
    }

    /// Review finding: a head httparse ends earlier (bare LF LF) is refused.
    #[test]
    fn head_must_be_parsed_to_its_end() {
        let cfg = HandshakeConfig::default();
        let head = "GET /v1/ws HTTP/1.1\nHost: example.com\nUpgrade: websocket\nConnection: Upgrade\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n\
                    Sec-WebSocket-Protocol: longlink.v1\n\nGET /admin HTTP/1.1\r\nHost: internal\r\n\r\n";
        let mut reader = HeadReader::new(&cfg, Instant::now());
        assert!(matches!(reader.feed(head.as_bytes()), Ok(Feed::Complete { .. })));
        assert!(parse_request(reader.head(), &cfg).is_err());
    }

    fn request(extra: &str) -> String {
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn with_protocol(extra: &str) -> String {
        request(&format!("Sec-WebSocket-Protocol: longlink.v1\r\n{extra}"))
    }

    #[test]
    fn rfc6455_accept_key_example() {
        // RFC 6455 1.3: key "dGhlIHNhbXBsZSBub25jZQ==" -> "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn a_valid_upgrade_gets_101_with_accept_and_only_our_subprotocol() {
        let cfg = HandshakeConfig::default();
        let req = request("Sec-WebSocket-Protocol: chat, longlink.v1, longlink.token.abc.DEF-_\r\n");
        let ok = parse_request(req.as_bytes(), &cfg).expect("valid");
        assert_eq!(ok.token.as_ref().map(Token::expose), Some("abc.DEF-_"));
        let resp = String::from_utf8(ok.response()).expect("ascii");
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.contains("Sec-WebSocket-Protocol: longlink.v1\r\n"));
        assert!(!resp.contains("abc.DEF"), "the token must not be echoed");
        assert!(!format!("{ok:?}").contains("abc.DEF"), "the token must not be printed");
    }

    #[test]
    fn token_from_the_query_is_percent_decoded() {
        let cfg = HandshakeConfig::default();
        let req = with_protocol("").replace("GET /v1/ws ", "GET /v1/ws?x=1&token=a%2Bb%3d.c+d ");
        let ok = parse_request(req.as_bytes(), &cfg).expect("valid");
        assert_eq!(ok.token.expect("token").expose(), "a+b=.c+d");
        // Two tokens are ambiguous.
        let req = request("Sec-WebSocket-Protocol: longlink.v1, longlink.token.x\r\n")
            .replace("GET /v1/ws ", "GET /v1/ws?token=y ");
        assert_eq!(parse_request(req.as_bytes(), &cfg).err(), Some(HandshakeError::BadToken("more than one token")));
        for bad in ["token=%zz", "token=%4", "token=%ff", "token="] {
            let req = with_protocol("").replace("GET /v1/ws ", &format!("GET /v1/ws?{bad} "));
            assert_eq!(parse_request(req.as_bytes(), &cfg).map(|_| ()).map_err(|e| e.status()), Err(400), "{bad}");
        }
    }

    #[test]
    fn refusals_map_to_http_statuses() {
        let cfg = HandshakeConfig { allowed_origins: vec!["https://app.example.com".into()], ..Default::default() };
        let origin = "Origin: https://app.example.com\r\n";
        let cases: Vec<(String, u16)> = vec![
            (with_protocol(origin).replace("GET ", "POST "), 405),
            (with_protocol(origin).replace("/v1/ws", "/other"), 404),
            (with_protocol(origin).replace("Version: 13", "Version: 8"), 426),
            (with_protocol(origin).replace("Upgrade: websocket\r\n", ""), 400),
            (with_protocol(origin).replace("keep-alive, Upgrade", "keep-alive"), 400),
            (with_protocol(origin).replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
            (with_protocol(origin).replace("Host: example.com\r\n", ""), 400),
            (with_protocol(&format!("{origin}Host: b\r\n")), 400),
            (with_protocol(&format!("{origin}Content-Length: 5\r\n")), 400),
            (with_protocol("Origin: https://evil.example.com\r\n"), 403),
            (with_protocol(""), 403),
            (request(origin), 400),
            (with_protocol(origin).replace("HTTP/1.1", "HTTP/1.0"), 400),
        ];
        for (req, status) in cases {
            let err = parse_request(req.as_bytes(), &cfg).expect_err(&req);
            assert_eq!(err.status(), status, "{req:?} -> {err}");
            let resp = String::from_utf8(err.response()).expect("ascii");
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        }
        assert!(parse_request(with_protocol(origin).as_bytes(), &cfg).is_ok());
        let resp = String::from_utf8(HandshakeError::UnsupportedVersion.response()).expect("ascii");
        assert!(resp.contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn an_empty_allow_list_accepts_any_origin_with_a_warning() {
        let cfg = HandshakeConfig::default();
        assert_eq!(cfg.warnings().len(), 1);
        assert!(parse_request(with_protocol("Origin: https://anything\r\n").as_bytes(), &cfg).is_ok());
        let strict = HandshakeConfig { allowed_origins: vec!["https://a".into()], ..Default::default() };
        assert!(strict.warnings().is_empty());
    }

    #[test]
    fn slowloris_head_is_resumable_byte_by_byte_and_bounded() {
        let cfg = HandshakeConfig::default();
        let t0 = Instant::now();
        let req = with_protocol("");
        let mut reader = HeadReader::new(&cfg, t0);
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(b"\x82\x80ABCD"); // a frame sent early
        let mut done = None;
        for (i, b) in bytes.iter().enumerate() {
            match reader.feed(std::slice::from_ref(b)).expect("within limits") {
                Feed::Incomplete => {}
                Feed::Complete { consumed } => {
                    done = Some(i + consumed);
                    break;
                }
            }
        }
        let end = done.expect("complete");
        assert_eq!(&bytes[end..end + 2], b"\x82\x80");
        assert!(parse_request(reader.head(), &cfg).is_ok());

        // Early bytes in the same read as the end of the head come back.
        let mut reader = HeadReader::new(&cfg, t0);
        assert_eq!(reader.feed(&bytes).expect("ok"), Feed::Complete { consumed: end });

        // A head that never ends stops at the limit, holding no more.
        let small = HandshakeConfig { max_head_bytes: 300, ..Default::default() };
        let mut reader = HeadReader::new(&small, t0);
        let mut err = None;
        for _ in 0..10_000 {
            if let Err(e) = reader.feed(b"X-Junk: 1\r\n") {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err.map(|e| e.status()), Some(431));
        assert!(reader.head().len() <= 300);

        // The deadline is the driver's clock passed in.
        let reader = HeadReader::new(&cfg, t0);
        assert!(reader.check_deadline(t0 + Duration::from_millis(4_999)).is_ok());
        assert_eq!(reader.check_deadline(reader.deadline()).err().map(|e| e.status()), Some(408));
    }

    #[test]
    fn config_validation_names_the_field() {
        assert!(HandshakeConfig::default().validate().is_ok());
        let bad = HandshakeConfig { path: "v1".into(), ..Default::default() };
        assert!(bad.validate().expect_err("invalid").contains("ws_path"));
        let bad = HandshakeConfig { subprotocol: "a b".into(), ..Default::default() };
        assert!(bad.validate().expect_err("invalid").contains("ws_subprotocol"));
        let bad = HandshakeConfig { max_head_bytes: 10, ..Default::default() };
        assert!(bad.validate().expect_err("invalid").contains("ws_max_head_bytes"));
    }
}
