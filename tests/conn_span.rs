//! The per-connection tracing span: what is logged while a connection is
//! served names its shard and connection.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use longlink::protocol::codec::{Flags, Frame};
use longlink::protocol::proto::{self, ErrorCode};

/// Log output kept in memory (the test reads it back).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn what_a_connection_logs_carries_its_shard_and_connection_id() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let cfg = test_config(1);
    let server = start(&cfg);
    let addr = server.client_addr();
    let mut bytes = BytesMut::new();
    Frame::Auth(proto::Auth { token: "not-a-token".into(), client_version: "t".into(), ..Default::default() })
        .encode_into(&mut bytes, Flags::default());
    let frames = run(async move { exchange(addr, &bytes, Duration::from_secs(10)).await });
    assert_eq!(close_code(&frames), Some(ErrorCode::InvalidToken), "{frames:?}");
    server.shutdown();
    let text = String::from_utf8_lossy(&logs.0.lock().expect("log buffer")).into_owned();
    let in_span: Vec<&str> = text.lines().filter(|l| l.contains("conn{shard=0 conn=")).collect();
    assert!(!in_span.is_empty(), "no log line inside a connection span:\n{text}");
}
