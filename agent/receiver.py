"""The reference receiver on the cloud side: wire batches back into `decode`'s records.

Batches come from an MQTT subscription, a gRPC server, or a folder of batch files. Each is
checked, written as JSON Lines records (with `"vehicle"`), and remembered by (stream,
sequence) so a batch that arrives twice is written once. A corrupt or oversized batch is
counted and reported, and the receiver keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiomqtt
import grpc
from aiomqtt import ProtocolVersion
from grpc import aio

from agent.config import TlsConfig
from agent.records import JsonLinesWriter
from agent.uplinks.file import SUFFIX
from agent.uplinks.grpc import channel_options
from agent.uplinks.mqtt import PORTS
from agent.uplinks.tls import client_context, split_url
from agent.wire import WireError, parse_batch
from agent.wire import telemetry_pb2 as pb

log = logging.getLogger(__name__)

#: A batch larger than this (on the wire, or its body before compression) is refused.
MAX_BATCH_BYTES = 16 * 1024 * 1024


@dataclass
class ReceiverStats:
    batches: int = 0
    duplicates: int = 0
    rejected: int = 0
    frames: int = 0

    def summary(self) -> str:
        return (
            f"{self.batches} batches received, {self.duplicates} duplicates dropped, "
            f"{self.rejected} rejected, {self.frames} frames written"
        )


class Receiver:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.stats = ReceiverStats()
        self._seen: dict[str, set[int]] = {}
        self.last_batch = time.monotonic()

    def accept(self, payload: bytes, origin: str) -> bool:
        """Write a batch's records unless it is a duplicate; False when it was rejected."""
        self.last_batch = time.monotonic()
        if len(payload) > MAX_BATCH_BYTES:
            self.stats.rejected += 1
            log.error("%s: batch of %d bytes exceeds %d", origin, len(payload), MAX_BATCH_BYTES)
            return False
        try:
            batch = parse_batch(payload, max_body_bytes=MAX_BATCH_BYTES)
        except WireError as error:
            self.stats.rejected += 1
            log.error("%s: rejected: %s", origin, error)
            return False
        seen = self._seen.setdefault(batch.stream_id, set())
        if batch.sequence in seen:
            self.stats.duplicates += 1
            return True
        seen.add(batch.sequence)
        self.stats.batches += 1
        self.stats.frames += batch.frames
        JsonLinesWriter(self.out, vehicle=batch.vehicle_id).write(batch.blocks)
        self.out.flush()
        return True

    def idle_for(self) -> float:
        return time.monotonic() - self.last_batch


async def _until_idle(receiver: Receiver, idle_exit: float | None) -> None:
    """Returns once no batch came for `idle_exit` seconds (never, when None)."""
    if idle_exit is None:
        await asyncio.Event().wait()
    assert idle_exit is not None
    while receiver.idle_for() < idle_exit:
        await asyncio.sleep(min(0.1, idle_exit))


async def receive_dir(receiver: Receiver, folder: Path, idle_exit: float | None) -> None:
    """Read batch files as they appear in `folder`, in name order (a stream's send order)."""
    done: set[str] = set()

    async def poll() -> None:
        while True:
            names = sorted(p.name for p in folder.glob(f"*{SUFFIX}") if p.name not in done)
            for name in names:
                done.add(name)
                try:
                    payload = (folder / name).read_bytes()
                except OSError as error:
                    receiver.stats.rejected += 1
                    log.error("%s: %s", folder / name, error.strerror)
                    continue
                receiver.accept(payload, str(folder / name))
            await asyncio.sleep(0.1)

    await _race(poll(), _until_idle(receiver, idle_exit))


async def receive_mqtt(
    receiver: Receiver,
    url: str,
    topic: str,
    share: str | None,
    tls: TlsConfig | None,
    idle_exit: float | None,
) -> None:
    host, port, use_tls = split_url(url, PORTS)
    subscription = f"$share/{share}/{topic}" if share else topic

    async def listen() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    host,
                    port,
                    identifier=f"telemetry-receiver-{uuid.uuid4().hex[:12]}",
                    protocol=ProtocolVersion.V5,
                    tls_context=client_context(tls) if use_tls else None,
                ) as client:
                    await client.subscribe(subscription, qos=1)
                    log.info("subscribed to %s on %s", subscription, url)
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            receiver.accept(bytes(payload), f"{url} {message.topic}")
            except aiomqtt.MqttError as error:
                log.warning("%s: %s; reconnecting in 1 s", url, error)
                await asyncio.sleep(1)

    await _race(listen(), _until_idle(receiver, idle_exit))


class _Telemetry:
    """The Telemetry service of proto/telemetry.proto."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def stream(
        self, request_iterator: AsyncIterator[bytes], context: aio.ServicerContext[bytes, pb.Ack]
    ) -> AsyncIterator[pb.Ack]:
        peer = context.peer()
        async for payload in request_iterator:
            if not self.receiver.accept(payload, f"grpc {peer}"):
                # A batch that cannot be read is not acknowledged: the agent keeps it.
                continue
            ack = pb.Ack()
            # Only the envelope is needed for the ack; it parses in microseconds.
            envelope = pb.Batch.FromString(payload)
            ack.stream_id, ack.sequence = envelope.stream_id, envelope.sequence
            yield ack


def grpc_server(receiver: Receiver, listen: str, tls: TlsConfig | None = None) -> aio.Server:
    """A Telemetry server; batches arrive as the bytes the agent sent (parsed once)."""
    server = aio.server(
        options=[
            *channel_options(30),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.max_receive_message_length", MAX_BATCH_BYTES),
        ]
    )
    servicer = _Telemetry(receiver)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.stream, request_deserializer=None, response_serializer=pb.Ack.SerializeToString
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("telemetry.v1.Telemetry", {"Stream": handler})]
    )
    if tls is not None and tls.cert_file and tls.key_file:
        credentials = grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=tls.ca_file.read_bytes() if tls.ca_file else None,
            require_client_auth=tls.ca_file is not None,
        )
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    return server


async def receive_grpc(
    receiver: Receiver, listen: str, tls: TlsConfig | None, idle_exit: float | None
) -> None:
    server = grpc_server(receiver, listen, tls)
    await server.start()
    log.info("listening for gRPC batches on %s", listen)
    try:
        await _until_idle(receiver, idle_exit)
    finally:
        await server.stop(grace=1)


async def _race(*work: object) -> None:
    """Run coroutines until the first one returns; cancel the rest."""
    tasks = [asyncio.ensure_future(w) for w in work]  # type: ignore[call-overload]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
