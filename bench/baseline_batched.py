"""The batched way, for comparison: what a competent Python engineer would write without our
decoder. python-can's log reader, cantools' decode, the decoded frames grouped per second of
frame time (every bus in one batch), each batch serialised, compressed with zstd and sent as
one MQTT publish, QoS 1, all acknowledged.

Two serialisations, `--format`:

- `protobuf` (the default): the agent's own wire contract, `proto/telemetry.proto` through
  the generated `agent.wire.telemetry_pb2`, filled in pure Python: raw integers from cantools
  (`scaling=False`), one column per signal, every column plain, packed with `array` and
  byte-transposed by slicing (both in C), the schema announced once on its retained topic.
  Our receiver reads these batches (`bench.baseline_batched --check` proves it on a log).
- `json`: columns of physical values per message, `json.dumps` (C), the way most services
  would take it.

The benchmark uses protobuf: it costs less CPU per frame than JSON (each float's repr is
what JSON pays for) and sends a fraction of the bytes. Both are measured by
`python -m bench.baseline_batched --compare LOG`.

Usage: python -m bench.baseline_batched LOG mqtt://HOST:PORT [--format protobuf|json]
       python -m bench.baseline_batched LOG --check | --compare
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import struct
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# As the agent's CLI does: python-can would import asammdf (0.4 s here) for MF4 alone.
sys.modules.setdefault("asammdf", None)  # type: ignore[arg-type]

import can  # noqa: E402
import cantools  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import zstandard  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.wire import telemetry_pb2 as pb  # noqa: E402
from bench.common import LOGS  # noqa: E402

VEHICLE = "bench-batched"
TOPIC = f"vehicles/{VEHICLE}/telemetry"
SCHEMA_TOPIC = f"vehicles/{VEHICLE}/schema"
#: (topic, payload, retain) of one publish.
Publish = tuple[str, bytes, bool]


class Counts:
    """What a run read and decoded, to check that it did the agent's work."""

    def __init__(self) -> None:
        self.frames = self.decoded = self.signals = self.batches = 0


def load_messages() -> tuple[dict[tuple[str, int], Any], bytes]:
    """The RAV4 DBCs' messages by (bus, frame ID), and a digest of the DBCs."""
    _, dbcs, _ = LOGS["rav4"]
    known: dict[tuple[str, int], Any] = {}
    digest = hashlib.sha256()
    for bus, paths in dbcs.items():
        for path in paths:
            digest.update(Path(path).read_bytes())
            database: Any = cantools.database.load_file(path, strict=False)
            for message in database.messages:
                known.setdefault((bus, message.frame_id), message)
    return known, digest.digest()


