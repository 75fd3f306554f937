//! The flusher: one job of the `FlushPool` per log. It alone syncs,
//! writes checkpoints, removes segments, compacts journals and grows the
//! active segment ahead of the writer; a pool thread runs one cycle at a
//! time (`Shared::step`).

use super::*;

/// What the flusher remembers from one cycle to the next.
pub(super) struct FlusherState {
    /// The cycle period under `Interval` and `None`.
    interval: Option<Duration>,
    /// Under `Interval` and `None` cycles run at fixed deadlines, one
    /// interval apart: wake-ups in between neither run a cycle nor move
    /// the deadline.
    deadline: Option<Instant>,
    /// Set while the ack journal is full: no write of it before then.
    acks_retry_at: Option<Instant>,
    last_retention_floor: u64,
    /// The active segment (its base) for which preparing the spare failed:
    /// not tried again until the log rolls past it, so a full disk costs
    /// one failed attempt per segment, not one per cycle.
    spare_failed_in: Option<u64>,
}

impl FlusherState {
    pub(super) fn new(policy: SyncPolicy) -> FlusherState {
        let interval = match policy {
            SyncPolicy::Fsync => None,
            SyncPolicy::Interval { interval_ms } => Some(Duration::from_millis(interval_ms)),
            SyncPolicy::None => Some(Duration::from_millis(BACKGROUND_FLUSH_MS)),
        };
        FlusherState {
            interval,
            deadline: interval.map(|i| Instant::now() + i),
            acks_retry_at: None,
            last_retention_floor: u64::MAX,
            spare_failed_in: None,
        }
    }
}

/// What one flusher cycle works on, taken under the `commit` lock.
pub(super) struct Cycle {
    pub(super) data_target: u64,
    pub(super) acks_target: u64,
    /// Segments written since the last cycle.
    pub(super) dirty: Vec<Arc<Segment>>,
    /// The end of the data written before the snapshot: synced by this
    /// cycle, and where a checkpoint would go.
    pub(super) point: Option<Point>,
    pub(super) checkpoint_due: bool,
    pub(super) shutdown: bool,
    /// Leave the ack journal alone this cycle (backing off after ENOSPC).
    pub(super) acks_paused: bool,
    /// A roll renamed or created a segment file before the snapshot: sync
    /// the directory after the dirty segments, before resolving anything.
    pub(super) sync_dir: bool,
}

/// What a flusher cycle did with the buffered ack entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JournalWrite {
    /// Written (those whose records are durable) and synced; the sync is
    /// skipped when nothing was written since the journal's last sync.
    Written,
    /// Not attempted: backing off after ENOSPC.
    Paused,
    /// The write failed with ENOSPC; the entries stay buffered.
    DiskFull,
}

impl Shared {
    /// One flusher cycle's I/O: sync dirty segments, write the buffered acks
    /// whose records are now durable and sync the ack journal if anything
    /// was written to it, then publish the synced sequences.
    pub(super) fn flush_once(&self, cycle: &Cycle) -> Result<JournalWrite, SyncError> {
        for segment in &cycle.dirty {
            segment.sync(&self.io).map_err(|e| SyncError::new(format!("syncing {}", segment.path.display()), e))?;
        }
        // A segment sealed and now synced is never written again: its map
        // serves reads without a descriptor.
        if cycle.dirty.len() > 1 || cycle.dirty.first().is_some_and(|s| !self.is_active(s)) {
            for segment in cycle.dirty.iter().filter(|s| !self.is_active(s)) {
                segment.release_descriptor();
            }
        }
        if !cycle.dirty.is_empty() {
            self.sync_count.fetch_add(1, Ordering::Relaxed);
        }
        // The names of the segments rolled since the last cycle: durable
        // before any record in them is (acks, checkpoints and commits all
        // follow). Their headers were synced with their records above.
        if cycle.sync_dir {
            self.io.sync_dir(&self.dir).map_err(|e| SyncError::new("syncing the log directory after a roll", e))?;
        }
        let journal = {
            let mut acks = self.acks.lock();
            // Every record before the cycle's point is synced now (here or
            // in an earlier cycle). Acks of later records wait for the cycle
            // that syncs them; none of them is covered by `acks_target`
            // (rule 4 of the module docs), so no commit of this cycle waits.
            if let Some(point) = cycle.point {
                acks.durable_end = acks.durable_end.max(point.next_offset);
            }
            let durable_end = acks.durable_end;
            if cycle.acks_paused {
                JournalWrite::Paused
            } else {
                match acks.journal.flush(&self.io, durable_end) {
                    Ok(()) => JournalWrite::Written,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => JournalWrite::DiskFull,
                    Err(e) => return Err(SyncError::new("writing the ack journal", e)),
                }
            }
        };
        // Every entry an ack sequence up to `acks_target` needs was written
        // in this cycle or an earlier one; the journal knows whether any
        // bytes are still unsynced, and skips the device flush if none are.
        // The device flush runs without the acks lock, which every ack
        // takes: acks keep flowing while the journal syncs.
        let target = if journal == JournalWrite::Written {
            self.acks.lock().journal.sync_target().map_err(|e| SyncError::new("opening the ack journal", e))?
        } else {
            None
        };
        if let Some(target) = target {
            self.io.sync_data(&target.file).map_err(|e| SyncError::new("syncing the ack journal", e))?;
            self.acks.lock().journal.synced(&target);
            self.ack_sync_count.fetch_add(1, Ordering::Relaxed);
        }
        let waiters = {
            let mut commit = self.commit.lock();
            commit.data_synced = commit.data_synced.max(cycle.data_target);
            if journal == JournalWrite::Written {
                commit.acks_synced = commit.acks_synced.max(cycle.acks_target);
            }
            let (ready, pending) = std::mem::take(&mut commit.waiters)
                .into_iter()
                .partition::<Vec<_>, _>(|(track, seq, _)| commit.resolved(*track, *seq, commit.epoch).is_some());
            commit.waiters = pending;
            ready
        };
        self.waiter_wake.notify_all();
        waiters.into_iter().for_each(|(_, _, w)| w.wake());
        Ok(journal)
    }
}

