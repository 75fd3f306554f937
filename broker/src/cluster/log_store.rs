//! The Raft log on disk: openraft's [`RaftLogStorage`] for the cluster log.
//!
//! # Files
//!
//! Everything lives in one directory (`<data>/cluster/raft/`):
//!
//! - `<first index, 20 digits>.seg`: segment files. Each holds consecutive
//!   entries as frames `[size u32 LE][crc32 of body u32 LE][body]`, the body
//!   being the postcard encoding of an openraft [`Entry`]. A segment is named
//!   after the index of its first frame; a new one starts when the next frame
//!   would take the current one past [`RAFT_SEGMENT_SIZE`].
//! - `lock`: held (`flock`) by the store's writer thread while it runs.
//! - `vote`, `committed`, `purged`: small files `[crc32 u32 LE][postcard
//!   body]` holding the last vote, the last committed log id and the last
//!   purged log id, each replaced whole (temporary file, fsync, rename,
//!   directory fsync). A vote, a truncation and a purge return once
//!   durable; a committed id is written in order but not awaited (it is a
//!   restart hint: losing the last one costs a re-apply, never safety).
//!
//! # Rules
//!
//! 1. One writer thread owns every change to the files and does them in
//!    the order the calls were made (openraft requires log and vote I/O to
//!    be serialized). The async methods only plan the change under the
//!    state lock and hand it to the writer, so no fsync ever runs on the
//!    runtime.
//! 2. `append` returns once its entries are in the in-memory index and the
//!    entry cache (so a reader sees them at once); the writer writes them,
//!    `fdatasync`s every segment it wrote (several appends share one sync)
//!    and only then calls openraft's [`LogFlushed`] callback.
//! 3. An entry at or past `written_next` (not yet in a file) is always in
//!    the cache; the cache keeps the newest entries up to
//!    [`RAFT_LOG_CACHE_SIZE`] bytes beyond those.
//! 4. A segment is synced before the next one is created, so on open only
//!    the last segment can end in a torn frame. Only its last frame may be
//!    bad (torn: cut off); a bad frame anywhere else is an error, never a
//!    silent loss of entries that may have been acknowledged.
//! 5. After a failed write or sync the store is poisoned: every later
//!    write fails until the process reopens it (the page cache may have
//!    dropped the dirty data).
//! 6. Memory: one [`Slot`] (about 48 bytes) per entry not purged, plus the
//!    cache. The state machine's purges bound it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use super::{Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::limits::{
    RAFT_ENTRY_SIZE_MAX, RAFT_LOG_CACHE_SIZE, RAFT_LOG_LOCK_WAIT_MS, RAFT_LOG_WRITER_QUEUE_MAX, RAFT_SEGMENT_SIZE,
};

/// Bytes of a frame's header: the body's size and its CRC.
const FRAME_HEADER_SIZE: u64 = 8;
const SEGMENT_SUFFIX: &str = ".seg";
const VOTE_FILE: &str = "vote";
const COMMITTED_FILE: &str = "committed";
const PURGED_FILE: &str = "purged";
const LOCK_FILE: &str = "lock";

/// Why the log store could not open or write its files.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    /// A file holds bytes that are not what the store wrote (a bad CRC,
    /// an undecodable entry, a gap in the indexes) where a torn write
    /// cannot explain them.
    #[error("the raft log file {path} is corrupt at byte {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    /// An entry bigger than the frame limit was offered.
    #[error("raft log entry {index} is {size} bytes encoded; the limit is {max}")]
    EntryTooLarge { index: u64, size: usize, max: u32 },
    /// An append that does not continue the log (a hole or an overlap).
    #[error("raft log append at index {index} does not follow the last index {last:?}")]
    OutOfOrder { index: u64, last: Option<u64> },
    /// Another store has the directory open (its lock file is held).
    #[error("the raft log in {dir} is in use by another log store (its lock was not released within {waited_ms} ms)")]
    InUse { dir: PathBuf, waited_ms: u64 },
    /// A write or sync failed earlier; nothing is written until reopen.
    #[error("the raft log stopped writing after an I/O error: {0}")]
    PreviousIo(String),
}

/// The Raft log of one node. See the module docs for the files and rules.
pub struct LogStore {
    shared: Arc<Shared>,
    /// Jobs for the writer thread, in call order.
    jobs: mpsc::Sender<Job>,
    /// The last saved vote (the file's content).
    vote: Option<Vote<NodeId>>,
    /// The last committed log id given to `save_committed`.
    committed: Option<LogId>,
    /// Size past which appends start a new segment.
    segment_size: u64,
}

