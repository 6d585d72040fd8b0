"""The reference receiver on the cloud side: wire batches back into `decode`'s records.

Batches come from an MQTT subscription, a gRPC server, or a folder of batch files. Each is
checked, written as JSON Lines records (with `"vehicle"`), and remembered by (stream,
sequence) so a batch that arrives twice is written once. A corrupt or oversized batch is
counted and reported, and the receiver keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiomqtt
import grpc
from aiomqtt import ProtocolVersion
from grpc import aio
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import config
from agent.cloud.parser import ReceivedBatch, SchemaStore, UnknownSchema, parse_batch
from agent.cloud.sinks.base import Sink
from agent.config import URL_SCHEMES, TlsConfig, split_url
from agent.tls import client_context
from agent.wire import telemetry_pb2 as pb
from agent.wire.envelope import WireError, read_envelope
from agent.wire.transport import SCHEMA_SUFFIX, SUFFIX, channel_options

log = logging.getLogger(__name__)

#: A batch larger than this on the wire is refused (the agent builds at most a quarter of
#: it), and so is one whose body would be four times larger still.
MAX_BATCH_BYTES = 4 * config.MAX_BATCH_BYTES
MAX_BODY_BYTES = 4 * MAX_BATCH_BYTES


#: Batches held while their schema has not arrived (announcements can come later over
#: MQTT, on their own topic); beyond this the oldest held batch is rejected.
MAX_WAITING = 1000

#: How long the broker keeps a named receiver's session (`--session`) while it is away.
SESSION_EXPIRY_S = 7 * 24 * 3600


#: Sequence numbers remembered beyond a gap; a gap older than this many later batches is
#: taken as for good (the agent dropped those batches), so the memory stays bounded.
MAX_BEYOND = 100_000


class _Seen:
    """The sequence numbers of one stream seen so far, in bounded memory: every number up
    to `through`, and the ones seen beyond it."""

    def __init__(self) -> None:
        self.through = 0  # sequences start at 1
        self.beyond: set[int] = set()

    def __contains__(self, sequence: int) -> bool:
        return sequence <= self.through or sequence in self.beyond

    def add(self, sequence: int) -> None:
        self.beyond.add(sequence)
        if len(self.beyond) > MAX_BEYOND:
            self.through = min(self.beyond) - 1
        while self.through + 1 in self.beyond:
            self.through += 1
            self.beyond.remove(self.through)


@dataclass
class ReceiverStats:
    batches: int = 0
    duplicates: int = 0
    rejected: int = 0
    frames: int = 0
    schemas: int = 0

    def summary(self) -> str:
        return (
            f"{self.batches} batches received, {self.duplicates} duplicates dropped, "
            f"{self.rejected} rejected, {self.frames} frames written, {self.schemas} schemas"
        )


#: Called once the receiver is done with a batch: with its envelope once the sink has it
#: durably (written now, or before), with None when it is refused for good. Schema
#: announcements are the caller's to acknowledge.
Done = Callable[[pb.Batch | None], None]

#: How often a receiver with nothing to write hands its sink an empty group.
IDLE_WRITE_S = 1.0

#: Batches written in one `Sink.write` at most (one transaction, for PostgreSQL).
MAX_GROUP = 512


@dataclass
class _Pending:
    envelope: pb.Batch
    batch: ReceivedBatch
    done: list[Done]


class Receiver:
    """Hands the batches it takes to `sink`, in groups, from a writer task (`write_pending`)
    and calls each batch's `Done` once `sink.write` returned; where given, writes one line
    per batch taken to `batches` as it is written (stream, sequence, frames; duplicates
    marked), for audits of what arrived."""

    def __init__(self, sink: Sink, batches: TextIO | None = None) -> None:
        self.sink = sink
        self.batches = batches
        self.stats = ReceiverStats()
        self.schemas = SchemaStore()
        self._seen: dict[str, _Seen] = {}
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._waiting: OrderedDict[tuple[str, int], tuple[pb.Batch, str, Done | None]] = (
            OrderedDict()
        )
        self._wake = asyncio.Event()
        self.last_batch = time.monotonic()

    def accept(self, payload: bytes, origin: str, done: Done | None = None) -> pb.Batch | None:
        """Take a batch or a schema announcement: queue a batch for the sink unless it is a
        duplicate, or hold it until its schema comes. Its envelope once taken (queued, a
        duplicate, or an announcement); None when rejected or held."""
        self.last_batch = time.monotonic()
        if len(payload) > MAX_BATCH_BYTES:
            self._reject(origin, f"{len(payload)} bytes exceed {MAX_BATCH_BYTES}", done)
            return None
        try:
            batch = read_envelope(payload)
        except WireError as error:
            self._reject(origin, str(error), done)
            return None
        if batch.schema:
            try:
                schema_id = self.schemas.add(batch, MAX_BODY_BYTES)
            except WireError as error:
                self._reject(origin, str(error), None)
                return None
            self.stats.schemas += 1
            for key, (waiting, where, waiting_done) in list(self._waiting.items()):
                if waiting.schema_id == schema_id:
                    del self._waiting[key]
                    self._data(waiting, where, waiting_done)
            return batch
        return batch if self._data(batch, origin, done) else None

    def _reject(self, origin: str, reason: str, done: Done | None) -> None:
        self.stats.rejected += 1
        log.error("%s: rejected: %s", origin, reason)
        if done is not None:
            done(None)

    def _data(self, batch: pb.Batch, origin: str, done: Done | None) -> bool:
        seen = self._seen.setdefault(batch.stream_id, _Seen())
        key = (batch.stream_id, batch.sequence)
        if batch.sequence in seen:
            self.stats.duplicates += 1
            self._log_batch(batch, duplicate=True)
            if done is not None:
                done(batch)
            return True
        pending = self._pending.get(key)
        if pending is not None:
            # Acknowledged with the first delivery, once that is written: not before.
            self.stats.duplicates += 1
            self._log_batch(batch, duplicate=True)
            if done is not None:
                pending.done.append(done)
            return True
        try:
            received = parse_batch(batch, self.schemas, max_body_bytes=MAX_BODY_BYTES)
        except UnknownSchema:
            # Held, not taken: not acknowledged until written, so a gRPC agent keeps it
            # and sends it again (with its schema, after reconnecting).
            self._waiting[key] = (batch, origin, done)
            if len(self._waiting) > MAX_WAITING:
                _, (oldest, where, oldest_done) = self._waiting.popitem(last=False)
                self._reject(where, f"batch {oldest.sequence}: its schema never came", oldest_done)
            return False
        except WireError as error:
            self._reject(origin, str(error), done)
            return False
        self._pending[key] = _Pending(batch, received, [done] if done is not None else [])
        self._wake.set()
        return True

    def _group(self) -> list[_Pending]:
        return list(itertools.islice(self._pending.values(), MAX_GROUP))

    def _written(self, group: list[_Pending], already: list[ReceivedBatch]) -> None:
        """Count and acknowledge a group the sink has; `already` it had before."""
        before = {(b.stream_id, b.sequence) for b in already}
        for pending in group:
            envelope = pending.envelope
            key = (envelope.stream_id, envelope.sequence)
            del self._pending[key]
            self._seen.setdefault(envelope.stream_id, _Seen()).add(envelope.sequence)
            if key in before:
                self.stats.duplicates += 1
                self._log_batch(envelope, duplicate=True)
            else:
                self.stats.batches += 1
                self.stats.frames += pending.batch.frames
                self._log_batch(envelope, duplicate=False)
            for done in pending.done:
                done(envelope)

    async def write_pending(self) -> None:
        """The writer: the batches that queued up while the sink wrote the last group go to
        it as the next group, in a thread, so batches keep arriving meanwhile. A sink that
        fails (its database away) gets the same group again a second later. When nothing
        comes, the sink gets an empty group every `IDLE_WRITE_S`."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), IDLE_WRITE_S)
            except TimeoutError:
                # Nothing came: an empty group lets the sink close what has grown old.
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.sink.write, [])
                continue
            self._wake.clear()
            while self._pending:
                group = self._group()
                try:
                    already = await asyncio.to_thread(self.sink.write, [p.batch for p in group])
                except Exception as error:
                    log.error("the sink failed: %s; writing again in 1 s", error)
                    await asyncio.sleep(1)
                    continue
                self._written(group, already)

    def flush(self) -> None:
        """Write what is still queued, here and now (the receiver stops)."""
        while self._pending:
            group = self._group()
            self._written(group, self.sink.write([p.batch for p in group]))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _log_batch(self, batch: pb.Batch, duplicate: bool) -> None:
        if self.batches is None:
            return
        line = {"stream": batch.stream_id, "sequence": batch.sequence, "frames": batch.frames}
        if duplicate:
            line["duplicate"] = True
        self.batches.write(json.dumps(line) + "\n")
        self.batches.flush()

    def finish(self) -> None:
        """Write what is queued, count what still waits for a schema as rejected, and close
        the sink. A sink that cannot write them (its database away) leaves them
        unacknowledged: the agent or the broker sends them again."""
        try:
            self.flush()
        except Exception as error:
            log.error("%d batches not written, left unacknowledged: %s", self.pending, error)
        finally:
            for batch, origin, _ in self._waiting.values():
                self._reject(
                    origin,
                    f"batch {batch.sequence}: schema {batch.schema_id.hex()[:16]} never came",
                    None,
                )
            self._waiting.clear()
            self.sink.close()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_batch


