"""A DBC message compiled once into extraction parameters, and the columns it decodes into.

A signal is a bit field of the payload read as one 512-bit integer, little endian for Intel
signals and big endian for Motorola ones. Nearly every signal lies inside one aligned 64-bit
word of that integer, and is read by two shifts: left, to put its top bit at bit 63, then
right, to put its lowest bit at bit 0. Those two numbers per signal (and which word) are
all the decoder needs, so it can decode every signal of every frame in a batch in one pass.
What it keeps is each signal's bit field as an unsigned integer; a signed signal's field is
read as two's complement when its column is read. The few CAN FD signals that straddle two
words are read from both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from agent.decode.text import TextArray, frame_texts, text_present
from agent.frames import MAX_PAYLOAD, FrameBatch

RawArray = npt.NDArray[np.uint64] | npt.NDArray[np.int64] | npt.NDArray[np.floating[Any]]
# A column's values: raw numbers, or text (str, None where absent; agent.decode.text).
ColumnArray = RawArray | npt.NDArray[np.object_]
# Physical values: float64, or int64/uint64 for integer conversions, or object (Python int)
# where an integer conversion could overflow 64 bits.
PhysicalArray = npt.NDArray[Any]

#: 64-bit words in a payload.
WORDS = MAX_PAYLOAD // 8
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
    minimum: float | None = None  # the DBC's physical range, where it gives one
    maximum: float | None = None

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
    def is_text(self) -> bool:
        """Longer than a number and on byte boundaries (agent.decode.text): J1939's text
        parameters (VIN, ECU and software identification) are given so, as fields of up to
        200 characters."""
        return (
            self.length > 64
            and self.byte_order == "little_endian"
            and self.start % 8 == 0
            and self.length % 8 == 0
        )

    @property
    def identity(self) -> bool:
        return self.scale == 1 and self.offset == 0

    def raw_from_bits(self, bits: npt.NDArray[np.uint64]) -> RawArray:
        """Typed raw values from the signal's bit fields: unsigned, two's complement, or
        IEEE float (a float of a length that has none is never present: left as read)."""
        if self.is_float and self.length in _FLOAT_DTYPES:
            dtype = _FLOAT_DTYPES[self.length]
            return bits.astype(f"u{np.dtype(dtype).itemsize}").view(dtype)
        if self.is_signed:
            sign = np.uint64(1 << (self.length - 1))
            return ((bits ^ sign) - sign).view(np.int64)
        return bits

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
        bound = 1 << (self.length - 1 if self.is_signed else self.length)
        fits = bound * abs(scale) + abs(int(self.offset)) < 2**63
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
    raw: ColumnArray
    present: npt.NDArray[np.bool_] | None

    @property
    def name(self) -> str:
        return self.info.name

    def physical(self) -> PhysicalArray:
        if self.raw.dtype == object:
            return self.raw  # text is its own value
        return self.info.physical(cast(RawArray, self.raw))


def text_info(signal: SignalInfo) -> SignalInfo:
    """A text signal as its column describes it: text has no scale, so its column's physical
    value is the text itself."""
    return replace(signal, scale=1, offset=0, is_signed=False, is_float=False, choices=None)


def text_column(signal: SignalInfo, values: TextArray) -> SignalColumn:
    """A text signal's column: its str values (None where absent) and their presence."""
    present = text_present(values)
    return SignalColumn(text_info(signal), values, None if present.all() else present)


@dataclass(frozen=True, slots=True)
class MessageInfo:
    name: str
    frame_id: int
    is_extended: bool
    length: int
    dbc: str  # the file it came from
    cycle_time_ms: int | None = None  # GenMsgCycleTime, where the DBC gives it


