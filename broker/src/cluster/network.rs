//! The cluster's transport: openraft's RPCs over the internal gRPC service
//! `ballast.cluster.v1.Raft` (`proto/ballast/cluster/v1/cluster.proto`).
//!
//! Each message carries the postcard encoding of openraft's own structs:
//! the request, and for the answer `Result<response, RaftError>`, so a
//! remote Raft error reaches the caller's openraft as a
//! [`RemoteError`]. Nodes of one cluster run the same version; the payload
//! has no compatibility promise beyond that.
//!
//! - Client: [`Network`] (openraft's [`RaftNetworkFactory`]) makes one
//!   [`PeerClient`] per target, on a lazily connected tonic channel to the
//!   target's `BasicNode::addr` (`http://host:port`; dialed as `https`
//!   when the network has TLS settings, see `peer_uri`). Every failure to get an answer is [`Unreachable`], so openraft
//!   backs off instead of retrying at once; openraft's own timeout
//!   (`RPCOption::hard_ttl`) also travels as the gRPC deadline.
//! - Server: [`RaftService`] answers the three RPCs by calling the local
//!   `openraft::Raft`. An undecodable payload is `INVALID_ARGUMENT`.

use std::time::Duration;

use ballast_proto::cluster::v1::RaftMessage;
use ballast_proto::cluster::v1::raft_client::RaftClient;
use ballast_proto::cluster::v1::raft_server::{Raft as RaftRpc, RaftServer};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::{NodeId, TypeConfig};
use crate::limits::RAFT_MESSAGE_SIZE_MAX;

/// How long a connection attempt to a peer may take before the RPC fails
/// as unreachable (openraft's own RPC timeout is usually shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a [`Network`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetworkConfigError {
    #[error("the cluster token cannot travel in gRPC metadata (printable ASCII only)")]
    Token,
}

/// openraft's network factory: clients to the other nodes of the cluster.
#[derive(Debug, Clone)]
pub struct Network {
    /// `authorization: Bearer <token>` sent with every RPC, if set.
    authorization: Option<AsciiMetadataValue>,
    /// TLS for every peer connection; plaintext if `None`.
    tls: Option<ClientTlsConfig>,
}

impl Network {
    /// A factory whose RPCs carry `token` as a bearer token (if given) and
    /// use `tls` (if given; plaintext otherwise).
    pub fn new(token: Option<String>, tls: Option<ClientTlsConfig>) -> Result<Network, NetworkConfigError> {
        let authorization = token
            .map(|token| MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| NetworkConfigError::Token))
            .transpose()?;
        Ok(Network { authorization, tls })
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let client = peer_uri(&node.addr, self.tls.is_some())
            .and_then(|uri| Endpoint::from_shared(uri).map_err(|e| e.to_string()))
            .map_err(|e| format!("peer {target}'s address {:?}: {e}", node.addr))
            .and_then(|endpoint| match &self.tls {
                Some(tls) => endpoint.tls_config(tls.clone()).map_err(|e| format!("TLS for peer {target}: {e}")),
                None => Ok(endpoint),
            })
            .map(|endpoint| {
                let channel = endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true).connect_lazy();
                RaftClient::new(channel)
                    .max_decoding_message_size(RAFT_MESSAGE_SIZE_MAX)
                    .max_encoding_message_size(RAFT_MESSAGE_SIZE_MAX)
            });
        PeerClient { target, node: node.clone(), client, authorization: self.authorization.clone() }
    }
}

/// The URI to dial for a peer's address (`http://host:port`,
/// `https://host:port` or `host:port`): its scheme follows the TLS setting,
/// so a cluster configured for TLS never talks plaintext because an address
/// says `http` (tonic would), and an `https` address without TLS
/// configured is refused rather than dialed with default roots.
fn peer_uri(addr: &str, tls: bool) -> Result<String, String> {
    let rest = if let Some(rest) = addr.strip_prefix("http://") {
        rest
    } else if let Some(rest) = addr.strip_prefix("https://") {
        if !tls {
            return Err("an https address, but the cluster has no TLS settings".into());
        }
        rest
    } else {
        addr
    };
    Ok(format!("{}://{rest}", if tls { "https" } else { "http" }))
}

