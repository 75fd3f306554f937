//! Replicated queues (issue #19; design in `docs/replication.md`).
//!
//! One Raft group per cluster, the **cluster log**, carries the commands
//! of every replicated queue. openraft runs the consensus; this module
//! gives it its storage (`log_store`, the Raft log in CRC-framed files;
//! `state_machine`, the replicated queues), its transport (`network`, the
//! internal `ballast.cluster.v1.Raft` gRPC service) and the node that
//! wires them (`node`).

use std::io::Cursor;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;
#[cfg(test)]
mod testing;

openraft::declare_raft_types!(
    /// The cluster log's types: commands in, what applying them gave out.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A node's id in the cluster (`cluster.node_id`), never 0.
pub type NodeId = u64;
/// openraft's storage error for this config.
pub type StorageError = openraft::StorageError<NodeId>;
/// A Raft log id (term, leader, index).
pub type LogId = openraft::LogId<NodeId>;
/// One entry of the cluster log.
pub type Entry = openraft::Entry<TypeConfig>;

/// One command of the cluster log: every mutation of a replicated queue
/// is one of these, issued by the leader and applied in log order by
/// every replica (`docs/replication.md`, "What is replicated").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a replicated queue (and its dead-letter queue) with its
    /// resolved settings, as TOML (`queue.toml`'s text).
    CreateQueue { name: String, settings_toml: String },
    /// Replaces a replicated queue's settings (TOML, as above).
    UpdateQueue { name: String, settings_toml: String },
    /// Deletes a replicated queue and its dead-letter queue.
    DeleteQueue { name: String },
    /// Appends byte-identical records to one lane of a replicated queue
    /// (or of its `.dead` queue). `term`, when set, is the leader's term in
    /// which the records' idempotency keys were looked up: the entry is
    /// applied only if it was written in that same term (see
    /// [`Applied::Superseded`]).
    Append { queue: String, lane: u32, term: Option<u64>, records: Vec<RecordData> },
    /// Marks records of one lane done: `(offset, stored size)` each; `kind`
    /// is storage's `AckKind` as a byte (acked, dead-lettered).
    Ack { queue: String, lane: u32, acks: Vec<(u64, u64)>, kind: u8 },
    /// Marks every record of one lane below `end` done (a purge).
    Purge { queue: String, lane: u32, end: u64 },
}

/// A record as the leader built it: every replica stores these bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordData {
    pub timestamp_ms: u64,
    pub attempt: u32,
    pub flags: u16,
    pub key: Option<Bytes>,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// What applying one command gave, returned to the proposer on the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Nothing to report (acks, settings, membership and blank entries).
    Done,
    /// An `Append`'s records start at this offset of their lane.
    Appended { first_offset: u64 },
    /// An `Append` whose keys were looked up in an earlier term than the
    /// one its entry was written in: the proposer lost the leadership and
    /// won it back in between, and another leader may have stored those
    /// keys meanwhile. Nothing was stored, on any replica; the publish is
    /// answered as not-leader, and its retry looks the keys up again.
    Superseded,
    /// The command could not be applied on this replica; the message says
    /// why (a queue missing, a lane out of range). The same on every
    /// replica, since every replica applies the same commands in order.
    Failed { message: String },
}
