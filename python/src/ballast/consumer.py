"""The consumer: a handler run under a credit window and a concurrency limit.

One consume stream at a time. It subscribes with ``prefetch`` credit; each
delivery runs ``handler(delivery)`` (at most ``concurrency`` at once). A
handler that returns acks the delivery; one that raises nacks it with a
delay from ``nack_delay`` by attempt (the broker dead-letters it after the
queue's ``max_attempts``). Each finished delivery grants one credit back,
so the consumer never holds more than ``prefetch`` undone deliveries. Acks,
nacks and credit are sent together within ``ack_flush_interval``.

When the stream breaks (broker restart, network), the broker releases the
session's leases and the consumer reconnects with backoff and full jitter;
handlers still running for the old session finish, but their acks cannot
be applied (the messages are redelivered: at-least-once). Errors retrying
cannot fix (:func:`is_fatal`: unknown queue, bad argument, credentials) end
:meth:`run`.
``stop()`` stops taking deliveries, lets running handlers finish, sends
their acks and closes the stream.

Lease extension: while a handler runs, the consumer extends its
delivery's lease every third of the lease (unary ``Extend``), so long work
is not redelivered while it is still running; it stops when the handler
ends, when the broker does not extend (the lease expired or is no longer
held) or at ``extend_max`` seconds of extensions (``None``: never extend).
:meth:`Consumer.extend_lease` does one extension by hand.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from .backoff import Backoff
from .client import EOF, ClientConfig, Connection, connect
from .errors import (
    AlreadyExists,
    BallastError,
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    TlsError,
    Unauthenticated,
    Unavailable,
    least_wait,
)
from .types import Delivery
from .v1 import ballast_pb2 as pb

log = logging.getLogger("ballast")

#: The broker's credit limit per consumer (``CREDIT_MAX``).
CREDIT_MAX = 10_000
#: The broker's nack reason limit (``NACK_REASON_SIZE_MAX``), in bytes.
NACK_REASON_SIZE_MAX = 1024

Handler = Callable[[Delivery], Awaitable[None]]

_FATAL = (
    NotFound,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    FailedPrecondition,
    AlreadyExists,
    ProtocolError,
    TlsError,
)


def is_fatal(error: BallastError) -> bool:
    """Errors that end the consumer instead of a reconnect (as in the Rust
    client): the request or the credentials are wrong, the queue is gone, or
    the broker has no such call. Everything else (UNAVAILABLE, a refusal,
    INTERNAL, CANCELLED, ...) reconnects."""
    if isinstance(error, BrokerError):
        return error.code == grpc.StatusCode.UNIMPLEMENTED
    return isinstance(error, _FATAL)


@dataclass(frozen=True)
class NackPolicy:
    """Redelivery delay after attempt ``n`` fails: ``min(cap, base * 2**(n-1))``."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.base * (1 << min(max(attempt, 1) - 1, 62)))


