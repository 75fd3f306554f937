"""End to end against a real ``ballastd`` (started per test by conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Broker

from ballast import (
    Admin,
    Backoff,
    BreakerConfig,
    BreakerState,
    CircuitOpen,
    ClientConfig,
    Connection,
    Consumer,
    ConsumerConfig,
    Delivery,
    Message,
    NackPolicy,
    NotFound,
    Producer,
    ProducerConfig,
    Refused,
    RetryPolicy,
    Stats,
    TlsConfig,
    TlsError,
    Unauthenticated,
    queue_settings,
)
from ballast.backoff import NO_RETRY

StartBroker = Callable[..., Broker]


async def consume(
    connection: Connection, queue: str, count: int, **config: object
) -> list[Delivery]:
    """The first ``count`` deliveries of ``queue``, acked."""
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)

    settings = ConsumerConfig(max_messages=count, **config)  # type: ignore[arg-type]
    await asyncio.wait_for(Consumer(connection, queue, handler, settings).run(), 20)
    return seen


async def test_round_trip_with_receipts_and_saturation(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("jobs")
        async with Producer(connection) as producer:
            receipts = await producer.publish_all(
                "jobs", [Message(f"job {i}".encode(), {"n": str(i)}) for i in range(20)]
            )
        assert [r.id.offset for r in receipts] == list(range(20))
        assert not any(r.duplicate for r in receipts)
        assert len({r.idempotency_key for r in receipts}) == 20
        assert receipts[-1].queue.depth == 20 and receipts[-1].queue.saturation > 0
        deliveries = await consume(connection, "jobs", 20)
        assert sorted(d.payload for d in deliveries) == sorted(
            f"job {i}".encode() for i in range(20)
        )
        assert all(d.headers["n"] == d.payload.decode().split()[1] for d in deliveries)
        info = await Admin(connection).get_queue("jobs")
        assert info.depth == 0, "every delivery was acked"


async def test_priority_lanes_serve_high_before_low(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("prio", queue_settings(strict_priority=True))
        async with Producer(connection) as producer:
            await producer.publish_all("prio", [Message(b"low", lane=2) for _ in range(5)])
            await producer.publish_all("prio", [Message(b"high", lane=0) for _ in range(5)])
        deliveries = await consume(connection, "prio", 10, prefetch=1, concurrency=1)
        assert [d.payload for d in deliveries] == [b"high"] * 5 + [b"low"] * 5
        assert {d.id.lane for d in deliveries[:5]} == {0}


async def test_refusal_carries_figures_and_retries_wait_for_retry_after(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("tiny", queue_settings(max_messages=1))
        async with Producer(connection, ProducerConfig(retry=NO_RETRY)) as once:
            await once.publish("tiny", Message(b"fills it", lane=0))
            with pytest.raises(Refused) as refused:
                await once.publish("tiny", Message(b"over", lane=0))
        error = refused.value
        assert error.reason == "queue_full" and error.refusal is not None
        assert error.refusal.lane == "high" and error.refusal.depth == 1
        retry_after = error.retry_after
        assert retry_after is not None and retry_after > 0

        config = ProducerConfig(retry=RetryPolicy(3, Backoff(0.001, 0.001)), deadline=30)
        async with Producer(connection, config) as producer:
            started = time.monotonic()
            with pytest.raises(Refused):
                await producer.publish("tiny", Message(b"over", lane=0))
            assert time.monotonic() - started >= 2 * retry_after, "two waits of retry-after"

            # Once a consumer makes room, the same retrying publish goes through.
            publish = asyncio.ensure_future(producer.publish("tiny", Message(b"later", lane=0)))
            await consume(connection, "tiny", 1)
            receipt = await publish
            assert not receipt.duplicate


async def test_idempotent_retry_across_a_kill_and_restart_stores_no_duplicate(
    broker: Broker,
) -> None:
    total = 60
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("orders")
        config = ProducerConfig(
            linger=0.0,
            batch_count_max=1,
            retry=RetryPolicy(1000, Backoff(0.02, 0.2)),
            breaker=None,  # the retries under test would otherwise fail fast
        )
        async with Producer(connection, config) as producer:
            receipts = []
            answered = asyncio.Event()

            async def publisher(worker: int) -> None:
                for i in range(worker, total, 10):
                    receipts.append(await producer.publish("orders", f"order {i}".encode()))
                    if len(receipts) == 20:
                        answered.set()

            # Ten publishers at once, so publishes are in flight at the kill.
            publishers = asyncio.gather(*(publisher(worker) for worker in range(10)))
            await answered.wait()
            broker.kill()
            await asyncio.sleep(0.3)  # the broker stays down for a while
            broker.restart()
            await asyncio.wait_for(publishers, 30)
        assert len({r.idempotency_key for r in receipts}) == total
        info = await Admin(connection).get_queue("orders")
        assert info.depth == total, f"{info.depth} stored for {total} publishes"
        deliveries = await consume(connection, "orders", total)
        assert sorted(d.payload for d in deliveries) == sorted(
            f"order {i}".encode() for i in range(total)
        )


async def test_producer_resends_the_same_key_and_gets_duplicate(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("keys")
        async with Producer(connection) as producer:
            first = await producer.publish("keys", Message(b"x", key="order-17"))
            again = await producer.publish("keys", Message(b"x", key="order-17"))
        assert not first.duplicate and again.duplicate and again.id == first.id


@pytest.mark.parametrize("mode", ["stream", "pull"])
async def test_consumer_reconnects_after_a_broker_restart(broker: Broker, mode: str) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("work")
        seen: list[bytes] = []
        got_first = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            seen.append(delivery.payload)
            got_first.set()
            if delivery.payload == b"after":
                consumer.stop()

        config = ConsumerConfig(reconnect=Backoff(0.05, 0.2), mode=mode, pull_wait_ms=200)
        consumer = Consumer(connection, "work", handler, config)
        running = asyncio.ensure_future(consumer.run())
        async with Producer(connection) as producer:
            await producer.publish("work", b"before")
            await asyncio.wait_for(got_first.wait(), 10)
            broker.kill()
            broker.restart()
            await producer.publish("work", b"after")
        await asyncio.wait_for(running, 20)
        assert consumer.sessions >= 2
        assert seen[-1] == b"after" and b"before" in seen


async def test_nack_delay_then_dead_letter(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("flaky", queue_settings(max_attempts=2))
        attempts: list[tuple[int, float]] = []

        async def handler(delivery: Delivery) -> None:
            attempts.append((delivery.attempt, time.monotonic()))
            raise RuntimeError(f"cannot process attempt {delivery.attempt}")

        async with Producer(connection) as producer:
            await producer.publish("flaky", b"poison")
        config = ConsumerConfig(max_messages=2, nack_delay=NackPolicy(0.4, 1.0))
        await asyncio.wait_for(Consumer(connection, "flaky", handler, config).run(), 20)
        assert [attempt for attempt, _ in attempts] == [1, 2]
        assert attempts[1][1] - attempts[0][1] >= 0.4, "redelivered after the nack delay"
        dead = await consume(connection, "flaky.dead", 1)
        assert dead[0].payload == b"poison"
        assert dead[0].headers["ballast-dead-letter-reason"] == (
            "RuntimeError: cannot process attempt 2"
        )
        assert dead[0].headers["ballast-attempts"] == "2"


async def test_a_running_handler_keeps_its_lease(broker: Broker) -> None:
    """A handler running four times the lease is not redelivered: the
    consumer extends the lease while it runs, and its ack lands."""
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("slow", queue_settings(lease_timeout_ms=300))
        async with Producer(connection) as producer:
            await producer.publish("slow", b"long work")
        attempts: list[int] = []

        async def handler(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            assert delivery.lease_ms == 300
            await asyncio.sleep(1.2)

        consumer = Consumer(connection, "slow", handler, ConsumerConfig(max_messages=1))
        await asyncio.wait_for(consumer.run(), 20)
        assert attempts == [1]
        assert consumer.extended >= 3, "about every 100 ms for 1.2 s"
        assert consumer.acked == 1
        figures = await Stats(connection).queue("slow")
        assert figures.saturation.depth == 0, "the ack of the extended lease was applied"


async def test_stats_get_and_watch(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("metrics")
        async with Producer(connection) as producer:
            await producer.publish_all("metrics", [b"a", b"b", b"c"])
        stats = Stats(connection)
        figures = await stats.queue("metrics")
        assert figures.name == "metrics" and figures.saturation.depth == 3
        assert [lane.name for lane in figures.lanes] == ["high", "normal", "low"]
        pushed = []
        async for response in stats.watch("metrics", interval_ms=100):
            pushed.append(response)
            if len(pushed) == 2:
                break
        assert all(r.queues[0].saturation.depth == 3 for r in pushed)
        assert pushed[1].at_ms >= pushed[0].at_ms


async def test_token_is_sent_and_a_missing_one_is_unauthenticated(
    broker_factory: StartBroker, tmp_path: Path
) -> None:
    token = "s3cret-token"
    auth = tmp_path / "auth.toml"
    auth.write_text(
        "[[principals]]\n"
        'name = "app"\n'
        f'token_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        'allow = [ { queues = "*", actions = ["publish", "consume", "admin", "stats"] } ]\n'
    )
    broker = broker_factory("--auth-file", str(auth))
    async with Connection(ClientConfig(broker.address, token=token)) as connection:
        await Admin(connection).create_queue("secure")
        async with Producer(connection) as producer:
            await producer.publish("secure", b"signed")
        assert (await consume(connection, "secure", 1))[0].payload == b"signed"
    async with Connection(broker.address) as anonymous:
        with pytest.raises(Unauthenticated):
            await Admin(anonymous).get_queue("secure")


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a broker certificate for localhost / 127.0.0.1, by openssl."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=ballast test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    signing = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.ext"]
    openssl("x509", "-req", "-in", "server.csr", *signing, "-out", "server.pem", "-days", "2")
    # A client certificate from the same CA, for mutual TLS.
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key",
            "-out", "client.csr", "-subj", "/CN=worker.test")  # fmt: skip
    # v3 with extensions: webpki refuses version 1 certificates.
    (directory / "client.ext").write_text(
        "subjectAltName=DNS:worker.test\nextendedKeyUsage=clientAuth\n"
    )
    ca_signs = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    openssl("x509", "-req", "-in", "client.csr", *ca_signs, "-extfile", "client.ext",
            "-out", "client.pem")  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


async def test_tls_round_trip(broker_factory: StartBroker, tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    broker = broker_factory("--tls-cert", str(cert), "--tls-key", str(key))
    config = ClientConfig(broker.address, tls=TlsConfig(ca=ca, server_name="localhost"))
    async with Connection(config) as connection:
        await Admin(connection).create_queue("private")
        async with Producer(connection) as producer:
            receipt = await producer.publish("private", b"over tls")
        assert receipt.id.offset == 0
        assert (await consume(connection, "private", 1))[0].payload == b"over tls"


async def test_breaker_opens_on_a_dead_broker_and_fails_fast(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("down")
        broker.kill()
        config = ProducerConfig(
            retry=RetryPolicy(5, Backoff(0.01, 0.02)),
            breaker=BreakerConfig(failure_threshold=2, failure_window=10, open_duration=60),
        )
        async with Producer(connection, config) as producer:
            with pytest.raises(CircuitOpen):
                await producer.publish("down", b"nobody home")
            assert producer.breaker_state("down") is BreakerState.OPEN
            started = time.monotonic()
            with pytest.raises(CircuitOpen):
                await producer.publish("down", b"again")
            assert time.monotonic() - started < 0.5, "an open breaker fails at once"
            assert producer.breaker_state("other") is BreakerState.CLOSED, "one per queue"


def test_sync_client_round_trip(broker: Broker) -> None:
    from ballast.sync import Client

    seen: list[bytes] = []
    with Client(broker.address) as client:
        client.create_queue("scripts")
        receipt = client.publish("scripts", b"from a script")
        assert receipt.id.offset == 0 and receipt.queue.depth == 1
        client.consume("scripts", lambda delivery: seen.append(delivery.payload), max_messages=1)
        assert client.get_stats("scripts").queues[0].saturation.depth == 0
    assert seen == [b"from a script"]


async def test_mutual_tls_sends_the_client_certificate(
    broker_factory: StartBroker, tmp_path: Path
) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca)]
    broker = broker_factory(*tls)
    client = TlsConfig(
        ca=ca, cert=tmp_path / "client.pem", key=tmp_path / "client.key", server_name="localhost"
    )
    async with Connection(ClientConfig(broker.address, tls=client)) as connection:
        await Admin(connection).create_queue("mutual")
        async with Producer(connection) as producer:
            assert (await producer.publish("mutual", b"both sides")).id.offset == 0
    without = ClientConfig(broker.address, tls=TlsConfig(ca=ca, server_name="localhost"))
    async with Connection(without) as connection:
        with pytest.raises(TlsError, match="refused the client's certificate"):
            await Admin(connection).get_queue("mutual")
    wrong_ca = TlsConfig(ca=tmp_path / "client.pem", server_name="localhost")
    async with Connection(ClientConfig(broker.address, tls=wrong_ca)) as connection:
        with pytest.raises(TlsError, match="not signed by the CA"):
            await Admin(connection).get_queue("mutual")


async def test_consumer_of_a_missing_queue_ends_with_not_found(broker: Broker) -> None:
    async def handler(_: Delivery) -> None:
        raise AssertionError("no delivery from a missing queue")

    async with Connection(broker.address) as connection:
        consumer = Consumer(connection, "missing", handler)
        with pytest.raises(NotFound):
            await asyncio.wait_for(consumer.run(), 10)


async def test_consumer_keeps_its_credit_window_and_concurrency_limit(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        await Admin(connection).create_queue("window")
        async with Producer(connection) as producer:
            await producer.publish_all("window", [str(i).encode() for i in range(30)])
        stats = Stats(connection)
        running = 0
        most_running = 0
        most_in_flight = 0

        async def handler(_: Delivery) -> None:
            nonlocal running, most_running, most_in_flight
            running += 1
            most_running = max(most_running, running)
            figures = await stats.queue("window")  # work that yields, and a look
            most_in_flight = max(most_in_flight, figures.in_flight)
            running -= 1

        config = ConsumerConfig(prefetch=5, concurrency=2, max_messages=30)
        await asyncio.wait_for(Consumer(connection, "window", handler, config).run(), 20)
        assert most_running == 2, "two handlers at once, never more"
        assert 2 <= most_in_flight <= 5, f"{most_in_flight} leased with a window of 5"
        assert (await Admin(connection).get_queue("window")).depth == 0


async def test_pull_mode_round_trip_window_and_dead_letters(broker: Broker) -> None:
    async with Connection(broker.address) as connection:
        admin = Admin(connection)
        await admin.create_queue("pulled", queue_settings(max_attempts=2))
        async with Producer(connection) as producer:
            await producer.publish_all("pulled", [str(i).encode() for i in range(40)])
            await producer.publish("pulled", Message(b"poison", lane=2))
        stats = Stats(connection)
        seen: list[bytes] = []
        most_in_flight = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal most_in_flight
            figures = await stats.queue("pulled")
            most_in_flight = max(most_in_flight, figures.in_flight)
            seen.append(delivery.payload)
            if delivery.payload == b"poison":
                raise ValueError("bad input")

        config = ConsumerConfig(
            mode="pull", prefetch=8, concurrency=4, max_messages=42, nack_delay=NackPolicy(0, 0)
        )
        consumer = Consumer(connection, "pulled", handler, config)
        await asyncio.wait_for(consumer.run(), 20)
        assert sorted(p for p in seen if p != b"poison") == sorted(
            str(i).encode() for i in range(40)
        )
        assert seen.count(b"poison") == 2 and consumer.nacked == 2 and consumer.acked == 40
        assert most_in_flight <= 8, f"{most_in_flight} leased with a window of 8"
        assert (await admin.get_queue("pulled")).depth == 0, "acked and dead-lettered"
        dead = await consume(connection, "pulled.dead", 1, mode="pull")
        assert dead[0].headers["ballast-dead-letter-reason"] == "ValueError: bad input"
