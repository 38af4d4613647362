//! Shared test harness: a real node on port 0 and glommio clients.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use longlink::config::Config;
use longlink::protocol::codec::{self, Frame};
use longlink::protocol::token::Keyring;
use longlink::server::Server;

pub const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A config for tests: loopback, port 0, a fixed key, short deadlines.
pub fn test_config(shards: u16) -> Config {
    let mut cfg = Config::from_toml_str(&format!(
        r#"
        node_name = "test"
        data_dir = "/nonexistent-not-used"
        [server]
        client_listen = "127.0.0.1:0"
        push_listen = "127.0.0.1:0"
        admin_listen = "127.0.0.1:0"
        ws_listen = "127.0.0.1:0"
        shards = {shards}
        io_memory_bytes = 65536
        accept_rate_per_sec = 0
        [session]
        auth_timeout_ms = 600
        heartbeat_min_ms = 100
        heartbeat_default_ms = 10000
        wheel_tick_ms = 20
        close_linger_ms = 500
        # Tests ping much faster than clients do (every few ms); the
        # budget stays on, loose (tests/control_budget.rs sets its own).
        control_frames_per_sec = 1000
        control_frames_burst = 1000
        [auth]
        clock_leeway_secs = 30
        [[auth.keys]]
        id = "k1"
        secret_hex = "{KEY_HEX}"
        [client_groups]
        allow = ["room"]
        [cluster]
        node_listen = "127.0.0.1:0"
        secret_hex = "{CLUSTER_SECRET_HEX}"
        [[push_auth.keys]]
        id = "{PUSH_KEY_ID}"
        secret_hex = "{PUSH_KEY_HEX}"
        rights = ["push", "broadcast", "groups", "kick", "presence", "status"]
        "#
    ))
    .expect("test config is valid");
    cfg.server.shards = shards;
    cfg
}

/// The push key of [`test_config`]: every right.
pub const PUSH_KEY_ID: &str = "p1";
pub const PUSH_KEY_HEX: &str = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";

/// The cluster secret of the tests' cluster nodes.
pub const CLUSTER_SECRET_HEX: &str = "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f";

/// The credential of the node listener in the tests' clusters.
pub fn cluster_key() -> longlink::backend::PushKey {
    longlink::push::auth::cluster_key(CLUSTER_SECRET_HEX).expect("test cluster secret")
}

pub fn push_key() -> longlink::backend::PushKey {
    longlink::push::auth::parse_credential(&format!("{PUSH_KEY_ID}:{PUSH_KEY_HEX}")).expect("test push key")
}

/// A push-port client authenticated with [`push_key`].
pub fn push_client(addr: SocketAddr) -> longlink::backend::PushClient {
    longlink::backend::PushClient::connect(addr, Duration::from_secs(5), &push_key()).expect("push port")
}

