"""TLS settings shared by the MQTT and gRPC uplinks and the receiver."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import TlsConfig

if TYPE_CHECKING:
    from grpc import aio


def client_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client context that verifies the server (against `ca_file`, or the system's CAs)
    and presents a client certificate when one is configured (mutual TLS)."""
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls is not None and tls.ca_file else None
    )
    if tls is not None and tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


def grpc_channel(
    address: str, use_tls: bool, tls: TlsConfig | None, options: Sequence[tuple[str, int]]
) -> aio.Channel:
    """A channel to `address` (HOST:PORT), over TLS with the `tls` files (the system's CAs
    where none names the CA) when `use_tls`."""
    import grpc
    from grpc import aio

    if not use_tls:
        return aio.insecure_channel(address, options)

    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(
        read(tls.ca_file) if tls else None,
        read(tls.key_file) if tls else None,
        read(tls.cert_file) if tls else None,
    )
    return aio.secure_channel(address, credentials, options)
