"""The cloud's end of the control plane over gRPC (proto/telemetry.proto, docs/campaigns.md).

Vehicles hold a `Control` call each: down it go the signed campaign documents of a folder
laid out as the MQTT topics (`vehicles/{vehicle}/campaigns/{name}.json`,
`groups/{group}/campaigns/{name}.json`, each new or changed file as it appears), the DBC
files they name that the vehicle asks for (`dbc/{sha256}.dbc`) and snapshot requests; up it
come check-ins, snapshot answers, health reports and which DBC files the vehicle waits for.
The cloud's tools read them through `Checkins`, `Health` and `Snapshot`, as they read the
topics of a broker over MQTT. The older `Campaigns` call serves the folder alone.

What signs the documents is `telemetry-agent campaign sign`; the folder only carries them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from agent.wire import telemetry_pb2 as pb

log = logging.getLogger(__name__)

#: How often an open call looks for new or changed documents.
POLL_S = 0.2
#: The name of a DBC file in the folder's `dbc/`: the SHA-256 of its bytes, in hex.
DBC_NAME = re.compile("[0-9a-f]{64}")
#: Health reports a slow reader of `Health` may fall behind by; older ones it misses.
HEALTH_BACKLOG = 1000


def _fit(name: str) -> bool:
    """A vehicle or group name that names one folder, and no other."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/+#\\\0")


class CampaignFolder:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def documents(self, request: pb.CampaignsRequest) -> dict[str, tuple[int, int, Path]]:
        """topic -> (mtime_ns, size, file) of each document for the vehicle and its groups."""
        places = [("vehicles", request.vehicle_id)] + [("groups", g) for g in request.groups]
        found = {}
        for kind, name in places:
            for path in sorted((self.folder / kind / name / "campaigns").glob("*.json")):
                stat = path.stat()
                found[f"{kind}/{name}/campaigns/{path.stem}"] = (
                    stat.st_mtime_ns,
                    stat.st_size,
                    path,
                )
        return found

    def news(
        self, request: pb.CampaignsRequest, sent: dict[str, tuple[int, int]]
    ) -> list[pb.Campaign]:
        """The documents for the vehicle that are not in `sent` as they are now (which
        they are added to)."""
        found = []
        for topic, (mtime, size, path) in self.documents(request).items():
            if sent.get(topic) == (mtime, size):
                continue
            try:
                document = path.read_bytes()
            except OSError:
                continue  # replaced under us: the next look finds the new one
            sent[topic] = (mtime, size)
            found.append(pb.Campaign(topic=topic, document=document))
        return found

    def dbc(self, digest: str) -> bytes | None:
        """`dbc/{sha256}.dbc` of the folder, once it is there whole (its bytes have that
        hash: a file being written is looked at again later)."""
        if not DBC_NAME.fullmatch(digest):
            return None
        try:
            data = (self.folder / "dbc" / f"{digest}.dbc").read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == digest else None

    async def stream(
        self, request: pb.CampaignsRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Campaign]:
        await _check_names(request, context)
        sent: dict[str, tuple[int, int]] = {}
        while True:
            for campaign in self.news(request, sent):
                yield campaign
            await asyncio.sleep(POLL_S)


async def _check_names(
    request: pb.CampaignsRequest, context: aio.ServicerContext[Any, Any]
) -> None:
    names = [request.vehicle_id, *request.groups]
    if not all(_fit(name) for name in names):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad names in {names}")


@dataclass
class _Vehicle:
    """A connected vehicle: what its call is to send down."""

    down: asyncio.Queue[pb.ControlDown] = field(default_factory=asyncio.Queue)
    answers: dict[str, asyncio.Future[bytes]] = field(default_factory=dict)
    dbc_wanted: set[str] = field(default_factory=set)  # and not sent yet


