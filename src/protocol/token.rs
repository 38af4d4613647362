//! Connect tokens: HMAC-SHA256 over protobuf `TokenClaims`.
//!
//! ```text
//! base64url_nopad(TokenClaims bytes) "." base64url_nopad(HMAC-SHA256(key[key_id], TokenClaims bytes))
//! ```
//!
//! A [`Keyring`] holds every key that may verify (so keys can rotate) and
//! one that signs. [`Keyring::verify`] takes the time from its caller and
//! never reads the clock, so tests step time freely.

use std::fmt;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::protocol::proto::{ErrorCode, TokenClaims};

/// Longest token text accepted; checked before any decoding so a huge
/// Auth frame costs nothing.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest key id; ids travel in every token and show up in logs.
pub const MAX_KEY_ID_BYTES: usize = 64;
/// File name of the dev key inside the data dir.
pub const DEV_KEY_FILE: &str = "dev-key";
/// Random bytes in a generated dev key secret.
const DEV_SECRET_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused, or why a key or key ring could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signed with unknown key id {0:?}")]
    UnknownKey(String),
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired at {expires_at} (now {now}, unix seconds)")]
    Expired { expires_at: i64, now: i64 },
    #[error("token not valid before {issued_at} (now {now}, unix seconds)")]
    NotYetValid { issued_at: i64, now: i64 },
    /// Valid for longer than the node accepts (from its issue time or from
    /// now): a leaked long-lived token is worth little.
    #[error("token valid for {lifetime_secs} s; this node accepts at most {max_secs} s")]
    LifetimeTooLong { lifetime_secs: i64, max_secs: i64 },
    /// A key's id or secret is unusable (configuration problem).
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// Two keys in one ring share an id (configuration problem).
    #[error("duplicate key id {0:?}")]
    DuplicateKeyId(String),
    /// The requested signing key is not in the ring (configuration problem).
    #[error("signing key {0:?} is not in the key ring")]
    UnknownSigningKey(String),
    /// A ring needs at least one key (configuration problem).
    #[error("the key ring has no keys")]
    NoKeys,
}

impl TokenError {
    /// The code sent to the client in the `Error` frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired { .. } => ErrorCode::TokenExpired,
            TokenError::NotYetValid { .. } => ErrorCode::TokenNotYetValid,
            TokenError::Malformed(_)
            | TokenError::LifetimeTooLong { .. }
            | TokenError::UnknownKey(_)
            | TokenError::BadSignature
            | TokenError::InvalidKey(_)
            | TokenError::DuplicateKeyId(_)
            | TokenError::UnknownSigningKey(_)
            | TokenError::NoKeys => ErrorCode::InvalidToken,
        }
    }
}

/// One HMAC key. Keeps the keyed MAC state rather than the raw secret, so
/// each mint/verify clones it instead of re-deriving the HMAC pads.
#[derive(Clone)]
pub struct Key {
    id: String,
    mac: HmacSha256,
}