/// Sizes of a [`LogStore`]; the defaults are the limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// Size past which appends start a new segment.
    pub(crate) segment_size: u64,
    /// Bound of the cache of written entries.
    pub(crate) cache_size_max: u64,
    /// How long `open` waits for the directory's lock.
    pub(crate) lock_wait: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            segment_size: RAFT_SEGMENT_SIZE,
            cache_size_max: RAFT_LOG_CACHE_SIZE,
            lock_wait: Duration::from_millis(RAFT_LOG_LOCK_WAIT_MS),
        }
    }
}

/// A cheap reader of the log, sharing the store's index, cache and files.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

impl Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
}

/// Where one entry is: its id, its segment, its frame's position and size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    log_id: LogId,
    segment: u64,
    /// Byte position of the frame's header in the segment.
    pos: u64,
    /// Size of the frame's body.
    size: u32,
}

// Rule 6's figure.
const _: () = assert!(std::mem::size_of::<Slot>() <= 48);

impl Slot {
    fn end(&self) -> u64 {
        self.pos + FRAME_HEADER_SIZE + u64::from(self.size)
    }
}

struct State {
    /// Index of `slots[0]` (last purged + 1 once something was purged).
    first_index: u64,
    /// Every entry not purged, consecutive.
    slots: VecDeque<Slot>,
    last_purged: Option<LogId>,
    /// The newest entries, ending at the last one (rule 3).
    cache: VecDeque<Entry>,
    /// Sum of the cached entries' body sizes.
    cache_size: u64,
    /// The cache's bound for written entries ([`RAFT_LOG_CACHE_SIZE`]).
    cache_size_max: u64,
    /// Entries below this index are written to their segment (page cache
    /// at least); the ones at or past it are only in the cache.
    written_next: u64,
    /// Bumped by every truncation: an append planned before one does not
    /// advance `written_next` after it.
    epoch: u64,
    /// Segment files, by the index they are named after; the writer adds
    /// and removes them.
    files: BTreeMap<u64, Arc<File>>,
    /// The segment appends go to and its planned size; `None` starts a new one.
    active: Option<(u64, u64)>,
    /// Set by the writer when a write or sync failed (rule 5).
    failed: Option<String>,
}

impl State {
    fn next_index(&self) -> u64 {
        self.first_index + self.slots.len() as u64
    }

    fn last_log_id(&self) -> Option<LogId> {
        self.slots.back().map(|s| s.log_id).or(self.last_purged)
    }

    fn cache_first(&self) -> u64 {
        self.next_index() - self.cache.len() as u64
    }

    fn slot(&self, index: u64) -> Option<&Slot> {
        let i = usize::try_from(index.checked_sub(self.first_index)?).ok()?;
        self.slots.get(i)
    }

    /// Drops the oldest cached entries that are written, while the cache is
    /// over its size.
    fn evict(&mut self) {
        while self.cache_size > self.cache_size_max && self.cache_first() < self.written_next {
            let index = self.cache_first();
            let size = self.slot(index).map_or(0, |s| s.size);
            self.cache.pop_front();
            self.cache_size -= u64::from(size);
        }
    }

    /// Forgets the entries from `index` on (slots and cache).
    fn drop_tail(&mut self, index: u64) {
        let keep = (index - self.first_index) as usize;
        let cache_first = self.cache_first();
        let removed: u64 =
            self.slots.range(keep..).filter(|s| s.log_id.index >= cache_first).map(|s| u64::from(s.size)).sum();
        let cached_keep = index.saturating_sub(cache_first) as usize;
        self.cache.truncate(cached_keep);
        self.cache_size -= removed;
        self.slots.truncate(keep);
    }

    /// Forgets the first `count` entries (slots and cache); `first_index`
    /// moves past them.
    fn drop_head(&mut self, count: usize) {
        let cache_first = self.cache_first();
        let end = self.first_index + count as u64;
        let removed: u64 =
            self.slots.range(..count).filter(|s| s.log_id.index >= cache_first).map(|s| u64::from(s.size)).sum();
        let cached_drop = end.saturating_sub(cache_first) as usize;
        self.cache.drain(..cached_drop.min(self.cache.len()));
        self.cache_size -= removed;
        self.slots.drain(..count);
        self.first_index = end;
    }

    fn check_failed(&self) -> Result<(), LogStoreError> {
        match &self.failed {
            Some(e) => Err(LogStoreError::PreviousIo(e.clone())),
            None => Ok(()),
        }
    }
}

/// One change for the writer thread.
enum Job {
    Append {
        writes: Vec<SegmentWrite>,
        /// The last entry's index; `None` for an empty append.
        last_index: Option<u64>,
        epoch: u64,
        callback: LogFlushed<TypeConfig>,
    },
    /// Deletes `delete` (highest first, so a crash never leaves a hole), then
    /// cuts `cut.0` at byte `cut.1`.
    Truncate {
        delete: Vec<u64>,
        cut: Option<(u64, u64)>,
        done: oneshot::Sender<Result<(), LogStoreError>>,
    },
    /// Saves the purged log id, then deletes whole segments below it.
    Purge {
        purged: Vec<u8>,
        delete: Vec<u64>,
        done: oneshot::Sender<Result<(), LogStoreError>>,
    },
    SaveFile {
        name: &'static str,
        bytes: Vec<u8>,
        done: Option<oneshot::Sender<Result<(), LogStoreError>>>,
    },
}

