//! [`CircuitBreaker`]: fail fast while the broker is dead or failing.
//!
//! Admission refusals are not failures here: the broker is alive and paces
//! its clients with a retry-after hint (see `retry`, rule 5).
//!
//! Without a breaker, every caller of a dead broker waits out its own
//! deadline and retries, and calls pile up. The breaker watches outcomes and,
//! after enough failures, refuses calls locally for a while.
//!
//! States and transitions (all times from the injected [`Clock`]):
//!
//! 1. Closed: calls pass. A retryable failure is recorded; a success clears
//!    the record. When `failure_threshold` failures lie within the last
//!    `failure_window`, the breaker opens.
//! 2. Open: calls fail at once with [`Error::CircuitOpen`](crate::Error). After
//!    `open_duration` the next call moves the breaker to half-open.
//! 3. Half-open: up to `half_open_probes` calls pass as probes; others fail
//!    fast. A probe that succeeds closes the breaker; a probe that fails opens
//!    it again for another `open_duration`. A probe that ends without a
//!    verdict (a non-retryable error, a cancelled call) frees its slot.
//!
//! Only outcomes of the current state count: a call admitted while closed
//! that finishes after the breaker opened changes nothing. Each transition
//! bumps a generation number that permits carry, which makes this exact.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::clock::{Clock, SystemClock};

/// Thresholds of a [`CircuitBreaker`].
///
/// ```
/// use std::time::Duration;
/// use ballast_client::BreakerConfig;
///
/// let config = BreakerConfig { failure_threshold: 3, ..BreakerConfig::default() };
/// assert_eq!(config.open_duration, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures within `failure_window` that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How far back failures count.
    pub failure_window: Duration,
    /// How long the breaker stays open before letting probes through.
    pub open_duration: Duration,
    /// Calls let through at once while half-open (at least 1).
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// Opens after 5 failures within 10 s, stays open 5 s, then lets 1 probe
    /// through.
    fn default() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 5,
            failure_window: Duration::from_secs(10),
            open_duration: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

/// The state of a [`CircuitBreaker`], for display and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls fail fast.
    Open,
    /// A limited number of probe calls pass.
    HalfOpen,
}

/// A circuit breaker (see the module docs for the state machine).
///
/// ```
/// use ballast_client::{BreakerConfig, BreakerState, CircuitBreaker};
///
/// let breaker = CircuitBreaker::new(BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() });
/// breaker.acquire().expect("closed").failure();
/// breaker.acquire().expect("closed").failure();
/// assert_eq!(breaker.state(), BreakerState::Open);
/// assert!(breaker.acquire().is_err(), "an open breaker fails fast");
/// ```
#[derive(Debug)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
}

/// Proof that the breaker let a call through. Report the outcome with
/// [`Permit::success`] or [`Permit::failure`]; dropping it reports nothing.
#[derive(Debug)]
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    /// Generation of the state that admitted the call.
    generation: u64,
    /// Whether the call is a half-open probe (holds a probe slot).
    probe: bool,
    /// Whether an outcome was reported (so drop frees nothing).
    reported: bool,
}

/// The breaker refused a call; try again after `retry_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerRefusal {
    /// Time until the breaker lets a probe through (zero when the probe slots
    /// are busy and the answer depends on the probes).
    pub retry_in: Duration,
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// Bumped on every transition; permits of older generations are ignored.
    generation: u64,
}

#[derive(Debug)]
enum State {
    Closed {
        /// Times of recent failures, oldest first; at most `failure_threshold`.
        failures: VecDeque<Instant>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probes_in_flight: u32,
    },
}

