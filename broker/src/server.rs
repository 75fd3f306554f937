//! Serving a [`Broker`] over gRPC on a listener, with health, reflection and
//! graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use ballast_proto::v1::{
    admin_server::AdminServer, consumer_server::ConsumerServer, publisher_server::PublisherServer,
    stats_server::StatsServer,
};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;

use crate::{
    Broker,
    grpc::{
        Service,
        tls::{Incoming, MetricsTlsListener, Tls, TlsFiles},
        transport::{Connections, StatusLayer},
    },
    limits::{GRPC_DECODE_SIZE_MAX, GRPC_ENCODE_SIZE_MAX, HTTP2_HEADER_LIST_SIZE_MAX},
};

/// Serves `broker` on `listener` until `shutdown` resolves, then drains:
/// new calls get UNAVAILABLE, consume streams end, in-flight publishes finish
/// (up to the configured shutdown timeout), and every log is synced.
/// With `[tls]` configured, connections speak TLS (see [`crate::grpc::tls`]);
/// its files are read here, so a bad one fails the start.
/// With `metrics`, Prometheus metrics are served on that listener from the
/// recorder [`crate::metrics::install`] returned, which must have been
/// installed before the broker was opened: a lane's metric handles are
/// taken on its first use, and handles taken before a recorder exists
/// record nothing.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    metrics: Option<(TcpListener, metrics_exporter_prometheus::PrometheusHandle)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The cluster log, when configured: started before the listener so
    // that the Raft service has its node (docs/replication.md).
    let cluster = match broker.config().cluster.clone() {
        Some(config) => {
            let cluster = crate::cluster::node::Cluster::start(&config, &broker.config().data_dir, &broker).await?;
            broker.node().set_cluster(Arc::clone(&cluster));
            Some(cluster)
        }
        None => None,
    };
    let raft_service = cluster.as_ref().map(|c| crate::cluster::network::RaftService::new(c.raft.clone()));
    let service = Service::new(Arc::clone(&broker));
    // The auth file, reloaded on SIGHUP and when it changes; the watcher
    // ends when the server (the last holder of `auth`) does.
    let auth = match &broker.config().auth.file {
        Some(path) => {
            let auth = crate::auth::Auth::load(path).map_err(|e| anyhow::anyhow!(e))?;
            auth.watch().map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
            Some(auth)
        }
        None => None,
    };
    // The console's history, sampled by the stats tick while someone
    // reads it; its API authenticates with the same auth file.
    let history = Arc::new(crate::console::History::default());
    let console = crate::console::Console::new(service.clone(), auth.clone(), Arc::clone(&history));
    // KEDA's external scaler, over the same Stats code.
    let scaler = ballast_proto::externalscaler::external_scaler_server::ExternalScalerServer::new(
        crate::grpc::scaler::Scaler::new(service.clone()),
    )
    .max_decoding_message_size(GRPC_DECODE_SIZE_MAX)
    .max_encoding_message_size(GRPC_ENCODE_SIZE_MAX);
    let health = tonic_health::server::HealthReporter::new();
    let health_service = tonic_health::pb::health_server::HealthServer::new(crate::grpc::auth::QueueHealth::new(
        tonic_health::server::HealthService::from_health_reporter(health.clone()),
        broker.config().auth_configured(),
    ));
    health.set_serving::<AdminServer<Service>>().await;
    health.set_serving::<PublisherServer<Service>>().await;
    health.set_serving::<ConsumerServer<Service>>().await;
    health.set_serving::<StatsServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ballast_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // Small responses must not wait for Nagle's algorithm (40 ms with
    // delayed ACKs): every accepted connection gets TCP_NODELAY. TCP
    // keepalive finds peers whose host vanished even on a quiet connection
    // the HTTP/2 pings below would also catch; the connection count bounds
    // what clients can hold open.
    let grpc = broker.config().grpc.clone();
    let connections = Connections::new(grpc.connections_max);
    let accepted = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_millis(grpc.tcp_keepalive_ms)));
    let tls = TlsFiles::of(&broker.config().tls).map(Tls::load).transpose()?;
    let incoming: Incoming = match &tls {
        Some(tls) => Box::pin(crate::grpc::tls::incoming(accepted, connections, Arc::clone(tls))),
        None => Box::pin(accepted.filter_map(move |accepted| match accepted {
            Ok(stream) => connections.admit(stream).map(Ok),
            Err(e) => Some(Err(e)),
        })),
    };
    let reloader = tls.as_ref().map(|tls| tokio::spawn(Arc::clone(tls).watch()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // HTTP/2 pings find a consumer whose peer stopped answering: the
    // connection closes, its streams end and their leases go back to their
    // lanes without counting an attempt.
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_millis(grpc.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(grpc.keepalive_timeout_ms)))
        .max_concurrent_streams(grpc.streams_per_connection_max)
        .http2_max_header_list_size(HTTP2_HEADER_LIST_SIZE_MAX)
        .timeout(Duration::from_millis(grpc.request_timeout_ms))
        .layer(StatusLayer::new(auth))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            AdminServer::new(service.clone())
                .max_decoding_message_size(GRPC_DECODE_SIZE_MAX)
                .max_encoding_message_size(GRPC_ENCODE_SIZE_MAX),
        )
        .add_service(
            PublisherServer::new(service.clone())
                .max_decoding_message_size(GRPC_DECODE_SIZE_MAX)
                .max_encoding_message_size(GRPC_ENCODE_SIZE_MAX),
        )
        .add_service(
            ConsumerServer::new(service.clone())
                .max_decoding_message_size(GRPC_DECODE_SIZE_MAX)
                .max_encoding_message_size(GRPC_ENCODE_SIZE_MAX),
        )
        .add_service(
            StatsServer::new(service)
                .max_decoding_message_size(GRPC_DECODE_SIZE_MAX)
                .max_encoding_message_size(GRPC_ENCODE_SIZE_MAX),
        )
        .add_service(scaler)
        .add_optional_service(raft_service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    // Every queue's status (NOT_SERVING while it opens) before the first
    // call can ask; then only changes, every tick.
    let mut health_reporter = health.clone();
    broker.report_health(&mut health_reporter).await;
    let mut server = tokio::spawn(server);
    let ticker = tokio::spawn(tick(Arc::downgrade(&broker), health.clone(), history));
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_stopped = async {
        let _ = metrics_stopped.await;
    };
    let metrics_task = match (metrics, &tls) {
        (Some((listener, handle)), Some(tls)) if broker.config().metrics.tls => {
            let listener = MetricsTlsListener::new(listener, Arc::clone(tls))?;
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                Arc::downgrade(&broker),
                handle,
                console,
                metrics_stopped,
            )))
        }
        (Some((listener, handle)), _) => Some(tokio::spawn(crate::metrics::serve(
            listener,
            Arc::downgrade(&broker),
            handle,
            console,
            metrics_stopped,
        ))),
        (None, _) => None,
    };

    tokio::select! {
        result = &mut server => {
            // The server ended without being asked to: report why.
            result??;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
        () = shutdown => {}
    }
    tracing::info!("shutting down: refusing new work, draining in-flight calls");
    broker.begin_shutdown();
    health.set_not_serving::<AdminServer<Service>>().await;
    health.set_not_serving::<PublisherServer<Service>>().await;
    health.set_not_serving::<ConsumerServer<Service>>().await;
    health.set_not_serving::<StatsServer<Service>>().await;
    let _ = stop_tx.send(());
    let timeout = Duration::from_millis(broker.config().shutdown_timeout_ms);
    match tokio::time::timeout(timeout, &mut server).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!(timeout_ms = timeout.as_millis(), "in-flight calls still running at the shutdown timeout");
            server.abort();
        }
    }
    ticker.abort();
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    let _ = metrics_stop.send(());
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    if let Some(cluster) = cluster {
        cluster.shutdown().await;
    }
    broker.sync_all()?;
    tracing::info!("all queues synced; bye");
    Ok(())
}

