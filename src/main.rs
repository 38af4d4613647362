//! The `longlink` command: the server and its tools.

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
    /// Run the dispatcher alone: `GET /v1/dispatch?uid=&device=&platform=&net=`
    /// answers with endpoints of the cluster's healthy nodes (read from
    /// Redis), a connect token and the heartbeat bounds. Prints
    /// `dispatcher ADDR`, runs until SIGINT/SIGTERM.
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
    /// Run the example service backend: answers every upstream request with
    /// its body and logs connection events. Prints `listening ADDR`, then
    /// runs until SIGINT/SIGTERM and prints its counts as one JSON line.
    EchoBackend {
        /// Address to listen on (port 0 picks one).
        #[arg(long, default_value = "127.0.0.1:7200")]
        listen: SocketAddr,
    },
}

/// Where the push-port commands connect.
#[derive(Args)]
struct PushPort {
    /// host:port of a node's push port.
    #[arg(long, default_value = "127.0.0.1:7101")]
    server: String,
}

/// How long the push-port commands wait for the TCP connection.
const PUSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long they wait for the node's reply.
const PUSH_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["device", "user", "group", "all"])))]
struct PushArgs {
    #[command(flatten)]
    port: PushPort,
    /// Device id; repeat the flag or separate ids with commas for several.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    device: Vec<String>,
    /// User id (every online device of the user); repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    user: Vec<String>,
    /// Group id: every online member of the group.
    #[arg(long)]
    group: Option<String>,
    /// Broadcast to every session on the node (delivered at the node's pace).
    #[arg(long)]
    all: bool,
    /// Service id the client sees on the message (which business sent it).
    #[arg(long, value_name = "SERVICE")]
    service: Option<String>,
    /// How long the message stays deliverable, in ms; 0 means no limit.
    #[arg(long, default_value_t = 0)]
    ttl_ms: u32,
    /// Delivery guarantee. at-least-once (devices and users only) stores the
    /// message in each device's timeline first; the result says STORED with
    /// the copy's seq and message_id.
    #[arg(long, value_enum, default_value_t = QosArg::AtMostOnce)]
    qos: QosArg,
    /// The message; its UTF-8 bytes are the payload.
    message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum QosArg {
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    port: PushPort,
    /// Message ids (from `longlink push --qos at-least-once`).
    #[arg(required = true, value_delimiter = ',')]
    message_ids: Vec<u64>,
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Add devices to a group; prints one JSON line per device.
    Join(GroupArgs),
    /// Remove devices from a group; prints one JSON line per device.
    Leave(GroupArgs),
}

#[derive(Args)]
struct GroupArgs {
    #[command(flatten)]
    port: PushPort,
    /// Group id.
    #[arg(long)]
    group: String,
    /// Device ids (also accepted comma-separated).
    #[arg(required = true, value_delimiter = ',')]
    devices: Vec<String>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["device", "user"])))]
struct KickArgs {
    #[command(flatten)]
    port: PushPort,
    /// Device id; repeatable, comma-separated.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    device: Vec<String>,
    /// User id (every session of the user); repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    user: Vec<String>,
    /// Code sent to the clients, by name: KICKED or REPLACED tell them not
    /// to reconnect, SHUTDOWN or GOING_AWAY let them come back.
    #[arg(long, default_value = "KICKED", value_parser = parse_error_code)]
    code: ErrorCode,
    /// Reason text sent to the clients.
    #[arg(long, default_value = "", hide_default_value = true)]
    reason: String,
}

#[derive(Args)]
struct OnlineArgs {
    #[command(flatten)]
    port: PushPort,
    /// Device id to look up; repeatable, comma-separated.
    #[arg(long, value_name = "DEVICE", value_delimiter = ',')]
    device: Vec<String>,
    /// User id to look up (lists the user's online devices); repeatable, comma-separated.
    #[arg(long, value_name = "USER", value_delimiter = ',')]
    user: Vec<String>,
    /// Group id to count online members of; repeatable, comma-separated.
    #[arg(long, value_name = "GROUP", value_delimiter = ',')]
    group: Vec<String>,
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
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
        Command::Online(args) => with_push_port(&args.port, |c| {
            let reply = c.presence(&args.device, &args.user, &args.group)?;
            presence_lines(&reply).into_iter().for_each(emit);
            Ok(())
        }),
        Command::Request { server, token, service, timeout_ms, body } => {
            run_request(server, token, service, Duration::from_millis(timeout_ms), body)
        }
        Command::EchoBackend { listen } => echo_backend(listen),
        Command::Dispatcher { redis, listen, config } => dispatcher(redis, listen, config),
    }
}

