"""The whole agent: a RAV4 replay at pace "max" into a local mosquitto, against a per-frame
baseline in the same run; the agent at realtime pace; and bytes on the wire per frame.

The agent and the baseline run as their own processes, against one mosquitto started here on
a free loopback port; CPU is the process's user + system time, so a busy second core does not
count against either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.decode import ALL_BUSES, Decoder
from agent.frames import FrameBatch
from agent.logs import open_log
from agent.wire import BatchEncoder
from bench.command import big_log
from bench.common import LOGS, table
from tests.data import REPO
from tests.services import broker

#: The RAV4 log this many times end to end for the throughput runs: the difference between
#: the two is the agent's steady rate, without its start-up (imports, DBC compiling).
COPIES = (8, 32)
#: Runs of each agent variant on each log, taking turns.
ROUNDS = 3
#: The baseline is slow: it is timed on these many frames, and its steady cost per frame
#: is the difference of the two runs, as the agent's is.
BASELINE_FRAMES = (10_000, 30_000)
#: Realtime: CPU is measured over this window, after a warm-up that holds the start-up.
WARM_UP_S, WINDOW_S = 5.0, 20.0


#: The last commit before the spool: the pipeline as issue 3 left it, run beside today's to
#: measure what the spool costs.
BEFORE_SPOOL = "0d0ec89c532eb51c448ea3b1cb7aa1b4dda2046e"


@dataclass(frozen=True)
class Variant:
    name: str
    fsync: str | None  # the [spool] fsync mode; None: the agent before the spool


#: The first is today's default, compared with the others.
VARIANTS = (
    Variant('spool, fsync = "batch"', "batch"),
    Variant('spool, fsync = "never"', "never"),
    Variant("before the spool (in-memory queue)", None),
)


def agent_config(folder: Path, log: Path, url: str, pace: str, fsync: str | None = "batch") -> Path:
    _, dbcs, _ = LOGS["rav4"]
    buses = "".join(
        f'[[bus]]\nname = "{bus}"\nsource = "replay"\npath = "{log}"\npace = {pace}\n'
        f'dbc = ["{paths[0]}"]\n'
        for bus, paths in dbcs.items()
    )
    tag = f"{pace.strip(chr(34))}-{fsync or 'before-spool'}"
    spool = f'[spool]\nfsync = "{fsync}"\n' if fsync else ""
    config = folder / f"agent-{tag}.toml"
    config.write_text(
        f'vehicle_id = "bench"\nstate_dir = "{folder / ("state-" + tag)}"\n{buses}'
        f'[uplink]\nkind = "mqtt"\nurl = "{url}"\n{spool}[metrics]\nlisten = ""\n'
    )
    return config


def before_spool(folder: Path) -> Path | None:
    """The agent package of BEFORE_SPOOL, unpacked in `folder` (None without git history)."""
    target = folder / "before-spool"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", BEFORE_SPOOL, "agent", "dbc"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory since it started its program (VmHWM): unlike the
    rusage of a child, it does not count the memory it shared with this process at fork."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_measured(command: list[str], cwd: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of a child process (`python -m agent` in
    `cwd` runs the agent package found there)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd
    )
    peak = 0.0
    while True:
        with contextlib.suppress(OSError):
            peak = max(peak, peak_rss_mb(process.pid))
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed")
    return wall, usage.ru_utime + usage.ru_stime, peak


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def realtime(config: Path) -> tuple[float, float]:
    """Share of one core over WINDOW_S of steady realtime replay, and peak RSS (MB)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(WARM_UP_S)
    before = cpu_of(process.pid)
    time.sleep(WINDOW_S)
    after = cpu_of(process.pid)
    peak = peak_rss_mb(process.pid)
    process.send_signal(signal.SIGINT)
    process.wait()
    return (after - before) / WINDOW_S, peak


def wire_bytes() -> list[list[object]]:
    """Bytes per decoded frame on the wire with 1 s batches, for each real log, batched as
    the agent batches: each bus on its own."""
    rows: list[list[object]] = []
    for name, (log, dbcs, j1939) in LOGS.items():
        frames = FrameBatch.concat(list(open_log(log).batches()))
        encoder = BatchEncoder("bench", "stream", b"", compression="zstd")
        wire = body = decoded = signals = sequence = 0
        for bus, paths in dbcs.items():
            decoder = Decoder({ALL_BUSES: paths}, j1939)
            mine = (
                frames if bus == ALL_BUSES else frames.take(frames.bus == frames.buses.index(bus))
            )
            seconds = (mine.t_ns - mine.t_ns[0]) // 1_000_000_000
            cuts = np.flatnonzero(np.diff(seconds)) + 1
            for rows_of_second in np.split(np.arange(len(mine)), cuts):
                result = decoder.decode(mine.take(rows_of_second))
                sequence += 1
                batch = encoder.encode([result], sequence)
                if batch is None:
                    continue
                wire += len(batch)
                body += batch.body_size
                decoded += result.decoded
                signals += result.signals
        text = log.stat().st_size / len(frames)
        rows.append(
            [
                name,
                f"{decoded:,}",
                f"{signals / decoded:.1f}",
                f"{text:.1f}",
                f"{body / decoded:.1f}",
                f"{wire / decoded:.2f}",
            ]
        )
    return rows


