"""Connection settings (addresses, TLS, token) and the shared ``grpc.aio`` channels.

A :class:`Connection` given several addresses follows a cluster's leader
(:mod:`ballast.leader`): one channel per address it used, made when first
needed, and calls to the current one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import grpc.aio

from .errors import (
    LEADER_METADATA,
    BallastError,
    NotLeader,
    Unavailable,
    from_rpc_error,
)
from .leader import Seeds, normalize, parse_addresses
from .v1 import ballast_pb2 as pb

#: gRPC message size the client sends and accepts (the broker's 17 MiB).
GRPC_MESSAGE_SIZE_MAX = 17 * 1024 * 1024

#: What a stream's ``read()`` returns at its end.
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class TlsConfig:
    """TLS to the broker (``docs/tls.md``): ``ca`` verifies the broker's
    certificate (the system roots when ``None``); ``cert`` and ``key`` are the
    client certificate for mutual TLS; ``server_name`` overrides the name
    checked against the broker's certificate. Paths to PEM files or PEM bytes."""

    ca: Path | str | bytes | None = None
    cert: Path | str | bytes | None = None
    key: Path | str | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a client certificate and its key, or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )


def _pem(value: Path | str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class ClientConfig:
    """Where the broker is and how to reach it.

    ``address`` is ``host:port`` (an ``http://`` or ``https://`` prefix is
    accepted and dropped), or several separated by commas for a cluster
    (``"h1:7400,h2:7400,h3:7400"``): calls go to the first, follow the
    leader a follower names, and move to the next address when a node
    cannot be reached (``docs/replication.md``). ``token`` is sent as
    ``authorization: Bearer`` on every call (``docs/security.md``); use it
    with TLS off loopback. The TLS settings apply to every address.
    """

    address: str = "127.0.0.1:7400"
    tls: TlsConfig | None = None
    token: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def addresses(self) -> list[str]:
        """Every ``host:port`` of ``address``, in order (:class:`ValueError`
        on an empty one)."""
        return parse_addresses(self.address)

    def target(self) -> str:
        """The first ``host:port``: where calls go first."""
        return normalize(self.address.split(",", 1)[0])


class Connection:
    """The calls of ``ballast.v1`` over ``grpc.aio`` channels: one per
    address used, calls to the current one (:attr:`address`).

    A failed call tells the connection where the next ones go
    (:meth:`failure`): to the leader a cluster follower named
    (:class:`~ballast.errors.NotLeader`), or to the next address when the
    node could not be reached. The failed call itself raises its retryable
    error; the caller's retry goes to the new address.
    """

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        if config is None:
            config = ClientConfig()
        elif isinstance(config, str):
            config = ClientConfig(address=config)
        self.config = config
        self.seeds = Seeds(config.addresses())
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", GRPC_MESSAGE_SIZE_MAX),
            ("grpc.max_receive_message_length", GRPC_MESSAGE_SIZE_MAX),
            *config.options,
        ]
        if config.tls is not None and config.tls.server_name:
            self._options.append(("grpc.ssl_target_name_override", config.tls.server_name))
        self._credentials = config.tls.credentials() if config.tls is not None else None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.channel_for(self.seeds.current)  # a bad TLS setting fails here, not at a call
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    @property
    def address(self) -> str:
        """The ``host:port`` the next call goes to."""
        return self.seeds.current

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel of :attr:`address`."""
        return self.channel_for(self.seeds.current)

    def channel_for(self, address: str) -> grpc.aio.Channel:
        """The channel to ``address``, made on first use and kept."""
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def failure(self, address: str, error: grpc.RpcError) -> BallastError:
        """The error of a call to ``address`` that failed with ``error``,
        after following what it says: the leader a follower named, or the
        next address when the node could not be reached."""
        failed = from_rpc_error(error)
        self.observe(address, failed)
        return failed

    def observe(self, address: str, error: BallastError) -> None:
        """Moves the next calls after a call to ``address`` failed with ``error``."""
        if isinstance(error, NotLeader):
            if error.leader is not None:
                self.seeds.follow(error.leader)
        elif isinstance(error, Unavailable) and error.unreachable:
            self.seeds.next_seed(address)

    async def stream_ended(self, call: Any) -> None:
        """Follows the leader named in the trailers of a stream that ended
        without an error status (one that ended with an error raises it
        from ``read()``: pass that to :meth:`failure`)."""
        try:
            metadata = await call.trailing_metadata()
        except grpc.RpcError:
            return
        for key, value in metadata or ():
            if str(key).lower() == LEADER_METADATA:
                leader = value.decode(errors="replace") if isinstance(value, bytes) else value
                self.seeds.follow(str(leader))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _callable(
        self, kind: str, method: str, response_type: type[Resp], address: str | None = None
    ) -> Any:
        """The multi-callable of ``kind`` for ``/ballast.v1.<method>`` on the
        channel of ``address`` (the current one when ``None``)."""
        make = getattr(self.channel_for(address or self.seeds.current), kind)
        deserialize = response_type.FromString  # type: ignore[attr-defined]
        return make(
            f"/ballast.v1.{method}",
            request_serializer=_serialize,
            response_deserializer=deserialize,
        )

    async def unary(
        self,
        method: str,
        request: Any,
        response_type: type[Resp],
        timeout: float | None = None,
    ) -> Resp:
        """Calls ``/ballast.v1.<method>``; failures raise :class:`BallastError`
        (and move the next calls as :meth:`failure` says)."""
        address = self.seeds.current
        call = self._callable("unary_unary", method, response_type, address)
        try:
            response = await call(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise self.failure(address, error) from None
        return cast(Resp, response)

    def stream(
        self,
        method: str,
        requests: AsyncIterator[Any],
        response_type: type[Resp],
        timeout: float | None = None,
    ) -> Any:
        """A bidirectional stream call (``grpc.aio.StreamStreamCall``) to
        :attr:`address` (read it first, to pass to :meth:`failure`)."""
        call = self._callable("stream_stream", method, response_type)
        return call(requests, timeout=timeout, metadata=self.metadata)

    def server_stream(self, method: str, request: Any, response_type: type[Resp]) -> Any:
        """A server stream call (``grpc.aio.UnaryStreamCall``) to :attr:`address`."""
        call = self._callable("unary_stream", method, response_type)
        return call(request, metadata=self.metadata)


def connect(connection: Connection | ClientConfig | str | None) -> tuple[Connection, bool]:
    """``connection`` itself, or a new one made from a config or address;
    the flag says whether the caller made it (and so closes it)."""
    if isinstance(connection, Connection):
        return connection, False
    return Connection(connection), True


def _serialize(message: Any) -> bytes:
    return cast(bytes, message.SerializeToString())


__all__ = ["BallastError", "ClientConfig", "Connection", "TlsConfig", "pb"]
