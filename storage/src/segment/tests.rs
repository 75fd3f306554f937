use super::*;
use crate::{file::Faults, limits::SEGMENT_SIZE_MIN};

/// A segment whose map fails is not left behind: the creation can be
/// retried under the same name.
#[test]
fn failed_map_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let io = Io::new(Some(faults.clone()));
    faults.fail_maps(1);
    let error = Segment::create(&io, dir.path(), 100, SEGMENT_SIZE_MIN).expect_err("the map was made to fail");
    assert_eq!(error.raw_os_error(), Some(libc::ENOMEM));
    assert!(!dir.path().join(file_name(100)).exists(), "the file of a failed creation is removed");
    let segment = Segment::create(&io, dir.path(), 100, SEGMENT_SIZE_MIN).expect("a retry creates the segment");
    assert_eq!(segment.written(), SEGMENT_HEADER_SIZE);
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
        match Segment::open(&path, 0) {
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
