//! Prometheus metrics: the four golden signals per queue and lane, through
//! the `metrics` crate, rendered by `metrics-exporter-prometheus` and served
//! on `GET /metrics` (default `127.0.0.1:7401`). The metric table, with
//! every name, type and label, is in `docs/metrics.md`.
//!
//! Counters and histograms are handles per queue and lane ([`LaneMetrics`]),
//! registered on a lane's first use ([`LazyLaneMetrics`]): after that the
//! hot path pays an atomic add, not a registry lookup, and an idle lane
//! (never published to, consumed from or refused) holds no series at all.
//! The per-queue and per-lane gauges (depth, bytes, saturation, ...) are not
//! stored in the registry: they are written at every scrape straight from
//! the queues' own state ([`write_queue_gauges`]), so they are exact when
//! read and cost no memory between scrapes. With 10,000 queues this is what
//! keeps an idle queue's cost in metrics at one empty cell per lane.

use std::{fmt::Write as _, future::Future, sync::Arc};

use metrics::{Counter, Histogram, Label, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::{Broker, queue::Queue};

/// Latency histogram buckets, in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Counters and histograms of one lane of one queue.
#[derive(Debug, Clone)]
pub struct LaneMetrics {
    pub published: Counter,
    pub delivered: Counter,
    pub acked: Counter,
    pub nacked: Counter,
    pub redelivered_nack: Counter,
    pub redelivered_expired: Counter,
    pub released: Counter,
    /// Leases given a new deadline by an extend.
    pub lease_extended: Counter,
    /// Dead letters stored back into this lane by a redrive.
    pub redriven: Counter,
    pub dead_lettered: Counter,
    /// Expired messages (message_ttl_ms, ttl_ms) stored in the dead-letter
    /// queue with reason `expired`, and dropped.
    pub expired_dead_lettered: Counter,
    pub expired_dropped: Counter,
    /// Redelivered or dead-lettered copies stored without the broker's
    /// headers, because storage refused the full copy for good.
    pub stripped_copies: Counter,
    /// Dead letters dropped because the dead-letter queue refused them for
    /// good, even without the broker's headers.
    pub dropped_dead_letters: Counter,
    pub refused_queue_full: Counter,
    pub refused_disk_low: Counter,
    /// Publish calls a real ENOSPC refused (nothing stored).
    pub refused_disk_full: Counter,
    pub refused_publish_rate: Counter,
    /// Waits of publish calls for their turn under the queue's quota,
    /// seconds (only calls that waited), by the call's lowest-priority lane.
    pub publish_throttle: Histogram,
    /// Admission to durable (answered), seconds: after any quota or
    /// idempotency-key wait.
    pub publish_durable: Histogram,
    /// Enqueue time to first delivery, seconds.
    pub publish_to_delivery: Histogram,
    /// Delivery to ack, seconds.
    pub delivery_to_ack: Histogram,
}

/// A lane's [`LaneMetrics`], registered on first use: an idle lane costs
/// one empty cell, not its hundred or so series (14 counters, 4 histograms
/// of 18 buckets) in the registry.
#[derive(Debug, Default)]
pub struct LazyLaneMetrics {
    handles: std::sync::OnceLock<Box<LaneMetrics>>,
}

impl LazyLaneMetrics {
    /// The lane's handles, registering its series with the recorder on the
    /// first call. `queue` and the lane name `lane()` gives are the labels;
    /// `lane` runs only then, so a call on the hot path after the first is
    /// one atomic load.
    pub fn get(&self, queue: &str, lane: impl FnOnce() -> String) -> &LaneMetrics {
        self.handles.get_or_init(|| Box::new(LaneMetrics::new(queue, &lane())))
    }

    /// Whether the lane's series exist (it has been used).
    pub fn is_registered(&self) -> bool {
        self.handles.get().is_some()
    }
}

impl LaneMetrics {
    fn new(queue: &str, lane: &str) -> LaneMetrics {
        let labels = || vec![Label::new("queue", queue.to_owned()), Label::new("lane", lane.to_owned())];
        let with = |key: &'static str, value: &'static str| {
            let mut l = labels();
            l.push(Label::new(key, value));
            l
        };
        LaneMetrics {
            published: counter!("ballast_published_messages_total", labels()),
            delivered: counter!("ballast_delivered_messages_total", labels()),
            acked: counter!("ballast_acked_messages_total", labels()),
            nacked: counter!("ballast_nacked_messages_total", labels()),
            redelivered_nack: counter!("ballast_redelivered_messages_total", with("reason", "nack")),
            redelivered_expired: counter!("ballast_redelivered_messages_total", with("reason", "lease_expired")),
            released: counter!("ballast_released_messages_total", labels()),
            lease_extended: counter!("ballast_lease_extensions_total", labels()),
            redriven: counter!("ballast_redriven_messages_total", labels()),
            dead_lettered: counter!("ballast_dead_lettered_messages_total", labels()),
            expired_dead_lettered: counter!("ballast_expired_messages_total", with("action", "dead_letter")),
            expired_dropped: counter!("ballast_expired_messages_total", with("action", "drop")),
            stripped_copies: counter!("ballast_stripped_copies_total", labels()),
            dropped_dead_letters: counter!("ballast_dropped_dead_letters_total", labels()),
            refused_queue_full: counter!("ballast_refused_publishes_total", with("reason", "queue_full")),
            refused_disk_low: counter!("ballast_refused_publishes_total", with("reason", "disk_low")),
            refused_disk_full: counter!("ballast_refused_publishes_total", with("reason", "disk_full")),
            refused_publish_rate: counter!("ballast_refused_publishes_total", with("reason", "publish_rate")),
            publish_throttle: histogram!("ballast_publish_throttle_seconds", labels()),
            publish_durable: histogram!("ballast_publish_durable_seconds", labels()),
            publish_to_delivery: histogram!("ballast_publish_to_delivery_seconds", labels()),
            delivery_to_ack: histogram!("ballast_delivery_to_ack_seconds", labels()),
        }
    }
}

/// Records how long a publish call waited for its publish slot (the fair
/// share of the node's publish work between queues, `fair.rs`); a call
/// that found a slot free records nothing.
pub fn record_publish_turn_wait(waited: std::time::Duration) {
    histogram!("ballast_publish_turn_wait_seconds").record(waited.as_secs_f64());
}

/// Counts a request that failed with `code` (the errors signal).
pub fn count_error(code: tonic::Code) {
    counter!("ballast_errors_total", "code" => code_name(code)).increment(1);
}

/// The status code's name, as the `code` label and the console API say it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Installs the global Prometheus recorder. `None` if another recorder is
/// installed already (then metrics are not exported).
pub fn install() -> Option<PrometheusHandle> {
    let builder = match PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS) {
        Ok(builder) => builder,
        Err(e) => {
            tracing::error!("metrics buckets: {e}");
            return None;
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            describe();
            Some(handle)
        }
        Err(e) => {
            tracing::warn!("metrics recorder already installed; /metrics disabled: {e}");
            None
        }
    }
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("ballast_published_messages_total", Unit::Count, "Messages stored by publishes.");
    describe_counter!("ballast_delivered_messages_total", Unit::Count, "Deliveries sent to consumers.");
    describe_counter!("ballast_acked_messages_total", Unit::Count, "Deliveries acked.");
    describe_counter!("ballast_nacked_messages_total", Unit::Count, "Deliveries nacked.");
    describe_counter!(
        "ballast_redelivered_messages_total",
        Unit::Count,
        "Messages stored again for redelivery, by reason."
    );
    describe_counter!("ballast_released_messages_total", Unit::Count, "Leases released by a consumer that left.");
    describe_counter!("ballast_lease_extensions_total", Unit::Count, "Leases given a new deadline by an extend.");
    describe_counter!(
        "ballast_redriven_messages_total",
        Unit::Count,
        "Dead letters stored back into the lane by a redrive."
    );
    describe_counter!("ballast_dead_lettered_messages_total", Unit::Count, "Messages moved to the dead-letter queue.");
    describe_counter!(
        "ballast_expired_messages_total",
        Unit::Count,
        "Messages past their time to live, never delivered: dead-lettered with reason expired, or dropped."
    );
    describe_counter!(
        "ballast_stripped_copies_total",
        Unit::Count,
        "Redelivered or dead-lettered copies stored without the broker's headers (storage refused the full copy)."
    );
    describe_counter!(
        "ballast_dropped_dead_letters_total",
        Unit::Count,
        "Dead letters dropped: the dead-letter queue refused them even without the broker's headers."
    );
    describe_counter!("ballast_refused_publishes_total", Unit::Count, "Publish calls refused by admission, by reason.");
    describe_counter!("ballast_errors_total", Unit::Count, "Failed gRPC calls, by status code.");
    describe_gauge!("ballast_connections", Unit::Count, "gRPC connections held.");
    describe_counter!("ballast_connections_refused_total", Unit::Count, "Connections closed past connections_max.");
    describe_counter!(
        "ballast_auth_failures_total",
        Unit::Count,
        "Calls refused for their credentials (reason: missing, malformed, unknown_token, certificate_not_mapped, held_off)."
    );
    describe_histogram!("ballast_publish_durable_seconds", Unit::Seconds, "Admission to durable answer of a publish.");
    describe_histogram!("ballast_publish_to_delivery_seconds", Unit::Seconds, "Enqueue to delivery.");
    describe_histogram!("ballast_delivery_to_ack_seconds", Unit::Seconds, "Delivery to ack.");
    describe_histogram!(
        "ballast_publish_throttle_seconds",
        Unit::Seconds,
        "Waits of publish calls for their turn under the queue's publish quota."
    );
    describe_histogram!(
        "ballast_publish_turn_wait_seconds",
        Unit::Seconds,
        "Waits of publish calls for a publish slot while every slot was busy (the fair share between queues)."
    );
    describe_gauge!("ballast_publish_slots_waiting", Unit::Count, "Publish calls waiting for a publish slot.");
    describe_gauge!("ballast_disk_free_bytes", Unit::Bytes, "Free space on the data directory's filesystem.");
    describe_gauge!("ballast_disk_free_min_bytes", Unit::Bytes, "Publishes are refused below this free space.");
    describe_gauge!("ballast_open_files", Unit::Count, "File descriptors the process holds.");
    describe_gauge!("ballast_queues", Unit::Count, "Queues, dead-letter queues included.");
    describe_gauge!(
        "ballast_queues_damaged",
        Unit::Count,
        "Queues set aside at start because their files could not be opened (refused until deleted)."
    );
    describe_gauge!(
        "ballast_cluster_leader",
        Unit::Count,
        "1 while this node leads the cluster log (serves the replicated queues), else 0."
    );
    describe_gauge!("ballast_cluster_term", Unit::Count, "The cluster log's current Raft term on this node.");
    describe_gauge!(
        "ballast_cluster_last_log_index",
        Unit::Count,
        "Index of the last entry of this node's cluster log."
    );
    describe_gauge!(
        "ballast_cluster_last_applied",
        Unit::Count,
        "Index of the last cluster log entry committed and applied on this node."
    );
    describe_gauge!(
        "ballast_cluster_peer_lag",
        Unit::Count,
        "On the leader: entries of the cluster log a voter has not matched yet (label peer)."
    );
}

