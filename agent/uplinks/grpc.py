"""`kind = "grpc"`: the Telemetry.Stream bidirectional stream (grpcio aio), one Ack per batch.

Keepalive pings notice a half-open connection; batches are already compressed, so gRPC
compression stays off. Batches travel as the bytes the encoder made (no re-serializing).
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc import aio

from agent.config import URL_SCHEMES, UplinkConfig, split_url
from agent.tls import grpc_channel
from agent.uplinks.base import Uplink, UplinkError, register
from agent.wire import telemetry_pb2 as pb
from agent.wire.envelope import WireBatch
from agent.wire.transport import STREAM_METHOD, channel_options


@register
class GrpcUplink(Uplink):
    kind = "grpc"

    def __init__(self, config: UplinkConfig, vehicle_id: str) -> None:
        super().__init__(config, vehicle_id)
        url = config.url if "://" in config.url else f"grpc://{config.url}"
        host, port, use_tls = split_url(url, URL_SCHEMES["grpc"])
        self.address = f"{host}:{port}"
        self.use_tls = use_tls or config.tls is not None
        self._channel: aio.Channel | None = None
        self._call: aio.StreamStreamCall | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    async def connect(self) -> None:
        # Subchannels (the TCP connections) of this channel alone. In grpcio's global pool,
        # a new channel to the same address reuses the old channel's connection: after an
        # ack timeout on a half-open link, "reconnecting" would take the same dead link
        # again, ready at once, until its keepalive noticed.
        options = [
            *channel_options(self.config.keepalive_s),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._channel = grpc_channel(self.address, self.use_tls, self.config.tls, options)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.config.ack_timeout_s)
        except TimeoutError:
            raise UplinkError(f"cannot connect to {self.address}") from None
        stream = self._channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=pb.Ack.FromString
        )
        self._call = stream(wait_for_ready=False)
        self._reader = asyncio.create_task(self._read_acks(self._call))

    async def _read_acks(self, call: aio.StreamStreamCall) -> None:
        reason = "the server closed the stream"
        try:
            async for ack in call:
                future = self._acks.pop(ack.sequence, None)
                if future is not None and not future.done():
                    future.set_result(None)
        except grpc.RpcError as error:
            reason = f"{error.code().name}: {error.details()}"
        except asyncio.CancelledError:
            reason = "closed"
        for future in self._acks.values():
            if not future.done():
                future.set_exception(UplinkError(f"{self.address}: {reason}"))
        self._acks.clear()

    async def announce(self, schema_id: bytes, announcement: bytes) -> None:
        # The stream is ordered: written ahead of the batches, it is read ahead of them.
        call = self._call
        if call is None:
            raise UplinkError(f"{self.address}: not connected")
        try:
            async with self._write_lock:
                await call.write(announcement)
        except (grpc.RpcError, asyncio.InvalidStateError) as error:
            raise UplinkError(f"{self.address}: {error}") from None

    async def send(self, batch: WireBatch) -> None:
        call, reader = self._call, self._reader
        if call is None or reader is None or reader.done():
            raise UplinkError(f"{self.address}: not connected")
        future = asyncio.get_running_loop().create_future()
        self._acks[batch.sequence] = future
        try:
            async with self._write_lock:
                await call.write(batch.payload)
        except (grpc.RpcError, asyncio.InvalidStateError) as error:
            self._acks.pop(batch.sequence, None)
            raise UplinkError(f"{self.address}: {error}") from None
        try:
            await asyncio.wait_for(future, self.config.ack_timeout_s)
        except TimeoutError:
            self._acks.pop(batch.sequence, None)
            raise UplinkError(
                f"{self.address}: no ack within {self.config.ack_timeout_s} s"
            ) from None

    async def close(self) -> None:
        call, self._call = self._call, None
        reader, self._reader = self._reader, None
        channel, self._channel = self._channel, None
        if call is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.done_writing(), 1)
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()
