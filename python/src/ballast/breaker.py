"""A circuit breaker per queue: fail fast while the broker is dead or failing.

Same states and rules as the Rust client's ``breaker.rs``:

1. Closed: calls pass. A retryable failure is recorded; a success clears the
   record. ``failure_threshold`` failures within ``failure_window`` open it.
2. Open: calls fail at once with :class:`~ballast.errors.CircuitOpen`. After
   ``open_duration`` the next call moves it to half-open.
3. Half-open: up to ``half_open_probes`` calls pass as probes. A probe that
   succeeds closes it; one that fails opens it again. A probe without a
   verdict (a non-retryable error, a cancelled call) frees its slot.

Only outcomes of the current state count (permits carry a generation).
Admission refusals are not failures: the broker is alive and paces clients.
Nor is a cluster follower's redirect (:class:`~ballast.errors.NotLeader`):
the broker answered, and the retry goes to the leader; it is reported
neutral.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .errors import CircuitOpen


@dataclass(frozen=True)
class BreakerConfig:
    """When the breaker opens and for how long (seconds)."""

    failure_threshold: int = 5
    failure_window: float = 10.0
    open_duration: float = 5.0
    half_open_probes: int = 1

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.half_open_probes < 1:
            raise ValueError("half_open_probes must be at least 1")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Permit:
    """Leave to make one call; report its outcome exactly once."""

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._reported = False

    def success(self) -> None:
        self._report("success")

    def failure(self) -> None:
        self._report("failure")

    def neutral(self) -> None:
        """No verdict on the broker's health (frees a probe slot)."""
        self._report("neutral")

    def _report(self, outcome: str) -> None:
        if not self._reported:
            self._reported = True
            self._breaker._record(self._generation, self._probe, outcome)


class CircuitBreaker:
    """The breaker; ``clock`` (monotonic seconds) is injectable for tests."""

    def __init__(
        self, config: BreakerConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()
        self._open_until = 0.0
        self._probes = 0
        self._generation = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def acquire(self) -> Permit:
        """A permit for one call, or :class:`CircuitOpen` when the call must fail fast."""
        now = self._clock()
        if self._state is BreakerState.OPEN:
            if now < self._open_until:
                raise CircuitOpen(self._open_until - now)
            self._transition(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN:
            if self._probes >= self.config.half_open_probes:
                raise CircuitOpen(0.0)
            self._probes += 1
            return Permit(self, self._generation, probe=True)
        return Permit(self, self._generation, probe=False)

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._failures.clear()
        self._probes = 0
        if state is BreakerState.OPEN:
            self._open_until = self._clock() + self.config.open_duration

    def _record(self, generation: int, probe: bool, outcome: str) -> None:
        if generation != self._generation:
            return
        now = self._clock()
        if self._state is BreakerState.CLOSED:
            if outcome == "success":
                self._failures.clear()
            elif outcome == "failure":
                window = self.config.failure_window
                while self._failures and now - self._failures[0] > window:
                    self._failures.popleft()
                self._failures.append(now)
                if len(self._failures) >= self.config.failure_threshold:
                    self._transition(BreakerState.OPEN)
        elif self._state is BreakerState.HALF_OPEN and probe:
            if outcome == "success":
                self._transition(BreakerState.CLOSED)
            elif outcome == "failure":
                self._transition(BreakerState.OPEN)
            else:
                self._probes -= 1
