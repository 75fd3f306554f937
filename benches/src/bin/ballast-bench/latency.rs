//! `latency`: an open-loop producer at a fixed rate; publish-to-durable and
//! publish-to-delivery latency, both measured from each message's intended
//! send time (so a stalled broker cannot hide queueing delay: coordinated
//! omission is corrected by construction).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ballast_proto::v1::{self as pb, publisher_client::PublisherClient};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Semaphore;

use crate::{Sync, broker::Target, load};

#[derive(Debug, Clone, clap::Args)]
// No argument group: isolation flattens these into its own arguments.
#[group(skip)]
pub struct Args {
    /// Offered rate, messages per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Producer connections (calls are spread over them).
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Calls in flight at most; past it the generator waits (and the wait
    /// shows in the latencies).
    #[arg(long, default_value_t = 4096)]
    pub inflight: usize,
    /// How messages travel: `raw` (one unary Publish per message through
    /// generated stubs, consumed by a raw stream) or `client` (the client
    /// library: one `Producer` with no linger, each message published on
    /// its own, and a `Consumer` with prefetch 1,000).
    #[arg(long, value_enum, default_value_t = Via::Raw)]
    pub via: Via,
}

/// See [`Args::via`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Raw,
    Client,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.size >= 16 && args.rate > 0 && args.producers > 0, "size >= 16, rate and producers > 0");
    let queue = "bench-latency";
    target.fresh_queue(queue, sync.settings()).await?;
    let m = measure(target, queue, args).await?;
    println!(
        "latency: {} msg/s offered for {} s (+{} s warm-up), {} B, {}, sync {:?}",
        args.rate,
        args.seconds,
        args.warmup,
        args.size,
        match args.via {
            Via::Raw => format!("{} producer connections, raw stubs", args.producers),
            Via::Client => "the client library (Producer, linger 0; Consumer)".to_owned(),
        },
        sync
    );
    m.print();
    Ok(serde_json::json!({
        "scenario": "latency", "tls": target.tls(), "rate": args.rate, "size": args.size, "seconds": args.seconds,
        "warmup": args.warmup, "producers": args.producers, "via": format!("{:?}", args.via).to_lowercase(), "sync": format!("{sync:?}").to_lowercase(),
        "achieved_rate": m.achieved_rate,
        "publish_to_durable": load::percentiles(&m.durable),
        "publish_to_delivery": load::percentiles(&m.delivered),
        "send_lag": load::percentiles(&m.send_lag),
        "curves": {
            "publish_to_durable": crate::chart::percentile_curve(&m.durable),
            "publish_to_delivery": crate::chart::percentile_curve(&m.delivered),
        },
    }))
}

/// The latency chart: both distributions by percentile.
pub fn chart(path: &std::path::Path, result: &serde_json::Value) -> anyhow::Result<()> {
    let curve = |key: &str| -> Vec<(f64, f64)> {
        result["curves"][key]
            .as_array()
            .map(|a| a.iter().filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?))).collect())
            .unwrap_or_default()
    };
    let title = format!(
        "ballast-bench latency: {} msg/s offered, {} B, sync {}",
        result["rate"],
        result["size"],
        result["sync"].as_str().unwrap_or("?")
    );
    crate::chart::write(
        path,
        &title,
        crate::chart::XAxis::Nines,
        &[],
        &[crate::chart::Panel::new(
            "Latency by percentile (from the intended send time)",
            "ms",
            vec![
                crate::chart::Series::new("publish-to-durable", curve("publish_to_durable")),
                crate::chart::Series::new("publish-to-delivery", curve("publish_to_delivery")),
            ],
        )],
    )
}

/// What one open-loop run measured.
#[derive(Debug)]
pub struct Measured {
    pub achieved_rate: f64,
    pub durable: hdrhistogram::Histogram<u64>,
    pub delivered: hdrhistogram::Histogram<u64>,
    /// How late the generator sent each message after its intended time:
    /// the load tool's own share of the latencies above.
    pub send_lag: hdrhistogram::Histogram<u64>,
}

impl Measured {
    pub fn print(&self) {
        println!("  achieved offer: {:.0} msg/s", self.achieved_rate);
        load::print_percentile_header();
        load::print_percentiles("publish-to-durable", &self.durable);
        load::print_percentiles("publish-to-delivery", &self.delivered);
        load::print_percentiles("send lag (generator)", &self.send_lag);
    }
}