/// Frames to write at a position of one segment (`create`: a new file).
struct SegmentWrite {
    segment: u64,
    pos: u64,
    create: bool,
    bytes: Vec<u8>,
}

impl LogStore {
    /// Opens (or creates) the Raft log in `dir`: reads the small files,
    /// scans every segment checking each frame's CRC and the indexes'
    /// continuity, cuts a torn last frame off the last segment, and starts
    /// the writer thread. Blocking: call it at startup or on a blocking
    /// thread.
    pub fn open(dir: &Path) -> Result<LogStore, LogStoreError> {
        Self::open_with(dir, Options::default())
    }

    /// [`LogStore::open`] with other sizes (tests roll segments and evict
    /// without writing megabytes).
    pub(crate) fn open_with(dir: &Path, options: Options) -> Result<LogStore, LogStoreError> {
        let Options { segment_size, cache_size_max, lock_wait } = options;
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        let lock = lock_dir(dir, lock_wait)?;
        let vote = read_small_file::<Vote<NodeId>>(dir, VOTE_FILE)?;
        let committed = read_small_file::<Option<LogId>>(dir, COMMITTED_FILE)?.flatten();
        let last_purged = read_small_file::<LogId>(dir, PURGED_FILE)?;
        let mut state = recover(dir, last_purged)?;
        state.cache_size_max = cache_size_max;
        let (tx, rx) = mpsc::channel(RAFT_LOG_WRITER_QUEUE_MAX);
        let shared = Arc::new(Shared { dir: dir.to_path_buf(), state: Mutex::new(state) });
        let writer = Writer { shared: Arc::clone(&shared), dirty: BTreeSet::new(), dir_dirty: false };
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || {
                // The lock goes when the writer has finished every job.
                let _lock = lock;
                writer.run(rx);
            })
            .map_err(io_error("starting the writer thread of", dir))?;
        Ok(LogStore { shared, jobs: tx, vote, committed, segment_size })
    }

    /// The entries' planned layout: appends each frame to the active
    /// segment, starting a new segment when it would pass `segment_size`.
    fn plan_append(&self, entries: Vec<Entry>) -> Result<(Vec<SegmentWrite>, Option<u64>, u64), LogStoreError> {
        // Encoded outside the lock, and checked before anything changes,
        // so a refused append leaves the log as it was.
        let frames = entries.iter().map(encode_frame).collect::<Result<Vec<_>, _>>()?;
        let mut state = self.shared.state.lock();
        state.check_failed()?;
        let Some(first) = entries.first().map(|e| e.log_id.index) else {
            return Ok((Vec::new(), None, state.epoch));
        };
        // An empty log (nothing purged) may start anywhere; otherwise
        // entries continue the log.
        let starts_anywhere = state.slots.is_empty() && state.last_purged.is_none();
        let mut expected = if starts_anywhere { first } else { state.next_index() };
        for entry in &entries {
            if entry.log_id.index != expected {
                let last = state.last_log_id().map(|l| l.index);
                return Err(LogStoreError::OutOfOrder { index: entry.log_id.index, last });
            }
            expected += 1;
        }
        if state.slots.is_empty() {
            state.first_index = first;
            state.written_next = state.written_next.max(first);
        }
        let mut writes: Vec<SegmentWrite> = Vec::new();
        let last_index = Some(expected - 1);
        for (entry, frame) in entries.into_iter().zip(frames) {
            let index = entry.log_id.index;
            let frame_size = frame.len() as u64;
            let (segment, pos, create) = match state.active {
                Some((segment, size)) if size == 0 || size + frame_size <= self.segment_size => (segment, size, false),
                _ => (index, 0, true),
            };
            state.active = Some((segment, pos + frame_size));
            let size = u32::try_from(frame_size - FRAME_HEADER_SIZE).expect("checked against RAFT_ENTRY_SIZE_MAX");
            state.slots.push_back(Slot { log_id: entry.log_id, segment, pos, size });
            state.cache.push_back(entry);
            state.cache_size += u64::from(size);
            match writes.last_mut() {
                Some(w) if w.segment == segment && !create => w.bytes.extend_from_slice(&frame),
                _ => writes.push(SegmentWrite { segment, pos, create, bytes: frame }),
            }
        }
        state.evict();
        Ok((writes, last_index, state.epoch))
    }

    async fn send(&self, job: Job) -> Result<(), LogStoreError> {
        self.jobs.send(job).await.map_err(|_| LogStoreError::PreviousIo("the writer thread stopped".into()))
    }

    async fn run(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<(), LogStoreError>>) -> Job,
    ) -> Result<(), LogStoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(job(tx)).await?;
        rx.await.map_err(|_| LogStoreError::PreviousIo("the writer thread stopped".into()))?
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.shared, range, u64::MAX).await
    }

    /// What replication sends: at most [`RAFT_ENTRY_SIZE_MAX`] bytes of
    /// entries (at least one), so an AppendEntries fits its message limit.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.shared, start..end, u64::from(RAFT_ENTRY_SIZE_MAX)).await
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.shared, range, u64::MAX).await
    }

    /// What replication sends: at most [`RAFT_ENTRY_SIZE_MAX`] bytes of
    /// entries (at least one), so an AppendEntries fits its message limit.
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        read_entries(&self.shared, start..end, u64::from(RAFT_ENTRY_SIZE_MAX)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let state = self.shared.state.lock();
        Ok(LogState { last_purged_log_id: state.last_purged, last_log_id: state.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader { shared: Arc::clone(&self.shared) }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = encode_small_file(vote).map_err(write_vote)?;
        self.run(|done| Job::SaveFile { name: VOTE_FILE, bytes, done: Some(done) }).await.map_err(write_vote)?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.vote)
    }

    /// Queued behind the writes before it but not awaited: the committed
    /// id is a hint for restart (the state machine has its own sync
    /// point), so losing the last one costs a re-apply, never safety.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed = committed;
        let bytes = encode_small_file(&committed).map_err(write_logs)?;
        self.send(Job::SaveFile { name: COMMITTED_FILE, bytes, done: None }).await.map_err(write_logs)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Even an empty append goes through the writer, so its callback
        // comes after the earlier appends' syncs, never before.
        let entries: Vec<Entry> = entries.into_iter().collect();
        let (writes, last_index, epoch) = self.plan_append(entries).map_err(write_logs)?;
        self.send(Job::Append { writes, last_index, epoch, callback }).await.map_err(write_logs)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let job = {
            let mut state = self.shared.state.lock();
            state.check_failed().map_err(write_logs)?;
            let index = log_id.index.max(state.first_index);
            let Some(slot) = state.slot(index).cloned() else {
                return Ok(());
            };
            let offset = (index - state.first_index) as usize;
            let mut delete: Vec<u64> = state.slots.range(offset..).map(|s| s.segment).collect();
            delete.dedup();
            let cut = if slot.pos == 0 {
                None
            } else {
                delete.retain(|&s| s != slot.segment);
                Some((slot.segment, slot.pos))
            };
            delete.reverse();
            state.drop_tail(index);
            state.written_next = state.written_next.min(index);
            state.epoch += 1;
            state.active = match (cut, state.slots.back()) {
                (Some((segment, pos)), _) => Some((segment, pos)),
                (None, Some(prev)) => Some((prev.segment, prev.end())),
                (None, None) => None,
            };
            move |done| Job::Truncate { delete, cut, done }
        };
        self.run(job).await.map_err(write_logs)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let job = {
            let mut state = self.shared.state.lock();
            state.check_failed().map_err(write_logs)?;
            if state.last_purged.is_some_and(|p| p.index >= log_id.index) {
                return Ok(());
            }
            let purged = encode_small_file(&log_id).map_err(write_logs)?;
            let count = (log_id.index + 1).saturating_sub(state.first_index).min(state.slots.len() as u64) as usize;
            let mut delete: Vec<u64> = state.slots.range(..count).map(|s| s.segment).collect();
            delete.dedup();
            if let Some(kept) = state.slots.get(count) {
                let kept = kept.segment;
                delete.retain(|&s| s != kept);
            }
            state.drop_head(count);
            state.first_index = state.first_index.max(log_id.index + 1);
            state.written_next = state.written_next.max(state.first_index);
            state.last_purged = Some(log_id);
            if state.slots.is_empty() {
                state.active = None;
            }
            move |done| Job::Purge { purged, delete, done }
        };
        self.run(job).await.map_err(write_logs)
    }
}

