"""Connection settings (address, TLS, token) and the shared ``grpc.aio`` channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import grpc.aio

from .errors import BallastError, from_rpc_error
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
    accepted and dropped). ``token`` is sent as ``authorization: Bearer``
    on every call (``docs/security.md``); use it with TLS off loopback.
    """

    address: str = "127.0.0.1:7400"
    tls: TlsConfig | None = None
    token: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def target(self) -> str:
        for prefix in ("http://", "https://"):
            if self.address.startswith(prefix):
                return self.address[len(prefix) :]
        return self.address


class Connection:
    """One ``grpc.aio`` channel and the calls of ``ballast.v1`` on it."""

    def __init__(self, config: ClientConfig | str | None = None) -> None:
        if config is None:
            config = ClientConfig()
        elif isinstance(config, str):
            config = ClientConfig(address=config)
        self.config = config
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", GRPC_MESSAGE_SIZE_MAX),
            ("grpc.max_receive_message_length", GRPC_MESSAGE_SIZE_MAX),
            *config.options,
        ]
        if config.tls is not None and config.tls.server_name:
            options.append(("grpc.ssl_target_name_override", config.tls.server_name))
        if config.tls is not None:
            self.channel = grpc.aio.secure_channel(
                config.target(), config.tls.credentials(), options=options
            )
        else:
            self.channel = grpc.aio.insecure_channel(config.target(), options=options)
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _callable(self, kind: str, method: str, response_type: type[Resp]) -> Any:
        """The channel's multi-callable of ``kind`` for ``/ballast.v1.<method>``."""
        make = getattr(self.channel, kind)
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
        """Calls ``/ballast.v1.<method>``; failures raise :class:`BallastError`."""
        call = self._callable("unary_unary", method, response_type)
        try:
            response = await call(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return cast(Resp, response)

    def stream(
        self,
        method: str,
        requests: AsyncIterator[Any],
        response_type: type[Resp],
        timeout: float | None = None,
    ) -> Any:
        """A bidirectional stream call (``grpc.aio.StreamStreamCall``)."""
        call = self._callable("stream_stream", method, response_type)
        return call(requests, timeout=timeout, metadata=self.metadata)

    def server_stream(self, method: str, request: Any, response_type: type[Resp]) -> Any:
        """A server stream call (``grpc.aio.UnaryStreamCall``)."""
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
