//! [`Retrier`]: runs one logical call as attempts within a deadline, with
//! backoff, the broker's retry-after hint and an optional circuit breaker.
//!
//! Rules, in order, for each attempt:
//!
//! 1. Past the deadline, stop with [`Error::DeadlineExceeded`] (carrying the
//!    last failure).
//! 2. Ask the breaker (if any); an open breaker stops the call at once with
//!    [`Error::CircuitOpen`].
//! 3. Run the attempt, bounded by `min(deadline, now + attempt_timeout)`.
//! 4. Success ends the call. A non-retryable error ends it too and says
//!    nothing to the breaker (the broker is healthy; the request was wrong).
//! 5. A refusal (`RESOURCE_EXHAUSTED`) counts as a breaker success: the
//!    broker is alive and paces the client with its retry-after hint, and a
//!    breaker opened by a full low lane would fail the queue's other lanes
//!    too. Any other retryable error counts as a breaker failure. If attempts
//!    remain and the backoff delay (never shorter than a retry-after hint)
//!    ends before the deadline, sleep and go again; otherwise return that
//!    error.
//!
//! The caller makes each attempt send the same request: a publish reuses its
//! idempotency keys, so a retry after a lost answer is stored once.

use std::{future::Future, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::{Error, RetryPolicy, breaker::CircuitBreaker};

#[derive(Debug)]
pub(crate) struct Retrier {
    policy: RetryPolicy,
    attempt_timeout: Duration,
    /// Jitter source; seeded for reproducible tests.
    rng: Mutex<fastrand::Rng>,
}

impl Retrier {
    pub(crate) fn new(policy: RetryPolicy, attempt_timeout: Duration, seed: Option<u64>) -> Retrier {
        let rng = seed.map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
        Retrier { policy, attempt_timeout, rng: Mutex::new(rng) }
    }

    /// Runs `attempt` until it succeeds or the rules above stop it. `budget`
    /// is the call's whole time allowance, named in a deadline error.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        deadline: Instant,
        budget: Duration,
        breaker: Option<&CircuitBreaker>,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut retry: u32 = 0;
        let mut last: Option<Error> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(deadline_exceeded(budget, last));
            }
            let permit = match breaker {
                Some(breaker) => {
                    Some(breaker.acquire().map_err(|rejected| Error::CircuitOpen { retry_in: rejected.retry_in })?)
                }
                None => None,
            };
            let attempt_deadline = deadline.min(now + self.attempt_timeout);
            let error = match tokio::time::timeout_at(attempt_deadline, attempt()).await {
                Ok(Ok(value)) => {
                    if let Some(permit) = permit {
                        permit.success();
                    }
                    return Ok(value);
                }
                Ok(Err(error)) => error,
                Err(_elapsed) if attempt_deadline >= deadline => {
                    if let Some(permit) = permit {
                        permit.failure();
                    }
                    return Err(deadline_exceeded(budget, last));
                }
                Err(_elapsed) => Error::DeadlineExceeded { timeout: Some(self.attempt_timeout), last_error: None },
            };
            if let Some(permit) = permit {
                match &error {
                    // A refusal is admission control answering: the broker
                    // is alive and has said when to come back, which the
                    // delay below honours. As a failure it would open the
                    // queue's breaker over a full low lane and fail the
                    // high-lane publishes the broker still admits.
                    Error::ResourceExhausted { .. } => permit.success(),
                    // A cluster follower naming its leader (the next
                    // attempt goes there): the broker answered; neither a
                    // failure nor a success.
                    Error::NotLeader { .. } => drop(permit),
                    error if error.is_retryable() => permit.failure(),
                    // Dropped: the request was wrong, the broker is fine.
                    _ => drop(permit),
                }
            }
            if !error.is_retryable() {
                return Err(error);
            }
            retry += 1;
            if retry >= self.policy.attempts_max {
                return Err(error);
            }
            let delay = {
                let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let floor = match &error {
                    Error::Unavailable { .. } => Some(crate::contract::UNAVAILABLE_RETRY_FLOOR),
                    error => error.retry_after(),
                };
                self.policy.backoff.delay_after(retry - 1, floor, &mut rng)
            };
            if Instant::now() + delay >= deadline {
                return Err(error);
            }
            tracing::debug!(retry, delay_ms = delay.as_millis(), %error, "retrying");
            last = Some(error);
            tokio::time::sleep(delay).await;
        }
    }
}