/// Reads one whole frame from a blocking socket (`buf` keeps what follows).
pub fn read_frame_blocking(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<Frame> {
    use std::io::Read;
    loop {
        if let Ok(Some((h, body))) = codec::split_frame(buf, 16 << 20) {
            let frame = Frame::decode(h, body).expect("node frames decode");
            buf.drain(..h.frame_len());
            return Some(frame);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Authenticates a raw push-port socket with `key`: the node's challenge,
/// then our PushAuth; returns the node's answer (PushAuthOk or Error).
pub fn raw_push_auth(s: &mut std::net::TcpStream, key: &longlink::backend::PushKey) -> Option<Frame> {
    use std::io::Write;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = Vec::new();
    let Some(Frame::PushChallenge(challenge)) = read_frame_blocking(s, &mut buf) else {
        panic!("the push port sends a challenge first")
    };
    let auth = Frame::PushAuth(longlink::push::auth::answer(key, &challenge));
    s.write_all(&auth.to_bytes()).unwrap();
    read_frame_blocking(s, &mut buf)
}

pub fn keyring(cfg: &Config) -> Keyring {
    cfg.keyring().expect("keyring").0
}

pub fn token(cfg: &Config, user: &str, device: &str) -> String {
    let now = longlink::protocol::token::now_unix_secs();
    keyring(cfg).mint(user, device, "test", now, now + 3600)
}

pub fn start(cfg: &Config) -> Server {
    Server::start(cfg).expect("server starts")
}

/// Runs `fut` on a fresh glommio executor on this thread.
pub fn run<T>(fut: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .ring_depth(4096)
        .make()
        .expect("client executor")
        .run(fut)
}

/// Writes `bytes`, then reads frames until the server closes the socket (or
/// `limit` passes). Returns the frames in order.
pub async fn exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<Frame> {
    let mut stream = glommio::net::TcpStream::connect(addr).await.expect("connect");
    if !bytes.is_empty() {
        stream.write_all(bytes).await.expect("write");
    }
    read_until_close(&mut stream, limit).await
}

pub async fn read_until_close(stream: &mut glommio::net::TcpStream, limit: Duration) -> Vec<Frame> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            panic!("server did not close within {limit:?}; got {:?}", decode_all(&buf));
        }
        let read = futures_lite::future::or(async { Some(stream.read(&mut chunk).await) }, async {
            glommio::timer::sleep(left).await;
            None
        })
        .await;
        match read {
            Some(Ok(0)) | Some(Err(_)) => return decode_all(&buf),
            Some(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            None => {}
        }
    }
}

pub fn decode_all(mut buf: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Ok(Some((h, body))) = codec::split_frame(buf, codec::DEFAULT_MAX_BODY) {
        frames.push(Frame::decode(h, body).expect("server frames decode"));
        buf = &buf[h.frame_len()..];
    }
    frames
}

/// The code of the last Error or Kicked frame.
pub fn close_code(frames: &[Frame]) -> Option<longlink::protocol::proto::ErrorCode> {
    frames.iter().rev().find_map(|f| match f {
        Frame::Error(e) => Some(longlink::protocol::codes::from_wire(e.code)),
        Frame::Kicked(k) => Some(longlink::protocol::codes::from_wire(k.code)),
        _ => None,
    })
}

/// Connects and authenticates `devices` (user, device) pairs concurrently.
pub async fn connect_all(
    addr: SocketAddr,
    cfg: &Config,
    pairs: &[(String, String)],
) -> Vec<longlink::client::Connection> {
    let tasks: Vec<_> = pairs
        .iter()
        .map(|(user, device)| {
            let opts = longlink::client::ClientOptions::new(token(cfg, user, device));
            glommio::spawn_local(async move {
                longlink::client::Connection::connect(addr, opts).await.expect("client authenticates").0
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// The next pushed message on `conn` (heartbeat events are skipped).
pub async fn next_message(conn: &mut longlink::client::Connection) -> longlink::protocol::proto::Message {
    loop {
        match conn.next_event().await.expect("connection stays up") {
            longlink::client::ClientEvent::Message(m) => return m,
            _ => continue,
        }
    }
}

/// Proves nothing is queued for `conn`: a Ping is answered by a Pong with
/// no Message ahead of it (the node writes in order).
pub async fn assert_nothing_queued(conn: &mut longlink::client::Connection) {
    conn.ping().await.expect("ping");
    match conn.next_event().await.expect("pong") {
        longlink::client::ClientEvent::Pong { .. } => {}
        other => panic!("expected nothing before the Pong, got {other:?}"),
    }
}

/// Resident set size of this process in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A `longlink serve` child process, killed on drop.
pub struct NodeProcess {
    pub child: std::process::Child,
    pub client_addr: SocketAddr,
    pub push_addr: SocketAddr,
    /// The admin HTTP address (every node prints it).
    pub admin_addr: Option<SocketAddr>,
    /// Cluster mode: the node-to-node listener.
    pub node_addr: Option<SocketAddr>,
    _dir: TempDir,
}

impl NodeProcess {
    /// Starts the real binary with `cfg`; returns once it prints its
    /// addresses (readiness by its own signal, not by a sleep).
    pub fn start(cfg: &Config) -> NodeProcess {
        use std::io::BufRead;
        let dir = TempDir::new("node");
        let path = dir.0.join("longlink.toml");
        std::fs::write(&path, toml::to_string(cfg).expect("config serializes")).expect("write config");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_longlink"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn longlink");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = |prefix: &str| -> SocketAddr {
            let line = lines.next().expect("node prints its addresses").expect("read stdout");
            line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {line:?}")).parse().expect("addr")
        };
        let client_addr = addr("listening ");
        let push_addr = addr("push ");
        let admin_addr = Some(addr("admin "));
        let node_addr = cfg.cluster.enabled.then(|| addr("node "));
        NodeProcess { child, client_addr, push_addr, admin_addr, node_addr, _dir: dir }
    }

    /// The config file the node was started with (rewrite it, then reload).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.0.join("longlink.toml")
    }

    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to an admin port: status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("admin port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("longlink-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A real `redis-server` on a free loopback port, killed on drop.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    _dir: TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        // Bind-and-release finds a free port; redis binds it right after.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        let dir = TempDir::new("redis");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let server = RedisServer { child, port, _dir: dir };
        let ready = wait_until(Duration::from_secs(10), || server.ping());
        assert!(ready, "redis-server on port {port} did not answer PING");
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Whether `key` exists (an expired key does not: EXISTS expires it).
    pub fn exists(&self, key: &str) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 4];
        s.write_all(format!("EXISTS {key}\r\n").as_bytes()).is_ok()
            && s.read_exact(&mut buf).is_ok()
            && &buf == b":1\r\n"
    }

    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The app key of [`trusted`] configs (signs login tickets).
pub const APP_KEY_HEX: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf";
/// The admin token of [`trusted`] configs.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// `cfg` with login tickets signed by [`APP_KEY_HEX`] and [`ADMIN_TOKEN`].
pub fn trusted(mut cfg: Config) -> Config {
    cfg.dispatch.ticket_keys = vec![longlink::config::KeyConfig { id: "app-1".into(), secret_hex: APP_KEY_HEX.into() }];
    cfg.http.admin_token = longlink::http::guard::Secret(ADMIN_TOKEN.into());
    cfg
}

/// A fresh login ticket for `uid`, valid for a minute, signed with
/// [`APP_KEY_HEX`].
pub fn ticket(uid: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let now = longlink::protocol::token::now_unix_secs();
    let claims = serde_json::json!({
        "kid": "app-1", "uid": uid, "exp": now + 60, "nonce": format!("{}-{n}-{now}", std::process::id()),
    });
    let secret = longlink::protocol::token::decode_hex(APP_KEY_HEX).expect("hex");
    longlink::http::dispatch_auth::sign_ticket(&secret, &claims)
}

/// Sends `request` as it is and returns the status and body of the answer
/// (the server closes after it: send `connection: close`).
pub fn http_raw(addr: SocketAddr, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("http port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// `POST /drain` with the admin token and a JSON content type.
pub fn drain(admin: SocketAddr) -> (u16, String) {
    admin_post(admin, "/drain")
}

/// `POST path` with the admin token and a JSON content type.
pub fn admin_post(admin: SocketAddr, path: &str) -> (u16, String) {
    http_raw(
        admin,
        &format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
             content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        ),
    )
}
