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
    /// TOML file of principals (tokens, certificate identities, per-queue
    /// permissions); without it every call is open [config: auth.file].
    #[arg(long, value_name = "FILE")]
    auth_file: Option<PathBuf>,
    /// TLS: the server's certificate chain (PEM); needs --tls-key [config: tls.cert].
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// TLS: the certificate's private key (PEM) [config: tls.key].
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: require client certificates signed by these CAs (PEM) [config: tls.client_ca].
    #[arg(long, value_name = "PATH")]
    tls_client_ca: Option<PathBuf>,
    /// Allow a non-loopback listen address without TLS and authentication [config: insecure].
    #[arg(long)]
    insecure: bool,
}

fn main() -> ExitCode {
    // First: before any thread allocates (see the function).
    let arenas = ballast_broker::server::limit_malloc_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
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
    if let Some(path) = &args.auth_file {
        config.auth.file = Some(path.clone());
    }
    apply_tls_args(args, &mut config);
    config.validate()?;
    config.validate_tls()?;
    // The files are read now, so a bad one stops the start with its reason
    // (a principal's line, a certificate's file) before anything listens.
    if let Some(path) = &config.auth.file {
        ballast_broker::auth::load_file(path)?;
    }
    if let Some(files) = ballast_broker::grpc::tls::TlsFiles::of(&config.tls) {
        ballast_broker::grpc::tls::build(&files).map_err(|e| e.to_string())?;
    }
    ballast_broker::config::check_exposure(
        config.listen,
        config.tls.enabled(),
        config.auth_configured(),
        config.insecure,
    )
    .map_err(|e| e.to_string())?;
    Ok(config)
}

fn apply_tls_args(args: &Args, config: &mut Config) {
    if let Some(path) = &args.tls_cert {
        config.tls.cert = Some(path.clone());
    }
    if let Some(path) = &args.tls_key {
        config.tls.key = Some(path.clone());
    }
    if let Some(path) = &args.tls_client_ca {
        config.tls.client_ca = Some(path.clone());
    }
    config.insecure |= args.insecure;
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

/// Installs the SIGTERM, SIGINT and SIGHUP handlers now; the returned
/// future resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| anyhow::anyhow!("cannot install the SIGTERM handler: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| anyhow::anyhow!("cannot install the SIGINT handler: {e}"))?;
    // SIGHUP reloads the TLS files and the auth file (the server listens
    // for it); taken over
    // now, so one that comes before the server starts does not end the
    // process, its default action.
    let hangup = signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
    Ok(async move {
        let _hangup = hangup;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
