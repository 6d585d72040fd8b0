"""Collection rules as the config file gives them: which signals a rule selects, and how
they are kept (see docs/collection-rules.md). The keys every rule has are read here; each
mode reads its own with the `Settings` declared beside it (agent.collect.<mode>)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.config import Checker, Settings, one_of
from agent.diagnostics.settings import no_stream


@dataclass(frozen=True)
class ModeSettings(Settings):
    """A rule mode's own keys of a [[collect]] table; a mode without keys of its own has
    this one. A reload applies them: changed rules start afresh."""


@dataclass(frozen=True)
class CollectRule:
    """One `[[collect]]` table. `signals`, `messages` are names or globs (`Message.Signal`
    names a signal of one message); empty `messages` and `buses` mean all of them.
    `settings` holds its mode's own keys, of the type that mode declares."""

    name: str
    mode: str
    signals: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    buses: tuple[str, ...] = ()
    settings: ModeSettings = field(default_factory=ModeSettings)


#: The keys of every rule; each mode adds its own (its Settings' fields).
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
    # Not at the top: each mode's module imports this one for ModeSettings. By the time a
    # rule is read, the package's import has registered every mode.
    from agent.collect.base import MODES

    if not isinstance(data, dict):
        check.problems.append(f"{where}: expected a table")
        return None
    name = check.get(data, where, "name", str, "")
    if not name:
        check.problems.append(f"{where}.name: missing")
    modes = tuple(sorted(MODES))
    mode = check.get(data, where, "mode", str, "", one_of(modes))
    if "mode" not in data:
        check.problems.append(f"{where}.mode: missing (one of {', '.join(modes)})")
    kind = MODES.get(mode)
    check.component_keys(data, where, RULE_KEYS, ("mode", mode), lambda m: MODES[m].Settings, modes)
    signals = _names(check, data, where, "signals")
    if kind is not None and kind.no_signals and signals:
        check.problems.append(f"{where}.signals: mode {mode} {kind.no_signals}")
    elif kind is not None and not kind.no_signals and not signals:
        check.problems.append(f'{where}.signals: missing (names or globs such as "*")')
    rule_buses = _names(check, data, where, "buses")
    for bus in rule_buses:
        if bus not in buses:
            check.problems.append(f"{where}.buses: {no_stream(bus)}")
    return CollectRule(
        name=name,
        mode=mode,
        signals=signals,
        messages=_names(check, data, where, "messages"),
        buses=rule_buses,
        settings=kind.Settings.parse(check, data, where) if kind else ModeSettings(),
    )


#: The longest period, window, heartbeat or interval a rule may have.
DAY_MS = 86_400_000


def duration(low: int, high: int) -> Callable[[int], str | None]:
    """A check of a key in milliseconds, from `low` to `high`."""

    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be {low} to {high:,} ms"

    return check


def band(value: float) -> str | None:
    """A check of a deadband or other amount that cannot be negative."""
    return None if 0 <= value < math.inf else "must be a number of 0 or more"
