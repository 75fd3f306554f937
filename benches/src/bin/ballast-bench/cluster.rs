//! `cluster`: three `ballastd` nodes on loopback (docs/replication.md).
//!
//! 1. **Throughput**, side by side in one run: durable 1 KiB publishes
//!    through the client library's `Producer` (batching on) into a queue of
//!    one replica on the leader node and into a queue replicated on all
//!    three, alternated over rounds; the ratio replicated / single.
//! 2. **Soak**, a Jepsen-style checker: a producer publishes keyed messages
//!    through a `Client` given every node's address (it follows the
//!    leader) while the bench, per cycle, picks a fault at random: kill -9
//!    the leader, kill -9 a follower, or SIGSTOP the leader (and SIGCONT it
//!    later); killed nodes are restarted. Then every message is consumed.
//!    The verdict: every acknowledged publish delivered at least once
//!    (`lost` = 0), nothing delivered that was never published (`phantom`
//!    = 0), no key stored twice (depth = unique keys). With `--netns`
//!    (root, in a private network namespace: `scripts/cluster-partitions`)
//!    each node runs in a namespace of its own and three more faults are
//!    drawn: the leader cut off from both followers (the bench, as a
//!    client, still reaches it), a follower cut off, and one pair of nodes
//!    that cannot hear each other (`netns.rs`); cuts heal half a cycle later.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use ballast_client::{
    BreakerConfig, Client, ConsumerConfig, Delivery, Message, ProducerConfig, QueueSettings, RetryPolicy,
};
use ballast_proto::v1 as pb;

use crate::netns::Netns;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Throughput rounds (each: one run per queue, alternated).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Messages per throughput run.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Publishes in flight through the producer during a throughput run.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    /// Batches each producer keeps in flight (`ProducerConfig::in_flight_batches_max`),
    /// the same for both queues.
    #[arg(long, default_value_t = 8)]
    batches_in_flight: usize,
    /// Rate of the paced latency run (publish to receipt), messages/s.
    #[arg(long, default_value_t = 2000)]
    latency_rate: u64,
    /// Seconds of the paced latency run, per queue.
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Fault cycles of the soak (0: no soak).
    #[arg(long, default_value_t = 10)]
    cycles: u32,
    /// Seconds of load between two faults.
    #[arg(long, default_value_t = 3.0)]
    cycle_seconds: f64,
    /// Seed of the fault schedule [default: from the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Run each node in a network namespace `<NETNS>-n<i>` the bench makes,
    /// and add partitions to the soak's faults. Root and iproute2 only,
    /// with the bench in a private network namespace (`unshare -n`; see
    /// `scripts/cluster-partitions`).
    #[arg(long)]
    netns: Option<String>,
}

/// One `ballastd` of the cluster.
struct Node {
    id: u64,
    listen: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    ballastd: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Cut off from both other nodes (not from the bench).
    isolated: bool,
    /// The namespaces the node runs in, with its index there.
    netns: Option<(Arc<Netns>, usize)>,
}