async def _until_idle(receiver: Receiver, idle_exit: float | None) -> None:
    """Returns once no batch came for `idle_exit` seconds and all are written (never, when
    None)."""
    if idle_exit is None:
        await asyncio.Event().wait()
    assert idle_exit is not None
    while receiver.idle_for() < idle_exit or receiver.pending:
        await asyncio.sleep(min(0.1, idle_exit))


def accept_files(receiver: Receiver, folder: Path, done: set[str]) -> None:
    """Take the batch files in `folder` that are not in `done` (and add them to it):
    announcements first, as the batches that name a schema come after it, then batches
    in name order (a stream's send order)."""
    names = [
        p.name
        for suffix in (SCHEMA_SUFFIX, SUFFIX)
        for p in sorted(folder.glob(f"*{suffix}"))
        if p.name not in done
    ]
    for name in names:
        done.add(name)
        try:
            payload = (folder / name).read_bytes()
        except OSError as error:
            receiver.stats.rejected += 1
            log.error("%s: %s", folder / name, error.strerror)
            continue
        receiver.accept(payload, str(folder / name))


async def receive_dir(receiver: Receiver, folder: Path, idle_exit: float | None) -> None:
    """Read batch files as they appear in `folder`."""
    done: set[str] = set()

    async def poll() -> None:
        while True:
            accept_files(receiver, folder, done)
            await asyncio.sleep(0.1)

    await _race(poll(), receiver.write_pending(), _until_idle(receiver, idle_exit))


