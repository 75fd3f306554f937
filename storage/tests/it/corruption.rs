//! Torn tails and corrupted bytes: no corrupt record is ever returned, and
//! every intact one still is.

use std::path::{Path, PathBuf};

use ballast_storage::{AckKind, Log, ReadError};

use crate::support::*;

/// Copies every regular file of a log directory (a "disk image").
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        // A file removed by retention meanwhile is simply not in the image,
        // as if the crash happened after the removal.
        if entry.file_type().unwrap().is_file()
            && let Err(e) = std::fs::copy(entry.path(), to.join(entry.file_name()))
        {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "copying {:?}: {e}", entry.path());
        }
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Positions of the records in a segment file: `(offset, start, len)`.
/// Parsed independently of the engine, from an intact file.
fn record_spans(bytes: &[u8]) -> Vec<(u64, usize, usize)> {
    let mut spans = Vec::new();
    let mut pos = 64;
    while pos + 40 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        let offset = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
        spans.push((offset, pos, len));
        pos += len.div_ceil(8) * 8;
    }
    spans
}

/// Builds a closed log of `count` records and returns its directory.
fn build_log(count: u64, size: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    append_all(&log, 0, count, size);
    log.close().unwrap();
    dir
}

/// Cutting the last record at every byte boundary (the rest reads as
/// unwritten zeros, as after a crash mid-write) loses exactly that record,
/// keeps every earlier one, and the log accepts appends again.
#[test]
fn torn_last_record_at_every_byte() {
    let original = build_log(20, 60);
    let segment = segment_files(original.path()).pop().unwrap();
    let bytes = std::fs::read(&segment).unwrap();
    let &(last_offset, start, len) = record_spans(&bytes).last().unwrap();
    assert_eq!(last_offset, 19);
    for cut in 0..=len {
        let image = tempfile::tempdir().unwrap();
        copy_dir(original.path(), image.path());
        let mut torn = bytes.clone();
        torn[start + cut..start + len].fill(0);
        std::fs::write(image.path().join(segment.file_name().unwrap()), &torn).unwrap();
        // Without a checkpoint, recovery scans everything, as after a crash
        // before the first checkpoint.
        std::fs::remove_file(image.path().join("checkpoint")).unwrap();

        let log = Log::open(image.path(), small_options()).unwrap();
        let expected_next = if cut == len { 20 } else { 19 };
        assert_eq!(log.next_offset(), expected_next, "cut at byte {cut} of {len}");
        for offset in 0..expected_next {
            assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset, "cut {cut}");
        }
        assert_eq!(log.stats().quarantined, 0, "a torn tail is not corruption (cut {cut})");
        append_all(&log, 100, 1, 60);
        assert_eq!(payload_index(&log.read(expected_next).unwrap().payload), 100);
        log.close().unwrap();
        let log = Log::open(image.path(), small_options()).unwrap();
        assert_eq!(log.next_offset(), expected_next + 1, "the repaired log reopens intact (cut {cut})");
    }
}

/// A torn tail of garbage (not zeros) is also cut off.
#[test]
fn torn_tail_of_garbage_is_cut() {
    let original = build_log(20, 60);
    let segment = segment_files(original.path()).pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let &(_, start, len) = record_spans(&bytes).last().unwrap();
    for (i, b) in bytes[start + len / 2..start + len + 100].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    std::fs::write(&segment, &bytes).unwrap();
    std::fs::remove_file(original.path().join("checkpoint")).unwrap();
    let log = Log::open(original.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 19);
    append_all(&log, 19, 1, 60);
    log.close().unwrap();
    assert_eq!(Log::open(original.path(), small_options()).unwrap().next_offset(), 20);
}

