"""The client's typed errors, mapped from gRPC status and Ballast metadata.

Every error is a :class:`BallastError`; :attr:`BallastError.retryable` says
whether sending the same request again can help, and
:attr:`BallastError.retry_after` is the least time to wait before doing so.
The mapping follows ``docs/api.md`` ("Status codes") and the Rust client's
``client/src/error.rs``:

========================  =====================  =========
gRPC code                 error                  retryable
========================  =====================  =========
INVALID_ARGUMENT,         InvalidArgument        no
OUT_OF_RANGE
NOT_FOUND                 NotFound               no
ALREADY_EXISTS            AlreadyExists          no
RESOURCE_EXHAUSTED        Refused                yes, after ``retry_after``
UNAVAILABLE               Unavailable            yes (after ``retry_after``
                                                 when a recovering queue sent one,
                                                 and never sooner than 0.2 s)
UNAVAILABLE with          NotLeader              yes (the connection sends
``ballast-reason:                                the retry to ``leader``)
not_leader``
DEADLINE_EXCEEDED         DeadlineExceeded       yes
ABORTED                   Aborted                yes
FAILED_PRECONDITION       FailedPrecondition     no
PERMISSION_DENIED         PermissionDenied       no
UNAUTHENTICATED           Unauthenticated        no
UNAVAILABLE from a        TlsError               no
failed TLS handshake
anything else             BrokerError            no
========================  =====================  =========
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import grpc

RETRY_AFTER_METADATA = "retry-after-ms"
REASON_METADATA = "ballast-reason"
LANE_METADATA = "ballast-lane"
LANE_BIN_METADATA = "ballast-lane-bin"
LANE_INDEX_METADATA = "ballast-lane-index"
DEPTH_METADATA = "ballast-depth"
BYTES_METADATA = "ballast-bytes"
SATURATION_METADATA = "ballast-saturation"
THRESHOLD_METADATA = "ballast-threshold"
DISK_FREE_BYTES_METADATA = "ballast-disk-free-bytes"

REASON_QUEUE_FULL = "queue_full"
REASON_DISK_LOW = "disk_low"
REASON_DISK_FULL = "disk_full"
REASON_PUBLISH_RATE = "publish_rate"
#: A cluster follower (or a node during an election) was asked to change or
#: deliver from a replicated queue (``docs/replication.md``).
REASON_NOT_LEADER = "not_leader"
#: Metadata naming the cluster leader's ``host:port`` on a follower's UNAVAILABLE.
LEADER_METADATA = "ballast-leader"

#: Shortest wait in seconds before retrying an UNAVAILABLE: a follower during
#: an election or a broker shutting down is not back sooner (the broker's
#: ``retry-after-ms`` for a redirect). The Rust client's
#: ``UNAVAILABLE_RETRY_FLOOR``.
UNAVAILABLE_RETRY_FLOOR = 0.2

Metadata = Iterable[tuple[str, str | bytes]]


class BallastError(Exception):
    """Base of every error the client raises."""

    #: Whether sending the same request again may succeed.
    retryable: bool = False
    #: The gRPC status code this error stands for, if any.
    code: grpc.StatusCode | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def retry_after(self) -> float | None:
        """Least time to wait before a retry, in seconds, when known."""
        return None


class InvalidArgument(BallastError):
    """The request is malformed (``INVALID_ARGUMENT``); fix it, never retried."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BallastError):
    """The queue does not exist (``NOT_FOUND``)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(BallastError):
    """The queue exists with other settings (``ALREADY_EXISTS``)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(BallastError):
    """Not applicable to the current state, e.g. an ack of an expired delivery."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(BallastError):
    """The principal may not do this action on this queue (``PERMISSION_DENIED``)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(BallastError):
    """The broker did not accept the credentials (``UNAUTHENTICATED``)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Aborted(BallastError):
    """The broker aborted the call (``ABORTED``); retryable."""

    retryable = True
    code = grpc.StatusCode.ABORTED


class _WithRetryAfter(BallastError):
    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self._retry_after = retry_after

    @property
    def retry_after(self) -> float | None:
        return self._retry_after


class Unavailable(_WithRetryAfter):
    """The broker cannot serve now: shutting down, unreachable, or a queue
    reopening its log (then with ``retry_after``). Retryable; the request may
    or may not have been applied, so a publish retries with its key.

    ``reason`` is the broker's ``ballast-reason`` when it sent one
    (``cluster``: the leader lost its majority before the write committed).
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(
        self, message: str, retry_after: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, retry_after)
        self.reason = reason

    @property
    def unreachable(self) -> bool:
        """Whether the node could not be reached (or is going away): no
        Ballast reason and no retry-after hint, so the broker did not judge
        the call. A client given several addresses tries the next one."""
        return self.reason is None and self._retry_after is None


