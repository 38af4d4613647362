//! A small HTTP/1.1 server for the sidecars (dispatcher, admin): blocking
//! sockets on a few threads of their own, keep-alive, bounded connections
//! and request sizes. It never runs on a shard.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use tracing::{debug, warn};

/// Largest request head accepted (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// An idle keep-alive connection is closed after this.
const IDLE: Duration = Duration::from_secs(30);

/// A parsed request.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A response to send.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response { status, content_type, body: body.into() }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response::new(status, "application/json", value.to_string())
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body.into())
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

/// A running server; dropping it does not stop it (see [`HttpServer::stop`]).
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    /// Binds `addr` and serves `handler` with at most `max_connections`
    /// concurrent connections (one thread each; more wait in the backlog).
    pub fn start(addr: SocketAddr, max_connections: usize, handler: Handler) -> io::Result<HttpServer> {
        HttpServer::serve(TcpListener::bind(addr)?, max_connections, handler)
    }

    /// [`HttpServer::start`] on a listener bound earlier (a node binds
    /// every listener before it starts anything, so a taken port fails the
    /// start at once).
    pub fn serve(listener: TcpListener, max_connections: usize, handler: Handler) -> io::Result<HttpServer> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let active = Arc::new(AtomicUsize::new(0));
        let accept_stop = stop.clone();
        thread::Builder::new().name("longlink-http".into()).spawn(move || {
            for conn in listener.incoming() {
                if accept_stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if active.load(Ordering::Relaxed) >= max_connections {
                    let _ = write_response(&conn, &Response::text(503, "too many connections\n"), false);
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let (handler, active, stop) = (handler.clone(), active.clone(), accept_stop.clone());
                let spawned = thread::Builder::new().name("longlink-http-conn".into()).spawn(move || {
                    if let Err(e) = serve(conn, &handler, &stop) {
                        debug!(error = %e, "http connection ended");
                    }
                    active.fetch_sub(1, Ordering::Relaxed);
                });
                if let Err(e) = spawned {
                    warn!(error = %e, "cannot start an http connection thread");
                }
            }
        })?;
        Ok(HttpServer { addr, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting (the accept loop ends at its next connection).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

fn serve(conn: TcpStream, handler: &Handler, stop: &AtomicBool) -> io::Result<()> {
    conn.set_read_timeout(Some(IDLE))?;
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        let head = match read_head(&mut reader, MAX_HEAD)? {
            Some(head) => head,
            None => return Ok(()),
        };
        let head = match parse_head(&head) {
            Ok(head) => head,
            Err(msg) => return write_response(&conn, &Response::text(400, format!("{msg}\n")), false),
        };
        let mut body = vec![0; head.body_len];
        reader.read_exact(&mut body)?;
        let close = head.close || stop.load(Ordering::Relaxed);
        let request = Request { method: head.method, path: head.path, query: head.query, body };
        let response = handler(&request);
        write_response(&conn, &response, !close)?;
        if close {
            return Ok(());
        }
    }
}

/// What a request head says, parsed: all `serve` needs before the body.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    /// Percent-decoded, without the query.
    pub(crate) path: String,
    pub(crate) query: HashMap<String, String>,
    /// Content-Length, at most [`MAX_BODY`].
    pub(crate) body_len: usize,
    /// The client asked to close after this request (or speaks HTTP/1.0).
    pub(crate) close: bool,
}

/// Parses a head from [`read_head`]; the error is the 400 answer's text.
pub(crate) fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("malformed request"),
    }
    let header = |name: &str| {
        parsed.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value))
    };
    let body_len: usize = match header("content-length").map(|v| v.trim().parse()) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(_) => return Err("bad or too large content-length"),
    };
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) || parsed.version == Some(0);
    let target = parsed.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Head {
        method: parsed.method.unwrap_or("GET").to_owned(),
        path: percent_decode(path),
        query: parse_query(query),
        body_len,
        close,
    })
}

/// Reads up to and including the blank line; `None` on a clean EOF. A head
/// longer than `max_head` bytes is an error.
pub(crate) fn read_head(reader: &mut impl BufRead, max_head: usize) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        // At most one byte past the limit, however long the line: an
        // endless line must not grow the buffer without bound.
        let room = (max_head + 1).saturating_sub(head.len()) as u64;
        let n = reader.by_ref().take(room).read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
        if head.len() > max_head {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            return Ok(Some(head));
        }
    }
}

fn write_response(mut conn: &TcpStream, r: &Response, keep_alive: bool) -> io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&r.body);
    conn.write_all(&out)
}

/// `a=1&b=x%20y` into a map (the last of repeated keys wins).
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    // from_str_radix also takes a sign: "%+5" is not an escape.
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        let q = parse_query("uid=alice&device=phone%201&net=wifi&empty=&flag");
        assert_eq!(q["uid"], "alice");
        assert_eq!(q["device"], "phone 1");
        assert_eq!(q["empty"], "");
        assert_eq!(q["flag"], "");
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("x+y%41"), "x yA");
        assert_eq!(percent_decode("%+52"), "% 52");
    }

    #[test]
    fn a_head_is_read_up_to_its_limit_and_no_further() {
        let line = [b'a'; 1000];
        let mut reader = io::Cursor::new(&line[..]);
        let err = read_head(&mut reader, 64).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(reader.position(), 65, "read past the limit");
        let mut reader = io::Cursor::new(&b"GET / HTTP/1.1\r\n\r\nrest"[..]);
        assert_eq!(read_head(&mut reader, 64).unwrap().unwrap(), b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn serves_keep_alive_requests_and_rejects_garbage() {
        let handler: Handler =
            Arc::new(|r: &Request| Response::text(200, format!("{} {} {:?}", r.method, r.path, r.query.get("q"))));
        let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), 4, handler).unwrap();
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..3 {
            write!(s, "GET /v1/x?q={i} HTTP/1.1\r\nhost: t\r\n\r\n").unwrap();
            let mut reader = BufReader::new(s.try_clone().unwrap());
            let mut status = String::new();
            reader.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            let mut len = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.strip_prefix("content-length: ") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            assert_eq!(String::from_utf8(body).unwrap(), format!("GET /v1/x Some(\"{i}\")"));
        }
        let mut bad = TcpStream::connect(server.addr()).unwrap();
        bad.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut out = String::new();
        bad.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        server.stop();
    }
}
