"""The cloud's `Telemetry.Campaigns` call: signed campaign documents served from a folder
laid out as the MQTT topics (`vehicles/{vehicle}/campaigns/{name}.json`,
`groups/{group}/campaigns/{name}.json`), each new or changed file sent as it appears.
What signs them is `telemetry-agent campaign sign`; the folder only carries them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc import aio

from agent.wire import telemetry_pb2 as pb

#: How often an open call looks for new or changed documents.
POLL_S = 0.2


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

    async def stream(
        self, request: pb.CampaignsRequest, context: aio.ServicerContext[bytes, pb.Campaign]
    ) -> AsyncIterator[pb.Campaign]:
        names = [request.vehicle_id, *request.groups]
        if not all(_fit(name) for name in names):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad names in {names}")
        sent: dict[str, tuple[int, int]] = {}
        while True:
            for topic, (mtime, size, path) in self.documents(request).items():
                if sent.get(topic) == (mtime, size):
                    continue
                try:
                    document = path.read_bytes()
                except OSError:
                    continue  # replaced under us: the next look finds the new one
                sent[topic] = (mtime, size)
                yield pb.Campaign(topic=topic, document=document)
            await asyncio.sleep(POLL_S)


def campaigns_handler(folder: Path) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(
        CampaignFolder(folder).stream,
        request_deserializer=pb.CampaignsRequest.FromString,
        response_serializer=pb.Campaign.SerializeToString,
    )
