//! The dispatcher: `GET /v1/dispatch?device=&platform=&net=` (with a proof
//! of who the client is: see [`crate::http::dispatch_auth`]) tells a client
//! where to connect (HttpDNS-like).
//!
//! Endpoints are ordered by rendezvous hashing of the uid over the healthy,
//! non-draining nodes: the same user lands on the same node while the node
//! set is stable, and when a node leaves only its users move. Several
//! endpoints come back so the client can drift when one fails. The reply
//! also carries the heartbeat bounds, when set the reconnect backoff bounds
//! and, for a proven user only, a connect token bound to that user and the
//! request's device. Without a hook or ticket keys configured, `uid` only
//! picks the endpoints and no token is minted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::config::Config;
use crate::http::dispatch_auth::{BAD_ID, DispatchAuth, Proof, Refusal, printable_id, printable_or_empty};
use crate::http::{Reply, Request, Response};
use crate::protocol::proto::TokenClaims;
use crate::protocol::token::Keyring;
use crate::router::{NodeInfo, rank};

/// Where the dispatcher learns the node set.
pub trait NodeSource: Send + Sync {
    fn nodes(&self) -> Vec<NodeInfo>;
}

/// A fixed node list (embedded mode: this node only).
pub struct StaticNodes(pub Vec<NodeInfo>);

impl NodeSource for StaticNodes {
    fn nodes(&self) -> Vec<NodeInfo> {
        self.0.clone()
    }
}

/// A node list kept fresh by a thread of its own, so a request never
/// waits for Redis: the router's table on a node, or Redis itself for the
/// standalone dispatcher.
pub struct CachedNodes {
    nodes: Mutex<Arc<Vec<NodeInfo>>>,
}

impl CachedNodes {
    /// Calls `fetch` now and then every `every`; a `None` keeps the last list.
    pub fn start(
        every: Duration,
        mut fetch: impl FnMut() -> Option<Vec<NodeInfo>> + Send + 'static,
    ) -> std::io::Result<Arc<CachedNodes>> {
        let cache = Arc::new(CachedNodes { nodes: Mutex::new(Arc::new(fetch().unwrap_or_default())) });
        let weak = Arc::downgrade(&cache);
        std::thread::Builder::new().name("longlink-nodes".into()).spawn(move || {
            loop {
                std::thread::sleep(every);
                let fresh = fetch();
                let Some(cache) = weak.upgrade() else { return };
                if let Some(nodes) = fresh
                    && let Ok(mut slot) = cache.nodes.lock()
                {
                    *slot = Arc::new(nodes);
                }
            }
        })?;
        Ok(cache)
    }
}

impl NodeSource for CachedNodes {
    fn nodes(&self) -> Vec<NodeInfo> {
        let list = self.nodes.lock().map(|n| n.clone()).unwrap_or_default();
        list.as_ref().clone()
    }
}

/// Dispatcher settings.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Endpoints per reply (the first is preferred, the rest for drift).
    pub endpoints: usize,
    pub token_ttl_secs: u64,
    pub heartbeat_min_ms: u32,
    pub heartbeat_default_ms: u32,
    pub heartbeat_max_ms: u32,
}

impl DispatchConfig {
    /// The settings of a node's config: `[cluster]` endpoints, the default
    /// token lifetime and the session's heartbeat bounds.
    pub fn from_config(config: &Config) -> DispatchConfig {
        let s = &config.session;
        DispatchConfig {
            endpoints: config.cluster.dispatch_endpoints as usize,
            token_ttl_secs: config.auth.default_token_ttl_secs,
            heartbeat_min_ms: s.heartbeat_min_ms,
            heartbeat_default_ms: s.heartbeat_default_ms,
            heartbeat_max_ms: s.heartbeat_max_ms,
        }
    }
}

pub struct Dispatcher {
    cfg: DispatchConfig,
    keyring: Keyring,
    nodes: Arc<dyn NodeSource>,
    /// Reconnect backoff bounds (min, max) in ms told to clients, if set.
    reconnect: Option<(u64, u64)>,
    /// What a client must prove before a token is minted.
    auth: DispatchAuth,
}

impl Dispatcher {
    /// A dispatcher that mints no token (see [`Dispatcher::with_auth`]).
    pub fn new(cfg: DispatchConfig, keyring: Keyring, nodes: Arc<dyn NodeSource>) -> Dispatcher {
        Dispatcher { cfg, keyring, nodes, reconnect: None, auth: DispatchAuth::none() }
    }

    /// Mints tokens for the users `auth` proves.
    pub fn with_auth(mut self, auth: DispatchAuth) -> Dispatcher {
        self.auth = auth;
        self
    }

    /// Tells clients the reconnect backoff bounds to use (`reconnect`
    /// in the reply): every wait at least `min_ms`, at most `max_ms`.
    pub fn with_reconnect_bounds(mut self, min_ms: u64, max_ms: u64) -> Dispatcher {
        self.reconnect = Some((min_ms, max_ms));
        self
    }

