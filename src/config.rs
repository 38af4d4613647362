//! TOML configuration: every setting has a documented default (units in
//! the name), [`Config::validate`] explains what is wrong and what is
//! allowed, and [`Config::default_toml`] prints the whole file with comments
//! for `longlink generate-config`.
//!
//! Fields are declared through `config_struct!`, which takes each field's
//! doc comment and default once and derives the struct, its `Default` and
//! the doc table `default_toml` prints. To add a setting, add one line to
//! the right struct (and a check to `validate` if it has limits).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::protocol::codec;
use crate::protocol::ids::MAX_SHARDS;
use crate::protocol::limits::{MAX_ID_BYTES, check_id};
use crate::protocol::token::{self, Key, Keyring, TokenError};

/// A field's name and doc comment lines, as printed by `default_toml`.
pub(crate) struct FieldDoc {
    pub(crate) name: &'static str,
    pub(crate) doc: &'static [&'static str],
}

/// Declares a config struct whose fields carry `= default`. Generates the
/// struct (serde: missing fields take their default, unknown fields are
/// errors), its `Default`, and `FIELDS` for `default_toml`.
macro_rules! config_struct {
    (
        $(#[doc = $struct_doc:literal])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                pub $field:ident: $ty:ty = $default:expr,
            )*
        }
    ) => {
        $(#[doc = $struct_doc])*
        #[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[doc = $doc])*
                pub $field: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    $($field: $default,)*
                }
            }
        }

        impl $name {
            pub(crate) const FIELDS: &'static [FieldDoc] = &[
                $(FieldDoc {
                    name: stringify!($field),
                    doc: &[$($doc),*],
                },)*
            ];
        }
    };
}

config_struct! {
    /// The whole config file.
    pub struct Config {
        /// Name of this node in AuthOk frames, logs and routes; unique per
        /// cluster. Default: "" (the host name; in cluster mode the host
        /// name, "-" and the client port).
        pub node_name: String = String::new(),
        /// Directory for node-local state; holds the dev key when
        /// `[auth] keys` is empty. Default: "./.longlink".
        pub data_dir: PathBuf = PathBuf::from("./.longlink"),
        /// Listeners and the per-core executors.
        pub server: ServerConfig = ServerConfig::default(),
        /// Client session timing and limits.
        pub session: SessionConfig = SessionConfig::default(),
        /// Connect token keys and checks.
        pub auth: AuthConfig = AuthConfig::default(),
        /// The push port: backends, fan-out and broadcast limits.
        pub push: PushConfig = PushConfig::default(),
        /// Upstream: client requests forwarded to service backends,
        /// connection events, dedup of retries, per-connection rate limit.
        pub upstream: UpstreamConfig = UpstreamConfig::default(),
        /// Reliable (at-least-once) delivery: timelines, ACK window,
        /// retransmission, retention.
        pub delivery: DeliveryConfig = DeliveryConfig::default(),
        /// Cluster mode: several nodes sharing one Redis.
        pub cluster: ClusterConfig = ClusterConfig::default(),
        /// WebSocket handshake: path, subprotocol, Origin allow-list, limits.
        pub ws: crate::conn::tls_config::WsConfig = Default::default(),
        /// Certificates for server.tls_listen and server.wss_listen.
        pub tls: crate::conn::tls_config::TlsConfig = Default::default(),
    }
}
pub(crate) use config_struct;

config_struct! {
    /// `[cluster]`: several nodes share one Redis (delivery.redis_url) and
    /// act as one gateway: a router of device -> node with epochs, node
    /// leases, pushes forwarded between nodes, the dispatcher and admin HTTP
    /// (/v1/dispatch, /metrics, /healthz, /drain), graceful drain.
    /// `serve --redis URL` turns it on.
    pub struct ClusterConfig {
        /// Run as a cluster node (needs delivery.redis_url). Default: false.
        pub enabled: bool = false,
        /// How long the node's registration lives without renewal, in ms; it
        /// is renewed three times per lease. A node that finds its lease
        /// lapsed while it was stopped fences itself: it stops accepting,
        /// drains and exits with status 3. A node restarted within the
        /// lease of its dead previous run takes it over. Default: 3000.
        /// Allowed: 300 to 600000.
        pub lease_ms: u64 = 3_000,
        /// host:port clients are told to connect to (dispatcher, GoAway).
        /// Default: "" (the bound client address; for 0.0.0.0, the address
        /// this host reaches Redis from).
        pub client_endpoint: String = String::new(),
        /// host:port other nodes forward pushes to (this node's push port).
        /// Default: "" (the bound push address; for 0.0.0.0, the address
        /// this host reaches Redis from).
        pub node_endpoint: String = String::new(),
        /// Endpoints in a dispatcher reply (the first preferred, the others
        /// for drift). Default: 3. Allowed: 1 to 16.
        pub dispatch_endpoints: u32 = 3,
        /// GoAway frames per second the whole node sends while draining.
        /// Default: 2000. Minimum: 1.
        pub drain_rate_per_sec: u32 = 2_000,
        /// A drain ends by this deadline, in ms, even with clients left (they
        /// are closed with SHUTDOWN). Default: 30000. Allowed: 100 to 3600000.
        pub drain_deadline_ms: u64 = 30_000,
        /// Time another node has to answer a forwarded push, in ms; below
        /// push.reply_timeout_ms. Default: 2000. Allowed: 10 to 60000.
        pub forward_timeout_ms: u64 = 2_000,
        /// A route not re-asserted for this long is deleted from Redis
        /// (devices that never come back), in seconds. Default: 604800.
        pub route_ttl_secs: u64 = 7 * 24 * 3600,
    }
}

config_struct! {
    /// `[delivery]`: at-least-once pushes. Each message gets a per-device
    /// sequence and is appended to the device's timeline before the push is
    /// answered STORED; it is sent through a bounded window of unacknowledged
    /// messages, resent until the client ACKs it, and replayed when the
    /// client resumes. The timeline store is in memory (default: per shard,
    /// single node, lost on restart, so resuming clients are told about the
    /// gap) or Redis (redis_url; survives node restarts, shared by nodes).
    pub struct DeliveryConfig {
        /// Messages sent to one device and not yet acknowledged; later ones
        /// wait in the timeline. Default: 32. Allowed: 1 to 1024.
        pub window: u32 = 32,
        /// N: delay before each of the first retry_fast resends of an
        /// unacknowledged message, in ms. A device whose messages needed
        /// resends uses its measured recovery time instead, until a message
        /// is acknowledged on its first send. Default: 2000. Allowed: 10 to
        /// 600000.
        pub retry_base_ms: u32 = 2_000,
        /// Resends at the short delay N before the delay grows. Default: 4.
        pub retry_fast: u8 = 4,
        /// M: growth of the delay per further resend, in ms. Default: 5000.
        pub retry_step_ms: u32 = 5_000,
        /// MAX: the longest delay between resends, in ms. Default: 60000.
        /// At least retry_base_ms.
        pub retry_max_delay_ms: u32 = 60_000,
        /// Resends before the node stops resending on this connection; the
        /// message stays in the timeline and is replayed when the client
        /// reconnects. Default: 10. Allowed: 1 to 255.
        pub max_retries: u8 = 10,
        /// Sessions of a device that may replay its backlog and keep it
        /// unacknowledged past a resend (the client had it, and the time to
        /// acknowledge it; a session cut before does not count); at the
        /// next one it expires (status EXPIRED, "not acknowledged after N
        /// replays") and the client gets ResyncRequired for it instead. An
        /// ACK starts the count over. 0: replay until retention drops it.
        /// Default: 3. Allowed: 0 to 1000.
        pub max_replays: u32 = 3,
        /// How long a device's learned recovery time (the resend delay that
        /// replaces N after its messages needed resends) is kept in the
        /// timeline store, so it survives an empty window and reconnects,
        /// in seconds. Default: 86400. Allowed: 1 to 2592000 (30 days).
        pub learned_ttl_secs: u64 = 86_400,
        /// Messages kept per device timeline; older unacknowledged ones are
        /// dropped and reported to the client as a missing range
        /// (ResyncRequired). Default: 1000. Minimum: 1.
        pub retention_messages: u32 = 1_000,
        /// Age after which an unacknowledged message is dropped, in ms.
        /// Default: 604800000 (7 days).
        pub retention_age_ms: u64 = 7 * 24 * 3600 * 1000,
        /// Status records of acknowledged and expired messages kept for the
        /// delivery status query (memory store: per shard). Default: 100000.
        pub status_records: u32 = 100_000,
        /// Memory the embedded store (no redis_url) may hold for timelines,
        /// in bytes, for the whole node (each shard gets an equal share).
        /// Counted: payloads, ids and bookkeeping; about 600 bytes for a
        /// device's first waiting message (its timeline), 200 for each
        /// further one, plus the payload. Past it, at-least-once pushes are
        /// REJECTED (retryable = true, reason "timeline store full") until
        /// clients acknowledge or retention drops messages. Default:
        /// 268435456 (256 MiB). Minimum: 1048576.
        pub memory_store_bytes: u64 = 256 << 20,
        /// Redis URL of the timeline store, e.g. "redis://10.0.0.7:6379/".
        /// Default: "" (the embedded memory store). `serve --redis URL`
        /// overrides it.
        pub redis_url: String = String::new(),
        /// Prefix of every key the node writes to Redis: 1 to 64 of
        /// A-Z a-z 0-9 _ . : -. Default: "ll".
        pub redis_prefix: String = "ll".into(),
        /// A timeline untouched this long is deleted from Redis (its
        /// sequence counter stays), in seconds. Default: 604800 (7 days).
        pub redis_idle_ttl_secs: u64 = 7 * 24 * 3600,
        /// How long a message's status stays queryable in Redis after it was
        /// acknowledged or dropped, in seconds. Default: 86400.
        pub redis_status_ttl_secs: u64 = 86_400,
        /// Connect and read/write timeout of the Redis connection, in ms.
        /// Default: 2000.
        pub redis_timeout_ms: u64 = 2_000,
        /// Connections to Redis for the timeline store, each with its own
        /// thread; a device always uses the same one (its calls stay in
        /// order). Default: 2. Allowed: 1 to 16.
        pub redis_connections: u32 = 2,
        /// This node's number among the nodes sharing one Redis store; it is
        /// part of every message id, so ids never collide. Default: 0.
        /// Allowed: 0 to 15.
        pub node_index: u16 = 0,
    }
}

