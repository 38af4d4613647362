//! `[dispatch]`: how the dispatcher learns who a client is before it mints
//! a connect token. It never trusts a bare `uid` parameter; it takes one of
//! two proofs:
//!
//! - an **auth hook**: the business's own HTTP endpoint is called with the
//!   client's credential (its `Authorization` header, or its `ticket`
//!   parameter when no ticket keys are set) and answers with the uid;
//!   bounded in time, in concurrency, and cached briefly;
//! - a **login ticket** signed by the business with an app key:
//!
//!   ```text
//!   ticket = base64url(claims JSON) "." base64url(HMAC-SHA256(app key, base64url(claims JSON)))
//!   claims = {"kid": "app-1", "uid": "alice", "exp": <unix secs>, "nonce": "<random>",
//!             "dev": "<optional: the only device it is good for>", "app": "<optional>",
//!             "groups": ["<optional: groups the client may JOIN, names or prefixes*>"]}
//!   ```
//!
//!   valid until `exp` (at most `ticket_max_ttl_secs` ahead) and once: the
//!   dispatcher remembers each ticket it took until it expires (in memory,
//!   or in Redis with `SET NX PX` in cluster mode, so every dispatcher
//!   agrees).
//!
//! The hook's answer may carry `"groups"` too. Either way the list becomes
//! the token's `groups` claim (at most [`crate::groups::MAX_GROUP_CLAIMS`]
//! printable names of at most 255 bytes, 2 KiB in all, so the token stays
//! under the node's 4 KiB; more is refused), which the node checks at JOIN.
//!
//! With neither configured the dispatcher answers endpoints and heartbeat
//! bounds without a token. Credentials are never logged nor echoed.

use std::collections::{BinaryHeap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

use crate::config::{ConfigError, KeyConfig, config_struct};
use crate::protocol::limits::MAX_ID_BYTES;
use crate::protocol::token::{MAX_KEY_ID_BYTES, MIN_SECRET_BYTES, decode_hex, encode_hex};
use crate::sidecar::redis_link::RedisLink;

config_struct! {
    /// `[dispatch]`: what the dispatcher needs to see before it mints a
    /// connect token. Configure an auth hook, ticket keys or both; with
    /// neither it answers endpoints and heartbeat bounds only (clients
    /// bring their own token).
    pub struct DispatchAuthConfig {
        /// The business endpoint that names the user behind a credential,
        /// "http://host:port/path". The dispatcher POSTs JSON {"ticket",
        /// "device", "app"} with the client's Authorization header; a 200
        /// answer {"uid": "...", "groups": [...] (optional: the token's
        /// groups claim)} proves that uid, 401/403 refuses. Keep it
        /// on a private network (plain HTTP). Default: "" (no hook).
        pub hook_url: String = String::new(),
        /// Time the hook has to answer, in ms. Default: 1000. Allowed: 10 to
        /// 30000.
        pub hook_timeout_ms: u64 = 1_000,
        /// Hook calls in flight at once; more are answered 503. Default: 32.
        /// Allowed: 1 to 4096.
        pub hook_max_concurrency: u32 = 32,
        /// How long a hook answer (yes or no) is reused for the same
        /// credential, in ms. 0: never. Default: 5000. Allowed: 0 to 300000.
        pub hook_cache_ms: u64 = 5_000,
        /// Hook answers cached at most. Default: 10000.
        pub hook_cache_entries: u32 = 10_000,
        /// App keys that sign login tickets (rotate by listing two). Default:
        /// none. One table per key:
        ///   [[dispatch.ticket_keys]]
        ///   id = "app-1"
        ///   secret_hex = "<64 hex chars>"
        pub ticket_keys: Vec<KeyConfig> = Vec::new(),
        /// Longest a ticket may still be valid when it is used, in seconds.
        /// Default: 300. Allowed: 1 to 3600.
        pub ticket_max_ttl_secs: u64 = 300,
        /// Tickets remembered at most by a single dispatcher (each until it
        /// expires); when full, tickets are refused (503) rather than
        /// forgotten. Default: 100000.
        pub ticket_replay_entries: u32 = 100_000,
    }
}

/// Why a client's proof was not taken: an HTTP status and a code a client
/// can act on. Never carries the credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub error: &'static str,
}

