//! [`Clock`]: the time seam of the circuit breaker, so its state machine can
//! be tested without sleeping.

use std::{fmt, time::Instant};

/// A source of monotonic time.
///
/// The client uses [`SystemClock`]; tests drive a manual clock so state
/// changes that depend on elapsed time happen exactly when the test says.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock ([`Instant::now`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
pub(crate) use manual::ManualClock;

#[cfg(test)]
mod manual {
    use std::{
        sync::Mutex,
        time::{Duration, Instant},
    };

    use super::Clock;

    /// A clock that moves only when told to.
    #[derive(Debug)]
    pub(crate) struct ManualClock {
        now: Mutex<Instant>,
    }

    impl ManualClock {
        pub(crate) fn new() -> ManualClock {
            ManualClock { now: Mutex::new(Instant::now()) }
        }

        pub(crate) fn advance(&self, by: Duration) {
            let mut now = self.now.lock().expect("clock lock is never poisoned");
            *now += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.now.lock().expect("clock lock is never poisoned")
        }
    }
}
