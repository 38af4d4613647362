//! TOML configuration: every setting has a documented default (units in
//! the name), [`Config::validate`] explains what is wrong and what is
//! allowed, and [`Config::default_toml`] prints the whole file with comments
//! for `longlink generate-config`.
//!
//! Fields are declared through `config_struct!`, which takes each field's
//! doc comment and default once and derives the struct, its `Default` and
//! the doc table `default_toml` prints. To add a setting, add one line to
//! the right struct (and a check to `validate` if it has limits).

mod parse;
mod validate;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::protocol::codec;
use crate::protocol::ids::MAX_SHARDS;
use crate::protocol::limits::{MAX_ID_BYTES, check_id};
use crate::protocol::token::{self, Key, Keyring, TokenError};

use parse::*;
pub(crate) use validate::invalid;
use validate::*;

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
            pub(crate) const FIELDS: &'static [$crate::config::FieldDoc] = &[
                $($crate::config::FieldDoc {
                    name: stringify!($field),
                    doc: &[$($doc),*],
                },)*
            ];
        }
    };
}

// Sections defined next to the code they configure use it too.
pub(crate) use config_struct;

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
        /// The HTTP sidecars: limits, the admin token, the dispatch listener.
        pub http: crate::http::guard::HttpConfig = Default::default(),
        /// What the dispatcher needs to see before it mints a token.
        pub dispatch: crate::http::dispatch_auth::DispatchAuthConfig = Default::default(),
        /// Push-port credentials: keys, their rights, deadlines.
        pub push_auth: crate::push::auth::PushAuthConfig = Default::default(),
        /// Which groups clients may JOIN themselves.
        pub client_groups: ClientGroupsConfig = Default::default(),
        /// WebSocket handshake: path, subprotocol, Origin allow-list, limits.
        pub ws: crate::conn::tls_config::WsConfig = Default::default(),
        /// Certificates for server.tls_listen, server.wss_listen,
        /// push.tls_listen and (cluster.tls) the node listener.
        pub tls: crate::conn::tls_config::TlsConfig = Default::default(),
    }
}

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
        /// host:port other nodes forward pushes to (this node's
        /// node_listen). Default: "" (the bound node_listen address; for
        /// 0.0.0.0, the address this host reaches Redis from).
        pub node_endpoint: String = String::new(),
        /// Address of the node-to-node listener: forwarded pushes, kicks and
        /// queries from the other nodes, authenticated with secret_hex (the
        /// public push port refuses them). Default: "0.0.0.0:7105".
        pub node_listen: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 7105)),
        /// The secret every node of the cluster shares, as hex (at least 32
        /// hex chars; e.g. `openssl rand -hex 32`). Default: "" (a dev secret
        /// in data_dir/cluster-key: only nodes sharing that directory, i.e.
        /// one host, can talk; never use it in production).
        pub secret_hex: String = String::new(),
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
        /// Node-to-node links over TLS: node_listen serves TLS with the
        /// [tls] certificate (ALPN "longlink-node/1") and links to the other
        /// nodes verify theirs against tls_ca_file. Every node of a cluster
        /// must agree. Default: false.
        pub tls: bool = false,
        /// PEM file with the CA certificates that sign the nodes'
        /// certificates (required with tls). Default: "".
        pub tls_ca_file: std::path::PathBuf = std::path::PathBuf::new(),
        /// Name the other nodes' certificates must carry. Default: "" (the
        /// host of each node's node_endpoint: a DNS name, or an IP address
        /// the certificate lists).
        pub tls_server_name: String = String::new(),
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
        /// Address backends push to (with a push key, `[push_auth]`).
        /// Default: "127.0.0.1:7101" (this host only; bind a private
        /// address to serve backends elsewhere).
        pub push_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7101)),
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
        /// Client connections one source address may hold at once, on all
        /// client listeners together; more are closed at accept. 0 = no
        /// limit. Default: 1000 (a carrier NAT puts many users behind one
        /// address).
        pub max_connections_per_ip: u32 = 1_000,
        /// The same for a source network (IPv4 /24, IPv6 /64). 0 = no
        /// limit. Default: 20000.
        pub max_connections_per_net: u32 = 20_000,
        /// New client connections one source address may open per second;
        /// refused attempts count too. 0 = no limit. Default: 200.
        pub accepts_per_ip_per_sec: u32 = 200,
        /// The same for a source network (IPv4 /24, IPv6 /64), counting
        /// only attempts their address's own limits let in. 0 = no limit.
        /// Default: 2000.
        pub accepts_per_net_per_sec: u32 = 2_000,
        /// Source addresses the four limits above never apply to. Default:
        /// ["127.0.0.1", "::1"] (the host itself: a local proxy, health
        /// checks). Other loopback addresses (127.0.0.2, ...) are limited.
        pub admission_exempt: Vec<std::net::IpAddr> = vec![std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv6Addr::LOCALHOST.into()],
        /// WebSocket listener (`[ws]` path). "" turns it off.
        /// Default: "0.0.0.0:7104".
        pub ws_listen: String = "0.0.0.0:7104".into(),
        /// Client TCP over TLS ([tls] certificates), beside plain TCP.
        /// Default: "" (off).
        pub tls_listen: String = String::new(),
        /// WebSocket over TLS ([tls] certificates). Default: "" (off).
        pub wss_listen: String = String::new(),
        /// Log filter, as RUST_LOG: "info", "warn", "longlink=debug,info".
        /// A reload (SIGHUP) applies it. Default: "" (RUST_LOG, else "info").
        pub log_level: String = String::new(),
    }
}

