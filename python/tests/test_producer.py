"""The producer against a fake connection: per-lane batches, keys kept across retries."""

from __future__ import annotations

import asyncio
from typing import Any

from ballast import Backoff, Connection, Message, Producer, ProducerConfig, RetryPolicy, Unavailable
from ballast.v1 import ballast_pb2 as pb


class FakeConnection(Connection):
    """Answers PublishBatch with receipts after failing the first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:  # no channel
        self.failures = failures
        self.requests: list[pb.PublishBatchRequest] = []

    async def unary(
        self, method: str, request: Any, response_type: Any, timeout: float | None = None
    ) -> Any:
        assert method == "Publisher/PublishBatch"
        copy = pb.PublishBatchRequest()
        copy.CopyFrom(request)
        self.requests.append(copy)
        if self.failures:
            self.failures -= 1
            raise Unavailable("connection reset")
        messages = request.messages
        ids = [pb.MessageId(lane=m.lane, offset=i) for i, m in enumerate(messages)]
        receipts = [pb.Receipt(id=id_) for id_ in ids]
        return pb.PublishBatchResponse(receipts=receipts)


async def test_messages_are_batched_per_lane() -> None:
    fake = FakeConnection()
    producer = Producer(fake, ProducerConfig(linger=10.0))
    futures = [
        producer.submit("q", Message(b"a", lane=0)),
        producer.submit("q", Message(b"b", lane=2)),
        producer.submit("q", Message(b"c", lane=0)),
        producer.submit("q", Message(b"d")),
        producer.submit("other", Message(b"e", lane=0)),
    ]
    await producer.flush()
    assert all(future.done() for future in futures)
    batches = sorted(
        (r.queue, [m.payload for m in r.messages], {m.lane for m in r.messages})
        for r in fake.requests
    )
    assert batches == [
        ("other", [b"e"], {0}),
        ("q", [b"a", b"c"], {0}),
        ("q", [b"b"], {2}),
        ("q", [b"d"], {0}),  # no lane: the broker's default (unset on the wire)
    ]
    unlaned = [m for r in fake.requests for m in r.messages if m.payload == b"d"]
    assert not unlaned[0].HasField("lane")


async def test_a_full_batch_is_sent_without_waiting_for_the_linger() -> None:
    fake = FakeConnection()
    producer = Producer(fake, ProducerConfig(linger=60.0, batch_count_max=3))
    receipts = await asyncio.wait_for(
        asyncio.gather(*(producer.submit("q", b"x") for _ in range(3))), 5
    )
    assert [r.id.offset for r in receipts] == [0, 1, 2] and len(fake.requests) == 1


async def test_retries_resend_the_same_idempotency_keys() -> None:
    fake = FakeConnection(failures=2)
    config = ProducerConfig(linger=0.0, retry=RetryPolicy(5, Backoff(0.001, 0.002)))
    producer = Producer(fake, config)
    receipts = await producer.publish_all("q", [b"1", Message(b"2", key="mine"), b"3"])
    assert len(fake.requests) == 3, "two failures, then success"
    keys = [[m.idempotency_key for m in r.messages] for r in fake.requests]
    assert keys[0] == keys[1] == keys[2]
    assert keys[0][1] == "mine" and len(set(keys[0])) == 3 and all(keys[0])
    assert [r.idempotency_key for r in receipts] == keys[0]


async def test_publish_all_splits_by_lane_and_batch_size_and_keeps_order() -> None:
    fake = FakeConnection()
    producer = Producer(fake, ProducerConfig(batch_count_max=2))
    messages = [Message(str(i).encode(), lane=i % 2) for i in range(7)]
    receipts = await producer.publish_all("q", messages)
    sizes = sorted(len(r.messages) for r in fake.requests)
    assert sizes == [1, 2, 2, 2], "lane 0: 4 messages in 2 batches; lane 1: 3 in 2"
    assert all(len({m.lane for m in r.messages}) == 1 for r in fake.requests)
    assert [r.id.lane for r in receipts] == [i % 2 for i in range(7)], "receipts in input order"
    sent = {m.payload: m.idempotency_key for r in fake.requests for m in r.messages}
    assert [r.idempotency_key for r in receipts] == [sent[str(i).encode()] for i in range(7)]


async def test_batches_stay_within_their_size_in_bytes() -> None:
    fake = FakeConnection()
    producer = Producer(fake, ProducerConfig(linger=0.0, batch_size_max=10))
    await asyncio.gather(*(producer.submit("q", b"x" * 4) for _ in range(5)))
    await producer.publish_all("q", [b"y" * 4] * 5 + [b"z" * 30])
    sizes = [[len(m.payload) for m in r.messages] for r in fake.requests]
    assert all(sum(batch) <= 10 for batch in sizes if len(batch) > 1), sizes
    assert [30] in sizes, "an oversize message goes alone"
    assert sum(len(batch) for batch in sizes) == 11
