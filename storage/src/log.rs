//! One append-only log (one queue lane): segments, appends with group
//! commit, reads, cursors, ack state and retention.
//!
//! Layout: this file holds the API (`Log`, its open, reopen, stats and
//! close) and the state every part shares (`Shared`); each part has its
//! module, in the order a record meets them:
//! - `append`: append planning (segment runs, growth, new segments) and
//!   the write.
//! - `commit`: `Commit` and the sequences it waits on, across reopens.
//! - `read`: the read path by offset and the quarantine of corrupt ranges.
//! - `cursor`: `Cursor`, the records not done, following appends.
//! - `ack`: acks into the in-memory state and the journal buffer.
//! - `pending`: byte accounting of the backlog, from positions.
//! - `flusher`: the flusher, one job of the `FlushPool` (group commit,
//!   growth and the spare segment ahead of the writer), and its cycle.
//! - `checkpoints`: the checkpoint and key-journal compaction.
//! - `retention`: segment removal and ack-journal compaction.
//!
//! Lock order (acquire left to right; a lock never waits for one to its
//! left): `flusher` (the flusher's own state: its pool thread, and a
//! reopen), `writer`, `segments`, `commit`, `checkpointer`, `acks` (the
//! flusher only `try_lock`s it under `commit`), then the leaf locks: the
//! `spare` slot (the writer holds it across the spare's rename), a
//! segment's `growth` and `index`, the pool slot then the pool's queue (a
//! wake-up), the descriptor cache, the fault seam. Most paths hold one of
//! these at a time. One exception, safe because the two sides never run at
//! once: the flusher's checkpoint takes `writer` after `checkpointer` (to
//! put keys back on ENOSPC), while a reopen, which takes `checkpointer`
//! after `writer`, runs only once the flusher has finished.
//! `ARCHITECTURE.md` has the same order with the broker's locks on top.
//!
//! Concurrency rules:
//! 1. One writer at a time (`writer` mutex): it encodes, writes, publishes
//!    `written` on the segment, tells the flusher under the `commit` lock
//!    (the new end point, the dirty segments), and only then publishes
//!    `next_offset` (release). Lock order: `writer`, then `segments`, then
//!    `commit`; `acks` is never held with `writer`.
//! 2. Readers never take the writer lock: they load `next_offset` (acquire),
//!    clone the `Arc<Segment>` they need, and read below its `written`.
//! 3. The flusher (a job of the `FlushPool`, run by one pool thread at a time)
//!    alone syncs, checkpoints, compacts journals and
//!    removes segments. It never holds `commit` while doing I/O.
//! 4. An ack entry is journaled only once its records are synced (`acks`
//!    rule 2). Rule 1 makes this cheap: an ack is possible only after the
//!    `next_offset` store, so a flusher cycle whose snapshot includes the
//!    ack also includes the point past its records, and syncs them first.
//! 5. After a failed write or sync the log is poisoned: appends, acks and
//!    pending commits fail until it is reopened (`Log::reopen` recovers it
//!    in place, keeping only what the last successful sync covered).

use std::{
    fmt,
    future::Future,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Condvar, Mutex, RwLock};

mod ack;
mod append;
mod checkpoints;
mod commit;
mod cursor;
mod flusher;
mod pending;
mod read;
mod retention;

pub use commit::Commit;
use commit::{CommitInner, CommitState, ENDED_EPOCHS_KEPT, EndedEpoch, Track};
pub use cursor::Cursor;
use flusher::FlusherState;

use crate::{
    acks::{AckJournal, AckKind, AckState},
    checkpoint::{Checkpoint, Point},
    error::{AckError, AppendError, OpenError, ReadError, SyncError},
    file::Io,
    file_cache::FileCache,
    keys::{KeyEntry, KeyJournal},
    limits::{
        ACK_JOURNAL_RETRY_MS, BACKGROUND_FLUSH_MS, BATCH_COUNT_MAX, HEADERS_COUNT_MAX, HEADERS_SIZE_MAX, KEY_SIZE_MAX,
        SEGMENT_HEADER_SIZE, SPARE_PREPARE_FILL_PERCENT,
    },
    options::{LogOptions, SyncPolicy},
    pool::{FlushPool, Job, Scheduled, Slot, Step},
    record::{self, Invalid, NewRecord, Record},
    recovery,
    segment::{self, Segment},
};