impl Scheduled for Shared {
    fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Job for Shared {
    /// One step of the log's flusher, run by a pool thread: the only place
    /// that syncs, checkpoints and removes.
    fn step(&self) -> Step {
        let mut state = self.flusher.lock();
        let cycle = match self.next_cycle(&mut state) {
            Ok(cycle) => cycle,
            Err(Step::Finished) => return Step::Finished,
            Err(step) => {
                // No cycle due (the timed policies between deadlines): the
                // writer may have woken the flusher for the work ahead of
                // it (`Shared::ahead_due`).
                self.prepare_ahead(&mut state);
                return step;
            }
        };
        let result = self.flush_once(&cycle).and_then(|journal| {
            match journal {
                JournalWrite::Written => {
                    if state.acks_retry_at.take().is_some() {
                        tracing::info!(dir = %self.dir.display(), "the ack journal is writable again");
                    }
                }
                JournalWrite::DiskFull => {
                    if state.acks_retry_at.is_none() {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            retry_ms = ACK_JOURNAL_RETRY_MS,
                            "disk full writing the ack journal; acks stay buffered and are retried"
                        );
                    }
                    state.acks_retry_at = Some(Instant::now() + Duration::from_millis(ACK_JOURNAL_RETRY_MS));
                }
                JournalWrite::Paused => {}
            }
            match cycle.point {
                // The last cycle of a close: the point is the exact end and
                // nothing will be written past it (`Shared::checkpoint`).
                Some(point) if cycle.checkpoint_due => self.checkpoint(point, cycle.shutdown),
                _ => Ok(()),
            }
        });
        let result = result.and_then(|()| {
            let floor = self.acks.lock().state.floor();
            if floor != state.last_retention_floor || cycle.checkpoint_due {
                state.last_retention_floor = floor;
                self.retain()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            self.poison(e);
            return Step::Finished;
        }
        if cycle.shutdown {
            return Step::Finished;
        }
        self.prepare_ahead(&mut state);
        Step::Ran
    }
}

impl Shared {
    pub(super) fn is_active(&self, segment: &Arc<Segment>) -> bool {
        self.segments.read().last().is_some_and(|last| Arc::ptr_eq(last, segment))
    }

    /// After an append or ack: under `Fsync` the flusher runs now; under
    /// `Interval` and `None` only when no deadline is armed (the armed one
    /// finds the work when it fires; an idle flusher holds none, `pool.rs`
    /// rule 4, so the first write after a quiet spell arms it). Saves a
    /// pool round trip per append under the timed policies.
    pub(super) fn wake_after_write(&self) {
        if self.options.sync_policy != SyncPolicy::Fsync && self.slot.timer_armed() {
            return;
        }
        self.wake();
    }

    /// Asks the pool to run this log's flusher (a no-op while it is queued).
    pub(super) fn wake(&self) {
        if let Some(me) = self.me.upgrade() {
            let job: Arc<dyn Scheduled> = me;
            self.pool.schedule(&job);
        }
    }

    /// What the flusher does next: a cycle to run now (`Ok`), or the step
    /// to answer the pool with (nothing to do yet, or finished).
    pub(super) fn next_cycle(&self, state: &mut FlusherState) -> Result<Cycle, Step> {
        let mut commit = self.commit.lock();
        if commit.error.is_some() {
            return Err(Step::Finished);
        }
        if !(commit.shutdown || commit.sync_requested) {
            let now = Instant::now();
            let acks_paused = state.acks_retry_at.is_some_and(|at| now < at);
            // Contended: someone is acking, so assume entries are buffered.
            let buffered = self.acks.try_lock().is_none_or(|a| a.journal.has_buffered());
            let ack_work = !acks_paused && (commit.acks_written > commit.acks_synced || buffered);
            let data_work = commit.data_written > commit.data_synced;
            let work = data_work || ack_work;
            match (state.deadline, state.interval) {
                (Some(at), Some(interval)) => {
                    let due = now >= at;
                    if due {
                        // The next deadline follows this one, unless the
                        // flusher fell a whole interval behind (or was idle).
                        let next = at + interval;
                        state.deadline = Some(if next > now { next } else { now + interval });
                    }
                    let unsynced = work || commit.bytes_since_checkpoint > 0;
                    if !(due && unsynced) {
                        // Idle with nothing written: no timer until the next
                        // append or ack wakes the flusher.
                        let waiting = unsynced || (acks_paused && buffered);
                        return Err(if waiting { Step::WaitUntil(state.deadline.expect("set")) } else { Step::Idle });
                    }
                }
                _ if work => {}
                // Only ack work is left, and it waits for the retry.
                _ => {
                    return Err(match state.acks_retry_at.filter(|_| acks_paused && buffered) {
                        Some(at) => Step::WaitUntil(at),
                        None => Step::Idle,
                    });
                }
            }
        }
        let point = commit.point;
        let last_checkpoint = self.checkpointer.lock().last;
        let moved = point.is_some_and(|p| p.segment_base != last_checkpoint.segment_base);
        let checkpoint_due = commit.shutdown
            || commit.bytes_since_checkpoint >= self.options.checkpoint_interval_bytes
            || (moved && commit.bytes_since_checkpoint > 0)
            || (state.interval.is_some() && commit.bytes_since_checkpoint > 0);
        if checkpoint_due {
            commit.bytes_since_checkpoint = 0;
        }
        // A close or an explicit sync tries the ack journal even while
        // backing off.
        let forced = commit.shutdown || commit.sync_requested;
        commit.sync_requested = false;
        Ok(Cycle {
            data_target: commit.data_written,
            acks_target: commit.acks_written,
            dirty: std::mem::take(&mut commit.dirty),
            point,
            checkpoint_due,
            shutdown: commit.shutdown,
            acks_paused: !forced && state.acks_retry_at.is_some_and(|at| Instant::now() < at),
            sync_dir: std::mem::take(&mut commit.dir_dirty),
        })
    }

    /// The work ahead of the writer: growth, then the spare.
    pub(super) fn prepare_ahead(&self, state: &mut FlusherState) {
        self.prepare_growth();
        self.prepare_spare(state);
    }

    /// Whether an append that moved the active segment `segment`'s end
    /// from `from` to `to` crossed a point where the flusher has work ahead
    /// of the writer: half of the allocation (growth) or the spare's fill
    /// threshold. The timed policies' flusher runs only at its deadlines,
    /// so the writer wakes it then (cheap: positions only, no lock).
    pub(super) fn ahead_due(segment: &Segment, from: u64, to: u64) -> bool {
        let size = u128::from(segment.size());
        let crossed = |point: u128| u128::from(from) <= point && u128::from(to) > point;
        let allocated = segment.allocated();
        (allocated < segment.size() && crossed(u128::from(allocated / 2)))
            || crossed(size * u128::from(SPARE_PREPARE_FILL_PERCENT) / 100)
    }

    /// Grows the active segment to its next step once the writer has used
    /// half of its allocation, so appends rarely wait for a `fallocate`
    /// (`Segment::grow`). A failure is left to the writer, which meets it
    /// again, before writing, and refuses its batch.
    pub(super) fn prepare_growth(&self) {
        let Some(active) = self.segments.read().last().cloned() else { return };
        let allocated = active.allocated();
        if allocated < active.size()
            && active.written() > allocated / 2
            && let Err(error) = active.grow(&self.io, allocated + 1)
        {
            tracing::debug!(segment = %active.path.display(), %error, "growing the segment ahead of the writer failed");
        }
    }

    /// Prepares the spare segment once the active segment's records pass
    /// `SPARE_PREPARE_FILL_PERCENT` of the segment size and none is ready
    /// (`Segment::create_spare`: create, `fallocate`, header, `fdatasync`,
    /// here on the pool instead of on the appending thread). A failure
    /// (a full disk) is left to the writer, which then rolls inline and
    /// meets it again before writing; it is not tried again for the same
    /// active segment.
    pub(super) fn prepare_spare(&self, state: &mut FlusherState) {
        if self.spare.lock().is_some() {
            return;
        }
        let Some(active) = self.segments.read().last().cloned() else { return };
        if state.spare_failed_in == Some(active.base_offset) {
            return;
        }
        let size = active.size();
        if u128::from(active.written()) * 100 <= u128::from(size) * u128::from(SPARE_PREPARE_FILL_PERCENT) {
            return;
        }
        // Not under the `spare` lock: a roll meanwhile finds none and goes
        // inline; the file name is free (a roll renames it away under the
        // lock, before the slot reads empty).
        match Segment::create_spare(
            &self.io,
            &self.dir,
            segment::SPARE_FILE_NAME,
            self.options.segment_size,
            SEGMENT_HEADER_SIZE,
            true,
        ) {
            Ok(allocated) => *self.spare.lock() = Some(allocated),
            Err(error) => {
                state.spare_failed_in = Some(active.base_offset);
                tracing::debug!(dir = %self.dir.display(), %error, "preparing the spare segment failed");
            }
        }
    }
}
