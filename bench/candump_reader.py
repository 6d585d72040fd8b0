"""Our candump reader against python-can's `CanutilsLogReader`, on the same files."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import can

from agent.logs.candump import CandumpReader
from bench.command import big_log
from bench.common import LOGS, best_of, table


def _ours(path: Path) -> int:
    return sum(len(batch) for batch in CandumpReader(path).batches())


def _python_can(path: Path) -> int:
    return sum(1 for _ in can.CanutilsLogReader(str(path)))


def run() -> str:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as folder:
        files = [(name, log) for name, (log, _, _) in LOGS.items()]
        files.append(("rav4 x8", big_log(LOGS["rav4"][0], 8, Path(folder))))
        for name, path in files:
            lines = _ours(path)
            ours = best_of(5, partial(_ours, path))
            theirs = best_of(2, partial(_python_can, path))
            rows.append(
                [
                    name,
                    f"{lines:,}",
                    f"{lines / ours / 1e6:.2f} M",
                    f"{lines / theirs / 1e3:.0f} k",
                    f"{theirs / ours:.1f}",
                ]
            )
    return table(["log", "lines", "ours lines/s", "python-can lines/s", "x python-can"], rows)


if __name__ == "__main__":
    print(run())
