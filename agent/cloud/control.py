"""The cloud's tools' side of the vehicles' control plane (docs/campaigns.md): their
check-ins, snapshots and health reports, through a broker (`--mqtt`) or a receiver that
holds the vehicles' gRPC Control calls (`--grpc`). One interface, two ways to reach it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiomqtt
    from grpc import aio

    from agent.config import TlsConfig

# asyncio and agent.config are imported in the functions that use them: every command
# imports this module to build its parser, and must not pay for them (test_imports).

#: How long reading check-ins over MQTT waits for more after the last one came (retained
#: messages come at once after the subscription).
QUIET_S = 0.5


class Control(Protocol):
    """What the tools ask of the fleet; a lost link raises one of `link_errors()`."""

    async def checkins(self, vehicles: Sequence[str]) -> list[dict[str, Any]]:
        """The last check-in of each vehicle named (none: every one), by vehicle."""
        ...

    async def snapshot(
        self, vehicle: str, request: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        """The vehicle's answer, or None when none came within `timeout`."""
        ...

    def health(self, vehicles: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
        """The health reports of the vehicles named (none: all) as they come."""
        ...


def _tls(args: argparse.Namespace, use_tls: bool) -> TlsConfig | None:
    from agent.config import TlsConfig

    if not use_tls and not args.ca_file:
        return None
    files = (args.ca_file, args.cert_file, args.key_file)
    return TlsConfig(*(Path(f) if f else None for f in files))


def _checkin(payload: bytes, where: str) -> dict[str, Any] | None:
    try:
        checkin: dict[str, Any] = json.loads(payload)
        str(checkin["vehicle"])
    except (ValueError, KeyError, TypeError):
        print(f"{where}: not a check-in", file=sys.stderr)
        return None
    return checkin


def mqtt_client(args: argparse.Namespace) -> aiomqtt.Client:
    """A client of the broker that `--mqtt` and the TLS options name."""
    import aiomqtt

    from agent.config import URL_SCHEMES, split_url
    from agent.tls import client_context

    host, port, use_tls = split_url(args.mqtt, URL_SCHEMES["mqtt"])
    tls = _tls(args, use_tls)
    return aiomqtt.Client(
        host,
        port,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=client_context(tls) if tls or use_tls else None,
        timeout=10,
    )


class MqttControl:
    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client

    async def checkins(self, vehicles: Sequence[str]) -> list[dict[str, Any]]:
        import asyncio

        from agent.campaigns.link import checkin_topic

        found: dict[str, dict[str, Any]] = {}
        for vehicle in vehicles or ["+"]:
            await self.client.subscribe(checkin_topic(vehicle), qos=1)
        while True:
            try:
                message = await asyncio.wait_for(anext(self.client.messages), QUIET_S)
            except TimeoutError:
                break
            checkin = _checkin(bytes(message.payload), str(message.topic))
            if checkin is not None:
                found[str(checkin["vehicle"])] = checkin
        return [found[v] for v in sorted(found)]

    async def snapshot(
        self, vehicle: str, request: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        import asyncio

        from agent.campaigns.link import SNAPSHOT_ANSWER, SNAPSHOT_REQUEST

        await self.client.subscribe(SNAPSHOT_ANSWER.format(vehicle=vehicle), qos=1)
        topic = SNAPSHOT_REQUEST.format(vehicle=vehicle)
        await self.client.publish(topic, json.dumps(request).encode(), qos=1)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(anext(self.client.messages), left)
            except TimeoutError:
                break
            answer: dict[str, Any] = json.loads(bytes(message.payload))
            if answer.get("id") == request["id"]:
                return answer
        return None

    async def health(self, vehicles: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
        from agent.health import HEALTH_TOPIC

        for vehicle in vehicles or ["+"]:
            await self.client.subscribe(HEALTH_TOPIC.format(vehicle=vehicle), qos=1)
        async for message in self.client.messages:
            yield json.loads(bytes(message.payload))


class GrpcControl:
    def __init__(self, channel: aio.Channel) -> None:
        self.channel = channel

    def _reports(self, method: str, vehicles: Sequence[str]) -> Any:
        from agent.wire import telemetry_pb2 as pb

        call = self.channel.unary_stream(
            method,
            request_serializer=pb.VehiclesRequest.SerializeToString,
            response_deserializer=pb.Report.FromString,
        )
        return call(pb.VehiclesRequest(vehicle_ids=list(vehicles)))

    async def checkins(self, vehicles: Sequence[str]) -> list[dict[str, Any]]:
        from agent.wire.transport import CHECKINS_METHOD

        found = []
        async for report in self._reports(CHECKINS_METHOD, vehicles):
            checkin = _checkin(report.document, f"check-in of {report.vehicle_id}")
            if checkin is not None:
                found.append(checkin)
        return found

    async def snapshot(
        self, vehicle: str, request: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        import grpc
        from grpc import aio

        from agent.wire import telemetry_pb2 as pb
        from agent.wire.transport import SNAPSHOT_METHOD

        call = self.channel.unary_unary(
            SNAPSHOT_METHOD,
            request_serializer=pb.SnapshotRequest.SerializeToString,
            response_deserializer=pb.Report.FromString,
        )
        asked = pb.SnapshotRequest(vehicle_id=vehicle, request=json.dumps(request).encode())
        try:
            report = await call(asked, timeout=timeout)
        except aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                if error.code() is grpc.StatusCode.UNAVAILABLE and error.details():
                    print(f"telemetry-agent: {error.details()}", file=sys.stderr)
                return None
            raise
        answer: dict[str, Any] = json.loads(report.document)
        return answer

    async def health(self, vehicles: Sequence[str]) -> AsyncIterator[dict[str, Any]]:
        from agent.wire.transport import HEALTH_METHOD

        async for report in self._reports(HEALTH_METHOD, vehicles):
            yield json.loads(report.document)


def link_errors() -> tuple[type[Exception], ...]:
    """What a broker or a server that went away raises."""
    import aiomqtt
    from grpc import aio

    return (aiomqtt.MqttError, aio.AioRpcError)


@asynccontextmanager
async def control_client(args: argparse.Namespace) -> AsyncIterator[Control]:
    """The control plane that the command's options name, connected."""
    if not args.grpc:
        async with mqtt_client(args) as client:
            yield MqttControl(client)
        return
    from agent.config import URL_SCHEMES, split_url
    from agent.tls import grpc_channel
    from agent.wire.transport import channel_options

    url = args.grpc if "://" in args.grpc else f"grpc://{args.grpc}"
    host, port, use_tls = split_url(url, URL_SCHEMES["grpc"])
    tls = _tls(args, use_tls)
    options = channel_options(30)
    async with grpc_channel(f"{host}:{port}", tls is not None or use_tls, tls, options) as channel:
        yield GrpcControl(channel)


def target(args: argparse.Namespace) -> str:
    """The URL the options name, for messages."""
    return str(getattr(args, "grpc", None) or args.mqtt)  # push and remove have no --grpc


def control_options(
    parser: argparse.ArgumentParser,
    grpc: bool = True,
    other: tuple[str, str, str] | None = None,
) -> None:
    """Where the fleet's control plane is, one of: a broker, (`grpc`) a receiver's gRPC
    server, or the command's `other` place to reach (option, metavar, help); then TLS."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--mqtt", metavar="URL", help="mqtt[s]://HOST[:PORT]: the broker")
    if grpc:
        where.add_argument(
            "--grpc",
            metavar="URL",
            help="grpc[s]://HOST[:PORT] or HOST:PORT: a receiver the vehicles' control calls "
            "reach (telemetry-agent receive --grpc-listen)",
        )
    if other is not None:
        option, metavar, help_text = other
        where.add_argument(option, metavar=metavar, help=help_text)
    tls_options(parser)


def tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca-file", metavar="PATH", help="TLS: the server's CA")
    parser.add_argument("--cert-file", metavar="PATH", help="TLS: this side's certificate")
    parser.add_argument("--key-file", metavar="PATH", help="TLS: this side's private key")
