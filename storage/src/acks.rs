//! Durable ack state: which offsets of a log no longer need delivery.
//!
//! In memory: an *ack floor* (every offset below it is done) and a compact
//! set of done ranges above it. Memory is proportional to the number of
//! holes (unacked offsets between done ones), never to the backlog.
//!
//! On disk: the `acks` journal, a header then fixed 24-byte entries
//! (`u64 first, u64 count, u8 kind, 3 zero bytes, u32 crc over the first 20`).
//! The journal is compacted (rewritten as one floor entry plus the ranges,
//! then renamed into place) when it holds many more entries than the state
//! needs. In-order acks coalesce into one entry per flush.
//!
//! The journal's device flushes (its sync, and the write, sync and rename
//! of a compaction) run without the lock that acks take, so acks are never
//! held up by the disk; only the flusher writes the journal, so nothing
//! writes it while it syncs.
//!
//! Durability rules:
//! 1. An ack changes the in-memory state at once and buffers its entry. Only
//!    the log's flusher writes entries, in its cycle, then syncs the journal.
//!    Under [`SyncPolicy::Fsync`](crate::SyncPolicy::Fsync) the ack's commit
//!    resolves after that sync. Under `Interval` and `None` it resolves at
//!    once, while the entry is still only in process memory: a crash, even a
//!    `kill -9`, before the next cycle loses the ack, and the message is
//!    delivered again (at-least-once).
//! 2. An entry is written only once every offset it covers is below the
//!    log's durable end (its records are synced); until then it stays
//!    buffered. So an ack never becomes durable before the record it acks:
//!    after a crash that loses a record, no ack of it is left to mark the
//!    record appended next at that offset done.
//! 3. Recovery drops acks at or above the recovered end of the log (written
//!    by builds without rule 2) and rewrites the journal without them.

use crate::file_cache::FilePath;
use std::{collections::BTreeMap, fs::File, io, os::unix::fs::FileExt, path::Path, sync::Arc};

use crate::{
    file::{self, Io, ReplaceError},
    file_cache::CachedFile,
};

/// Why an offset no longer needs delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AckKind {
    /// A consumer acknowledged it.
    Acked = 1,
    /// It was moved to a dead-letter queue.
    DeadLettered = 2,
    /// Storage found it corrupt and quarantined it; it is never delivered.
    Quarantined = 3,
}

const FLOOR_KIND: u8 = 0;
const MAGIC: [u8; 8] = *b"BLSTACK\0";
const VERSION: u32 = 1;
const HEADER_SIZE: u64 = 16;
const ENTRY_SIZE: u64 = 24;
pub(crate) const FILE_NAME: &str = "acks";

/// The in-memory ack state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AckState {
    floor: u64,
    /// `start -> end` (exclusive), disjoint, non-adjacent, all above `floor`.
    ranges: BTreeMap<u64, u64>,
}

impl AckState {
    pub(crate) fn floor(&self) -> u64 {
        self.floor
    }

    /// Number of separate done ranges above the floor (memory use).
    pub(crate) fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// The done ranges above the floor that start below `end`, ascending,
    /// each cut at `end`.
    pub(crate) fn ranges_below(&self, end: u64) -> Vec<(u64, u64)> {
        self.ranges.range(..end).map(|(&s, &e)| (s, e.min(end))).collect()
    }