impl Node {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = match &self.netns {
            Some((netns, index)) => netns.command(*index, &self.ballastd),
            None => Command::new(&self.ballastd),
        };
        let mut child = command
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.ballastd.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if !line.starts_with("listening on ") {
            let _ = child.kill();
            bail!("node {} did not start; see {}", self.id, self.log.display());
        }
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    fn signal(&mut self, signal: libc::c_int) {
        if let Some(child) = &self.child
            && let Ok(pid) = libc::pid_t::try_from(child.id())
        {
            // SAFETY: kill(2) on our own child's pid; no memory involved.
            unsafe { libc::kill(pid, signal) };
            self.paused = signal == libc::SIGSTOP;
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.paused {
            self.signal(libc::SIGCONT);
        }
        self.kill();
    }
}

struct Cluster {
    nodes: Vec<Node>,
    netns: Option<Arc<Netns>>,
    /// The pairs of nodes cut from each other now.
    cuts: BTreeSet<(usize, usize)>,
}

impl Cluster {
    fn start(ballastd: &Path, root: &Path, netns: Option<Arc<Netns>>) -> anyhow::Result<Cluster> {
        let listens: Vec<SocketAddr> = match netns {
            Some(_) => (0..3).map(Netns::listen).collect(),
            None => (0..3)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
                .collect::<Result<_, _>>()?,
        };
        let peers: Vec<String> =
            listens.iter().enumerate().map(|(i, a)| format!("{{ id = {}, addr = \"{a}\" }}", i + 1)).collect();
        let mut nodes = Vec::new();
        for (i, &listen) in listens.iter().enumerate() {
            let dir = root.join(format!("node{}", i + 1));
            std::fs::create_dir_all(&dir)?;
            let config = dir.join("ballastd.toml");
            // In its own private namespace a node listens off loopback,
            // reached only through the bench's bridge.
            let insecure = if netns.is_some() { "insecure = true\n" } else { "" };
            let text = format!(
                "data_dir = \"{}\"\nlisten = \"{listen}\"\nmetrics_listen = \"127.0.0.1:0\"\n{insecure}\n[cluster]\n\
                 node_id = {}\npeers = [{}]\n",
                dir.join("data").display(),
                i + 1,
                peers.join(", ")
            );
            std::fs::write(&config, text)?;
            let mut node = Node {
                id: i as u64 + 1,
                listen,
                config,
                log: dir.join("ballastd.log"),
                ballastd: ballastd.to_path_buf(),
                child: None,
                paused: false,
                isolated: false,
                netns: netns.as_ref().map(|n| (Arc::clone(n), i)),
            };
            node.start()?;
            nodes.push(node);
        }
        Ok(Cluster { nodes, netns, cuts: BTreeSet::new() })
    }

    /// Cuts nodes `a` and `b` from each other (`--netns` only).
    fn cut(&mut self, a: usize, b: usize) -> anyhow::Result<()> {
        let netns = self.netns.as_ref().context("partitions need --netns")?;
        netns.set_cut(a, b, true)?;
        self.cuts.insert((a.min(b), a.max(b)));
        Ok(())
    }

    /// Heals every cut.
    fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(netns) = &self.netns {
            for (a, b) in std::mem::take(&mut self.cuts) {
                netns.set_cut(a, b, false)?;
            }
        }
        for node in &mut self.nodes {
            node.isolated = false;
        }
        Ok(())
    }

    fn addrs(&self) -> String {
        self.nodes.iter().map(Node::endpoint).collect::<Vec<_>>().join(",")
    }

