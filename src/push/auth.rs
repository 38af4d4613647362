//! Push-port credentials: who may talk to the push port and the node
//! listener, and what each key may do.
//!
//! The node sends a `PushChallenge` (32 fresh random bytes) as soon as it
//! accepts; the peer's first frame must be `PushAuth` with a key id and
//! `HMAC-SHA256(secret, CONTEXT || nonce || key_id)` ([`challenge_input`]).
//! The secret never crosses the wire and a nonce is never reused, so a
//! recorded `PushAuth` is worthless on another connection. Keys rotate as
//! connect-token keys do: every configured key is accepted, each under its
//! own id. The node listener takes one key, the cluster secret, which
//! carries [`Rights::FORWARD`] (forwarded requests); no push key does.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, config_struct};
use crate::protocol::proto::{self, ErrorCode};
use crate::protocol::token::{self, Key, TokenError};

/// Bound into every MAC, so a MAC over a nonce means nothing elsewhere.
pub const CONTEXT: &[u8] = b"longlink push auth v1\0";
/// Random bytes in a challenge.
pub const NONCE_BYTES: usize = 32;
/// Largest `PushAuth` body the node reads before a peer is authenticated:
/// a 64-byte key id and a 32-byte MAC with their tags fit with room.
pub const MAX_AUTH_BODY: u32 = 128;
/// The dev push key's file in `data_dir` (`id:hexsecret`, mode 0600).
pub const PUSH_KEY_FILE: &str = "push-key";
/// The dev cluster secret's file in `data_dir`.
pub const CLUSTER_KEY_FILE: &str = "cluster-key";
/// Key id of the cluster secret on the node listener.
pub const CLUSTER_KEY_ID: &str = "cluster";

/// The bytes a peer MACs to answer `nonce` with key `key_id`.
pub fn challenge_input(nonce: &[u8], key_id: &str) -> Vec<u8> {
    let mut input = Vec::with_capacity(CONTEXT.len() + nonce.len() + key_id.len());
    input.extend_from_slice(CONTEXT);
    input.extend_from_slice(nonce);
    input.extend_from_slice(key_id.as_bytes());
    input
}

/// The `PushAuth` answering `challenge` with `key`.
pub fn answer(key: &Key, challenge: &proto::PushChallenge) -> proto::PushAuth {
    let mac = key.mac(&challenge_input(&challenge.nonce, key.id()));
    proto::PushAuth { key_id: key.id().to_owned(), mac: mac.to_vec().into() }
}

/// A fresh challenge.
pub fn new_challenge() -> std::io::Result<proto::PushChallenge> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(format!("getrandom: {e}")))?;
    Ok(proto::PushChallenge { nonce: nonce.to_vec().into() })
}

/// What a key may do, as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rights(u8);

impl Rights {
    /// Device and user pushes.
    pub const PUSH: Rights = Rights(1);
    /// Broadcast pushes (every session).
    pub const BROADCAST: Rights = Rights(1 << 1);
    /// Group pushes and group membership updates.
    pub const GROUPS: Rights = Rights(1 << 2);
    /// Kicks.
    pub const KICK: Rights = Rights(1 << 3);
    /// Presence queries (who is online, their ids and versions).
    pub const PRESENCE: Rights = Rights(1 << 4);
    /// Delivery status queries.
    pub const STATUS: Rights = Rights(1 << 5);
    /// Forwarded requests from another node (the cluster secret only).
    pub const FORWARD: Rights = Rights(1 << 6);
    /// Revoking users' and devices' tokens (`KickRequest.revoke`).
    pub const REVOKE: Rights = Rights(1 << 7);
    /// Every right a push key can name.
    pub const ALL_PUSH: Rights = Rights(0b1011_1111);

