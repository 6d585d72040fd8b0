"""Mode `raw`: the frames themselves, lossless (a CAN logger on the device): all frames of
the rule's buses, or those of its `messages` and `ids`, error and remote frames included.
The cloud decodes them with the DBC, as `decode` does a log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from agent.collect.base import BusBatch, Collected, Mode, RawCapture, Reference, Target, register
from agent.collect.rules import CollectRule


@register
class Raw(Mode):
    name = "raw"

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        self.ids = np.array(sorted(rule.ids), np.uint32)
        self.everything = not rule.messages and not rule.ids

    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        frames = batch.frames
        if batch.bus not in self.buses or not len(frames):
            return
        if self.everything:
            out.raw.append(RawCapture(self.rule.name, batch.bus, frames))
            return
        keep = np.isin(frames.can_id, self.ids) if len(self.ids) else np.zeros(len(frames), bool)
        for target in self.targets.get(batch.bus, ()):
            for block in batch.blocks(target.plan):
                keep[block.rows] = True
        if keep.any():
            out.raw.append(RawCapture(self.rule.name, batch.bus, frames.take(keep)))