/// One durable, append-only log.
pub struct Log {
    shared: Arc<Shared>,
}

/// The result of an append.
#[derive(Debug)]
pub struct Appended {
    /// Offset of the first record of the batch; the rest follow contiguously.
    pub first_offset: u64,
    /// Records appended.
    pub count: u32,
    /// Resolves when the batch is durable under the log's sync policy.
    pub commit: Commit,
}

/// Figures describing a log, cheap to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStats {
    /// Oldest retained offset (start of the first segment).
    pub first_offset: u64,
    /// Offset the next record will get.
    pub next_offset: u64,
    /// Every offset below this is acked, dead-lettered or quarantined.
    pub ack_floor: u64,
    /// Offsets done above the floor.
    pub done_above_floor: u64,
    /// Offsets not done: the backlog, in-flight deliveries included.
    pub pending: u64,
    pub segment_count: u64,
    /// Bytes of segment files on disk (their preallocated lengths, which
    /// grow in steps with the records: see `SEGMENT_GROWTH_STEP_MIN`).
    pub disk_bytes: u64,
    /// Bytes written to the retained segments (headers and records): what
    /// the backlog occupies, acked records included until their segment
    /// is removed.
    pub data_bytes: u64,
    /// Sparse-index entries held in memory.
    pub index_entries: u64,
    /// Done ranges kept above the floor (memory of the ack state).
    pub ack_ranges: u64,
    /// Records found corrupt and quarantined since open.
    pub quarantined: u64,
    /// Data syncs done since open. Appends per sync shows group commit at
    /// work.
    pub sync_count: u64,
    /// Syncs of the ack journal by group commits since open. A cycle syncs
    /// the journal only when it wrote ack entries to it, so a publish-only
    /// workload leaves this at 0.
    pub ack_sync_count: u64,
    /// Bytes of the spare segment file the flusher prepared ahead of the
    /// next roll (0: none ready). Counted in `disk_bytes` too.
    pub spare_bytes: u64,
    /// Rolls since open that took the prepared spare: a rename and a header
    /// write on the append path, no `fallocate`, no device flush.
    pub rolls_from_spare: u64,
    /// Rolls since open that found no spare ready (a burst outran the
    /// flusher, or preparing it failed) and created the segment file on the
    /// append path: `open` and `fallocate` on the caller's thread, still no
    /// device flush. Should stay near 0; a steady rise means appends outrun
    /// the flusher by a segment.
    pub rolls_inline: u64,
    /// Growth steps since open that the append path made itself
    /// (`fallocate` on the caller's thread) because the flusher had not
    /// grown the segment ahead of it.
    pub growths_inline: u64,
}

pub(crate) struct Shared {
    pub(crate) dir: Arc<Path>,
    pub(crate) options: LogOptions,
    pub(crate) io: Io,
    writer: Mutex<Writer>,
    /// Ascending by base offset; the last one is the active segment.
    segments: RwLock<Vec<Arc<Segment>>>,
    /// Published after the records below it are readable.
    next_offset: AtomicU64,
    acks: Mutex<Acks>,
    commit: Mutex<CommitState>,
    /// The pool that runs this log's flusher (`pool.rs`).
    pool: FlushPool,
    /// This log's place in the pool's queue.
    slot: Slot,
    /// The flusher's own state between its cycles; only the flusher (one
    /// pool thread at a time) locks it.
    flusher: Mutex<FlusherState>,
    /// This log, for handing to the pool from `&self`.
    me: std::sync::Weak<Shared>,
    /// Wakes blocking `Commit::wait` callers.
    waiter_wake: Condvar,
    checkpointer: Mutex<Checkpointer>,
    quarantined: AtomicU64,
    /// Bumped by each [`Log::reopen`]: cursors drop the segment they hold
    /// (recovery made new ones).
    epoch: AtomicU64,
    sync_count: AtomicU64,
    ack_sync_count: AtomicU64,
    recovered_keys: Mutex<Vec<KeyEntry>>,
    /// The dedupe window the key journal's compaction keeps, in ms: starts
    /// as `options.dedupe_window_ms`, changed by [`Log::set_dedupe_window_ms`].
    pub(crate) dedupe_window_ms: AtomicU64,
    /// The allocated length of the spare segment file the flusher prepared
    /// (`segment::SPARE_FILE_NAME`), taken by the next roll. A leaf lock;
    /// the writer holds it across the spare's rename.
    spare: Mutex<Option<u64>>,
    rolls_from_spare: AtomicU64,
    rolls_inline: AtomicU64,
    growths_inline: AtomicU64,
}

