//! Tests of the HTTP server (`server.rs`).

use super::*;
use std::io::{BufRead, BufReader};

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
fn a_head_is_searched_up_to_its_limit_and_no_further() {
    // The read_head reader this replaced is gone: the server searches its
    // own buffer, each byte once, within MAX_HEAD + 4.
    let mut long = vec![b'a'; MAX_HEAD + 100];
    long.extend_from_slice(b"\r\n\r\n");
    assert_eq!(find_head_end(&long, 0), None, "searched past the limit");
    let input = b"GET / HTTP/1.1\r\n\r\nrest";
    assert_eq!(find_head_end(input, 0), Some(18));
    // Searched in pieces, a terminator split across reads is still found.
    assert_eq!(find_head_end(input, 16), Some(18));
    assert_eq!(find_head_end(b"GET / HTTP/1.0\n\n", 15), Some(16));
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

#[test]
fn a_body_arriving_after_its_head_is_read() {
    // The head is found on one read and its body comes on a later one: the
    // search must find the head again then (it once skipped it for good).
    let handler: Handler = Arc::new(|r: &Request| Response::text(200, format!("{} bytes", r.body.len())).into());
    let server = HttpServer::start("127.0.0.1:0".parse().unwrap(), 4, handler).unwrap();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nconnection: close\r\n\r\n").unwrap();
    s.flush().unwrap();
    // Let the server read the head alone before the body is sent.
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"hello").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("5 bytes"), "{answer:?}");
}
