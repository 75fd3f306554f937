//! `cold`: does a read that faults on a runtime worker hurt other queues?
//! Dispatch reads records through the segment's map under the queue's
//! delivery mutex, on a tokio worker; a record whose page is not in the
//! page cache is a disk read there. This scenario puts a backlog of
//! `--backlog-mb` on one queue, drops the page cache (`--drop-caches`,
//! needs root and the broker on this machine), and measures a steady
//! queue's open-loop latency alone, then while the cold backlog is drained
//! as fast as its consumers go. The p99 ratio during / alone says whether
//! the faults matter; the broker's disk reads during the drain
//! (`/proc/<pid>/io` `read_bytes`) say whether the backlog really came from
//! the disk. `--drop-caches false` is the warm control (same drain, from
//! the page cache).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use ballast_proto::v1 as pb;

use crate::{Sync, broker::Target, latency, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    steady: latency::Args,
    /// The cold queue's backlog, MiB of payload.
    #[arg(long, default_value_t = 1024)]
    backlog_mb: u64,
    /// Payload size of the backlog's messages, bytes.
    #[arg(long, default_value_t = 4096)]
    backlog_size: usize,
    /// Consumers draining the cold queue (each on its own stream).
    #[arg(long, default_value_t = 2)]
    drain_consumers: usize,
    /// Credit of each draining consumer.
    #[arg(long, default_value_t = 1000)]
    drain_credit: u32,
    /// Drop the page cache before the drain (`sync`, then `3` into
    /// `/proc/sys/vm/drop_caches`): the backlog is then read from the disk.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    drop_caches: bool,
}

pub async fn run(target: &Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(args.backlog_size >= 16 && args.drain_consumers > 0, "backlog size >= 16, drain consumers > 0");
    let (steady, cold) = ("bench-steady", "bench-cold");
    let big = pb::QueueSettings { max_messages: Some(1_000_000_000), max_bytes: Some(1 << 40), ..sync.settings() };
    target.fresh_queue(cold, big).await?;
    let total = (args.backlog_mb << 20) / args.backlog_size as u64;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(target.channel().await?);
    }
    let (took, _) = load::publish_all(&channels, cold, total, args.backlog_size, 100, 4, false).await?;
    eprintln!("cold: {total} messages ({} MiB) published in {:.1} s", args.backlog_mb, took.as_secs_f64());

    target.fresh_queue(steady, sync.settings()).await?;
    let alone = latency::measure(target, steady, &args.steady).await?;

    if args.drop_caches {
        drop_caches()?;
    }
    let reads_before = target.pid().and_then(read_bytes);
    // The drain runs on its own threads, as another client process would.
    let drain_runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("drain").enable_all().build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicU64::new(0));
    let mut drains = Vec::new();
    for i in 0..args.drain_consumers {
        let channel = channels[i % channels.len()].clone();
        let (stop, counted) = (Arc::clone(&stop), Arc::clone(&drained));
        let count: load::OnDelivery = Arc::new(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let credit = args.drain_credit;
        drains.push(drain_runtime.spawn(load::consume_paced(
            channel,
            cold.to_owned(),
            0.0,
            credit,
            stop,
            count,
            Arc::new(|_| {}),
        )));
    }
    target.fresh_queue(steady, sync.settings()).await?;
    let drain_start = Instant::now();
    let during = latency::measure(target, steady, &args.steady).await?;
    let drain_seconds = drain_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for drain in drains {
        drain.await??;
    }
    drain_runtime.shutdown_background();
    let drained = drained.load(Ordering::Relaxed);
    let disk_read = reads_before.zip(target.pid().and_then(read_bytes)).map(|(before, after)| after - before);

    println!(
        "cold: steady queue at {} msg/s ({} B, sync {sync:?}); cold backlog {} MiB of {} B messages, caches {}",
        args.steady.rate,
        args.steady.size,
        args.backlog_mb,
        args.backlog_size,
        if args.drop_caches { "dropped" } else { "kept (warm control)" }
    );
    println!("-- steady queue alone");
    alone.print();
    println!("-- steady queue while the cold backlog drains");
    during.print();
    let drained_mb_per_s = (drained * args.backlog_size as u64) as f64 / f64::from(1 << 20) / drain_seconds;
    println!(
        "drain: {drained} of {total} messages in {drain_seconds:.1} s ({drained_mb_per_s:.0} MiB/s); \
         broker disk reads {}",
        disk_read.map_or("unknown".to_owned(), |b| format!("{} MiB", b >> 20))
    );
    if drained >= total {
        eprintln!("cold: the backlog ran out before the measurement ended; use a larger --backlog-mb");
    }
    let durable_ratio = load::p99_ratio(&alone.durable, &during.durable);
    let delivery_ratio = load::p99_ratio(&alone.delivered, &during.delivered);
    println!("p99 during / alone: publish-to-durable {durable_ratio:.2}x, publish-to-delivery {delivery_ratio:.2}x");
    Ok(serde_json::json!({
        "scenario": "cold", "steady_rate": args.steady.rate, "size": args.steady.size,
        "sync": format!("{sync:?}").to_lowercase(), "backlog_mb": args.backlog_mb,
        "backlog_size": args.backlog_size, "backlog_messages": total, "drop_caches": args.drop_caches,
        "drained": drained, "drained_all": drained >= total, "drain_seconds": drain_seconds,
        "drained_mb_per_s": drained_mb_per_s, "broker_disk_read_bytes": disk_read,
        "alone": { "publish_to_durable": load::percentiles(&alone.durable), "publish_to_delivery": load::percentiles(&alone.delivered) },
        "during": { "publish_to_durable": load::percentiles(&during.durable), "publish_to_delivery": load::percentiles(&during.delivered) },
        "p99_ratio_publish_to_durable": durable_ratio, "p99_ratio_publish_to_delivery": delivery_ratio,
    }))
}

/// Writes back dirty pages, then drops the clean ones (page cache, dentries
/// and inodes) machine-wide.
fn drop_caches() -> anyhow::Result<()> {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").map_err(|e| {
        anyhow::anyhow!(
            "dropping the page cache: {e} (needs root and the broker on this machine; \
             --drop-caches false runs the warm control)"
        )
    })
}

/// Bytes the process `pid` made the storage layer fetch (`read_bytes` in
/// `/proc/<pid>/io`), if readable.
fn read_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines().find_map(|line| line.strip_prefix("read_bytes: ")?.trim().parse().ok())
}
