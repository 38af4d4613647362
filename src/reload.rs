//! Reload without restart: SIGHUP or `POST /reload` re-reads the config
//! file and applies what can change in a running node.
//!
//! The file is read, validated and turned into everything the shards need
//! (key rings, limits) before anything changes: an invalid file changes
//! nothing. What is applied live: token keys and session timing
//! ([`crate::session::Params`]), push keys and push-port deadlines, push
//! limits, the connection limit and accept rate, upstream services and
//! backends (added, removed, their timeouts and budgets), the upstream rate
//! limit and dedup window, the per-source admission limits
//! ([`crate::admission::Admission::set_limits`]; not the exempt list), the
//! control-frame budget, TLS certificates (same files, new contents) and
//! the log level. Everything else (listen addresses, shard count, store,
//! cluster) is reported as needing an upgrade (SIGUSR2) and left as it runs.
//!
//! Shards take the new settings from a [`ReloadHub`] in their timer loop:
//! one atomic load per tick, the hub's lock only once per reload, and a
//! shard-local copy ([`crate::shard::Shard::live`]) on every per-message path.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::config::{Config, ConfigError};
use crate::conn::links::TlsStores;
use crate::push::PushLimits;
use crate::push::auth::PortAuth;
use crate::session::Params;
use crate::upstream::{UpstreamError, UpstreamSettings};

/// The settings a shard reads on its per-message paths that a reload may
/// change. Each shard keeps its own copy.
#[derive(Clone, Debug)]
pub struct LiveSettings {
    pub params: Params,
    /// Push-port and node-listener credentials and deadlines.
    pub push_auth: Arc<PortAuth>,
    pub push: PushLimits,
    pub max_connections: u32,
    pub accept_rate_per_sec: u32,
    /// Upstream services and backends, rate limit, dedup window.
    pub upstream: UpstreamSettings,
}

/// Where the reloading thread leaves new settings for the shards.
pub struct ReloadHub {
    /// Bumped once per reload; shards compare it with the one they applied.
    generation: AtomicU64,
    latest: Mutex<Arc<LiveSettings>>,
    /// The generation each shard applied, by shard id.
    applied: Box<[AtomicU64]>,
}

