"""The whole agent: a RAV4 replay at pace "max" into a local mosquitto, against two
baselines in the same run; the agent at realtime pace; and bytes on the wire per frame.

The agent and the baselines run as their own processes, against one mosquitto started here
on a free loopback port; CPU is each process's user + system time, threads included, so a
busy second core does not count against any of them. Every figure per frame is steady: the
difference of two runs on whole copies of the RAV4 log, which takes start-up (imports, DBC
compiling, connecting) out, so every contender is measured on the same mix of frames. The
agent is cheap enough to need long runs for that difference to stand above the noise (the
log 8 and 32 times); the baselines are not (1 and 2 times: one whole copy apart). Every
contender runs ROUNDS times on each of its logs, all of them taking turns within a round,
so that a slow spell of the machine weighs on all; the round with the least CPU counts.

Both baselines read every line of the log and decode what the agent decodes; each run's
own count of frames read and decoded is checked against the log's lines and against the
agent's decoded frames.

- per-frame (bench/baseline_pipeline.py): python-can's reader, cantools, a protobuf per
  frame, one paho QoS 1 publish per frame: issue 3's baseline, which its 20 x is judged by;
- batched (bench/baseline_batched.py): the same reader and cantools, frames grouped per
  second of frame time into the agent's own protobuf contract, zstd, one QoS 1 publish per
  batch: what a competent Python engineer would write without our decoder.
"""

from __future__ import annotations

import contextlib
import os
import re
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
from agent.wire.encoder import BatchEncoder
from bench.command import big_log
from bench.common import LOGS, Measured, Report, count_frames, table
from harness import REPO
from harness.services import broker

#: The RAV4 log this many times end to end for the agent's runs: the difference between
#: the two is the agent's steady rate, without its start-up.
COPIES = (8, 32)
#: The same for the baselines, each 6 to 50 times the agent's CPU per frame.
BASELINE_COPIES = (1, 2)
#: Runs of each contender on each of its logs, taking turns.
ROUNDS = 3
#: Realtime: CPU is measured over this window, after a warm-up that holds the start-up.
WARM_UP_S, WINDOW_S = 5.0, 20.0
#: Issue 3's targets.
TARGET_RATE, TARGET_RATIO, TARGET_SHARE, TARGET_RSS_MB, TARGET_WIRE = 500_000, 20, 0.03, 150, 5
#: Issue 4's target: what the spool may cost, with fsync = "batch".
TARGET_SPOOL = 0.10
#: Issue 17's "no slower": runs of one agent move by this much here between rounds.
NOISE = 0.03

#: The last commit before the spool (the pipeline as issue 3 left it), and the commit that
#: finished the spool (its fsync at most ten times a second) with the same reader, decoder
#: and encoder: the two, run beside today's, measure what the spool costs. Today's spool
#: differs from that one by two gauges.
BEFORE_SPOOL = "0d0ec89c532eb51c448ea3b1cb7aa1b4dda2046e"
SPOOL_BUILT = "4cfadcc"
#: The last commit before issue 17 split the agent into a batcher, a pipeline and a
#: supervisor, and each component's config into its own module: behaviour unchanged, so
#: today's agent must be no slower than it.
BEFORE_SPLIT = "4ebc260"
#: The summary lines on stderr: the agent's status line, and each baseline's.
AGENT_SUMMARY = re.compile(r"([\d,]+) frames \([^)]*\), ([\d,]+) decoded")
BASELINE_SUMMARY = re.compile(r"(\d+) frames, (\d+) decoded")


@dataclass(frozen=True)
class Variant:
    name: str
    fsync: str | None  # the [spool] fsync mode; None: the agent before the spool
    commit: str | None = None  # None: today's agent; else the agent of that commit