/// Reads the entries of `range` that exist, up to `size_max` bytes of
/// bodies (at least one entry): from the cache, or from their segment on a
/// blocking thread. An entry truncated meanwhile ends the
/// answer early (openraft allows missing entries); a frame that fails its
/// checks while its slot is unchanged is corruption.
async fn read_entries<RB: RangeBounds<u64>>(
    shared: &Arc<Shared>,
    range: RB,
    size_max: u64,
) -> Result<Vec<Entry>, StorageError> {
    let (cached, on_disk) = {
        let state = shared.state.lock();
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(state.first_index);
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        }
        .min(state.next_index());
        if start >= end {
            return Ok(Vec::new());
        }
        let mut size = 0u64;
        let end = (start..end)
            .find(|&index| {
                size += u64::from(state.slot(index).map_or(0, |s| s.size));
                size > size_max && index > start
            })
            .unwrap_or(end);
        let cache_first = state.cache_first();
        let mut on_disk = Vec::new();
        for index in start..end.min(cache_first) {
            let slot = state.slot(index).expect("index within the log").clone();
            let Some(file) = state.files.get(&slot.segment) else {
                return Err(read_logs(LogStoreError::Corrupt {
                    path: segment_path(&shared.dir, slot.segment),
                    offset: slot.pos,
                    reason: format!("the segment of entry {index} is missing"),
                }));
            };
            on_disk.push((slot, Arc::clone(file)));
        }
        let cached: Vec<Entry> =
            (start.max(cache_first)..end).map(|index| state.cache[(index - cache_first) as usize].clone()).collect();
        (cached, on_disk)
    };
    if on_disk.is_empty() {
        return Ok(cached);
    }
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || {
        let mut entries = Vec::with_capacity(on_disk.len() + cached.len());
        let read_all = on_disk.len();
        for (slot, file) in on_disk {
            match read_frame(&file, &slot) {
                Ok(entry) => entries.push(entry),
                Err(e) => {
                    // Truncated (and perhaps rewritten) since we looked: stop here.
                    if shared.state.lock().slot(slot.log_id.index) != Some(&slot) {
                        return Ok(entries);
                    }
                    return Err(LogStoreError::Corrupt {
                        path: segment_path(&shared.dir, slot.segment),
                        offset: slot.pos,
                        reason: e,
                    });
                }
            }
        }
        debug_assert_eq!(entries.len(), read_all);
        entries.extend(cached);
        Ok(entries)
    })
    .await
    .map_err(|e| read_logs(LogStoreError::PreviousIo(format!("the reading thread failed: {e}"))))?
    .map_err(read_logs)
}

