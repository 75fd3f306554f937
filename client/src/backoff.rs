//! [`Backoff`] and [`RetryPolicy`]: how long to wait between attempts.
//!
//! Delays are exponential with full jitter (the AWS architecture blog's
//! "full jitter"): before retry `n` (0-based) the client sleeps a uniformly
//! random time in `[0, min(cap, base * 2^n)]`. Randomizing the whole interval
//! spreads the retries of many clients that failed together, so a broker
//! coming back is not hit by a synchronized wave. A broker's retry-after hint
//! is a floor on top of that: the delay is never shorter than the hint.

use std::time::Duration;

/// Exponential backoff with full jitter.
///
/// ```
/// use std::time::Duration;
/// use ballast_client::Backoff;
///
/// let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
/// assert_eq!(backoff.ceiling(0), Duration::from_millis(50));
/// assert_eq!(backoff.ceiling(3), Duration::from_millis(400));
/// assert_eq!(backoff.ceiling(30), Duration::from_secs(5));
///
/// let mut rng = fastrand::Rng::with_seed(7);
/// let delay = backoff.delay(3, &mut rng);
/// assert!(delay <= Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub base: Duration,
    /// Largest ceiling, however many retries came before.
    pub cap: Duration,
}

impl Backoff {
    /// A backoff starting at `base` and doubling up to `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap }
    }

    /// The largest delay before retry `retry` (0-based):
    /// `min(cap, base * 2^retry)`, without overflow.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.base.checked_mul(factor).map_or(self.cap, |ceiling| ceiling.min(self.cap))
    }

    /// A delay drawn uniformly from `[0, ceiling(retry)]` (full jitter).
    pub fn delay(&self, retry: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = u64::try_from(self.ceiling(retry).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.u64(0..=ceiling))
    }

    /// The delay before retry `retry` after a failure that carried a
    /// retry-after hint: the jittered delay, but never less than the hint.
    pub fn delay_after(&self, retry: u32, retry_after: Option<Duration>, rng: &mut fastrand::Rng) -> Duration {
        let delay = self.delay(retry, rng);
        match retry_after {
            Some(hint) => delay.max(hint),
            None => delay,
        }
    }
}

/// How often and how patiently a call is retried. Every call also has a
/// deadline; retries stop at whichever comes first.
///
/// ```
/// use std::time::Duration;
/// use ballast_client::{Backoff, RetryPolicy};
///
/// let patient = RetryPolicy {
///     attempts_max: 20,
///     backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
/// };
/// assert!(patient.attempts_max > RetryPolicy::default().attempts_max);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included; 1 disables retries.
    pub attempts_max: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
}

impl RetryPolicy {
    /// No retries: one attempt.
    pub const NONE: RetryPolicy =
        RetryPolicy { attempts_max: 1, backoff: Backoff::new(Duration::ZERO, Duration::ZERO) };
}

impl Default for RetryPolicy {
    /// 10 attempts, delays from 50 ms doubling up to 5 s (about 11 s of
    /// waiting at most before the jitter, within the default 30 s deadline).
    fn default() -> RetryPolicy {
        RetryPolicy { attempts_max: 10, backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every delay lies in [0, min(cap, base * 2^n)], for many seeds and
    /// retry counts; the draws are reproducible from the seed.
    #[test]
    fn full_jitter_stays_within_ceiling() {
        let backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(2));
        for seed in 0..64u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            for retry in 0..40 {
                let ceiling = Duration::from_millis(10).saturating_mul(1 << retry.min(31)).min(Duration::from_secs(2));
                assert_eq!(backoff.ceiling(retry), ceiling, "retry {retry}");
                let delay = backoff.delay(retry, &mut rng);
                assert!(delay <= ceiling, "seed {seed} retry {retry}: {delay:?} > {ceiling:?}");
            }
        }
        let draws = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            (0..10).map(|retry| backoff.delay(retry, &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42), "same seed, same delays");
    }

    /// Jitter actually spreads the delays: over many draws at one retry
    /// count both halves of the interval are used.
    #[test]
    fn full_jitter_spreads() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = fastrand::Rng::with_seed(1);
        let ceiling = backoff.ceiling(2);
        let delays: Vec<_> = (0..1000).map(|_| backoff.delay(2, &mut rng)).collect();
        assert!(delays.iter().any(|d| *d < ceiling / 2));
        assert!(delays.iter().any(|d| *d > ceiling / 2));
    }

    /// The broker's retry-after hint is a floor: the delay is never shorter,
    /// even when the jittered delay would be.
    #[test]
    fn retry_after_is_honoured() {
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(8));
        let mut rng = fastrand::Rng::with_seed(9);
        for retry in 0..10 {
            let hint = Duration::from_millis(250);
            let delay = backoff.delay_after(retry, Some(hint), &mut rng);
            assert!(delay >= hint, "retry {retry}: {delay:?} < {hint:?}");
        }
        // A hint shorter than the jitter leaves the jittered delay in range.
        let delay = backoff.delay_after(3, Some(Duration::ZERO), &mut rng);
        assert!(delay <= backoff.ceiling(3));
    }

    /// Huge retry counts and durations saturate at the cap instead of
    /// overflowing.
    #[test]
    fn ceiling_saturates() {
        let backoff = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::from_secs(60));
        assert_eq!(backoff.ceiling(0), Duration::from_secs(60));
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(60));
    }
}
