//! `isolation`: bulkheads. A steady queue's open-loop latency alone, then
//! while another queue is flooded: either held at its admission limit
//! (every flood publish refused) or growing a backlog no one consumes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use ballast_proto::v1::{self as pb, publisher_client::PublisherClient};
use bytes::Bytes;

use crate::{Sync, broker::Target, latency, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    steady: latency::Args,
    /// How the other queue is flooded.
    #[arg(long, value_enum, default_value_t = Flood::Full)]
    flood: Flood,
    /// Flood producer connections (each keeps 4 batch calls in flight).
    #[arg(long, default_value_t = 4)]
    flood_producers: usize,
    /// Messages per flood call.
    #[arg(long, default_value_t = 100)]
    flood_batch: usize,
    /// Flood rate in messages per second, all flood calls together (0: as
    /// fast as the broker answers, which on a small machine also takes the
    /// CPU the steady queue and the load tool need).
    #[arg(long, default_value_t = 0)]
    flood_rate: u64,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Flood {
    /// The flooded queue sits at its limit: its publishes are refused.
    Full,
    /// The flooded queue takes everything and nobody consumes it.
    Backlog,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    let steady = "bench-steady";
    let flooded = "bench-flooded";
    target.fresh_queue(steady, sync.settings()).await?;
    let alone = latency::measure(target, steady, &args.steady).await?;

    target.fresh_queue(steady, sync.settings()).await?;
    let max_messages = match args.flood {
        Flood::Full => 10_000,
        Flood::Backlog => 1_000_000_000,
    };
    let flood_settings =
        pb::QueueSettings { max_messages: Some(max_messages), max_bytes: Some(1 << 40), ..sync.settings() };
    target.fresh_queue(flooded, flood_settings).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    // Each of the producers x 4 flood tasks sends one batch per period.
    let period = (args.flood_rate > 0).then(|| {
        let tasks = (args.flood_producers * 4) as f64;
        std::time::Duration::from_secs_f64(args.flood_batch as f64 * tasks / args.flood_rate as f64)
    });
    let tasks = args.flood_producers as u32 * 4;
    // The flood runs on its own threads, as another client process would:
    // on the steady side's runtime its tasks would queue ahead of the steady
    // calls inside the load tool and count as the broker's latency.
    let flood_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("flood").enable_all().build()?;
    for producer in 0..args.flood_producers {
        let endpoint = target.endpoint.clone();
        let channel = flood_runtime
            .spawn(async move {
                tonic::transport::Channel::from_shared(endpoint)?.connect().await.map_err(anyhow::Error::from)
            })
            .await??;
        for call in 0..4 {
            // Staggered, so that the flood is a steady stream of calls, not
            // every task's batch at once each period.
            let task = (producer * 4 + call) as u32;
            let mut client = PublisherClient::new(channel.clone());
            let (stop, stored, refused) = (Arc::clone(&stop), Arc::clone(&stored), Arc::clone(&refused));
            let batch = args.flood_batch;
            let payload = Bytes::from(vec![b'f'; args.steady.size]);
            flood.push(flood_runtime.spawn(async move {
                let mut tick = period.map(|period| {
                    let first = tokio::time::Instant::now() + period * task / tasks;
                    let mut tick = tokio::time::interval_at(first, period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    tick
                });
                while !stop.load(Ordering::Relaxed) {
                    if let Some(tick) = tick.as_mut() {
                        tick.tick().await;
                    }
                    let messages =
                        (0..batch).map(|_| pb::Message { payload: payload.clone(), ..Default::default() }).collect();
                    match client.publish_batch(pb::PublishBatchRequest { queue: flooded.into(), messages }).await {
                        Ok(_) => stored.fetch_add(batch as u64, Ordering::Relaxed),
                        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                            refused.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(status) => return Err(anyhow::anyhow!("flood publish failed: {status}")),
                    };
                }
                Ok(())
            }));
        }
    }
    let flood_start = Instant::now();
    let during = latency::measure(target, steady, &args.steady).await?;
    let flood_seconds = flood_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.await??;
    }
    flood_runtime.shutdown_background();
    let stored = stored.load(Ordering::Relaxed);
    let refused = refused.load(Ordering::Relaxed);

    println!(
        "isolation: steady queue at {} msg/s ({} B, sync {:?}); flood {:?}: {} producers x 4 calls of {}, {}",
        args.steady.rate,
        args.steady.size,
        sync,
        args.flood,
        args.flood_producers,
        args.flood_batch,
        if args.flood_rate > 0 { format!("{} msg/s offered", args.flood_rate) } else { "unpaced".to_owned() }
    );
    println!("-- steady queue alone");
    alone.print();
    println!("-- steady queue during the flood");
    during.print();
    println!(
        "flood: {:.0} msg/s stored, {:.0} calls/s refused",
        stored as f64 / flood_seconds,
        refused as f64 / flood_seconds
    );
    let ratio = |a: &hdrhistogram::Histogram<u64>, b: &hdrhistogram::Histogram<u64>| {
        b.value_at_quantile(0.99) as f64 / a.value_at_quantile(0.99).max(1) as f64
    };
    let durable_ratio = ratio(&alone.durable, &during.durable);
    let delivery_ratio = ratio(&alone.delivered, &during.delivered);
    println!(
        "p99 during / alone: publish-to-durable {durable_ratio:.2}x, publish-to-delivery {delivery_ratio:.2}x (target <= 1.20x)"
    );
    Ok(serde_json::json!({
        "scenario": "isolation", "flood": format!("{:?}", args.flood).to_lowercase(), "flood_rate": args.flood_rate,
        "steady_rate": args.steady.rate, "size": args.steady.size, "sync": format!("{sync:?}").to_lowercase(),
        "alone": { "publish_to_durable": load::percentiles(&alone.durable), "publish_to_delivery": load::percentiles(&alone.delivered) },
        "during": { "publish_to_durable": load::percentiles(&during.durable), "publish_to_delivery": load::percentiles(&during.delivered) },
        "flood_stored_per_s": stored as f64 / flood_seconds, "flood_refused_calls_per_s": refused as f64 / flood_seconds,
        "p99_ratio_publish_to_durable": durable_ratio, "p99_ratio_publish_to_delivery": delivery_ratio,
    }))
}
