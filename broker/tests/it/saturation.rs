//! Admission (lowest lanes shed first), saturation figures in receipts and
//! Stats, the disk watermark, and the Prometheus endpoint.

use std::time::{Duration, Instant};

use ballast_broker::limits::{REFUSAL_HOLD_MS, RETRY_AFTER_MS_MAX, RETRY_AFTER_MS_MIN};
use ballast_proto::v1::{self as pb, stats_client::StatsClient};
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn lowest_lanes_are_shed_first_with_retry_after_and_figures() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_messages: Some(100), ..queue_settings() };
    create(&mut broker.admin().await, "full", settings).await;
    let mut publisher = broker.publisher().await;
    // Fill through the low lane: admitted up to 70% of 100.
    let mut stored = 0;
    let refusal = loop {
        match publisher.publish(pb::PublishRequest { queue: "full".into(), message: Some(on_lane("x", 2)) }).await {
            Ok(_) => stored += 1,
            Err(status) => break status,
        }
        assert!(stored <= 100, "the low lane was never refused");
    };
    assert_eq!(stored, 70, "low is admitted up to 70%");
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    assert!(refusal.message().contains("lane low"), "{}", refusal.message());
    assert!(refusal.message().contains("a batch of 1 message (48 bytes)"), "{}", refusal.message());
    assert!(refusal.message().contains("max_messages (70 of 100) by 1 messages"), "{}", refusal.message());
    assert!(!refusal.message().contains("max_bytes"), "not the byte limit: {}", refusal.message());
    let meta = refusal.metadata();
    let get = |key: &str| meta.get(key).unwrap_or_else(|| panic!("metadata {key}")).to_str().unwrap().to_owned();
    assert!(get("retry-after-ms").parse::<u64>().unwrap() >= 100);
    assert_eq!(get("ballast-lane"), "low");
    assert_eq!(get("ballast-lane-index"), "2");
    assert_eq!(meta.get_bin("ballast-lane-bin").expect("ballast-lane-bin").to_bytes().unwrap(), "low".as_bytes());
    assert_eq!(get("ballast-depth"), "70");
    assert_eq!(get("ballast-threshold").parse::<f64>().unwrap(), 0.7);
    assert!((get("ballast-saturation").parse::<f64>().unwrap() - 0.7).abs() < 1e-6);

    // Normal goes on to 90%, high to 100%.
    let fill = |lane: u32| {
        let mut publisher = publisher.clone();
        async move {
            let mut n = 0;
            loop {
                match publisher
                    .publish(pb::PublishRequest { queue: "full".into(), message: Some(on_lane("y", lane)) })
                    .await
                {
                    Ok(_) => n += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted);
                        return n;
                    }
                }
            }
        }
    };
    assert_eq!(fill(1).await, 20);
    assert_eq!(fill(0).await, 10);
    // Refused publishes stored nothing.
    let s = stats(&broker, "full").await;
    assert_eq!(s.saturation.unwrap().depth, 100);
    assert_eq!(s.refused_queue_full, 3);
    // A batch that would cross the threshold is refused whole.
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "full", 15).await;
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(session.delivery().await.delivery_id);
    }
    consumer.ack(pb::AckRequest { queue: "full".into(), delivery_ids: ids }).await.unwrap();
    // depth 85: high and normal may publish 5 more, low none.
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "full".into(), message: Some(on_lane("z", 2)) }).await,
        Code::ResourceExhausted,
        "lane low",
    );
    assert_status(
        publisher
            .publish_batch(pb::PublishBatchRequest {
                queue: "full".into(),
                messages: (0..6).map(|_| on_lane("z", 1)).collect(),
            })
            .await,
        Code::ResourceExhausted,
        "lane normal",
    );
    publish_batch(&mut publisher, "full", (0..5).map(|_| on_lane("z", 1)).collect()).await;
    assert_eq!(depth(&mut broker.admin().await, "full").await, 90);
}

