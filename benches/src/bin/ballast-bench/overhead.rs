//! `overhead`: the client library's own cost. The same broker and queue,
//! the same batch size, calls in flight and idempotency keys: publish
//! throughput through raw generated stubs, then through
//! `ballast_client::Producer` (which adds batching with linger, deadlines,
//! retries, the circuit breaker and receipts per message) over its publish
//! stream, over unary calls, and with no linger (messages submitted one by
//! one, batched only by what queued up meanwhile). Modes alternate round by
//! round; medians are reported.
//!
//! With `--drain raw,consumer` it measures the other direction instead: a
//! queue filled with `--messages` (raw `PublishBatch` calls, not timed) is
//! drained by one consumer holding `--prefetch` unacknowledged at most,
//! through a raw `Consume` stream (acks and the same credit back every
//! quarter of the window, as `compare`'s raw row does) or through
//! `ballast_client::Consumer` (handlers that do nothing, `concurrency` =
//! prefetch, as `compare` runs it). Same broker, same backlog, modes
//! alternated round by round.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_client::{Client, ConsumerConfig, Message, ProducerConfig};
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
    /// Rounds; each runs every mode once, in turn. Medians are reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Measure draining instead of publishing, through these paths
    /// (comma-separated, alternated in this order): `raw` (a raw consume
    /// stream), `consumer` (the client's `Consumer`).
    #[arg(long, value_delimiter = ',')]
    drain: Vec<DrainMode>,
    /// Unacknowledged deliveries the consumer may hold (`--drain`).
    #[arg(long, default_value_t = 1000)]
    prefetch: u32,
}

/// How a drain round consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DrainMode {
    /// Generated stubs: one consume stream, acks and credit every quarter
    /// of the window.
    Raw,
    /// `ballast_client::Consumer` with handlers that do nothing.
    Consumer,
}

/// How a round publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Generated stubs, `PublishBatch` calls of `batch` messages.
    Raw,
    /// The `Producer` with its defaults (5 ms linger), over its stream.
    Producer,
    /// The same over unary `PublishBatch` calls (`publish_stream` off).
    ProducerUnary,
    /// The `Producer` with no linger: each message submitted alone, batched
    /// only by what has queued up meanwhile (the caller does no batching).
    PerMessage,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Raw, Mode::Producer, Mode::ProducerUnary, Mode::PerMessage];

    fn name(self) -> &'static str {
        match self {
            Mode::Raw => "raw PublishBatch",
            Mode::Producer => "Producer, stream",
            Mode::ProducerUnary => "Producer, unary",
            Mode::PerMessage => "Producer, stream, linger 0",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Mode::Raw => "raw",
            Mode::Producer => "producer_stream",
            Mode::ProducerUnary => "producer_unary",
            Mode::PerMessage => "producer_linger0",
        }
    }
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.rounds > 0 && args.tasks > 0, "rounds and tasks > 0");
    if !args.drain.is_empty() {
        return drain(target, args, sync).await;
    }
    let queue = "bench-overhead";
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    // The modes alternate round by round, so that drift of the disk or of
    // the machine's load spreads over all of them.
    for _ in 0..args.rounds {
        for (i, mode) in Mode::ALL.into_iter().enumerate() {
            target.fresh_queue(queue, sync.settings()).await?;
            let rate = match mode {
                Mode::Raw => {
                    let channels = vec![target.channel().await?];
                    let (elapsed, _) =
                        load::publish_all(&channels, queue, args.messages, args.size, args.batch, args.inflight, true)
                            .await?;
                    load::rate(args.messages, elapsed)
                }
                mode => through_producer(target, queue, args, mode).await?,
            };
            rates[i].push(rate);
        }
    }
    let medians: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    let raw = medians[0];
    println!(
        "overhead: {} messages of {} B, batch {}, {} in flight, {} submitting tasks, idempotency keys, sync {:?}, median of {} alternating rounds",
        args.messages, args.size, args.batch, args.inflight, args.tasks, sync, args.rounds
    );
    let mut json = serde_json::json!({
        "scenario": "overhead", "size": args.size, "messages": args.messages, "batch": args.batch,
        "inflight": args.inflight, "tasks": args.tasks, "rounds": args.rounds,
        "sync": format!("{sync:?}").to_lowercase(),
    });
    for (i, mode) in Mode::ALL.into_iter().enumerate() {
        let rounds: Vec<String> = rates[i].iter().map(|r| format!("{r:.0}")).collect();
        println!(
            "  {:<28} {:>10.0} msg/s ({:>5.1}% of raw)   rounds: {}",
            mode.name(),
            medians[i],
            medians[i] / raw * 100.0,
            rounds.join(" ")
        );
        json[format!("{}_messages_per_s", mode.key())] = serde_json::json!(medians[i]);
        json[format!("{}_rounds", mode.key())] = serde_json::json!(rates[i]);
    }
    json["producer_fraction_of_raw"] = serde_json::json!(medians[1] / raw);
    Ok(json)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// One round through a `Producer` configured for `mode`; its rate.