impl ReloadHub {
    pub fn new(initial: LiveSettings, shards: u16) -> Arc<ReloadHub> {
        Arc::new(ReloadHub {
            generation: AtomicU64::new(0),
            latest: Mutex::new(Arc::new(initial)),
            applied: (0..shards).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn publish(&self, live: LiveSettings) -> u64 {
        let Ok(mut latest) = self.latest.lock() else { return self.generation.load(Ordering::Acquire) };
        *latest = Arc::new(live);
        // Under the lock: a shard that sees the generation finds its settings.
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The settings published last.
    fn current(&self) -> Option<Arc<LiveSettings>> {
        self.latest.lock().ok().map(|l| Arc::clone(&l))
    }

    /// New settings for a shard that applied `seen`, if any.
    pub(crate) fn poll(&self, seen: u64) -> Option<(u64, LiveSettings)> {
        if self.generation.load(Ordering::Acquire) == seen {
            return None;
        }
        let latest = self.latest.lock().ok()?;
        Some((self.generation.load(Ordering::Acquire), LiveSettings::clone(&latest)))
    }

    pub(crate) fn mark_applied(&self, shard: usize, generation: u64) {
        if let Some(a) = self.applied.get(shard) {
            a.store(generation, Ordering::Release);
        }
    }

    /// Waits until every shard applied `generation` (false at `timeout`).
    fn wait_applied(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.applied.iter().all(|a| a.load(Ordering::Acquire) >= generation) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Why a config gives no live settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl LiveSettings {
    /// The live settings of `config` for a node of `shards` shards.
    pub fn from_config(config: &Config, shards: u16) -> Result<LiveSettings, SettingsError> {
        let (keyring, _) = config.keyring()?;
        let session = &config.session;
        Ok(LiveSettings {
            params: Params {
                keyring,
                clock_leeway_secs: config.auth.clock_leeway_secs,
                auth_timeout_ms: session.auth_timeout_ms,
                heartbeat_min_ms: session.heartbeat_min_ms,
                heartbeat_default_ms: session.heartbeat_default_ms,
                heartbeat_max_ms: session.heartbeat_max_ms,
                idle_timeout_factor: session.idle_timeout_factor,
                close_linger_ms: session.close_linger_ms,
                max_id_bytes: crate::protocol::limits::MAX_ID_BYTES,
                control: crate::session::ControlBudget::new(
                    session.control_frames_per_sec,
                    session.control_frames_burst,
                ),
            },
            push_auth: Arc::new(crate::push::auth::port_auth(config)?),
            push: PushLimits {
                max_inflight_per_backend: config.push.max_inflight_per_backend,
                max_targets_per_request: config.push.max_targets_per_request,
                max_request_bytes: config.push.max_request_bytes,
                reply_timeout_ms: config.push.reply_timeout_ms,
                broadcast_rate_per_sec: config.push.broadcast_rate_per_sec.div_ceil(u32::from(shards.max(1))),
                broadcast_queue_bytes: config.push.broadcast_queue_bytes_per_shard,
            },
            max_connections: config.server.max_connections_per_shard,
            accept_rate_per_sec: config.server.accept_rate_per_sec,
            upstream: UpstreamSettings::resolve(&config.upstream)?,
        })
    }
}

/// Settings applied by a reload: a changed path counts as live when it is
/// one of these or under one. Everything else needs an upgrade.
const LIVE: &[&str] = &[
    "auth",
    "push_auth.keys",
    "push_auth.auth_timeout_ms",
    "push_auth.idle_timeout_ms",
    "push_auth.max_unauthenticated_per_shard",
    "push.max_inflight_per_backend",
    "push.max_targets_per_request",
    "push.max_request_bytes",
    "push.reply_timeout_ms",
    "push.broadcast_rate_per_sec",
    "push.broadcast_queue_bytes_per_shard",
    "server.max_connections_per_shard",
    "server.accept_rate_per_sec",
    "server.max_connections_per_ip",
    "server.max_connections_per_net",
    "server.accepts_per_ip_per_sec",
    "server.accepts_per_net_per_sec",
    "server.log_level",
    "session.auth_timeout_ms",
    "session.heartbeat_min_ms",
    "session.heartbeat_default_ms",
    "session.heartbeat_max_ms",
    "session.idle_timeout_factor",
    "session.close_linger_ms",
    "session.control_frames_per_sec",
    "session.control_frames_burst",
    "upstream.services",
    "upstream.dedup_window_ms",
    "upstream.rate_limit_per_sec",
    "upstream.rate_limit_burst",
    "upstream.rate_limit_close_after_paused_ms",
    "upstream.rate_limit_window_ms",
];

fn is_live(path: &str) -> bool {
    LIVE.iter().any(|l| path == *l || path.strip_prefix(l).is_some_and(|rest| rest.starts_with('.')))
}

/// The dotted paths whose values differ between `old` and `new` (a list,
/// like `auth.keys`, counts as one value). Names only: never a value.
pub fn changed_paths(old: &Config, new: &Config) -> Vec<String> {
    fn walk(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&path, a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null), out);
                }
            }
            (a, b) if a != b => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else { return vec![] };
    let mut out = Vec::new();
    walk("", &a, &b, &mut out);
    out
}

/// What one reload did, for the log and the HTTP answer.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Settings now in force.
    pub applied: Vec<String>,
    /// Settings that differ from the running ones and need an upgrade.
    pub needs_upgrade: Vec<String>,
    /// Every shard took the new settings (false: a shard did not within
    /// the wait; it takes them on its next turn).
    pub shards_applied: bool,
    pub tls_reloaded: bool,
}

impl ReloadReport {
    pub fn to_json(&self) -> Value {
        json!({
            "reloaded": true,
            "applied": self.applied,
            "needs_upgrade": self.needs_upgrade,
            "shards_applied": self.shards_applied,
            "tls_reloaded": self.tls_reloaded,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to re-read (the node started with the embedded defaults)")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Settings(String),
    #[error("TLS certificate: {0}")]
    Tls(String),
    #[error("server.log_level: {0}")]
    LogLevel(String),
    #[error("another reload is running")]
    Busy,
}

/// Sets the process's log filter (installed by `serve`).
pub type LogSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Reads the config file again, with the command line's overrides.
pub type ConfigSource = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Runs reloads for one node (signal thread and admin port).
pub struct Reloader {
    /// What the node started with: changes to settings that need an
    /// upgrade are reported against it.
    started: Config,
    /// What is in force: the started config with every reload since.
    /// Taken only on a reload.
    current: Mutex<Config>,
    source: OnceLock<ConfigSource>,
    log: OnceLock<LogSetter>,
    hub: Arc<ReloadHub>,
    tls: TlsStores,
    /// The node's per-source admission table, whose limits a reload sets.
    admission: OnceLock<Arc<crate::admission::Admission>>,
    shards: u16,
}

/// How long a reload waits for every shard to take the new settings.
const APPLY_WAIT: Duration = Duration::from_secs(5);

impl Reloader {
    pub fn new(started: &Config, hub: Arc<ReloadHub>, tls: TlsStores, shards: u16) -> Reloader {
        Reloader {
            started: started.clone(),
            current: Mutex::new(started.clone()),
            source: OnceLock::new(),
            log: OnceLock::new(),
            hub,
            tls,
            admission: OnceLock::new(),
            shards,
        }
    }

    /// The admission table whose limits reloads change.
    pub fn set_admission(&self, admission: Arc<crate::admission::Admission>) {
        let _ = self.admission.set(admission);
    }

    /// Where reloads read the config from (`serve --config`).
    pub fn set_source(&self, source: ConfigSource) {
        let _ = self.source.set(source);
    }

    /// How reloads change the log level.
    pub fn set_log(&self, log: LogSetter) {
        let _ = self.log.set(log);
    }

    /// Re-reads the config and applies what can change live; on any error
    /// nothing changes. Logs what happened.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let result = self.try_reload();
        match &result {
            Ok(r) => tracing::info!(
                applied = ?r.applied,
                needs_upgrade = ?r.needs_upgrade,
                tls = r.tls_reloaded,
                "config reloaded"
            ),
            Err(e) => tracing::warn!(error = %e, "config reload refused; nothing changed"),
        }
        result
    }

    fn try_reload(&self) -> Result<ReloadReport, ReloadError> {
        let source = self.source.get().ok_or(ReloadError::NoFile)?;
        // One reload at a time (SIGHUP and /reload may race).
        let mut current = self.current.try_lock().map_err(|_| ReloadError::Busy)?;
        let new = source()?;
        let changed = changed_paths(&current, &new);
        let needs_upgrade: Vec<String> =
            changed_paths(&self.started, &new).into_iter().filter(|p| !is_live(p)).collect();
        // Built in full before anything is applied.
        let mut live =
            LiveSettings::from_config(&new, self.shards).map_err(|e| ReloadError::Settings(e.to_string()))?;
        // The node listener's secret (cluster.secret_hex) needs an upgrade:
        // keep the running one.
        if let (Some(pa), Some(running)) = (Arc::get_mut(&mut live.push_auth), self.hub.current()) {
            pa.node = running.push_auth.node.clone();
        }
        let level = new.server.log_level.clone();
        if level != current.server.log_level {
            crate::config::check_log_level(&level).map_err(ReloadError::LogLevel)?;
        }
        // TLS last among the checks: it swaps the certificate when the
        // files are good, and nothing after it can fail.
        let tls_paths_same = new.tls == self.started.tls;
        let tls_reloaded = tls_paths_same && (self.tls.tls.is_some() || self.tls.wss.is_some());
        if tls_reloaded {
            self.tls.reload().map_err(|e| ReloadError::Tls(e.to_string()))?;
        }
        if level != current.server.log_level
            && let Some(set) = self.log.get()
        {
            // Checked above, so this cannot fail on the filter's syntax.
            set(&level).map_err(ReloadError::LogLevel)?;
        }
        if let Some(admission) = self.admission.get() {
            admission.set_limits(&crate::admission::AdmissionLimits::of(&new.server));
        }
        let generation = self.hub.publish(live);
        let shards_applied = self.hub.wait_applied(generation, APPLY_WAIT);
        let applied = changed.into_iter().filter(|p| is_live(p)).collect();
        *current = new;
        Ok(ReloadReport { applied, needs_upgrade, shards_applied, tls_reloaded })
    }
}

/// The `serve` side: the config file and the command-line overrides.
pub fn file_source(path: PathBuf, apply: impl Fn(&mut Config) + Send + Sync + 'static) -> ConfigSource {
    Box::new(move || {
        let mut config = Config::load(Some(&path))?;
        apply(&mut config);
        config.validate()?;
        Ok(config)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_named_and_sorted_into_live_and_upgrade() {
        let old = Config::default();
        let mut new = old.clone();
        new.push.max_targets_per_request = 7;
        new.server.shards = 3;
        new.auth.keys.push(crate::config::KeyConfig { id: "k2".into(), secret_hex: "ab".repeat(32) });
        let changed = changed_paths(&old, &new);
        assert_eq!(changed, ["auth.keys", "push.max_targets_per_request", "server.shards"]);
        let live: Vec<_> = changed.iter().filter(|p| is_live(p)).collect();
        assert_eq!(live, ["auth.keys", "push.max_targets_per_request"]);
        assert!(!is_live("server.shards") && !is_live("push_auth.keysx") && is_live("auth.clock_leeway_secs"));
        assert!(changed_paths(&old, &old).is_empty());
    }
}