    /// Answers `GET /v1/dispatch`; other paths are the caller's. A check
    /// that may block (the hook, Redis) runs off the event loop.
    pub fn dispatch(self: &Arc<Self>, req: &Request, now_unix_secs: i64) -> Reply {
        if req.method != "GET" {
            return Response::json(405, &json!({"error": "use GET"})).into();
        }
        let param = |name: &str| req.query.get(name).map(String::as_str).unwrap_or("");
        let device = param("device").to_owned();
        let fields = [param("uid"), param("app"), param("platform"), param("net")];
        if !fields.iter().all(|f| printable_or_empty(f)) {
            return refuse(&BAD_ID).into();
        }
        let authorization = req.header("authorization").unwrap_or("");
        let proof = match self.auth.classify(authorization, param("ticket")) {
            Ok(proof) => proof,
            Err(why) => return refuse(&why).into(),
        };
        if !matches!(proof, Proof::NotRequired) && !printable_id(&device) {
            return refuse(&BAD_ID).into();
        }
        let app = param("app").to_owned();
        let echo = (param("platform").to_owned(), param("net").to_owned());
        match proof {
            Proof::NotRequired => {
                // Ranked by the uid given (or the device): a hint only.
                let key = if param("uid").is_empty() { device.as_str() } else { param("uid") };
                self.answer(key, None, &echo, now_unix_secs).into()
            }
            Proof::Ticket(ticket) => {
                let ticket = match self.auth.verify_ticket(ticket, &device, now_unix_secs) {
                    Ok(t) => t,
                    Err(why) => return refuse(&why).into(),
                };
                let this = self.clone();
                let finish = move || match this.auth.replay().consume(&ticket, now_unix_secs) {
                    Ok(()) => {
                        let app = ticket.app.clone().unwrap_or(app);
                        this.answer(&ticket.uid, Some((&device, &app, &ticket.groups)), &echo, now_unix_secs)
                    }
                    Err(why) => refuse(&why),
                };
                if self.auth.replay().blocks() { Reply::Blocking(Box::new(finish)) } else { finish().into() }
            }
            Proof::Hook { authorization, ticket } => {
                let (authorization, ticket) = (authorization.to_owned(), ticket.to_owned());
                let this = self.clone();
                Reply::Blocking(Box::new(move || match this.auth.ask_hook(&authorization, &ticket, &device, &app) {
                    Ok(who) => this.answer(&who.uid, Some((&device, &app, &who.groups)), &echo, now_unix_secs),
                    Err(why) => refuse(&why),
                }))
            }
        }
    }

    /// Endpoints for `uid`, and a token for (`uid`, device, app) with the
    /// groups claim the proof gave when `mint` is given (a proven user).
    fn answer(
        &self,
        uid: &str,
        mint: Option<(&str, &str, &[String])>,
        echo: &(String, String),
        now_unix_secs: i64,
    ) -> Response {
        let nodes = rank(uid, &self.nodes.nodes(), self.cfg.endpoints.max(1));
        if nodes.is_empty() {
            return Response::json(
                503,
                &json!({"error": "no healthy node", "code": "NO_NODE", "retry_after_ms": 1000}),
            );
        }
        let expires_at = now_unix_secs.saturating_add(i64::try_from(self.cfg.token_ttl_secs).unwrap_or(i64::MAX));
        let token = mint.map(|(device, app, groups)| {
            self.keyring.mint_claims(TokenClaims {
                user: uid.to_owned(),
                device: device.to_owned(),
                app: app.to_owned(),
                issued_at: now_unix_secs,
                expires_at,
                groups: groups.to_vec(),
                ..Default::default()
            })
        });
        Response::json(
            200,
            &json!({
                "endpoints": nodes.iter().map(|n| n.client_endpoint.as_str()).collect::<Vec<_>>(),
                "nodes": nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
                "uid": mint.map(|_| uid),
                "token": token,
                "expires_at": token.as_ref().map(|_| expires_at),
                "heartbeat": {
                    "min_ms": self.cfg.heartbeat_min_ms,
                    "default_ms": self.cfg.heartbeat_default_ms,
                    "max_ms": self.cfg.heartbeat_max_ms,
                },
                "reconnect": self.reconnect.map(|(min_ms, max_ms)| json!({"min_ms": min_ms, "max_ms": max_ms})),
                "platform": echo.0,
                "net": echo.1,
            }),
        )
    }
}

