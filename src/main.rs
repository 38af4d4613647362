//! The `longlink` command: the server and its tools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

use longlink::client::{ClientError, ClientEvent, ClientOptions, Connection};
use longlink::config::{Config, KeySource};
use longlink::server::Server;
use longlink::token;

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
    },
    /// Print the default configuration as commented TOML.
    GenerateConfig,
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
        Command::Serve { config, shards, listen } => serve(config, shards, listen),
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
        Command::Client { server, token, platform, heartbeat_ms } => run_client(server, token, platform, heartbeat_ms),
        Command::GenerateConfig => {
            print!("{}", Config::default_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(config: Option<PathBuf>, shards: Option<u16>, listen: Option<SocketAddr>) -> anyhow::Result<ExitCode> {
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(n) = shards {
        cfg.server.shards = n;
    }
    if let Some(addr) = listen {
        cfg.server.client_listen = addr;
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
    // SIGTERM/SIGINT set the stop flag; the shards drain and exit.
    let stop = server.stop_flag();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    // Print the address on stdout so scripts (and tests) can read it.
    println!("listening {}", server.client_addr());
    server.join();
    tracing::info!(stopped = stop.load(Ordering::Relaxed), "longlink stopped");
    Ok(ExitCode::SUCCESS)
}

fn run_client(server: SocketAddr, token: String, platform: String, heartbeat_ms: u32) -> anyhow::Result<ExitCode> {
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(64 * 1024)
        .make()
        .map_err(|e| anyhow::anyhow!("starting the client executor: {e}"))?;
    ex.run(async move {
        let mut opts = ClientOptions::new(token);
        opts.platform = platform;
        opts.heartbeat_ms = heartbeat_ms;
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
                }));
                loop {
                    match conn.next_event().await {
                        Ok(ClientEvent::Pong { rtt_ms }) => emit(json!({"event": "pong", "rtt_ms": rtt_ms})),
                        Ok(ClientEvent::GoAway { endpoint, reason }) => {
                            emit(json!({"event": "go_away", "endpoint": endpoint, "reason": reason}))
                        }
                        Ok(ClientEvent::Connected(_)) => {}
                        Err(err) => break err,
                    }
                }
            }
            Err(err) => err,
        };
        emit(close_event(&result));
        if result.reconnect_allowed() { Ok(ExitCode::SUCCESS) } else { Ok(ExitCode::from(1)) }
    })
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
}