config_struct! {
    /// `[server]`: listeners and the per-core executors.
    pub struct ServerConfig {
        /// Address clients connect to. Default: "0.0.0.0:7100".
        pub client_listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7100)),
        /// Address backends push to. Default: "0.0.0.0:7101".
        pub push_listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7101)),
        /// Address of the admin HTTP server: /metrics and /healthz, and in
        /// cluster mode /v1/dispatch and POST /drain. Keep it private.
        /// Default: "127.0.0.1:7102". (`[cluster] admin_listen`, its
        /// earlier place, is still read.)
        pub admin_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7102)),
        /// Number of shards (executors, one per core). Default: 0 (one per
        /// CPU this process may run on). Allowed: 0 to 256 (0 must resolve
        /// to at most 256 CPUs).
        pub shards: u16 = 0,
        /// Accept queue length per listener. Default: 65535 (the kernel caps
        /// it at net.core.somaxconn).
        pub listen_backlog: u32 = 65535,
        /// Largest frame body accepted, in bytes; checked from the header
        /// before the body is read. Default: 65536 (64 KiB). Allowed: 64 to
        /// 16777216 (16 MiB).
        pub max_frame_bytes: u32 = codec::DEFAULT_MAX_BODY,
        /// Memory each executor reserves for io_uring buffers, in bytes.
        /// Default: 262144 (256 KiB; glommio's 10 MiB default is wasted on
        /// TCP). Minimum: 65536.
        pub io_memory_bytes: usize = 256 * 1024,
        /// io_uring submission queue entries per executor. Default: 2048.
        /// Allowed: 1 to 32768.
        pub ring_depth: usize = 2048,
        /// Size of each shard's scratch read buffer, in bytes. Default: 65536
        /// (64 KiB). Minimum: 4096.
        pub read_buffer_bytes: usize = 64 * 1024,
        /// Connections one shard holds at most; more are refused. Default:
        /// 1000000.
        pub max_connections_per_shard: u32 = 1_000_000,
        /// New connections one shard accepts per second; 0 = unlimited.
        /// Default: 20000.
        pub accept_rate_per_sec: u32 = 20_000,
        /// WebSocket listener (`[ws]` path). "" turns it off.
        /// Default: "0.0.0.0:7104".
        pub ws_listen: String = "0.0.0.0:7104".into(),
        /// Client TCP over TLS ([tls] certificates), beside plain TCP.
        /// Default: "" (off).
        pub tls_listen: String = String::new(),
        /// WebSocket over TLS ([tls] certificates). Default: "" (off).
        pub wss_listen: String = String::new(),
    }
}

config_struct! {
    /// `[session]`: client session timing and limits.
    pub struct SessionConfig {
        /// Time a new connection has to send its Auth frame, in ms.
        /// Default: 10000.
        pub auth_timeout_ms: u64 = 10_000,
        /// Shortest heartbeat interval a client may negotiate, in ms.
        /// Default: 5000.
        pub heartbeat_min_ms: u32 = 5_000,
        /// Heartbeat interval for clients that ask for none, in ms.
        /// Default: 30000.
        pub heartbeat_default_ms: u32 = 30_000,
        /// Longest heartbeat interval a client may negotiate, in ms.
        /// Default: 270000 (4.5 min, under common mobile NAT timeouts).
        pub heartbeat_max_ms: u32 = 270_000,
        /// Idle timeout = this factor x the negotiated heartbeat interval.
        /// Default: 3. Minimum: 2.
        pub idle_timeout_factor: u32 = 3,
        /// Bytes queued for one client before it counts as slow and is
        /// closed. Default: 1048576 (1 MiB). Must hold one maximum frame.
        pub outbound_queue_bytes: u32 = 1024 * 1024,
        /// How long a closing session may flush its last frames, in ms.
        /// Default: 2000.
        pub close_linger_ms: u64 = 2_000,
        /// Granularity of each shard's timer wheel, in ms; every timeout
        /// fires up to one tick late. Default: 100. Allowed: 1 to 1000.
        pub wheel_tick_ms: u64 = 100,
        /// How long a client's outbound queue may stay blocked (socket full)
        /// before it is closed as SLOW, in ms. Default: 10000.
        pub write_timeout_ms: u64 = 10_000,
        /// Groups one session may be a member of. Default: 64.
        pub max_groups_per_session: u32 = 64,
    }
}

config_struct! {
    /// `[push]`: the push port (internal: bind it to a private address).
    pub struct PushConfig {
        /// Requests one backend connection may have in flight; beyond it the
        /// node stops reading from that connection until replies go out.
        /// Default: 1024.
        pub max_inflight_per_backend: u32 = 1024,
        /// Device or user targets in one request. Default: 10000.
        pub max_targets_per_request: u32 = 10_000,
        /// Largest push-port request frame body, in bytes (a request may
        /// carry thousands of targets). Default: 4194304 (4 MiB).
        pub max_request_bytes: u32 = 4 * 1024 * 1024,
        /// Broadcast deliveries per second for the whole node, shared evenly
        /// by its shards. Default: 200000.
        pub broadcast_rate_per_sec: u32 = 200_000,
        /// Every request is answered within this, in ms, even when a shard or
        /// another node does not answer: targets still waiting are REJECTED
        /// with retryable = true (the push may or may not have reached them).
        /// Default: 5000. Allowed: 100 to 600000; in cluster mode above
        /// cluster.forward_timeout_ms.
        pub reply_timeout_ms: u64 = 5_000,
        /// Bytes of broadcasts one shard may hold waiting for the pacer (each
        /// broadcast is queued on every shard: frame plus 64 bytes). A
        /// broadcast that would go over it on any shard is not queued
        /// anywhere and is answered REJECTED with retryable = true. Default:
        /// 8388608 (8 MiB: 140 broadcasts of 60 KB, 50,000 of 100 bytes).
        /// Minimum: server.max_frame_bytes + 4096.
        pub broadcast_queue_bytes_per_shard: u64 = 8 << 20,
    }
}

