"""Mode `change`: a value is sent when it has moved past the deadband since the last value
sent of its signal (`deadband`: absolute, `deadband_rel`: relative to that value; neither:
any change), or when `heartbeat_ms` have passed since then. The first value is always sent.
NaN counts as a value: a NaN after a number is sent, and so is a number after NaN."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from agent.collect.base import BusBatch, Collected, Mode, Reference, Target, assemble, register
from agent.collect.rules import DAY_MS, CollectRule, ModeSettings, band, duration
from agent.config import Checker


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
        """The positions of the (time-ordered) values to send.

        Which values are sent depends on the last one sent, so this is a walk; but a value
        equal to the one before it is never sent for moving (it is within the deadband of
        the last value sent whenever the one before was), so the walk visits only the
        values that differ from their predecessor, and the heartbeats found between them by
        bisection: CAN signals hold their value over many frames."""
        n = len(value)
        changed = np.empty(n, np.bool_)
        changed[:1] = True
        with np.errstate(invalid="ignore"):
            np.not_equal(value[1:], value[:-1], out=changed[1:])
        candidates = np.flatnonzero(changed).tolist()
        values = value.tolist()
        times = t_ns.tolist()
        heartbeat = self.heartbeat_ns
        deadband, relative = self.deadband, self.relative
        reference, sent_t = self.value, self.t_ns
        chosen: list[int] = []
        k = 0  # the next candidate to look at
        i = 0  # the first position not yet decided
        while i < n:
            due = bisect.bisect_left(times, sent_t + heartbeat, i) if heartbeat else n
            if reference is None:
                found = i
            else:
                found = n
                while k < len(candidates) and candidates[k] < due:
                    c = candidates[k]
                    k += 1
                    if c < i:
                        continue
                    v = values[c]
                    if v != v or reference != reference:  # NaN
                        moved = (v != v) != (reference != reference)
                    else:
                        moved = abs(v - reference) > max(deadband, relative * abs(reference))
                    if moved:
                        found = c
                        break
            j = min(found, due)
            if j >= n:
                break
            chosen.append(j)
            reference, sent_t = values[j], times[j]
            i = j + 1
            if j == due:  # the candidates after the heartbeat are looked at anew
                k = bisect.bisect_left(candidates, i)
        self.value, self.t_ns = reference, sent_t
        return np.array(chosen, np.intp)


@dataclass(frozen=True)
class ChangeSettings(ModeSettings):
    deadband: float = 0.0
    deadband_rel: float = 0.0
    heartbeat_ms: int = 0  # 0: none

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> Self:
        if "deadband" in data and "deadband_rel" in data:
            check.problems.append(f"{where}: deadband and deadband_rel exclude each other")
        number = (int, float)
        return cls(
            deadband=float(check.get(data, where, "deadband", number, cls.deadband, band)),
            deadband_rel=float(
                check.get(data, where, "deadband_rel", number, cls.deadband_rel, band)
            ),
            heartbeat_ms=check.get(
                data, where, "heartbeat_ms", int, cls.heartbeat_ms, duration(0, DAY_MS)
            ),
        )


@register
class Change(Mode[ChangeSettings]):
    name = "change"
    Settings = ChangeSettings

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        # Per target, channel, column and sender.
        self.deadbands: dict[tuple[Target, str, int, int], Deadband] = {}

    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        settings = self.settings
        for target, block in self.blocks(batch):
            t_ns, can_id, column, bits = [], [], [], []
            for j, c in enumerate(target.columns.tolist()):
                for sender, values in target.senders(batch.samples(block, c)):
                    if not len(values.t_ns):
                        continue
                    key = (target, block.bus, j, sender)
                    deadband = self.deadbands.get(key)
                    if deadband is None:
                        deadband = self.deadbands[key] = Deadband(
                            settings.deadband,
                            settings.deadband_rel,
                            settings.heartbeat_ms * 1_000_000,
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
