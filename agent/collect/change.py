"""Mode `change`: a value is sent when it has moved past the deadband since the last value
sent of its signal (`deadband`: absolute, `deadband_rel`: relative to that value; neither:
any change), or when `heartbeat_ms` have passed since then. The first value is always sent.
NaN counts as a value: a NaN after a number is sent, and so is a number after NaN."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from agent.collect.base import Collected, Mode, Reference, Target, assemble, register, samples
from agent.collect.rules import CollectRule
from agent.decode import DecodedBatch, MessageBlock
from agent.frames import FrameBatch

#: The first stretch the search for the next value to send looks at; it grows fourfold
#: each time, so a quiet signal costs a few numpy calls per batch, a busy one one per value.
_FIRST_STRETCH = 16


class Deadband:
    """The values of one signal to send, and the last one sent."""

    def __init__(self, deadband: float, relative: float, heartbeat_ns: int) -> None:
        self.deadband = deadband
        self.relative = relative
        self.heartbeat_ns = heartbeat_ns
        self.value: float | None = None  # the last value sent
        self.t_ns = 0

    def sends(
        self, t_ns: npt.NDArray[np.int64], value: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.intp]:
        """The positions of the (time-ordered) values to send."""
        if not self.deadband and not self.relative and not self.heartbeat_ns:
            return self._changes(t_ns, value)
        chosen: list[int] = []
        i = 0
        n = len(value)
        if self.value is None:
            chosen.append(0)
            self.value, self.t_ns = float(value[0]), int(t_ns[0])
            i = 1
        while i < n:
            limit = n
            if self.heartbeat_ns:
                due = self.t_ns + self.heartbeat_ns
                limit = max(i, int(np.searchsorted(t_ns, due, side="left")))
            j = self._moved(value, i, limit)
            if j is None:
                if limit >= n:
                    break
                j = limit
            chosen.append(j)
            self.value, self.t_ns = float(value[j]), int(t_ns[j])
            i = j + 1
        return np.array(chosen, np.intp)

    def _changes(
        self, t_ns: npt.NDArray[np.int64], value: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.intp]:
        """Without deadband or heartbeat every change is sent, so the last value sent is the
        value before: a comparison of neighbours."""
        before = np.empty_like(value)
        before[1:] = value[:-1]
        before[0] = np.nan if self.value is None else self.value
        same = (value == before) | (np.isnan(value) & np.isnan(before))
        if self.value is None:
            same[0] = False
        chosen = np.flatnonzero(~same)
        if len(chosen):
            self.value, self.t_ns = float(value[chosen[-1]]), int(t_ns[chosen[-1]])
        return chosen

    def _moved(self, value: npt.NDArray[np.float64], start: int, limit: int) -> int | None:
        """The first position in [start, limit) past the deadband of the last value sent."""
        reference = self.value
        assert reference is not None
        threshold = max(self.deadband, self.relative * abs(reference))
        stretch = _FIRST_STRETCH
        i = start
        while i < limit:
            end = min(i + stretch, limit)
            part = value[i:end]
            if np.isnan(reference):
                moved = ~np.isnan(part)
            else:
                with np.errstate(invalid="ignore"):
                    moved = ~(np.abs(part - reference) <= threshold)
            if moved.any():
                return i + int(np.argmax(moved))
            i = end
            stretch *= 4
        return None


@register
class Change(Mode):
    name = "change"

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        # Per target, channel and column.
        self.deadbands: dict[tuple[Target, str, int], Deadband] = {}

    def collect(
        self,
        bus: str,
        frames: FrameBatch,
        decoded: DecodedBatch,
        blocks: Mapping[int, Sequence[MessageBlock]],
        out: Collected,
    ) -> None:
        rule = self.rule
        for target in self.targets.get(bus, ()):
            for block in blocks.get(id(target.plan), ()):
                t_ns, can_id, column, bits = [], [], [], []
                for j, c in enumerate(target.columns.tolist()):
                    values = samples(block, c)
                    if not len(values.t_ns):
                        continue
                    key = (target, block.bus, j)
                    deadband = self.deadbands.get(key)
                    if deadband is None:
                        deadband = self.deadbands[key] = Deadband(
                            rule.deadband, rule.deadband_rel, rule.heartbeat_ms * 1_000_000
                        )
                    sent = deadband.sends(values.t_ns, values.value)
                    t_ns.append(values.t_ns[sent])
                    can_id.append(values.can_id[sent])
                    column.append(np.full(len(sent), j, np.intp))
                    bits.append(values.bits[sent])
                if sum(len(t) for t in t_ns):
                    out.blocks.append(
                        assemble(
                            block.bus,
                            target.selection,
                            np.concatenate(t_ns),
                            np.concatenate(can_id),
                            np.concatenate(column),
                            np.concatenate(bits),
                        )
                    )