/// The stats task: smoothed rates, the disk watermark and the console's
/// history, every tick.
async fn tick(
    broker: std::sync::Weak<Broker>,
    mut health: tonic_health::server::HealthReporter,
    history: Arc<crate::console::History>,
) {
    let period = Duration::from_millis(crate::limits::STATS_TICK_MS);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut last = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let Some(broker) = broker.upgrade() else { return };
        let now = tokio::time::Instant::now();
        broker.tick((now - last).as_secs_f64());
        history.sample(&broker, now.into_std(), crate::now_ms());
        broker.report_health(&mut health).await;
        last = now;
    }
}

/// The log files the storage keeps open (`storage.open_files_max`) fitted
/// under the process's soft limit on open files, with a quarter of it (at
/// least `OPEN_FILES_RESERVE_MIN`) left for connections, directories and
/// the metrics endpoint: a cache sized past the limit would fail opens
/// with EMFILE instead of closing its least recently used files. Returns
/// the value it had if it was lowered.
pub fn fit_open_files(config: &mut crate::Config, soft_limit: u64) -> Option<usize> {
    let reserve = (soft_limit / 4).max(crate::limits::OPEN_FILES_RESERVE_MIN);
    let room = usize::try_from(soft_limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    let fitted = room.max(ballast_storage::limits::OPEN_FILES_MIN);
    let configured = config.storage.open_files_max;
    (fitted < configured).then(|| {
        config.storage.open_files_max = fitted;
        configured
    })
}

/// Caps glibc's malloc arenas at [`crate::limits::MALLOC_ARENAS_MAX`],
/// unless the operator chose a number with the `MALLOC_ARENA_MAX`
/// environment variable. glibc gives each thread that allocates an arena
/// of its own (up to eight per core): the queues opened after a start on a
/// dozen blocking threads then leave their long-lived state scattered
/// among that many arenas, each with its own partly used pages. Capped,
/// the same state costs less resident memory (`ballast-bench queues
/// --queues 2000`, idle after a restart: 43.2 MiB of anonymous memory
/// instead of 51.8, for the same live heap); small allocations on hot paths go through glibc's per-thread cache,
/// which takes no arena lock. Returns the cap set, if any. Call it once,
/// first thing, before other threads exist.
pub fn limit_malloc_arenas() -> Option<i32> {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let max = crate::limits::MALLOC_ARENAS_MAX;
        // SAFETY: mallopt only sets an allocator parameter; called before
        // other threads exist.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, max) } == 1 {
            return Some(max);
        }
    }
    None
}

