"""Exponential backoff with full jitter, never sooner than a retry-after hint."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Retry ``n`` (0-based) waits a uniform random time in
    ``[0, min(cap, base * 2**n)]`` (full jitter), and never less than the
    broker's retry-after hint. Times in seconds."""

    base: float = 0.05
    cap: float = 5.0

    def ceiling(self, retry: int) -> float:
        """The largest delay retry ``retry`` can draw."""
        if retry >= 64:
            return self.cap
        return min(self.cap, self.base * (1 << retry))

    def delay(self, retry: int, rng: random.Random) -> float:
        """A full-jitter delay for retry ``retry``."""
        return rng.uniform(0.0, self.ceiling(retry))

    def delay_after(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """The jittered delay, raised to ``retry_after`` when that is longer."""
        delay = self.delay(retry, rng)
        return delay if retry_after is None else max(delay, retry_after)


@dataclass(frozen=True)
class RetryPolicy:
    """How often a call is tried (``attempts_max`` includes the first try) and
    how long to wait between tries."""

    attempts_max: int = 10
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if self.attempts_max < 1:
            raise ValueError("attempts_max must be at least 1")


NO_RETRY = RetryPolicy(attempts_max=1, backoff=Backoff(0.0, 0.0))
