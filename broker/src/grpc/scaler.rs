//! KEDA's external scaler (`externalscaler.ExternalScaler`, the protocol
//! in `proto/externalscaler/`) on the gRPC listener: a ScaledObject scales
//! a consumer Deployment on a queue's depth or its drain estimate
//! (docs/operating.md, "Autoscaling").
//!
//! The trigger's metadata (`ScaledObjectRef.scalerMetadata`):
//! - `queue` (required): the queue.
//! - `metric`: `depth` (default; with the HPA's default `AverageValue`
//!   target, replicas = depth / `targetValue`) or `drainSeconds` (the
//!   drain estimate in seconds; meant for `metricType: Value`, where
//!   replicas = current × estimate / `targetValue`: consumers are added
//!   until the backlog drains within the target). With a backlog but no
//!   estimate (nothing acked recently) `drainSeconds` reports the target
//!   itself, so the HPA holds the replica count: more consumers of a queue
//!   nobody acks would not help, and the `NoConsumers` and oldest-message
//!   alerts cover it.
//! - `targetValue`: a positive number; defaults
//!   [`SCALER_TARGET_DEPTH_DEFAULT`] and
//!   [`SCALER_TARGET_DRAIN_SECONDS_DEFAULT`].
//! - `activationDepth`: IsActive is true while depth is above it
//!   (default 0: any backlog wakes a Deployment scaled to zero).
//!
//! Other keys (KEDA adds `scalerAddress`, ...) are ignored. Figures come
//! from the Stats code (`Service::stats`), so they are GetStats's; the
//! call needs `stats` on the queue, like GetStats.

use std::{collections::HashMap, sync::Arc, time::Duration};

use ballast_proto::externalscaler::{
    self as ks, GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::service::{Access, Service};
use crate::{
    auth::Action,
    error::BrokerError,
    limits::{
        SCALER_STREAM_CHECK_MS, SCALER_STREAMS_MAX, SCALER_TARGET_DEPTH_DEFAULT, SCALER_TARGET_DRAIN_SECONDS_DEFAULT,
    },
};

/// The external scaler over the broker's Stats.
#[derive(Debug, Clone)]
pub struct Scaler {
    service: Service,
    /// A permit per open StreamIsActive stream ([`SCALER_STREAMS_MAX`]).
    streams: Arc<tokio::sync::Semaphore>,
}

/// What a ScaledObject's trigger asks for, parsed from its metadata.
#[derive(Debug, Clone, PartialEq)]
struct Trigger {
    queue: String,
    metric: Metric,
    target: f64,
    activation_depth: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    Depth,
    DrainSeconds,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Depth => "depth",
            Metric::DrainSeconds => "drainSeconds",
        }
    }
}

/// A queue's figures the scaler reads.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Reading {
    depth: u64,
    drain_estimate_ms: Option<u64>,
}

impl Trigger {
    /// Parses the metadata; INVALID_ARGUMENT naming the key and what it
    /// takes.
    fn parse(metadata: &HashMap<String, String>) -> Result<Trigger, Status> {
        let queue = metadata.get("queue").map(|q| q.trim()).unwrap_or_default();
        if queue.is_empty() {
            return Err(Status::invalid_argument("the scaler's metadata needs `queue`: the queue to scale on"));
        }
        let metric = match metadata.get("metric").map(|m| m.trim()) {
            None | Some("") | Some("depth") => Metric::Depth,
            Some("drainSeconds") => Metric::DrainSeconds,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "metric must be `depth` or `drainSeconds`; got {other:?}"
                )));
            }
        };
        let target = match metadata.get("targetValue").map(|t| t.trim()) {
            None | Some("") => match metric {
                Metric::Depth => SCALER_TARGET_DEPTH_DEFAULT,
                Metric::DrainSeconds => SCALER_TARGET_DRAIN_SECONDS_DEFAULT,
            },
            Some(text) => match text.parse::<f64>() {
                Ok(value) if value.is_finite() && value > 0.0 => value,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "targetValue must be a positive number; got {text:?}"
                    )));
                }
            },
        };
        let activation_depth = match metadata.get("activationDepth").map(|a| a.trim()) {
            None | Some("") => 0,
            Some(text) => text.parse::<u64>().map_err(|_| {
                Status::invalid_argument(format!("activationDepth must be a whole number of messages; got {text:?}"))
            })?,
        };
        Ok(Trigger { queue: queue.to_owned(), metric, target, activation_depth })
    }

    /// The metric's name as the HPA sees it.
    fn metric_name(&self) -> String {
        format!("ballast-{}-{}", self.queue, self.metric.name().to_ascii_lowercase())
    }

    fn is_active(&self, reading: Reading) -> bool {
        reading.depth > self.activation_depth
    }

    /// The metric's value for `reading`.
    fn value(&self, reading: Reading) -> f64 {
        match self.metric {
            Metric::Depth => reading.depth as f64,
            Metric::DrainSeconds => match (reading.depth, reading.drain_estimate_ms) {
                (0, _) => 0.0,
                (_, Some(ms)) => ms as f64 / 1000.0,
                (_, None) => self.target,
            },
        }
    }
}