/// Reads and checks one frame: size, CRC, decoding, and that it is the
/// entry the slot names.
fn read_frame(file: &File, slot: &Slot) -> Result<Entry, String> {
    let mut frame = vec![0u8; (FRAME_HEADER_SIZE + u64::from(slot.size)) as usize];
    file.read_exact_at(&mut frame, slot.pos).map_err(|e| format!("reading entry {}: {e}", slot.log_id.index))?;
    let (size, crc, body) = split_frame(&frame);
    if size != slot.size {
        return Err(format!("entry {} has size {size}, expected {}", slot.log_id.index, slot.size));
    }
    if crc32fast::hash(body) != crc {
        return Err(format!("entry {} failed its CRC check", slot.log_id.index));
    }
    let entry: Entry =
        postcard::from_bytes(body).map_err(|e| format!("entry {} does not decode: {e}", slot.log_id.index))?;
    if entry.log_id != slot.log_id {
        return Err(format!("entry {} holds log id {}, expected {}", slot.log_id.index, entry.log_id, slot.log_id));
    }
    Ok(entry)
}

fn split_frame(frame: &[u8]) -> (u32, u32, &[u8]) {
    let size = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
    (size, crc, &frame[FRAME_HEADER_SIZE as usize..])
}

fn encode_frame(entry: &Entry) -> Result<Vec<u8>, LogStoreError> {
    let body = postcard::to_allocvec(entry).map_err(|e| LogStoreError::Corrupt {
        path: PathBuf::new(),
        offset: 0,
        reason: format!("entry {} does not encode: {e}", entry.log_id.index),
    })?;
    let size = match u32::try_from(body.len()) {
        Ok(size) if size <= RAFT_ENTRY_SIZE_MAX => size,
        _ => {
            return Err(LogStoreError::EntryTooLarge {
                index: entry.log_id.index,
                size: body.len(),
                max: RAFT_ENTRY_SIZE_MAX,
            });
        }
    };
    let mut frame = Vec::with_capacity(body.len() + FRAME_HEADER_SIZE as usize);
    frame.extend_from_slice(&size.to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}{SEGMENT_SUFFIX}"))
}

