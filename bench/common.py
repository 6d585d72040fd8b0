"""Shared pieces of the benchmarks: the real logs, timing, and markdown tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cantools

from agent.decode import ALL_BUSES
from agent.frames import FrameBatch
from agent.logs import open_log
from tests.data import DATA

REPO = Path(__file__).resolve().parents[1]

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


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """The shortest of `repeats` runs, in seconds: the least disturbed by a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


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
