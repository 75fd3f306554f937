//! `spike`: the shock absorber. Producers offer a steady rate, then burst at
//! many times what the consumers can take, then stop; the consumers keep
//! their own pace throughout. Sampled over time: offered, accepted and
//! refused (by lane) rates, depth, saturation, the broker's drain estimate,
//! consumer rate, publish-to-delivery p99 and the broker's RssAnon. At the
//! end every accepted message must have been delivered (lost = 0, counted
//! by message sequence number), and the only errors allowed are admission
//! refusals (RESOURCE_EXHAUSTED), counted per lane.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_proto::v1::{self as pb, publisher_client::PublisherClient};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Semaphore;

use crate::{
    Sync,
    broker::{Target, rss_anon},
    chart::{self, Panel, Series},
    load,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// What the consumers process together, messages per second.
    #[arg(long, default_value_t = 5000)]
    consumer_rate: u64,
    /// Consumer streams (the rate is split evenly among them).
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Credit (prefetch window) per consumer stream.
    #[arg(long, default_value_t = 200)]
    credit: u32,
    /// Offered rate before the burst, messages per second.
    #[arg(long, default_value_t = 2500)]
    steady_rate: u64,
    /// Seconds of steady traffic before the burst.
    #[arg(long, default_value_t = 3.0)]
    steady_seconds: f64,
    /// Burst rate as a multiple of the consumer rate.
    #[arg(long, default_value_t = 10.0)]
    burst_factor: f64,
    /// Seconds the burst lasts; then the producers stop.
    #[arg(long, default_value_t = 5.0)]
    burst_seconds: f64,
    /// Longest wait for the backlog to drain after the burst, in seconds
    /// [default: 3 x max_messages / consumer_rate + 10].
    #[arg(long)]
    drain_max_seconds: Option<f64>,
    /// The queue's max_messages (admission shows once the burst fills it).
    #[arg(long, default_value_t = 50_000)]
    max_messages: u64,
    /// The queue's max_bytes.
    #[arg(long, default_value_t = 1 << 30)]
    max_bytes: u64,
    /// Share of the offered messages per lane, high,normal,low.
    #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [10, 30, 60])]
    mix: Vec<u32>,
    /// Messages per publish call at most (each call is one lane).
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Publish calls in flight at most (past it the offered rate falls short,
    /// which the table shows).
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Sampling interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
}

const LANES: usize = 3;
const LANE_NAMES: [&str; LANES] = ["high", "normal", "low"];
const ACCEPTED: u8 = 1;
const REFUSED: u8 = 2;
const DELIVERED: u8 = 4;
const IN_DOUBT: u8 = 8;

/// Counters shared by producers, consumers and the sampler.
#[derive(Debug, Default)]
struct Shared {
    offered: AtomicU64,
    accepted: [AtomicU64; LANES],
    refused: [AtomicU64; LANES],
    refused_disk: AtomicU64,
    delivered: AtomicU64,
    duplicates: AtomicU64,
    processed: AtomicU64,
    errors: AtomicU64,
    error_messages: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut messages = self.error_messages.lock().expect("error list lock");
        if messages.len() < 10 {
            messages.push(message);
        }
    }
}

/// The offered-load schedule: steady, then burst, then nothing.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    steady_rate: f64,
    steady_s: f64,
    burst_rate: f64,
    burst_s: f64,
}

impl Schedule {
    fn steady_count(&self) -> u64 {
        (self.steady_rate * self.steady_s) as u64
    }
    fn total(&self) -> u64 {
        self.steady_count() + (self.burst_rate * self.burst_s) as u64
    }
    /// Messages due `t` seconds after the start.
    fn due(&self, t: f64) -> u64 {
        if t < self.steady_s {
            (self.steady_rate * t) as u64
        } else {
            (self.steady_count() + (self.burst_rate * (t - self.steady_s)) as u64).min(self.total())
        }
    }
    /// When message `seq` is due, in seconds since the start.
    fn intended(&self, seq: u64) -> f64 {
        if seq < self.steady_count() {
            seq as f64 / self.steady_rate
        } else {
            self.steady_s + (seq - self.steady_count()) as f64 / self.burst_rate
        }
    }
    fn phase(&self, t: f64) -> &'static str {
        if t < self.steady_s {
            "steady"
        } else if t < self.steady_s + self.burst_s {
            "burst"
        } else {
            "drain"
        }
    }
}