/// Random bit flips in random segments, with and without a checkpoint
/// (lazily detected on read, or found by the recovery scan): every read and
/// every cursor step returns either the original record or an error, and
/// every record whose bytes were not touched is still returned.
#[test]
fn random_bit_flips_never_return_corrupt_data() {
    let original = build_log(1500, 203);
    let segments = segment_files(original.path());
    let images: Vec<Vec<u8>> = segments.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let seed = seed_from_env();
    println!("bit-flip seed {seed} (replay with BALLAST_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    for round in 0..24 {
        let image = tempfile::tempdir().unwrap();
        copy_dir(original.path(), image.path());
        if round % 2 == 1 {
            std::fs::remove_file(image.path().join("checkpoint")).unwrap();
        }
        let mut touched: Vec<(usize, usize)> = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let file = rng.below(segments.len() as u64) as usize;
            let spans = record_spans(&images[file]);
            let last_end = spans.last().map_or(64, |&(_, s, l)| s + l);
            // Flip inside written data (flips in unwritten zeros are benign
            // and flips of the segment header are covered elsewhere).
            let at = 64 + rng.below((last_end - 64) as u64) as usize;
            let path = image.path().join(segments[file].file_name().unwrap());
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[at] ^= 1 << rng.below(8);
            std::fs::write(&path, &bytes).unwrap();
            touched.push((file, at));
        }
        let damaged: Vec<u64> = touched
            .iter()
            .flat_map(|&(file, at)| {
                record_spans(&images[file]).into_iter().filter(move |&(_, s, l)| at >= s && at < s + l)
            })
            .map(|(o, _, _)| o)
            .collect();
        let log = Log::open(image.path(), small_options()).unwrap();
        // Without a checkpoint, damage in the last record is a torn tail to
        // recovery: it is cut, never returned. Only damaged records may go.
        let end = log.next_offset();
        assert!(
            (end..1500).all(|o| damaged.contains(&o)),
            "round {round}: recovery cut the log at {end}, past intact records (flips {touched:?}, damaged {damaged:?})"
        );
        for offset in 0..1500 {
            match log.read(offset) {
                Ok(r) => assert_eq!(payload_index(&r.payload), offset, "round {round}: wrong data at {offset}"),
                Err(ReadError::NotWritten { .. }) if offset >= end => {}
                Err(ReadError::Corrupt { .. }) => {
                    assert!(
                        damaged.contains(&offset),
                        "round {round}: intact record {offset} reported corrupt (flips {touched:?})"
                    )
                }
                Err(e) => panic!("round {round}: unexpected error at {offset}: {e}"),
            }
        }
        let mut cursor = log.cursor(0);
        let mut seen = Vec::new();
        while let Some(item) = cursor.next() {
            if let Ok(r) = item {
                assert_eq!(payload_index(&r.payload), r.offset);
                seen.push(r.offset);
            }
        }
        let intact: Vec<u64> = (0..1500).filter(|o| !damaged.contains(o)).collect();
        assert_eq!(seen, intact, "round {round}: the cursor must yield exactly the intact records");
        assert!(log.stats().quarantined >= 1 || damaged.is_empty(), "round {round}: corruption was quarantined");
        // Every damaged record is quarantined now: the pending bytes are the
        // intact records' (all 203-byte payloads), also after a reopen that
        // has to hop over the damage again.
        let stored = record(0, 203).stored_size();
        let expected = intact.len() as u64 * stored;
        assert_eq!(log.pending_bytes().unwrap(), expected, "round {round}: pending bytes (flips {touched:?})");
        log.close().unwrap();
        let log = Log::open(image.path(), small_options()).unwrap();
        assert_eq!(log.pending_bytes().unwrap(), expected, "round {round}: pending bytes after a reopen");
    }
}

