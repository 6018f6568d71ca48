"""TLS for client channels: which CA to trust and, for mutual TLS, the client's own certificate.

For example ``SlimserveClient("server:8001", tls=Tls.from_files(root_cert=Path("ca.pem")), token="...")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

ChannelOptions = Sequence[tuple[str, object]]


@dataclass(frozen=True)
class Tls:
    """PEM bytes. ``root_cert`` None = the system's trusted CAs; client cert and key only for mutual TLS."""

    root_cert: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("give both a client certificate and its key for mutual TLS, or neither")

    @classmethod
    def from_files(
        cls, *, root_cert: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
    ) -> Tls:
        read = lambda path: path.read_bytes() if path is not None else None  # noqa: E731
        return cls(read(root_cert), read(client_cert), read(client_key))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_cert, self.client_key, self.client_cert)


def sync_channel(address: str, tls: Tls | None, options: ChannelOptions) -> grpc.Channel:
    """A blocking channel: over TLS when ``tls`` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def aio_channel(address: str, tls: Tls | None, options: ChannelOptions) -> grpc.aio.Channel:
    """A grpc.aio channel: over TLS when ``tls`` is given, else plaintext. Create it inside the event loop."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)