@dataclass(frozen=True)
class ConsumerConfig:
    """How a consumer paces, runs handlers, acks and reconnects (seconds)."""

    prefetch: int = 64
    concurrency: int = 8
    nack_delay: NackPolicy = field(default_factory=NackPolicy)
    ack_flush_interval: float = 0.005
    reconnect: Backoff = field(default_factory=lambda: Backoff(0.1, 10.0))
    subscribe_timeout: float = 10.0
    stop_timeout: float = 5.0
    max_messages: int | None = None
    #: ``"stream"``: one consume stream (the default; leases are released at
    #: once when the connection drops). ``"pull"``: long-poll ``Pull`` calls
    #: for up to ``prefetch`` deliveries each, settled by unary ``Ack`` and
    #: ``Nack``: far fewer messages through ``grpc.aio`` per delivery (faster
    #: in Python), but the leases of a consumer that dies are redelivered
    #: only when they expire, and a queue's Pulls hold at most 10,000 leases.
    mode: str = "stream"
    #: Longest wait of one Pull for its first delivery, in ms (pull mode).
    pull_wait_ms: int = 1000
    #: How long a running handler's lease is kept extended, in seconds
    #: (every third of the lease); ``None`` never extends.
    extend_max: float | None = 1800.0

    def __post_init__(self) -> None:
        if self.mode not in ("stream", "pull"):
            raise ValueError(f"mode must be stream or pull, not {self.mode!r}")
        if not 1 <= self.prefetch <= CREDIT_MAX:
            raise ValueError(f"prefetch must be 1..={CREDIT_MAX}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.extend_max is not None and self.extend_max <= 0:
            raise ValueError("extend_max must be positive (None never extends)")


class _Session:
    """One consume stream: its outgoing requests and pending settlements."""

    def __init__(self) -> None:
        self.requests: asyncio.Queue[pb.ConsumeRequest | None] = asyncio.Queue()
        self.acks: list[int] = []
        self.nacks: list[pb.Nack] = []
        self.credit = 0
        self.flush_scheduled = False
        self.open = True

    async def iterate(self) -> AsyncIterator[pb.ConsumeRequest]:
        while True:
            request = await self.requests.get()
            if request is None:
                return
            yield request

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.open:
            return
        if self.acks:
            self.requests.put_nowait(pb.ConsumeRequest(ack=pb.Ack(delivery_ids=self.acks)))
            self.acks = []
        for nack in self.nacks:
            self.requests.put_nowait(pb.ConsumeRequest(nack=nack))
        self.nacks = []
        if self.credit:
            self.requests.put_nowait(pb.ConsumeRequest(credit=pb.Credit(credit=self.credit)))
            self.credit = 0


class _PullSession(_Session):
    """Pull mode: settlements go by the unary Ack and Nack, and finishing a
    delivery makes room for the next Pull instead of granting credit."""

    def __init__(self, consumer: Consumer) -> None:
        super().__init__()
        self.consumer = consumer
        self.in_hand = 0
        self.room = asyncio.Event()
        self.settling: set[asyncio.Task[None]] = set()

    def flush(self) -> None:
        self.flush_scheduled = False
        acks, nacks, finished = self.acks, self.nacks, self.credit
        self.acks, self.nacks, self.credit = [], [], 0
        task = asyncio.get_running_loop().create_task(self._settle(acks, nacks, finished))
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def _settle(self, acks: list[int], nacks: list[pb.Nack], finished: int) -> None:
        # The window opens once the broker has applied the settlements, so
        # the leases held never exceed it.
        try:
            await self.consumer._settle(acks, nacks)
        finally:
            self.in_hand -= finished
            self.room.set()


class Consumer:
    """Consumes ``queue`` with ``handler``; ``await run()``, ``stop()`` from elsewhere."""

    def __init__(
        self,
        connection: Connection | ClientConfig | str | None,
        queue: str,
        handler: Handler,
        config: ConsumerConfig | None = None,
        *,
        jitter_seed: int | None = None,
    ) -> None:
        self._connection, self._owned = connect(connection)
        self.queue = queue
        self.handler = handler
        self.config = config or ConsumerConfig()
        self._rng = random.Random(jitter_seed)
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._handlers: set[asyncio.Task[None]] = set()
        self._started = 0
        #: Sessions established (1 + reconnects).
        self.sessions = 0
        #: Deliveries acked and nacked so far.
        self.acked = 0
        self.nacked = 0
        #: Lease extensions the broker granted.
        self.extended = 0

    def stop(self) -> None:
        """Graceful stop: no new deliveries; running handlers finish and are acked."""
        self._stopping.set()

    async def extend_lease(self, delivery: Delivery, lease_ms: int = 0) -> bool:
        """Gives ``delivery``'s lease a new deadline ``lease_ms`` from now
        (0: the queue's lease timeout) by the unary ``Extend``. True if the
        broker extended it; False if the lease had expired or is no longer
        held (acked, taken back): then the message may be redelivered."""
        request = pb.ExtendRequest(
            queue=self.queue, delivery_ids=[delivery.delivery_id], lease_ms=lease_ms
        )
        response = await self._connection.unary("Consumer/Extend", request, pb.ExtendResponse)
        extended = any(r.outcome == pb.EXTEND_OUTCOME_EXTENDED for r in response.results)
        if extended:
            self.extended += 1
        return extended

    async def _keep_leased(self, delivery: Delivery) -> None:
        """Extends ``delivery``'s lease every third of it until cancelled
        (the handler ended), refused, or ``extend_max`` is reached."""
        ceiling = self.config.extend_max
        if ceiling is None or delivery.lease_ms <= 0:
            return
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + ceiling
        period = delivery.lease_ms / 3000
        while loop.time() + period < give_up_at:
            await asyncio.sleep(period)
            try:
                if not await self.extend_lease(delivery, delivery.lease_ms):
                    log.warning("lease of delivery %d not extended", delivery.delivery_id)
                    return
            except BallastError as error:
                log.warning("extending delivery %d failed: %s", delivery.delivery_id, error)
                return

    async def run(self) -> None:
        """Consumes until ``stop()`` (or ``max_messages``); reconnects after
        failures; raises the errors :func:`is_fatal` names."""
        failures = 0
        try:
            while not self._stopping.is_set():
                sessions = self.sessions
                try:
                    if self.config.mode == "pull":
                        await self._pull()
                    else:
                        await self._session()
                    failures = 0
                except BallastError as error:
                    if is_fatal(error):
                        raise
                    if self._stopping.is_set():
                        break
                    if self.sessions > sessions:
                        failures = 0  # the backoff restarts once a session was established
                    delay = self.config.reconnect.delay_after(
                        failures, least_wait(error), self._rng
                    )
                    failures += 1
                    log.warning(
                        "consume stream of %s lost (%s); reconnecting in %.3fs",
                        self.queue,
                        error,
                        delay,
                    )
                    try:
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
        finally:
            if self._handlers:
                await asyncio.gather(*list(self._handlers), return_exceptions=True)
            if self._owned:
                await self._connection.close()

    def _limit_reached(self) -> bool:
        limit = self.config.max_messages
        return limit is not None and self._started >= limit

    async def _session(self) -> None:
        session = _Session()
        credit = self.config.prefetch
        if self.config.max_messages is not None:
            credit = max(1, min(credit, self.config.max_messages - self._started))
        session.requests.put_nowait(
            pb.ConsumeRequest(subscribe=pb.Subscribe(queue=self.queue, credit=credit))
        )
        address = self._connection.address
        call = self._connection.stream("Consumer/Consume", session.iterate(), pb.ConsumeResponse)
        closer: asyncio.Task[None] | None = None
        try:
            first = await asyncio.wait_for(call.read(), self.config.subscribe_timeout)
            if first is EOF:
                await self._connection.stream_ended(call)
                raise Unavailable("the broker ended the consume stream before subscribing")
            if first.WhichOneof("kind") != "subscribed":
                raise ProtocolError("the broker did not answer subscribe with subscribed")
            self.sessions += 1
            closer = asyncio.get_running_loop().create_task(self._close_when_stopped(session))
            while True:
                response = await call.read()
                if response is EOF:
                    if self._stopping.is_set():
                        return
                    await self._connection.stream_ended(call)
                    raise Unavailable("the broker ended the consume stream")
                kind = response.WhichOneof("kind")
                if kind == "delivery":
                    if self._stopping.is_set():
                        continue  # released when the stream closes
                    await self._start(session, Delivery.from_pb(response.delivery))
                    if self._limit_reached():
                        self._stopping.set()
                elif kind == "rejected":
                    log.warning(
                        "broker rejected settling delivery %d: %s",
                        response.rejected.delivery_id,
                        response.rejected.message,
                    )
        except grpc.RpcError as error:
            # A follower's UNAVAILABLE names the leader: the reconnect goes there.
            raise self._connection.failure(address, error) from None
        except asyncio.TimeoutError:
            raise Unavailable("no subscription confirmed within subscribe_timeout") from None
        finally:
            if closer is not None:
                closer.cancel()
            session.open = False
            session.requests.put_nowait(None)
            call.cancel()

    async def _pull(self) -> None:
        """Pull mode: Pull up to the room left in the window, run handlers,
        settle by unary calls. On stop, what was pulled is handled first."""
        session = _PullSession(self)
        first = True
        try:
            while not self._stopping.is_set():
                room = self.config.prefetch - session.in_hand
                if self.config.max_messages is not None:
                    room = min(room, self.config.max_messages - self._started)
                if room <= 0:
                    session.room.clear()
                    waiters = {
                        asyncio.ensure_future(self._stopping.wait()),
                        asyncio.ensure_future(session.room.wait()),
                    }
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waiters:
                            waiter.cancel()
                    continue
                request = pb.PullRequest(
                    queue=self.queue, max_messages=room, wait_ms=self.config.pull_wait_ms
                )
                response = await self._connection.unary(
                    "Consumer/Pull",
                    request,
                    pb.PullResponse,
                    timeout=self.config.pull_wait_ms / 1000 + self.config.subscribe_timeout,
                )
                if first:
                    self.sessions += 1
                    first = False
                for delivery in response.deliveries:
                    session.in_hand += 1
                    await self._start(session, Delivery.from_pb(delivery))
                if self._limit_reached():
                    self._stopping.set()
        finally:
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=self.config.stop_timeout)
            acks, nacks = session.acks, session.nacks
            session.acks, session.nacks = [], []
            await self._settle(acks, nacks)
            if session.settling:
                await asyncio.gather(*list(session.settling), return_exceptions=True)

    async def _close_when_stopped(self, session: _Session) -> None:
        """On stop: wait for running handlers (up to ``stop_timeout``), send
        their acks, half-close; the broker then ends the stream."""
        await self._stopping.wait()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=self.config.stop_timeout)
        # The last settlements go by the unary Ack and Nack, which answer once
        # applied: on the stream, the half-close below can release a lease
        # before the broker has applied a nack sent just before it.
        acks, nacks = session.acks, session.nacks
        session.acks, session.nacks, session.credit = [], [], 0
        session.open = False
        await self._settle(acks, nacks)
        session.requests.put_nowait(None)

    async def _settle(self, acks: list[int], nacks: list[pb.Nack]) -> None:
        calls: list[Awaitable[object]] = []
        if acks:
            request = pb.AckRequest(queue=self.queue, delivery_ids=acks)
            calls.append(self._connection.unary("Consumer/Ack", request, pb.AckResponse))
        for nack in nacks:
            unary = pb.NackRequest(
                queue=self.queue,
                delivery_id=nack.delivery_id,
                delay_ms=nack.delay_ms,
                reason=nack.reason,
            )
            calls.append(self._connection.unary("Consumer/Nack", unary, pb.NackResponse))
        for outcome in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.warning("settling on stop failed (redelivered later): %s", outcome)

    async def _start(self, session: _Session, delivery: Delivery) -> None:
        await self._slots.acquire()
        self._started += 1
        task = asyncio.get_running_loop().create_task(self._handle(session, delivery))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, session: _Session, delivery: Delivery) -> None:
        keeper = asyncio.get_running_loop().create_task(self._keep_leased(delivery))
        try:
            try:
                await self.handler(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the handler's failure is the nack's reason
                reason = f"{type(error).__name__}: {error}".encode()[:NACK_REASON_SIZE_MAX]
                delay_ms = int(self.config.nack_delay.delay(delivery.attempt) * 1000)
                session.nacks.append(
                    pb.Nack(
                        delivery_id=delivery.delivery_id,
                        delay_ms=delay_ms,
                        reason=reason.decode(errors="ignore"),
                    )
                )
                self.nacked += 1
            else:
                session.acks.append(delivery.delivery_id)
                self.acked += 1
            if self._stopping.is_set():
                return  # settled by _close_when_stopped
            session.credit += 1
            if not session.flush_scheduled:
                session.flush_scheduled = True
                asyncio.get_running_loop().call_later(self.config.ack_flush_interval, session.flush)
        finally:
            keeper.cancel()
            self._slots.release()