/// Damage not yet found (no read has quarantined it) never makes
/// `pending_bytes` panic: it counts the bytes or reports the corruption.
#[test]
fn pending_bytes_over_unfound_damage_never_panics() {
    let original = build_log(1500, 203);
    let segments = segment_files(original.path());
    let seed = seed_from_env();
    let mut rng = Rng(seed);
    for round in 0..24 {
        let image = tempfile::tempdir().unwrap();
        copy_dir(original.path(), image.path());
        let file = rng.below(segments.len() as u64) as usize;
        let path = image.path().join(segments[file].file_name().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        let last_end = record_spans(&bytes).last().map_or(64, |&(_, s, l)| s + l);
        let at = 64 + rng.below((last_end - 64) as u64) as usize;
        bytes[at] ^= 1 << rng.below(8);
        std::fs::write(&path, &bytes).unwrap();
        let log = Log::open(image.path(), small_options()).unwrap();
        log.ack(100, 50, AckKind::Acked).unwrap().wait().unwrap();
        match log.pending_bytes() {
            Ok(bytes) => assert!(bytes <= 1450 * record(0, 203).stored_size() + 8, "round {round} (seed {seed})"),
            Err(ReadError::Corrupt { .. }) => {}
            Err(e) => panic!("round {round}: unexpected error {e}"),
        }
    }
}

/// A segment whose header is destroyed is set aside and its offsets are
/// quarantined; the other segments keep serving.
#[test]
fn corrupt_segment_header_is_quarantined() {
    let original = build_log(1500, 203);
    let segments = segment_files(original.path());
    assert!(segments.len() >= 3);
    let victim = &segments[1];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[0..8].copy_from_slice(b"garbage!");
    std::fs::write(victim, &bytes).unwrap();
    let log = Log::open(original.path(), small_options()).unwrap();
    let first_victim = record_spans(&std::fs::read(&segments[0]).unwrap()).last().unwrap().0 + 1;
    let mut cursor = log.cursor(0);
    let seen: Vec<u64> = std::iter::from_fn(|| cursor.next()).filter_map(Result::ok).map(|r| r.offset).collect();
    assert!(seen.contains(&0) && seen.contains(&1499));
    assert!(!seen.contains(&first_victim), "records of the corrupt segment are never delivered");
    assert!(log.stats().quarantined > 0);
    assert!(original.path().join(victim.with_extension("corrupt").file_name().unwrap()).exists());
}

/// The offsets a cursor from 0 delivers.
fn delivered(log: &Log) -> Vec<u64> {
    let mut cursor = log.cursor(0);
    std::iter::from_fn(|| cursor.next()).filter_map(Result::ok).map(|r| r.offset).collect()
}

fn base_of(segment: &Path) -> u64 {
    segment.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

/// A power loss after an ack reached the disk but the record it acked did
/// not (which older builds allowed, §9 of docs/storage-format.md): recovery
/// drops the ack with the record, so the records later appended at the
/// reused offsets are not done; they are read back and delivered, also
/// after a reopen.
#[test]
fn acks_above_the_recovered_end_are_dropped() {
    let dir = build_log(20, 60);
    let log = Log::open(dir.path(), small_options()).unwrap();
    // The disk as the open left it: records 0..20, synced and checkpointed.
    let durable = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), durable.path());
    append_all(&log, 20, 10, 60);
    log.ack(15, 15, AckKind::Acked).unwrap().wait().unwrap();
    log.close().unwrap();
    // After the power loss: the ack journal reached the disk, records 20..30
    // (and every checkpoint after them) did not.
    let image = tempfile::tempdir().unwrap();
    copy_dir(durable.path(), image.path());
    std::fs::copy(dir.path().join("acks"), image.path().join("acks")).unwrap();

    let log = Log::open(image.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 20);
    assert!(log.is_done(19));
    assert!(!log.is_done(20), "an ack of a lost record survived recovery");
    append_all(&log, 100, 5, 60);
    let expected: Vec<u64> = (0..15).chain(20..25).collect();
    assert_eq!(delivered(&log), expected);
    for offset in 20..25 {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset + 80);
    }
    log.close().unwrap();
    let log = Log::open(image.path(), small_options()).unwrap();
    assert_eq!(delivered(&log), expected, "the dropped acks do not come back after a reopen");
    assert_eq!(log.stats().quarantined, 0);
}

/// A destroyed header on the last segment sets it aside without handing its
/// offsets out again: the log continues at the checkpoint's next_offset (or,
/// without a checkpoint, past the acks made in that segment), the lost range
/// is quarantined, and the records appended after it are not done.
#[test]
fn bad_header_on_the_last_segment_does_not_reuse_offsets() {
    for keep_checkpoint in [true, false] {
        let original = build_log(1500, 203);
        let victim = segment_files(original.path()).pop().unwrap();
        let first_lost = base_of(&victim);
        let log = Log::open(original.path(), small_options()).unwrap();
        log.ack(first_lost + 2, 3, AckKind::Acked).unwrap().wait().unwrap();
        log.close().unwrap();
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[0..8].copy_from_slice(b"garbage!");
        std::fs::write(&victim, &bytes).unwrap();
        if !keep_checkpoint {
            std::fs::remove_file(original.path().join("checkpoint")).unwrap();
        }

        let log = Log::open(original.path(), small_options()).unwrap();
        let expected_next = if keep_checkpoint { 1500 } else { first_lost + 5 };
        let case = if keep_checkpoint { "with checkpoint" } else { "without checkpoint" };
        assert_eq!(log.next_offset(), expected_next, "{case}");
        assert_eq!(log.stats().quarantined, expected_next - first_lost, "{case}");
        let appended = log.append(&[record(5000, 203)]).unwrap();
        appended.commit.wait().unwrap();
        assert_eq!(appended.first_offset, expected_next, "{case}");
        assert!(!log.is_done(expected_next), "{case}");
        let seen = delivered(&log);
        assert_eq!(seen.last(), Some(&expected_next), "{case}");
        assert!(!seen.iter().any(|o| (first_lost..expected_next).contains(o)), "{case}");
        assert!(matches!(log.read(first_lost), Err(ReadError::Corrupt { .. })), "{case}");
        log.close().unwrap();
        let log = Log::open(original.path(), small_options()).unwrap();
        assert_eq!(log.next_offset(), expected_next + 1, "{case}: the repaired log reopens intact");
        assert_eq!(delivered(&log), seen, "{case}");
    }
}