/// One sampling interval.
#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    t_s: f64,
    phase: &'static str,
    offered_per_s: f64,
    accepted_per_s: f64,
    refused_per_s: [f64; LANES],
    consumed_per_s: f64,
    depth: u64,
    lane_depths: Vec<u64>,
    saturation: f64,
    drain_estimate_s: Option<f64>,
    broker_ack_rate: f64,
    delivery_p99_ms: Option<f64>,
    delivery_max_ms: Option<f64>,
    rss_anon_bytes: Option<u64>,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.size >= 16, "--size must be at least 16 (sequence number and time stamp)");
    anyhow::ensure!(
        args.consumer_rate > 0 && args.consumers > 0 && args.producers > 0 && args.batch > 0 && args.inflight > 0,
        "rates and counts must be positive"
    );
    anyhow::ensure!(args.mix.len() == LANES && args.mix.iter().sum::<u32>() > 0, "--mix takes three shares");
    let queue = "bench-spike";
    let settings =
        pb::QueueSettings { max_messages: Some(args.max_messages), max_bytes: Some(args.max_bytes), ..sync.settings() };
    target.fresh_queue(queue, settings).await?;
    let schedule = Schedule {
        steady_rate: args.steady_rate.max(1) as f64,
        steady_s: if args.steady_rate == 0 { 0.0 } else { args.steady_seconds },
        burst_rate: args.consumer_rate as f64 * args.burst_factor,
        burst_s: args.burst_seconds,
    };
    let total = schedule.total();
    let drain_max = args.drain_max_seconds.unwrap_or(3.0 * args.max_messages as f64 / args.consumer_rate as f64 + 10.0);
    let shared = Arc::new(Shared::default());
    let states: Arc<Vec<AtomicU8>> = Arc::new((0..total).map(|_| AtomicU8::new(0)).collect());
    let interval_hist = Arc::new(Mutex::new(load::histogram()));
    let all_hist = Arc::new(Mutex::new(load::histogram()));
    let pid = target.pid();
    let rss_start = pid.map(rss_anon).transpose()?;
    let stats_channel = target.channel().await?;
    let start = Instant::now();

    // Consumers at a steady pace.
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let (shared_r, states_r, interval_hist, all_hist) =
            (Arc::clone(&shared), Arc::clone(&states), Arc::clone(&interval_hist), Arc::clone(&all_hist));
        let on_receive: load::OnDelivery = Arc::new(move |d: &pb::Delivery| {
            let seq = u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
            let sent = u64::from_le_bytes(d.payload[8..16].try_into().expect("8 bytes"));
            let us = (load::nanos_since(start).saturating_sub(sent) / 1000).max(1);
            let _ = interval_hist.lock().expect("histogram lock").record(us);
            let _ = all_hist.lock().expect("histogram lock").record(us);
            let Some(state) = states_r.get(seq as usize) else {
                shared_r.error(format!("delivered an unknown sequence number {seq}"));
                return;
            };
            if state.fetch_or(DELIVERED, Ordering::Relaxed) & DELIVERED != 0 {
                shared_r.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                shared_r.delivered.fetch_add(1, Ordering::Relaxed);
            }
        });
        let shared_p = Arc::clone(&shared);
        let on_process: load::OnDelivery = Arc::new(move |_| {
            shared_p.processed.fetch_add(1, Ordering::Relaxed);
        });
        let (channel, stop, shared) = (target.channel().await?, Arc::clone(&stop_consumers), Arc::clone(&shared));
        let rate = args.consumer_rate as f64 / args.consumers as f64;
        let credit = args.credit;
        consumers.push(tokio::spawn(async move {
            if let Err(e) = load::consume_paced(channel, queue.into(), rate, credit, stop, on_receive, on_process).await
            {
                shared.error(format!("consumer: {e:#}"));
            }
        }));
    }

    // The sampler.
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (shared, stop, interval_hist) =
            (Arc::clone(&shared), Arc::clone(&stop_sampler), Arc::clone(&interval_hist));
        let channel = stats_channel.clone();
        let interval = Duration::from_millis(args.interval_ms.max(50));
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut last = (Instant::now(), 0u64, 0u64, [0u64; LANES], 0u64);
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let last_round = stop.load(Ordering::Relaxed);
                let now = Instant::now();
                let dt = now.duration_since(last.0).as_secs_f64();
                let offered = shared.offered.load(Ordering::Relaxed);
                let accepted: u64 = shared.accepted.iter().map(|a| a.load(Ordering::Relaxed)).sum();
                let refused: [u64; LANES] = std::array::from_fn(|l| shared.refused[l].load(Ordering::Relaxed));
                let processed = shared.processed.load(Ordering::Relaxed);
                let hist = std::mem::replace(&mut *interval_hist.lock().expect("histogram lock"), load::histogram());
                let stats = Target::stats_on(&channel, queue).await?;
                let figures = stats.saturation.unwrap_or_default();
                let t = now.duration_since(start).as_secs_f64();
                samples.push(Sample {
                    t_s: t,
                    phase: schedule.phase(t - dt / 2.0),
                    offered_per_s: (offered - last.1) as f64 / dt,
                    accepted_per_s: (accepted - last.2) as f64 / dt,
                    refused_per_s: std::array::from_fn(|l| (refused[l] - last.3[l]) as f64 / dt),
                    consumed_per_s: (processed - last.4) as f64 / dt,
                    depth: figures.depth,
                    lane_depths: stats.lanes.iter().map(|l| l.saturation.unwrap_or_default().depth).collect(),
                    saturation: figures.saturation,
                    drain_estimate_s: figures.drain_estimate_ms.map(|ms| ms as f64 / 1000.0),
                    broker_ack_rate: figures.ack_rate,
                    delivery_p99_ms: (!hist.is_empty()).then(|| hist.value_at_quantile(0.99) as f64 / 1000.0),
                    delivery_max_ms: (!hist.is_empty()).then(|| hist.max() as f64 / 1000.0),
                    rss_anon_bytes: pid.and_then(|p| rss_anon(p).ok()),
                });
                last = (now, offered, accepted, refused, processed);
                if last_round {
                    return Ok::<_, anyhow::Error>((samples, stats));
                }
            }
        })
    };

    // The producers: open loop on the schedule, one lane per call.
    let mut clients = Vec::new();
    for _ in 0..args.producers {
        clients.push(PublisherClient::new(target.channel().await?));
    }
    let permits = Arc::new(Semaphore::new(args.inflight));
    let filler = Bytes::from(vec![b's'; args.size - 16]);
    let mix_total = u64::from(args.mix.iter().sum::<u32>());
    let lane_of = |seq: u64| {
        let mut r = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % mix_total;
        for (lane, &share) in args.mix.iter().enumerate() {
            if r < u64::from(share) {
                return lane;
            }
            r -= u64::from(share);
        }
        LANES - 1
    };
    let mut seq = 0u64;
    let mut calls = Vec::new();
    let mut next_client = 0usize;
    while seq < total {
        let due = schedule.due(start.elapsed().as_secs_f64());
        // Due messages, grouped into calls of one lane each.
        let mut pending: [Vec<u64>; LANES] = Default::default();
        let mut batches = Vec::new();
        while seq < due {
            let lane = lane_of(seq);
            pending[lane].push(seq);
            if pending[lane].len() >= args.batch {
                batches.push((lane, std::mem::take(&mut pending[lane])));
            }
            seq += 1;
        }
        batches.extend(pending.into_iter().enumerate().filter(|(_, seqs)| !seqs.is_empty()));
        for (lane, seqs) in batches {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let mut client = clients[next_client % clients.len()].clone();
            next_client += 1;
            let messages = seqs
                .iter()
                .map(|&s| {
                    let mut payload = BytesMut::with_capacity(args.size);
                    payload.put_u64_le(s);
                    payload.put_u64_le((schedule.intended(s) * 1e9) as u64);
                    payload.put_slice(&filler);
                    pb::Message { payload: payload.freeze(), lane: Some(lane as u32), ..Default::default() }
                })
                .collect();
            let (shared, states) = (Arc::clone(&shared), Arc::clone(&states));
            shared.offered.fetch_add(seqs.len() as u64, Ordering::Relaxed);
            calls.push(tokio::spawn(async move {
                let result = client.publish_batch(pb::PublishBatchRequest { queue: queue.into(), messages }).await;
                let n = seqs.len() as u64;
                let mark = match result {
                    Ok(_) => {
                        shared.accepted[lane].fetch_add(n, Ordering::Relaxed);
                        ACCEPTED
                    }
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        shared.refused[lane].fetch_add(n, Ordering::Relaxed);
                        if status.metadata().contains_key("ballast-disk-free-bytes") {
                            shared.refused_disk.fetch_add(n, Ordering::Relaxed);
                        }
                        REFUSED
                    }
                    Err(status) => {
                        shared.error(format!("publish: {status}"));
                        IN_DOUBT
                    }
                };
                for s in seqs {
                    states[s as usize].fetch_or(mark, Ordering::Relaxed);
                }
                drop(permit);
            }));
        }
        if calls.len() > 4096 {
            calls.retain(|c| !c.is_finished());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for call in calls {
        call.await?;
    }
    let offered_done = start.elapsed().as_secs_f64();

    // Drain: until every accepted message was processed and the queue is
    // empty, or the bound.
    let burst_end = schedule.steady_s + schedule.burst_s;
    let mut drained_at = None;
    while start.elapsed().as_secs_f64() < burst_end + drain_max {
        let accepted: u64 = shared.accepted.iter().map(|a| a.load(Ordering::Relaxed)).sum();
        if shared.delivered.load(Ordering::Relaxed) >= accepted
            && shared.processed.load(Ordering::Relaxed) >= accepted
            && Target::stats_on(&stats_channel, queue).await?.saturation.unwrap_or_default().depth == 0
        {
            drained_at = Some(start.elapsed().as_secs_f64());
            break;
        }
        if shared.errors.load(Ordering::Relaxed) > 0 && consumers.iter().all(|c| c.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // One more sample after the drain, then stop.
    tokio::time::sleep(Duration::from_millis(args.interval_ms.max(50))).await;
    stop_sampler.store(true, Ordering::Relaxed);
    let (samples, last_stats) = sampler.await??;
    stop_consumers.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await?;
    }
    let rss_end = pid.map(rss_anon).transpose()?;

    // The accounting, by sequence number.
    let (mut lost, mut refused_but_delivered, mut in_doubt) = (0u64, 0u64, 0u64);
    for state in states.iter() {
        let s = state.load(Ordering::Relaxed);
        if s & ACCEPTED != 0 && s & DELIVERED == 0 {
            lost += 1;
        }
        if s & REFUSED != 0 && s & DELIVERED != 0 {
            refused_but_delivered += 1;
        }
        if s & IN_DOUBT != 0 {
            in_doubt += 1;
        }
    }
    let accepted: [u64; LANES] = std::array::from_fn(|l| shared.accepted[l].load(Ordering::Relaxed));
    let refused: [u64; LANES] = std::array::from_fn(|l| shared.refused[l].load(Ordering::Relaxed));
    let offered = shared.offered.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let duplicates = shared.duplicates.load(Ordering::Relaxed);
    let processed = shared.processed.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let error_messages = shared.error_messages.lock().expect("error list lock").clone();
    let rss_peak = samples.iter().filter_map(|s| s.rss_anon_bytes).chain(rss_start).chain(rss_end).max();
    let depth_peak = samples.iter().map(|s| s.depth).max().unwrap_or(0);
    let saturation_peak = samples.iter().map(|s| s.saturation).fold(0.0, f64::max);
    let all = all_hist.lock().expect("histogram lock").clone();

    print_table(args, sync, &schedule, &samples);
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = |b: Option<u64>| b.map_or_else(|| "n/a".to_owned(), |b| format!("{:.1} MiB", b as f64 / MIB));
    println!(
        "offered {offered} of {total} scheduled; accepted {} (high {}, normal {}, low {}); refused {} (high {}, normal {}, low {}; disk {})",
        accepted.iter().sum::<u64>(),
        accepted[0],
        accepted[1],
        accepted[2],
        refused.iter().sum::<u64>(),
        refused[0],
        refused[1],
        refused[2],
        shared.refused_disk.load(Ordering::Relaxed)
    );
    println!(
        "delivered {delivered} distinct + {duplicates} duplicates, acked {processed}; lost {lost}; refused yet delivered {refused_but_delivered}; unexpected errors {errors}"
    );
    for message in &error_messages {
        println!("  error: {message}");
    }
    match drained_at {
        Some(t) => println!(
            "backlog drained {:.1} s after the burst ended (peak depth {depth_peak}, saturation {:.0}%)",
            t - burst_end,
            saturation_peak * 100.0
        ),
        None => println!("backlog NOT drained within {drain_max:.0} s after the burst"),
    }
    println!("broker RssAnon: start {}, peak {}, end {}", mib(rss_start), mib(rss_peak), mib(rss_end));
    load::print_percentile_header();
    load::print_percentiles("publish-to-delivery", &all);

    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} accepted messages were not delivered"));
    }
    if refused_but_delivered > 0 {
        failures.push(format!("{refused_but_delivered} refused messages were delivered"));
    }
    if errors > 0 {
        failures.push(format!("{errors} unexpected errors"));
    }
    if drained_at.is_none() {
        failures.push(format!("the backlog did not drain within {drain_max:.0} s"));
    }
    let json = serde_json::json!({
        "scenario": "spike", "size": args.size, "sync": format!("{sync:?}").to_lowercase(),
        "consumer_rate": args.consumer_rate, "consumers": args.consumers, "credit": args.credit,
        "steady_rate": args.steady_rate, "steady_seconds": schedule.steady_s,
        "burst_rate": schedule.burst_rate, "burst_seconds": schedule.burst_s,
        "max_messages": args.max_messages, "max_bytes": args.max_bytes, "mix": args.mix,
        "batch": args.batch, "producers": args.producers,
        "scheduled": total, "offered": offered, "offer_seconds": offered_done,
        "accepted": { "total": accepted.iter().sum::<u64>(), "high": accepted[0], "normal": accepted[1], "low": accepted[2] },
        "refused": { "total": refused.iter().sum::<u64>(), "high": refused[0], "normal": refused[1], "low": refused[2],
                     "disk": shared.refused_disk.load(Ordering::Relaxed) },
        "broker_refused_calls": last_stats.refused_queue_full,
        "delivered": delivered, "duplicates": duplicates, "acked": processed, "lost": lost,
        "refused_but_delivered": refused_but_delivered, "in_doubt": in_doubt,
        "unexpected_errors": errors, "error_messages": error_messages,
        "drained": drained_at.is_some(),
        "drain_seconds_after_burst": drained_at.map(|t| t - burst_end),
        "depth_peak": depth_peak, "saturation_peak": saturation_peak,
        "rss_anon_bytes": { "start": rss_start, "peak": rss_peak, "end": rss_end },
        "publish_to_delivery": load::percentiles(&all),
        "samples": samples,
        "failures": failures,
    });
    Ok(json)
}

