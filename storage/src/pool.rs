//! The flush pool: a bounded set of threads that does the background work
//! of every log using it (group commit, checkpoints, retention, journal
//! compaction, segment growth ahead of the writer), so the number of OS
//! threads does not depend on the number of logs.
//!
//! Rules:
//! 1. A log is run by at most one pool thread at a time, so "the flusher"
//!    of a log (the only code that syncs, checkpoints, compacts and removes
//!    its files) is still one sequential actor, as the log's rules require.
//! 2. Fairness: logs with work wait in one FIFO queue; a thread runs one
//!    cycle of a log and puts it back at the tail if it has more. A log
//!    whose fsync is slow holds one thread only; the others keep serving
//!    the rest of the queue.
//! 3. A wake-up is never lost: `schedule` on a log that is running marks it
//!    to run again when its cycle ends.
//! 4. Time-driven work (the `interval` and `none` policies' deadlines, the
//!    ack-journal retry after ENOSPC) is a timer that schedules the log when
//!    it is due. A log with no work holds no timer and costs nothing.
//! 5. Lock order: a job's `Slot` (scheduling) lock, then the pool's `state`
//!    lock; a pool thread never holds `state` while it runs a log.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    fmt,
    sync::{Arc, OnceLock, Weak},
    thread,
    time::Instant,
};

use parking_lot::{Condvar, Mutex};

use crate::limits::{FLUSH_THREADS_DEFAULT_MAX, FLUSH_THREADS_MAX, FLUSH_THREADS_MIN};

/// A handle on a flush pool. Clones share the pool; its threads end when the
/// last handle, and the last log opened with it, are gone.
#[derive(Clone)]
pub struct FlushPool {
    handle: Arc<Handle>,
}

/// The owner side: dropping the last one stops the threads once they are
/// idle.
struct Handle {
    pool: Arc<Pool>,
    threads: usize,
}

/// A log as the pool sees it: something that runs one step of its
/// background work.
pub(crate) trait Job: Send + Sync {
    /// Runs at most one cycle of work.
    fn step(&self) -> Step;
}

/// What a job asks for after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// It ran a cycle; run it again (at the tail of the queue).
    Ran,
    /// Nothing to do before this instant, or before it is scheduled.
    WaitUntil(Instant),
    /// Nothing to do until it is scheduled.
    Idle,
    /// It ended (closed or poisoned): never run it again until restarted.
    Finished,
}

/// A job's scheduling state, kept by the job and handed to the pool by
/// reference (rule 5: taken before the pool's lock).
#[derive(Debug, Default)]
pub(crate) struct Slot {
    state: Mutex<SlotState>,
    /// Signalled when the job finishes.
    finished_wake: Condvar,
}

#[derive(Debug, Default)]
struct SlotState {
    run: Run,
    /// The earliest timer armed for the job, if any.
    timer_at: Option<Instant>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Not queued, not running.
    #[default]
    Idle,
    /// In the ready queue.
    Queued,
    Running,
    /// Running, and scheduled again meanwhile.
    RunningAgain,
    Finished,
}

impl Slot {
    /// Whether a timer will schedule the job.
    pub(crate) fn timer_armed(&self) -> bool {
        self.state.lock().timer_at.is_some()
    }
}

/// Something a job holds to reach its slot and the pool.
pub(crate) trait Scheduled: Job {
    fn slot(&self) -> &Slot;
}

struct Pool {
    state: Mutex<PoolState>,
    wake: Condvar,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Arc<dyn Scheduled>>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// Tie-breaker of timers, so they order without comparing jobs.
    timer_seq: u64,
    shutdown: bool,
}

struct Timer {
    at: Instant,
    seq: u64,
    job: Weak<dyn Scheduled>,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Timer) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Timer) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    fn cmp(&self, other: &Timer) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl fmt::Debug for FlushPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlushPool").field("threads", &self.handle.threads).finish()
    }
}