/// After a kill (same boot; the checkpoint of the open is kept), a torn last
/// record is cut and its bytes are zeroed, whatever byte it was torn at, so
/// nothing past the end of the log is left that could pass for a record.
#[test]
fn torn_tail_after_a_kill_is_cut_and_zeroed() {
    let original = build_log(10, 60);
    let log = Log::open(original.path(), small_options()).unwrap();
    append_all(&log, 10, 10, 60);
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(original.path(), crashed.path());
    drop(log);
    let segment = segment_files(crashed.path()).pop().unwrap();
    let bytes = std::fs::read(&segment).unwrap();
    let &(last_offset, start, len) = record_spans(&bytes).last().unwrap();
    assert_eq!(last_offset, 19);
    for cut in 0..=len {
        let image = tempfile::tempdir().unwrap();
        copy_dir(crashed.path(), image.path());
        let path = image.path().join(segment.file_name().unwrap());
        let mut torn = bytes.clone();
        torn[start + cut..start + len].fill(0);
        std::fs::write(&path, &torn).unwrap();

        let log = Log::open(image.path(), small_options()).unwrap();
        let (expected_next, end) = if cut == len { (20, start + len.div_ceil(8) * 8) } else { (19, start) };
        assert_eq!(log.next_offset(), expected_next, "cut at byte {cut} of {len}");
        for offset in 0..expected_next {
            assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset, "cut {cut}");
        }
        assert_eq!(log.stats().quarantined, 0, "cut {cut}");
        let after = std::fs::read(&path).unwrap();
        assert!(after[end..].iter().all(|&b| b == 0), "cut {cut}: bytes left past the end of the log");
        append_all(&log, 100, 1, 60);
        log.close().unwrap();
        let log = Log::open(image.path(), small_options()).unwrap();
        assert_eq!(log.next_offset(), expected_next + 1, "cut {cut}");
    }
}

/// Makes the latest checkpoint look written in another boot of the machine
/// (its boot tag changed, its extension CRC fixed), as after a reboot.
fn as_if_rebooted(dir: &Path) {
    let path = dir.join("checkpoint");
    let mut bytes = std::fs::read(&path).unwrap();
    let sequence = |slot: &[u8]| u64::from_le_bytes(slot[8..16].try_into().unwrap());
    let latest = if sequence(&bytes[0..64]) > sequence(&bytes[64..128]) { 0 } else { 64 };
    let slot = &mut bytes[latest..latest + 64];
    let tag = u32::from_le_bytes(slot[56..60].try_into().unwrap());
    assert_ne!(tag, 0, "the checkpoint carries a boot tag");
    slot[56..60].copy_from_slice(&(tag ^ 0x5555_5555).max(1).to_le_bytes());
    let crc = crc32fast::hash(&slot[0..60]);
    slot[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
}

/// After a reboot any unsynced page may have been lost, in any order, so
/// recovery searches the whole rest of the segment even with a checkpoint:
/// records after a lost one are kept (the lost one is quarantined), and
/// stale bytes anywhere past the end are zeroed.
#[test]
fn after_a_reboot_the_whole_tail_is_searched() {
    let original = build_log(10, 60);
    let log = Log::open(original.path(), small_options()).unwrap();
    append_all(&log, 10, 10, 60);
    let image = tempfile::tempdir().unwrap();
    copy_dir(original.path(), image.path());
    drop(log);
    let segment = image.path().join(segment_files(original.path()).pop().unwrap().file_name().unwrap());
    let mut bytes = std::fs::read(&segment).unwrap();
    let spans = record_spans(&bytes);
    let &(_, lost_start, lost_len) = spans.iter().find(|&&(o, _, _)| o == 12).unwrap();
    bytes[lost_start..lost_start + lost_len].fill(0);
    let stale_at = bytes.len() - 4096;
    bytes[stale_at..stale_at + 100].fill(0xA5);
    std::fs::write(&segment, &bytes).unwrap();
    as_if_rebooted(image.path());

    let log = Log::open(image.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 20, "the records after the lost one are found");
    assert_eq!(log.stats().quarantined, 1);
    assert!(matches!(log.read(12), Err(ReadError::Corrupt { .. })));
    let expected: Vec<u64> = (0..20).filter(|&o| o != 12).collect();
    assert_eq!(delivered(&log), expected);
    let &(_, last_start, last_len) = spans.last().unwrap();
    let after = std::fs::read(&segment).unwrap();
    assert!(after[last_start + last_len.div_ceil(8) * 8..].iter().all(|&b| b == 0), "stale bytes left past the end");
}

/// The mark a clean close leaves in the checkpoint ("nothing past this
/// point") does not outlive the next open: records appended after a clean
/// reopen are found after a crash.
#[test]
fn a_crash_after_a_clean_reopen_keeps_new_records() {
    let original = build_log(20, 60);
    let log = Log::open(original.path(), small_options()).unwrap();
    append_all(&log, 20, 10, 60);
    let image = tempfile::tempdir().unwrap();
    copy_dir(original.path(), image.path());
    drop(log);
    let log = Log::open(image.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 30);
    assert_eq!(delivered(&log), (0..30).collect::<Vec<_>>());
}

/// A destroyed header on the only segment: the log continues at the
/// checkpoint's next_offset in a new segment, and the lost range is
/// quarantined.
#[test]
fn bad_header_on_the_only_segment_does_not_reuse_offsets() {
    let original = build_log(20, 60);
    let victim = segment_files(original.path()).pop().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0..8].copy_from_slice(b"garbage!");
    std::fs::write(&victim, &bytes).unwrap();
    let log = Log::open(original.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 20);
    assert_eq!(log.stats().quarantined, 20);
    append_all(&log, 100, 1, 60);
    assert_eq!(delivered(&log), vec![20]);
    assert_eq!(payload_index(&log.read(20).unwrap().payload), 100);
}

