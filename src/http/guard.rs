//! `[http]`: the limits of the HTTP sidecars (admin port, dispatcher) and
//! who may change state through them.
//!
//! `/metrics` and `/healthz` are open (the admin port binds 127.0.0.1 by
//! default). Every endpoint that changes state (`POST /drain`) needs
//! `Authorization: Bearer <http.admin_token>`, compared in constant time,
//! and refuses what a browser can send cross-site without asking: any
//! method but POST, a "simple" content type (text/plain, form encodings),
//! an `Origin` not listed in `http.allowed_origins`.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::config::{ConfigError, config_struct};
use crate::http::server::Limits;
use crate::http::{Request, Response};

/// A secret from the config: never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "<redacted>" })
    }
}

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

config_struct! {
    /// `[http]`: the admin port and the dispatcher. A request head (and
    /// body) must arrive within header_timeout_ms; each source address may
    /// hold max_connections_per_ip connections; idle sockets cost no thread.
    pub struct HttpConfig {
        /// Bearer token for the admin endpoints that change state (POST
        /// /drain): `Authorization: Bearer <token>`. At least 16 printable
        /// characters, e.g. from `openssl rand -hex 32`. Default: "" (those
        /// endpoints answer 403; SIGTERM still drains).
        pub admin_token: Secret = Secret::default(),
        /// Origins (e.g. "https://ops.example.com") whose browser requests
        /// may change state; a request with any other `Origin` header is
        /// refused. Default: none.
        pub allowed_origins: Vec<String> = Vec::new(),
        /// Cluster mode: serve GET /v1/dispatch on this address of its own
        /// (e.g. "0.0.0.0:7103", facing clients) instead of the admin port.
        /// Default: "" (on the admin port).
        pub dispatch_listen: String = String::new(),
        /// Time a client has to send a whole request head and body, in ms;
        /// also the keep-alive idle limit. Default: 10000. Allowed: 100 to
        /// 600000.
        pub header_timeout_ms: u64 = 10_000,
        /// Connections one HTTP listener holds at once. Default: 1024.
        /// Allowed: 1 to 100000.
        pub max_connections: u32 = 1_024,
        /// Connections one source address may hold on one HTTP listener.
        /// Default: 64. Allowed: 1 to 100000.
        pub max_connections_per_ip: u32 = 64,
        /// Threads per HTTP listener for work that may block (auth hook
        /// calls, Redis). Default: 4. Allowed: 1 to 256.
        pub workers: u32 = 4,
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        let token = &self.admin_token.0;
        if !token.is_empty() && (token.len() < MIN_ADMIN_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic())) {
            // The token itself is never part of the message.
            return invalid(
                "http.admin_token",
                format!("must be at least {MIN_ADMIN_TOKEN_BYTES} printable ASCII characters without spaces"),
            );
        }
        if let Some(o) = self.allowed_origins.iter().find(|o| o.is_empty() || !o.bytes().all(|b| b.is_ascii_graphic()))
        {
            return invalid("http.allowed_origins", format!("{o:?} is not an origin like \"https://host\""));
        }
        if !self.dispatch_listen.is_empty() && self.dispatch_listen.parse::<SocketAddr>().is_err() {
            return invalid("http.dispatch_listen", format!("{:?} is not an ip:port", self.dispatch_listen));
        }
        let ranges: [(&'static str, u64, u64, u64); 4] = [
            ("http.header_timeout_ms", self.header_timeout_ms, 100, 600_000),
            ("http.max_connections", self.max_connections.into(), 1, 100_000),
            ("http.max_connections_per_ip", self.max_connections_per_ip.into(), 1, 100_000),
            ("http.workers", self.workers.into(), 1, 256),
        ];
        for (field, value, min, max) in ranges {
            if value < min || value > max {
                return invalid(field, format!("{value} is outside the allowed range {min}..={max}"));
            }
        }
        Ok(())
    }

    /// The server limits these settings give.
    pub fn limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections as usize,
            max_per_ip: self.max_connections_per_ip as usize,
            header_timeout: Duration::from_millis(self.header_timeout_ms),
            workers: self.workers as usize,
            queue: (self.workers as usize) * 64,
        }
    }

    /// The separate dispatch address, if one is set (checked by `validate`).
    pub fn dispatch_addr(&self) -> Option<SocketAddr> {
        self.dispatch_listen.parse().ok()
    }
}