class NotLeader(Unavailable):
    """A cluster node that is not the leader was asked to change or deliver
    from a replicated queue (UNAVAILABLE, ``ballast-reason: not_leader``;
    ``docs/replication.md``). ``leader`` is the leader's ``host:port``, or
    ``None`` during an election. The :class:`~ballast.client.Connection`
    sends the next calls to the leader by itself. Retryable; not a failure
    for the circuit breaker (the broker answered)."""

    def __init__(
        self, message: str, retry_after: float | None = None, leader: str | None = None
    ) -> None:
        super().__init__(message, retry_after, REASON_NOT_LEADER)
        self.leader = leader


def least_wait(error: BallastError) -> float | None:
    """The least time to wait before retrying after ``error``: its
    ``retry_after``, raised to :data:`UNAVAILABLE_RETRY_FLOOR` for an
    :class:`Unavailable`."""
    if isinstance(error, Unavailable):
        return max(error.retry_after or 0.0, UNAVAILABLE_RETRY_FLOOR)
    return error.retry_after


@dataclass(frozen=True)
class Refusal:
    """The figures the broker attaches to an admission refusal.

    ``depth``, ``bytes`` and ``saturation`` are the queue's figures when it
    refused; ``threshold`` is the refused lane's admission fraction. Each is
    ``None`` when the broker did not send it or sent something unreadable.
    """

    reason: str | None = None
    lane: str | None = None
    lane_index: int | None = None
    depth: int | None = None
    bytes: int | None = None
    saturation: float | None = None
    threshold: float | None = None
    disk_free_bytes: int | None = None

    @property
    def is_disk_low(self) -> bool:
        """Refused because the broker's disk is nearly full."""
        return self.disk_free_bytes is not None

    @property
    def is_rate_limited(self) -> bool:
        """Refused by the queue's publish quota."""
        return self.reason == REASON_PUBLISH_RATE


class Refused(_WithRetryAfter):
    """The broker refused the work because a limit was hit
    (``RESOURCE_EXHAUSTED``). Nothing was stored; slow down and retry no
    sooner than ``retry_after``. ``refusal`` carries the figures."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self, message: str, retry_after: float | None = None, refusal: Refusal | None = None
    ) -> None:
        super().__init__(message, retry_after)
        self.refusal = refusal

    @property
    def reason(self) -> str | None:
        """``queue_full``, ``disk_low``, ``disk_full``, ``publish_rate``, ... if sent."""
        return self.refusal.reason if self.refusal else None


class DeadlineExceeded(BallastError):
    """The call did not finish within its deadline; the outcome is unknown
    (a publish retried with its key is stored at most once)."""

    retryable = True
    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str, last_error: BallastError | None = None) -> None:
        if last_error is not None:
            message = f"{message} (last error: {last_error})"
        super().__init__(message)
        self.last_error = last_error


class CircuitOpen(BallastError):
    """The queue's circuit breaker is open: the call failed fast without
    reaching the broker. Retry after ``retry_after``."""

    retryable = True

    def __init__(self, retry_in: float) -> None:
        super().__init__(
            f"circuit breaker open after repeated failures; next probe in {retry_in * 1000:.0f}ms"
        )
        self.retry_in = retry_in

    @property
    def retry_after(self) -> float | None:
        return self.retry_in


class TlsError(BallastError):
    """TLS failed: the broker's certificate is not signed by the given CA or
    does not name the host, one side speaks TLS and the other does not, or
    the broker refused the client certificate. The message says which and
    what to change; retrying cannot help. (gRPC reports these as
    UNAVAILABLE; the client recognises them by the transport's message.)"""


#: Markers of a TLS failure in a local UNAVAILABLE, and the advice for each.
_TLS_FAILURES = (
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the broker's certificate is not signed by the CA the client trusts (TlsConfig.ca)",
    ),
    (
        "WRONG_VERSION_NUMBER",
        "the broker does not speak TLS: drop TlsConfig, or start the broker with --tls-cert",
    ),
    (
        "Hostname Verification",
        "the broker's certificate does not name the host dialled: "
        "set TlsConfig.server_name to a name it has",
    ),
    (
        "TSI_DATA_CORRUPTED",
        "the broker refused the client's certificate: mutual TLS needs TlsConfig.cert and "
        "key, signed by a CA the broker's --tls-client-ca holds",
    ),
    ("Tls handshake failed", "the TLS handshake failed"),
)