    /// The index of the node the running, unpaused nodes agree leads.
    async fn leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let mut agreed = BTreeSet::new();
            let mut leading = None;
            for (i, node) in
                self.nodes.iter().enumerate().filter(|(_, n)| n.child.is_some() && !n.paused && !n.isolated)
            {
                match status(node).await {
                    Some(s) => {
                        agreed.insert(s.leader_id);
                        if s.role == "leader" {
                            leading = Some(i);
                        }
                    }
                    None => {
                        agreed.insert(0);
                    }
                }
            }
            if let Some(i) = leading
                && agreed.len() == 1
                && agreed.contains(&(i as u64 + 1))
            {
                return Ok(i);
            }
            if Instant::now() > deadline {
                bail!("no agreed leader within {within:?} ({agreed:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn status(node: &Node) -> Option<pb::ClusterStatus> {
    let channel = tonic::transport::Endpoint::from_shared(node.endpoint())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let response = pb::stats_client::StatsClient::new(channel).get_stats(pb::StatsRequest::default()).await.ok()?;
    response.into_inner().cluster
}

pub async fn run(args: &Args, ballastd: &Path, data_root: &Path, keep: bool) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(ballastd.exists(), "{} not found: cargo build --release -p ballast-broker", ballastd.display());
    let root = data_root.join(format!("cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let netns = args.netns.as_deref().map(|prefix| Netns::create(prefix, 3)).transpose()?.map(Arc::new);
    let mut cluster = Cluster::start(ballastd, &root, netns)?;
    let leader = cluster.leader(Duration::from_secs(30)).await?;
    println!("three nodes up; node {} leads", leader + 1);
    let throughput = if args.rounds > 0 { Some(throughput(args, &cluster, leader).await?) } else { None };
    let soak = if args.cycles > 0 { Some(soak(args, &mut cluster).await?) } else { None };
    drop(cluster);
    if !keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(serde_json::json!({ "scenario": "cluster", "throughput": throughput, "soak": soak }))
}

/// Publishes `count` messages of `size` bytes through `producer`, `window`
/// at a time; the rate in messages per second.
async fn publish_run(
    producer: &Arc<ballast_client::Producer>,
    queue: &str,
    count: u64,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let mut in_flight = tokio::task::JoinSet::new();
    for _ in 0..count {
        if in_flight.len() >= window {
            in_flight.join_next().await.context("a publish task")???;
        }
        let producer = Arc::clone(producer);
        let queue = queue.to_owned();
        let message = Message::new(payload.clone());
        in_flight.spawn(async move {
            producer.publish(&queue, message).await.map(drop).with_context(|| format!("a publish to {queue}"))
        });
    }
    while let Some(done) = in_flight.join_next().await {
        done??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Publishes at `rate` for `seconds`, each message on its own schedule
/// (open loop: measured from its intended send time, so a stall counts for
/// every message it delays); the publish-to-receipt percentiles.
async fn paced_latency(
    producer: &Arc<ballast_client::Producer>,
    queue: &str,
    rate: u64,
    seconds: f64,
    size: usize,
) -> anyhow::Result<serde_json::Value> {
    let payload = bytes::Bytes::from(vec![b'l'; size]);
    let count = (rate as f64 * seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let (producer, queue, message) = (Arc::clone(producer), queue.to_owned(), Message::new(payload.clone()));
        sends.spawn(async move {
            producer
                .publish(&queue, message)
                .await
                .map(|_| due.elapsed())
                .with_context(|| format!("a publish to {queue}"))
        });
    }
    let mut histogram = crate::load::histogram();
    while let Some(done) = sends.join_next().await {
        let took = done??;
        histogram.record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1))?;
    }
    Ok(crate::load::percentiles(&histogram))
}

async fn throughput(args: &Args, cluster: &Cluster, leader: usize) -> anyhow::Result<serde_json::Value> {
    let single_client = Client::new(&cluster.nodes[leader].endpoint())?;
    let replicated_client = Client::new(&cluster.addrs())?;
    let admin = single_client.admin();
    let mut settings = QueueSettings::default();
    settings.dead_letter = Some(false);
    admin.create_queue("single", settings.clone()).await?;
    settings.replicas = Some(3);
    admin.create_queue("replicated", settings).await?;
    let config = ProducerConfig {
        pending_count_max: args.in_flight.max(1024),
        in_flight_batches_max: args.batches_in_flight,
        ..ProducerConfig::default()
    };
    let single = Arc::new(single_client.producer(config.clone())?);
    let replicated = Arc::new(replicated_client.producer(config)?);
    let (mut singles, mut replicas) = (Vec::new(), Vec::new());
    println!("{:>5} {:>14} {:>14} {:>7}", "round", "single msg/s", "replicated", "ratio");
    for round in 1..=args.rounds {
        let a = publish_run(&single, "single", args.messages, args.size, args.in_flight).await?;
        let b = publish_run(&replicated, "replicated", args.messages, args.size, args.in_flight).await?;
        println!("{round:>5} {a:>14.0} {b:>14.0} {:>7.2}", b / a);
        singles.push(a);
        replicas.push(b);
        // Empty both, so each round starts alike.
        admin.purge_queue("single").await?;
        admin.purge_queue("replicated").await?;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut singles), median(&mut replicas));
    println!("median: single {a:.0} msg/s, replicated {b:.0} msg/s, ratio {:.2}", b / a);
    let mut latency = serde_json::Map::new();
    for (name, producer) in [("single", &single), ("replicated", &replicated)] {
        let figures = paced_latency(producer, name, args.latency_rate, args.latency_seconds, args.size).await?;
        println!(
            "publish to receipt at {} msg/s, {name}: p50 {} ms, p99 {} ms",
            args.latency_rate, figures["p50_ms"], figures["p99_ms"]
        );
        latency.insert(name.to_owned(), figures);
        admin.purge_queue(name).await?;
    }
    for producer in [single, replicated] {
        if let Ok(producer) = Arc::try_unwrap(producer) {
            producer.close().await;
        }
    }

    Ok(serde_json::json!({
        "messages": args.messages, "size": args.size, "rounds": args.rounds,
        "single_messages_per_s": singles, "replicated_messages_per_s": replicas,
        "median_single": a, "median_replicated": b, "ratio": b / a,
        "latency_rate": args.latency_rate, "latency": latency,
    }))
}

/// The fault of one cycle.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillLeader,
    KillFollower,
    PauseLeader,
    /// The leader cut off from both followers.
    IsolateLeader,
    /// One follower cut off from the two other nodes.
    IsolateFollower,
    /// Two nodes that cannot hear each other (each still hears the third).
    CutPair,
}

async fn soak(args: &Args, cluster: &mut Cluster) -> anyhow::Result<serde_json::Value> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("soak: {} cycles, seed {seed}", args.cycles);
    let mut rng = fastrand::Rng::with_seed(seed);
    let client = Client::new(&cluster.addrs())?;
    let leader = cluster.leader(Duration::from_secs(30)).await?;
    let admin = Client::new(&cluster.nodes[leader].endpoint())?.admin();
    let mut settings = QueueSettings::default();
    settings.replicas = Some(3);
    // Nothing is consumed until the end: the soak's queue must hold every
    // publish, or admission refuses them once the default 1,000,000 (90%
    // for the normal lane) are stored, and the refusals read as a stall.
    settings.max_messages = Some(100_000_000);
    settings.max_bytes = Some(16 << 30);
    admin.create_queue("soak", settings).await?;

