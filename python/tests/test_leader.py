"""Following a cluster's leader without a broker: the address list, the choice
of the next seed, the unreachable window, NotLeader, and how retries and the
breaker treat it."""

from __future__ import annotations

import itertools
import random
import time

import grpc
import pytest
from test_units import Clock

from ballast import (
    Backoff,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    ClientConfig,
    Connection,
    NotLeader,
    RetryPolicy,
    Unavailable,
    errors,
)
from ballast.leader import UNREACHABLE_FOR, Seeds, parse_addresses
from ballast.retry import Retrier


def test_addresses_are_split_on_commas_stripped_of_schemes_and_repeats() -> None:
    assert parse_addresses("127.0.0.1:7400") == ["127.0.0.1:7400"]
    assert parse_addresses(" http://a:1, https://b:2 ,c:3,a:1") == ["a:1", "b:2", "c:3"]
    config = ClientConfig(address="http://a:1,b:2")
    assert config.addresses() == ["a:1", "b:2"]
    assert config.target() == "a:1", "calls go to the first address first"
    for typo in ("", "a:1,,b:2", "a:1,", " , "):
        with pytest.raises(ValueError, match="empty address"):
            parse_addresses(typo)


def test_an_unreachable_node_moves_calls_to_the_next_seed_in_order() -> None:
    clock = Clock()
    seeds = Seeds(["a:1", "b:2", "c:3"], clock)
    assert seeds.current == "a:1"
    seeds.next_seed("a:1")
    assert seeds.current == "b:2"
    clock.now += 0.5
    seeds.next_seed("b:2")
    assert seeds.current == "c:3"
    clock.now += 0.5
    # Every other seed failed within the window: the next one all the same.
    seeds.next_seed("c:3")
    assert seeds.current == "a:1"


def test_next_seed_skips_seeds_that_failed_within_the_window_and_not_after() -> None:
    clock = Clock()
    seeds = Seeds(["a:1", "b:2", "c:3"], clock)
    seeds.next_seed("b:2")  # another call saw b fail; calls stay on a
    assert seeds.current == "a:1"
    clock.now += UNREACHABLE_FOR - 0.01
    seeds.next_seed("a:1")
    assert seeds.current == "c:3", "b failed within UNREACHABLE_FOR: skipped"

    clock = Clock()
    seeds = Seeds(["a:1", "b:2", "c:3"], clock)
    seeds.next_seed("b:2")
    clock.now += UNREACHABLE_FOR
    seeds.next_seed("a:1")
    assert seeds.current == "b:2", "b's failure is UNREACHABLE_FOR old: tried again"


def test_a_late_failure_of_an_address_no_longer_used_moves_nothing() -> None:
    seeds = Seeds(["a:1", "b:2", "c:3"], Clock())
    seeds.next_seed("a:1")
    assert seeds.current == "b:2"
    seeds.next_seed("a:1")  # a second call that was in flight to a
    assert seeds.current == "b:2"


def test_follow_goes_to_the_named_leader_unless_it_was_unreachable_lately() -> None:
    clock = Clock()
    seeds = Seeds(["a:1", "b:2", "c:3"], clock)
    seeds.follow("c:3")
    assert seeds.current == "c:3"
    seeds.next_seed("c:3")  # the leader was killed
    assert seeds.current == "a:1"
    seeds.follow("c:3")  # a follower's view lags the election
    assert seeds.current == "a:1"
    clock.now += UNREACHABLE_FOR
    seeds.follow("http://c:3")
    assert seeds.current == "c:3"


def test_a_leader_outside_the_seeds_hands_back_to_the_first_seed() -> None:
    seeds = Seeds(["a:1"], Clock())
    seeds.follow("d:4")
    assert seeds.current == "d:4"
    seeds.next_seed("d:4")
    assert seeds.current == "a:1"
    seeds.next_seed("a:1")  # the only seed: calls stay and retry there
    assert seeds.current == "a:1"


def test_not_leader_is_parsed_with_and_without_a_leader() -> None:
    redirect = errors.from_status(
        grpc.StatusCode.UNAVAILABLE,
        "not the leader",
        [
            ("ballast-reason", "not_leader"),
            ("ballast-leader", "10.0.0.2:7400"),
            ("retry-after-ms", "200"),
        ],
    )
    assert isinstance(redirect, NotLeader) and isinstance(redirect, Unavailable)
    assert redirect.leader == "10.0.0.2:7400"
    assert redirect.retryable and redirect.retry_after == 0.2
    assert not redirect.unreachable
    election = errors.from_status(
        grpc.StatusCode.UNAVAILABLE, "election", [("ballast-reason", b"not_leader")]
    )
    assert isinstance(election, NotLeader) and election.leader is None

    lost_majority = errors.from_status(
        grpc.StatusCode.UNAVAILABLE, "x", [("ballast-reason", "cluster"), ("retry-after-ms", "200")]
    )
    assert type(lost_majority) is Unavailable and lost_majority.reason == "cluster"
    assert not lost_majority.unreachable, "the broker answered: stay on this node"
    recovering = errors.from_status(grpc.StatusCode.UNAVAILABLE, "x", [("retry-after-ms", "1000")])
    assert type(recovering) is Unavailable and not recovering.unreachable
    refused = errors.from_status(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    assert type(refused) is Unavailable and refused.unreachable


async def test_connection_follows_not_leader_and_moves_on_from_an_unreachable_node() -> None:
    connection = Connection("a:1,b:2,c:3")
    try:
        assert connection.address == "a:1"
        connection.observe("a:1", NotLeader("follower", 0.2, "c:3"))
        assert connection.address == "c:3"
        connection.observe("c:3", NotLeader("election", 0.2, None))
        assert connection.address == "c:3", "no leader named: retry where we are"
        connection.observe("c:3", Unavailable("recovering", 1.0))
        assert connection.address == "c:3", "the node answered: not a transport failure"
        connection.observe("c:3", Unavailable("failed to connect to all addresses"))
        assert connection.address == "a:1"
        assert connection.channel is connection.channel_for("a:1")
        assert connection.channel_for("c:3") is connection.channel_for("c:3"), "kept"
    finally:
        await connection.close()


async def test_retries_of_unavailable_wait_the_floor_and_a_redirect_is_no_breaker_failure() -> None:
    times: list[float] = []

    async def redirected(_: float) -> str:
        times.append(time.monotonic())
        if len(times) < 3:
            raise NotLeader("follower", None, "b:2")
        return "stored"

    retrier = Retrier(RetryPolicy(10, Backoff(0.001, 0.002)), 1.0, random.Random(1))
    breaker = CircuitBreaker(BreakerConfig(1, 10.0, 60.0, 1))
    assert await retrier.run(5.0, redirected, breaker) == "stored"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= errors.UNAVAILABLE_RETRY_FLOOR for gap in gaps), gaps
    assert breaker.state is BreakerState.CLOSED, "two redirects with a threshold of 1"

    assert errors.least_wait(Unavailable("down")) == errors.UNAVAILABLE_RETRY_FLOOR
    assert errors.least_wait(Unavailable("recovering", 1.0)) == 1.0
    assert errors.least_wait(errors.Aborted("x")) is None


async def test_a_stream_ended_with_the_leader_in_its_trailers_follows_it() -> None:
    class EndedCall:
        async def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("ballast-leader", "b:2"),)

    connection = Connection("a:1,b:2")
    try:
        await connection.stream_ended(EndedCall())
        assert connection.address == "b:2"
    finally:
        await connection.close()
