//! Acks: the in-memory ack state first, the journal entry buffered for
//! the flusher.

use super::*;

impl Shared {
    pub(super) fn ack(self: &Arc<Self>, first: u64, count: u64, kind: AckKind) -> Result<Commit, AckError> {
        let next_offset = self.next_offset.load(Ordering::Acquire);
        let end = first.saturating_add(count);
        if end > next_offset {
            return Err(AckError::OutOfRange { offset: end - 1, next_offset });
        }
        if let Some(e) = self.poisoned() {
            return Err(AckError::Poisoned(e));
        }
        if count == 0 || !self.mark_done(first, count, kind) {
            return Ok(Commit::ready());
        }
        let seq = {
            let mut commit = self.commit.lock();
            commit.acks_written += 1;
            (commit.acks_written, commit.epoch)
        };
        self.wake_after_write();
        Ok(match self.options.sync_policy {
            SyncPolicy::Fsync => Commit {
                state: CommitInner::Pending { shared: Arc::clone(self), track: Track::Acks, seq: seq.0, epoch: seq.1 },
            },
            SyncPolicy::Interval { .. } | SyncPolicy::None => Commit::ready(),
        })
    }

    /// Marks a range done in memory and buffers the journal entry. Returns
    /// whether anything changed.
    pub(super) fn mark_done(&self, first: u64, count: u64, kind: AckKind) -> bool {
        let mut acks = self.acks.lock();
        if acks.state.mark(first, count) == 0 {
            return false;
        }
        acks.journal.record(first, count, kind);
        true
    }
}
