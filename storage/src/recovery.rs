//! What [`Log::open`](crate::Log::open) does to a directory.
//!
//! 1. Create the directory if needed (and sync its parent); remove leftover
//!    `*.tmp` files of interrupted compactions.
//! 2. Open every segment and validate its header. A segment with a bad header
//!    is renamed `*.corrupt` and its offsets are quarantined (a newer format
//!    version is refused instead, so nothing is destroyed).
//! 3. Read the checkpoint. Segments before the checkpoint's segment are
//!    trusted and not scanned (their indexes are built on first read).
//! 4. Scan from the checkpoint to the end, validating every record (length,
//!    CRC, offset). At an invalid record, search forward for the next valid
//!    one: if found, quarantine the range in between (corruption in the
//!    middle); if not, it is the torn tail: zero it and sync.
//! 5. Replay the ack journal, raising the floor to the first segment; record
//!    quarantined ranges in it.
//! 6. Recover the idempotency keys: the key journal up to the checkpoint's
//!    length, plus the keys of the scanned records, within the window.
//! 7. Sync the last segment, journal the scanned keys and write a new
//!    checkpoint at the end, so the next clean open scans nothing.

use std::{fs, path::Path, sync::Arc};

use crate::{
    acks::{AckJournal, AckKind, AckState},
    checkpoint::{Checkpoint, Point},
    error::{OpenError, io_open},
    file::Io,
    keys::{self, KeyEntry, KeyJournal},
    limits::{RECORD_ALIGN, SEGMENT_HEADER_SIZE},
    log::now_ms,
    options::LogOptions,
    record::{self, Invalid},
    segment::{self, Segment},
};

pub(crate) struct Recovered {
    pub segments: Vec<Arc<Segment>>,
    /// The end of the log: active segment, write position, next offset.
    pub point: Point,
    pub ack_state: AckState,
    pub ack_journal: AckJournal,
    pub checkpoint: Checkpoint,
    pub key_journal: KeyJournal,
    pub keys: Vec<KeyEntry>,
    pub quarantined: u64,
}