/// Runs the open-loop producer and one consumer on `queue` (which must
/// exist and be empty).
pub async fn measure(target: &Target, queue: &str, args: &Args) -> anyhow::Result<Measured> {
    if args.via == Via::Client {
        return measure_client(target, queue, args).await;
    }
    let total = args.rate * (args.seconds + args.warmup);
    let warmup_count = args.rate * args.warmup;
    let interval_ns = 1_000_000_000 / args.rate;
    let start = Instant::now();
    let intended = move |seq: u64| start + Duration::from_nanos(seq * interval_ns);

    // The consumer: delivery latency from the intended send time.
    let delivered = Arc::new(Mutex::new(load::histogram()));
    let consumer = {
        let delivered = Arc::clone(&delivered);
        let channels = vec![target.channel().await?];
        let queue = queue.to_owned();
        tokio::spawn(async move {
            let on_delivery = Arc::new(move |d: &pb::Delivery| {
                let seq = u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
                if seq >= warmup_count {
                    let us = intended(seq).elapsed().as_micros().max(1) as u64;
                    let _ = delivered.lock().expect("histogram lock").record(us);
                }
            });
            load::consume(&channels, &queue, 1, 1000, total, on_delivery).await
        })
    };

    let mut clients = Vec::new();
    for _ in 0..args.producers {
        clients.push(PublisherClient::new(target.channel().await?));
    }
    let producers = args.producers as u64;
    let queue_name = queue.to_owned();
    let (durable, send_lag, achieved_rate) = publish_open_loop(args, start, move |seq, payload| {
        let message = pb::Message { payload, ..Default::default() };
        let mut client = clients[(seq % producers) as usize].clone();
        let queue = queue_name.clone();
        async move {
            client
                .publish(pb::PublishRequest { queue, message: Some(message) })
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await?;
    tokio::time::timeout(Duration::from_secs(120), consumer).await???;
    let delivered = delivered.lock().expect("histogram lock").clone();
    Ok(Measured { achieved_rate, durable, delivered, send_lag })
}

/// [`measure`] through the client library: a `Producer` (no linger; each
/// message published by its own task, as an application publishing one
/// message per request would) and a `Consumer` (prefetch 1,000).
async fn measure_client(target: &Target, queue: &str, args: &Args) -> anyhow::Result<Measured> {
    let total = args.rate * (args.seconds + args.warmup);
    let warmup_count = args.rate * args.warmup;
    let interval_ns = 1_000_000_000 / args.rate;
    let client = ballast_client::Client::connect(&target.endpoint).await?;
    let start = Instant::now();
    let intended = move |seq: u64| start + Duration::from_nanos(seq * interval_ns);

    let delivered = Arc::new(Mutex::new(load::histogram()));
    let consumer_config = ballast_client::ConsumerConfig {
        prefetch: 1000,
        concurrency: 1000,
        max_messages: Some(total),
        ..ballast_client::ConsumerConfig::default()
    };
    let consumer = {
        let delivered = Arc::clone(&delivered);
        client.consumer(queue, consumer_config)?.spawn(move |d: ballast_client::Delivery| {
            let seq = u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
            if seq >= warmup_count {
                let us = intended(seq).elapsed().as_micros().max(1) as u64;
                let _ = delivered.lock().expect("histogram lock").record(us);
            }
            std::future::ready(Ok::<(), String>(()))
        })
    };

    let producer_config = ballast_client::ProducerConfig {
        linger: Duration::ZERO,
        pending_count_max: args.inflight,
        ..ballast_client::ProducerConfig::default()
    };
    let producer = Arc::new(client.producer(producer_config)?);
    let queue_name = queue.to_owned();
    let (durable, send_lag, achieved_rate) = publish_open_loop(args, start, move |_seq, payload| {
        let producer = Arc::clone(&producer);
        let queue = queue_name.clone();
        async move {
            producer
                .publish(&queue, ballast_client::Message::new(payload))
                .await
                .map(|_| ())
                .map_err(anyhow::Error::from)
        }
    })
    .await?;
    let stats = tokio::time::timeout(Duration::from_secs(120), consumer.join()).await??;
    anyhow::ensure!(stats.acked >= total, "the consumer acked {} of {total}", stats.acked);
    let delivered = delivered.lock().expect("histogram lock").clone();
    Ok(Measured { achieved_rate, durable, delivered, send_lag })
}

/// The open loop both paths share: at each intended send time (from
/// `start`), a payload holding the sequence number then filler is handed
/// to `publish`, in a task of its own, at most `args.inflight` at once.
/// Returns the publish-to-durable and send-lag histograms (warm-up left
/// out) and the achieved offer rate.
async fn publish_open_loop<P, F>(
    args: &Args,
    start: Instant,
    publish: P,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>, f64)>
where
    P: Fn(u64, Bytes) -> F + Send + 'static,
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let total = args.rate * (args.seconds + args.warmup);
    let warmup_count = args.rate * args.warmup;
    let interval_ns = 1_000_000_000 / args.rate;
    let durable = Arc::new(Mutex::new(load::histogram()));
    let send_lag = Arc::new(Mutex::new(load::histogram()));
    let permits = Arc::new(Semaphore::new(args.inflight));
    let filler = Bytes::from(vec![b'x'; args.size - 8]);
    let runtime = tokio::runtime::Handle::current();
    let size = args.size;
    let generator = {
        let durable = Arc::clone(&durable);
        let send_lag = Arc::clone(&send_lag);
        load::open_loop(total, start, interval_ns, move |seq, at| {
            let permit = runtime.block_on(Arc::clone(&permits).acquire_owned())?;
            let mut payload = BytesMut::with_capacity(size);
            payload.put_u64_le(seq);
            payload.put_slice(&filler);
            let durable = Arc::clone(&durable);
            if seq >= warmup_count {
                let us = Instant::now().saturating_duration_since(at).as_micros().max(1) as u64;
                let _ = send_lag.lock().expect("histogram lock").record(us);
            }
            let published = publish(seq, payload.freeze());
            Ok(runtime.spawn(async move {
                let result = published.await;
                if seq >= warmup_count {
                    let us = at.elapsed().as_micros().max(1) as u64;
                    let _ = durable.lock().expect("histogram lock").record(us);
                }
                drop(permit);
                result
            }))
        })
    };
    let calls = load::join_open_loop(generator).await?;
    for call in calls {
        call.await??;
    }
    let achieved_rate = load::rate(total, start.elapsed());
    let durable = durable.lock().expect("histogram lock").clone();
    let send_lag = send_lag.lock().expect("histogram lock").clone();
    Ok((durable, send_lag, achieved_rate))
}
