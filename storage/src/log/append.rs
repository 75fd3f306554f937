//! Append planning and writing: validate the whole batch, plan the
//! segment runs, allocate every byte (growth, new segments), write one
//! `pwrite` per run, tell the flusher, publish `next_offset`.

use super::*;

impl Shared {
    pub(super) fn validate(&self, records: &[NewRecord]) -> Result<(), AppendError> {
        if records.is_empty() {
            return Err(AppendError::BatchEmpty);
        }
        if records.len() > BATCH_COUNT_MAX {
            return Err(AppendError::BatchTooLarge { count: records.len(), max: BATCH_COUNT_MAX });
        }
        for (index, r) in records.iter().enumerate() {
            let key_size = r.key.as_ref().map_or(0, |k| k.len());
            if r.key.is_some() && key_size == 0 {
                return Err(AppendError::KeyEmpty { index });
            }
            if key_size > KEY_SIZE_MAX as usize {
                return Err(AppendError::KeyTooLarge { index, size: key_size, max: KEY_SIZE_MAX });
            }
            if r.headers.len() > HEADERS_COUNT_MAX as usize {
                return Err(AppendError::TooManyHeaders { index, count: r.headers.len(), max: HEADERS_COUNT_MAX });
            }
            let headers_size = r.headers_size();
            let name_too_long = r.headers.iter().any(|(k, _)| k.len() > usize::from(u16::MAX));
            if headers_size > u64::from(HEADERS_SIZE_MAX) || name_too_long {
                return Err(AppendError::HeadersTooLarge { index, size: headers_size, max: HEADERS_SIZE_MAX });
            }
            let size = r.encoded_len();
            if size > u64::from(self.options.record_size_max) {
                return Err(AppendError::RecordTooLarge { index, size, max: self.options.record_size_max });
            }
        }
        Ok(())
    }

