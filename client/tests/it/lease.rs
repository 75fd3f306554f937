//! The consumer extends the leases of running handlers, and gives up at its
//! ceiling. See: #15 item 1.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use ballast_client::{Backoff, ConsumerConfig, Delivery, Message, ProducerConfig, QueueSettings};

use crate::support::Broker;

/// A queue whose leases last 300 ms, with one message published.
async fn short_lease_queue(broker: &Broker, name: &str) {
    let client = broker.client();
    let mut settings = QueueSettings::default();
    settings.lease_timeout = Some(Duration::from_millis(300));
    client.admin().create_queue(name, settings).await.expect("created");
    let producer = client.producer(ProducerConfig::default()).expect("producer");
    producer.publish(name, Message::new("long work")).await.expect("stored");
}

fn config(max_messages: u64, extend_max: Option<Duration>) -> ConsumerConfig {
    ConsumerConfig {
        prefetch: 2,
        concurrency: 2,
        max_messages: Some(max_messages),
        extend_max,
        reconnect: Backoff::new(Duration::from_millis(20), Duration::from_millis(500)),
        ..ConsumerConfig::default()
    }
}

/// A handler that works 1.2 s on a message leased for 300 ms keeps its
/// lease: the consumer extends it every ~100 ms, the message is not
/// redelivered (the one handler's ack is accepted, the queue ends empty),
/// and extension stops with the handler.
#[tokio::test]
async fn a_running_handler_keeps_its_lease() {
    let broker = Broker::start();
    short_lease_queue(&broker, "reports").await;
    let client = broker.client();
    let consumer = client.consumer("reports", config(1, Some(Duration::from_secs(60)))).expect("consumer");
    let stats = consumer
        .spawn(|delivery: Delivery| async move {
            assert_eq!(delivery.lease, Duration::from_millis(300));
            // The work itself: longer than four leases.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            Ok::<(), String>(())
        })
        .join()
        .await
        .expect("consumed");
    assert_eq!((stats.acked, stats.rejected), (1, 0), "{stats:?}");
    assert!(stats.extended >= 3, "extended every third of the lease: {stats:?}");
    assert_eq!((stats.extend_refused, stats.extend_gave_up), (0, 0), "{stats:?}");
    let queue = client.admin().get_queue("reports").await.expect("get");
    assert_eq!((queue.depth, queue.in_flight), (0, 0), "acked, never redelivered");
}

/// Past `extend_max` (400 ms) the consumer stops extending: the lease runs
/// out, the message is redelivered (attempt 2) while the first handler
/// still runs, and that handler's late ack is rejected.
#[tokio::test]
async fn extension_gives_up_at_its_ceiling() {
    let broker = Broker::start();
    short_lease_queue(&broker, "stuck").await;
    let client = broker.client();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&attempts);
    let consumer = client.consumer("stuck", config(2, Some(Duration::from_millis(400)))).expect("consumer");
    let stats = consumer
        .spawn(move |delivery: Delivery| {
            seen.lock().expect("not poisoned").push(delivery.attempt);
            async move {
                if delivery.attempt == 1 {
                    tokio::time::sleep(Duration::from_millis(2000)).await;
                }
                Ok::<(), String>(())
            }
        })
        .join()
        .await
        .expect("consumed");
    assert_eq!(*attempts.lock().expect("not poisoned"), [1, 2], "redelivered while the first handler ran");
    assert_eq!(stats.extend_gave_up, 1, "{stats:?}");
    assert!(stats.extended >= 1, "extended until the ceiling: {stats:?}");
    assert_eq!((stats.acked, stats.rejected), (2, 1), "the first handler's late ack is rejected: {stats:?}");
    let queue = client.admin().get_queue("stuck").await.expect("get");
    assert_eq!(queue.depth, 0);
}