fn print_table(args: &Args, sync: Sync, schedule: &Schedule, samples: &[Sample]) {
    println!(
        "spike: consumers {} x {:.0} msg/s (credit {}); steady {} msg/s for {} s, burst {:.0} msg/s for {} s; {} B, max_messages {}, mix high/normal/low {:?}, sync {:?}",
        args.consumers,
        args.consumer_rate as f64 / args.consumers as f64,
        args.credit,
        args.steady_rate,
        schedule.steady_s,
        schedule.burst_rate,
        schedule.burst_s,
        args.size,
        args.max_messages,
        args.mix,
        sync
    );
    println!(
        "{:>6} {:<6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>5} {:>8} {:>9} {:>8}",
        "t(s)",
        "phase",
        "offered/s",
        "accept/s",
        "ref.high",
        "ref.norm",
        "ref.low",
        "consume/s",
        "depth",
        "sat%",
        "drain(s)",
        "p99(ms)",
        "rss(MiB)"
    );
    for s in samples {
        let opt = |v: Option<f64>, prec: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"));
        println!(
            "{:>6.1} {:<6} {:>9.0} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>7} {:>5.1} {:>8} {:>9} {:>8}",
            s.t_s,
            s.phase,
            s.offered_per_s,
            s.accepted_per_s,
            s.refused_per_s[0],
            s.refused_per_s[1],
            s.refused_per_s[2],
            s.consumed_per_s,
            s.depth,
            s.saturation * 100.0,
            opt(s.drain_estimate_s, 1),
            opt(s.delivery_p99_ms, 1),
            opt(s.rss_anon_bytes.map(|b| b as f64 / (1024.0 * 1024.0)), 1),
        );
    }
}

