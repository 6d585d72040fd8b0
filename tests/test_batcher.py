"""The batcher alone: per-bus windows by frame time, by wall time and by size."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import numpy as np

from agent.batcher import FIRST_AFTER_CHANGE_S, FIRST_BYTES_PER_FRAME, SIZE_MARGIN, Batcher
from agent.config import BatchConfig
from agent.frames import FrameBatch


def frames(times_ms: Sequence[int], bus: str = "can0") -> FrameBatch:
    batch = FrameBatch.allocate(len(times_ms), (bus,))
    batch.t_ns[:] = np.asarray(times_ms, np.int64) * 1_000_000
    batch.can_id[:] = np.arange(len(times_ms))
    return batch


class Closed:
    """What the batcher closed, per bus, and a wire size per frame to report back."""

    def __init__(self, bytes_per_frame: int = 10) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.bytes_per_frame = bytes_per_frame

    def __call__(self, bus: str, batch: FrameBatch) -> list[int]:
        self.batches.append((bus, (batch.t_ns // 1_000_000).tolist()))
        return [self.bytes_per_frame * len(batch)]


def test_a_batch_closes_where_the_frames_pass_its_time_span() -> None:
    closed = Closed()
    batcher = Batcher(["can0"], BatchConfig(max_age_ms=100), closed)
    batcher.add("can0", frames([0, 50, 99]))
    batcher.add("can0", frames([100, 150, 250, 320]))
    assert closed.batches == [("can0", [0, 50, 99]), ("can0", [100, 150])]
    batcher.close_all()
    assert closed.batches[2:] == [("can0", [250, 320])]


def test_each_bus_keeps_its_own_window() -> None:
    closed = Closed()
    batcher = Batcher(["can0", "can1"], BatchConfig(max_age_ms=100), closed)
    batcher.add("can0", frames([0, 10]))
    batcher.add("can1", frames([5_000, 5_010], "can1"))  # another clock
    batcher.add("can0", frames([20]))
    assert closed.batches == []
    batcher.close_all()
    assert closed.batches == [("can0", [0, 10, 20]), ("can1", [5_000, 5_010])]


def test_a_batch_closes_before_it_outgrows_max_bytes_as_measured() -> None:
    closed = Closed(bytes_per_frame=100)
    max_bytes = 10_000
    batcher = Batcher(["can0"], BatchConfig(max_age_ms=60_000, max_bytes=max_bytes), closed)
    first_limit = int(SIZE_MARGIN * max_bytes / FIRST_BYTES_PER_FRAME)
    batcher.add("can0", frames(list(range(first_limit))))
    assert [len(t) for _, t in closed.batches] == [first_limit]
    # The estimate moves half way to what was measured, from 40 to 70 bytes a frame: the
    # next batch closes at 100 frames, not at 175 (checked as each source's chunk comes).
    batcher.add("can0", frames(list(range(1_000, 1_099))))
    assert len(closed.batches) == 1
    batcher.add("can0", frames([1_099]))
    assert [len(t) for _, t in closed.batches] == [first_limit, 100]


async def test_a_quiet_bus_closes_its_batch_after_max_age_of_wall_time() -> None:
    closed = Closed()
    batcher = Batcher(["can0"], BatchConfig(max_age_ms=200), closed)
    batcher.add("can0", frames([0]))
    opened = time.monotonic()
    ticking = asyncio.create_task(batcher.run())
    try:
        for _ in range(100):  # bounded: 5 s at most
            if closed.batches:
                break
            await asyncio.sleep(0.05)
    finally:
        ticking.cancel()
    assert closed.batches == [("can0", [0])]
    assert time.monotonic() - opened >= 0.2
    assert batcher.ticked >= opened


async def test_after_the_rules_change_the_next_batch_closes_soon_then_at_max_age() -> None:
    closed = Closed()
    batcher = Batcher(["can0"], BatchConfig(max_age_ms=60_000), closed)
    batcher.add("can0", frames([0]))
    batcher.rules_changed()
    assert closed.batches == [("can0", [0])]
    batcher.add("can0", frames([10]))
    ticking = asyncio.create_task(batcher.run())
    try:
        for _ in range(100):  # bounded: 5 s at most, a minute's batch age would not close
            if len(closed.batches) == 2:
                break
            await asyncio.sleep(0.05)
        assert closed.batches[1:] == [("can0", [10])]
        # The one after is the config's again: still open after four times the short age.
        batcher.add("can0", frames([20]))
        await asyncio.sleep(4 * FIRST_AFTER_CHANGE_S)
        assert closed.batches[2:] == []
    finally:
        ticking.cancel()
