"""The decoder: frame batches in, per-message signal columns out, one vectorised pass per batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from agent.decode.dbc import Dbc, load_dbc
from agent.decode.plan import WORDS, MessageBlock, MessagePlan
from agent.frames import FrameBatch, FrameFlag

#: The bus name that stands for every bus, in the DBC mapping and in the J1939 list.
ALL_BUSES = "*"

_EXTENDED_KEY = 1 << 31
_PGN_SPACE = 1 << 18  # PGNs are 18 bits: data page, extended data page, PF, PS
# As numpy scalars: an enum operand costs numpy a slow conversion on every call.
_EXTENDED = np.uint8(FrameFlag.EXTENDED)
_ERROR = np.uint8(FrameFlag.ERROR)
_UNDECODABLE = np.uint8(FrameFlag.ERROR | FrameFlag.REMOTE)


IntArray = TypeVar("IntArray", npt.NDArray[np.int32], npt.NDArray[np.int64])


def j1939_pgn(can_id: IntArray) -> IntArray:
    """The parameter group number of 29-bit J1939 identifiers.

    In PDU1 (PF below 240) the PS byte is a destination address, not part of the PGN;
    in PDU2 it is the group extension. Priority and source address never are.
    """
    pgn = (can_id >> 8) & 0x3FFFF  # data page, extended data page, PF, PS
    pdu1 = (pgn & 0xFF00) < 0xF000
    pgn[pdu1] &= 0x3FF00
    return pgn


def _message_key(plan: MessagePlan, j1939: bool) -> int:
    info = plan.info
    if not info.is_extended:
        return info.frame_id
    if j1939:
        return _EXTENDED_KEY | int(j1939_pgn(np.array([info.frame_id], np.int64))[0])
    return _EXTENDED_KEY | info.frame_id


@dataclass(slots=True)
class DecodedBatch:
    """What a frame batch decoded into, with the counts of what could not be decoded."""

    frames: int
    decoded: int
    unknown: int
    error_frames: int
    remote_frames: int
    signals: int = 0  # signal values decoded (present in their frames)
    # On J1939 buses, the rows of transport frames and of DM1/DM2 frames (counted as
    # unknown: no DBC decodes them), ascending.
    transport: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    diagnostic: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    blocks: list[MessageBlock] = field(default_factory=list)
    # What the blocks are views of, for consumers that work on all of them at once: the
    # batch's row of each decoded frame, block after block; each block's bit fields,
    # signal-major; and which of them the frames carry (None: all).
    rows: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    bits: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    present: npt.NDArray[np.bool_] | None = None
    # The positions in `blocks` of those whose messages have text signals, which the
    # blocks' `texts` give: every other block has none.
    text_blocks: list[int] = field(default_factory=list)


# A frame's code sorts it: what kept it from being decoded, or its message. On J1939 buses
# the transport protocol's frames and the DM1/DM2 diagnostic messages have codes of their
# own, so that the one lookup that finds every frame's message also finds them: a bus
# without them pays nothing to learn so.
_UNKNOWN, _ERROR_FRAME, _REMOTE_FRAME, _TRANSPORT, _DIAGNOSTIC, _FIRST_MESSAGE = range(6)
#: J1939-21's TP.CM and TP.DT (PDU1, at every destination), J1939-73's DM1 and DM2.
TRANSPORT_PGNS = (0xEC00, 0xEB00)
DIAGNOSTIC_PGNS = (0xFECA, 0xFECB)
_NOT_DBC_PGNS = frozenset(TRANSPORT_PGNS + DIAGNOSTIC_PGNS)
_NOT_STANDARD = np.uint8(FrameFlag.EXTENDED | FrameFlag.REMOTE | FrameFlag.ERROR)
_REMOTE = np.uint8(FrameFlag.REMOTE)
#: Block sets remembered per bus table: the same messages recur batch after batch.
_BLOCK_SETS = 256


class _Lookup:
    """The messages of the buses of one bus table, with every signal's parameters in flat
    arrays, so that one gather per parameter serves all the signals of a batch."""

    def __init__(
        self,
        buses: tuple[str, ...],
        plans: list[tuple[str, int, MessagePlan]],
        j1939: list[bool],
    ) -> None:
        self.plans = [(bus, plan) for bus, _, plan in plans]
        self.one_bus = len(buses) == 1
        self.codes = len(plans) + _FIRST_MESSAGE
        self.code_range = np.arange(min(self.codes, 256), dtype=np.uint8)
        # The narrowest type makes numpy's stable sort a radix sort of one or two passes.
        self.code_dtype: type[np.unsignedinteger[Any]] = (
            np.uint8 if self.codes <= 256 else np.uint16 if self.codes <= 65536 else np.uint32
        )
        bus_of = np.array([buses.index(bus) for bus, _, _ in plans], np.int64)
        keys = np.array([key for _, key, _ in plans], np.int64)
        extended = keys & _EXTENDED_KEY != 0
        code = np.arange(_FIRST_MESSAGE, self.codes, dtype=np.int64)
        # Standard IDs and J1939 PGNs are dense: a table per bus, looked up by one take.
        # Each bus has 4096 entries: its 2048 standard IDs, then 2048 that a frame which is
        # not a standard data frame (extended, error, remote, ID beyond 11 bits) reads.
        self.standard = np.full(len(buses) * 4096, _UNKNOWN, self.code_dtype)
        self.standard[bus_of[~extended] * 4096 + keys[~extended]] = code[~extended]
        is_j1939 = np.array(j1939, np.bool_)
        self.all_j1939 = bool(is_j1939.all())
        on_j1939 = is_j1939[bus_of] & extended
        self.j1939_slot = np.cumsum(is_j1939) - 1
        self.j1939_slot[~is_j1939] = -1
        # A PDU1 PGN is entered at all 256 destination addresses, so a frame's PGN slot
        # is just bits 8 to 25 of its ID, with nothing to clear per frame.
        self.pgns = np.full(int(is_j1939.sum()) * _PGN_SPACE, _UNKNOWN, self.code_dtype)
        base = self.j1939_slot[bus_of[on_j1939]] * _PGN_SPACE + (keys[on_j1939] & (_PGN_SPACE - 1))
        pdu1 = (keys[on_j1939] & 0xFF00) < 0xF000
        destinations = np.where(pdu1[:, None], np.arange(256)[None, :], 0)
        self.pgns[base[:, None] + destinations] = code[on_j1939][:, None]
        for slot in range(int(is_j1939.sum())):
            for pgn in TRANSPORT_PGNS:
                self.pgns[slot * _PGN_SPACE + pgn : slot * _PGN_SPACE + pgn + 256] = _TRANSPORT
            for pgn in DIAGNOSTIC_PGNS:
                self.pgns[slot * _PGN_SPACE + pgn] = _DIAGNOSTIC
        # Other 29-bit IDs are sparse: sorted keys, found by binary search.
        searched = extended & ~on_j1939
        self.extended_keys = (bus_of[searched] << 32) | keys[searched]
        order = np.argsort(self.extended_keys)
        self.extended_keys = self.extended_keys[order]
        self.extended_code = code[searched][order]

        signals = [p.signals for _, _, p in plans]
        self.width = np.array([len(s) for s in signals], np.int64)
        self.first_signal = np.concatenate([[0], np.cumsum(self.width)[:-1]]).astype(np.int64)
        self.max_needed = np.array([p.max_needed for _, _, p in plans], np.int64)
        self.irregular = np.array(
            [bool(p.multiplexers or p.straddlers or p.never.any()) for _, _, p in plans]
        )

        def flat(name: str, dtype: type[np.generic]) -> npt.NDArray[Any]:
            parts = [getattr(p, name) for _, _, p in plans]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        self.word = flat("word", np.int64)
        self.shift_left = flat("shift_left", np.uint64)
        self.shift_right = flat("shift_right", np.uint64)
        self.needed = flat("needed", np.int64)
        # Which halves of a batch's table of payload words any signal here reads.
        self.big = bool((self.word >= WORDS).any())
        self.little = bool((self.word < WORDS).any()) or not self.big
        self.layouts = [_Layout(words, self.little, self.big) for words in range(1, WORDS + 1)]
        self._block_sets: dict[bytes, _BlockSet] = {}

    def block_set(self, blocks: npt.NDArray[np.intp]) -> _BlockSet:
        """What decoding needs to know about the messages `blocks`, made once per set."""
        found = self._block_sets.get(blocks.tobytes())
        if found is None:
            if len(self._block_sets) >= _BLOCK_SETS:
                self._block_sets.clear()
            found = _BlockSet(self, blocks)
            self._block_sets[blocks.tobytes()] = found
        return found


class _BlockSet:
    """A set of messages present in a batch: their signals laid out segment after segment,
    one segment per signal of each message, with each segment's parameters."""

    def __init__(self, lookup: _Lookup, blocks: npt.NDArray[np.intp]) -> None:
        self.plans = [lookup.plans[m] for m in blocks.tolist()]
        #: Positions of the blocks that need the per-message step.
        self.irregular = np.flatnonzero(lookup.irregular[blocks]).tolist()
        #: Positions of the blocks of messages with text signals (never in the batch pass,
        #: so among the irregular ones).
        self.text = [k for k in self.irregular if self.plans[k][1].text]
        self.signals_in = lookup.width[blocks]
        total = int(self.signals_in.sum())
        self.segment_block = np.repeat(np.arange(len(blocks)), self.signals_in)
        signal = np.repeat(
            lookup.first_signal[blocks] - (np.cumsum(self.signals_in) - self.signals_in),
            self.signals_in,
        ) + np.arange(total)
        self.shift_left = lookup.shift_left[signal]
        self.shift_right = lookup.shift_right[signal]
        self.needed = lookup.needed[signal]
        self.max_needed = lookup.max_needed[blocks]
        self._word = lookup.word[signal]
        self._columns: dict[_Layout, npt.NDArray[np.int64]] = {}

    def columns(self, layout: _Layout) -> npt.NDArray[np.int64]:
        """Each segment's column in a batch's table of payload words."""
        columns = self._columns.get(layout)
        if columns is None:
            columns = layout.column(self._word)
            self._columns[layout] = columns
        return columns


