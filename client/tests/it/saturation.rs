//! Issue 4 through the library against the real broker: saturation figures
//! in receipts and stats, the stats stream, and admission refusals with
//! their retry-after hint and figures.

use std::time::Duration;

use ballast_client::{
    Backoff, BreakerConfig, BreakerState, ConsumerConfig, Delivery, Error, Message, ProducerConfig, QueueSettings,
    RetryPolicy,
};
use tonic::Code;

use crate::support::{Attempt, Broker, Relay, eventually, sample};

/// Settings of a queue admitting `max_messages` (default lanes high, normal,
/// low, admitted up to 100%, 90% and 70% of it).
fn limited(max_messages: u64) -> QueueSettings {
    let mut settings = QueueSettings::default();
    settings.max_messages = Some(max_messages);
    settings
}

/// Retries that cannot explain a wait of a second by themselves: any longer
/// wait between attempts comes from the broker's hint.
fn quick_retries(attempts_max: u32) -> ProducerConfig {
    ProducerConfig {
        linger: Duration::ZERO,
        deadline: Duration::from_secs(30),
        retry: RetryPolicy { attempts_max, backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(2)) },
        jitter_seed: Some(4),
        ..ProducerConfig::default()
    }
}

/// Every wait between an answer and the next attempt is at least the hint
/// that answer carried.
fn assert_hints_honoured(attempts: &[Attempt]) {
    for pair in attempts.windows(2) {
        let hint = pair[0].retry_after.expect("every refusal carries a retry-after hint");
        let waited = pair[1].at - pair[0].answered;
        assert!(waited >= hint, "retried {waited:?} after a refusal hinting {hint:?}: {attempts:?}");
    }
}

/// Receipts carry the queue's and the lane's figures, and they agree with
/// what `Admin::stats` and the Prometheus endpoint report right after.
#[tokio::test]
async fn receipts_carry_the_figures_stats_report() {
    let broker = Broker::start();
    let client = broker.client();
    let admin = client.admin();
    let queue = admin.create_queue("figures", limited(1000)).await.expect("created");
    assert_eq!(queue.settings.max_messages, Some(1000));
    assert_eq!(queue.settings.max_bytes, Some(1 << 30), "the broker's default, resolved");
    assert_eq!(queue.settings.lane_admission, [1.0, 0.9, 0.7], "the broker's default, resolved");

    let producer = client.producer(ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }).expect("p");
    let batch = (0..9u32).map(|i| Message::new(vec![0u8; 100]).with_lane(i % 3));
    let receipts: Vec<_> =
        producer.publish_all("figures", batch).await.into_iter().collect::<Result<_, _>>().expect("ok");
    let first = receipts[0].queue_saturation.expect("queue figures");
    assert!(first.depth >= 1 && first.depth <= 9, "figures taken after the batch it was in: {first:?}");

    let receipt = producer.publish("figures", Message::new(vec![0u8; 100]).with_lane(0)).await.expect("stored");
    let queue = receipt.queue_saturation.expect("queue figures");
    let lane = receipt.lane_saturation.expect("lane figures");
    assert_eq!(queue.depth, 10);
    assert_eq!(lane.depth, 4, "lane 0 holds messages 0, 3, 6 and this one");
    assert!((queue.saturation - 0.01).abs() < 1e-9, "10 of 1000 messages: {queue:?}");
    assert!(queue.bytes >= 10 * 100, "{queue:?}");
    assert_eq!(queue.drain_estimate, None, "messages wait and nothing consumes: unknown");
    assert_eq!(queue.ack_rate, 0.0);

    let stats = admin.stats(Some("figures")).await.expect("stats");
    assert_eq!(stats.queues.len(), 1, "one queue asked for");
    let figures = stats.queue("figures").expect("the queue");
    assert_eq!(figures.saturation.depth, queue.depth);
    assert_eq!(figures.saturation.bytes, queue.bytes);
    assert_eq!(figures.saturation.saturation, queue.saturation);
    assert!(figures.saturation.oldest_age >= queue.oldest_age, "the oldest message only ages");
    let names: Vec<&str> = figures.lanes.iter().map(|lane| lane.name.as_str()).collect();
    assert_eq!(names, ["high", "normal", "low"]);
    assert_eq!(figures.lanes[0].saturation.depth, lane.depth);
    assert_eq!(figures.lanes[0].saturation.bytes, lane.bytes);
    assert_eq!(figures.lanes.iter().map(|lane| lane.admission).collect::<Vec<_>>(), [1.0, 0.9, 0.7]);
    assert_eq!(figures.lanes.iter().map(|lane| lane.saturation.depth).sum::<u64>(), queue.depth);
    assert_eq!((figures.max_messages, figures.max_bytes), (1000, 1 << 30));
    assert_eq!((figures.refused_queue_full, figures.refused_disk_full), (0, 0));
    assert!(stats.disk_free_bytes > 0);

    let metrics = broker.scrape();
    let depth = |lane: &str| {
        sample(&metrics, "ballast_queue_depth_messages", &format!("queue=\"figures\",lane=\"{lane}\""))
            .expect("a depth gauge per lane")
    };
    assert_eq!(depth("high") as u64, lane.depth, "Prometheus agrees with the receipt");
    assert_eq!(depth("high") + depth("normal") + depth("low"), queue.depth as f64);

    let all = admin.stats(None).await.expect("stats of every queue");
    let names: Vec<&str> = all.queues.iter().map(|queue| queue.name.as_str()).collect();
    assert_eq!(names, ["figures", "figures.dead"], "sorted, dead-letter queues included");
    let error = admin.stats(Some("nope")).await.expect_err("unknown queue");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
}