async fn through_producer(target: &Target, queue: &str, args: &Args, mode: Mode) -> anyhow::Result<f64> {
    let client = Client::connect(&target.endpoint).await?;
    let mut config = ProducerConfig {
        batch_count_max: args.batch,
        in_flight_batches_max: args.inflight,
        pending_count_max: args.batch * args.inflight * 2,
        publish_stream: mode != Mode::ProducerUnary,
        ..ProducerConfig::default()
    };
    if mode == Mode::PerMessage {
        config.linger = std::time::Duration::ZERO;
    }
    let producer = Arc::new(client.producer(config)?);
    let payload = Bytes::from(vec![b'x'; args.size]);
    let per_task = args.messages / args.tasks as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.tasks {
        let producer = Arc::clone(&producer);
        let payload = payload.clone();
        let queue = queue.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            for _ in 0..per_task {
                pending.push_back(producer.submit(&queue, Message::new(payload.clone())).await?);
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
    let elapsed = start.elapsed();
    anyhow::ensure!(
        target.depth(queue).await? == per_task * args.tasks as u64,
        "the Producer's messages are not all stored"
    );
    Ok(load::rate(per_task * args.tasks as u64, elapsed))
}

/// `--drain`: the modes alternate round by round on a queue filled anew
/// each time; prints and returns each mode's median rate.
async fn drain(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.prefetch > 0, "prefetch > 0");
    let queue = "bench-overhead-drain";
    let channels = vec![target.channel().await?];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); args.drain.len()];
    for round in 0..args.rounds {
        for (i, mode) in args.drain.iter().enumerate() {
            target.fresh_queue(queue, sync.settings()).await?;
            load::publish_all(&channels, queue, args.messages, args.size, args.batch, args.inflight, true).await?;
            // A line a profiler can start and stop on (see BENCHMARKS.md).
            eprintln!("round {round}: {mode:?} draining");
            let elapsed = match mode {
                DrainMode::Raw => {
                    let consume = vec![target.channel().await?];
                    load::consume(&consume, queue, 1, args.prefetch, args.messages, Arc::new(|_| {})).await?
                }
                DrainMode::Consumer => through_consumer(target, queue, args).await?,
            };
            let rate = load::rate(args.messages, elapsed);
            eprintln!("round {round}: {mode:?} drained, {rate:.0} msg/s");
            rates[i].push(rate);
        }
    }
    println!(
        "overhead --drain: {} messages of {} B, prefetch {}, sync {:?}, median of {} alternating rounds",
        args.messages, args.size, args.prefetch, sync, args.rounds
    );
    let mut json = serde_json::json!({
        "scenario": "overhead", "workload": "drain", "size": args.size, "messages": args.messages, "prefetch": args.prefetch,
        "rounds": args.rounds, "sync": format!("{sync:?}").to_lowercase(),
    });
    let first = median(&rates[0]);
    for (i, mode) in args.drain.iter().enumerate() {
        let rounds: Vec<String> = rates[i].iter().map(|r| format!("{r:.0}")).collect();
        let rate = median(&rates[i]);
        println!(
            "  {:<10} {:>10.0} msg/s ({:>5.1}% of {:?})   rounds: {}",
            format!("{mode:?}"),
            rate,
            rate / first * 100.0,
            args.drain[0],
            rounds.join(" ")
        );
        let key = format!("{mode:?}").to_lowercase();
        json[format!("drain_{key}_messages_per_s")] = serde_json::json!(rate);
        json[format!("drain_{key}_rounds")] = serde_json::json!(rates[i]);
    }
    Ok(json)
}

/// One drain of `--messages` through a `Consumer`; the time from spawning
/// it to its end (`max_messages` reached, the last acks applied).
async fn through_consumer(target: &Target, queue: &str, args: &Args) -> anyhow::Result<Duration> {
    let client = Client::connect(&target.endpoint).await?;
    let config = ConsumerConfig {
        prefetch: args.prefetch,
        // Handlers do nothing: never let them be what limits the pace.
        concurrency: args.prefetch as usize,
        max_messages: Some(args.messages),
        ..ConsumerConfig::default()
    };
    let seen = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handle = client.consumer(queue, config)?.spawn({
        let seen = Arc::clone(&seen);
        move |_delivery| {
            seen.fetch_add(1, Ordering::Relaxed);
            async { Ok::<(), std::convert::Infallible>(()) }
        }
    });
    let stats = tokio::time::timeout(Duration::from_secs(120), handle.join()).await??;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        seen.load(Ordering::Relaxed) == args.messages && stats.acked == args.messages,
        "the Consumer handled {} and acked {} of {} messages",
        seen.load(Ordering::Relaxed),
        stats.acked,
        args.messages
    );
    Ok(elapsed)
}