impl CircuitBreaker {
    /// A closed breaker on the system clock.
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker::with_clock(config, Arc::new(SystemClock))
    }

    /// A closed breaker on the given clock.
    pub fn with_clock(config: BreakerConfig, clock: Arc<dyn Clock>) -> CircuitBreaker {
        assert!(config.failure_threshold >= 1, "failure_threshold must be at least 1");
        assert!(config.half_open_probes >= 1, "half_open_probes must be at least 1");
        CircuitBreaker {
            config,
            clock,
            inner: Mutex::new(Inner { state: State::Closed { failures: VecDeque::new() }, generation: 0 }),
        }
    }

    /// The current state. An open breaker whose time is up reports
    /// half-open: the next call will be a probe.
    pub fn state(&self) -> BreakerState {
        let inner = self.lock();
        match inner.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until } if self.clock.now() < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Fails fast if the breaker would refuse a call now, without taking a
    /// probe slot. Used before queueing work, so a dead broker does not
    /// collect a backlog of doomed calls.
    pub fn check(&self) -> Result<(), BreakerRefusal> {
        let inner = self.lock();
        let now = self.clock.now();
        match inner.state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(BreakerRefusal { retry_in: until - now }),
            State::Open { .. } => Ok(()),
            State::HalfOpen { probes_in_flight } if probes_in_flight < self.config.half_open_probes => Ok(()),
            State::HalfOpen { .. } => Err(BreakerRefusal { retry_in: Duration::ZERO }),
        }
    }

    /// Asks to make a call. Closed: always granted. Open: refused until
    /// `open_duration` has passed, then the breaker turns half-open. Half-open:
    /// granted as a probe while a probe slot is free.
    pub fn acquire(&self) -> Result<Permit<'_>, BreakerRefusal> {
        let mut inner = self.lock();
        let now = self.clock.now();
        if let State::Open { until } = inner.state {
            if now < until {
                return Err(BreakerRefusal { retry_in: until - now });
            }
            inner.transition(State::HalfOpen { probes_in_flight: 0 });
        }
        let generation = inner.generation;
        match &mut inner.state {
            State::Closed { .. } => Ok(Permit { breaker: self, generation, probe: false, reported: false }),
            State::HalfOpen { probes_in_flight } => {
                if *probes_in_flight >= self.config.half_open_probes {
                    return Err(BreakerRefusal { retry_in: Duration::ZERO });
                }
                *probes_in_flight += 1;
                Ok(Permit { breaker: self, generation, probe: true, reported: false })
            }
            State::Open { .. } => unreachable!("an open breaker was turned half-open above"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The lock guards plain data with no invariant spanning a panic, so a
        // poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, generation: u64, probe: bool, outcome: Outcome) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        let now = self.clock.now();
        let config = self.config;
        match (&mut inner.state, outcome) {
            (State::Closed { failures }, Outcome::Success) => failures.clear(),
            (State::Closed { failures }, Outcome::Failure) => {
                while failures.front().is_some_and(|at| now.saturating_duration_since(*at) > config.failure_window) {
                    failures.pop_front();
                }
                failures.push_back(now);
                let threshold = usize::try_from(config.failure_threshold).unwrap_or(usize::MAX);
                if failures.len() >= threshold {
                    inner.transition(State::Open { until: now + config.open_duration });
                }
            }
            (State::Closed { .. }, Outcome::Neutral) => {}
            (State::HalfOpen { probes_in_flight }, outcome) => {
                assert!(probe, "only probes are admitted while half-open");
                assert!(*probes_in_flight > 0, "a probe reported with no probe in flight");
                match outcome {
                    Outcome::Success => inner.transition(State::Closed { failures: VecDeque::new() }),
                    Outcome::Failure => inner.transition(State::Open { until: now + config.open_duration }),
                    Outcome::Neutral => *probes_in_flight -= 1,
                }
            }
            (State::Open { .. }, _) => unreachable!("no permit is issued in the generation of an open state"),
        }
    }
}