fn run_request(
    server: SocketAddr,
    token: String,
    service: String,
    timeout: Duration,
    body: String,
) -> anyhow::Result<ExitCode> {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .map_err(|e| anyhow::anyhow!("starting the client executor: {e}"))?;
    ex.run(async move {
        let answer = match Connection::connect(server, ClientOptions::new(token)).await {
            Ok((mut conn, _)) => {
                let answer = conn.request(&service, bytes::Bytes::from(body), timeout).await;
                conn.close().await;
                answer
            }
            Err(err) => Err(err),
        };
        match answer {
            Ok(r) => {
                emit(response_json(&r));
                Ok(if r.status == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
            }
            Err(err) => {
                emit(close_event(&err));
                Ok(ExitCode::from(1))
            }
        }
    })
}

fn response_json(r: &proto::Response) -> serde_json::Value {
    json!({
        "event": "response",
        "request_id": r.request_id,
        "status": if r.status == 0 { "OK" } else { codes::from_wire(r.status).as_str_name() },
        "body": String::from_utf8_lossy(&r.body),
        "reason": non_empty(&r.reason),
    })
}

fn echo_backend(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let backend = longlink::echo::EchoBackend::start(listen).with_context(|| format!("listening on {listen}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    println!("listening {}", backend.addr());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = backend.stats();
    emit(json!({
        "requests": stats.requests,
        "events": stats.events.len(),
        "event_batches": stats.event_batches,
        "connections": stats.connections,
    }));
    Ok(ExitCode::SUCCESS)
}

/// Connects to the push port, runs `call`, and turns a connection or
/// protocol failure into exit status 1 (clap's usage errors exit with 2).
fn with_push_port(
    port: &PushPort,
    call: impl FnOnce(&mut PushClient) -> Result<(), BackendError>,
) -> anyhow::Result<ExitCode> {
    let result = PushClient::connect(port.server.as_str(), PUSH_CONNECT_TIMEOUT).and_then(|mut client| {
        client.set_read_timeout(Some(PUSH_REPLY_TIMEOUT))?;
        call(&mut client)
    });
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("error: push port {}: {err}", port.server);
            Ok(ExitCode::from(1))
        }
    }
}

fn push(client: &mut PushClient, args: &PushArgs) -> Result<(), BackendError> {
    let per_target = !args.device.is_empty() || !args.user.is_empty();
    let targets = proto::Targets {
        devices: args.device.clone(),
        users: args.user.clone(),
        group: args.group.clone().unwrap_or_default(),
        broadcast: args.all,
    };
    let qos = match args.qos {
        QosArg::AtMostOnce => proto::Qos::AtMostOnce,
        QosArg::AtLeastOnce => proto::Qos::AtLeastOnce,
    };
    let reply = client.push_request(proto::PushRequest {
        request_id: 0,
        targets: Some(targets),
        payload: bytes::Bytes::copy_from_slice(args.message.as_bytes()),
        service_id: args.service.clone().unwrap_or_default(),
        ttl_ms: args.ttl_ms,
        qos: qos as i32,
        forwarded: false,
    })?;
    if per_target {
        reply.results.iter().for_each(|r| emit(target_result_json(r)));
    } else {
        let mut line = json!({
            "status": push_status_name(reply.status),
            "delivered": reply.delivered,
            "not_online": reply.not_online,
            "message_id": reply.message_id,
            "reason": non_empty(&reply.reason),
        });
        if reply.status == proto::PushStatus::Rejected as i32 {
            line["retryable"] = json!(reply.retryable);
        }
        emit(line);
    }
    Ok(())
}

fn target_result_json(r: &proto::TargetResult) -> serde_json::Value {
    let mut line = json!({
        "target": r.target,
        "status": push_status_name(r.status),
        "sessions": r.sessions,
        "reason": non_empty(&r.reason),
    });
    if r.status == proto::PushStatus::Rejected as i32 {
        // Whether sending the same push again may succeed.
        line["retryable"] = json!(r.retryable);
    }
    if r.seq != 0 {
        line["seq"] = json!(r.seq);
        line["message_id"] = json!(r.message_id);
    }
    if !r.copies.is_empty() {
        line["copies"] =
            r.copies.iter().map(|c| json!({"device": c.device, "seq": c.seq, "message_id": c.message_id})).collect();
    }
    line
}

fn status_json(s: &proto::MessageStatus) -> serde_json::Value {
    let state = proto::DeliveryState::try_from(s.state)
        .map_or("UNKNOWN", |st| st.as_str_name().strip_prefix("DELIVERY_STATE_").unwrap_or(st.as_str_name()));
    let ms = |v: u64| (v != 0).then_some(v);
    json!({
        "message_id": s.message_id,
        "state": state,
        "device": non_empty(&s.device),
        "seq": (s.seq != 0).then_some(s.seq),
        "stored_at_ms": ms(s.stored_at_ms),
        "sent_at_ms": ms(s.sent_at_ms),
        "acked_at_ms": ms(s.acked_at_ms),
        "reason": non_empty(&s.reason),
    })
}

/// One line per device, user and group, then the node's connection counts.
fn presence_lines(reply: &proto::PresenceReply) -> Vec<serde_json::Value> {
    let device = |d: &proto::DevicePresence| {
        if d.online {
            json!({
                "device": d.device,
                "online": true,
                "user": d.user,
                "shard": d.shard,
                "conn_id": d.conn_id,
                "connected_at_ms": d.connected_at_ms,
                "client_version": d.client_version,
                "platform": d.platform,
            })
        } else {
            json!({"device": d.device, "online": false})
        }
    };
    let mut lines: Vec<_> = reply.devices.iter().map(device).collect();
    lines.extend(reply.users.iter().map(|u| {
        json!({
            "user": u.user,
            "online": !u.devices.is_empty(),
            "devices": u.devices.iter().map(device).collect::<Vec<_>>(),
        })
    }));
    lines.extend(reply.groups.iter().map(|g| json!({"group": g.group, "online": g.online})));
    lines.push(json!({
        "connections_total": reply.connections_total,
        "connections_per_shard": reply.connections_per_shard,
    }));
    lines
}

fn push_status_name(status: i32) -> &'static str {
    proto::PushStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name())
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// Parses a code name such as `KICKED` (any case) for `longlink kick`.
fn parse_error_code(name: &str) -> Result<ErrorCode, String> {
    match ErrorCode::from_str_name(&name.trim().to_ascii_uppercase()) {
        Some(code) if code != ErrorCode::Unspecified => Ok(code),
        _ => {
            let names: Vec<_> = codes::TABLE.iter().map(|row| row.code.as_str_name()).collect();
            Err(format!("unknown code {name:?}; valid codes: {}", names.join(", ")))
        }
    }
}

