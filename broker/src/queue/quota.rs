//! Publish quotas: a queue's producers together get at most
//! `max_publish_rate` messages and `max_publish_byte_rate` stored bytes per
//! second. This is the CPU side of the bulkheads: admission limits bound a
//! queue's disk and memory, a quota bounds the work its publishes cause, so
//! a flood on one queue cannot take the cores every other queue needs.
//!
//! The algorithm is GCRA (a token bucket kept as one instant per dimension,
//! the theoretical arrival time `tat`): a call costing `c` units at `r` per
//! second moves `tat` on by `c / r` seconds. It may go at once while `tat`
//! is at most [`QUOTA_BURST_MS`] ahead of now and otherwise waits until it
//! is, so producers are slowed, never dropped, while the wait is short. A
//! call whose turn is further away than its `max_wait` is refused and not
//! charged. Calls are charged when they are given their turn, whatever
//! admission decides next: a refused publish still cost the broker its
//! receipt and decoding, and a producer that ignores refusals must not be
//! able to spin.
//!
//! Lanes keep their priority inside the quota: each lane has its own line
//! (its own `tat`s), and a call is charged to its lane's line and to every
//! lower lane's line, but waits only on its own. A high-lane call so never
//! waits behind low-lane traffic, while low-lane calls see everything above
//! them and get what the higher lanes leave: under a high-lane flood they
//! are refused first. The lowest lane's line carries all traffic, and each
//! lane's calls are bounded by their own line, so all lanes together stay
//! within the quota (plus one burst allowance per lane).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::limits::QUOTA_BURST_MS;

/// A queue's publish quota.
#[derive(Debug)]
pub(crate) struct Quota {
    /// Seconds per message and per byte, as `f64` bits; 0 (no rate can
    /// give it): that dimension is free. Atomics, so an update of the
    /// queue's settings changes them live ([`Quota::set_rates`]).
    per_message: AtomicU64,
    per_byte: AtomicU64,
    /// Per lane, highest priority first: theoretical arrival times
    /// (messages, bytes).
    lines: Mutex<Vec<(Instant, Instant)>>,
}

/// Seconds per unit of a rate, as `f64` bits; 0 for no rate.
fn per_unit_bits(rate: u64) -> u64 {
    if rate == 0 { 0 } else { (1.0 / rate as f64).to_bits() }
}

fn per_unit(bits: u64) -> Option<f64> {
    (bits != 0).then(|| f64::from_bits(bits))
}

/// What a call gets from [`Quota::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Charged: go after waiting this long (zero: at once).
    Wait(Duration),
    /// The call's turn is `wait` away, beyond its `max_wait`: not charged.
    Refused { wait: Duration },
}

impl Quota {
    /// A quota of `messages_per_s` and `bytes_per_s` (each 0 for none) over
    /// `lanes` lanes.
    pub(crate) fn new(messages_per_s: u64, bytes_per_s: u64, lanes: usize, now: Instant) -> Quota {
        Quota {
            per_message: AtomicU64::new(per_unit_bits(messages_per_s)),
            per_byte: AtomicU64::new(per_unit_bits(bytes_per_s)),
            lines: Mutex::new(vec![(now, now); lanes.max(1)]),
        }
    }

    /// Changes the rates (each 0 for none) from the next call on; the
    /// lines keep their place, so calls already charged keep their turns.
    pub(crate) fn set_rates(&self, messages_per_s: u64, bytes_per_s: u64) {
        // Under the lines' lock: a reserve sees both old rates or both new.
        let _lines = self.lines.lock();
        self.per_message.store(per_unit_bits(messages_per_s), Ordering::Relaxed);
        self.per_byte.store(per_unit_bits(bytes_per_s), Ordering::Relaxed);
    }

    fn per_message(&self) -> Option<f64> {
        per_unit(self.per_message.load(Ordering::Relaxed))
    }

    fn per_byte(&self) -> Option<f64> {
        per_unit(self.per_byte.load(Ordering::Relaxed))
    }

    /// Whether the quota limits anything (if not, [`Quota::reserve`] always
    /// answers `Wait(0)` and publishes need not compute their cost).
    pub(crate) fn is_limited(&self) -> bool {
        self.per_message().is_some() || self.per_byte().is_some()
    }

    /// Whether calls must say their bytes (a byte rate is set).
    pub(crate) fn limits_bytes(&self) -> bool {
        self.per_byte().is_some()
    }

