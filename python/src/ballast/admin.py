"""Queue administration and saturation figures (``Admin`` and ``Stats`` services).

Answers are the protobuf messages of ``ballast.v1`` (typed by the
checked-in ``.pyi``): :class:`~ballast.v1.ballast_pb2.QueueInfo`,
:class:`~ballast.v1.ballast_pb2.StatsResponse`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from .client import EOF, ClientConfig, Connection, connect
from .v1 import ballast_pb2 as pb

#: Bounds of ``Watch``'s interval (``interval_ms``).
WATCH_INTERVAL_MS_MIN = 100
WATCH_INTERVAL_MS_MAX = 60_000

SYNC_POLICIES = {
    None: pb.SYNC_POLICY_UNSPECIFIED,
    "fsync": pb.SYNC_POLICY_FSYNC,
    "interval": pb.SYNC_POLICY_INTERVAL,
    "none": pb.SYNC_POLICY_NONE,
}

EXPIRED_ACTIONS = {
    None: pb.EXPIRED_ACTION_UNSPECIFIED,
    "dead_letter": pb.EXPIRED_ACTION_DEAD_LETTER,
    "drop": pb.EXPIRED_ACTION_DROP,
}


def queue_settings(
    *,
    lanes: Sequence[str] | None = None,
    lane_weights: Sequence[int] | None = None,
    strict_priority: bool | None = None,
    default_lane: int | None = None,
    lease_timeout_ms: int | None = None,
    max_attempts: int | None = None,
    dead_letter: bool | None = None,
    dedupe_window_ms: int | None = None,
    message_size_max: int | None = None,
    sync_policy: str | None = None,
    sync_interval_ms: int | None = None,
    max_messages: int | None = None,
    max_bytes: int | None = None,
    lane_admission: Sequence[float] | None = None,
    max_publish_rate: int | None = None,
    max_publish_byte_rate: int | None = None,
    message_ttl_ms: int | None = None,
    expired_action: str | None = None,
    max_delivery_rate: int | None = None,
    replicas: int | None = None,
) -> pb.QueueSettings:
    """A ``QueueSettings``; ``None`` leaves a setting at the broker's default.
    ``sync_policy`` is ``"fsync"``, ``"interval"`` or ``"none"``;
    ``expired_action`` is ``"dead_letter"`` or ``"drop"``. ``replicas`` is 1
    or the cluster's voter count (a replicated queue, ``docs/replication.md``;
    fixed at creation)."""
    if sync_policy not in SYNC_POLICIES:
        raise ValueError(f"sync_policy must be one of fsync, interval, none, not {sync_policy!r}")
    if expired_action not in EXPIRED_ACTIONS:
        raise ValueError(f"expired_action must be one of dead_letter, drop, not {expired_action!r}")
    settings = pb.QueueSettings(
        lanes=list(lanes or ()),
        lane_weights=list(lane_weights or ()),
        lane_admission=list(lane_admission or ()),
        sync_policy=SYNC_POLICIES[sync_policy],
        expired_action=EXPIRED_ACTIONS[expired_action],
    )
    optional = {
        "strict_priority": strict_priority,
        "default_lane": default_lane,
        "lease_timeout_ms": lease_timeout_ms,
        "max_attempts": max_attempts,
        "dead_letter": dead_letter,
        "dedupe_window_ms": dedupe_window_ms,
        "message_size_max": message_size_max,
        "sync_interval_ms": sync_interval_ms,
        "max_messages": max_messages,
        "max_bytes": max_bytes,
        "max_publish_rate": max_publish_rate,
        "max_publish_byte_rate": max_publish_byte_rate,
        "message_ttl_ms": message_ttl_ms,
        "max_delivery_rate": max_delivery_rate,
        "replicas": replicas,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(settings, name, value)
    return settings


class _Service:
    def __init__(self, connection: Connection | ClientConfig | str | None = None) -> None:
        self._connection, self._owned = connect(connection)
        self.timeout = 30.0

    async def close(self) -> None:
        if self._owned:
            await self._connection.close()


class Admin(_Service):
    """Creates, inspects, purges and deletes queues."""

    async def create_queue(
        self, name: str, settings: pb.QueueSettings | None = None
    ) -> pb.QueueInfo:
        """Creates ``name`` (and ``name.dead``); the same settings again is a no-op."""
        request = pb.CreateQueueRequest(name=name, settings=settings or pb.QueueSettings())
        return await self._connection.unary(
            "Admin/CreateQueue", request, pb.QueueInfo, timeout=self.timeout
        )

    async def get_queue(self, name: str) -> pb.QueueInfo:
        return await self._connection.unary(
            "Admin/GetQueue", pb.GetQueueRequest(name=name), pb.QueueInfo, timeout=self.timeout
        )

    async def list_queues(self) -> list[pb.QueueInfo]:
        response = await self._connection.unary(
            "Admin/ListQueues", pb.ListQueuesRequest(), pb.ListQueuesResponse, timeout=self.timeout
        )
        return list(response.queues)

    async def delete_queue(self, name: str) -> None:
        await self._connection.unary(
            "Admin/DeleteQueue",
            pb.DeleteQueueRequest(name=name),
            pb.DeleteQueueResponse,
            timeout=self.timeout,
        )

    async def purge_queue(self, name: str) -> int:
        """Marks every message of ``name`` done; returns how many."""
        response = await self._connection.unary(
            "Admin/PurgeQueue",
            pb.PurgeQueueRequest(name=name),
            pb.PurgeQueueResponse,
            timeout=self.timeout,
        )
        return response.purged


class Stats(_Service):
    """Saturation figures, once (``get``) or pushed (``watch``)."""

    async def get(self, queue: str = "") -> pb.StatsResponse:
        """Figures of ``queue``, or of every queue when empty."""
        return await self._connection.unary(
            "Stats/GetStats", pb.StatsRequest(queue=queue), pb.StatsResponse, timeout=self.timeout
        )

    async def queue(self, queue: str) -> pb.QueueStats:
        """One queue's figures."""
        response = await self.get(queue)
        return response.queues[0]

    async def watch(
        self, queue: str = "", interval_ms: int = 1000
    ) -> AsyncIterator[pb.StatsResponse]:
        """Figures every ``interval_ms`` (100..=60000) until the loop stops."""
        if not WATCH_INTERVAL_MS_MIN <= interval_ms <= WATCH_INTERVAL_MS_MAX:
            raise ValueError(
                f"interval_ms must be {WATCH_INTERVAL_MS_MIN}..={WATCH_INTERVAL_MS_MAX}"
            )
        address = self._connection.address
        call = self._connection.server_stream(
            "Stats/Watch", pb.WatchRequest(queue=queue, interval_ms=interval_ms), pb.StatsResponse
        )
        try:
            while True:
                response = await call.read()
                if response is EOF:
                    return
                yield response
        except grpc.RpcError as error:
            raise self._connection.failure(address, error) from None
        finally:
            call.cancel()
