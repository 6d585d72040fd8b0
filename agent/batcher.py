"""The batcher: each bus's frames gathered into batches, closed by frame time, wall time or
size.

A batch closes when it spans `max_age_ms` of its bus's frame time, when it has been open
that long in wall time (a quiet bus still reports), or when it would outgrow `max_bytes` on
the wire. Each bus batches on its own: sources hand over frames in chunks of their own size
and buses may run on different clocks (a replayed log beside a live bus), so one batch for
all buses would mix unrelated time spans.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.config import BatchConfig
from agent.frames import FrameBatch

#: The shortest wait between checks of the open batches' wall age.
TICK_S = 0.05
#: Until the first batch is measured, frames are assumed to cost this much on the wire.
FIRST_BYTES_PER_FRAME = 40.0
#: Close a batch when its estimated size reaches this share of max_bytes.
SIZE_MARGIN = 0.7
#: When the rules change, the batch after the open one closes this soon (unless max_age_ms
#: is shorter): the new rules' first values, which a rule sends once the bus's frames have
#: passed their period, need not wait a whole batch age.
FIRST_AFTER_CHANGE_S = 0.25

#: What closing a bus's batch does with its frames; it returns the sizes of the wire
#: batches they made, from which the batcher learns what a frame costs on the wire.
CloseBatch = Callable[[str, FrameBatch], Sequence[int]]


@dataclass
class OpenBatch:
    """A bus's frames waiting for their batch to close."""

    pieces: list[FrameBatch] = field(default_factory=list)
    frames: int = 0
    first_t_ns: int | None = None
    opened: float = 0.0
    max_age_s: float | None = None  # None: the config's

    def add(self, frames: FrameBatch) -> None:
        if not len(frames):
            return
        if self.first_t_ns is None:
            self.first_t_ns = int(frames.t_ns[0])
            self.opened = time.monotonic()
        self.pieces.append(frames)
        self.frames += len(frames)


class Batcher:
    """The open batch of every bus; `run` closes those that have been open too long."""

    def __init__(self, buses: Iterable[str], config: BatchConfig, close: CloseBatch) -> None:
        self.config = config  # a reload may replace it
        self._close_batch = close
        self._open = {bus: OpenBatch() for bus in buses}
        self._bytes_per_frame = FIRST_BYTES_PER_FRAME
        #: When `run` last looked at the batches' ages: the watchdog's sign of a live loop.
        self.ticked = time.monotonic()

    def add(self, bus: str, frames: FrameBatch) -> None:
        """Add a bus's frames to its open batch, closing it where they pass its time span
        or would outgrow max_bytes."""
        max_age_ns = self.config.max_age_ms * 1_000_000
        while len(frames):
            first = self._open[bus].first_t_ns
            if first is None:
                first = int(frames.t_ns[0])
            late = frames.t_ns >= first + max_age_ns
            cut = int(np.argmax(late)) if late.any() else len(frames)
            self._open[bus].add(frames.take(slice(0, cut)) if cut < len(frames) else frames)
            if cut == len(frames):
                break
            self.close(bus)
            frames = frames.take(slice(cut, None))
        limit = SIZE_MARGIN * self.config.max_bytes / self._bytes_per_frame
        if self._open[bus].frames >= limit:
            self.close(bus)

    def close(self, bus: str) -> None:
        """Close a bus's open batch (nothing when it is empty)."""
        batch, self._open[bus] = self._open[bus], OpenBatch()
        if not batch.frames:
            return
        sizes = self._close_batch(bus, FrameBatch.concat(batch.pieces))
        if sizes:
            per_frame = sum(sizes) / batch.frames
            if len(sizes) > 1:  # it was too large: take no chances with the next one
                self._bytes_per_frame = max(self._bytes_per_frame, per_frame)
            else:
                self._bytes_per_frame = 0.5 * self._bytes_per_frame + 0.5 * per_frame

    def close_all(self) -> None:
        for bus in self._open:
            self.close(bus)

    def rules_changed(self) -> None:
        """Close the open batches, which the new rules take, and the next ones soon after."""
        self.close_all()
        for batch in self._open.values():
            batch.max_age_s = FIRST_AFTER_CHANGE_S

    def _age_s(self, batch: OpenBatch) -> float:
        """The wall time after which `batch` closes."""
        max_age_s = self.config.max_age_ms / 1000
        return min(max_age_s, batch.max_age_s or max_age_s)

    async def run(self) -> None:
        """Close batches that have been open `max_age_ms` of wall time; sleeps until the
        oldest one is due (at least TICK_S), so a quiet agent wakes rarely."""
        while True:
            max_age_s = self.config.max_age_ms / 1000
            now = self.ticked = time.monotonic()
            for bus, batch in self._open.items():
                if batch.frames and now - batch.opened >= self._age_s(batch):
                    self.close(bus)
            due = min(
                (b.opened + self._age_s(b) for b in self._open.values() if b.frames),
                default=now + max_age_s,
            )
            await asyncio.sleep(max(TICK_S, due - time.monotonic()))
