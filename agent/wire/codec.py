"""Decoded message blocks to wire batches and back: the columnar body of `proto/telemetry.proto`.

Every column of a batch (timestamps, J1939 frame IDs, each signal's present raw values) is
one segment of a single uint64 array, so encoding is a handful of numpy passes over the whole
batch, not a loop over columns: each segment is stored plain, as zigzag deltas or as zigzag
deltas of deltas, whichever leaves the fewest non-zero bytes, and the array is written
byte-transposed so that the high bytes, nearly all zero, form long runs for zstd.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zstandard

from agent.collect import Collected, CollectedBlock, RawCapture, Selection
from agent.decode import DecodedBatch, MessageBlock, SignalColumn, SignalInfo
from agent.frames import FrameBatch
from agent.wire import telemetry_pb2 as pb

#: The Body layout of what collection rules kept. Format 2 added rules, window statistics
#: and raw frames; a batch of every decoded signal is written as format 1, which it is, so
#: a cloud that reads only format 1 keeps working with an agent that has no rules.
FORMAT = 2
READABLE_FORMATS = (1, 2)

#: A section of a batch: a decoder's result (every signal, no rule configured) or what the
#: collection rules kept.
Section = DecodedBatch | Collected

_PLAIN, _DELTA, _DELTA2 = pb.ENCODING_PLAIN, pb.ENCODING_DELTA, pb.ENCODING_DELTA2
_ONE = np.uint64(1)
_SIGN = np.uint64(63)
_BYTE_LIMITS = [np.uint64(0xFF), np.uint64(0xFFFF)]


class WireError(ValueError):
    """A batch that cannot be read: corrupt, truncated, oversized or of an unknown format."""


@dataclass(frozen=True, slots=True)
class WireBatch:
    """An encoded batch with the envelope fields the agent needs without parsing it again."""

    stream_id: str
    sequence: int
    frames: int
    signals: int
    first_t_ns: int
    last_t_ns: int
    body_size: int  # before compression
    payload: bytes  # the serialized Batch
    schema_id: bytes  # the Schema it needs; `BatchEncoder.announcement` carries it

    def __len__(self) -> int:
        return len(self.payload)


def dbc_hash(dbcs: Iterable[tuple[str, Sequence[str | Path]]]) -> bytes:
    """SHA-256 over each bus's name and its DBC files' bytes, in the order given."""
    digest = hashlib.sha256()
    for bus, paths in dbcs:
        digest.update(bus.encode() + b"\0")
        for path in paths:
            data = Path(path).read_bytes()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


def _zigzag(delta: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    signed = delta.view(np.int64)
    return (delta << _ONE) ^ (signed >> np.int64(63)).view(np.uint64)


def _unzigzag(value: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    return (value >> _ONE) ^ (np.uint64(0) - (value & _ONE))


def _significant_bytes(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """Roughly how many low bytes each value needs (0 for zero, 1, 2, and 3 for anything
    wider): what its planes will cost, in a third of the passes of an exact count."""
    count: npt.NDArray[np.uint8] = (values != 0).view(np.uint8)
    for limit in _BYTE_LIMITS:
        count = count + (values > limit).view(np.uint8)
    return count


def _deltas(values: npt.NDArray[np.uint64], starts: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
    """Each value minus the one before it in its segment (the first minus zero), mod 2**64."""
    previous = np.empty_like(values)
    previous[0:1] = 0
    previous[1:] = values[:-1]
    previous[starts] = 0
    return values - previous


def _segment_sums(
    values: npt.NDArray[np.uint64], starts: npt.NDArray[np.intp]
) -> npt.NDArray[np.uint64]:
    """The running sum of each segment (undoes `_deltas`), mod 2**64."""
    total = np.cumsum(values, dtype=np.uint64)
    before = np.zeros(len(starts), np.uint64)
    nonzero = starts > 0
    before[nonzero] = total[starts[nonzero] - 1]
    lengths = np.diff(np.append(starts, len(values)))
    return total - np.repeat(before, lengths)


class BatchEncoder:
    """Builds the wire batches of one stream: sequence numbers, envelope, body, compression,
    and the stream's schema with its announcements."""

    def __init__(
        self,
        vehicle_id: str,
        stream_id: str,
        dbc_digest: bytes,
        *,
        compression: str = "zstd",
        level: int = 3,
    ) -> None:
        self.vehicle_id = vehicle_id
        self.stream_id = stream_id
        self.dbc_digest = dbc_digest
        self.level = level
        self.set_compression(compression)
        self._schema = pb.Schema()
        self._buses: dict[str, int] = {}
        self._index: dict[tuple[str, int], int] = {}
        self._schema_id = b""
        self._announcements: dict[bytes, bytes] = {}

    def encode(self, sections: Sequence[Section], sequence: int) -> WireBatch | None:
        """Batch `sequence`, holding every decoded frame (or collected value) of `sections`;
        None when there is none."""
        sections = [s for s in sections if (s.blocks if isinstance(s, DecodedBatch) else s)]
        if not sections:
            return None
        raw, frames, signals, first, last = self._body(sections)
        batch = pb.Batch(
            format=FORMAT if any(isinstance(s, Collected) for s in sections) else 1,
            vehicle_id=self.vehicle_id,
            stream_id=self.stream_id,
            sequence=sequence,
            first_t_ns=first,
            last_t_ns=last,
            frames=frames,
            signals=signals,
            dbc_hash=self.dbc_digest,
            body_size=len(raw),
            schema_id=self._schema_id,
        )
        batch.compression, batch.body = self._compressed(raw)
        return WireBatch(
            self.stream_id,
            sequence,
            frames,
            signals,
            first,
            last,
            len(raw),
            batch.SerializeToString(),
            self._schema_id,
        )

    def set_compression(self, compression: str) -> None:
        """Compress the batches from now on with `compression` ("zstd" or "none")."""
        self.compression = compression
        self._compressor = (
            zstandard.ZstdCompressor(level=self.level) if compression == "zstd" else None
        )

    def announcement(self, schema_id: bytes) -> bytes:
        """The serialized Batch that announces a schema this encoder made."""
        return self._announcements[schema_id]

    def _compressed(self, raw: bytes) -> tuple[pb.Compression, bytes]:
        if self._compressor is None:
            return pb.COMPRESSION_NONE, raw
        return pb.COMPRESSION_ZSTD, self._compressor.compress(raw)

    def _bus_index(self, bus: str) -> int:
        index = self._buses.get(bus)
        if index is None:
            index = self._buses[bus] = len(self._buses)
            self._schema.buses.append(bus)
            self._schema_id = b""  # the schema grew: it gets a new id
        return index

    def _message_index(self, block: MessageBlock | CollectedBlock) -> int:
        key = (block.bus, id(block.plan))
        index = self._index.get(key)
        if index is None:
            plan = block.plan
            info = plan.info
            rule, window_ms = "", 0
            stats: Sequence[str] = [""] * len(plan.signals)
            if isinstance(plan, Selection):
                rule, window_ms = plan.rule, plan.window_ms
                stats = plan.stats or stats
            self._schema.blocks.add(
                bus=self._bus_index(block.bus),
                message=info.name,
                frame_id=info.frame_id,
                extended=info.is_extended,
                has_can_id=info.is_extended,
                signals=[
                    pb.Signal(
                        name=s.name,
                        length=s.length,
                        is_signed=s.is_signed,
                        is_float=s.is_float,
                        scale=s.scale,
                        offset=s.offset,
                        stat=stat,
                    )
                    for s, stat in zip(plan.signals, stats, strict=True)
                ],
                rule=rule,
                window_ms=window_ms,
            )
            index = self._index[key] = len(self._schema.blocks) - 1
            self._schema_id = b""
        return index

    def _seal_schema(self) -> None:
        if self._schema_id:
            return
        raw = self._schema.SerializeToString()
        self._schema_id = hashlib.sha256(raw).digest()
        compression, packed = self._compressed(raw)
        self._announcements[self._schema_id] = pb.Batch(
            format=FORMAT if any(b.rule for b in self._schema.blocks) else 1,
            vehicle_id=self.vehicle_id,
            stream_id=self.stream_id,
            dbc_hash=self.dbc_digest,
            compression=compression,
            body_size=len(raw),
            schema_id=self._schema_id,
            schema=packed,
        ).SerializeToString()

    def _body(self, sections: list[Section]) -> tuple[bytes, int, int, int, int]:
        blocks: list[MessageBlock | CollectedBlock] = []
        times_of: list[npt.NDArray[np.int64]] = []
        bits: list[npt.NDArray[np.uint64]] = []
        present: list[npt.NDArray[np.bool_] | None] = []
        captures: list[RawCapture] = []
        for section in sections:
            if isinstance(section, DecodedBatch):
                blocks.extend(section.blocks)
                times_of.append(section.blocks[0].batch.t_ns.take(section.rows))
                bits.append(section.bits)
                present.append(section.present)
                continue
            blocks.extend(section.blocks)
            captures.extend(section.raw)
            for block in section.blocks:
                times_of.append(block.t_ns)
                bits.append(block.bits.reshape(-1))
                present.append(None if block.present is None else block.present.reshape(-1))
        indices = [self._message_index(block) for block in blocks]
        raw_buses = [self._bus_index(capture.bus) for capture in captures]
        self._seal_schema()
        raw_times = [capture.frames.t_ns for capture in captures]
        times = np.concatenate(times_of + raw_times)
        first, last = int(times.min()), int(times.max())
        unit = int(np.gcd.reduce(times - first)) or 1
        frames = np.array([len(block) for block in blocks], np.intp)
        widths = np.array([len(block.plan.signals) for block in blocks], np.intp)
        with_id = [block for block in blocks if block.plan.info.is_extended]

        any_absent = any(p is not None for p in present)
        slots = (
            np.concatenate(
                [
                    np.ones(b.size, np.bool_) if p is None else p
                    for b, p in zip(bits, present, strict=True)
                ]
            )
            if bits
            else np.zeros(0, np.bool_)
        )
        bits = [b if p is None else b[p] for b, p in zip(bits, present, strict=True)]
        signal_frames = np.repeat(frames, widths)
        if any_absent:
            slot_starts = np.concatenate([[0], np.cumsum(signal_frames)[:-1]])
            carried = np.add.reduceat(slots, slot_starts) if len(slots) else signal_frames
            carried[signal_frames == 0] = 0
        else:
            carried = signal_frames
        raw_frames = [len(t) for t in raw_times]
        lengths = np.concatenate(
            [frames, [len(b) for b in with_id], carried, np.repeat(raw_frames, 2)]
        ).astype(np.intp)
        block_times = len(times) - sum(raw_frames)
        values = np.concatenate(
            [
                ((times[:block_times] - first) // unit).view(np.uint64),
                *[b.can_id.astype(np.uint64) for b in with_id],
                *bits,
                *[
                    column
                    for capture, t_ns in zip(captures, raw_times, strict=True)
                    for column in (
                        ((t_ns - first) // unit).view(np.uint64),
                        capture.frames.can_id.astype(np.uint64),
                    )
                ],
            ]
        )
        encodings, planes, width = _encode_columns(values, lengths, len(blocks))
        body = pb.Body(
            blocks=indices,
            frames=frames.tolist(),
            time_unit_ns=unit,
            encodings=encodings.astype(np.uint8).tobytes(),
            values=planes,
            value_width=width,
            present=np.packbits(slots, bitorder="little").tobytes() if any_absent else b"",
            raw=[_raw_frames(c, bus) for c, bus in zip(captures, raw_buses, strict=True)],
        )
        signals = int(np.count_nonzero(slots))
        return body.SerializeToString(), int(frames.sum()) + sum(raw_frames), signals, first, last


def _raw_frames(capture: RawCapture, bus: int) -> pb.RawFrames:
    frames = capture.frames
    carried = np.arange(frames.data.shape[1]) < frames.length[:, None]
    return pb.RawFrames(
        rule=capture.rule,
        bus=bus,
        frames=len(frames),
        flags=frames.flags.tobytes(),
        lengths=frames.length.tobytes(),
        data=frames.data[carried].tobytes(),
    )


def _encode_columns(
    values: npt.NDArray[np.uint64], lengths: npt.NDArray[np.intp], time_columns: int
) -> tuple[npt.NDArray[np.int64], bytes, int]:
    """Per column, the encoding that leaves the fewest significant bytes (ties: the simpler
    one; the first `time_columns` columns, timestamps, only grow and are never plain); and
    the byte-transposed planes of the encoded values, with how many planes."""
    chosen = np.full(len(lengths), _PLAIN, np.int64)
    filled = lengths > 0
    if not filled.any():
        return chosen, b"", 0
    starts = _starts(lengths)[filled]
    delta = _deltas(values, starts)
    candidates = [values, _zigzag(delta), _zigzag(_deltas(delta, starts))]
    costs = np.stack(
        [np.add.reduceat(_significant_bytes(c), starts, dtype=np.int64) for c in candidates]
    )
    costs[_PLAIN, : np.count_nonzero(filled[:time_columns])] = np.iinfo(np.int64).max
    chosen[filled] = np.argmin(costs, axis=0)
    encoding = np.repeat(chosen[filled], lengths[filled])
    out = np.where(encoding == _DELTA2, candidates[2], candidates[1])
    np.copyto(out, values, where=encoding == _PLAIN)
    width = max(1, (int(np.bitwise_or.reduce(out)).bit_length() + 7) // 8)
    planes = out.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)[:, :width]
    return chosen, planes.T.tobytes(), width


def _starts(lengths: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.intp)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    name: str
    frame_id: int
    is_extended: bool


@dataclass(slots=True)
class ReceivedBlock:
    """The frames of one message of a received batch, shaped like a decoder's block."""

    bus: str
    message: ReceivedMessage
    t_ns: npt.NDArray[np.int64]
    can_id: npt.NDArray[np.uint32]
    signals: list[SignalColumn]
    present: npt.NDArray[np.bool_] | None  # (signals, frames)
    rows: npt.NDArray[np.intp]  # each frame's place in the batch, in time order
    rule: str = ""  # the collection rule that kept these values
    window_ms: int = 0  # for window statistics (signals named `NAME.stat`)

    def __len__(self) -> int:
        return len(self.t_ns)


@dataclass(slots=True)
class ReceivedRaw:
    """Raw frames that a rule captured, with each frame's place in the batch."""

    rule: str
    frames: FrameBatch  # of one bus, frames.buses[0]
    rows: npt.NDArray[np.intp]


@dataclass(slots=True)
class ReceivedBatch:
    vehicle_id: str
    stream_id: str
    sequence: int
    frames: int
    signals: int
    blocks: list[ReceivedBlock]
    raw: list[ReceivedRaw]


class UnknownSchema(WireError):
    """A batch whose schema has not been announced (yet)."""

    def __init__(self, schema_id: bytes) -> None:
        self.schema_id = schema_id
        super().__init__(f"schema {schema_id.hex()[:16]} not announced")


class SchemaStore:
    """The schemas announced so far, by id."""

    def __init__(self) -> None:
        self._schemas: dict[bytes, pb.Schema] = {}

    def __contains__(self, schema_id: bytes) -> bool:
        return schema_id in self._schemas

    def add(self, batch: pb.Batch, max_bytes: int) -> bytes:
        """Keep the schema an announcement carries, once its id is checked; its id."""
        raw = _unpacked(batch, batch.schema, max_bytes, "schema")
        if hashlib.sha256(raw).digest() != batch.schema_id:
            raise WireError(f"schema {batch.schema_id.hex()[:16]} does not match its id")
        try:
            schema = pb.Schema.FromString(raw)
        except Exception as error:
            raise WireError(f"corrupt schema: {error}") from None
        self._schemas[batch.schema_id] = schema
        return bytes(batch.schema_id)

    def get(self, schema_id: bytes) -> pb.Schema:
        schema = self._schemas.get(schema_id)
        if schema is None:
            raise UnknownSchema(schema_id)
        return schema


def read_envelope(payload: bytes) -> pb.Batch:
    """A batch's envelope; WireError when it is none, or of a format this does not read."""
    try:
        batch = pb.Batch.FromString(payload)
    except Exception as error:  # protobuf raises its DecodeError, or others on garbage
        raise WireError(f"not a telemetry batch: {error}") from None
    if batch.format not in READABLE_FORMATS:
        readable = " and ".join(str(f) for f in READABLE_FORMATS)
        raise WireError(
            f"batch format {batch.format} is not supported (this receiver reads {readable})"
        )
    return batch


def wire_batch(payload: bytes) -> WireBatch:
    """The WireBatch of a serialized batch (one read back from the spool)."""
    batch = read_envelope(payload)
    return WireBatch(
        batch.stream_id,
        batch.sequence,
        batch.frames,
        batch.signals,
        batch.first_t_ns,
        batch.last_t_ns,
        batch.body_size,
        payload,
        batch.schema_id,
    )


def _unpacked(batch: pb.Batch, packed: bytes, max_bytes: int, what: str) -> bytes:
    if batch.body_size > max_bytes:
        raise WireError(f"{what} of {batch.body_size} bytes exceeds {max_bytes}")
    if batch.compression == pb.COMPRESSION_ZSTD:
        try:
            raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=batch.body_size)
        except zstandard.ZstdError as error:
            raise WireError(f"corrupt zstd {what}: {error}") from None
    elif batch.compression == pb.COMPRESSION_NONE:
        raw = packed
    else:
        raise WireError(f"unknown compression {batch.compression}")
    if len(raw) != batch.body_size:
        raise WireError(f"{what} is {len(raw)} bytes, expected {batch.body_size}")
    return raw


def parse_batch(
    batch: pb.Batch, schemas: SchemaStore, *, max_body_bytes: int = 64 * 1024 * 1024
) -> ReceivedBatch:
    """A data batch's envelope and body back into message blocks; WireError when it is not
    valid, UnknownSchema when its schema has not been announced."""
    schema = schemas.get(batch.schema_id)
    try:
        raw = _unpacked(batch, batch.body, max_body_bytes, "body")
    except WireError as error:
        raise WireError(f"batch {batch.sequence}: {error}") from None
    try:
        blocks, captures = _blocks(pb.Body.FromString(raw), schema, batch.first_t_ns)
    except WireError:
        raise
    except Exception as error:
        raise WireError(f"batch {batch.sequence}: corrupt body: {error}") from None
    return ReceivedBatch(
        batch.vehicle_id,
        batch.stream_id,
        batch.sequence,
        sum(len(b) for b in blocks) + sum(len(c.frames) for c in captures),
        sum(
            len(b) * len(b.signals) if b.present is None else int(np.count_nonzero(b.present))
            for b in blocks
        ),
        blocks,
        captures,
    )


def _blocks(
    body: pb.Body, schema: pb.Schema, first_t_ns: int
) -> tuple[list[ReceivedBlock], list[ReceivedRaw]]:
    if len(body.frames) != len(body.blocks):
        raise WireError(f"{len(body.frames)} frame counts for {len(body.blocks)} blocks")
    if any(index >= len(schema.blocks) for index in body.blocks):
        raise WireError("a block index beyond the schema")
    definitions = [schema.blocks[index] for index in body.blocks]
    frames = np.array(body.frames, np.intp)
    widths = np.array([len(block.signals) for block in definitions], np.intp)
    signal_frames = np.repeat(frames, widths)
    slots = int(signal_frames.sum())
    if body.present:
        bitmap = np.unpackbits(np.frombuffer(body.present, np.uint8), bitorder="little")
        if len(bitmap) < slots:
            raise WireError("presence bitmap shorter than the batch's signal slots")
        present = bitmap[:slots].astype(np.bool_)
        carried = np.zeros(len(signal_frames), np.intp)
        filled = signal_frames > 0
        if filled.any():
            carried[filled] = np.add.reduceat(present, _starts(signal_frames)[filled])
    else:
        present = np.ones(slots, np.bool_)
        carried = signal_frames
    with_id = [k for k, block in enumerate(definitions) if block.has_can_id]
    raw_frames = np.array([r.frames for r in body.raw], np.intp)
    lengths = np.concatenate([frames, frames[with_id], carried, np.repeat(raw_frames, 2)])
    lengths = lengths.astype(np.intp)
    if len(body.encodings) != len(lengths):
        raise WireError(f"{len(body.encodings)} column encodings for {len(lengths)} columns")
    encodings = np.frombuffer(body.encodings, np.uint8).astype(np.int64)
    if (encodings > _DELTA2).any():
        raise WireError("unknown column encoding")
    values = _decoded(body, lengths, encodings)

    ends = np.cumsum(lengths)
    columns = [
        values[end - n : end] for end, n in zip(ends.tolist(), lengths.tolist(), strict=True)
    ]

    def times_of(column: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        return column.view(np.int64) * np.int64(body.time_unit_ns) + np.int64(first_t_ns)

    times = [times_of(column) for column in columns[: len(frames)]]
    can_ids = dict(zip(with_id, columns[len(frames) : len(frames) + len(with_id)], strict=True))
    signal_end = len(columns) - 2 * len(raw_frames)
    signal_columns = iter(columns[len(frames) + len(with_id) : signal_end])
    raw_columns = columns[signal_end:]
    raw_times = [times_of(column) for column in raw_columns[0::2]]
    slot_ends = np.cumsum(signal_frames).tolist()
    slot_index = 0

    # Each frame's place in the batch: time order across messages (ties: block order).
    every = times + raw_times
    order = np.argsort(np.concatenate(every), kind="stable") if every else np.zeros(0, np.intp)
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    frame_ends = np.cumsum(frames).tolist()

    blocks: list[ReceivedBlock] = []
    for k, block in enumerate(definitions):
        n = int(frames[k])
        if block.bus >= len(schema.buses):
            raise WireError(f"block {block.message} names bus {block.bus} of {len(schema.buses)}")
        can_id = (
            can_ids[k].astype(np.uint32) if k in can_ids else np.full(n, block.frame_id, np.uint32)
        )
        signal_list: list[SignalColumn] = []
        first_slot = slot_ends[slot_index] - n if block.signals else 0
        matrix = present[first_slot : first_slot + n * len(block.signals)].reshape(-1, n)
        for signal, row in zip(block.signals, matrix, strict=True):
            column = next(signal_columns)
            if len(column) == n:
                bits = column
                row_present = None
            else:
                bits = np.zeros(n, np.uint64)
                bits[row] = column
                row_present = row
            info = _signal_info(signal)
            signal_list.append(SignalColumn(info, info.raw_from_bits(bits), row_present))
            slot_index += 1
        blocks.append(
            ReceivedBlock(
                schema.buses[block.bus],
                ReceivedMessage(block.message, block.frame_id, block.extended),
                times[k],
                can_id,
                signal_list,
                None if matrix.all() else matrix,
                position[frame_ends[k] - n : frame_ends[k]],
                block.rule,
                block.window_ms,
            )
        )
    captures = []
    start = int(frames.sum())
    for raw, t_ns, ids in zip(body.raw, raw_times, raw_columns[1::2], strict=True):
        if raw.bus >= len(schema.buses):
            raise WireError(f"raw frames of rule {raw.rule} name bus {raw.bus}")
        captures.append(
            ReceivedRaw(
                raw.rule,
                _raw_batch(raw, schema.buses[raw.bus], t_ns, ids),
                position[start : start + raw.frames],
            )
        )
        start += raw.frames
    return blocks, captures


def _raw_batch(
    raw: pb.RawFrames, bus: str, t_ns: npt.NDArray[np.int64], can_id: npt.NDArray[np.uint64]
) -> FrameBatch:
    n = raw.frames
    if len(raw.flags) != n or len(raw.lengths) != n:
        raise WireError(f"raw frames of rule {raw.rule}: {n} frames, flags or lengths missing")
    if can_id.max(initial=0) >= 1 << 29:
        raise WireError(f"raw frames of rule {raw.rule}: an ID beyond 29 bits")
    frames = FrameBatch.allocate(n, (bus,))
    frames.t_ns[:] = t_ns
    frames.bus[:] = 0
    frames.can_id[:] = can_id
    frames.flags[:] = np.frombuffer(raw.flags, np.uint8)
    frames.length[:] = np.frombuffer(raw.lengths, np.uint8)
    carried = np.arange(frames.data.shape[1]) < frames.length[:, None]
    if frames.length.max(initial=0) > frames.data.shape[1] or int(carried.sum()) != len(raw.data):
        raise WireError(f"raw frames of rule {raw.rule}: payload lengths do not add up")
    frames.data[carried] = np.frombuffer(raw.data, np.uint8)
    return frames


def _decoded(
    body: pb.Body, lengths: npt.NDArray[np.intp], encodings: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint64]:
    """The column values from the byte planes, with their encodings undone."""
    total = int(lengths.sum())
    width = body.value_width
    if (total and not 1 <= width <= 8) or len(body.values) != total * width:
        raise WireError(f"value planes of {len(body.values)} bytes do not hold {total} values")
    planes = np.zeros((total, 8), np.uint8)
    if total:
        planes[:, :width] = np.frombuffer(body.values, np.uint8).reshape(width, total).T
    values = planes.view("<u8").reshape(-1).astype(np.uint64)
    filled = lengths > 0
    if not filled.any():
        return values
    starts = _starts(lengths)[filled]
    encoding = np.repeat(encodings[filled], lengths[filled])
    coded = encoding != _PLAIN
    values[coded] = _unzigzag(values[coded])
    twice = encoding == _DELTA2
    if twice.any():
        values[twice] = _segment_sums(values, starts)[twice]
    values[coded] = _segment_sums(values, starts)[coded]
    return values


_INFOS: dict[tuple[str, int, bool, bool, float, float], SignalInfo] = {}


def _signal_info(signal: pb.Signal) -> SignalInfo:
    key = (
        f"{signal.name}.{signal.stat}" if signal.stat else signal.name,
        signal.length,
        signal.is_signed,
        signal.is_float,
        signal.scale,
        signal.offset,
    )
    info = _INFOS.get(key)
    if info is None:
        # A float of a length IEEE 754 has no type for is named in the schema but never
        # present (the decoder cannot decode it): it costs only itself, not its message.
        if not 1 <= signal.length <= 64:
            raise WireError(f"signal {signal.name} has an impossible length {signal.length}")
        info = SignalInfo(
            name=key[0],
            start=0,
            length=signal.length,
            byte_order="little_endian",
            is_signed=signal.is_signed,
            is_float=signal.is_float,
            scale=signal.scale,
            offset=signal.offset,
            unit=None,
            choices=None,
            multiplexer=None,
            multiplexer_ids=None,
            is_multiplexer=False,
        )
        _INFOS[key] = info
    return info
