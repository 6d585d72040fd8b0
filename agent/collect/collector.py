"""The collection stage: each bus's decoded batches through every rule."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.collect.base import (
    MODES,
    BusBatch,
    Collected,
    Mode,
    Reference,
    Selection,
    Selects,
    Target,
)
from agent.collect.rules import CollectRule
from agent.decode import DecodedBatch, Decoder, MessagePlan
from agent.frames import FrameBatch
from agent.j1939.groups import Groups


class CollectError(ValueError):
    """A rule that does not fit the DBCs: it selects nothing, or names an unknown signal."""


def _pattern(globs: Sequence[str]) -> re.Pattern[str]:
    """One regular expression for any of the globs (case-sensitive, as DBC names are); with
    none, one that matches nothing."""
    if not globs:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


class Collector:
    """Runs the rules over decoded batches, bus by bus, keeping their state in between."""

    def __init__(self, rules: Sequence[CollectRule], decoders: Mapping[str, Decoder]) -> None:
        problems = []
        self.rules: list[Mode[Any]] = []
        for rule in rules:
            buses = list(rule.buses) or list(decoders)
            settings = MODES[rule.mode].Settings
            if not isinstance(rule.settings, settings):
                # Only code builds rules by hand; the config file's come with their own.
                problems.append(
                    f"collect rule {rule.name!r}: mode {rule.mode} takes {settings.__name__}, "
                    f"not {type(rule.settings).__name__}"
                )
                continue
            try:
                targets = _targets(rule, buses, decoders)
                references = _references(rule, buses, decoders)
            except CollectError as error:
                problems.append(f"collect rule {rule.name!r}: {error}")
                continue
            self.rules.append(MODES[rule.mode](rule, targets, buses, references))
        if problems:
            raise CollectError("; ".join(problems))

    def frame_ids(self, bus: str) -> frozenset[tuple[int, bool]] | None:
        """The (ID, extended) pairs of the frames the rules read on a bus. None: every frame
        (a rule captures them all)."""
        ids: set[tuple[int, bool]] = set()
        for mode in self.rules:
            if bus in mode.buses:
                found = mode.frame_ids(bus)
                if found is None:
                    return None
                ids |= found
        return frozenset(ids)

    def collect(
        self,
        bus: str,
        frames: FrameBatch,
        decoded: DecodedBatch,
        groups: Groups | None = None,
    ) -> Collected:
        """What the rules keep of one bus's batch (and what it ends of earlier ones);
        `groups`: the J1939 transfers it completed, whose decoded groups rules select as
        any message."""
        out = Collected()
        batch = BusBatch(bus, frames, decoded, groups)
        for mode in self.rules:
            if bus in mode.buses:
                mode.collect(batch, out)
        return out

    def flush(self) -> Collected:
        """What the rules still hold: the open windows, at the end of the stream."""
        out = Collected()
        for mode in self.rules:
            mode.flush(out)
        return out


def _numbers(
    rule: CollectRule, plan: MessagePlan, columns: npt.NDArray[np.intp]
) -> npt.NDArray[np.intp]:
    """The columns of a rule whose mode computes with values: a text signal that a pattern
    matches is left out, one that the rule names is an error."""
    kept = []
    for column in columns.tolist():
        signal = plan.signals[column]
        if not signal.is_text:
            kept.append(column)
        elif signal.name in rule.signals or f"{plan.info.name}.{signal.name}" in rule.signals:
            raise CollectError(
                f"mode {rule.mode} takes numbers: signal {plan.info.name}.{signal.name} is "
                "text; mode all sends text as it comes, sample its first or last"
            )
    return np.array(kept, np.intp)


def _targets(
    rule: CollectRule, buses: Sequence[str], decoders: Mapping[str, Decoder]
) -> list[Target]:
    targets: list[Target] = []
    mode = MODES[rule.mode]
    if mode.reads_j1939 and not any(decoders[bus].is_j1939(bus) for bus in buses):
        raise CollectError(
            f"mode {rule.mode} reads J1939 {mode.reads_j1939}: no bus of {', '.join(buses)} "
            "is J1939 (j1939 = true)"
        )
    whole = mode.selects is Selects.MESSAGES
    if mode.selects is Selects.NOTHING or (whole and not rule.messages):
        return targets
    # A pattern with a dot names Message.Signal; without, the signal's own name.
    messages = _pattern(rule.messages)
    plain = _pattern([g for g in rule.signals if "." not in g])
    qualified = _pattern([g for g in rule.signals if "." in g])
    for bus in buses:
        for plan in decoders[bus].messages(bus):
            if rule.messages and not messages.match(plan.info.name):
                continue
            if whole:
                columns = np.arange(len(plan.signals), dtype=np.intp)
            else:
                columns = np.array(
                    [
                        k
                        for k, s in enumerate(plan.signals)
                        if plain.match(s.name) or qualified.match(f"{plan.info.name}.{s.name}")
                    ],
                    np.intp,
                )
            if not mode.takes_text(rule.settings):
                columns = _numbers(rule, plan, columns)
            if len(columns):
                selection = Selection(
                    plan.info, tuple(plan.signals[c] for c in columns.tolist()), rule.name
                )
                by_sender = decoders[bus].is_j1939(bus) and plan.info.is_extended
                targets.append(Target(bus, plan, columns, selection, by_sender))
    if whole:
        if not targets:
            raise CollectError(f"no message matches {', '.join(rule.messages)}")
    elif not targets:
        where = f" in messages {', '.join(rule.messages)}" if rule.messages else ""
        raise CollectError(
            f"no signal matches {', '.join(rule.signals)}{where} on bus {', '.join(buses)}"
        )
    return targets


def _references(
    rule: CollectRule, buses: Sequence[str], decoders: Mapping[str, Decoder]
) -> dict[str, Reference]:
    """The signals the condition names, found on the rule's buses: a plain name must be
    one signal's; `Message.Signal` names one message's."""
    when = MODES[rule.mode].condition(rule.settings)
    if when is None:
        return {}
    found: dict[str, Reference] = {}
    for name in sorted(when.signals):
        message, _, signal = name.rpartition(".")
        candidates: list[tuple[str, MessagePlan, int]] = [
            (bus, plan, k)
            for bus in buses
            for plan in decoders[bus].messages(bus)
            if not message or plan.info.name == message
            for k, s in enumerate(plan.signals)
            if s.name == signal
        ]
        if not candidates:
            raise CollectError(f"when: no signal {name} on bus {', '.join(buses)}")
        if len(candidates) > 1:
            where = ", ".join(f"{bus} {plan.info.name}" for bus, plan, _ in candidates[:5])
            raise CollectError(
                f"when: {name} is in several messages ({where}); write Message.Signal"
            )
        bus, plan, column = candidates[0]
        if plan.signals[column].is_text:
            raise CollectError(f"when: {name} is text; a condition compares numbers")
        found[name] = Reference(bus, plan, column)
    return found
