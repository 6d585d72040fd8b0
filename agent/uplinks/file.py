"""`kind = "file"`: one file per batch in a folder, written atomically, acked once on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.durable import write_atomically
from agent.uplinks.base import Uplink, UplinkError, register
from agent.wire.envelope import WireBatch
from agent.wire.transport import SCHEMA_SUFFIX, batch_file_name


@register
class FileUplink(Uplink):
    kind = "file"

    @property
    def folder(self) -> Path:
        return Path(self.config.url)

    async def connect(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UplinkError(f"cannot create {self.folder}: {error.strerror}") from None

    async def announce(self, schema_id: bytes, announcement: bytes) -> None:
        name = f"{schema_id.hex()}{SCHEMA_SUFFIX}"
        if not (self.folder / name).exists():
            await self._write(name, announcement)

    async def send(self, batch: WireBatch) -> None:
        await self._write(batch_file_name(batch.stream_id, batch.sequence), batch.payload)

    async def _write(self, name: str, payload: bytes) -> None:
        try:
            await asyncio.to_thread(write_atomically, self.folder / name, payload)
        except OSError as error:
            raise UplinkError(f"cannot write to {self.folder}: {error.strerror}") from None

    async def close(self) -> None:
        return None
