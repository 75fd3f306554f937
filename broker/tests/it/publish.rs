//! The publish path under stress and at its limits: calls cancelled after
//! their append, concurrent admission, the room reserved for the broker's
//! headers, nack reasons, and the original id a redelivered message keeps.
//! Some tests drive a `Broker` in-process (to cancel a call at an exact
//! point, or to race calls without gRPC in between); the others run the
//! real `ballastd`.

use std::{sync::Arc, time::Duration};

use ballast_broker::{
    Broker, Config,
    limits::{
        BATCH_COUNT_MAX, KEY_SIZE_MAX, NACK_REASON_SIZE_MAX, PUBLISH_HEADERS_COUNT_MAX, PUBLISH_HEADERS_SIZE_MAX,
        RESERVED_HEADERS_SIZE,
    },
    queue::{Publish, Queue, SettingsRequest},
};
use ballast_proto::v1 as pb;
use bytes::Bytes;
use tonic::Code;

use crate::support::*;

/// A broker in this process, on a temporary data directory.
struct InProcess {
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn open() -> InProcess {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let config = Config { data_dir: dir.path().to_owned(), disk_free_min_bytes: 0, ..Config::default() };
        InProcess { broker: Broker::open(config).expect("open the broker"), _dir: dir }
    }

    async fn create(&self, name: &str, request: SettingsRequest) -> Arc<Queue> {
        self.broker.create(name, &request).await.unwrap_or_else(|e| panic!("create {name}: {e}"))
    }
}

fn keyed(key: &str) -> Publish {
    Publish { payload: Bytes::from_static(b"once"), key: Some(Bytes::from(key.to_owned())), ..Publish::default() }
}

/// A publish whose call goes away after its records were appended but
/// before their commit resolved (a client deadline, a disconnect) still
/// completes: its keys are recorded once durable, so a retry with the same
/// key is answered as a duplicate and nothing is stored twice. (Before, the
/// dropped call left its claim unresolved; the retry took it over and
/// stored the message again.) Under `FSYNC` the commit waits for the
/// flusher's `fdatasync`, so a call polled once and dropped (a zero
/// timeout) is cut exactly there; ten keys make a lucky early sync
/// irrelevant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_cancelled_after_its_append_is_stored_once() {
    let broker = InProcess::open();
    let queue = broker.create("cancelled", SettingsRequest::default()).await;
    for n in 0..10 {
        let key = format!("key-{n}");
        let cut = tokio::time::timeout(Duration::ZERO, queue.publish(vec![keyed(&key)])).await;
        if let Ok(done) = cut {
            done.expect("a publish that completed at once");
        }
        let retry = queue.publish(vec![keyed(&key)]).await.expect("the retry");
        assert!(retry[0].duplicate, "the retry of {key} is answered as a duplicate: {retry:?}");
        assert_eq!(queue.stats().lane_depths.iter().sum::<u64>(), n + 1, "{key} is stored once");
    }
}