/// The stats stream pushes a snapshot at once and then one per interval,
/// and follows the backlog as it changes; it ends with the broker's error
/// when the watched queue is deleted.
#[tokio::test]
async fn watch_follows_the_backlog() {
    let broker = Broker::start();
    let client = broker.client();
    let admin = client.admin();
    admin.create_queue("watched", QueueSettings::default()).await.expect("created");
    let mut watch = admin.watch_stats(Some("watched"), Duration::from_millis(100)).await.expect("opened");
    let first = watch.next().await.expect("a snapshot").expect("no error");
    assert_eq!(first.queue("watched").expect("the queue").saturation.depth, 0);

    let producer = client.producer(ProducerConfig::default()).expect("producer");
    producer.publish_all("watched", (0..5).map(|i| Message::new(format!("m{i}")))).await;
    let mut previous = first.at;
    let depth = loop {
        let stats = watch.next().await.expect("a snapshot").expect("no error");
        let interval = stats.at.duration_since(previous).expect("snapshots in time order");
        assert!(interval >= Duration::from_millis(90), "one per interval, not faster: {interval:?}");
        previous = stats.at;
        let depth = stats.queue("watched").expect("the queue").saturation.depth;
        if depth == 5 {
            break depth;
        }
    };
    assert_eq!(depth, 5);

    admin.delete_queue("watched").await.expect("deleted");
    let ended = loop {
        match watch.next().await {
            Some(Ok(_)) => continue,
            Some(Err(error)) => break error,
            None => panic!("the stream ended without saying why"),
        }
    };
    assert!(matches!(ended, Error::NotFound { .. }), "{ended:?}");
    assert!(watch.next().await.is_none(), "nothing after the error");

    let error = admin.watch_stats(None, Duration::from_millis(10)).await.expect_err("interval below 100 ms");
    assert!(matches!(error, Error::InvalidArgument { .. }), "{error:?}");
}

/// A publish to the low lane of a queue at its 70% threshold is refused:
/// the producer waits at least the broker's retry-after hint before each
/// retry, and when the refusals outlast its attempts the error carries the
/// hint and the broker's figures. The refusals stored nothing, did not open
/// the queue's breaker, and the high lane is still admitted at once.
#[tokio::test]
async fn refused_publish_honours_retry_after_and_carries_figures() {
    let broker = Broker::start();
    let client = broker.client();
    let admin = client.admin();
    admin.create_queue("full", limited(50)).await.expect("created");
    let producer = client.producer(ProducerConfig::default()).expect("producer");
    let filled = producer.publish_all("full", (0..35).map(|i| Message::new(format!("m{i}")).with_lane(2))).await;
    assert!(filled.iter().all(Result::is_ok), "the low lane is admitted up to 70% of 50");

    let relay = Relay::start(&broker).await;
    // A breaker that would open on two failures: refusals must not count.
    let breaker = BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() };
    let producer = relay.client().producer(ProducerConfig { breaker, ..quick_retries(3) }).expect("producer");
    let error = producer.publish("full", Message::new("one too many").with_lane(2)).await.expect_err("refused");

    let attempts = relay.attempts();
    assert_eq!(attempts.len(), 3, "every attempt reached the broker: {attempts:?}");
    assert!(attempts.iter().all(|attempt| attempt.code == Code::ResourceExhausted), "{attempts:?}");
    assert_hints_honoured(&attempts);

    assert!(matches!(error, Error::ResourceExhausted { .. }), "{error:?}");
    assert!(error.is_retryable());
    let hint = error.retry_after().expect("a retry-after hint");
    assert!(hint >= Duration::from_millis(100), "{hint:?}");
    assert_eq!(Some(hint), attempts[2].retry_after, "the hint of the last refusal");
    assert!(error.to_string().contains("lane low"), "{error}");
    let refusal = error.refusal().expect("the broker's figures");
    assert_eq!(refusal.lane.as_deref(), Some("low"));
    assert_eq!(refusal.depth, Some(35));
    assert!(refusal.bytes.is_some_and(|bytes| bytes > 0), "{refusal:?}");
    assert_eq!(refusal.threshold, Some(0.7));
    assert!(refusal.saturation.is_some_and(|saturation| (saturation - 0.7).abs() < 1e-6), "{refusal:?}");
    assert!(!refusal.is_disk_low());
    assert_eq!(refusal.disk_free_bytes, None);

    assert_eq!(producer.breaker_state("full"), BreakerState::Closed, "a refusing broker is not a dead one");
    let urgent = producer.publish("full", Message::new("urgent").with_lane(0)).await.expect("high is admitted");
    assert_eq!(urgent.id.lane, 0);
    assert_eq!(relay.attempts().len(), 4, "admitted at the first attempt");
    let stats = admin.stats(Some("full")).await.expect("stats");
    let full = stats.queue("full").expect("the queue");
    assert_eq!(full.refused_queue_full, 3, "the broker counted every refusal");
    assert_eq!(full.lane("low").expect("low").saturation.depth, 35, "refusals stored nothing");
}