class Decoder:
    """Decodes frame batches with the DBC files of each bus.

    `dbcs` maps a bus name to its DBC files; the bus `"*"` gives DBCs for every bus (a
    bus's own DBCs win where both define an ID). Buses named in `j1939` (or `"*"`) match
    extended frames by PGN, so priority and source address may vary. With `cache_dir`,
    compiled DBCs are kept there (see `agent.decode.cache`).
    """

    def __init__(
        self,
        dbcs: Mapping[str, Sequence[str | Path]],
        j1939: Iterable[str] = (),
        *,
        strict: bool = False,
        cache_dir: Path | None = None,
    ) -> None:
        loaded: dict[Path, Dbc] = {}
        for paths in dbcs.values():
            for path in paths:
                key = Path(path).resolve()
                if key not in loaded:
                    loaded[key] = load_dbc(path, strict=strict, cache_dir=cache_dir)
        self.databases = list(loaded.values())
        self.warnings: list[str] = [w for db in self.databases for w in db.warnings]
        self._dbcs = {
            bus: [loaded[Path(p).resolve()] for p in paths] for bus, paths in dbcs.items()
        }
        self._j1939 = frozenset(j1939)
        self._bus_plans: dict[str, dict[int, MessagePlan]] = {}
        self._lookups: dict[tuple[str, ...], _Lookup] = {}

    def is_j1939(self, bus: str) -> bool:
        return bus in self._j1939 or ALL_BUSES in self._j1939

    def messages(self, bus: str) -> list[MessagePlan]:
        """The messages this decoder knows on `bus`."""
        return list(self._plans_of(bus).values())

    def message_of(self, bus: str, can_id: int) -> MessagePlan | None:
        """The message of a 29-bit ID on `bus` (by PGN on a J1939 bus), for what arrives
        other than in a frame batch: reassembled transfers."""
        key = can_id
        if self.is_j1939(bus):
            key = int(j1939_pgn(np.array([can_id], np.int64))[0])
        return self._plans_of(bus).get(_EXTENDED_KEY | key)

    def _plans_of(self, bus: str) -> dict[int, MessagePlan]:
        plans = self._bus_plans.get(bus)
        if plans is None:
            plans = {}
            j1939 = self.is_j1939(bus)
            for db in [*self._dbcs.get(bus, []), *self._dbcs.get(ALL_BUSES, [])]:
                for plan in db.plans:
                    key = _message_key(plan, j1939)
                    if j1939 and key & ~_EXTENDED_KEY in _NOT_DBC_PGNS and plan.info.is_extended:
                        self.warnings.append(
                            f"bus {bus}: {plan.info.dbc} message {plan.info.name} has PGN "
                            f"0x{key & ~_EXTENDED_KEY:X}, which J1939 defines: decoded by its "
                            "rules (transfers reassembled, one record per fault), not the DBC's"
                        )
                        continue
                    other = plans.setdefault(key, plan)
                    if other is not plan:
                        self.warnings.append(
                            f"bus {bus}: {plan.info.dbc} message {plan.info.name} has the same "
                            f"{'PGN' if j1939 and plan.info.is_extended else 'ID'} as "
                            f"{other.info.dbc} message {other.info.name}, which is kept"
                        )
            self._bus_plans[bus] = plans
        return plans

    def _lookup(self, buses: tuple[str, ...]) -> _Lookup:
        lookup = self._lookups.get(buses)
        if lookup is None:
            plans = [(bus, key, plan) for bus in buses for key, plan in self._plans_of(bus).items()]
            lookup = _Lookup(buses, plans, [self.is_j1939(b) for b in buses])
            self._lookups[buses] = lookup
        return lookup

    def decode(self, batch: FrameBatch) -> DecodedBatch:
        """Decode every frame of `batch` that a DBC of its bus knows."""
        n = len(batch)
        lookup = self._lookup(batch.buses)
        code = self._identify(batch, lookup)
        # Frames grouped by code, undecoded ones first: a stable radix sort of one byte.
        if code.dtype == np.uint8:
            order = np.argsort(code, kind="stable")
            counts = code.take(order).searchsorted(lookup.code_range, side="right")
            counts[1:] -= counts[:-1]
        else:
            counts = np.bincount(code, minlength=lookup.codes)
            seen = np.flatnonzero(counts)
            if len(seen) <= 256:
                rank = np.zeros(lookup.codes, np.uint8)
                rank[seen] = np.arange(len(seen))
                order = np.argsort(rank.take(code), kind="stable")
            else:
                order = np.argsort(code, kind="stable")
        unknown, error, remote, transport, diagnostic = counts[:_FIRST_MESSAGE].tolist()
        first = unknown + error + remote + transport + diagnostic
        result = DecodedBatch(n, n - first, unknown + transport + diagnostic, error, remote)
        if transport or diagnostic:
            at = unknown + error + remote
            result.transport = order[at : at + transport]
            result.diagnostic = order[at + transport : first]
        if first == n:
            return result

        # Blocks of frames of one message; within a block, one segment per signal holding
        # its value in every frame of the block (signal-major, so each column is contiguous).
        rows = order[first:]
        counts = counts[_FIRST_MESSAGE:]
        blocks = np.flatnonzero(counts)
        block_set = lookup.block_set(blocks)
        frames_in = counts[blocks]
        frame_ends = np.cumsum(frames_in)
        frame_starts = frame_ends - frames_in
        segment_length = frames_in.take(block_set.segment_block)
        segment_ends = np.cumsum(segment_length)
        total = int(segment_ends[-1]) if len(segment_ends) else 0

        # The payload words of the decoded frames in block order, a row per word: little
        # endian, then big (each half only where a signal reads it).
        lengths = batch.length.take(rows)
        layout = lookup.layouts[max(0, min(WORDS, -(-int(lengths.max()) // 8)) - 1)]
        decoded = len(rows)
        # Copied in row order first: a stream that the CPU prefetches, where gathering
        # straight from the payloads in block order misses the cache on every frame.
        payload = batch.data.view("<u8")
        words = payload[:, 0].copy() if layout.words == 1 else payload[:, : layout.words].T.copy()
        little = words.take(rows, axis=-1)
        halves = [little] if layout.little else []
        if layout.big:
            halves.append(little.byteswap())
        table = (halves[0] if len(halves) == 1 else np.concatenate(halves)).reshape(-1)
        # Each value's cell in `table`: its signal's word row plus its frame.
        row_start = block_set.columns(layout) * decoded
        cell = np.repeat(
            frame_starts.take(block_set.segment_block)
            - (segment_ends - segment_length)
            + row_start,
            segment_length,
        )
        cell += _counting(total)
        bits = table.take(cell)
        # Parameters are constant along a segment: 1-D repeats are numpy's fastest fill.
        bits <<= np.repeat(block_set.shift_left, segment_length)
        bits >>= np.repeat(block_set.shift_right, segment_length)

        present: npt.NDArray[np.bool_] | None = None
        if (np.minimum.reduceat(lengths, frame_starts) < block_set.max_needed).any():
            frame = cell - np.repeat(row_start, segment_length)
            present = lengths.take(frame) >= np.repeat(block_set.needed, segment_length)
        fresh = present is None
        if fresh and block_set.irregular:
            present = np.ones(total, np.bool_)

        values_in = frames_in * block_set.signals_in
        value_ends = np.cumsum(values_in)
        result.blocks = [
            MessageBlock(bus, plan, batch, rows, bits, present, (f0, f1, v0, v1))
            for (bus, plan), f0, f1, v0, v1 in zip(
                block_set.plans,
                frame_starts.tolist(),
                frame_ends.tolist(),
                (value_ends - values_in).tolist(),
                value_ends.tolist(),
                strict=True,
            )
        ]
        for position in block_set.irregular:
            _irregular(result.blocks[position], table, layout, fresh)
        result.signals = total if present is None else int(np.count_nonzero(present))
        result.rows, result.bits, result.present = rows, bits, present
        result.text_blocks = block_set.text
        return result

    @staticmethod
    def _identify(batch: FrameBatch, lookup: _Lookup) -> npt.NDArray[np.unsignedinteger[Any]]:
        """Each frame's code: its message's, or why it is not decoded."""
        flags = batch.flags
        seen = int(np.bitwise_or.reduce(flags)) if len(batch) else 0
        # 32-bit arithmetic throughout: half the memory traffic of numpy's default int64.
        # Clamped unsigned, so that no ID, however wrong, reads outside its bus's table.
        slot = np.minimum(batch.can_id, np.uint32(0x800)).view(np.int32)
        bus = None if lookup.one_bus else batch.bus.astype(np.int32)
        if bus is not None:
            slot |= bus << 12
        by_pgn = seen & _EXTENDED and lookup.all_j1939
        if seen & _NOT_STANDARD and not by_pgn:
            slot |= np.left_shift((flags & _NOT_STANDARD) != 0, 11, dtype=np.int32)
        code = lookup.standard.take(slot)
        if by_pgn:
            # A frame's PGN slot is bits 8 to 25 of its ID, after its bus's table.
            pgn_slot = (batch.can_id.view(np.int32) >> 8) & (_PGN_SPACE - 1)
            if bus is not None:
                pgn_slot |= bus << 18
            extended = (flags & _NOT_STANDARD) == _EXTENDED  # extended data frames
            code = np.where(extended, lookup.pgns.take(pgn_slot), code)
        elif seen & _EXTENDED:
            _identify_extended(batch, lookup, code)
        # Last, as they override what the lookups found.
        if seen & _UNDECODABLE:
            code[(flags & _REMOTE) != 0] = _REMOTE_FRAME
            code[(flags & _ERROR) != 0] = _ERROR_FRAME
        return code


def _identify_extended(
    batch: FrameBatch, lookup: _Lookup, code: npt.NDArray[np.unsignedinteger[Any]]
) -> None:
    """The codes of extended data frames, in place, where not every bus is J1939."""
    can_id = batch.can_id.view(np.int32)
    rows = np.flatnonzero((batch.flags & _NOT_STANDARD) == _EXTENDED)
    if len(lookup.pgns):
        bus_slot = lookup.j1939_slot.take(batch.bus.take(rows))
        on = bus_slot >= 0
        j1939, bus_slot = rows[on], bus_slot[on]
        pgn_slot = (can_id[j1939] >> 8) & (_PGN_SPACE - 1)
        pgn_slot += bus_slot * _PGN_SPACE
        code[j1939] = lookup.pgns.take(pgn_slot)
        rows = rows[~on]
    if len(rows) and len(lookup.extended_keys):
        keys = (batch.bus[rows].astype(np.int64) << 32) | _EXTENDED_KEY | can_id[rows]
        last = len(lookup.extended_keys) - 1
        at = np.minimum(np.searchsorted(lookup.extended_keys, keys), last)
        found = lookup.extended_keys[at] == keys
        code[rows[found]] = lookup.extended_code[at[found]]


_Words = TypeVar("_Words", int, npt.NDArray[np.int64])


@dataclass(frozen=True, slots=True)
class _Layout:
    """A batch's table of payload words: `words` rows of each frame's words read little
    endian, then as many read big endian; a half that no signal reads is left out."""

    words: int
    little: bool
    big: bool

    @property
    def stride(self) -> int:
        return self.words * (int(self.little) + int(self.big))

    def column(self, word: _Words) -> _Words:
        """The table's row of payload word `word` (0..7 little endian, 8..15 big endian).
        Words past the table read its last word: only frames too short to carry them
        would need them."""
        big_at = self.words if self.little else 0
        return np.minimum(word % WORDS, self.words - 1) + (word >= WORDS) * big_at  # type: ignore[no-any-return]


_COUNTING = np.arange(0)


def _counting(count: int) -> npt.NDArray[np.int64]:
    """`np.arange(count)`, from a cache that grows: read only, never write to it."""
    global _COUNTING
    if len(_COUNTING) < count:
        _COUNTING = np.arange(max(count, 2 * len(_COUNTING)))
    return _COUNTING[:count]


def _irregular(
    block: MessageBlock, table: npt.NDArray[np.uint64], layout: _Layout, fresh: bool
) -> None:
    """The per-message part of decoding, in place: straddling signals, signals no frame can
    carry, and multiplexed signals. `fresh`: no frame is short, so every signal is present
    until this step says otherwise."""
    plan, bits, present = block.plan, block.bits, block.present
    assert present is not None  # allocated by decode() for every irregular block
    # `table` holds a row per payload word, of every decoded frame of the batch.
    words = table.reshape(layout.stride, -1)[:, block.frame_span[0] : block.frame_span[1]]
    for index, low, high, shift in plan.straddlers:
        joined = (words[layout.column(low)] >> np.uint64(shift)) | (
            words[layout.column(high)] << np.uint64(64 - shift)
        )
        joined &= np.uint64((1 << plan.signals[index].length) - 1)
        bits[index] = joined
    present[plan.never] = False
    for multiplexer in plan.multiplexers:
        info = plan.signals[multiplexer.parent]
        key = info.physical(info.raw_from_bits(bits[multiplexer.parent]))
        if key.dtype.kind == "f":
            key = np.trunc(key)  # cantools selects by int() of the scaled value
        selected = multiplexer.select(key, present[multiplexer.parent])
        # Each child has one multiplexer, so in a fresh block its row is this step's alone.
        if fresh:
            present[multiplexer.rows] = selected
        else:
            present[multiplexer.rows] &= selected
    present[plan.never] = False  # a child that no frame can carry stays absent


class BusDbcs(Protocol):
    """A bus as the config gives it: its name, its DBC files, whether it is J1939."""

    @property
    def name(self) -> str: ...
    @property
    def dbc(self) -> Sequence[Path]: ...
    @property
    def j1939(self) -> bool: ...


def bus_decoders(buses: Iterable[BusDbcs], cache_dir: Path | None = None) -> dict[str, Decoder]:
    """A decoder per bus, each with its own DBCs."""
    return {
        bus.name: Decoder(
            {ALL_BUSES: list(bus.dbc)}, [ALL_BUSES] if bus.j1939 else [], cache_dir=cache_dir
        )
        for bus in buses
    }
