//! One append-only log (one queue lane): segments, appends with group
//! commit, reads, cursors, ack state and retention.
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
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::{
    acks::{AckJournal, AckKind, AckState},
    checkpoint::{Checkpoint, Point},
    error::{AckError, AppendError, OpenError, ReadError, SyncError},
    file::Io,
    file_cache::FileCache,
    keys::{KeyEntry, KeyJournal},
    limits::{
        ACK_JOURNAL_RETRY_MS, BACKGROUND_FLUSH_MS, BATCH_COUNT_MAX, HEADERS_COUNT_MAX, HEADERS_SIZE_MAX, KEY_SIZE_MAX,
        SEGMENT_HEADER_SIZE,
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
}

pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
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
}

/// What the flusher remembers from one cycle to the next.
struct FlusherState {
    /// The cycle period under `Interval` and `None`.
    interval: Option<Duration>,
    /// Under `Interval` and `None` cycles run at fixed deadlines, one
    /// interval apart: wake-ups in between neither run a cycle nor move
    /// the deadline.
    deadline: Option<Instant>,
    /// Set while the ack journal is full: no write of it before then.
    acks_retry_at: Option<Instant>,
    last_retention_floor: u64,
}

impl FlusherState {
    fn new(policy: SyncPolicy) -> FlusherState {
        let interval = match policy {
            SyncPolicy::Fsync => None,
            SyncPolicy::Interval { interval_ms } => Some(Duration::from_millis(interval_ms)),
            SyncPolicy::None => Some(Duration::from_millis(BACKGROUND_FLUSH_MS)),
        };
        FlusherState {
            interval,
            deadline: interval.map(|i| Instant::now() + i),
            acks_retry_at: None,
            last_retention_floor: u64::MAX,
        }
    }
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

#[derive(Default)]
struct CommitState {
    data_written: u64,
    data_synced: u64,
    acks_written: u64,
    acks_synced: u64,
    /// Segments written since the last sync.
    dirty: Vec<Arc<Segment>>,
    /// The end of the data written so far (what a checkpoint would record).
    point: Option<Point>,
    bytes_since_checkpoint: u64,
    /// Wakers of pending commits.
    waiters: Vec<(Track, u64, Waker)>,
    error: Option<SyncError>,
    /// Which reopen this state belongs to (0: since open). Sequences
    /// restart at each reopen; a commit of an earlier epoch resolves from
    /// `ended`.
    epoch: u64,
    /// The last epochs that ended poisoned (at most `ENDED_EPOCHS_KEPT`).
    ended: Vec<EndedEpoch>,
    shutdown: bool,
    /// `Log::sync` asked for a cycle now, whatever the policy's timing.
    sync_requested: bool,
}

/// How an epoch of a log ended: what was synced before its poisoning.
#[derive(Debug, Clone)]
struct EndedEpoch {
    epoch: u64,
    data_synced: u64,
    acks_synced: u64,
    error: SyncError,
}

/// Ended epochs remembered for commits still pending across a reopen; a
/// commit older than these fails (its log was poisoned twice since).
const ENDED_EPOCHS_KEPT: usize = 8;

/// What one flusher cycle works on, taken under the `commit` lock.
struct Cycle {
    data_target: u64,
    acks_target: u64,
    /// Segments written since the last cycle.
    dirty: Vec<Arc<Segment>>,
    /// The end of the data written before the snapshot: synced by this
    /// cycle, and where a checkpoint would go.
    point: Option<Point>,
    checkpoint_due: bool,
    shutdown: bool,
    /// Leave the ack journal alone this cycle (backing off after ENOSPC).
    acks_paused: bool,
}

/// What a flusher cycle did with the buffered ack entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JournalWrite {
    /// Written (those whose records are durable) and synced; the sync is
    /// skipped when nothing was written since the journal's last sync.
    Written,
    /// Not attempted: backing off after ENOSPC.
    Paused,
    /// The write failed with ENOSPC; the entries stay buffered.
    DiskFull,
}

/// Which sequence a commit waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Track {
    Data,
    Acks,
}

/// Resolves when an append (or ack) is durable under the log's sync policy.
/// Use [`Commit::wait`] to block, or `.await` it: it is a plain
/// `std::future::Future`, tied to no runtime.
#[must_use = "a commit says when the data is durable; acknowledge only after it resolves"]
pub struct Commit {
    state: CommitInner,
}

enum CommitInner {
    Ready,
    Pending { shared: Arc<Shared>, track: Track, seq: u64, epoch: u64 },
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            CommitInner::Ready => f.write_str("Commit(ready)"),
            CommitInner::Pending { track, seq, epoch, .. } => write!(f, "Commit({track:?} #{seq}, epoch {epoch})"),
        }
    }
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log").field("dir", &self.shared.dir).field("next_offset", &self.next_offset()).finish()
    }
}

