"""`source = "replay"`: a recorded log, read by the decoder's log readers, paced or not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import numpy as np

from agent.frames import FrameBatch
from agent.logs import LogError, LogReader, open_log
from agent.sources.base import Source, SourceError, register
from agent.sources.pacing import paced

log = logging.getLogger(__name__)

ALL_CHANNELS = "*"


@register
class ReplaySource(Source):
    """Replays `path`. The bus takes the log's frames of the channel with its own name
    (`channel` picks another and names them after the bus; "*" takes every channel under
    the log's own names). With `loop`, the log starts over, its times shifted to follow on."""

    kind = "replay"

    async def batches(self) -> AsyncIterator[FrameBatch]:
        async for batch in paced(self._read(), self.bus.pace):
            yield batch

    async def _read(self) -> AsyncIterator[FrameBatch]:
        assert self.bus.path is not None  # the config requires it
        shift = 0
        while True:
            try:
                reader = open_log(self.bus.path)
            except LogError as error:
                raise SourceError(f"bus {self.bus.name}: {error}") from None
            first: int | None = None
            last = 0
            channels: set[str] = set()
            taken = 0
            batches = reader.batches()
            while True:
                batch = await asyncio.to_thread(_next, batches, reader)
                if batch is None:
                    break
                if not len(batch):
                    continue
                channels.update(batch.buses)
                if first is None:
                    first = int(batch.t_ns[0])
                last = int(batch.t_ns[-1])
                mine = self._select(batch)
                if not len(mine):
                    continue
                taken += len(mine)
                if shift:
                    mine = _shifted(mine, shift)
                yield mine
            self.stats.malformed += reader.stats.malformed
            for example in reader.stats.examples:
                log.warning("bus %s: %s: malformed %s", self.bus.name, self.bus.path, example)
            if not taken:
                log.warning(
                    "bus %s: %s has no frames of channel %s (its channels: %s); set `channel`",
                    self.bus.name,
                    self.bus.path,
                    self._channel,
                    ", ".join(sorted(channels)) or "none",
                )
            if not self.bus.loop or not taken or first is None:
                return
            # The next pass follows on one millisecond after this one's last frame.
            shift += last - first + 1_000_000

    @property
    def _channel(self) -> str:
        return self.bus.channel if self.bus.channel is not None else self.bus.name

    def _select(self, batch: FrameBatch) -> FrameBatch:
        channel = self._channel
        if channel == ALL_CHANNELS:
            return batch
        if channel not in batch.buses:
            return FrameBatch.empty((self.bus.name,))
        index = batch.buses.index(channel)
        rows = np.flatnonzero(batch.bus == index)
        mine = batch.take(rows) if len(rows) < len(batch) else batch
        return replace(mine, bus=np.zeros(len(mine), np.uint8), buses=(self.bus.name,))


def _next(batches: Iterator[FrameBatch], reader: LogReader) -> FrameBatch | None:
    try:
        return next(batches)
    except StopIteration:
        return None
    except LogError as error:
        raise SourceError(str(error)) from None


def _shifted(batch: FrameBatch, shift: int) -> FrameBatch:
    return replace(batch, t_ns=batch.t_ns + shift)
