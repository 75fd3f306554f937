//! Delivery pacing: a queue's consumers together get at most
//! `max_delivery_rate` deliveries per second, however many attach, so a
//! fragile downstream is fed at the pace it can take. The shock absorber
//! on the consumer side: what is not delivered stays in the backlog, on
//! disk, and the figures say so.
//!
//! The algorithm is GCRA, as the publish quota's (`queue/quota.rs`): one
//! instant, the theoretical arrival time `tat` of the next delivery, moved
//! on by `1 / rate` seconds per delivery. A delivery may go while `tat` is
//! at most [`DELIVERY_PACE_BURST_MS`] ahead of now. Rules (all under the
//! queue's `delivery` mutex):
//! 1. Dispatch asks [`Pacer::wait`] before each delivery and charges
//!    [`Pacer::charge`] after it; the lane scheduler still picks the lane
//!    of every delivery the pace lets through, so lanes keep their weights
//!    inside the rate.
//! 2. When the pace stops a dispatch that had credit and messages waiting,
//!    the queue is *paced*: [`Pacer::pace`] notes when the next delivery
//!    may go, and the queue's timer task runs dispatch then. No task or
//!    timer per message, no busy loop: one wake-up per token at most.
//! 3. Memory is one `Pacer` per queue, whatever the rate or backlog.

use std::time::{Duration, Instant};

use crate::limits::{DELIVERY_PACE_BURST_MS, MAX_DELIVERY_RATE_MAX};

// A delivery's interval is a whole, non-zero number of nanoseconds.
const _: () = assert!(MAX_DELIVERY_RATE_MAX <= 1_000_000_000);

/// A queue's delivery pace and its figures.
#[derive(Debug)]
pub(crate) struct Pacer {
    /// Theoretical arrival time of the next delivery.
    tat: Instant,
    /// When the current paced stretch began; `None` while not paced.
    paced_since: Option<Instant>,
    /// Paced time of the stretches that ended.
    paced_total: Duration,
    /// Deliveries the consumers could take at the last paced dispatch
    /// (their credit, up to the messages waiting) that the pace held back.
    held_back: u64,
    /// While paced: when (Unix ms) the timer should run dispatch again.
    resume_ms: Option<u64>,
}

/// Pacing figures of a queue now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacingFigures {
    /// Delivery is being held back by `max_delivery_rate` now.
    pub paced: bool,
    /// Time spent paced since the broker started, in milliseconds.
    pub paced_ms: u64,
    /// Deliveries the consumers could take now that the pace holds back
    /// (0 when not paced): the backlog the pace keeps.
    pub held_back: u64,
}

impl Pacer {
    pub(crate) fn new(now: Instant) -> Pacer {
        Pacer { tat: now, paced_since: None, paced_total: Duration::ZERO, held_back: 0, resume_ms: None }
    }

    /// How long the next delivery must wait under `rate` deliveries per
    /// second (0: no pace), or `None` if it may go now.
    pub(crate) fn wait(&self, rate: u64, now: Instant) -> Option<Duration> {
        if rate == 0 {
            return None;
        }
        let limit = now + Duration::from_millis(DELIVERY_PACE_BURST_MS);
        (self.tat > limit).then(|| self.tat - limit)
    }

    /// Charges one delivery under `rate` (0: nothing to charge).
    pub(crate) fn charge(&mut self, rate: u64, now: Instant) {
        // Whole nanoseconds: at most 1 ns per delivery fast, which is 0.1%
        // at the ceiling rate. No rate (0): nothing to charge.
        if let Some(interval_ns) = 1_000_000_000u64.checked_div(rate) {
            self.tat = self.tat.max(now) + Duration::from_nanos(interval_ns);
        }
    }

    /// Notes that the pace stopped a dispatch at `now` with `held_back`
    /// deliveries wanted; the next may go after `wait` (at `now_ms` +
    /// `wait`, rounded up to the millisecond).
    pub(crate) fn pace(&mut self, now: Instant, now_ms: u64, wait: Duration, held_back: u64) {
        self.paced_since.get_or_insert(now);
        self.held_back = held_back;
        let wait_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
        self.resume_ms = Some(now_ms.saturating_add(wait_ms.max(1)));
    }

    /// Notes that a dispatch ended at `now` for another reason than the
    /// pace (no credit, no message): a paced stretch ends.
    pub(crate) fn unpace(&mut self, now: Instant) {
        if let Some(since) = self.paced_since.take() {
            self.paced_total += now.saturating_duration_since(since);
        }
        self.held_back = 0;
        self.resume_ms = None;
    }

    /// When the timer should run dispatch again, while paced.
    pub(crate) fn resume_ms(&self) -> Option<u64> {
        self.resume_ms
    }

    pub(crate) fn figures(&self, now: Instant) -> PacingFigures {
        let current = self.paced_since.map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
        PacingFigures {
            paced: self.paced_since.is_some(),
            paced_ms: u64::try_from((self.paced_total + current).as_millis()).unwrap_or(u64::MAX),
            held_back: self.held_back,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deliveries as fast as the pace lets them go, over `seconds` of
    /// simulated time in 1 ms steps: how many went.
    fn delivered(rate: u64, seconds: u64) -> u64 {
        let start = Instant::now();
        let mut pacer = Pacer::new(start);
        let mut count = 0;
        for ms in 0..seconds * 1000 {
            let now = start + Duration::from_millis(ms);
            while pacer.wait(rate, now).is_none() {
                pacer.charge(rate, now);
                count += 1;
            }
        }
        count
    }

    /// Over 5 s the pace lets through the rate times 5 s plus one burst
    /// allowance (100 ms of the rate, at least one delivery), at every rate.
    #[test]
    fn the_pace_holds_the_rate_plus_one_burst() {
        for rate in [1, 7, 200, 1000, 20_000] {
            let burst = (rate * DELIVERY_PACE_BURST_MS).div_ceil(1000).max(1);
            let count = delivered(rate, 5);
            let expected = rate * 5 + burst;
            assert!(
                count.abs_diff(expected) <= 1 + expected / 1000,
                "rate {rate}: {count} delivered, expected {expected}"
            );
        }
        assert_eq!(Pacer::new(Instant::now()).wait(0, Instant::now()), None, "0 is no pace");
    }

    /// A stretch paced counts from its first paced dispatch to the dispatch
    /// that ends it; the wake-up is the wait rounded up to the millisecond.
    #[test]
    fn paced_time_is_counted_by_stretch() {
        let start = Instant::now();
        let mut pacer = Pacer::new(start);
        pacer.pace(start, 1000, Duration::from_micros(4200), 7);
        assert_eq!(pacer.resume_ms(), Some(1005));
        pacer.pace(start + Duration::from_millis(5), 1005, Duration::from_micros(10), 6);
        assert_eq!(pacer.resume_ms(), Some(1006));
        let figures = pacer.figures(start + Duration::from_millis(20));
        assert_eq!(figures, PacingFigures { paced: true, paced_ms: 20, held_back: 6 });
        pacer.unpace(start + Duration::from_millis(30));
        assert_eq!(
            pacer.figures(start + Duration::from_secs(9)),
            PacingFigures { paced: false, paced_ms: 30, held_back: 0 }
        );
        assert_eq!(pacer.resume_ms(), None);
    }
}