impl Key {
    /// `id`: 1..=64 bytes of `[A-Za-z0-9._-]`; `secret`: at least 16 bytes.
    pub fn new(id: impl Into<String>, secret: Vec<u8>) -> Result<Key, TokenError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_KEY_ID_BYTES {
            return Err(TokenError::InvalidKey(format!("key id {id:?} must be 1..={MAX_KEY_ID_BYTES} bytes long")));
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(TokenError::InvalidKey(format!("key id {id:?} may only contain A-Z a-z 0-9 . _ -")));
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TokenError::InvalidKey(format!(
                "secret of key {id:?} is {} bytes; it must be at least {MIN_SECRET_BYTES}",
                secret.len()
            )));
        }
        let mac = HmacSha256::new_from_slice(&secret)
            .map_err(|_| TokenError::InvalidKey(format!("key {id:?}: unusable secret")))?;
        Ok(Key { id, mac })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// HMAC-SHA256 of `data` under this key (push-port challenges).
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        self.mac_of(data).finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC of `data`, compared in constant time.
    pub fn verify_mac(&self, data: &[u8], tag: &[u8]) -> bool {
        self.mac_of(data).verify_slice(tag).is_ok()
    }

    fn mac_of(&self, claims: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(claims);
        mac
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// The keys that verify tokens, and the one that signs new ones.
#[derive(Clone)]
pub struct Keyring {
    /// Few keys (current plus those being rotated out), so lookup is a scan.
    keys: Vec<Key>,
    /// Index into `keys` of the signing key.
    signing: usize,
    /// Longest token lifetime [`Keyring::verify`] accepts, in seconds.
    max_lifetime_secs: i64,
}

impl Keyring {
    /// Needs at least one key and unique ids. `signing_key_id` names the
    /// key that mints; `None` picks the first.
    pub fn new(keys: Vec<Key>, signing_key_id: Option<&str>) -> Result<Keyring, TokenError> {
        if keys.is_empty() {
            return Err(TokenError::NoKeys);
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(TokenError::DuplicateKeyId(key.id.clone()));
            }
        }
        let signing = match signing_key_id {
            None => 0,
            Some(id) => {
                keys.iter().position(|k| k.id == id).ok_or_else(|| TokenError::UnknownSigningKey(id.to_owned()))?
            }
        };
        Ok(Keyring { keys, signing, max_lifetime_secs: i64::MAX })
    }

    /// Refuse tokens valid for longer than `secs` (counted from their
    /// issue time, and from now). Unbounded unless set.
    /// Longest token lifetime [`Keyring::verify`] accepts, in seconds.
    pub fn max_lifetime_secs(&self) -> i64 {
        self.max_lifetime_secs
    }

    pub fn with_max_lifetime(mut self, secs: u64) -> Keyring {
        self.max_lifetime_secs = i64::try_from(secs).unwrap_or(i64::MAX);
        self
    }

    /// Id of the key that signs new tokens.
    pub fn signing_key_id(&self) -> &str {
        &self.keys[self.signing].id
    }

    /// Ids of every key that verifies, signing key included.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// Signs a token with the signing key. Times are unix seconds. Does not
    /// check its inputs: a token with an empty user or `expires_at <=
    /// issued_at` is minted but will fail [`Keyring::verify`].
    pub fn mint(&self, user: &str, device: &str, app: &str, issued_at: i64, expires_at: i64) -> String {
        let (user, device, app) = (user.to_owned(), device.to_owned(), app.to_owned());
        self.mint_claims(TokenClaims { user, device, app, issued_at, expires_at, ..Default::default() })
    }

    /// Signs `claims` (any optional claims set, e.g. `groups`) with the
    /// signing key, whose id it fills in.
    pub fn mint_claims(&self, mut claims: TokenClaims) -> String {
        let key = &self.keys[self.signing];
        claims.key_id = key.id.clone();
        let claims = claims.encode_to_vec();
        let tag = key.mac_of(&claims).finalize().into_bytes();
        let mut token = URL_SAFE_NO_PAD.encode(&claims);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag, &mut token);
        token
    }

    /// Checks format, signature and validity window. `now_unix_secs` comes
    /// from the caller; `leeway_secs` absorbs clock skew on both ends.
    pub fn verify(&self, token: &str, now_unix_secs: i64, leeway_secs: u32) -> Result<TokenClaims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("longer than 4096 bytes"));
        }
        let (claims_b64, tag_b64) =
            token.split_once('.').ok_or(TokenError::Malformed("no '.' between claims and signature"))?;
        let claims_bytes =
            URL_SAFE_NO_PAD.decode(claims_b64).map_err(|_| TokenError::Malformed("claims are not base64url"))?;
        let tag = URL_SAFE_NO_PAD.decode(tag_b64).map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        // The key id is inside the claims, so they are decoded before the
        // MAC is checked; nothing else is trusted until it is.
        let claims = TokenClaims::decode(claims_bytes.as_slice())
            .map_err(|_| TokenError::Malformed("claims are not a TokenClaims message"))?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == claims.key_id)
            .ok_or_else(|| TokenError::UnknownKey(claims.key_id.clone()))?;
        // verify_slice compares in constant time and rejects truncated tags.
        key.mac_of(&claims_bytes).verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;

        if claims.user.is_empty() {
            return Err(TokenError::Malformed("empty user"));
        }
        if claims.device.is_empty() {
            return Err(TokenError::Malformed("empty device"));
        }
        if claims.expires_at <= claims.issued_at {
            return Err(TokenError::Malformed("expires_at is not after issued_at"));
        }
        let leeway = i64::from(leeway_secs);
        if claims.issued_at > now_unix_secs.saturating_add(leeway) {
            return Err(TokenError::NotYetValid { issued_at: claims.issued_at, now: now_unix_secs });
        }
        if claims.expires_at.saturating_add(leeway) < now_unix_secs {
            return Err(TokenError::Expired { expires_at: claims.expires_at, now: now_unix_secs });
        }
        let lifetime = claims.expires_at.saturating_sub(claims.issued_at.min(now_unix_secs));
        if lifetime > self.max_lifetime_secs.saturating_add(leeway) {
            return Err(TokenError::LifetimeTooLong { lifetime_secs: lifetime, max_secs: self.max_lifetime_secs });
        }
        Ok(claims)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids().collect::<Vec<_>>())
            .field("signing_key", &self.signing_key_id())
            .finish()
    }
}

