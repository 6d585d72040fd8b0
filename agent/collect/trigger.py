"""Mode `trigger`: when the condition `when` becomes true, the selected signals at full rate
from `before_ms` before to `after_ms` after, the earlier part from a ring buffer.

The condition is evaluated at every value of the signals it names (on the batch of their
bus, holding the last value of each, also of signals on other buses), so it is as fine as
the data. `edge = "rising"` fires where it turns true, `"always"` wherever it is true;
either fires at most once per `min_interval_ms`. Every value of a selected signal is decided
once: sent as soon as a known firing's window covers it; dropped once no later firing could
(it is more than `before_ms` older than the condition's data); held in the ring until then.
The rule's buses are assumed to share one clock, as a gateway's do; one that lags more than
RING_SLACK_NS behind the rule's newest frames may lose values (so the ring stays bounded when
the condition's bus falls silent).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from agent.collect.base import (
    BusBatch,
    Collected,
    CollectedBlock,
    Mode,
    Reference,
    Target,
    register,
    take_rows,
)
from agent.collect.expression import Expression, ExpressionError, parse
from agent.collect.keep_all import selected
from agent.collect.rules import DAY_MS, CollectRule, ModeSettings, duration
from agent.config import Checker, one_of

#: Ring values are also dropped this long after the newest value the rule has seen, so a
#: condition whose bus falls silent does not let the ring grow without bound.
RING_SLACK_NS = 10_000_000_000
_NS_PER_MS = 1_000_000

Times = npt.NDArray[np.int64]


EDGES = ("rising", "always")
#: The longest capture before or after a firing: what comes before is held in memory.
CAPTURE_MS = 600_000


@dataclass(frozen=True)
class TriggerSettings(ModeSettings):
    when: Expression | None = None
    before_ms: int = 1000
    after_ms: int = 1000
    min_interval_ms: int = 0
    edge: str = "rising"

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> Self:
        text = check.get(data, where, "when", str, "")
        when = None
        if not text:
            check.problems.append(f'{where}.when: missing (a condition such as "SPEED > 60")')
        else:
            try:
                when = parse(text)
            except ExpressionError as error:
                check.problems.append(f"{where}.when: {error}")
        capture = duration(0, CAPTURE_MS)
        settings = cls(
            when=when,
            before_ms=check.get(data, where, "before_ms", int, cls.before_ms, capture),
            after_ms=check.get(data, where, "after_ms", int, cls.after_ms, capture),
            min_interval_ms=check.get(
                data, where, "min_interval_ms", int, cls.min_interval_ms, duration(0, DAY_MS)
            ),
            edge=check.get(data, where, "edge", str, cls.edge, one_of(EDGES)),
        )
        if settings.before_ms == settings.after_ms == 0:
            check.problems.append(
                f"{where}: before_ms and after_ms are both 0: a capture would hold only the "
                "values at the instants it fires"
            )
        return settings


@register
class Trigger(Mode[TriggerSettings]):
    name = "trigger"
    Settings = TriggerSettings

    @classmethod
    def condition(cls, settings: ModeSettings) -> Expression | None:
        return settings.when if isinstance(settings, TriggerSettings) else None

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        settings = self.settings
        assert settings.when is not None  # parse refuses a rule without
        self.when = settings.when
        self.before_ns = settings.before_ms * _NS_PER_MS
        self.after_ns = settings.after_ms * _NS_PER_MS
        self.min_interval_ns = settings.min_interval_ms * _NS_PER_MS
        self.held = {name: np.nan for name in references}
        self.history: dict[str, tuple[Times, npt.NDArray[np.float64]]] = {
            name: (np.zeros(0, np.int64), np.zeros(0, np.float64)) for name in self.when.windows
        }
        self.was_true = False
        self.last_fired: int | None = None
        self.known_until: int | None = None  # the condition is known up to here
        # The newest frame time of each bus the rule reads (its signals', its condition's).
        self.target_buses = frozenset(t.bus for t in targets)
        self.condition_buses = frozenset(r.bus for r in references.values())
        self.newest: dict[str, int] = {}
        # The windows of the firings, merged: sorted, disjoint.
        self.starts: Times = np.zeros(0, np.int64)
        self.ends: Times = np.zeros(0, np.int64)
        self.ring: list[CollectedBlock] = []

    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        frames = batch.frames
        bus = batch.bus
        if not len(frames) or (bus not in self.target_buses and bus not in self.condition_buses):
            return
        for target, block in self.blocks(batch):
            piece = selected(target, block)
            if piece is not None:
                self.ring.append(piece)
        last = int(frames.t_ns.max())
        self.newest[bus] = max(self.newest.get(bus, last), last)
        if bus in self.condition_buses:
            fired = self._evaluate(batch)
            if fired:
                out.firings[self.rule.name] = fired
            self.known_until = last if self.known_until is None else max(self.known_until, last)
        self._decide(out)

    def _evaluate(self, batch: BusBatch) -> int:
        """Evaluate the condition over a batch of its bus; how often the trigger fired."""
        values = {}
        for name, reference in self.references.items():
            if reference.bus != batch.bus:
                continue
            found = [batch.samples(b, reference.column) for b in batch.blocks(reference.plan)]
            found = [f for f in found if len(f.t_ns)]
            if len(found) == 1:
                values[name] = (found[0].t_ns, found[0].value)
            elif found:  # the message on several channels of the bus: one series
                t_ns = np.concatenate([f.t_ns for f in found])
                order = np.argsort(t_ns, kind="stable")
                values[name] = (t_ns[order], np.concatenate([f.value for f in found])[order])
        if not values:
            return 0
        timeline = np.unique(np.concatenate([t for t, _ in values.values()]))
        held = {}
        for name in self.references:
            if name in values:
                t_ns, value = values[name]
                at = np.searchsorted(t_ns, timeline, side="right") - 1
                held[name] = np.where(at >= 0, value[np.maximum(at, 0)], self.held[name])
            else:
                held[name] = np.full(len(timeline), self.held[name])
        series = {}
        for name, window_ms in self.when.windows.items():
            old_t, old_value = self.history[name]
            if name in values:
                new_t, new_value = values[name]
                old_t, old_value = (
                    np.concatenate([old_t, new_t]),
                    np.concatenate([old_value, new_value]),
                )
            series[name] = (old_t, old_value)
            keep = old_t > old_t[-1] - window_ms * _NS_PER_MS if len(old_t) else old_t > 0
            self.history[name] = (old_t[keep], old_value[keep])
        true = self.when.evaluate(timeline, held, series)
        for name, (_, value) in values.items():
            self.held[name] = float(value[-1])
        if self.settings.edge == "rising":
            before = np.concatenate([[self.was_true], true[:-1]])
            firing = true & ~before
        else:
            firing = true
        self.was_true = bool(true[-1])
        return self._fire(timeline[firing])

    def _fire(self, candidates: Times) -> int:
        """Keep the candidates at least min_interval_ms apart, and add their windows; how
        many were kept."""
        if not len(candidates):
            return 0
        gap = self.min_interval_ns
        if gap:
            kept = []
            k = 0
            if self.last_fired is not None:
                k = int(np.searchsorted(candidates, self.last_fired + gap, side="left"))
            while k < len(candidates):
                kept.append(k)
                k = int(np.searchsorted(candidates, candidates[k] + gap, side="left"))
            candidates = candidates[kept]
        if not len(candidates):
            return 0
        self.last_fired = int(candidates[-1])
        starts = np.concatenate([self.starts, candidates - self.before_ns])
        ends = np.concatenate([self.ends, candidates + self.after_ns])
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], np.maximum.accumulate(ends[order])
        # A window that starts within the one before joins it.
        new = np.concatenate([[True], starts[1:] > ends[:-1]])
        last = np.append(np.flatnonzero(new)[1:], len(new)) - 1
        self.starts, self.ends = starts[new], ends[last]
        return len(candidates)

    def _overlaps(self, first: int, last: int) -> bool:
        """Whether a firing's window covers any time from `first` to `last`."""
        at = int(np.searchsorted(self.starts, last, side="right")) - 1
        return at >= 0 and int(self.ends[at]) >= first

    def covered(self, t_ns: Times) -> npt.NDArray[np.bool_]:
        """Whether a firing's window covers each time."""
        at = np.searchsorted(self.starts, t_ns, side="right") - 1
        inside = at >= 0
        inside[inside] = t_ns[inside] <= self.ends[at[inside]]
        return inside

    def _decide(self, out: Collected) -> None:
        newest = max(self.newest.values())
        too_old = newest - RING_SLACK_NS  # what a bus lagging this far behind may lose
        decided_through = too_old - self.before_ns
        if self.known_until is not None:
            decided_through = max(decided_through, self.known_until - self.before_ns)
        sent: dict[tuple[str, int], list[CollectedBlock]] = {}
        ring = []
        for piece in self.ring:
            first, last = int(piece.t_ns[0]), int(piece.t_ns[-1])
            if self._overlaps(first, last):
                covered = self.covered(piece.t_ns)
                if covered.any():
                    key = (piece.bus, id(piece.plan))
                    sent.setdefault(key, []).append(take_rows(piece, covered))
                waiting = ~covered & (piece.t_ns > decided_through)
                if waiting.all():
                    ring.append(piece)
                elif waiting.any():
                    ring.append(take_rows(piece, waiting))
            elif first > decided_through:
                ring.append(piece)
            elif last > decided_through:  # the piece's times ascend: keep its end
                start = int(np.searchsorted(piece.t_ns, decided_through, side="right"))
                ring.append(take_rows(piece, slice(start, None)))
        self.ring = ring
        for pieces in sent.values():
            out.blocks.append(pieces[0] if len(pieces) == 1 else _joined(pieces))
        # A window can go once every bus with selected signals has frames past its end:
        # no value to come can fall in it.
        passed = min(self.newest.get(bus, too_old) for bus in self.target_buses)
        keep = self.ends >= max(passed, too_old)
        self.starts, self.ends = self.starts[keep], self.ends[keep]

    def flush(self, out: Collected) -> None:
        """What is still in the ring was not covered by any firing: it is not sent."""
        self.ring = []


def _joined(pieces: list[CollectedBlock]) -> CollectedBlock:
    """Pieces of one selection on one channel, in time order, as one block."""
    first = pieces[0]
    present = [
        p.present if p.present is not None else np.ones(p.bits.shape, np.bool_) for p in pieces
    ]
    matrix = np.concatenate(present, axis=1)
    return CollectedBlock(
        first.bus,
        first.plan,
        np.concatenate([p.t_ns for p in pieces]),
        np.concatenate([p.can_id for p in pieces]),
        np.concatenate([p.bits for p in pieces], axis=1),
        None if matrix.all() else matrix,
    )