#: The first is today's default, compared with the others.
VARIANTS = (
    Variant('today, spool with fsync = "batch"', "batch"),
    Variant('today, spool with fsync = "never"', "never"),
    Variant(f'{SPOOL_BUILT}, spool with fsync = "batch"', "batch", SPOOL_BUILT),
    Variant(f"{BEFORE_SPOOL[:7]}, before the spool (in-memory queue)", None, BEFORE_SPOOL),
    Variant(
        f'{BEFORE_SPLIT}, before the split into stages, fsync = "batch"', "batch", BEFORE_SPLIT
    ),
)


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    rss_mb: float
    stderr: str

    def counts(self, pattern: re.Pattern[str]) -> tuple[int, int]:
        """Frames read and decoded, by the process's last summary line."""
        found = pattern.findall(self.stderr)
        if not found:
            raise RuntimeError(f"no summary line in: {self.stderr[-300:]}")
        read, decoded = (int(n.replace(",", "")) for n in found[-1])
        return read, decoded


def agent_config(
    folder: Path, log: Path, url: str, pace: str, fsync: str | None = "batch", tag: str = ""
) -> Path:
    """The agent's config replaying `log`'s two RAV4 buses; `tag` keeps the config and the
    state of one variant apart from another's."""
    _, dbcs, _ = LOGS["rav4"]
    buses = "".join(
        f'[[bus]]\nname = "{bus}"\nsource = "replay"\npath = "{log}"\npace = {pace}\n'
        f'dbc = ["{paths[0]}"]\n'
        for bus, paths in dbcs.items()
    )
    tag = tag or f"{pace.strip(chr(34))}-{fsync or 'before-spool'}"
    spool = f'[spool]\nfsync = "{fsync}"\n' if fsync else ""
    config = folder / f"agent-{tag}.toml"
    config.write_text(
        f'vehicle_id = "bench"\nstate_dir = "{folder / ("state-" + tag)}"\n{buses}'
        f'[uplink]\nkind = "mqtt"\nurl = "{url}"\n{spool}[metrics]\nlisten = ""\n'
    )
    return config


def unpack(commit: str, folder: Path) -> Path | None:
    """The agent package of `commit`, unpacked in `folder` (None without git history)."""
    target = folder / f"agent-{commit}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "agent", "dbc"],
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


def run_measured(command: list[str], cwd: Path | None = None) -> Run:
    """Wall seconds, CPU seconds, peak RSS (MB) and stderr of a child process (`python -m
    agent` in `cwd` runs the agent package found there)."""
    with tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=cwd)
        peak = 0.0
        while True:
            with contextlib.suppress(OSError):
                peak = max(peak, peak_rss_mb(process.pid))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - started
        stderr.seek(0)
        text = stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{command} failed: {text[-500:]}")
    return Run(wall, usage.ru_utime + usage.ru_stime, peak, text)


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


PER_FRAME = "per-frame baseline (python-can reader, cantools, protobuf per frame, paho publish)"
BATCHED = (
    "batched baseline (python-can reader, cantools, 1 s batches in the agent's protobuf, "
    "zstd, paho publish)"
)


