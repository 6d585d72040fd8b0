"""Collection rules as the config file gives them: which signals a rule selects, and how
they are kept (see docs/collection-rules.md)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from agent.collect.expression import Expression, ExpressionError, parse
from agent.config import Checker, one_of
from agent.diagnostics.settings import no_stream

MODES = ("all", "sample", "change", "aggregate", "trigger", "raw", "faults")
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
    "faults": frozenset(),
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


#: The keys of every rule; each mode adds its own (MODE_KEYS).
RULE_KEYS = {"name", "mode", "signals", "messages", "buses"}


def _names(check: Checker, data: Mapping[str, Any], where: str, key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        check.problems.append(f"{where}.{key}: expected a list of names, got {value!r}")
        return ()
    return tuple(value)


def parse_rules(check: Checker, tables: Any, buses: set[str]) -> tuple[CollectRule, ...]:
    """The [[collect]] tables of a config, with every problem added to `check`."""
    if not isinstance(tables, list):
        check.problems.append("collect: expected [[collect]] tables")
        return ()
    rules: list[CollectRule] = []
    for k, table in enumerate(tables):
        rule = _rule(check, table, f"collect[{k}]", buses)
        if rule is not None:
            if any(r.name == rule.name for r in rules):
                check.problems.append(f"collect[{k}].name: {rule.name!r} is used by another rule")
            rules.append(rule)
    return tuple(rules)


def _rule(check: Checker, data: Any, where: str, buses: set[str]) -> CollectRule | None:
    if not isinstance(data, dict):
        check.problems.append(f"{where}: expected a table")
        return None
    name = check.get(data, where, "name", str, "")
    if not name:
        check.problems.append(f"{where}.name: missing")
    mode = check.get(data, where, "mode", str, "", one_of(MODES))
    if "mode" not in data:
        check.problems.append(f"{where}.mode: missing (one of {', '.join(MODES)})")
    for key in data:
        if key in RULE_KEYS or key in MODE_KEYS.get(mode, ()):
            continue
        other = [m for m, keys in MODE_KEYS.items() if key in keys]
        if other and mode:
            check.problems.append(f"{where}.{key}: does not apply to mode {mode!r}")
        elif not other:
            check.problems.append(f"{where}.{key}: unknown key")
    signals = _names(check, data, where, "signals")
    if mode == "raw" and signals:
        check.problems.append(f"{where}.signals: mode raw takes whole frames: use messages or ids")
    elif mode == "faults" and signals:
        check.problems.append(f"{where}.signals: mode faults sends DM1/DM2 faults, not signals")
    elif mode and mode not in ("raw", "faults") and not signals:
        check.problems.append(f'{where}.signals: missing (names or globs such as "*")')
    rule_buses = _names(check, data, where, "buses")
    for bus in rule_buses:
        if bus not in buses:
            check.problems.append(f"{where}.buses: {no_stream(bus)}")
    rule = CollectRule(
        name=name,
        mode=mode,
        signals=signals,
        messages=_names(check, data, where, "messages"),
        buses=rule_buses,
    )
    at = where
    if mode == "sample":
        if "period_ms" not in data:
            check.problems.append(f"{at}.period_ms: missing")
        rule = replace(
            rule,
            period_ms=check.get(data, at, "period_ms", int, 1000, _duration(1, DAY_MS)),
            reduce=check.get(data, at, "reduce", str, "last", one_of(REDUCES)),
        )
    elif mode == "change":
        if "deadband" in data and "deadband_rel" in data:
            check.problems.append(f"{at}: deadband and deadband_rel exclude each other")
        rule = replace(
            rule,
            deadband=float(check.get(data, at, "deadband", (int, float), 0.0, _band)),
            deadband_rel=float(check.get(data, at, "deadband_rel", (int, float), 0.0, _band)),
            heartbeat_ms=check.get(data, at, "heartbeat_ms", int, 0, _duration(0, DAY_MS)),
        )
    elif mode == "aggregate":
        if "window_ms" not in data:
            check.problems.append(f"{at}.window_ms: missing")
        stats = data.get("stats", list(STATS))
        if (
            not isinstance(stats, list)
            or not stats
            or any(s not in STATS for s in stats)
            or len(set(stats)) != len(stats)
        ):
            check.problems.append(
                f"{at}.stats: expected a list of distinct {', '.join(STATS)}; got {stats!r}"
            )
            stats = list(STATS)
        rule = replace(
            rule,
            window_ms=check.get(data, at, "window_ms", int, 1000, _duration(1, DAY_MS)),
            stats=tuple(stats),
        )
    elif mode == "trigger":
        text = check.get(data, at, "when", str, "")
        expression = None
        if not text:
            check.problems.append(f'{at}.when: missing (a condition such as "SPEED > 60")')
        else:
            try:
                expression = parse(text)
            except ExpressionError as error:
                check.problems.append(f"{at}.when: rule {name!r}: {error}")
        rule = replace(
            rule,
            when=expression,
            before_ms=check.get(data, at, "before_ms", int, 1000, _duration(0, CAPTURE_MS)),
            after_ms=check.get(data, at, "after_ms", int, 1000, _duration(0, CAPTURE_MS)),
            min_interval_ms=check.get(data, at, "min_interval_ms", int, 0, _duration(0, DAY_MS)),
            edge=check.get(data, at, "edge", str, "rising", one_of(EDGES)),
        )
        if rule.before_ms == rule.after_ms == 0:
            check.problems.append(
                f"{at}: before_ms and after_ms are both 0: a capture would hold only the "
                "values at the instants it fires"
            )
    elif mode == "raw":
        ids = data.get("ids", [])
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 29 for i in ids
        ):
            check.problems.append(f"{at}.ids: expected a list of frame IDs, got {ids!r}")
            ids = []
        rule = replace(rule, ids=tuple(ids))
    return rule


#: The longest period, window, heartbeat or interval a rule may have.
DAY_MS = 86_400_000
#: The longest capture before or after a firing: what comes before is held in memory.
CAPTURE_MS = 600_000


def _duration(low: int, high: int) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be {low} to {high:,} ms"

    return check


def _band(value: float) -> str | None:
    return None if 0 <= value < math.inf else "must be a number of 0 or more"


def rules_key(rules: tuple[CollectRule, ...]) -> list[object]:
    """The rules in a comparable form (a parsed condition compares by its text)."""
    return [(replace(r, when=None), r.when.text if r.when else None) for r in rules]