/// A refused publish goes through once consumers make room: the producer
/// keeps retrying no sooner than each hint, and the retry after the acks is
/// admitted.
#[tokio::test]
async fn refused_publish_is_admitted_after_consumers_make_room() {
    let broker = Broker::start();
    let client = broker.client();
    client.admin().create_queue("busy", limited(50)).await.expect("created");
    let producer = client.producer(ProducerConfig::default()).expect("producer");
    let filled = producer.publish_all("busy", (0..35).map(|i| Message::new(format!("m{i}")).with_lane(2))).await;
    assert!(filled.iter().all(Result::is_ok));

    let relay = Relay::start(&broker).await;
    let retrying = relay.client().producer(quick_retries(20)).expect("producer");
    let publish = tokio::spawn(async move { retrying.publish("busy", Message::new("later").with_lane(2)).await });
    eventually("the first refusal", || async { !relay.attempts().is_empty() }).await;

    let consumer = client
        .consumer("busy", ConsumerConfig { prefetch: 10, max_messages: Some(10), ..ConsumerConfig::default() })
        .expect("consumer");
    let stats = consumer.spawn(|_delivery: Delivery| async { Ok::<(), String>(()) }).join().await.expect("consumed");
    assert_eq!(stats.acked, 10);

    let receipt = publish.await.expect("no panic").expect("admitted once there was room");
    assert_eq!(receipt.id.lane, 2);
    let attempts = relay.attempts();
    assert!(attempts.len() >= 2, "{attempts:?}");
    let (last, refused) = attempts.split_last().expect("attempts");
    assert_eq!(last.code, Code::Ok);
    assert!(refused.iter().all(|attempt| attempt.code == Code::ResourceExhausted), "{attempts:?}");
    assert_hints_honoured(&attempts);
    // Admitted only with room under low's 70% of 50 (how much room depends
    // on how many acks had landed when the retry came).
    let queue = receipt.queue_saturation.expect("queue figures");
    assert!((26..=35).contains(&queue.depth), "{queue:?}");
}

/// Below the broker's free-disk floor every publish is refused, whatever
/// the lane, with the free space among the figures; stats say so too.
#[tokio::test]
async fn low_disk_refusal_carries_the_free_space() {
    // A floor above any disk this test runs on: 1 EiB.
    let broker = Broker::start_with(&["--disk-free-min-bytes", "1152921504606846976"]);
    let client = broker.client();
    client.admin().create_queue("disk", QueueSettings::default()).await.expect("created");
    let producer = client.producer(quick_retries(1)).expect("producer");
    let error = producer.publish("disk", Message::new("urgent").with_lane(0)).await.expect_err("disk is low");
    assert!(matches!(error, Error::ResourceExhausted { .. }), "{error:?}");
    assert!(error.retry_after().is_some(), "{error:?}");
    let refusal = error.refusal().expect("figures");
    assert!(refusal.is_disk_low(), "{refusal:?}");
    let stats = client.admin().stats(Some("disk")).await.expect("stats");
    assert!(stats.disk_free_bytes < stats.disk_free_min_bytes, "{stats:?}");
    assert!(refusal.disk_free_bytes.is_some_and(|free| free > 0), "{refusal:?}");
    assert_eq!(stats.queue("disk").expect("the queue").refused_disk_full, 1);
}

