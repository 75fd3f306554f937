//! KEDA's external scaler (`externalscaler.ExternalScaler`) served by the
//! real `ballastd`: its figures are GetStats's (depth, drain estimate),
//! IsActive and StreamIsActive follow the backlog, bad metadata is
//! INVALID_ARGUMENT, and with an auth file it needs `stats` on the queue.

use std::{collections::HashMap, time::Duration};

use ballast_proto::{
    externalscaler::{GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient},
    v1 as pb,
};
use tonic::{Code, transport::Channel};

use crate::support::{
    BrokerProcess, create, create_as, message, publish, pull_ids, queue_settings, start_with_principals, stats,
};

fn object(pairs: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "consumers".into(),
        namespace: "default".into(),
        scaler_metadata: pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<HashMap<_, _>>(),
    }
}

async fn scaler(broker: &BrokerProcess) -> ExternalScalerClient<Channel> {
    ExternalScalerClient::new(broker.channel().await)
}

/// The metric value GetMetrics reports for `pairs`.
async fn metric(client: &mut ExternalScalerClient<Channel>, pairs: &[(&str, &str)]) -> f64 {
    let request = GetMetricsRequest { scaled_object_ref: Some(object(pairs)), metric_name: "s0-ballast".into() };
    let response = client.get_metrics(request).await.unwrap().into_inner();
    assert_eq!(response.metric_values.len(), 1);
    assert_eq!(response.metric_values[0].metric_name, "s0-ballast", "the requested name is echoed");
    response.metric_values[0].metric_value_float
}

/// IsActive is true with a backlog and false without; GetMetricSpec
/// echoes the target; GetMetrics reports GetStats's depth, and its drain
/// estimate in seconds once consumers ack (compared with GetStats taken
/// just before and after, when nothing moved between them).
#[tokio::test]
async fn the_scaler_reports_the_figures_of_get_stats() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "jobs", queue_settings()).await;
    create(&mut admin, "idle", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    for i in 0..6 {
        publish(&mut publisher, "jobs", message(format!("m{i}"))).await;
    }
    let mut client = scaler(&broker).await;
    let active = |queue: &str| object(&[("queue", queue)]);
    assert!(client.is_active(active("jobs")).await.unwrap().into_inner().result);
    assert!(!client.is_active(active("idle")).await.unwrap().into_inner().result);
    let at = object(&[("queue", "jobs"), ("activationDepth", "6")]);
    assert!(!client.is_active(at).await.unwrap().into_inner().result, "depth 6 is not above activationDepth 6");

    let spec = object(&[("queue", "jobs"), ("metric", "drainSeconds"), ("targetValue", "90")]);
    let spec = client.get_metric_spec(spec).await.unwrap().into_inner().metric_specs;
    assert_eq!(spec.len(), 1);
    assert_eq!(
        (spec[0].metric_name.as_str(), spec[0].target_size_float, spec[0].target_size),
        ("ballast-jobs-drainseconds", 90.0, 90)
    );

    let depth = metric(&mut client, &[("queue", "jobs")]).await;
    assert_eq!(depth, stats(&broker, "jobs").await.saturation.unwrap().depth as f64);
    assert_eq!(depth, 6.0);

    // Consumers ack two: the next tick gives a drain estimate.
    let mut consumer = broker.consumer().await;
    let ids = pull_ids(&mut consumer, "jobs", 2).await;
    consumer.ack(pb::AckRequest { queue: "jobs".into(), delivery_ids: ids }).await.unwrap();
    let drain = [("queue", "jobs"), ("metric", "drainSeconds")];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = stats(&broker, "jobs").await.saturation.unwrap();
        let value = metric(&mut client, &drain).await;
        let after = stats(&broker, "jobs").await.saturation.unwrap();
        if let (Some(ms), true) = (before.drain_estimate_ms, before.drain_estimate_ms == after.drain_estimate_ms) {
            assert_eq!(value, ms as f64 / 1000.0, "drainSeconds is GetStats's drain estimate");
            assert_eq!(metric(&mut client, &[("queue", "jobs")]).await, after.depth as f64);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no steady drain estimate within 10 s: {before:?} {after:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// StreamIsActive answers at once, then only on a change: false for an
/// empty queue, true after a publish, false again once it is acked.
#[tokio::test]
async fn stream_is_active_follows_the_backlog() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "jobs", queue_settings()).await;
    let mut client = scaler(&broker).await;
    let mut stream = client.stream_is_active(object(&[("queue", "jobs")])).await.unwrap().into_inner();
    let next = async |stream: &mut tonic::Streaming<_>| {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message()).await;
        let message: Option<ballast_proto::externalscaler::IsActiveResponse> =
            message.expect("an answer within 10 s").unwrap();
        message.expect("the stream is open").result
    };
    assert!(!next(&mut stream).await, "empty: not active");
    let mut publisher = broker.publisher().await;
    publish(&mut publisher, "jobs", message("m")).await;
    assert!(next(&mut stream).await, "a backlog: active");
    let mut consumer = broker.consumer().await;
    let ids = pull_ids(&mut consumer, "jobs", 1).await;
    consumer.ack(pb::AckRequest { queue: "jobs".into(), delivery_ids: ids }).await.unwrap();
    assert!(!next(&mut stream).await, "drained: not active");
}

