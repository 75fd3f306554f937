//! The operator's files in `deploy/` against a live broker: every metric
//! the Grafana dashboard queries and the Prometheus rules use is one that
//! `ballastd` exports, checked by scraping a real broker after traffic of
//! every kind the files chart (publishes, deliveries, acks, nacks, dead
//! letters, refusals, errors). The rules' behaviour is unit-tested by
//! `promtool test rules` (scripts/test-prometheus).

use std::collections::BTreeSet;

use ballast_proto::v1 as pb;

use crate::support::{BrokerProcess, create, message, on_lane, publish, pull_ids, queue_settings};

/// The repository's root (the workspace), where `deploy/` lives.
fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The metric families `text` names: every `ballast_...` identifier, a
/// histogram's `_bucket`, `_sum` and `_count` series counted as the
/// histogram itself.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("ballast_") {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

/// The families a scrape declares (`# TYPE <name> <kind>`).
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Every panel query of deploy/grafana/ballast.json, parsed as JSON.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/ballast.json")).expect("deploy/grafana/ballast.json is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a query").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("variables") {
        if let Some(query) = variable["definition"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

/// Every metric the dashboard and the alert rules use is exported by a
/// live broker once it has seen traffic of each kind; and the dashboard
/// has panels for the signals the issue names (saturation, drain
/// estimate, refusals by reason, publish-to-delivery latency, disk free
/// against the watermark).
#[tokio::test]
async fn the_dashboard_and_the_rules_use_only_exported_metrics() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "the dashboard queries {} series", queries.len());
    let dashboard = metric_names(&queries.join("\n"));
    for signal in [
        "ballast_queue_saturation_ratio",
        "ballast_queue_drain_estimate_seconds",
        "ballast_refused_publishes_total",
        "ballast_publish_to_delivery_seconds",
        "ballast_disk_free_bytes",
        "ballast_disk_free_min_bytes",
    ] {
        assert!(dashboard.contains(signal), "the dashboard charts {signal}");
    }
    let rules = metric_names(&repo_file("deploy/prometheus/ballast-rules.yml"));
    assert!(rules.len() >= 8, "the rules use {rules:?}");

    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "ops", pb::QueueSettings { max_messages: Some(10), max_attempts: Some(1), ..queue_settings() })
        .await;
    let mut publisher = broker.publisher().await;
    for i in 0..3 {
        publish(&mut publisher, "ops", message(format!("m{i}"))).await;
    }
    // The low lane takes the queue to 70% of 10, then is refused.
    for _ in 0..7 {
        let _ = publisher.publish(pb::PublishRequest { queue: "ops".into(), message: Some(on_lane("x", 2)) }).await;
    }
    let mut consumer = broker.consumer().await;
    let pulled = pull_ids(&mut consumer, "ops", 2).await;
    assert_eq!(pulled.len(), 2);
    consumer.ack(pb::AckRequest { queue: "ops".into(), delivery_ids: vec![pulled[0]] }).await.unwrap();
    let nack = pb::NackRequest { queue: "ops".into(), delivery_id: pulled[1], ..Default::default() };
    consumer.nack(nack).await.unwrap();
    let unknown = admin.get_queue(pb::GetQueueRequest { name: "no-such-queue".into() }).await;
    assert_eq!(unknown.expect_err("an unknown queue").code(), tonic::Code::NotFound);

    let scrape = broker.scrape();
    let live = exported(&scrape);
    let missing: Vec<_> = dashboard.union(&rules).filter(|name| !live.contains(*name)).collect();
    assert!(missing.is_empty(), "used by deploy/ but not exported by ballastd: {missing:?}\nexported: {live:?}");
    let unknown_to_docs: Vec<_> =
        dashboard.union(&rules).filter(|name| !repo_file("docs/metrics.md").contains(name.as_str())).collect();
    assert!(unknown_to_docs.is_empty(), "not in docs/metrics.md: {unknown_to_docs:?}");
}

/// The name scanner finds families and folds histogram series.
#[test]
fn metric_names_fold_histogram_series() {
    let names = metric_names("rate(ballast_a_total[1m]) / ballast_b_seconds_bucket{le=\"1\"} + x_ballast");
    assert_eq!(names, BTreeSet::from(["ballast_a_total".to_owned(), "ballast_b_seconds".to_owned()]));
}
