//! The library against the real broker: admin, publish, consume, retries
//! and reconnects.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use ballast_client::{
    Backoff, ConsumerConfig, Delivery, Error, Message, NackPolicy, ProducerConfig, QueueSettings, SyncPolicy,
};
use tokio::sync::Semaphore;

use crate::support::{Broker, eventually};

fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        reconnect: Backoff::new(Duration::from_millis(20), Duration::from_millis(500)),
        ..ConsumerConfig::default()
    }
}

/// Queue lifecycle through `Admin`, with the broker's resolved defaults and
/// its error codes mapped to typed errors.
#[tokio::test]
async fn admin_lifecycle() {
    let broker = Broker::start();
    let admin = broker.client().admin();

    let mut settings = QueueSettings::default();
    settings.max_attempts = Some(3);
    let queue = admin.create_queue("payments", settings.clone()).await.expect("created");
    assert_eq!(queue.name, "payments");
    assert_eq!(queue.settings.max_attempts, Some(3));
    assert_eq!(queue.settings.lanes, ["high", "normal", "low"], "default lanes resolved");
    assert_eq!(queue.settings.sync_policy, Some(SyncPolicy::Fsync), "fsync is the default");
    assert_eq!(queue.dead_letter_queue.as_deref(), Some("payments.dead"));

    admin.create_queue("payments", settings).await.expect("same settings: succeeds");
    let mut other = QueueSettings::default();
    other.max_attempts = Some(9);
    let error = admin.create_queue("payments", other).await.expect_err("other settings");
    assert!(matches!(error, Error::AlreadyExists { .. }), "{error:?}");

    let names: Vec<String> = admin.list_queues().await.expect("list").into_iter().map(|q| q.name).collect();
    assert!(names.contains(&"payments".to_owned()) && names.contains(&"payments.dead".to_owned()), "{names:?}");

    let error = admin.get_queue("missing").await.expect_err("unknown");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");

    let producer = broker.client().producer(ProducerConfig::default()).expect("producer");
    producer.publish_all("payments", (0..5).map(|i| Message::new(format!("m{i}")))).await;
    assert_eq!(admin.get_queue("payments").await.expect("get").depth, 5);
    assert_eq!(admin.purge_queue("payments").await.expect("purge"), 5);
    admin.delete_queue("payments").await.expect("delete");
    assert!(matches!(admin.get_queue("payments").await, Err(Error::NotFound { .. })));
}

/// Published messages (batched, with lanes, headers and delays) are all
/// delivered to a handler-driven consumer and acked; the queue ends empty.
#[tokio::test]
async fn publish_then_consume_everything() {
    let broker = Broker::start();
    let client = broker.client();
    client.admin().create_queue("jobs", QueueSettings::default()).await.expect("created");
    let producer = client
        .producer(ProducerConfig { linger: Duration::from_millis(5), batch_count_max: 50, ..ProducerConfig::default() })
        .expect("producer");
    let messages = (0..200).map(|i| Message::new(format!("job {i}")).with_lane(i % 3).with_header("n", i.to_string()));
    let receipts = producer.publish_all("jobs", messages).await;
    let receipts: Vec<_> = receipts.into_iter().collect::<Result<_, _>>().expect("all stored");
    assert!(receipts.iter().all(|r| !r.duplicate));
    let delayed = producer
        .publish("jobs", Message::new("later").with_delay(Duration::from_millis(300)))
        .await
        .expect("delayed publish");
    assert_eq!(delayed.id.lane, 1, "the default lane is the middle one");

    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let seen_in = seen.clone();
    let consumer = client
        .consumer("jobs", ConsumerConfig { prefetch: 16, concurrency: 4, max_messages: Some(201), ..consumer_config() })
        .expect("consumer");
    let stats = consumer
        .spawn(move |delivery: Delivery| {
            let seen = seen_in.clone();
            async move {
                let text = String::from_utf8(delivery.payload.to_vec()).map_err(|e| e.to_string())?;
                if text != "later" {
                    let n = delivery.headers.get("n").ok_or("missing header")?;
                    assert_eq!(text, format!("job {n}"));
                }
                seen.lock().expect("not poisoned").insert(text);
                Ok::<(), String>(())
            }
        })
        .join()
        .await
        .expect("consumes 201");
    assert_eq!(stats.acked, 201);
    assert_eq!(seen.lock().expect("not poisoned").len(), 201, "every message seen once");
    producer.close().await;

    let admin = client.admin();
    eventually("an empty queue", || async { admin.get_queue("jobs").await.expect("get").depth == 0 }).await;
}