struct Writer {
    /// Position after the last record in the active segment.
    write_pos: u64,
    /// Reused encode buffer.
    buf: Vec<u8>,
    /// Keys appended since the last checkpoint, ascending by offset.
    pending_keys: Vec<KeyEntry>,
}

pub(crate) struct Acks {
    pub(crate) state: AckState,
    pub(crate) journal: AckJournal,
    /// Every offset below this is on stable storage; acks of later offsets
    /// stay buffered. Raised by the flusher after it syncs.
    pub(crate) durable_end: u64,
}

struct Checkpointer {
    checkpoint: Checkpoint,
    keys: KeyJournal,
    last: Point,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log").field("dir", &self.shared.dir).field("next_offset", &self.next_offset()).finish()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Log {
    /// Opens the log in `dir` (created if missing), recovering it: validates
    /// the tail written after the last checkpoint, cuts off a torn tail,
    /// quarantines corrupt records, and replays the ack and key journals.
    pub fn open(dir: impl AsRef<Path>, options: LogOptions) -> Result<Log, OpenError> {
        options.validate().map_err(OpenError::InvalidOptions)?;
        let files = options.files.clone().unwrap_or_else(FileCache::shared);
        let io = Io::new(options.faults.clone(), files);
        let pool = match &options.pool {
            Some(pool) => pool.clone(),
            None => FlushPool::shared().map_err(crate::error::io_open(dir.as_ref()))?,
        };
        // One copy of the directory's path, shared by the log's files.
        let dir: Arc<Path> = Arc::from(dir.as_ref());
        let recovered = recovery::recover(&dir, &options, &io, None)?;
        let write_pos = recovered.segments.last().expect("recovery leaves an active segment").written();
        let shared = Arc::new_cyclic(|me| Shared {
            dir,
            io,
            writer: Mutex::new(Writer { write_pos, buf: Vec::new(), pending_keys: Vec::new() }),
            next_offset: AtomicU64::new(recovered.point.next_offset),
            segments: RwLock::new(recovered.segments),
            acks: Mutex::new(Acks {
                state: recovered.ack_state,
                journal: recovered.ack_journal,
                durable_end: recovered.point.next_offset,
            }),
            commit: Mutex::new(CommitState { point: Some(recovered.point), ..CommitState::default() }),
            pool,
            slot: Slot::default(),
            flusher: Mutex::new(FlusherState::new(options.sync_policy)),
            me: me.clone(),
            waiter_wake: Condvar::new(),
            checkpointer: Mutex::new(Checkpointer {
                checkpoint: recovered.checkpoint,
                keys: recovered.key_journal,
                last: recovered.point,
            }),
            quarantined: AtomicU64::new(recovered.quarantined),
            epoch: AtomicU64::new(0),
            sync_count: AtomicU64::new(0),
            ack_sync_count: AtomicU64::new(0),
            recovered_keys: Mutex::new(recovered.keys),
            dedupe_window_ms: AtomicU64::new(options.dedupe_window_ms),
            spare: Mutex::new(None),
            rolls_from_spare: AtomicU64::new(0),
            rolls_inline: AtomicU64::new(0),
            growths_inline: AtomicU64::new(0),
            options,
        });
        Ok(Log { shared })
    }

    /// The error that poisoned the log (a failed write or sync), if any:
    /// appends, acks and pending commits fail until [`Log::reopen`].
    pub fn poisoned(&self) -> Option<SyncError> {
        self.shared.poisoned()
    }

