//! The cluster log's state machine: the replicated queues of this node.
//!
//! Every replica applies the same commands in the same order to lane logs
//! that started equal, so offsets agree everywhere. Applying is idempotent
//! so that openraft's replay after a restart (every committed entry after
//! `last_applied`) never stores a record twice:
//!
//! - `last_applied` is what the **sync point** (`<data>/cluster/applied`)
//!   says, and the sync point is written only after every replicated
//!   lane's log was synced (`StateMachine::sync_point`), so everything
//!   it covers is on disk.
//! - For each replicated lane the machine keeps the offset the next
//!   `Append` must start at (`expected`, part of the sync point). A lane
//!   whose log already holds some of an entry's records (written after
//!   the sync point, before a crash) gets only the missing tail.
//! - Acks and purges of records already done are skipped; create, update
//!   and delete compare with what exists.

use std::{
    collections::BTreeMap,
    io::Cursor,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, Weak},
};

use ballast_storage::NewRecord;
use openraft::{
    BasicNode, EntryPayload, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError, StoredMembership,
    storage::RaftStateMachine,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Applied, Command, Entry, LogId, NodeId, RecordData, StorageError, TypeConfig};
use crate::broker::Broker;

/// The sync point's file name in `<data>/cluster/`.
pub const SYNC_POINT_FILE: &str = "applied";

/// What the machine has applied, and where each replicated lane's next
/// append starts. The sync point is a copy of this taken before a sync.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// `(queue, lane)` → the offset its next `Append` starts at.
    pub expected: BTreeMap<String, Vec<u64>>,
}

/// State shared by the machine (owned by openraft) and the sync task.
#[derive(Debug)]
pub struct Shared {
    pub state: Mutex<MachineState>,
    /// The broker the commands are applied to; set once it is open.
    pub broker: OnceLock<Weak<Broker>>,
    dir: PathBuf,
}

impl Shared {
    /// Reads the sync point of `dir` (`<data>/cluster`), or starts empty.
    pub fn open(dir: &Path) -> std::io::Result<Arc<Shared>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SYNC_POINT_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MachineState::default(),
            Err(e) => return Err(e),
        };
        Ok(Arc::new(Shared { state: Mutex::new(state), broker: OnceLock::new(), dir: dir.to_path_buf() }))
    }

    /// Writes a sync point: the state as it is now, once every replicated
    /// lane's log has been synced (so every append and ack it counts is
    /// on disk). Runs file work on a blocking thread.
    pub async fn sync_point(self: &Arc<Self>) -> std::io::Result<Option<LogId>> {
        let Some(broker) = self.broker.get().and_then(Weak::upgrade) else { return Ok(None) };
        let snapshot = self.state.lock().clone();
        let shared = Arc::clone(self);
        let written = snapshot.last_applied;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for queue in broker.queues() {
                if queue.settings().replicas > 1 {
                    for log in &queue.lanes {
                        log.sync().map_err(|e| std::io::Error::other(e.to_string()))?;
                    }
                }
            }
            let bytes = serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?;
            crate::queue::write_atomically(&shared.dir, SYNC_POINT_FILE, &bytes)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(written)
    }
}

fn io_error(message: &str, what: &str) -> StorageError {
    let error = std::io::Error::other(format!("{what}: {message}"));
    StorageIOError::write_state_machine(&error).into()
}

/// The machine openraft drives.
#[derive(Debug)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let state = self.shared.state.lock();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        for entry in entries {
            let applied = match entry.payload {
                EntryPayload::Blank => Applied::Done,
                EntryPayload::Membership(membership) => {
                    self.shared.state.lock().membership = StoredMembership::new(Some(entry.log_id), membership);
                    Applied::Done
                }
                EntryPayload::Normal(command) => self.apply_command(entry.log_id, command).await?,
            };
            self.shared.state.lock().last_applied = Some(entry.log_id);
            results.push(applied);
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { shared: Arc::clone(&self.shared) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        // A snapshot here is only a sync point's metadata (see
        // docs/replication.md, "Log compaction and snapshots"): a node that
        // already holds everything it covers can take it; one that does
        // not (an empty or stale data directory) cannot be rebuilt from it.
        let mut state = self.shared.state.lock();
        if state.last_applied >= meta.last_log_id {
            state.membership = meta.last_membership.clone();
            return Ok(());
        }
        tracing::error!(
            ours = ?state.last_applied, snapshot = ?meta.last_log_id,
            "this node is behind the cluster log's purged prefix and cannot be rebuilt from a snapshot in this \
             version: stop it, copy a stopped healthy follower's data directory to it and start it again"
        );
        Err(io_error("behind the purged cluster log; re-seed this node from a follower's copy", "install snapshot"))
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(None)
    }
}

