//! `ballastd`: the Ballast broker node.
//!
//! With no arguments: data in `./data`, gRPC on `127.0.0.1:7400`. A TOML
//! file (`--config`) and flags override every setting; flags win.
//! Prints `listening on <address>` then `metrics on <address>` on stdout
//! once it accepts connections.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use ballast_broker::{Broker, Config};
use clap::Parser;

/// The Ballast broker node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (see the README for every key).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port [default: 127.0.0.1:7400].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Prometheus /metrics address; port 0 picks a free port [default: 127.0.0.1:7401].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Refuse publishes below this much free disk space, in bytes [default: 536870912].
    #[arg(long, value_name = "BYTES")]
    disk_free_min_bytes: Option<u64>,
    /// Longest wait for in-flight calls on SIGTERM/SIGINT, in ms [default: 10000].
    #[arg(long, value_name = "MS")]
    shutdown_timeout_ms: Option<u64>,
}

fn main() -> ExitCode {
    // First: before any thread allocates (see the function).
    let arenas = ballast_broker::server::limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(arenas) = arenas {
        tracing::info!(arenas, "malloc arenas capped (MALLOC_ARENA_MAX overrides)");
    }
    // Before anything opens a file: thousands of queues need more than the
    // usual default soft limit of 1,024 descriptors.
    let open_files = match ballast_broker::server::raise_open_files_limit() {
        Ok(limit) => {
            if limit.after > limit.before {
                tracing::info!(from = limit.before, to = limit.after, hard = limit.hard, "raised the open files limit");
            } else {
                tracing::info!(soft = limit.after, hard = limit.hard, "open files limit");
            }
            Some(limit.after)
        }
        Err(e) => {
            tracing::warn!("cannot raise the open files limit: {e}");
            None
        }
    };
    let mut config = match load_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ballastd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(soft) = open_files
        && let Some(configured) = ballast_broker::server::fit_open_files(&mut config, soft)
    {
        tracing::warn!(
            configured,
            using = config.storage.open_files_max,
            open_files_limit = soft,
            "storage.open_files_max lowered to fit the open files limit"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ballastd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ballastd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir.clone_from(dir);
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(listen) = args.metrics_listen {
        config.metrics_listen = listen;
    }
    if let Some(bytes) = args.disk_free_min_bytes {
        config.disk_free_min_bytes = bytes;
    }
    if let Some(ms) = args.shutdown_timeout_ms {
        config.shutdown_timeout_ms = ms;
    }
    config.validate()?;
    Ok(config)
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Installed before anything can reach the broker: a SIGTERM that comes
    // before the handler exists kills the process without a clean close.
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let address = listener.local_addr()?;
    let metrics = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} for metrics: {e}", config.metrics_listen))?;
    let metrics_address = metrics.local_addr()?;
    // Before any queue is used: a lane takes its metric handles then.
    let recorder = ballast_broker::metrics::install();
    tracing::info!(data_dir = %config.data_dir.display(), "opening queues");
    // Opening runs recovery on every queue: file work, off the runtime's
    // workers (which serve nothing yet, but the queues' timer tasks start).
    let broker = tokio::task::spawn_blocking(move || Broker::open(config))
        .await
        .map_err(|e| anyhow::anyhow!("opening the queues: {e}"))??;
    tracing::info!(%address, "serving gRPC");
    announce(&format!("listening on {address}\nmetrics on {metrics_address}\n"));
    let metrics = recorder.map(|handle| (metrics, handle));
    ballast_broker::server::serve(broker, listener, metrics, shutdown).await
}

/// Prints the bound addresses in one write (a reader that stops after the
/// first line still gets both), ignoring a closed stdout: the broker must
/// not die because whoever started it stopped listening.
fn announce(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Installs the SIGTERM and SIGINT handlers now; the returned future
/// resolves on the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| anyhow::anyhow!("cannot install the SIGTERM handler: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| anyhow::anyhow!("cannot install the SIGINT handler: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