def _tls_advice(message: str) -> str | None:
    for marker, advice in _TLS_FAILURES:
        if marker in message:
            return f"{advice} ({message})"
    return None


class BrokerError(BallastError):
    """A failure retrying will not fix: INTERNAL (quote its error id to an
    operator), UNIMPLEMENTED, UNKNOWN, CANCELLED, DATA_LOSS."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(f"broker error ({code.name}): {message}")
        self.code = code


class ProtocolError(BallastError):
    """The broker's answer broke the protocol."""


class Closed(BallastError):
    """The producer or consumer was closed before the call was answered."""

    def __init__(self, message: str = "the client is closed") -> None:
        super().__init__(message)


_BY_CODE: dict[grpc.StatusCode, type[BallastError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.ABORTED: Aborted,
}


def _text(metadata: dict[str, str | bytes], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    return value.strip()


def _int(metadata: dict[str, str | bytes], key: str) -> int | None:
    text = _text(metadata, key)
    if text is None or not text.isdigit():
        return None
    return int(text)


def _float(metadata: dict[str, str | bytes], key: str) -> float | None:
    text = _text(metadata, key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def parse_refusal(metadata: Metadata) -> Refusal | None:
    """The refusal figures in ``metadata``; ``None`` when it holds none."""
    table = {key.lower(): value for key, value in metadata}
    lane = _text(table, LANE_METADATA)
    if lane is None:
        lane = _text(table, LANE_BIN_METADATA)
    refusal = Refusal(
        reason=_text(table, REASON_METADATA),
        lane=lane,
        lane_index=_int(table, LANE_INDEX_METADATA),
        depth=_int(table, DEPTH_METADATA),
        bytes=_int(table, BYTES_METADATA),
        saturation=_float(table, SATURATION_METADATA),
        threshold=_float(table, THRESHOLD_METADATA),
        disk_free_bytes=_int(table, DISK_FREE_BYTES_METADATA),
    )
    return None if refusal == Refusal() else refusal


def parse_retry_after(metadata: Metadata) -> float | None:
    """The broker's ``retry-after-ms`` hint in seconds; an unreadable value is no hint."""
    table = {key.lower(): value for key, value in metadata}
    ms = _int(table, RETRY_AFTER_METADATA)
    return None if ms is None else ms / 1000.0


def from_status(code: grpc.StatusCode, message: str, metadata: Metadata = ()) -> BallastError:
    """Maps a gRPC status (code, details, trailing metadata) to an error."""
    metadata = list(metadata)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Refused(message, parse_retry_after(metadata), parse_refusal(metadata))
    if code == grpc.StatusCode.UNAVAILABLE:
        advice = _tls_advice(message)
        if advice is not None:
            return TlsError(advice)
        table = {key.lower(): value for key, value in metadata}
        reason = _text(table, REASON_METADATA)
        if reason == REASON_NOT_LEADER:
            leader = _text(table, LEADER_METADATA) or None
            return NotLeader(message, parse_retry_after(metadata), leader)
        return Unavailable(message, parse_retry_after(metadata), reason)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded: {message}")
    kind = _BY_CODE.get(code)
    if kind is not None:
        return kind(message)
    return BrokerError(message, code)


def from_rpc_error(error: grpc.RpcError) -> BallastError:
    """Maps a failed call (sync or ``grpc.aio``) to an error."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    metadata: list[tuple[str, str | bytes]] = []
    for item in trailing or ():
        key, value = cast(Any, item)
        metadata.append((str(key), value))
    return from_status(code or grpc.StatusCode.UNKNOWN, details or "", metadata)
