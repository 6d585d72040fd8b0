"""docs/wire-format.md is enough to read the agent's batches.

`Consumer` below is written from that page and proto/telemetry.proto alone: it uses the
generated protobuf module, numpy, hashlib and zstandard, and nothing of the agent's parser
(agent/cloud/parser.py).
It reads batches the agent really makes (the agent run on the RAV4 log, and the encoder fed
the Tesla, J1939 and float-signal decodes), and every value it reads must be the agent's own
receiver's and decoder's: rows, timestamps, frame IDs, presence, raw and physical values,
window statistics, raw frames and the envelope's counts.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard

from agent.cloud.parser import ReceivedBatch, ReceivedBlock, SchemaStore, parse_batch
from agent.decode import ALL_BUSES, DecodedBatch, Decoder, MessageBlock
from agent.diagnostics.pids import dbc_text
from agent.frames import FrameBatch
from agent.logs import open_log
from agent.wire import telemetry_pb2 as pb
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import read_envelope
from harness.data import (
    CONFORMANCE_DIR,
    RAV4_ADAS_DBC,
    RAV4_LOG,
    RAV4_PT_DBC,
    TESLA_DBC,
    TESLA_EXCERPT,
    TRUCK_DBC,
    TRUCK_LOG,
)
from harness.services import run_agent

# --- The consumer, from docs/wire-format.md -------------------------------------------------

U64 = npt.NDArray[np.uint64]
FORMATS = (1, 2)
_FLOATS: dict[int, tuple[type[np.unsignedinteger[Any]], type[np.floating[Any]]]] = {
    16: (np.uint16, np.float16),
    32: (np.uint32, np.float32),
    64: (np.uint64, np.float64),
}


class SpecError(ValueError):
    """A batch the page says to refuse."""


@dataclass
class SignalValues:
    name: str
    stat: str
    present: npt.NDArray[np.bool_]  # per row
    raw: npt.NDArray[Any]  # of the present rows only: uint64, int64, a float type, or str
    physical: npt.NDArray[Any]  # the same rows: float64, or str


@dataclass
class Rows:
    """One entry of a body's blocks."""

    bus: str
    message: str
    frame_id: int
    extended: bool
    rule: str
    window_ms: int
    t_ns: npt.NDArray[np.int64]
    can_id: U64
    signals: list[SignalValues]


@dataclass
class Capture:
    rule: str
    bus: str
    t_ns: npt.NDArray[np.int64]
    can_id: U64
    flags: npt.NDArray[np.uint8]
    lengths: npt.NDArray[np.uint8]
    payloads: list[bytes]


@dataclass
class Read:
    batch: pb.Batch
    rows: list[Rows]
    captures: list[Capture]


def _unpacked(batch: pb.Batch, packed: bytes) -> bytes:
    if batch.compression == pb.COMPRESSION_ZSTD:
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=batch.body_size)
    elif batch.compression == pb.COMPRESSION_NONE:
        raw = packed
    else:
        raise SpecError(f"compression {batch.compression}")
    if len(raw) != batch.body_size:
        raise SpecError(f"{len(raw)} bytes, body_size {batch.body_size}")
    return raw


def _from_planes(data: bytes, width: int, count: int) -> U64:
    if len(data) != width * count:
        raise SpecError(f"{len(data)} bytes of planes for {count} values of {width} bytes")
    values = np.zeros(count, np.uint64)
    for p in range(width):
        plane = np.frombuffer(data, np.uint8, count, p * count).astype(np.uint64)
        values |= plane << np.uint64(8 * p)
    return values


def _undone(stored: U64, encoding: int) -> U64:
    if encoding not in (0, 1, 2):
        raise SpecError(f"encoding {encoding}")
    if encoding == 0:
        return stored
    one = np.uint64(1)
    values = (stored >> one) ^ (np.uint64(0) - (stored & one))  # unzigzag, modulo 2**64
    for _ in range(encoding):
        values = np.cumsum(values, dtype=np.uint64)
    return values