pub(crate) fn recover(dir: &Path, options: &LogOptions, io: &Io) -> Result<Recovered, OpenError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io_open(dir))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            io.sync_dir(parent).map_err(io_open(parent))?;
        }
    }
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_open(dir))? {
        let entry = entry.map_err(io_open(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = segment::parse_file_name(name) {
            bases.push(base);
        } else if name.ends_with(".tmp") {
            fs::remove_file(entry.path()).map_err(io_open(entry.path()))?;
        }
    }
    bases.sort_unstable();

    let (mut checkpoint, checkpoint_point) = Checkpoint::open(io, dir).map_err(io_open(dir.join("checkpoint")))?;
    let (mut ack_journal, mut ack_state) = AckJournal::open(io, dir).map_err(io_open(dir.join("acks")))?;
    let mut gaps: Vec<(u64, u64)> = Vec::new();

    // Step 2: open segments; set aside those whose header is unreadable.
    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
    for (i, &base) in bases.iter().enumerate() {
        let path = dir.join(segment::file_name(base));
        match Segment::open(&path, base) {
            Ok(s) => segments.push(Arc::new(s)),
            Err(OpenError::NotALog { reason, .. }) => {
                let aside = path.with_extension("corrupt");
                tracing::error!(path = %path.display(), %reason, "segment header invalid; renamed to .corrupt");
                fs::rename(&path, &aside).map_err(io_open(&path))?;
                io.sync_dir(dir).map_err(io_open(dir))?;
                if let Some(&next) = bases.get(i + 1) {
                    gaps.push((base, next));
                }
            }
            Err(e) => return Err(e),
        }
    }

    // Step 3 and 4: scan from the checkpoint.
    let start = checkpoint_point.and_then(|p| {
        let at = segments.iter().position(|s| s.base_offset == p.segment_base)?;
        let valid =
            p.position >= SEGMENT_HEADER_SIZE && p.position <= segments[at].size() && p.position % RECORD_ALIGN == 0;
        valid.then_some((at, p.position, p.next_offset))
    });
    let (start_at, start_pos, start_offset) = match (start, segments.first()) {
        (Some(s), _) => s,
        (None, Some(first)) => (0, SEGMENT_HEADER_SIZE, first.base_offset),
        (None, None) => {
            let base = checkpoint_point.map_or(0, |p| p.next_offset).max(ack_state.floor());
            let s = Segment::create(io, dir, base, options.segment_size)
                .map_err(io_open(dir.join(segment::file_name(base))))?;
            io.sync_dir(dir).map_err(io_open(dir))?;
            segments.push(Arc::new(s));
            (0, SEGMENT_HEADER_SIZE, base)
        }
    };
    let mut scanned_keys = Vec::new();
    let mut pos = start_pos;
    let mut expected = start_offset;
    index_trusted_prefix(&segments[start_at], start_pos, start_offset);
    for at in start_at..segments.len() {
        let segment = &segments[at];
        let next_base = segments.get(at + 1).map(|s| s.base_offset);
        let limit = next_base.unwrap_or(u64::MAX);
        if at > start_at {
            pos = SEGMENT_HEADER_SIZE;
            if expected < segment.base_offset {
                gaps.push((expected, segment.base_offset));
            }
            expected = segment.base_offset;
        }
        let raw = segment.raw_from(0);
        while expected < limit {
            let buf = &raw[pos as usize..];
            match record::check(buf, expected) {
                Ok(header) => {
                    segment.note_record(expected, pos);
                    if let Some((key, timestamp_ms)) = record::key_of(&buf[..header.len as usize]) {
                        scanned_keys.push(KeyEntry {
                            key: bytes::Bytes::copy_from_slice(key),
                            offset: expected,
                            timestamp_ms,
                        });
                    }
                    pos += record::padded(u64::from(header.len));
                    expected += 1;
                }
                Err(invalid) => match segment::resync(raw, pos, expected, limit) {
                    Some((found_pos, found_offset)) => {
                        report(segment, pos, expected, found_offset, invalid);
                        gaps.push((expected, found_offset));
                        segment.index_resync_point(found_offset, found_pos);
                        pos = found_pos;
                        expected = found_offset;
                    }
                    None if next_base.is_some() => break,
                    None => {
                        if invalid != Invalid::Zero || raw[pos as usize..].iter().any(|&b| b != 0) {
                            tracing::warn!(
                                segment = %segment.path.display(),
                                position = pos,
                                next_offset = expected,
                                "cutting a torn tail (unsynced writes of a crash)"
                            );
                        }
                        segment.zero_range(io, pos, segment.size()).map_err(io_open(&segment.path))?;
                        break;
                    }
                },
            }
        }
        segment.set_written(pos);
        segment.set_index_complete();
    }
    let active = segments.last().expect("at least one segment").clone();
    let next_offset = expected;

    // Step 5: ack state.
    ack_state.raise_floor(segments[0].base_offset);
    let mut quarantined = 0;
    for &(first, end) in &gaps {
        let count = end - first;
        if ack_state.mark(first, count) > 0 {
            ack_journal.record(first, count, AckKind::Quarantined);
            quarantined += count;
        }
    }
    ack_journal.flush(io).map_err(io_open(dir.join("acks")))?;
    ack_journal.sync(io).map_err(io_open(dir.join("acks")))?;

    // Step 6: keys.
    let cutoff = now_ms().saturating_sub(options.dedupe_window_ms);
    let synced_keys_len = checkpoint_point.map(|p| p.keys_len);
    let (mut key_journal, mut keys) =
        KeyJournal::open(io, dir, synced_keys_len, cutoff).map_err(io_open(dir.join("keys")))?;
    keys.extend(scanned_keys.iter().filter(|k| k.timestamp_ms >= cutoff).cloned());
    let keys = keys::newest_unique(keys, options.dedupe_keys_max as usize);

    // Step 7: make the recovered state the new checkpoint.
    active.sync(io).map_err(io_open(&active.path))?;
    let keys_len = key_journal.append(io, &scanned_keys).map_err(io_open(dir.join("keys")))?;
    let point = Point { segment_base: active.base_offset, position: active.written(), next_offset, keys_len };
    checkpoint.write(io, point).map_err(io_open(dir.join("checkpoint")))?;

    Ok(Recovered { segments, point, ack_state, ack_journal, checkpoint, key_journal, keys, quarantined })
}

/// Indexes the part of the checkpoint's segment before the checkpoint by
/// hopping over headers (trusted: it was synced and validated before).
fn index_trusted_prefix(segment: &Segment, end_pos: u64, end_offset: u64) {
    let raw = segment.raw_from(0);
    let mut pos = SEGMENT_HEADER_SIZE;
    let mut offset = segment.base_offset;
    while pos < end_pos && offset < end_offset {
        let Ok(header) = record::peek(&raw[pos as usize..]) else {
            break;
        };
        if header.offset != offset {
            break;
        }
        segment.note_record(offset, pos);
        pos += record::padded(u64::from(header.len));
        offset += 1;
    }
}

fn report(segment: &Segment, pos: u64, first: u64, resume: u64, invalid: Invalid) {
    tracing::error!(
        segment = %segment.path.display(),
        position = pos,
        first_offset = first,
        last_offset = resume - 1,
        reason = invalid.describe(),
        "corrupt records found during recovery; quarantined, never delivered"
    );
}