fn serve(
    config: Option<PathBuf>,
    shards: Option<u16>,
    listen: Option<SocketAddr>,
    redis: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(n) = shards {
        cfg.server.shards = n;
    }
    if let Some(addr) = listen {
        cfg.server.client_listen = addr;
    }
    if let Some(url) = redis {
        cfg.delivery.redis_url = url;
        cfg.cluster.enabled = true;
    }
    cfg.validate()?;
    match cfg.keyring()?.1 {
        KeySource::Configured => {}
        KeySource::DevKey { path, created } => tracing::warn!(
            path = %path.display(),
            created,
            "no auth keys configured: using the dev signing key (fine for trying longlink, not for production)"
        ),
    }
    let server = Server::start(&cfg)?;
    let stop = server.stop_flag();
    let lease = server.cluster().map(|c| c.router.state().clone());
    match server.cluster() {
        // SIGTERM/SIGINT set the stop flag; the shards close every session
        // and exit.
        None => {
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
            }
        }
        // SIGTERM drains; a second SIGTERM, or SIGINT, stops at once.
        Some(cluster) => {
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
                .context("installing signal handlers")?;
            let term = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = term.clone();
            // SAFETY: the handler only does an atomic add (async-signal-safe).
            unsafe {
                signal_hook::low_level::register(signal_hook::consts::SIGTERM, move || {
                    counter.fetch_add(1, Ordering::Relaxed);
                })
            }
            .context("installing signal handlers")?;
            let (cluster, stop) = (cluster.clone(), stop.clone());
            std::thread::Builder::new().name("longlink-signals".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match term.load(Ordering::Relaxed) {
                        0 => {}
                        1 => cluster.request_drain(),
                        _ => {
                            tracing::warn!("second SIGTERM: stopping now");
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
        }
    }
    // Print the address on stdout so scripts (and tests) can read it.
    println!("listening {}", server.client_addr());
    println!("push {}", server.push_addr());
    println!("admin {}", server.admin_addr());
    server.join();
    if lease.is_some_and(|l| l.is_fenced()) {
        // Not a clean exit: the node gave up its place in the cluster.
        tracing::error!("longlink stopped: lease lost (fenced); exit status {FENCED_EXIT}");
        return Ok(ExitCode::from(FENCED_EXIT));
    }
    tracing::info!(stopped = stop.load(Ordering::Relaxed), "longlink stopped");
    Ok(ExitCode::SUCCESS)
}

/// Exit status of a cluster node that stopped because it lost its lease.
const FENCED_EXIT: u8 = 3;

fn dispatcher(redis: String, listen: SocketAddr, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    use longlink::http::dispatcher::{CachedNodes, DispatchConfig, Dispatcher};
    let mut cfg = Config::load(config.as_deref())?;
    cfg.delivery.redis_url = redis;
    cfg.validate()?;
    let (keyring, _) = cfg.keyring()?;
    let timeout = Duration::from_millis(cfg.delivery.redis_timeout_ms);
    let mut link =
        longlink::redis_link::RedisLink::new("dispatcher", &cfg.delivery.redis_url, timeout, timeout, vec![]);
    let prefix = cfg.delivery.redis_prefix.clone();
    let nodes =
        CachedNodes::start(Duration::from_millis(250), move || longlink::router::read_nodes(&mut link, &prefix).ok())?;
    let dispatch = DispatchConfig::from_config(&cfg);
    let dispatcher = Dispatcher::new(dispatch, keyring, nodes);
    let handler = move |req: &longlink::http::Request| match req.path.as_str() {
        "/v1/dispatch" => dispatcher.dispatch(req, token::now_unix_secs()),
        "/healthz" => longlink::http::Response::json(200, &json!({"status": "ok"})),
        _ => longlink::http::Response::json(404, &json!({"error": "not found"})),
    };
    let server = longlink::http::HttpServer::start(listen, 1024, std::sync::Arc::new(handler))
        .with_context(|| format!("listening on {listen}"))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    println!("dispatcher {}", server.addr());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
    Ok(ExitCode::SUCCESS)
}

fn run_client(server: SocketAddr, opts: ClientOptions) -> anyhow::Result<ExitCode> {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .map_err(|e| anyhow::anyhow!("starting the client executor: {e}"))?;
    ex.run(async move {
        let (mut last_seq, mut store_incarnation) = (opts.last_seq, opts.store_incarnation);
        let result = match Connection::connect(server, opts).await {
            Ok((mut conn, ok)) => {
                emit(json!({
                    "event": "connected",
                    "conn_id": ok.conn_id,
                    "shard": ok.shard,
                    "node": ok.node,
                    "heartbeat_ms": ok.heartbeat_ms,
                    "idle_timeout_ms": ok.idle_timeout_ms,
                    "server_time_ms": ok.server_time_ms,
                    "store_incarnation": ok.store_incarnation,
                }));
                loop {
                    match conn.next_event().await {
                        Ok(ClientEvent::Pong { rtt_ms }) => emit(json!({"event": "pong", "rtt_ms": rtt_ms})),
                        Ok(ClientEvent::GoAway { endpoint, reason }) => {
                            emit(json!({"event": "go_away", "endpoint": endpoint, "reason": reason}))
                        }
                        Ok(ClientEvent::Message(m)) => emit(json!({
                            "event": "message",
                            "message_id": m.message_id,
                            "seq": m.seq,
                            "service_id": m.service_id,
                            "payload": String::from_utf8_lossy(&m.payload),
                        })),
                        Ok(ClientEvent::Response(r)) => emit(response_json(&r)),
                        Ok(ClientEvent::ResyncRequired { from_seq, to_seq }) => {
                            emit(json!({"event": "resync_required", "from_seq": from_seq, "to_seq": to_seq}))
                        }
                        Ok(ClientEvent::Connected(_)) => {}
                        Err(err) => {
                            last_seq = conn.last_seq();
                            store_incarnation = conn.store_incarnation();
                            break err;
                        }
                    }
                }
            }
            Err(err) => err,
        };
        let mut close = close_event(&result);
        // Printed so a later run can resume with --last-seq and
        // --store-incarnation.
        close["last_seq"] = json!(last_seq);
        close["store_incarnation"] = json!(store_incarnation);
        emit(close);
        if result.reconnect_allowed() { Ok(ExitCode::SUCCESS) } else { Ok(ExitCode::from(1)) }
    })
}

#[derive(Args)]
struct SdkArgs {
    /// host:port of a node's client port; repeat for drift (tried in order).
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
    /// host:port of a dispatcher: endpoints and token come from it (the
    /// --endpoint list is the fallback).
    #[arg(long)]
    dispatcher: Option<String>,
    /// Connect token (not needed with --dispatcher).
    #[arg(long, default_value = "")]
    token: String,
    /// User and device sent to the dispatcher.
    #[arg(long, default_value = "")]
    uid: String,
    #[arg(long, default_value = "")]
    device: String,
    #[arg(long, default_value = "cli")]
    platform: String,
    /// Resume after this at-least-once sequence.
    #[arg(long, default_value_t = 0)]
    last_seq: u64,
    /// The store incarnation seen with that sequence (see `client`).
    #[arg(long, default_value_t = 0)]
    store_incarnation: u64,
}

fn run_sdk(args: SdkArgs) -> anyhow::Result<ExitCode> {
    use longlink::sdk::{AgentConfig, BlockingClient, ClientConfig, DispatcherConfig, Event, NextError};
    let mut opts = ClientOptions::new(args.token);
    opts.platform = args.platform.clone();
    opts.last_seq = args.last_seq;
    opts.store_incarnation = args.store_incarnation;
    let mut agent = AgentConfig::new(opts);
    agent.endpoints = args.endpoints;
    let dispatcher = args
        .dispatcher
        .map(|addr| DispatcherConfig { platform: args.platform, ..DispatcherConfig::new(addr, args.uid, args.device) });
    if agent.endpoints.is_empty() && dispatcher.is_none() {
        bail!("give --endpoint or --dispatcher");
    }
    let client = BlockingClient::start(ClientConfig { agent, dispatcher })?;
    loop {
        let ev = match client.next_event(Duration::from_secs(3600)) {
            Ok(ev) => ev,
            Err(NextError::Timeout) => continue,
            Err(NextError::Stopped) => break,
        };
        match ev {
            Event::Connected { endpoint, auth_ok } => emit(json!({
                "event": "connected", "endpoint": endpoint, "conn_id": auth_ok.conn_id, "node": auth_ok.node,
                "heartbeat_ms": auth_ok.heartbeat_ms, "store_incarnation": auth_ok.store_incarnation,
            })),
            Event::Message(m) => {
                emit(json!({
                    "event": "message", "message_id": m.message_id, "seq": m.seq, "service_id": m.service_id,
                    "payload": String::from_utf8_lossy(&m.payload),
                }));
                acknowledge(&client, m.seq)?;
            }
            Event::ResyncRequired { from_seq, to_seq } => {
                emit(json!({"event": "resync_required", "from_seq": from_seq, "to_seq": to_seq}));
                acknowledge(&client, to_seq)?;
            }
            Event::Response { result: Ok(r), .. } => emit(response_json(&r)),
            Event::Response { id, result: Err(e) } => {
                emit(json!({"event": "response", "request_id": id.0, "error": e.to_string()}))
            }
            Event::Kicked { code, reason } => {
                emit(json!({"event": "kicked", "code": code.as_str_name(), "reason": reason}))
            }
            Event::Disconnected { reason, retry_in_ms } => {
                emit(json!({
                    "event": "disconnected", "code": reason.code().map(|c| c.as_str_name()),
                    "reason": reason.to_string(), "retry_in_ms": retry_in_ms,
                }));
            }
        }
    }
    // The client stops only after a terminal code.
    Ok(ExitCode::from(1))
}

/// Marks `seq` handled. A client that already stopped (e.g. kicked right
/// after the message arrived) is not an error here: the events still queued
/// say why it stopped.
fn acknowledge(client: &longlink::sdk::BlockingClient, seq: u64) -> anyhow::Result<()> {
    match client.message_handled(seq) {
        Ok(()) | Err(longlink::sdk::SdkError::Stopped(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn close_event(err: &ClientError) -> serde_json::Value {
    let kind = match err {
        ClientError::Kicked { .. } => "kicked",
        _ => "closed",
    };
    json!({
        "event": kind,
        "code": err.code().map(|c| c.as_str_name()),
        "reason": err.to_string(),
        "reconnect": err.reconnect_allowed(),
    })
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
