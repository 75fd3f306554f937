//! `overhead`: the client library's own cost. The same broker and queue,
//! the same batch size, calls in flight and idempotency keys: publish
//! throughput through raw generated stubs, then through
//! `ballast_client::Producer` (which adds batching with linger, deadlines,
//! retries, the circuit breaker and receipts per message).

use std::{sync::Arc, time::Instant};

use ballast_client::{Client, Message, ProducerConfig};
use bytes::Bytes;

use crate::{Sync, broker::Target, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per run.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Messages per batch (raw calls, and the Producer's batch_count_max).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Batch calls in flight (raw), in_flight_batches_max (Producer).
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Tasks submitting to the one Producer.
    #[arg(long, default_value_t = 4)]
    tasks: usize,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    let queue = "bench-overhead";
    target.fresh_queue(queue, sync.settings()).await?;
    let channels = vec![target.channel().await?];
    let (raw_elapsed, _) =
        load::publish_all(&channels, queue, args.messages, args.size, args.batch, args.inflight, true).await?;
    let raw_rate = load::rate(args.messages, raw_elapsed);

    target.fresh_queue(queue, sync.settings()).await?;
    let client = Client::connect(&target.endpoint).await?;
    let config = ProducerConfig {
        batch_count_max: args.batch,
        in_flight_batches_max: args.inflight,
        pending_count_max: args.batch * args.inflight * 2,
        ..ProducerConfig::default()
    };
    let producer = Arc::new(client.producer(config)?);
    let payload = Bytes::from(vec![b'x'; args.size]);
    let per_task = args.messages / args.tasks as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.tasks {
        let producer = Arc::clone(&producer);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            for _ in 0..per_task {
                pending.push_back(producer.submit(queue, Message::new(payload.clone())).await?);
                if pending.len() >= 4096 {
                    pending.pop_front().expect("non-empty").wait().await?;
                }
            }
            for receipt in pending {
                receipt.wait().await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let client_elapsed = start.elapsed();
    let client_rate = load::rate(per_task * args.tasks as u64, client_elapsed);
    anyhow::ensure!(
        target.depth(queue).await? == per_task * args.tasks as u64,
        "the Producer's messages are not all stored"
    );

    println!(
        "overhead: {} messages of {} B, batch {}, {} in flight, idempotency keys, sync {:?}",
        args.messages, args.size, args.batch, args.inflight, sync
    );
    println!("  raw stubs (one connection):      {raw_rate:>10.0} msg/s");
    println!(
        "  Producer ({} submitting tasks):  {client_rate:>10.0} msg/s ({:.1}% of raw)",
        args.tasks,
        client_rate / raw_rate * 100.0
    );
    Ok(serde_json::json!({
        "scenario": "overhead", "size": args.size, "messages": args.messages, "batch": args.batch,
        "inflight": args.inflight, "sync": format!("{sync:?}").to_lowercase(),
        "raw_messages_per_s": raw_rate, "producer_messages_per_s": client_rate,
        "producer_fraction_of_raw": client_rate / raw_rate,
    }))
}