/// A batch larger than its lane's share of an empty queue can never be
/// admitted: INVALID_ARGUMENT (not retryable), stores nothing; a batch
/// that fits is admitted.
#[tokio::test]
async fn a_batch_over_the_lanes_share_of_an_empty_queue_is_invalid() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_messages: Some(10), ..queue_settings() };
    create(&mut broker.admin().await, "small", settings).await;
    let mut publisher = broker.publisher().await;
    let batch = |n: usize| pb::PublishBatchRequest {
        queue: "small".into(),
        messages: (0..n).map(|i| on_lane(format!("{i}"), 2)).collect(),
    };
    let status = publisher.publish_batch(batch(8)).await.expect_err("8 > 70% of 10");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("even when the queue is empty"), "{}", status.message());
    assert!(status.message().contains("split"), "{}", status.message());
    assert_eq!(stats(&broker, "small").await.saturation.unwrap().depth, 0, "nothing stored");
    publisher.publish_batch(batch(7)).await.expect("7 fits the low lane's share");
    let status = publisher.publish_batch(batch(1)).await.expect_err("the queue is at the low lane's share");
    assert_eq!(status.code(), Code::ResourceExhausted, "a batch that fits an emptier queue is only refused");
}

/// A refused lane whose name is not ASCII is still named: by index, and by
/// its UTF-8 bytes in `ballast-lane-bin` (an ASCII `ballast-lane` value
/// cannot carry it, so that entry is left out).
#[tokio::test]
async fn refusal_names_a_non_ascii_lane_by_index_and_bytes() {
    let broker = BrokerProcess::start();
    let lanes = vec!["dringend".to_owned(), "später ✉".to_owned()];
    let settings = pb::QueueSettings {
        lanes: lanes.clone(),
        lane_admission: vec![1.0, 0.5],
        max_messages: Some(4),
        ..queue_settings()
    };
    create(&mut broker.admin().await, "utf", settings).await;
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "utf", vec![on_lane("a", 1), on_lane("b", 1)]).await;
    let refusal = publisher
        .publish(pb::PublishRequest { queue: "utf".into(), message: Some(on_lane("c", 1)) })
        .await
        .expect_err("lane 1 is full at 50% of 4");
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    assert!(refusal.message().contains("später ✉"), "{}", refusal.message());
    let meta = refusal.metadata();
    assert_eq!(meta.get("ballast-lane-index").expect("ballast-lane-index").to_str().unwrap(), "1");
    let name = meta.get_bin("ballast-lane-bin").expect("ballast-lane-bin").to_bytes().unwrap();
    assert_eq!(std::str::from_utf8(&name).unwrap(), lanes[1]);
    assert!(meta.get("ballast-lane").is_none(), "an ASCII value cannot hold the name");
    assert!(meta.get("retry-after-ms").is_some());
    assert_eq!(meta.get("ballast-depth").unwrap().to_str().unwrap(), "2");
}

#[tokio::test]
async fn receipts_carry_the_figures_that_stats_report() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_messages: Some(1000), ..queue_settings() };
    create(&mut broker.admin().await, "fig", settings).await;
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "fig", (0..9).map(|i| on_lane(vec![0u8; 100], i % 3)).collect()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let receipt = publish(&mut publisher, "fig", on_lane(vec![0u8; 100], 0)).await;
    let queue = receipt.queue.expect("queue figures");
    let lane = receipt.lane.expect("lane figures");
    assert_eq!(queue.depth, 10);
    assert_eq!(lane.depth, 4);
    assert!((queue.saturation - 0.01).abs() < 1e-9, "{}", queue.saturation);
    assert!(queue.bytes >= 10 * 100, "bytes {}", queue.bytes);
    assert!(queue.oldest_age_ms >= 50, "oldest age {}", queue.oldest_age_ms);
    assert_eq!(queue.drain_estimate_ms, None, "nothing consumes: unknown");

    let s = stats(&broker, "fig").await;
    let total = s.saturation.unwrap();
    assert_eq!(total.depth, queue.depth);
    assert_eq!(total.bytes, queue.bytes);
    assert_eq!(total.saturation, queue.saturation);
    assert!(total.oldest_age_ms >= queue.oldest_age_ms);
    assert_eq!(s.lanes.len(), 3);
    assert_eq!(s.lanes[0].saturation.as_ref().unwrap().depth, lane.depth);
    assert_eq!(s.lanes.iter().map(|l| l.admission).collect::<Vec<_>>(), vec![1.0, 0.9, 0.7]);
    assert_eq!(s.max_messages, 1000);

    // All queues, and the stream.
    let mut client = StatsClient::new(broker.channel().await);
    let all = client.get_stats(pb::StatsRequest { queue: String::new() }).await.unwrap().into_inner();
    assert_eq!(all.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>(), vec!["fig", "fig.dead"]);
    assert!(all.disk_free_bytes > 0);
    let mut watch =
        client.watch(pb::WatchRequest { queue: "fig".into(), interval_ms: 100 }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    let second = watch.message().await.unwrap().unwrap();
    assert!(second.at_ms >= first.at_ms + 90, "{} then {}", first.at_ms, second.at_ms);
    assert_status(
        client.watch(pb::WatchRequest { queue: "fig".into(), interval_ms: 1 }).await.map(|_| ()),
        Code::InvalidArgument,
        "interval_ms",
    );
    assert_status(client.get_stats(pb::StatsRequest { queue: "nope".into() }).await, Code::NotFound, "nope");
}