config_struct! {
    /// `[upstream]`: client requests to service backends. Every shard keeps
    /// its own persistent, pipelined connections to every backend, and its
    /// own in-flight budget per service, so a slow service cannot hold up
    /// another.
    pub struct UpstreamConfig {
        /// How long a connection attempt to a backend may take, in ms. The
        /// node starts serving once every backend was tried once. Default:
        /// 1000. Allowed: 10 to 60000.
        pub connect_timeout_ms: u64 = 1_000,
        /// First wait before reconnecting to a backend that is down, in ms;
        /// doubles per failure up to reconnect_backoff_max_ms. Default: 100.
        pub reconnect_backoff_min_ms: u64 = 100,
        /// Longest wait between reconnect attempts, in ms. Default: 5000.
        pub reconnect_backoff_max_ms: u64 = 5_000,
        /// A retry with the same (device, client_msg_id) within this many ms
        /// of the first attempt gets the first answer instead of being
        /// forwarded again. Default: 120000 (2 min). Allowed: 0 (off) to
        /// 3600000.
        pub dedup_window_ms: u64 = 120_000,
        /// Answers kept for dedup per shard; the oldest is evicted (and
        /// counted) beyond it. Default: 100000.
        pub dedup_max_entries_per_shard: u32 = 100_000,
        /// Bytes of answers kept for dedup per shard (bodies, reasons, device
        /// ids); the oldest are evicted beyond it. Default: 67108864 (64 MiB).
        pub dedup_max_bytes_per_shard: u64 = 64 * 1024 * 1024,
        /// Requests per second one connection may send (token bucket); a
        /// connection over it is paused (the node stops reading it). 0 turns
        /// the limit off. Default: 200.
        pub rate_limit_per_sec: u32 = 200,
        /// Requests a connection may send in a burst above the rate.
        /// Default: 400. Minimum: 1.
        pub rate_limit_burst: u32 = 400,
        /// A connection paused for this many ms in total within
        /// rate_limit_window_ms is closed with RATE_LIMITED. Default: 10000.
        pub rate_limit_close_after_paused_ms: u64 = 10_000,
        /// The window over which paused time adds up, in ms. Default: 60000.
        pub rate_limit_window_ms: u64 = 60_000,
        /// Connection events sent to a backend in one batch. Default: 512.
        /// Allowed: 1 to 65536.
        pub events_batch_max: u32 = 512,
        /// Connection events queued per subscribed service per shard while
        /// its backends are slow or down; beyond it the oldest are dropped
        /// (and counted). Default: 50000.
        pub events_queue_max: u32 = 50_000,
        /// The services. Default: none; a Request to a service that is not
        /// listed gets a Response with status UNAVAILABLE. To add one, replace
        /// `services = []` with one table per service:
        ///   [[upstream.services]]
        ///   id = "chat"                      # Request.service_id, 1-255 bytes
        ///   backends = ["10.0.0.5:7200", "chat-2.internal:7200"]
        ///   timeout_ms = 5000                # then the client gets TIMEOUT
        ///   max_inflight_per_shard = 1024    # then the client gets BUSY
        ///   pool_size = 2                    # connections per backend per shard
        ///   subscribe_events = false         # online/offline/replaced events
        pub services: Vec<ServiceConfig> = Vec::new(),
    }
}

/// One `[[upstream.services]]` entry (documented in `upstream.services`,
/// so not through `config_struct!`, whose doc table only serves sections).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The id clients put in Request.service_id. Required.
    pub id: String,
    /// Backend addresses, "host:port" (resolved at start). Requests are
    /// spread over the backends that are up. Required.
    pub backends: Vec<String>,
    /// Time a backend has to answer, in ms. Default: 5000. Allowed: 1 to
    /// 600000.
    pub timeout_ms: u32,
    /// Requests of this service in flight per shard; more get BUSY at once.
    /// Default: 1024. Allowed: 1 to 1048576.
    pub max_inflight_per_shard: u32,
    /// Connections from each shard to each backend (requests are pipelined
    /// on them). Default: 1. Allowed: 1 to 64.
    pub pool_size: u32,
    /// Send this service's backends online/offline/replaced events.
    /// Default: false.
    pub subscribe_events: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            id: String::new(),
            backends: Vec::new(),
            timeout_ms: 5_000,
            max_inflight_per_shard: 1_024,
            pool_size: 1,
            subscribe_events: false,
        }
    }
}

config_struct! {
    /// `[auth]`: connect token keys and checks.
    pub struct AuthConfig {
        /// Clock skew tolerated on token times, in seconds. Default: 30.
        /// Allowed: 0 to 3600.
        pub clock_leeway_secs: u32 = 30,
        /// Lifetime of tokens made by `longlink token`, in seconds.
        /// Default: 3600. Allowed: 1 to 31622400 (366 days).
        pub default_token_ttl_secs: u64 = 3_600,
        /// Id of the key that signs new tokens. Default: "" (the first key).
        pub signing_key: String = String::new(),
        /// Keys that verify connect tokens; list old keys here while they
        /// rotate out. Default: none, which means a dev key generated in
        /// data_dir on first start (never use it in production). To set
        /// keys, replace `keys = []` with one table per key:
        ///   [[auth.keys]]
        ///   id = "2025-01"            # 1-64 chars of A-Z a-z 0-9 . _ -
        ///   secret_hex = "<64 hex chars, e.g. from `openssl rand -hex 32`>"
        pub keys: Vec<KeyConfig> = Vec::new(),
    }
}

/// One `[[auth.keys]]` entry.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id carried in tokens: 1-64 chars of `A-Z a-z 0-9 . _ -`.
    pub id: String,
    /// The secret as hex; at least 16 bytes (32 hex chars), 32 recommended.
    pub secret_hex: String,
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyConfig").field("id", &self.id).field("secret_hex", &"<redacted>").finish()
    }
}

/// Where the key ring came from, so startup can warn about a dev key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `[auth] keys` in the config.
    Configured,
    /// The generated key in `data_dir`; `created` on this start.
    DevKey { path: PathBuf, created: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot parse config{}: {message}", in_file(path.as_deref()))]
    Parse { path: Option<PathBuf>, message: String },
    #[error("invalid config `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("invalid key ring: {0}")]
    Key(#[from] TokenError),
    #[error("dev key {}: {source}", path.display())]
    DevKey { path: PathBuf, source: std::io::Error },
}

fn in_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" file {}", p.display())).unwrap_or_default()
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// `field`'s `value` must lie in `min..=max`; `why` says where the bounds come from.
fn check_range<T: PartialOrd + std::fmt::Display>(
    field: &'static str,
    value: T,
    min: T,
    max: T,
    why: &str,
) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(field, format!("{value} is outside the allowed range {min}..={max}{why}")));
    }
    Ok(())
}

/// `field`'s `value` must be at least `min`; `why` names where `min` comes from.
fn check_min<T: PartialOrd + std::fmt::Display>(
    field: &'static str,
    value: T,
    min: T,
    why: &str,
) -> Result<(), ConfigError> {
    if value < min {
        return Err(invalid(field, format!("{value} is below the minimum {min}{why}")));
    }
    Ok(())
}

const MAX_FRAME_BYTES_LIMIT: u32 = 16 * 1024 * 1024;
/// glommio rounds smaller io memory up to this anyway.
const MIN_IO_MEMORY_BYTES: usize = 64 * 1024;
/// IORING_MAX_ENTRIES.
const MAX_RING_DEPTH: usize = 32_768;
const MIN_READ_BUFFER_BYTES: usize = 4096;
const MAX_CLOCK_LEEWAY_SECS: u32 = 3600;
/// Tokens cannot be revoked, so their lifetime is bounded.
const MAX_TOKEN_TTL_SECS: u64 = 366 * 24 * 3600;
const MAX_NODE_NAME_BYTES: usize = 255;
/// Message ids carry 12 worker bits: node_index (4) and shard (8, which
/// the shard limit keeps within range).
const MAX_NODE_INDEX: u16 = 15;

