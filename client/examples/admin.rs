//! Creates a queue with custom settings, lists queues, and shows one.
//!
//! Run against a local broker (`cargo run -p ballast-broker --bin ballastd`):
//!
//! ```text
//! cargo run -p ballast-client --example admin
//! ```
//!
//! The broker address comes from `BALLAST_ADDR` (default
//! `http://127.0.0.1:7400`).

use std::time::Duration;

use ballast_client::{Client, Error, QueueSettings, contract};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let addr = std::env::var("BALLAST_ADDR").unwrap_or_else(|_| contract::ADDR_DEFAULT.to_owned());
    let admin = Client::connect(&addr).await?.admin();

    let mut settings = QueueSettings::default();
    settings.lanes = vec!["urgent".into(), "normal".into(), "bulk".into()];
    settings.max_attempts = Some(3);
    settings.lease_timeout = Some(Duration::from_secs(10));
    match admin.create_queue("example-orders", settings).await {
        Ok(queue) => println!("created {} (dead letters go to {:?})", queue.name, queue.dead_letter_queue),
        Err(Error::AlreadyExists { message }) => println!("exists with other settings: {message}"),
        Err(error) => return Err(error),
    }

    for queue in admin.list_queues().await? {
        println!(
            "{:<24} depth {:>8}  in flight {:>6}  lanes {:?}",
            queue.name, queue.depth, queue.in_flight, queue.settings.lanes
        );
    }
    let queue = admin.get_queue("example-orders").await?;
    println!("example-orders per lane: {:?}", queue.lane_depths);
    Ok(())
}
