//! What [`Log::open`](crate::Log::open) does to a directory.
//!
//! 1. Create the directory if needed (and sync its parent); remove leftover
//!    `*.tmp` files of interrupted compactions and the spare segment file.
//! 2. Open every segment and validate its header. One whose header is still
//!    the spare's (a roll whose header never reached the disk) is removed.
//!    A segment with a bad header
//!    is renamed `*.corrupt` and its offsets are quarantined (a newer format
//!    version is refused instead, so nothing is destroyed). Where the offsets
//!    of a set-aside *last* segment end is unknown: step 5 bounds them.
//! 3. Read the checkpoint. Segments before the checkpoint's segment, and the
//!    records of that segment before the checkpoint, are trusted and not
//!    read at all (their indexes are built on the first read by offset).
//!    After a clean close nothing at all is scanned.
//! 4. Scan from the checkpoint to the end, validating every record (length,
//!    CRC, offset). At an invalid record, search forward for the next valid
//!    one: if found, quarantine the range in between (corruption in the
//!    middle); if not, it is the torn tail: zero it and sync. How far the
//!    search and the zeroing reach depends on what survived the crash
//!    ([`Tail`]).
//! 5. Keep offsets unique: the log never ends below an offset known to have
//!    been durable. A shortfall is quarantined, and a new segment starts past
//!    it.
//! 6. Sync every scanned segment, and the directory when the scan covered a
//!    segment rolled after the checkpoint, so the new checkpoint can vouch
//!    for them.
//! 7. Ack state: the journal replayed, the floor raised to the first segment,
//!    the gaps quarantined, and acks at or above the recovered end dropped
//!    (their records were lost) with the journal rewritten without them.
//! 8. Recover the idempotency keys: the key journal up to the checkpoint's
//!    length, plus the keys of the scanned records, within the window.
//! 9. Journal the scanned keys and write a new checkpoint at the end (never a
//!    clean one: this process is about to append past it), so the next open
//!    scans from there.

use std::{fs, path::Path, sync::Arc};

use crate::{
    acks::{AckJournal, AckKind, AckState},
    checkpoint::{Checkpoint, Point},
    error::{OpenError, io_open},
    file::Io,
    keys::{self, KeyEntry, KeyJournal},
    limits::{RECORD_ALIGN, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE},
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

/// What the scan may assume about the bytes past the first invalid record
/// of a segment, that is, about what the crash left there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// The kernel that ran the writer is still running (the checkpoint
    /// carries this boot's tag), so its page cache kept every write made
    /// since the checkpoint: the files hold exactly what was written. A write
    /// of a killed process stops at a page boundary, so each write left a
    /// prefix of itself, and past the last one the segment holds zeros
    /// (segment contract 4). The search and the zeroing stop where the
    /// writes stopped.
    Intact,
    /// After a reboot, or without a usable checkpoint: any subset of the
    /// unsynced pages may have reached the disk, in any order, so a valid
    /// record may follow lost ones and stale bytes may lie anywhere up to
    /// the end of the segment. The whole rest of the segment is searched and
    /// zeroed.
    Unknown,
}

