//! `Cluster`: this node's member of the cluster log, and what the broker
//! asks of it (propose, who leads, role changes).

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Weak},
    time::Duration,
};

use openraft::{BasicNode, Raft, ServerState, SnapshotPolicy, error::ClientWriteError, error::RaftError};
use tokio::sync::mpsc;

use super::{
    Applied, Command, NodeId, TypeConfig,
    log_store::LogStore,
    network::Network,
    state_machine::{Shared, StateMachine},
};
use crate::{
    broker::Broker,
    config::ClusterConfig,
    error::{BrokerError, Result},
    limits::{CLUSTER_ACK_BATCH_MAX, CLUSTER_ACKS_QUEUED_MAX, CLUSTER_LOG_KEEP, CLUSTER_SYNC_INTERVAL_MS},
};

/// One ack of a replicated queue waiting to be proposed.
#[derive(Debug)]
struct PendingAck {
    queue: String,
    lane: u32,
    offset: u64,
    size: u64,
    kind: u8,
}

/// This node's place in the cluster.
pub struct Cluster {
    pub raft: Raft<TypeConfig>,
    config: ClusterConfig,
    acks: mpsc::Sender<PendingAck>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node_id", &self.config.node_id).finish_non_exhaustive()
    }
}

/// What a node reports of the cluster (GetStats, metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    pub node_id: u64,
    pub role: &'static str,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
    pub last_log_index: u64,
    /// Index of the last entry committed and applied here.
    pub last_applied: u64,
    /// On the leader: each peer's id and matched index.
    pub peers: Vec<(u64, u64)>,
}

impl Cluster {
    /// Opens the cluster log under `<data>/cluster`, starts Raft, and
    /// initializes the cluster with the configured voters when this node
    /// is pristine (every node does; the calls agree).
    pub async fn start(config: &ClusterConfig, data_dir: &Path, broker: &Arc<Broker>) -> anyhow::Result<Arc<Cluster>> {
        let dir = data_dir.join("cluster");
        let shared = Shared::open(&dir)?;
        shared.broker.set(Arc::downgrade(broker)).expect("the cluster starts once");
        let log_store = LogStore::open(&dir.join("raft"))?;
        let raft_config = openraft::Config {
            cluster_name: "ballast".to_owned(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            // Snapshots are sync points, taken by `maintain`.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: CLUSTER_LOG_KEEP,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate()?);
        let network = Network::new(config.token.clone(), peer_tls(config, &broker.config().tls)?)?;
        let machine = StateMachine { shared: Arc::clone(&shared) };
        let raft = Raft::new(config.node_id, raft_config, network, log_store, machine).await?;
        if !raft.is_initialized().await? {
            let members: BTreeMap<NodeId, BasicNode> =
                config.peers.iter().map(|p| (p.id, BasicNode { addr: p.addr.clone() })).collect();
            if let Err(e) = raft.initialize(members).await {
                // Another node's initialization reached us first: fine.
                tracing::info!("cluster initialization: {e}");
            }
        }
        let (acks, pending) = mpsc::channel(CLUSTER_ACKS_QUEUED_MAX);
        let cluster = Arc::new(Cluster { raft, config: config.clone(), acks, shared });
        tokio::spawn(propose_acks(Arc::downgrade(&cluster), pending));
        tokio::spawn(maintain(Arc::downgrade(&cluster)));
        tokio::spawn(follow_roles(Arc::downgrade(&cluster), Arc::downgrade(broker)));
        tracing::info!(node_id = config.node_id, peers = config.peers.len(), "cluster log started");
        Ok(cluster)
    }

    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// Voters of the cluster: what `replicas` of a replicated queue must be.
    pub fn voters(&self) -> u32 {
        u32::try_from(self.config.peers.len()).unwrap_or(u32::MAX)
    }

    /// The leader's client address, if one is known.
    pub fn leader_addr(&self) -> Option<String> {
        let leader = self.raft.metrics().borrow().current_leader?;
        self.config.addr_of(leader).map(str::to_owned)
    }

    /// The term this node leads, once it has applied an entry of that term
    /// itself (the blank entry a new leader writes first). Every entry of
    /// an earlier term that any leader could have acknowledged is then
    /// applied here, so its idempotency keys are in the dedupe index: a
    /// publish retried after a failover is found a duplicate instead of
    /// being stored twice. Waits for that at most one election timeout
    /// (`cluster.election_timeout_max_ms`: a leader that cannot commit
    /// its own first entry in that time is about to lose the leadership);
    /// a follower, or a leader still not ready then, answers not-leader.
    pub async fn leader_term(&self, queue: &str) -> Result<u64> {
        // Ready: the term; not leading: `Err`; leading, not ready: `Ok(None)`.
        let ready = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
            if m.state != ServerState::Leader || m.current_leader != Some(self.config.node_id) {
                return Err(());
            }
            Ok(m.last_applied.filter(|applied| applied.leader_id.term == m.current_term).map(|_| m.current_term))
        };
        let mut metrics = self.raft.metrics();
        // Asked on every replicated publish: once the leader is ready,
        // one look at the metrics, no timer.
        let first = ready(&metrics.borrow_and_update());
        let answer = match first {
            Ok(Some(term)) => Some(term),
            Err(()) => None,
            Ok(None) => {
                let wait = async {
                    while metrics.changed().await.is_ok() {
                        match ready(&metrics.borrow_and_update()) {
                            Ok(None) => continue,
                            outcome => return outcome.ok().flatten(),
                        }
                    }
                    None
                };
                let limit = Duration::from_millis(self.config.election_timeout_max_ms);
                tokio::time::timeout(limit, wait).await.ok().flatten()
            }
        };
        answer.ok_or_else(|| self.not_leader(queue))
    }

    /// What a node that cannot take a call on `queue` as leader answers.
    fn not_leader(&self, queue: &str) -> BrokerError {
        BrokerError::NotLeader { queue: queue.to_owned(), leader: self.leader_addr() }
    }

    /// Proposes a command and waits until it is committed (a majority has
    /// it synced) and applied here; returns what applying it gave.
    pub async fn propose(&self, queue: &str, command: Command) -> Result<Applied> {
        match self.raft.client_write(command).await {
            Ok(response) => match response.data {
                Applied::Failed { message } => Err(BrokerError::FailedPrecondition(message)),
                Applied::Superseded => Err(self.not_leader(queue)),
                applied => Ok(applied),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => Err(BrokerError::NotLeader {
                queue: queue.to_owned(),
                leader: forward.leader_node.map(|node| node.addr),
            }),
            Err(e) => Err(BrokerError::Cluster(e.to_string())),
        }
    }

    /// Queues an ack of a replicated queue for the cluster log. The leader
    /// acked the record locally already; the proposer gathers acks into
    /// entries, so followers mark the same records done (a lost ack means
    /// a redelivery after a failover, never a loss).
    pub fn propose_ack(&self, queue: &str, lane: u32, offset: u64, size: u64, kind: u8) {
        let ack = PendingAck { queue: queue.to_owned(), lane, offset, size, kind };
        if let Err(mpsc::error::TrySendError::Full(ack)) = self.acks.try_send(ack) {
            // The cluster log is behind the acks: this one waits its turn
            // (never dropped: a follower would keep its record, and its
            // segment, until a failover redelivered it).
            let acks = self.acks.clone();
            tokio::spawn(async move { acks.send(ack).await });
        }
    }

    /// The cluster figures of this node.
    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let role = match metrics.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let peers = metrics
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, matched)| (*id, matched.map_or(0, |m| m.index))).collect())
            .unwrap_or_default();
        ClusterStatus {
            node_id: self.config.node_id,
            role,
            term: metrics.current_term,
            leader_id: metrics.current_leader,
            leader_addr: metrics.current_leader.and_then(|id| self.config.addr_of(id).map(str::to_owned)),
            last_log_index: metrics.last_log_index.unwrap_or(0),
            last_applied: metrics.last_applied.map_or(0, |l| l.index),
            peers,
        }
    }

    /// Stops Raft (at shutdown), after a last sync point.
    pub async fn shutdown(&self) {
        if let Err(e) = self.shared.sync_point().await {
            tracing::warn!("cluster sync point at shutdown: {e}");
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("stopping the cluster log: {e}");
        }
    }
}

