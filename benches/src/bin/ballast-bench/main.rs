//! `ballast-bench`: load scenarios against a real `ballastd`.
//!
//! Each scenario is bounded in messages and time, prints a table and writes
//! JSON (default `target/bench-results/<scenario>.json`). Without `--addr`
//! the bench starts `ballastd` (found next to its own executable) on a fresh
//! data directory and a free loopback port, and stops it at the end.
//!
//! Scenarios with a chart also write an SVG next to the JSON
//! (`spike.svg`, `priority.svg`, `latency.svg`). A scenario that checks an
//! invariant (spike, recovery: nothing lost; priority: everything
//! delivered) lists what broke under `failures` in its JSON and exits
//! non-zero.
//!
//! One command per scenario (defaults are the full-size runs):
//!
//! ```text
//! cargo build --release -p ballast-broker -p ballast-benches
//! target/release/ballast-bench throughput --size 100,1024,16384 --batch 1,64 --producers 4 --consumers 2
//! target/release/ballast-bench latency --rate 10000 --size 1024
//! target/release/ballast-bench spike --consumer-rate 5000 --burst-factor 10 --max-messages 50000
//! target/release/ballast-bench isolation --rate 2000 --flood backlog --flood-rate 20000
//! target/release/ballast-bench priority --rate 1000 --flood-rate 20000 --consumer-rate 5000 --credit 16
//! target/release/ballast-bench recovery --cycles 3 --producers 4
//! target/release/ballast-bench chaos --seconds 60
//! target/release/ballast-bench backlog --messages 10000000 --size 100
//! target/release/ballast-bench overhead --size 1024 --messages 200000
//! target/release/ballast-bench overhead --drain raw,consumer --rounds 5 --prefetch 1000
//! target/release/ballast-bench queues --queues 10000 --sample 100 --rate 1000
//! target/release/ballast-bench cold --rate 2000 --backlog-mb 2048   # as root: drops the page cache
//! ```
//!
//! `compare` (Ballast beside NATS JetStream and RabbitMQ quorum queues)
//! needs the `compare` feature and the peers installed (see its module):
//!
//! ```text
//! benches/scripts/install-peers
//! cargo build --release -p ballast-broker -p ballast-benches --features ballast-benches/compare
//! target/release/ballast-bench compare --rounds 3 --messages 200000 --size 1024,100 --rate 2000,10000
//! ```
//!
//! `--sync fsync|interval|none` (default fsync) sets the queue's sync
//! policy for any scenario; `--addr HOST:PORT` targets a running broker
//! instead (not for backlog, recovery and queues, which restart it).
//! `--tls on` runs `throughput` or `latency` against a started broker
//! serving TLS (a self-signed certificate made for the run); `--tls both`
//! runs the scenario in plaintext, then over TLS, and prints the change:
//!
//! ```text
//! target/release/ballast-bench throughput --tls both --size 1024 --batch 1,64
//! ```

mod backlog;
mod broker;
mod chaos;
mod chart;
mod cluster;
mod cold;
#[cfg(feature = "compare")]
mod compare;
mod isolation;
mod latency;
mod load;
mod netns;
mod overhead;
mod priority;
mod queues;
mod recovery;
mod spike;
mod throughput;

use std::path::PathBuf;

use ballast_proto::v1 as pb;
use clap::{Parser, Subcommand, ValueEnum};

