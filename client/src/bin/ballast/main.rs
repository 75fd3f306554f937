//! `ballast`: the command-line client of the Ballast broker.
//!
//! Thin by design: parse flags, set up logging, run one command with the
//! `ballast-client` library, map the outcome to an exit code. Files:
//!
//! - `args.rs`: the flags (clap derive) and the exit-code table in `--help`.
//! - `commands.rs`: one function per command.
//! - `output.rs`: human and JSON rendering.
//! - `exit.rs`: errors to exit codes.

mod args;
mod commands;
mod exit;
mod output;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("BALLAST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::from(exit::OTHER);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if !matches!(error, exit::CliError::Reported(_)) {
                eprintln!("error: {}", output::printable(&error.to_string()));
            }
            ExitCode::from(error.exit_code())
        }
    }
}