/// `trusted_end`: `None` at open. `Some(end)` when a poisoned log is
/// reopened (`Log::reopen`): only the records below `end` were synced
/// successfully. A failed fsync may have left later pages marked clean in
/// the page cache without reaching the disk, so the bytes of those records
/// prove nothing (post-fsyncgate): they are cut as a torn tail, zeroed and
/// synced, and segments past `end` are removed. Their appends were never
/// acknowledged, so their offsets are reused.
pub(crate) fn recover(
    shared_dir: &Arc<Path>,
    options: &LogOptions,
    io: &Io,
    trusted_end: Option<u64>,
) -> Result<Recovered, OpenError> {
    let dir: &Path = shared_dir;
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
        } else if name.ends_with(".tmp") || name == segment::SPARE_FILE_NAME {
            // A spare is never trusted across an open: it may be unused, or
            // hold a roll whose rename never reached the disk (records
            // never acknowledged, since their commit waits for the
            // directory sync). The flusher prepares a fresh one when needed.
            fs::remove_file(entry.path()).map_err(io_open(entry.path()))?;
        }
    }
    bases.sort_unstable();
    if let Some(end) = trusted_end {
        let untrusted: Vec<u64> = bases.iter().copied().filter(|&base| base > end).collect();
        for base in &untrusted {
            let path = dir.join(segment::file_name(*base));
            tracing::warn!(path = %path.display(), "removing a segment written after the last successful sync");
            fs::remove_file(&path).map_err(io_open(&path))?;
        }
        if !untrusted.is_empty() {
            io.sync_dir(dir).map_err(io_open(dir))?;
        }
        bases.retain(|&base| base <= end);
    }
    let stop_at = trusted_end.unwrap_or(u64::MAX);

    let (mut checkpoint, recorded) =
        Checkpoint::open(io, Arc::clone(shared_dir)).map_err(io_open(dir.join("checkpoint")))?;
    let checkpoint_point = recorded.map(|r| r.point);
    let (mut ack_journal, mut ack_state) =
        AckJournal::open(io, Arc::clone(shared_dir)).map_err(io_open(dir.join("acks")))?;
    let mut gaps: Vec<(u64, u64)> = Vec::new();

    // Step 2: open segments; set aside those whose header is unreadable.
    let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
    let mut lost_tail_base = None;
    for (i, &base) in bases.iter().enumerate() {
        let path = dir.join(segment::file_name(base));
        match Segment::open(io, &path, base) {
            Ok(s) => segments.push(Arc::new(s)),
            Err(OpenError::NotALog { .. }) if Segment::has_spare_header(&path) => {
                // A roll renamed the spare, but its own header never reached
                // the disk: the group commit that syncs it comes before any
                // record in it is acknowledged, checkpointed or acked, so it
                // holds nothing anyone was told is durable. Removed; a later
                // segment (never acknowledged either) keeps its records past
                // a quarantined gap, as after a set-aside one.
                tracing::warn!(path = %path.display(), "removing a segment rolled from the spare whose header never reached the disk");
                fs::remove_file(&path).map_err(io_open(&path))?;
                if let Some(&next) = bases.get(i + 1) {
                    gaps.push((base, next));
                }
            }
            Err(OpenError::NotALog { reason, .. }) => {
                let aside = path.with_extension("corrupt");
                tracing::error!(path = %path.display(), %reason, "segment header invalid; renamed to .corrupt");
                fs::rename(&path, &aside).map_err(io_open(&path))?;
                io.sync_dir(dir).map_err(io_open(dir))?;
                match bases.get(i + 1) {
                    Some(&next) => gaps.push((base, next)),
                    None => lost_tail_base = Some(base),
                }
            }
            Err(e) => return Err(e),
        }
    }

    // Offsets below `durable_end` were on stable storage at some point, so
    // they may have been delivered and acked: they are never handed out
    // again (step 5).
    // - The checkpoint's `next_offset`. Under every sync policy the flusher
    //   writes a checkpoint only after syncing every segment written before
    //   its point (`Shared::flush_once` runs first in the same cycle), and
    //   recovery syncs what it scanned before writing its own (step 6). So a
    //   scan ending below it met destroyed data (a lost or set-aside
    //   segment), not a torn tail. When the checkpoint is usable the scan
    //   starts there, so this bounds only the full-scan fallback.
    // - For a set-aside last segment: its base (it was created for a record
    //   with that offset) and the end of the ack state (acks are journaled
    //   only for synced records). Otherwise acks above the scanned end are
    //   dropped instead (step 7): the scan ended at a torn tail, whose records
    //   were never synced, so such acks were journaled before their records
    //   by an older build.
    let mut durable_end = checkpoint_point.map_or(0, |p| p.next_offset);
    if let Some(base) = lost_tail_base {
        durable_end = durable_end.max(base).max(ack_state.end());
    }

    // Steps 3 and 4: scan from the checkpoint.
    let start = checkpoint_point.and_then(|p| {
        let at = segments.iter().position(|s| s.base_offset == p.segment_base)?;
        let valid = p.position >= SEGMENT_HEADER_SIZE
            && p.position <= segments[at].allocated()
            && p.position % RECORD_ALIGN == 0;
        valid.then_some((at, p.position, p.next_offset))
    });
    let same_boot = recorded.is_some_and(|r| r.boot_tag != 0 && r.boot_tag == checkpoint.boot_tag());
    let clean = trusted_end.is_none()
        && recorded.is_some_and(|r| r.clean)
        && lost_tail_base.is_none()
        && start.is_some_and(|(at, _, _)| at + 1 == segments.len());
    let mut scanned_keys = Vec::new();
    // The first segment the scan covered, and the offset after the last
    // valid record.
    let (scanned_from, scanned_end) = match (start, segments.first()) {
        (Some((at, pos, offset)), _) if clean => {
            // A clean close left nothing past the checkpoint. The segment's
            // index is built on its first read by offset.
            segments[at].set_written(pos);
            if pos > SEGMENT_HEADER_SIZE {
                segments[at].ensure_mapped(io).map_err(io_open(&segments[at].path))?;
            }
            (None, offset)
        }
        (Some((at, pos, offset)), _) => {
            // After a failed sync the page cache proves nothing: search
            // and zero the whole tail.
            let tail = if same_boot && trusted_end.is_none() { Tail::Intact } else { Tail::Unknown };
            let end = scan(io, &segments[at..], (pos, offset), stop_at, tail, &mut gaps, &mut scanned_keys)?;
            (Some(at), end)
        }
        (None, Some(first)) => {
            let first_offset = first.base_offset;
            let start = (SEGMENT_HEADER_SIZE, first_offset);
            let end = scan(io, &segments, start, stop_at, Tail::Unknown, &mut gaps, &mut scanned_keys)?;
            (Some(0), end)
        }
        (None, None) => {
            // Nothing to scan: a fresh segment holds no record.
            let base = durable_end.max(ack_state.floor());
            if let Some(lost) = lost_tail_base.filter(|&lost| lost < base) {
                gaps.push((lost, base));
            }
            let s = Segment::create(io, dir, base, options.segment_size, SEGMENT_HEADER_SIZE)
                .map_err(io_open(dir.join(segment::file_name(base))))?;
            io.sync_dir(dir).map_err(io_open(dir))?;
            segments.push(Arc::new(s));
            (None, base)
        }
    };

    // Step 5: never end below an offset that was durable. Records in a
    // segment are contiguous from its base, so the log continues in a new
    // segment past the lost range.
    let mut next_offset = scanned_end;
    if durable_end > next_offset {
        tracing::error!(
            dir = %dir.display(),
            first_offset = next_offset,
            last_offset = durable_end - 1,
            "records lost at the end of the log (a set-aside or missing segment); quarantined, offsets not reused"
        );
        gaps.push((next_offset, durable_end));
        let s = Segment::create(io, dir, durable_end, options.segment_size, SEGMENT_HEADER_SIZE)
            .map_err(io_open(dir.join(segment::file_name(durable_end))))?;
        io.sync_dir(dir).map_err(io_open(dir))?;
        segments.push(Arc::new(s));
        next_offset = durable_end;
    }
    let active = segments.last().expect("at least one segment").clone();

    // Step 6: records the scan found may be only in the page cache (a crash
    // of the process, not of the kernel). The new checkpoint, and any ack of
    // them, must not be durable before they are.
    if let Some(from) = scanned_from {
        for segment in &segments[from..] {
            segment.sync(io).map_err(io_open(&segment.path))?;
        }
        // A segment after the checkpoint's may have been rolled by an
        // append whose directory sync never ran (it folds into the group
        // commit): its name must be durable before the checkpoint below
        // points into it. Before the checkpoint's segment the cycle that
        // wrote the checkpoint synced the directory already.
        if segments.len() > from + 1 || start.is_none() {
            io.sync_dir(dir).map_err(io_open(dir))?;
        }
    }

    // Sealed segments are never written again (a reopen's rewrite opens
    // them anew): they are mapped now (reads of them cannot fail later),
    // and their maps serve reads without a descriptor. The active segment
    // is mapped if it holds records; an empty one when first written.
    for segment in &segments[..segments.len() - 1] {
        segment.ensure_mapped(io).map_err(io_open(&segment.path))?;
        segment.release_descriptor();
    }

    // Step 7: ack state. Gaps first, so that those below the first segment
    // (a set-aside first segment) count as quarantined; then everything
    // below the first segment is done (retention removed it).
    let mut quarantined = 0;
    for &(first, end) in &gaps {
        let count = end - first;
        if ack_state.mark(first, count) > 0 {
            ack_journal.record(first, count, AckKind::Quarantined);
            quarantined += count;
        }
    }
    ack_state.raise_floor(segments[0].base_offset);
    if ack_state.truncate(next_offset) {
        tracing::warn!(
            dir = %dir.display(),
            next_offset,
            "acks of records lost in a crash dropped; the ack journal is rewritten without them"
        );
        // The rewrite holds the quarantined gaps too, and replaces every
        // entry that could bring the dropped acks back.
        ack_journal.compact(io, &ack_state, next_offset).map_err(io_open(dir.join("acks")))?;
    } else {
        ack_journal.flush(io, next_offset).map_err(io_open(dir.join("acks")))?;
        // Syncs whenever the journal was written, or replayed as a crash
        // left it (`AckJournal::open`).
        ack_journal.sync(io).map_err(io_open(dir.join("acks")))?;
    }

    // Step 8: keys.
    let cutoff = now_ms().saturating_sub(options.dedupe_window_ms);
    let synced_keys_len = checkpoint_point.map(|p| p.keys_len);
    let (mut key_journal, mut keys) =
        KeyJournal::open(io, Arc::clone(shared_dir), synced_keys_len, cutoff).map_err(io_open(dir.join("keys")))?;
    keys.extend(scanned_keys.iter().filter(|k| k.timestamp_ms >= cutoff).cloned());
    let mut keys = keys::newest_unique(keys, options.dedupe_keys_max as usize);
    keys::pack(&mut keys);

    // Step 9: make the recovered state the new checkpoint.
    let keys_len = key_journal.append(io, &scanned_keys).map_err(io_open(dir.join("keys")))?;
    let point = Point { segment_base: active.base_offset, position: active.written(), next_offset, keys_len };
    checkpoint.write(io, point, false).map_err(io_open(dir.join("checkpoint")))?;
    // The scan's pages leave the resident set (the page cache keeps them).
    for segment in &segments {
        segment.release_pages();
    }

    Ok(Recovered { segments, point, ack_state, ack_journal, checkpoint, key_journal, keys, quarantined })
}

