"""A fleet on one broker: many agents (the real `Agent`, several per process, each with a
simulated bus and a file uplink), one campaign pushed to their group, and the time
until every vehicle's check-in says it is active; then, for each vehicle, the time from the
campaign's arrival there (and from the push) until the first record of the campaign's rules
reaches the cloud side; then that nothing was lost meanwhile.

`python -m bench.campaigns [--agents 60] [--processes 2] [--max-age-ms N] [--pace F]`; `make
bench` runs it as a section. The buses run at real time (`--pace 1`): a sample rule sends a
period once the bus's time has passed it, so a bus in slow motion (`--pace 0.2`, a fifth of
real time) holds each 100 ms period of the campaign's rule for half a second.
The baseline in the same run is the fleet's first check-ins: the time from the agents'
start until every one has checked in, which is the broker's and the agents' own pace.

"Reaches the cloud side": the agents' uplink is a folder of batch files, which the receiver
reads as it reads any such folder (`accept_files`); the campaign's first record arrives when
the batch file holding it appears (the file's ctime, set by the rename that makes it
visible). The campaign arrives at the vehicle when the vehicle accepts it: the `since` of
its first check-in that says active (a signature check after the MQTT message came). Its
rules take the batch open at that moment, so its first records come when that batch closes:
the push waits until every vehicle has sent its first batch, which leaves each a young batch
open, near the worst case of a whole `max_age_ms`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.campaigns.link import checkin_topic
from agent.campaigns.manager import SEPARATOR
from agent.cloud.parser import ReceivedBatch
from agent.cloud.receiver import Receiver, accept_files
from agent.cloud.sinks.base import Sink
from agent.config import BatchConfig, demo_dbc, parse_config
from agent.wire.transport import batch_file_name
from bench.common import Measured, Report, table
from harness.campaigns import campaign_of, client, signed, state_is, to_group
from harness.services import broker

GROUP = "fleet"
CAMPAIGN = "fleet-speed"
#: The target of issue 18: every vehicle reports the campaign active within this.
GOAL_S = 5.0
#: The target of issue 18: the campaign's records at the receiver within this of arriving.
RECORDS_GOAL_S = 1.0


def vehicle_config(
    folder: Path,
    vehicle: str,
    broker_url: str,
    key: str,
    max_age_ms: int | None = None,
    pace: float = 1.0,
) -> str:
    """A light agent: the demo DBC simulated at `pace` (a speed factor), batches into files
    (closed at `max_age_ms`, or the agent's default), a small spool kept off the disk's
    fsyncs, one rule of its own file."""
    batch = "" if max_age_ms is None else f"[batch]\nmax_age_ms = {max_age_ms}\n"
    return (
        f'vehicle_id = "{vehicle}"\nstate_dir = "{folder / vehicle}"\n'
        f'status_interval_s = 3600\nlog_level = "warning"\n'
        f'[[bus]]\nname = "can0"\nsource = "simulate"\npace = {pace}\ndbc = ["{demo_dbc()}"]\n'
        f'[uplink]\nkind = "file"\nurl = "{folder / vehicle / "outbox"}"\n'
        '[spool]\nmax_bytes = 4194304\nmemory_bytes = 1048576\nfsync = "never"\n'
        f'{batch}[metrics]\nlisten = ""\n'
        f'[campaigns]\nkeys = ["{key}"]\ngroups = ["{GROUP}"]\nurl = "{broker_url}"\n'
        '[[collect]]\nname = "odometer"\nmode = "sample"\nsignals = ["Odometer"]\n'
        "period_ms = 1000\n"
    )


async def run_agents(configs: list[str], folder: Path, stop: asyncio.Event) -> list[dict[str, Any]]:
    """Agents of these configs in this event loop until `stop`; what each counted."""
    from agent.service import Agent

    agents = [Agent(parse_config(text, "fleet", folder), status=None) for text in configs]
    runs = [asyncio.create_task(agent.run()) for agent in agents]
    await stop.wait()
    for agent in agents:
        agent.stop()
    codes = await asyncio.gather(*runs)
    results = []
    for agent, code in zip(agents, codes, strict=True):
        registry = agent.metrics.registry
        outbox = Path(agent.config.uplink.url)
        results.append(
            {
                "vehicle": agent.config.vehicle_id,
                "exit": code,
                "frames_read": int(
                    registry.get_sample_value(
                        "telemetry_agent_frames_received_total", {"bus": "can0"}
                    )
                    or 0
                ),
                "frames_through": agent.totals.frames,
                "batches": agent.totals.batches,
                "delivered": len(list(outbox.glob("*.batch"))),
                "dropped": sum(agent.spool.dropped.values()),
                "collect_errors": registry.get_sample_value("telemetry_agent_collect_errors_total"),
            }
        )
    return results


def worker(args: argparse.Namespace) -> None:
    """A process of agents: runs them until its stdin closes, then prints their counts."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    folder = Path(args.folder)
    configs = [
        vehicle_config(folder, f"v{k:04d}", args.broker, args.key, args.max_age_ms, args.pace)
        for k in range(args.first, args.first + args.count)
    ]

    async def main() -> list[dict[str, Any]]:
        stop = asyncio.Event()
        reading = asyncio.create_task(asyncio.to_thread(sys.stdin.read))
        reading.add_done_callback(lambda _: stop.set())
        return await run_agents(configs, folder, stop)

    print(json.dumps(asyncio.run(main())))


def lost(results: list[dict[str, Any]]) -> list[str]:
    """What each agent lost: frames read but not through the pipeline, batches built but
    not delivered, drops, failed rules, a bad exit."""
    problems = []
    for r in results:
        if r["frames_read"] != r["frames_through"] or not r["frames_read"]:
            problems.append(f"{r['vehicle']}: {r['frames_read']} read, {r['frames_through']} on")
        if r["batches"] != r["delivered"] or r["dropped"] or r["collect_errors"] or r["exit"]:
            problems.append(f"{r['vehicle']}: {r}")
    return problems


@dataclass
class Fleet:
    """What one run of the fleet measured."""

    checked_in: float  # seconds from the agents' start until every one checked in
    active: float  # seconds from the push until every vehicle said the campaign is active
    results: list[dict[str, Any]]  # what each agent counted
    pushed: float  # when the campaign was pushed (time.time())
    arrived: dict[str, float]  # per vehicle: when it accepted the campaign (its clock)
    records: dict[str, float | None]  # per vehicle: when its campaign's first record came


async def push_and_time(
    url: str,
    vehicles: list[str],
    payload: bytes,
    ready: asyncio.Event,
    sending: Callable[[], bool],
    timeout: float = 120,
) -> tuple[float, float, float, dict[str, float]]:
    """(seconds until every vehicle checked in, seconds from the push until every one says
    the campaign is active, when it was pushed, when each vehicle accepted it), watched from
    one subscription taken before the fleet starts (`ready` says when). The push waits for
    `sending` (every vehicle has sent a batch): a campaign that came before an agent's
    first batch would be timed with the agent's start-up."""
    active = state_is(CAMPAIGN, "active")
    seen: set[str] = set()
    arrived: dict[str, float] = {}
    started = time.monotonic()
    pushed = 0.0
    pushed_at = 0.0
    checked_in = 0.0
    async with client(url) as mqtt:
        await mqtt.subscribe(checkin_topic("+"), qos=1)
        ready.set()
        deadline = time.monotonic() + timeout
        while len(arrived) < len(vehicles):
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(anext(mqtt.messages), max(left, 0.01))
            except TimeoutError:
                missing = sorted(set(vehicles) - (set(arrived) if pushed else seen))
                raise TimeoutError(f"{len(missing)} vehicles missing: {missing[:5]}") from None
            checkin = json.loads(bytes(message.payload))
            seen.add(checkin["vehicle"])
            if pushed and active(checkin) and checkin["vehicle"] not in arrived:
                since = (campaign_of(checkin, CAMPAIGN) or {})["since"]
                arrived[checkin["vehicle"]] = dt.datetime.fromisoformat(since).timestamp()
            if not pushed and seen >= set(vehicles):
                checked_in = time.monotonic() - started
                while not sending():
                    if time.monotonic() > deadline:
                        raise TimeoutError("not every vehicle has sent a batch")
                    await asyncio.sleep(0.05)
                pushed, pushed_at = time.monotonic(), time.time()
                await mqtt.publish(to_group(GROUP, CAMPAIGN), payload, qos=1, retain=True)
    return checked_in, time.monotonic() - pushed, pushed_at, arrived


class _Kept(Sink):
    """A receiver's sink that keeps the batches it is handed, to look at once all came."""

    def __init__(self) -> None:
        self.batches: list[ReceivedBatch] = []

    def write(self, batches: Sequence[ReceivedBatch]) -> list[ReceivedBatch]:
        self.batches += batches
        return []


def first_campaign_record(outbox: Path) -> float | None:
    """When the first batch file holding a record of the campaign's rules appeared in a
    vehicle's `outbox` (time.time()), the folder read as the receiver reads it; None when
    no such record came."""
    sink = _Kept()
    receiver = Receiver(sink)
    accept_files(receiver, outbox, set())
    receiver.finish()
    prefix = CAMPAIGN + SEPARATOR
    return min(
        (
            (outbox / batch_file_name(batch.stream_id, batch.sequence)).stat().st_ctime
            for batch in sink.batches
            if any(b.rule.startswith(prefix) for b in batch.blocks)
            or any(r.rule.startswith(prefix) for r in batch.raw)
        ),
        default=None,
    )


def measure(agents: int, processes: int, max_age_ms: int | None = None, pace: float = 1.0) -> Fleet:
    key = Ed25519PrivateKey.generate()
    from agent.campaigns.document import public_key_text

    public = public_key_text(key.public_key())
    vehicles = [f"v{k:04d}" for k in range(agents)]
    age_ms = BatchConfig().max_age_ms if max_age_ms is None else max_age_ms
    with tempfile.TemporaryDirectory(prefix="fleet-") as temp:
        folder = Path(temp)
        (folder / "broker").mkdir()
        with broker(folder / "broker", "allow_anonymous true\nmax_connections -1\n") as mqtt:
            sizes = [agents // processes + (k < agents % processes) for k in range(processes)]
            firsts = [sum(sizes[:k]) for k in range(processes)]

            def sending() -> bool:
                return all(any((folder / v / "outbox").glob("*.batch")) for v in vehicles)

            async def fleet() -> tuple[
                tuple[float, float, float, dict[str, float]], list[subprocess.Popen[str]]
            ]:
                ready = asyncio.Event()
                watch = asyncio.create_task(
                    push_and_time(mqtt.url, vehicles, signed(key, CAMPAIGN), ready, sending)
                )
                await ready.wait()
                workers = [
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bench.campaigns",
                            "--worker",
                            "--folder",
                            temp,
                            "--broker",
                            mqtt.url,
                            "--key",
                            public,
                            "--first",
                            str(first),
                            "--count",
                            str(size),
                        ]
                        + ["--pace", str(pace)]
                        + ([] if max_age_ms is None else ["--max-age-ms", str(max_age_ms)]),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
                    )
                    for first, size in zip(firsts, sizes, strict=True)
                ]
                try:
                    timed = await watch
                    # The campaign's rules at work for a while: twice a batch's max age
                    # after the last vehicle took it, so each has sent a batch of them.
                    await asyncio.sleep(2 * age_ms / 1000)
                except BaseException:
                    for process in workers:
                        process.kill()
                    raise
                return timed, workers

            (checked_in, active, pushed, arrived), workers = asyncio.run(fleet())
            results: list[dict[str, Any]] = []
            for process in workers:
                out, _ = process.communicate(timeout=120)
                results += json.loads(out)
        records = {v: first_campaign_record(folder / v / "outbox") for v in vehicles}
    return Fleet(checked_in, active, results, pushed, arrived, records)