class MessagePlan:
    """A DBC message compiled into per-signal extraction parameters.

    Word numbers count 64-bit words of the payload: 0..7 read little endian, 8..15 the
    same words read big endian.
    """

    def __init__(self, info: MessageInfo, signals: list[SignalInfo]) -> None:
        self.info = info
        self.signals = signals
        k = len(signals)
        self.word = np.zeros(k, np.int64)
        self.shift_left = np.zeros(k, np.uint64)
        self.shift_right = np.zeros(k, np.uint64)
        self.needed = np.array([s.needed_bytes for s in signals], np.int64)
        #: Signals that straddle two words: (index, low word, high word, shift).
        self.straddlers: list[tuple[int, int, int, int]] = []
        #: Signals that no frame can carry (a bad DBC loaded leniently), and why.
        self.never = np.zeros(k, np.bool_)
        self.problems: list[str] = []
        for index, signal in enumerate(signals):
            self._place(index, signal)
        self.max_needed = int(self.needed.max()) if k else 0
        #: The text signals (agent.decode.text), read apart from the numeric pass.
        self.text = tuple(i for i, s in enumerate(signals) if s.is_text)
        by_name = {s.name: i for i, s in enumerate(signals)}
        children: dict[int, list[int]] = {}
        for index, signal in enumerate(signals):
            if signal.multiplexer is None:
                continue
            parent = by_name.get(signal.multiplexer)
            if parent is None:
                self._refuse(index, f"its multiplexer {signal.multiplexer} is not in the message")
                continue
            if signal.multiplexer_ids is None:
                self._refuse(index, f"its multiplexer {signal.multiplexer} selects it by no value")
                continue
            children.setdefault(parent, []).append(index)
        #: One per multiplexer signal, parents before their children's multiplexers.
        self.multiplexers = [
            Multiplexer(parent, [(i, _ids(signals[i])) for i in members])
            for parent, members in sorted(
                children.items(), key=lambda p: self._depth(p[0], by_name)
            )
        ]

    def _depth(self, index: int, by_name: dict[str, int]) -> int:
        depth, seen = 0, {index}
        parent = self.signals[index].multiplexer
        while parent is not None and parent in by_name and by_name[parent] not in seen:
            seen.add(by_name[parent])
            depth += 1
            parent = self.signals[by_name[parent]].multiplexer
        return depth

    def _refuse(self, index: int, reason: str) -> None:
        self.never[index] = True
        self.problems.append(f"signal {self.signals[index].name} is never decoded: {reason}")

    def _place(self, index: int, signal: SignalInfo) -> None:
        length = signal.length
        first = signal.first_network_bit
        last = first + length - 1  # bit numbers in payload order, as for `first`
        if signal.is_text:
            # Absent from the numeric pass: its text is read apart (MessageBlock.texts).
            self.never[index] = True
            return
        if not 1 <= length <= 64:
            self._refuse(index, f"{length} bits long")
            return
        if last >= 8 * MAX_PAYLOAD:
            self._refuse(index, f"it ends past byte {MAX_PAYLOAD}")
            return
        if signal.is_float and length not in _FLOAT_DTYPES:
            self._refuse(index, f"an IEEE float of {length} bits")
            return
        big = signal.byte_order == "big_endian"
        # The position of the signal's lowest bit in the payload read as one integer.
        low = 8 * MAX_PAYLOAD - 1 - last if big else first
        word, shift = divmod(low, 64)
        if big:
            word = WORDS - 1 - word  # big endian: word 0 holds the most significant bits
        self.word[index] = word + (WORDS if big else 0)
        if shift + length <= 64:
            self.shift_left[index] = 64 - shift - length
            self.shift_right[index] = 64 - length
        else:
            # Read from two words by the per-message step, which replaces what the batch
            # pass reads for it.
            high = word - 1 if big else word + 1
            self.straddlers.append(
                (index, int(self.word[index]), high + (WORDS if big else 0), shift)
            )


def _ids(signal: SignalInfo) -> frozenset[int]:
    assert signal.multiplexer_ids is not None  # signals without ids are never present
    return signal.multiplexer_ids


class Multiplexer:
    """A multiplexer signal and the signals it selects, with a table from each selector
    value to the children it selects, so one lookup serves them all."""

    def __init__(self, parent: int, children: list[tuple[int, frozenset[int]]]) -> None:
        self.parent = parent
        self.children = np.array([index for index, _ in children], np.intp)
        #: The children's rows in a block: a slice where they are consecutive signals.
        self.rows: slice | npt.NDArray[np.intp] = self.children
        if len(self.children) and (np.diff(self.children) == 1).all():
            self.rows = slice(int(self.children[0]), int(self.children[-1]) + 1)
        ids = [i for _, selected in children for i in selected]
        self.table: npt.NDArray[np.bool_] | None = None
        self.ids = [np.array(sorted(selected), np.int64) for _, selected in children]
        #: Where each child has one selector value: those values, compared in one step.
        self.single: npt.NDArray[np.unsignedinteger[Any]] | None = None
        if ids and all(0 <= i < 1 << 16 for i in ids):
            # (children, values): the last column stands for every value outside the table.
            self.table = np.zeros((len(children), max(ids) + 2), np.bool_)
            for row, (_, selected) in enumerate(children):
                self.table[row, sorted(selected)] = True
            # Narrow enough for the column past the last value too.
            columns = self.table.shape[1]
            self.column_dtype = (
                np.uint8 if columns <= 1 << 8 else np.uint16 if columns <= 1 << 16 else np.uint32
            )
            if all(len(selected) == 1 for _, selected in children):
                self.single = np.array(
                    [[min(selected)] for _, selected in children], self.column_dtype
                )

    def select(
        self, key: npt.NDArray[Any], carried: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.bool_]:
        """(children, frames): which child each frame's multiplexer value (an integer)
        selects, in the frames that carry the multiplexer."""
        if self.table is None:
            selected = np.array([np.isin(key, ids) for ids in self.ids])
            selected = selected.reshape(len(self.ids), -1)
            selected &= carried
            return selected
        outside = self.table.shape[1] - 1
        column = np.where((key >= 0) & (key < outside), key, outside).astype(self.column_dtype)
        if not carried.all():
            column[~carried] = outside
        if self.single is not None:
            # A comparison of narrow integers: far cheaper than gathering from the table.
            equal: npt.NDArray[np.bool_] = self.single == column
            return equal
        return self.table.take(column.astype(np.intp), axis=1)