impl Scaler {
    pub fn new(service: Service) -> Scaler {
        Scaler { service, streams: Arc::new(tokio::sync::Semaphore::new(SCALER_STREAMS_MAX)) }
    }

    /// The trigger of a call and what its caller may do (`stats` on the
    /// queue checked before the queue is looked up).
    fn trigger<T>(&self, request: &Request<T>, object: Option<&ScaledObjectRef>) -> Result<(Access, Trigger), Status> {
        let access = self.service.access(request)?;
        let object = object.ok_or_else(|| Status::invalid_argument("scaledObjectRef is required"))?;
        let trigger = Trigger::parse(&object.scaler_metadata)?;
        access.check(Action::Stats, &trigger.queue)?;
        Ok((access, trigger))
    }

    /// The queue's figures now, from the Stats code.
    async fn read(&self, access: &Access, trigger: &Trigger) -> Result<Reading, Status> {
        let stats = self.service.stats(access, &trigger.queue).await?;
        let saturation = stats.queues.first().and_then(|q| q.saturation).unwrap_or_default();
        Ok(Reading { depth: saturation.depth, drain_estimate_ms: saturation.drain_estimate_ms })
    }
}

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(&self, request: Request<ScaledObjectRef>) -> Result<Response<IsActiveResponse>, Status> {
        let (access, trigger) = self.trigger(&request, Some(request.get_ref()))?;
        let reading = self.read(&access, &trigger).await?;
        Ok(Response::new(IsActiveResponse { result: trigger.is_active(reading) }))
    }

    type StreamIsActiveStream = ReceiverStream<Result<IsActiveResponse, Status>>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let (access, trigger) = self.trigger(&request, Some(request.get_ref()))?;
        let permit = Arc::clone(&self.streams).try_acquire_owned().map_err(|_| {
            super::to_status(BrokerError::LimitReached {
                what: "external scaler StreamIsActive streams",
                max: SCALER_STREAMS_MAX,
                hint: "use fewer ScaledObjects with this scaler, or IsActive polling",
            })
        })?;
        let mut active = trigger.is_active(self.read(&access, &trigger).await?);
        let (tx, rx) = mpsc::channel(2);
        let scaler = self.clone();
        let stopping = self.service.broker.stopping();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(stopping);
            let revoked = access.revoked();
            tokio::pin!(revoked);
            let mut ticker = tokio::time::interval(Duration::from_millis(SCALER_STREAM_CHECK_MS));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            let mut next = Some(Ok(IsActiveResponse { result: active }));
            loop {
                if let Some(message) = next.take() {
                    let failed = message.is_err();
                    tokio::select! {
                        biased;
                        () = &mut stopping => return,
                        sent = tx.send(message) => if sent.is_err() || failed { return },
                    }
                }
                tokio::select! {
                    biased;
                    () = &mut stopping => return,
                    status = &mut revoked => {
                        let _ = tx.try_send(Err(status));
                        return;
                    }
                    () = tx.closed() => return,
                    _ = ticker.tick() => {}
                }
                match scaler.read(&access, &trigger).await {
                    Ok(reading) => {
                        let now = trigger.is_active(reading);
                        if now != active {
                            active = now;
                            next = Some(Ok(IsActiveResponse { result: now }));
                        }
                    }
                    Err(status) => next = Some(Err(status)),
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let (_, trigger) = self.trigger(&request, Some(request.get_ref()))?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: trigger.metric_name(),
                target_size: trigger.target.ceil() as i64,
                target_size_float: trigger.target,
            }],
        }))
    }

    async fn get_metrics(&self, request: Request<GetMetricsRequest>) -> Result<Response<GetMetricsResponse>, Status> {
        let (access, trigger) = self.trigger(&request, request.get_ref().scaled_object_ref.as_ref())?;
        let value = trigger.value(self.read(&access, &trigger).await?);
        let requested = &request.get_ref().metric_name;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: if requested.is_empty() { trigger.metric_name() } else { requested.clone() },
                metric_value: value.ceil() as i64,
                metric_value_float: value,
            }],
        }))
    }

    type StreamMetricSpecStream = ReceiverStream<Result<ks::GetMetricSpecResponse, Status>>;

    /// Optional in KEDA: answered UNIMPLEMENTED, so KEDA keeps polling
    /// GetMetricSpec (whose answer never changes for a trigger).
    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        Err(Status::unimplemented("StreamMetricSpec: the metric spec of a trigger never changes; use GetMetricSpec"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Trigger, String> {
        let metadata = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Trigger::parse(&metadata).map_err(|s| s.message().to_owned())
    }

    /// Defaults, the two metrics, and every bad value refused with a
    /// message naming the key; unknown keys (KEDA's own) are ignored.
    #[test]
    fn metadata() {
        let depth = parse(&[("queue", "jobs"), ("scalerAddress", "ballast:7400")]).unwrap();
        assert_eq!(depth, Trigger { queue: "jobs".into(), metric: Metric::Depth, target: 100.0, activation_depth: 0 });
        let drain = parse(&[("queue", "jobs"), ("metric", "drainSeconds"), ("targetValue", "30.5")]).unwrap();
        assert_eq!((drain.metric, drain.target), (Metric::DrainSeconds, 30.5));
        assert_eq!(drain.metric_name(), "ballast-jobs-drainseconds");
        assert_eq!(parse(&[("queue", "jobs"), ("metric", "drainSeconds")]).unwrap().target, 60.0);
        assert_eq!(parse(&[("queue", "jobs"), ("activationDepth", "5")]).unwrap().activation_depth, 5);
        for (pairs, needle) in [
            (&[][..], "needs `queue`"),
            (&[("queue", " ")][..], "needs `queue`"),
            (&[("queue", "jobs"), ("metric", "lag")][..], "`depth` or `drainSeconds`"),
            (&[("queue", "jobs"), ("targetValue", "0")][..], "positive number"),
            (&[("queue", "jobs"), ("targetValue", "-1")][..], "positive number"),
            (&[("queue", "jobs"), ("targetValue", "NaN")][..], "positive number"),
            (&[("queue", "jobs"), ("targetValue", "ten")][..], "positive number"),
            (&[("queue", "jobs"), ("activationDepth", "-1")][..], "activationDepth"),
        ] {
            let error = parse(pairs).expect_err(needle);
            assert!(error.contains(needle), "{pairs:?}: {error}");
        }
    }

    /// Activation is depth above `activationDepth`; drainSeconds is the
    /// estimate, 0 when empty, the target itself when unknown.
    #[test]
    fn values() {
        let reading = |depth, drain| Reading { depth, drain_estimate_ms: drain };
        let depth = parse(&[("queue", "q"), ("activationDepth", "2")]).unwrap();
        assert!(!depth.is_active(reading(2, None)), "at activationDepth: not active");
        assert!(depth.is_active(reading(3, None)), "one past it: active");
        assert_eq!(depth.value(reading(42, Some(5))), 42.0);
        let drain = parse(&[("queue", "q"), ("metric", "drainSeconds"), ("targetValue", "10")]).unwrap();
        assert_eq!(drain.value(reading(5, Some(2_500))), 2.5);
        assert_eq!(drain.value(reading(0, None)), 0.0);
        assert_eq!(drain.value(reading(5, None)), 10.0, "unknown: hold steady");
    }

    /// StreamIsActive streams at the limit: the last permit opens one;
    /// past it, RESOURCE_EXHAUSTED naming the limit; a closed stream gives
    /// its permit back.
    #[tokio::test]
    async fn streams_at_the_limit_and_past() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::Config { data_dir: dir.path().to_owned(), ..crate::Config::default() };
        let broker = crate::Broker::open(config).unwrap();
        broker.create("q", &Default::default()).await.unwrap();
        let scaler = Scaler::new(Service::new(broker));
        let request = || {
            let metadata = HashMap::from([("queue".to_owned(), "q".to_owned())]);
            Request::new(ScaledObjectRef { scaler_metadata: metadata, ..Default::default() })
        };
        let held = Arc::clone(&scaler.streams).acquire_many_owned(SCALER_STREAMS_MAX as u32 - 1).await.unwrap();
        let last = scaler.stream_is_active(request()).await.expect("the last permit opens a stream");
        let past = scaler.stream_is_active(request()).await.expect_err("past the limit");
        assert_eq!(past.code(), tonic::Code::ResourceExhausted, "{past:?}");
        assert!(past.message().contains("StreamIsActive streams"), "{past:?}");
        drop(last);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while scaler.streams.available_permits() == 0 {
            assert!(std::time::Instant::now() < deadline, "the closed stream's permit never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        scaler.stream_is_active(request()).await.expect("a permit is free again");
        drop(held);
    }
}