def _raw_values(signal: pb.Signal, bits: U64) -> npt.NDArray[Any]:
    length = signal.length
    if signal.is_float:
        unsigned, floating = _FLOATS[length]
        return bits.astype(unsigned).view(floating)
    if signal.is_signed:
        # The sign bit moved to bit 63 and shifted back arithmetically extends it.
        shift = 64 - length
        return (bits << np.uint64(shift)).view(np.int64) >> np.int64(shift)
    return bits


class Consumer:
    def __init__(self) -> None:
        self.schemas: dict[bytes, pb.Schema] = {}

    def take(self, payload: bytes) -> Read | None:
        """A data batch as read; None for an announcement (its schema is kept)."""
        batch = pb.Batch.FromString(payload)
        if batch.format not in FORMATS:
            raise SpecError(f"format {batch.format}")
        if batch.schema:
            raw = _unpacked(batch, batch.schema)
            if hashlib.sha256(raw).digest() != batch.schema_id:
                raise SpecError("schema does not match its id")
            self.schemas[bytes(batch.schema_id)] = pb.Schema.FromString(raw)
            return None
        return self._read(batch)

    def _read(self, batch: pb.Batch) -> Read:
        schema = self.schemas[bytes(batch.schema_id)]
        body = pb.Body.FromString(_unpacked(batch, batch.body))
        blocks = [schema.blocks[index] for index in body.blocks]
        counts = list(body.frames)
        slots = sum(n * len(block.signals) for block, n in zip(blocks, counts, strict=True))
        if body.present:
            bits = np.unpackbits(np.frombuffer(body.present, np.uint8), bitorder="little")
            if len(bits) < slots or bits[slots:].any():
                raise SpecError("presence bits")
            present = bits[:slots].astype(np.bool_)
        else:
            present = np.ones(slots, np.bool_)
        presence: list[list[npt.NDArray[np.bool_]]] = []
        at = 0
        for block, n in zip(blocks, counts, strict=True):
            presence.append(
                [present[at + j * n : at + (j + 1) * n] for j in range(len(block.signals))]
            )
            at += n * len(block.signals)

        lengths = [
            *counts,
            *[n for block, n in zip(blocks, counts, strict=True) if block.has_can_id],
            *[int(row.sum()) for rows in presence for row in rows],
            *[raw.frames for raw in body.raw for _ in ("times", "ids")],
        ]
        if len(body.encodings) != len(lengths):
            raise SpecError(f"{len(body.encodings)} encodings for {len(lengths)} columns")
        values = _from_planes(body.values, body.value_width, sum(lengths))
        columns: list[U64] = []
        start = 0
        for length, encoding in zip(lengths, body.encodings, strict=True):
            columns.append(_undone(values[start : start + length], encoding))
            start += length
        column = iter(columns)

        def times() -> npt.NDArray[np.int64]:
            offsets = next(column).view(np.int64)
            return batch.first_t_ns + offsets * np.int64(body.time_unit_ns)

        block_times = [times() for _ in blocks]
        ids = [
            next(column) if block.has_can_id else np.full(n, block.frame_id, np.uint64)
            for block, n in zip(blocks, counts, strict=True)
        ]
        rows = []
        for k, block in enumerate(blocks):
            signals = []
            for signal, row_present in zip(block.signals, presence[k], strict=True):
                raw = _raw_values(signal, next(column))
                physical = raw.astype(np.float64) * signal.scale + signal.offset
                signals.append(SignalValues(signal.name, signal.stat, row_present, raw, physical))
            rows.append(
                Rows(
                    schema.buses[block.bus],
                    block.message,
                    block.frame_id,
                    block.extended,
                    block.rule,
                    block.window_ms,
                    block_times[k],
                    ids[k],
                    signals,
                )
            )
        captures = []
        for raw_frames in body.raw:
            t_ns, can_id = times(), next(column)
            lengths_of = np.frombuffer(raw_frames.lengths, np.uint8)
            ends = np.cumsum(lengths_of, dtype=np.int64)
            sizes = (len(raw_frames.flags), len(lengths_of), int(ends[-1]) if len(ends) else 0)
            if sizes != (raw_frames.frames, raw_frames.frames, len(raw_frames.data)):
                raise SpecError(f"raw frames of rule {raw_frames.rule}: {sizes}")
            payloads = [
                raw_frames.data[end - n : end]
                for end, n in zip(ends.tolist(), lengths_of.tolist(), strict=True)
            ]
            captures.append(
                Capture(
                    raw_frames.rule,
                    schema.buses[raw_frames.bus],
                    t_ns,
                    can_id,
                    np.frombuffer(raw_frames.flags, np.uint8),
                    lengths_of,
                    payloads,
                )
            )
        if next(column, None) is not None:
            raise SpecError("columns left over")
        for text in body.texts:
            texts = rows[text.block].signals[text.signal]
            if blocks[text.block].signals[text.signal].length <= 64 or texts.present.any():
                raise SpecError(f"text for {texts.name}, a number")
            texts.present = np.zeros(len(rows[text.block].t_ns), np.bool_)
            texts.present[list(text.frames)] = True
            texts.raw = texts.physical = np.array(list(text.values), object)
        return Read(batch, rows, captures)