def spread(seconds: list[float]) -> str:
    """Median, p99 and max of a fleet's figures."""
    if not seconds:
        return "none"
    p99 = (
        statistics.quantiles(seconds, n=100, method="inclusive")[98]
        if len(seconds) > 1
        else seconds[0]
    )
    return f"{statistics.median(seconds):.2f} / {p99:.2f} / {max(seconds):.2f} s"


def run(
    agents: int = 60, processes: int = 2, max_age_ms: int | None = None, pace: float = 1.0
) -> Report:
    fleet = measure(agents, processes, max_age_ms, pace)
    checked_in, active = fleet.checked_in, fleet.active
    problems = lost(fleet.results)
    frames = sum(r["frames_read"] for r in fleet.results)
    batches = sum(r["delivered"] for r in fleet.results)
    came = {v: t for v, t in fleet.records.items() if t is not None}
    from_arrival = [t - fleet.arrived[v] for v, t in came.items()]
    from_push = [t - fleet.pushed for t in came.values()]
    late = sum(1 for s in from_arrival if s >= RECORDS_GOAL_S)
    never = len(fleet.records) - len(came)
    met = active < GOAL_S and not problems
    text = table(
        [
            "agents",
            "processes",
            "all checked in after start (baseline)",
            "all active after the push",
            "ratio",
            "frames",
            "batches",
            "lost",
        ],
        [
            [
                agents,
                processes,
                f"{checked_in:.2f} s",
                f"{active:.2f} s",
                f"{active / checked_in:.2f}",
                f"{frames:,}",
                f"{batches:,}",
                "; ".join(problems[:3]) or "nothing",
            ]
        ],
    )
    age_ms = BatchConfig().max_age_ms if max_age_ms is None else max_age_ms
    text += "\n\n" + table(
        [
            f"the campaign's first record at the receiver (batches of {age_ms} ms at most, "
            f"buses at {pace:g} x real time)",
            "median / p99 / max",
            f"vehicles at {RECORDS_GOAL_S:.0f} s or later",
            "vehicles without one",
        ],
        [
            ["after its arrival at the vehicle", spread(from_arrival), late, never],
            ["after the push", spread(from_push), "-", never],
        ],
    )
    figure = f"{active:.2f} s for {agents} agents in {processes} processes; lost: " + (
        "nothing" if not problems else f"{len(problems)} problems"
    )
    measured = Measured(
        f"fleet: a campaign pushed to a group of {agents} agents active everywhere within "
        f"{GOAL_S:.0f} s, nothing lost",
        18,
        figure,
        met,
    )
    records = Measured(
        f"fleet: a campaign's records at the receiver within {RECORDS_GOAL_S:.0f} s of its "
        f"arrival at each of {agents} vehicles",
        18,
        f"median / p99 / max {spread(from_arrival)} with batches of {age_ms} ms, buses at "
        f"{pace:g} x real time; {late} of "
        f"{agents} vehicles at "
        f"{RECORDS_GOAL_S:.0f} s or later, {never} without one",
        not late and not never,
    )
    return Report(text, [measured, records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=60)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-age-ms",
        type=int,
        help="the agents' [batch] max_age_ms (default: the agent's own, "
        f"{BatchConfig().max_age_ms})",
    )
    parser.add_argument(
        "--pace",
        type=float,
        default=1.0,
        help="the simulated buses' speed factor (default 1: real time)",
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(run(args.agents, args.processes, args.max_age_ms, args.pace))


if __name__ == "__main__":
    main()