const fn refusal(status: u16, code: &'static str, error: &'static str) -> Refusal {
    Refusal { status, code, error }
}

pub const NO_PROOF: Refusal =
    refusal(401, "NO_PROOF", "send Authorization (auth hook) or a ticket parameter (login ticket)");
pub const BAD_TICKET: Refusal = refusal(401, "BAD_TICKET", "the ticket is malformed or its signature does not match");
pub const TICKET_EXPIRED: Refusal = refusal(401, "TICKET_EXPIRED", "the ticket expired; get a new one");
pub const TICKET_TOO_LONG: Refusal =
    refusal(401, "TICKET_TTL_TOO_LONG", "the ticket is valid for longer than the dispatcher allows");
pub const TICKET_REPLAYED: Refusal = refusal(401, "TICKET_REPLAYED", "the ticket was used already");
pub const TICKET_WRONG_DEVICE: Refusal = refusal(401, "TICKET_WRONG_DEVICE", "the ticket is for another device");
pub const REPLAY_UNAVAILABLE: Refusal =
    refusal(503, "REPLAY_STORE_UNAVAILABLE", "cannot check the ticket now; retry later");
pub const HOOK_DENIED: Refusal = refusal(403, "HOOK_DENIED", "the credential was refused");
pub const HOOK_TIMEOUT: Refusal = refusal(504, "HOOK_TIMEOUT", "the auth hook did not answer in time; retry later");
pub const HOOK_UNAVAILABLE: Refusal =
    refusal(502, "HOOK_UNAVAILABLE", "the auth hook failed or gave no usable answer; retry later");
pub const HOOK_BUSY: Refusal = refusal(503, "HOOK_BUSY", "too many logins in progress; retry later");
pub const BAD_ID: Refusal =
    refusal(400, "BAD_ID", "uid, device, app, platform and net must be printable and at most 255 bytes");

/// A uid, device or other id the dispatcher takes: 1..=255 bytes, no
/// control characters (they would reach logs and other systems raw).
pub fn printable_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_BYTES && !s.chars().any(char::is_control)
}

/// An optional field: empty, or a [`printable_id`].
pub fn printable_or_empty(s: &str) -> bool {
    s.is_empty() || printable_id(s)
}

/// Total bytes of a proof's group names (the token carries them; a node
/// refuses tokens over 4 KiB).
const MAX_GROUP_CLAIM_BYTES: usize = 2048;

/// Whether `groups` may become a token's groups claim (see the module docs).
fn valid_groups(groups: &[String]) -> bool {
    groups.len() <= crate::groups::MAX_GROUP_CLAIMS
        && groups.iter().map(String::len).sum::<usize>() <= MAX_GROUP_CLAIM_BYTES
        && groups.iter().all(|g| printable_id(g))
}

/// Who the hook says the client is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    pub uid: String,
    /// The token's groups claim (empty: none).
    pub groups: Vec<String>,
}

/// A ticket whose signature and times are good; not yet consumed.
#[derive(Debug)]
pub struct Ticket {
    pub uid: String,
    /// The token's groups claim (empty: none).
    pub groups: Vec<String>,
    pub app: Option<String>,
    pub expires_at: i64,
    /// Remembered until `expires_at` so the ticket works once.
    pub replay_id: [u8; 16],
}