def run() -> Report:
    log, _, _ = LOGS["rav4"]
    with tempfile.TemporaryDirectory() as name, broker(Path(name)) as mqtt:
        folder = Path(name)
        unpacked = {v.commit: unpack(v.commit, folder) for v in VARIANTS if v.commit}
        variants = [v for v in VARIANTS if v.commit is None or unpacked[v.commit] is not None]
        logs = {c: log if c == 1 else big_log(log, c, folder) for c in {*COPIES, *BASELINE_COPIES}}
        frames = {c: count_frames(path) for c, path in logs.items()}
        # (contender, copies, command, cwd, summary line); each round runs them all in turn.
        jobs: list[tuple[str, int, list[str], Path | None, re.Pattern[str] | None]] = []
        for copies in COPIES:
            for k, variant in enumerate(variants):
                config = agent_config(
                    folder, logs[copies], mqtt.url, '"max"', variant.fsync, f"v{k}-x{copies}"
                )
                command = [sys.executable, "-m", "agent", "run", "--config", str(config)]
                cwd = unpacked[variant.commit] if variant.commit else None
                # Older agents' status lines may differ: only today's are checked.
                summary = None if variant.commit else AGENT_SUMMARY
                jobs.append((variant.name, copies, command, cwd, summary))
        for copies in BASELINE_COPIES:
            for contender, module in (
                (PER_FRAME, "baseline_pipeline"),
                (BATCHED, "baseline_batched"),
            ):
                command = [sys.executable, "-m", f"bench.{module}", str(logs[copies]), mqtt.url]
                jobs.append((contender, copies, command, None, BASELINE_SUMMARY))
        runs: dict[str, dict[int, list[Run]]] = {}
        decoded: dict[tuple[str, int], int] = {}
        for _ in range(ROUNDS):
            for contender, copies, command, cwd, summary in jobs:
                done = run_measured(command, cwd)
                runs.setdefault(contender, {}).setdefault(copies, []).append(done)
                if summary is not None:
                    read, decoded[contender, copies] = done.counts(summary)
                    if summary is BASELINE_SUMMARY and read != frames[copies]:
                        raise RuntimeError(f"{contender} read {read:,} of {frames[copies]:,}")
        share, realtime_rss = realtime(agent_config(folder, log, mqtt.url, '"realtime"'))
    # Same work: every contender decoded as many frames per copy of the log.
    per_copy = {count // copies for (_, copies), count in decoded.items()}
    if len(per_copy) != 1 or any(n % c for (_, c), n in decoded.items()):
        raise RuntimeError(f"the contenders decoded different frames: {decoded}")

    def best(contender: str, copies: int) -> Run:
        return min(runs[contender][copies], key=lambda r: r.cpu)

    def steady(contender: str, pair: tuple[int, int]) -> float:
        """CPU seconds per log frame between the best runs on the two logs."""
        short, long = pair
        return (best(contender, long).cpu - best(contender, short).cpu) / (
            frames[long] - frames[short]
        )

    rows: list[list[object]] = []
    contenders = [(v.name, COPIES) for v in variants]
    contenders += [(PER_FRAME, BASELINE_COPIES), (BATCHED, BASELINE_COPIES)]
    steady_of: dict[str, float] = {}
    for contender, pair in contenders:
        label = f"agent ({contender})" if contender not in (PER_FRAME, BATCHED) else contender
        for copies in pair:
            done = best(contender, copies)
            rows.append(
                [
                    f"{label}, RAV4 log x{copies}, start-up included",
                    f"{frames[copies]:,}",
                    f"{frames[copies] / done.wall / 1e3:,.0f} k",
                    f"{done.cpu / frames[copies] * 1e6:.2f} us",
                    f"{done.rss_mb:.0f} MB",
                ]
            )
        steady_of[contender] = per_frame = steady(contender, pair)
        rows.append(
            [
                f"{label}, steady (the difference of the two runs)",
                f"{frames[pair[1]] - frames[pair[0]]:,}",
                f"{1 / per_frame / 1e3:,.0f} k per core",
                f"{per_frame * 1e6:.2f} us",
                "-",
            ]
        )
    out = table(["run", "log frames", "frames/s (wall)", "CPU per frame", "peak RSS"], rows)
    ours = steady_of[variants[0].name]
    ratios = {b: steady_of[b] / ours for b in (PER_FRAME, BATCHED)}
    out += (
        "\n\nAgent (today, the default fsync) against the baselines, steady CPU per log frame:\n\n"
    )
    out += table(
        ["contender", "CPU per log frame", "agent's CPU is x less"],
        [
            [f"agent ({variants[0].name})", f"{ours * 1e6:.2f} us", "-"],
            *[[b, f"{steady_of[b] * 1e6:.2f} us", f"{ratios[b]:.1f}"] for b in ratios],
        ],
    )
    # The spool's cost: the longest runs' CPU, whose start-up is alike within each pair and a
    # small share; medians and best of the rounds, as single runs move by 10% and more here.
    longest = COPIES[-1]
    present = {v.commit: v for v in variants}
    pairs = [(variants[0], variants[1], "what fsync costs (today's agent)")]
    if SPOOL_BUILT in present and BEFORE_SPOOL in present:
        pairs.append(
            (present[SPOOL_BUILT], present[BEFORE_SPOOL], "what the spool costs (issue 4)")
        )
    if BEFORE_SPLIT in present:
        pairs.append((variants[0], present[BEFORE_SPLIT], "what the split costs (issue 17)"))
    compared: list[list[object]] = []
    spool_cost: tuple[float, float] | None = None
    split_cost: tuple[float, float] | None = None
    for first, second, what in pairs:
        cpu = [[r.cpu for r in runs[v.name][longest]] for v in (first, second)]
        median = statistics.median(cpu[0]) / statistics.median(cpu[1]) - 1
        least = min(cpu[0]) / min(cpu[1]) - 1
        compared.append(
            [f"{first.name} against {second.name}", what, f"{median:+.1%}", f"{least:+.1%}"]
        )
        if first.commit == SPOOL_BUILT:
            spool_cost = (median, least)
        elif second.commit == BEFORE_SPLIT:
            split_cost = (median, least)
    out += f"\n\nAgents compared, CPU of the RAV4 log x{longest} runs ({ROUNDS} rounds):\n\n"
    out += table(["agents", "measures", "CPU, medians", "CPU, best rounds"], compared) + "\n\n"
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
    wire = wire_bytes()
    out += "\n\n" + table(
        [
            "log",
            "decoded frames",
            "signals/frame",
            "candump text bytes/frame",
            "body bytes/frame (before zstd)",
            "wire bytes/frame",
        ],
        wire,
    )
    rav4_wire = float(str(next(row for row in wire if row[0] == "rav4")[5]))
    measured = [
        Measured(
            f"agent: {TARGET_RATE:,} frames/s on one core",
            3,
            f"{1 / ours / 1e3:,.0f} k frames/s per core, steady",
            1 / ours >= TARGET_RATE,
        ),
        Measured(
            f"agent: {TARGET_RATIO} x the per-frame baseline",
            3,
            f"{ratios[PER_FRAME]:.0f} x the per-frame baseline; "
            f"{ratios[BATCHED]:.1f} x a batched baseline (not the target's)",
            ratios[PER_FRAME] >= TARGET_RATIO,
        ),
        Measured(
            f"agent at realtime: under {TARGET_SHARE:.0%} of a core and {TARGET_RSS_MB} MB",
            3,
            f"{share:.1%}, {realtime_rss:.0f} MB",
            share < TARGET_SHARE and realtime_rss < TARGET_RSS_MB,
        ),
        Measured(
            f"wire: {TARGET_WIRE} bytes per frame on the RAV4 log",
            3,
            f"{rav4_wire:.2f}",
            rav4_wire <= TARGET_WIRE,
        ),
    ]
    if spool_cost is not None:
        median, least = spool_cost
        measured.append(
            Measured(
                f'spool: under {TARGET_SPOOL:.0%} of the throughput with fsync = "batch"',
                4,
                f"{median:+.1%} CPU (medians), {least:+.1%} (best rounds): {SPOOL_BUILT} "
                f"against {BEFORE_SPOOL[:7]}",
                max(median, least) < TARGET_SPOOL,
            )
        )
    if split_cost is not None:
        median, least = split_cost
        measured.append(
            Measured(
                "one job per module: the agent no slower than before the split",
                17,
                f"{median:+.1%} CPU (medians), {least:+.1%} (best rounds): today against "
                f"{BEFORE_SPLIT}",
                max(median, least) <= NOISE,
            )
        )
    return Report(out, measured)


if __name__ == "__main__":
    print(run())