class ProtobufBatches:
    """Batches in the wire contract of proto/telemetry.proto, built without numpy."""

    scaling = False  # the contract carries raw integers with their scale and offset

    def __init__(self, dbc_digest: bytes) -> None:
        self.dbc_digest = dbc_digest
        self.compressor = zstandard.ZstdCompressor(level=3)
        self.schema = pb.Schema()
        self.buses: dict[str, int] = {}
        self.blocks: dict[tuple[str, str], int] = {}
        self.schema_id = b""

    def _block(self, bus: str, message: Any) -> int:
        key = (bus, message.name)
        index = self.blocks.get(key)
        if index is None:
            if bus not in self.buses:
                self.buses[bus] = len(self.buses)
                self.schema.buses.append(bus)
            self.schema.blocks.add(
                bus=self.buses[bus],
                message=message.name,
                frame_id=message.frame_id,
                extended=message.is_extended_frame,
                signals=[
                    pb.Signal(
                        name=s.name,
                        length=s.length,
                        is_signed=s.is_signed,
                        is_float=s.is_float,
                        scale=s.scale,
                        offset=s.offset,
                    )
                    for s in message.signals
                ],
            )
            index = self.blocks[key] = len(self.schema.blocks) - 1
            self.schema_id = b""  # the schema grew: it needs a new id and announcement
        return index

    def encode(
        self, groups: dict[tuple[str, Any], tuple[list[float], list[dict[str, Any]]]], seq: int
    ) -> list[Publish]:
        out: list[Publish] = []
        indices = [self._block(bus, message) for bus, message in groups]
        if not self.schema_id:
            raw = self.schema.SerializeToString()
            self.schema_id = hashlib.sha256(raw).digest()
            announcement = pb.Batch(
                format=1,
                vehicle_id=VEHICLE,
                stream_id="baseline",
                dbc_hash=self.dbc_digest,
                compression=pb.COMPRESSION_ZSTD,
                body_size=len(raw),
                schema_id=self.schema_id,
                schema=self.compressor.compress(raw),
            )
            topic = f"{SCHEMA_TOPIC}/{self.schema_id.hex()}"
            out.append((topic, announcement.SerializeToString(), True))
        # candump times have microseconds: integer nanoseconds without float error.
        times = [[round(t * 1e6) * 1000 for t in stamps] for stamps, _ in groups.values()]
        first = min(t[0] for t in times)
        last = max(t[-1] for t in times)
        unit = math.gcd(*[t - first for column in times for t in column]) or 1
        columns: list[list[int]] = [[(t - first) // unit for t in column] for column in times]
        present: list[bool] = []
        absent = False
        signals = 0
        for (_, message), (_, rows) in groups.items():
            for signal in message.signals:
                column: list[Any] = [row.get(signal.name) for row in rows]
                if None in column:
                    absent = True
                    present += [v is not None for v in column]
                    column = [v for v in column if v is not None]
                else:
                    present += [True] * len(column)
                signals += len(column)
                if signal.is_float:
                    code = "<d" if signal.length == 64 else "<f"
                    bits = "<Q" if signal.length == 64 else "<I"
                    column = [struct.unpack(bits, struct.pack(code, v))[0] for v in column]
                elif signal.is_signed:
                    mask = (1 << signal.length) - 1
                    column = [v & mask for v in column]
                columns.append(column)
        values = [v for column in columns for v in column]
        width = max(1, (max(values).bit_length() + 7) // 8)
        packed = array("Q", values).tobytes()
        body = pb.Body(
            blocks=indices,
            frames=[len(rows) for _, rows in groups.values()],
            time_unit_ns=unit,
            encodings=bytes(len(columns)),  # every column plain
            values=b"".join(packed[k::8] for k in range(width)),
            value_width=width,
            present=_bitmap(present) if absent else b"",
        )
        raw = body.SerializeToString()
        batch = pb.Batch(
            format=1,
            vehicle_id=VEHICLE,
            stream_id="baseline",
            sequence=seq,
            first_t_ns=first,
            last_t_ns=last,
            frames=sum(len(rows) for _, rows in groups.values()),
            signals=signals,
            compression=pb.COMPRESSION_ZSTD,
            dbc_hash=self.dbc_digest,
            body_size=len(raw),
            body=self.compressor.compress(raw),
            schema_id=self.schema_id,
        )
        out.append((TOPIC, batch.SerializeToString(), False))
        return out


def _bitmap(bits: list[bool]) -> bytes:
    """Bits packed least significant first, as the contract's presence bitmap."""
    text = "".join("1" if bit else "0" for bit in reversed(bits))
    return int(text, 2).to_bytes((len(bits) + 7) // 8, "little")


class JsonBatches:
    """Batches as JSON: per message its times and a column of physical values per signal."""

    scaling = True

    def __init__(self, dbc_digest: bytes) -> None:
        self.compressor = zstandard.ZstdCompressor(level=3)

    def encode(
        self, groups: dict[tuple[str, Any], tuple[list[float], list[dict[str, Any]]]], seq: int
    ) -> list[Publish]:
        document = {
            "vehicle": VEHICLE,
            "sequence": seq,
            "messages": [
                {
                    "bus": bus,
                    "message": message.name,
                    "t": stamps,
                    "signals": {s.name: [row.get(s.name) for row in rows] for s in message.signals},
                }
                for (bus, message), (stamps, rows) in groups.items()
            ],
        }
        text = json.dumps(document, separators=(",", ":")).encode()
        return [(TOPIC, self.compressor.compress(text), False)]


def publishes(log: str, kind: str, counts: Counts) -> Iterator[Publish]:
    """What the baseline sends for `log`, batch by batch."""
    known, digest = load_messages()
    encoder = ProtobufBatches(digest) if kind == "protobuf" else JsonBatches(digest)
    scaling = encoder.scaling
    groups: dict[tuple[str, Any], tuple[list[float], list[dict[str, Any]]]] = {}
    current = None
    for frame in can.CanutilsLogReader(log):
        counts.frames += 1
        stamp = frame.timestamp
        second = int(stamp)
        if second != current:
            if groups:
                counts.batches += 1
                yield from encoder.encode(groups, counts.batches)
                groups = {}
            current = second
        bus = str(frame.channel)
        message = known.get((bus, frame.arbitration_id))
        if message is None:
            continue
        values = message.decode(
            bytes(frame.data), decode_choices=False, scaling=scaling, allow_truncated=True
        )
        counts.decoded += 1
        counts.signals += len(values)
        group = groups.get((bus, message))
        if group is None:
            group = groups[bus, message] = ([], [])
        group[0].append(stamp)
        group[1].append(values)
    if groups:
        counts.batches += 1
        yield from encoder.encode(groups, counts.batches)


def send(log: str, url: str, kind: str) -> Counts:
    target = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-batched")
    client.connect(target.hostname or "127.0.0.1", target.port or 1883)
    client.loop_start()
    counts = Counts()
    pending = [
        client.publish(topic, payload, qos=1, retain=retain)
        for topic, payload, retain in publishes(log, kind, counts)
    ]
    for info in pending:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    return counts


def check(log: str) -> str:
    """Our receiver's reading of the protobuf batches against the frames and values that
    cantools decoded: the baseline sends what the agent's contract says."""
    from agent.cloud.parser import SchemaStore, parse_batch
    from agent.wire.envelope import read_envelope

    known, _ = load_messages()
    expected = []
    for frame in can.CanutilsLogReader(log):
        message = known.get((str(frame.channel), frame.arbitration_id))
        if message is not None:
            values = message.decode(bytes(frame.data), decode_choices=False, allow_truncated=True)
            expected.append((round(frame.timestamp * 1e6) * 1000, message.name, values))
    schemas = SchemaStore()
    got = []
    for _, payload, retain in publishes(log, "protobuf", Counts()):
        batch = read_envelope(payload)
        if retain:
            schemas.add(batch, 1 << 26)
            continue
        for block in parse_batch(batch, schemas).blocks:
            columns = {s.info.name: s.physical() for s in block.signals}
            for k in range(len(block)):
                values = {name: column[k].item() for name, column in columns.items()}
                got.append((int(block.t_ns[k]), block.message.name, values))
    # Frames of one instant come back in block order: compare in (time, message) order.
    got.sort(key=lambda row: row[:2])
    expected.sort(key=lambda row: row[:2])
    differing = sum(
        a[:2] != b[:2] or any(abs(a[2][k] - v) > 1e-9 * max(1, abs(v)) for k, v in b[2].items())
        for a, b in zip(got, expected, strict=False)
    )
    return f"{len(expected):,} frames decoded, {len(got):,} received, {differing} differing"


def compare(log: str) -> str:
    """CPU and bytes of both serialisations on `log`, sent nowhere (best of 3 each)."""
    lines = []
    for kind in ("protobuf", "json"):
        cpu, size = [], 0
        for _ in range(3):
            counts = Counts()
            before = resource.getrusage(resource.RUSAGE_SELF)
            size = sum(len(payload) for _, payload, _ in publishes(log, kind, counts))
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        lines.append(
            f"{kind}: {min(cpu) / counts.frames * 1e6:.2f} us of CPU per log frame, "
            f"{size / counts.decoded:.2f} bytes per decoded frame"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_batched")
    parser.add_argument("log")
    parser.add_argument("url", nargs="?")
    parser.add_argument("--format", choices=("protobuf", "json"), default="protobuf")
    parser.add_argument("--check", action="store_true", help="our receiver reads the batches")
    parser.add_argument("--compare", action="store_true", help="both formats' CPU and bytes")
    args = parser.parse_args()
    if args.check:
        print(check(args.log))
    elif args.compare:
        print(compare(args.log))
    else:
        counts = send(args.log, args.url, args.format)
        print(
            f"{counts.frames} frames, {counts.decoded} decoded, {counts.signals} signals, "
            f"{counts.batches} batches",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
