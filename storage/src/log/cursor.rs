//! `Cursor`: iterates over the records not done, following appends.

use super::*;

/// Iterates over the records that are not done, from an offset, following
/// appends as they happen. `next` returns `None` when caught up; call it
/// again later to get newer records.
pub struct Cursor {
    shared: Arc<Shared>,
    /// The segment the cursor is positioned in and the offset just past its
    /// last record (as known when positioned).
    segment: Option<(Arc<Segment>, u64)>,
    /// Position of the record `offset` in `segment`.
    pos: u64,
    offset: u64,
    /// The log's epoch when `segment` was taken (see [`Log::reopen`]).
    epoch: u64,
}

impl fmt::Debug for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cursor").field("offset", &self.offset).finish()
    }
}

impl Cursor {
    pub(super) fn new(shared: Arc<Shared>, offset: u64, epoch: u64) -> Cursor {
        Cursor { shared, segment: None, pos: 0, offset, epoch }
    }

    /// The next offset the cursor will look at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Moves the cursor to `offset`.
    pub fn seek(&mut self, offset: u64) {
        self.offset = offset;
        self.segment = None;
    }

    /// The next record that is not done, `None` when caught up, or the
    /// corrupt range it met (which is quarantined; the cursor moves past it).
    #[allow(clippy::should_implement_trait, reason = "a cursor resumes after returning None")]
    pub fn next(&mut self) -> Option<Result<Record, ReadError>> {
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        if epoch != self.epoch {
            // A reopen replaced the segments: locate afresh.
            self.epoch = epoch;
            self.segment = None;
        }
        loop {
            let next_offset = self.shared.next_offset.load(Ordering::Acquire);
            let first = self.shared.first_offset();
            if self.offset < first {
                self.seek(first);
            }
            let not_done = self.shared.acks.lock().state.next_not_done(self.offset);
            if not_done != self.offset {
                self.seek(not_done);
            }
            if self.offset >= next_offset {
                return None;
            }
            if let Err(error) = self.position() {
                match error {
                    Some(error) => return Some(Err(error)),
                    None => continue,
                }
            }
            let (segment, end) = self.segment.clone().expect("positioned above");
            let data = segment.data_from(self.pos);
            match record::decode(&data, self.offset) {
                Ok(record) => {
                    let len = record::peek(&data).expect("a decoded record has a valid header").len;
                    self.pos += record::padded(u64::from(len));
                    self.offset += 1;
                    return Some(Ok(record));
                }
                Err(invalid) => {
                    let target = self.offset;
                    let (error, resumed) = self.shared.quarantine(&segment, end, self.pos, target, invalid);
                    self.resume(segment, end, resumed);
                    return Some(Err(error));
                }
            }
        }
    }

    /// Makes `segment` and `pos` point at `offset`. `Err(None)`: the cursor
    /// moved (past a corrupt range below its offset); look again.
    fn position(&mut self) -> Result<(), Option<ReadError>> {
        if let Some((_, end)) = &self.segment
            && self.offset < *end
        {
            return Ok(());
        }
        let (segment, end) = self.shared.segment_for(self.offset).ok_or(None)?;
        if let Some((current, _)) = &self.segment
            && Arc::ptr_eq(current, &segment)
        {
            // Still the same (active) segment, which has grown: keep going.
            self.segment = Some((segment, end));
            return Ok(());
        }
        match segment.locate(self.offset, end) {
            Ok(pos) => {
                self.pos = pos;
                self.segment = Some((segment, end));
                Ok(())
            }
            Err(hop) => {
                let target = self.offset;
                let (error, resumed) = self.shared.quarantine(&segment, end, hop.pos, hop.expected_offset, hop.invalid);
                let resume_offset = resumed.map_or(end, |(_, o)| o);
                if target >= resume_offset {
                    // The corrupt range lies below the target: relocate
                    // through the new index entry past it.
                    self.segment = None;
                    return Err(None);
                }
                self.offset = target;
                self.resume(segment, end, resumed);
                Err(Some(error))
            }
        }
    }

    fn resume(&mut self, segment: Arc<Segment>, end: u64, resumed: Option<(u64, u64)>) {
        match resumed {
            Some((pos, offset)) => {
                self.pos = pos;
                self.offset = offset;
                self.segment = Some((segment, end));
            }
            None => self.seek(end),
        }
    }
}