impl Config {
    /// Reads and validates `path`, or the built-in defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                parse(&text, Some(path))?
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config = parse(text, None)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks limits and cross-field rules; the error names the field, its
    /// value and what is allowed.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_name.len() > MAX_NODE_NAME_BYTES
            || self.node_name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "node_name",
                format!(
                    "{:?} must be at most {MAX_NODE_NAME_BYTES} bytes without spaces or control characters",
                    self.node_name
                ),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty (default \"./.longlink\")"));
        }
        self.server.validate()?;
        self.session.validate(&self.server)?;
        self.auth.configured_keyring()?;
        check_range("session.write_timeout_ms", self.session.write_timeout_ms, 100, 3_600_000, "")?;
        check_range("push.max_inflight_per_backend", self.push.max_inflight_per_backend, 1, 1 << 20, "")?;
        check_range("push.max_targets_per_request", self.push.max_targets_per_request, 1, 1 << 20, "")?;
        check_range("push.max_request_bytes", self.push.max_request_bytes, 1024, 64 << 20, "")?;
        check_range("push.broadcast_rate_per_sec", self.push.broadcast_rate_per_sec, 1, u32::MAX, "")?;
        check_range("push.reply_timeout_ms", self.push.reply_timeout_ms, 100, 600_000, "")?;
        check_min(
            "push.broadcast_queue_bytes_per_shard",
            self.push.broadcast_queue_bytes_per_shard,
            u64::from(self.server.max_frame_bytes) + 4096,
            " (server.max_frame_bytes + 4096: room for one broadcast)",
        )?;
        // The count in use, not the configured one: 0 means one per CPU,
        // which on a large host can be more than a node supports.
        check_shards(self.server.shards, self.shard_count())?;
        self.upstream.validate()?;
        self.delivery.validate()?;
        self.cluster.validate(&self.delivery, &self.push)?;
        crate::conn::tls_config::validate(self)?;
        check_range("auth.clock_leeway_secs", self.auth.clock_leeway_secs, 0, MAX_CLOCK_LEEWAY_SECS, "")?;
        check_range(
            "auth.default_token_ttl_secs",
            self.auth.default_token_ttl_secs,
            1,
            MAX_TOKEN_TTL_SECS,
            " (tokens cannot be revoked, so they must expire)",
        )?;
        Ok(())
    }

    /// The configured keys, or else the dev key in `data_dir` (created on
    /// first use).
    pub fn keyring(&self) -> Result<(Keyring, KeySource), ConfigError> {
        if let Some(ring) = self.auth.configured_keyring()? {
            return Ok((ring, KeySource::Configured));
        }
        let (key, path, created) = token::load_or_create_dev_key(&self.data_dir)
            .map_err(|source| ConfigError::DevKey { path: self.data_dir.join(token::DEV_KEY_FILE), source })?;
        Ok((Keyring::new(vec![key], None)?, KeySource::DevKey { path, created }))
    }

    /// The default config as TOML, every field preceded by its doc comment.
    pub fn default_toml() -> String {
        // Invariant: the defaults are plain strings and small integers, all
        // representable in TOML (the round-trip test serializes them).
        let table = toml::Table::try_from(Config::default()).expect("default config serializes to TOML");
        let mut out = String::from(
            "# longlink configuration, generated by `longlink generate-config`.\n\
             # Every setting is shown at its default; delete the ones you do not change.\n",
        );
        let mut sections = Vec::new();
        for field in Config::FIELDS {
            match table.get(field.name) {
                Some(toml::Value::Table(section)) => sections.push((field, section)),
                Some(value) => write_field(&mut out, field, value),
                None => {}
            }
        }
        for (field, section) in sections {
            out.push('\n');
            write_doc(&mut out, field.doc);
            let _ = writeln!(out, "[{}]", field.name);
            for inner in section_fields(field.name) {
                if let Some(value) = section.get(inner.name) {
                    write_field(&mut out, inner, value);
                }
            }
        }
        out
    }

    /// `node_name`, or the host name when it is empty.
    pub fn node_name(&self) -> String {
        if self.node_name.is_empty() {
            hostname().unwrap_or_else(|| "localhost".to_owned())
        } else {
            self.node_name.clone()
        }
    }

    /// The name a running node uses: [`Config::node_name`], with the bound
    /// client port appended in cluster mode when no name is configured (so
    /// nodes sharing a host differ).
    pub fn node_name_bound(&self, client_port: u16) -> String {
        if self.node_name.is_empty() && self.cluster.enabled {
            format!("{}-{client_port}", self.node_name())
        } else {
            self.node_name()
        }
    }

    /// `server.shards`, with 0 resolved to the CPUs this process may use
    /// (affinity and cgroup limits included).
    pub fn shard_count(&self) -> u16 {
        if self.server.shards != 0 {
            return self.server.shards;
        }
        std::thread::available_parallelism().map_or(1, |n| u16::try_from(n.get()).unwrap_or(u16::MAX))
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if listeners_clash(self.client_listen, self.push_listen) {
            return Err(invalid(
                "server.push_listen",
                format!(
                    "{} clashes with server.client_listen {}; use another port",
                    self.push_listen, self.client_listen
                ),
            ));
        }
        check_range("server.listen_backlog", self.listen_backlog, 1, i32::MAX as u32, "")?;
        crate::conn::tls_config::validate_listeners(self)?;
        check_range("server.max_frame_bytes", self.max_frame_bytes, 64, MAX_FRAME_BYTES_LIMIT, "")?;
        check_min(
            "server.io_memory_bytes",
            self.io_memory_bytes,
            MIN_IO_MEMORY_BYTES,
            " (glommio rounds smaller values up)",
        )?;
        check_range("server.ring_depth", self.ring_depth, 1, MAX_RING_DEPTH, " (io_uring limit)")?;
        check_min("server.read_buffer_bytes", self.read_buffer_bytes, MIN_READ_BUFFER_BYTES, "")?;
        check_min("server.max_connections_per_shard", self.max_connections_per_shard, 1, "")?;
        Ok(())
    }
}

/// `resolved` (the shard count `configured` gives on this host) must be
/// at most [`MAX_SHARDS`].
fn check_shards(configured: u16, resolved: u16) -> Result<(), ConfigError> {
    if resolved <= MAX_SHARDS {
        return Ok(());
    }
    let why = if configured == 0 {
        format!(
            "0 means one shard per CPU and this host has {resolved}; set server.shards to at most {MAX_SHARDS} \
             (or run several nodes)"
        )
    } else {
        format!("{resolved} is outside the allowed range 0..={MAX_SHARDS}")
    };
    Err(invalid("server.shards", format!("{why} (message ids carry the shard in 8 bits)")))
}

/// Two listeners clash when they would bind the same port on overlapping
/// addresses. Port 0 (pick any, used by tests) never clashes.
fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl SessionConfig {
    fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
        check_range("session.wheel_tick_ms", self.wheel_tick_ms, 1, 1000, "")?;
        let tick = " (session.wheel_tick_ms; shorter deadlines cannot be honoured)";
        check_min("session.auth_timeout_ms", self.auth_timeout_ms, self.wheel_tick_ms, tick)?;
        check_min("session.heartbeat_min_ms", u64::from(self.heartbeat_min_ms), self.wheel_tick_ms, tick)?;
        check_min(
            "session.heartbeat_max_ms",
            self.heartbeat_max_ms,
            self.heartbeat_min_ms,
            " (session.heartbeat_min_ms)",
        )?;
        check_range(
            "session.heartbeat_default_ms",
            self.heartbeat_default_ms,
            self.heartbeat_min_ms,
            self.heartbeat_max_ms,
            " (session.heartbeat_min_ms..=session.heartbeat_max_ms)",
        )?;
        // AuthOk carries the idle timeout as u32 milliseconds.
        let max_factor = u32::MAX / self.heartbeat_max_ms;
        check_range(
            "session.idle_timeout_factor",
            self.idle_timeout_factor,
            2,
            max_factor,
            " (factor x session.heartbeat_max_ms must fit in u32 ms)",
        )?;
        // A queue that cannot hold one maximum frame would call every
        // client that receives one slow.
        let one_frame = server.max_frame_bytes.saturating_add(codec::HEADER_LEN as u32);
        check_min(
            "session.outbound_queue_bytes",
            self.outbound_queue_bytes,
            one_frame,
            " (server.max_frame_bytes + the 8-byte header)",
        )?;
        Ok(())
    }
}

