//! Byte accounting: the stored bytes of the records not done, from
//! positions, never by reading the backlog.

use super::*;

impl Shared {
    pub(super) fn pending_bytes(&self) -> Result<u64, ReadError> {
        // The end of the log, its active segment and that segment's end,
        // taken together: the writer lock orders them with appends.
        let (next, active_end, segments) = {
            let writer = self.writer.lock();
            let segments: Vec<Arc<Segment>> = self.segments.read().clone();
            (self.next_offset.load(Ordering::Acquire), writer.write_pos, segments)
        };
        let (floor, ranges) = {
            let acks = self.acks.lock();
            (acks.state.floor(), acks.state.ranges_below(next))
        };
        let is_done = |offset: u64| {
            offset < floor || {
                let at = ranges.partition_point(|&(s, _)| s <= offset);
                at.checked_sub(1).is_some_and(|i| offset < ranges[i].1)
            }
        };
        let record_size_max = u64::from(self.options.record_size_max);
        let mut total = 0;
        let mut done = ranges.iter().copied().peekable();
        for (i, segment) in segments.iter().enumerate() {
            let active = i + 1 == segments.len();
            let lo = segment.base_offset;
            let hi = segments.get(i + 1).map_or(next, |s| s.base_offset).min(next);
            let mut start = lo.max(floor);
            while start < hi {
                while done.next_if(|&(_, e)| e <= start).is_some() {}
                let (stop, resume) = match done.peek() {
                    Some(&(s, e)) if s < hi => (s.max(start), e),
                    _ => (hi, hi),
                };
                if stop > start {
                    // The run of records not done [start, stop).
                    let first =
                        if start == lo { SEGMENT_HEADER_SIZE } else { self.position(segment, start, hi, &is_done)? };
                    let last = stop - 1;
                    let end = if stop == hi && active {
                        active_end
                    } else {
                        let from_tail = (stop == hi && !segment.is_indexed_for(last))
                            .then(|| segment.end_from_tail(last, record_size_max))
                            .flatten();
                        match from_tail {
                            Some(end) => end,
                            None => {
                                let pos = self.position(segment, last, hi, &is_done)?;
                                segment.end_of_record_at(pos).ok_or_else(|| ReadError::Corrupt {
                                    segment_base: lo,
                                    first_offset: last,
                                    last_offset: last,
                                    reason: Invalid::BadLength.describe().into(),
                                })?
                            }
                        }
                    };
                    total += end.saturating_sub(first);
                }
                start = resume;
            }
        }
        Ok(total)
    }

    /// The position of the record `offset` (not done) in `segment`, whose
    /// offsets end at `end`, for [`Shared::pending_bytes`]: hops from the
    /// index and resynchronises past damaged records that are done (adding
    /// an index entry, marking nothing). Damage anywhere else is reported.
    pub(super) fn position(
        &self,
        segment: &Segment,
        offset: u64,
        end: u64,
        is_done: &dyn Fn(u64) -> bool,
    ) -> Result<u64, ReadError> {
        let corrupt = |first: u64, reason: &str| ReadError::Corrupt {
            segment_base: segment.base_offset,
            first_offset: first,
            last_offset: first,
            reason: reason.into(),
        };
        // Each round leaves an index entry further on; the bound guards
        // against a bug, as in `read`.
        for _ in 0..1024 {
            let hop = match segment.locate(offset, end) {
                Ok(pos) => return Ok(pos),
                Err(hop) => hop,
            };
            if hop.expected_offset < offset && is_done(hop.expected_offset) {
                let data = segment.data_from(0);
                if let Some((pos, found)) = segment::resync(&data, hop.pos, data.len() as u64, hop.expected_offset, end)
                    && found <= offset
                {
                    segment.index_resync_point(found, pos);
                    continue;
                }
            }
            return Err(corrupt(hop.expected_offset, hop.invalid.describe()));
        }
        Err(corrupt(offset, "record not found after resynchronising"))
    }
}