    let attempted = Arc::new(Mutex::new(BTreeSet::new()));
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    // Why publishes failed (at their deadline), per cycle: what a stall was.
    let failures = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = Arc::new(client.producer(ProducerConfig {
        deadline: Duration::from_secs(30),
        attempt_timeout: Duration::from_secs(2),
        // Faults are ridden out by retries (with the same keys), not failed fast.
        breaker: BreakerConfig { failure_threshold: 1_000_000, ..BreakerConfig::default() },
        // An election takes up to two election timeouts: retried within the deadline.
        retry: RetryPolicy { attempts_max: 100, ..RetryPolicy::default() },
        ..ProducerConfig::default()
    })?);
    let publishing = {
        let (attempted, acked, stop, producer, failures) = (
            Arc::clone(&attempted),
            Arc::clone(&acked),
            Arc::clone(&stop),
            Arc::clone(&producer),
            Arc::clone(&failures),
        );
        tokio::spawn(async move {
            let mut in_flight = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                while in_flight.len() >= 256 {
                    in_flight.join_next().await;
                }
                let key = format!("soak-{n}");
                n += 1;
                attempted.lock().expect("ledger").insert(key.clone());
                let (producer, acked, failures) = (Arc::clone(&producer), Arc::clone(&acked), Arc::clone(&failures));
                in_flight.spawn(async move {
                    let message = Message::new(format!("payload of {key}")).with_idempotency_key(key.clone());
                    match producer.publish("soak", message).await {
                        Ok(_) => {
                            acked.lock().expect("ledger").insert(key);
                        }
                        Err(error) => {
                            let why: String = error.to_string().chars().take(160).collect();
                            *failures.lock().expect("ledger").entry(why).or_default() += 1;
                        }
                    }
                });
                if n % 64 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            while in_flight.join_next().await.is_some() {}
        })
    };
    let mut faults = Vec::new();
    for cycle in 1..=args.cycles {
        tokio::time::sleep(Duration::from_secs_f64(args.cycle_seconds)).await;
        let leader = cluster.leader(Duration::from_secs(30)).await?;
        let kinds = if cluster.netns.is_some() { 6 } else { 3 };
        let fault = match rng.u8(0..kinds) {
            0 => Fault::KillLeader,
            1 => Fault::KillFollower,
            2 => Fault::PauseLeader,
            3 => Fault::IsolateLeader,
            4 => Fault::IsolateFollower,
            _ => Fault::CutPair,
        };
        let started = Instant::now();
        let follower = (leader + 1 + rng.usize(0..2)) % 3;
        let victim = match fault {
            Fault::KillLeader | Fault::PauseLeader | Fault::IsolateLeader => leader,
            Fault::KillFollower | Fault::IsolateFollower => follower,
            // The leader and one follower, or the two followers.
            Fault::CutPair => [leader, follower][rng.usize(0..2)],
        };
        match fault {
            Fault::KillLeader | Fault::KillFollower => cluster.nodes[victim].kill(),
            Fault::PauseLeader => cluster.nodes[victim].signal(libc::SIGSTOP),
            Fault::IsolateLeader | Fault::IsolateFollower => {
                for other in (0..3).filter(|&n| n != victim) {
                    cluster.cut(victim, other)?;
                }
                cluster.nodes[victim].isolated = true;
            }
            Fault::CutPair => {
                let other = (0..3).find(|&n| n != victim && n != leader).unwrap_or(follower);
                cluster.cut(victim, other)?;
            }
        }
        // With one pair cut the two sides may trade the leadership until
        // the cut heals: no leader is waited for then.
        let new_leader = match fault {
            Fault::CutPair => None,
            _ => Some(cluster.leader(Duration::from_secs(30)).await?),
        };
        let failover_ms = new_leader.map(|_| started.elapsed().as_millis() as u64);
        tokio::time::sleep(Duration::from_secs_f64(args.cycle_seconds / 2.0)).await;
        match fault {
            Fault::PauseLeader => cluster.nodes[victim].signal(libc::SIGCONT),
            Fault::KillLeader | Fault::KillFollower => cluster.nodes[victim].start()?,
            Fault::IsolateLeader | Fault::IsolateFollower | Fault::CutPair => cluster.heal()?,
        }
        let new_leader = match new_leader {
            Some(leader) => leader,
            None => cluster.leader(Duration::from_secs(30)).await?,
        };
        let acked_now = acked.lock().expect("ledger").len();
        for (why, count) in std::mem::take(&mut *failures.lock().expect("ledger")) {
            println!("    {count} publishes failed: {why}");
        }
        let after = failover_ms.map_or_else(|| "after the heal".to_owned(), |ms| format!("after {ms} ms"));
        println!(
            "cycle {cycle:>3}: {fault:?} node {} -> leader node {} {after}; {acked_now} acknowledged so far",
            victim + 1,
            new_leader + 1
        );
        faults.push(serde_json::json!({
            "cycle": cycle, "fault": format!("{fault:?}"), "node": victim + 1,
            "leader_after": new_leader + 1, "leader_after_ms": failover_ms,
        }));
    }
    stop.store(true, Ordering::Relaxed);
    publishing.await?;
    if let Ok(producer) = Arc::try_unwrap(producer) {
        producer.close().await;
    }
    let leader = cluster.leader(Duration::from_secs(30)).await?;

