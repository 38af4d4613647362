//! The checks of [`Config::validate`]: one per section, each naming the
//! field it rejects and what is allowed.

use super::*;

pub(super) fn in_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" file {}", p.display())).unwrap_or_default()
}

pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

/// `field`'s `value` must lie in `min..=max`; `why` says where the bounds come from.
pub(super) fn check_range<T: PartialOrd + std::fmt::Display>(
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
pub(super) fn check_min<T: PartialOrd + std::fmt::Display>(
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

pub(super) const MAX_FRAME_BYTES_LIMIT: u32 = 16 * 1024 * 1024;
/// glommio rounds smaller io memory up to this anyway.
pub(super) const MIN_IO_MEMORY_BYTES: usize = 64 * 1024;
/// IORING_MAX_ENTRIES.
pub(super) const MAX_RING_DEPTH: usize = 32_768;
pub(super) const MIN_READ_BUFFER_BYTES: usize = 4096;
pub(super) const MAX_CLOCK_LEEWAY_SECS: u32 = 3600;
/// Tokens cannot be revoked, so their lifetime is bounded.
pub(super) const MAX_TOKEN_TTL_SECS: u64 = 366 * 24 * 3600;
pub(super) const MAX_NODE_NAME_BYTES: usize = 255;
/// Message ids carry 12 worker bits: node_index (4) and shard (8, which
/// the shard limit keeps within range).
pub(super) const MAX_NODE_INDEX: u16 = 15;

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        super::check_log_level(&self.log_level).map_err(|e| invalid("server.log_level", e))?;
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
pub(super) fn check_shards(configured: u16, resolved: u16) -> Result<(), ConfigError> {
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
pub(super) fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl SessionConfig {
    pub(super) fn validate(&self, server: &ServerConfig) -> Result<(), ConfigError> {
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
        check_range("session.control_frames_per_sec", self.control_frames_per_sec, 0, 1000, "")?;
        // The budget's level is 16 bits of ms.
        let interval_ms = 1000u32.div_ceil(self.control_frames_per_sec.max(1));
        check_range(
            "session.control_frames_burst",
            self.control_frames_burst,
            1,
            u32::from(u16::MAX) / interval_ms,
            " (burst x ceil(1000 / session.control_frames_per_sec) must fit in 65535 ms)",
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

pub(super) const MAX_SERVICE_TIMEOUT_MS: u32 = 600_000;
pub(super) const MAX_DEDUP_WINDOW_MS: u64 = 3_600_000;

impl UpstreamConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
}

impl ClusterConfig {
    pub(super) fn validate(&self, delivery: &DeliveryConfig, push: &PushConfig) -> Result<(), ConfigError> {
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
pub(super) fn is_host_port(text: &str) -> bool {
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
    pub(super) fn configured_keyring(&self) -> Result<Option<Keyring>, ConfigError> {
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
