"""Releasing timestamped frames at a pace: as fast as possible, realtime, or a speed factor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import Checker
from agent.frames import FrameBatch

#: A paced source wakes this often at most: frames due in between go out together (a
#: batch spans a second or so, and each wake-up costs the whole pipeline a pass).
TICK_S = 0.1


@dataclass(frozen=True)
class Pace:
    """How fast a replay or simulation runs: as fast as possible (`factor` None), or at
    `factor` times the frames' own timing (1: realtime)."""

    factor: float | None

    @property
    def is_max(self) -> bool:
        return self.factor is None


def parse_pace(check: Checker, data: Mapping[str, Any], where: str, default: Pace) -> Pace:
    """The `pace` key of a [[bus]] table: "max", "realtime" or a speed factor."""
    if "pace" not in data:
        return default
    value = data["pace"]
    if value == "max":
        return Pace(None)
    if value == "realtime":
        return Pace(1.0)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return Pace(float(value))
    check.problems.append(
        f'{where}.pace: expected "max", "realtime" or a speed factor above 0, got {value!r}'
    )
    return default


async def paced(batches: AsyncIterator[FrameBatch], pace: Pace) -> AsyncIterator[FrameBatch]:
    """The frames of `batches`, each released when its timestamp comes due at `pace`
    (measured from the first frame), in slices: one sleep per tick, never one per frame."""
    if pace.factor is None:
        async for batch in batches:
            yield batch
            await asyncio.sleep(0)  # let the rest of the agent run between batches
        return
    factor = pace.factor
    start_wall: float | None = None
    start_t = 0
    async for batch in batches:
        if not len(batch):
            continue
        if start_wall is None:
            start_wall, start_t = time.monotonic(), int(batch.t_ns[0])
        # When each frame is due, in wall seconds; a log's clock only moves forward here.
        due = start_wall + np.maximum.accumulate(batch.t_ns - start_t) / (1e9 * factor)
        first = 0
        while first < len(batch):
            now = time.monotonic()
            end = int(np.searchsorted(due, now, side="right"))
            if end > first:
                yield batch.take(slice(first, end))
                first = end
            if first < len(batch):
                await asyncio.sleep(max(TICK_S, float(due[first]) - time.monotonic()))
