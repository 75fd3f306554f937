//! Consumes with a handler: acks even orders, fails odd ones on their first
//! attempt (nacked and redelivered after a delay), stops on Ctrl-C or after
//! 200 messages.
//!
//! ```text
//! cargo run -p ballast-client --example produce
//! cargo run -p ballast-client --example consume
//! ```

use std::time::Duration;

use ballast_client::{Client, ConsumerConfig, Delivery, Error, NackPolicy, contract};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let addr = std::env::var("BALLAST_ADDR").unwrap_or_else(|_| contract::ADDR_DEFAULT.to_owned());
    let client = Client::connect(&addr).await?;
    let consumer = client.consumer(
        "example-orders",
        ConsumerConfig {
            prefetch: 32,
            concurrency: 4,
            nack_delay: NackPolicy::exponential(Duration::from_millis(200), Duration::from_secs(5)),
            max_messages: Some(200),
            ..ConsumerConfig::default()
        },
    )?;

    let handle = consumer.spawn(|delivery: Delivery| async move {
        let text = String::from_utf8_lossy(&delivery.payload).into_owned();
        let odd = text.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n % 2 == 1);
        if odd && delivery.attempt == 1 {
            return Err(format!("{text}: pretend the payment service timed out"));
        }
        println!("{} attempt {}: {text}", delivery.id, delivery.attempt);
        Ok(())
    });

    let stopper = handle.stopper();
    tokio::spawn(async move {
        tokio::signal::ctrl_c().await.ok();
        stopper.stop();
    });
    let stats = handle.join().await?;
    println!(
        "handled {}, acked {}, nacked {}, reconnects {}",
        stats.handled,
        stats.acked,
        stats.nacked,
        stats.sessions.saturating_sub(1)
    );
    Ok(())
}