    /// The names config files and `PushAuthOk` use, in bit order.
    pub const NAMES: [(&'static str, Rights); 8] = [
        ("push", Rights::PUSH),
        ("broadcast", Rights::BROADCAST),
        ("groups", Rights::GROUPS),
        ("kick", Rights::KICK),
        ("presence", Rights::PRESENCE),
        ("status", Rights::STATUS),
        ("forward", Rights::FORWARD),
        ("revoke", Rights::REVOKE),
    ];

    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Rights from config names; `forward` is not a push key's to have.
    pub fn parse(names: &[String]) -> Result<Rights, String> {
        let mut rights = Rights::default();
        for name in names {
            match Rights::NAMES.iter().find(|(n, _)| n == name) {
                Some((_, r)) if *r != Rights::FORWARD => rights = rights.union(*r),
                _ => {
                    let allowed: Vec<&str> =
                        Rights::NAMES.iter().filter(|(_, r)| *r != Rights::FORWARD).map(|(n, _)| *n).collect();
                    return Err(format!("unknown right {name:?}; allowed: {}", allowed.join(", ")));
                }
            }
        }
        Ok(rights)
    }

    pub fn names(self) -> Vec<String> {
        Rights::NAMES.iter().filter(|(_, r)| self.contains(*r)).map(|(n, _)| (*n).to_owned()).collect()
    }
}

config_struct! {
    /// `[push_auth]`: credentials of the push port. Every backend
    /// connection authenticates first (a key id and an HMAC over a nonce
    /// the node sends, proto/README.md); each key names what it may do.
    pub struct PushAuthConfig {
        /// Time a new push-port connection has to authenticate, in ms.
        /// Default: 5000. Allowed: 100 to 600000.
        pub auth_timeout_ms: u64 = 5_000,
        /// An authenticated connection with no request in flight and no
        /// whole request read for this long is closed (IDLE_TIMEOUT), a
        /// partial frame included, in ms. Default: 300000. Allowed: 1000 to
        /// 86400000.
        pub idle_timeout_ms: u64 = 300_000,
        /// Push-port connections per shard still authenticating; more are
        /// closed at once. Default: 256. Allowed: 1 to 65536.
        pub max_unauthenticated_per_shard: u32 = 256,
        /// Push keys; list old keys here while they rotate out. Default:
        /// none, which means a dev key with every right generated in
        /// data_dir/push-key on first start (the `longlink push` commands
        /// run from the same directory find it). To set keys, replace
        /// `keys = []` with one table per key:
        ///   [[push_auth.keys]]
        ///   id = "chat-2026"          # 1-64 chars of A-Z a-z 0-9 . _ -
        ///   secret_hex = "<64 hex chars, e.g. from `openssl rand -hex 32`>"
        ///   rights = ["push", "groups"]  # of push broadcast groups kick presence status
        ///   service_ids = ["chat"]    # optional: the only service ids it pushes as
        pub keys: Vec<PushKeyConfig> = Vec::new(),
    }
}

/// One `[[push_auth.keys]]` entry.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushKeyConfig {
    /// Key id sent in `PushAuth`: 1-64 chars of `A-Z a-z 0-9 . _ -`.
    pub id: String,
    /// The secret as hex; at least 16 bytes (32 hex chars), 32 recommended.
    pub secret_hex: String,
    /// What the key may do: push, broadcast, groups, kick, presence, status.
    pub rights: Vec<String>,
    /// The service ids its pushes may carry; empty: any.
    #[serde(default)]
    pub service_ids: Vec<String>,
}

impl std::fmt::Debug for PushKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushKeyConfig")
            .field("id", &self.id)
            .field("secret_hex", &"<redacted>")
            .field("rights", &self.rights)
            .field("service_ids", &self.service_ids)
            .finish()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

