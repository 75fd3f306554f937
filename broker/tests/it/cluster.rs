//! Replicated queues on three real `ballastd` processes (docs/replication.md):
//! the leader killed under a publish load, a follower killed and restarted,
//! a paused leader replaced.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_client::{Backoff, BreakerConfig, Client, ConsumerConfig, Delivery, Message, ProducerConfig, RetryPolicy};
use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::{BrokerProcess, message};

/// How long a cluster may take to have a leader (three election timeouts
/// of the test config and the processes' start).
const LEADER_WITHIN: Duration = Duration::from_secs(20);

/// Three nodes on loopback, each with its own data directory and config.
struct Cluster {
    nodes: Vec<BrokerProcess>,
    _config_dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let listens: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
        let config_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let peers: Vec<String> =
            listens.iter().enumerate().map(|(i, addr)| format!("{{ id = {}, addr = \"{addr}\" }}", i + 1)).collect();
        let nodes = listens
            .iter()
            .enumerate()
            .map(|(i, &listen)| {
                let path = config_dir.path().join(format!("node{}.toml", i + 1));
                let text = format!(
                    "[cluster]\nnode_id = {}\npeers = [{}]\nheartbeat_ms = 200\nelection_timeout_min_ms = 1500\n\
                     election_timeout_max_ms = 3000\n",
                    i + 1,
                    peers.join(", ")
                );
                std::fs::write(&path, text).expect("write the node's config");
                BrokerProcess::start_at(listen, &["--config", path.to_str().expect("utf-8 path")])
            })
            .collect();
        Cluster { nodes, _config_dir: config_dir }
    }

    /// The index of the node every running node agrees leads, once they do.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + LEADER_WITHIN;
        loop {
            let mut leaders = BTreeSet::new();
            let mut leading = None;
            for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.is_running()) {
                let Some(status) = cluster_status(node).await else {
                    leaders.insert(0);
                    continue;
                };
                leaders.insert(status.leader_id);
                if status.role == "leader" {
                    leading = Some(i);
                }
            }
            if let (Some(i), 1) = (leading, leaders.len())
                && leaders.contains(&(i as u64 + 1))
            {
                return i;
            }
            assert!(Instant::now() < deadline, "no agreed leader within {LEADER_WITHIN:?}: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every node's address, as a client that follows the leader takes them.
    fn addrs(&self) -> String {
        self.nodes.iter().map(BrokerProcess::endpoint).collect::<Vec<_>>().join(",")
    }
}

/// A free port **below the kernel's ephemeral range**. A node killed and
/// restarted binds its port again; a port from the ephemeral range can be
/// taken meanwhile as the local end of another test's outgoing connection
/// (CI saw a restart fail for 5 s with "address already in use"). Ports
/// are handed out from a counter, so two tests never try the same one.
fn free_port() -> SocketAddr {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (20_000u16, ephemeral_low.clamp(20_001, 32_768));
    // Spread over the range by process, so a second test run beside this
    // one starts elsewhere.
    let offset = (std::process::id() % u32::from(high - low)) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < high - low, "no free port in {low}..{high}");
        let port = low + (offset + n) % (high - low);
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr().expect("local addr");
        }
    }
}

/// A channel to `node` that gives up within a second or two (a paused node
/// accepts connections but never answers).
async fn quick_channel(node: &BrokerProcess) -> Option<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(node.endpoint()).ok()?;
    let endpoint = endpoint.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(2));
    endpoint.connect().await.ok()
}

async fn cluster_status(node: &BrokerProcess) -> Option<pb::ClusterStatus> {
    let channel = quick_channel(node).await?;
    let mut stats = pb::stats_client::StatsClient::new(channel);
    let response = stats.get_stats(pb::StatsRequest::default()).await.ok()?;
    response.into_inner().cluster
}

/// A node's depth of `queue` as it has applied it.
async fn depth_on(node: &BrokerProcess, queue: &str) -> Option<u64> {
    let channel = quick_channel(node).await?;
    let mut stats = pb::stats_client::StatsClient::new(channel);
    let request = pb::StatsRequest { queue: queue.to_owned() };
    let response = stats.get_stats(request).await.ok()?.into_inner();
    response.queues.first()?.saturation.as_ref().map(|s| s.depth)
}