    // Drain: every message, through a consumer that follows the leader.
    let depth = Client::new(&cluster.nodes[leader].endpoint())?.admin().get_queue("soak").await?.depth;
    let delivered = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen = Arc::clone(&delivered);
    let consumer =
        client.consumer("soak", ConsumerConfig { max_messages: Some(depth), ..ConsumerConfig::default() })?;
    let handle = consumer.spawn(move |delivery: Delivery| {
        let seen = Arc::clone(&seen);
        async move {
            let key = delivery.idempotency_key.clone().unwrap_or_default();
            *seen.lock().expect("ledger").entry(key).or_default() += 1;
            Ok::<(), String>(())
        }
    });
    tokio::time::timeout(Duration::from_secs(300), handle.join()).await.context("drain within 300 s")??;
    let attempted = attempted.lock().expect("ledger").clone();
    let acked = acked.lock().expect("ledger").clone();
    let delivered = delivered.lock().expect("ledger").clone();
    let lost = acked.iter().filter(|k| !delivered.contains_key(*k)).count();
    let phantom = delivered.keys().filter(|k| !attempted.contains(*k)).count();
    let unique = delivered.len() as u64;
    let stored_twice = depth.saturating_sub(unique);
    let redelivered: u64 = delivered.values().map(|&n| u64::from(n.saturating_sub(1))).sum();
    println!(
        "soak verdict: attempted {}, acknowledged {}, stored {depth}, delivered {unique} distinct ({redelivered} \
         again); lost {lost}, phantom {phantom}, stored twice {stored_twice}",
        attempted.len(),
        acked.len()
    );
    Ok(serde_json::json!({
        "seed": seed, "cycles": args.cycles, "faults": faults,
        "attempted": attempted.len(), "acknowledged": acked.len(), "stored": depth,
        "delivered_distinct": unique, "delivered_again": redelivered,
        "lost": lost, "phantom": phantom, "stored_twice": stored_twice,
    }))
}
