use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_proto::cluster::v1::raft_client::RaftClient;
use openraft::{Config, Raft};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use super::*;
use crate::cluster::Command;
use crate::cluster::log_store::{LogStore, wait_released};
use crate::cluster::testing::MemStateMachine;

/// Longest wait for an election or for an entry to be applied everywhere.
const WAIT: Duration = Duration::from_secs(15);

/// One in-process node: its Raft, its state machine and its gRPC server.
struct Node {
    id: NodeId,
    addr: std::net::SocketAddr,
    raft: Raft<TypeConfig>,
    state_machine: MemStateMachine,
    stop: tokio::sync::oneshot::Sender<()>,
    server: JoinHandle<()>,
    dir: tempfile::TempDir,
}

async fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
    let addr = format!("http://{}", listener.local_addr().expect("its address"));
    (listener, addr)
}

/// Starts node `id` on `listener` with its Raft log in `dir` (a new or a
/// reopened one) and an empty in-memory state machine.
async fn start(id: NodeId, listener: TcpListener, dir: tempfile::TempDir) -> Node {
    let config =
        Config { heartbeat_interval: 100, election_timeout_min: 500, election_timeout_max: 1000, ..Default::default() };
    let config = Arc::new(config.validate().expect("a valid config"));
    let store = LogStore::open(dir.path()).expect("open the log store");
    let state_machine = MemStateMachine::default();
    let network = Network::new(None, None).expect("a network");
    let raft = Raft::new(id, config, network, store, state_machine.clone()).await.expect("a raft node");
    let addr = listener.local_addr().expect("its address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = RaftService::new(raft.clone());
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
    });
    Node { id, addr, raft, state_machine, stop, server, dir }
}

impl Node {
    /// Stops the node as a crash would look to its peers: its Raft stops,
    /// then its server closes its connections. Returns its data directory.
    async fn stop(self) -> (std::net::SocketAddr, tempfile::TempDir) {
        self.raft.shutdown().await.expect("the raft shuts down");
        let _ = self.stop.send(());
        let path = self.dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || wait_released(&path)).await.expect("the log store closes");
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
            server.abort();
        }
        (self.addr, self.dir)
    }
}

async fn wait_applied(node: &Node, index: u64) {
    node.raft
        .wait(Some(WAIT))
        .applied_index_at_least(Some(index), "applied")
        .await
        .unwrap_or_else(|e| panic!("node {} did not apply {index}: {e}", node.id));
}

/// Three nodes over real loopback gRPC elect a leader and replicate a
/// write to all three; a follower stopped and restarted on its own Raft
/// log catches up; when the leader stops, the other two elect a new leader
/// within a bounded time and keep committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_fail_over() {
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let (listener, addr) = listen().await;
        listeners.push((id, listener));
        members.insert(id, BasicNode { addr });
    }
    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        nodes.push(start(id, listener, tempfile::tempdir().expect("tempdir")).await);
    }
    nodes[0].raft.initialize(members).await.expect("initialize");
    let metrics = nodes[0].raft.wait(Some(WAIT)).metrics(|m| m.current_leader.is_some(), "a leader").await;
    let leader = metrics.expect("a leader within the bound").current_leader.expect("a leader");
    let leader_node = |nodes: &[Node], id: NodeId| nodes.iter().position(|n| n.id == id).expect("a node");

    let first = Command::DeleteQueue { name: "first".into() };
    let written = nodes[leader_node(&nodes, leader)].raft.client_write(first.clone()).await.expect("a write");
    for node in &nodes {
        wait_applied(node, written.log_id.index).await;
        assert_eq!(node.state_machine.commands(), vec![first.clone()], "node {}", node.id);
    }

    // A follower stops; a write commits without it; it restarts on its
    // own log (its state machine empty) and catches up.
    let follower = nodes.iter().position(|n| n.id != leader).expect("a follower");
    let follower_id = nodes[follower].id;
    let (addr, dir) = nodes.remove(follower).stop().await;
    let second = Command::DeleteQueue { name: "second".into() };
    let written = nodes[leader_node(&nodes, leader)].raft.client_write(second.clone()).await.expect("a write");
    let listener = TcpListener::bind(addr).await.expect("the follower's port again");
    nodes.push(start(follower_id, listener, dir).await);
    let restarted = nodes.last().expect("the restarted follower");
    wait_applied(restarted, written.log_id.index).await;
    assert_eq!(restarted.state_machine.commands(), vec![first.clone(), second.clone()]);

    // The leader stops.
    let (_, _dir) = nodes.remove(leader_node(&nodes, leader)).stop().await;
    let started = std::time::Instant::now();
    let new_leader = nodes[0]
        .raft
        .wait(Some(WAIT))
        .metrics(|m| m.current_leader.is_some_and(|l| l != leader), "a new leader")
        .await
        .expect("a new leader within the bound")
        .current_leader
        .expect("a leader");
    assert!(started.elapsed() < WAIT);
    let third = Command::DeleteQueue { name: "third".into() };
    let new_node = nodes.iter().find(|n| n.id == new_leader).expect("the new leader is a survivor");
    let written = new_node.raft.client_write(third.clone()).await.expect("a write through the new leader");
    for node in &nodes {
        wait_applied(node, written.log_id.index).await;
        let commands = node.state_machine.commands();
        assert_eq!(commands, vec![first.clone(), second.clone(), third.clone()], "node {}", node.id);
    }
    for node in nodes {
        node.stop().await;
    }
}