impl Commit {
    fn ready() -> Commit {
        Commit { state: CommitInner::Ready }
    }

    /// Blocks until durable, or until the log is poisoned.
    pub fn wait(self) -> Result<(), SyncError> {
        let CommitInner::Pending { shared, track, seq, epoch } = self.state else {
            return Ok(());
        };
        let mut commit = shared.commit.lock();
        loop {
            if let Some(done) = commit.resolved(track, seq, epoch) {
                return done;
            }
            shared.waiter_wake.wait(&mut commit);
        }
    }

    /// Whether the commit has resolved (successfully or not).
    pub fn is_resolved(&self) -> bool {
        match &self.state {
            CommitInner::Ready => true,
            CommitInner::Pending { shared, track, seq, epoch } => {
                shared.commit.lock().resolved(*track, *seq, *epoch).is_some()
            }
        }
    }
}

impl Future for Commit {
    type Output = Result<(), SyncError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let CommitInner::Pending { shared, track, seq, epoch } = &self.state else {
            return Poll::Ready(Ok(()));
        };
        let mut commit = shared.commit.lock();
        if let Some(done) = commit.resolved(*track, *seq, *epoch) {
            return Poll::Ready(done);
        }
        commit.waiters.push((*track, *seq, cx.waker().clone()));
        Poll::Pending
    }
}

