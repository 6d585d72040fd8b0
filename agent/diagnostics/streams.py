"""The diagnostics streams of a config: for each bus with a [[diagnostics]] table, the
stream its ECUs' answers go to, decoded with the DBC of agent/diagnostics/pids.py. That DBC
is written into the state folder, where it is hashed and compiled as any DBC is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.config import Config
from agent.diagnostics.pids import dbc_text
from agent.diagnostics.settings import stream_name


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