const MAX_SERVICE_TIMEOUT_MS: u32 = 600_000;
const MAX_DEDUP_WINDOW_MS: u64 = 3_600_000;

impl UpstreamConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("upstream.connect_timeout_ms", self.connect_timeout_ms, 10, 60_000, "")?;
        check_range("upstream.reconnect_backoff_min_ms", self.reconnect_backoff_min_ms, 1, 60_000, "")?;
        check_range(
            "upstream.reconnect_backoff_max_ms",
            self.reconnect_backoff_max_ms,
            self.reconnect_backoff_min_ms,
            3_600_000,
            " (upstream.reconnect_backoff_min_ms..=1 h)",
        )?;
        check_range("upstream.dedup_window_ms", self.dedup_window_ms, 0, MAX_DEDUP_WINDOW_MS, "")?;
        check_min("upstream.dedup_max_entries_per_shard", self.dedup_max_entries_per_shard, 1, "")?;
        check_min("upstream.dedup_max_bytes_per_shard", self.dedup_max_bytes_per_shard, 1024, "")?;
        check_min("upstream.rate_limit_burst", self.rate_limit_burst, 1, "")?;
        check_range("upstream.rate_limit_window_ms", self.rate_limit_window_ms, 100, 86_400_000, "")?;
        check_range(
            "upstream.rate_limit_close_after_paused_ms",
            self.rate_limit_close_after_paused_ms,
            1,
            self.rate_limit_window_ms,
            " (at most upstream.rate_limit_window_ms)",
        )?;
        check_range("upstream.events_batch_max", self.events_batch_max, 1, 65_536, "")?;
        check_min("upstream.events_queue_max", self.events_queue_max, self.events_batch_max, " (events_batch_max)")?;
        let mut ids = std::collections::HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let n = i + 1;
            if check_id(&service.id, MAX_ID_BYTES).is_err() {
                return Err(invalid(
                    "upstream.services.id",
                    format!("service #{n}: id {:?} must be 1 to 255 bytes", service.id),
                ));
            }
            if !ids.insert(service.id.as_str()) {
                return Err(invalid(
                    "upstream.services.id",
                    format!("service #{n}: id {:?} is listed twice", service.id),
                ));
            }
            let id = &service.id;
            if service.backends.is_empty() {
                return Err(invalid(
                    "upstream.services.backends",
                    format!("service {id:?} lists no backends; give at least one \"host:port\""),
                ));
            }
            for backend in &service.backends {
                if !is_host_port(backend) {
                    return Err(invalid(
                        "upstream.services.backends",
                        format!("service {id:?}: {backend:?} is not \"host:port\" (e.g. \"10.0.0.5:7200\")"),
                    ));
                }
            }
            let in_service = |field: &'static str, value: u32, min: u32, max: u32| {
                if value < min || value > max {
                    return Err(invalid(
                        field,
                        format!("service {id:?}: {value} is outside the allowed range {min}..={max}"),
                    ));
                }
                Ok(())
            };
            in_service("upstream.services.timeout_ms", service.timeout_ms, 1, MAX_SERVICE_TIMEOUT_MS)?;
            in_service("upstream.services.max_inflight_per_shard", service.max_inflight_per_shard, 1, 1 << 20)?;
            in_service("upstream.services.pool_size", service.pool_size, 1, 64)?;
        }
        Ok(())
    }
}

impl DeliveryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("delivery.window", self.window, 1, 1024, "")?;
        check_range("delivery.retry_base_ms", self.retry_base_ms, 10, 600_000, "")?;
        check_range("delivery.retry_step_ms", self.retry_step_ms, 0, 3_600_000, "")?;
        check_range(
            "delivery.retry_max_delay_ms",
            self.retry_max_delay_ms,
            self.retry_base_ms,
            3_600_000,
            " (delivery.retry_base_ms..=1 h)",
        )?;
        check_min("delivery.max_retries", self.max_retries, 1, "")?;
        check_range("delivery.max_replays", self.max_replays, 0, 1000, "")?;
        check_range("delivery.learned_ttl_secs", self.learned_ttl_secs, 1, 30 * 86_400, "")?;
        check_min("delivery.retention_messages", self.retention_messages, 1, "")?;
        check_min("delivery.retention_age_ms", self.retention_age_ms, 1000, "")?;
        check_min("delivery.status_records", self.status_records, 1, "")?;
        check_min("delivery.memory_store_bytes", self.memory_store_bytes, 1 << 20, "")?;
        if !self.redis_url.is_empty() && !self.redis_url.starts_with("redis://") {
            return Err(invalid(
                "delivery.redis_url",
                format!(
                    "{:?} must start with redis:// (or be empty for the memory store)",
                    redact_url(&self.redis_url)
                ),
            ));
        }
        let prefix_ok = |c: char| c.is_ascii_alphanumeric() || "_.:-".contains(c);
        if self.redis_prefix.is_empty() || self.redis_prefix.len() > 64 || !self.redis_prefix.chars().all(prefix_ok) {
            return Err(invalid(
                "delivery.redis_prefix",
                format!("{:?} must be 1 to 64 of A-Z a-z 0-9 _ . : - (default \"ll\")", self.redis_prefix),
            ));
        }
        check_min("delivery.redis_idle_ttl_secs", self.redis_idle_ttl_secs, 1, "")?;
        check_min("delivery.redis_status_ttl_secs", self.redis_status_ttl_secs, 1, "")?;
        check_range("delivery.redis_timeout_ms", self.redis_timeout_ms, 10, 60_000, "")?;
        check_range("delivery.redis_connections", self.redis_connections, 1, 16, "")?;
        check_range("delivery.node_index", self.node_index, 0, MAX_NODE_INDEX, " (4 bits of every message id)")?;
        Ok(())
    }

    /// The retransmission schedule.
    pub fn retry_policy(&self) -> crate::delivery::RetryPolicy {
        crate::delivery::RetryPolicy {
            base_delay_ms: self.retry_base_ms,
            fast_retries: self.retry_fast,
            step_ms: self.retry_step_ms,
            max_delay_ms: self.retry_max_delay_ms,
            max_retries: self.max_retries,
        }
    }

    /// Timeline retention.
    pub fn retention(&self) -> crate::store::Retention {
        crate::store::Retention {
            max_messages: self.retention_messages as usize,
            max_age_ms: self.retention_age_ms,
            max_status_records: self.status_records as usize,
            max_unacked_replays: self.max_replays,
            learned_ttl_ms: self.learned_ttl_secs.saturating_mul(1000),
        }
    }
}

impl ClusterConfig {
    fn validate(&self, delivery: &DeliveryConfig, push: &PushConfig) -> Result<(), ConfigError> {
        if self.enabled && delivery.redis_url.is_empty() {
            return Err(invalid(
                "cluster.enabled",
                "cluster mode needs delivery.redis_url (or `serve --redis URL`): routes and leases live in Redis",
            ));
        }
        check_range("cluster.lease_ms", self.lease_ms, 300, 600_000, "")?;
        for (field, value) in
            [("cluster.client_endpoint", &self.client_endpoint), ("cluster.node_endpoint", &self.node_endpoint)]
        {
            if !value.is_empty() && !is_host_port(value) {
                return Err(invalid(field, format!("{value:?} is not \"host:port\" (e.g. \"10.0.0.5:7100\")")));
            }
        }
        check_range("cluster.dispatch_endpoints", self.dispatch_endpoints, 1, 16, "")?;
        check_min("cluster.drain_rate_per_sec", self.drain_rate_per_sec, 1, "")?;
        check_range("cluster.drain_deadline_ms", self.drain_deadline_ms, 100, 3_600_000, "")?;
        check_range("cluster.forward_timeout_ms", self.forward_timeout_ms, 10, 60_000, "")?;
        if self.enabled && self.forward_timeout_ms >= push.reply_timeout_ms {
            // A forward that fails must leave time to answer (and to store an
            // at-least-once copy here instead).
            return Err(invalid(
                "cluster.forward_timeout_ms",
                format!("{} must be below push.reply_timeout_ms ({})", self.forward_timeout_ms, push.reply_timeout_ms),
            ));
        }
        check_min("cluster.route_ttl_secs", self.route_ttl_secs, 60, "")?;
        Ok(())
    }
}

