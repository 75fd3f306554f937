//! Torn tails and corrupted bytes: no corrupt record is ever returned, and
//! every intact one still is.

use std::path::{Path, PathBuf};

use ballast_storage::{Log, ReadError};

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
        for offset in 0..1500 {
            match log.read(offset) {
                Ok(r) => assert_eq!(payload_index(&r.payload), offset, "round {round}: wrong data at {offset}"),
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