#[derive(serde::Deserialize)]
struct TicketClaims {
    kid: String,
    uid: String,
    exp: i64,
    nonce: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// Longest ticket read.
const MAX_TICKET_BYTES: usize = 2048;
/// Shortest nonce: two tickets of one user in one second must differ.
const MIN_NONCE_BYTES: usize = 8;

/// The app keys that sign tickets.
struct TicketKeys {
    keys: Vec<(String, Hmac<Sha256>)>,
    max_ttl_secs: i64,
}

impl TicketKeys {
    fn verify(&self, ticket: &str, device: &str, now: i64) -> Result<Ticket, Refusal> {
        if ticket.len() > MAX_TICKET_BYTES {
            return Err(BAD_TICKET);
        }
        let (claims_b64, tag_b64) = ticket.split_once('.').ok_or(BAD_TICKET)?;
        let tag = URL_SAFE_NO_PAD.decode(tag_b64).map_err(|_| BAD_TICKET)?;
        let claims_json = URL_SAFE_NO_PAD.decode(claims_b64).map_err(|_| BAD_TICKET)?;
        let claims: TicketClaims = serde_json::from_slice(&claims_json).map_err(|_| BAD_TICKET)?;
        let (_, key) = self.keys.iter().find(|(id, _)| *id == claims.kid).ok_or(BAD_TICKET)?;
        let mut mac = key.clone();
        mac.update(claims_b64.as_bytes());
        // verify_slice compares in constant time.
        mac.verify_slice(&tag).map_err(|_| BAD_TICKET)?;
        if !printable_id(&claims.uid)
            || claims.nonce.len() < MIN_NONCE_BYTES
            || !claims.app.as_deref().is_none_or(printable_or_empty)
            || !valid_groups(&claims.groups)
        {
            return Err(BAD_TICKET);
        }
        if claims.exp <= now {
            return Err(TICKET_EXPIRED);
        }
        if claims.exp - now > self.max_ttl_secs {
            return Err(TICKET_TOO_LONG);
        }
        if claims.dev.as_deref().is_some_and(|d| d != device) {
            return Err(TICKET_WRONG_DEVICE);
        }
        let digest = Sha256::digest(&tag);
        let mut replay_id = [0u8; 16];
        replay_id.copy_from_slice(&digest[..16]);
        Ok(Ticket {
            uid: claims.uid,
            groups: claims.groups,
            app: claims.app.filter(|a| !a.is_empty()),
            expires_at: claims.exp,
            replay_id,
        })
    }
}

/// Signs a ticket as a business backend would (for tests, tools and as the
/// reference for other languages).
pub fn sign_ticket(secret: &[u8], claims: &serde_json::Value) -> String {
    let claims_b64 = URL_SAFE_NO_PAD.encode(claims.to_string());
    // Invariant: HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac accepts any key length");
    mac.update(claims_b64.as_bytes());
    format!("{claims_b64}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// Where used tickets are remembered.
pub enum ReplayStore {
    /// One dispatcher: a bounded set in memory.
    Memory(Mutex<MemoryReplay>),
    /// Every dispatcher of a cluster: `SET {prefix}:ticket:{id} 1 NX PX`.
    Redis { link: Mutex<RedisLink>, prefix: String },
}

impl ReplayStore {
    pub fn memory(capacity: usize) -> ReplayStore {
        ReplayStore::Memory(Mutex::new(MemoryReplay { seen: HashMap::new(), by_expiry: BinaryHeap::new(), capacity }))
    }

    pub fn redis(url: &str, prefix: &str, timeout: Duration) -> ReplayStore {
        let link = RedisLink::new("dispatcher-tickets", url, timeout, timeout, vec![]);
        ReplayStore::Redis { link: Mutex::new(link), prefix: prefix.to_owned() }
    }

    /// Whether a call may block (Redis): then it runs off the event loop.
    pub fn blocks(&self) -> bool {
        matches!(self, ReplayStore::Redis { .. })
    }

    /// Takes the ticket: `Ok` the first time within its lifetime.
    pub fn consume(&self, ticket: &Ticket, now: i64) -> Result<(), Refusal> {
        match self {
            ReplayStore::Memory(set) => {
                let mut set = set.lock().map_err(|_| REPLAY_UNAVAILABLE)?;
                set.insert(ticket.replay_id, ticket.expires_at, now)
            }
            ReplayStore::Redis { link, prefix } => {
                let ttl_ms = (ticket.expires_at - now).max(1).saturating_mul(1000);
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(format!("{prefix}:ticket:{}", encode_hex(&ticket.replay_id)))
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms);
                let mut link = link.lock().map_err(|_| REPLAY_UNAVAILABLE)?;
                match link.query(&pipe).map_err(|_| REPLAY_UNAVAILABLE)?.first() {
                    Some(redis::Value::Okay) => Ok(()),
                    Some(redis::Value::SimpleString(s)) if s == "OK" => Ok(()),
                    Some(redis::Value::Nil) => Err(TICKET_REPLAYED),
                    _ => Err(REPLAY_UNAVAILABLE),
                }
            }
        }
    }
}

/// Ticket ids seen, each kept until its ticket expires.
pub struct MemoryReplay {
    seen: HashMap<[u8; 16], i64>,
    by_expiry: BinaryHeap<std::cmp::Reverse<(i64, [u8; 16])>>,
    capacity: usize,
}

impl MemoryReplay {
    fn insert(&mut self, id: [u8; 16], expires_at: i64, now: i64) -> Result<(), Refusal> {
        while let Some(std::cmp::Reverse((exp, old))) = self.by_expiry.peek().copied() {
            if exp > now {
                break;
            }
            self.by_expiry.pop();
            self.seen.remove(&old);
        }
        if self.seen.contains_key(&id) {
            return Err(TICKET_REPLAYED);
        }
        // Full: refuse rather than forget a live ticket (which would let it
        // be used again).
        if self.seen.len() >= self.capacity {
            return Err(REPLAY_UNAVAILABLE);
        }
        self.seen.insert(id, expires_at);
        self.by_expiry.push(std::cmp::Reverse((expires_at, id)));
        Ok(())
    }
}

/// `http://host:port/path`, split.
#[derive(Clone, Debug)]
struct HookUrl {
    host_port: String,
    path: String,
}

fn parse_hook_url(url: &str) -> Option<HookUrl> {
    let rest = url.strip_prefix("http://")?;
    let (host_port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    (ok(host_port) && ok(path) && host_port.contains(':'))
        .then(|| HookUrl { host_port: host_port.to_owned(), path: path.to_owned() })
}

/// Largest hook answer read.
const MAX_HOOK_REPLY: u64 = 16 * 1024;

struct Hook {
    url: HookUrl,
    timeout: Duration,
    max_in_flight: usize,
    in_flight: AtomicUsize,
    cache_for: Duration,
    cache_entries: usize,
    /// sha256(credential) -> (until, uid or a refusal).
    cache: Mutex<HashMap<[u8; 32], CachedAnswer>>,
}

/// A hook answer and until when it is reused.
type CachedAnswer = (Instant, Result<Proven, Refusal>);

impl Hook {
    fn ask(&self, authorization: &str, ticket: &str, device: &str, app: &str) -> Result<Proven, Refusal> {
        let mut h = Sha256::new();
        h.update(authorization.as_bytes());
        h.update([0]);
        h.update(ticket.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock()
            && let Some((until, answer)) = cache.get(&key)
            && *until > now
        {
            return answer.clone();
        }
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(HOOK_BUSY);
        }
        let answer = self.call(authorization, ticket, device, app);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        // Yes and no are cached; failures are not (the next try may work).
        if !self.cache_for.is_zero()
            && matches!(&answer, Ok(_) | Err(Refusal { code: "HOOK_DENIED", .. }))
            && let Ok(mut cache) = self.cache.lock()
        {
            if cache.len() >= self.cache_entries {
                cache.retain(|_, (until, _)| *until > now);
                if cache.len() >= self.cache_entries {
                    cache.clear();
                }
            }
            cache.insert(key, (now + self.cache_for, answer.clone()));
        }
        answer
    }

    fn call(&self, authorization: &str, ticket: &str, device: &str, app: &str) -> Result<Proven, Refusal> {
        let deadline = Instant::now() + self.timeout;
        let left = || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero());
        let io_error = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => HOOK_TIMEOUT,
            _ => HOOK_UNAVAILABLE,
        };
        let addr = self.url.host_port.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or(HOOK_UNAVAILABLE)?;
        let mut stream = TcpStream::connect_timeout(&addr, left().ok_or(HOOK_TIMEOUT)?).map_err(io_error)?;
        let body = serde_json::json!({"ticket": ticket, "device": device, "app": app}).to_string();
        let mut request = format!(
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            self.url.path,
            self.url.host_port,
            body.len()
        );
        if !authorization.is_empty() {
            request.push_str(&format!("authorization: {authorization}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        stream.set_write_timeout(left()).map_err(io_error)?;
        stream.write_all(request.as_bytes()).map_err(io_error)?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            stream.set_read_timeout(Some(left().ok_or(HOOK_TIMEOUT)?)).map_err(io_error)?;
            match (&mut stream).take(MAX_HOOK_REPLY - reply.len() as u64).read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_error(e)),
            }
            if reply.len() as u64 >= MAX_HOOK_REPLY {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = parsed.parse(&reply) else { return Err(HOOK_UNAVAILABLE) };
        match parsed.code {
            Some(200) => {}
            Some(401 | 403) => return Err(HOOK_DENIED),
            _ => return Err(HOOK_UNAVAILABLE),
        }
        let json: serde_json::Value = serde_json::from_slice(&reply[head_len..]).map_err(|_| HOOK_UNAVAILABLE)?;
        let uid = json["uid"].as_str().filter(|uid| printable_id(uid)).ok_or(HOOK_UNAVAILABLE)?;
        let groups: Vec<String> = match &json["groups"] {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(names) => {
                names.iter().map(|g| g.as_str().map(str::to_owned)).collect::<Option<_>>().ok_or(HOOK_UNAVAILABLE)?
            }
            _ => return Err(HOOK_UNAVAILABLE),
        };
        if !valid_groups(&groups) {
            return Err(HOOK_UNAVAILABLE);
        }
        Ok(Proven { uid: uid.to_owned(), groups })
    }
}

/// The dispatcher's proof checks, built from [`DispatchAuthConfig`].
pub struct DispatchAuth {
    hook: Option<Hook>,
    tickets: Option<TicketKeys>,
    replay: ReplayStore,
}

/// What the client showed.
pub enum Proof<'a> {
    /// Neither a hook nor ticket keys are configured: no token is minted.
    NotRequired,
    Ticket(&'a str),
    /// A credential for the hook: the Authorization header and/or a ticket.
    Hook {
        authorization: &'a str,
        ticket: &'a str,
    },
}

impl DispatchAuth {
    /// No hook, no tickets: the dispatcher never mints.
    pub fn none() -> DispatchAuth {
        DispatchAuth { hook: None, tickets: None, replay: ReplayStore::memory(1) }
    }

    pub fn new(cfg: &DispatchAuthConfig, replay: ReplayStore) -> Result<DispatchAuth, ConfigError> {
        cfg.validate()?;
        let hook = match cfg.hook_url.as_str() {
            "" => None,
            url => Some(Hook {
                url: parse_hook_url(url).ok_or_else(|| bad_url(url))?,
                timeout: Duration::from_millis(cfg.hook_timeout_ms),
                max_in_flight: cfg.hook_max_concurrency as usize,
                in_flight: AtomicUsize::new(0),
                cache_for: Duration::from_millis(cfg.hook_cache_ms),
                cache_entries: cfg.hook_cache_entries as usize,
                cache: Mutex::new(HashMap::new()),
            }),
        };
        let tickets = match cfg.ticket_keys.is_empty() {
            true => None,
            false => Some(TicketKeys {
                keys: cfg
                    .ticket_keys
                    .iter()
                    .map(|k| Ok((k.id.clone(), ticket_mac(k)?)))
                    .collect::<Result<_, ConfigError>>()?,
                max_ttl_secs: i64::try_from(cfg.ticket_max_ttl_secs).unwrap_or(i64::MAX),
            }),
        };
        Ok(DispatchAuth { hook, tickets, replay })
    }

    /// Whether a proof is needed at all.
    pub fn required(&self) -> bool {
        self.hook.is_some() || self.tickets.is_some()
    }

    /// Which check applies to a request with these credentials.
    pub fn classify<'a>(&self, authorization: &'a str, ticket: &'a str) -> Result<Proof<'a>, Refusal> {
        if !self.required() {
            return Ok(Proof::NotRequired);
        }
        if !ticket.is_empty() && self.tickets.is_some() {
            return Ok(Proof::Ticket(ticket));
        }
        if self.hook.is_some() && (!authorization.is_empty() || !ticket.is_empty()) {
            return Ok(Proof::Hook { authorization, ticket });
        }
        Err(NO_PROOF)
    }

    /// Checks a ticket's signature and times (no I/O).
    pub fn verify_ticket(&self, ticket: &str, device: &str, now: i64) -> Result<Ticket, Refusal> {
        self.tickets.as_ref().ok_or(NO_PROOF)?.verify(ticket, device, now)
    }

    /// Where used tickets are remembered.
    pub fn replay(&self) -> &ReplayStore {
        &self.replay
    }

    /// Asks the hook (blocks up to its timeout; cached answers return at once).
    pub fn ask_hook(&self, authorization: &str, ticket: &str, device: &str, app: &str) -> Result<Proven, Refusal> {
        self.hook.as_ref().ok_or(NO_PROOF)?.ask(authorization, ticket, device, app)
    }
}

fn bad_url(url: &str) -> ConfigError {
    ConfigError::Invalid {
        field: "dispatch.hook_url",
        message: format!("{url:?} is not like \"http://host:port/path\" (plain http, port required)"),
    }
}

fn ticket_mac(k: &KeyConfig) -> Result<Hmac<Sha256>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid { field: "dispatch.ticket_keys", message };
    if k.id.is_empty() || k.id.len() > MAX_KEY_ID_BYTES || !k.id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(format!("key id {:?} must be 1..={MAX_KEY_ID_BYTES} printable characters", k.id)));
    }
    // The secret is never part of a message.
    let secret = decode_hex(&k.secret_hex)
        .filter(|s| s.len() >= MIN_SECRET_BYTES)
        .ok_or_else(|| invalid(format!("secret of key {:?} must be at least {MIN_SECRET_BYTES} bytes of hex", k.id)))?;
    Hmac::<Sha256>::new_from_slice(&secret).map_err(|_| invalid(format!("key {:?}: unusable secret", k.id)))
}