/// A payload that is not an openraft message is refused with
/// INVALID_ARGUMENT, and the bearer token given to the network travels in
/// the `authorization` metadata.
#[tokio::test]
async fn undecodable_payload_is_invalid_argument_and_token_travels() {
    let (listener, addr) = listen().await;
    let seen = Arc::new(parking_lot::Mutex::new(None::<String>));
    let config = Arc::new(Config::default().validate().expect("config"));
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path()).expect("open");
    let network = Network::new(Some("s3cret".into()), None).expect("a network");
    let raft = Raft::new(1, config, network.clone(), store, MemStateMachine::default()).await.expect("raft");
    let record = Arc::clone(&seen);
    let service =
        RaftServer::with_interceptor(RaftService { raft: raft.clone() }, move |request: tonic::Request<()>| {
            let value = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
            *record.lock() = value;
            Ok(request)
        });
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });

    let mut client = RaftClient::connect(addr.clone()).await.expect("connect");
    let status = client.vote(RaftMessage { payload: vec![0xff; 3].into() }).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("does not decode"), "{}", status.message());

    // A real vote through the network: the answer decodes, the token was sent.
    let mut factory = network;
    let mut peer = factory.new_client(1, &BasicNode { addr }).await;
    let vote = VoteRequest { vote: openraft::Vote::new(1, 2), last_log_id: None };
    peer.vote(vote, RPCOption::new(Duration::from_secs(5))).await.expect("a vote answer");
    assert_eq!(seen.lock().as_deref(), Some("Bearer s3cret"));

    server.abort();
    raft.shutdown().await.expect("shutdown");
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || wait_released(&path)).await.expect("the log store closes");
}

/// A peer that does not answer is unreachable (openraft backs off), and a
/// bad address is too, with the reason.
#[tokio::test]
async fn unanswered_rpcs_are_unreachable() {
    let (listener, addr) = listen().await;
    drop(listener);
    let mut factory = Network::new(None, None).expect("a network");
    let vote = VoteRequest { vote: openraft::Vote::new(1, 2), last_log_id: None };
    for addr in [addr, "not a url".to_string(), "https://127.0.0.1:1".to_string()] {
        let mut peer = factory.new_client(7, &BasicNode { addr: addr.clone() }).await;
        match peer.vote(vote.clone(), RPCOption::new(Duration::from_secs(5))).await {
            Err(RPCError::Unreachable(_)) => {}
            other => panic!("{addr}: expected unreachable, got {other:?}"),
        }
    }
}

