//! `backlog`: the broker's anonymous memory (RssAnon) with an empty queue,
//! after publishing a large backlog, and after a restart that recovers it.
//! The backlog lives in segment files and the page cache (file-backed
//! memory, not counted in RssAnon); what the process itself holds must not
//! grow with it.

use std::time::Instant;

use crate::{Sync, broker::Target, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Backlog to build, in messages.
    #[arg(long, default_value_t = 10_000_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages per publish call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: usize,
}

const MIB: f64 = 1024.0 * 1024.0;

pub async fn run(target: &mut Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    let pid = target
        .pid()
        .ok_or_else(|| anyhow::anyhow!("backlog measures the broker's memory: let the bench start it (no --addr)"))?;
    let queue = "bench-backlog";
    // Limits out of the way: the backlog is the point (admission would
    // refuse past the default 1,000,000 messages or 1 GiB).
    let settings = ballast_proto::v1::QueueSettings {
        max_messages: Some(1_000_000_000_000),
        max_bytes: Some(1 << 50),
        ..sync.settings()
    };
    target.fresh_queue(queue, settings).await?;
    let empty = crate::broker::rss_anon(pid)?;
    let mut channels = Vec::new();
    for _ in 0..args.producers {
        channels.push(target.channel().await?);
    }
    let (elapsed, _) = load::publish_all(&channels, queue, args.messages, args.size, args.batch, 1, false).await?;
    let full = crate::broker::rss_anon(pid)?;
    anyhow::ensure!(target.depth(queue).await? == args.messages, "the backlog is not all there");
    drop(channels);
    let restart = target.kill_and_restart()?;
    let opened = Instant::now();
    let depth = target.depth(queue).await?;
    let first_call = opened.elapsed();
    let pid = target.pid().expect("restarted by the bench");
    let recovered = crate::broker::rss_anon(pid)?;
    anyhow::ensure!(depth == args.messages, "after a restart the depth is {depth}, not {}", args.messages);
    println!(
        "backlog: {} messages of {} B published in {:.1} s ({:.0} msg/s)",
        args.messages,
        args.size,
        elapsed.as_secs_f64(),
        load::rate(args.messages, elapsed)
    );
    println!("  broker RssAnon, empty queue:        {:>8.1} MiB", empty as f64 / MIB);
    println!(
        "  broker RssAnon, backlog built:      {:>8.1} MiB (+{:.1} MiB)",
        full as f64 / MIB,
        (full as f64 - empty as f64) / MIB
    );
    println!("  broker RssAnon, after kill+restart: {:>8.1} MiB", recovered as f64 / MIB);
    println!(
        "  restart after SIGKILL: listening in {:.3} s, first answer {:.3} s later",
        restart.as_secs_f64(),
        first_call.as_secs_f64()
    );
    Ok(serde_json::json!({
        "scenario": "backlog", "messages": args.messages, "size": args.size,
        "publish_seconds": elapsed.as_secs_f64(),
        "rss_anon_empty_bytes": empty, "rss_anon_backlog_bytes": full, "rss_anon_after_restart_bytes": recovered,
        "restart_listening_seconds": restart.as_secs_f64(), "restart_first_answer_seconds": first_call.as_secs_f64(),
    }))
}
