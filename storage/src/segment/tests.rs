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