/// A refusal as a JSON answer with its code.
fn refuse(why: &Refusal) -> Response {
    Response::json(why.status, &json!({"error": why.error, "code": why.code}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;
    use crate::http::dispatch_auth::{DispatchAuthConfig, ReplayStore, sign_ticket};
    use crate::protocol::token::{Key, encode_hex};

    fn node(name: &str, draining: bool) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            incarnation: 1,
            client_endpoint: format!("{name}:7100"),
            node_endpoint: format!("{name}:7102"),
            draining,
            lease_expires_ms: u64::MAX,
        }
    }

    fn dispatcher(nodes: Vec<NodeInfo>) -> Arc<Dispatcher> {
        let keyring = Keyring::new(vec![Key::new("k", vec![3; 32]).unwrap()], None).unwrap();
        let cfg = DispatchConfig {
            endpoints: 3,
            token_ttl_secs: 600,
            heartbeat_min_ms: 5_000,
            heartbeat_default_ms: 30_000,
            heartbeat_max_ms: 270_000,
        };
        let auth_cfg = DispatchAuthConfig {
            ticket_keys: vec![KeyConfig { id: "app".into(), secret_hex: encode_hex(&APP_SECRET) }],
            ..DispatchAuthConfig::default()
        };
        let auth = DispatchAuth::new(&auth_cfg, ReplayStore::memory(100)).unwrap();
        Arc::new(Dispatcher::new(cfg, keyring, Arc::new(StaticNodes(nodes))).with_auth(auth))
    }

    const APP_SECRET: [u8; 32] = [9; 32];
    const NOW: i64 = 1_800_000_000;

    fn ticket(uid: &str, nonce: &str) -> String {
        sign_ticket(&APP_SECRET, &json!({"kid": "app", "uid": uid, "exp": NOW + 60, "nonce": nonce}))
    }

    fn get(d: &Arc<Dispatcher>, query: &str) -> (u16, serde_json::Value) {
        let req = Request {
            method: "GET".into(),
            path: "/v1/dispatch".into(),
            query: crate::http::parse_query(query),
            ..Request::default()
        };
        let r = match d.dispatch(&req, NOW) {
            Reply::Now(r) => r,
            Reply::Blocking(work) => work(),
        };
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    #[test]
    fn ranking_is_stable_and_only_moves_the_users_of_a_leaving_node() {
        let nodes: Vec<NodeInfo> = (0..5).map(|i| node(&format!("n{i}"), false)).collect();
        let before: Vec<String> = (0..1000).map(|u| rank(&format!("u{u}"), &nodes, 1)[0].name.clone()).collect();
        let fewer: Vec<NodeInfo> = nodes.iter().filter(|n| n.name != "n2").cloned().collect();
        let after: Vec<String> = (0..1000).map(|u| rank(&format!("u{u}"), &fewer, 1)[0].name.clone()).collect();
        for (b, a) in before.iter().zip(&after) {
            if b != "n2" {
                assert_eq!(a, b, "a user of a remaining node moved");
            }
        }
        let on_n2 = before.iter().filter(|b| *b == "n2").count();
        assert!((100..300).contains(&on_n2), "uneven spread: {on_n2}");
    }

    #[test]
    fn draining_nodes_are_skipped_and_several_endpoints_come_back() {
        let d = dispatcher(vec![node("a", false), node("b", true), node("c", false), node("d", false)]);
        let query = format!("ticket={}&device=phone&platform=ios&net=wifi", ticket("alice", "n-000001"));
        let (status, body) = get(&d, &query);
        assert_eq!(status, 200);
        let endpoints: Vec<&str> = body["endpoints"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(endpoints.len(), 3);
        assert!(!endpoints.contains(&"b:7100"));
        assert_eq!(body["heartbeat"]["max_ms"], 270_000);
        let token = body["token"].as_str().unwrap();
        let claims = d.keyring.verify(token, 1_800_000_000, 0).unwrap();
        assert_eq!((claims.user.as_str(), claims.device.as_str()), ("alice", "phone"));
    }

    #[test]
    fn bad_requests_and_no_nodes() {
        let d = dispatcher(vec![node("a", true)]);
        // A bare uid proves nothing.
        assert_eq!(get(&d, "uid=alice&device=x").1["code"], "NO_PROOF");
        assert_eq!(get(&d, &format!("ticket={}", ticket("alice", "n-000002"))).1["code"], "BAD_ID");
        let escape = format!("ticket={}&device=ph%1Bone", ticket("alice", "n-000003"));
        assert_eq!(get(&d, &escape).1["code"], "BAD_ID");
        assert_eq!(get(&d, &format!("ticket={}&device=x", ticket("alice", "n-000004"))).0, 503);
        // Without a hook or tickets: endpoints, never a token.
        let open =
            Arc::new(Dispatcher::new(d.cfg.clone(), d.keyring.clone(), Arc::new(StaticNodes(vec![node("b", false)]))));
        let (status, body) = get(&open, "uid=alice&device=phone");
        assert_eq!((status, body["token"].is_null()), (200, true), "{body}");
        assert_eq!(body["endpoints"][0], "b:7100");
    }
}
