//! Per-log settings with their named defaults.

use std::sync::Arc;

use crate::{file::Faults, file_cache::FileCache, limits::*, pool::FlushPool};

/// When an append counts as durable, and so when its [`Commit`](crate::Commit)
/// resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// The default: the commit resolves once the record is on stable storage
    /// (`fdatasync`). Appends that arrive while a sync runs share the next one
    /// (group commit).
    #[default]
    Fsync,
    /// The commit resolves once the record is written to the OS; a background
    /// sync runs every `interval_ms` (at fixed deadlines; [`Log::sync`]
    /// forces one at once). A power loss can lose the last interval.
    ///
    /// [`Log::sync`]: crate::Log::sync
    Interval { interval_ms: u64 },
    /// The commit resolves once the record is written to the OS. The engine
    /// then behaves exactly like `Interval { interval_ms: 1000 }`
    /// ([`BACKGROUND_FLUSH_MS`](crate::limits::BACKGROUND_FLUSH_MS)): every
    /// second with work, the flusher syncs the written segments, writes and
    /// syncs the ack journal and writes a checkpoint. A power loss can lose
    /// about the last second.
    None,
}

/// Settings of one log. Every field has a named default in
/// [`limits`](crate::limits).
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Most bytes of each segment file: it is created with one growth step
    /// and preallocated further as its records need the space.
    pub segment_size: u64,
    /// Largest encoded record (header, key, headers, payload) accepted.
    pub record_size_max: u32,
    pub sync_policy: SyncPolicy,
    /// Synced bytes between checkpoints; bounds the recovery scan after a crash.
    pub checkpoint_interval_bytes: u64,
    /// Idempotency keys younger than this are recovered on open.
    pub dedupe_window_ms: u64,
    /// At most this many keys are recovered (the newest).
    pub dedupe_keys_max: u32,
    /// Test seam: failures to inject into this log's I/O.
    pub faults: Option<Arc<Faults>>,
    /// The threads that run this log's group commit, checkpoints,
    /// retention, journal compaction and segment growth, shared with other
    /// logs. `None`: the process-wide pool of the default size
    /// ([`FlushPool::shared`]).
    pub pool: Option<FlushPool>,
    /// The cache of open descriptors this log's files go through, shared
    /// with other logs. `None`: the process-wide cache of
    /// `OPEN_FILES_DEFAULT` descriptors ([`FileCache::shared`]).
    pub files: Option<FileCache>,
}

impl Default for LogOptions {
    fn default() -> LogOptions {
        LogOptions {
            segment_size: SEGMENT_SIZE_DEFAULT,
            record_size_max: RECORD_SIZE_DEFAULT,
            sync_policy: SyncPolicy::default(),
            checkpoint_interval_bytes: CHECKPOINT_INTERVAL_BYTES_DEFAULT,
            dedupe_window_ms: DEDUPE_WINDOW_MS_DEFAULT,
            dedupe_keys_max: DEDUPE_KEYS_MAX_DEFAULT,
            faults: None,
            pool: None,
            files: None,
        }
    }
}

impl LogOptions {
    /// Checks every setting against its ceiling; the message names the
    /// setting and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if !(SEGMENT_SIZE_MIN..=SEGMENT_SIZE_MAX).contains(&self.segment_size) {
            return Err(format!(
                "segment_size must be in {SEGMENT_SIZE_MIN}..={SEGMENT_SIZE_MAX} bytes; got {}",
                self.segment_size
            ));
        }
        if self.segment_size % RECORD_ALIGN != 0 {
            return Err(format!("segment_size must be a multiple of {RECORD_ALIGN}; got {}", self.segment_size));
        }
        let record_ceiling = (self.segment_size - SEGMENT_HEADER_SIZE)
            .min(u64::from(RECORD_HEADER_SIZE + KEY_SIZE_MAX + HEADERS_SIZE_MAX + PAYLOAD_SIZE_MAX));
        if u64::from(self.record_size_max) < u64::from(RECORD_HEADER_SIZE)
            || u64::from(self.record_size_max) > record_ceiling
        {
            return Err(format!(
                "record_size_max must be in {RECORD_HEADER_SIZE}..={record_ceiling} bytes for a {}-byte segment; got {}",
                self.segment_size, self.record_size_max
            ));
        }
        if let SyncPolicy::Interval { interval_ms } = self.sync_policy
            && !(1..=SYNC_INTERVAL_MS_MAX).contains(&interval_ms)
        {
            return Err(format!("sync interval must be in 1..={SYNC_INTERVAL_MS_MAX} ms; got {interval_ms}"));
        }
        if self.checkpoint_interval_bytes == 0 {
            return Err("checkpoint_interval_bytes must be at least 1".into());
        }
        if self.dedupe_keys_max > DEDUPE_KEYS_MAX {
            return Err(format!("dedupe_keys_max must be in 0..={DEDUPE_KEYS_MAX}; got {}", self.dedupe_keys_max));
        }
        Ok(())
    }
}