impl FlushPool {
    /// A pool of `threads` threads, clamped to
    /// `FLUSH_THREADS_MIN..=FLUSH_THREADS_MAX`; 0 means the default
    /// ([`FlushPool::default_threads`]). Fails only if the OS refuses a
    /// thread.
    pub fn new(threads: usize) -> std::io::Result<FlushPool> {
        let threads = if threads == 0 {
            FlushPool::default_threads()
        } else {
            threads.clamp(FLUSH_THREADS_MIN, FLUSH_THREADS_MAX)
        };
        let pool = Arc::new(Pool { state: Mutex::new(PoolState::default()), wake: Condvar::new() });
        // Made first, so that the threads already started end if a later
        // one cannot start.
        let handle = Arc::new(Handle { pool: Arc::clone(&pool), threads });
        for index in 0..threads {
            let pool = Arc::clone(&pool);
            thread::Builder::new()
                .name(format!("ballast-flush-{index}"))
                .stack_size(256 * 1024)
                .spawn(move || pool.work())?;
        }
        Ok(FlushPool { handle })
    }

    /// The default size: the machine's cores, at least `FLUSH_THREADS_MIN`
    /// (so one slow fsync never holds up every other log) and at most
    /// `FLUSH_THREADS_DEFAULT_MAX`.
    pub fn default_threads() -> usize {
        thread::available_parallelism()
            .map_or(FLUSH_THREADS_MIN, |n| n.get())
            .clamp(FLUSH_THREADS_MIN, FLUSH_THREADS_DEFAULT_MAX)
    }

    /// The process-wide pool of the default size, used by logs opened
    /// without one; created on first use.
    pub fn shared() -> std::io::Result<FlushPool> {
        static SHARED: OnceLock<FlushPool> = OnceLock::new();
        if let Some(pool) = SHARED.get() {
            return Ok(pool.clone());
        }
        let pool = FlushPool::new(0)?;
        Ok(SHARED.get_or_init(|| pool).clone())
    }

    /// Whether both handles are the same pool.
    pub fn ptr_eq(&self, other: &FlushPool) -> bool {
        Arc::ptr_eq(&self.handle, &other.handle)
    }

    /// The number of threads.
    pub fn threads(&self) -> usize {
        self.handle.threads
    }

    /// Queues `job` to run a step, unless it is queued already (rule 3:
    /// a running job runs again after its step). A finished job is left
    /// alone until [`FlushPool::restart`].
    pub(crate) fn schedule(&self, job: &Arc<dyn Scheduled>) {
        self.handle.pool.schedule(job);
    }

    /// Makes a finished job schedulable again (after `Log::reopen`) and
    /// queues it.
    pub(crate) fn restart(&self, job: &Arc<dyn Scheduled>) {
        {
            let mut slot = job.slot().state.lock();
            assert_eq!(slot.run, Run::Finished, "only a finished job restarts");
            slot.run = Run::Idle;
            slot.timer_at = None;
        }
        self.schedule(job);
    }

    /// Blocks until `job` has finished (its last step returned
    /// [`Step::Finished`]).
    pub(crate) fn wait_finished(&self, job: &dyn Scheduled) {
        let slot = job.slot();
        let mut state = slot.state.lock();
        while state.run != Run::Finished {
            slot.finished_wake.wait(&mut state);
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.pool.state.lock().shutdown = true;
        self.pool.wake.notify_all();
    }
}

impl Pool {
    fn schedule(&self, job: &Arc<dyn Scheduled>) {
        let mut slot = job.slot().state.lock();
        match slot.run {
            Run::Idle => {
                slot.run = Run::Queued;
                self.state.lock().ready.push_back(Arc::clone(job));
                self.wake.notify_one();
            }
            Run::Running => slot.run = Run::RunningAgain,
            Run::Queued | Run::RunningAgain | Run::Finished => {}
        }
    }

