"""A DBC message compiled once into array operations, and the columns it decodes into.

Every signal is read out of one 64-bit word of the payload: an aligned word of the frame
(the whole payload of a classic frame is word 0, read once per message) or, for CAN FD
signals that straddle an 8-byte boundary, a word read at the signal's own byte. The signals
that share a word are extracted together by one broadcast shift and one mask, so the cost
of a batch grows with the number of messages in it, not with the number of signals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.frames import MAX_PAYLOAD, FrameBatch

U64 = np.uint64
RawArray = npt.NDArray[np.uint64] | npt.NDArray[np.int64] | npt.NDArray[np.floating[Any]]
# Physical values: float64, or int64/uint64 for integer conversions, or object (Python int)
# where an integer conversion could overflow 64 bits.
PhysicalArray = npt.NDArray[Any]

_WORDS = MAX_PAYLOAD // 8
_FLOAT_DTYPES: dict[int, type[np.floating[Any]]] = {16: np.float16, 32: np.float32, 64: np.float64}


def _is_integral(value: float) -> bool:
    """cantools' own test for an integer conversion (int, or a float with no fraction)."""
    return isinstance(value, int) or float(value).is_integer()


@dataclass(frozen=True, slots=True)
class SignalInfo:
    """What the DBC says about a signal: its metadata and how raw becomes physical."""

    name: str
    start: int
    length: int
    byte_order: Literal["little_endian", "big_endian"]
    is_signed: bool
    is_float: bool
    scale: float
    offset: float
    unit: str | None
    choices: Mapping[int, str] | None
    multiplexer: str | None  # the signal that selects this one, if multiplexed
    multiplexer_ids: frozenset[int] | None
    is_multiplexer: bool

    @property
    def first_network_bit(self) -> int:
        """The lowest bit the signal occupies, counting bits in payload order."""
        if self.byte_order == "little_endian":
            return self.start
        return 8 * (self.start // 8) + 7 - self.start % 8

    @property
    def needed_bytes(self) -> int:
        """The shortest payload that carries the whole signal (cantools' truncation rule)."""
        return -(-(self.first_network_bit + self.length) // 8)

    @property
    def identity(self) -> bool:
        return self.scale == 1 and self.offset == 0

    @property
    def integer_physical(self) -> bool:
        """Physical values are integers: cantools returns int for these, so do we."""
        return not self.is_float and _is_integral(self.scale) and _is_integral(self.offset)

    def _raw_bound(self) -> int:
        return 1 << (self.length - 1 if self.is_signed else self.length)

    def physical(self, raw: RawArray) -> PhysicalArray:
        """raw * scale + offset, computed as cantools does, so values match bit for bit."""
        if self.is_float:
            # Widening a signalling NaN raises numpy's "invalid" flag; the NaN is kept as is.
            with np.errstate(invalid="ignore"):
                wide = raw.astype(np.float64)
            return wide if self.identity else wide * float(self.scale) + self.offset
        if self.identity:
            return raw
        if not _is_integral(self.scale):
            return raw.astype(np.float64) * float(self.scale) + self.offset
        # An integral scale multiplies exactly, as Python ints do in cantools.
        scale = int(self.scale)
        fits = self._raw_bound() * abs(scale) + abs(int(self.offset)) < 2**63
        product = raw.astype(np.int64) * scale if fits else raw.astype(object) * scale
        if _is_integral(self.offset):
            return product + int(self.offset)
        return product.astype(np.float64) + self.offset


@dataclass(frozen=True, slots=True)
class SignalColumn:
    """One signal's raw values for every frame of a message block.

    `present` is None when the signal is in every frame; otherwise it marks the frames
    that carry it (multiplexed signals, frames too short for it). Raw values of absent
    rows are meaningless.
    """

    info: SignalInfo
    raw: RawArray
    present: npt.NDArray[np.bool_] | None

    @property
    def name(self) -> str:
        return self.info.name

    def physical(self) -> PhysicalArray:
        return self.info.physical(self.raw)

    def count(self) -> int:
        return len(self.raw) if self.present is None else int(np.count_nonzero(self.present))


@dataclass(frozen=True, slots=True)
class MessageInfo:
    name: str
    frame_id: int
    is_extended: bool
    length: int
    dbc: str  # the file it came from


@dataclass(frozen=True, slots=True)
class MessageBlock:
    """The frames of one message on one bus in a batch, decoded to signal columns."""

    bus: str
    message: MessageInfo
    rows: npt.NDArray[np.intp]  # positions of these frames in the frame batch, ascending
    t_ns: npt.NDArray[np.int64]
    can_id: npt.NDArray[np.uint32]  # as received: on J1939 buses it keeps priority and source
    signals: list[SignalColumn]

    def __len__(self) -> int:
        return len(self.rows)

    def signal(self, name: str) -> SignalColumn:
        for column in self.signals:
            if column.name == name:
                return column
        raise KeyError(name)


@dataclass(slots=True)
class _WordGroup:
    """Signals read from the same 64-bit word by one broadcast shift and mask."""

    big_endian: bool
    byte: int  # where the word starts in the payload
    members: list[int] = field(default_factory=list)  # indices into the message's signals
    shifts: list[int] = field(default_factory=list)
    masks: list[int] = field(default_factory=list)
    sign_bits: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Straddler:
    """A signal of 58 to 64 bits that spans nine bytes: the word plus one more byte."""

    member: int
    big_endian: bool
    byte: int
    shift: int  # right shift of the word (little endian) or left shift (big endian)
    mask: int
    sign_bit: int


def _mask(length: int) -> int:
    return (1 << length) - 1


class MessagePlan:
    """A DBC message compiled into word groups, ready to decode rows of frame batches."""

    def __init__(self, info: MessageInfo, signals: list[SignalInfo]) -> None:
        self.info = info
        self.signals = signals
        groups: dict[tuple[bool, int], _WordGroup] = {}
        self._straddlers: list[_Straddler] = []
        # Signals that lie beyond 64 bytes can never be present: a bad DBC that cantools
        # loads with strict=False. They decode to nothing.
        self._impossible: set[int] = set()
        for index, signal in enumerate(signals):
            self._place(index, signal, groups)
        self._groups = list(groups.values())
        self._needed = np.array([s.needed_bytes for s in signals], np.int64)
        self._max_needed = int(self._needed.max()) if signals else 0
        by_name = {s.name: i for i, s in enumerate(signals)}
        # Parents before children, so a multiplexer's presence is known before its signals'.
        self._mux: list[tuple[int, int, npt.NDArray[np.int64]]] = []
        for index in sorted(range(len(signals)), key=lambda i: self._depth(i, by_name)):
            signal = signals[index]
            if signal.multiplexer is None:
                continue
            parent = by_name.get(signal.multiplexer)
            if parent is None or signal.multiplexer_ids is None:
                self._impossible.add(index)
                continue
            ids = np.array(sorted(signal.multiplexer_ids), np.int64)
            self._mux.append((index, parent, ids))

    def _depth(self, index: int, by_name: dict[str, int]) -> int:
        depth, seen = 0, {index}
        parent = self.signals[index].multiplexer
        while parent is not None and parent in by_name and by_name[parent] not in seen:
            seen.add(by_name[parent])
            depth += 1
            parent = self.signals[by_name[parent]].multiplexer
        return depth

    def _place(
        self, index: int, signal: SignalInfo, groups: dict[tuple[bool, int], _WordGroup]
    ) -> None:
        length = signal.length
        first = signal.first_network_bit
        last = first + length - 1  # in payload bit order: for Intel, bit k of byte k // 8
        unreadable_float = signal.is_float and length not in _FLOAT_DTYPES
        if length < 1 or length > 64 or last >= 8 * MAX_PAYLOAD or unreadable_float:
            self._impossible.add(index)
            return
        big = signal.byte_order == "big_endian"
        sign_bit = 1 << (length - 1) if signal.is_signed and not signal.is_float else 0
        if first // 64 == last // 64:
            byte = 8 * (first // 64)
        else:
            byte = min(first // 8, MAX_PAYLOAD - 8)
        if last - 8 * byte >= 64:
            if big:
                shift = last - (8 * byte + 63)
            else:
                shift = first - 8 * byte
            self._straddlers.append(_Straddler(index, big, byte, shift, _mask(length), sign_bit))
            return
        group = groups.setdefault((big, byte), _WordGroup(big, byte))
        group.members.append(index)
        group.shifts.append(8 * byte + 63 - last if big else first - 8 * byte)
        group.masks.append(_mask(length))
        group.sign_bits.append(sign_bit)

    def decode(self, batch: FrameBatch, rows: npt.NDArray[np.intp], bus: str) -> MessageBlock:
        """Decode the frames at `rows` of `batch`, all of which are this message."""
        n = len(rows)
        bits: list[npt.NDArray[np.uint64] | None] = [None] * len(self.signals)
        words_le = batch.data.view("<u8")
        for group in self._groups:
            word = self._word(batch, words_le, rows, group.big_endian, group.byte)
            values = word[:, None] >> np.array(group.shifts, U64)
            values &= np.array(group.masks, U64)
            if any(group.sign_bits):
                sign = np.array(group.sign_bits, U64)
                values ^= sign
                values -= sign
            for column, member in enumerate(group.members):
                bits[member] = values[:, column]
        for s in self._straddlers:
            word = self._word(batch, words_le, rows, s.big_endian, s.byte)
            extra = batch.data[rows, s.byte + 8].astype(U64)
            if s.big_endian:
                value = (word << U64(s.shift)) | (extra >> U64(8 - s.shift))
            else:
                value = (word >> U64(s.shift)) | (extra << U64(64 - s.shift))
            value &= U64(s.mask)
            if s.sign_bit:
                value ^= U64(s.sign_bit)
                value -= U64(s.sign_bit)
            bits[s.member] = value

        lengths = batch.length[rows]
        present: list[npt.NDArray[np.bool_] | None] = [None] * len(self.signals)
        if n and int(lengths.min()) < self._max_needed:
            fits = lengths[:, None] >= self._needed[None, :]
            for index in range(len(self.signals)):
                if not fits[:, index].all():
                    present[index] = fits[:, index]
        raws: list[RawArray] = []
        for index, signal in enumerate(self.signals):
            raw_bits = bits[index]
            if index in self._impossible:
                present[index] = np.zeros(n, np.bool_)
            raws.append(_typed(signal, np.zeros(n, U64) if raw_bits is None else raw_bits))
        for index, parent, ids in self._mux:
            # cantools selects by int() of the scaled multiplexer value.
            key = np.trunc(self.signals[parent].physical(raws[parent]).astype(np.float64))
            selected = np.isin(key, ids)
            for mask in (present[parent], present[index]):
                if mask is not None:
                    selected &= mask
            present[index] = selected
        return MessageBlock(
            bus=bus,
            message=self.info,
            rows=rows,
            t_ns=batch.t_ns[rows],
            can_id=batch.can_id[rows],
            signals=[SignalColumn(*c) for c in zip(self.signals, raws, present, strict=True)],
        )

    @staticmethod
    def _word(
        batch: FrameBatch,
        words_le: npt.NDArray[Any],
        rows: npt.NDArray[np.intp],
        big_endian: bool,
        byte: int,
    ) -> npt.NDArray[np.uint64]:
        if byte % 8 == 0:
            word = words_le[rows, byte // 8].astype(U64)
        else:
            word = (
                np.ascontiguousarray(batch.data[rows, byte : byte + 8])
                .view("<u8")[:, 0]
                .astype(U64)
            )
        swapped: npt.NDArray[np.uint64] = word.byteswap() if big_endian else word
        return swapped


def _typed(signal: SignalInfo, bits: npt.NDArray[np.uint64]) -> RawArray:
    if signal.is_float:
        dtype = _FLOAT_DTYPES[signal.length]
        width = np.dtype(dtype).itemsize
        return bits.astype(f"u{width}").view(dtype)
    if signal.is_signed:
        return bits.view(np.int64)
    return bits
