"""The client on a real three-node cluster (``docs/replication.md``): given
every node's address, starting with a follower, it follows the leader, and
rides out a kill -9 of the leader by moving on to the next node.

The nodes' config is the one of ``broker/tests/it/cluster.rs``
(``Cluster::start``); each node listens on a port chosen up front, since the
peers name each other.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Broker

from ballast import (
    Admin,
    Backoff,
    BallastError,
    BreakerConfig,
    Connection,
    Consumer,
    ConsumerConfig,
    Delivery,
    Message,
    Producer,
    ProducerConfig,
    Receipt,
    RetryPolicy,
    Stats,
    Unavailable,
    queue_settings,
)
from ballast.v1 import ballast_pb2 as pb

StartBroker = Callable[..., Broker]

#: How long the cluster may take to agree on a leader (three election
#: timeouts of the test config and the processes' start), as in cluster.rs.
LEADER_WITHIN = 20.0
#: The whole test's bound.
TEST_WITHIN = 40.0
#: Answers about one node's state come within this (a dead node fails fast).
PROBE_TIMEOUT = 2.0

QUEUE = "orders"
BEFORE_KILL = 100
CONSUMED_BEFORE_KILL = 50
AROUND_KILL = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_cluster(start: StartBroker, tmp_path: Path) -> list[Broker]:
    ports = [free_port() for _ in range(3)]
    peers = ", ".join(
        f'{{ id = {i + 1}, addr = "127.0.0.1:{port}" }}' for i, port in enumerate(ports)
    )
    nodes = []
    for i, port in enumerate(ports):
        config = tmp_path / f"node{i + 1}.toml"
        config.write_text(
            f"[cluster]\nnode_id = {i + 1}\npeers = [{peers}]\nheartbeat_ms = 200\n"
            "election_timeout_min_ms = 1500\nelection_timeout_max_ms = 3000\n"
        )
        nodes.append(start("--config", str(config), listen=f"127.0.0.1:{port}"))
    return nodes


async def node_stats(node: Broker, queue: str = "") -> pb.StatsResponse | None:
    """One node's own figures (no following), or None if it does not answer."""
    async with Connection(node.address) as connection:
        stats = Stats(connection)
        stats.timeout = PROBE_TIMEOUT
        try:
            return await stats.get(queue)
        except BallastError:
            return None


async def leader_of(nodes: list[Broker]) -> int:
    """The index of the node every running node agrees leads, once they do."""
    deadline = time.monotonic() + LEADER_WITHIN
    while True:
        running = [i for i, node in enumerate(nodes) if node.process is not None]
        answers = await asyncio.gather(*(node_stats(nodes[i]) for i in running))
        views = {answer.cluster.leader_id if answer else 0 for answer in answers}
        leading = [
            i
            for i, answer in zip(running, answers, strict=True)
            if answer and answer.cluster.role == "leader"
        ]
        if len(leading) == 1 and views == {leading[0] + 1}:
            return leading[0]
        assert time.monotonic() < deadline, f"no agreed leader within {LEADER_WITHIN}s: {views}"
        await asyncio.sleep(0.05)


async def wait_depth(nodes: list[Broker], depth: int) -> None:
    """Waits until every running node has applied ``depth`` messages of QUEUE."""
    deadline = time.monotonic() + LEADER_WITHIN
    while True:
        running = [node for node in nodes if node.process is not None]
        answers = await asyncio.gather(*(node_stats(node, QUEUE) for node in running))
        seen = [a.queues[0].saturation.depth if a and a.queues else None for a in answers]
        if all(d == depth for d in seen):
            return
        assert time.monotonic() < deadline, f"depths {seen}, waiting for {depth} on every node"
        await asyncio.sleep(0.05)


async def create_replicated(nodes: list[Broker]) -> None:
    """Creates QUEUE with three replicas through the leader (again if the
    leadership moved meanwhile)."""
    deadline = time.monotonic() + LEADER_WITHIN
    while True:
        async with Connection(nodes[await leader_of(nodes)].address) as connection:
            try:
                await Admin(connection).create_queue(QUEUE, queue_settings(replicas=3))
                return
            except Unavailable:
                assert time.monotonic() < deadline, "no leader took the create"


