"""Mode `sample`: one value per signal per period. `first`, `last`, `min` and `max` send the
value of a frame as it was (with its own timestamp); `mean` sends the period's mean, as
`aggregate` does. Periods are aligned to multiples of `period_ms` of the frames' clock; a
period's value is sent once the bus's frames have passed the period's end (or at the end of
the stream), so values of one period can come over several batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from agent.collect.aggregate import Aggregate, AggregateSettings
from agent.collect.base import (
    BusBatch,
    Collected,
    Mode,
    Reference,
    Samples,
    Target,
    assemble,
    register,
)
from agent.collect.rules import DAY_MS, CollectRule, ModeSettings, duration
from agent.config import Checker, one_of


@dataclass(slots=True)
class Chosen:
    """The value chosen for each period of one signal, with its period's index."""

    period: npt.NDArray[np.int64]
    values: Samples

    def take(self, rows: slice) -> Chosen:
        return Chosen(self.period[rows], self.values.take(rows))


def choose(values: Samples, period_ns: int, reduce: str) -> Chosen:
    """The value `reduce` picks in each period the (time-ordered) values fall in."""
    period = values.t_ns // period_ns
    starts = np.flatnonzero(np.concatenate([[True], period[1:] != period[:-1]]))
    if reduce == "first":
        picks = starts
    elif reduce == "last":
        picks = np.append(starts[1:], len(period)) - 1
    else:
        # The first of the period's smallest (largest) values; NaN is never chosen over a
        # number.
        fill = np.inf if reduce == "min" else -np.inf
        key = np.where(np.isnan(values.value), fill, values.value)
        ufunc = np.minimum if reduce == "min" else np.maximum
        best = ufunc.reduceat(key, starts)
        counts = np.diff(np.append(starts, len(key)))
        at = np.where(key == np.repeat(best, counts), np.arange(len(key)), len(key))
        picks = np.minimum.reduceat(at, starts)
        picks = np.where(picks == len(key), starts, picks)  # a period of NaN only
    return Chosen(period[picks], values.take(picks))


def _later_wins(reduce: str, before: float, later: float) -> bool:
    """Whether a later value of the same period replaces the one chosen before."""
    if reduce == "last":
        return True
    if reduce == "first" or np.isnan(later):
        return False
    if np.isnan(before):
        return True
    return later < before if reduce == "min" else later > before


REDUCES = ("last", "first", "mean", "min", "max")
#: The reductions that pick a value without comparing, which text allows
_PICKS = ("first", "last")


@dataclass(frozen=True)
class SampleSettings(ModeSettings):
    period_ms: int = 1000
    reduce: str = "last"

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> Self:
        if "period_ms" not in data:
            check.problems.append(f"{where}.period_ms: missing")
        return cls(
            period_ms=check.get(data, where, "period_ms", int, cls.period_ms, duration(1, DAY_MS)),
            reduce=check.get(data, where, "reduce", str, cls.reduce, one_of(REDUCES)),
        )


@register
class Sample(Mode[SampleSettings]):
    name = "sample"
    Settings = SampleSettings

    @classmethod
    def takes_text(cls, settings: ModeSettings) -> bool:
        return isinstance(settings, SampleSettings) and settings.reduce in _PICKS

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        period_ms = self.settings.period_ms
        self.period_ns = period_ms * 1_000_000
        # The period's mean is an aggregate of the one statistic.
        windows = AggregateSettings(window_ms=period_ms, stats=("mean",))
        self.mean = (
            Aggregate(replace(rule, settings=windows), targets, buses, references)
            if self.settings.reduce == "mean"
            else None
        )
        # Per target and channel, and per column and sender: the value chosen so far in the
        # last period seen.
        self.open: dict[tuple[Target, str], dict[tuple[int, int], Chosen]] = {}

    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        if self.mean is not None:
            self.mean.collect(batch, out)
            return
        reduce = self.settings.reduce
        for target, block in self.blocks(batch):
            opened = self.open.setdefault((target, block.bus), {})
            closed = []
            for j, column in enumerate(target.columns.tolist()):
                for sender, values in target.senders(batch.samples(block, column)):
                    if not len(values.t_ns):
                        continue
                    chosen = choose(values, self.period_ns, reduce)
                    before = opened.get((j, sender))
                    if before is not None:
                        if before.period[0] != chosen.period[0]:
                            closed.append((j, before))
                        elif not _later_wins(
                            reduce,
                            float(before.values.value[0]),
                            float(chosen.values.value[0]),
                        ):
                            chosen = _replace_first(chosen, before)
                    if len(chosen.period) > 1:
                        closed.append((j, chosen.take(slice(0, -1))))
                    opened[(j, sender)] = chosen.take(slice(-1, None))
            _send(target, block.bus, closed, out)
        # Periods whose signal has not come again but whose time the bus has passed.
        newest = int(batch.frames.t_ns.max()) if len(batch.frames) else None
        for (target, channel), opened in self.open.items():
            if target.bus == batch.bus and newest is not None:
                ended = [
                    key
                    for key, c in opened.items()
                    if (int(c.period[0]) + 1) * self.period_ns <= newest
                ]
                _send(target, channel, [(key[0], opened.pop(key)) for key in ended], out)

    def flush(self, out: Collected) -> None:
        if self.mean is not None:
            self.mean.flush(out)
            return
        for (target, channel), opened in self.open.items():
            _send(target, channel, [(key[0], c) for key, c in opened.items()], out)
        self.open.clear()


def _replace_first(chosen: Chosen, first: Chosen) -> Chosen:
    rest = chosen.take(slice(1, None))
    return Chosen(
        np.concatenate([first.period, rest.period]),
        Samples.concat([first.values, rest.values]),
    )


def _send(target: Target, channel: str, closed: list[tuple[int, Chosen]], out: Collected) -> None:
    if not closed:
        return
    text = None
    if any(c.values.text is not None for _, c in closed):
        text = np.concatenate(
            [
                np.full(len(c.period), None, object) if c.values.text is None else c.values.text
                for _, c in closed
            ]
        )
    out.blocks.append(
        assemble(
            channel,
            target.selection,
            np.concatenate([c.values.t_ns for _, c in closed]),
            np.concatenate([c.values.can_id for _, c in closed]),
            np.concatenate([np.full(len(c.period), j, np.intp) for j, c in closed]),
            np.concatenate([c.values.bits for _, c in closed]),
            text,
        )
    )