/// The same idempotency key stores one message: the second publish returns
/// the first's id with `duplicate` set.
#[tokio::test]
async fn idempotent_publish() {
    let broker = Broker::start();
    let client = broker.client();
    client.admin().create_queue("orders", QueueSettings::default()).await.expect("created");
    let producer = client.producer(ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }).expect("p");
    let first = producer.publish("orders", Message::new("charge").with_idempotency_key("order-1")).await.expect("ok");
    let second = producer.publish("orders", Message::new("charge").with_idempotency_key("order-1")).await.expect("ok");
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.id, second.id);
    assert_eq!(client.admin().get_queue("orders").await.expect("get").depth, 1);
}

/// A failing handler's message is nacked and redelivered with attempt 2,
/// then acked.
#[tokio::test]
async fn failed_handler_is_redelivered() {
    let broker = Broker::start();
    let client = broker.client();
    client.admin().create_queue("mail", QueueSettings::default()).await.expect("created");
    let producer = client.producer(ProducerConfig::default()).expect("producer");
    producer.publish("mail", Message::new("hello")).await.expect("stored");

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let attempts_in = attempts.clone();
    let consumer = client
        .consumer(
            "mail",
            ConsumerConfig {
                nack_delay: NackPolicy::fixed(Duration::from_millis(50)),
                max_messages: Some(2),
                ..consumer_config()
            },
        )
        .expect("consumer");
    let stats = consumer
        .spawn(move |delivery: Delivery| {
            let attempts = attempts_in.clone();
            async move {
                attempts.lock().expect("not poisoned").push(delivery.attempt);
                if delivery.attempt == 1 { Err("smtp down") } else { Ok(()) }
            }
        })
        .join()
        .await
        .expect("two deliveries");
    assert_eq!(*attempts.lock().expect("not poisoned"), [1, 2]);
    assert_eq!((stats.nacked, stats.acked), (1, 1));
}

/// The consumer survives a broker crash and restart: it reconnects, the
/// result of the handler that was running when the broker died is dropped
/// rather than acked on the new session, and every message is eventually
/// acked (the interrupted one after a redelivery).
#[tokio::test]
async fn consumer_reconnects_after_broker_restart() {
    let mut broker = Broker::start();
    let client = broker.client();
    client.admin().create_queue("work", QueueSettings::default()).await.expect("created");
    let producer = client.producer(ProducerConfig::default()).expect("producer");
    let stored = producer.publish_all("work", (0..6).map(|i| Message::new(format!("w{i}")))).await;
    assert!(stored.iter().all(Result::is_ok));
    producer.close().await;

    let release = Arc::new(Semaphore::new(0));
    let calls = Arc::new(AtomicU32::new(0));
    let (release_in, calls_in) = (release.clone(), calls.clone());
    let handle = client
        .consumer("work", ConsumerConfig { prefetch: 6, concurrency: 1, ..consumer_config() })
        .expect("consumer")
        .spawn(move |_delivery: Delivery| {
            let (release, calls) = (release_in.clone(), calls_in.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    release.acquire().await.expect("open").forget();
                }
                Ok::<(), String>(())
            }
        });
    eventually("the first handler to start", || async { calls.load(Ordering::SeqCst) == 1 }).await;

    broker.kill();
    broker.restart();
    // Released only once the consumer is on its new session: a handler
    // that finished before the consumer saw its stream break would be
    // acked on the dead stream, which proves nothing about the rule.
    let admin = client.admin();
    eventually("the consumer to subscribe again", || async {
        matches!(admin.get_queue("work").await, Ok(queue) if queue.consumers == 1)
    })
    .await;
    release.add_permits(1);

    eventually("every message acked after the restart", || async {
        matches!(admin.get_queue("work").await, Ok(queue) if queue.depth == 0)
    })
    .await;
    let stats = handle.stop().await.expect("stops cleanly");
    assert!(stats.sessions >= 2, "reconnected: {stats:?}");
    assert_eq!(stats.abandoned, 1, "the interrupted handler's result was dropped: {stats:?}");
    assert!(calls.load(Ordering::SeqCst) >= 7, "the interrupted message was handled again");
}

/// A consumer of a queue that does not exist ends with NotFound.
#[tokio::test]
async fn consumer_of_unknown_queue_fails() {
    let broker = Broker::start();
    let error = broker
        .client()
        .consumer("nope", consumer_config())
        .expect("consumer")
        .spawn(|_delivery: Delivery| async { Ok::<(), String>(()) })
        .join()
        .await
        .expect_err("unknown queue");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
}

/// Publishing to an unknown queue is not retried: NotFound at once, and the
/// breaker stays closed.
#[tokio::test]
async fn publish_to_unknown_queue_is_not_found() {
    let broker = Broker::start();
    let producer = broker.client().producer(ProducerConfig::default()).expect("producer");
    let error = producer.publish("nope", Message::new("x")).await.expect_err("unknown queue");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    assert_eq!(producer.breaker_state("nope"), ballast_client::BreakerState::Closed);
}
