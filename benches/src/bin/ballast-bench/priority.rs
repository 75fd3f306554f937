//! `priority`: high-lane latency with and without a low-lane flood. High-
//! lane traffic runs open loop at a fixed rate; consumers with a fixed
//! capacity serve the queue. First the high lane alone (baseline), then
//! while the low lane is flooded past what the consumers can take. Reported
//! for the high lane: publish-to-delivery (the broker dispatched it to a
//! consumer) and publish-to-processing (the consumer took it from its
//! prefetch buffer, which the low lane's deliveries may fill) p50/p99/p999,
//! from each message's intended send time (no coordinated omission).

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_proto::v1::{self as pb, publisher_client::PublisherClient};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use crate::{
    Sync,
    broker::Target,
    chart::{self, Panel, Series},
    load,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// High-lane offered rate, messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Measured seconds per phase (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Warm-up seconds per phase, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// What the consumers process together, messages per second.
    #[arg(long, default_value_t = 5000)]
    consumer_rate: u64,
    /// Consumer streams.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Credit (prefetch window) per consumer: deliveries already sent wait
    /// in the consumer's buffer whatever their lane.
    #[arg(long, default_value_t = 16)]
    credit: u32,
    /// Low-lane flood rate, messages per second.
    #[arg(long, default_value_t = 20_000)]
    flood_rate: u64,
    /// Messages per flood call.
    #[arg(long, default_value_t = 100)]
    flood_batch: usize,
    /// Serve lanes in strict priority order instead of by weight (4:2:1).
    #[arg(long)]
    strict: bool,
    /// High-lane producer connections.
    #[arg(long, default_value_t = 2)]
    producers: usize,
    /// The queue's publish quota in messages per second (`max_publish_rate`;
    /// 0: none). With a flood above it, the low lane is throttled and
    /// refused while the high lane is not held up by it.
    #[arg(long, default_value_t = 0)]
    quota: u64,
}

const HIGH: u32 = 0;
const LOW: u32 = 2;

/// Latencies of the high lane, per phase, and over time.
#[derive(Debug)]
struct Recorder {
    start: Instant,
    /// First sequence number of the flood phase, and the number of
    /// warm-up messages at the start of each phase.
    flood_from: AtomicU64,
    warmup_count: u64,
    durable: [Mutex<Histogram<u64>>; 2],
    delivered: [Mutex<Histogram<u64>>; 2],
    processed: [Mutex<Histogram<u64>>; 2],
    /// (seconds since start, delivery latency in ms) of every high delivery.
    timeline: Mutex<Vec<(f64, f64)>>,
    high_delivered: AtomicU64,
    high_processed: AtomicU64,
    low_processed: AtomicU64,
}

impl Recorder {
    fn phase(&self, seq: u64) -> Option<usize> {
        let flood_from = self.flood_from.load(Ordering::Relaxed);
        if seq < flood_from {
            (seq >= self.warmup_count).then_some(0)
        } else {
            (seq - flood_from >= self.warmup_count).then_some(1)
        }
    }

