"""Our candump reader against python-can's `CanutilsLogReader`, on the same files.

Both read every line of each file; the lines are counted from the file itself, and each
reader's count of frames must equal it. The two take turns, ROUNDS rounds of one read each,
and the least CPU of each counts.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import can

from agent.logs.candump import CandumpReader
from bench.command import big_log
from bench.common import LOGS, Measured, Report, best_of, count_frames, table

ROUNDS = 3
#: Issue 2's target: lines/s, and times python-can's reader.
TARGET_RATE, TARGET_RATIO = 2e6, 10


def _ours(path: Path) -> int:
    return sum(len(batch) for batch in CandumpReader(path).batches())


def _python_can(path: Path) -> int:
    return sum(1 for _ in can.CanutilsLogReader(str(path)))


def run() -> Report:
    rows: list[list[object]] = []
    rates: list[float] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        files = [(name, log) for name, (log, _, _) in LOGS.items()]
        files.append(("rav4 x8", big_log(LOGS["rav4"][0], 8, Path(folder))))
        for name, path in files:
            lines = count_frames(path)
            counts = {"ours": _ours(path), "python-can": _python_can(path)}
            if set(counts.values()) != {lines}:
                raise RuntimeError(f"{name}: {lines} lines, but the readers read {counts}")
            ours = theirs = float("inf")
            for _ in range(ROUNDS):
                ours = min(ours, best_of(1, partial(_ours, path)))
                theirs = min(theirs, best_of(1, partial(_python_can, path)))
            rates.append(lines / ours)
            ratios.append(theirs / ours)
            rows.append(
                [
                    name,
                    f"{lines:,}",
                    f"{lines / ours / 1e6:.2f} M",
                    f"{lines / theirs / 1e3:.0f} k",
                    f"{theirs / ours:.1f}",
                ]
            )
    met = min(rates) >= TARGET_RATE and min(ratios) >= TARGET_RATIO
    measured = Measured(
        f"candump reader: {TARGET_RATE / 1e6:.0f} M lines/s and {TARGET_RATIO} x python-can",
        2,
        f"{min(rates) / 1e6:.2f} to {max(rates) / 1e6:.2f} M lines/s, "
        f"{min(ratios):.1f} to {max(ratios):.1f} x",
        met,
    )
    header = ["log", "lines", "ours lines/s", "python-can lines/s", "x python-can"]
    return Report(table(header, rows), [measured])


if __name__ == "__main__":
    print(run())
