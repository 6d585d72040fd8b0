"""`make fleet-bench`: a fleet of simulated vehicles through one mosquitto into two
receivers of one MQTT 5 share group writing to PostgreSQL.

The batches are the agent's own (one run of the demo DBC's simulated traffic with the file
uplink, a batch a second); each simulated vehicle publishes them in real time over its own
MQTT connection (QoS 1, its schema retained), as the agent would, with its own vehicle id,
stream and sequence numbers, and frame times of now. Several vehicles share a process.
Measured: batches and frames per second per receiver, the latency from a frame's time to
its batch being visible in PostgreSQL (the ledger polled every 50 ms), and the CPU of each
part (publishers, mosquitto, each receiver, PostgreSQL's backends).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as paho
import psycopg
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud.parser import SchemaStore, parse_batch
from agent.wire import telemetry_pb2 as pb
from agent.wire.envelope import read_envelope
from agent.wire.transport import SCHEMA_SUFFIX, SUFFIX
from bench.common import table
from harness import REPO
from harness.services import ReceiverProcess, broker, run_agent

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
TICKS = os.sysconf("SC_CLK_TCK")
#: The target: every batch written, and a frame visible in PostgreSQL within this at p99.
TARGET_P99_S = 5.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def templates(folder: Path) -> Path:
    config = folder / "agent.toml"
    config.write_text(
        f'vehicle_id = "template"\nstate_dir = "{folder}"\n'
        f'[[bus]]\nname = "can0"\nsource = "simulate"\npace = "max"\nduration_s = 20\n'
        f'dbc = ["{REPO / "dbc" / "demo.dbc"}"]\n'
        f'[uplink]\nkind = "file"\nurl = "{folder / "outbox"}"\n[metrics]\nlisten = ""\n'
    )
    result = run_agent(config)
    if result.returncode:
        raise SystemExit(result.stderr)
    return folder / "outbox"


def vehicles(
    port: int, outbox: Path, names: list[str], seconds: float, log: Path, cpu: Path
) -> None:
    """One process: these vehicles, each publishing a batch a second over its own link."""
    schema = next(outbox.glob(f"*{SCHEMA_SUFFIX}"))
    batches = [read_envelope(p.read_bytes()) for p in sorted(outbox.glob(f"*{SUFFIX}"))]
    sent: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def vehicle(name: str, offset: float) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
        client.connect("127.0.0.1", port)
        client.loop_start()
        topic = f"vehicles/{name}/schema/{schema.name.removesuffix(SCHEMA_SUFFIX)}"
        client.publish(topic, schema.read_bytes(), qos=1, retain=True).wait_for_publish(30)
        stream = f"{name}-{uuid.uuid4().hex[:8]}"
        start = time.monotonic() + offset
        sequence = 0
        while time.monotonic() < start + seconds:
            sequence += 1
            due = start + sequence
            time.sleep(max(0.0, due - time.monotonic()))
            batch = pb.Batch()
            batch.CopyFrom(batches[sequence % len(batches)])
            batch.vehicle_id, batch.stream_id, batch.sequence = name, stream, sequence
            # The batch spans the second that just ended.
            batch.first_t_ns = time.time_ns() - 1_000_000_000
            client.publish(f"vehicles/{name}/telemetry", batch.SerializeToString(), qos=1)
            with lock:
                sent.append((stream, sequence, batch.first_t_ns))
        client.loop_stop()
        client.disconnect()

    threads = [
        threading.Thread(target=vehicle, args=(name, k / len(names)))
        for k, name in enumerate(names)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.write_text(json.dumps(sent))
    cpu.write_text(str(sum(os.times()[:2])))


def offsets_ns(outbox: Path) -> dict[int, npt.NDArray[np.int64]]:
    """Each template batch's frame times, relative to its first_t_ns."""
    store = SchemaStore()
    store.add(read_envelope(next(outbox.glob(f"*{SCHEMA_SUFFIX}")).read_bytes()), 1 << 26)
    offsets = {}
    for k, path in enumerate(sorted(outbox.glob(f"*{SUFFIX}"))):
        batch = read_envelope(path.read_bytes())
        received = parse_batch(batch, store)
        offsets[k] = np.concatenate([b.t_ns for b in received.blocks]) - batch.first_t_ns
    return offsets


