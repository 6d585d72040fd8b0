"""Mode `raw`: the frames themselves, lossless (a CAN logger on the device). Without
`messages` and `ids`: every frame of the rule's buses, error and remote frames included.
With them: the data and remote frames of those messages (J1939 messages by PGN, as they
decode) and the data and remote frames whose ID is one of `ids`, standard or extended.
One capture per channel, named as the decoded blocks are. The cloud decodes them with the
DBC, as `decode` does a log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from agent.collect.base import (
    BusBatch,
    Collected,
    Mode,
    RawCapture,
    Reference,
    Selects,
    Target,
    register,
)
from agent.collect.rules import CollectRule, ModeSettings
from agent.config import Checker
from agent.frames import FrameBatch, FrameFlag

_ERROR = np.uint8(FrameFlag.ERROR)
_REMOTE = np.uint8(FrameFlag.REMOTE)
_EXTENDED = np.uint8(FrameFlag.EXTENDED)


@dataclass(frozen=True)
class RawSettings(ModeSettings):
    ids: tuple[int, ...] = ()  # frame IDs, besides those of `messages`

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> Self:
        ids = data.get("ids", [])
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 29 for i in ids
        ):
            check.problems.append(f"{where}.ids: expected a list of frame IDs, got {ids!r}")
            ids = []
        return cls(ids=tuple(ids))


@register
class Raw(Mode[RawSettings]):
    name = "raw"
    Settings = RawSettings
    selects = Selects.MESSAGES  # whole frames: of its messages, of its IDs, or all
    no_signals = "takes whole frames: use messages or ids"

    @classmethod
    def takes_text(cls, settings: ModeSettings) -> bool:
        return True

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        self.ids = np.array(sorted(self.settings.ids), np.uint32)
        self.everything = not rule.messages and not self.settings.ids
        # Remote frames carry no data to decode: they are matched by their messages' IDs.
        self.remote = {
            bus: np.array(
                [_key(t.plan.info.frame_id, t.plan.info.is_extended) for t in targets], np.int64
            )
            for bus, targets in self.targets.items()
        }

    def frame_ids(self, bus: str) -> frozenset[tuple[int, bool]] | None:
        if self.everything:
            return None
        ids = self.ids.tolist()
        # An ID the rule names is taken in either form where it fits 11 bits.
        named = {(i, True) for i in ids} | {(i, False) for i in ids if i <= 0x7FF}
        return self.message_ids(bus) | named

    def collect(self, batch: BusBatch, out: Collected) -> None:
        frames = batch.frames
        if not len(frames):
            return
        if self.everything:
            self._capture(frames, out)
            return
        data = (frames.flags & (_ERROR | _REMOTE)) == 0
        remote = (frames.flags & (_ERROR | _REMOTE)) == _REMOTE
        keep = np.zeros(len(frames), np.bool_)
        if len(self.ids):
            keep = np.isin(frames.can_id, self.ids) & (data | remote)
        for _, block in self.blocks(batch):
            if block.batch is frames:  # a reassembled group has no frame of its own to keep
                keep[block.rows] = True
        keys = self.remote.get(batch.bus)
        if keys is not None and remote.any():
            extended = (frames.flags & _EXTENDED) != 0
            keep |= remote & np.isin(_key(frames.can_id, extended), keys)
        if keep.any():
            self._capture(frames.take(keep), out)

    def _capture(self, frames: FrameBatch, out: Collected) -> None:
        if int(frames.bus.min()) == int(frames.bus.max()):
            out.raw.append(RawCapture(self.rule.name, frames.buses[int(frames.bus[0])], frames))
            return
        for channel in np.unique(frames.bus).tolist():
            part = frames.take(frames.bus == channel)
            out.raw.append(RawCapture(self.rule.name, frames.buses[channel], part))


def _key(can_id: npt.ArrayLike, extended: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """A frame ID with its extended flag, as one integer."""
    return np.asarray(can_id, np.int64) | (np.asarray(extended, np.int64) << 31)
