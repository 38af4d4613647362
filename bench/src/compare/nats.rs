//! A minimal NATS client protocol codec (text protocol, no headers):
//! what the compare workers and publisher need, CONNECT/SUB/PUB/PING/PONG
//! out and INFO/MSG/PING/PONG/+OK/-ERR in. Parsing is incremental over a
//! byte buffer and bounded: a control line longer than [`MAX_LINE`] or a
//! payload larger than [`MAX_PAYLOAD`] is an error, before any allocation.

use std::fmt::Write as _;

/// Longest control line accepted (INFO is the longest: a few hundred bytes).
pub const MAX_LINE: usize = 16 * 1024;
/// Largest message payload accepted (nats-server's default max_payload).
pub const MAX_PAYLOAD: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NatsError {
    #[error("NATS control line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("NATS payload of {0} bytes is over {MAX_PAYLOAD}")]
    PayloadTooLarge(usize),
    #[error("bad NATS line {0:?}")]
    BadLine(String),
    #[error("NATS server error: {0}")]
    Server(String),
}

/// One thing the server sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Info,
    /// A delivered message: its payload.
    Msg(&'a [u8]),
    Ping,
    Pong,
    Ok,
    /// `-ERR 'text'`.
    Err(String),
}

/// Parses the first complete event in `buf`: `Ok(Some((event, consumed)))`,
/// `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Event<'_>, usize)>, NatsError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > MAX_LINE { Err(NatsError::LineTooLong) } else { Ok(None) };
    };
    if end > MAX_LINE {
        return Err(NatsError::LineTooLong);
    }
    let line = &buf[..end];
    let after = end + 2;
    let op_end = line.iter().position(|&b| b == b' ' || b == b'\t').unwrap_or(line.len());
    let op = &line[..op_end];
    let bad = || NatsError::BadLine(String::from_utf8_lossy(line).into_owned());
    let event = if op.eq_ignore_ascii_case(b"MSG") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let text = std::str::from_utf8(line).map_err(|_| bad())?;
        let words: Vec<&str> = text.split_ascii_whitespace().collect();
        if !(4..=5).contains(&words.len()) {
            return Err(bad());
        }
        let len: usize = words[words.len() - 1].parse().map_err(|_| bad())?;
        if len > MAX_PAYLOAD {
            return Err(NatsError::PayloadTooLarge(len));
        }
        let total = after + len + 2;
        if buf.len() < total {
            return Ok(None);
        }
        if &buf[after + len..total] != b"\r\n" {
            return Err(bad());
        }
        return Ok(Some((Event::Msg(&buf[after..after + len]), total)));
    } else if op.eq_ignore_ascii_case(b"PING") {
        Event::Ping
    } else if op.eq_ignore_ascii_case(b"PONG") {
        Event::Pong
    } else if op.eq_ignore_ascii_case(b"+OK") {
        Event::Ok
    } else if op.eq_ignore_ascii_case(b"INFO") {
        Event::Info
    } else if op.eq_ignore_ascii_case(b"-ERR") {
        Event::Err(String::from_utf8_lossy(&line[op_end..]).trim().trim_matches('\'').to_owned())
    } else {
        return Err(bad());
    };
    Ok(Some((event, after)))
}

/// CONNECT without echo, verbose or pedantic mode, then SUB `subject` as
/// sid 1 and a PING: the PONG that answers it means the subscription is in
/// place (the NATS idiom for a flush).
pub fn connect_and_subscribe(name: &str, subject: Option<&str>) -> Vec<u8> {
    let mut out = String::new();
    let _ = write!(
        out,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"{name}\",\
         \"lang\":\"rust\",\"version\":\"0.1\",\"protocol\":1}}\r\n"
    );
    if let Some(subject) = subject {
        let _ = write!(out, "SUB {subject} 1\r\n");
    }
    out.push_str("PING\r\n");
    out.into_bytes()
}

/// Appends `PUB subject len\r\npayload\r\n` to `out`.
pub fn publish(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

pub const PING: &[u8] = b"PING\r\n";
pub const PONG: &[u8] = b"PONG\r\n";

/// The nats-server configuration the bench runs (see bench/README.md,
/// `compare`): loopback, no JetStream (nothing persisted), the 2.9
/// defaults for slow consumers written out, server pings off for the run.
pub fn server_config(port: u16) -> String {
    format!(
        "# written by longlink-bench compare\n\
         host: 127.0.0.1\n\
         port: {port}\n\
         # far above any run (the default is 65536)\n\
         max_connections: 1000000\n\
         # slow-consumer limits: a client's outbound buffer may hold 64 MiB and a\n\
         # write may block for 10 s before the server cuts it (2.9 defaults)\n\
         max_pending: 67108864\n\
         write_deadline: \"10s\"\n\
         max_payload: 1048576\n\
         # no server PINGs during a run (clients never ping either)\n\
         ping_interval: \"10m\"\n\
         # no JetStream: nothing is persisted\n\
         debug: false\n\
         trace: false\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_server_operation_incrementally() {
        let stream = b"INFO {\"server_id\":\"x\"}\r\nPING\r\n+OK\r\nMSG a.b 1 5\r\nhello\r\nMSG c 1 r 0\r\n\r\nPONG\r\n-ERR 'Slow Consumer'\r\n";
        let mut events = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        // Byte by byte: every prefix either parses or asks for more.
        for &b in stream.iter() {
            buf.push(b);
            while let Some((event, used)) = parse(&buf).unwrap() {
                events.push(format!("{event:?}"));
                buf.drain(..used);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(
            events,
            ["Info", "Ping", "Ok", "Msg([104, 101, 108, 108, 111])", "Msg([])", "Pong", "Err(\"Slow Consumer\")"]
        );
    }

    #[test]
    fn rejects_oversized_and_malformed_input_before_allocating() {
        assert_eq!(parse(&vec![b'A'; MAX_LINE + 1]), Err(NatsError::LineTooLong));
        assert_eq!(parse(b"MSG a 1 99999999\r\n"), Err(NatsError::PayloadTooLarge(99_999_999)));
        assert!(matches!(parse(b"MSG a 1 x\r\n"), Err(NatsError::BadLine(_))));
        assert!(matches!(parse(b"MSG a 1 3\r\nabcXY"), Err(NatsError::BadLine(_))));
        assert!(matches!(parse(b"HELLO\r\n"), Err(NatsError::BadLine(_))));
    }

    #[test]
    fn encodes_client_operations() {
        let mut out = Vec::new();
        publish(&mut out, "uni-0-1", b"xy");
        assert_eq!(out, b"PUB uni-0-1 2\r\nxy\r\n");
        let hello = String::from_utf8(connect_and_subscribe("w0", Some("fan"))).unwrap();
        assert!(hello.starts_with("CONNECT {\"verbose\":false"), "{hello}");
        assert!(hello.ends_with("}\r\nSUB fan 1\r\nPING\r\n"), "{hello}");
        assert!(server_config(4222).contains("port: 4222\n"));
    }
}
