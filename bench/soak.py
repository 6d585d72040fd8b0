"""`make soak`: the agent under random kills, for minutes, over a real mosquitto.

The RAV4 log is replayed in a loop (both buses, `pace` times realtime) into a local
mosquitto that keeps its sessions on disk, and a receiver with a persistent session writes
what arrives. At random moments (a seeded RNG) the broker or the agent is killed with
SIGKILL and started again after a short pause: the agent on the same config and state_dir, so
its spool carries the unacknowledged batches over and its stream's sequence numbers go on.
At the end the agent is stopped with SIGTERM, run once more on an empty log to drain its
spool, and the receiver's batch log (`--batches`) is checked against what the agent built.

Frames sent are the frames in closed batches: `frames_decoded_total` of the agent's metrics,
scraped every half second and once more just before each kill, plus the batches that closed
between that last scrape and the kill (read back from the spool, where every batch of a run
is on disk until the next start), plus the final run's status line. The open batches at an
agent kill are lost by design and counted apart. Each restart replays the log from its
start, so what arrived is compared with what was sent, batch by batch (sequence numbers run
on from 1 across the restarts), not with `decode`.

    .venv/bin/python -m bench.soak [--seconds 600] [--seed 1] [--pace 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from bench.common import table
from harness import REPO
from harness.data import RAV4_ADAS_DBC, RAV4_LOG, RAV4_PT_DBC
from harness.outputs import scrape_metrics, spooled_frames
from harness.services import Broker, ReceiverProcess, agent_command, free_port, persistent_settings

PREFIX = "telemetry_agent_"
#: How often the agent's metrics are scraped.
SCRAPE_S = 0.5
#: Seconds between two kills, and the pauses before the broker and the agent come back.
KILL_EVERY_S = (10.0, 40.0)
BROKER_PAUSE_S = (0.5, 5.0)
AGENT_PAUSE_S = (0.0, 2.0)
#: At the end: how long the stopped agent and the draining agent may take.
STOP_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 180.0
#: A missing batch counts as lost at a kill when the kill fell between the arrival of the
#: batch before it and the batch after it (widened by this much on both sides).
KILL_MARGIN_S = 2.0
STATUS_LINE = re.compile(r"([\d,]+) decoded, [\d,]+ unknown; ([\d,]+) batches,")
DROPPED = re.compile(r"([\d,]+) dropped \((\w+)\)")
DAMAGED = re.compile(r"(\d+) torn and (\d+) corrupt records")


def progress(started: float, message: str) -> None:
    print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)


def number(text: str) -> int:
    return int(text.replace(",", ""))


def scrape(port: int) -> dict[str, float] | None:
    """The agent's metrics without their prefix, or None when it does not answer."""
    try:
        metrics = scrape_metrics(port, timeout=2)
    except OSError:
        return None
    return {name.removeprefix(PREFIX): value for name, value in metrics.items()}