    /// Offsets marked done above the floor.
    pub(crate) fn done_above_floor(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub(crate) fn is_done(&self, offset: u64) -> bool {
        offset < self.floor || self.ranges.range(..=offset).next_back().is_some_and(|(_, &end)| offset < end)
    }

    /// The first offset at or after `from` that is not done.
    pub(crate) fn next_not_done(&self, from: u64) -> u64 {
        let from = from.max(self.floor);
        match self.ranges.range(..=from).next_back() {
            Some((_, &end)) if from < end => end,
            _ => from,
        }
    }

    /// Marks `[first, first + count)` done. Returns how many offsets were not
    /// done before.
    pub(crate) fn mark(&mut self, first: u64, count: u64) -> u64 {
        let mut start = first.max(self.floor);
        let mut end = first.saturating_add(count);
        if start >= end {
            return 0;
        }
        let mut newly = end - start;
        // Absorb every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=end).rev().take_while(|&(_, &e)| e >= start).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            let overlap = e.min(end).saturating_sub(s.max(start));
            newly -= overlap;
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        if start == self.floor {
            self.floor = end;
            // The floor may now touch the next range.
            if let Some(e) = self.ranges.remove(&self.floor) {
                self.floor = e;
            }
        } else {
            self.ranges.insert(start, end);
        }
        newly
    }

    /// One past the highest done offset (the floor when no range is above it).
    pub(crate) fn end(&self) -> u64 {
        self.ranges.last_key_value().map_or(self.floor, |(_, &end)| end)
    }

    /// Forgets every done offset at or above `end`. Returns whether anything
    /// was done there.
    pub(crate) fn truncate(&mut self, end: u64) -> bool {
        if self.floor >= end {
            let changed = self.floor > end || !self.ranges.is_empty();
            self.floor = end;
            self.ranges.clear();
            return changed;
        }
        let mut changed = !self.ranges.split_off(&end).is_empty();
        if let Some((&start, &last_end)) = self.ranges.last_key_value()
            && last_end > end
        {
            self.ranges.insert(start, end);
            changed = true;
        }
        changed
    }

    /// Raises the floor (offsets below a retained log's start are done).
    pub(crate) fn raise_floor(&mut self, floor: u64) {
        if floor > self.floor {
            self.mark(self.floor, floor - self.floor);
        }
    }
}

/// The `acks` journal file.
#[derive(Debug)]
pub(crate) struct AckJournal {
    dir: Arc<Path>,
    /// Shared with a sync running outside the lock ([`AckJournal::sync_target`]).
    file: CachedFile,
    /// Bumped when a compaction replaces the file, so that a sync of the
    /// old one does not count for the new one.
    generation: u64,
    len: u64,
    /// Entries not yet written to the file: `(first, count, kind)`. Every one
    /// is already in the in-memory state.
    buffer: Vec<(u64, u64, u8)>,
    /// Entries in the file (for the compaction decision).
    entries: u64,
    /// Whether bytes may have been written to the file since it was last
    /// synced: [`AckJournal::sync`] is a no-op otherwise, so a group commit
    /// without acks pays no device flush for the journal.
    dirty: bool,
    /// The first this many buffered entries are in a planned compaction
    /// ([`AckJournal::compaction`] .. [`AckJournal::install`]): `record`
    /// must not extend them, because the install drops them as planned.
    sealed: usize,
    /// A compaction a full disk stopped waits for this.
    compaction_backoff: file::CompactionBackoff,
}

impl AckJournal {
    /// Opens (or creates) the journal and replays it. A torn or corrupt tail
    /// is cut off: losing an unsynced ack only means a redelivery.
    pub(crate) fn open(io: &Io, dir: impl Into<Arc<Path>>) -> io::Result<(AckJournal, AckState)> {
        let dir: Arc<Path> = dir.into();
        let path = dir.join(FILE_NAME);
        let (file, created) = file::open_or_create(&path)?;
        let mut state = AckState::default();
        let mut entries = 0;
        let size = file.metadata()?.len();
        let mut valid = HEADER_SIZE;
        // A file replayed as found may hold entries a killed process wrote
        // and never synced: the first sync (recovery's) must not be skipped.
        let mut dirty = true;
        if created || size < HEADER_SIZE {
            io.append(&file, &header(), 0)?;
            file.set_len(HEADER_SIZE)?;
            io.sync_data(&file)?;
            io.sync_dir(&dir)?;
            dirty = false;
        } else {
            let mut bytes = vec![0u8; size as usize];
            file.read_exact_at(&mut bytes, 0)?;
            if bytes[0..8] != MAGIC {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} has a bad magic", path.display())));
            }
            for entry in bytes[HEADER_SIZE as usize..].chunks_exact(ENTRY_SIZE as usize) {
                let Some((first, count, kind)) = decode_entry(entry) else {
                    break;
                };
                if kind == FLOOR_KIND {
                    state.raise_floor(first);
                } else {
                    state.mark(first, count);
                }
                entries += 1;
                valid += ENTRY_SIZE;
            }
            if valid != size {
                tracing::warn!(path = %path.display(), valid, size, "cutting a torn tail off the ack journal");
                file.set_len(valid)?;
                io.sync_data(&file)?;
                dirty = false;
            } else if entries == 0 {
                // Only the header, which was synced when it was written
                // (creation and compaction sync before anything relies on
                // it): nothing a killed process left unsynced. Spares an
                // idle lane's start one fdatasync.
                dirty = false;
            }
        }
        let file = io.files().insert(FilePath::InDir(Arc::clone(&dir), FILE_NAME), file);
        let journal = AckJournal {
            dir,
            file,
            generation: 0,
            len: valid,
            buffer: Vec::new(),
            entries,
            dirty,
            sealed: 0,
            compaction_backoff: file::CompactionBackoff::default(),
        };
        Ok((journal, state))
    }

