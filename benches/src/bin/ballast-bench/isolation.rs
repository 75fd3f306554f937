//! `isolation`: bulkheads. A steady queue's open-loop latency alone, then
//! while another queue is flooded: either held at its admission limit
//! (every flood publish refused) or growing a backlog no one consumes;
//! `none` is the control. Alone and during alternate for `--rounds`, and
//! each side's histograms are pooled.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::broker::Channel;
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
    /// The flooded queue's publish quota in messages per second
    /// (`max_publish_rate`; 0: none). Over it, flood calls wait their turn
    /// or are refused, so the flood cannot take more of the machine.
    #[arg(long, default_value_t = 0)]
    flood_quota: u64,
    /// Rounds of (alone, during the flood), pooled.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Flood another broker, already running at this address (HOST:PORT),
    /// instead of the steady queue's: the control that separates what
    /// the broker shares between its queues from what the machine shares
    /// between processes (the same flood, the same CPUs, no queue in
    /// common).
    #[arg(long)]
    flood_addr: Option<String>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Flood {
    /// The flooded queue sits at its limit: its publishes are refused.
    Full,
    /// The flooded queue takes everything and nobody consumes it.
    Backlog,
    /// No flood: the control. Both sides measure the steady queue alone,
    /// so their ratio is the noise of the measurement itself.
    None,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.rounds > 0, "rounds > 0");
    let steady = "bench-steady";
    let flooded = "bench-flooded";
    let max_messages = match args.flood {
        Flood::Full => 10_000,
        Flood::Backlog | Flood::None => 1_000_000_000,
    };
    let flood_settings = pb::QueueSettings {
        max_messages: Some(max_messages),
        max_bytes: Some(1 << 40),
        max_publish_rate: Some(args.flood_quota),
        ..sync.settings()
    };
    let other = match &args.flood_addr {
        Some(addr) => Some(crate::broker::Target::new(
            Some(addr.clone()),
            None,
            None,
            None,
            std::path::Path::new("."),
            false,
            crate::broker::Secure { tls: false, auth: false },
        )?),
        None => None,
    };
    let flood_target = other.as_ref().unwrap_or(target);
    flood_target.fresh_queue(flooded, flood_settings).await?;
    // The flood runs on its own threads, as another client process would:
    // on the steady side's runtime its tasks would queue ahead of the steady
    // calls inside the load tool and count as the broker's latency.
    let flood_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("flood").enable_all().build()?;
    let mut flood_channels = Vec::new();
    for _ in 0..args.flood_producers {
        let endpoint = flood_target.endpoint.clone();
        let channel = flood_runtime
            .spawn(async move {
                tonic::transport::Channel::from_shared(endpoint)?.connect().await.map_err(anyhow::Error::from)
            })
            .await??;
        flood_channels.push(flood_target.with_token(channel));
    }
    // Alone and during alternate, round after round, and each side's
    // histograms are pooled: the disk's sync latency drifts over minutes,
    // and a drift between one long "alone" and one long "during" would
    // read as (or hide) the flood's effect.
    let mut alone: Option<latency::Measured> = None;
    let mut during: Option<latency::Measured> = None;
    let (mut stored, mut refused, mut flood_seconds) = (0, 0, 0.0);
    let mut rounds = Vec::new();
    let p99_ms = |h: &hdrhistogram::Histogram<u64>| h.value_at_quantile(0.99) as f64 / 1000.0;
    for round in 1..=args.rounds {
        target.fresh_queue(steady, sync.settings()).await?;
        let a = latency::measure(target, steady, &args.steady).await?;
        target.fresh_queue(steady, sync.settings()).await?;
        let flood = match args.flood {
            Flood::None => None,
            Flood::Full | Flood::Backlog => Some(Flood::start(&flood_runtime, &flood_channels, flooded, args)),
        };
        let flood_start = Instant::now();
        let d = latency::measure(target, steady, &args.steady).await?;
        flood_seconds += flood_start.elapsed().as_secs_f64();
        if let Some(flood) = flood {
            let (s, r) = flood.stop().await?;
            stored += s;
            refused += r;
        }
        let (alone_p99, during_p99) = (p99_ms(&a.delivered), p99_ms(&d.delivered));
        eprintln!(
            "isolation: round {round} of {}: delivery p99 alone {alone_p99:.2} ms, during {during_p99:.2} ms ({:.2}x)",
            args.rounds,
            during_p99 / alone_p99
        );
        rounds.push(serde_json::json!({ "alone_delivery_p99_ms": alone_p99, "during_delivery_p99_ms": during_p99 }));
        pool(&mut alone, a)?;
        pool(&mut during, d)?;
    }
    flood_runtime.shutdown_background();
    let (alone, during) = (alone.expect("rounds > 0"), during.expect("rounds > 0"));
    println!(
        "isolation: steady queue at {} msg/s ({} B, sync {:?}); flood {:?}: {} producers x 4 calls of {}, {}, {}",
        args.steady.rate,
        args.steady.size,
        sync,
        args.flood,
        args.flood_producers,
        args.flood_batch,
        if args.flood_rate > 0 { format!("{} msg/s offered", args.flood_rate) } else { "unpaced".to_owned() },
        if args.flood_quota > 0 { format!("quota {} msg/s", args.flood_quota) } else { "no quota".to_owned() }
    );
    if let Some(addr) = &args.flood_addr {
        println!("(the flood went to another broker, at {addr})");
    }
    println!("-- steady queue alone ({} rounds pooled)", args.rounds);
    alone.print();
    println!("-- steady queue during the flood ({} rounds pooled)", args.rounds);
    during.print();
    println!(
        "flood: {:.0} msg/s stored, {:.0} calls/s refused",
        stored as f64 / flood_seconds,
        refused as f64 / flood_seconds
    );
    let durable_ratio = load::p99_ratio(&alone.durable, &during.durable);
    let delivery_ratio = load::p99_ratio(&alone.delivered, &during.delivered);
    println!(
        "p99 during / alone: publish-to-durable {durable_ratio:.2}x, publish-to-delivery {delivery_ratio:.2}x (target <= 1.20x)"
    );
    Ok(serde_json::json!({
        "scenario": "isolation", "flood": format!("{:?}", args.flood).to_lowercase(), "flood_rate": args.flood_rate,
        "flood_quota": args.flood_quota, "flood_addr": args.flood_addr, "rounds": args.rounds, "per_round": rounds,
        "steady_rate": args.steady.rate, "size": args.steady.size, "sync": format!("{sync:?}").to_lowercase(),
        "alone": { "publish_to_durable": load::percentiles(&alone.durable), "publish_to_delivery": load::percentiles(&alone.delivered) },
        "during": { "publish_to_durable": load::percentiles(&during.durable), "publish_to_delivery": load::percentiles(&during.delivered) },
        "flood_stored_per_s": stored as f64 / flood_seconds, "flood_refused_calls_per_s": refused as f64 / flood_seconds,
        "p99_ratio_publish_to_durable": durable_ratio, "p99_ratio_publish_to_delivery": delivery_ratio,
    }))
}