/// openraft's client to one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    node: BasicNode,
    /// The channel, or why the peer's address or TLS settings are unusable
    /// (every RPC then fails as unreachable with that reason).
    client: Result<RaftClient<Channel>, String>,
    authorization: Option<AsciiMetadataValue>,
}

/// The three RPCs, for the shared call path.
#[derive(Debug, Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl PeerClient {
    /// Sends one RPC and decodes `Result<Resp, RaftError<E>>` from the
    /// answer. The outer error is openraft's: unreachable, or the remote
    /// Raft's own error.
    async fn call<Resp, E>(
        &mut self,
        rpc: Rpc,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(client) => client,
            Err(reason) => return Err(unreachable(reason.clone())),
        };
        let mut request = tonic::Request::new(RaftMessage { payload: payload.into() });
        request.set_timeout(option.hard_ttl());
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        let answer = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        let answer = answer.map_err(|status| {
            unreachable(format!("{rpc:?} to peer {}: {} ({})", self.target, status.message(), status.code()))
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&answer.get_ref().payload)
            .map_err(|e| unreachable(format!("{rpc:?} answer from peer {} does not decode: {e}", self.target)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let Some(too_large) = too_large(entries, payload.len()) {
            return Err(too_large);
        }
        self.call(Rpc::AppendEntries, payload, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.call(Rpc::InstallSnapshot, payload, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let payload = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.call(Rpc::Vote, payload, &option).await
    }
}

/// An AppendEntries whose encoding is over [`RAFT_MESSAGE_SIZE_MAX`]: with
/// more than one entry openraft is told to send half as many; a single
/// entry that big cannot be sent (the log store refuses such entries) and
/// is unreachable, so openraft backs off instead of spinning.
fn too_large<E: std::error::Error>(
    entries: u64,
    size: usize,
) -> Option<RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
    if size <= RAFT_MESSAGE_SIZE_MAX {
        return None;
    }
    if entries > 1 {
        return Some(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(entries / 2)));
    }
    Some(unreachable(format!("one raft entry encodes to {size} bytes, over the limit of {RAFT_MESSAGE_SIZE_MAX}")))
}

fn unreachable<E: std::error::Error>(reason: String) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(reason)))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(value)
}

/// The server side: answers peers' RPCs with the local Raft.
#[derive(Clone)]
pub struct RaftService {
    raft: openraft::Raft<TypeConfig>,
}

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// The tonic service for `raft`, with message limits that fit the
    /// largest entry ([`RAFT_MESSAGE_SIZE_MAX`] both ways).
    #[allow(clippy::new_ret_no_self, reason = "the service is only ever used wrapped in its server")]
    pub fn new(raft: openraft::Raft<TypeConfig>) -> RaftServer<RaftService> {
        RaftServer::new(RaftService { raft })
            .max_decoding_message_size(RAFT_MESSAGE_SIZE_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_SIZE_MAX)
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&request)?;
        answer(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: tonic::Request<RaftMessage>) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let rpc: VoteRequest<NodeId> = decode(&request)?;
        answer(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(&request)?;
        answer(&self.raft.install_snapshot(rpc).await)
    }
}

fn decode<T: DeserializeOwned>(request: &tonic::Request<RaftMessage>) -> Result<T, tonic::Status> {
    postcard::from_bytes(&request.get_ref().payload).map_err(|e| {
        tonic::Status::invalid_argument(format!(
            "the raft message does not decode ({e}); are both nodes running the same Ballast version?"
        ))
    })
}

fn answer<T: Serialize>(result: &T) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
    let payload = encode(result).map_err(|e| tonic::Status::internal(format!("encoding the raft answer: {e}")))?;
    Ok(tonic::Response::new(RaftMessage { payload: payload.into() }))
}

#[cfg(test)]
mod tests;