/// The smoothed ack rate follows a steady consumer, and the drain estimate
/// is the depth at that rate. Judged against the rate the consumer really
/// achieved (counted here over the last 3 s), not the 100/s it aims for:
/// a loaded machine may not keep up, and the figures must follow what
/// happened.
#[tokio::test]
async fn drain_estimate_converges_on_a_steady_consumer() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "drain", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    for _ in 0..3 {
        publish_batch(&mut publisher, "drain", (0..1000).map(|_| message("m")).collect()).await;
    }
    // A consumer acking up to 100 messages per second, steadily.
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "drain", 20).await;
    let target = 100.0;
    let start = Instant::now();
    let mut acked = 0u64;
    // `(when, acked by then)`, once per 10 acks.
    let mut progress = vec![(start, 0u64)];
    while start.elapsed() < Duration::from_secs(7) {
        let d = session.delivery().await;
        session.ack(vec![d.delivery_id]).await;
        session.credit(1).await;
        acked += 1;
        if acked % 10 == 0 {
            progress.push((Instant::now(), acked));
        }
        let due = start + Duration::from_secs_f64(acked as f64 / target);
        tokio::time::sleep_until(due.into()).await;
    }
    // The acks are applied when the stream's requests are read: ask for the
    // figures once the last one counts (the depth says so).
    let expected_depth = 3000 - acked;
    let deadline = Instant::now() + Duration::from_secs(30);
    let figures = loop {
        let s = stats(&broker, "drain").await.saturation.unwrap();
        if s.depth <= expected_depth {
            break s;
        }
        assert!(Instant::now() < deadline, "the acks never counted: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let end = Instant::now();
    let window = Duration::from_secs(3);
    let &(from, acked_then) = progress.iter().rev().find(|(at, _)| end.duration_since(*at) >= window).unwrap();
    let achieved = (acked - acked_then) as f64 / end.duration_since(from).as_secs_f64();
    assert!(achieved > 10.0, "the consumer acked steadily: {achieved:.1}/s");
    let ack_rate = figures.ack_rate;
    assert!(
        (ack_rate - achieved).abs() / achieved < 0.3,
        "smoothed ack rate {ack_rate:.1} vs achieved {achieved:.1}/s"
    );
    let estimate = figures.drain_estimate_ms.expect("an estimate once acks flow") as f64;
    let truth = figures.depth as f64 / achieved * 1000.0;
    assert!((estimate - truth).abs() / truth < 0.3, "estimate {estimate} ms vs {truth:.0} ms at {achieved:.1}/s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_watermark_refuses_publishes_and_serves_consumers() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "disk", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "disk", (0..3).map(|i| message(format!("{i}"))).collect()).await;
    broker.terminate_cleanly();
    // A floor above any disk this test runs on: 1 EiB.
    broker.restart_with(&["--disk-free-min-bytes", "1152921504606846976"]);
    let mut publisher = broker.publisher().await;
    let status = publisher
        .publish(pb::PublishRequest { queue: "disk".into(), message: Some(message("refused")) })
        .await
        .expect_err("below the disk floor");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("disk_free_min_bytes"), "{}", status.message());
    assert!(status.metadata().get("ballast-disk-free-bytes").is_some());
    assert!(status.metadata().get("retry-after-ms").is_some());
    // Consumers, acks and admin go on.
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "disk", 3).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(session.delivery().await.delivery_id);
    }
    consumer.ack(pb::AckRequest { queue: "disk".into(), delivery_ids: ids }).await.unwrap();
    assert_eq!(depth(&mut broker.admin().await, "disk").await, 0);
    assert_eq!(stats(&broker, "disk").await.refused_disk_full, 1);
    // Space "returns": the normal floor accepts again.
    broker.terminate_cleanly();
    broker.restart_with(&[]);
    publish(&mut broker.publisher().await, "disk", message("accepted")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_tracks_the_backlog() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "m", queue_settings()).await;
    let depth_of = |text: &str| sample(text, "ballast_queue_depth_messages", "queue=\"m\",lane=\"normal\"");
    assert_eq!(depth_of(&broker.scrape()), Some(0.0));
    publish_batch(&mut broker.publisher().await, "m", (0..10).map(|i| message(format!("{i}"))).collect()).await;
    let text = broker.scrape();
    assert_eq!(depth_of(&text), Some(10.0));
    assert_eq!(sample(&text, "ballast_published_messages_total", "queue=\"m\",lane=\"normal\""), Some(10.0));
    assert!(text.contains("# TYPE ballast_publish_durable_seconds histogram"), "histograms are exported");
    assert!(sample(&text, "ballast_disk_free_bytes", "").is_none(), "unlabelled gauges have no braces");
    assert!(text.lines().any(|l| l.starts_with("ballast_disk_free_bytes ")));

    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "m", 4).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(session.delivery().await.delivery_id);
    }
    let text = broker.scrape();
    assert_eq!(depth_of(&text), Some(10.0), "in-flight messages are still backlog");
    assert_eq!(sample(&text, "ballast_queue_in_flight_messages", "queue=\"m\",lane=\"normal\""), Some(4.0));
    assert_eq!(sample(&text, "ballast_delivered_messages_total", "queue=\"m\",lane=\"normal\""), Some(4.0));
    consumer.ack(pb::AckRequest { queue: "m".into(), delivery_ids: ids }).await.unwrap();
    let text = broker.scrape();
    assert_eq!(depth_of(&text), Some(6.0));
    assert_eq!(sample(&text, "ballast_acked_messages_total", "queue=\"m\",lane=\"normal\""), Some(4.0));
    assert_eq!(sample(&text, "ballast_queue_consumers", "queue=\"m\""), Some(1.0));
    // Errors by code.
    let _ = broker.admin().await.get_queue(pb::GetQueueRequest { name: "nope".into() }).await;
    assert_eq!(sample(&broker.scrape(), "ballast_errors_total", "code=\"not_found\""), Some(1.0));

    // A queue that exists when the broker starts records its metrics too
    // (its handles are taken on first use, after the recorder is installed).
    broker.kill();
    broker.restart();
    publish_batch(&mut broker.publisher().await, "m", (0..3).map(|i| message(format!("{i}"))).collect()).await;
    let text = broker.scrape();
    assert_eq!(sample(&text, "ballast_published_messages_total", "queue=\"m\",lane=\"normal\""), Some(3.0), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("ballast_publish_durable_seconds_count{queue=\"m\",lane=\"normal\"} 1")),
        "{text}"
    );
}

