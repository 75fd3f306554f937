//! `Commit`: when an append or ack is durable, and the sequences the
//! flusher advances (`CommitState`), across reopens (epochs).

use super::*;

#[derive(Default)]
pub(super) struct CommitState {
    pub(super) data_written: u64,
    pub(super) data_synced: u64,
    pub(super) acks_written: u64,
    pub(super) acks_synced: u64,
    /// Segments written since the last sync.
    pub(super) dirty: Vec<Arc<Segment>>,
    /// The end of the data written so far (what a checkpoint would record).
    pub(super) point: Option<Point>,
    pub(super) bytes_since_checkpoint: u64,
    /// A roll renamed or created a segment file since the last sync: the
    /// next cycle syncs the directory before it resolves any commit.
    pub(super) dir_dirty: bool,
    /// Wakers of pending commits.
    pub(super) waiters: Vec<(Track, u64, Waker)>,
    pub(super) error: Option<SyncError>,
    /// Which reopen this state belongs to (0: since open). Sequences
    /// restart at each reopen; a commit of an earlier epoch resolves from
    /// `ended`.
    pub(super) epoch: u64,
    /// The last epochs that ended poisoned (at most `ENDED_EPOCHS_KEPT`).
    pub(super) ended: Vec<EndedEpoch>,
    pub(super) shutdown: bool,
    /// `Log::sync` asked for a cycle now, whatever the policy's timing.
    pub(super) sync_requested: bool,
}

/// How an epoch of a log ended: what was synced before its poisoning.
#[derive(Debug, Clone)]
pub(super) struct EndedEpoch {
    pub(super) epoch: u64,
    pub(super) data_synced: u64,
    pub(super) acks_synced: u64,
    pub(super) error: SyncError,
}

/// Ended epochs remembered for commits still pending across a reopen; a
/// commit older than these fails (its log was poisoned twice since).
pub(super) const ENDED_EPOCHS_KEPT: usize = 8;

/// Which sequence a commit waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Track {
    Data,
    Acks,
}

/// Resolves when an append (or ack) is durable under the log's sync policy.
/// Use [`Commit::wait`] to block, or `.await` it: it is a plain
/// `std::future::Future`, tied to no runtime.
#[must_use = "a commit says when the data is durable; acknowledge only after it resolves"]
pub struct Commit {
    pub(super) state: CommitInner,
}

pub(super) enum CommitInner {
    Ready,
    Pending { shared: Arc<Shared>, track: Track, seq: u64, epoch: u64 },
}

impl fmt::Debug for Commit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            CommitInner::Ready => f.write_str("Commit(ready)"),
            CommitInner::Pending { track, seq, epoch, .. } => write!(f, "Commit({track:?} #{seq}, epoch {epoch})"),
        }
    }
}

impl Commit {
    pub(super) fn ready() -> Commit {
        Commit { state: CommitInner::Ready }
    }

    /// Blocks until durable, or until the log is poisoned.
    pub fn wait(self) -> Result<(), SyncError> {
        let CommitInner::Pending { shared, track, seq, epoch } = self.state else {
            return Ok(());
        };
        let mut commit = shared.commit.lock();
        loop {
            if let Some(done) = commit.resolved(track, seq, epoch) {
                return done;
            }
            shared.waiter_wake.wait(&mut commit);
        }
    }

    /// Whether the commit has resolved (successfully or not).
    pub fn is_resolved(&self) -> bool {
        match &self.state {
            CommitInner::Ready => true,
            CommitInner::Pending { shared, track, seq, epoch } => {
                shared.commit.lock().resolved(*track, *seq, *epoch).is_some()
            }
        }
    }
}

impl Future for Commit {
    type Output = Result<(), SyncError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let CommitInner::Pending { shared, track, seq, epoch } = &self.state else {
            return Poll::Ready(Ok(()));
        };
        let mut commit = shared.commit.lock();
        if let Some(done) = commit.resolved(*track, *seq, *epoch) {
            return Poll::Ready(done);
        }
        commit.waiters.push((*track, *seq, cx.waker().clone()));
        Poll::Pending
    }
}

impl CommitState {
    pub(super) fn resolved(&self, track: Track, seq: u64, epoch: u64) -> Option<Result<(), SyncError>> {
        if epoch != self.epoch {
            // Its epoch ended poisoned: durable only if synced before that.
            let ended = self.ended.iter().find(|e| e.epoch == epoch).or(self.ended.first());
            let ended = ended.expect("an earlier epoch ended poisoned");
            let synced = match track {
                Track::Data => ended.data_synced,
                Track::Acks => ended.acks_synced,
            };
            return Some(if ended.epoch == epoch && synced >= seq { Ok(()) } else { Err(ended.error.clone()) });
        }
        let synced = match track {
            Track::Data => self.data_synced,
            Track::Acks => self.acks_synced,
        };
        if synced >= seq { Some(Ok(())) } else { self.error.clone().map(Err) }
    }
}