    fn record(&self, d: &pb::Delivery, processed: bool) {
        let lane = d.id.as_ref().map_or(u32::MAX, |id| id.lane);
        if lane != HIGH {
            if processed {
                self.low_processed.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let seq = u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
        let sent = u64::from_le_bytes(d.payload[8..16].try_into().expect("8 bytes"));
        let now = load::nanos_since(self.start);
        let us = (now.saturating_sub(sent) / 1000).max(1);
        if processed {
            self.high_processed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.high_delivered.fetch_add(1, Ordering::Relaxed);
            self.timeline.lock().expect("timeline lock").push((now as f64 / 1e9, us as f64 / 1000.0));
        }
        if let Some(phase) = self.phase(seq) {
            let hist = if processed { &self.processed[phase] } else { &self.delivered[phase] };
            let _ = hist.lock().expect("histogram lock").record(us);
        }
    }
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16");
    anyhow::ensure!(
        args.rate > 0 && args.consumer_rate > 0 && args.consumers > 0 && args.producers > 0 && args.flood_batch > 0,
        "rates and counts must be positive"
    );
    let queue = "bench-priority";
    let settings = pb::QueueSettings {
        strict_priority: Some(args.strict),
        max_messages: Some(1_000_000_000_000),
        max_bytes: Some(1 << 50),
        max_publish_rate: Some(args.quota),
        ..sync.settings()
    };
    target.fresh_queue(queue, settings).await?;
    let phase_count = ((args.seconds + args.warmup) * args.rate as f64) as u64;
    let start = Instant::now();
    let recorder = Arc::new(Recorder {
        start,
        flood_from: AtomicU64::new(u64::MAX),
        warmup_count: (args.warmup * args.rate as f64) as u64,
        durable: [Mutex::new(load::histogram()), Mutex::new(load::histogram())],
        delivered: [Mutex::new(load::histogram()), Mutex::new(load::histogram())],
        processed: [Mutex::new(load::histogram()), Mutex::new(load::histogram())],
        timeline: Mutex::new(Vec::new()),
        high_delivered: AtomicU64::new(0),
        high_processed: AtomicU64::new(0),
        low_processed: AtomicU64::new(0),
    });

    let stop_consumers = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let (r1, r2) = (Arc::clone(&recorder), Arc::clone(&recorder));
        let on_receive: load::OnDelivery = Arc::new(move |d| r1.record(d, false));
        let on_process: load::OnDelivery = Arc::new(move |d| r2.record(d, true));
        let channel = target.channel().await?;
        let rate = args.consumer_rate as f64 / args.consumers as f64;
        consumers.push(tokio::spawn(load::consume_paced(
            channel,
            queue.into(),
            rate,
            args.credit,
            Arc::clone(&stop_consumers),
            on_receive,
            on_process,
        )));
    }
    let mut clients = Vec::new();
    for _ in 0..args.producers {
        clients.push(PublisherClient::new(target.channel().await?));
    }
    let filler = Bytes::from(vec![b'h'; args.size - 16]);

    // Phase 1: the high lane alone.
    let baseline_start = start.elapsed().as_secs_f64();
    high_lane(&clients, queue, args.rate, 0, phase_count, &filler, &recorder).await?;
    wait_delivered(&recorder.high_processed, phase_count, Duration::from_secs(30)).await?;

    // Phase 2: the flood, then the high lane again once the low lane has a
    // backlog (the consumers are saturated).
    let stop_flood = Arc::new(AtomicBool::new(false));
    let flood_start = start.elapsed().as_secs_f64();
    let flood = tokio::spawn(flood_low(
        PublisherClient::new(target.channel().await?),
        queue,
        args.flood_rate,
        args.flood_batch,
        Bytes::from(vec![b'l'; args.size]),
        Arc::clone(&stop_flood),
    ));
    let lead = Duration::from_secs_f64((args.consumer_rate as f64 * 0.5 / args.flood_rate as f64).clamp(0.2, 2.0));
    tokio::time::sleep(lead).await;
    let low_before = recorder.low_processed.load(Ordering::Relaxed);
    recorder.flood_from.store(phase_count, Ordering::Relaxed);
    let high_start = Instant::now();
    high_lane(&clients, queue, args.rate, phase_count, phase_count, &filler, &recorder).await?;
    let high_seconds = high_start.elapsed().as_secs_f64();
    let low_during = recorder.low_processed.load(Ordering::Relaxed) - low_before;
    stop_flood.store(true, Ordering::Relaxed);
    let (flood_stored, flood_refused) = flood.await??;
    let flood_end = start.elapsed().as_secs_f64();
    // Not bailing here: the JSON lists it under failures.
    let undelivered = wait_delivered(&recorder.high_processed, 2 * phase_count, Duration::from_secs(60)).await.err();
    stop_consumers.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await??;
    }

