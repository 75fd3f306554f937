//! The idempotency-key journal, so the broker's dedupe survives restarts
//! even after retention removed the segments that held the keyed records.
//!
//! Keys of appended records are buffered in memory and written to the `keys`
//! journal at each checkpoint, which records the journal's synced length.
//! Recovery reads the journal up to that length (keys within the dedupe
//! window), then picks up the keys of records after the checkpoint from its
//! scan of the log tail. Memory: at most `dedupe_keys_max` recovered keys,
//! plus the keys appended since the last checkpoint.
//!
//! The journal is compacted when it outgrows twice what its live keys took
//! at the last compaction (plus [`COMPACTION_SLACK`]), so its size, and the
//! work of reading it at open, follow the keys inside the dedupe window
//! (at most `dedupe_keys_max`), never the total history.
//!
//! Entry layout: `u32 crc over the rest, u16 key_len, u16 zero,
//! u64 timestamp_ms, u64 offset, key, zero padding to 8 bytes`.

use crate::file_cache::FilePath;
use std::sync::Arc;
use std::{
    collections::{HashMap, hash_map::Entry},
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::Path,
};

use bytes::Bytes;

use crate::{
    file::{self, Io, ReplaceError},
    file_cache::CachedFile,
};

const MAGIC: [u8; 8] = *b"BLSTKEY\0";
const VERSION: u32 = 1;
pub(crate) const HEADER_SIZE: u64 = 16;
const ENTRY_HEADER: usize = 24;
pub(crate) const FILE_NAME: &str = "keys";
/// Bytes the journal may grow past twice its live size before compaction.
pub(crate) const COMPACTION_SLACK: u64 = 1024 * 1024;

/// An idempotency key seen in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub key: Bytes,
    /// Offset of the record that carried the key.
    pub offset: u64,
    /// The record's enqueue time, Unix milliseconds.
    pub timestamp_ms: u64,
}

#[derive(Debug)]
pub(crate) struct KeyJournal {
    dir: Arc<Path>,
    file: CachedFile,
    len: u64,
    /// Bytes of the entries inside the dedupe window at open or at the last
    /// compaction (header included): the base of the compaction threshold.
    live_len: u64,
    /// A compaction a full disk stopped waits for this.
    compaction_backoff: file::CompactionBackoff,
}

impl KeyJournal {
    /// Opens the journal, trusting only its first `synced_len` bytes (from
    /// the checkpoint; `None` when there is no checkpoint, so nothing is
    /// trusted). Returns the keys not older than `cutoff_ms`.
    pub(crate) fn open(
        io: &Io,
        dir: impl Into<Arc<Path>>,
        synced_len: Option<u64>,
        cutoff_ms: u64,
    ) -> io::Result<(KeyJournal, Vec<KeyEntry>)> {
        let dir: Arc<Path> = dir.into();
        let path = dir.join(FILE_NAME);
        let (file, created) = file::open_or_create(&path)?;
        let size = file.metadata()?.len();
        let trusted = synced_len.unwrap_or(HEADER_SIZE).clamp(HEADER_SIZE, size.max(HEADER_SIZE));
        let mut keys = Vec::new();
        if created || size < HEADER_SIZE || synced_len.is_none() {
            io.append(&file, &header(), 0)?;
            file.set_len(HEADER_SIZE)?;
            io.sync_data(&file)?;
            if created {
                io.sync_dir(&dir)?;
            }
            let file = io.files().insert(FilePath::InDir(Arc::clone(&dir), FILE_NAME), file);
            let journal = KeyJournal {
                dir,
                file,
                len: HEADER_SIZE,
                live_len: HEADER_SIZE,
                compaction_backoff: file::CompactionBackoff::default(),
            };
            return Ok((journal, keys));
        }
        let bytes = read_prefix(&file, trusted)?;
        if bytes[0..8] != MAGIC {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} has a bad magic", path.display())));
        }
        let mut live_len = HEADER_SIZE;
        let valid = decode_all(&bytes, |entry, size| {
            if entry.timestamp_ms >= cutoff_ms {
                live_len += size;
                keys.push(entry);
            }
        });
        if valid != size {
            file.set_len(valid)?;
            io.sync_data(&file)?;
        }
        let file = io.files().insert(FilePath::InDir(Arc::clone(&dir), FILE_NAME), file);
        Ok((
            KeyJournal { dir, file, len: valid, live_len, compaction_backoff: file::CompactionBackoff::default() },
            keys,
        ))
    }

    /// Whether the journal has grown past twice its live size (at open or
    /// at the last compaction) plus [`COMPACTION_SLACK`]. Each compaction
    /// rewrites at most `dedupe_keys_max` keys, so the journal stays within
    /// `COMPACTION_SLACK + 2 ×` those keys' size (plus one checkpoint's keys),
    /// and the cost of rewriting is amortized over the keys appended since.
    pub(crate) fn needs_compaction(&self) -> bool {
        self.compaction_backoff.ready() && self.len > COMPACTION_SLACK + 2 * self.live_len
    }

    /// No compaction for `COMPACTION_RETRY_MS`: a full disk stopped the
    /// last one before it touched the journal, which stays valid.
    pub(crate) fn defer_compaction(&mut self) {
        self.compaction_backoff.defer();
    }

    /// Appends and syncs entries; returns the new synced length.
    pub(crate) fn append(&mut self, io: &Io, entries: &[KeyEntry]) -> io::Result<u64> {
        if entries.is_empty() {
            return Ok(self.len);
        }
        let mut buf = Vec::new();
        for entry in entries {
            encode_entry(&mut buf, entry);
        }
        let file = self.file.get()?;
        io.append(&file, &buf, self.len)?;
        io.sync_data(&file)?;
        self.len += buf.len() as u64;
        Ok(self.len)
    }

    /// Rewrites the journal with only the `keys_max` newest keys not older
    /// than `cutoff_ms` (temporary file, sync, rename, directory sync).
    /// Returns the new length.
    pub(crate) fn compact(&mut self, io: &Io, cutoff_ms: u64, keys_max: usize) -> Result<u64, ReplaceError> {
        let file = self.file.get().map_err(ReplaceError::Untouched)?;
        let bytes = read_prefix(&file, self.len).map_err(ReplaceError::Untouched)?;
        let mut live = Vec::new();
        decode_all(&bytes, |entry, _| {
            if entry.timestamp_ms >= cutoff_ms {
                live.push(entry);
            }
        });
        let live = newest_unique(live, keys_max);
        let mut out = header().to_vec();
        for entry in &live {
            encode_entry(&mut out, entry);
        }
        let file = file::replace(io, &self.dir, "keys.tmp", FILE_NAME, &out)?;
        self.file.replace(file);
        self.len = out.len() as u64;
        self.live_len = self.len;
        Ok(self.len)
    }
}

