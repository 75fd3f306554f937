"""The producer: batches per (queue, lane), retries with the same keys.

``publish`` puts the message in its (queue, lane) batch and waits for its
receipt. A batch is sent when it holds ``batch_count_max`` messages or
``batch_size_max`` payload bytes, or ``linger`` after its first message.
Each message gets its idempotency key when it is submitted (a random one
unless the caller set ``Message.key``), and every retry of its batch sends
the same key, so a publish retried after a lost answer, a broker restart or
a deadline is stored once. Retries follow :class:`~ballast.retry.Retrier`
(full jitter, never sooner than retry-after) through the queue's circuit
breaker, within the earliest deadline of the batch's messages.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backoff import RetryPolicy
from .breaker import BreakerConfig, BreakerState, CircuitBreaker
from .client import ClientConfig, Connection, connect
from .errors import BallastError, Closed, InvalidArgument, ProtocolError
from .retry import Retrier
from .types import Message, MessageId, Receipt, Saturation
from .v1 import ballast_pb2 as pb

#: The broker's batch limit (``BATCH_COUNT_MAX``).
BATCH_COUNT_MAX = 1000
#: The broker's idempotency key limit (``KEY_SIZE_MAX``), in bytes.
KEY_SIZE_MAX = 256


@dataclass(frozen=True)
class ProducerConfig:
    """How a producer batches and retries (times in seconds).

    ``deadline`` bounds each ``publish`` from submit to receipt, retries
    included (a call may pass its own); ``attempt_timeout`` bounds one
    attempt. ``in_flight_batches_max`` caps batches sent at once.
    """

    linger: float = 0.005
    batch_count_max: int = 500
    batch_size_max: int = 4 * 1024 * 1024
    deadline: float = 30.0
    attempt_timeout: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerConfig | None = field(default_factory=BreakerConfig)
    in_flight_batches_max: int = 16
    jitter_seed: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.batch_count_max <= BATCH_COUNT_MAX:
            raise ValueError(f"batch_count_max must be 1..={BATCH_COUNT_MAX}")
        if self.linger < 0 or self.deadline <= 0 or self.attempt_timeout <= 0:
            raise ValueError("linger must be >= 0, deadline and attempt_timeout > 0")
        if self.in_flight_batches_max < 1:
            raise ValueError("in_flight_batches_max must be at least 1")


@dataclass
class _Pending:
    message: pb.Message
    key: str
    deadline: float
    future: asyncio.Future[Receipt]


@dataclass
class _Batch:
    items: list[_Pending] = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


class Producer:
    """Publishes through one connection; use ``async with`` or ``close()``."""

    def __init__(
        self,
        connection: Connection | ClientConfig | str | None = None,
        config: ProducerConfig | None = None,
    ) -> None:
        self._connection, self._owned = connect(connection)
        self.config = config or ProducerConfig()
        self._retrier = Retrier(
            self.config.retry, self.config.attempt_timeout, random.Random(self.config.jitter_seed)
        )
        self._batches: dict[tuple[str, int | None], _Batch] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._in_flight = asyncio.Semaphore(self.config.in_flight_batches_max)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Keys are this producer's random prefix and a counter: unique like
        # a UUID per message, far cheaper to make.
        self._key_prefix = os.urandom(12).hex()
        self._key_counter = itertools.count()

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def breaker_state(self, queue: str) -> BreakerState:
        """The state of ``queue``'s circuit breaker (closed if never used)."""
        breaker = self._breakers.get(queue)
        return breaker.state if breaker else BreakerState.CLOSED

    async def publish(
        self, queue: str, message: Message | bytes, *, timeout: float | None = None
    ) -> Receipt:
        """Publishes one message and returns its receipt once durable."""
        return await self.submit(queue, message, timeout=timeout)

    def submit(
        self, queue: str, message: Message | bytes, *, timeout: float | None = None
    ) -> asyncio.Future[Receipt]:
        """Queues a message for its batch; the future resolves to its receipt."""
        if self._closed:
            raise Closed("the producer is closed")
        encoded, key, lane = self._encode(message)
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + (self.config.deadline if timeout is None else timeout)
        pending = _Pending(encoded, key, deadline, loop.create_future())
        slot = (queue, lane)
        batch = self._batches.get(slot)
        if batch is not None and batch.size + len(encoded.payload) > self.config.batch_size_max:
            self._flush(slot)  # this message would take the batch past its size
            batch = None
        if batch is None:
            batch = self._batches[slot] = _Batch()
            batch.timer = loop.call_later(self.config.linger, self._flush, slot)
        batch.items.append(pending)
        batch.size += len(encoded.payload)
        if (
            len(batch.items) >= self.config.batch_count_max
            or batch.size >= self.config.batch_size_max
        ):
            self._flush(slot)
        return pending.future

    def _encode(self, message: Message | bytes) -> tuple[pb.Message, str, int | None]:
        """The wire message with its idempotency key (fixed here, for every
        attempt), the key, and its lane."""
        if isinstance(message, bytes):
            key = f"{self._key_prefix}-{next(self._key_counter)}"
            return pb.Message(payload=message, idempotency_key=key), key, None
        key = message.key or f"{self._key_prefix}-{next(self._key_counter)}"
        if len(key) > KEY_SIZE_MAX // 4 and len(key.encode()) > KEY_SIZE_MAX:
            raise InvalidArgument(f"idempotency key is over {KEY_SIZE_MAX} bytes")
        encoded = message.to_pb()
        encoded.idempotency_key = key
        return encoded, key, message.lane

    async def publish_all(
        self, queue: str, messages: Iterable[Message | bytes], *, timeout: float | None = None
    ) -> list[Receipt]:
        """Publishes many messages at once, in batches per lane of up to
        ``batch_count_max`` (no linger); receipts in order. The first
        failed batch's error is raised once every batch has finished."""
        if self._closed:
            raise Closed("the producer is closed")
        deadline = time.monotonic() + (self.config.deadline if timeout is None else timeout)
        by_lane: dict[int | None, list[tuple[int, pb.Message, str]]] = {}
        count = 0
        for index, message in enumerate(messages):
            encoded, key, lane = self._encode(message)
            by_lane.setdefault(lane, []).append((index, encoded, key))
            count = index + 1
        chunks = [chunk for entries in by_lane.values() for chunk in self._chunks(entries)]
        answers = await asyncio.gather(
            *(
                self._publish_batch(queue, [e[1] for e in chunk], [e[2] for e in chunk], deadline)
                for chunk in chunks
            ),
            return_exceptions=True,
        )
        receipts: list[Receipt | None] = [None] * count
        for chunk, answer in zip(chunks, answers, strict=True):
            if isinstance(answer, BaseException):
                raise answer
            for (index, _, _), receipt in zip(chunk, answer, strict=True):
                receipts[index] = receipt
        return [receipt for receipt in receipts if receipt is not None]

    def _chunks(
        self, entries: list[tuple[int, pb.Message, str]]
    ) -> list[list[tuple[int, pb.Message, str]]]:
        """``entries`` cut into batches within ``batch_count_max`` messages
        and ``batch_size_max`` payload bytes (a larger message goes alone)."""
        chunks: list[list[tuple[int, pb.Message, str]]] = [[]]
        size = 0
        for entry in entries:
            length = len(entry[1].payload)
            current = chunks[-1]
            if current and (
                len(current) >= self.config.batch_count_max
                or size + length > self.config.batch_size_max
            ):
                chunks.append([])
                size = 0
            chunks[-1].append(entry)
            size += length
        return [chunk for chunk in chunks if chunk]

    async def flush(self) -> None:
        """Sends every open batch and waits for all batches in flight."""
        for slot in list(self._batches):
            self._flush(slot)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Sends what is pending, waits for the answers, closes the connection
        if the producer opened it."""
        self._closed = True
        await self.flush()
        if self._owned:
            await self._connection.close()

    def _flush(self, slot: tuple[str, int | None]) -> None:
        batch = self._batches.pop(slot, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send(slot[0], batch.items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _breaker(self, queue: str) -> CircuitBreaker | None:
        if self.config.breaker is None:
            return None
        breaker = self._breakers.get(queue)
        if breaker is None:
            breaker = self._breakers[queue] = CircuitBreaker(self.config.breaker)
        return breaker

    async def _publish_batch(
        self, queue: str, messages: list[pb.Message], keys: list[str], deadline: float
    ) -> list[Receipt]:
        """One PublishBatch, retried within ``deadline`` with the same keys."""
        request = pb.PublishBatchRequest(queue=queue, messages=messages)

        async def attempt(budget: float) -> pb.PublishBatchResponse:
            response = await self._connection.unary(
                "Publisher/PublishBatch", request, pb.PublishBatchResponse, timeout=budget
            )
            if len(response.receipts) != len(messages):
                raise ProtocolError(
                    f"{len(response.receipts)} receipts for a batch of {len(messages)} messages"
                )
            return response

        async with self._in_flight:
            response = await self._retrier.run(
                deadline - time.monotonic(), attempt, self._breaker(queue)
            )
        return receipts_of(response, keys)

    async def _send(self, queue: str, items: list[_Pending]) -> None:
        deadline = min(item.deadline for item in items)
        try:
            receipts = await self._publish_batch(
                queue, [item.message for item in items], [item.key for item in items], deadline
            )
        except BallastError as error:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        except BaseException as error:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(Closed(f"the publish was cancelled: {error!r}"))
            raise
        for item, receipt in zip(items, receipts, strict=True):
            if not item.future.done():
                item.future.set_result(receipt)


def receipts_of(response: pb.PublishBatchResponse, keys: list[str]) -> list[Receipt]:
    """The receipts of a batch. Its receipts share the figures taken after
    the whole batch, so each distinct figure is converted once."""
    saturations: dict[bytes, Saturation] = {}

    def saturation(value: pb.Saturation) -> Saturation:
        wire = value.SerializeToString()
        known = saturations.get(wire)
        if known is None:
            known = saturations[wire] = Saturation.from_pb(value)
        return known

    return [
        Receipt(
            MessageId(receipt.id.lane, receipt.id.offset),
            receipt.duplicate,
            saturation(receipt.queue),
            saturation(receipt.lane),
            key,
        )
        for receipt, key in zip(response.receipts, keys, strict=True)
    ]
