//! Checkpoints: the keys appended before the point go to the key journal,
//! then the checkpoint slot; the key journal is compacted when it has grown.

use super::*;

impl Shared {
    /// Writes a checkpoint at `point` (already synced): first the keys
    /// appended before it go to the key journal. `clean` only from the last
    /// cycle of a clean close, whose point is the exact end of the log (no
    /// append can run during `Log::stop`).
    pub(super) fn checkpoint(&self, point: Point, clean: bool) -> Result<(), SyncError> {
        let keys: Vec<KeyEntry> = {
            let mut writer = self.writer.lock();
            let n = writer.pending_keys.partition_point(|k| k.offset < point.next_offset);
            writer.pending_keys.drain(..n).collect()
        };
        let mut checkpointer = self.checkpointer.lock();
        let keys_len = match checkpointer.keys.append(&self.io, &keys) {
            Ok(len) => len,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                // Put the keys back; the checkpoint waits for space.
                let mut writer = self.writer.lock();
                writer.pending_keys.splice(0..0, keys);
                tracing::warn!(dir = %self.dir.display(), "disk full writing the key journal; checkpoint deferred");
                return Ok(());
            }
            Err(e) => return Err(SyncError::new("writing the key journal", e)),
        };
        let point = Point { keys_len, ..point };
        checkpointer
            .checkpoint
            .write(&self.io, point, clean)
            .map_err(|e| SyncError::new("writing the checkpoint", e))?;
        checkpointer.last = point;
        if checkpointer.keys.needs_compaction() {
            let cutoff = now_ms().saturating_sub(self.dedupe_window_ms.load(Ordering::Relaxed));
            let len = match checkpointer.keys.compact(&self.io, cutoff, self.options.dedupe_keys_max as usize) {
                Ok(len) => len,
                Err(e) if e.is_deferrable() => {
                    tracing::warn!(dir = %self.dir.display(), retry_ms = crate::limits::COMPACTION_RETRY_MS,
                        "disk full compacting the key journal; the journal is kept as it is and compacted later");
                    checkpointer.keys.defer_compaction();
                    return Ok(());
                }
                Err(e) => return Err(SyncError::new("compacting the key journal", e.into_io())),
            };
            checkpointer
                .checkpoint
                .write(&self.io, Point { keys_len: len, ..point }, clean)
                .map_err(|e| SyncError::new("writing the checkpoint", e))?;
            checkpointer.last = Point { keys_len: len, ..point };
        }
        Ok(())
    }
}