/// The first `len` bytes of `file`, as one buffer that decoded keys slice
/// (no allocation per key).
fn read_prefix(file: &File, len: u64) -> io::Result<Bytes> {
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(Bytes::from(bytes))
}

/// Calls `f` with every valid entry from the header on and its encoded
/// size; returns the position after the last one.
fn decode_all(bytes: &Bytes, mut f: impl FnMut(KeyEntry, u64)) -> u64 {
    let mut pos = HEADER_SIZE as usize;
    while let Some((entry, next)) = decode_entry(bytes, pos) {
        f(entry, (next - pos) as u64);
        pos = next;
    }
    pos as u64
}

/// Copies the keys of `entries` into one shared buffer, so that they hold
/// neither one allocation each nor the buffer they were decoded from (a
/// whole journal, mostly keys that were dropped).
pub(crate) fn pack(entries: &mut [KeyEntry]) {
    let total = entries.iter().map(|e| e.key.len()).sum();
    let mut arena = Vec::with_capacity(total);
    for entry in entries.iter() {
        arena.extend_from_slice(&entry.key);
    }
    let arena = Bytes::from(arena);
    let mut at = 0;
    for entry in entries.iter_mut() {
        let len = entry.key.len();
        entry.key = arena.slice(at..at + len);
        at += len;
    }
}

/// Keeps the newest entry per key (highest offset), then at most
/// `keys_max` keys (the newest by timestamp, then offset), ordered by
/// offset. One hash of each key, no allocation per key.
pub(crate) fn newest_unique(mut entries: Vec<KeyEntry>, keys_max: usize) -> Vec<KeyEntry> {
    let mut keep = vec![false; entries.len()];
    {
        let mut newest: HashMap<&[u8], usize> = HashMap::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            match newest.entry(&entry.key[..]) {
                Entry::Occupied(mut seen) => {
                    if entries[*seen.get()].offset < entry.offset {
                        seen.insert(i);
                    }
                }
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        for &i in newest.values() {
            keep[i] = true;
        }
    }
    let mut at = 0;
    entries.retain(|_| {
        at += 1;
        keep[at - 1]
    });
    if entries.len() > keys_max {
        entries.sort_unstable_by_key(|e| (e.timestamp_ms, e.offset));
        let excess = entries.len() - keys_max;
        entries.drain(..excess);
        entries.sort_unstable_by_key(|e| e.offset);
    } else if !entries.is_sorted_by_key(|e| e.offset) {
        entries.sort_unstable_by_key(|e| e.offset);
    }
    entries
}

fn header() -> [u8; HEADER_SIZE as usize] {
    let mut h = [0u8; HEADER_SIZE as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

fn encode_entry(buf: &mut Vec<u8>, entry: &KeyEntry) {
    // The decoder reads a zero key length as the end of the journal;
    // `Shared::append` refuses empty keys (`AppendError::KeyEmpty`).
    assert!(!entry.key.is_empty(), "an empty key would end the key journal (offset {})", entry.offset);
    let start = buf.len();
    let key_len = u16::try_from(entry.key.len()).expect("key size was validated against KEY_SIZE_MAX");
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&key_len.to_le_bytes());
    buf.extend_from_slice(&[0; 2]);
    buf.extend_from_slice(&entry.timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&entry.offset.to_le_bytes());
    buf.extend_from_slice(&entry.key);
    buf.resize(start + (ENTRY_HEADER + entry.key.len()).div_ceil(8) * 8, 0);
    let crc = crc32fast::hash(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

fn decode_entry(bytes: &Bytes, pos: usize) -> Option<(KeyEntry, usize)> {
    let head = bytes.get(pos..pos + ENTRY_HEADER)?;
    let key_len = u16::from_le_bytes(head[4..6].try_into().expect("2 bytes")) as usize;
    if key_len == 0 {
        return None;
    }
    let end = pos + (ENTRY_HEADER + key_len).div_ceil(8) * 8;
    let whole = bytes.get(pos..end)?;
    let crc = u32::from_le_bytes(whole[0..4].try_into().expect("4 bytes"));
    if crc32fast::hash(&whole[4..]) != crc {
        return None;
    }
    let entry = KeyEntry {
        key: bytes.slice(pos + ENTRY_HEADER..pos + ENTRY_HEADER + key_len),
        timestamp_ms: u64::from_le_bytes(whole[8..16].try_into().expect("8 bytes")),
        offset: u64::from_le_bytes(whole[16..24].try_into().expect("8 bytes")),
    };
    Some((entry, end))
}
