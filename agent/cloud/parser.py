"""Wire batches back into message blocks: the cloud's side of the columnar body of
`proto/telemetry.proto`, with the schemas announced so far."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from agent.decode import SignalColumn, SignalInfo
from agent.decode.plan import text_column
from agent.frames import FrameBatch
from agent.wire import telemetry_pb2 as pb
from agent.wire.columns import DELTA2, PLAIN, segment_starts, segment_sums, unzigzag
from agent.wire.envelope import WireError


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
            carried[filled] = np.add.reduceat(present, segment_starts(signal_frames)[filled])
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
    if (encodings > DELTA2).any():
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

    texts: dict[int, list[pb.TextValues]] = {}
    for text in body.texts:
        if text.block >= len(definitions):
            raise WireError(f"text values of block {text.block} of {len(definitions)}")
        texts.setdefault(text.block, []).append(text)

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
            if signal.length > 64 and len(column):
                # J1939 text is named in the schema, never carried: no column holds it.
                raise WireError(f"signal {signal.name} of {signal.length} bits has values")
            if len(column) == n:
                bits = column
                row_present = None
            else:
                bits = np.zeros(n, np.uint64)
                bits[row] = column
                row_present = row
            info = _signal_info(signal)
            if signal.length > 64:
                # Text, placed below where the body has values for it.
                signal_list.append(text_column(info, np.full(n, None, object)))
            else:
                signal_list.append(SignalColumn(info, info.raw_from_bits(bits), row_present))
            slot_index += 1
        if k in texts:
            matrix = matrix.copy()
            for text in texts[k]:
                placed = _text_column(block, text, n)
                signal_list[text.signal] = placed
                matrix[text.signal] = True if placed.present is None else placed.present
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


def _text_column(block: pb.Block, text: pb.TextValues, n: int) -> SignalColumn:
    """The column of a text signal from its values in a block of `n` frames."""
    if text.signal >= len(block.signals) or block.signals[text.signal].length <= 64:
        raise WireError(f"text values for signal {text.signal} of {block.message}, not text")
    signal = block.signals[text.signal]
    frames = np.array(text.frames, np.int64)
    if len(frames) != len(text.values) or not len(frames):
        raise WireError(f"text of {block.message}.{signal.name}: frames and values differ")
    if frames[0] < 0 or frames[-1] >= n or (np.diff(frames) <= 0).any():
        raise WireError(f"text of {block.message}.{signal.name}: frames out of order or range")
    if any("\0" in value for value in text.values):
        # A NUL ends text on the agent; no sink's text (PostgreSQL's) would take one.
        raise WireError(f"text of {block.message}.{signal.name}: a NUL character")
    values = np.full(n, None, object)
    values[frames] = list(text.values)
    return text_column(_signal_info(signal), values)


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
    starts = segment_starts(lengths)[filled]
    encoding = np.repeat(encodings[filled], lengths[filled])
    coded = encoding != PLAIN
    values[coded] = unzigzag(values[coded])
    twice = encoding == DELTA2
    if twice.any():
        values[twice] = segment_sums(values, starts)[twice]
    values[coded] = segment_sums(values, starts)[coded]
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
        # present, and a signal longer than a column (text) has no column (checked where
        # its column is read): each costs only itself, not its message.
        if signal.length < 1:
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