    /// Recovers a poisoned log in place, as a close and [`Log::open`] would,
    /// without invalidating the `Log` or its cursors. `Ok(false)`: it was
    /// not poisoned; nothing was done.
    ///
    /// Post-fsyncgate rule: a failed fsync is never retried as if the data
    /// were safe. After it the kernel may have marked the unsynced pages
    /// clean without writing them, so only the records below the last
    /// successful sync are kept; the rest (whose appends failed and were
    /// never acknowledged) are cut as a torn tail, zeroed and synced, and
    /// their offsets reused. Everything a resolved commit vouched for
    /// stays. Commits still pending from before resolve with the old error
    /// unless synced before it; acks never journaled are lost (their
    /// records are delivered again: at least once).
    ///
    /// On error (the disk still fails) the log stays poisoned and the call
    /// may be repeated.
    pub fn reopen(&self) -> Result<bool, OpenError> {
        let shared = &self.shared;
        if shared.poisoned().is_none() {
            return Ok(false);
        }
        // The flusher finishes by itself once the log is poisoned (the
        // poisoning woke it); waited for without the writer lock, which its
        // checkpoints take.
        shared.wake();
        shared.pool.wait_finished(&**shared);
        // With the flusher gone nothing raises it any more.
        let durable_end = shared.acks.lock().durable_end;
        let mut writer = shared.writer.lock();
        let trusted_end = match shared.options.sync_policy {
            SyncPolicy::Fsync => durable_end,
            SyncPolicy::Interval { .. } | SyncPolicy::None => {
                // Commits resolved once written: every record was
                // acknowledged, so none may be cut. Their bytes are written
                // again from the map (the page cache holds what was
                // written), so that recovery's syncs put them on disk
                // rather than trusting pages a failed sync left clean.
                let segments = shared.segments.read().clone();
                let from = segments.partition_point(|s| s.base_offset <= durable_end).saturating_sub(1);
                for segment in &segments[from..] {
                    segment.rewrite(&shared.io).map_err(crate::error::io_open(&*segment.path))?;
                }
                shared.next_offset.load(Ordering::Acquire)
            }
        };
        let recovered = recovery::recover(&shared.dir, &shared.options, &shared.io, Some(trusted_end))?;
        let point = recovered.point;
        // Lowered first: a reader that sees the new end reads old or new
        // segments, which hold the same bytes below it.
        shared.next_offset.store(point.next_offset, Ordering::Release);
        writer.write_pos = point.position;
        writer.pending_keys.clear();
        *shared.segments.write() = recovered.segments;
        *shared.acks.lock() =
            Acks { state: recovered.ack_state, journal: recovered.ack_journal, durable_end: point.next_offset };
        *shared.checkpointer.lock() =
            Checkpointer { checkpoint: recovered.checkpoint, keys: recovered.key_journal, last: point };
        shared.quarantined.fetch_add(recovered.quarantined, Ordering::Relaxed);
        // Recovery removed the spare file.
        *shared.spare.lock() = None;
        {
            let mut commit = shared.commit.lock();
            let old = std::mem::take(&mut *commit);
            let mut ended = old.ended;
            if let Some(error) = old.error {
                ended.insert(
                    0,
                    EndedEpoch { epoch: old.epoch, data_synced: old.data_synced, acks_synced: old.acks_synced, error },
                );
                ended.truncate(ENDED_EPOCHS_KEPT);
            }
            *commit = CommitState { point: Some(point), epoch: old.epoch + 1, ended, ..CommitState::default() };
            shared.epoch.store(old.epoch + 1, Ordering::Release);
        }
        drop(writer);
        *shared.flusher.lock() = FlusherState::new(shared.options.sync_policy);
        let job: Arc<dyn Scheduled> = Arc::clone(shared) as Arc<dyn Scheduled>;
        shared.pool.restart(&job);
        tracing::info!(dir = %shared.dir.display(), next_offset = point.next_offset, "poisoned log reopened");
        Ok(true)
    }