async def consume_keys(connection: Connection, count: int) -> list[str]:
    """The idempotency keys of the next ``count`` deliveries of QUEUE, acked."""
    keys: list[str] = []

    async def handler(delivery: Delivery) -> None:
        keys.append(delivery.idempotency_key)

    config = ConsumerConfig(max_messages=count, reconnect=Backoff(0.05, 0.5))
    await Consumer(connection, QUEUE, handler, config).run()
    return keys


async def test_the_client_follows_the_leader_and_rides_out_its_kill(
    broker_factory: StartBroker, tmp_path: Path
) -> None:
    """Starting at a follower, publishes (keyed) and consumes reach the
    leader; after the leader's kill -9 the producer carries on against the
    new leader: every publish is acknowledged, each stored once (dense
    offsets, the depth), and every acknowledged message consumed."""
    nodes = start_cluster(broker_factory, tmp_path)
    await asyncio.wait_for(ride_out_a_leader_kill(nodes), TEST_WITHIN)


async def ride_out_a_leader_kill(nodes: list[Broker]) -> None:
    await create_replicated(nodes)
    leader = await leader_of(nodes)
    followers = [i for i in range(3) if i != leader]
    addresses = ",".join(nodes[i].address for i in [*followers, leader])
    config = ProducerConfig(
        attempt_timeout=2.0,
        deadline=30.0,
        # The failover is ridden out by retries, not failed fast.
        breaker=BreakerConfig(failure_threshold=1_000_000),
        retry=RetryPolicy(attempts_max=1_000, backoff=Backoff(0.05, 0.5)),
    )
    async with (
        Connection(addresses) as producing,
        Connection(addresses) as consuming,
        Producer(producing, config) as producer,
    ):
        assert producing.address == nodes[followers[0]].address
        receipts: dict[str, Receipt] = {}

        async def publish(i: int) -> None:
            key = f"k{i}"
            receipts[key] = await producer.publish(QUEUE, Message(f"m{i}".encode(), key=key))

        await asyncio.gather(*(publish(i) for i in range(BEFORE_KILL)))
        assert producing.address == nodes[await leader_of(nodes)].address, "followed the leader"
        consumed = await consume_keys(consuming, CONSUMED_BEFORE_KILL)
        assert consuming.address == nodes[await leader_of(nodes)].address
        # The acks are on every node: none is undone by the failover.
        await wait_depth(nodes, BEFORE_KILL - CONSUMED_BEFORE_KILL)

        async def trickle() -> None:
            sends = []
            for i in range(BEFORE_KILL, BEFORE_KILL + AROUND_KILL):
                sends.append(asyncio.ensure_future(publish(i)))
                if i % 10 == 0:
                    await asyncio.sleep(0.02)
            await asyncio.gather(*sends)

        publishing = asyncio.ensure_future(trickle())
        while len(receipts) < BEFORE_KILL + 50:
            assert not publishing.done(), publishing
            await asyncio.sleep(0.01)
        leader = await leader_of(nodes)
        nodes[leader].kill()
        await publishing
        new_leader = await leader_of(nodes)
        assert new_leader != leader
        assert producing.address == nodes[new_leader].address

        total = BEFORE_KILL + AROUND_KILL
        assert len(receipts) == total, "every publish acknowledged (retries follow the leader)"
        offsets = {r.id.offset for r in receipts.values()}
        assert len({r.id.lane for r in receipts.values()}) == 1, "the default lane"
        assert len(offsets) == total and max(offsets) - min(offsets) == total - 1, (
            "each key stored once: one dense run of offsets"
        )
        await wait_depth(nodes, total - CONSUMED_BEFORE_KILL)

        # The consumer's connection still points at the dead leader.
        assert consuming.address == nodes[leader].address
        rest = await consume_keys(consuming, total - CONSUMED_BEFORE_KILL)
        assert consuming.address == nodes[new_leader].address
        assert len(rest) == len(set(rest))
        assert sorted(consumed + rest) == sorted(receipts), "every acknowledged message consumed"