def total(metrics: dict[str, float], name: str) -> int:
    """A counter summed over its labels."""
    return int(sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{")))


def by_label(metrics: dict[str, float], name: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for key, value in metrics.items():
        match = re.fullmatch(re.escape(name) + r'\{\w+="([^"]*)"\}', key)
        if match and value:
            found[match[1]] += int(value)
    return found


def agent_config(folder: Path, broker: Broker, metrics_port: int, pace: float, log: Path) -> str:
    buses = "".join(
        f'[[bus]]\nname = "{bus}"\nsource = "replay"\npath = "{log}"\npace = {pace}\n'
        f'loop = true\ndbc = ["{dbc}"]\n'
        for bus, dbc in (("can0", RAV4_PT_DBC), ("can1", RAV4_ADAS_DBC))
    )
    return (
        f'vehicle_id = "soak"\nstate_dir = "{folder / "state"}"\n{buses}'
        f"[batch]\nmax_age_ms = 1000\n"
        f'[uplink]\nkind = "mqtt"\nurl = "{broker.url}"\ndrain_timeout_s = 120\n'
        f'[spool]\nfsync = "batch"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    )


@dataclass
class AgentRun:
    """One `telemetry-agent run`, its stderr in the work folder, and what it counted."""

    index: int
    config: Path
    folder: Path
    process: subprocess.Popen[str] = field(init=False)
    stderr: IO[str] = field(init=False)
    started: float = field(default_factory=time.monotonic)
    last: dict[str, float] = field(default_factory=dict)  # the last scrape
    ended: str = ""  # killed, stopped, drained, exited
    code: int | None = None
    decoded: int = 0  # frames in closed batches
    batches: int = 0
    extra_batches: int = 0  # closed after the last scrape, found in the spool
    extra_frames: int = 0
    open_frames: int = 0  # read, not in a closed batch at a kill

    def __post_init__(self) -> None:
        self.stderr_path = self.folder / f"agent-{self.index:03d}.stderr"
        self.stderr = open(self.stderr_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            agent_command("run", "--config", self.config),
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            text=True,
            cwd=REPO,
        )

    def scrape(self, port: int) -> None:
        found = scrape(port)
        if found is not None:
            self.last = found

    def wait(self, timeout: float) -> int:
        try:
            self.code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.stderr.close()
        return self.code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait(10)

    def text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def from_status_line(self) -> None:
        """Frames and batches from the last status line (printed at a clean end)."""
        found = STATUS_LINE.findall(self.text())
        if found:
            self.decoded, self.batches = number(found[-1][0]), number(found[-1][1])

    def dropped(self) -> Counter[str]:
        """Batches the spool dropped, by reason: from the last scrape after a kill, from the
        last status line after a clean end."""
        if self.ended == "killed":
            return by_label(self.last, "spool_dropped_batches_total")
        lines = [line for line in self.text().splitlines() if " batches, " in line]
        return Counter({why: number(n) for n, why in DROPPED.findall(lines[-1])} if lines else {})


@dataclass
class Arrivals:
    """The receiver's --batches log, read as it grows: each batch's first arrival time."""

    path: Path
    lines: list[tuple[float, dict[str, object]]] = field(default_factory=list)
    _partial: str = ""
    _offset: int = 0

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as handle:
            handle.seek(self._offset)
            chunk = handle.read()
            self._offset = handle.tell()
        now = time.monotonic()
        text = self._partial + chunk
        *complete, self._partial = text.split("\n")
        self.lines.extend((now, json.loads(line)) for line in complete if line)


@dataclass
class Streams:
    """What arrived, per stream: first arrivals, duplicates, order."""

    first: dict[str, dict[int, tuple[float, int]]] = field(default_factory=dict)
    duplicates: int = 0
    out_of_order: int = 0

    @classmethod
    def of(cls, arrivals: Arrivals) -> Streams:
        streams = cls()
        highest: dict[str, int] = {}
        for at, line in arrivals.lines:
            stream, sequence = str(line["stream"]), int(str(line["sequence"]))
            if line.get("duplicate"):
                streams.duplicates += 1
                continue
            seen = streams.first.setdefault(stream, {})
            if sequence in seen:  # the receiver's own check failed
                streams.duplicates += 1
                continue
            if sequence < highest.get(stream, 0):
                streams.out_of_order += 1
            highest[stream] = max(highest.get(stream, 0), sequence)
            seen[sequence] = (at, int(str(line["frames"])))
        return streams


@dataclass
class Soak:
    seconds: float
    seed: int
    pace: float
    folder: Path
    rng: random.Random = field(init=False)
    broker: Broker = field(init=False)
    receiver: ReceiverProcess | None = None
    agent: AgentRun | None = None
    runs: list[AgentRun] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, "broker"/"agent")
    spool_frames: dict[int, int] = field(default_factory=dict)  # every batch seen on disk
    numbered: int = 0  # batches accounted for so far: the highest sequence sent
    anomalies: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # the receiver's last words
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.broker = Broker(free_port(), self.folder, persistent_settings(self.folder))
        self.metrics_port = free_port()
        self.config = self.folder / "agent.toml"
        self.config.write_text(
            agent_config(self.folder, self.broker, self.metrics_port, self.pace, RAV4_LOG)
        )
        empty = self.folder / "empty.log"
        empty.write_text("")
        self.drain_config = self.folder / "drain.toml"
        self.drain_config.write_text(
            agent_config(self.folder, self.broker, self.metrics_port, self.pace, empty)
        )
        self.arrivals = Arrivals(self.folder / "received.batches")

    def say(self, message: str) -> None:
        progress(self.started, message)

    def start_agent(self, config: Path | None = None) -> AgentRun:
        self.agent = AgentRun(len(self.runs) + 1, config or self.config, self.folder)
        self.runs.append(self.agent)
        return self.agent

    def account(self, run: AgentRun) -> None:
        """After a run ended: its batches, and those it closed after its last scrape (on
        disk in its spool, numbered beyond what the scrapes account for)."""
        if run.ended == "killed":
            run.decoded = total(run.last, "frames_decoded_total")
            run.batches = total(run.last, "batches_built_total")
            read = total(run.last, "frames_received_total")
            counted = sum(
                total(run.last, name)
                for name in ("frames_decoded_total", "frames_unknown_total", "error_frames_total")
            )
            run.open_frames = read - counted
        else:
            run.from_status_line()
        on_disk = spooled_frames(self.folder / "state" / "spool")
        self.spool_frames.update(on_disk)
        self.numbered += run.batches
        extra = sorted(s for s in on_disk if s > self.numbered)
        run.extra_batches = len(extra)
        run.extra_frames = sum(on_disk[s] for s in extra)
        run.open_frames = max(0, run.open_frames - run.extra_frames)
        if extra:
            self.numbered = extra[-1]

    def kill_agent(self) -> None:
        run = self.agent
        assert run is not None
        run.scrape(self.metrics_port)  # the last look before the kill
        run.kill()
        run.ended = "killed"
        self.events.append((time.monotonic(), "agent"))
        self.account(run)
        self.agent = None
        self.say(
            f"agent run {run.index} killed: {run.decoded:,} frames in {run.batches:,} closed "
            f"batches (+{run.extra_batches} after the last scrape), about {run.open_frames:,} "
            f"frames read and not yet in a closed batch"
        )

    def run(self) -> None:
        self.broker.start()
        self.receiver = ReceiverProcess(
            self.folder / "received.jsonl",
            "--mqtt",
            self.broker.url,
            "--session",
            "soak-receiver",
            "--batches",
            self.arrivals.path,
        )
        self.receiver.wait_ready("subscribed to")
        time.sleep(1.5)  # mosquitto's autosave has the receiver's session on disk
        self.started = time.monotonic()
        self.say(
            f"broker {self.broker.url}, agent metrics on 127.0.0.1:{self.metrics_port}, "
            f"work folder {self.folder}, seed {self.seed}, pace {self.pace}"
        )
        self.start_agent()
        deadline = self.started + self.seconds
        next_kill = self.started + self.rng.uniform(*KILL_EVERY_S)
        next_scrape = 0.0
        broker_back: float | None = None
        agent_back: float | None = None
        while time.monotonic() < deadline:
            now = time.monotonic()
            if broker_back is not None and now >= broker_back:
                self.broker.start()
                broker_back = None
                self.say("broker restarted")
            if agent_back is not None and now >= agent_back:
                self.start_agent()
                agent_back = None
                self.say(f"agent run {len(self.runs)} started")
            if now >= next_kill and broker_back is None and agent_back is None:
                if self.rng.random() < 0.5:
                    self.broker.stop()  # SIGKILL
                    self.events.append((time.monotonic(), "broker"))
                    pause = self.rng.uniform(*BROKER_PAUSE_S)
                    broker_back = time.monotonic() + pause
                    self.say(f"broker killed, back in {pause:.1f} s")
                else:
                    self.kill_agent()
                    agent_back = time.monotonic() + self.rng.uniform(*AGENT_PAUSE_S)
                next_kill = time.monotonic() + self.rng.uniform(*KILL_EVERY_S)
            self.check_alive()
            if self.agent is not None and now >= next_scrape:
                self.agent.scrape(self.metrics_port)
                next_scrape = now + SCRAPE_S
            self.arrivals.poll()
            time.sleep(0.1)
        self.finish(broker_back is not None)

    def check_alive(self) -> None:
        """Nothing should end on its own: say so, and start it again."""
        if self.agent is not None and self.agent.process.poll() is not None:
            run = self.agent
            run.wait(1)
            run.ended = "exited"
            self.account(run)
            self.anomalies.append(
                f"agent run {run.index} exited on its own with {run.code}: {run.stderr_path}"
            )
            self.say(self.anomalies[-1])
            self.start_agent()
        if self.broker.process is not None and self.broker.process.poll() is not None:
            self.anomalies.append(f"mosquitto exited on its own: {self.folder}/mosquitto.log")
            self.broker.process = None
            self.broker.start()
        if self.receiver is not None and self.receiver.process.poll() is not None:
            raise RuntimeError(f"the receiver exited: {self.receiver.stderr_path.read_text()}")

    def finish(self, broker_down: bool) -> None:
        """Broker up, agent stopped with SIGTERM, its spool drained by one more run on an
        empty log, the receiver stopped once quiet."""
        if broker_down:
            self.broker.start()
            self.say("broker restarted")
        if self.agent is None:
            self.start_agent()
            time.sleep(3)
        run = self.agent
        assert run is not None
        run.scrape(self.metrics_port)
        run.process.terminate()
        run.wait(STOP_TIMEOUT_S)
        run.ended = "stopped"
        self.account(run)
        self.say(f"agent run {run.index} stopped (exit {run.code}): {run.decoded:,} frames")
        if run.code != 0:
            self.anomalies.append(f"agent run {run.index}: exit {run.code} after SIGTERM")
        drain = self.start_agent(self.drain_config)
        drain.wait(DRAIN_TIMEOUT_S)
        drain.ended = "drained"
        self.account(drain)
        self.agent = None
        self.say(f"agent run {drain.index} drained the spool (exit {drain.code})")
        if drain.code != 0:
            self.anomalies.append(f"agent run {drain.index} (drain): exit {drain.code}")
        assert self.receiver is not None
        self.receiver.interrupt_once_quiet(quiet_s=3, timeout=120)
        self.summary = self.receiver.finish().strip().splitlines()
        self.arrivals.poll()

    def stop_all(self) -> None:
        if self.agent is not None and self.agent.process.poll() is None:
            self.agent.kill()
        if self.receiver is not None and self.receiver.process.poll() is None:
            self.receiver.process.kill()
            self.receiver.process.wait()
        self.broker.stop()

    def report(self) -> str:
        streams = Streams.of(self.arrivals)
        if len(streams.first) != 1:
            self.anomalies.append(f"{len(streams.first)} streams arrived, expected 1")
        received = {s: f for one in streams.first.values() for s, f in one.items()}
        frames_received = sum(frames for _, frames in received.values())
        sent = sum(r.decoded + r.extra_frames for r in self.runs)
        highest = max(received, default=0)
        numbered = max(self.numbered, highest)
        missing = sorted(set(range(1, numbered + 1)) - set(received))
        dropped: Counter[str] = Counter()
        for run in self.runs:
            dropped.update(run.dropped())
        damaged = [0, 0]
        errors: Counter[str] = Counter()
        tracebacks = []
        for run in self.runs:
            text = run.text()
            for torn, corrupt in DAMAGED.findall(text):
                damaged[0] += int(torn)
                damaged[1] += int(corrupt)
            if "Traceback" in text:
                tracebacks.append(str(run.stderr_path))
            for line in text.splitlines():
                if ": ERROR: " in line:
                    errors[re.sub(r"\d+", "N", line)] += 1
        if self.receiver is not None and "Traceback" in self.receiver.stderr_path.read_text():
            tracebacks.append(str(self.receiver.stderr_path))
        if tracebacks:
            self.anomalies.append(f"tracebacks in {', '.join(tracebacks)}")
        for line, count in errors.items():
            self.anomalies.append(f"{count} x {line}")
        if highest > self.numbered:
            self.anomalies.append(
                f"sequence {highest} arrived, the agent accounted for {self.numbered} batches"
            )
        at_kill = self.classify(missing, received)
        unexplained = at_kill["none"] - min(at_kill["none"], sum(dropped.values()))
        if unexplained:
            self.anomalies.append(
                f"{unexplained} batches missing that no kill or counted drop explains: "
                f"{[s for s in missing if self.cause(s, received) == 'none'][:20]}"
            )
        if sent - frames_received and not missing:
            self.anomalies.append(
                f"{sent - frames_received:,} frames sent and not received, no batch missing"
            )
        missing_frames = [self.spool_frames[s] for s in missing if s in self.spool_frames]
        killed = [r for r in self.runs if r.ended == "killed"]
        receiver_line = next((x for x in self.summary if "batches received" in x), "")
        rows: list[list[object]] = [
            ["duration", f"{self.seconds:.0f} s of replay at {self.pace:g} x realtime"],
            ["seed", self.seed],
            [
                "kills",
                f"{len(killed)} of the agent, "
                f"{sum(1 for _, kind in self.events if kind == 'broker')} of the broker (SIGKILL)",
            ],
            ["agent runs", f"{len(self.runs)} (the last one drains the spool on an empty log)"],
            ["batches sent (numbered)", f"{numbered:,}"],
            [
                "frames sent (in closed batches)",
                f"{sent:,} ({sum(r.extra_frames for r in self.runs):,} of them in "
                f"{sum(r.extra_batches for r in self.runs)} batches closed after the last "
                "scrape before a kill)",
            ],
            ["batches received after deduplication", f"{len(received):,}"],
            ["frames received after deduplication", f"{frames_received:,}"],
            [
                "frames lost (sent - received)",
                f"{sent - frames_received:,} in {len(missing)} missing batches"
                + (f" ({sum(missing_frames):,} frames known from the spool)" if missing else ""),
            ],
            [
                "missing batches by cause",
                f"{at_kill['broker']} at a broker kill, {at_kill['agent']} at an agent kill, "
                f"{at_kill['none']} at neither",
            ],
            [
                "drops the agent counted",
                ", ".join(f"{n} ({why})" for why, n in sorted(dropped.items())) or "0",
            ],
            ["damaged spool records at restarts", f"{damaged[0]} torn, {damaged[1]} corrupt"],
            [
                "lost at agent kills (open batches, expected)",
                f"about {sum(r.open_frames for r in killed):,} frames read and not yet in a "
                "closed batch (not counted as sent)",
            ],
            ["duplicates dropped by the receiver", f"{streams.duplicates:,}"],
            ["batches out of order (first arrival below an earlier one)", streams.out_of_order],
            ["receiver", receiver_line],
            [
                "agent exits",
                ", ".join(f"run {r.index} {r.ended} {r.code}" for r in self.runs[-2:]),
            ],
        ]
        out = table(["", "soak"], rows)
        out += "\n\nAnomalies: " + ("; ".join(self.anomalies) if self.anomalies else "none")
        return out

    def cause(self, sequence: int, received: dict[int, tuple[float, int]]) -> str:
        """The kill that falls between the arrivals of the batches around a missing one."""
        before = [received[s][0] for s in received if s < sequence]
        after = [received[s][0] for s in received if s > sequence]
        low = (max(before) if before else self.started) - KILL_MARGIN_S
        high = (min(after) if after else time.monotonic()) + KILL_MARGIN_S
        kinds = {kind for at, kind in self.events if low <= at <= high}
        return "broker" if "broker" in kinds else "agent" if "agent" in kinds else "none"

    def classify(self, missing: list[int], received: dict[int, tuple[float, int]]) -> Counter[str]:
        causes: Counter[str] = Counter({"broker": 0, "agent": 0, "none": 0})
        for sequence in missing:
            causes[self.cause(sequence, received)] += 1
        return causes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description="The agent under random kills, for minutes."
    )
    parser.add_argument("--seconds", type=float, default=600.0, help="replay time (600)")
    parser.add_argument("--seed", type=int, default=1, help="the kills' random seed (1)")
    parser.add_argument("--pace", type=float, default=8.0, help="replay speed factor (8)")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work folder (kept without the records when something is wrong)",
    )
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Also where SIGINT came ignored (a background job): Ctrl-C and SIGTERM stop the soak
    # and everything it started.
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(args.seconds, args.seed, args.pace, folder)
    stopped = False
    try:
        soak.run()
    except KeyboardInterrupt:
        stopped = True
    except BaseException:
        print(f"\nWork folder kept: {folder}", file=sys.stderr)
        raise
    finally:
        soak.stop_all()
    if not stopped:
        print(soak.report(), flush=True)
    if args.keep or soak.anomalies or stopped:
        if not args.keep:
            # Gigabytes of records; the batch log and the stderr files say what happened.
            (folder / "received.jsonl").unlink(missing_ok=True)
        print(f"\n{'Interrupted; w' if stopped else 'W'}ork folder kept: {folder}", file=sys.stderr)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    if stopped:
        return 130
    return 1 if soak.anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