/// Step 4: validates the records of `segments` from `start_pos` in the first
/// one (where `start_offset` is expected) to the end of the last, indexes
/// them, collects their keys, records corrupt ranges in `gaps`, and zeroes
/// the torn tail of the last segment. Records from `stop_at` on are a torn
/// tail whatever their bytes (see `trusted_end` in [`recover`]). Returns
/// the offset after the last valid record.
fn scan(
    io: &Io,
    segments: &[Arc<Segment>],
    (start_pos, start_offset): (u64, u64),
    stop_at: u64,
    tail: Tail,
    gaps: &mut Vec<(u64, u64)>,
    scanned_keys: &mut Vec<KeyEntry>,
) -> Result<u64, OpenError> {
    let mut pos = start_pos;
    let mut expected = start_offset;
    // The records before the start were validated before the checkpoint:
    // they are indexed on the first read below it, not here (the scan
    // costs what follows the checkpoint, not the segment).
    segments[0].set_unindexed_below(start_offset);
    for (at, segment) in segments.iter().enumerate() {
        let next_base = segments.get(at + 1).map(|s| s.base_offset);
        let limit = next_base.unwrap_or(u64::MAX);
        if at > 0 {
            pos = SEGMENT_HEADER_SIZE;
            if expected < segment.base_offset {
                gaps.push((expected, segment.base_offset));
            }
            expected = segment.base_offset;
        }
        segment.ensure_mapped(io).map_err(io_open(&segment.path))?;
        let raw = segment.raw_from(0);
        while expected < limit && expected < stop_at {
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
                Err(invalid) => {
                    // Past `written_end` the segment holds only zeros.
                    let written_end = match tail {
                        Tail::Intact => intact_end(raw, pos, invalid),
                        Tail::Unknown => segment.allocated(),
                    };
                    match segment::resync(raw, pos, written_end, expected, limit.min(stop_at)) {
                        Some((found_pos, found_offset)) => {
                            report(segment, pos, expected, found_offset, invalid);
                            gaps.push((expected, found_offset));
                            segment.index_resync_point(found_offset, found_pos);
                            pos = found_pos;
                            expected = found_offset;
                        }
                        None if next_base.is_some() => break,
                        None => {
                            let zeroed = segment.zero_range(io, pos, written_end).map_err(io_open(&segment.path))?;
                            if invalid != Invalid::Zero || zeroed {
                                tracing::warn!(
                                    segment = %segment.path.display(),
                                    position = pos,
                                    next_offset = expected,
                                    "cutting a torn tail (unsynced writes of a crash)"
                                );
                            }
                            break;
                        }
                    }
                }
            }
        }
        if expected == stop_at && next_base.is_none() {
            // Cut at the trusted end: every byte past it goes, so that
            // nothing unsynced can pass for a record later (contract 4).
            let zeroed = segment.zero_range(io, pos, segment.allocated()).map_err(io_open(&segment.path))?;
            if zeroed {
                tracing::warn!(
                    segment = %segment.path.display(),
                    position = pos,
                    next_offset = expected,
                    "cut the records written after the last successful sync"
                );
            }
        }
        segment.set_written(pos);
        segment.set_index_complete();
    }
    Ok(expected)
}

/// Under [`Tail::Intact`], where the bytes of a segment may stop being zero
/// past `pos`, the first invalid record. A killed write stops at a page
/// boundary and a record's 4-byte length field (8-aligned) never straddles
/// one, so either the length reads zero and nothing from `pos` on was
/// written, or it is the length the writer wrote and nothing past that one
/// record was (the record after it is still searched, in case the record at
/// `pos` is corrupt rather than torn). A length no writer could have written
/// gives no bound: the whole rest of the segment then.
fn intact_end(raw: &[u8], pos: u64, invalid: Invalid) -> u64 {
    let size = raw.len() as u64;
    if invalid == Invalid::Zero {
        return pos;
    }
    let Some(len) = raw.get(pos as usize..pos as usize + 4) else {
        return size;
    };
    let len = u64::from(u32::from_le_bytes(len.try_into().expect("4 bytes")));
    let end = pos + record::padded(len);
    if len >= u64::from(RECORD_HEADER_SIZE) && end <= size { end } else { size }
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

#[cfg(test)]
mod tests;
