"""Unit tests: backoff and jitter bounds, breaker states, error mapping, retries."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import grpc
import pytest

from ballast import (
    Backoff,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Refused,
    RetryPolicy,
    Unavailable,
    errors,
)
from ballast.consumer import NackPolicy
from ballast.retry import Retrier


def test_full_jitter_stays_within_its_ceiling_and_spreads() -> None:
    backoff = Backoff(0.01, 2.0)
    rng = random.Random(7)
    for retry in range(70):
        ceiling = min(2.0, 0.01 * 2**retry)
        assert backoff.ceiling(retry) == pytest.approx(ceiling)
        for _ in range(50):
            assert 0.0 <= backoff.delay(retry, rng) <= ceiling
    delays = [Backoff(0.1, 1.0).delay(2, rng) for _ in range(1000)]
    assert min(delays) < 0.2 and max(delays) > 0.2, "full jitter spreads over [0, ceiling]"


def test_retry_after_is_a_floor_on_the_delay() -> None:
    backoff = Backoff(0.01, 0.05)
    rng = random.Random(1)
    assert all(backoff.delay_after(3, 0.5, rng) >= 0.5 for _ in range(200))
    assert all(backoff.delay_after(3, None, rng) <= 0.05 for _ in range(200))


def test_nack_delay_doubles_by_attempt_up_to_its_cap() -> None:
    policy = NackPolicy(0.5, 3.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_failures_then_probes_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(3, 10.0, 5.0, 1), clock)
    for _ in range(2):
        breaker.acquire().failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire().failure()
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as refused:
        breaker.acquire()
    assert refused.value.retry_after == pytest.approx(5.0)
    clock.now += 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    probe = breaker.acquire()
    with pytest.raises(CircuitOpen):
        breaker.acquire()  # one probe at a time
    probe.success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_failed_probe_reopens_and_neutral_probe_frees_its_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(1, 10.0, 2.0, 1), clock)
    breaker.acquire().failure()
    clock.now += 2.0
    breaker.acquire().neutral()
    breaker.acquire().failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 1.9
    assert breaker.state is BreakerState.OPEN


def test_breaker_forgets_failures_outside_its_window_and_stale_permits() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(2, 1.0, 5.0, 1), clock)
    stale = breaker.acquire()
    breaker.acquire().failure()
    clock.now += 1.5
    breaker.acquire().failure()
    assert breaker.state is BreakerState.CLOSED, "the first failure left the window"
    breaker.acquire().failure()
    assert breaker.state is BreakerState.OPEN
    stale.success()  # admitted while closed: counts for nothing now
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(
    ("code", "kind", "retryable"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument, False),
        (grpc.StatusCode.OUT_OF_RANGE, InvalidArgument, False),
        (grpc.StatusCode.NOT_FOUND, NotFound, False),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists, False),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition, False),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied, False),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Refused, True),
        (grpc.StatusCode.UNAVAILABLE, Unavailable, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded, True),
        (grpc.StatusCode.ABORTED, errors.Aborted, True),
        (grpc.StatusCode.INTERNAL, errors.BrokerError, False),
        (grpc.StatusCode.UNIMPLEMENTED, errors.BrokerError, False),
        (grpc.StatusCode.UNKNOWN, errors.BrokerError, False),
    ],
)
def test_status_codes_map_to_the_documented_errors(
    code: grpc.StatusCode, kind: type[errors.BallastError], retryable: bool
) -> None:
    error = errors.from_status(code, "why")
    assert type(error) is kind
    assert error.retryable is retryable
    assert error.code == code or code == grpc.StatusCode.OUT_OF_RANGE
    assert "why" in str(error)


def test_refusal_metadata_is_parsed_and_bad_values_are_no_figures() -> None:
    error = errors.from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queue q is full for lane low",
        [
            ("retry-after-ms", "250"),
            ("ballast-reason", "queue_full"),
            ("ballast-lane-index", "2"),
            ("ballast-lane-bin", "bas voisé".encode()),
            ("ballast-depth", "10"),
            ("ballast-bytes", "nope"),
            ("ballast-saturation", "0.75"),
            ("ballast-threshold", "NaN"),
        ],
    )
    assert isinstance(error, Refused)
    assert error.retry_after == 0.25
    assert error.reason == "queue_full"
    assert error.refusal == errors.Refusal(
        reason="queue_full", lane="bas voisé", lane_index=2, depth=10, saturation=0.75
    )
    assert error.refusal is not None and not error.refusal.is_disk_low
    disk = errors.from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "disk", [("ballast-disk-free-bytes", "5")]
    )
    assert isinstance(disk, Refused) and disk.refusal is not None and disk.refusal.is_disk_low
    assert disk.retry_after is None
    plain = errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many queues")
    assert isinstance(plain, Refused) and plain.refusal is None
    recovering = errors.from_status(
        grpc.StatusCode.UNAVAILABLE, "reopening", [("retry-after-ms", "1000")]
    )
    assert recovering.retry_after == 1.0


async def test_retrier_waits_at_least_retry_after_between_attempts() -> None:
    times: list[float] = []

    async def attempt(_: float) -> str:
        times.append(time.monotonic())
        if len(times) < 3:
            raise Refused("full", retry_after=0.15)
        return "stored"

    retrier = Retrier(RetryPolicy(5, Backoff(0.001, 0.002)), 1.0, random.Random(3))
    assert await retrier.run(5.0, attempt) == "stored"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.15 for gap in gaps), gaps


async def test_retrier_stops_on_errors_retrying_cannot_fix_and_feeds_the_breaker() -> None:
    calls = 0

    async def invalid(_: float) -> None:
        nonlocal calls
        calls += 1
        raise InvalidArgument("bad name")

    retrier = Retrier(RetryPolicy(5, Backoff(0.001, 0.001)), 1.0)
    breaker = CircuitBreaker(BreakerConfig(2, 10.0, 60.0, 1))
    with pytest.raises(InvalidArgument):
        await retrier.run(5.0, invalid, breaker)
    assert calls == 1 and breaker.state is BreakerState.CLOSED

    async def down(_: float) -> None:
        raise Unavailable("down")

    with pytest.raises(CircuitOpen):
        await retrier.run(5.0, down, breaker)
    assert breaker.state is BreakerState.OPEN

    async def refused(_: float) -> None:
        raise Refused("full", retry_after=0.001)

    other = CircuitBreaker(BreakerConfig(1, 10.0, 60.0, 1))
    with pytest.raises(Refused):
        await retrier.run(5.0, refused, other)
    assert other.state is BreakerState.CLOSED, "a refusal is not a broker failure"


async def test_retrier_gives_up_at_the_deadline() -> None:
    async def slow(budget: float) -> None:
        await asyncio.sleep(budget)
        raise DeadlineExceeded("attempt timed out")

    retrier = Retrier(RetryPolicy(100, Backoff(0.001, 0.001)), 0.05)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await retrier.run(0.3, slow)
    assert time.monotonic() - started < 1.0


def test_consumer_reconnects_unless_retrying_cannot_help() -> None:
    from ballast.consumer import is_fatal

    fatal = [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    ]
    reconnect = [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ]
    assert all(is_fatal(errors.from_status(code, "x")) for code in fatal)
    assert not any(is_fatal(errors.from_status(code, "x")) for code in reconnect)


@pytest.mark.parametrize(
    ("details", "advice"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:"
            "OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
            "not signed by the CA",
        ),
        ("... OPENSSL_internal:WRONG_VERSION_NUMBER: ...", "does not speak TLS"),
        ("... Custom verification check failed: Hostname Verification Check failed.", "name"),
        ("... Unwrap failed (TSI_DATA_CORRUPTED)", "refused the client's certificate"),
    ],
)
def test_tls_failures_are_told_apart_from_an_unavailable_broker(details: str, advice: str) -> None:
    error = errors.from_status(grpc.StatusCode.UNAVAILABLE, details)
    assert isinstance(error, errors.TlsError) and not error.retryable
    assert advice in str(error)
    refused = "failed to connect to all addresses; last error: Connection refused"
    assert isinstance(errors.from_status(grpc.StatusCode.UNAVAILABLE, refused), Unavailable)


def test_expiry_and_pacing_settings_reach_the_wire() -> None:
    """The expiry and pacing settings and a message's ttl_ms are set on the
    protobuf messages; an unknown expired action is refused locally."""
    from ballast import Message, queue_settings
    from ballast.v1 import ballast_pb2 as pb

    settings = queue_settings(message_ttl_ms=60_000, expired_action="drop", max_delivery_rate=200)
    assert settings.message_ttl_ms == 60_000
    assert settings.expired_action == pb.EXPIRED_ACTION_DROP
    assert settings.max_delivery_rate == 200
    assert not queue_settings().HasField("message_ttl_ms")
    assert queue_settings().expired_action == pb.EXPIRED_ACTION_UNSPECIFIED
    with pytest.raises(ValueError, match="expired_action"):
        queue_settings(expired_action="keep")
    assert Message(b"x", ttl_ms=1500).to_pb().ttl_ms == 1500