/// An AppendEntries of exactly the message limit is sent; one byte more
/// is split (openraft is told to send half the entries), and a single
/// entry that big is unreachable instead.
#[test]
fn append_entries_size_limit() {
    assert!(too_large::<openraft::error::Infallible>(10, RAFT_MESSAGE_SIZE_MAX).is_none());
    match too_large::<openraft::error::Infallible>(10, RAFT_MESSAGE_SIZE_MAX + 1) {
        Some(RPCError::PayloadTooLarge(e)) => assert_eq!(e.entries_hint(), 5),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert!(matches!(
        too_large::<openraft::error::Infallible>(1, RAFT_MESSAGE_SIZE_MAX + 1),
        Some(RPCError::Unreachable(_))
    ));
}

/// The scheme dialed follows the TLS setting, whatever the address says;
/// an https address without TLS settings is refused.
#[test]
fn peer_scheme_follows_tls() {
    assert_eq!(peer_uri("http://10.0.0.1:7000", false).as_deref(), Ok("http://10.0.0.1:7000"));
    assert_eq!(peer_uri("10.0.0.1:7000", false).as_deref(), Ok("http://10.0.0.1:7000"));
    assert_eq!(peer_uri("http://node-2:7000", true).as_deref(), Ok("https://node-2:7000"));
    assert_eq!(peer_uri("https://node-2:7000", true).as_deref(), Ok("https://node-2:7000"));
    assert!(peer_uri("https://node-2:7000", false).is_err());
}

/// The server takes a message of exactly RAFT_MESSAGE_SIZE_MAX encoded
/// bytes (it reaches the decoder: INVALID_ARGUMENT) and refuses one byte
/// more before decoding it.
#[tokio::test]
async fn server_message_size_limit() {
    let (listener, addr) = listen().await;
    let node = start(1, listener, tempfile::tempdir().expect("tempdir")).await;
    let mut client = RaftClient::connect(addr)
        .await
        .expect("connect")
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    // The message's own encoding: a 1-byte tag and a 4-byte length.
    let at_limit = RAFT_MESSAGE_SIZE_MAX - 5;
    let status = client.vote(RaftMessage { payload: vec![0xff; at_limit].into() }).await.expect_err("garbage");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
    let status = client.vote(RaftMessage { payload: vec![0xff; at_limit + 1].into() }).await.expect_err("too big");
    assert_ne!(status.code(), tonic::Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("message length too large"), "{}", status.message());
    node.stop().await;
}

/// With TLS settings the network dials TLS even to an `http://` address
/// and a vote gets its answer over it; without them the same TLS-only
/// peer is unreachable.
#[tokio::test]
async fn tls_peer() {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("a certificate");
    let (cert, key) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    let (listener, addr) = listen().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path()).expect("open");
    let config = Arc::new(Config::default().validate().expect("config"));
    let raft = Raft::new(1, config, Network::new(None, None).expect("network"), store, MemStateMachine::default())
        .await
        .expect("raft");
    let service = RaftService::new(raft.clone());
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(&cert, &key));
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("server TLS")
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });

    let vote = VoteRequest { vote: openraft::Vote::new(1, 2), last_log_id: None };
    let client_tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&cert)).domain_name("localhost");
    let mut factory = Network::new(None, Some(client_tls)).expect("a network");
    let mut peer = factory.new_client(1, &BasicNode { addr: addr.clone() }).await;
    peer.vote(vote.clone(), RPCOption::new(Duration::from_secs(5))).await.expect("a vote answer over TLS");

    let mut plain = Network::new(None, None).expect("a network");
    let mut peer = plain.new_client(1, &BasicNode { addr }).await;
    match peer.vote(vote, RPCOption::new(Duration::from_secs(5))).await {
        Err(RPCError::Unreachable(_)) => {}
        other => panic!("expected unreachable without TLS, got {other:?}"),
    }
    server.abort();
    raft.shutdown().await.expect("shutdown");
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || wait_released(&path)).await.expect("the log store closes");
}