# --- Checks against the agent -----------------------------------------------------------


def the_agents(payload: bytes, announcements: list[bytes]) -> ReceivedBatch:
    """The agent's own receiver's reading of a batch."""
    schemas = SchemaStore()
    for announcement in announcements:
        schemas.add(read_envelope(announcement), 1 << 24)
    return parse_batch(read_envelope(payload), schemas)


def same_values(mine: npt.NDArray[Any], theirs: npt.NDArray[Any]) -> None:
    """Equal, bit for bit where floats (NaN payloads included)."""
    assert mine.dtype == theirs.dtype
    assert mine.tobytes() == np.ascontiguousarray(theirs).tobytes()


def same_rows(mine: Rows, theirs: ReceivedBlock | MessageBlock) -> None:
    assert (mine.bus, mine.message, mine.frame_id, mine.extended) == (
        theirs.bus,
        theirs.message.name,
        theirs.message.frame_id,
        theirs.message.is_extended,
    )
    if isinstance(theirs, ReceivedBlock):
        assert (mine.rule, mine.window_ms) == (theirs.rule, theirs.window_ms)
    assert (mine.t_ns == theirs.t_ns).all()
    assert (mine.can_id == theirs.can_id).all()
    assert len(mine.signals) == len(theirs.signals)
    for signal, column in zip(mine.signals, theirs.signals, strict=True):
        name = f"{signal.name}.{signal.stat}" if signal.stat else signal.name
        assert name == column.name
        present = np.ones(len(mine.t_ns), np.bool_) if column.present is None else column.present
        assert (signal.present == present).all(), name
        if column.raw.dtype == object:
            assert (
                signal.raw.tolist()
                == column.raw[present].tolist()
                == column.physical()[present].tolist()
            )
            continue
        same_values(signal.raw, column.raw[present])
        physical = np.asarray(column.physical(), np.float64)[present]
        assert np.array_equal(signal.physical, physical, equal_nan=True), name


def check_batch(read: Read, theirs: ReceivedBatch) -> None:
    """Every value the consumer read is the agent's, and the envelope's counts are what the
    page says they count."""
    batch = read.batch
    assert (theirs.stream_id, theirs.sequence) == (batch.stream_id, batch.sequence)
    assert len(read.rows) == len(theirs.blocks)
    for rows, block in zip(read.rows, theirs.blocks, strict=True):
        same_rows(rows, block)
    assert len(read.captures) == len(theirs.raw)
    for capture, raw in zip(read.captures, theirs.raw, strict=True):
        frames = raw.frames
        assert (capture.rule, capture.bus) == (raw.rule, frames.buses[0])
        assert (capture.t_ns == frames.t_ns).all() and (capture.can_id == frames.can_id).all()
        assert (capture.flags == frames.flags).all() and (capture.lengths == frames.length).all()
        assert capture.payloads == [
            bytes(data[:n]) for data, n in zip(frames.data, frames.length.tolist(), strict=True)
        ]
    count = sum(len(r.t_ns) for r in read.rows) + sum(len(c.t_ns) for c in read.captures)
    values = sum(int(s.present.sum()) for r in read.rows for s in r.signals)
    assert (batch.frames, batch.signals) == (count, values) == (theirs.frames, theirs.signals)
    times = np.concatenate([r.t_ns for r in read.rows] + [c.t_ns for c in read.captures])
    assert (batch.first_t_ns, batch.last_t_ns) == (times.min(), times.max())


