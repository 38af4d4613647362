//! A WebSocket load client for `unicast` and `fanout --transport ws`: the
//! load worker's connection when the clients connect over WebSocket.
//!
//! Only what the push scenarios need: the upgrade (subprotocol
//! `longlink.v1`), Auth and Join as masked binary messages, then server
//! messages decoded into longlink frames. Pushes are at-most-once (no Ack),
//! heartbeats are off in these runs (the server's idle timeout is longer
//! than the run), so no session state is kept. The server's CPU is what is
//! measured; this client's cost is the load worker's.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use longlink::client::{ClientError, ClientEvent};
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::proto;

/// Largest WebSocket message accepted from the server.
const MAX_MESSAGE: usize = 1 << 20;
const MASK: [u8; 4] = [0x5a, 0xa5, 0x3c, 0xc3];

pub struct WsConn {
    stream: TcpStream,
    /// Bytes read and not yet decoded as WebSocket frames.
    wire: Vec<u8>,
    /// Payload of the messages so far: longlink frames.
    frames: Vec<u8>,
}

fn protocol(message: &str) -> ClientError {
    ClientError::Io(io::Error::new(io::ErrorKind::InvalidData, message.to_owned()))
}

impl WsConn {
    /// Connects from `source`, upgrades, authenticates with `token`.
    pub async fn connect(
        server: SocketAddr,
        source: IpAddr,
        connect_timeout: Duration,
        token: String,
        heartbeat_ms: u32,
    ) -> Result<WsConn, ClientError> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(server), socket2::Type::STREAM.cloexec(), None)?;
        socket.set_nodelay(true)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
        socket.connect_timeout(&server.into(), connect_timeout)?;
        socket.set_nonblocking(true)?;
        // SAFETY: a connected TCP socket we own; ownership moves into the stream.
        let stream = unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) };
        let mut conn = WsConn { stream, wire: Vec::new(), frames: Vec::new() };
        conn.stream
            .write_all(
                b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Protocol: longlink.v1\r\n\r\n",
            )
            .await?;
        let end = loop {
            if let Some(at) = conn.wire.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if conn.wire.len() > 4096 {
                return Err(protocol("upgrade answer too long"));
            }
            conn.fill().await?;
        };
        if !conn.wire.starts_with(b"HTTP/1.1 101") {
            return Err(protocol("upgrade refused"));
        }
        conn.wire.drain(..end);
        let auth = Frame::Auth(proto::Auth { token, heartbeat_ms, platform: "bench".into(), ..Default::default() });
        conn.send(&auth).await?;
        match conn.next_event().await? {
            ClientEvent::Connected(_) => Ok(conn),
            _ => Err(ClientError::Unexpected(proto::FrameKind::Message)),
        }
    }

    async fn fill(&mut self) -> Result<(), ClientError> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ClientError::Eof);
        }
        self.wire.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One masked binary message with `frame`.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let body = frame.to_bytes();
        let mut out = vec![0x82];
        match body.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(body.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        self.stream.write_all(&out).await?;
        Ok(())
    }

    pub async fn join(&mut self, group: &str) -> Result<(), ClientError> {
        self.send(&Frame::Join(proto::GroupMembership { group: group.into() })).await?;
        loop {
            if let ClientEvent::GroupResult(r) = self.next_event().await?
                && r.group == group
            {
                return Ok(());
            }
        }
    }

    /// Moves whole WebSocket frames from `wire` to `frames`.
    fn unwrap_messages(&mut self) -> Result<(), ClientError> {
        let mut at = 0;
        loop {
            let buf = &self.wire[at..];
            if buf.len() < 2 {
                break;
            }
            let (len, head) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                127 if buf.len() >= 10 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&buf[2..10]);
                    (usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX), 10)
                }
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if len > MAX_MESSAGE {
                return Err(protocol("message too large"));
            }
            if buf.len() < head + len {
                break;
            }
            match buf[0] & 0x0f {
                0 | 2 => self.frames.extend_from_slice(&buf[head..head + len]),
                8 => return Err(ClientError::Eof),
                // Ping and pong from the server: not answered (no server
                // pings in these runs).
                _ => {}
            }
            at += head + len;
        }
        self.wire.drain(..at);
        Ok(())
    }

    pub async fn next_event(&mut self) -> Result<ClientEvent, ClientError> {
        loop {
            self.unwrap_messages()?;
            if let Some((h, body)) = codec::split_frame(&self.frames, codec::DEFAULT_MAX_BODY)? {
                let frame = Frame::decode(h, body)?;
                let len = h.frame_len();
                self.frames.drain(..len);
                let event = match frame {
                    Frame::AuthOk(ok) => ClientEvent::Connected(ok),
                    Frame::Message(m) => ClientEvent::Message(m),
                    Frame::Pong => ClientEvent::Pong { rtt_ms: 0 },
                    Frame::GroupResult(r) => ClientEvent::GroupResult(r),
                    Frame::Error(e) => {
                        return Err(ClientError::Closed {
                            code: proto::ErrorCode::try_from(e.code).unwrap_or(proto::ErrorCode::ServerError),
                            reason: e.reason,
                            reconnect: true,
                        });
                    }
                    _ => continue,
                };
                return Ok(event);
            }
            self.fill().await?;
        }
    }

    pub async fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both).await;
    }
}
