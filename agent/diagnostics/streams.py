"""The diagnostics streams of a config: for each bus with a [[diagnostics]] table, the
stream its ECUs' answers go to, decoded with the DBC of agent/diagnostics/pids.py. That DBC
is written into the state folder, where it is hashed and compiled as any DBC is."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import Config
from agent.diagnostics.pids import answer_signals, dbc_text
from agent.diagnostics.settings import STREAM_SUFFIX, stream_name

if TYPE_CHECKING:
    from agent.collect.rules import CollectRule


@dataclass(frozen=True)
class AnswerStream:
    """What the decoders and the batcher take of a bus: its name and its DBCs."""

    name: str
    dbc: tuple[Path, ...]
    j1939: bool = False


def answers_dbc(folder: Path) -> Path:
    """The DBC of the answers, in `folder` (written when it differs)."""
    path = folder / "answers.dbc"
    text = dbc_text()
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)
    return path


def diagnostics_streams(config: Config, folder: Path | None = None) -> list[AnswerStream]:
    """The streams of the buses that are asked, their DBC written into `folder` (by
    default `state_dir/diagnostics/`)."""
    if not config.diagnostics:
        return []
    dbc = answers_dbc(folder or config.state_dir / "diagnostics")
    return [AnswerStream(stream_name(table.bus), (dbc,)) for table in config.diagnostics]


def answers_hints(
    rules: Iterable[CollectRule], buses: Collection[str], streams: Collection[str]
) -> list[str]:
    """For each rule on `buses` (none named: all) that names signals of the ECUs'
    answers, which live on the diagnostics streams only: where to select them, or that
    the vehicle asks no ECU there (`streams`: the streams it has)."""
    hints = []
    for rule in rules:
        selected = rule.buses or tuple(sorted(buses))
        if any(name.endswith(STREAM_SUFFIX) for name in selected):
            continue
        found = sorted(
            {
                signal
                for message, signal in answer_signals()
                for pattern in rule.signals
                if fnmatch.fnmatchcase(f"{message}.{signal}" if "." in pattern else signal, pattern)
            }
        )
        if not found:
            continue
        asked = [stream_name(b) for b in selected if stream_name(b) in streams]
        where = (
            f"select buses = {asked}"
            if asked
            else f"no [[diagnostics]] asks the ECUs on {', '.join(selected)}"
        )
        hints.append(
            f"{rule.name}: {', '.join(found)}: signals of the ECUs' answers, which come on a "
            f"bus's diagnostics stream only: {where}"
        )
    return hints