    /// The directory holding this log.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The options the log was opened with.
    pub fn options(&self) -> &LogOptions {
        &self.shared.options
    }

    /// Appends a batch. The whole batch is validated first; on error nothing
    /// of it is written. Offsets are contiguous from `first_offset`.
    pub fn append(&self, records: &[NewRecord]) -> Result<Appended, AppendError> {
        self.shared.append(records)
    }

    /// Changes the dedupe window from the next key-journal compaction on:
    /// keys younger than `window_ms` are kept (those already compacted
    /// away stay gone). A reopen's recovery still uses the window the log
    /// was opened with.
    pub fn set_dedupe_window_ms(&self, window_ms: u64) {
        self.shared.dedupe_window_ms.store(window_ms, Ordering::Relaxed);
    }

    /// The offset the next appended record will get.
    pub fn next_offset(&self) -> u64 {
        self.shared.next_offset.load(Ordering::Acquire)
    }

    /// The oldest offset still in a segment file.
    pub fn first_offset(&self) -> u64 {
        self.shared.first_offset()
    }

    /// Reads the record at `offset`, done or not. CRC-checked; a corrupt
    /// record is quarantined and reported, never returned.
    pub fn read(&self, offset: u64) -> Result<Record, ReadError> {
        self.shared.read(offset)
    }

    /// A cursor over the records not done, starting at `offset`.
    pub fn cursor(&self, offset: u64) -> Cursor {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        Cursor::new(Arc::clone(&self.shared), offset, epoch)
    }

    /// Marks `[first, first + count)` done (acked, dead-lettered or
    /// quarantined). Offsets already done stay done. The commit resolves when
    /// the ack state is durable under the sync policy; until then a crash may
    /// redeliver them (at-least-once).
    pub fn ack(&self, first: u64, count: u64, kind: AckKind) -> Result<Commit, AckError> {
        self.shared.ack(first, count, kind)
    }

    /// Whether `offset` is done (acked, dead-lettered or quarantined).
    pub fn is_done(&self, offset: u64) -> bool {
        self.shared.acks.lock().state.is_done(offset)
    }

    /// Every offset below this is done.
    pub fn ack_floor(&self) -> u64 {
        self.shared.acks.lock().state.floor()
    }

    /// Takes the idempotency keys recovered on open (within the dedupe
    /// window, at most `dedupe_keys_max`, ascending by offset). Later calls
    /// return nothing.
    pub fn take_recovered_keys(&self) -> Vec<KeyEntry> {
        std::mem::take(&mut *self.shared.recovered_keys.lock())
    }

    /// Forces a sync of everything written so far, whatever the policy: the
    /// flusher runs a cycle at once, also under `Interval` and `None`.
    pub fn sync(&self) -> Result<(), SyncError> {
        let mut commit = self.shared.commit.lock();
        let epoch = commit.epoch;
        let (data, acks) = (commit.data_written + 1, commit.acks_written + 1);
        commit.data_written = data;
        commit.acks_written = acks;
        commit.sync_requested = true;
        self.shared.wake();
        loop {
            if let Some(done) = commit.resolved(Track::Data, data, epoch) {
                done?;
                if let Some(done) = commit.resolved(Track::Acks, acks, epoch) {
                    return done;
                }
            }
            self.shared.waiter_wake.wait(&mut commit);
        }
    }

