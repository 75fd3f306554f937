//! The read path: the segment of an offset, a read by offset, and the
//! quarantine of corrupt ranges met on the way.

use super::*;

impl Shared {
    /// The segment holding `offset` and the offset just past its last record.
    pub(super) fn segment_for(&self, offset: u64) -> Option<(Arc<Segment>, u64)> {
        let segments = self.segments.read();
        let at = segments.partition_point(|s| s.base_offset <= offset).checked_sub(1)?;
        let end = segments.get(at + 1).map_or_else(|| self.next_offset.load(Ordering::Acquire), |s| s.base_offset);
        Some((Arc::clone(&segments[at]), end))
    }

    pub(super) fn read(&self, offset: u64) -> Result<Record, ReadError> {
        let next_offset = self.next_offset.load(Ordering::Acquire);
        if offset >= next_offset {
            return Err(ReadError::NotWritten { offset, next_offset });
        }
        let Some((segment, end)) = self.segment_for(offset) else {
            return Err(ReadError::Removed { offset, first_offset: self.first_offset() });
        };
        // Each corrupt range met on the way leaves an index entry past it, so
        // every round gets further; the bound only guards against a bug.
        for _ in 0..1024 {
            let (pos, expected, invalid) = match segment.locate(offset, end) {
                Ok(pos) => match record::decode(&segment.data_from(pos), offset) {
                    Ok(record) => return Ok(record),
                    Err(invalid) => (pos, offset, invalid),
                },
                Err(hop) => (hop.pos, hop.expected_offset, hop.invalid),
            };
            let (error, resumed) = self.quarantine(&segment, end, pos, expected, invalid);
            if resumed.is_none_or(|(_, o)| offset < o) {
                return Err(error);
            }
        }
        Err(ReadError::Corrupt {
            segment_base: segment.base_offset,
            first_offset: offset,
            last_offset: offset,
            reason: "record not found after resynchronising".into(),
        })
    }

    /// Steps over a corrupt range starting at `pos` (where `expected` should
    /// have been): finds the next valid record, marks the offsets in between
    /// quarantined, reports them. Returns the error to give the reader and
    /// where valid data resumes.
    pub(super) fn quarantine(
        &self,
        segment: &Segment,
        end: u64,
        pos: u64,
        expected: u64,
        invalid: Invalid,
    ) -> (ReadError, Option<(u64, u64)>) {
        let data = segment.data_from(0);
        let resumed = segment::resync(&data, pos, data.len() as u64, expected, end);
        let stop = resumed.map_or(end, |(_, o)| o);
        if let Some((pos, offset)) = resumed {
            segment.index_resync_point(offset, pos);
        }
        let count = stop.saturating_sub(expected).max(1);
        if self.mark_done(expected, count, AckKind::Quarantined) {
            self.quarantined.fetch_add(count, Ordering::Relaxed);
            self.commit.lock().acks_written += 1;
            self.wake();
            tracing::error!(
                segment = %segment.path.display(),
                position = pos,
                first_offset = expected,
                last_offset = expected + count - 1,
                reason = invalid.describe(),
                "corrupt records quarantined; they will not be delivered"
            );
        }
        let error = ReadError::Corrupt {
            segment_base: segment.base_offset,
            first_offset: expected,
            last_offset: expected + count - 1,
            reason: invalid.describe().into(),
        };
        (error, resumed)
    }
}