/// Concurrent batches cannot take a queue past `max_messages`: admission
/// reserves a batch's counts in the same step as it checks them, until the
/// batch is in its log. (Before, each call checked the depth and appended
/// later, so calls that checked together all got in.) Eight publishers race
/// batches of 25 into a queue of 500 until each is refused; the depth is
/// then at most 500, and the refusals come only once the queue is nearly
/// full. Repeated over several queues, as the race needs calls to meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_never_overshoot_max_messages() {
    let broker = InProcess::open();
    let max_messages = 500;
    for round in 0..10 {
        let request = SettingsRequest { max_messages: Some(max_messages), ..SettingsRequest::default() };
        let queue = broker.create(&format!("race-{round}"), request).await;
        let publishers: Vec<_> = (0..8)
            .map(|_| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move {
                    let batch = || {
                        (0..25)
                            .map(|_| Publish {
                                payload: Bytes::from(vec![7u8; 8000]),
                                lane: Some(0),
                                ..Publish::default()
                            })
                            .collect::<Vec<_>>()
                    };
                    loop {
                        match queue.publish(batch()).await {
                            Ok(_) => tokio::task::yield_now().await,
                            Err(ballast_broker::BrokerError::Refused(_)) => return,
                            Err(e) => panic!("publish: {e}"),
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.await.expect("a publisher");
        }
        let depth: u64 = queue.stats().lane_depths.iter().sum();
        assert!(depth <= max_messages, "round {round}: depth {depth} is over max_messages {max_messages}");
        assert!(depth > max_messages - 25, "round {round}: refused at depth {depth}, with room for a batch");
    }
}

/// `count` headers whose encoded size (name and value plus 6 bytes each) is
/// exactly `size`.
fn headers_of(count: usize, size: usize) -> std::collections::HashMap<String, String> {
    let mut headers: std::collections::HashMap<String, String> =
        (0..count).map(|i| (format!("h{i:02}"), String::new())).collect();
    let used = count * (6 + 3);
    let rest = size.checked_sub(used).expect("room for the names");
    headers.insert("h00".into(), "v".repeat(rest));
    headers
}

/// The headers a publish may carry are 64 / 64 KiB less the room the
/// broker keeps for its own (`PUBLISH_HEADERS_COUNT_MAX`,
/// `PUBLISH_HEADERS_SIZE_MAX`): at both limits a message is stored, one
/// past either it is INVALID_ARGUMENT naming the limit. A message at both
/// limits, delayed, then nacked with the longest reason from lanes with
/// the longest names, is redelivered and dead-lettered with every header
/// the broker adds. (Before, a message near 64 KiB of headers was accepted,
/// and its dead letter refused with HeadersTooLarge, forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_at_the_header_limits_is_redelivered_and_dead_lettered_whole() {
    let broker = BrokerProcess::start();
    let lane = "l".repeat(32);
    let settings = pb::QueueSettings { lanes: vec![lane.clone()], max_attempts: Some(2), ..queue_settings() };
    create(&mut broker.admin().await, "heavy", settings).await;
    let mut publisher = broker.publisher().await;
    let (count, size) = (PUBLISH_HEADERS_COUNT_MAX as usize, PUBLISH_HEADERS_SIZE_MAX as usize);
    assert_eq!((count, size), (57, 65_536 - RESERVED_HEADERS_SIZE as usize));
    let with = |count, size| pb::Message { headers: headers_of(count, size), ..message("heavy") };

    assert_status(
        publisher.publish(pb::PublishRequest { queue: "heavy".into(), message: Some(with(count + 1, size)) }).await,
        Code::InvalidArgument,
        "58 headers; the limit is 57",
    );
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "heavy".into(), message: Some(with(count, size + 1)) }).await,
        Code::InvalidArgument,
        &format!("headers take {} bytes encoded (name and value plus 6 bytes each); the limit is {size}", size + 1),
    );
    let receipt = publish(&mut publisher, "heavy", pb::Message { delay_ms: 1, ..with(count, size) }).await;
    let id = receipt.id.expect("an id");

    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "heavy", 10).await;
    let first = session.delivery().await;
    assert_eq!(first.headers.len(), count, "the delay header is not delivered");
    session.nack(first.delivery_id, 1, &"r".repeat(NACK_REASON_SIZE_MAX)).await;
    let second = session.delivery().await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.headers.len(), count + 1, "the redelivery carries its original offset");
    assert_eq!(second.headers.get("ballast-original-offset"), Some(&id.offset.to_string()));
    let reason = "r".repeat(NACK_REASON_SIZE_MAX);
    session.nack(second.delivery_id, 0, &reason).await;

    let mut dead = Session::open(&mut consumer, "heavy.dead", 1).await;
    let letter = dead.delivery().await;
    assert_eq!(letter.headers.len(), count + 6, "{:?}", letter.headers.keys().filter(|k| k.starts_with("ballast-")));
    assert_eq!(letter.headers.get("ballast-dead-letter-reason"), Some(&reason));
    assert_eq!(letter.headers.get("ballast-source-lane"), Some(&lane));
    assert_eq!(letter.headers.get("ballast-original-offset"), Some(&id.offset.to_string()));
    assert_eq!(letter.headers.get("h00"), first.headers.get("h00"));
    assert_eq!(depth(&mut broker.admin().await, "heavy").await, 0);
}

