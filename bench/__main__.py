"""`make bench`: every benchmark, printed as markdown tables for BENCHMARKS.md, and at the
end the table of targets with this run's figures."""

from __future__ import annotations

import datetime
import platform
import time
from collections.abc import Callable

import numpy as np

from agent.memory import keep_freed_memory
from bench import (
    campaigns,
    candump_reader,
    collect,
    command,
    decoder,
    j1939,
    pipeline,
    socketcan,
)
from bench.common import Measured, Report, commit, table

#: What `make bench` cannot measure here, with where it is measured; their figures are in
#: BENCHMARKS.md, never repeated from there as if this run had made them.
ELSEWHERE = (
    ("the agent's CPU per frame on real AF_CAN: under 2 us", 15, "`sudo make vm-test`"),
    (
        'power cut with `fsync = "batch"`: no batch the agent reported as spooled is lost',
        15,
        "`sudo make vm-test`",
    ),
    ("soak: no frame lost with the broker and the agent killed at random", 4, "`make soak`"),
    ("fleet: 100 vehicles into PostgreSQL, p99 under 5 s", 20, "`make fleet-bench`"),
)

SECTIONS: tuple[tuple[str, Callable[[], Report]], ...] = (
    ("Decoder against cantools, same frames", decoder.run),
    ("SocketCAN reader against python-can's message path", socketcan.run),
    ("candump reader against python-can", candump_reader.run),
    ("The whole decode command against a python-can + cantools loop", command.run),
    ("The agent end to end", pipeline.run),
    ("Collection rules", collect.run),
    ("J1939 reassembly and DM1 faults", j1939.run),
    ("A fleet on one broker: a campaign pushed to a group", campaigns.run),
)


def targets(measured: list[Measured], date: str, revision: str) -> str:
    rows: list[list[object]] = [
        [m.target, m.issue, m.figure, m.verdict, date, revision] for m in measured
    ]
    rows += [
        [target, issue, f"not measured by make bench, see BENCHMARKS.md ({where})", "-", "-", "-"]
        for target, issue, where in ELSEWHERE
    ]
    return table(["target", "issue", "figure", "met", "date", "commit"], rows)


def main() -> None:
    keep_freed_memory()  # as the agent's own entry point does
    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    revision = commit()
    print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    print(f"{date}, commit {revision}\n")
    measured: list[Measured] = []
    for title, run in SECTIONS:
        section_started = time.monotonic()
        report = run()
        measured += report.measured
        print(f"## {title}\n\n{report}\n", flush=True)
        print(f"({time.monotonic() - section_started:.0f} s)\n", flush=True)
    print("## Targets at a glance\n")
    print(targets(measured, date, revision))
    print(f"\n`make bench` took {(time.monotonic() - started) / 60:.1f} minutes.")


main()
