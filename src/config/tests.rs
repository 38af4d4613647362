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
    let expected = Config::FIELDS.len() - 13
        + crate::conn::tls_config::WsConfig::FIELDS.len()
        + crate::conn::tls_config::TlsConfig::FIELDS.len()
        + crate::http::guard::HttpConfig::FIELDS.len()
        + crate::http::dispatch_auth::DispatchAuthConfig::FIELDS.len()
        + crate::push::auth::PushAuthConfig::FIELDS.len()
        + ClientGroupsConfig::FIELDS.len()
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
        ("[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:1\"]\ntimeout_ms = 0", "upstream.services.timeout_ms"),
        (
            "[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:1\"]\nmax_inflight_per_shard = 0",
            "upstream.services.max_inflight_per_shard",
        ),
        ("[[upstream.services]]\nid = \"chat\"\nbackends = [\"h:1\"]\npool_size = 65", "upstream.services.pool_size"),
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