impl PushAuthConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let range = |field, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                return Err(invalid(field, format!("{value} is outside the allowed range {min}..={max}")));
            }
            Ok(())
        };
        range("push_auth.auth_timeout_ms", self.auth_timeout_ms, 100, 600_000)?;
        range("push_auth.idle_timeout_ms", self.idle_timeout_ms, 1_000, 86_400_000)?;
        range("push_auth.max_unauthenticated_per_shard", u64::from(self.max_unauthenticated_per_shard), 1, 65_536)?;
        self.configured_ring()?;
        Ok(())
    }

    /// The ring built from `keys`, or `None` when none are configured.
    fn configured_ring(&self) -> Result<Option<PushKeyring>, ConfigError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let mut grants = Vec::with_capacity(self.keys.len());
        for (i, entry) in self.keys.iter().enumerate() {
            let secret = token::decode_hex(&entry.secret_hex).ok_or_else(|| {
                invalid("push_auth.keys.secret_hex", format!("key #{} (id {:?}) is not valid hex", i + 1, entry.id))
            })?;
            let key = Key::new(entry.id.as_str(), secret).map_err(|e| {
                let why = match e {
                    TokenError::InvalidKey(why) => why,
                    other => other.to_string(),
                };
                invalid("push_auth.keys", format!("key #{}: {why}", i + 1))
            })?;
            let rights = Rights::parse(&entry.rights)
                .map_err(|why| invalid("push_auth.keys.rights", format!("key {:?}: {why}", entry.id)))?;
            if grants.iter().any(|g: &Grant| g.key.id() == entry.id) {
                return Err(invalid("push_auth.keys.id", format!("duplicate key id {:?}", entry.id)));
            }
            grants.push(Grant { key, rights, service_ids: entry.service_ids.clone() });
        }
        Ok(Some(PushKeyring { grants }))
    }

    /// The configured keys, or else the dev push key in `data_dir` (every
    /// right; created on first use).
    pub fn keyring(&self, data_dir: &Path) -> Result<(PushKeyring, Option<PathBuf>), ConfigError> {
        if let Some(ring) = self.configured_ring()? {
            return Ok((ring, None));
        }
        let (key, path, _) = token::load_or_create_key_file(data_dir, PUSH_KEY_FILE, "dev-push")
            .map_err(|source| ConfigError::DevKey { path: data_dir.join(PUSH_KEY_FILE), source })?;
        let ring = PushKeyring { grants: vec![Grant { key, rights: Rights::ALL_PUSH, service_ids: Vec::new() }] };
        Ok((ring, Some(path)))
    }
}

/// The cluster secret as the node listener's key.
pub fn cluster_key(secret_hex: &str) -> Result<Key, ConfigError> {
    let secret = token::decode_hex(secret_hex)
        .ok_or_else(|| invalid("cluster.secret_hex", "is not valid hex (e.g. `openssl rand -hex 32`)"))?;
    Key::new(CLUSTER_KEY_ID, secret).map_err(|e| invalid("cluster.secret_hex", e.to_string()))
}

/// The configured cluster secret, or else the dev one in `data_dir`.
pub fn cluster_key_or_dev(secret_hex: &str, data_dir: &Path) -> Result<(Key, Option<PathBuf>), ConfigError> {
    if !secret_hex.is_empty() {
        return Ok((cluster_key(secret_hex)?, None));
    }
    // Every node sharing the directory reads the same key (and id).
    let (key, path, _) = token::load_or_create_key_file(data_dir, CLUSTER_KEY_FILE, "dev-cluster")
        .map_err(|source| ConfigError::DevKey { path: data_dir.join(CLUSTER_KEY_FILE), source })?;
    Ok((key, Some(path)))
}

/// A key and what it may do.
#[derive(Clone, Debug)]
pub struct Grant {
    pub key: Key,
    pub rights: Rights,
    /// Service ids its pushes may carry; empty: any.
    pub service_ids: Vec<String>,
}

impl Grant {
    /// The node listener's only grant.
    pub fn cluster(key: Key) -> Grant {
        Grant { key, rights: Rights::ALL_PUSH.union(Rights::FORWARD), service_ids: Vec::new() }
    }
}

/// Every key a listener accepts.
#[derive(Clone, Debug)]
pub struct PushKeyring {
    /// Few keys (current plus those rotating out), so lookup is a scan.
    grants: Vec<Grant>,
}

