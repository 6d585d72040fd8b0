"""The whole `telemetry-agent decode --format none` against a python-can + cantools loop.

Both run as their own processes on the same log, start-up included, and the CPU time they
use is measured (user + system), so a busy second core does not count against either. The
agent runs twice over: with its DBC cache warm (the DBCs compiled by an earlier run), as a
user's every run but the first, and with an empty cache, as the first.
"""

from __future__ import annotations

import compileall
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.decode.cache import CACHE_ENV
from bench.common import LOGS, REPO, table

#: Longer logs, made of the RAV4 log end to end: start-up weighs less the longer the log.
REPEATS = (8, 32)


def cpu_seconds(command: list[str], cache: Path | None = None) -> float:
    """CPU seconds of `command`; `cache`: the agent's DBC cache."""
    env = None if cache is None else {**os.environ, CACHE_ENV: str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def big_log(source: Path, copies: int, folder: Path) -> Path:
    """The log repeated end to end, timestamps shifted so the copies follow one another."""
    lines = source.read_text().splitlines()
    first = float(lines[0].split(")")[0][1:])
    span = float(lines[-1].split(")")[0][1:]) - first + 0.001
    out = folder / f"{source.stem}.x{copies}.log"
    with out.open("w") as f:
        for copy in range(copies):
            for line in lines:
                stamp, rest = line.split(")", 1)
                f.write(f"({float(stamp[1:]) + copy * span:.6f}){rest}\n")
    return out


def run() -> str:
    # An installed agent runs from bytecode that pip compiled; a shell that sets
    # PYTHONDONTWRITEBYTECODE would have every run compile the package again (30 ms here).
    compileall.compile_dir(REPO / "agent", quiet=1)
    compileall.compile_file(REPO / "bench" / "baseline_decode.py", quiet=1)
    log, dbcs, _ = LOGS["rav4"]
    dbc_options = [f"{bus}={path}" for bus, paths in dbcs.items() for path in paths]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as folder:
        logs = [("RAV4 log", log, 135_468)]
        logs += [(f"RAV4 log x{n}", big_log(log, n, Path(folder)), 135_468 * n) for n in REPEATS]
        for name, path, frames in logs:
            ours_command = [sys.executable, "-m", "agent", "decode", str(path), "--format", "none"]
            for option in dbc_options:
                ours_command += ["--dbc", option]
            baseline_command = [sys.executable, "-m", "bench.baseline_decode", str(path)]
            for option in dbc_options:
                baseline_command += ["--dbc", option]
            cold = []
            for attempt in range(3):
                cold.append(cpu_seconds(ours_command, Path(folder) / f"{name}.{attempt}"))
            warm_cache = Path(folder) / f"{name}.0"
            warm = min(cpu_seconds(ours_command, warm_cache) for _ in range(3))
            baseline = cpu_seconds(baseline_command)
            rows.append(
                [
                    name,
                    f"{frames:,}",
                    f"{warm:.2f} s ({frames / warm / 1e6:.2f} M frames/s)",
                    f"{min(cold):.2f} s",
                    f"{baseline:.2f} s ({frames / baseline / 1e3:.0f} k frames/s)",
                    f"{baseline / warm:.1f}",
                    f"{baseline / min(cold):.1f}",
                ]
            )
    return table(
        [
            "log",
            "frames",
            "telemetry-agent decode --format none (CPU), DBC cache warm",
            "the same, cache empty",
            "python-can + cantools (CPU)",
            "x (warm)",
            "x (empty)",
        ],
        rows,
    )


if __name__ == "__main__":
    print(run())