/// Wall-clock unix seconds, for callers of [`Keyring::verify`] and
/// [`Keyring::mint`]. Negative before 1970.
pub fn now_unix_secs() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// Lowercase hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Bytes from hex text (either case); `None` on odd length or a non-hex char.
pub fn decode_hex(text: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

/// The development key in `data_dir/dev-key` (`id:hexsecret`), created with
/// 32 random bytes on first use. Returns the key, the file's path and
/// whether it was created now. Refuses a file others can read or write:
/// anyone who can read it can mint tokens.
pub fn load_or_create_dev_key(data_dir: &Path) -> io::Result<(Key, PathBuf, bool)> {
    load_or_create_key_file(data_dir, DEV_KEY_FILE, "dev")
}

/// [`load_or_create_dev_key`] for another key file (`file` in `data_dir`,
/// ids `{id_prefix}-{fingerprint}`), e.g. the dev push key.
pub fn load_or_create_key_file(data_dir: &Path, file: &str, id_prefix: &str) -> io::Result<(Key, PathBuf, bool)> {
    let path = data_dir.join(file);
    match read_key_file(&path) {
        Ok(key) => return Ok((key, path, false)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir)?;

    let mut random = [0u8; DEV_SECRET_BYTES + 4];
    getrandom::fill(&mut random).map_err(|e| io::Error::other(format!("getrandom: {e}")))?;
    let (secret, tmp_tag) = random.split_at(DEV_SECRET_BYTES);
    // The id is a fingerprint of the secret: it tells nodes' keys apart
    // without revealing anything.
    let id = format!("{id_prefix}-{}", encode_hex(&Sha256::digest(secret)[..4]));
    let key = Key::new(id.as_str(), secret.to_vec()).map_err(io::Error::other)?;

    // Write a private temp file, then hard-link it into place: the link
    // appears atomically and fails if another process created the key first,
    // in which case that key wins.
    let tmp = data_dir.join(format!(".{file}.{}.tmp", encode_hex(tmp_tag)));
    let written = write_private(&tmp, format!("{id}:{}\n", encode_hex(secret)).as_bytes())
        .and_then(|()| fs::hard_link(&tmp, &path));
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            // Best effort: make the new directory entry durable.
            if let Ok(dir) = fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            Ok((key, path, true))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok((read_key_file(&path)?, path, false)),
        Err(e) => Err(e),
    }
}

fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Reads a key file (`id:hexsecret`), refusing one others may access.
pub fn read_key_file(path: &Path) -> io::Result<Key> {
    let mut file = fs::File::open(path)?;
    // Checked on the open file, so the mode seen is the mode of what is read.
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} has mode {:o}: group/other may access it and could mint tokens; \
                 run `chmod 600 {}` (or delete it to generate a new key)",
                path.display(),
                mode & 0o777,
                path.display()
            ),
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}; expected one line `id:hexsecret`", path.display()),
        )
    };
    let (id, secret_hex) = text.trim().split_once(':').ok_or_else(|| invalid("no ':'"))?;
    let secret = decode_hex(secret_hex).ok_or_else(|| invalid("secret is not hex"))?;
    Key::new(id, secret).map_err(|e| invalid(&e.to_string()))
}