/// TLS to the peers, when this node serves TLS (`docs/replication.md`).
fn peer_tls(
    cluster: &ClusterConfig,
    tls: &crate::config::TlsConfig,
) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else { return Ok(None) };
    let Some(ca) = &cluster.ca else {
        anyhow::bail!("cluster.ca is needed with [tls]: the CA certificates that signed the peers' certificates");
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    let mut client = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if tls.client_ca.is_some() {
        client = client.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(client))
}

/// Gathers queued acks into `Ack` entries, one per queue and lane, and
/// proposes them in order. Off the leader the acks are dropped: a new
/// leader delivers those messages again.
async fn propose_acks(cluster: Weak<Cluster>, mut pending: mpsc::Receiver<PendingAck>) {
    let mut batch = Vec::new();
    while pending.recv_many(&mut batch, CLUSTER_ACK_BATCH_MAX).await > 0 {
        let Some(cluster) = cluster.upgrade() else { return };
        let mut groups: BTreeMap<(String, u32, u8), Vec<(u64, u64)>> = BTreeMap::new();
        for ack in batch.drain(..) {
            groups.entry((ack.queue, ack.lane, ack.kind)).or_default().push((ack.offset, ack.size));
        }
        for ((queue, lane, kind), acks) in groups {
            let command = Command::Ack { queue: queue.clone(), lane, acks, kind };
            if let Err(e) = cluster.propose(&queue, command).await {
                tracing::debug!(%queue, "acks not replicated (they are delivered again after a failover): {e}");
            }
        }
    }
}

/// Every `CLUSTER_SYNC_INTERVAL_MS`: a sync point, then a snapshot (its
/// metadata only), after which openraft purges the log it covers, less
/// `CLUSTER_LOG_KEEP` entries.
async fn maintain(cluster: Weak<Cluster>) {
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_millis(CLUSTER_SYNC_INTERVAL_MS)).await;
        let Some(cluster) = cluster.upgrade() else { return };
        match cluster.shared.sync_point().await {
            Ok(point) if point.is_some() && point != last => {
                last = point;
                let _ = cluster.raft.trigger().snapshot().await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cluster sync point: {e}"),
        }
    }
}

/// Follows this node's role: on becoming leader, every replicated queue
/// reads its lanes again from their ack floors (what the old leader had
/// leased is delivered again); on losing it, their consumers are let go
/// (their streams end, and they reconnect to the new leader).
async fn follow_roles(cluster: Weak<Cluster>, broker: Weak<Broker>) {
    let Some(mut metrics) = cluster.upgrade().map(|c| c.raft.metrics()) else { return };
    let mut leading = false;
    loop {
        let now_leading = {
            let m = metrics.borrow_and_update();
            m.state == ServerState::Leader && Some(m.id) == m.current_leader
        };
        if now_leading != leading {
            leading = now_leading;
            let Some(broker) = broker.upgrade() else { return };
            tracing::info!(leading, "cluster role changed");
            for queue in broker.queues() {
                if queue.settings().replicas > 1 {
                    if leading {
                        queue.take_leadership();
                    } else {
                        queue.release_consumers();
                    }
                }
            }
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
