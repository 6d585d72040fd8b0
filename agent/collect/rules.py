"""Collection rules as the config file gives them: which signals a rule selects, and how
they are kept (see docs/collection-rules.md)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.collect.expression import Expression

MODES = ("all", "sample", "change", "aggregate", "trigger", "raw")
REDUCES = ("last", "first", "mean", "min", "max")
STATS = ("min", "max", "mean", "count", "stddev")
EDGES = ("rising", "always")

#: The keys each mode takes besides name, mode, signals, messages and buses.
MODE_KEYS: dict[str, frozenset[str]] = {
    "all": frozenset(),
    "sample": frozenset({"period_ms", "reduce"}),
    "change": frozenset({"deadband", "deadband_rel", "heartbeat_ms"}),
    "aggregate": frozenset({"window_ms", "stats"}),
    "trigger": frozenset({"when", "before_ms", "after_ms", "min_interval_ms", "edge"}),
    "raw": frozenset({"ids"}),
}


@dataclass(frozen=True)
class CollectRule:
    """One `[[collect]]` table. `signals`, `messages` are names or globs (`Message.Signal`
    names a signal of one message); empty `messages` and `buses` mean all of them."""

    name: str
    mode: str
    signals: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    buses: tuple[str, ...] = ()
    period_ms: int = 0  # sample
    reduce: str = "last"
    deadband: float = 0.0  # change
    deadband_rel: float = 0.0
    heartbeat_ms: int = 0  # 0: none
    window_ms: int = 0  # aggregate
    stats: tuple[str, ...] = STATS
    when: Expression | None = None  # trigger
    before_ms: int = 0
    after_ms: int = 0
    min_interval_ms: int = 0
    edge: str = "rising"
    ids: tuple[int, ...] = ()  # raw: frame IDs, besides those of `messages`
