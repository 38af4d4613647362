//! A minimal MQTT 3.1.1 codec: CONNECT, SUBSCRIBE, PUBLISH (QoS 0),
//! PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH, PINGRESP in.
//! Parsing is incremental and bounded: a packet longer than
//! [`MAX_PACKET`] is an error before anything is allocated.

/// Largest packet accepted (a stamped payload is 64 bytes).
pub const MAX_PACKET: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MqttError {
    #[error("MQTT packet of {0} bytes is over {MAX_PACKET}")]
    TooLarge(usize),
    #[error("MQTT remaining length longer than 4 bytes")]
    BadLength,
    #[error("malformed MQTT {0} packet")]
    Malformed(&'static str),
    #[error("MQTT CONNACK refused the connection (return code {0})")]
    Refused(u8),
    #[error("MQTT SUBACK refused the subscription")]
    SubscribeRefused,
}

/// One packet from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    ConnAck {
        return_code: u8,
    },
    SubAck {
        packet_id: u16,
        granted: &'a [u8],
    },
    Publish {
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PingResp,
    /// Any other packet type (the first byte's high nibble).
    Other(u8),
}

/// Parses the first complete packet in `buf`: `Ok(Some((packet, consumed)))`,
/// `Ok(None)` when more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, MqttError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let mut len = 0usize;
    let mut header = 1;
    loop {
        let Some(&b) = buf.get(header) else { return Ok(None) };
        len |= usize::from(b & 0x7f) << (7 * (header - 1));
        header += 1;
        if b & 0x80 == 0 {
            break;
        }
        if header > 4 {
            return Err(MqttError::BadLength);
        }
    }
    if len > MAX_PACKET {
        return Err(MqttError::TooLarge(len));
    }
    let total = header + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[header..total];
    let packet = match first >> 4 {
        2 => match body {
            [_flags, rc] => Packet::ConnAck { return_code: *rc },
            _ => return Err(MqttError::Malformed("CONNACK")),
        },
        3 => {
            let qos = (first >> 1) & 3;
            let topic_len = usize::from(u16::from_be_bytes([
                *body.first().ok_or(MqttError::Malformed("PUBLISH"))?,
                *body.get(1).ok_or(MqttError::Malformed("PUBLISH"))?,
            ]));
            let mut at = 2 + topic_len;
            let topic = body.get(2..at).ok_or(MqttError::Malformed("PUBLISH"))?;
            if qos > 0 {
                at += 2; // packet id
            }
            let payload = body.get(at..).ok_or(MqttError::Malformed("PUBLISH"))?;
            Packet::Publish { topic, payload }
        }
        9 => match body {
            [hi, lo, granted @ ..] if !granted.is_empty() => {
                Packet::SubAck { packet_id: u16::from_be_bytes([*hi, *lo]), granted }
            }
            _ => return Err(MqttError::Malformed("SUBACK")),
        },
        13 => Packet::PingResp,
        other => Packet::Other(other),
    };
    Ok(Some((packet, total)))
}