    let take = |m: &Mutex<Histogram<u64>>| m.lock().expect("histogram lock").clone();
    let (base_w, flood_w) = (take(&recorder.durable[0]), take(&recorder.durable[1]));
    let (base_d, flood_d) = (take(&recorder.delivered[0]), take(&recorder.delivered[1]));
    let (base_p, flood_p) = (take(&recorder.processed[0]), take(&recorder.processed[1]));
    let ratio = |a: &Histogram<u64>, b: &Histogram<u64>, q: f64| {
        b.value_at_quantile(q) as f64 / a.value_at_quantile(q).max(1) as f64
    };
    println!(
        "priority: high lane {} msg/s, {} B; consumers {} x {:.0} msg/s, credit {}; low-lane flood {} msg/s; {}; sync {:?}",
        args.rate,
        args.size,
        args.consumers,
        args.consumer_rate as f64 / args.consumers as f64,
        args.credit,
        args.flood_rate,
        if args.strict { "strict priority" } else { "weighted 4:2:1" },
        sync
    );
    load::print_percentile_header();
    load::print_percentiles("high durable, alone", &base_w);
    load::print_percentiles("high durable, flood", &flood_w);
    load::print_percentiles("high delivery, alone", &base_d);
    load::print_percentiles("high delivery, flood", &flood_d);
    load::print_percentiles("high processing, alone", &base_p);
    load::print_percentiles("high processing, flood", &flood_p);
    let (r50, r99, r999) =
        (ratio(&base_d, &flood_d, 0.5), ratio(&base_d, &flood_d, 0.99), ratio(&base_d, &flood_d, 0.999));
    println!("high delivery during flood / alone: p50 {r50:.2}x, p99 {r99:.2}x, p999 {r999:.2}x");
    println!(
        "high durable p99 during flood / alone: {:.2}x (the flood's writes share the disk and its syncs)",
        ratio(&base_w, &flood_w, 0.99)
    );
    let p99_processing = ratio(&base_p, &flood_p, 0.99);
    println!("high processing p99 during flood / alone: {p99_processing:.2}x");
    let low_share = low_during as f64 / high_seconds;
    println!(
        "flood: {:.0} msg/s stored in the low lane, {:.0} calls/s refused; low lane consumed {:.0} msg/s while the high lane ran",
        flood_stored as f64 / (flood_end - flood_start),
        flood_refused as f64 / (flood_end - flood_start),
        low_share
    );
    let mut timeline = recorder.timeline.lock().expect("timeline lock").clone();
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    let json = serde_json::json!({
        "scenario": "priority", "rate": args.rate, "size": args.size, "seconds": args.seconds, "warmup": args.warmup,
        "consumer_rate": args.consumer_rate, "consumers": args.consumers, "credit": args.credit,
        "flood_rate": args.flood_rate, "strict": args.strict, "sync": format!("{sync:?}").to_lowercase(),
        "baseline": { "publish_to_durable": load::percentiles(&base_w), "publish_to_delivery": load::percentiles(&base_d), "publish_to_processing": load::percentiles(&base_p) },
        "flood": { "publish_to_durable": load::percentiles(&flood_w), "publish_to_delivery": load::percentiles(&flood_d), "publish_to_processing": load::percentiles(&flood_p) },
        "delivery_ratio": { "p50": r50, "p99": r99, "p999": r999 },
        "durable_p99_ratio": ratio(&base_w, &flood_w, 0.99),
        "processing_p99_ratio": p99_processing,
        "flood_stored": flood_stored, "flood_refused_calls": flood_refused, "quota": args.quota,
        "low_consumed_per_s_during_flood": low_share,
        "phases": { "baseline_start_s": baseline_start, "flood_start_s": flood_start, "flood_end_s": flood_end },
        "high_delivery_p99_over_time": p99_over_time(&timeline, 0.25),
        "high_delivered": recorder.high_delivered.load(Ordering::Relaxed),
        "failures": undelivered.map(|e| format!("{e:#}")).into_iter().collect::<Vec<_>>(),
    });
    Ok(json)
}

/// p99 of the latencies in each `step`-second bucket: [(t, ms)].
fn p99_over_time(timeline: &[(f64, f64)], step: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < timeline.len() {
        let bucket = (timeline[i].0 / step).floor();
        let mut values: Vec<f64> = Vec::new();
        while i < timeline.len() && (timeline[i].0 / step).floor() == bucket {
            values.push(timeline[i].1);
            i += 1;
        }
        values.sort_by(f64::total_cmp);
        let at = ((values.len() as f64 * 0.99).ceil() as usize).clamp(1, values.len()) - 1;
        out.push(((bucket + 0.5) * step, values[at]));
    }
    out
}