/// Load scenarios against a real ballastd.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Target a running broker instead of starting one (HOST:PORT or URL).
    #[arg(long, global = true)]
    addr: Option<String>,
    /// The ballastd binary to start [default: next to this executable].
    #[arg(long, global = true)]
    ballastd: Option<PathBuf>,
    /// Where a started broker keeps its data.
    #[arg(long, global = true, default_value = "target/bench-data")]
    data_root: PathBuf,
    /// A config file for the started broker (`ballastd --config`).
    #[arg(long, global = true)]
    broker_config: Option<PathBuf>,
    /// Where the started broker's log goes [default: beside its data
    /// directory] (elsewhere when the data's filesystem is filled on
    /// purpose, as `chaos --disk-full` does).
    #[arg(long, global = true)]
    broker_log: Option<PathBuf>,
    /// Keep the started broker's data directory afterwards.
    #[arg(long, global = true)]
    keep: bool,
    /// Where to write the JSON results [default: target/bench-results/<scenario>.json].
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Sync policy of the scenario's queue.
    #[arg(long, global = true, value_enum, default_value_t = Sync::Fsync)]
    sync: Sync,
    /// TLS between the bench and the broker it starts (throughput and
    /// latency): off, on, or both (plaintext, then TLS, side by side).
    #[arg(long, global = true, value_enum, default_value_t = Tls::Off)]
    tls: Tls,
    /// The started broker requires a bearer token (an auth file made for
    /// the run, one principal allowed everything) and the bench sends it on
    /// every call (throughput and latency); with `--tls both`, the TLS run
    /// only, so the pair compares plaintext with TLS and tokens.
    #[arg(long, global = true)]
    auth: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tls {
    Off,
    On,
    Both,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sync {
    Fsync,
    Interval,
    None,
}

impl Sync {
    fn settings(self) -> pb::QueueSettings {
        let policy = match self {
            Sync::Fsync => pb::SyncPolicy::Fsync,
            Sync::Interval => pb::SyncPolicy::Interval,
            Sync::None => pb::SyncPolicy::None,
        };
        pb::QueueSettings { sync_policy: policy.into(), dead_letter: Some(false), ..Default::default() }
    }
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Durable publish throughput, then consume-and-ack throughput.
    Throughput(throughput::Args),
    /// Publish-to-durable and publish-to-delivery latency at a fixed rate.
    Latency(latency::Args),
    /// Broker memory (RssAnon) as a backlog grows, and after a restart.
    Backlog(backlog::Args),
    /// A steady queue's latency alone and while another queue is flooded.
    Isolation(isolation::Args),
    /// Publish throughput through the client library versus raw stubs.
    Overhead(overhead::Args),
    /// A burst far above the consumers' pace becomes backlog and drains.
    Spike(spike::Args),
    /// High-lane latency alone and during a low-lane flood.
    Priority(priority::Args),
    /// SIGKILL under load, restart, time to serve again, nothing lost.
    Recovery(recovery::Args),
    /// A bounded soak of kill -9, SIGSTOP, dropped consumers, cancelled
    /// calls and a full disk; nothing acknowledged lost, nothing corrupt,
    /// no key stored twice.
    Chaos(chaos::Args),
    /// Many queues on one node: create rate, disk, RSS, threads and open
    /// files, restart to SERVING, and latency over queues sampled across
    /// all of them, alone and while one is flooded.
    Queues(queues::Args),
    /// A steady queue's latency alone and while another queue drains a
    /// backlog that is not in the page cache (reads that fault on the
    /// broker's runtime workers).
    Cold(cold::Args),
    /// Three nodes on loopback: a replicated queue's publish rate beside a
    /// single-node queue's, then a soak of kills and pauses with a checker
    /// (every acknowledged publish delivered, nothing never published
    /// delivered, no key stored twice).
    Cluster(cluster::Args),
    /// Ballast side by side with NATS JetStream and RabbitMQ quorum
    /// queues: durable publish, drain and publish-to-delivery latency, one
    /// load generator, interleaved rounds.
    #[cfg(feature = "compare")]
    Compare(compare::Args),
    /// Ballast side by side with NATS JetStream and RabbitMQ (not in this
    /// build: it needs the `compare` feature).
    #[cfg(not(feature = "compare"))]
    Compare {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        // Before a broker starts for nothing.
        #[cfg(not(feature = "compare"))]
        if matches!(args.scenario, Scenario::Compare { .. }) {
            return Err(compare_not_built());
        }
        let tls_scenario = matches!(args.scenario, Scenario::Throughput(_) | Scenario::Latency(_));
        anyhow::ensure!(args.tls == Tls::Off || tls_scenario, "--tls is for the throughput and latency scenarios");
        anyhow::ensure!(!args.auth || tls_scenario, "--auth is for the throughput and latency scenarios");
        let (name, result) = match args.tls {
            Tls::Off | Tls::On => scenario(&args, args.tls == Tls::On).await?,
            Tls::Both => {
                let (name, plaintext) = scenario(&args, false).await?;
                let (_, tls) = scenario(&args, true).await?;
                (name, side_by_side(name, plaintext, tls))
            }
        };
        let path = args.json.clone().unwrap_or_else(|| PathBuf::from(format!("target/bench-results/{name}.json")));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
        println!("results written to {}", path.display());
        let chart: Option<fn(&std::path::Path, &serde_json::Value) -> anyhow::Result<()>> = match name {
            "spike" => Some(spike::chart),
            "priority" => Some(priority::chart),
            "latency" if args.tls != Tls::Both => Some(latency::chart),
            _ => None,
        };
        if let Some(chart) = chart {
            let svg = path.with_extension("svg");
            chart(&svg, &result)?;
            println!("chart written to {}", svg.display());
        }
        let failures: Vec<&str> =
            result["failures"].as_array().map(|a| a.iter().filter_map(|f| f.as_str()).collect()).unwrap_or_default();
        anyhow::ensure!(failures.is_empty(), "{name} failed: {}", failures.join("; "));
        Ok(())
    })
}

