"""Mode `aggregate`: statistics of each signal's physical values over fixed windows, instead
of the values. Windows are aligned to multiples of `window_ms` of the frames' clock, so two
agents' windows line up; a window is sent once the bus's frames have passed its end (or at
the end of the stream), and values of one window can arrive over several batches. A NaN
value makes its window's statistics NaN.
`sample` with `reduce = "mean"` is this mode with the one statistic "mean"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from agent.collect.base import BusBatch, Collected, Mode, Reference, Target, assemble, register
from agent.collect.rules import DAY_MS, CollectRule, ModeSettings, duration
from agent.config import Checker
from agent.decode import SignalInfo

Floats = npt.NDArray[np.float64]

STATS = ("min", "max", "mean", "count", "stddev")


@dataclass(slots=True)
class Windows:
    """Per window of one signal: its index (start // length), and the count, mean, sum of
    squared deviations from the mean, minimum and maximum of its values."""

    index: npt.NDArray[np.int64]
    count: Floats
    mean: Floats
    m2: Floats
    minimum: Floats
    maximum: Floats

    def __len__(self) -> int:
        return len(self.index)

    def take(self, rows: slice) -> Windows:
        return Windows(
            self.index[rows],
            self.count[rows],
            self.mean[rows],
            self.m2[rows],
            self.minimum[rows],
            self.maximum[rows],
        )

    def merged(self, later: Windows) -> Windows:
        """`self`'s one window with the first of `later`, the same window (Chan et al.'s
        pairwise update, which keeps the variance exact across batches)."""
        na, nb = self.count[0], later.count[0]
        n = na + nb
        delta = later.mean[0] - self.mean[0]
        first = Windows(
            later.index[:1],
            np.array([n]),
            np.array([self.mean[0] + delta * nb / n]),
            np.array([self.m2[0] + later.m2[0] + delta * delta * na * nb / n]),
            # NaN in one part makes the whole window's NaN, as within a batch.
            np.minimum(self.minimum[:1], later.minimum[:1]),
            np.maximum(self.maximum[:1], later.maximum[:1]),
        )
        rest = later.take(slice(1, None))
        return Windows(
            np.concatenate([first.index, rest.index]),
            np.concatenate([first.count, rest.count]),
            np.concatenate([first.mean, rest.mean]),
            np.concatenate([first.m2, rest.m2]),
            np.concatenate([first.minimum, rest.minimum]),
            np.concatenate([first.maximum, rest.maximum]),
        )


def windows(
    t_ns: npt.NDArray[np.int64], value: Floats, length_ns: int, stats: Sequence[str] = STATS
) -> Windows:
    """The statistics of each window that the (time-ordered) values fall in; those that
    `stats` do not need are left at zero."""
    index = t_ns // length_ns
    starts = np.flatnonzero(np.concatenate([[True], index[1:] != index[:-1]]))
    count = np.diff(np.append(starts, len(value))).astype(np.float64)
    unused = np.zeros(len(starts))
    with np.errstate(invalid="ignore"):
        mean = np.add.reduceat(value, starts) / count
        m2 = unused
        if "stddev" in stats:
            deviation = value - np.repeat(mean, count.astype(np.intp))
            m2 = np.add.reduceat(deviation * deviation, starts)
    return Windows(
        index[starts],
        count,
        mean,
        m2,
        np.minimum.reduceat(value, starts) if "min" in stats else unused,
        np.maximum.reduceat(value, starts) if "max" in stats else unused,
    )


def statistic(stats: Windows, name: str) -> npt.NDArray[np.uint64]:
    """A statistic's column bits: float64 bits, or the count as an unsigned integer."""
    if name == "count":
        return stats.count.astype(np.uint64)
    if name == "stddev":
        # The population standard deviation: the window's values are all there is.
        with np.errstate(invalid="ignore"):
            values = np.sqrt(stats.m2 / stats.count)
    else:
        values = {"min": stats.minimum, "max": stats.maximum, "mean": stats.mean}[name]
    return np.ascontiguousarray(values, np.float64).view(np.uint64)