/// A nack's reason is at most `NACK_REASON_SIZE_MAX` bytes: one past is
/// INVALID_ARGUMENT naming the limit, and changes nothing (the delivery is
/// still leased); at the limit the message is dead-lettered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_reason_is_bounded() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    create(&mut broker.admin().await, "why", settings).await;
    publish(&mut broker.publisher().await, "why", message("m")).await;
    let mut consumer = broker.consumer().await;
    let delivery = consumer
        .pull(pb::PullRequest { queue: "why".into(), max_messages: 1, wait_ms: 5_000 })
        .await
        .expect("pull")
        .into_inner()
        .deliveries
        .pop()
        .expect("a delivery");
    let nack = |reason: String| pb::NackRequest {
        queue: "why".into(),
        delivery_id: delivery.delivery_id,
        delay_ms: 0,
        reason,
    };
    assert_status(
        consumer.nack(nack("r".repeat(NACK_REASON_SIZE_MAX + 1))).await,
        Code::InvalidArgument,
        "nack reason is 1025 bytes; the limit is 1024",
    );
    consumer.nack(nack("r".repeat(NACK_REASON_SIZE_MAX))).await.expect("the delivery is still leased");
    let mut dead = Session::open(&mut consumer, "why.dead", 1).await;
    let letter = dead.delivery().await;
    assert_eq!(letter.headers.get("ballast-dead-letter-reason").map(String::len), Some(NACK_REASON_SIZE_MAX));
}

/// A redelivered message and its dead letter carry the offset of its
/// publish receipt (`ballast-original-offset`), while each copy has an
/// offset of its own: `ballast-source-offset` is the last copy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_names_the_offset_of_its_publish_receipt() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(3), ..queue_settings() };
    create(&mut broker.admin().await, "orig", settings).await;
    let receipts = publish_batch(&mut broker.publisher().await, "orig", vec![message("a"), message("b")]).await;
    let id = receipts[1].id.expect("an id");
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "orig", 10).await;
    let mut offsets = Vec::new();
    for attempt in 1..=3 {
        let mut d = session.delivery().await;
        if &d.payload[..] == b"a" {
            session.ack(vec![d.delivery_id]).await;
            d = session.delivery().await;
        }
        assert_eq!((&d.payload[..], d.attempt), (&b"b"[..], attempt));
        let original = d.headers.get("ballast-original-offset").map(String::as_str);
        assert_eq!(original, (attempt > 1).then_some(id.offset.to_string()).as_deref(), "attempt {attempt}");
        offsets.push(d.id.expect("an id").offset);
        session.nack(d.delivery_id, 0, "no").await;
    }
    assert_eq!(offsets[0], id.offset, "the first delivery is the published record");
    assert!(offsets[1] > id.offset && offsets[2] > offsets[1], "each redelivery is a new copy: {offsets:?}");
    let mut dead = Session::open(&mut consumer, "orig.dead", 1).await;
    let letter = dead.delivery().await;
    assert_eq!(letter.headers.get("ballast-original-offset"), Some(&id.offset.to_string()));
    assert_eq!(letter.headers.get("ballast-source-offset"), Some(&offsets[2].to_string()));
}

/// A record storage refuses to copy with the broker's headers (one stored
/// before publishes left room for them: 64 headers, 64 KiB) is not requeued
/// forever: its redelivery and its dead letter are stored without the
/// broker's headers, counted in `ballast_stripped_copies_total`. (Before,
/// each copy failed with TooManyHeaders and the message went back to its
/// lane with the same attempt count, round and round.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_storage_refuses_is_stored_without_the_brokers_headers() {
    let mut broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(2), ..queue_settings() };
    create(&mut broker.admin().await, "legacy", settings).await;
    broker.terminate_cleanly();
    // Write the old record straight into the default lane's log.
    let queues = broker.data_dir.join("queues");
    let dir = std::fs::read_dir(&queues)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("legacy~"))
        .expect("the queue's directory");
    let options = Config::default().log_options(&ballast_broker::queue::QueueSettings::default());
    let log = ballast_storage::Log::open(dir.join("lanes").join("1"), options).expect("open the lane");
    let headers: Vec<(String, String)> = {
        let mut headers: Vec<_> = headers_of(64, 64 * 1024).into_iter().collect();
        headers.sort();
        headers
    };
    let record = ballast_storage::NewRecord {
        timestamp_ms: 1,
        headers: headers.clone(),
        payload: Bytes::from_static(b"legacy"),
        ..ballast_storage::NewRecord::default()
    };
    log.append(&[record]).expect("storage takes 64 headers").commit.wait().expect("synced");
    log.close().expect("close the lane");
    broker.restart();

    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "legacy", 10).await;
    let first = session.delivery().await;
    session.nack(first.delivery_id, 0, "once").await;
    let second = session.delivery().await;
    assert_eq!((&second.payload[..], second.attempt), (&b"legacy"[..], 2), "redelivered");
    assert_eq!(second.headers.len(), 64, "without its original offset");
    session.nack(second.delivery_id, 0, "twice").await;
    let mut dead = Session::open(&mut consumer, "legacy.dead", 1).await;
    let letter = dead.delivery().await;
    assert_eq!(&letter.payload[..], b"legacy");
    let mut delivered: Vec<_> = letter.headers.into_iter().collect();
    delivered.sort();
    assert_eq!(delivered, headers, "the message as it was stored, without the broker's headers");
    // The original is acked once its dead letter is durable, which may be
    // just after the letter was delivered: wait (bounded) for the ack.
    let mut admin = broker.admin().await;
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while depth(&mut admin, "legacy").await != 0 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(depth(&mut admin, "legacy").await, 0);
    let text = broker.scrape();
    let stripped = sample(&text, "ballast_stripped_copies_total", "queue=\"legacy\",lane=\"normal\"");
    assert_eq!(stripped, Some(2.0), "{text}");
}

