//! Tests of the HTTP server (`server.rs`).

use super::*;
use std::io::BufReader;

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
        Arc::new(|r: &Request| Response::text(200, format!("{} {} {:?}", r.method, r.path, r.query.get("q"))).into());
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