# --- Batches the agent made ------------------------------------------------------------

RULES = """
[[collect]]
name = "all-steer"
mode = "all"
signals = ["STEER_ANGLE_SENSOR.*"]

[[collect]]
name = "speed-1hz"
mode = "sample"
signals = ["SPEED.SPEED"]
period_ms = 1000

[[collect]]
name = "speed-mean"
mode = "sample"
signals = ["SPEED.SPEED"]
period_ms = 500
reduce = "mean"

[[collect]]
name = "steer-deadband"
mode = "change"
signals = ["STEER_ANGLE", "STEER_RATE"]
deadband = 1.0
heartbeat_ms = 2500

[[collect]]
name = "wheel-stats"
mode = "aggregate"
signals = ["WHEEL_SPEED_*"]
window_ms = 1000

[[collect]]
name = "etq-stats"
mode = "aggregate"
signals = ["ETQREAL"]
window_ms = 3000
stats = ["stddev", "count"]

[[collect]]
name = "fast"
mode = "trigger"
when = "SPEED.SPEED > 60"
signals = ["SPEED.SPEED", "WHEEL_SPEED_FL"]
before_ms = 2000
after_ms = 3000

[[collect]]
name = "steer-log"
mode = "raw"
messages = ["STEER_ANGLE_SENSOR"]
ids = [180]

[[collect]]
name = "adas-log"
mode = "raw"
buses = ["can1"]
"""


@dataclass
class Outbox:
    """What a file uplink received from one run of the agent."""

    folder: Path
    announcements: list[bytes]
    batches: list[bytes]  # in file name order


def run_on_rav4(folder: Path, rules: str) -> Outbox:
    """The agent replaying the RAV4 log's two buses into a folder, as `run` does."""
    buses = "".join(
        f'[[bus]]\nname = "{bus}"\nsource = "replay"\npath = "{RAV4_LOG}"\n'
        f'pace = "max"\ndbc = ["{dbc}"]\n'
        for bus, dbc in (("can0", RAV4_PT_DBC), ("can1", RAV4_ADAS_DBC))
    )
    config = folder / "agent.toml"
    config.write_text(
        f'vehicle_id = "spec-1"\nstate_dir = "{folder / "state"}"\n{buses}'
        f'[uplink]\nkind = "file"\nurl = "{folder / "outbox"}"\n'
        f'[metrics]\nlisten = ""\n{rules}'
    )
    result = run_agent(config)
    assert result.returncode == 0, result.stderr
    outbox = folder / "outbox"
    return Outbox(
        outbox,
        [p.read_bytes() for p in sorted(outbox.glob("*.schema"))],
        [p.read_bytes() for p in sorted(outbox.glob("*.batch"))],
    )


@pytest.fixture(scope="module")
def every_signal(tmp_path_factory: pytest.TempPathFactory) -> Outbox:
    return run_on_rav4(tmp_path_factory.mktemp("every-signal"), "")


@pytest.fixture(scope="module")
def ruled(tmp_path_factory: pytest.TempPathFactory) -> Outbox:
    return run_on_rav4(tmp_path_factory.mktemp("rules"), RULES)


def consumed(outbox: Outbox) -> list[Read]:
    """The outbox read as the page says (schemas first, then batches in name order), each
    batch checked against the agent's receiver."""
    consumer = Consumer()
    for announcement in outbox.announcements:
        assert consumer.take(announcement) is None
    reads = []
    for payload in outbox.batches:
        read = consumer.take(payload)
        assert read is not None
        check_batch(read, the_agents(payload, outbox.announcements))
        reads.append(read)
    return reads


def log_frames(bus: str) -> FrameBatch:
    """The frames of one of the RAV4 log's channels, as a replay bus of that name reads them."""
    frames = FrameBatch.concat(list(open_log(RAV4_LOG).batches()))
    return frames.take(frames.bus == frames.buses.index(bus))


def log_decoded(bus: str) -> DecodedBatch:
    dbc = RAV4_PT_DBC if bus == "can0" else RAV4_ADAS_DBC
    return Decoder({bus: [dbc]}).decode(log_frames(bus))