/// `bytes` counts the records not yet acked, nothing else: 0 for a new
/// lane, the records' size while they wait, 0 again once every message is
/// acked, dead-lettered or purged, and the same figures after a restart
/// (which must not count sealed segments or segment headers).
// Multi-threaded: the clients' connections must answer the broker's
// GOAWAY while this thread blocks waiting for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_the_unacked_records_before_and_after_a_restart() {
    // Small segments so the backlog spans sealed segments too.
    let config = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(config.path(), "[storage]\nsegment_size = 65536\n").unwrap();
    let mut broker = BrokerProcess::start_with(&["--config", config.path().to_str().unwrap()]);
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    create(&mut broker.admin().await, "b", settings).await;
    let empty = stats(&broker, "b").await;
    let figures = empty.saturation.unwrap();
    assert_eq!((figures.bytes, figures.saturation), (0, 0.0), "a new queue holds nothing");
    assert!(empty.lanes.iter().all(|l| l.saturation.as_ref().unwrap().bytes == 0));

    let mut publisher = broker.publisher().await;
    for lane in 0..3 {
        publish_batch(&mut publisher, "b", (0..100).map(|_| on_lane(vec![7u8; 1000], lane)).collect()).await;
    }
    let full = stats(&broker, "b").await.saturation.unwrap();
    assert!(full.bytes >= 300 * 1000, "bytes {}", full.bytes);
    assert!(full.bytes < 300 * 1100, "bytes {} are the records, not the segments", full.bytes);
    broker.terminate_cleanly();
    broker.restart();
    let after = stats(&broker, "b").await.saturation.unwrap();
    assert_eq!(after.bytes, full.bytes, "a restart counts the same records");

    // Ack some, nack one (dead-lettered: max_attempts 1), purge none yet.
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "b", 300).await;
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(session.delivery().await.delivery_id);
    }
    let nacked = ids.pop().unwrap();
    consumer.ack(pb::AckRequest { queue: "b".into(), delivery_ids: ids }).await.unwrap();
    consumer
        .nack(pb::NackRequest { queue: "b".into(), delivery_id: nacked, delay_ms: 0, reason: "bad".into() })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let drained = loop {
        let s = stats(&broker, "b").await;
        if s.saturation.as_ref().unwrap().depth == 0 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let figures = drained.saturation.unwrap();
    assert_eq!((figures.depth, figures.bytes, figures.saturation), (0, 0, 0.0), "everything acked: {figures:?}");
    for lane in &drained.lanes {
        let l = lane.saturation.as_ref().unwrap();
        assert_eq!((l.bytes, l.saturation), (0, 0.0), "lane {}", lane.name);
    }
    let dead = stats(&broker, "b.dead").await.saturation.unwrap();
    assert_eq!(dead.depth, 1);
    assert!(dead.bytes >= 1000, "the dead letter's bytes count in b.dead: {}", dead.bytes);
    drop(session);

    broker.terminate_cleanly();
    broker.restart();
    let figures = stats(&broker, "b").await.saturation.unwrap();
    assert_eq!((figures.depth, figures.bytes, figures.saturation), (0, 0, 0.0), "after a restart: {figures:?}");
    assert_eq!(stats(&broker, "b.dead").await.saturation.unwrap().bytes, dead.bytes);

    // Purge empties the count too.
    let mut admin = broker.admin().await;
    admin.purge_queue(pb::PurgeQueueRequest { name: "b.dead".into() }).await.unwrap();
    assert_eq!(stats(&broker, "b.dead").await.saturation.unwrap().bytes, 0);
    let scraped = broker.scrape();
    assert_eq!(sample(&scraped, "ballast_queue_bytes", "queue=\"b\",lane=\"normal\""), Some(0.0));
    assert_eq!(sample(&scraped, "ballast_queue_saturation_ratio", "queue=\"b\",lane=\"normal\""), Some(0.0));
}