/// Sets the process gauges from the broker now.
fn refresh(broker: &Broker) {
    gauge!("ballast_queues").set(broker.queue_count() as f64);
    gauge!("ballast_queues_damaged").set(broker.damaged_queues().len() as f64);
    gauge!("ballast_disk_free_bytes").set(broker.node().disk_free() as f64);
    gauge!("ballast_disk_free_min_bytes").set(broker.node().disk_free_min() as f64);
    gauge!("ballast_publish_slots_waiting").set(broker.node().fair().waiting() as f64);
    if let Some(cluster) = broker.node().cluster() {
        let status = cluster.status();
        gauge!("ballast_cluster_leader").set(if status.role == "leader" { 1.0 } else { 0.0 });
        gauge!("ballast_cluster_term").set(status.term as f64);
        gauge!("ballast_cluster_last_log_index").set(status.last_log_index as f64);
        gauge!("ballast_cluster_last_applied").set(status.last_applied as f64);
        for (peer, matched) in status.peers {
            let lag = status.last_log_index.saturating_sub(matched);
            gauge!("ballast_cluster_peer_lag", "peer" => peer.to_string()).set(lag as f64);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        gauge!("ballast_open_files").set(fds.count() as f64);
    }
}

/// A per-lane gauge family written at scrape time: name, help, value.
type LaneGauge = (&'static str, &'static str, fn(&LaneRow) -> f64);

/// The per-lane gauges, in the order they are written.
const LANE_GAUGES: &[LaneGauge] = &[
    ("ballast_queue_depth_messages", "Messages not yet acked (in-flight included).", |r| r.depth as f64),
    ("ballast_queue_bytes", "Stored bytes of the lane's records not yet acked.", |r| r.bytes as f64),
    ("ballast_queue_in_flight_messages", "Deliveries leased to consumers.", |r| r.in_flight as f64),
    ("ballast_queue_saturation_ratio", "max(depth/max_messages, bytes/max_bytes).", |r| r.saturation),
    ("ballast_queue_oldest_age_seconds", "Age of the oldest unacked message.", |r| r.oldest_age_ms as f64 / 1000.0),
    ("ballast_queue_segments", "Segment files of the lane's log.", |r| r.segments as f64),
    (
        "ballast_queue_storage_failed",
        "1 while the lane's log cannot write (a failed write or sync; being reopened), else 0.",
        |r| if r.writable { 0.0 } else { 1.0 },
    ),
];

/// A per-queue gauge family written at scrape time: name, help, value.
type QueueGauge = (&'static str, &'static str, fn(&QueueRow) -> f64);

/// The per-queue gauges, in the order they are written.
const QUEUE_GAUGES: &[QueueGauge] = &[
    ("ballast_queue_drain_estimate_seconds", "Depth over the smoothed ack rate; NaN when unknown.", |r| {
        r.drain_estimate_ms.map_or(f64::NAN, |ms| ms as f64 / 1000.0)
    }),
    ("ballast_queue_consumers", "Consumers subscribed.", |r| f64::from(r.consumers)),
    ("ballast_queue_credit", "Credit held by the queue's consumers.", |r| r.credit as f64),
    ("ballast_queue_paced", "1 while max_delivery_rate holds delivery back, else 0.", |r| {
        if r.pacing.paced { 1.0 } else { 0.0 }
    }),
    (
        "ballast_queue_paced_held_back_messages",
        "While paced: deliveries the consumers could take now that max_delivery_rate holds back.",
        |r| r.pacing.held_back as f64,
    ),
];

/// The per-queue counters written at scrape time from the queues' state
/// (cumulative since the broker started).
const QUEUE_COUNTERS: &[QueueGauge] =
    &[("ballast_queue_paced_seconds_total", "Time delivery was held back by max_delivery_rate.", |r| {
        r.pacing.paced_ms as f64 / 1000.0
    })];

/// One lane's gauges, taken once per scrape.
struct LaneRow {
    depth: u64,
    bytes: u64,
    in_flight: u64,
    saturation: f64,
    oldest_age_ms: u64,
    segments: u64,
    writable: bool,
}

/// One queue's gauges and its lanes', with its labels escaped.
struct QueueRow {
    queue: String,
    lanes: Vec<(String, LaneRow)>,
    drain_estimate_ms: Option<u64>,
    consumers: u32,
    credit: u64,
    pacing: crate::queue::PacingFigures,
}

impl QueueRow {
    fn take(queue: &Queue) -> QueueRow {
        use metrics_exporter_prometheus::formatting::sanitize_label_value;
        let (total, lanes) = queue.figures();
        let delivery = queue.delivery_figures();
        let lanes = lanes
            .iter()
            .enumerate()
            .map(|(i, figures)| {
                let row = LaneRow {
                    depth: figures.depth,
                    bytes: figures.bytes,
                    in_flight: delivery.lane_in_flight.get(i).copied().unwrap_or(0),
                    saturation: figures.saturation,
                    oldest_age_ms: figures.oldest_age_ms,
                    segments: queue.lanes[i].stats().segment_count,
                    writable: queue.lane_writable(i),
                };
                (sanitize_label_value(&queue.settings().lanes[i]), row)
            })
            .collect();
        QueueRow {
            queue: sanitize_label_value(queue.name.as_str()),
            lanes,
            drain_estimate_ms: total.drain_estimate_ms,
            consumers: delivery.consumers,
            credit: delivery.credit,
            pacing: delivery.pacing,
        }
    }
}

/// Writes the per-queue and per-lane gauges of `queues` in the Prometheus
/// text format, one family after another (each with its `# HELP` and
/// `# TYPE` lines), from the queues' state now. Queues still opening have
/// no figures yet and are left out until they are open.
pub fn write_queue_gauges(out: &mut String, queues: &[Arc<Queue>]) {
    use metrics_exporter_prometheus::formatting::{write_help_line, write_type_line};
    let rows: Vec<QueueRow> = queues.iter().map(|queue| QueueRow::take(queue)).collect();
    for &(name, help, value) in LANE_GAUGES {
        write_help_line(out, name, None, None, help);
        write_type_line(out, name, None, None, "gauge");
        for row in &rows {
            for (lane, figures) in &row.lanes {
                let _ = writeln!(out, "{name}{{queue=\"{}\",lane=\"{lane}\"}} {}", row.queue, value(figures));
            }
        }
        out.push('\n');
    }
    let families = QUEUE_GAUGES.iter().map(|g| (g, "gauge")).chain(QUEUE_COUNTERS.iter().map(|c| (c, "counter")));
    for (&(name, help, value), kind) in families {
        write_help_line(out, name, None, None, help);
        write_type_line(out, name, None, None, kind);
        for row in &rows {
            let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", row.queue, value(row));
        }
        out.push('\n');
    }
}

/// Serves `GET /metrics` and the web console ([`crate::console`]) on
/// `listener` (a `TcpListener`, or a
/// [`crate::grpc::tls::MetricsTlsListener`] with `[metrics] tls`) until
/// `shutdown`.
pub async fn serve<L>(
    listener: L,
    broker: std::sync::Weak<Broker>,
    handle: PrometheusHandle,
    console: crate::console::Console,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
    for<'a> crate::console::RemoteAddr: axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let render = move || {
        let queues = broker.upgrade().map(|broker| {
            refresh(&broker);
            broker.queues()
        });
        handle.run_upkeep();
        let mut text = handle.render();
        if let Some(queues) = queues {
            write_queue_gauges(&mut text, &queues);
        }
        text
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move {
                    // With thousands of queues a scrape renders hundreds of
                    // thousands of series: seconds of CPU that must not hold
                    // a runtime worker other queues' calls need.
                    let text = tokio::task::spawn_blocking(render).await.unwrap_or_default();
                    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
                }
            }),
        )
        .merge(console.router());
    let app = app.into_make_service_with_connect_info::<crate::console::RemoteAddr>();
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
