//! Durable ack state: which offsets of a log no longer need delivery.
//!
//! In memory: an *ack floor* (every offset below it is done) and a compact
//! set of done ranges above it. Memory is proportional to the number of
//! holes (unacked offsets between done ones), never to the backlog.
//!
//! On disk: the `acks` journal, a header then fixed 24-byte entries
//! (`u64 first, u64 count, u8 kind, 3 zero bytes, u32 crc over the first 20`).
//! Entries are buffered in memory and written by the log's flusher before it
//! syncs, so acks follow the log's sync policy. The journal is compacted
//! (rewritten as one floor entry plus the ranges, then renamed into place)
//! when it holds many more entries than the state needs.

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
};

use crate::file::{self, Io};

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
    dir: PathBuf,
    file: File,
    len: u64,
    /// Entries not yet written to the file.
    buffer: Vec<u8>,
    /// Entries in the file (for the compaction decision).
    entries: u64,
}

impl AckJournal {
    /// Opens (or creates) the journal and replays it. A torn or corrupt tail
    /// is cut off: losing an unsynced ack only means a redelivery.
    pub(crate) fn open(io: &Io, dir: &Path) -> io::Result<(AckJournal, AckState)> {
        let path = dir.join(FILE_NAME);
        let (file, created) = file::open_or_create(&path)?;
        let mut state = AckState::default();
        let mut entries = 0;
        let size = file.metadata()?.len();
        let mut valid = HEADER_SIZE;
        if created || size < HEADER_SIZE {
            io.append(&file, &header(), 0)?;
            file.set_len(HEADER_SIZE)?;
            io.sync_data(&file)?;
            io.sync_dir(dir)?;
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
            }
        }
        Ok((AckJournal { dir: dir.to_owned(), file, len: valid, buffer: Vec::new(), entries }, state))
    }

    pub(crate) fn record(&mut self, first: u64, count: u64, kind: AckKind) {
        encode_entry(&mut self.buffer, first, count, kind as u8);
    }

    pub(crate) fn has_buffered(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// Writes buffered entries to the file (not synced).
    pub(crate) fn flush(&mut self, io: &Io) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        io.append(&self.file, &self.buffer, self.len)?;
        self.len += self.buffer.len() as u64;
        self.entries += self.buffer.len() as u64 / ENTRY_SIZE;
        self.buffer.clear();
        Ok(())
    }

    pub(crate) fn sync(&self, io: &Io) -> io::Result<()> {
        io.sync_data(&self.file)
    }

    pub(crate) fn needs_compaction(&self, state: &AckState) -> bool {
        self.entries > 1024 + 4 * (state.range_count() as u64 + 1)
    }

    /// Rewrites the journal as the floor plus the ranges: write a temporary
    /// file, sync it, rename it over the journal, sync the directory.
    pub(crate) fn compact(&mut self, io: &Io, state: &AckState) -> io::Result<()> {
        let tmp = self.dir.join("acks.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut bytes = header().to_vec();
        encode_entry(&mut bytes, state.floor, 0, FLOOR_KIND);
        for (&s, &e) in &state.ranges {
            encode_entry(&mut bytes, s, e - s, AckKind::Acked as u8);
        }
        let file = file::open_rw(&tmp, true)?;
        io.append(&file, &bytes, 0)?;
        io.sync_data(&file)?;
        std::fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        io.sync_dir(&self.dir)?;
        self.file = file;
        self.len = bytes.len() as u64;
        self.entries = (bytes.len() as u64 - HEADER_SIZE) / ENTRY_SIZE;
        Ok(())
    }
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
        journal.flush(&io).unwrap();
        let (_, replayed) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(replayed, state);
        let (mut journal, _) = AckJournal::open(&io, dir.path()).unwrap();
        journal.compact(&io, &state).unwrap();
        let (_, compacted) = AckJournal::open(&io, dir.path()).unwrap();
        assert_eq!(compacted, state);
        assert_eq!(compacted.floor(), 2);
    }
}