/// Bad metadata is INVALID_ARGUMENT naming the key, an unknown queue
/// NOT_FOUND, and StreamMetricSpec (optional in KEDA) UNIMPLEMENTED.
#[tokio::test]
async fn bad_metadata_and_unknown_queues() {
    let broker = BrokerProcess::start();
    let mut client = scaler(&broker).await;
    for (pairs, needle) in [
        (&[][..], "needs `queue`"),
        (&[("queue", "jobs"), ("metric", "lag")][..], "`depth` or `drainSeconds`"),
        (&[("queue", "jobs"), ("targetValue", "0")][..], "positive number"),
    ] {
        let status = client.get_metric_spec(object(pairs)).await.expect_err(needle);
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
    let missing = GetMetricsRequest { scaled_object_ref: None, metric_name: String::new() };
    assert_eq!(client.get_metrics(missing).await.unwrap_err().code(), Code::InvalidArgument);
    let unknown = client.is_active(object(&[("queue", "nope")])).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let spec = client.stream_metric_spec(object(&[("queue", "nope")])).await.unwrap_err();
    assert_eq!(spec.code(), Code::Unimplemented);
}

/// With an auth file the scaler needs a principal with `stats` on the
/// queue: none is UNAUTHENTICATED, another queue or another action
/// PERMISSION_DENIED whether the queue exists or not.
#[tokio::test]
async fn with_an_auth_file_the_scaler_needs_stats_on_the_queue() {
    const KEDA: &str = "keda-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";
    let (broker, _auth_dir) = start_with_principals(&[
        ("keda", KEDA, r#"{ queues = "jobs*", actions = ["stats"] }"#),
        ("admin", ADMIN, r#"{ queues = "*", actions = ["admin", "publish"] }"#),
    ]);
    create_as(&broker, ADMIN, &["jobs", "payments"]).await;
    let channel = broker.channel().await;
    let with = |token: Option<&'static str>| {
        move |mut request: tonic::Request<()>| {
            if let Some(token) = token {
                request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
            }
            Ok(request)
        }
    };
    let mut keda = ExternalScalerClient::with_interceptor(channel.clone(), with(Some(KEDA)));
    assert!(!keda.is_active(object(&[("queue", "jobs")])).await.unwrap().into_inner().result);
    for queue in ["payments", "nope"] {
        let denied = keda.is_active(object(&[("queue", queue)])).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied, "{queue}: {denied:?}");
    }
    let mut other = ExternalScalerClient::with_interceptor(channel.clone(), with(Some(ADMIN)));
    assert_eq!(other.is_active(object(&[("queue", "jobs")])).await.unwrap_err().code(), Code::PermissionDenied);
    let mut nobody = ExternalScalerClient::with_interceptor(channel, with(None));
    assert_eq!(nobody.is_active(object(&[("queue", "jobs")])).await.unwrap_err().code(), Code::Unauthenticated);
}
