"""Ballast's Python client: ``grpc.aio`` first, with a small sync wrapper
(:mod:`ballast.sync`). See the package README for a five-minute tour."""

from .admin import Admin, Stats, queue_settings
from .backoff import Backoff, RetryPolicy
from .breaker import BreakerConfig, BreakerState, CircuitBreaker
from .client import ClientConfig, Connection, TlsConfig
from .consumer import Consumer, ConsumerConfig, NackPolicy
from .errors import (
    Aborted,
    AlreadyExists,
    BallastError,
    BrokerError,
    CircuitOpen,
    Closed,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotLeader,
    PermissionDenied,
    ProtocolError,
    Refusal,
    Refused,
    TlsError,
    Unauthenticated,
    Unavailable,
)
from .producer import Producer, ProducerConfig
from .types import Delivery, Message, MessageId, Receipt, Saturation

__all__ = [
    "Aborted",
    "Admin",
    "AlreadyExists",
    "Backoff",
    "BallastError",
    "BreakerConfig",
    "BreakerState",
    "BrokerError",
    "CircuitBreaker",
    "CircuitOpen",
    "ClientConfig",
    "Closed",
    "Connection",
    "Consumer",
    "ConsumerConfig",
    "DeadlineExceeded",
    "Delivery",
    "FailedPrecondition",
    "InvalidArgument",
    "Message",
    "MessageId",
    "NackPolicy",
    "NotFound",
    "NotLeader",
    "PermissionDenied",
    "Producer",
    "ProducerConfig",
    "ProtocolError",
    "Receipt",
    "Refusal",
    "Refused",
    "RetryPolicy",
    "Saturation",
    "Stats",
    "TlsConfig",
    "TlsError",
    "Unauthenticated",
    "Unavailable",
    "queue_settings",
]
