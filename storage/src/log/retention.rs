//! Retention and ack-journal compaction: segments whose records are all
//! done and checkpointed are removed; the ack journal is rewritten when it
//! has grown.

use super::*;

impl Shared {
    /// Deletes segments whose records are all done and checkpointed, and
    /// compacts the ack journal when it has grown.
    pub(super) fn retain(&self) -> Result<(), SyncError> {
        let floor = self.acks.lock().state.floor();
        let checkpointed = self.checkpointer.lock().last.next_offset;
        let limit = floor.min(checkpointed);
        let removed: Vec<Arc<Segment>> = {
            let mut segments = self.segments.write();
            let mut n = 0;
            while n + 1 < segments.len() && segments[n + 1].base_offset <= limit {
                n += 1;
            }
            segments.drain(..n).collect()
        };
        if !removed.is_empty() {
            for segment in &removed {
                std::fs::remove_file(&segment.path)
                    .map_err(|e| SyncError::new(format!("removing {}", segment.path.display()), e))?;
            }
            self.io.sync_dir(&self.dir).map_err(|e| SyncError::new("syncing the log directory", e))?;
            tracing::debug!(dir = %self.dir.display(), count = removed.len(), "retention removed segments");
        }
        let plan = {
            let mut acks = self.acks.lock();
            let acks = &mut *acks;
            // Acks whose records are not durable yet stay out of the
            // rewritten journal (and buffered).
            acks.journal.needs_compaction(&acks.state).then(|| acks.journal.compaction(&acks.state, acks.durable_end))
        };
        if let Some(plan) = plan {
            // Written and synced without the acks lock (see
            // `AckJournal::compaction`).
            match plan.write(&self.io) {
                Ok(compacted) => self.acks.lock().journal.install(compacted),
                Err(e) if e.is_deferrable() => {
                    tracing::warn!(dir = %self.dir.display(), retry_ms = crate::limits::COMPACTION_RETRY_MS,
                        "disk full compacting the ack journal; the journal is kept as it is and compacted later");
                    self.acks.lock().journal.defer_compaction();
                }
                Err(e) => return Err(SyncError::new("compacting the ack journal", e.into_io())),
            }
        }
        Ok(())
    }
}
