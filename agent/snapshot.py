"""The last decoded value of every signal, for snapshots: the cloud asks for named signals
(or all) and gets what the agent decoded last, without waiting for the next batch.

Kept per message as bit fields and times, one column per signal, updated once per decoded
block with a few array operations; values are scaled only when a snapshot is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.decode import DecodedBatch, MessagePlan
from agent.decode.text import text_present
from agent.wire.snapshot import answer_signal, named


@dataclass
class _Last:
    plan: MessagePlan
    bits: npt.NDArray[np.uint64]  # per signal: its last bit field
    t_ns: npt.NDArray[np.int64]  # per signal: when; 0: never seen
    texts: dict[int, str] = field(default_factory=dict)  # text signals' last values


class LastValues:
    """What each bus's decoder gave last, signal by signal."""

    def __init__(self) -> None:
        self._messages: dict[tuple[str, str], _Last] = {}

    def update(self, bus: str, decoded: DecodedBatch) -> None:
        for block in decoded.blocks:
            if not len(block):
                continue
            key = (bus, block.plan.info.name)
            last = self._messages.get(key)
            if last is None or last.plan is not block.plan:
                count = len(block.plan.signals)
                last = _Last(block.plan, np.zeros(count, np.uint64), np.zeros(count, np.int64))
                self._messages[key] = last
            for column, values in block.texts.items():
                has_text = text_present(values)
                if has_text.any():
                    row = int(np.argmax(np.where(has_text, block.t_ns, np.iinfo(np.int64).min)))
                    last.texts[column] = values[row]
                    last.t_ns[column] = block.t_ns[row]
            bits, present, t_ns = block.bits, block.present, block.t_ns
            if present is None:
                # Frames are in time order within a batch but for rare equal times: the
                # latest is taken, not the last row.
                row = int(np.argmax(t_ns))
                last.bits[:] = bits[:, row]
                last.t_ns[:] = t_ns[row]
                continue
            times = np.where(present, t_ns[np.newaxis, :], np.iinfo(np.int64).min)
            rows = np.argmax(times, axis=1)
            carried = present.any(axis=1)
            signals = np.flatnonzero(carried)
            last.bits[signals] = bits[signals, rows[signals]]
            last.t_ns[signals] = t_ns[rows[signals]]

    def snapshot(self, patterns: list[str]) -> list[dict[str, Any]]:
        """The last value of each signal a pattern names (`Signal`, `Message.Signal`, globs;
        none: every signal), in physical units."""
        out = []
        for (bus, message), last in sorted(self._messages.items()):
            for k, info in enumerate(last.plan.signals):
                if not last.t_ns[k]:
                    continue
                if not named(patterns, message, info.name):
                    continue
                value = last.texts.get(k)
                if value is None:
                    value = info.physical(info.raw_from_bits(last.bits[k : k + 1])).tolist()[0]
                t = int(last.t_ns[k]) / 1e9
                out.append(answer_signal(bus, message, info.name, value, info.unit or "", t))
        return out