/// The soft limit on open files (`RLIMIT_NOFILE`) before and after
/// [`raise_open_files_limit`], and the hard limit it may not pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub before: u64,
    pub after: u64,
    pub hard: u64,
}

/// Raises this process's soft limit on open files to its hard limit: a
/// shell's or systemd's default soft limit (often 1,024) is far below what
/// the hard limit allows, and a broker with thousands of queues needs more
/// than that whatever its file cache. Never lowers it. Call it once, early,
/// and log the result.
pub fn raise_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` to the pointer, which is valid.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the `rlimit` behind the pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(OpenFilesLimit { before, after: limit.rlim_cur, hard: limit.rlim_max })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The open-file cache is fitted under the limit with a quarter (at
    /// least `OPEN_FILES_RESERVE_MIN`) to spare, never below the storage's
    /// minimum, and left alone when it already fits.
    #[test]
    fn open_files_fit_under_the_limit() {
        use ballast_storage::limits::OPEN_FILES_MIN;
        let check = |configured: usize, soft: u64, expected: usize| {
            let mut config = crate::Config::default();
            config.storage.open_files_max = configured;
            let lowered = fit_open_files(&mut config, soft);
            assert_eq!(config.storage.open_files_max, expected, "{configured} under {soft}");
            assert_eq!(lowered, (expected < configured).then_some(configured));
        };
        check(512, 256, 192);
        check(512, 1024, 512);
        check(512, 682, 512);
        check(512, 681, 511);
        check(512, 100, OPEN_FILES_MIN.max(36));
        check(512, 10, OPEN_FILES_MIN);
        check(512, 1 << 20, 512);
    }
}