/// A restart with a backlog and acks above the ack floor (the oldest
/// delivery is not acked, the nine after it are) reports the same bytes as
/// before: the count a lane starts from comes from storage's positions and
/// skips the done records above the floor. Both after a clean stop and
/// after SIGKILL (acks are durable once answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_survive_a_restart_with_acks_above_the_floor() {
    // Small segments: the backlog spans sealed segments.
    let config = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(config.path(), "[storage]\nsegment_size = 65536\n").unwrap();
    let mut broker = BrokerProcess::start_with(&["--config", config.path().to_str().unwrap()]);
    create(&mut broker.admin().await, "o", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "o", (0..200).map(|i| message(vec![1 + (i % 200) as u8; 1000])).collect()).await;
    let full = stats(&broker, "o").await.saturation.unwrap();
    assert_eq!(full.depth, 200);
    assert_eq!(full.bytes % 200, 0, "equal messages, equal stored sizes: {}", full.bytes);
    let one = full.bytes / 200;

    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "o", 10).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(session.delivery().await.delivery_id);
    }
    // Ack 2..=10, not 1: nine done offsets above the floor.
    consumer.ack(pb::AckRequest { queue: "o".into(), delivery_ids: ids[1..].to_vec() }).await.unwrap();
    let before = stats(&broker, "o").await.saturation.unwrap();
    assert_eq!((before.depth, before.bytes), (191, full.bytes - 9 * one), "{before:?}");
    drop(session);

    broker.terminate_cleanly();
    broker.restart();
    let after = stats(&broker, "o").await.saturation.unwrap();
    assert_eq!((after.depth, after.bytes), (before.depth, before.bytes), "after a clean restart");

    broker.kill();
    broker.restart();
    let after = stats(&broker, "o").await.saturation.unwrap();
    assert_eq!((after.depth, after.bytes), (before.depth, before.bytes), "after SIGKILL and a restart");
}