def run() -> str:
    log, _, _ = LOGS["rav4"]
    with tempfile.TemporaryDirectory() as name, broker(Path(name)) as mqtt:
        folder = Path(name)
        old_agent = before_spool(folder)
        variants = [v for v in VARIANTS if v.fsync or old_agent is not None]
        # variant -> copies -> every round's (wall, cpu, rss); the variants take turns for
        # each log, so that a slow spell of the machine weighs on all of them.
        runs: dict[Variant, dict[int, list[tuple[float, float, float]]]] = {
            v: {c: [] for c in COPIES} for v in variants
        }
        for copies in COPIES:
            long_log = big_log(log, copies, folder)
            for _ in range(ROUNDS):
                for variant in variants:
                    config = agent_config(folder, long_log, mqtt.url, '"max"', variant.fsync)
                    command = [sys.executable, "-m", "agent", "run", "--config", str(config)]
                    cwd = old_agent if variant.fsync is None else None
                    runs[variant][copies].append(run_measured(command, cwd))
            long_log.unlink()
        baseline = [sys.executable, "-m", "bench.baseline_pipeline", str(log), mqtt.url]
        base_runs = [run_measured([*baseline, str(n)]) for n in BASELINE_FRAMES]
        share, realtime_rss = realtime(agent_config(folder, log, mqtt.url, '"realtime"'))
    rows: list[list[object]] = []
    steady_of: dict[Variant, float] = {}
    best = {v: {c: min(runs[v][c], key=lambda r: r[1]) for c in COPIES} for v in variants}
    for variant in variants:
        for copies in COPIES:
            wall, cpu, rss = best[variant][copies]
            frames = 135_468 * copies
            rows.append(
                [
                    f"agent ({variant.name}), RAV4 log x{copies} at pace max, start-up included",
                    f"{frames:,}",
                    f"{frames / wall / 1e3:,.0f} k",
                    f"{cpu / frames * 1e6:.2f} us",
                    f"{rss:.0f} MB",
                ]
            )
        (_, cpu_a, _), (_, cpu_b, _) = (best[variant][c] for c in COPIES)
        frames_a, frames_b = (135_468 * c for c in COPIES)
        steady_of[variant] = steady_v = (cpu_b - cpu_a) / (frames_b - frames_a)
        rows.append(
            [
                f"agent ({variant.name}), steady (the difference of the two runs)",
                f"{frames_b - frames_a:,}",
                f"{1 / steady_v / 1e3:,.0f} k per core",
                f"{steady_v * 1e6:.2f} us",
                "-",
            ]
        )
    steady = steady_of[variants[0]]
    base_frames = BASELINE_FRAMES[1] - BASELINE_FRAMES[0]
    base_wall = base_runs[1][0] - base_runs[0][0]
    base_steady = (base_runs[1][1] - base_runs[0][1]) / base_frames
    rows.append(
        [
            "per-frame baseline (python-can reader, cantools, protobuf per frame, paho "
            f"publish), steady (the difference of runs on {BASELINE_FRAMES[0]:,} and "
            f"{BASELINE_FRAMES[1]:,} frames)",
            f"{base_frames:,}",
            f"{base_frames / base_wall / 1e3:,.1f} k",
            f"{base_steady * 1e6:.1f} us",
            "-",
        ]
    )
    ratio = base_steady / steady
    out = table(["run", "log frames", "frames/s (wall)", "CPU per frame", "peak RSS"], rows)
    out += f"\n\nAgent CPU per frame, steady: {ratio:.0f} x less than the baseline's.\n"
    # The spool's cost: the longest runs' CPU, whose start-up is the same for every variant
    # and a small share; median and best of the rounds, as the steady rates of single runs
    # move by 10% and more between rounds on this machine.
    longest = COPIES[-1]
    compared = []
    for variant in variants[1:]:
        cpu_of_runs = [[r[1] for r in runs[v][longest]] for v in (variants[0], variant)]
        compared.append(
            [
                f"{variants[0].name} against {variant.name}",
                f"{statistics.median(cpu_of_runs[0]) / statistics.median(cpu_of_runs[1]) - 1:+.1%}",
                f"{min(cpu_of_runs[0]) / min(cpu_of_runs[1]) - 1:+.1%}",
            ]
        )
    out += f"\nThe spool's cost, CPU of the RAV4 log x{longest} runs ({ROUNDS} rounds):\n\n"
    out += table(["agent", "CPU, medians", "CPU, best rounds"], compared) + "\n\n"
    out += table(
        ["run", "share of one core", "peak RSS"],
        [
            [
                f"agent, RAV4 log at realtime ({WINDOW_S:.0f} s after a {WARM_UP_S:.0f} s warm-up)",
                f"{share:.1%}",
                f"{realtime_rss:.0f} MB",
            ]
        ],
    )
    out += "\n\n" + table(
        [
            "log",
            "decoded frames",
            "signals/frame",
            "candump text bytes/frame",
            "body bytes/frame (before zstd)",
            "wire bytes/frame",
        ],
        wire_bytes(),
    )
    return out


if __name__ == "__main__":
    print(run())