/// Rebuilds the index from the segments (see rule 4 for a bad frame).
fn recover(dir: &Path, last_purged: Option<LogId>) -> Result<State, LogStoreError> {
    let mut segments = Vec::new();
    for item in std::fs::read_dir(dir).map_err(io_error("listing", dir))? {
        let item = item.map_err(io_error("listing", dir))?;
        let name = item.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".tmp") {
            std::fs::remove_file(item.path()).map_err(io_error("removing", &item.path()))?;
        } else if let Some(stem) = name.strip_suffix(SEGMENT_SUFFIX) {
            let segment = stem.parse::<u64>().map_err(|_| LogStoreError::Corrupt {
                path: item.path(),
                offset: 0,
                reason: "a segment file name that is not an index".into(),
            })?;
            segments.push(segment);
        }
    }
    segments.sort_unstable();
    let mut state = State {
        first_index: last_purged.map_or(0, |p| p.index + 1),
        slots: VecDeque::new(),
        last_purged,
        cache: VecDeque::new(),
        cache_size: 0,
        cache_size_max: RAFT_LOG_CACHE_SIZE,
        written_next: 0,
        epoch: 0,
        files: BTreeMap::new(),
        active: None,
        failed: None,
    };
    let purged_next = state.first_index;
    let mut all: VecDeque<Slot> = VecDeque::new();
    for (i, &segment) in segments.iter().enumerate() {
        let path = segment_path(dir, segment);
        let is_last = i + 1 == segments.len();
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_error("opening", &path))?;
        let len = scan_segment(&file, &path, segment, is_last, &mut all)?;
        if len == 0 {
            // Only a last segment can be empty (created, then torn before
            // its first frame reached the disk).
            drop(file);
            std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
            sync_dir(dir)?;
            continue;
        }
        let last_in_segment = all.back().map(|s| s.log_id.index);
        if last_in_segment.is_some_and(|last| last < purged_next) {
            // Entirely purged: the purge saved its id, then crashed before
            // deleting this file.
            drop(file);
            std::fs::remove_file(&path).map_err(io_error("removing", &path))?;
            all.clear();
            continue;
        }
        state.files.insert(segment, Arc::new(file));
        state.active = Some((segment, len));
    }
    while all.front().is_some_and(|s| s.log_id.index < purged_next) {
        all.pop_front();
    }
    if let Some(first) = all.front() {
        if first.log_id.index != purged_next {
            return Err(LogStoreError::Corrupt {
                path: segment_path(dir, first.segment),
                offset: first.pos,
                reason: format!(
                    "the log starts at index {} but the entries before it are not purged (next expected {purged_next})",
                    first.log_id.index
                ),
            });
        }
    }
    state.slots = all;
    state.written_next = state.next_index();
    Ok(state)
}

/// Scans one segment's frames into `slots` and returns its valid length.
/// In the last segment a torn last frame is cut off (the file is
/// truncated and synced).
fn scan_segment(
    file: &File,
    path: &Path,
    segment: u64,
    is_last: bool,
    slots: &mut VecDeque<Slot>,
) -> Result<u64, LogStoreError> {
    let mut bytes = Vec::new();
    {
        use std::io::Read;
        let mut reader = file;
        reader.read_to_end(&mut bytes).map_err(io_error("reading", path))?;
    }
    let len = bytes.len() as u64;
    let corrupt = |offset: u64, reason: String| LogStoreError::Corrupt { path: path.to_path_buf(), offset, reason };
    if let Some(last) = slots.back() {
        if last.log_id.index + 1 != segment {
            return Err(corrupt(0, format!("a gap: the previous segment ends at index {}", last.log_id.index)));
        }
    }
    let mut pos = 0u64;
    while pos < len {
        let rest = &bytes[pos as usize..];
        let torn = |reason: &str| -> Result<(), LogStoreError> {
            if is_last {
                tracing::warn!(path = %path.display(), offset = pos, reason, "cutting a torn frame off the raft log");
                Ok(())
            } else {
                Err(corrupt(pos, format!("{reason} in a segment that is not the last")))
            }
        };
        if (rest.len() as u64) < FRAME_HEADER_SIZE {
            torn("an incomplete frame header")?;
            break;
        }
        let (size, crc, _) = split_frame(&rest[..FRAME_HEADER_SIZE as usize]);
        if size == 0 && rest.iter().all(|&b| b == 0) {
            torn("zeros to the end of the file")?;
            break;
        }
        if size == 0 || size > RAFT_ENTRY_SIZE_MAX {
            return Err(corrupt(pos, format!("a frame size of {size} bytes (limit {RAFT_ENTRY_SIZE_MAX})")));
        }
        let end = FRAME_HEADER_SIZE + u64::from(size);
        if end > rest.len() as u64 {
            torn("a frame cut short")?;
            break;
        }
        let body = &rest[FRAME_HEADER_SIZE as usize..end as usize];
        if crc32fast::hash(body) != crc {
            if end == rest.len() as u64 {
                torn("a last frame failing its CRC check")?;
                break;
            }
            return Err(corrupt(pos, "a frame failing its CRC check before the last one".into()));
        }
        // An entry's encoding starts with its log id: that is all the index
        // needs (the CRC covered the rest; a read decodes it whole).
        let (log_id, _) = postcard::take_from_bytes::<LogId>(body)
            .map_err(|e| corrupt(pos, format!("an entry whose log id does not decode: {e}")))?;
        let expected = match slots.back() {
            Some(last) if last.segment == segment => last.log_id.index + 1,
            _ => segment,
        };
        if log_id.index != expected {
            return Err(corrupt(pos, format!("entry index {} where {expected} was expected", log_id.index)));
        }
        slots.push_back(Slot { log_id, segment, pos, size });
        pos += end;
    }
    if pos < len {
        file.set_len(pos).map_err(io_error("truncating", path))?;
        file.sync_data().map_err(io_error("syncing", path))?;
    }
    Ok(pos)
}