/// The spike chart: rates, refusals, depth, saturation, latency and drain
/// estimate, memory, over time.
pub fn chart(path: &Path, result: &serde_json::Value) -> anyhow::Result<()> {
    let samples: Vec<serde_json::Value> = result["samples"].as_array().cloned().unwrap_or_default();
    let series = |name: &str, f: &dyn Fn(&serde_json::Value) -> Option<f64>| {
        Series::new(name, samples.iter().filter_map(|s| Some((s["t_s"].as_f64()?, f(s)?))).collect())
    };
    let field = |key: &'static str| move |s: &serde_json::Value| s[key].as_f64();
    let max_messages = result["max_messages"].as_f64().unwrap_or(0.0);
    let t_end = samples.last().and_then(|s| s["t_s"].as_f64()).unwrap_or(1.0);
    let flat = |name: &str, y: f64| Series::new(name, vec![(0.0, y), (t_end, y)]);
    let panels = vec![
        Panel::new(
            "Offered, accepted and consumed",
            "messages/s",
            vec![
                series("offered", &field("offered_per_s")),
                series("accepted", &field("accepted_per_s")),
                series("consumed (acked)", &field("consumed_per_s")),
            ],
        ),
        Panel::new(
            "Refused (RESOURCE_EXHAUSTED) by lane",
            "messages/s",
            (0..LANES).map(|l| series(LANE_NAMES[l], &|s| s["refused_per_s"][l].as_f64())).collect(),
        ),
        Panel::new(
            "Depth (admission: low refused above 70%, normal above 90%, high at 100% of max_messages)",
            "messages",
            vec![
                series("depth", &|s| s["depth"].as_f64()),
                series("high", &|s| s["lane_depths"][0].as_f64()),
                series("normal", &|s| s["lane_depths"][1].as_f64()),
                series("low", &|s| s["lane_depths"][2].as_f64()),
                flat("max_messages", max_messages),
            ],
        ),
        Panel::new("Saturation", "%", vec![series("saturation", &|s| Some(s["saturation"].as_f64()? * 100.0))]),
        Panel::new(
            "Publish-to-delivery p99 and the broker's drain estimate",
            "seconds",
            vec![
                series("delivery p99", &|s| Some(s["delivery_p99_ms"].as_f64()? / 1000.0)),
                series("drain estimate", &field("drain_estimate_s")),
            ],
        ),
        Panel::new(
            "Broker RssAnon",
            "MiB",
            vec![series("RssAnon", &|s| Some(s["rss_anon_bytes"].as_f64()? / (1024.0 * 1024.0)))],
        ),
    ];
    let steady = result["steady_seconds"].as_f64().unwrap_or(0.0);
    let burst = result["burst_seconds"].as_f64().unwrap_or(0.0);
    chart::write(
        path,
        "ballast-bench spike: the burst becomes backlog, consumers keep their pace",
        chart::XAxis::Time,
        &[(steady, "burst"), (steady + burst, "drain")],
        &panels,
    )
}