impl DispatchAuthConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.hook_url.is_empty() && parse_hook_url(&self.hook_url).is_none() {
            return Err(bad_url(&self.hook_url));
        }
        for k in &self.ticket_keys {
            ticket_mac(k)?;
            if self.ticket_keys.iter().filter(|o| o.id == k.id).count() > 1 {
                return Err(ConfigError::Invalid {
                    field: "dispatch.ticket_keys",
                    message: format!("duplicate key id {:?}", k.id),
                });
            }
        }
        let ranges: [(&'static str, u64, u64, u64); 5] = [
            ("dispatch.hook_timeout_ms", self.hook_timeout_ms, 10, 30_000),
            ("dispatch.hook_max_concurrency", self.hook_max_concurrency.into(), 1, 4_096),
            ("dispatch.hook_cache_ms", self.hook_cache_ms, 0, 300_000),
            ("dispatch.ticket_max_ttl_secs", self.ticket_max_ttl_secs, 1, 3_600),
            ("dispatch.ticket_replay_entries", self.ticket_replay_entries.into(), 1, 100_000_000),
        ];
        for (field, value, min, max) in ranges {
            if value < min || value > max {
                return Err(ConfigError::Invalid {
                    field,
                    message: format!("{value} is outside the allowed range {min}..={max}"),
                });
            }
        }
        if self.hook_cache_entries == 0 {
            return Err(ConfigError::Invalid {
                field: "dispatch.hook_cache_entries",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: [u8; 32] = [7; 32];

    fn auth() -> DispatchAuth {
        let cfg = DispatchAuthConfig {
            ticket_keys: vec![KeyConfig { id: "app-1".into(), secret_hex: encode_hex(&SECRET) }],
            ticket_replay_entries: 2,
            ..DispatchAuthConfig::default()
        };
        DispatchAuth::new(&cfg, ReplayStore::memory(2)).unwrap()
    }

    fn ticket(uid: &str, exp: i64, nonce: &str) -> String {
        sign_ticket(&SECRET, &json!({"kid": "app-1", "uid": uid, "exp": exp, "nonce": nonce}))
    }

    #[test]
    fn tickets_are_checked_and_taken_once() {
        let a = auth();
        let now = 1_800_000_000;
        let t = ticket("alice", now + 60, "nonce-0001");
        let ok = a.verify_ticket(&t, "phone", now).unwrap();
        assert_eq!(ok.uid, "alice");
        a.replay().consume(&ok, now).unwrap();
        assert_eq!(a.replay().consume(&a.verify_ticket(&t, "phone", now).unwrap(), now), Err(TICKET_REPLAYED));
        assert_eq!(a.verify_ticket(&t, "phone", now + 61).unwrap_err(), TICKET_EXPIRED);
        assert_eq!(
            a.verify_ticket(&ticket("alice", now + 3_600, "nonce-0002"), "p", now).unwrap_err(),
            TICKET_TOO_LONG
        );
        let forged =
            sign_ticket(&[8; 32], &json!({"kid": "app-1", "uid": "alice", "exp": now + 60, "nonce": "nonce-0003"}));
        assert_eq!(a.verify_ticket(&forged, "p", now).unwrap_err(), BAD_TICKET);
        assert_eq!(a.verify_ticket("garbage", "p", now).unwrap_err(), BAD_TICKET);
        assert_eq!(a.verify_ticket(&ticket("al\x1bice", now + 60, "nonce-0004"), "p", now).unwrap_err(), BAD_TICKET);
        let for_tablet = sign_ticket(
            &SECRET,
            &json!({"kid": "app-1", "uid": "alice", "exp": now + 60, "nonce": "nonce-0005", "dev": "tablet"}),
        );
        assert_eq!(a.verify_ticket(&for_tablet, "phone", now).unwrap_err(), TICKET_WRONG_DEVICE);
        // The set is bounded: full of live tickets, it refuses; once they
        // expire, it has room again.
        let t2 = a.verify_ticket(&ticket("bob", now + 30, "nonce-0006"), "p", now).unwrap();
        a.replay().consume(&t2, now).unwrap();
        let t3 = a.verify_ticket(&ticket("carol", now + 30, "nonce-0007"), "p", now).unwrap();
        assert_eq!(a.replay().consume(&t3, now), Err(REPLAY_UNAVAILABLE));
        assert_eq!(a.replay().consume(&t3, now + 61), Ok(()));
    }

    #[test]
    fn config_errors_never_show_secrets() {
        let cfg = DispatchAuthConfig {
            ticket_keys: vec![KeyConfig { id: "k".into(), secret_hex: "abcdef".into() }],
            ..DispatchAuthConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(!err.contains("abcdef"), "{err}");
        let cfg = DispatchAuthConfig { hook_url: "https://x/y".into(), ..DispatchAuthConfig::default() };
        assert!(cfg.validate().is_err());
        assert!(parse_hook_url("http://127.0.0.1:9/auth").is_some());
    }
}