pub fn seed_from_env() -> u64 {
    std::env::var("BALLAST_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

/// A tiny deterministic generator (xorshift), so a seed replays a run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A segment header (magic, version, header size, base offset, size, CRC)
/// as the engine writes it, for crafting segment files.
fn segment_header(base_offset: u64, size: u64) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[0..8].copy_from_slice(b"BLSTSEG\0");
    h[8..12].copy_from_slice(&1u32.to_le_bytes());
    h[12..16].copy_from_slice(&64u32.to_le_bytes());
    h[16..24].copy_from_slice(&base_offset.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    let crc = crc32fast::hash(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A sealed segment whose (CRC-valid) header claims a size above
/// `SEGMENT_SIZE_MAX`, backed by a sparse file of that size with records
/// placed past 4 GiB, is input, not an invariant: the open sets it aside
/// (`.corrupt`) and quarantines its offsets instead of reaching the sparse
/// index's `u32` position `expect` on the first read.
#[test]
fn segment_claiming_a_size_above_the_ceiling_is_set_aside() {
    let dir = build_log(400, 1000);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "the log spans several segments: {files:?}");
    let second_base: u64 = files[1].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let size = 5u64 << 30;
    assert!(size > ballast_storage::limits::SEGMENT_SIZE_MAX);
    let file = std::fs::OpenOptions::new().write(true).truncate(true).open(&files[0]).unwrap();
    file.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&segment_header(0, size), 0).unwrap();
    // Record 0 at 64 claims almost 4 GiB, so record 1 starts past u32::MAX.
    let first_len: u32 = 0xffff_fff0;
    let mut first = [0u8; 40];
    first[0..4].copy_from_slice(&first_len.to_le_bytes());
    file.write_all_at(&first, 64).unwrap();
    let second_pos = 64 + u64::from(first_len).div_ceil(8) * 8;
    assert!(second_pos > u64::from(u32::MAX));
    let mut second = [0u8; 40];
    second[0..4].copy_from_slice(&40u32.to_le_bytes());
    second[8..16].copy_from_slice(&1u64.to_le_bytes());
    file.write_all_at(&second, second_pos).unwrap();
    drop(file);

    let log = Log::open(dir.path(), small_options()).expect("the log opens, the bad segment set aside");
    // Before the check on open, this read panicked in the sparse index.
    assert!(matches!(log.read(1), Err(ReadError::Removed { .. })), "{:?}", log.read(1));
    assert!(files[0].with_extension("corrupt").exists(), "the segment is kept aside for inspection");
    assert!(!files[0].exists());
    assert_eq!(log.stats().quarantined, second_base, "the set-aside segment's offsets are quarantined");
    for offset in [second_base, 399] {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
}