async def receive_mqtt(
    receiver: Receiver,
    url: str,
    topics: tuple[str, str],
    share: str | None,
    tls: TlsConfig | None,
    idle_exit: float | None,
    session: str | None = None,
) -> None:
    """Batches from `topics[0]` (shared by the group `share`, where given), and schema
    announcements from `topics[1]` (never shared: every receiver needs every schema).
    With `session`, the client id: the broker keeps the subscription, and the batches that
    come while the receiver is away, for its next connection.

    A batch is acknowledged (PUBACK) only once the sink has it, so the broker sends again
    what a receiver killed mid-write had not written. The announcements come over a
    connection of their own: batches waiting for their schema, unacknowledged, could
    otherwise fill the broker's window of unacknowledged messages and keep it out."""
    host, port, use_tls = split_url(url, URL_SCHEMES["mqtt"])
    use_tls = use_tls or tls is not None
    topic, schema_topic = topics
    subscription = f"$share/{share}/{topic}" if share else topic
    schemas_subscribed = asyncio.Event()
    name = f"telemetry-receiver-{uuid.uuid4().hex[:12]}"

    def client(identifier: str, properties: Properties | None, clean: bool) -> aiomqtt.Client:
        return aiomqtt.Client(
            host,
            port,
            identifier=identifier,
            protocol=ProtocolVersion.V5,
            clean_start=clean,
            properties=properties,
            tls_context=client_context(tls) if use_tls else None,
        )

    async def listen_schemas() -> None:
        while True:
            try:
                async with client(f"{name}-schemas", None, True) as schemas:
                    await schemas.subscribe(schema_topic, qos=1)
                    schemas_subscribed.set()
                    async for message in schemas.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            receiver.accept(bytes(payload), f"{url} {message.topic}")
            except aiomqtt.MqttError as error:
                log.warning("%s: %s; reconnecting in 1 s", url, error)
                await asyncio.sleep(1)

    async def listen_batches() -> None:
        await schemas_subscribed.wait()
        while True:
            batches = client(session or name, _batch_properties(session), session is None)
            # Before connecting: a session's queued batches come right after CONNACK.
            batches._client.manual_ack_set(True)
            try:
                async with batches:
                    await batches.subscribe(subscription, qos=1)
                    log.info("subscribed to %s and %s on %s", subscription, schema_topic, url)
                    async for message in batches.messages:
                        payload = message.payload
                        done = _puback(batches, message)
                        if isinstance(payload, bytes | bytearray):
                            receiver.accept(bytes(payload), f"{url} {message.topic}", done)
                        else:
                            done(None)
            except aiomqtt.MqttError as error:
                log.warning("%s: %s; reconnecting in 1 s", url, error)
                await asyncio.sleep(1)

    await _race(
        listen_schemas(),
        listen_batches(),
        receiver.write_pending(),
        _until_idle(receiver, idle_exit),
    )