/// Waits until every running node holds `depth` messages of `queue`.
async fn wait_depth(cluster: &Cluster, queue: &str, depth: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = Vec::new();
        for node in cluster.nodes.iter().filter(|n| n.is_running()) {
            seen.push(depth_on(node, queue).await);
        }
        if seen.iter().all(|d| *d == Some(depth)) {
            return;
        }
        assert!(Instant::now() < deadline, "depths of {queue}: {seen:?}, waiting for {depth} on every node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `request` to whichever of `among` leads, again while the answer
/// is UNAVAILABLE (a leader change under a loaded machine), for at most
/// `LEADER_WITHIN`. Panics with the last status otherwise.
async fn on_leader<T: Clone>(
    cluster: &Cluster,
    among: &[usize],
    what: &str,
    request: T,
    call: impl AsyncFn(tonic::transport::Channel, T) -> Result<(), tonic::Status>,
) {
    let deadline = Instant::now() + LEADER_WITHIN;
    loop {
        let mut last = None;
        for &i in among {
            let leads =
                cluster_status(&cluster.nodes[i]).await.is_some_and(|s| s.role == "leader" && s.leader_id == s.node_id);
            if !leads {
                continue;
            }
            let Some(channel) = quick_channel(&cluster.nodes[i]).await else { continue };
            match call(channel, request.clone()).await {
                Ok(()) => return,
                Err(status) if status.code() == Code::Unavailable => last = Some(status),
                Err(status) => panic!("{what}: {status:?}"),
            }
        }
        assert!(Instant::now() < deadline, "{what}: no leader took it within {LEADER_WITHIN:?}: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a replicated queue through the leader.
async fn create_replicated(cluster: &Cluster, name: &str, settings: pb::QueueSettings) {
    let request = pb::CreateQueueRequest { name: name.to_owned(), settings: Some(settings) };
    on_leader(cluster, &[0, 1, 2], "create", request, async |channel, request| {
        pb::admin_client::AdminClient::new(channel).create_queue(request).await.map(drop)
    })
    .await;
}

/// Publishes one message through the leader (one of `among`).
async fn publish_replicated(cluster: &Cluster, among: &[usize], queue: &str, payload: String) {
    let request = pb::PublishRequest { queue: queue.to_owned(), message: Some(message(payload)) };
    on_leader(cluster, among, "publish", request, async |channel, request| {
        pb::publisher_client::PublisherClient::new(channel).publish(request).await.map(drop)
    })
    .await;
}

fn replicated() -> pb::QueueSettings {
    pb::QueueSettings { replicas: Some(3), ..Default::default() }
}

/// A replicated queue is created on the leader and exists on every node;
/// what is published there is on every node; a follower sends callers to
/// the leader (UNAVAILABLE with `ballast-leader`); a queue of one replica
/// is refused a replica count that is not the cluster's.
#[tokio::test]
async fn a_replicated_queue_is_on_every_node_and_followers_name_the_leader() {
    let cluster = Cluster::start();
    cluster.leader().await;
    create_replicated(&cluster, "orders", replicated()).await;
    for i in 0..20 {
        publish_replicated(&cluster, &[0, 1, 2], "orders", format!("m{i}")).await;
    }
    wait_depth(&cluster, "orders", 20).await;
    let leader = cluster.leader().await;

    let follower = &cluster.nodes[(leader + 1) % 3];
    let mut to_follower = follower.publisher().await;
    let request = pb::PublishRequest { queue: "orders".into(), message: Some(message("x")) };
    let status = to_follower.publish(request).await.expect_err("a follower does not take publishes");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let named = status.metadata().get("ballast-leader").and_then(|v| v.to_str().ok()).map(str::to_owned);
    // The leader seen just before, unless the leadership moved meanwhile.
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
    assert!(named.as_ref().is_some_and(|a| addrs.contains(a)), "{status:?}");
    let mut admin = cluster.nodes[leader].admin().await;

    let wrong = pb::CreateQueueRequest {
        name: "two".into(),
        settings: Some(pb::QueueSettings { replicas: Some(5), ..Default::default() }),
    };
    let status = admin.create_queue(wrong).await.expect_err("5 replicas on 3 voters");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

/// The leader is killed (SIGKILL) while producers publish with keys
/// through the client library, which follows the leader: a new leader is
/// elected, every acknowledged message is delivered from it, and no key
/// is stored twice.
#[tokio::test]
async fn leader_killed_under_load_loses_no_acknowledged_message() {
    let mut cluster = Cluster::start();
    cluster.leader().await;
    let client = Client::new(&cluster.addrs()).expect("addresses");
    create_replicated(&cluster, "payments", replicated()).await;

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let producer = Arc::new(
        client
            .producer(ProducerConfig {
                attempt_timeout: Duration::from_secs(2),
                deadline: Duration::from_secs(60),
                // The failover is ridden out by retries, not failed fast.
                breaker: BreakerConfig { failure_threshold: 1_000_000, ..BreakerConfig::default() },
                // An election takes up to two election timeouts: retried within the deadline.
                retry: RetryPolicy { attempts_max: 100, ..RetryPolicy::default() },
                ..ProducerConfig::default()
            })
            .expect("producer"),
    );
    let total = 600u32;
    let publishing = {
        let acked = Arc::clone(&acked);
        let producer = Arc::clone(&producer);
        tokio::spawn(async move {
            let mut sends = Vec::new();
            for i in 0..total {
                let producer = Arc::clone(&producer);
                let acked = Arc::clone(&acked);
                sends.push(tokio::spawn(async move {
                    let key = format!("k{i}");
                    let message = Message::new(format!("payload {i}")).with_idempotency_key(key.clone());
                    match producer.publish("payments", message).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(key);
                        }
                        Err(error) => eprintln!("publish of {key} failed: {error:?}"),
                    }
                }));
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            for send in sends {
                send.await.expect("send task");
            }
        })
    };
    // Kill the leader once some publishes are acknowledged.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 100 {
        assert!(Instant::now() < deadline, "no publishes acknowledged before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leader = cluster.leader().await;
    let killed_at = Instant::now();
    cluster.nodes[leader].kill();
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let elected_in = killed_at.elapsed();
    assert!(elected_in < LEADER_WITHIN, "a new leader took {elected_in:?}");
    publishing.await.expect("publishing");
    let acked: BTreeSet<String> = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), total as usize, "every publish was acknowledged in the end (retries follow the leader)");

    // Everything is delivered from the new leader, each key once in storage.
    let depth = depth_on(&cluster.nodes[new_leader], "payments").await.expect("depth on the new leader");
    assert_eq!(depth, u64::from(total), "no key stored twice, none lost");
    let seen = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let seen_in = Arc::clone(&seen);
    let consumer = client
        .consumer("payments", ConsumerConfig { max_messages: Some(u64::from(total)), ..ConsumerConfig::default() })
        .expect("consumer");
    let consumed = consumer.spawn(move |delivery: Delivery| {
        let seen = Arc::clone(&seen_in);
        async move {
            let key = delivery.idempotency_key.clone().ok_or("a keyed message")?;
            *seen.lock().unwrap().entry(key).or_default() += 1;
            Ok::<(), String>(())
        }
    });
    tokio::time::timeout(Duration::from_secs(60), consumed.join())
        .await
        .expect("every message consumed within 60 s")
        .expect("consumer");
    let seen: BTreeSet<String> = seen.lock().unwrap().keys().cloned().collect();
    assert_eq!(seen, acked, "every acknowledged message delivered, nothing else");
}

/// A keyed batch in flight when the leader is killed (0 to 9 ms after it
/// was sent: before, during or after its commit), sent again at once to
/// whichever node takes it (as a client following the leader does), is
/// stored once: a key the old leader acknowledged answers with its
/// original message id. A new leader looks keys up only once it has
/// applied every entry of the earlier terms (`Cluster::leader_term`), so
/// an entry the old leader left behind is counted before the retry is.
/// Four rounds, each on a fresh leader.
#[tokio::test]
async fn a_batch_in_flight_when_the_leader_dies_is_stored_once() {
    const BATCH: u64 = 200;
    let mut cluster = Cluster::start();
    cluster.leader().await;
    create_replicated(&cluster, "orders", replicated()).await;
    let mut stored = 0;
    for round in 0..4u64 {
        let leader = cluster.leader().await;
        let messages = (0..BATCH)
            .map(|i| pb::Message { idempotency_key: format!("r{round}-k{i}"), ..message(format!("m{i}")) })
            .collect();
        let batch = pb::PublishBatchRequest { queue: "orders".into(), messages };
        let mut publisher = cluster.nodes[leader].publisher().await;
        let sent = {
            let batch = batch.clone();
            tokio::spawn(async move { publisher.publish_batch(batch).await })
        };
        tokio::time::sleep(Duration::from_millis(round * 3)).await;
        cluster.nodes[leader].kill();
        let first = sent.await.expect("publish task").ok().map(|r| r.into_inner().receipts);

        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let deadline = Instant::now() + LEADER_WITHIN;
        let again = 'taken: loop {
            for &i in &survivors {
                let Some(channel) = quick_channel(&cluster.nodes[i]).await else { continue };
                match pb::publisher_client::PublisherClient::new(channel).publish_batch(batch.clone()).await {
                    Ok(response) => break 'taken response.into_inner().receipts,
                    Err(status) if status.code() == Code::Unavailable => {}
                    Err(status) => panic!("round {round}: node {i} refused the batch: {status:?}"),
                }
            }
            assert!(Instant::now() < deadline, "round {round}: no node took the batch again");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if let Some(first) = first {
            let ids = |receipts: &[pb::Receipt]| receipts.iter().map(|r| r.id).collect::<Vec<_>>();
            assert_eq!(ids(&again), ids(&first), "round {round}: acknowledged keys keep their message ids");
            assert!(again.iter().all(|r| r.duplicate), "round {round}: every acknowledged key is a duplicate");
        }
        stored += BATCH;
        wait_depth(&cluster, "orders", stored).await;
        cluster.nodes[leader].restart();
    }
}

/// A follower killed while publishes go on catches up when it returns.
#[tokio::test]
async fn a_killed_follower_catches_up_after_its_restart() {
    let mut cluster = Cluster::start();
    cluster.leader().await;
    create_replicated(&cluster, "events", replicated()).await;
    for i in 0..10 {
        publish_replicated(&cluster, &[0, 1, 2], "events", format!("before {i}")).await;
    }
    let follower = (cluster.leader().await + 1) % 3;
    cluster.nodes[follower].kill();
    let others: Vec<usize> = (0..3).filter(|&i| i != follower).collect();
    for i in 0..30 {
        publish_replicated(&cluster, &others, "events", format!("while down {i}")).await;
    }
    cluster.nodes[follower].restart();
    wait_depth(&cluster, "events", 40).await;
}

/// A leader paused (SIGSTOP) is replaced; the cluster keeps taking
/// publishes; resumed (SIGCONT), the old leader steps down and holds what
/// the new leader committed, and nothing it was sent while paused.
#[tokio::test]
async fn a_paused_leader_is_replaced_and_steps_down_on_resume() {
    let cluster = Cluster::start();
    cluster.leader().await;
    create_replicated(&cluster, "jobs", replicated()).await;
    publish_replicated(&cluster, &[0, 1, 2], "jobs", "first".to_owned()).await;
    wait_depth(&cluster, "jobs", 1).await;
    let old = cluster.leader().await;
    let mut to_old = cluster.nodes[old].publisher().await;

    cluster.nodes[old].signal(libc::SIGSTOP);
    // A publish sent to the paused leader: it cannot be answered now.
    let paused_publish = tokio::spawn(async move {
        let mut request =
            tonic::Request::new(pb::PublishRequest { queue: "jobs".into(), message: Some(message("to the paused")) });
        request.set_timeout(Duration::from_secs(60));
        to_old.publish(request).await
    });
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = {
        let deadline = Instant::now() + LEADER_WITHIN;
        loop {
            let mut found = None;
            for &i in &others {
                if cluster_status(&cluster.nodes[i])
                    .await
                    .is_some_and(|s| s.role == "leader" && s.leader_id == s.node_id)
                {
                    found = Some(i);
                }
            }
            if let Some(i) = found {
                break i;
            }
            assert!(Instant::now() < deadline, "no new leader while the old one is paused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    for i in 0..5 {
        publish_replicated(&cluster, &others, "jobs", format!("new leader {i}")).await;
    }
    cluster.nodes[old].signal(libc::SIGCONT);
    // The old leader steps down and converges on the new leader's log.
    let deadline = Instant::now() + LEADER_WITHIN;
    loop {
        let status = cluster_status(&cluster.nodes[old]).await;
        if status.as_ref().is_some_and(|s| s.role == "follower" && s.leader_id == new as u64 + 1) {
            break;
        }
        assert!(Instant::now() < deadline, "the resumed leader did not step down: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = tokio::time::timeout(Duration::from_secs(30), paused_publish)
        .await
        .expect("the paused publish is answered once its node runs again")
        .expect("task");
    let stored_anyway = match &answer {
        // Committed after all (the new leader may carry the entry on);
        // then it is on every node, acknowledged or not.
        Ok(_) => 1,
        Err(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            // Not acknowledged: if it is stored, it is stored everywhere,
            // which the equal depths below check.
            u64::from(depth_on(&cluster.nodes[new], "jobs").await == Some(7))
        }
    };
    wait_depth(&cluster, "jobs", 6 + stored_anyway).await;
}

/// Delivery semantics hold on a replicated queue: a nacked message past
/// `max_attempts` is dead-lettered, and the dead letter and the ack of
/// the original reach every node; an acked message leaves every node's
/// depth.
#[tokio::test]
async fn nacks_dead_letters_and_acks_reach_every_node() {
    let cluster = Cluster::start();
    cluster.leader().await;
    let settings = pb::QueueSettings { replicas: Some(3), max_attempts: Some(1), ..Default::default() };
    create_replicated(&cluster, "tasks", settings).await;
    publish_replicated(&cluster, &[0, 1, 2], "tasks", "to fail".to_owned()).await;
    publish_replicated(&cluster, &[0, 1, 2], "tasks", "to ack".to_owned()).await;
    wait_depth(&cluster, "tasks", 2).await;
    let leading = &cluster.nodes[cluster.leader().await];

    let mut consumer = leading.consumer().await;
    let mut session = crate::support::Session::open(&mut consumer, "tasks", 2).await;
    let first = session.delivery().await;
    let second = session.delivery().await;
    let (fail, ack) = if first.payload.as_ref() == b"to fail" { (first, second) } else { (second, first) };
    session.nack(fail.delivery_id, 0, "broken").await;
    session.ack(vec![ack.delivery_id]).await;
    wait_depth(&cluster, "tasks", 0).await;
    wait_depth(&cluster, "tasks.dead", 1).await;
}

/// A producer given every node's address keeps publishing while the
/// leader it streams to is paused (SIGSTOP: its connection stays up and
/// nothing answers): its stream is abandoned as stalled after the attempt
/// timeout, the client moves to another node, which sends it on to the
/// new leader, and every publish is acknowledged while the old leader is
/// still paused, each stored once. Before, the producer waited on the
/// paused node's stream until it resumed.
#[tokio::test]
async fn a_producer_keeps_publishing_while_its_leader_is_paused() {
    const PUBLISHES: u64 = 20;
    let cluster = Cluster::start();
    cluster.leader().await;
    create_replicated(&cluster, "orders", replicated()).await;
    let client = Client::new(&cluster.addrs()).expect("addresses");
    let producer = client
        .producer(ProducerConfig {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(20),
            breaker: BreakerConfig { failure_threshold: 1_000_000, ..BreakerConfig::default() },
            // Redirects to the paused leader until the election ends are
            // retried; a short cap keeps the backoff from outlasting it.
            retry: RetryPolicy {
                attempts_max: 100,
                backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
            },
            ..ProducerConfig::default()
        })
        .expect("producer");
    // The producer's stream now goes to the leader.
    producer.publish("orders", Message::new("before").with_idempotency_key("before")).await.expect("published");
    let old = cluster.leader().await;

    cluster.nodes[old].signal(libc::SIGSTOP);
    let paused_at = Instant::now();
    for i in 0..PUBLISHES {
        let message = Message::new(format!("while paused {i}")).with_idempotency_key(format!("k{i}"));
        if let Err(error) = producer.publish("orders", message).await {
            cluster.nodes[old].signal(libc::SIGCONT);
            panic!("publish {i} failed {:?} after the pause: {error:?}", paused_at.elapsed());
        }
    }
    let took = paused_at.elapsed();
    cluster.nodes[old].signal(libc::SIGCONT);
    // The stall (2 s), an election (up to two election timeouts) and the
    // redirects. Without the stall the first publish waited on the paused
    // node's stream (and its connection, kept up by the kernel) until its
    // deadline.
    assert!(took < Duration::from_secs(15), "{PUBLISHES} publishes took {took:?} after the pause");
    // The resumed node converges on the new leader's log: every
    // acknowledged publish on every node, once.
    wait_depth(&cluster, "orders", 1 + PUBLISHES).await;
}