class MessageBlock:
    """The frames of one message on one bus in a batch, decoded to signal columns."""

    __slots__ = (
        "_batch_bits",
        "_batch_present",
        "_columns",
        "_rows",
        "_span",
        "_texts",
        "batch",
        "bus",
        "plan",
    )

    def __init__(
        self,
        bus: str,
        plan: MessagePlan,
        batch: FrameBatch,
        rows: npt.NDArray[np.intp],
        bits: npt.NDArray[np.uint64],
        present: npt.NDArray[np.bool_] | None,
        span: tuple[int, int, int, int],
        texts: dict[int, TextArray] | None = None,
    ) -> None:
        """`rows`, `bits` and `present` are the whole decoded batch's, shared by its blocks;
        `span` is this block's part: (first frame, end frame, first value, end value).
        Slicing waits until asked: most consumers touch only some of a block's parts.
        `texts`: the text signals' values where the frames cannot hold them (J1939
        transfers); otherwise they are read from the frames when asked."""
        self.bus = bus
        self.plan = plan
        self.batch = batch
        self._rows = rows
        self._batch_bits = bits  # signal-major: one signal in every frame, then the next
        self._batch_present = present
        self._span = span
        self._columns: list[SignalColumn] | None = None
        self._texts = texts

    @property
    def texts(self) -> dict[int, TextArray]:
        """Each text signal's values, by its index in the plan: a str per frame, None where
        the frame has none. `bits` and `present` leave text signals absent."""
        if self._texts is None:
            if self.plan.text:
                rows = self.rows
                self._texts = frame_texts(
                    self.plan.signals,
                    self.plan.text,
                    self.batch.data[rows],
                    self.batch.length[rows],
                )
            else:
                self._texts = {}
        return self._texts

    @property
    def frame_span(self) -> tuple[int, int]:
        """Where this block's frames are among the decoded frames of its batch."""
        return self._span[0], self._span[1]

    @property
    def rows(self) -> npt.NDArray[np.intp]:
        """Positions of these frames in the frame batch, ascending."""
        return self._rows[self._span[0] : self._span[1]]

    @property
    def bits(self) -> npt.NDArray[np.uint64]:
        """(signals, frames): each signal's bit field, as an unsigned integer."""
        f0, f1, s0, s1 = self._span
        return self._batch_bits[s0:s1].reshape(len(self.plan.signals), f1 - f0)

    @property
    def present(self) -> npt.NDArray[np.bool_] | None:
        """(signals, frames), or None when every signal is in every frame."""
        if self._batch_present is None:
            return None
        f0, f1, s0, s1 = self._span
        return self._batch_present[s0:s1].reshape(len(self.plan.signals), f1 - f0)

    @property
    def t_ns(self) -> npt.NDArray[np.int64]:
        return self.batch.t_ns[self.rows]

    @property
    def can_id(self) -> npt.NDArray[np.uint32]:
        """As received: on J1939 buses it keeps the priority and the source address."""
        return self.batch.can_id[self.rows]

    def __len__(self) -> int:
        return self._span[1] - self._span[0]

    @property
    def message(self) -> MessageInfo:
        return self.plan.info

    @property
    def signals(self) -> list[SignalColumn]:
        if self._columns is None:
            columns = []
            bits, matrix = self.bits, self.present
            for j, info in enumerate(self.plan.signals):
                present = None
                if matrix is not None and not matrix[j].all():
                    present = matrix[j]
                columns.append(SignalColumn(info, info.raw_from_bits(bits[j]), present))
            for j, values in self.texts.items():
                columns[j] = text_column(self.plan.signals[j], values)
            self._columns = columns
        return self._columns

    def signal(self, name: str) -> SignalColumn:
        for column in self.signals:
            if column.name == name:
                return column
        raise KeyError(name)
