"""Decoded message blocks to wire batches: the device's side of the columnar body of
`proto/telemetry.proto`.

Every column of a batch (timestamps, J1939 frame IDs, each signal's present raw values) is
one segment of a single uint64 array, so encoding is a handful of numpy passes over the whole
batch, not a loop over columns: each segment is stored plain, as zigzag deltas or as zigzag
deltas of deltas, whichever leaves the fewest non-zero bytes, and the array is written
byte-transposed so that the high bytes, nearly all zero, form long runs for zstd.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zstandard

from agent.collect import Collected, CollectedBlock, RawCapture, Selection
from agent.decode import DecodedBatch, MessageBlock
from agent.decode.text import text_present
from agent.wire import telemetry_pb2 as pb
from agent.wire.columns import DELTA2, PLAIN, deltas, segment_starts, zigzag
from agent.wire.envelope import FORMAT, WireBatch

#: A section of a batch: a decoder's result (every signal, no rule configured) or what the
#: collection rules kept.
Section = DecodedBatch | Collected
_BYTE_LIMITS = [np.uint64(0xFF), np.uint64(0xFFFF)]


def dbc_hash(dbcs: Iterable[tuple[str, Sequence[str | Path]]]) -> bytes:
    """SHA-256 over each bus's name and its DBC files' bytes, in the order given."""
    digest = hashlib.sha256()
    for bus, paths in dbcs:
        digest.update(bus.encode() + b"\0")
        for path in paths:
            data = Path(path).read_bytes()
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


def _significant_bytes(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """Roughly how many low bytes each value needs (0 for zero, 1, 2, and 3 for anything
    wider): what its planes will cost, in a third of the passes of an exact count."""
    count: npt.NDArray[np.uint8] = (values != 0).view(np.uint8)
    for limit in _BYTE_LIMITS:
        count = count + (values > limit).view(np.uint8)
    return count


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
        # The plans and selections indexed by id(): held, so that no new one (after a reload
        # or a campaign changed the rules) can take the id of one freed and its schema block.
        self._indexed: list[object] = []
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
            self._indexed.append(plan)
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
        texted: list[tuple[int, MessageBlock | CollectedBlock]] = []
        for section in sections:
            if isinstance(section, DecodedBatch):
                texted += [(len(blocks) + k, section.blocks[k]) for k in section.text_blocks]
                blocks.extend(section.blocks)
                times_of.append(section.blocks[0].batch.t_ns.take(section.rows))
                bits.append(section.bits)
                present.append(section.present)
                continue
            captures.extend(section.raw)
            for block in section.blocks:
                if block.texts:
                    texted.append((len(blocks), block))
                blocks.append(block)
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
            texts=_texts(texted),
        )
        signals = int(np.count_nonzero(slots)) + sum(len(t.values) for t in body.texts)
        return body.SerializeToString(), int(frames.sum()) + sum(raw_frames), signals, first, last


def _texts(blocks: Sequence[tuple[int, MessageBlock | CollectedBlock]]) -> list[pb.TextValues]:
    """The text values of the blocks that may have some (with their positions in the
    body), a TextValues per text signal that has any."""
    found = []
    for position, block in blocks:
        for column, values in block.texts.items():
            frames = np.flatnonzero(text_present(values))
            if len(frames):
                found.append(
                    pb.TextValues(
                        block=position,
                        signal=column,
                        frames=frames.tolist(),
                        values=values[frames].tolist(),
                    )
                )
    return found


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
    chosen = np.full(len(lengths), PLAIN, np.int64)
    filled = lengths > 0
    if not filled.any():
        return chosen, b"", 0
    starts = segment_starts(lengths)[filled]
    delta = deltas(values, starts)
    candidates = [values, zigzag(delta), zigzag(deltas(delta, starts))]
    costs = np.stack(
        [np.add.reduceat(_significant_bytes(c), starts, dtype=np.int64) for c in candidates]
    )
    costs[PLAIN, : np.count_nonzero(filled[:time_columns])] = np.iinfo(np.int64).max
    chosen[filled] = np.argmin(costs, axis=0)
    encoding = np.repeat(chosen[filled], lengths[filled])
    out = np.where(encoding == DELTA2, candidates[2], candidates[1])
    np.copyto(out, values, where=encoding == PLAIN)
    width = max(1, (int(np.bitwise_or.reduce(out)).bit_length() + 7) // 8)
    planes = out.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)[:, :width]
    return chosen, planes.T.tobytes(), width