    pub(super) fn append(self: &Arc<Self>, records: &[NewRecord]) -> Result<Appended, AppendError> {
        self.validate(records)?;
        // Refused before the writer lock, which a reopen holds while it
        // recovers: callers are not held up behind it.
        if let Some(e) = self.poisoned() {
            return Err(AppendError::Poisoned(e));
        }
        let mut guard = self.writer.lock();
        if let Some(e) = self.poisoned() {
            return Err(AppendError::Poisoned(e));
        }
        let first_offset = self.next_offset.load(Ordering::Acquire);
        // Where the batch starts in the active segment.
        let batch_start = guard.write_pos;
        let segment_size = self.options.segment_size;

        // Plan: which records start a new segment, and where each run of
        // records ends (the first run in the active segment, then one per
        // new segment). Records never span segments.
        let mut starts = Vec::new();
        let mut run_ends = Vec::new();
        let mut pos = guard.write_pos;
        for (i, r) in records.iter().enumerate() {
            let size = record::padded(r.encoded_len());
            if pos + size > segment_size {
                starts.push(i);
                run_ends.push(pos);
                pos = SEGMENT_HEADER_SIZE;
            }
            pos += size;
        }
        run_ends.push(pos);

        // Allocate every byte the batch needs before writing anything, so a
        // full disk fails the batch cleanly: the active segment grows first,
        // then every new segment is made with room for its run, the first
        // from the spare the flusher prepared if there is one. Neither
        // syncs: the group commit that covers these records syncs the new
        // segments' headers with them, and the directory (`dir_dirty`),
        // before any of them is acknowledged.
        let active = Arc::clone(self.segments.read().last().expect("a log has an active segment"));
        // An empty active segment is mapped on its first write.
        let prepared = active.grow(&self.io, run_ends[0]).and_then(|grown| {
            if starts.first() == Some(&0) { Ok(grown) } else { active.ensure_mapped(&self.io).map(|()| grown) }
        });
        match prepared {
            Ok(grown) => {
                if grown {
                    self.growths_inline.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(source) => {
                let path = active.path.to_path_buf();
                if source.raw_os_error() == Some(libc::ENOSPC) {
                    return Err(AppendError::DiskFull { path });
                }
                return Err(AppendError::Io { path, source });
            }
        }
        let mut created = Vec::with_capacity(starts.len());
        for (&i, &end) in starts.iter().zip(&run_ends[1..]) {
            let base = first_offset + i as u64;
            match self.roll(base, end) {
                Ok(segment) => created.push(Arc::new(segment)),
                Err(source) => {
                    let path = self.dir.join(segment::file_name(base));
                    for segment in created {
                        let _ = std::fs::remove_file(&segment.path);
                    }
                    if source.raw_os_error() == Some(libc::ENOSPC) {
                        return Err(AppendError::DiskFull { path });
                    }
                    return Err(AppendError::Io { path, source });
                }
            }
        }
        if !created.is_empty() {
            self.segments.write().extend(created.iter().cloned());
        }

        // Write each run of records into its segment.
        let mut touched: Vec<Arc<Segment>> = Vec::with_capacity(1 + created.len());
        let mut run_segment = if starts.first() == Some(&0) {
            None
        } else {
            Some(Arc::clone(self.segments.read().iter().rev().nth(created.len()).expect("active segment")))
        };
        let rolled = !created.is_empty();
        let mut next_created = created.into_iter();
        let mut run_start = 0;
        let writer = &mut *guard;
        let mut bytes_written = 0;
        for boundary in starts.iter().copied().chain(std::iter::once(records.len())) {
            if boundary > run_start {
                let segment = run_segment.take().expect("a run has a segment");
                let pos = writer.write_pos;
                writer.buf.clear();
                for (i, r) in records[run_start..boundary].iter().enumerate() {
                    let offset = first_offset + (run_start + i) as u64;
                    segment.note_record(offset, pos + writer.buf.len() as u64);
                    record::encode(r, offset, &mut writer.buf);
                    if let Some(key) = &r.key {
                        writer.pending_keys.push(KeyEntry { key: key.clone(), offset, timestamp_ms: r.timestamp_ms });
                    }
                }
                if let Err(source) = segment.write(&self.io, &writer.buf, pos) {
                    let error = SyncError::new(format!("writing {}", segment.path.display()), source);
                    self.poison(error.clone());
                    return Err(AppendError::Poisoned(error));
                }
                writer.write_pos = pos + writer.buf.len() as u64;
                bytes_written += writer.buf.len() as u64;
                touched.push(segment);
            }
            if boundary < records.len() {
                run_segment = next_created.next();
                writer.write_pos = SEGMENT_HEADER_SIZE;
            }
            run_start = boundary;
        }
        let count = u32::try_from(records.len()).expect("batch size is below BATCH_COUNT_MAX");
        let next_offset = first_offset + u64::from(count);

        let active = touched.last().expect("a non-empty batch touches a segment");
        let ahead_from = if rolled { SEGMENT_HEADER_SIZE } else { batch_start };
        let ahead_due = Shared::ahead_due(active, ahead_from, writer.write_pos);
        let point = Point { segment_base: active.base_offset, position: writer.write_pos, next_offset, keys_len: 0 };
        let seq = {
            let mut commit = self.commit.lock();
            commit.data_written += 1;
            for segment in touched {
                if !commit.dirty.iter().any(|d| Arc::ptr_eq(d, &segment)) {
                    commit.dirty.push(segment);
                }
            }
            commit.point = Some(point);
            commit.bytes_since_checkpoint += bytes_written;
            commit.dir_dirty |= rolled;
            (commit.data_written, commit.epoch)
        };
        // Publish only now that the flusher's next snapshot holds the point
        // past these records: see rule 4 of the module docs.
        self.next_offset.store(next_offset, Ordering::Release);
        drop(guard);
        if ahead_due && self.options.sync_policy != SyncPolicy::Fsync {
            // Under `Fsync` the wake below runs a cycle, and the work ahead
            // after it.
            self.wake();
        }
        self.wake_after_write();
        let commit = match self.options.sync_policy {
            SyncPolicy::Fsync => Commit {
                state: CommitInner::Pending { shared: Arc::clone(self), track: Track::Data, seq: seq.0, epoch: seq.1 },
            },
            SyncPolicy::Interval { .. } | SyncPolicy::None => Commit::ready(),
        };
        Ok(Appended { first_offset, count, commit })
    }
}

impl Shared {
    /// Makes the segment `base` for a roll, with room for its first `end`
    /// bytes: from the spare if the flusher has one ready (a rename and a
    /// header write), otherwise created here (a burst outran the flusher, or
    /// the spare could not be made): counted in `LogStats::rolls_inline`.
    /// Neither path syncs anything (see `append`). Under the writer lock.
    fn roll(&self, base: u64, end: u64) -> std::io::Result<Segment> {
        let size = self.options.segment_size;
        {
            // Held across the rename, so that the flusher never recreates
            // the spare under the name the rename is moving.
            let mut spare = self.spare.lock();
            if let Some(allocated) = spare.take() {
                match Segment::from_spare(&self.io, &self.dir, segment::SPARE_FILE_NAME, base, size, allocated, end) {
                    Ok((segment, grown)) => {
                        self.rolls_from_spare.fetch_add(1, Ordering::Relaxed);
                        if grown {
                            self.growths_inline.fetch_add(1, Ordering::Relaxed);
                        }
                        return Ok(segment);
                    }
                    Err(error) => {
                        tracing::warn!(dir = %self.dir.display(), %error, "rolling onto the spare failed; creating the segment inline");
                    }
                }
            }
        }
        // The same steps with a spare of its own, not synced: a kill at
        // any point leaves `roll.tmp` or a spare-headed segment, both
        // removed at open, never a segment without a header.
        let allocated = Segment::create_spare(&self.io, &self.dir, segment::ROLL_FILE_NAME, size, end, false)?;
        let (segment, _) =
            Segment::from_spare(&self.io, &self.dir, segment::ROLL_FILE_NAME, base, size, allocated, end).inspect_err(
                |_| {
                    let _ = std::fs::remove_file(self.dir.join(segment::ROLL_FILE_NAME));
                },
            )?;
        self.rolls_inline.fetch_add(1, Ordering::Relaxed);
        Ok(segment)
    }
}