    /// Reserves the turn of a call arriving at `now` that waits on lane
    /// `waits_on`'s line (its lowest-priority lane) and costs `costs[lane] =
    /// (messages, bytes)` per lane, unless it would wait longer than
    /// `max_wait`. Line `j` is charged the messages of lanes `0..=j`, so a
    /// batch spanning lanes uses each higher lane's quota only for its own
    /// messages on it and above.
    pub(crate) fn reserve(&self, now: Instant, waits_on: usize, costs: &[(u64, u64)], max_wait: Duration) -> Turn {
        let burst = Duration::from_millis(QUOTA_BURST_MS);
        let mut lines = self.lines.lock();
        let (per_message, per_byte) = (self.per_message(), self.per_byte());
        let waits_on = waits_on.min(lines.len() - 1);
        let wait_for = |tat: Instant| tat.saturating_duration_since(now + burst);
        let own = lines[waits_on];
        let mut wait = Duration::ZERO;
        if per_message.is_some() {
            wait = wait.max(wait_for(own.0));
        }
        if per_byte.is_some() {
            wait = wait.max(wait_for(own.1));
        }
        if wait > max_wait {
            return Turn::Refused { wait };
        }
        let advance = |tat: Instant, per_unit: Option<f64>, units: u64| match per_unit {
            Some(per_unit) => {
                let cost = Duration::try_from_secs_f64(units as f64 * per_unit).unwrap_or(Duration::MAX);
                // A cost beyond what an `Instant` can hold saturates at a
                // century ahead: every later call is refused (with the
                // retry-after ceiling) until then. Only absurd settings get here.
                let century = Duration::from_secs(100 * 365 * 86_400);
                let from = tat.max(now);
                from.checked_add(cost).or_else(|| from.checked_add(century)).unwrap_or(from)
            }
            None => tat,
        };
        let (mut messages, mut bytes) = (0u64, 0u64);
        for (lane, line) in lines.iter_mut().enumerate() {
            let (m, b) = costs.get(lane).copied().unwrap_or((0, 0));
            messages = messages.saturating_add(m);
            bytes = bytes.saturating_add(b);
            if messages == 0 && bytes == 0 {
                continue;
            }
            line.0 = advance(line.0, per_message, messages);
            line.1 = advance(line.1, per_byte, bytes);
        }
        Turn::Wait(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const LONG: Duration = Duration::from_secs(3600);

    /// Costs of a call whose messages are all on `lane`.
    fn one(lane: usize, messages: u64, bytes: u64) -> Vec<(u64, u64)> {
        let mut costs = vec![(0, 0); lane + 1];
        costs[lane] = (messages, bytes);
        costs
    }

    fn waited(turn: Turn) -> Duration {
        match turn {
            Turn::Wait(wait) => wait,
            Turn::Refused { wait } => panic!("refused, {wait:?} away"),
        }
    }

    #[test]
    fn unlimited_never_waits() {
        let t0 = Instant::now();
        let quota = Quota::new(0, 0, 1, t0);
        assert!(!quota.is_limited());
        for _ in 0..1000 {
            assert_eq!(quota.reserve(t0, 0, &one(0, 1000, 1 << 30), Duration::ZERO), Turn::Wait(Duration::ZERO));
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_calls_are_spaced_at_the_rate() {
        let t0 = Instant::now();
        // 1,000 msg/s: 1 ms per message; the burst allowance is
        // QUOTA_BURST_MS, so that many single-message calls go at once.
        let quota = Quota::new(1000, 0, 1, t0);
        let burst = QUOTA_BURST_MS as u32;
        for i in 0..=burst {
            assert_eq!(waited(quota.reserve(t0, 0, &one(0, 1, 0), LONG)), Duration::ZERO, "call {i}");
        }
        for i in 1..=50u32 {
            assert_eq!(waited(quota.reserve(t0, 0, &one(0, 1, 0), LONG)), MS * i, "call {i} past the burst");
        }
        // Time passing pays the debt off.
        let later = t0 + MS * (burst + 51);
        assert_eq!(waited(quota.reserve(later, 0, &one(0, 1, 0), LONG)), Duration::ZERO);
    }

    #[test]
    fn an_idle_queue_takes_any_batch_at_once_and_the_next_call_pays() {
        let t0 = Instant::now();
        let quota = Quota::new(10, 0, 1, t0);
        // 1,000 messages at 10/s is 100 s of quota: it goes (an idle queue
        // never refuses a batch for being big), and the next call waits.
        assert_eq!(waited(quota.reserve(t0, 0, &one(0, 1000, 0), Duration::ZERO)), Duration::ZERO);
        match quota.reserve(t0, 0, &one(0, 1, 0), Duration::from_secs(1)) {
            Turn::Refused { wait } => assert_eq!(wait, Duration::from_secs(100) - MS * QUOTA_BURST_MS as u32),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_refused_call_is_not_charged() {
        let t0 = Instant::now();
        let quota = Quota::new(100, 0, 1, t0);
        let first = waited(quota.reserve(t0, 0, &one(0, 100, 0), LONG));
        assert_eq!(first, Duration::ZERO);
        let Turn::Refused { wait } = quota.reserve(t0, 0, &one(0, 1, 0), Duration::from_millis(10)) else { panic!() };
        for _ in 0..100 {
            assert_eq!(quota.reserve(t0, 0, &one(0, 1, 0), Duration::from_millis(10)), Turn::Refused { wait });
        }
    }

    #[test]
    fn the_slower_dimension_decides() {
        let t0 = Instant::now();
        // 1,000 msg/s and 10,000 B/s: 100-byte messages are byte-bound
        // (100/s), 1-byte messages message-bound (1,000/s).
        let quota = Quota::new(1000, 10_000, 1, t0);
        let burst = Duration::from_millis(QUOTA_BURST_MS);
        waited(quota.reserve(t0, 0, &one(0, 1, 100), LONG));
        let mut wait = Duration::ZERO;
        for _ in 0..20 {
            wait = waited(quota.reserve(t0, 0, &one(0, 1, 100), LONG));
        }
        // 21 calls of 100 B at 10 ms each: the 21st starts 200 ms in.
        assert_eq!(wait, Duration::from_millis(200) - burst);

        let quota = Quota::new(1000, 10_000, 1, t0);
        for _ in 0..21 {
            wait = waited(quota.reserve(t0, 0, &one(0, 1, 1), LONG));
        }
        assert_eq!(wait, Duration::ZERO, "21 ms of message quota is inside the burst");
    }

    #[test]
    fn absurd_costs_saturate_instead_of_panicking() {
        let t0 = Instant::now();
        let quota = Quota::new(1, 1, 1, t0);
        assert_eq!(waited(quota.reserve(t0, 0, &one(0, u64::MAX, u64::MAX), LONG)), Duration::ZERO);
        assert!(matches!(quota.reserve(t0, 0, &one(0, 1, 1), LONG), Turn::Refused { .. }));
    }

    #[test]
    fn a_higher_lane_does_not_wait_behind_a_lower_lanes_flood() {
        let t0 = Instant::now();
        // 100 msg/s, three lanes. Low takes 5 s of quota.
        let quota = Quota::new(100, 0, 3, t0);
        assert_eq!(waited(quota.reserve(t0, 2, &one(2, 500, 0), LONG)), Duration::ZERO);
        assert!(matches!(quota.reserve(t0, 2, &one(2, 1, 0), Duration::from_secs(1)), Turn::Refused { .. }));
        // High and normal go at once: nothing above them was charged.
        assert_eq!(waited(quota.reserve(t0, 0, &one(0, 5, 0), LONG)), Duration::ZERO);
        assert_eq!(waited(quota.reserve(t0, 1, &one(1, 5, 0), LONG)), Duration::ZERO);
    }

    #[test]
    fn a_lower_lane_gets_what_the_higher_lanes_leave() {
        let t0 = Instant::now();
        let quota = Quota::new(100, 0, 3, t0);
        let burst = Duration::from_millis(QUOTA_BURST_MS);
        // High takes 2 s of quota: normal and low are charged it too.
        assert_eq!(waited(quota.reserve(t0, 0, &one(0, 200, 0), LONG)), Duration::ZERO);
        assert_eq!(waited(quota.reserve(t0, 2, &one(2, 1, 0), LONG)), Duration::from_secs(2) - burst);
        // Normal waits behind high, not behind the low call (10 ms).
        assert_eq!(waited(quota.reserve(t0, 1, &one(1, 1, 0), LONG)), Duration::from_secs(2) - burst);
    }

    #[test]
    fn all_lanes_together_stay_within_the_quota() {
        // Every lane offers far more than the quota, one call each per
        // millisecond for 10 s; whatever is admitted over the whole run is
        // at most the quota plus one burst allowance per lane.
        let t0 = Instant::now();
        let quota = Quota::new(1000, 0, 3, t0);
        let mut admitted = [0u64; 3];
        for ms in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(ms));
            for (lane, admitted) in admitted.iter_mut().enumerate() {
                if let Turn::Wait(wait) = quota.reserve(now, lane, &one(lane, 1, 0), Duration::ZERO) {
                    assert_eq!(wait, Duration::ZERO);
                    *admitted += 1;
                }
            }
        }
        let total: u64 = admitted.iter().sum();
        let bound = 10_000 + 3 * (QUOTA_BURST_MS + 1);
        assert!(total <= bound, "{admitted:?} admitted, bound {bound}");
        // Strict priority: the high lane took the whole quota.
        assert!(admitted[0] >= 10_000, "{admitted:?}");
        assert!(admitted[2] <= QUOTA_BURST_MS + 1, "low gets only its burst: {admitted:?}");
    }

    #[test]
    fn a_batch_spanning_lanes_charges_each_line_with_the_lanes_above_it() {
        let t0 = Instant::now();
        let quota = Quota::new(100, 0, 3, t0);
        let burst = Duration::from_millis(QUOTA_BURST_MS);
        // 100 messages on each lane: line 0 is charged high's 100 (1 s),
        // line 1 high's and normal's (2 s), line 2 all 300 (3 s).
        assert_eq!(waited(quota.reserve(t0, 2, &[(100, 0), (100, 0), (100, 0)], LONG)), Duration::ZERO);
        for lane in 0..3 {
            let charged = Duration::from_secs(lane as u64 + 1);
            assert_eq!(waited(quota.reserve(t0, lane, &one(lane, 0, 0), LONG)), charged - burst, "lane {lane}");
        }
    }
}
