"""Plain data the client hands out: messages, receipts, saturation figures."""

from __future__ import annotations

from dataclasses import dataclass, field

from .v1 import ballast_pb2 as pb


@dataclass(frozen=True)
class Saturation:
    """How full a queue or lane is (the signal producers slow down on).

    ``saturation`` is ``max(depth / max_messages, bytes / max_bytes)``;
    ``drain_estimate_ms`` is ``None`` when nothing was acked recently.
    """

    depth: int = 0
    bytes: int = 0
    saturation: float = 0.0
    oldest_age_ms: int = 0
    drain_estimate_ms: int | None = None
    ack_rate: float = 0.0
    publish_rate: float = 0.0

    @staticmethod
    def from_pb(value: pb.Saturation) -> Saturation:
        return Saturation(
            depth=value.depth,
            bytes=value.bytes,
            saturation=value.saturation,
            oldest_age_ms=value.oldest_age_ms,
            drain_estimate_ms=(
                value.drain_estimate_ms if value.HasField("drain_estimate_ms") else None
            ),
            ack_rate=value.ack_rate,
            publish_rate=value.publish_rate,
        )


@dataclass(frozen=True)
class MessageId:
    """Where a message is stored: its lane and offset in the lane's log."""

    lane: int
    offset: int


@dataclass(frozen=True)
class Receipt:
    """The broker's answer to a publish; ``duplicate`` when the idempotency
    key was seen before (nothing new stored, ``id`` is the original's)."""

    id: MessageId
    duplicate: bool
    queue: Saturation
    lane: Saturation
    idempotency_key: str

    @staticmethod
    def from_pb(value: pb.Receipt, key: str) -> Receipt:
        return Receipt(
            id=MessageId(value.id.lane, value.id.offset),
            duplicate=value.duplicate,
            queue=Saturation.from_pb(value.queue),
            lane=Saturation.from_pb(value.lane),
            idempotency_key=key,
        )


@dataclass
class Message:
    """A message to publish. ``key`` is the idempotency key (the producer
    makes one when empty); ``lane`` ``None`` is the queue's default lane."""

    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    key: str = ""
    lane: int | None = None
    delay_ms: int = 0
    ttl_ms: int = 0
    """Time to live from the publish, 0 for the queue's alone (docs/api.md,
    "Message expiry")."""

    def to_pb(self) -> pb.Message:
        message = pb.Message(
            payload=self.payload,
            headers=self.headers,
            idempotency_key=self.key,
            delay_ms=self.delay_ms,
            ttl_ms=self.ttl_ms,
        )
        if self.lane is not None:
            message.lane = self.lane
        return message


@dataclass(frozen=True)
class Delivery:
    """One leased delivery handed to a consumer's handler."""

    delivery_id: int
    id: MessageId
    payload: bytes
    headers: dict[str, str]
    idempotency_key: str
    attempt: int
    published_at_ms: int
    lease_deadline_ms: int
    #: The lease this delivery was given, in ms (what an extension renews).
    lease_ms: int = 0

    @staticmethod
    def from_pb(value: pb.Delivery) -> Delivery:
        return Delivery(
            delivery_id=value.delivery_id,
            id=MessageId(value.id.lane, value.id.offset),
            payload=value.payload,
            headers=dict(value.headers),
            idempotency_key=value.idempotency_key,
            attempt=value.attempt,
            published_at_ms=value.published_at_ms,
            lease_deadline_ms=value.lease_deadline_ms,
            lease_ms=value.lease_ms,
        )