    /// Stored bytes of the records not done (the backlog, in-flight
    /// deliveries included): the sum of [`Record::stored_size`] over every
    /// offset from the ack floor to `next_offset` that is not acked,
    /// dead-lettered or quarantined. Segment headers, zero tails and done
    /// records never count.
    ///
    /// Computed from record positions, never by reading the backlog: per
    /// segment, each run of offsets not done between the floor, the done
    /// ranges and the segment's end counts as the position just past its
    /// last record minus the position of its first. A position comes from
    /// the sparse index plus a hop over at most one index interval of
    /// record headers (no CRC); the end of the active segment is the
    /// writer's position; the end of a sealed segment whose index is not
    /// built yet is found from the end of its file
    /// (`Segment::end_from_tail`: at most `2 × record_size_max` bytes, one
    /// CRC check). Cost: O(segments + (1 + done ranges above the floor) ×
    /// index interval), plus one pass over the record headers of a segment
    /// that holds the floor or a done range and whose index is not built
    /// yet (sealed segments after a clean open are indexed on their first
    /// read; the first delivery from there makes the same pass). Memory:
    /// a copy of the done ranges. Not cheap enough for every publish: take
    /// it at open and keep a running count.
    ///
    /// A snapshot: exact when no append or ack of this log runs meanwhile.
    ///
    /// Corruption: a hop that meets an impossible length (or a wrong offset)
    /// over a done record (one quarantined earlier) resynchronises past it,
    /// as a read does, adding an index entry and marking nothing. One over a
    /// record not done yet, or a damaged record at the end of a run, gives
    /// [`ReadError::Corrupt`] and marks nothing either: the caller decides
    /// (the broker then counts with a [`Cursor`], which quarantines the
    /// damaged records as delivery would). It never panics on bad bytes.
    pub fn pending_bytes(&self) -> Result<u64, ReadError> {
        self.shared.pending_bytes()
    }

    pub fn stats(&self) -> LogStats {
        let (ack_floor, done_above_floor, ack_ranges) = {
            let acks = self.shared.acks.lock();
            (acks.state.floor(), acks.state.done_above_floor(), acks.state.range_count() as u64)
        };
        let spare_bytes = self.shared.spare.lock().unwrap_or(0);
        let segments = self.shared.segments.read();
        let next_offset = self.next_offset();
        LogStats {
            first_offset: segments.first().map_or(next_offset, |s| s.base_offset),
            next_offset,
            ack_floor,
            done_above_floor,
            pending: next_offset.saturating_sub(ack_floor).saturating_sub(done_above_floor),
            segment_count: segments.len() as u64,
            disk_bytes: segments.iter().map(|s| s.allocated()).sum::<u64>() + spare_bytes,
            data_bytes: segments.iter().map(|s| s.written()).sum(),
            index_entries: segments.iter().map(|s| s.index_len() as u64).sum(),
            ack_ranges,
            quarantined: self.shared.quarantined.load(Ordering::Relaxed),
            sync_count: self.shared.sync_count.load(Ordering::Relaxed),
            ack_sync_count: self.shared.ack_sync_count.load(Ordering::Relaxed),
            spare_bytes,
            rolls_from_spare: self.shared.rolls_from_spare.load(Ordering::Relaxed),
            rolls_inline: self.shared.rolls_inline.load(Ordering::Relaxed),
            growths_inline: self.shared.growths_inline.load(Ordering::Relaxed),
        }
    }

    /// Syncs everything, writes a final checkpoint and stops the flusher.
    /// A clean close makes the next open scan nothing.
    pub fn close(mut self) -> Result<(), SyncError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), SyncError> {
        {
            let mut commit = self.shared.commit.lock();
            if commit.shutdown {
                return Ok(());
            }
            commit.shutdown = true;
        }
        // After a failed reopen the flusher has finished already: the log
        // is poisoned, reported below.
        self.shared.wake();
        self.shared.pool.wait_finished(&*self.shared);
        match self.shared.commit.lock().error.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(dir = %self.shared.dir.display(), error = %e, "closing log");
        }
    }
}

impl Shared {
    fn poisoned(&self) -> Option<SyncError> {
        self.commit.lock().error.clone()
    }

    fn poison(&self, error: SyncError) {
        let waiters = {
            let mut commit = self.commit.lock();
            if commit.error.is_none() {
                tracing::error!(dir = %self.dir.display(), %error, "log poisoned; reopen to recover");
                commit.error = Some(error);
            }
            std::mem::take(&mut commit.waiters)
        };
        // The flusher finishes too (it may be idle).
        self.wake();
        self.waiter_wake.notify_all();
        waiters.into_iter().for_each(|(_, _, w)| w.wake());
    }

    fn first_offset(&self) -> u64 {
        let segments = self.segments.read();
        segments.first().map_or_else(|| self.next_offset.load(Ordering::Acquire), |s| s.base_offset)
    }
}

#[cfg(test)]
mod tests;