/// Runs the chosen scenario against a broker of its own (or `--addr`).
async fn scenario(args: &Args, tls: bool) -> anyhow::Result<(&'static str, serde_json::Value)> {
    if let Scenario::Cluster(a) = &args.scenario {
        // Starts three nodes of its own.
        anyhow::ensure!(args.addr.is_none() && !tls && !args.auth, "cluster starts its own nodes, in plaintext");
        let ballastd = match &args.ballastd {
            Some(path) => path.clone(),
            None => std::env::current_exe()?.with_file_name("ballastd"),
        };
        return Ok(("cluster", cluster::run(a, &ballastd, &args.data_root, args.keep).await?));
    }
    // With --tls both: plaintext without the token, TLS with it.
    let auth = args.auth && (tls || args.tls != Tls::Both);
    let mut target = broker::Target::new(
        args.addr.clone(),
        args.ballastd.clone(),
        args.broker_config.clone(),
        args.broker_log.clone(),
        &args.data_root,
        args.keep,
        broker::Secure { tls, auth },
    )?;
    if tls {
        println!("over TLS");
    }
    if auth {
        println!("with a bearer token on every call");
    }
    Ok(match &args.scenario {
        Scenario::Throughput(a) => ("throughput", throughput::run(&target, a, args.sync).await?),
        Scenario::Latency(a) => ("latency", latency::run(&target, a, args.sync).await?),
        Scenario::Backlog(a) => ("backlog", backlog::run(&mut target, a, args.sync).await?),
        Scenario::Isolation(a) => ("isolation", isolation::run(&target, a, args.sync).await?),
        Scenario::Overhead(a) => ("overhead", overhead::run(&target, a, args.sync).await?),
        Scenario::Spike(a) => ("spike", spike::run(&target, a, args.sync).await?),
        Scenario::Priority(a) => ("priority", priority::run(&target, a, args.sync).await?),
        Scenario::Recovery(a) => ("recovery", recovery::run(&mut target, a, args.sync).await?),
        Scenario::Chaos(a) => ("chaos", chaos::run(&mut target, a, args.sync).await?),
        Scenario::Queues(a) => ("queues", queues::run(&mut target, a, args.sync).await?),
        Scenario::Cold(a) => ("cold", cold::run(&target, a, args.sync).await?),
        Scenario::Cluster(_) => unreachable!("run above, without a target"),
        #[cfg(feature = "compare")]
        Scenario::Compare(a) => ("compare", compare::run(&target, a, args.sync, &args.data_root, args.keep).await?),
        #[cfg(not(feature = "compare"))]
        Scenario::Compare { .. } => return Err(compare_not_built()),
    })
}

/// What `compare` says in a build without its feature.
#[cfg(not(feature = "compare"))]
fn compare_not_built() -> anyhow::Error {
    anyhow::anyhow!(
        "this ballast-bench was built without the compare scenario: \
         cargo build --release -p ballast-benches --features ballast-benches/compare"
    )
}

/// One result holding a plaintext and a TLS run of `name`, with the change
/// TLS makes to the headline figures (printed too): publish and consume
/// rates per throughput run, latency percentiles.
fn side_by_side(name: &str, plaintext: serde_json::Value, tls: serde_json::Value) -> serde_json::Value {
    let figures: Vec<(String, &str)> = match name {
        "throughput" => (0..plaintext["runs"].as_array().map_or(0, Vec::len))
            .flat_map(|i| {
                [
                    (format!("/runs/{i}/publish/messages_per_s"), "msg/s"),
                    (format!("/runs/{i}/consume/messages_per_s"), "msg/s"),
                ]
            })
            .collect(),
        _ => ["publish_to_durable", "publish_to_delivery"]
            .iter()
            .flat_map(|f| [(format!("/{f}/p50_ms"), "ms"), (format!("/{f}/p99_ms"), "ms")])
            .collect(),
    };
    println!("\n{:<40} {:>12} {:>12} {:>8}", "figure", "plaintext", "tls", "change");
    let mut changes = serde_json::Map::new();
    for (pointer, unit) in figures {
        let (Some(a), Some(b)) =
            (plaintext.pointer(&pointer).and_then(|v| v.as_f64()), tls.pointer(&pointer).and_then(|v| v.as_f64()))
        else {
            continue;
        };
        let change = if a == 0.0 { 0.0 } else { (b - a) / a * 100.0 };
        println!("{pointer:<40} {a:>10.2}{unit:<2} {b:>10.2}{unit:<2} {change:>+7.1}%");
        changes.insert(pointer, serde_json::json!({ "plaintext": a, "tls": b, "change_percent": change }));
    }
    let failures: Vec<serde_json::Value> =
        [&plaintext, &tls].iter().flat_map(|r| r["failures"].as_array().cloned().unwrap_or_default()).collect();
    serde_json::json!({
        "scenario": name, "tls": "both", "plaintext": plaintext, "tls_run": tls,
        "change": changes, "failures": failures,
    })
}
