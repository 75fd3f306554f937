//! `throughput`: durable publish throughput, then consume-and-ack
//! throughput of the backlog it built. `--size` and `--batch` take lists
//! (`--size 100,1024,16384 --batch 1,64`): every combination runs on a
//! fresh queue and the summary table compares them.

use std::sync::Arc;

use ballast_proto::v1 as pb;

use crate::{Sync, broker::Target, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Payload sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1024])]
    size: Vec<usize>,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Messages per publish call, comma-separated (1: unary Publish).
    #[arg(long, value_delimiter = ',', default_values_t = [64])]
    batch: Vec<usize>,
    /// Calls in flight per producer.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Messages to publish per run.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Payload bytes per run at most: large sizes publish fewer messages
    /// (16 KiB x 200,000 would be 3.3 GB).
    #[arg(long, default_value_t = 1 << 30)]
    max_run_bytes: u64,
    /// Consumer streams for the consume phase (0: skip it).
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Credit per consumer stream.
    #[arg(long, default_value_t = 2000)]
    credit: u32,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.size.iter().all(|&s| s > 0)
            && args.batch.iter().all(|&b| b > 0)
            && args.producers > 0
            && args.inflight > 0
            && args.messages > 0,
        "sizes and counts must be positive"
    );
    let mut runs = Vec::new();
    for &size in &args.size {
        for &batch in &args.batch {
            let messages = args.messages.min((args.max_run_bytes / size as u64).max(1));
            runs.push(one(target, args, sync, size, batch, messages).await?);
            println!();
        }
    }
    if runs.len() > 1 {
        println!(
            "{:>7} {:>6} {:>9} {:>10} {:>10} {:>9} {:>10}",
            "size", "batch", "messages", "publish/s", "MB/s", "call p99", "consume/s"
        );
        for r in &runs {
            println!(
                "{:>7} {:>6} {:>9} {:>10.0} {:>10.1} {:>7.2}ms {:>10}",
                r["size"].as_u64().unwrap_or(0),
                r["batch"].as_u64().unwrap_or(0),
                r["messages"].as_u64().unwrap_or(0),
                r["publish"]["messages_per_s"].as_f64().unwrap_or(0.0),
                r["publish"]["payload_mb_per_s"].as_f64().unwrap_or(0.0),
                r["publish"]["call_latency"]["p99_ms"].as_f64().unwrap_or(0.0),
                r["consume"]["messages_per_s"].as_f64().map_or_else(|| "-".to_owned(), |v| format!("{v:.0}")),
            );
        }
    }
    Ok(serde_json::json!({
        "scenario": "throughput", "sync": format!("{sync:?}").to_lowercase(), "tls": target.tls(),
        "producers": args.producers, "inflight": args.inflight, "consumers": args.consumers, "credit": args.credit,
        "runs": runs,
    }))
}

async fn one(
    target: &Target,
    args: &Args,
    sync: Sync,
    size: usize,
    batch: usize,
    messages: u64,
) -> anyhow::Result<serde_json::Value> {
    let queue = "bench-throughput";
    // Limits out of the way: this measures speed, not admission.
    let settings =
        pb::QueueSettings { max_messages: Some(1_000_000_000_000), max_bytes: Some(1 << 50), ..sync.settings() };
    target.fresh_queue(queue, settings).await?;
    let mut channels = Vec::new();
    for _ in 0..args.producers.max(args.consumers) {
        channels.push(target.channel().await?);
    }
    let (elapsed, calls) =
        load::publish_all(&channels[..args.producers], queue, messages, size, batch, args.inflight, false).await?;
    let publish_rate = load::rate(messages, elapsed);
    println!(
        "publish: {} messages of {} B, {} producers x {} in flight, batch {}, sync {:?}",
        messages, size, args.producers, args.inflight, batch, sync
    );
    println!(
        "  {:.0} msg/s, {:.1} MB/s of payload, {:.2} s",
        publish_rate,
        publish_rate * size as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    load::print_percentile_header();
    load::print_percentiles("publish call", &calls);
    let depth = target.depth(queue).await?;
    anyhow::ensure!(depth == messages, "queue depth {depth} != {messages} published");

    let mut consume = serde_json::Value::Null;
    if args.consumers > 0 {
        let consumers = &channels[..args.consumers];
        let elapsed = load::consume(consumers, queue, args.consumers, args.credit, messages, Arc::new(|_| {})).await?;
        let consume_rate = load::rate(messages, elapsed);
        println!("consume and ack: {} consumers, credit {}", args.consumers, args.credit);
        println!("  {:.0} msg/s, {:.2} s", consume_rate, elapsed.as_secs_f64());
        consume = serde_json::json!({
            "consumers": args.consumers, "credit": args.credit,
            "messages_per_s": consume_rate, "seconds": elapsed.as_secs_f64(),
        });
    }
    Ok(serde_json::json!({
        "size": size, "producers": args.producers, "batch": batch, "inflight": args.inflight,
        "messages": messages,
        "publish": {
            "messages_per_s": publish_rate, "payload_mb_per_s": publish_rate * size as f64 / 1e6,
            "seconds": elapsed.as_secs_f64(), "call_latency": load::percentiles(&calls),
        },
        "consume": consume,
    }))
}