/// Why a `PushAuth` was refused; the reason names no secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the first frame must be PushAuth, not {0}")]
    NotAuth(String),
    #[error("unknown key id")]
    UnknownKey,
    #[error("the MAC does not match the challenge")]
    BadMac,
}

impl PushKeyring {
    pub fn new(grants: Vec<Grant>) -> PushKeyring {
        PushKeyring { grants }
    }

    /// The grant of the key that answered `nonce` with `auth`.
    pub fn verify(&self, nonce: &[u8], auth: &proto::PushAuth) -> Result<&Grant, AuthError> {
        let grant = self.grants.iter().find(|g| g.key.id() == auth.key_id).ok_or(AuthError::UnknownKey)?;
        if grant.key.verify_mac(&challenge_input(nonce, &auth.key_id), &auth.mac) {
            Ok(grant)
        } else {
            Err(AuthError::BadMac)
        }
    }
}

/// Which listener a backend connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The public push port: push keys.
    Push,
    /// The node-to-node listener: the cluster secret.
    Node,
}

/// What a shard needs to authenticate push-port and node-listener peers.
#[derive(Clone, Debug)]
pub struct PortAuth {
    pub push: PushKeyring,
    /// Cluster mode: the node listener's ring (the cluster secret).
    pub node: Option<PushKeyring>,
    pub auth_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_unauthenticated: u32,
}

impl PortAuth {
    pub fn ring(&self, listener: Listener) -> Option<&PushKeyring> {
        match listener {
            Listener::Push => Some(&self.push),
            Listener::Node => self.node.as_ref(),
        }
    }
}

/// The right a push-port request needs, and the service id it pushes as.
pub fn needed(frame: &crate::protocol::codec::Frame) -> (Rights, Option<&str>) {
    use crate::protocol::codec::Frame;
    match frame {
        Frame::PushRequest(r) => {
            let t = r.targets.as_ref();
            let right = if t.is_some_and(|t| t.broadcast) {
                Rights::BROADCAST
            } else if t.is_some_and(|t| !t.group.is_empty()) {
                Rights::GROUPS
            } else {
                Rights::PUSH
            };
            (right, Some(r.service_id.as_str()))
        }
        Frame::GroupUpdate(_) => (Rights::GROUPS, None),
        Frame::KickRequest(r) if r.revoke => (Rights::REVOKE, None),
        Frame::KickRequest(_) => (Rights::KICK, None),
        Frame::PresenceQuery(_) => (Rights::PRESENCE, None),
        Frame::DeliveryStatusQuery(_) => (Rights::STATUS, None),
        _ => (Rights::default(), None),
    }
}

/// Whether `grant` may make the request `frame`; the refusal's reason.
pub fn authorize(rights: Rights, service_ids: &[String], frame: &crate::protocol::codec::Frame) -> Result<(), String> {
    if is_forwarded(frame) && !rights.contains(Rights::FORWARD) {
        return Err("forwarded requests are taken only on the node listener".into());
    }
    let (right, service) = needed(frame);
    if !rights.contains(right) {
        let name = Rights::NAMES.iter().find(|(_, r)| *r == right).map_or("?", |(n, _)| n);
        return Err(format!("the key lacks the {name:?} right"));
    }
    if let Some(service) = service
        && !service_ids.is_empty()
        && !service_ids.iter().any(|s| s == service)
    {
        return Err(format!("the key may not push as service id {:?}", service));
    }
    Ok(())
}

fn is_forwarded(frame: &crate::protocol::codec::Frame) -> bool {
    use crate::protocol::codec::Frame;
    match frame {
        Frame::PushRequest(r) => r.forwarded,
        Frame::GroupUpdate(r) => r.forwarded,
        Frame::KickRequest(r) => r.forwarded,
        Frame::PresenceQuery(r) => r.forwarded,
        _ => false,
    }
}

/// The code of every refusal by [`authorize`].
pub const DENIED: ErrorCode = ErrorCode::PermissionDenied;

