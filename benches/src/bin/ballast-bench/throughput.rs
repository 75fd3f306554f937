//! `throughput`: durable publish throughput, then consume-and-ack
//! throughput of the backlog it built.

use std::sync::Arc;

use crate::{Sync, broker::Target, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Messages per publish call (1: unary Publish).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Calls in flight per producer.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Consumer streams for the consume phase (0: skip it).
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Credit per consumer stream.
    #[arg(long, default_value_t = 2000)]
    credit: u32,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.size > 0 && args.producers > 0 && args.batch > 0 && args.inflight > 0,
        "sizes and counts must be positive"
    );
    let queue = "bench-throughput";
    target.fresh_queue(queue, sync.settings()).await?;
    let mut channels = Vec::new();
    for _ in 0..args.producers.max(args.consumers) {
        channels.push(target.channel().await?);
    }
    let (elapsed, calls) = load::publish_all(
        &channels[..args.producers],
        queue,
        args.messages,
        args.size,
        args.batch,
        args.inflight,
        false,
    )
    .await?;
    let publish_rate = load::rate(args.messages, elapsed);
    println!(
        "publish: {} messages of {} B, {} producers x {} in flight, batch {}, sync {:?}",
        args.messages, args.size, args.producers, args.inflight, args.batch, sync
    );
    println!(
        "  {:.0} msg/s, {:.1} MB/s of payload, {:.2} s",
        publish_rate,
        publish_rate * args.size as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    load::print_percentile_header();
    load::print_percentiles("publish call", &calls);
    let depth = target.depth(queue).await?;
    anyhow::ensure!(depth == args.messages, "queue depth {depth} != {} published", args.messages);

    let mut consume = serde_json::Value::Null;
    if args.consumers > 0 {
        let consumers = &channels[..args.consumers];
        let elapsed =
            load::consume(consumers, queue, args.consumers, args.credit, args.messages, Arc::new(|_| {})).await?;
        let consume_rate = load::rate(args.messages, elapsed);
        println!("consume and ack: {} consumers, credit {}", args.consumers, args.credit);
        println!("  {:.0} msg/s, {:.2} s", consume_rate, elapsed.as_secs_f64());
        consume = serde_json::json!({
            "consumers": args.consumers, "credit": args.credit,
            "messages_per_s": consume_rate, "seconds": elapsed.as_secs_f64(),
        });
    }
    Ok(serde_json::json!({
        "scenario": "throughput",
        "size": args.size, "producers": args.producers, "batch": args.batch, "inflight": args.inflight,
        "messages": args.messages, "sync": format!("{sync:?}").to_lowercase(),
        "publish": {
            "messages_per_s": publish_rate, "payload_mb_per_s": publish_rate * args.size as f64 / 1e6,
            "seconds": elapsed.as_secs_f64(), "call_latency": load::percentiles(&calls),
        },
        "consume": consume,
    }))
}