def run(
    outbox: Path, count: int, per_process: int, seconds: float, receiving: int
) -> tuple[bool, float, float]:
    """The fleet into `receiving` receivers; whether the target is met, the p99 latency,
    and the cloud side's CPU per frame."""
    offsets = offsets_ns(outbox)
    folder = Path(tempfile.mkdtemp(prefix=f"fleet-{receiving}-"))
    schema = f"bench_fleet_{os.getpid()}_{receiving}"
    names = [f"bench-{k:04d}" for k in range(count)]
    with broker(folder) as mqtt:
        receivers = [
            ReceiverProcess(
                folder / f"receiver-{k}.out",
                "--mqtt",
                mqtt.url,
                "--share",
                "fleet",
                "--postgres",
                PG_URL,
                "--postgres-schema",
                schema,
            )
            for k in range(receiving)
        ]
        for receiver in receivers:
            receiver.wait_ready("subscribed to")
        with psycopg.connect(PG_URL, autocommit=True) as connection:
            backends = [
                int(row[0])
                for row in connection.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = 'test' AND "
                    "pid <> pg_backend_pid() AND backend_type = 'client backend'"
                ).fetchall()
            ]
            cpu_before = {
                "mosquitto": cpu_seconds(mqtt.process.pid),  # type: ignore[union-attr]
                **{f"receiver {k}": cpu_seconds(r.process.pid) for k, r in enumerate(receivers)},
                "PostgreSQL backends": sum(cpu_seconds(pid) for pid in backends),
            }
            groups = [names[k : k + per_process] for k in range(0, count, per_process)]
            context = multiprocessing.get_context("spawn")
            publishers = [
                context.Process(
                    target=vehicles,
                    args=(
                        mqtt.port,
                        outbox,
                        group,
                        seconds,
                        folder / f"sent-{k}.json",
                        folder / f"cpu-{k}",
                    ),
                )
                for k, group in enumerate(groups)
            ]
            began = time.monotonic()
            for publisher in publishers:
                publisher.start()
            visible: dict[tuple[str, int], int] = {}
            while any(p.is_alive() for p in publishers) or time.monotonic() < began + seconds + 30:
                recent = connection.execute(
                    f"SELECT stream_id, sequence FROM {schema}.batches "
                    "WHERE written_at > now() - interval '10 seconds'"
                ).fetchall()
                now = time.time_ns()
                for stream, sequence in recent:
                    visible.setdefault((str(stream), int(sequence)), now)
                if not any(p.is_alive() for p in publishers):
                    sent_count = sum(
                        len(json.loads((folder / f"sent-{k}.json").read_text()))
                        for k in range(len(groups))
                    )
                    if len(visible) >= sent_count:
                        break
                time.sleep(0.05)
            elapsed = time.monotonic() - began
            cpu = {
                "mosquitto": cpu_seconds(mqtt.process.pid),  # type: ignore[union-attr]
                **{f"receiver {k}": cpu_seconds(r.process.pid) for k, r in enumerate(receivers)},
                "PostgreSQL backends": sum(cpu_seconds(pid) for pid in backends),
            }
            cpu = {part: cpu[part] - cpu_before[part] for part in cpu}
            cpu["publishers"] = sum(
                float((folder / f"cpu-{k}").read_text()) for k in range(len(groups))
            )
        for receiver in receivers:
            receiver.process.send_signal(signal.SIGINT)
        summaries = [receiver.finish() for receiver in receivers]
    sent = [
        tuple(row)
        for k in range(len(groups))
        for row in json.loads((folder / f"sent-{k}.json").read_text())
    ]
    latencies = []
    for stream, sequence, first_t_ns in sent:
        seen = visible.get((stream, sequence))
        if seen is not None:
            frame_times = first_t_ns + offsets[sequence % len(offsets)]
            latencies.append((seen - frame_times) / 1e9)
    lat = np.concatenate(latencies) if latencies else np.zeros(1)
    median, p99 = np.percentile(lat, [50, 99]).tolist()
    written = len(visible)
    frames = sum(len(offsets[seq % len(offsets)]) for _, seq, _ in sent)
    print(
        f"\n{count} vehicles in {len(groups)} processes for {seconds:.0f} s into {receiving} "
        f"receivers; {elapsed:.1f} s in all"
    )
    rows: list[list[object]] = []
    for k, summary in enumerate(summaries):
        last = summary.strip().splitlines()[-1]
        taken = int(last.split(" batches received")[0].split()[-1])
        frames_k = int(last.split(" frames written")[0].split()[-1])
        rows.append([f"receiver {k}", f"{taken / seconds:.1f}", f"{frames_k / seconds:,.0f}", last])
    print(table(["part", "batches/s", "frames/s", "summary"], rows))
    print(
        table(
            ["part", "CPU s", "% of a core"],
            [[part, f"{s:.1f}", f"{100 * s / elapsed:.1f}"] for part, s in cpu.items()],
        )
    )
    total = sum(cpu.values()) - cpu["publishers"]
    print(
        f"sent {len(sent)} batches ({frames:,} frames), visible {written}; "
        f"frame time to row visible: median {median:.3f} s, p99 {p99:.3f} s"
    )
    print(
        f"cloud side (mosquitto, receivers, PostgreSQL): {total / elapsed:.2f} cores for "
        f"{frames / seconds:,.0f} frames/s, {1e6 * total / max(frames, 1):.1f} us per frame"
    )
    met = written == len(sent) and p99 <= TARGET_P99_S
    verdict = "met" if met else "missed"
    print(f"target (every batch written, p99 under {TARGET_P99_S:.0f} s): {verdict}")
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    return met, p99, total / max(frames, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vehicles", type=int, default=100)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    outbox = templates(Path(tempfile.mkdtemp(prefix="fleet-bench-")))
    # The baseline, in the same run: the same fleet into one receiver.
    _, one_p99, one_cpu = run(outbox, args.vehicles, args.per_process, args.seconds, 1)
    met, p99, cpu = run(outbox, args.vehicles, args.per_process, args.seconds, 2)
    print(
        f"\ntwo receivers against one: p99 latency {p99 / one_p99:.2f} x, cloud CPU per frame "
        f"{cpu / one_cpu:.2f} x"
    )
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