/// A push credential from `id:hexsecret` text (an env var, a file).
pub fn parse_credential(text: &str) -> Result<Key, String> {
    let (id, secret_hex) = text.trim().split_once(':').ok_or("expected `id:hexsecret`")?;
    let secret = token::decode_hex(secret_hex).ok_or("the secret is not hex")?;
    Key::new(id, secret).map_err(|e| e.to_string())
}

/// The keys of the push port (configured, or the dev push key) and, in
/// cluster mode, of the node listener (the cluster secret).
pub(crate) fn port_auth(config: &crate::config::Config) -> Result<PortAuth, ConfigError> {
    let pa = &config.push_auth;
    let (push, dev_push) = pa.keyring(&config.data_dir)?;
    if let Some(path) = dev_push {
        tracing::warn!(
            path = %path.display(),
            "no push keys configured: using the dev push key (fine for trying longlink, not for production)"
        );
    }
    let node = match config.cluster.enabled {
        true => {
            let (key, dev) = cluster_key_or_dev(&config.cluster.secret_hex, &config.data_dir)?;
            if let Some(path) = dev {
                tracing::warn!(
                    path = %path.display(),
                    "no cluster.secret_hex: using a dev cluster secret (only nodes sharing this data_dir can talk)"
                );
            }
            Some(PushKeyring::new(vec![Grant::cluster(key)]))
        }
        false => None,
    };
    Ok(PortAuth {
        push,
        node,
        auth_timeout_ms: pa.auth_timeout_ms,
        idle_timeout_ms: pa.idle_timeout_ms,
        max_unauthenticated: pa.max_unauthenticated_per_shard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::Frame;

    fn key(id: &str) -> Key {
        Key::new(id, vec![7; 32]).unwrap()
    }

    #[test]
    fn a_mac_answers_only_its_own_nonce_and_key() {
        let ring = PushKeyring::new(vec![Grant { key: key("a"), rights: Rights::PUSH, service_ids: vec![] }]);
        let c1 = new_challenge().unwrap();
        let c2 = new_challenge().unwrap();
        assert_ne!(c1.nonce, c2.nonce);
        let auth = answer(&key("a"), &c1);
        assert!(ring.verify(&c1.nonce, &auth).is_ok());
        assert_eq!(ring.verify(&c2.nonce, &auth).unwrap_err(), AuthError::BadMac, "replayed on another nonce");
        let wrong = Key::new("a", vec![8; 32]).unwrap();
        assert_eq!(ring.verify(&c1.nonce, &answer(&wrong, &c1)).unwrap_err(), AuthError::BadMac);
        assert_eq!(ring.verify(&c1.nonce, &answer(&key("b"), &c1)).unwrap_err(), AuthError::UnknownKey);
    }

    #[test]
    fn each_request_needs_its_right_and_service() {
        let push = |group: &str, broadcast, service: &str| {
            Frame::PushRequest(proto::PushRequest {
                targets: Some(proto::Targets { group: group.into(), broadcast, ..Default::default() }),
                service_id: service.into(),
                ..Default::default()
            })
        };
        let only_push = |f: &Frame| authorize(Rights::PUSH, &["chat".into()], f);
        assert!(only_push(&push("", false, "chat")).is_ok());
        assert!(only_push(&push("", false, "pay")).unwrap_err().contains("service id"));
        assert!(only_push(&push("g", false, "chat")).unwrap_err().contains("\"groups\""));
        assert!(only_push(&push("", true, "chat")).unwrap_err().contains("\"broadcast\""));
        assert!(only_push(&Frame::KickRequest(Default::default())).unwrap_err().contains("\"kick\""));
        let forwarded = Frame::PresenceQuery(proto::PresenceQuery { forwarded: true, ..Default::default() });
        assert!(authorize(Rights::ALL_PUSH, &[], &forwarded).unwrap_err().contains("node listener"));
        assert!(authorize(Rights::ALL_PUSH.union(Rights::FORWARD), &[], &forwarded).is_ok());
        assert!(Rights::parse(&["forward".into()]).is_err(), "no push key forwards");
    }
}