def stat_info(signal: SignalInfo, stat: str) -> SignalInfo:
    """How a statistic's column is stored (see `Signal.stat` in proto/telemetry.proto)."""
    if stat == "count":
        return replace(
            signal,
            length=32,
            is_signed=False,
            is_float=False,
            scale=1.0,
            offset=0.0,
            choices=None,
            unit=None,
        )
    return replace(
        signal,
        length=64,
        is_signed=False,
        is_float=True,
        scale=1.0,
        offset=0.0,
        choices=None,
    )


@dataclass(frozen=True)
class AggregateSettings(ModeSettings):
    window_ms: int = 1000
    stats: tuple[str, ...] = STATS

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> Self:
        if "window_ms" not in data:
            check.problems.append(f"{where}.window_ms: missing")
        stats = data.get("stats", list(STATS))
        if (
            not isinstance(stats, list)
            or not stats
            or any(s not in STATS for s in stats)
            or len(set(stats)) != len(stats)
        ):
            check.problems.append(
                f"{where}.stats: expected a list of distinct {', '.join(STATS)}; got {stats!r}"
            )
            stats = list(STATS)
        return cls(
            window_ms=check.get(data, where, "window_ms", int, cls.window_ms, duration(1, DAY_MS)),
            stats=tuple(stats),
        )


@register
class Aggregate(Mode[AggregateSettings]):
    name = "aggregate"
    Settings = AggregateSettings

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        self.stats = self.settings.stats
        length_ms = self.settings.window_ms
        self.length_ns = length_ms * 1_000_000
        self.selections = {
            id(target): replace(
                target.selection,
                signals=tuple(stat_info(s, stat) for s in target.signals for stat in self.stats),
                stats=self.stats * len(target.columns),
                window_ms=length_ms,
            )
            for target in targets
        }
        # Per target and channel, and per column and sender: the last window seen, which
        # may go on in the next batch.
        self.open: dict[tuple[Target, str], dict[tuple[int, int], Windows]] = {}

    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        for target, block in self.blocks(batch):
            opened = self.open.setdefault((target, block.bus), {})
            closed = []
            for j, column in enumerate(target.columns.tolist()):
                for sender, values in target.senders(batch.samples(block, column)):
                    if not len(values.t_ns):
                        continue
                    stats = windows(values.t_ns, values.value, self.length_ns, self.stats)
                    before = opened.get((j, sender))
                    if before is not None:
                        if before.index[0] == stats.index[0]:
                            stats = before.merged(stats)
                        else:
                            closed.append(((j, sender), before))
                    if len(stats) > 1:
                        closed.append(((j, sender), stats.take(slice(0, -1))))
                    opened[(j, sender)] = stats.take(slice(-1, None))
            self._send(target, block.bus, closed, out)
        # Windows whose signal has not come again but whose time the bus has passed.
        newest = int(batch.frames.t_ns.max()) if len(batch.frames) else None
        for (target, channel), opened in self.open.items():
            if target.bus == batch.bus and newest is not None:
                ended = [
                    key
                    for key, w in opened.items()
                    if (int(w.index[0]) + 1) * self.length_ns <= newest
                ]
                self._send(target, channel, [(key, opened.pop(key)) for key in ended], out)

    def flush(self, out: Collected) -> None:
        for (target, channel), opened in self.open.items():
            self._send(target, channel, list(opened.items()), out)
        self.open.clear()

    def _send(
        self,
        target: Target,
        channel: str,
        closed: list[tuple[tuple[int, int], Windows]],
        out: Collected,
    ) -> None:
        """Closed windows, keyed by (column, sender): a row per window and sender, with the
        sender's frame ID (the message's ID when all senders are one stream)."""
        if not closed:
            return
        width = len(self.stats)
        t_ns, can_id, column, bits = [], [], [], []
        for (j, sender), stats in closed:
            frame_id = target.plan.info.frame_id if sender < 0 else sender
            for s, name in enumerate(self.stats):
                t_ns.append(stats.index * self.length_ns)
                can_id.append(np.full(len(stats), frame_id, np.uint32))
                column.append(np.full(len(stats), j * width + s, np.intp))
                bits.append(statistic(stats, name))
        out.blocks.append(
            assemble(
                channel,
                self.selections[id(target)],
                np.concatenate(t_ns),
                np.concatenate(can_id),
                np.concatenate(column),
                np.concatenate(bits),
            )
        )