/// `host:port` with a non-empty host and a numeric port (IPv6 in brackets).
fn is_host_port(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(':')
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

impl AuthConfig {
    /// The ring built from `keys`, or `None` when none are configured.
    fn configured_keyring(&self) -> Result<Option<Keyring>, ConfigError> {
        if self.keys.is_empty() {
            if !self.signing_key.is_empty() {
                return Err(invalid(
                    "auth.signing_key",
                    format!("{:?} is set but auth.keys is empty", self.signing_key),
                ));
            }
            return Ok(None);
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, entry) in self.keys.iter().enumerate() {
            let secret = token::decode_hex(&entry.secret_hex).ok_or_else(|| {
                invalid("auth.keys.secret_hex", format!("key #{} (id {:?}) is not valid hex", i + 1, entry.id))
            })?;
            let key = Key::new(entry.id.as_str(), secret).map_err(|e| {
                let why = match e {
                    TokenError::InvalidKey(why) => why,
                    other => other.to_string(),
                };
                invalid("auth.keys", format!("key #{}: {why}", i + 1))
            })?;
            keys.push(key);
        }
        let signing = (!self.signing_key.is_empty()).then_some(self.signing_key.as_str());
        match Keyring::new(keys, signing) {
            Ok(ring) => Ok(Some(ring)),
            Err(e @ TokenError::DuplicateKeyId(_)) => Err(invalid("auth.keys.id", e.to_string())),
            Err(e @ TokenError::UnknownSigningKey(_)) => {
                Err(invalid("auth.signing_key", format!("{e}; it must be one of the auth.keys ids")))
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
    let error = |message: String| ConfigError::Parse { path: path.map(Path::to_owned), message };
    if let Some(table) = with_admin_listen_moved(text) {
        return table.try_into().map_err(|e: toml::de::Error| error(mask_secret_values(text, e.message())));
    }
    toml::from_str(text).map_err(|e| error(describe_parse_error(text, &e)))
}

/// A file that sets `[cluster] admin_listen` (where the admin address was
/// before single nodes served it too): the table with it moved to
/// `[server]`. None for every other file, which is parsed from its text so
/// errors keep their line numbers.
fn with_admin_listen_moved(text: &str) -> Option<toml::Table> {
    if !text.contains("admin_listen") {
        return None;
    }
    let mut table: toml::Table = text.parse().ok()?;
    let cluster = table.get_mut("cluster")?.as_table_mut()?;
    let addr = cluster.remove("admin_listen")?;
    let server = table.entry("server").or_insert_with(|| toml::Value::Table(toml::Table::new())).as_table_mut()?;
    if server.contains_key("admin_listen") {
        // Both set: keep the new one, and let the old one fail as unknown.
        return None;
    }
    server.insert("admin_listen".into(), addr);
    Some(table)
}

/// Words that mark a setting (or a line) as holding a secret: its value
/// never appears in an error. Any key containing one counts, including
/// keys added later (`secret_hex` today; URLs may carry a password).
const SECRET_WORDS: &[&str] = &["secret", "password", "passwd", "token", "credential", "private", "api_key", "url"];

fn looks_secret(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| text.contains(w))
}

/// A parse error without the source: toml's own `Display` quotes the
/// offending line, which may be `secret_hex = "..."`. The message is
/// rebuilt from the position and toml's description; when the line
/// mentions a secret-looking name the description goes too (it can quote
/// the value, e.g. "invalid type: integer `1234`") unless it is one that
/// only names keys, and any secret-looking value of the file is masked
/// from what remains.
fn describe_parse_error(text: &str, err: &toml::de::Error) -> String {
    let Some(span) = err.span() else { return mask_secret_values(text, err.message()) };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let source_line = text.get(line_start..line_end).unwrap_or_default();
    // These descriptions name keys, never values.
    let names_keys_only =
        ["unknown field", "duplicate key", "missing field"].iter().any(|p| err.message().starts_with(p));
    if looks_secret(source_line) && !names_keys_only {
        return format!(
            "line {line}, column {column}: malformed setting on a line that holds a secret \
             (its value and the parser's description are not shown); check its quoting and type"
        );
    }
    format!("line {line}, column {column}: {}", mask_secret_values(text, err.message()))
}

/// `message` with every value of a secret-looking `key = value` line of
/// `text` replaced by `<redacted>`.
fn mask_secret_values(text: &str, message: &str) -> String {
    let mut out = message.to_owned();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else { continue };
        if !looks_secret(key) {
            continue;
        }
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        // Short fragments ("", "0") would mask ordinary words.
        if value.len() >= 4 {
            out = out.replace(value, "<redacted>");
        }
    }
    out
}

/// `url` with any user and password replaced by `***`, for messages.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return if url.contains('@') { "<redacted>".into() } else { url.to_owned() };
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Field docs of the section stored under `name` in [`Config`].
fn section_fields(name: &str) -> &'static [FieldDoc] {
    match name {
        "server" => ServerConfig::FIELDS,
        "session" => SessionConfig::FIELDS,
        "auth" => AuthConfig::FIELDS,
        "push" => PushConfig::FIELDS,
        "upstream" => UpstreamConfig::FIELDS,
        "delivery" => DeliveryConfig::FIELDS,
        "cluster" => ClusterConfig::FIELDS,
        "ws" => crate::conn::tls_config::WsConfig::FIELDS,
        "tls" => crate::conn::tls_config::TlsConfig::FIELDS,
        // A new section must be listed here; the round-trip test fails
        // until it is.
        _ => &[],
    }
}

fn write_doc(out: &mut String, doc: &[&str]) {
    for line in doc {
        // Doc comments keep the space after `///`.
        let _ = writeln!(out, "#{}", line.trim_end());
    }
}

fn write_field(out: &mut String, field: &FieldDoc, value: &toml::Value) {
    out.push('\n');
    write_doc(out, field.doc);
    let _ = writeln!(out, "{} = {value}", field.name);
}

/// The host name from gethostname(2), if it has one.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, which is the
    // length passed; gethostname writes no more than that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // POSIX leaves a truncated name without a NUL, so take the whole buffer then.
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::token::test_dir::TempDir;

    const HEX_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const HEX_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

    fn invalid_field(text: &str) -> (&'static str, String) {
        match Config::from_toml_str(text) {
            Err(e @ ConfigError::Invalid { field, .. }) => (field, e.to_string()),
            other => panic!("expected Invalid for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
        assert_eq!(Config::load(None).unwrap(), Config::default());
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn admin_listen_is_still_read_from_its_earlier_place_in_cluster() {
        let cfg = Config::from_toml_str("[cluster]\nenabled = false\nadmin_listen = \"127.0.0.1:9\"").unwrap();
        assert_eq!(cfg.server.admin_listen, SocketAddr::from(([127, 0, 0, 1], 9)));
        let both = "[server]\nadmin_listen = \"127.0.0.1:9\"\n[cluster]\nadmin_listen = \"127.0.0.1:8\"";
        assert!(Config::from_toml_str(both).is_err(), "set twice");
        let err = Config::from_toml_str("[cluster]\nadmin_listen = \"nohost\"").unwrap_err().to_string();
        assert!(err.contains("invalid socket address"), "{err}");
    }

    #[test]
    fn default_toml_round_trips() {
        let text = Config::default_toml();
        assert_eq!(Config::from_toml_str(&text).unwrap(), Config::default());
        // Same keys and values as the serialized defaults: nothing was left
        // out (a missing key would silently take its default above).
        let parsed: toml::Table = text.parse().unwrap();
        assert_eq!(parsed, toml::Table::try_from(Config::default()).unwrap());
    }

    #[test]
    fn default_toml_documents_every_field() {
        let text = Config::default_toml();
        let lines: Vec<&str> = text.lines().collect();
        let mut fields = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            fields += 1;
            let doc: Vec<&str> = lines[..i].iter().rev().take_while(|l| l.starts_with('#')).copied().collect();
            assert!(doc.iter().any(|l| l.contains("Default")), "`{line}` lacks a doc comment with its default");
        }
        let expected = Config::FIELDS.len() - 9
            + crate::conn::tls_config::WsConfig::FIELDS.len()
            + crate::conn::tls_config::TlsConfig::FIELDS.len()
            + ServerConfig::FIELDS.len()
            + SessionConfig::FIELDS.len()
            + AuthConfig::FIELDS.len()
            + PushConfig::FIELDS.len()
            + UpstreamConfig::FIELDS.len()
            + DeliveryConfig::FIELDS.len()
            + ClusterConfig::FIELDS.len();
        assert_eq!(fields, expected);
    }

    #[test]
    fn partial_sections_keep_other_defaults() {
        let config = Config::from_toml_str("[server]\nshards = 4\n").unwrap();
        assert_eq!(config.server.shards, 4);
        assert_eq!(config.shard_count(), 4);
        assert_eq!(config.server.max_frame_bytes, ServerConfig::default().max_frame_bytes);
        assert_eq!(config.session, SessionConfig::default());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        for text in ["colour = 1", "[server]\nshard = 4", "[sessions]", "[[auth.keys]]\nid = \"a\"\nsecret = \"00\""] {
            let err = Config::from_toml_str(text).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { path: None, .. }), "{err:?}");
            assert!(err.to_string().contains("unknown field"), "{err}");
        }
        let err = Config::from_toml_str("[server]\nshard = 4").unwrap_err().to_string();
        assert!(err.contains("`shard`") && err.contains("shards"), "{err}");
    }

    #[test]
    fn wrong_types_are_parse_errors() {
        let err = Config::from_toml_str("[server]\nclient_listen = \"nowhere\"").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: &[(&str, &str)] = &[
            ("node_name = \"has space\"", "node_name"),
            ("data_dir = \"\"", "data_dir"),
            ("[server]\npush_listen = \"127.0.0.1:7100\"", "server.push_listen"),
            ("[server]\nlisten_backlog = 0", "server.listen_backlog"),
            ("[server]\nmax_frame_bytes = 63", "server.max_frame_bytes"),
            ("[server]\nmax_frame_bytes = 16777217", "server.max_frame_bytes"),
            ("[server]\nio_memory_bytes = 4096", "server.io_memory_bytes"),
            ("[server]\nring_depth = 0", "server.ring_depth"),
            ("[server]\nring_depth = 65536", "server.ring_depth"),
            ("[server]\nread_buffer_bytes = 4095", "server.read_buffer_bytes"),
            ("[server]\nmax_connections_per_shard = 0", "server.max_connections_per_shard"),
            ("[server]\nshards = 257", "server.shards"),
            ("[push]\nbroadcast_queue_bytes_per_shard = 65536", "push.broadcast_queue_bytes_per_shard"),
            ("[session]\nwheel_tick_ms = 0", "session.wheel_tick_ms"),
            ("[session]\nwheel_tick_ms = 1001", "session.wheel_tick_ms"),
            ("[session]\nauth_timeout_ms = 99", "session.auth_timeout_ms"),
            ("[session]\nheartbeat_min_ms = 50", "session.heartbeat_min_ms"),
            ("[session]\nheartbeat_min_ms = 300000", "session.heartbeat_max_ms"),
            ("[session]\nheartbeat_default_ms = 4000", "session.heartbeat_default_ms"),
            ("[session]\nheartbeat_default_ms = 280000", "session.heartbeat_default_ms"),
            ("[session]\nidle_timeout_factor = 1", "session.idle_timeout_factor"),
            ("[session]\nidle_timeout_factor = 100000", "session.idle_timeout_factor"),
            ("[session]\noutbound_queue_bytes = 65543", "session.outbound_queue_bytes"),
            ("[auth]\nclock_leeway_secs = 3601", "auth.clock_leeway_secs"),
            ("[auth]\ndefault_token_ttl_secs = 0", "auth.default_token_ttl_secs"),
            ("[auth]\nsigning_key = \"k1\"", "auth.signing_key"),
            ("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"zz\"", "auth.keys.secret_hex"),
            ("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"0011\"", "auth.keys"),
            (&format!("[[auth.keys]]\nid = \"\"\nsecret_hex = \"{HEX_A}\""), "auth.keys"),
            (
                &format!(
                    "[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{HEX_A}\"\n\
                     [[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{HEX_B}\""
                ),
                "auth.keys.id",
            ),
            (
                &format!("[auth]\nsigning_key = \"k2\"\n[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{HEX_A}\""),
                "auth.signing_key",
            ),
            ("[upstream]\nconnect_timeout_ms = 5", "upstream.connect_timeout_ms"),
            (
                "[upstream]\nreconnect_backoff_min_ms = 500\nreconnect_backoff_max_ms = 100",
                "upstream.reconnect_backoff_max_ms",
            ),
            ("[upstream]\ndedup_window_ms = 3600001", "upstream.dedup_window_ms"),
            ("[upstream]\ndedup_max_entries_per_shard = 0", "upstream.dedup_max_entries_per_shard"),
            ("[upstream]\nrate_limit_burst = 0", "upstream.rate_limit_burst"),
            ("[upstream]\nrate_limit_close_after_paused_ms = 70000", "upstream.rate_limit_close_after_paused_ms"),
            ("[upstream]\nevents_batch_max = 0", "upstream.events_batch_max"),
            ("[upstream]\nevents_batch_max = 10\nevents_queue_max = 5", "upstream.events_queue_max"),
            ("[[upstream.services]]\nbackends = [\"127.0.0.1:1\"]", "upstream.services.id"),
            (
                "[[upstream.services]]\nid = \"a\"\nbackends = [\"h:1\"]\n[[upstream.services]]\nid = \"a\"\nbackends = [\"h:2\"]",
                "upstream.services.id",
            ),
            ("[[upstream.services]]\nid = \"chat\"", "upstream.services.backends"),
            ("[[upstream.services]]\nid = \"chat\"\nbackends = [\"nohost\"]", "upstream.services.backends"),
            ("[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:99999\"]", "upstream.services.backends"),
            (
                "[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:1\"]\ntimeout_ms = 0",
                "upstream.services.timeout_ms",
            ),
            (
                "[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:1\"]\nmax_inflight_per_shard = 0",
                "upstream.services.max_inflight_per_shard",
            ),
            (
                "[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:1\"]\npool_size = 65",
                "upstream.services.pool_size",
            ),
            ("[delivery]\nwindow = 0", "delivery.window"),
            ("[delivery]\nretry_base_ms = 5", "delivery.retry_base_ms"),
            ("[delivery]\nretry_base_ms = 5000\nretry_max_delay_ms = 1000", "delivery.retry_max_delay_ms"),
            ("[delivery]\nmax_retries = 0", "delivery.max_retries"),
            ("[delivery]\nmax_replays = 1001", "delivery.max_replays"),
            ("[delivery]\nlearned_ttl_secs = 0", "delivery.learned_ttl_secs"),
            ("[delivery]\nretention_messages = 0", "delivery.retention_messages"),
            ("[delivery]\nmemory_store_bytes = 1000", "delivery.memory_store_bytes"),
            ("[delivery]\nredis_url = \"localhost:6379\"", "delivery.redis_url"),
            ("[delivery]\nredis_prefix = \"\"", "delivery.redis_prefix"),
            ("[delivery]\nnode_index = 16", "delivery.node_index"),
            ("[cluster]\nenabled = true", "cluster.enabled"),
            ("[cluster]\nlease_ms = 10", "cluster.lease_ms"),
            ("[cluster]\nclient_endpoint = \"nohost\"", "cluster.client_endpoint"),
            ("[cluster]\ndispatch_endpoints = 0", "cluster.dispatch_endpoints"),
            ("[cluster]\ndrain_rate_per_sec = 0", "cluster.drain_rate_per_sec"),
            ("[push]\nreply_timeout_ms = 99", "push.reply_timeout_ms"),
            (
                "[push]\nreply_timeout_ms = 2000\n[cluster]\nenabled = true\nforward_timeout_ms = 2000\n\
                 [delivery]\nredis_url = \"redis://127.0.0.1:6379/\"",
                "cluster.forward_timeout_ms",
            ),
        ];
        for (text, field) in cases {
            let (got, message) = invalid_field(text);
            assert_eq!(got, *field, "{text:?}: {message}");
            assert!(message.contains(field), "{message}");
        }
        // The message shows the value and the allowed range.
        let (_, message) = invalid_field("[server]\nmax_frame_bytes = 63");
        assert!(message.contains("63") && message.contains("64..=16777216"), "{message}");
        // A secret never appears in an error.
        let (_, message) = invalid_field("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"0011\"");
        assert!(!message.contains("0011"), "{message}");
        // Nor in a parse error, whichever way the file is malformed (toml
        // quotes the offending line; its description can quote the value).
        let secret = "5ec2e7a1b2c3d4e5f60718293a4b5c6d";
        let malformed = [
            format!("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{secret}"),
            format!("[[auth.keys]]\nid = \"k1\"\nsecret_hex = {secret}"),
            format!("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{secret}\" trailing"),
            format!("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{secret}\"\nsecret_hex = \"{secret}\""),
            "[[auth.keys]]\nid = \"k1\"\nsecret_hex = 51234567890123".to_string(),
            format!("[auth]\nkeys = [{{ id = \"k1\", secret_hex = \"{secret}\", colour = 1 }}]"),
            format!("[auth]\nkeys = [{{ id = 1, secret_hex = \"{secret}\" }}]"),
            format!("[delivery]\nredis_url = \"redis://:{secret}@10.0.0.7:6379/\" x"),
        ];
        for text in &malformed {
            let err = Config::from_toml_str(text).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
            let message = err.to_string();
            assert!(!message.contains(&secret[..8]) && !message.contains("51234567890123"), "{text:?}: {message}");
            assert!(message.contains("line "), "{message}");
        }
        let (_, message) = invalid_field(&format!("[delivery]\nredis_url = \"rediss://u:{secret}@host:6379/\""));
        assert!(!message.contains(&secret[..8]) && message.contains("***@host:6379"), "{message}");
    }

    #[test]
    fn the_shard_count_in_use_is_checked_not_only_the_configured_one() {
        assert!(Config::from_toml_str("[server]\nshards = 256").is_ok());
        assert!(Config::from_toml_str("[server]\nshards = 100").is_ok());
        check_shards(0, 256).unwrap();
        // `shards = 0` on a host with more CPUs than a node supports.
        let err = check_shards(0, 384).unwrap_err().to_string();
        assert!(err.contains("server.shards") && err.contains("384") && err.contains("256"), "{err}");
    }

    #[test]
    fn services_parse_with_defaults_and_round_trip() {
        let text = "[upstream]\nrate_limit_per_sec = 0\n\
                    [[upstream.services]]\nid = \"chat\"\nbackends = [\"127.0.0.1:7200\", \"chat-2.internal:7200\", \"[::1]:7200\"]\n\
                    [[upstream.services]]\nid = \"live\"\nbackends = [\"10.0.0.1:9\"]\ntimeout_ms = 50\nsubscribe_events = true\n";
        let config = Config::from_toml_str(text).unwrap();
        assert_eq!(config.upstream.rate_limit_per_sec, 0);
        let chat = &config.upstream.services[0];
        assert_eq!((chat.timeout_ms, chat.max_inflight_per_shard, chat.pool_size), (5_000, 1_024, 1));
        assert!(!chat.subscribe_events && config.upstream.services[1].subscribe_events);
        // Serialized (as the bench and tests do) and read back.
        let again = Config::from_toml_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
    }

    #[test]
    fn listeners_may_share_a_port_only_on_disjoint_addresses_or_port_0() {
        let ok = |client: &str, push: &str| {
            Config::from_toml_str(&format!("[server]\nclient_listen = \"{client}\"\npush_listen = \"{push}\"")).is_ok()
        };
        assert!(ok("127.0.0.1:0", "127.0.0.1:0"));
        assert!(ok("127.0.0.1:7100", "127.0.0.2:7100"));
        assert!(!ok("0.0.0.0:7100", "127.0.0.1:7100"));
        assert!(!ok("[::1]:7100", "[::]:7100"));
    }

    #[test]
    fn key_config_debug_is_redacted() {
        let config = Config::from_toml_str(&format!("[[auth.keys]]\nid = \"k1\"\nsecret_hex = \"{HEX_A}\"")).unwrap();
        let text = format!("{config:?}");
        assert!(text.contains("k1") && text.contains("<redacted>"), "{text}");
        assert!(!text.contains(HEX_A), "{text}");
    }

    #[test]
    fn keyring_from_configured_keys_with_rotation() {
        let old = Config::from_toml_str(&format!("[[auth.keys]]\nid = \"old\"\nsecret_hex = \"{HEX_A}\"")).unwrap();
        let (old_ring, source) = old.keyring().unwrap();
        assert_eq!(source, KeySource::Configured);
        let now = token::now_unix_secs();
        let token = old_ring.mint("u", "d", "a", now, now + 60);

        let rotating = Config::from_toml_str(&format!(
            "[auth]\nsigning_key = \"new\"\n\
             [[auth.keys]]\nid = \"old\"\nsecret_hex = \"{HEX_A}\"\n\
             [[auth.keys]]\nid = \"new\"\nsecret_hex = \"{HEX_B}\""
        ))
        .unwrap();
        let (ring, _) = rotating.keyring().unwrap();
        assert_eq!(ring.signing_key_id(), "new");
        assert_eq!(ring.verify(&token, now, 30).unwrap().key_id, "old");

        let rotated = Config::from_toml_str(&format!("[[auth.keys]]\nid = \"new\"\nsecret_hex = \"{HEX_B}\"")).unwrap();
        let (ring, _) = rotated.keyring().unwrap();
        assert_eq!(ring.verify(&token, now, 30), Err(TokenError::UnknownKey("old".into())));
    }

    #[test]
    fn keyring_falls_back_to_the_dev_key() {
        let tmp = TempDir::new("config-devkey");
        let data_dir = tmp.path().join("data");
        let config = Config { data_dir: data_dir.clone(), ..Config::default() };
        let (ring, source) = config.keyring().unwrap();
        let path = data_dir.join(token::DEV_KEY_FILE);
        assert_eq!(source, KeySource::DevKey { path: path.clone(), created: true });
        assert!(ring.signing_key_id().starts_with("dev-"));
        let (again, source) = config.keyring().unwrap();
        assert_eq!(source, KeySource::DevKey { path, created: false });
        assert_eq!(again.signing_key_id(), ring.signing_key_id());
    }

    #[test]
    fn dev_key_errors_name_the_file() {
        let tmp = TempDir::new("config-devkey-bad");
        // data_dir is a file, so the dev key cannot be created under it.
        let data_dir = tmp.path().join("not-a-dir");
        std::fs::write(&data_dir, b"").unwrap();
        let config = Config { data_dir: data_dir.clone(), ..Config::default() };
        let err = config.keyring().unwrap_err();
        assert!(matches!(err, ConfigError::DevKey { .. }), "{err:?}");
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }

    #[test]
    fn load_reports_the_path() {
        let tmp = TempDir::new("config-load");
        let missing = tmp.path().join("missing.toml");
        let err = Config::load(Some(&missing)).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }) && err.to_string().contains("missing.toml"), "{err}");

        let bad = tmp.path().join("bad.toml");
        std::fs::write(&bad, "[server]\nshard = 1\n").unwrap();
        let err = Config::load(Some(&bad)).unwrap_err();
        assert!(err.to_string().contains("bad.toml") && err.to_string().contains("line 2"), "{err}");

        let good = tmp.path().join("good.toml");
        std::fs::write(&good, Config::default_toml()).unwrap();
        assert_eq!(Config::load(Some(&good)).unwrap(), Config::default());
    }

    #[test]
    fn node_name_falls_back_to_the_host_name() {
        assert!(!Config::default().node_name().is_empty());
        let config = Config::from_toml_str("node_name = \"edge-1\"").unwrap();
        assert_eq!(config.node_name(), "edge-1");
        assert!(Config::default().shard_count() >= 1);
    }
}