/// The writer thread's state (rule 1).
struct Writer {
    shared: Arc<Shared>,
    /// Segments written since their last sync.
    dirty: BTreeSet<u64>,
    /// A segment was created since the directory's last sync.
    dir_dirty: bool,
}

impl Writer {
    fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut flushed: Vec<LogFlushed<TypeConfig>> = Vec::new();
        while let Some(first) = jobs.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < RAFT_LOG_WRITER_QUEUE_MAX {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // Only the last of several committed ids in a batch is written.
            let last_committed = batch.iter().rposition(|j| matches!(j, Job::SaveFile { name: COMMITTED_FILE, .. }));
            for (i, job) in batch.into_iter().enumerate() {
                match job {
                    Job::Append { writes, last_index, epoch, callback } => match self.append(writes, last_index, epoch)
                    {
                        Ok(()) => flushed.push(callback),
                        Err(e) => callback.log_io_completed(Err(io::Error::other(e.to_string()))),
                    },
                    Job::Truncate { delete, cut, done } => {
                        let result = self.flush(&mut flushed).and_then(|()| self.truncate(&delete, cut));
                        let _ = done.send(result);
                    }
                    Job::Purge { purged, delete, done } => {
                        let result = self.flush(&mut flushed).and_then(|()| self.purge(&purged, &delete));
                        let _ = done.send(result);
                    }
                    Job::SaveFile { name, bytes, done } => {
                        if name == COMMITTED_FILE && Some(i) != last_committed {
                            continue;
                        }
                        let result = self
                            .flush(&mut flushed)
                            .and_then(|()| self.guard(|dir| write_small_file(dir, name, &bytes)));
                        if let Some(done) = done {
                            let _ = done.send(result);
                        } else if let Err(e) = result {
                            tracing::error!("saving the raft log's {name} file: {e}");
                        }
                    }
                }
            }
            let _ = self.flush(&mut flushed);
        }
    }

    /// Runs `op` unless poisoned; poisons on its failure.
    fn guard(&mut self, op: impl FnOnce(&Path) -> Result<(), LogStoreError>) -> Result<(), LogStoreError> {
        self.shared.state.lock().check_failed()?;
        let dir = self.shared.dir.clone();
        op(&dir).inspect_err(|e| {
            self.shared.state.lock().failed = Some(e.to_string());
        })
    }

    fn append(&mut self, writes: Vec<SegmentWrite>, last_index: Option<u64>, epoch: u64) -> Result<(), LogStoreError> {
        for w in writes {
            if w.create {
                // Rule 4: the segments before a new one are on disk first.
                self.sync_dirty()?;
                let path = segment_path(&self.shared.dir, w.segment);
                let mut file = None;
                self.guard(|_| {
                    let created = OpenOptions::new().read(true).write(true).create_new(true).open(&path);
                    file = Some(created.map_err(io_error("creating", &path))?);
                    Ok(())
                })?;
                let file = file.expect("set when the guard succeeds");
                self.shared.state.lock().files.insert(w.segment, Arc::new(file));
                self.dir_dirty = true;
            }
            let file = self.shared.state.lock().files.get(&w.segment).cloned();
            let path = segment_path(&self.shared.dir, w.segment);
            self.guard(|_| match file {
                Some(file) => file.write_all_at(&w.bytes, w.pos).map_err(io_error("writing", &path)),
                None => Err(LogStoreError::PreviousIo(format!("segment {} is not open", w.segment))),
            })?;
            self.dirty.insert(w.segment);
        }
        let mut state = self.shared.state.lock();
        if let Some(last_index) = last_index.filter(|_| state.epoch == epoch) {
            state.written_next = state.written_next.max(last_index + 1);
            state.evict();
        }
        Ok(())
    }

    /// Syncs what was written and then tells openraft (rule 2).
    fn flush(&mut self, flushed: &mut Vec<LogFlushed<TypeConfig>>) -> Result<(), LogStoreError> {
        let result = self.sync_dirty();
        for callback in flushed.drain(..) {
            callback.log_io_completed(result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string())));
        }
        result
    }

    fn sync_dirty(&mut self) -> Result<(), LogStoreError> {
        let dirty: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        for segment in dirty {
            let file = self.shared.state.lock().files.get(&segment).cloned();
            let path = segment_path(&self.shared.dir, segment);
            if let Some(file) = file {
                self.guard(|_| file.sync_data().map_err(io_error("syncing", &path)))?;
            }
        }
        if std::mem::take(&mut self.dir_dirty) {
            self.guard(sync_dir)?;
        }
        self.shared.state.lock().check_failed()
    }

    fn truncate(&mut self, delete: &[u64], cut: Option<(u64, u64)>) -> Result<(), LogStoreError> {
        for &segment in delete {
            self.remove_segment(segment)?;
        }
        if let Some((segment, pos)) = cut {
            let file = self.shared.state.lock().files.get(&segment).cloned();
            let path = segment_path(&self.shared.dir, segment);
            if let Some(file) = file {
                self.guard(|_| {
                    file.set_len(pos).map_err(io_error("truncating", &path))?;
                    file.sync_data().map_err(io_error("syncing", &path))
                })?;
            }
        }
        self.guard(sync_dir)
    }

    fn purge(&mut self, purged: &[u8], delete: &[u64]) -> Result<(), LogStoreError> {
        self.guard(|dir| write_small_file(dir, PURGED_FILE, purged))?;
        for &segment in delete {
            self.remove_segment(segment)?;
        }
        self.guard(sync_dir)
    }

    fn remove_segment(&mut self, segment: u64) -> Result<(), LogStoreError> {
        let path = segment_path(&self.shared.dir, segment);
        self.dirty.remove(&segment);
        self.shared.state.lock().files.remove(&segment);
        self.guard(|_| match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("removing", &path)(e)),
        })
    }
}

