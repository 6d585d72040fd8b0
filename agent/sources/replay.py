"""`source = "replay"`: a recorded log, read by the decoder's log readers, paced or not.

A log often holds several buses, and each `[[bus]]` replays its own channel of it. Buses that
replay the same file at the same pace share one reader: the log is parsed once and its
batches go to each of them (each keeps its channel's frames), so two buses cost one read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import BusConfig, Checker
from agent.frames import FrameBatch
from agent.logs import LogError, open_log
from agent.sources.base import Source, SourceError, SourceSettings, SourceStats, register
from agent.sources.pacing import Pace, paced, parse_pace

log = logging.getLogger(__name__)

ALL_CHANNELS = "*"
#: Batches a feed may run ahead of its slowest bus.
FEED_DEPTH = 4

_END = None


class LogFeed:
    """One read of a log, paced, handed to every bus that replays it."""

    def __init__(self, path: Path, pace: Pace, loop: bool) -> None:
        self.path, self.pace, self.loop = path, pace, loop
        self.stats = SourceStats()
        self.channels: set[str] = set()
        self._queues: list[asyncio.Queue[FrameBatch | BaseException | None]] = []
        self._wanted: set[str] = set()  # what the buses take
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, channel: str) -> asyncio.Queue[FrameBatch | BaseException | None]:
        """A queue of the log's batches for a bus that takes `channel` ("*": all)."""
        queue: asyncio.Queue[FrameBatch | BaseException | None] = asyncio.Queue(FEED_DEPTH)
        self._queues.append(queue)
        self._wanted.add(channel)
        return queue

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"replay {self.path.name}")

    def leave(self, queue: asyncio.Queue[FrameBatch | BaseException | None]) -> None:
        """A bus stopped listening; the last one to leave stops the read."""
        if queue in self._queues:
            self._queues.remove(queue)
        while not queue.empty():  # unblocks a put the feed may be waiting in
            queue.get_nowait()
        if not self._queues and self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        try:
            async for batch in paced(self._read(), self.pace):
                for queue in list(self._queues):
                    await queue.put(batch)
            ending: FrameBatch | BaseException | None = _END
        except SourceError as error:
            ending = error
        for queue in list(self._queues):
            await queue.put(ending)

    async def _read(self) -> AsyncIterator[FrameBatch]:
        shift = 0
        while True:
            try:
                reader = open_log(self.path)
            except LogError as error:
                raise SourceError(str(error)) from None
            if ALL_CHANNELS not in self._wanted:
                reader.channels = frozenset(self._wanted)
            first: int | None = None
            last = 0
            malformed = self.stats.malformed  # of the passes before this one
            batches = reader.batches()
            while True:
                batch = await asyncio.to_thread(_next, batches)
                self.stats.malformed = malformed + reader.stats.malformed
                if batch is None:
                    break
                if not len(batch):
                    continue
                self.channels.update(batch.buses)
                if first is None:
                    first = int(batch.t_ns[0])
                last = int(batch.t_ns[-1])
                yield replace(batch, t_ns=batch.t_ns + shift) if shift else batch
            for example in reader.stats.examples:
                log.warning("%s: malformed %s", self.path, example)
            if not self.loop or first is None:
                return
            # The next pass follows on one millisecond after this one's last frame.
            shift += last - first + 1_000_000


def _next(batches: Iterator[FrameBatch]) -> FrameBatch | None:
    try:
        return next(batches)
    except StopIteration:
        return None
    except LogError as error:
        raise SourceError(str(error)) from None


@dataclass(frozen=True)
class ReplaySettings(SourceSettings):
    path: Path = Path()  # the log; required
    pace: Pace = Pace(None)
    loop: bool = False
    channel: str | None = None  # the log's channel to take ("*": all); default: the bus's name

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> ReplaySettings:
        log = check.get(data, where, "path", str, "")
        path = check.path(log) if log else Path()
        if not log:
            check.problems.append(f"{where}.path: missing (the log to replay)")
        elif not path.is_file():
            check.problems.append(f"{where}.path: no such file {path}")
        return cls(
            path=path,
            pace=parse_pace(check, data, where, cls.pace),
            loop=check.get(data, where, "loop", bool, False),
            channel=check.get(data, where, "channel", str, "") or None,
        )


@register
class ReplaySource(Source):
    """Replays `path`. The bus takes the log's frames of the channel with its own name
    (`channel` picks another and names them after the bus; "*" takes every channel under
    the log's own names). With `loop`, the log starts over, its times shifted to follow on."""

    kind = "replay"
    Settings = ReplaySettings

    def __init__(self, bus: BusConfig, feed: LogFeed | None = None) -> None:
        super().__init__(bus)
        self.settings: ReplaySettings = bus.settings
        settings = self.settings
        self.feed = (
            feed if feed is not None else LogFeed(settings.path, settings.pace, settings.loop)
        )
        # The log's malformed lines are counted once, on the first bus that replays it.
        if feed is not None:
            self.stats = SourceStats()
        else:
            self.stats = self.feed.stats
        self._queue = self.feed.subscribe(self.channel)

    @classmethod
    def create_all(cls, buses: Sequence[BusConfig]) -> list[Source]:
        feeds: dict[tuple[Path, Pace, bool], LogFeed] = {}
        sources: list[Source] = []
        for bus in buses:
            settings: ReplaySettings = bus.settings
            key = (settings.path, settings.pace, settings.loop)
            shared = feeds.get(key)
            source = cls(bus, shared)
            feeds.setdefault(key, source.feed)
            sources.append(source)
        return sources

    @property
    def channel(self) -> str:
        return self.settings.channel if self.settings.channel is not None else self.bus.name

    async def batches(self) -> AsyncIterator[FrameBatch]:
        self.feed.start()
        taken = 0
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise SourceError(f"bus {self.bus.name}: {item}")
                mine = self._select(item)
                if len(mine):
                    taken += len(mine)
                    yield mine
        finally:
            self.feed.leave(self._queue)
        if not taken:
            log.warning(
                "bus %s: %s has no frames of channel %s (its channels: %s); set `channel`",
                self.bus.name,
                self.feed.path,
                self.channel,
                ", ".join(sorted(self.feed.channels)) or "none",
            )

    def _select(self, batch: FrameBatch) -> FrameBatch:
        channel = self.channel
        if channel == ALL_CHANNELS:
            return batch
        if channel not in batch.buses:
            return FrameBatch.empty((self.bus.name,))
        rows = np.flatnonzero(batch.bus == batch.buses.index(channel))
        mine = batch.take(rows) if len(rows) < len(batch) else batch
        return replace(mine, bus=np.zeros(len(mine), np.uint8), buses=(self.bus.name,))