#: Unacknowledged batches the broker may send a receiver at once (MQTT 5 Receive
#: Maximum): the groups the sink writes in one go come from this window.
RECEIVE_MAXIMUM = 1000


def _batch_properties(session: str | None) -> Properties:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.ReceiveMaximum = RECEIVE_MAXIMUM
    if session:
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
    return properties


def _puback(client: aiomqtt.Client, message: aiomqtt.Message) -> Done:
    """The PUBACK of one message, on the connection it came over (on a later one its
    message id means nothing: the broker sends it again there instead)."""
    paho = client._client

    def done(_: pb.Batch | None) -> None:
        if message.qos > 0:
            paho.ack(message.mid, message.qos)

    return done


class _Telemetry:
    """The Telemetry service of proto/telemetry.proto."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def stream(
        self, request_iterator: AsyncIterator[bytes], context: aio.ServicerContext[bytes, pb.Ack]
    ) -> AsyncIterator[pb.Ack]:
        peer = context.peer()
        acks: asyncio.Queue[pb.Ack] = asyncio.Queue()
        unanswered = 0  # data batches of this stream not yet written or refused

        def done(envelope: pb.Batch | None) -> None:
            nonlocal unanswered
            unanswered -= 1
            # A batch that was refused is not acknowledged: the agent keeps it.
            if envelope is not None:
                acks.put_nowait(pb.Ack(stream_id=envelope.stream_id, sequence=envelope.sequence))

        async def read() -> None:
            nonlocal unanswered
            async for payload in request_iterator:
                unanswered += 1
                envelope = self.receiver.accept(payload, f"grpc {peer}", done)
                if envelope is not None and envelope.schema:
                    unanswered -= 1  # announcements need no ack: the stream keeps order

        reading = asyncio.ensure_future(read())
        try:
            # Once the agent stops sending, the acks of what is still being written follow.
            while not reading.done() or not acks.empty() or (unanswered and self.receiver.pending):
                ack = asyncio.ensure_future(acks.get())
                await asyncio.wait({ack, reading}, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
                if ack.done():
                    yield ack.result()
                else:
                    ack.cancel()
            reading.result()
        finally:
            reading.cancel()


def grpc_server(
    receiver: Receiver, listen: str, tls: TlsConfig | None = None, campaigns: Path | None = None
) -> aio.Server:
    """A Telemetry server; batches arrive as the bytes the agent sent (parsed once). The
    vehicles' control plane comes with it (agent/cloud/campaign_server.py); with
    `campaigns`, the signed documents of that folder go down it."""
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
    from agent.cloud.campaign_server import control_handlers

    handlers = {"Stream": handler, **control_handlers(campaigns)}
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("telemetry.v1.Telemetry", handlers)]
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
    receiver: Receiver,
    listen: str,
    tls: TlsConfig | None,
    idle_exit: float | None,
    campaigns: Path | None = None,
) -> None:
    server = grpc_server(receiver, listen, tls, campaigns)
    await server.start()
    log.info("listening for gRPC batches on %s", listen)
    try:
        await _race(receiver.write_pending(), _until_idle(receiver, idle_exit))
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