class ControlHub:
    """The vehicles' Control calls and the tools' calls that read them. Check-ins are
    kept, the last of each vehicle, as a broker retains them; health reports go to the
    `Health` calls open when they come."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = CampaignFolder(folder) if folder is not None else None
        self.vehicles: dict[str, _Vehicle] = {}
        self.checkins: dict[str, bytes] = {}
        self.watchers: list[tuple[set[str], asyncio.Queue[pb.Report]]] = []

    async def control(
        self, requests: AsyncIterator[pb.ControlUp], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ControlDown]:
        # The agent waits for this before it writes: its call is taken.
        await context.send_initial_metadata(())
        first = await anext(aiter(requests), None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hello first")
        assert first is not None
        await _check_names(first.hello, context)
        vehicle_id = first.hello.vehicle_id
        vehicle = self.vehicles[vehicle_id] = _Vehicle()  # a reconnect replaces the old call
        log.info("control call of %s from %s", vehicle_id, context.peer())
        tasks = [asyncio.create_task(self._read(vehicle_id, vehicle, requests))]
        if self.folder is not None:
            tasks.append(asyncio.create_task(self._campaigns(first.hello, vehicle)))
        try:
            while True:
                down = asyncio.ensure_future(vehicle.down.get())
                await asyncio.wait([down, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
                if not down.done():
                    down.cancel()
                    return  # the vehicle closed its side
                yield down.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.vehicles.get(vehicle_id) is vehicle:
                del self.vehicles[vehicle_id]
                log.info("control call of %s ended", vehicle_id)
            for asked in vehicle.answers.values():
                if not asked.done():
                    asked.set_exception(ConnectionError(f"{vehicle_id} disconnected"))

    async def _campaigns(self, hello: pb.CampaignsRequest, vehicle: _Vehicle) -> None:
        """The folder's documents for the vehicle, and the DBC files it waits for, as they
        come."""
        assert self.folder is not None
        sent: dict[str, tuple[int, int]] = {}
        while True:
            for campaign in self.folder.news(hello, sent):
                vehicle.down.put_nowait(pb.ControlDown(campaign=campaign))
            for digest in sorted(vehicle.dbc_wanted):
                data = self.folder.dbc(digest)
                if data is not None:
                    vehicle.dbc_wanted.discard(digest)
                    file = pb.DbcFile(sha256=digest, data=data)
                    vehicle.down.put_nowait(pb.ControlDown(dbc=file))
            await asyncio.sleep(POLL_S)

    async def _read(
        self, vehicle_id: str, vehicle: _Vehicle, requests: AsyncIterator[pb.ControlUp]
    ) -> None:
        async for up in requests:
            kind = up.WhichOneof("message")
            if kind == "checkin":
                self.checkins[vehicle_id] = up.checkin
            elif kind == "health":
                report = pb.Report(vehicle_id=vehicle_id, document=up.health)
                for vehicles, queue in self.watchers:
                    if not vehicles or vehicle_id in vehicles:
                        with contextlib.suppress(asyncio.QueueFull):
                            queue.put_nowait(report)
            elif kind == "dbc_wanted":
                vehicle.dbc_wanted = set(up.dbc_wanted.sha256)
            elif kind == "snapshot_answer":
                asked = vehicle.answers.pop(_request_id(up.snapshot_answer), None)
                if asked is not None and not asked.done():
                    asked.set_result(up.snapshot_answer)

    async def checkins_of(
        self, request: pb.VehiclesRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Report]:
        for vehicle_id in sorted(request.vehicle_ids or self.checkins):
            if vehicle_id in self.checkins:
                yield pb.Report(vehicle_id=vehicle_id, document=self.checkins[vehicle_id])

    async def health(
        self, request: pb.VehiclesRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Report]:
        watcher = (set(request.vehicle_ids), asyncio.Queue[pb.Report](HEALTH_BACKLOG))
        self.watchers.append(watcher)
        try:
            while True:
                yield await watcher[1].get()
        finally:
            self.watchers.remove(watcher)

    async def snapshot(
        self, request: pb.SnapshotRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.Report:
        vehicle = self.vehicles.get(request.vehicle_id)
        if vehicle is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{request.vehicle_id} is not connected"
            )
        assert vehicle is not None
        asking = _request_id(request.request)
        # The answer is matched by the request's id: one outstanding request per id.
        if not asking:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a snapshot request needs an id")
        if asking in vehicle.answers:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS, f"a snapshot request {asking!r} is under way"
            )
        asked = vehicle.answers[asking] = asyncio.Future()
        vehicle.down.put_nowait(pb.ControlDown(snapshot_request=request.request))
        try:
            answer = await asked  # the call's deadline ends the wait
        except ConnectionError as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        finally:
            vehicle.answers.pop(asking, None)
        return pb.Report(vehicle_id=request.vehicle_id, document=answer)


def _request_id(payload: bytes) -> str:
    """The id a snapshot request or answer carries ("" if none)."""
    try:
        found = json.loads(payload).get("id")
    except (ValueError, AttributeError):
        return ""
    return str(found) if found is not None else ""


def control_handlers(folder: Path | None) -> dict[str, grpc.RpcMethodHandler]:
    """The control plane's calls of the Telemetry service; `folder`: the campaigns."""
    hub = ControlHub(folder)

    def up(parse: Callable[[bytes], Any], reply: Callable[[Any], bytes]) -> dict[str, Any]:
        return {"request_deserializer": parse, "response_serializer": reply}

    vehicles = up(pb.VehiclesRequest.FromString, pb.Report.SerializeToString)
    handlers = {
        "Control": grpc.stream_stream_rpc_method_handler(
            hub.control, **up(pb.ControlUp.FromString, pb.ControlDown.SerializeToString)
        ),
        "Checkins": grpc.unary_stream_rpc_method_handler(hub.checkins_of, **vehicles),
        "Health": grpc.unary_stream_rpc_method_handler(hub.health, **vehicles),
        "Snapshot": grpc.unary_unary_rpc_method_handler(
            hub.snapshot, **up(pb.SnapshotRequest.FromString, pb.Report.SerializeToString)
        ),
    }
    if hub.folder is not None:
        handlers["Campaigns"] = grpc.unary_stream_rpc_method_handler(
            hub.folder.stream,
            **up(pb.CampaignsRequest.FromString, pb.Campaign.SerializeToString),
        )
    return handlers