fn encode_small_file<T: Serialize>(value: &T) -> Result<Vec<u8>, LogStoreError> {
    let body = postcard::to_allocvec(value).map_err(|e| LogStoreError::Corrupt {
        path: PathBuf::new(),
        offset: 0,
        reason: format!("a value that does not encode: {e}"),
    })?;
    let mut bytes = crc32fast::hash(&body).to_le_bytes().to_vec();
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Reads a small file; `None` if it does not exist yet.
fn read_small_file<T: DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>, LogStoreError> {
    let path = dir.join(name);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading", &path)(e)),
    };
    let corrupt = |reason: String| LogStoreError::Corrupt { path: path.clone(), offset: 0, reason };
    if bytes.len() < 4 {
        return Err(corrupt("shorter than its CRC".into()));
    }
    let (crc, body) = bytes.split_at(4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("fails its CRC check".into()));
    }
    postcard::from_bytes(body).map(Some).map_err(|e| corrupt(format!("does not decode: {e}")))
}

/// Replaces `dir/name` durably: temporary file, fsync, rename, directory fsync.
fn write_small_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), LogStoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(io_error("creating", &tmp))?;
    file.write_all(bytes).map_err(io_error("writing", &tmp))?;
    file.sync_data().map_err(io_error("syncing", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_error("renaming", &tmp))?;
    sync_dir(dir)
}

/// Takes the directory's lock (`flock` on `lock`), waiting up to `wait`
/// for a store of this process that is still finishing its writes (a
/// reopen right after a drop). Another process is already kept out by the
/// broker's data directory lock.
fn lock_dir(dir: &Path, wait: Duration) -> Result<File, LogStoreError> {
    let path = dir.join(LOCK_FILE);
    let file =
        OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(io_error("opening", &path))?;
    let started = Instant::now();
    loop {
        match crate::broker::try_lock_exclusive(&file) {
            Ok(()) => return Ok(file),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) && started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Err(LogStoreError::InUse { dir: dir.to_path_buf(), waited_ms: wait.as_millis() as u64 });
            }
            Err(e) => return Err(io_error("locking", &path)(e)),
        }
    }
}

/// Waits until no store has `dir` open any more (its writer thread has
/// finished every queued write): tests delete a directory only then.
#[cfg(test)]
pub(crate) fn wait_released(dir: &Path) {
    drop(lock_dir(dir, Duration::from_millis(RAFT_LOG_LOCK_WAIT_MS)).expect("the store's writer finishes"));
}

fn sync_dir(dir: &Path) -> Result<(), LogStoreError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io_error("syncing", dir))
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogStoreError + use<> {
    let path = path.to_path_buf();
    move |source| LogStoreError::Io { action, path, source }
}

fn write_logs(e: LogStoreError) -> StorageError {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

fn write_vote(e: LogStoreError) -> StorageError {
    StorageIOError::write_vote(AnyError::new(&e)).into()
}

fn read_logs(e: LogStoreError) -> StorageError {
    StorageIOError::read_logs(AnyError::new(&e)).into()
}

#[cfg(test)]
mod tests;