/// The fixed header of a packet type byte with `len` bytes after it.
fn fixed_header(out: &mut Vec<u8>, first: u8, mut len: usize) {
    out.push(first);
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT with a clean session, no will, no credentials.
pub fn connect(client_id: &str, keepalive_s: u16) -> Vec<u8> {
    let mut out = Vec::new();
    fixed_header(&mut out, 0x10, 10 + 2 + client_id.len());
    string(&mut out, b"MQTT");
    out.push(4); // protocol level 3.1.1
    out.push(0x02); // clean session
    out.extend_from_slice(&keepalive_s.to_be_bytes());
    string(&mut out, client_id.as_bytes());
    out
}

/// SUBSCRIBE to one topic filter at QoS 0.
pub fn subscribe(packet_id: u16, topic: &str) -> Vec<u8> {
    let mut out = Vec::new();
    fixed_header(&mut out, 0x82, 2 + 2 + topic.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    string(&mut out, topic.as_bytes());
    out.push(0);
    out
}

/// Appends a QoS 0 PUBLISH (no packet id, no retain) to `out`.
pub fn publish(out: &mut Vec<u8>, topic: &str, payload: &[u8]) {
    fixed_header(out, 0x30, 2 + topic.len() + payload.len());
    string(out, topic.as_bytes());
    out.extend_from_slice(payload);
}

pub const PINGREQ: &[u8] = &[0xc0, 0];
pub const DISCONNECT: &[u8] = &[0xe0, 0];

/// The mosquitto configuration the bench runs (see bench/README.md,
/// `compare`): one loopback listener, no persistence, anonymous clients,
/// the 2.0 defaults for per-client queues written out.
pub fn server_config(port: u16) -> String {
    format!(
        "# written by longlink-bench compare\n\
         per_listener_settings false\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         # stay root: the bench reads /proc of the process it started\n\
         user root\n\
         max_connections -1\n\
         # nothing on disk\n\
         persistence false\n\
         # per-client queue limits (2.0 defaults): beyond 1000 queued messages\n\
         # or unlimited bytes, QoS 0 messages to a slow client are dropped\n\
         max_queued_messages 1000\n\
         max_queued_bytes 0\n\
         max_inflight_messages 20\n\
         max_keepalive 65535\n\
         set_tcp_nodelay true\n\
         # no $SYS publishing, no per-connection log lines\n\
         sys_interval 0\n\
         connection_messages false\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_packets_as_the_3_1_1_spec_lays_them_out() {
        assert_eq!(connect("c1", 600), b"\x10\x0e\x00\x04MQTT\x04\x02\x02\x58\x00\x02c1");
        assert_eq!(subscribe(1, "a/b"), b"\x82\x08\x00\x01\x00\x03a/b\x00");
        let mut out = Vec::new();
        publish(&mut out, "t", &[7u8; 200]);
        // 2 + 1 + 200 = 203 = 0xcb 0x01 as a variable-length integer.
        assert_eq!(&out[..6], b"\x30\xcb\x01\x00\x01t");
        assert_eq!(out.len(), 3 + 203);
        assert!(server_config(1883).contains("listener 1883 127.0.0.1\n"));
    }

    #[test]
    fn parses_what_it_encodes_and_server_packets_incrementally() {
        let mut stream = vec![0x20, 2, 0, 0, 0x90, 3, 0, 1, 0];
        publish(&mut stream, "topic", b"payload");
        stream.extend_from_slice(&[0xd0, 0]);
        // A QoS 1 publish carries a packet id after the topic.
        stream.extend_from_slice(&[0x32, 7, 0, 1, b'q', 0, 9, b'h', b'i']);
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for &b in &stream {
            buf.push(b);
            while let Some((p, used)) = parse(&buf).unwrap() {
                got.push(format!("{p:?}"));
                buf.drain(..used);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got.len(), 5);
        assert_eq!(got[0], "ConnAck { return_code: 0 }");
        assert_eq!(got[1], "SubAck { packet_id: 1, granted: [0] }");
        assert_eq!(got[2], format!("{:?}", Packet::Publish { topic: b"topic", payload: b"payload" }));
        assert_eq!(got[3], "PingResp");
        assert_eq!(got[4], format!("{:?}", Packet::Publish { topic: b"q", payload: b"hi" }));
    }

    #[test]
    fn rejects_oversized_and_malformed_packets() {
        assert_eq!(parse(&[0x30, 0xff, 0xff, 0xff, 0x7f]), Err(MqttError::TooLarge(268_435_455)));
        assert_eq!(parse(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), Err(MqttError::BadLength));
        assert_eq!(parse(&[0x30, 1, 0]), Err(MqttError::Malformed("PUBLISH")));
        assert_eq!(parse(&[0x30, 3, 0, 5, b'a']), Err(MqttError::Malformed("PUBLISH")));
        assert_eq!(parse(&[0x20, 1, 0]), Err(MqttError::Malformed("CONNACK")));
        assert_eq!(parse(&[0x30, 5]), Ok(None));
    }
}