impl StateMachine {
    #[allow(clippy::result_large_err, reason = "openraft's own error type, returned from its trait methods")]
    async fn apply_command(&mut self, log_id: LogId, command: Command) -> Result<Applied, StorageError> {
        let Some(broker) = self.shared.broker.get().and_then(Weak::upgrade) else {
            return Err(io_error("the broker is gone", "apply"));
        };
        let outcome = match command {
            Command::CreateQueue { name, settings_toml } => {
                let settings = match toml::from_str(&settings_toml) {
                    Ok(settings) => settings,
                    Err(e) => return Ok(Applied::Failed { message: format!("settings of {name}: {e}") }),
                };
                broker.apply_create(&name, settings).await.map(|()| Applied::Done)
            }
            Command::UpdateQueue { name, settings_toml } => match toml::from_str(&settings_toml) {
                Ok(settings) => broker.apply_update(&name, settings).await.map(|()| Applied::Done),
                Err(e) => return Ok(Applied::Failed { message: format!("settings of {name}: {e}") }),
            },
            Command::DeleteQueue { name } => {
                let deleted = broker.apply_delete(&name).await.map(|()| Applied::Done);
                self.shared.state.lock().expected.retain(|queue, _| {
                    queue != &name && queue.strip_suffix(crate::limits::DEAD_LETTER_SUFFIX) != Some(name.as_str())
                });
                deleted
            }
            Command::Append { term: Some(term), .. } if term != log_id.leader_id.term => {
                // Decided by the entry alone, so the same on every replica.
                return Ok(Applied::Superseded);
            }
            Command::Append { queue, lane, term: _, records } => {
                let expected = self.expected(&queue, lane);
                let count = records.len() as u64;
                let records: Vec<NewRecord> = records.into_iter().map(RecordData::into_record).collect();
                let appended = match broker.queue(&queue).await {
                    Ok(target) => target.apply_append(lane, expected, &records),
                    Err(e) => Err(e),
                };
                if appended.is_ok() {
                    self.set_expected(&queue, lane, expected + count);
                }
                appended.map(|first_offset| Applied::Appended { first_offset })
            }
            Command::Ack { queue, lane, acks, kind } => match broker.queue(&queue).await {
                Ok(target) => target.apply_ack(lane, &acks, kind).map(|()| Applied::Done),
                Err(e) => Err(e),
            },
            Command::Purge { queue, lane, end } => match broker.queue(&queue).await {
                Ok(target) => target.apply_purge(lane, end).map(|()| Applied::Done),
                Err(e) => Err(e),
            },
        };
        Ok(outcome.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a cluster log command failed on this node");
            Applied::Failed { message: e.to_string() }
        }))
    }

    fn expected(&self, queue: &str, lane: u32) -> u64 {
        let state = self.shared.state.lock();
        state.expected.get(queue).and_then(|lanes| lanes.get(lane as usize)).copied().unwrap_or(0)
    }

    fn set_expected(&self, queue: &str, lane: u32, next: u64) {
        let mut state = self.shared.state.lock();
        let lanes = state.expected.entry(queue.to_owned()).or_default();
        if lanes.len() <= lane as usize {
            lanes.resize(lane as usize + 1, 0);
        }
        lanes[lane as usize] = next;
    }
}

impl RecordData {
    /// The leader's record as storage takes it.
    pub fn into_record(self) -> NewRecord {
        NewRecord {
            timestamp_ms: self.timestamp_ms,
            attempt: self.attempt,
            flags: self.flags,
            key: self.key,
            headers: self.headers,
            payload: self.payload,
        }
    }

    /// A record to replicate, as the leader built it.
    pub fn from_record(record: NewRecord) -> RecordData {
        let NewRecord { timestamp_ms, attempt, flags, key, headers, payload } = record;
        RecordData { timestamp_ms, attempt, flags, key, headers, payload }
    }
}

/// Builds a snapshot: the last sync point's metadata (what is known on
/// disk), never more than is applied.
#[derive(Debug)]
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let last = self.shared.sync_point().await.map_err(|e| StorageIOError::read_state_machine(&e))?;
        let state = self.shared.state.lock().clone();
        let bytes = serde_json::to_vec(&state).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match last {
            Some(id) => format!("{}-{}-{}", id.leader_id.term, id.leader_id.node_id, id.index),
            None => "empty".to_owned(),
        };
        Ok(Snapshot {
            meta: SnapshotMeta { last_log_id: last, last_membership: state.membership, snapshot_id },
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::{config::Config, queue::QueueSettings};

    fn entry(term: u64, index: u64, command: Command) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Normal(command) }
    }

    fn append(term: Option<u64>, key: &str) -> Command {
        let record = RecordData {
            timestamp_ms: 1,
            attempt: 0,
            flags: 0,
            key: Some(Bytes::from(key.to_owned())),
            headers: Vec::new(),
            payload: Bytes::from_static(b"payload"),
        };
        Command::Append { queue: "q".into(), lane: 0, term, records: vec![record] }
    }

    /// An `Append` whose keys were looked up in another term than the one
    /// its entry was written in stores nothing, and says so; one of the
    /// same term, or one with no keys looked up, is stored. Applying the
    /// same entries again (a replay) stores nothing more.
    #[tokio::test]
    async fn an_append_written_in_another_term_than_its_lookup_stores_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = Config { data_dir: dir.path().join("data"), ..Config::default() };
        let broker = Broker::open(config).expect("broker");
        broker.apply_create("q", QueueSettings::default()).await.expect("create");
        let shared = Shared::open(&dir.path().join("cluster")).expect("machine state");
        shared.broker.set(Arc::downgrade(&broker)).expect("set once");
        let mut machine = StateMachine { shared: Arc::clone(&shared) };
        let entries = || {
            vec![entry(2, 1, append(Some(2), "a")), entry(3, 2, append(Some(2), "b")), entry(3, 3, append(None, "c"))]
        };

        let applied = machine.apply(entries()).await.expect("apply");
        let expected =
            vec![Applied::Appended { first_offset: 0 }, Applied::Superseded, Applied::Appended { first_offset: 1 }];
        assert_eq!(applied, expected);
        let queue = broker.queue("q").await.expect("queue");
        let depth = || queue.stats().lane_depths.iter().sum::<u64>();
        assert_eq!(depth(), 2);

        // A replay from before the first entry (no sync point was written).
        shared.state.lock().expected.clear();
        let applied = machine.apply(entries()).await.expect("apply again");
        assert_eq!(applied, expected);
        assert_eq!(depth(), 2, "a replay stores nothing more");
    }
}