/// Adds `next` to the pooled measurement.
fn pool(pooled: &mut Option<latency::Measured>, next: latency::Measured) -> anyhow::Result<()> {
    match pooled {
        None => *pooled = Some(next),
        Some(p) => {
            p.durable.add(&next.durable)?;
            p.delivered.add(&next.delivered)?;
            p.send_lag.add(&next.send_lag)?;
            p.achieved_rate = p.achieved_rate.min(next.achieved_rate);
        }
    }
    Ok(())
}

/// A running flood: its tasks and their counts.
struct Running {
    stop: Arc<AtomicBool>,
    stored: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Flood {
    /// Starts `producers x 4` flood tasks on `runtime`.
    fn start(runtime: &tokio::runtime::Runtime, channels: &[Channel], flooded: &'static str, args: &Args) -> Running {
        let running = Running {
            stop: Arc::new(AtomicBool::new(false)),
            stored: Arc::new(AtomicU64::new(0)),
            refused: Arc::new(AtomicU64::new(0)),
            tasks: Vec::new(),
        };
        let tasks = channels.len() as u32 * 4;
        // Each task sends one batch per period.
        let period = (args.flood_rate > 0)
            .then(|| Duration::from_secs_f64(args.flood_batch as f64 * f64::from(tasks) / args.flood_rate as f64));
        let mut running = running;
        for (producer, channel) in channels.iter().enumerate() {
            for call in 0..4 {
                // Staggered, so that the flood is a steady stream of calls,
                // not every task's batch at once each period.
                let task = (producer * 4 + call) as u32;
                let mut client = PublisherClient::new(channel.clone());
                let (stop, stored, refused) =
                    (Arc::clone(&running.stop), Arc::clone(&running.stored), Arc::clone(&running.refused));
                let batch = args.flood_batch;
                let payload = Bytes::from(vec![b'f'; args.steady.size]);
                running.tasks.push(runtime.spawn(async move {
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
                        let messages = (0..batch)
                            .map(|_| pb::Message { payload: payload.clone(), ..Default::default() })
                            .collect();
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
        running
    }
}

impl Running {
    /// Stops the flood; returns (messages stored, calls refused).
    async fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await??;
        }
        Ok((self.stored.load(Ordering::Relaxed), self.refused.load(Ordering::Relaxed)))
    }
}