/// Who may change state through the admin port.
#[derive(Clone, Debug)]
pub struct AdminGuard {
    token: Secret,
    allowed_origins: Vec<String>,
}

/// Content types a browser sends cross-site without a preflight.
const SIMPLE_CONTENT_TYPES: [&str; 3] = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"];

impl AdminGuard {
    pub fn new(cfg: &HttpConfig) -> AdminGuard {
        AdminGuard { token: cfg.admin_token.clone(), allowed_origins: cfg.allowed_origins.clone() }
    }

    /// `None` when `req` may change state; otherwise the refusal. Each
    /// refusal carries a `code` a script can match.
    pub fn check(&self, req: &Request) -> Option<Response> {
        let refuse =
            |status: u16, code: &str, error: &str| Some(Response::json(status, &json!({"error": error, "code": code})));
        if req.method != "POST" {
            return refuse(405, "METHOD_NOT_ALLOWED", "use POST");
        }
        if let Some(origin) = req.header("origin")
            && !self.allowed_origins.iter().any(|o| o == origin)
        {
            return refuse(403, "ORIGIN_NOT_ALLOWED", "cross-site requests are refused");
        }
        if let Some(ct) = req.header("content-type") {
            let mime = ct.split(';').next().unwrap_or("").trim();
            if SIMPLE_CONTENT_TYPES.iter().any(|s| mime.eq_ignore_ascii_case(s)) {
                return refuse(415, "SIMPLE_CONTENT_TYPE", "send application/json (or no body)");
            }
        }
        if self.token.0.is_empty() {
            return refuse(403, "ADMIN_DISABLED", "no http.admin_token is configured");
        }
        let given = req.header("authorization").and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if given.is_empty() {
            return refuse(401, "ADMIN_TOKEN_MISSING", "send Authorization: Bearer <admin token>");
        }
        if !constant_time_eq(given.as_bytes(), self.token.0.as_bytes()) {
            return refuse(401, "ADMIN_TOKEN_INVALID", "wrong admin token");
        }
        None
    }
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right (the length may show; tokens are long).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "POST".into(),
            path: "/drain".into(),
            headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
            ..Request::default()
        }
    }

    fn code(r: Option<Response>) -> String {
        let Some(r) = r else { return "OK".into() };
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["code"].as_str().unwrap().to_owned()
    }

    #[test]
    fn state_changes_need_the_token_and_no_cross_site_shape() {
        let cfg = HttpConfig { admin_token: Secret("0123456789abcdef-x".into()), ..HttpConfig::default() };
        cfg.validate().unwrap();
        let g = AdminGuard::new(&cfg);
        let auth = ("authorization", "Bearer 0123456789abcdef-x");
        assert_eq!(code(g.check(&post(&[auth, ("content-type", "application/json")]))), "OK");
        assert_eq!(code(g.check(&post(&[]))), "ADMIN_TOKEN_MISSING");
        assert_eq!(code(g.check(&post(&[("authorization", "Bearer 0123456789abcdef-y")]))), "ADMIN_TOKEN_INVALID");
        assert_eq!(code(g.check(&post(&[auth, ("content-type", "text/plain;charset=UTF-8")]))), "SIMPLE_CONTENT_TYPE");
        assert_eq!(code(g.check(&post(&[auth, ("origin", "http://evil.example")]))), "ORIGIN_NOT_ALLOWED");
        let get = Request { method: "GET".into(), ..post(&[auth]) };
        assert_eq!(code(g.check(&get)), "METHOD_NOT_ALLOWED");
        assert_eq!(code(AdminGuard::new(&HttpConfig::default()).check(&post(&[auth]))), "ADMIN_DISABLED");
        let short = HttpConfig { admin_token: Secret("short".into()), ..HttpConfig::default() };
        let err = short.validate().unwrap_err().to_string();
        assert!(!err.contains("short"), "the secret leaked into {err}");
        assert_eq!(format!("{:?}", cfg.admin_token), "<redacted>");
    }
}
