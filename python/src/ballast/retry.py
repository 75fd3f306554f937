"""Runs one logical call as attempts within a deadline (the Rust client's
``retry.rs``): backoff with full jitter, never sooner than retry-after (nor
than ``UNAVAILABLE_RETRY_FLOOR`` after an UNAVAILABLE), and an optional
circuit breaker. The caller makes every attempt send the same request, so a
publish keeps its idempotency keys across retries, also when the connection
moved it to another cluster node (:mod:`ballast.leader`)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .backoff import RetryPolicy
from .breaker import CircuitBreaker
from .errors import BallastError, DeadlineExceeded, NotLeader, Refused, least_wait

T = TypeVar("T")
log = logging.getLogger("ballast")


class Retrier:
    """Attempts are bounded by ``min(deadline, now + attempt_timeout)``."""

    def __init__(
        self, policy: RetryPolicy, attempt_timeout: float, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self.attempt_timeout = attempt_timeout
        self.rng = rng or random.Random()

    async def run(
        self,
        timeout: float,
        attempt: Callable[[float], Awaitable[T]],
        breaker: CircuitBreaker | None = None,
    ) -> T:
        """Runs ``attempt(attempt_timeout_seconds)`` until it succeeds, fails
        for good, runs out of attempts or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        retry = 0
        last: BallastError | None = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise DeadlineExceeded(f"deadline of {timeout:.3f}s exceeded", last)
            permit = breaker.acquire() if breaker is not None else None
            budget = min(deadline - now, self.attempt_timeout)
            try:
                value = await attempt(budget)
            except BallastError as error:
                if permit is not None:
                    if isinstance(error, Refused):
                        # Admission control answering: the broker is alive.
                        permit.success()
                    elif isinstance(error, NotLeader):
                        # A follower naming its leader (the next attempt
                        # goes there): the broker answered; no verdict.
                        permit.neutral()
                    elif error.retryable:
                        permit.failure()
                    else:
                        permit.neutral()
                if not error.retryable:
                    raise
                retry += 1
                if retry >= self.policy.attempts_max:
                    raise
                delay = self.policy.backoff.delay_after(retry - 1, least_wait(error), self.rng)
                if time.monotonic() + delay >= deadline:
                    raise
                log.debug("retrying after %.3fs: %s", delay, error)
                last = error
                await asyncio.sleep(delay)
                continue
            except BaseException:
                if permit is not None:
                    permit.neutral()
                raise
            if permit is not None:
                permit.success()
            return value