/// Scratch directories for tests that touch the filesystem (the crate has
/// no tempfile dependency).
#[cfg(test)]
pub(crate) mod test_dir {
    use std::path::{Path, PathBuf};

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            let mut tag = [0u8; 8];
            getrandom::fill(&mut tag).unwrap();
            let dir = std::env::temp_dir().join(format!("longlink-{name}-{}", super::encode_hex(&tag)));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_dir::TempDir;
    use super::*;

    const NOW: i64 = 1_700_000_000;
    const LEEWAY: u32 = 30;

    fn key(id: &str, fill: u8) -> Key {
        Key::new(id, vec![fill; 32]).unwrap()
    }

    fn ring() -> Keyring {
        Keyring::new(vec![key("k1", 1)], None).unwrap()
    }

    fn mint_now(ring: &Keyring) -> String {
        ring.mint("alice", "phone-1", "chat", NOW - 10, NOW + 3600)
    }

    /// Re-signs arbitrary claims with `key`, for inputs `mint` cannot make.
    fn sign_raw(key: &Key, claims: &[u8]) -> String {
        let tag = key.mac_of(claims).finalize().into_bytes();
        format!("{}.{}", URL_SAFE_NO_PAD.encode(claims), URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn mint_verify_round_trip() {
        let ring = ring();
        let claims = ring.verify(&mint_now(&ring), NOW, LEEWAY).unwrap();
        assert_eq!(
            claims,
            TokenClaims {
                user: "alice".into(),
                device: "phone-1".into(),
                app: "chat".into(),
                issued_at: NOW - 10,
                expires_at: NOW + 3600,
                key_id: "k1".into(),
                groups: Vec::new(),
            }
        );
    }

    #[test]
    fn tokens_longer_lived_than_the_maximum_are_refused() {
        let ring = ring().with_max_lifetime(86_400);
        assert!(ring.verify(&ring.mint("a", "d", "", NOW - 10, NOW + 86_000), NOW, LEEWAY).is_ok());
        // 100 years, as the issue found accepted.
        let century = ring.mint("a", "d", "", NOW, NOW + 100 * 365 * 86_400);
        let err = ring.verify(&century, NOW, LEEWAY).unwrap_err();
        assert!(matches!(err, TokenError::LifetimeTooLong { .. }), "{err:?}");
        assert_eq!(err.code(), ErrorCode::InvalidToken);
        // Issued "in the future" within the leeway: counted from now.
        let ahead = ring.mint("a", "d", "", NOW + LEEWAY as i64, NOW + LEEWAY as i64 + 86_400 + 5);
        assert!(matches!(ring.verify(&ahead, NOW, LEEWAY), Err(TokenError::LifetimeTooLong { .. })));
        // Without a maximum, as before.
        assert!(super::tests::ring().verify(&century, NOW, LEEWAY).is_ok());
    }

    #[test]
    fn tampered_tokens_fail_the_signature() {
        let ring = ring();
        let token = mint_now(&ring);
        let (claims, tag) = token.split_once('.').unwrap();

        let mut bad_tag = URL_SAFE_NO_PAD.decode(tag).unwrap();
        bad_tag[0] ^= 1;
        let forged = format!("{claims}.{}", URL_SAFE_NO_PAD.encode(&bad_tag));
        assert_eq!(ring.verify(&forged, NOW, LEEWAY), Err(TokenError::BadSignature));
        bad_tag[0] ^= 1;

        // Change the user ("alice" -> "alicf") but keep the old tag.
        let mut bad_claims = URL_SAFE_NO_PAD.decode(claims).unwrap();
        let at = bad_claims.windows(5).position(|w| w == b"alice").unwrap();
        bad_claims[at + 4] = b'f';
        let forged = format!("{}.{tag}", URL_SAFE_NO_PAD.encode(&bad_claims));
        assert_eq!(ring.verify(&forged, NOW, LEEWAY), Err(TokenError::BadSignature));

        // A truncated tag is not accepted either.
        let short = format!("{claims}.{}", URL_SAFE_NO_PAD.encode(&bad_tag[..16]));
        assert_eq!(ring.verify(&short, NOW, LEEWAY), Err(TokenError::BadSignature));

        // Same claims signed by a key with the same id but another secret.
        let other = Keyring::new(vec![key("k1", 2)], None).unwrap();
        assert_eq!(other.verify(&token, NOW, LEEWAY), Err(TokenError::BadSignature));
    }

    #[test]
    fn unknown_key_id() {
        let token = Keyring::new(vec![key("other", 1)], None).unwrap().mint("u", "d", "a", NOW, NOW + 60);
        assert_eq!(ring().verify(&token, NOW, LEEWAY), Err(TokenError::UnknownKey("other".into())));
    }

    #[test]
    fn malformed_inputs() {
        let ring = ring();
        let k1 = key("k1", 1);
        let good = mint_now(&ring);
        let garbage = sign_raw(&k1, &[0xff, 0xff, 0xff]);
        let long = format!("{good}{}", "A".repeat(MAX_TOKEN_BYTES));
        let cases: &[(&str, &str)] = &[
            ("", "no '.' between claims and signature"),
            ("abc", "no '.' between claims and signature"),
            ("!!!.AAAA", "claims are not base64url"),
            ("AAAA.!!!", "signature is not base64url"),
            ("AAAA=.AAAA", "claims are not base64url"),
            (&garbage, "claims are not a TokenClaims message"),
            (&long, "longer than 4096 bytes"),
        ];
        for (token, why) in cases {
            assert_eq!(ring.verify(token, NOW, LEEWAY), Err(TokenError::Malformed(why)), "{token:?}");
        }
        let mint = |user, device, iat, exp| ring.verify(&ring.mint(user, device, "a", iat, exp), NOW, LEEWAY);
        assert_eq!(mint("", "d", NOW, NOW + 60), Err(TokenError::Malformed("empty user")));
        assert_eq!(mint("u", "", NOW, NOW + 60), Err(TokenError::Malformed("empty device")));
        assert_eq!(mint("u", "d", NOW, NOW), Err(TokenError::Malformed("expires_at is not after issued_at")));
    }

    #[test]
    fn expiry_honours_the_leeway() {
        let ring = ring();
        let token = ring.mint("u", "d", "a", NOW - 100, NOW);
        assert!(ring.verify(&token, NOW + i64::from(LEEWAY), LEEWAY).is_ok());
        let late = NOW + i64::from(LEEWAY) + 1;
        let err = ring.verify(&token, late, LEEWAY).unwrap_err();
        assert_eq!(err, TokenError::Expired { expires_at: NOW, now: late });
        assert_eq!(err.code(), ErrorCode::TokenExpired);
        // Extreme times saturate instead of overflowing.
        let token = ring.mint("u", "d", "a", i64::MAX - 10, i64::MAX);
        assert!(ring.verify(&token, i64::MAX, u32::MAX).is_ok());
    }

    #[test]
    fn not_yet_valid_honours_the_leeway() {
        let ring = ring();
        let token = ring.mint("u", "d", "a", NOW + i64::from(LEEWAY), NOW + 3600);
        assert!(ring.verify(&token, NOW, LEEWAY).is_ok());
        let token = ring.mint("u", "d", "a", NOW + i64::from(LEEWAY) + 1, NOW + 3600);
        let err = ring.verify(&token, NOW, LEEWAY).unwrap_err();
        assert_eq!(err, TokenError::NotYetValid { issued_at: NOW + i64::from(LEEWAY) + 1, now: NOW });
        assert_eq!(err.code(), ErrorCode::TokenNotYetValid);
    }

    #[test]
    fn rotation() {
        let old = Keyring::new(vec![key("old", 1)], None).unwrap();
        let token = mint_now(&old);

        let rotating = Keyring::new(vec![key("old", 1), key("new", 2)], Some("new")).unwrap();
        assert_eq!(rotating.signing_key_id(), "new");
        assert_eq!(rotating.verify(&token, NOW, LEEWAY).unwrap().key_id, "old");
        let fresh = mint_now(&rotating);
        assert_eq!(rotating.verify(&fresh, NOW, LEEWAY).unwrap().key_id, "new");

        let rotated = Keyring::new(vec![key("new", 2)], None).unwrap();
        let err = rotated.verify(&token, NOW, LEEWAY).unwrap_err();
        assert_eq!(err, TokenError::UnknownKey("old".into()));
        assert_eq!(err.code(), ErrorCode::InvalidToken);
        assert!(rotated.verify(&fresh, NOW, LEEWAY).is_ok());
    }

    #[test]
    fn bad_keys_and_rings() {
        assert!(matches!(Key::new("", vec![0; 32]), Err(TokenError::InvalidKey(_))));
        assert!(matches!(Key::new("a b", vec![0; 32]), Err(TokenError::InvalidKey(_))));
        assert!(matches!(Key::new("k", vec![0; 15]), Err(TokenError::InvalidKey(_))));
        assert!(Key::new("k", vec![0; 16]).is_ok());
        assert_eq!(Keyring::new(vec![], None).unwrap_err(), TokenError::NoKeys);
        assert_eq!(
            Keyring::new(vec![key("a", 1), key("a", 2)], None).unwrap_err(),
            TokenError::DuplicateKeyId("a".into())
        );
        assert_eq!(Keyring::new(vec![key("a", 1)], Some("b")).unwrap_err(), TokenError::UnknownSigningKey("b".into()));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = b"super-secret-value-0123456789".to_vec();
        let key = Key::new("k1", secret.clone()).unwrap();
        let ring = Keyring::new(vec![key.clone()], None).unwrap();
        for text in [format!("{key:?}"), format!("{key:#?}"), format!("{ring:?}")] {
            assert!(text.contains("k1"), "{text}");
            assert!(!text.contains("super-secret"), "{text}");
            assert!(!text.contains(&encode_hex(&secret)), "{text}");
        }
        assert!(format!("{key:?}").contains("<redacted>"));
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(encode_hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(decode_hex("00ABff"), Some(vec![0x00, 0xab, 0xff]));
        assert_eq!(decode_hex("abc"), None);
        assert_eq!(decode_hex("zz"), None);
    }

    #[test]
    fn now_is_after_2023() {
        assert!(now_unix_secs() > NOW);
    }

    #[test]
    fn dev_key_is_created_private_and_reused() {
        let tmp = TempDir::new("devkey");
        let data_dir = tmp.path().join("nested").join("data");
        let (key, path, created) = load_or_create_dev_key(&data_dir).unwrap();
        assert!(created);
        assert_eq!(path, data_dir.join(DEV_KEY_FILE));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&data_dir).unwrap().permissions().mode() & 0o077, 0);
        assert!(key.id().starts_with("dev-") && key.id().len() == 12, "{}", key.id());
        // No temp file left behind.
        assert_eq!(fs::read_dir(&data_dir).unwrap().count(), 1);

        let (again, _, created) = load_or_create_dev_key(&data_dir).unwrap();
        assert!(!created);
        assert_eq!(again.id(), key.id());
        let token = Keyring::new(vec![key], None).unwrap().mint("u", "d", "a", NOW, NOW + 60);
        let ring = Keyring::new(vec![again], None).unwrap();
        assert!(ring.verify(&token, NOW, LEEWAY).is_ok());

        // Two data dirs never share a key.
        let (other, _, _) = load_or_create_dev_key(&tmp.path().join("other")).unwrap();
        assert_ne!(other.id(), ring.signing_key_id());
    }

    #[test]
    fn dev_key_readable_by_others_is_refused() {
        let tmp = TempDir::new("devkey-mode");
        let (_, path, _) = load_or_create_dev_key(tmp.path()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_dev_key(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn dev_key_file_garbage_is_refused() {
        let tmp = TempDir::new("devkey-bad");
        write_private(&tmp.path().join(DEV_KEY_FILE), b"no-colon-here\n").unwrap();
        let err = load_or_create_dev_key(tmp.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
