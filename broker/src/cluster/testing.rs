//! Test-only pieces for the cluster's storage and transport tests: an
//! in-memory state machine that records the commands it applied.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Applied, Command, Entry, LogId, NodeId, StorageError, TypeConfig};

/// An in-memory state machine: the commands applied, in order. Clones
/// share the state, so a test keeps one to look at what was applied.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemStateMachine {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Inner {
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::BasicNode>,
    commands: Vec<Command>,
    #[serde(skip)]
    snapshot: Option<(SnapshotMeta<NodeId, openraft::BasicNode>, Vec<u8>)>,
}

impl MemStateMachine {
    /// The commands applied so far, in log order.
    pub(crate) fn commands(&self) -> Vec<Command> {
        self.inner.lock().commands.clone()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let mut inner = self.inner.lock();
        let data = postcard::to_allocvec(&*inner).expect("a state machine encodes");
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("{:?}", inner.last_applied),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::BasicNode>), StorageError> {
        let inner = self.inner.lock();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        let mut inner = self.inner.lock();
        let mut replies = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(command) => inner.commands.push(command),
                EntryPayload::Membership(membership) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            replies.push(Applied::Done);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut installed: Inner = postcard::from_bytes(&data).expect("a snapshot this test made");
        installed.snapshot = Some((meta.clone(), data));
        *self.inner.lock() = installed;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let inner = self.inner.lock();
        Ok(inner.snapshot.clone().map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
