"""TLS settings shared by the MQTT and gRPC uplinks and the receiver."""

from __future__ import annotations

import ssl

from agent.config import TlsConfig


def client_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client context that verifies the server (against `ca_file`, or the system's CAs)
    and presents a client certificate when one is configured (mutual TLS)."""
    context = ssl.create_default_context(
        cafile=str(tls.ca_file) if tls is not None and tls.ca_file else None
    )
    if tls is not None and tls.cert_file and tls.key_file:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context
