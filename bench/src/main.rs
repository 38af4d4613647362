//! `longlink-bench`: load programs for longlink (see README.md).
//!
//! Map:
//! - [`harness`]: options shared by every scenario, deadline, Ctrl-C, progress line.
//! - [`server`]: the `longlink serve` process under test (config, readiness, RSS, stop).
//! - [`pool`]: the parent's side of the client worker processes.
//! - [`worker`]: the worker process itself (`longlink-bench worker`, hidden) and its JSON-lines protocol.
//! - [`source`]: 127.x.y.z source addresses per worker.
//! - [`record`]: JSON result records (stdout + appended to a JSON-lines file).
//! - [`sys`]: /proc readers and resource limits.
//! - [`loadworker`]: the load worker process (`longlink-bench load-worker`, hidden): clients that
//!   time pushed messages, ping, churn.
//! - [`drive`]: the parent's side of the push scenarios (server + load workers, queries, CPU).
//! - [`pusher`]: open-loop push load over the push port (sender + reply thread per connection).
//! - [`latency`]: CLOCK_MONOTONIC stamps and hdrhistogram helpers; [`rng`]: load-shape randomness.
//! - scenarios: [`idle`], [`unicast`], [`fanout`], [`broadcast`], [`soak`], [`upstream`], [`reliable`],
//!   [`dispatch`].
//! - [`compare`]: the same idle, unicast and fan-out loads against longlink, nats-server and
//!   mosquitto (peer servers, NATS and MQTT clients, publisher).
//! - [`report`]: markdown report with SVG plots ([`svg`]) from result files.
//!
//! A new scenario is a module with its args, a record struct that flattens
//! [`record::RunInfo`], and a `run` that starts a [`server::ServerProcess`],
//! spawns a [`pool::WorkerPool`] and measures.

mod broadcast;
mod compare;
mod dispatch;
mod drive;
mod fanout;
mod harness;
mod idle;
mod latency;
mod links;
mod loadworker;
mod pool;
mod pusher;
mod record;
mod reliable;
mod report;
mod rng;
mod server;
mod slowloris;
mod soak;
mod source;
mod svg;
mod sys;
mod unicast;
mod upstream;
mod worker;
mod wsload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "longlink-bench",
    about = "Load programs for longlink: each starts a real node, drives it from worker processes and prints one JSON record."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Idle capacity: hold N authenticated idle connections and report the
    /// server's user-space memory per connection and the connect rate.
    Idle(idle::IdleArgs),
    /// Unicast latency: N clients, pushes to random single devices at an
    /// open-loop rate; push-to-receive percentiles, losses, server CPU.
    Unicast(unicast::UnicastArgs),
    /// Group fan-out: M members of one group, K pushes at R/s; deliveries/s
    /// and delivery latency.
    Fanout(fanout::FanoutArgs),
    /// Paced broadcast: achieved deliveries/s and completion time against
    /// the configured rate limit.
    Broadcast(broadcast::BroadcastArgs),
    /// Soak: pings, pushes and churn for minutes; server RSS over time.
    Soak(soak::SoakArgs),
    /// Upstream round trip: client request -> longlink -> echo backend and
    /// back, against the same requests sent straight to the echo backend,
    /// at each rate (p50/p99/p999 and what longlink adds).
    Upstream(upstream::UpstreamArgs),
    /// At-least-once unicast (memory and Redis store) against at-most-once in
    /// the same run: push->receive and push->ACK percentiles, pushes/s.
    Reliable(reliable::ReliableArgs),
    /// Dispatcher: `GET /v1/dispatch` p50/p99 at an open-loop rate, on a
    /// node's admin sidecar and on the standalone dispatcher (starts
    /// redis-server and a small cluster).
    Dispatch(dispatch::DispatchArgs),
    /// The same idle, unicast and fan-out loads against longlink,
    /// nats-server and mosquitto in one run: memory per subscribed
    /// connection, latency, server CPU per push and per delivery, ratios.
    Compare(compare::CompareArgs),
    /// Dispatcher latency while slow sockets trickle request heads
    /// (slowloris): p50/p99 at an open-loop rate with --slow sockets open.
    Slowloris(slowloris::SlowlorisArgs),
    /// Markdown report with SVG plots from one or more results files.
    Report(report::ReportArgs),
    /// A client worker process (internal: started by the scenarios, reads
    /// its spec on stdin).
    #[command(hide = true)]
    Worker,
    /// A load worker process (internal: started by the push scenarios).
    #[command(hide = true)]
    LoadWorker,
    /// A NATS or MQTT client worker process (internal: started by `compare`).
    #[command(hide = true)]
    PeerWorker,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Idle(args) => idle::run(&args),
        Command::Unicast(args) => unicast::run(&args),
        Command::Fanout(args) => fanout::run(&args),
        Command::Broadcast(args) => broadcast::run(&args),
        Command::Soak(args) => soak::run(&args),
        Command::Upstream(args) => upstream::run(&args),
        Command::Reliable(args) => reliable::run(&args),
        Command::Dispatch(args) => dispatch::run(&args),
        Command::Compare(args) => compare::run(&args),
        Command::Slowloris(args) => slowloris::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Worker => worker::run(),
        Command::LoadWorker => loadworker::run(),
        Command::PeerWorker => compare::peerworker::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