    /// Arms a timer that schedules `job` at `at`, unless an earlier one is
    /// armed already.
    fn arm(&self, job: &Arc<dyn Scheduled>, slot: &mut SlotState, at: Instant) {
        if slot.timer_at.is_some_and(|armed| armed <= at) {
            return;
        }
        slot.timer_at = Some(at);
        let mut state = self.state.lock();
        state.timer_seq += 1;
        let seq = state.timer_seq;
        state.timers.push(Reverse(Timer { at, seq, job: Arc::downgrade(job) }));
        // A thread waiting for a later deadline must wait for this one.
        self.wake.notify_one();
    }

    /// A pool thread: takes the next job (or the next due timer), runs one
    /// step, and files the job by the step's answer.
    fn work(self: Arc<Pool>) {
        loop {
            let Some(job) = self.next_job() else { return };
            {
                let mut slot = job.slot().state.lock();
                debug_assert_eq!(slot.run, Run::Queued);
                slot.run = Run::Running;
            }
            let step = job.step();
            let slot_owner = job.slot();
            let mut slot = slot_owner.state.lock();
            let again = slot.run == Run::RunningAgain;
            match step {
                Step::Finished => {
                    slot.run = Run::Finished;
                    slot.timer_at = None;
                    slot_owner.finished_wake.notify_all();
                }
                Step::Ran => {
                    slot.run = Run::Queued;
                    self.state.lock().ready.push_back(Arc::clone(&job));
                    self.wake.notify_one();
                }
                Step::WaitUntil(_) | Step::Idle if again => {
                    slot.run = Run::Queued;
                    self.state.lock().ready.push_back(Arc::clone(&job));
                    self.wake.notify_one();
                }
                Step::WaitUntil(at) => {
                    slot.run = Run::Idle;
                    self.arm(&job, &mut slot, at);
                }
                Step::Idle => slot.run = Run::Idle,
            }
        }
    }

    /// The next job to run: the head of the ready queue, after moving every
    /// due timer's job onto it. Waits for work or the next deadline. `None`
    /// when the pool shuts down.
    fn next_job(&self) -> Option<Arc<dyn Scheduled>> {
        let mut state = self.state.lock();
        loop {
            if state.shutdown {
                return None;
            }
            let now = Instant::now();
            let mut due = Vec::new();
            while state.timers.peek().is_some_and(|Reverse(t)| t.at <= now) {
                let Reverse(timer) = state.timers.pop().expect("peeked");
                due.push(timer);
            }
            if !due.is_empty() {
                // Rule 5: slots are locked without the pool's lock.
                drop(state);
                for timer in due {
                    let Some(job) = timer.job.upgrade() else { continue };
                    {
                        let mut slot = job.slot().state.lock();
                        if slot.timer_at == Some(timer.at) {
                            slot.timer_at = None;
                        }
                    }
                    self.schedule(&job);
                }
                state = self.state.lock();
                continue;
            }
            if let Some(job) = state.ready.pop_front() {
                return Some(job);
            }
            match state.timers.peek().map(|Reverse(t)| t.at) {
                Some(at) => {
                    self.wake.wait_until(&mut state, at);
                }
                None => self.wake.wait(&mut state),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool size at the floor and the ceiling is kept; one past either
    /// is clamped to it; 0 is the default, which lies between them.
    #[test]
    fn threads_at_their_limits_and_one_past() {
        for (asked, got) in [
            (FLUSH_THREADS_MIN, FLUSH_THREADS_MIN),
            (FLUSH_THREADS_MIN - 1, FLUSH_THREADS_MIN),
            (FLUSH_THREADS_MAX, FLUSH_THREADS_MAX),
            (FLUSH_THREADS_MAX + 1, FLUSH_THREADS_MAX),
            (0, FlushPool::default_threads()),
        ] {
            assert_eq!(FlushPool::new(asked).unwrap().threads(), got, "asked for {asked}");
        }
        assert!((FLUSH_THREADS_MIN..=FLUSH_THREADS_DEFAULT_MAX).contains(&FlushPool::default_threads()));
    }
}
