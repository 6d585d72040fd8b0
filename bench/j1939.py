"""J1939 transport reassembly and DM1 faults: what they cost a bus without transport traffic,
and what they do on the truck log.

On a bus without TP frames, the decoder as it was before reassembly (commit BEFORE, its
module loaded beside today's) is timed against today's decoder with reassembly on, with
the whole J1939 listener (reassembly, DM1/DM2 frames, decoding what they find), and with the
agent pipeline's group reader (what sends reassembled groups on the wire), on the same
batches with the same repeats. The decoder before is timed twice in each round, and how far
those two timings of the same work differ is the noise the cost is judged against. Two real
logs without transport traffic: the RAV4 log (11-bit IDs) and the truck log with its TP
frames taken out (a J1939 bus between transfers).
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from agent.decode import Decoder
from agent.frames import FrameBatch
from agent.j1939 import J1939Listener, Reassembler
from agent.j1939.groups import GroupReader
from bench.common import LOGS, Measured, Report, read_all, table
from harness import REPO

#: The last commit before issue 19's reassembly: its decoder is "today's" in the issue.
BEFORE = "6d540d9"
BATCH = 10_000
#: Rounds; each times the decoder alone, with reassembly, with the listener, with the agent's
#: group reader, alone again.
ROUNDS = 31
#: Passes over the log per timing: one pass takes a few milliseconds, too short to time.
PASSES = 10


def decoder_before() -> ModuleType:
    """The decoder module of commit BEFORE, beside today's (it imports today's plans)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BEFORE}:agent/decode/decoder.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    spec = importlib.util.spec_from_loader("bench_decoder_before", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{BEFORE}:agent/decode/decoder.py", "exec"), module.__dict__)
    return module


def _decode(decoder: Any, parts: list[FrameBatch]) -> Callable[[], None]:
    def work() -> None:
        for part in parts:
            decoder.decode(part)

    return work


def _decode_and_reassemble(decoder: Decoder, parts: list[FrameBatch]) -> Callable[[], None]:
    def work() -> None:
        reassembler = Reassembler()
        for part in parts:
            reassembler.feed(part, decoder.decode(part).transport)

    return work


def _decode_and_listen(decoder: Decoder, parts: list[FrameBatch]) -> Callable[[], None]:
    def work() -> None:
        listener = J1939Listener(decoder)
        for part in parts:
            listener.listen(part, decoder.decode(part))

    return work


def _decode_and_read_groups(decoder: Decoder, parts: list[FrameBatch]) -> Callable[[], None]:
    """What the agent's pipeline adds to decoding on every batch: its group reader."""

    def work() -> None:
        reader = GroupReader()
        for part in parts:
            reader.read(decoder, "can0", part, decoder.decode(part))

    return work


def _cpu(work: Callable[[], None]) -> float:
    started = time.process_time()
    work()
    return time.process_time() - started


def _without_transport(frames: FrameBatch) -> FrameBatch:
    pf = (frames.can_id >> 16) & 0xFF
    return frames.take(~np.isin(pf, (0xEB, 0xEC)))


def run() -> Report:
    before = decoder_before()
    rows: list[list[object]] = []
    judged: list[tuple[str, float, float]] = []  # log, cost of reassembly, noise
    for name, source in (("RAV4", "rav4"), ("truck without TP frames", "truck")):
        log, dbcs, j1939 = LOGS[source]
        frames = read_all(log)
        if source == "truck":
            frames = _without_transport(frames)
        decoder = Decoder(dbcs, j1939 or ["*"])
        old = before.Decoder(dbcs, j1939 or ["*"])
        parts = [frames.take(slice(i, i + BATCH)) for i in range(0, len(frames), BATCH)] * PASSES
        contenders = [
            _decode(old, parts),
            _decode(decoder, parts),
            _decode_and_reassemble(decoder, parts),
            _decode_and_listen(decoder, parts),
            _decode_and_read_groups(decoder, parts),
            _decode(old, parts),
        ]
        for work in contenders:
            work()  # warm: plans compiled, lookups built
        times: list[list[float]] = [[] for _ in contenders]
        for k in range(ROUNDS):
            # The order turns each round, so that no contender always runs first or last.
            order = list(range(len(contenders)))
            order = order[k % len(order) :] + order[: k % len(order)]
            for slot in order:
                times[slot].append(_cpu(contenders[slot]))
        first, again = times[0], times[-1]
        baseline = [(a + b) / 2 for a, b in zip(first, again, strict=True)]
        noise = statistics.median(abs(b / a - 1) for a, b in zip(first, again, strict=True))
        best_before = min(min(first), min(again))
        labelled = (
            ("today's decoder alone", 1),
            ("today's decoder, reassembly on", 2),
            ("today's decoder, the whole J1939 listener", 3),
            ("today's decoder, the agent's group reader", 4),
        )
        for label, slot in labelled:
            cost = statistics.median(
                t / base - 1 for t, base in zip(times[slot], baseline, strict=True)
            )
            least = min(times[slot]) / best_before - 1
            if slot == 2:
                judged.append((name, cost, noise))
            rows.append(
                [
                    name,
                    label,
                    f"{len(frames):,}",
                    f"{len(frames) * PASSES / best_before / 1e6:.1f} M",
                    f"{len(frames) * PASSES / min(times[slot]) / 1e6:.1f} M",
                    f"{cost:+.1%}",
                    f"{least:+.1%}",
                    f"{noise:.1%}",
                ]
            )
    text = table(
        [
            "log (no transport traffic)",
            f"against the decoder of {BEFORE}",
            "frames",
            f"{BEFORE}, frames/s",
            "this, frames/s",
            "cost (median of rounds)",
            "cost (best rounds)",
            f"noise: {BEFORE} against itself (median)",
        ],
        rows,
    )

    log, dbcs, j1939 = LOGS["truck"]
    truck = read_all(log)
    decoder = Decoder(dbcs, j1939)
    parts = [truck.take(slice(i, i + BATCH)) for i in range(0, len(truck), BATCH)]
    listener = J1939Listener(decoder)
    decoded = [decoder.decode(part) for part in parts]
    for part, result in zip(parts, decoded, strict=True):
        listener.listen(part, result)  # warm, and the counts
    counts, faults = listener.counts, listener.faults

    def listen() -> None:
        fresh = J1939Listener(decoder)
        for part, result in zip(parts, decoded, strict=True):
            fresh.listen(part, result)

    listen_s = min(_cpu(listen) for _ in range(ROUNDS))
    decode_s = min(_cpu(_decode(decoder, parts)) for _ in range(ROUNDS))
    both_s = min(_cpu(_decode_and_listen(decoder, parts)) for _ in range(ROUNDS))
    text += "\n\n" + table(
        [
            "truck log",
            "frames",
            "transfers",
            "fault records",
            "listener alone (given the decoder's rows)",
            "decoder alone",
            "decoder + listener",
        ],
        [
            [
                "batches of 10,000",
                f"{len(truck):,}",
                f"{counts.transfers} ({counts.aborted} aborted, {counts.timed_out} timed out)",
                faults,
                f"{counts.transfers / listen_s:,.0f} transfers/s, "
                f"{len(truck) / listen_s / 1e6:.1f} M frames/s",
                f"{len(truck) / decode_s / 1e6:.2f} M frames/s",
                f"{len(truck) / both_s / 1e6:.2f} M frames/s ({both_s / decode_s - 1:+.1%})",
            ]
        ],
    )
    missed = [name for name, cost, noise in judged if cost > noise]
    measured = Measured(
        "J1939 reassembly on a bus without transport traffic: within noise of decoding alone",
        19,
        ", ".join(f"{name} {cost:+.1%} against {noise:.1%} noise" for name, cost, noise in judged)
        + f" (CPU, medians of {ROUNDS} rounds, batches of {BATCH:,}, against {BEFORE})",
        not missed,
        f"over the noise on {', '.join(missed)}" if missed else "",
    )
    return Report(text, [measured])


if __name__ == "__main__":
    print(run())