fn deadline_exceeded(budget: Duration, last: Option<Error>) -> Error {
    Error::DeadlineExceeded { timeout: Some(budget), last_error: last.map(Box::new) }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;
    use crate::{Backoff, BreakerConfig, BreakerState, clock::ManualClock};

    fn retrier(attempts_max: u32) -> Retrier {
        let policy =
            RetryPolicy { attempts_max, backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(100)) };
        Retrier::new(policy, Duration::from_secs(1), Some(7))
    }

    fn unavailable() -> Error {
        Error::Unavailable { message: "down".into() }
    }

    /// Retryable failures are retried until an attempt succeeds.
    #[tokio::test(start_paused = true)]
    async fn retries_until_success() {
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let value = retrier(5)
            .run(deadline, Duration::from_secs(30), None, || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 { Err(unavailable()) } else { Ok(42) }
            })
            .await
            .expect("fourth attempt succeeds");
        assert_eq!(value, 42);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// Non-retryable errors end the call after one attempt.
    #[tokio::test(start_paused = true)]
    async fn non_retryable_is_not_retried() {
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let error = retrier(5)
            .run(deadline, Duration::from_secs(30), None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::NotFound { message: "no queue".into() })
            })
            .await
            .expect_err("not found");
        assert!(matches!(error, Error::NotFound { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// The attempt limit stops retries and returns the last error.
    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let error = retrier(3)
            .run(deadline, Duration::from_secs(30), None, || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(unavailable())
            })
            .await
            .expect_err("always unavailable");
        assert!(matches!(error, Error::Unavailable { .. }));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// The wait after a refusal is at least the broker's retry-after hint,
    /// however small the backoff.
    #[tokio::test(start_paused = true)]
    async fn waits_at_least_retry_after() {
        let hint = Duration::from_millis(700);
        let times = Mutex::new(Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        retrier(3)
            .run(deadline, Duration::from_secs(30), None, || {
                let mut times = times.lock().expect("not poisoned");
                times.push(Instant::now());
                let first = times.len() == 1;
                async move {
                    if first {
                        Err(Error::ResourceExhausted { message: "full".into(), retry_after: Some(hint), refusal: None })
                    } else {
                        Ok(())
                    }
                }
            })
            .await
            .expect("second attempt succeeds");
        let times = times.into_inner().expect("not poisoned");
        assert_eq!(times.len(), 2);
        assert!(times[1] - times[0] >= hint, "waited {:?} < {hint:?}", times[1] - times[0]);
    }

    /// A retry-after beyond the deadline returns the refusal at once instead
    /// of sleeping past the deadline.
    #[tokio::test(start_paused = true)]
    async fn retry_after_past_deadline_returns_refusal() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1);
        let error = retrier(5)
            .run(deadline, Duration::from_secs(1), None, || async {
                Err::<(), _>(Error::ResourceExhausted {
                    message: "full".into(),
                    retry_after: Some(Duration::from_secs(5)),
                    refusal: None,
                })
            })
            .await
            .expect_err("refused");
        assert!(matches!(error, Error::ResourceExhausted { .. }), "{error:?}");
        assert!(Instant::now() - start < Duration::from_secs(1));
    }

    /// An attempt that hangs is cut at the deadline with DeadlineExceeded
    /// naming the budget.
    #[tokio::test(start_paused = true)]
    async fn hung_attempt_hits_deadline() {
        let deadline = Instant::now() + Duration::from_millis(500);
        let error = retrier(5)
            .run(deadline, Duration::from_millis(500), None, std::future::pending::<Result<(), Error>>)
            .await
            .expect_err("hangs");
        assert!(matches!(error, Error::DeadlineExceeded { timeout: Some(t), .. } if t == Duration::from_millis(500)));
        assert!(error.is_retryable());
    }

    /// Failures feed the breaker; once open, the call fails fast with
    /// CircuitOpen; non-retryable errors do not count.
    #[tokio::test(start_paused = true)]
    async fn breaker_opens_and_fails_fast() {
        let config = BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() };
        let breaker = CircuitBreaker::with_clock(config, Arc::new(ManualClock::new()));
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let error = retrier(10)
            .run(deadline, Duration::from_secs(30), Some(&breaker), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(unavailable())
            })
            .await
            .expect_err("breaker opens");
        assert!(matches!(error, Error::CircuitOpen { .. }), "{error:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the third attempt never reached the broker");
        assert_eq!(breaker.state(), BreakerState::Open);

        let breaker = CircuitBreaker::with_clock(config, Arc::new(ManualClock::new()));
        for _ in 0..5 {
            let _ = retrier(1)
                .run(deadline, Duration::from_secs(30), Some(&breaker), || async {
                    Err::<(), _>(Error::InvalidArgument { message: "bad".into() })
                })
                .await;
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "caller mistakes are not broker failures");
    }

    /// Refusals never open the breaker, however many: the caller gets the
    /// refusal (with its hint and figures), not CircuitOpen.
    #[tokio::test(start_paused = true)]
    async fn refusals_do_not_open_the_breaker() {
        let config = BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() };
        let breaker = CircuitBreaker::with_clock(config, Arc::new(ManualClock::new()));
        let calls = AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        let error = retrier(5)
            .run(deadline, Duration::from_secs(30), Some(&breaker), || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(Error::ResourceExhausted {
                    message: "full".into(),
                    retry_after: Some(Duration::from_millis(100)),
                    refusal: None,
                })
            })
            .await
            .expect_err("refused every time");
        assert!(matches!(error, Error::ResourceExhausted { .. }), "{error:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 5, "every attempt reached the broker");
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
