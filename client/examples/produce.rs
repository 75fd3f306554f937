//! Publishes a burst of messages concurrently (they share batches), then one
//! delayed, high-priority message with headers and an explicit idempotency
//! key, published twice to show the duplicate receipt.
//!
//! ```text
//! cargo run -p ballast-client --example admin     # creates example-orders
//! cargo run -p ballast-client --example produce
//! ```

use std::{sync::Arc, time::Duration};

use ballast_client::{Client, Error, Message, ProducerConfig, contract};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let addr = std::env::var("BALLAST_ADDR").unwrap_or_else(|_| contract::ADDR_DEFAULT.to_owned());
    let client = Client::connect(&addr).await?;
    let producer = Arc::new(client.producer(ProducerConfig {
        linger: Duration::from_millis(10),
        deadline: Duration::from_secs(5),
        ..ProducerConfig::default()
    })?);

    // 100 concurrent publishes: the producer groups them into a few batches.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..100 {
        let producer = producer.clone();
        tasks.spawn(async move { producer.publish("example-orders", Message::new(format!("order {n}"))).await });
    }
    let mut stored = 0;
    while let Some(result) = tasks.join_next().await {
        match result.expect("publish task panicked") {
            Ok(_receipt) => stored += 1,
            // Retries and the deadline ran out, or the breaker is open: slow down.
            Err(error) if error.is_retryable() => eprintln!("try later ({:?}): {error}", error.retry_after()),
            Err(error) => return Err(error),
        }
    }
    println!("stored {stored} of 100");

    let urgent = Message::new("refund order 7")
        .with_lane(0)
        .with_header("content-type", "text/plain")
        .with_delay(Duration::from_secs(2))
        .with_idempotency_key("refund-7");
    let first = producer.publish("example-orders", urgent.clone()).await?;
    let again = producer.publish("example-orders", urgent).await?;
    println!(
        "refund stored at {} (duplicate: {}); again: {} (duplicate: {})",
        first.id, first.duplicate, again.id, again.duplicate
    );

    if let Ok(producer) = Arc::try_unwrap(producer) {
        producer.close().await;
    }
    Ok(())
}
