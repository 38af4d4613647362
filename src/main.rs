//! The `longlink` command: the server and its tools.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::json;

use longlink::backend::{BackendError, PushClient};
use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::config::{Config, KeySource};
use longlink::protocol::proto::{self, ErrorCode};
use longlink::protocol::{codes, token};
use longlink::server::Server;

use cli::client::*;
use cli::push::*;
use cli::serve::*;

#[derive(Parser)]
#[command(
    name = "longlink",
    version,
    about = "A long-connection gateway: one persistent connection per client, pushes from backends to devices, users, groups and everyone."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node. With no config file it uses the embedded defaults: client
    /// port 0.0.0.0:7100, one shard per core, a dev signing key created in
    /// ./.longlink/, no external services.
    Serve {
        /// TOML config file (see `longlink generate-config`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Number of shards (executors, one per core); overrides the config.
        #[arg(long)]
        shards: Option<u16>,
        /// Client listen address; overrides `server.client_listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Cluster mode: share this Redis (e.g. redis://127.0.0.1:6379/)
        /// with the other nodes for routes, leases and at-least-once
        /// timelines; sets `delivery.redis_url` and `cluster.enabled`. Then
        /// SIGTERM (or POST /drain on the admin port) drains the node
        /// gracefully; a second SIGTERM or SIGINT stops it at once. A node
        /// that lost its lease (paused past it, or its name taken by a live
        /// process) drains and exits with status 3, so a supervisor
        /// restarts it.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
    },
    /// Run the dispatcher alone: `GET /v1/dispatch?device=&platform=&net=`
    /// answers with endpoints of the cluster's healthy nodes (read from
    /// Redis), the heartbeat bounds and, for a user proven by the auth hook
    /// or a login ticket (`[dispatch]`), a connect token. Needs the nodes'
    /// token keys. Prints `dispatcher ADDR`, runs until SIGINT/SIGTERM.
    Dispatcher {
        /// Redis of the cluster (the nodes' `--redis`).
        #[arg(long, value_name = "URL")]
        redis: String,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7103")]
        listen: SocketAddr,
        /// Config with the token keys, key prefix, heartbeat bounds and
        /// `cluster.dispatch_endpoints` (the nodes' config).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Mint a connect token signed with the node's key (the dev key in
    /// `data_dir` when no keys are configured).
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        device: String,
        #[arg(long, default_value = "")]
        app: String,
        /// Lifetime, e.g. 90s, 30m, 1h, 7d (default: auth.default_token_ttl_secs).
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Connect as a client and print every event as one JSON line until the
    /// connection ends (exit status 0 for a reconnectable end, 1 for a
    /// terminal one).
    Client {
        /// host:port of a node's client port.
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        token: String,
        #[arg(long, default_value = "cli")]
        platform: String,
        /// Requested heartbeat interval in ms (0 = the server's default).
        #[arg(long, default_value_t = 0)]
        heartbeat_ms: u32,
        /// Resume after this at-least-once sequence (the `last_seq` a
        /// previous run printed when it closed).
        #[arg(long, default_value_t = 0)]
        last_seq: u64,
        /// The node store's incarnation a previous run printed with its
        /// `last_seq`: if the store lost its contents since, the node says
        /// what may have been missed.
        #[arg(long, default_value_t = 0)]
        store_incarnation: u64,
        /// Act as an old client without ACK support: stored messages arrive
        /// once, never resent.
        #[arg(long)]
        no_ack: bool,
    },
    /// Connect with the client SDK (drift, backoff, smart heartbeat,
    /// resume, dedup) and print every event as one JSON line. Messages are
    /// acknowledged once printed. Runs until a terminal code (exit status 1)
    /// or until killed.
    Sdk(SdkArgs),
    /// Print the default configuration as commented TOML.
    GenerateConfig,
    /// Push a message through a node's push port and print each target's
    /// result as a JSON line (one summary line for --group and --all).
    Push(PushArgs),
    /// Add devices to a group or remove them from it, through the push port.
    #[command(subcommand)]
    Group(GroupCommand),
    /// End the sessions of devices, or of every device of users, through the
    /// push port; the clients receive a Kicked frame with the code.
    Kick(KickArgs),
    /// Revoke the tokens of devices or users issued until now (needs the
    /// key's "revoke" right): refused at login with REVOKED, and their
    /// sessions are kicked with REVOKED.
    Revoke(RevokeArgs),
    /// Ask a node which devices, users and groups are online, and how many
    /// connections each shard holds; prints JSON lines.
    Online(OnlineArgs),
    /// Ask where at-least-once messages are (stored, sent, acked with times,
    /// expired, unknown); prints one JSON line per message id.
    Status(StatusArgs),
    /// Connect as a client, send one upstream request to a service and print
    /// the Response as a JSON line (exit status 1 unless its status is OK).
    Request {
        /// host:port of a node's client port.
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        token: String,
        /// Service id (one of the node's `[[upstream.services]]`).
        #[arg(long)]
        service: String,
        /// How long to wait for the Response, in ms.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// The request body; its UTF-8 bytes are sent.
        body: String,
    },
    /// Upgrade a running node in place without disconnecting anyone: sends
    /// it SIGUSR2 (it starts the binary now at its path and hands every
    /// listener, session and stored message over), then prints the outcome
    /// as one JSON line: the new pid, or why the old process serves on.
    Upgrade {
        /// The node's process id.
        #[arg(long)]
        pid: u32,
        /// How long to wait for the outcome.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
    },
    /// Run the example service backend: answers every upstream request with
    /// its body and logs connection events. Prints `listening ADDR`, then
    /// runs until SIGINT/SIGTERM and prints its counts as one JSON line.
    EchoBackend {
        /// Address to listen on (port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:7200")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    init_tracing();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Changes the log filter of the running process (`server.log_level` on
/// reload). Set once by [`init_tracing`].
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

fn env_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
}

fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(env_filter());
    let _ = LOG_FILTER.set(handle);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

/// Sets the log filter: `level`, or RUST_LOG / "info" when it is empty.
pub(crate) fn set_log_level(level: &str) -> Result<(), String> {
    let filter = match level {
        "" => env_filter(),
        level => tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?,
    };
    match LOG_FILTER.get() {
        Some(handle) => handle.reload(filter).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve { config, shards, listen, redis } => serve(config, shards, listen, redis),
        Command::Token { user, device, app, ttl, config } => {
            let cfg = Config::load(config.as_deref())?;
            let ttl_secs = match ttl {
                Some(t) => parse_duration(&t)?.as_secs(),
                None => cfg.auth.default_token_ttl_secs,
            };
            if ttl_secs > cfg.auth.max_token_lifetime_secs {
                bail!(
                    "--ttl is over auth.max_token_lifetime_secs ({} s): nodes would refuse the token",
                    cfg.auth.max_token_lifetime_secs
                );
            }
            let (keyring, _) = cfg.keyring()?;
            let now = token::now_unix_secs();
            let ttl = i64::try_from(ttl_secs).context("ttl too large")?;
            println!("{}", keyring.mint(&user, &device, &app, now, now + ttl));
            Ok(ExitCode::SUCCESS)
        }
        Command::Client { server, token, platform, heartbeat_ms, last_seq, store_incarnation, no_ack } => {
            let mut opts = ClientOptions::new(token);
            opts.platform = platform;
            opts.heartbeat_ms = heartbeat_ms;
            opts.last_seq = last_seq;
            opts.store_incarnation = store_incarnation;
            if no_ack {
                opts.capabilities = 0;
            }
            run_client(server, opts)
        }
        Command::Sdk(args) => run_sdk(args),
        Command::GenerateConfig => {
            print!("{}", Config::default_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Push(args) => with_push_port(&args.port, |c| push(c, &args)),
        Command::Status(args) => with_push_port(&args.port, |c| {
            let reply = c.delivery_status(&args.message_ids)?;
            reply.statuses.iter().for_each(|s| emit(status_json(s)));
            Ok(())
        }),
        Command::Group(GroupCommand::Join(args)) => with_push_port(&args.port, |c| {
            let reply = c.group_update::<String>(&args.group, &args.devices, &[])?;
            reply.results.iter().for_each(|r| emit(target_result_json(r)));
            Ok(())
        }),
        Command::Group(GroupCommand::Leave(args)) => with_push_port(&args.port, |c| {
            let reply = c.group_update::<String>(&args.group, &[], &args.devices)?;
            reply.results.iter().for_each(|r| emit(target_result_json(r)));
            Ok(())
        }),
        Command::Kick(args) => with_push_port(&args.port, |c| {
            let reply = if args.device.is_empty() {
                c.kick_users(&args.user, args.code, &args.reason)?
            } else {
                c.kick_devices(&args.device, args.code, &args.reason)?
            };
            reply.results.iter().for_each(|r| emit(target_result_json(r)));
            Ok(())
        }),
        Command::Revoke(args) => with_push_port(&args.port, |c| {
            let reply = c.revoke(&args.device, &args.user, &args.reason)?;
            reply.results.iter().for_each(|r| emit(target_result_json(r)));
            Ok(())
        }),
        Command::Online(args) => with_push_port(&args.port, |c| {
            let reply = c.presence(&args.device, &args.user, &args.group)?;
            presence_lines(&reply).into_iter().for_each(emit);
            Ok(())
        }),
        Command::Request { server, token, service, timeout_ms, body } => {
            run_request(server, token, service, Duration::from_millis(timeout_ms), body)
        }
        Command::EchoBackend { listen } => echo_backend(listen),
        Command::Upgrade { pid, timeout_secs } => cli::upgrade::upgrade(pid, Duration::from_secs(timeout_secs)),
        Command::Dispatcher { redis, listen, config } => dispatcher(redis, listen, config),
    }
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

/// Parses `90`, `90s`, `30m`, `1h`, `7d`.
fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("bad duration {text:?}: expected e.g. 90s, 30m, 1h, 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => bail!("bad duration unit {unit:?} in {text:?}: use s, m, h or d"),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("longlink").chain(args.iter().copied()))
    }

    #[test]
    fn push_takes_repeated_and_comma_separated_targets() {
        let Command::Push(p) = parse(&["push", "--device", "a,b", "--device", "c", "hi"]).unwrap().command else {
            panic!("not push")
        };
        assert_eq!(p.device, ["a", "b", "c"]);
        assert_eq!(p.message, "hi");
        assert_eq!(p.port.server, "127.0.0.1:7101");
        let Command::Push(p) = parse(&["push", "--all", "--ttl-ms", "500", "--service", "live", "m"]).unwrap().command
        else {
            panic!("not push")
        };
        assert!(p.all && p.ttl_ms == 500 && p.service.as_deref() == Some("live"));
        assert_eq!(p.qos, QosArg::AtMostOnce);
        let Command::Push(p) = parse(&["push", "--device", "d", "--qos", "at-least-once", "m"]).unwrap().command else {
            panic!("not push")
        };
        assert_eq!(p.qos, QosArg::AtLeastOnce);
        let Command::Status(s) = parse(&["status", "--server", "h:1", "7", "8,9"]).unwrap().command else {
            panic!("not status")
        };
        assert_eq!(s.message_ids, [7, 8, 9]);
        assert!(parse(&["status"]).is_err(), "ids are required");
    }

    #[test]
    fn stored_results_and_statuses_print_their_sequences() {
        let r = proto::TargetResult {
            target: "d".into(),
            status: proto::PushStatus::Stored as i32,
            sessions: 1,
            seq: 42,
            message_id: 7,
            ..Default::default()
        };
        let line = target_result_json(&r);
        assert_eq!(
            (line["status"].as_str(), line["seq"].as_u64(), line["message_id"].as_u64()),
            (Some("STORED"), Some(42), Some(7))
        );
        let s = proto::MessageStatus {
            message_id: 7,
            state: proto::DeliveryState::Acked as i32,
            device: "d".into(),
            seq: 42,
            stored_at_ms: 1,
            sent_at_ms: 2,
            acked_at_ms: 3,
            reason: String::new(),
        };
        assert_eq!(status_json(&s)["state"], "ACKED");
        assert_eq!(status_json(&proto::MessageStatus::default())["state"], "UNKNOWN");
        let expired = proto::MessageStatus {
            state: proto::DeliveryState::Expired as i32,
            reason: "not acknowledged after 3 replays to the device".into(),
            ..Default::default()
        };
        assert_eq!(status_json(&expired)["reason"], "not acknowledged after 3 replays to the device");
    }

    #[test]
    fn push_needs_exactly_one_target_kind() {
        use clap::error::ErrorKind;
        assert_eq!(parse(&["push", "hi"]).err().map(|e| e.kind()), Some(ErrorKind::MissingRequiredArgument));
        let both = parse(&["push", "--device", "a", "--user", "u", "hi"]);
        assert_eq!(both.err().map(|e| e.kind()), Some(ErrorKind::ArgumentConflict));
        let both = parse(&["push", "--group", "g", "--all", "hi"]);
        assert_eq!(both.err().map(|e| e.kind()), Some(ErrorKind::ArgumentConflict));
        assert!(parse(&["push", "--group", "g"]).is_err(), "the message is required");
    }

    #[test]
    fn kick_codes_by_name() {
        let Command::Kick(k) = parse(&["kick", "--user", "u1"]).unwrap().command else { panic!("not kick") };
        assert_eq!(k.code, ErrorCode::Kicked);
        let Command::Kick(k) = parse(&["kick", "--device", "d", "--code", "shutdown"]).unwrap().command else {
            panic!("not kick")
        };
        assert_eq!(k.code, ErrorCode::Shutdown);
        let err = parse(&["kick", "--device", "d", "--code", "NOPE"]).err().expect("bad code is refused").to_string();
        assert!(err.contains("valid codes: SHUTDOWN, ") && err.contains("REPLACED"), "{err}");
        assert!(parse(&["kick", "--device", "d", "--code", "ERROR_CODE_UNSPECIFIED"]).is_err());
        assert!(parse(&["kick"]).is_err(), "a target is required");
    }

    #[test]
    fn group_and_online_arguments() {
        let Command::Group(GroupCommand::Leave(g)) =
            parse(&["group", "leave", "--server", "h:1", "--group", "g", "d1", "d2,d3"]).unwrap().command
        else {
            panic!("not group leave")
        };
        assert_eq!((g.port.server.as_str(), g.group.as_str()), ("h:1", "g"));
        assert_eq!(g.devices, ["d1", "d2", "d3"]);
        assert!(parse(&["group", "join", "--group", "g"]).is_err(), "devices are required");
        let Command::Online(o) = parse(&["online", "--user", "u", "--group", "g1,g2"]).unwrap().command else {
            panic!("not online")
        };
        assert!(o.device.is_empty());
        assert_eq!(o.group, ["g1", "g2"]);
    }

    #[test]
    fn presence_prints_one_line_per_target_then_counts() {
        let online = proto::DevicePresence {
            device: "d1".into(),
            online: true,
            shard: 1,
            user: "u1".into(),
            client_version: "1.0".into(),
            ..Default::default()
        };
        let reply = proto::PresenceReply {
            devices: vec![online.clone(), proto::DevicePresence { device: "d2".into(), ..Default::default() }],
            users: vec![proto::UserPresence { user: "u1".into(), devices: vec![online] }],
            groups: vec![proto::GroupCount { group: "g".into(), online: 3 }],
            connections_per_shard: vec![1, 2],
            connections_total: 3,
            ..Default::default()
        };
        let lines = presence_lines(&reply);
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0]["shard"], 1);
        assert_eq!(lines[1], json!({"device": "d2", "online": false}));
        assert_eq!(lines[2]["devices"][0]["client_version"], "1.0");
        assert_eq!(lines[3], json!({"group": "g", "online": 3}));
        assert_eq!(lines[4], json!({"connections_total": 3, "connections_per_shard": [1, 2]}));
    }

    #[test]
    fn request_and_echo_backend_arguments() {
        let Command::Request { service, body, timeout_ms, .. } =
            parse(&["request", "--server", "127.0.0.1:7100", "--token", "t", "--service", "chat", "hi"])
                .unwrap()
                .command
        else {
            panic!("not request")
        };
        assert_eq!((service.as_str(), body.as_str(), timeout_ms), ("chat", "hi", 10_000));
        let Command::EchoBackend { listen } = parse(&["echo-backend", "--listen", "127.0.0.1:0"]).unwrap().command
        else {
            panic!("not echo-backend")
        };
        assert_eq!(listen.port(), 0);
        let ok = proto::Response { request_id: 1, body: "x".into(), ..Default::default() };
        assert_eq!(response_json(&ok)["status"], "OK");
        let busy = proto::Response { status: ErrorCode::Busy as i32, reason: "r".into(), ..Default::default() };
        assert_eq!(response_json(&busy)["status"], "BUSY");
    }

    #[test]
    fn target_results_name_their_status() {
        let r = proto::TargetResult {
            target: "d".into(),
            status: proto::PushStatus::NotOnline as i32,
            sessions: 0,
            ..Default::default()
        };
        assert_eq!(
            target_result_json(&r),
            json!({"target": "d", "status": "NOT_ONLINE", "sessions": 0, "reason": null})
        );
        let r = proto::TargetResult {
            target: "d".into(),
            status: proto::PushStatus::Rejected as i32,
            reason: "node b did not answer within 5000 ms".into(),
            retryable: true,
            ..Default::default()
        };
        assert_eq!(target_result_json(&r)["retryable"], json!(true));
    }
}