def test_the_envelope_and_the_file_uplink_are_as_specified(every_signal: Outbox) -> None:
    consumer = Consumer()
    schema_ids = set()
    for announcement in every_signal.announcements:
        envelope = pb.Batch.FromString(announcement)
        assert envelope.sequence == envelope.frames == envelope.signals == 0
        assert not envelope.body
        assert envelope.format == 1 and envelope.compression == pb.COMPRESSION_ZSTD
        assert consumer.take(announcement) is None
        schema_ids.add(bytes(envelope.schema_id))
    names = sorted(p.name for p in every_signal.folder.glob("*.schema"))
    assert names == sorted(f"{schema_id.hex()}.schema" for schema_id in schema_ids)
    # The dbc_hash recipe: per bus in config order, its name, a zero byte, then each DBC
    # file's length (8 bytes, little endian) and bytes.
    digest = hashlib.sha256()
    for bus, dbc in (("can0", RAV4_PT_DBC), ("can1", RAV4_ADAS_DBC)):
        data = dbc.read_bytes()
        digest.update(bus.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    envelopes = [pb.Batch.FromString(p) for p in every_signal.batches]
    stream_id = envelopes[0].stream_id
    assert re.fullmatch("[0-9a-f]{32}", stream_id)
    assert [e.sequence for e in envelopes] == list(range(1, len(envelopes) + 1))
    for envelope in envelopes:
        assert (envelope.vehicle_id, envelope.stream_id) == ("spec-1", stream_id)
        assert envelope.format == 1 and envelope.dbc_hash == digest.digest()
        assert bytes(envelope.schema_id) in schema_ids
    assert sorted(p.name for p in every_signal.folder.glob("*.batch")) == [
        f"{stream_id}-{e.sequence:012d}.batch" for e in envelopes
    ]


def test_format_1_every_signal_as_the_decoder_read_it(every_signal: Outbox) -> None:
    """Read from the spec, the batches hold every decoded value of the log: the rows of a
    message, batch after batch, are the decoder's over the whole log."""
    reads = consumed(every_signal)
    assert {r.batch.format for r in reads} == {1}
    assert not any(r.captures or any(rows.rule for rows in r.rows) for r in reads)
    for bus in ("can0", "can1"):
        expected = {block.message.name: block for block in log_decoded(bus).blocks}
        got: dict[str, list[Rows]] = defaultdict(list)
        for read in reads:
            for rows in read.rows:
                if rows.bus == bus:
                    got[rows.message].append(rows)
        assert set(got) == set(expected)
        for message, parts in got.items():
            block = expected[message]
            assert (np.concatenate([p.t_ns for p in parts]) == block.t_ns).all()
            for j, column in enumerate(block.signals):
                present = np.concatenate([p.signals[j].present for p in parts])
                if column.present is not None:
                    assert (present == column.present).all()
                else:
                    assert present.all()
                raw = np.concatenate([p.signals[j].raw for p in parts])
                same_values(raw, column.raw[present])


def _windows(
    t_ns: npt.NDArray[np.int64], values: npt.NDArray[np.float64], window_ms: int
) -> dict[int, dict[str, float]]:
    """Each window's statistics, as the page defines them."""
    length = window_ms * 1_000_000
    out = {}
    for start in np.unique(t_ns // length).tolist():
        inside = values[t_ns // length == start]
        out[start * length] = {
            "min": float(inside.min()),
            "max": float(inside.max()),
            "mean": float(inside.mean()),
            "stddev": float(inside.std()),  # numpy's default: the population's
            "count": float(len(inside)),
        }
    return out


def test_format_2_rules_statistics_and_raw_frames(ruled: Outbox) -> None:
    reads = consumed(ruled)
    assert {r.batch.format for r in reads} == {2}
    bodies = [pb.Body.FromString(_unpacked(r.batch, r.batch.body)) for r in reads]
    assert any(body.present for body in bodies), "no batch with presence bits"
    rules = {rows.rule for r in reads for rows in r.rows} | {
        c.rule for r in reads for c in r.captures
    }
    assert rules == {
        "all-steer",
        "speed-1hz",
        "speed-mean",
        "steer-deadband",
        "wheel-stats",
        "etq-stats",
        "fast",
        "steer-log",
        "adas-log",
    }

    # Window statistics: a row per window, stamped with its start, sent once.
    decoded = {block.message.name: block for block in log_decoded("can0").blocks}
    # Per (rule, message, signal): its window length, and per (window start, statistic)
    # every value sent.
    window_of: dict[tuple[str, str, str], int] = {}
    sent: dict[tuple[str, str, str], dict[tuple[int, str], list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for read in reads:
        for rows in read.rows:
            if not rows.window_ms:
                assert not any(s.stat for s in rows.signals)
                continue
            for signal in rows.signals:
                key = (rows.rule, rows.message, signal.name)
                window_of[key] = rows.window_ms
                starts = rows.t_ns[signal.present].tolist()
                for t, value in zip(starts, signal.physical.tolist(), strict=True):
                    sent[key][t, signal.stat].append(value)
    assert {rule for rule, _, _ in window_of} == {"speed-mean", "wheel-stats", "etq-stats"}
    compared = 0
    for (rule, message, name), window_ms in window_of.items():
        column = decoded[message].signal(name)
        expected = _windows(
            decoded[message].t_ns, np.asarray(column.physical(), np.float64), window_ms
        )
        values_of = sent[rule, message, name]
        assert {t for t, _ in values_of} == set(expected)
        for (t, stat), values in values_of.items():
            assert len(values) == 1, f"{rule} {name} window {t} sent {len(values)} times"
            assert values[0] == pytest.approx(expected[t][stat], rel=1e-9, abs=1e-9)
            compared += 1
    assert compared > 500

    # Raw frames: the bus's frames as it carried them.
    steer_id = decoded["STEER_ANGLE_SENSOR"].message.frame_id
    for rule, bus, kept in (
        ("steer-log", "can0", lambda f: np.isin(f.can_id, [steer_id, 180])),
        ("adas-log", "can1", lambda f: np.ones(len(f), np.bool_)),
    ):
        captures = [c for r in reads for c in r.captures if c.rule == rule]
        assert {c.bus for c in captures} == {bus}
        frames = log_frames(bus)
        frames = frames.take(kept(frames))
        assert (np.concatenate([c.t_ns for c in captures]) == frames.t_ns).all()
        assert (np.concatenate([c.can_id for c in captures]) == frames.can_id).all()
        assert (np.concatenate([c.flags for c in captures]) == frames.flags).all()
        payloads = [p for c in captures for p in c.payloads]
        assert payloads == [
            bytes(d[:n]) for d, n in zip(frames.data, frames.length.tolist(), strict=True)
        ]


# --- Batches of the encoder: presence bits, frame IDs, floats, no compression -----------


def float_frames() -> FrameBatch:
    """Frames of floating_point.dbc (a float64 message, a message of two float32), random
    bits, some too short for the second float32."""
    rng = np.random.default_rng(16)
    n = 600
    frames = FrameBatch.allocate(n, ("can0",))
    frames.t_ns[:] = 1_700_000_000_000_000_000 + np.cumsum(rng.integers(1, 5_000_000, n))
    frames.can_id[:] = rng.choice([1024, 1025], n)
    frames.length[:] = np.where(rng.random(n) < 0.2, 4, 8)
    frames.data[:, :8] = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    frames.data[np.arange(64) >= frames.length[:, None]] = 0
    # Sure to be among them: a NaN with a payload, both infinities and a negative zero.
    frames.can_id[:2], frames.length[:2] = 1025, 8
    specials = np.array([0x7FC00001, 0xFF800000, 0x80000000, 0x7F800000], "<u4")
    frames.data[:2, :8] = specials.view(np.uint8).reshape(2, 8)
    return frames


def text_frames() -> FrameBatch:
    """Diagnostic answers with text: a VIN and DTCs (with their J2012 codes) of two ECUs."""
    rows = [
        (0x902, 0x7E8, b"1HGCM82633A004352"),
        (0x300, 0x7E8, b"\x03\x01P0301\0\0\0\0"),
        (0x10C, 0x7E8, b"\x1a\xf8"),
        (0x300, 0x7E9, b"\xc1\x23U0123\0\0\0\0"),
        (0x300, 0x7E8, b"\x01\x71"),  # no text: the frame ends after the code
    ]
    frames = FrameBatch.allocate(len(rows), ("can0",))
    frames.t_ns[:] = 1_700_000_000_000_000_000 + np.arange(len(rows)) * 1_000_000
    for k, (frame_id, ecu, data) in enumerate(rows):
        payload = ecu.to_bytes(4, "little") + data
        frames.can_id[k], frames.flags[k], frames.length[k] = frame_id, 1, len(payload)
        frames.data[k, : len(payload)] = np.frombuffer(payload, np.uint8)
    return frames


def encoder_case(name: str, folder: Path) -> tuple[Decoder, FrameBatch, str]:
    """A decoder, the frames it decodes, and the compression of the batch."""
    if name == "text":
        dbc = folder / "answers.dbc"
        dbc.write_text(dbc_text())
        return Decoder({"can0": [dbc]}), text_frames(), "none"
    if name == "tesla":
        return (
            Decoder({ALL_BUSES: [TESLA_DBC]}),
            next(open_log(TESLA_EXCERPT).batches(4000)),
            "zstd",
        )
    if name == "truck":
        frames = next(open_log(TRUCK_LOG).batches(4000))
        return Decoder({ALL_BUSES: [TRUCK_DBC]}, [ALL_BUSES]), frames, "zstd"
    return Decoder({"can0": [CONFORMANCE_DIR / "floating_point.dbc"]}), float_frames(), "none"


@pytest.mark.parametrize("name", ["tesla", "truck", "floats", "text"])
def test_encoded_batches_hold_what_the_decoder_read(name: str, tmp_path: Path) -> None:
    """Presence bits (the Tesla's multiplexed signals), J1939 frame IDs, float signals,
    text and uncompressed batches, against the decoder's own blocks."""
    decoder, frames, compression = encoder_case(name, tmp_path)
    decoded = decoder.decode(frames)
    encoder = BatchEncoder("v", "s", b"d", compression=compression)
    wire = encoder.encode([decoded], 1)
    assert wire is not None
    announcement = encoder.announcement(wire.schema_id)
    consumer = Consumer()
    assert consumer.take(announcement) is None
    read = consumer.take(wire.payload)
    assert read is not None
    check_batch(read, the_agents(wire.payload, [announcement]))
    for rows, block in zip(read.rows, decoded.blocks, strict=True):
        same_rows(rows, block)
    body = pb.Body.FromString(_unpacked(read.batch, read.batch.body))
    blocks = [consumer.schemas[wire.schema_id].blocks[i] for i in body.blocks]
    if name == "tesla":
        assert body.present, "multiplexed signals leave presence bits"
    if name == "truck":
        assert all(b.has_can_id for b in blocks)
        # J1939 frames carry another priority than the DBC's ID: the column has their own.
        assert any((rows.can_id != rows.frame_id).any() for rows in read.rows)
    if name == "floats":
        assert read.batch.compression == pb.COMPRESSION_NONE and body.present
        lengths = {s.length for b in blocks for s in b.signals if s.is_float}
        assert lengths == {32, 64}
        values = np.concatenate(
            [s.raw for r in read.rows for s in r.signals if s.raw.dtype.kind == "f"]
        )
        assert np.isnan(values).any() and (values < 0).any()
    if name == "text":
        texts = {
            (r.message, s.name): s.raw.tolist()
            for r in read.rows
            for s in r.signals
            if s.raw.dtype == object
        }
        assert texts == {
            ("VehicleIdentificationNumber", "VIN"): ["1HGCM82633A004352"],
            ("StoredDTC", "DTC"): ["P0301", "U0123"],
        }
        # Text values count as values: VIN, DTC with the ECU and its numbers, engine speed,
        # and a DTC without text.
        assert read.batch.signals == 2 + 4 + 2 + 4 + 3


def test_an_unknown_format_is_refused() -> None:
    decoder = Decoder({ALL_BUSES: [TESLA_DBC]})
    encoder = BatchEncoder("v", "s", b"d")
    wire = encoder.encode([decoder.decode(next(open_log(TESLA_EXCERPT).batches(500)))], 1)
    assert wire is not None
    envelope = pb.Batch.FromString(wire.payload)
    envelope.format = 3
    with pytest.raises(SpecError, match="format 3"):
        Consumer().take(envelope.SerializeToString())