/// A refusal by the byte limit says so, with the batch's size, and its
/// retry-after covers the byte excess at the smoothed byte drain rate (not
/// just one message's worth of time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_limit_refusal_names_the_batch_and_waits_for_the_bytes() {
    let broker = BrokerProcess::start();
    // Only bytes matter here: 1 MiB, of which low gets 70% (734,003 bytes).
    let settings = pb::QueueSettings { max_bytes: Some(1 << 20), ..queue_settings() };
    create(&mut broker.admin().await, "bytes", settings).await;
    let mut publisher = broker.publisher().await;
    // 1000 records of 1040 stored bytes each, through the high lane.
    let payload = vec![1u8; 1000];
    for _ in 0..10 {
        publish_batch(&mut publisher, "bytes", (0..100).map(|_| on_lane(payload.clone(), 0)).collect()).await;
    }
    // A consumer acks about 100 messages (104,000 bytes) per second.
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "bytes", 10).await;
    let acking = tokio::spawn(async move {
        let start = Instant::now();
        for n in 1..=600u32 {
            let d = session.delivery().await;
            session.ack(vec![d.delivery_id]).await;
            session.credit(1).await;
            tokio::time::sleep_until((start + Duration::from_millis(u64::from(n) * 10)).into()).await;
        }
    });
    // Let the smoothed rates take in a few ticks of acks. How fast this
    // machine really acks does not matter: the hint is checked against the
    // rates the broker measured.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before = stats(&broker, "bytes").await.saturation.unwrap();
    assert!(before.ack_rate > 0.0, "the consumer drains: {before:?}");

    // 200 more messages on low: far over its byte share, well under any
    // message limit.
    let refusal = publisher
        .publish_batch(pb::PublishBatchRequest {
            queue: "bytes".into(),
            messages: (0..200).map(|_| on_lane(payload.clone(), 2)).collect(),
        })
        .await
        .expect_err("over low's byte share");
    let after = stats(&broker, "bytes").await.saturation.unwrap();
    acking.abort();
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    let message = refusal.message();
    assert!(message.contains("a batch of 200 messages (208000 bytes) on lane low"), "{message}");
    assert!(message.contains("max_bytes (734003 of 1048576) by "), "{message}");
    assert!(!message.contains("max_messages"), "not the message limit: {message}");
    let meta = refusal.metadata();
    let bytes: u64 = meta.get("ballast-bytes").unwrap().to_str().unwrap().parse().unwrap();
    let retry_after: u64 = meta.get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    // The excess over low's share, drained at about ack_rate x 1040 B/s.
    let excess = (bytes + 208_000 - 734_003) as f64;
    let rate = (before.ack_rate.min(after.ack_rate) * 1040.0, before.ack_rate.max(after.ack_rate) * 1040.0);
    // The hint is clamped to RETRY_AFTER_MS_MIN..=MAX (a slow machine's
    // low drain rate can take it to the top).
    let clamp = |ms: f64| ms.clamp(RETRY_AFTER_MS_MIN as f64, RETRY_AFTER_MS_MAX as f64);
    let (low, high) = (clamp(excess / rate.1 * 1000.0), clamp(excess / rate.0 * 1000.0));
    assert!(
        (low * 0.7..=high * 1.3).contains(&(retry_after as f64)),
        "retry-after {retry_after} ms; expected {low:.0}..{high:.0} ms for {excess} bytes over at {rate:?} B/s"
    );
    assert!(retry_after >= 1000, "well above one message's time: {retry_after} ms");
}

/// A refusal is answered only after REFUSAL_HOLD_MS, so a producer retrying
/// at once cannot spin the broker; what it held meanwhile is released at
/// once: a publish to another lane with room is stored without waiting.
#[tokio::test]
async fn a_refusal_is_held_before_its_answer_and_holds_nothing() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_messages: Some(10), ..queue_settings() };
    create(&mut broker.admin().await, "held", settings).await;
    let mut publisher = broker.publisher().await;
    let fill: Vec<pb::Message> = (0..7).map(|i| on_lane(format!("{i}"), 2)).collect();
    publish_batch(&mut publisher, "held", fill).await;
    let started = Instant::now();
    let refused = publisher.publish(pb::PublishRequest { queue: "held".into(), message: Some(on_lane("x", 2)) }).await;
    let waited = started.elapsed();
    assert_eq!(refused.expect_err("the low lane is full").code(), Code::ResourceExhausted);
    assert!(waited >= Duration::from_millis(REFUSAL_HOLD_MS), "answered after {waited:?}");
    // The high lane still has room: stored (the refusal held no slot).
    let receipt = publish(&mut publisher, "held", on_lane("high", 0)).await;
    assert_eq!(receipt.id.expect("id").lane, 0);
}
