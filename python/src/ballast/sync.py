"""A small synchronous wrapper for scripts: the async client on a private
event loop in a background thread.

    with ballast.sync.Client("127.0.0.1:7400") as client:
        client.create_queue("jobs")
        receipt = client.publish("jobs", b"hello")
        client.consume("jobs", handle, max_messages=1)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from .admin import Admin, Stats
from .client import ClientConfig, Connection
from .consumer import Consumer, ConsumerConfig
from .producer import Producer, ProducerConfig
from .types import Delivery, Message, Receipt
from .v1 import ballast_pb2 as pb

T = TypeVar("T")


class Client:
    """Producer, consumer, admin and stats calls that block until answered."""

    def __init__(
        self,
        config: ClientConfig | str | None = None,
        producer: ProducerConfig | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def setup() -> tuple[Connection, Producer]:
            connection = Connection(config)
            return connection, Producer(connection, producer)

        self._connection, self._producer = self._run(setup())
        self.admin = Admin(self._connection)
        self.stats = Stats(self._connection)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        async def shutdown() -> None:
            await self._producer.close()
            await self._connection.close()

        self._run(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def create_queue(self, name: str, settings: pb.QueueSettings | None = None) -> pb.QueueInfo:
        return self._run(self.admin.create_queue(name, settings))

    def delete_queue(self, name: str) -> None:
        self._run(self.admin.delete_queue(name))

    def get_stats(self, queue: str = "") -> pb.StatsResponse:
        return self._run(self.stats.get(queue))

    def publish(
        self, queue: str, message: Message | bytes, timeout: float | None = None
    ) -> Receipt:
        return self._run(self._producer.publish(queue, message, timeout=timeout))

    def publish_all(self, queue: str, messages: Iterable[Message | bytes]) -> list[Receipt]:
        return self._run(self._producer.publish_all(queue, messages))

    def consume(
        self,
        queue: str,
        handler: Callable[[Delivery], None],
        max_messages: int | None = None,
        config: ConsumerConfig | None = None,
    ) -> None:
        """Runs ``handler`` (a plain function, run in a worker thread) on
        deliveries until ``max_messages`` were handled (forever if ``None``)."""
        config = dataclasses.replace(config or ConsumerConfig(), max_messages=max_messages)

        async def handle(delivery: Delivery) -> None:
            await asyncio.to_thread(handler, delivery)

        async def run() -> None:
            await Consumer(self._connection, queue, handle, config).run()

        self._run(run())