/// A batch of `BATCH_COUNT_MAX` messages is stored; one more message is
/// INVALID_ARGUMENT naming the limit, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_at_most_batch_count_max_messages() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "batch", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let batch = |n: usize| pb::PublishBatchRequest {
        queue: "batch".into(),
        messages: (0..n).map(|i| message(format!("{i}"))).collect(),
    };
    assert_status(
        publisher.publish_batch(batch(BATCH_COUNT_MAX + 1)).await,
        Code::InvalidArgument,
        "a batch holds at most 1000 messages; got 1001",
    );
    assert_eq!(depth(&mut broker.admin().await, "batch").await, 0);
    let receipts = publisher.publish_batch(batch(BATCH_COUNT_MAX)).await.expect("at the limit").into_inner().receipts;
    assert_eq!(receipts.len(), BATCH_COUNT_MAX);
    assert_eq!(depth(&mut broker.admin().await, "batch").await, BATCH_COUNT_MAX as u64);
}

/// An idempotency key is at most `KEY_SIZE_MAX` (256) bytes: at the limit
/// it is stored and deduplicates; one past is INVALID_ARGUMENT naming the
/// limit, and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_at_most_key_size_max_bytes() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "keys", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let keyed = |key: String| pb::Message { idempotency_key: key, ..message("k") };
    let max = KEY_SIZE_MAX as usize;
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "keys".into(), message: Some(keyed("k".repeat(max + 1))) }).await,
        Code::InvalidArgument,
        "idempotency key is 257 bytes; the limit is 256",
    );
    let first = publish(&mut publisher, "keys", keyed("k".repeat(max))).await;
    let again = publish(&mut publisher, "keys", keyed("k".repeat(max))).await;
    assert!(!first.duplicate && again.duplicate, "{first:?} then {again:?}");
    assert_eq!(again.id, first.id);
    assert_eq!(depth(&mut broker.admin().await, "keys").await, 1);
}

/// With small segments a record must fit one with the room its copies
/// need for the broker's headers: the largest payload a 64 KiB segment
/// takes is stored (and dead-lettered), one byte more is INVALID_ARGUMENT
/// naming `storage.segment_size`, instead of a message that could be
/// published but never dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_leaves_room_for_its_copies_in_a_small_segment() {
    let config = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(config.path(), "[storage]\nsegment_size = 65536\n").unwrap();
    let broker = BrokerProcess::start_with(&["--config", config.path().to_str().unwrap()]);
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    create(&mut broker.admin().await, "small", settings).await;
    let mut publisher = broker.publisher().await;
    // A segment holds records of up to 65,536 - 64 bytes (its header); a
    // record is 40 bytes plus its payload.
    let largest = 65_536 - 64 - 40 - RESERVED_HEADERS_SIZE as usize;
    assert_status(
        publisher
            .publish(pb::PublishRequest { queue: "small".into(), message: Some(message(vec![1u8; largest + 1])) })
            .await,
        Code::InvalidArgument,
        "storage.segment_size",
    );
    publish(&mut publisher, "small", message(vec![1u8; largest])).await;
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "small", 1).await;
    let d = session.delivery().await;
    session.nack(d.delivery_id, 0, &"r".repeat(NACK_REASON_SIZE_MAX)).await;
    let letter = Session::open(&mut consumer, "small.dead", 1).await.delivery().await;
    assert_eq!(letter.payload.len(), largest);
    assert_eq!(letter.headers.len(), 6, "every dead-letter header: {:?}", letter.headers.keys());
}