impl Inner {
    fn transition(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Neutral,
}

impl Permit<'_> {
    /// The call succeeded: a closed breaker forgets its failures, a probe
    /// closes the breaker.
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.record(self.generation, self.probe, Outcome::Success);
    }

    /// The call failed in a way that says the broker is unhealthy
    /// (unreachable, unavailable, timing out).
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.record(self.generation, self.probe, Outcome::Failure);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker.record(self.generation, self.probe, Outcome::Neutral);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn breaker(config: BreakerConfig) -> (CircuitBreaker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        (CircuitBreaker::with_clock(config, clock.clone()), clock)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            failure_window: Duration::from_secs(10),
            open_duration: Duration::from_secs(5),
            half_open_probes: 2,
        }
    }

    fn fail(breaker: &CircuitBreaker) {
        breaker.acquire().expect("breaker admits the call").failure();
    }

    /// Closed -> open after `failure_threshold` failures within the window.
    #[test]
    fn opens_after_threshold_failures_in_window() {
        let (breaker, _clock) = breaker(config());
        fail(&breaker);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Closed);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    /// Failures older than the window do not count towards the threshold.
    #[test]
    fn old_failures_fall_out_of_the_window() {
        let (breaker, clock) = breaker(config());
        fail(&breaker);
        fail(&breaker);
        clock.advance(Duration::from_secs(11));
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Closed, "two of the three failures are too old");
        fail(&breaker);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    /// A success in the closed state clears the failure record.
    #[test]
    fn success_clears_failures() {
        let (breaker, _clock) = breaker(config());
        fail(&breaker);
        fail(&breaker);
        breaker.acquire().expect("closed").success();
        fail(&breaker);
        fail(&breaker);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// While open, calls fail fast with the time left until a probe.
    #[test]
    fn open_fails_fast() {
        let (breaker, clock) = breaker(config());
        (0..3).for_each(|_| fail(&breaker));
        let rejected = breaker.acquire().expect_err("open breaker refuses");
        assert_eq!(rejected.retry_in, Duration::from_secs(5));
        assert!(breaker.check().is_err());
        clock.advance(Duration::from_secs(2));
        assert_eq!(breaker.acquire().expect_err("still open").retry_in, Duration::from_secs(3));
    }

    /// After the open duration, half-open admits exactly `half_open_probes`
    /// calls; one probe success closes the breaker.
    #[test]
    fn half_open_probes_then_close() {
        let (breaker, clock) = breaker(config());
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(5));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let first = breaker.acquire().expect("first probe");
        let second = breaker.acquire().expect("second probe");
        assert_eq!(breaker.acquire().expect_err("probe slots are full").retry_in, Duration::ZERO);
        assert!(breaker.check().is_err());
        first.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        // The other probe finishing late changes nothing.
        second.failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.acquire().expect("closed again").success();
    }

    /// A failed probe re-opens the breaker for a fresh open duration.
    #[test]
    fn probe_failure_reopens() {
        let (breaker, clock) = breaker(config());
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(6));
        breaker.acquire().expect("probe").failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.acquire().expect_err("reopened").retry_in, Duration::from_secs(5));
        clock.advance(Duration::from_secs(5));
        breaker.acquire().expect("probe again").success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// A probe dropped without a verdict frees its slot and leaves the
    /// breaker half-open.
    #[test]
    fn neutral_probe_frees_slot() {
        let (breaker, clock) = breaker(BreakerConfig { half_open_probes: 1, ..config() });
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(5));
        let probe = breaker.acquire().expect("probe");
        assert!(breaker.acquire().is_err());
        drop(probe);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.acquire().expect("slot freed").success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// Outcomes of calls admitted in an earlier state are ignored: a call
    /// admitted while closed cannot close (or re-open) a later state.
    #[test]
    fn stale_permits_are_ignored() {
        let (breaker, clock) = breaker(config());
        let slow = breaker.acquire().expect("closed");
        (0..3).for_each(|_| fail(&breaker));
        slow.success();
        assert_eq!(breaker.state(), BreakerState::Open, "a stale success does not close");
        clock.advance(Duration::from_secs(5));
        let late = breaker.acquire().expect("probe");
        late.success();
        let stale = breaker.acquire().expect("closed");
        (0..3).for_each(|_| fail(&breaker));
        clock.advance(Duration::from_secs(5));
        let probe = breaker.acquire().expect("probe");
        stale.failure();
        assert_eq!(breaker.state(), BreakerState::HalfOpen, "a stale failure does not re-open");
        probe.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