    /// Buffers an entry. One that continues the last buffered entry (same
    /// kind, the next offsets) extends it: in-order acks of a consumer make
    /// one entry per flush, not one per message, which keeps the journal
    /// small and its compactions rare.
    /// Entries sealed by a planned compaction are never extended.
    pub(crate) fn record(&mut self, first: u64, count: u64, kind: AckKind) {
        let kind = kind as u8;
        if self.buffer.len() > self.sealed
            && let Some((last_first, last_count, last_kind)) = self.buffer.last_mut()
            && *last_kind == kind
            && last_first.checked_add(*last_count) == Some(first)
        {
            *last_count += count;
            return;
        }
        self.buffer.push((first, count, kind));
    }

    pub(crate) fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Writes the buffered entries whose offsets all lie below `durable_end`
    /// to the file (not synced). The others stay buffered until their records
    /// are synced (rule 2 of the module docs). On error nothing is dropped
    /// from the buffer.
    pub(crate) fn flush(&mut self, io: &Io, durable_end: u64) -> io::Result<()> {
        let mut bytes = Vec::new();
        for &(first, count, kind) in self.buffer.iter().filter(|e| is_durable(e, durable_end)) {
            encode_entry(&mut bytes, first, count, kind);
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // Before the write: a failed (or short) write may still have left
        // bytes in the file.
        self.dirty = true;
        io.append(&*self.file.get()?, &bytes, self.len)?;
        self.len += bytes.len() as u64;
        self.entries += bytes.len() as u64 / ENTRY_SIZE;
        self.buffer.retain(|e| !is_durable(e, durable_end));
        // No compaction is in progress while the flusher flushes (it runs
        // both); one whose write failed never installed: nothing is sealed.
        self.sealed = 0;
        Ok(())
    }

    /// `fdatasync`s the journal if anything was written to it since its
    /// last sync. Returns whether it synced.
    pub(crate) fn sync(&mut self, io: &Io) -> io::Result<bool> {
        if !self.dirty {
            return Ok(false);
        }
        io.sync_data(&*self.file.get()?)?;
        self.dirty = false;
        Ok(true)
    }

    /// The file to sync when something was written to it since its last
    /// sync: [`AckJournal::sync`] in two halves, so that the caller can run
    /// the device flush without holding the lock that acks take. Sound
    /// because only the log's flusher writes, syncs or compacts the
    /// journal: nothing is written between this call and
    /// [`AckJournal::synced`].
    pub(crate) fn sync_target(&self) -> io::Result<Option<SyncTarget>> {
        if !self.dirty {
            return Ok(None);
        }
        Ok(Some(SyncTarget { file: self.file.get()?, generation: self.generation }))
    }

    /// Notes that `target` (from [`AckJournal::sync_target`]) was synced.
    pub(crate) fn synced(&mut self, target: &SyncTarget) {
        if target.generation == self.generation {
            self.dirty = false;
        }
    }

    pub(crate) fn needs_compaction(&self, state: &AckState) -> bool {
        self.compaction_backoff.ready() && self.entries > 1024 + 4 * (state.range_count() as u64 + 1)
    }

    /// Gives up a planned compaction that a full disk stopped before it
    /// touched the journal (see [`ReplaceError::is_deferrable`]): the
    /// entries it sealed are open again, and no compaction is tried for
    /// `COMPACTION_RETRY_MS`. The journal stays valid, only longer.
    pub(crate) fn defer_compaction(&mut self) {
        self.sealed = 0;
        self.compaction_backoff.defer();
    }

    /// Rewrites the journal as the floor plus the ranges of `state` below
    /// `durable_end`: write a temporary file, sync it, rename it over the
    /// journal, sync the directory. Buffered entries below `durable_end` are
    /// in the new file and leave the buffer; the others stay buffered.
    pub(crate) fn compact(&mut self, io: &Io, state: &AckState, durable_end: u64) -> io::Result<()> {
        let plan = self.compaction(state, durable_end);
        let compacted = plan.write(io).map_err(ReplaceError::into_io)?;
        self.install(compacted);
        Ok(())
    }

    /// [`AckJournal::compact`] in three steps, so that the slow middle one
    /// (write, sync, rename, directory sync) runs without the lock that acks
    /// take: plan under the lock, [`Compaction::write`] without it, then
    /// [`AckJournal::install`] under the lock again. Sound because only the
    /// log's flusher writes the journal; entries buffered meanwhile are not
    /// in the plan's state and stay buffered.
    /// The buffered entries the plan covers are sealed until the install:
    /// an ack arriving meanwhile goes into an entry of its own.
    pub(crate) fn compaction(&mut self, state: &AckState, durable_end: u64) -> Compaction {
        let mut state = state.clone();
        state.truncate(durable_end);
        self.sealed = self.buffer.len();
        Compaction { dir: self.dir.clone(), state, durable_end, buffered: self.buffer.len() }
    }

    /// Puts a written compaction in place of the journal.
    pub(crate) fn install(&mut self, compacted: Compacted) {
        let Compacted { file, len, durable_end, buffered } = compacted;
        self.file.replace(file);
        self.generation += 1;
        self.len = len;
        self.entries = (len - HEADER_SIZE) / ENTRY_SIZE;
        // The new file was synced before the rename.
        self.dirty = false;
        // The entries buffered when the plan was made are in its state if
        // durable; later ones were not seen by it.
        let mut index = 0;
        self.buffer.retain(|e| {
            index += 1;
            index > buffered || !is_durable(e, durable_end)
        });
        self.sealed = 0;
    }
}

/// The journal's descriptor to sync outside the lock, and which file it is.
pub(crate) struct SyncTarget {
    pub(crate) file: Arc<File>,
    generation: u64,
}

/// A planned rewrite of the journal ([`AckJournal::compaction`]).
pub(crate) struct Compaction {
    dir: Arc<Path>,
    state: AckState,
    durable_end: u64,
    buffered: usize,
}

/// A rewritten journal, renamed into place, to install.
pub(crate) struct Compacted {
    file: File,
    len: u64,
    durable_end: u64,
    buffered: usize,
}

impl Compaction {
    /// Writes the floor plus the ranges to a temporary file, syncs it,
    /// renames it over the journal and syncs the directory.
    pub(crate) fn write(self, io: &Io) -> Result<Compacted, ReplaceError> {
        let mut bytes = header().to_vec();
        encode_entry(&mut bytes, self.state.floor, 0, FLOOR_KIND);
        for (&s, &e) in &self.state.ranges {
            encode_entry(&mut bytes, s, e - s, AckKind::Acked as u8);
        }
        let file = file::replace(io, &self.dir, "acks.tmp", FILE_NAME, &bytes)?;
        Ok(Compacted { file, len: bytes.len() as u64, durable_end: self.durable_end, buffered: self.buffered })
    }
}

/// Whether every offset a buffered entry covers lies below `durable_end`.
fn is_durable(&(first, count, _): &(u64, u64, u8), durable_end: u64) -> bool {
    first.saturating_add(count) <= durable_end
}

fn header() -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn encode_entry(buf: &mut Vec<u8>, first: u64, count: u64, kind: u8) {
    let start = buf.len();
    buf.extend_from_slice(&first.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    buf.extend_from_slice(&[kind, 0, 0, 0]);
    let crc = crc32fast::hash(&buf[start..start + 20]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

fn decode_entry(entry: &[u8]) -> Option<(u64, u64, u8)> {
    let crc = u32::from_le_bytes(entry[20..24].try_into().expect("4 bytes"));
    if crc32fast::hash(&entry[0..20]) != crc {
        return None;
    }
    let first = u64::from_le_bytes(entry[0..8].try_into().expect("8 bytes"));
    let count = u64::from_le_bytes(entry[8..16].try_into().expect("8 bytes"));
    let kind = entry[16];
    (kind <= AckKind::Quarantined as u8).then_some((first, count, kind))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The range set agrees with a plain set of done offsets.
        #[test]
        fn ack_state_matches_model(ops in proptest::collection::vec((0u64..200, 1u64..8), 0..200)) {
            let mut state = AckState::default();
            let mut model = std::collections::BTreeSet::new();
            for (first, count) in ops {
                let before = model.len() as u64;
                for o in first..first + count { model.insert(o); }
                let newly = state.mark(first, count);
                prop_assert_eq!(newly, model.len() as u64 - before);
            }
            for o in 0..220 {
                prop_assert_eq!(state.is_done(o), model.contains(&o), "offset {}", o);
                let next = (o..).find(|x| !model.contains(x)).unwrap();
                prop_assert_eq!(state.next_not_done(o), next);
            }
            let floor = (0..).find(|x| !model.contains(x)).unwrap();
            prop_assert_eq!(state.floor(), floor);
        }

        /// Truncating forgets exactly the done offsets at or above the cut.
        #[test]
        fn truncate_matches_model(
            ops in proptest::collection::vec((0u64..200, 1u64..8), 0..200),
            cut in 0u64..220,
        ) {
            let mut state = AckState::default();
            let mut model = std::collections::BTreeSet::new();
            for (first, count) in ops {
                state.mark(first, count);
                model.extend(first..first + count);
            }
            let changed = state.truncate(cut);
            prop_assert_eq!(changed, model.iter().any(|&o| o >= cut));
            model.retain(|&o| o < cut);
            for o in 0..220 {
                prop_assert_eq!(state.is_done(o), model.contains(&o), "offset {}", o);
            }
            prop_assert_eq!(state.end(), model.last().map_or(state.floor(), |&o| o + 1));
            // The state stays well formed: marking on top of it agrees too.
            state.mark(cut, 3);
            model.extend(cut..cut + 3);
            for o in 0..230 {
                prop_assert_eq!(state.is_done(o), model.contains(&o), "offset {} after a mark", o);
            }
        }
    }

    /// The journal survives a reopen and a compaction with the same state.
    #[test]
    fn journal_replays_and_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let io = Io::default();
        let (mut journal, mut state) = AckJournal::open(&io, dir.path()).unwrap();
        for o in [0u64, 1, 5, 6, 9, 3] {
            state.mark(o, 1);
            journal.record(o, 1, AckKind::Acked);
        }
        journal.flush(&io, u64::MAX).unwrap();
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(replayed, state);
        let (mut journal, _) = AckJournal::open(&io, dir.path()).unwrap();
        journal.compact(&io, &state, u64::MAX).unwrap();
        let (_, compacted) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(compacted, state);
        assert_eq!(compacted.floor(), 2);
    }

    /// Entries of offsets not yet durable stay buffered through flushes and
    /// compactions, and are written once their offsets are.
    #[test]
    fn entries_wait_for_their_offsets_to_be_durable() {
        let dir = tempfile::tempdir().unwrap();
        let io = Io::default();
        let (mut journal, mut state) = AckJournal::open(&io, dir.path()).unwrap();
        for (first, count) in [(0u64, 2u64), (5, 3), (10, 1)] {
            state.mark(first, count);
            journal.record(first, count, AckKind::Acked);
        }
        journal.flush(&io, 7).unwrap();
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!((replayed.floor(), replayed.end()), (2, 2), "only [0, 2) is below 7");
        journal.compact(&io, &state, 9).unwrap();
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert!(replayed.is_done(7) && !replayed.is_done(8), "the compaction holds what is below 9");
        assert!(journal.has_buffered());
        journal.flush(&io, 11).unwrap();
        assert!(!journal.has_buffered());
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(replayed, state);
    }

    /// In-order acks of one kind buffer as one entry; a gap, another kind
    /// or an earlier offset starts a new one.
    #[test]
    fn contiguous_entries_coalesce() {
        let dir = tempfile::tempdir().unwrap();
        let io = Io::default();
        let (mut journal, mut state) = AckJournal::open(&io, dir.path()).unwrap();
        for o in 0..500u64 {
            state.mark(o, 1);
            journal.record(o, 1, AckKind::Acked);
        }
        assert_eq!(journal.buffer, [(0, 500, AckKind::Acked as u8)]);
        for (first, count, kind) in
            [(502, 1, AckKind::Acked), (503, 2, AckKind::DeadLettered), (500, 2, AckKind::Acked)]
        {
            state.mark(first, count);
            journal.record(first, count, kind);
        }
        assert_eq!(journal.buffer.len(), 4, "{:?}", journal.buffer);
        journal.flush(&io, u64::MAX).unwrap();
        assert_eq!(journal.entries, 4);
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(replayed, state);
        assert_eq!(replayed.floor(), 505);
    }

    /// Entries buffered while a compaction is written (outside the lock)
    /// are not in its state: they stay buffered and reach the new file on
    /// the next flush.
    #[test]
    fn entries_buffered_during_a_compaction_survive_it() {
        let dir = tempfile::tempdir().unwrap();
        let io = Io::default();
        let (mut journal, mut state) = AckJournal::open(&io, dir.path()).unwrap();
        for o in [0u64, 2, 4] {
            state.mark(o, 1);
            journal.record(o, 1, AckKind::Acked);
        }
        let plan = journal.compaction(&state, u64::MAX);
        // Meanwhile (the lock released): more acks.
        for o in [6u64, 8] {
            state.mark(o, 1);
            journal.record(o, 1, AckKind::Acked);
        }
        journal.install(plan.write(&io).unwrap());
        assert_eq!(journal.buffer.len(), 2, "{:?}", journal.buffer);
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert!(replayed.is_done(4) && !replayed.is_done(6), "the compaction holds what it planned");
        journal.flush(&io, u64::MAX).unwrap();
        assert!(journal.sync_target().unwrap().is_some(), "written since the compaction");
        let target = journal.sync_target().unwrap().unwrap();
        io.sync_data(&target.file).unwrap();
        journal.synced(&target);
        assert!(journal.sync_target().unwrap().is_none());
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(replayed, state);
    }

    /// An ack that continues an entry the compaction already planned around
    /// (4 before the plan, 5 while it is written) is not folded into that
    /// entry, which the install drops: it stays buffered and is journaled.
    #[test]
    fn an_ack_continuing_a_planned_entry_survives_the_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let io = Io::default();
        let (mut journal, mut state) = AckJournal::open(&io, dir.path()).unwrap();
        state.mark(4, 1);
        journal.record(4, 1, AckKind::Acked);
        let plan = journal.compaction(&state, u64::MAX);
        state.mark(5, 1);
        journal.record(5, 1, AckKind::Acked);
        journal.install(plan.write(&io).unwrap());
        journal.flush(&io, u64::MAX).unwrap();
        journal.sync(&io).unwrap();
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert!(replayed.is_done(4) && replayed.is_done(5), "ack 5 was lost: {replayed:?}");
        assert_eq!(replayed, state);
    }
}