/// A queue's publish quota slows a producer down instead of failing it:
/// 300 messages at 200 msg/s take at least ~1.4 s, every one is stored, and
/// the broker counts the calls that waited for their turn.
#[tokio::test]
async fn a_publish_quota_slows_the_producer_down() {
    let broker = Broker::start();
    let client = broker.client();
    let admin = client.admin();
    let mut settings = QueueSettings::default();
    settings.max_publish_rate = Some(200);
    let queue = admin.create_queue("metered", settings).await.expect("created");
    assert_eq!((queue.settings.max_publish_rate, queue.settings.max_publish_byte_rate), (Some(200), Some(0)));

    let config = ProducerConfig { batch_count_max: 10, ..ProducerConfig::default() };
    let producer = client.producer(config).expect("producer");
    let started = std::time::Instant::now();
    let results = producer.publish_all("metered", (0..300).map(|i| Message::new(format!("m{i}")))).await;
    let elapsed = started.elapsed();
    assert!(results.iter().all(Result::is_ok), "slowed, not failed: {:?}", results.iter().find(|r| r.is_err()));
    // 100 ms of burst (20 messages) goes at once, the rest at 200 msg/s.
    assert!(elapsed >= Duration::from_millis(1350), "300 messages at 200 msg/s took {elapsed:?}");
    let stats = admin.stats(Some("metered")).await.expect("stats");
    let metered = stats.queue("metered").expect("the queue");
    assert_eq!(metered.saturation.depth, 300);
    assert!(metered.throttled_calls > 0 && metered.throttled > Duration::ZERO, "{metered:?}");
}

/// A call whose turn under the quota is too far away comes back as a
/// rate-limit refusal, with a retry-after for the rest of the wait; a
/// producer out of attempts reports it as such.
#[tokio::test]
async fn a_call_far_behind_the_quota_is_refused_as_rate_limited() {
    let broker = Broker::start();
    let client = broker.client();
    let mut settings = QueueSettings::default();
    settings.max_publish_byte_rate = Some(10_000);
    client.admin().create_queue("slow", settings).await.expect("created");
    let producer = client.producer(quick_retries(1)).expect("producer");
    // 50 KiB on an idle queue goes at once: 5 s of byte quota.
    producer.publish("slow", Message::new(vec![b'x'; 50 * 1024])).await.expect("an idle queue takes it");
    let error = producer.publish("slow", Message::new("next")).await.expect_err("~5 s of quota ahead");
    assert!(matches!(error, Error::ResourceExhausted { .. }), "{error:?}");
    let refusal = error.refusal().expect("figures");
    assert!(refusal.is_rate_limited() && !refusal.is_disk_low(), "{refusal:?}");
    let hint = error.retry_after().expect("a hint");
    assert!(hint >= Duration::from_secs(3), "the rest of the wait: {hint:?}");
    assert!(error.to_string().contains("max_publish_byte_rate 10000 bytes/s"), "{error}");
}

/// A batch bigger than its lane's share of even an empty queue is invalid
/// (retrying cannot help), so the producer sends its messages one by one:
/// those that fit are stored, the one past the share is refused as a full
/// queue.
#[tokio::test]
async fn a_batch_over_the_lanes_share_is_split_by_the_producer() {
    let broker = Broker::start();
    let client = broker.client();
    client.admin().create_queue("small", limited(10)).await.expect("created");
    // One batch of 8 on low, whose share of 10 is 7.
    let relay = Relay::start(&broker).await;
    let config = ProducerConfig { linger: Duration::from_millis(200), ..quick_retries(1) };
    let producer = relay.client().producer(config).expect("producer");
    let results = producer.publish_all("small", (0..8).map(|i| Message::new(format!("m{i}")).with_lane(2))).await;
    let attempts = relay.attempts();
    let codes: Vec<Code> = attempts.iter().map(|attempt| attempt.code).collect();
    assert_eq!(codes.len(), 9, "the batch, then each message alone: {codes:?}");
    assert_eq!(codes[0], Code::InvalidArgument, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&code| code == Code::Ok).count(), 7, "{codes:?}");
    let stored = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(stored, 7, "{results:?}");
    let refused = results.iter().find_map(|r| r.as_ref().err()).expect("one refused");
    assert!(matches!(refused, Error::ResourceExhausted { .. }), "the eighth is a full queue, not invalid: {refused:?}");
    let stats = client.admin().stats(Some("small")).await.expect("stats");
    assert_eq!(stats.queue("small").expect("the queue").saturation.depth, 7);
}