/// Publishes `count` high-lane messages (sequence numbers from `first`) at
/// `rate`, open loop, each stamped with its intended send time.
async fn high_lane(
    clients: &[PublisherClient<crate::broker::Channel>],
    queue: &str,
    rate: u64,
    first: u64,
    count: u64,
    filler: &Bytes,
    recorder: &Arc<Recorder>,
) -> anyhow::Result<()> {
    let interval_ns = 1_000_000_000 / rate;
    let permits = Arc::new(Semaphore::new(4096));
    let runtime = tokio::runtime::Handle::current();
    let (clients, queue, filler, recorder) = (clients.to_vec(), queue.to_owned(), filler.clone(), Arc::clone(recorder));
    let generator = load::open_loop(count, Instant::now(), interval_ns, move |sent, at| {
        let permit = runtime.block_on(Arc::clone(&permits).acquire_owned())?;
        let (seq, intended) = (first + sent, u64::try_from((at - recorder.start).as_nanos()).unwrap_or(u64::MAX));
        let mut payload = BytesMut::with_capacity(filler.len() + 16);
        payload.put_u64_le(seq);
        payload.put_u64_le(intended);
        payload.put_slice(&filler);
        let message = pb::Message { payload: payload.freeze(), lane: Some(HIGH), ..Default::default() };
        let mut client = clients[(sent % clients.len() as u64) as usize].clone();
        let (queue, recorder) = (queue.clone(), Arc::clone(&recorder));
        Ok(runtime.spawn(async move {
            let result = client.publish(pb::PublishRequest { queue, message: Some(message) }).await;
            if let Some(phase) = recorder.phase(seq) {
                let us = (load::nanos_since(recorder.start).saturating_sub(intended) / 1000).max(1);
                let _ = recorder.durable[phase].lock().expect("histogram lock").record(us);
            }
            drop(permit);
            result.map(|_| ()).map_err(|s| anyhow::anyhow!("high-lane publish: {s}"))
        }))
    });
    let calls = load::join_open_loop(generator).await?;
    for call in calls {
        call.await??;
    }
    Ok(())
}

/// Floods the low lane at `rate` in batches until `stop`; returns how many
/// messages it stored.
async fn flood_low(
    client: PublisherClient<crate::broker::Channel>,
    queue: &'static str,
    rate: u64,
    batch: usize,
    payload: Bytes,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, u64)> {
    let stored = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut sent = 0u64;
    let permits = Arc::new(Semaphore::new(64));
    let mut calls = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let due = (began.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent + batch as u64 <= due {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let messages = (0..batch)
                .map(|_| pb::Message { payload: payload.clone(), lane: Some(LOW), ..Default::default() })
                .collect();
            let mut client = client.clone();
            let (stored, refused) = (Arc::clone(&stored), Arc::clone(&refused));
            calls.push(tokio::spawn(async move {
                let result = client.publish_batch(pb::PublishBatchRequest { queue: queue.into(), messages }).await;
                drop(permit);
                match result {
                    Ok(response) => stored.fetch_add(response.into_inner().receipts.len() as u64, Ordering::Relaxed),
                    // A quota (--quota) refuses what it cannot take.
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(status) => return Err(anyhow::anyhow!("low-lane flood publish: {status}")),
                };
                Ok::<_, anyhow::Error>(())
            }));
            sent += batch as u64;
        }
        if calls.len() > 1024 {
            calls.retain(|c| !c.is_finished());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for call in calls {
        call.await??;
    }
    Ok((stored.load(Ordering::Relaxed), refused.load(Ordering::Relaxed)))
}

async fn wait_delivered(counter: &AtomicU64, count: u64, bound: Duration) -> anyhow::Result<()> {
    let began = Instant::now();
    while counter.load(Ordering::Relaxed) < count {
        if began.elapsed() > bound {
            anyhow::bail!(
                "only {} of {count} high-lane messages delivered after {} s",
                counter.load(Ordering::Relaxed),
                bound.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The priority chart: high-lane p99 over time, baseline then flood; and the
/// two distributions.
pub fn chart(path: &Path, result: &serde_json::Value) -> anyhow::Result<()> {
    let points: Vec<(f64, f64)> = result["high_delivery_p99_over_time"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?))).collect())
        .unwrap_or_default();
    let flood_start = result["phases"]["flood_start_s"].as_f64().unwrap_or(0.0);
    let flood_end = result["phases"]["flood_end_s"].as_f64().unwrap_or(0.0);
    chart::write(
        path,
        "ballast-bench priority: high-lane publish-to-delivery p99 (250 ms buckets)",
        chart::XAxis::Time,
        &[(flood_start, "low-lane flood starts"), (flood_end, "flood stops")],
        &[Panel::new("High lane, p99 per 250 ms", "ms", vec![Series::new("high-lane delivery p99", points)])],
    )
}
