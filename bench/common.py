"""Shared pieces of the benchmarks: the real logs, timing, and markdown tables."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cantools

from agent.decode import ALL_BUSES
from agent.frames import FrameBatch
from agent.logs import open_log
from harness import REPO
from harness.data import DATA

#: name -> (log, DBCs per bus, J1939 buses)
LOGS: dict[str, tuple[Path, dict[str, list[Path]], list[str]]] = {
    "tesla": (
        DATA / "tesla-model3" / "candump_Manual_SOC_DogMode_CabinTemp.log",
        {ALL_BUSES: [DATA / "tesla-model3" / "Model3CAN.dbc"]},
        [],
    ),
    "rav4": (
        DATA / "rav4-comma2k19" / "rav4_seg40.candump.log",
        {
            "can0": [DATA / "rav4-comma2k19" / "toyota_new_mc_pt_generated.dbc"],
            "can1": [DATA / "rav4-comma2k19" / "toyota_adas.dbc"],
        },
        [],
    ),
    "truck": (
        DATA / "j1939-truck" / "truck.candump.log",
        {ALL_BUSES: [DATA / "j1939-truck" / "j1939.dbc"]},
        [ALL_BUSES],
    ),
}


def load_cantools(path: Path) -> Any:
    """cantools' database for a DBC file, loaded leniently as the decoder does."""
    return cantools.database.load_file(path, database_format="dbc", strict=False)


def read_all(path: Path) -> FrameBatch:
    return FrameBatch.concat(list(open_log(path).batches(100_000)))


def count_frames(path: Path) -> int:
    """The frames of a candump log, counted from the file itself (one a line), so that no
    benchmark's rate rests on a count typed in or on the reader it measures."""
    with path.open("rb") as log:
        return sum(1 for line in log if line.strip())


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """The least CPU time of `repeats` runs, in seconds: the run least disturbed by a shared
    machine. CPU time rather than wall time: the other core's load and the hypervisor's
    steal do not count against whichever contender ran while they lasted."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        work()
        best = min(best, time.process_time() - started)
    return best


@dataclass(frozen=True)
class Measured:
    """One target of an issue, with the figure a benchmark measured for it in this run."""

    target: str
    issue: int
    figure: str
    met: bool
    #: Said after "yes"/"no" where the verdict needs it (what fell short, what is partial).
    note: str = ""

    @property
    def verdict(self) -> str:
        word = "yes" if self.met else "**no**"
        return f"{word} ({self.note})" if self.note else word


@dataclass
class Report:
    """A benchmark's markdown tables, and the targets it measured."""

    text: str
    measured: list[Measured] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text


def commit() -> str:
    """The checkout's commit, marked when the files that benchmarks run differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "agent", "bench", "dbc", "pyproject.toml")
    return head + (" (with uncommitted changes)" if changed else "")


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rate(count: float, seconds: float) -> str:
    """A per-second figure in engineering units (k, M)."""
    value = count / seconds
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    return f"{value / 1e3:.0f} k"
