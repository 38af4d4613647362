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
//! - scenarios: [`idle`].
//!
//! A new scenario is a module with its args, a record struct that flattens
//! [`record::RunInfo`], and a `run` that starts a [`server::ServerProcess`],
//! spawns a [`pool::WorkerPool`] and measures.

mod harness;
mod idle;
mod pool;
mod record;
mod server;
mod source;
mod sys;
mod worker;

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
    /// A client worker process (internal: started by the scenarios, reads
    /// its spec on stdin).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Idle(args) => idle::run(&args),
        Command::Worker => worker::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
