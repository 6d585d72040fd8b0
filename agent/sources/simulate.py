"""`source = "simulate"`: periodic traffic for the bus's DBCs, for demos and load tests.

Every message is sent at its DBC cycle time (`GenMsgCycleTime`, 100 ms where the DBC has
none), each signal following its own slow sine wave across the DBC's range; a multiplexer
steps through its values frame by frame. Payloads are packed with the decoder's own plans,
a whole tick of frames at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import BusConfig, Checker, positive
from agent.decode import MessagePlan, SignalInfo, default_cache_dir, load_dbc
from agent.decode.plan import WORDS
from agent.frames import FrameBatch, FrameFlag
from agent.sources.base import Source, SourceSettings, register
from agent.sources.pacing import Pace, parse_pace

DEFAULT_CYCLE_MS = 100
#: Simulated time per batch: frames of this much bus time are generated together.
STEP_NS = 50_000_000


@dataclass(frozen=True)
class SimulateSettings(SourceSettings):
    pace: Pace = Pace(1.0)
    duration_s: float | None = None  # None: until stopped
    seed: int = 0

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> SimulateSettings:
        duration = check.get(data, where, "duration_s", (int, float), 0.0, positive)
        seed = check.get(
            data, where, "seed", int, 0, lambda v: None if v >= 0 else "must be 0 or more"
        )
        return cls(
            pace=parse_pace(check, data, where, cls.pace),
            duration_s=float(duration) or None,
            seed=seed,
        )


@register
class SimulateSource(Source):
    kind = "simulate"
    Settings = SimulateSettings

    def __init__(self, bus: BusConfig) -> None:
        super().__init__(bus)
        self.settings: SimulateSettings = bus.settings
        self.plans = [
            plan
            for path in self.bus.dbc
            for plan in load_dbc(path, cache_dir=default_cache_dir()).plans
            if plan.signals
        ]
        rng = np.random.default_rng(self.settings.seed)
        # Per signal: a period of 5 to 60 s and a phase, so the waveforms differ.
        self.waves = {
            id(plan): (
                rng.uniform(5, 60, len(plan.signals)),
                rng.uniform(0, 2 * np.pi, len(plan.signals)),
            )
            for plan in self.plans
        }

    async def batches(self) -> AsyncIterator[FrameBatch]:
        factor = self.settings.pace.factor
        start_wall = time.monotonic()
        epoch = time.time_ns()
        step = 0
        end_ns = None if self.settings.duration_s is None else int(self.settings.duration_s * 1e9)
        while end_ns is None or step * STEP_NS < end_ns:
            t0, t1 = step * STEP_NS, (step + 1) * STEP_NS
            if end_ns is not None:
                t1 = min(t1, end_ns)
            if factor is not None:
                delay = start_wall + t1 / 1e9 / factor - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            batch = self.frames(t0, t1, epoch)
            if len(batch):
                yield batch
            step += 1

    def frames(self, t0: int, t1: int, epoch: int) -> FrameBatch:
        """The frames due in [t0, t1) nanoseconds after the start, stamped from `epoch`."""
        parts: list[tuple[npt.NDArray[np.int64], MessagePlan]] = []
        for plan in self.plans:
            cycle = (plan.info.cycle_time_ms or DEFAULT_CYCLE_MS) * 1_000_000
            first = -(-t0 // cycle)
            times = np.arange(first, -(-t1 // cycle), dtype=np.int64) * cycle
            if len(times):
                parts.append((times, plan))
        n = sum(len(times) for times, _ in parts)
        batch = FrameBatch.allocate(n, (self.bus.name,))
        at = 0
        for times, plan in parts:
            rows = slice(at, at + len(times))
            batch.t_ns[rows] = times + epoch
            batch.can_id[rows] = plan.info.frame_id
            if plan.info.is_extended:
                batch.flags[rows] = FrameFlag.EXTENDED
            batch.length[rows] = plan.info.length
            batch.data[rows] = self._payloads(plan, times)
            at += len(times)
        order = np.argsort(batch.t_ns, kind="stable")
        return batch.take(order)

    def _payloads(self, plan: MessagePlan, times: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
        n = len(times)
        little = np.zeros((n, WORDS), np.uint64)
        big = np.zeros((n, WORDS), np.uint64)
        periods, phases = self.waves[id(plan)]
        seconds = times / 1e9
        index = (times // ((plan.info.cycle_time_ms or DEFAULT_CYCLE_MS) * 1_000_000)).astype(
            np.int64
        )
        # Which frames carry each signal: all, unless a multiplexer selects it.
        selector: dict[str, npt.NDArray[np.int64]] = {}
        for k, signal in enumerate(plan.signals):
            if plan.never[k] or any(k == s[0] for s in plan.straddlers):
                continue
            if signal.is_multiplexer:
                ids = sorted(
                    {
                        i
                        for s in plan.signals
                        if s.multiplexer == signal.name
                        for i in s.multiplexer_ids or ()
                    }
                )
                raw = np.array(ids or [0], np.int64)[index % max(len(ids), 1)]
                selector[signal.name] = raw
                bits = raw.astype(np.uint64)
            else:
                bits = _raw_bits(signal, seconds, periods[k], phases[k], index)
            carried = np.ones(n, np.bool_)
            if signal.multiplexer is not None:
                key = selector.get(signal.multiplexer)
                if key is None or signal.multiplexer_ids is None:
                    continue
                carried = np.isin(key, list(signal.multiplexer_ids))
            bits = np.where(carried, bits & np.uint64((1 << signal.length) - 1), np.uint64(0))
            word = int(plan.word[k])
            shift = np.uint64(64 - int(plan.shift_left[k]) - signal.length)
            if word < WORDS:
                little[:, word] |= bits << shift
            else:
                big[:, word - WORDS] |= bits << shift
        little |= big.byteswap()
        payload = little.astype("<u8").view(np.uint8)
        payload[:, plan.info.length :] = 0
        return payload


def _raw_bits(
    signal: SignalInfo,
    seconds: npt.NDArray[np.float64],
    period: float,
    phase: float,
    index: npt.NDArray[np.int64],
) -> npt.NDArray[np.uint64]:
    """The bit field of a smooth wave across the signal's range (counters count)."""
    if "counter" in signal.name.lower():
        return (index % (1 << min(signal.length, 16))).astype(np.uint64)
    if signal.is_float:
        value = np.sin(2 * np.pi * seconds / period + phase)
        dtype = {16: np.float16, 32: np.float32, 64: np.float64}[signal.length]
        return value.astype(dtype).view(f"u{signal.length // 8}").astype(np.uint64)
    if signal.is_signed:
        raw_low, raw_high = -(1 << (signal.length - 1)), (1 << (signal.length - 1)) - 1
    else:
        raw_low, raw_high = 0, (1 << min(signal.length, 63)) - 1
    scale = float(signal.scale) or 1.0
    low, high = sorted(
        (raw_low * scale + float(signal.offset), raw_high * scale + float(signal.offset))
    )
    if (
        signal.minimum is not None
        and signal.maximum is not None
        and signal.minimum < signal.maximum
    ):
        low, high = max(low, float(signal.minimum)), min(high, float(signal.maximum))
    middle, amplitude = (low + high) / 2, (high - low) / 2 * 0.9
    physical = middle + amplitude * np.sin(2 * np.pi * seconds / period + phase)
    raw = np.clip(np.round((physical - float(signal.offset)) / scale), raw_low, raw_high)
    return raw.astype(np.int64).view(np.uint64)