/// Checks a `server.log_level` filter ("" is always fine).
pub fn check_log_level(level: &str) -> Result<(), String> {
    if level.is_empty() {
        return Ok(());
    }
    if level.len() > 1024 {
        return Err("longer than 1024 bytes".into());
    }
    tracing_subscriber::EnvFilter::try_new(level).map(drop).map_err(|e| format!("not a log filter: {e}"))
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
        /// Control frames (Ping, Refresh, Join, Leave) one session may send
        /// per second after a burst of `control_frames_burst`; more close
        /// it with RATE_LIMITED. 0: no limit. Default: 10. At most 1000.
        pub control_frames_per_sec: u32 = 10,
        /// Control frames one session may send at once (joining every
        /// group at login is one burst). Default: 100. At most
        /// 65535 / ceil(1000 / control_frames_per_sec).
        pub control_frames_burst: u32 = 100,
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
        /// The push port over TLS ([tls] certificates, ALPN
        /// "longlink-push/1"), a listener beside server.push_listen; the
        /// push auth handshake runs inside TLS. Default: "" (off).
        pub tls_listen: String = String::new(),
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
        /// Longest lifetime a node accepts at Auth, in seconds: a token whose
        /// expires_at - issued_at, or expires_at - now, is longer is refused
        /// with INVALID_TOKEN. Default: 604800 (7 days). Allowed:
        /// default_token_ttl_secs to 31622400.
        pub max_token_lifetime_secs: u64 = 7 * 24 * 3_600,
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
        self.http.validate()?;
        self.dispatch.validate()?;
        self.push_auth.validate()?;
        if !self.cluster.secret_hex.is_empty() {
            crate::push::auth::cluster_key(&self.cluster.secret_hex)?;
        }
        check_range("auth.clock_leeway_secs", self.auth.clock_leeway_secs, 0, MAX_CLOCK_LEEWAY_SECS, "")?;
        check_range(
            "auth.default_token_ttl_secs",
            self.auth.default_token_ttl_secs,
            1,
            MAX_TOKEN_TTL_SECS,
            " (tokens cannot be revoked, so they must expire)",
        )?;
        check_range(
            "auth.max_token_lifetime_secs",
            self.auth.max_token_lifetime_secs,
            self.auth.default_token_ttl_secs,
            MAX_TOKEN_TTL_SECS,
            " (from auth.default_token_ttl_secs)",
        )?;
        Ok(())
    }

    /// The configured keys, or else the dev key in `data_dir` (created on
    /// first use).
    pub fn keyring(&self) -> Result<(Keyring, KeySource), ConfigError> {
        let max_lifetime = self.auth.max_token_lifetime_secs;
        if let Some(ring) = self.auth.configured_keyring()? {
            return Ok((ring.with_max_lifetime(max_lifetime), KeySource::Configured));
        }
        let (key, path, created) = token::load_or_create_dev_key(&self.data_dir)
            .map_err(|source| ConfigError::DevKey { path: self.data_dir.join(token::DEV_KEY_FILE), source })?;
        Ok((Keyring::new(vec![key], None)?.with_max_lifetime(max_lifetime), KeySource::DevKey { path, created }))
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

config_struct! {
    /// `[client_groups]`: which groups clients may JOIN by their own frame
    /// (backends add devices to any group with a push key's `groups`
    /// right). A JOIN is allowed when the group matches a pattern here or
    /// in the connect token's `groups` claim; every other JOIN is answered
    /// `GroupResult{PERMISSION_DENIED}`.
    pub struct ClientGroupsConfig {
        /// Groups any authenticated client may join: exact names, or
        /// prefixes written with a trailing '*' ("lobby-*"; "*" allows
        /// every group). Default: none (client JOIN off unless the token
        /// allows the group).
        pub allow: Vec<String> = Vec::new(),
    }
}

#[cfg(test)]
mod tests;