impl CommitState {
    fn resolved(&self, track: Track, seq: u64, epoch: u64) -> Option<Result<(), SyncError>> {
        if epoch != self.epoch {
            // Its epoch ended poisoned: durable only if synced before that.
            let ended = self.ended.iter().find(|e| e.epoch == epoch).or(self.ended.first());
            let ended = ended.expect("an earlier epoch ended poisoned");
            let synced = match track {
                Track::Data => ended.data_synced,
                Track::Acks => ended.acks_synced,
            };
            return Some(if ended.epoch == epoch && synced >= seq { Ok(()) } else { Err(ended.error.clone()) });
        }
        let synced = match track {
            Track::Data => self.data_synced,
            Track::Acks => self.acks_synced,
        };
        if synced >= seq { Some(Ok(())) } else { self.error.clone().map(Err) }
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
        let recovered = recovery::recover(dir.as_ref(), &options, &io, None)?;
        let write_pos = recovered.segments.last().expect("recovery leaves an active segment").written();
        let shared = Arc::new_cyclic(|me| Shared {
            dir: dir.as_ref().to_owned(),
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
                    segment.rewrite(&shared.io).map_err(crate::error::io_open(&segment.path))?;
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
        Cursor { shared: Arc::clone(&self.shared), segment: None, pos: 0, offset, epoch }
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
        let segments = self.shared.segments.read();
        let next_offset = self.next_offset();
        LogStats {
            first_offset: segments.first().map_or(next_offset, |s| s.base_offset),
            next_offset,
            ack_floor,
            done_above_floor,
            pending: next_offset.saturating_sub(ack_floor).saturating_sub(done_above_floor),
            segment_count: segments.len() as u64,
            disk_bytes: segments.iter().map(|s| s.allocated()).sum(),
            data_bytes: segments.iter().map(|s| s.written()).sum(),
            index_entries: segments.iter().map(|s| s.index_len() as u64).sum(),
            ack_ranges,
            quarantined: self.shared.quarantined.load(Ordering::Relaxed),
            sync_count: self.shared.sync_count.load(Ordering::Relaxed),
            ack_sync_count: self.shared.ack_sync_count.load(Ordering::Relaxed),
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

    fn validate(&self, records: &[NewRecord]) -> Result<(), AppendError> {
        if records.is_empty() {
            return Err(AppendError::BatchEmpty);
        }
        if records.len() > BATCH_COUNT_MAX {
            return Err(AppendError::BatchTooLarge { count: records.len(), max: BATCH_COUNT_MAX });
        }
        for (index, r) in records.iter().enumerate() {
            let key_size = r.key.as_ref().map_or(0, |k| k.len());
            if r.key.is_some() && key_size == 0 {
                return Err(AppendError::KeyEmpty { index });
            }
            if key_size > KEY_SIZE_MAX as usize {
                return Err(AppendError::KeyTooLarge { index, size: key_size, max: KEY_SIZE_MAX });
            }
            if r.headers.len() > HEADERS_COUNT_MAX as usize {
                return Err(AppendError::TooManyHeaders { index, count: r.headers.len(), max: HEADERS_COUNT_MAX });
            }
            let headers_size = r.headers_size();
            let name_too_long = r.headers.iter().any(|(k, _)| k.len() > usize::from(u16::MAX));
            if headers_size > u64::from(HEADERS_SIZE_MAX) || name_too_long {
                return Err(AppendError::HeadersTooLarge { index, size: headers_size, max: HEADERS_SIZE_MAX });
            }
            let size = r.encoded_len();
            if size > u64::from(self.options.record_size_max) {
                return Err(AppendError::RecordTooLarge { index, size, max: self.options.record_size_max });
            }
        }
        Ok(())
    }

    fn append(self: &Arc<Self>, records: &[NewRecord]) -> Result<Appended, AppendError> {
        self.validate(records)?;
        // Refused before the writer lock, which a reopen holds while it
        // recovers: callers are not held up behind it.
        if let Some(e) = self.poisoned() {
            return Err(AppendError::Poisoned(e));
        }
        let mut guard = self.writer.lock();
        if let Some(e) = self.poisoned() {
            return Err(AppendError::Poisoned(e));
        }
        let first_offset = self.next_offset.load(Ordering::Acquire);
        let segment_size = self.options.segment_size;

        // Plan: which records start a new segment, and where each run of
        // records ends (the first run in the active segment, then one per
        // new segment). Records never span segments.
        let mut starts = Vec::new();
        let mut run_ends = Vec::new();
        let mut pos = guard.write_pos;
        for (i, r) in records.iter().enumerate() {
            let size = record::padded(r.encoded_len());
            if pos + size > segment_size {
                starts.push(i);
                run_ends.push(pos);
                pos = SEGMENT_HEADER_SIZE;
            }
            pos += size;
        }
        run_ends.push(pos);

        // Allocate every byte the batch needs before writing anything, so a
        // full disk fails the batch cleanly: the active segment grows first,
        // then every new segment is created with room for its run.
        let active = Arc::clone(self.segments.read().last().expect("a log has an active segment"));
        if let Err(source) = active.grow(&self.io, run_ends[0]) {
            let path = active.path.clone();
            if source.raw_os_error() == Some(libc::ENOSPC) {
                return Err(AppendError::DiskFull { path });
            }
            return Err(AppendError::Io { path, source });
        }
        let mut created = Vec::with_capacity(starts.len());
        for (&i, &end) in starts.iter().zip(&run_ends[1..]) {
            let base = first_offset + i as u64;
            match Segment::create(&self.io, &self.dir, base, segment_size, end) {
                Ok(segment) => created.push(Arc::new(segment)),
                Err(source) => {
                    let path = self.dir.join(segment::file_name(base));
                    for segment in created {
                        let _ = std::fs::remove_file(&segment.path);
                    }
                    if source.raw_os_error() == Some(libc::ENOSPC) {
                        return Err(AppendError::DiskFull { path });
                    }
                    return Err(AppendError::Io { path, source });
                }
            }
        }
        if !created.is_empty() {
            if let Err(source) = self.io.sync_dir(&self.dir) {
                for segment in &created {
                    let _ = std::fs::remove_file(&segment.path);
                }
                return Err(AppendError::Io { path: self.dir.clone(), source });
            }
            self.segments.write().extend(created.iter().cloned());
        }

        // Write each run of records into its segment.
        let mut touched: Vec<Arc<Segment>> = Vec::with_capacity(1 + created.len());
        let mut run_segment = if starts.first() == Some(&0) {
            None
        } else {
            Some(Arc::clone(self.segments.read().iter().rev().nth(created.len()).expect("active segment")))
        };
        let mut next_created = created.into_iter();
        let mut run_start = 0;
        let writer = &mut *guard;
        let mut bytes_written = 0;
        for boundary in starts.iter().copied().chain(std::iter::once(records.len())) {
            if boundary > run_start {
                let segment = run_segment.take().expect("a run has a segment");
                let pos = writer.write_pos;
                writer.buf.clear();
                for (i, r) in records[run_start..boundary].iter().enumerate() {
                    let offset = first_offset + (run_start + i) as u64;
                    segment.note_record(offset, pos + writer.buf.len() as u64);
                    record::encode(r, offset, &mut writer.buf);
                    if let Some(key) = &r.key {
                        writer.pending_keys.push(KeyEntry { key: key.clone(), offset, timestamp_ms: r.timestamp_ms });
                    }
                }
                if let Err(source) = segment.write(&self.io, &writer.buf, pos) {
                    let error = SyncError::new(format!("writing {}", segment.path.display()), source);
                    self.poison(error.clone());
                    return Err(AppendError::Poisoned(error));
                }
                writer.write_pos = pos + writer.buf.len() as u64;
                bytes_written += writer.buf.len() as u64;
                touched.push(segment);
            }
            if boundary < records.len() {
                run_segment = next_created.next();
                writer.write_pos = SEGMENT_HEADER_SIZE;
            }
            run_start = boundary;
        }
        let count = u32::try_from(records.len()).expect("batch size is below BATCH_COUNT_MAX");
        let next_offset = first_offset + u64::from(count);

        let active = touched.last().expect("a non-empty batch touches a segment");
        let point = Point { segment_base: active.base_offset, position: writer.write_pos, next_offset, keys_len: 0 };
        let seq = {
            let mut commit = self.commit.lock();
            commit.data_written += 1;
            for segment in touched {
                if !commit.dirty.iter().any(|d| Arc::ptr_eq(d, &segment)) {
                    commit.dirty.push(segment);
                }
            }
            commit.point = Some(point);
            commit.bytes_since_checkpoint += bytes_written;
            (commit.data_written, commit.epoch)
        };
        // Publish only now that the flusher's next snapshot holds the point
        // past these records: see rule 4 of the module docs.
        self.next_offset.store(next_offset, Ordering::Release);
        drop(guard);
        // Under `Interval` and `None` too: an idle flusher holds no timer
        // (`pool.rs`, rule 4), so the first write after a quiet spell arms it.
        self.wake();
        let commit = match self.options.sync_policy {
            SyncPolicy::Fsync => Commit {
                state: CommitInner::Pending { shared: Arc::clone(self), track: Track::Data, seq: seq.0, epoch: seq.1 },
            },
            SyncPolicy::Interval { .. } | SyncPolicy::None => Commit::ready(),
        };
        Ok(Appended { first_offset, count, commit })
    }

    fn ack(self: &Arc<Self>, first: u64, count: u64, kind: AckKind) -> Result<Commit, AckError> {
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
        self.wake();
        Ok(match self.options.sync_policy {
            SyncPolicy::Fsync => Commit {
                state: CommitInner::Pending { shared: Arc::clone(self), track: Track::Acks, seq: seq.0, epoch: seq.1 },
            },
            SyncPolicy::Interval { .. } | SyncPolicy::None => Commit::ready(),
        })
    }

    /// Marks a range done in memory and buffers the journal entry. Returns
    /// whether anything changed.
    fn mark_done(&self, first: u64, count: u64, kind: AckKind) -> bool {
        let mut acks = self.acks.lock();
        if acks.state.mark(first, count) == 0 {
            return false;
        }
        acks.journal.record(first, count, kind);
        true
    }

    /// The segment holding `offset` and the offset just past its last record.
    fn segment_for(&self, offset: u64) -> Option<(Arc<Segment>, u64)> {
        let segments = self.segments.read();
        let at = segments.partition_point(|s| s.base_offset <= offset).checked_sub(1)?;
        let end = segments.get(at + 1).map_or_else(|| self.next_offset.load(Ordering::Acquire), |s| s.base_offset);
        Some((Arc::clone(&segments[at]), end))
    }

    fn read(&self, offset: u64) -> Result<Record, ReadError> {
        let next_offset = self.next_offset.load(Ordering::Acquire);
        if offset >= next_offset {
            return Err(ReadError::NotWritten { offset, next_offset });
        }
        let Some((segment, end)) = self.segment_for(offset) else {
            return Err(ReadError::Removed { offset, first_offset: self.first_offset() });
        };
        // Each corrupt range met on the way leaves an index entry past it, so
        // every round gets further; the bound only guards against a bug.
        for _ in 0..1024 {
            let (pos, expected, invalid) = match segment.locate(offset, end) {
                Ok(pos) => match record::decode(&segment.data_from(pos), offset) {
                    Ok(record) => return Ok(record),
                    Err(invalid) => (pos, offset, invalid),
                },
                Err(hop) => (hop.pos, hop.expected_offset, hop.invalid),
            };
            let (error, resumed) = self.quarantine(&segment, end, pos, expected, invalid);
            if resumed.is_none_or(|(_, o)| offset < o) {
                return Err(error);
            }
        }
        Err(ReadError::Corrupt {
            segment_base: segment.base_offset,
            first_offset: offset,
            last_offset: offset,
            reason: "record not found after resynchronising".into(),
        })
    }

    /// Steps over a corrupt range starting at `pos` (where `expected` should
    /// have been): finds the next valid record, marks the offsets in between
    /// quarantined, reports them. Returns the error to give the reader and
    /// where valid data resumes.
    fn quarantine(
        &self,
        segment: &Segment,
        end: u64,
        pos: u64,
        expected: u64,
        invalid: Invalid,
    ) -> (ReadError, Option<(u64, u64)>) {
        let data = segment.data_from(0);
        let resumed = segment::resync(&data, pos, data.len() as u64, expected, end);
        let stop = resumed.map_or(end, |(_, o)| o);
        if let Some((pos, offset)) = resumed {
            segment.index_resync_point(offset, pos);
        }
        let count = stop.saturating_sub(expected).max(1);
        if self.mark_done(expected, count, AckKind::Quarantined) {
            self.quarantined.fetch_add(count, Ordering::Relaxed);
            self.commit.lock().acks_written += 1;
            self.wake();
            tracing::error!(
                segment = %segment.path.display(),
                position = pos,
                first_offset = expected,
                last_offset = expected + count - 1,
                reason = invalid.describe(),
                "corrupt records quarantined; they will not be delivered"
            );
        }
        let error = ReadError::Corrupt {
            segment_base: segment.base_offset,
            first_offset: expected,
            last_offset: expected + count - 1,
            reason: invalid.describe().into(),
        };
        (error, resumed)
    }

    fn pending_bytes(&self) -> Result<u64, ReadError> {
        // The end of the log, its active segment and that segment's end,
        // taken together: the writer lock orders them with appends.
        let (next, active_end, segments) = {
            let writer = self.writer.lock();
            let segments: Vec<Arc<Segment>> = self.segments.read().clone();
            (self.next_offset.load(Ordering::Acquire), writer.write_pos, segments)
        };
        let (floor, ranges) = {
            let acks = self.acks.lock();
            (acks.state.floor(), acks.state.ranges_below(next))
        };
        let is_done = |offset: u64| {
            offset < floor || {
                let at = ranges.partition_point(|&(s, _)| s <= offset);
                at.checked_sub(1).is_some_and(|i| offset < ranges[i].1)
            }
        };
        let record_size_max = u64::from(self.options.record_size_max);
        let mut total = 0;
        let mut done = ranges.iter().copied().peekable();
        for (i, segment) in segments.iter().enumerate() {
            let active = i + 1 == segments.len();
            let lo = segment.base_offset;
            let hi = segments.get(i + 1).map_or(next, |s| s.base_offset).min(next);
            let mut start = lo.max(floor);
            while start < hi {
                while done.next_if(|&(_, e)| e <= start).is_some() {}
                let (stop, resume) = match done.peek() {
                    Some(&(s, e)) if s < hi => (s.max(start), e),
                    _ => (hi, hi),
                };
                if stop > start {
                    // The run of records not done [start, stop).
                    let first =
                        if start == lo { SEGMENT_HEADER_SIZE } else { self.position(segment, start, hi, &is_done)? };
                    let last = stop - 1;
                    let end = if stop == hi && active {
                        active_end
                    } else {
                        let from_tail = (stop == hi && !segment.is_indexed_for(last))
                            .then(|| segment.end_from_tail(last, record_size_max))
                            .flatten();
                        match from_tail {
                            Some(end) => end,
                            None => {
                                let pos = self.position(segment, last, hi, &is_done)?;
                                segment.end_of_record_at(pos).ok_or_else(|| ReadError::Corrupt {
                                    segment_base: lo,
                                    first_offset: last,
                                    last_offset: last,
                                    reason: Invalid::BadLength.describe().into(),
                                })?
                            }
                        }
                    };
                    total += end.saturating_sub(first);
                }
                start = resume;
            }
        }
        Ok(total)
    }

    /// The position of the record `offset` (not done) in `segment`, whose
    /// offsets end at `end`, for [`Shared::pending_bytes`]: hops from the
    /// index and resynchronises past damaged records that are done (adding
    /// an index entry, marking nothing). Damage anywhere else is reported.
    fn position(
        &self,
        segment: &Segment,
        offset: u64,
        end: u64,
        is_done: &dyn Fn(u64) -> bool,
    ) -> Result<u64, ReadError> {
        let corrupt = |first: u64, reason: &str| ReadError::Corrupt {
            segment_base: segment.base_offset,
            first_offset: first,
            last_offset: first,
            reason: reason.into(),
        };
        // Each round leaves an index entry further on; the bound guards
        // against a bug, as in `read`.
        for _ in 0..1024 {
            let hop = match segment.locate(offset, end) {
                Ok(pos) => return Ok(pos),
                Err(hop) => hop,
            };
            if hop.expected_offset < offset && is_done(hop.expected_offset) {
                let data = segment.data_from(0);
                if let Some((pos, found)) = segment::resync(&data, hop.pos, data.len() as u64, hop.expected_offset, end)
                    && found <= offset
                {
                    segment.index_resync_point(found, pos);
                    continue;
                }
            }
            return Err(corrupt(hop.expected_offset, hop.invalid.describe()));
        }
        Err(corrupt(offset, "record not found after resynchronising"))
    }

    /// One flusher cycle's I/O: sync dirty segments, write the buffered acks
    /// whose records are now durable and sync the ack journal if anything
    /// was written to it, then publish the synced sequences.
    fn flush_once(&self, cycle: &Cycle) -> Result<JournalWrite, SyncError> {
        for segment in &cycle.dirty {
            segment.sync(&self.io).map_err(|e| SyncError::new(format!("syncing {}", segment.path.display()), e))?;
        }
        // A segment sealed and now synced is never written again: its map
        // serves reads without a descriptor.
        if cycle.dirty.len() > 1 || cycle.dirty.first().is_some_and(|s| !self.is_active(s)) {
            for segment in cycle.dirty.iter().filter(|s| !self.is_active(s)) {
                segment.release_descriptor();
            }
        }
        if !cycle.dirty.is_empty() {
            self.sync_count.fetch_add(1, Ordering::Relaxed);
        }
        let journal = {
            let mut acks = self.acks.lock();
            // Every record before the cycle's point is synced now (here or
            // in an earlier cycle). Acks of later records wait for the cycle
            // that syncs them; none of them is covered by `acks_target`
            // (rule 4 of the module docs), so no commit of this cycle waits.
            if let Some(point) = cycle.point {
                acks.durable_end = acks.durable_end.max(point.next_offset);
            }
            let durable_end = acks.durable_end;
            if cycle.acks_paused {
                JournalWrite::Paused
            } else {
                match acks.journal.flush(&self.io, durable_end) {
                    Ok(()) => JournalWrite::Written,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => JournalWrite::DiskFull,
                    Err(e) => return Err(SyncError::new("writing the ack journal", e)),
                }
            }
        };
        // Every entry an ack sequence up to `acks_target` needs was written
        // in this cycle or an earlier one; the journal knows whether any
        // bytes are still unsynced, and skips the device flush if none are.
        // The device flush runs without the acks lock, which every ack
        // takes: acks keep flowing while the journal syncs.
        let target = if journal == JournalWrite::Written {
            self.acks.lock().journal.sync_target().map_err(|e| SyncError::new("opening the ack journal", e))?
        } else {
            None
        };
        if let Some(target) = target {
            self.io.sync_data(&target.file).map_err(|e| SyncError::new("syncing the ack journal", e))?;
            self.acks.lock().journal.synced(&target);
            self.ack_sync_count.fetch_add(1, Ordering::Relaxed);
        }
        let waiters = {
            let mut commit = self.commit.lock();
            commit.data_synced = commit.data_synced.max(cycle.data_target);
            if journal == JournalWrite::Written {
                commit.acks_synced = commit.acks_synced.max(cycle.acks_target);
            }
            let (ready, pending) = std::mem::take(&mut commit.waiters)
                .into_iter()
                .partition::<Vec<_>, _>(|(track, seq, _)| commit.resolved(*track, *seq, commit.epoch).is_some());
            commit.waiters = pending;
            ready
        };
        self.waiter_wake.notify_all();
        waiters.into_iter().for_each(|(_, _, w)| w.wake());
        Ok(journal)
    }

    /// Writes a checkpoint at `point` (already synced): first the keys
    /// appended before it go to the key journal. `clean` only from the last
    /// cycle of a clean close, whose point is the exact end of the log (no
    /// append can run during `Log::stop`).
    fn checkpoint(&self, point: Point, clean: bool) -> Result<(), SyncError> {
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
            let cutoff = now_ms().saturating_sub(self.options.dedupe_window_ms);
            let len = checkpointer
                .keys
                .compact(&self.io, cutoff, self.options.dedupe_keys_max as usize)
                .map_err(|e| SyncError::new("compacting the key journal", e))?;
            checkpointer
                .checkpoint
                .write(&self.io, Point { keys_len: len, ..point }, clean)
                .map_err(|e| SyncError::new("writing the checkpoint", e))?;
            checkpointer.last = Point { keys_len: len, ..point };
        }
        Ok(())
    }

    /// Deletes segments whose records are all done and checkpointed, and
    /// compacts the ack journal when it has grown.
    fn retain(&self) -> Result<(), SyncError> {
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
            let compacted = plan.write(&self.io).map_err(|e| SyncError::new("compacting the ack journal", e))?;
            self.acks.lock().journal.install(compacted);
        }
        Ok(())
    }
}

impl Scheduled for Shared {
    fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Job for Shared {
    /// One step of the log's flusher, run by a pool thread: the only place
    /// that syncs, checkpoints and removes.
    fn step(&self) -> Step {
        let mut state = self.flusher.lock();
        let cycle = match self.next_cycle(&mut state) {
            Ok(cycle) => cycle,
            Err(step) => return step,
        };
        let result = self.flush_once(&cycle).and_then(|journal| {
            match journal {
                JournalWrite::Written => {
                    if state.acks_retry_at.take().is_some() {
                        tracing::info!(dir = %self.dir.display(), "the ack journal is writable again");
                    }
                }
                JournalWrite::DiskFull => {
                    if state.acks_retry_at.is_none() {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            retry_ms = ACK_JOURNAL_RETRY_MS,
                            "disk full writing the ack journal; acks stay buffered and are retried"
                        );
                    }
                    state.acks_retry_at = Some(Instant::now() + Duration::from_millis(ACK_JOURNAL_RETRY_MS));
                }
                JournalWrite::Paused => {}
            }
            match cycle.point {
                // The last cycle of a close: the point is the exact end and
                // nothing will be written past it (`Shared::checkpoint`).
                Some(point) if cycle.checkpoint_due => self.checkpoint(point, cycle.shutdown),
                _ => Ok(()),
            }
        });
        let result = result.and_then(|()| {
            let floor = self.acks.lock().state.floor();
            if floor != state.last_retention_floor || cycle.checkpoint_due {
                state.last_retention_floor = floor;
                self.retain()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            self.poison(e);
            return Step::Finished;
        }
        if cycle.shutdown {
            return Step::Finished;
        }
        self.prepare_growth();
        Step::Ran
    }
}

impl Shared {
    fn is_active(&self, segment: &Arc<Segment>) -> bool {
        self.segments.read().last().is_some_and(|last| Arc::ptr_eq(last, segment))
    }

    /// Asks the pool to run this log's flusher (a no-op while it is queued).
    fn wake(&self) {
        if let Some(me) = self.me.upgrade() {
            let job: Arc<dyn Scheduled> = me;
            self.pool.schedule(&job);
        }
    }

    /// What the flusher does next: a cycle to run now (`Ok`), or the step
    /// to answer the pool with (nothing to do yet, or finished).
    fn next_cycle(&self, state: &mut FlusherState) -> Result<Cycle, Step> {
        let mut commit = self.commit.lock();
        if commit.error.is_some() {
            return Err(Step::Finished);
        }
        if !(commit.shutdown || commit.sync_requested) {
            let now = Instant::now();
            let acks_paused = state.acks_retry_at.is_some_and(|at| now < at);
            // Contended: someone is acking, so assume entries are buffered.
            let buffered = self.acks.try_lock().is_none_or(|a| a.journal.has_buffered());
            let ack_work = !acks_paused && (commit.acks_written > commit.acks_synced || buffered);
            let data_work = commit.data_written > commit.data_synced;
            let work = data_work || ack_work;
            match (state.deadline, state.interval) {
                (Some(at), Some(interval)) => {
                    let due = now >= at;
                    if due {
                        // The next deadline follows this one, unless the
                        // flusher fell a whole interval behind (or was idle).
                        let next = at + interval;
                        state.deadline = Some(if next > now { next } else { now + interval });
                    }
                    let unsynced = work || commit.bytes_since_checkpoint > 0;
                    if !(due && unsynced) {
                        // Idle with nothing written: no timer until the next
                        // append or ack wakes the flusher.
                        let waiting = unsynced || (acks_paused && buffered);
                        return Err(if waiting { Step::WaitUntil(state.deadline.expect("set")) } else { Step::Idle });
                    }
                }
                _ if work => {}
                // Only ack work is left, and it waits for the retry.
                _ => {
                    return Err(match state.acks_retry_at.filter(|_| acks_paused && buffered) {
                        Some(at) => Step::WaitUntil(at),
                        None => Step::Idle,
                    });
                }
            }
        }
        let point = commit.point;
        let last_checkpoint = self.checkpointer.lock().last;
        let moved = point.is_some_and(|p| p.segment_base != last_checkpoint.segment_base);
        let checkpoint_due = commit.shutdown
            || commit.bytes_since_checkpoint >= self.options.checkpoint_interval_bytes
            || (moved && commit.bytes_since_checkpoint > 0)
            || (state.interval.is_some() && commit.bytes_since_checkpoint > 0);
        if checkpoint_due {
            commit.bytes_since_checkpoint = 0;
        }
        // A close or an explicit sync tries the ack journal even while
        // backing off.
        let forced = commit.shutdown || commit.sync_requested;
        commit.sync_requested = false;
        Ok(Cycle {
            data_target: commit.data_written,
            acks_target: commit.acks_written,
            dirty: std::mem::take(&mut commit.dirty),
            point,
            checkpoint_due,
            shutdown: commit.shutdown,
            acks_paused: !forced && state.acks_retry_at.is_some_and(|at| Instant::now() < at),
        })
    }

    /// Grows the active segment to its next step once the writer has used
    /// half of its allocation, so appends rarely wait for a `fallocate`
    /// (`Segment::grow`). A failure is left to the writer, which meets it
    /// again, before writing, and refuses its batch.
    fn prepare_growth(&self) {
        let Some(active) = self.segments.read().last().cloned() else { return };
        let allocated = active.allocated();
        if allocated < active.size()
            && active.written() > allocated / 2
            && let Err(error) = active.grow(&self.io, allocated + 1)
        {
            tracing::debug!(segment = %active.path.display(), %error, "growing the segment ahead of the writer failed");
        }
    }
}

/// Iterates over the records that are not done, from an offset, following
/// appends as they happen. `next` returns `None` when caught up; call it
/// again later to get newer records.
pub struct Cursor {
    shared: Arc<Shared>,
    /// The segment the cursor is positioned in and the offset just past its
    /// last record (as known when positioned).
    segment: Option<(Arc<Segment>, u64)>,
    /// Position of the record `offset` in `segment`.
    pos: u64,
    offset: u64,
    /// The log's epoch when `segment` was taken (see [`Log::reopen`]).
    epoch: u64,
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor").field("offset", &self.offset).finish()
    }
}

impl Cursor {
    /// The next offset the cursor will look at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Moves the cursor to `offset`.
    pub fn seek(&mut self, offset: u64) {
        self.offset = offset;
        self.segment = None;
    }

    /// The next record that is not done, `None` when caught up, or the
    /// corrupt range it met (which is quarantined; the cursor moves past it).
    #[allow(clippy::should_implement_trait, reason = "a cursor resumes after returning None")]
    pub fn next(&mut self) -> Option<Result<Record, ReadError>> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        if epoch != self.epoch {
            // A reopen replaced the segments: locate afresh.
            self.epoch = epoch;
            self.segment = None;
        }
        loop {
            let next_offset = self.shared.next_offset.load(Ordering::Acquire);
            let first = self.shared.first_offset();
            if self.offset < first {
                self.seek(first);
            }
            let not_done = self.shared.acks.lock().state.next_not_done(self.offset);
            if not_done != self.offset {
                self.seek(not_done);
            }
            if self.offset >= next_offset {
                return None;
            }
            if let Err(error) = self.position() {
                match error {
                    Some(error) => return Some(Err(error)),
                    None => continue,
                }
            }
            let (segment, end) = self.segment.clone().expect("positioned above");
            let data = segment.data_from(self.pos);
            match record::decode(&data, self.offset) {
                Ok(record) => {
                    let len = record::peek(&data).expect("a decoded record has a valid header").len;
                    self.pos += record::padded(u64::from(len));
                    self.offset += 1;
                    return Some(Ok(record));
                }
                Err(invalid) => {
                    let target = self.offset;
                    let (error, resumed) = self.shared.quarantine(&segment, end, self.pos, target, invalid);
                    self.resume(segment, end, resumed);
                    return Some(Err(error));
                }
            }
        }
    }

    /// Makes `segment` and `pos` point at `offset`. `Err(None)`: the cursor
    /// moved (past a corrupt range below its offset); look again.
    fn position(&mut self) -> Result<(), Option<ReadError>> {
        if let Some((_, end)) = &self.segment
            && self.offset < *end
        {
            return Ok(());
        }
        let (segment, end) = self.shared.segment_for(self.offset).ok_or(None)?;
        if let Some((current, _)) = &self.segment
            && Arc::ptr_eq(current, &segment)
        {
            // Still the same (active) segment, which has grown: keep going.
            self.segment = Some((segment, end));
            return Ok(());
        }
        match segment.locate(self.offset, end) {
            Ok(pos) => {
                self.pos = pos;
                self.segment = Some((segment, end));
                Ok(())
            }
            Err(hop) => {
                let target = self.offset;
                let (error, resumed) = self.shared.quarantine(&segment, end, hop.pos, hop.expected_offset, hop.invalid);
                let resume_offset = resumed.map_or(end, |(_, o)| o);
                if target >= resume_offset {
                    // The corrupt range lies below the target: relocate
                    // through the new index entry past it.
                    self.segment = None;
                    return Err(None);
                }
                self.offset = target;
                self.resume(segment, end, resumed);
                Err(Some(error))
            }
        }
    }

    fn resume(&mut self, segment: Arc<Segment>, end: u64, resumed: Option<(u64, u64)>) {
        match resumed {
            Some((pos, offset)) => {
                self.pos = pos;
                self.offset = offset;
                self.segment = Some((segment, end));
            }
            None => self.seek(end),
        }
    }
}

#[cfg(test)]
mod tests;
