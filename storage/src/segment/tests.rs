use super::*;
use crate::{file::Faults, limits::SEGMENT_SIZE_MIN};

/// A new segment is not mapped until it is needed; a map that fails can be
/// tried again.
#[test]
fn failed_map_can_be_retried() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let io = Io::new(Some(faults.clone()), Default::default());
    let segment = Segment::create(&io, dir.path(), 100, SEGMENT_SIZE_MIN, SEGMENT_HEADER_SIZE).unwrap();
    assert!(!segment.is_mapped());
    assert_eq!(segment.written(), SEGMENT_HEADER_SIZE);
    faults.fail_maps(1);
    let error = segment.ensure_mapped(&io).expect_err("the map was made to fail");
    assert_eq!(error.raw_os_error(), Some(libc::ENOMEM));
    segment.ensure_mapped(&io).expect("a retry maps the segment");
    assert!(segment.is_mapped());
}

/// The segment size a header may claim, at the limits and one step (the
/// record alignment) past them: `SEGMENT_SIZE_MIN` and `SEGMENT_SIZE_MAX`
/// open; below the first or above the second the file is not a log (and
/// recovery sets it aside) rather than mapped and indexed with `u32`
/// positions that cannot hold it.
#[test]
fn header_size_at_the_limits_and_one_past() {
    use crate::limits::{RECORD_ALIGN, SEGMENT_SIZE_MAX};
    let dir = tempfile::tempdir().unwrap();
    for (size, valid) in [
        (SEGMENT_SIZE_MIN, true),
        (SEGMENT_SIZE_MIN - RECORD_ALIGN, false),
        (SEGMENT_SIZE_MAX, true),
        (SEGMENT_SIZE_MAX + RECORD_ALIGN, false),
    ] {
        let path = dir.path().join(file_name(0));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(size).unwrap(); // sparse
        std::os::unix::fs::FileExt::write_all_at(&file, &encode_header(0, size), 0).unwrap();
        drop(file);
        match Segment::open(&Io::default(), &path, 0) {
            Ok(_) => assert!(valid, "a {size}-byte segment must be refused"),
            Err(OpenError::NotALog { reason, .. }) => {
                assert!(!valid, "a {size}-byte segment must open: {reason}");
                assert!(reason.contains(&size.to_string()), "{reason}");
            }
            Err(e) => panic!("{size}: {e}"),
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// A version 2 segment file may be shorter than the size in its header (it
/// grows with its records): it opens with the map readable up to its
/// length. Longer than its size it is not a log; a version 1 file must be
/// exactly its size, as version 1 writers left it.
#[test]
fn file_length_against_the_header_size() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * SEGMENT_SIZE_MIN;
    for (version, len, valid) in [
        (FORMAT_VERSION, SEGMENT_HEADER_SIZE, true),
        (FORMAT_VERSION, 100_003, true),
        (FORMAT_VERSION, size, true),
        (FORMAT_VERSION, size + 1, false),
        (1, size, true),
        (1, size - 8, false),
    ] {
        let path = dir.path().join(file_name(0));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(len).unwrap();
        let mut header = encode_header(0, size);
        header[8..12].copy_from_slice(&version.to_le_bytes());
        let crc = crc32fast::hash(&header[0..60]);
        header[60..64].copy_from_slice(&crc.to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&file, &header, 0).unwrap();
        drop(file);
        match Segment::open(&Io::default(), &path, 0) {
            Ok(segment) => {
                assert!(valid, "version {version}, {len} bytes must be refused");
                assert_eq!(segment.allocated(), len);
                assert!(!segment.is_mapped(), "mapped on first need");
                segment.ensure_mapped(&Io::default()).unwrap();
                assert_eq!(segment.raw_from(0).len() as u64, len, "the map is read only up to the file length");
            }
            Err(OpenError::NotALog { reason, .. }) => assert!(!valid, "version {version}, {len} bytes: {reason}"),
            Err(e) => panic!("version {version}, {len} bytes: {e}"),
        }
        std::fs::remove_file(&path).unwrap();
    }
}

/// Growth goes in doubling steps from `SEGMENT_GROWTH_STEP_MIN`, capped at
/// the segment size, and lands back on that grid from any length.
#[test]
fn growth_steps() {
    use crate::limits::SEGMENT_GROWTH_STEP_MIN as STEP;
    assert_eq!(next_allocation(0, SEGMENT_HEADER_SIZE, 1 << 30), STEP);
    assert_eq!(next_allocation(STEP, STEP + 1, 1 << 30), 2 * STEP);
    assert_eq!(next_allocation(STEP, 5 * STEP, 1 << 30), 8 * STEP);
    assert_eq!(next_allocation(100_003, 100_004, 1 << 30), 2 * STEP);
    assert_eq!(next_allocation(4 * STEP, 4 * STEP + 1, 5 * STEP), 5 * STEP, "capped at the segment size");
    assert_eq!(next_allocation(0, SEGMENT_HEADER_SIZE, SEGMENT_SIZE_MIN), SEGMENT_SIZE_MIN);
}
