"""Decoded frames as text records: JSON Lines or CSV, one record per frame in the log's order.

JSON Lines: `{"t": 46408.58493, "bus": "can0", "id": 608, "message": "STEER_TORQUE_SENSOR",
"signals": {"STEER_TORQUE_DRIVER": -12.0}}` with `"ext": true` after `id` on extended frames.
CSV: one row per signal value, `t,bus,id,ext,message,signal,value`.

The text is built column by column (one formatted list per signal), then joined per row:
formatting is the costly part of writing records, and it is cheapest done in bulk.
"""

from __future__ import annotations

import abc
import csv
import json
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TextIO

import numpy as np
import numpy.typing as npt

from agent.decode import SignalColumn
from agent.frames import FrameBatch, FrameFlag


class Message(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def is_extended(self) -> bool: ...


class Block(Protocol):
    """The frames of one message: a decoder's `MessageBlock`, or one received off the wire."""

    @property
    def bus(self) -> str: ...
    @property
    def message(self) -> Message: ...
    @property
    def t_ns(self) -> npt.NDArray[np.int64]: ...
    @property
    def can_id(self) -> npt.NDArray[np.uint32]: ...
    @property
    def signals(self) -> list[SignalColumn]: ...
    @property
    def present(self) -> npt.NDArray[np.bool_] | None: ...
    @property
    def rows(self) -> npt.NDArray[np.intp]: ...
    def __len__(self) -> int: ...


def _number(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)  # a text signal (J1939 identification)
    if isinstance(value, float):
        # JSON has no NaN or infinity; null keeps every line valid JSON.
        return repr(value) if math.isfinite(value) else "null"
    return str(value)


def seconds_text(t_ns: npt.NDArray[np.int64]) -> list[str]:
    """Timestamps in seconds as exact decimal text: the log's own digits, not a float's."""
    # Of the magnitude: divmod floors, which would write -0.1 s as -1 + 0.9.
    whole, fraction = np.divmod(np.abs(t_ns), 1_000_000_000)
    return [
        ("-" if negative else "") + (f"{w}.{f:09d}".rstrip("0") if f else f"{w}.0")
        for negative, w, f in zip(
            (t_ns < 0).tolist(), whole.tolist(), fraction.tolist(), strict=True
        )
    ]


def column_text(column: SignalColumn, choices: bool) -> list[str]:
    """The JSON text of every value of a column (choice names as JSON strings)."""
    values = [_number(v) for v in column.physical().tolist()]
    names = column.info.choices
    if choices and names:
        raw = (
            np.trunc(column.raw.astype(np.float64)).tolist()
            if column.info.is_float
            else column.raw.tolist()
        )
        for k, key in enumerate(raw):
            name = names.get(int(key)) if math.isfinite(key) else None
            if name is not None:
                values[k] = json.dumps(name)
    return values


def _present_rows(block: Block) -> list[list[int]]:
    """For each frame of the block, the indices of the signal columns it carries."""
    matrix = block.present
    if matrix is None:
        return [list(range(len(block.signals)))] * len(block)
    # A decoder's block leaves text absent from its numeric presence: its columns say it.
    texts = [(k, c.present) for k, c in enumerate(block.signals) if c.raw.dtype == object]
    if texts:
        matrix = matrix.copy()
        for k, present in texts:
            matrix[k] = True if present is None else present
    return [np.flatnonzero(row).tolist() for row in matrix.T]


class Captured(Protocol):
    """Raw frames a collection rule kept, as received off the wire."""

    @property
    def rule(self) -> str: ...
    @property
    def frames(self) -> FrameBatch: ...
    @property
    def rows(self) -> npt.NDArray[np.intp]: ...


class RecordWriter(abc.ABC):
    """Writes the decoded frames of each batch as text records, in frame order."""

    name: ClassVar[str]

    def __init__(self, out: TextIO, *, choices: bool = False, vehicle: str | None = None) -> None:
        self.out = out
        self.choices = choices
        self.vehicle = vehicle

    def write(
        self, blocks: Sequence[Block], raw: Sequence[Captured] = (), after: Sequence[Block] = ()
    ) -> None:
        """The frames of a batch's blocks (and raw frames), in the batch's frame order
        (`rows`); then, each after the frame of its row, records that several frames made
        (J1939 transfers and their faults), several a row."""
        lines: dict[int, str] = {}
        for block in blocks:
            lines.update(zip(block.rows.tolist(), self.block_lines(block), strict=True))
        for block in after:
            for row, line in zip(block.rows.tolist(), self.block_lines(block), strict=True):
                lines[row] = lines.get(row, "") + line
        for capture in raw:
            lines.update(zip(capture.rows.tolist(), self.raw_lines(capture), strict=True))
        self.out.write("".join(lines[row] for row in sorted(lines)))

    def raw_lines(self, capture: Captured) -> list[str]:
        raise NotImplementedError(f"{self.name} records do not hold raw frames")

    @abc.abstractmethod
    def block_lines(self, block: Block) -> list[str]:
        """The text of each frame of a block, newline included."""


class JsonLinesWriter(RecordWriter):
    name = "jsonl"

    def block_lines(self, block: Block) -> list[str]:
        info = block.message
        ext = ', "ext": true' if info.is_extended else ""
        vehicle = "" if self.vehicle is None else f', "vehicle": {json.dumps(self.vehicle)}'
        middle = f'{vehicle}, "bus": {json.dumps(block.bus)}, "id": '
        # Blocks off the wire say which collection rule kept them; a decoder's do not.
        rule = getattr(block, "rule", "")
        kept = f', "rule": {json.dumps(rule)}' if rule else ""
        window = getattr(block, "window_ms", 0)
        kept += f', "window_ms": {window}' if window else ""
        tail = f'{ext}, "message": {json.dumps(info.name)}{kept}, "signals": {{'
        pairs = [
            [f"{json.dumps(c.name)}: {v}" for v in column_text(c, self.choices)]
            for c in block.signals
        ]
        times = seconds_text(block.t_ns)
        ids = block.can_id.tolist()
        return [
            f'{{"t": {t}{middle}{i}{tail}{", ".join(pairs[c][k] for c in carried)}}}}}\n'
            for k, (t, i, carried) in enumerate(zip(times, ids, _present_rows(block), strict=True))
        ]

    def raw_lines(self, capture: Captured) -> list[str]:
        """`{"t": ..., "bus": "can0", "id": 608, "rule": "log", "data": "00ff"}`, with
        `"ext": true` and `"flags"` (FrameFlag bits beyond extended) where they apply."""
        frames = capture.frames
        vehicle = "" if self.vehicle is None else f', "vehicle": {json.dumps(self.vehicle)}'
        head = f'{vehicle}, "bus": {json.dumps(frames.buses[0])}, "id": '
        rule = f', "rule": {json.dumps(capture.rule)}'
        lines = []
        rows = zip(
            seconds_text(frames.t_ns),
            frames.can_id.tolist(),
            frames.flags.tolist(),
            frames.length.tolist(),
            strict=True,
        )
        for k, (t, can_id, flags, length) in enumerate(rows):
            ext = ', "ext": true' if flags & FrameFlag.EXTENDED else ""
            other = flags & ~FrameFlag.EXTENDED
            more = f', "flags": {other}' if other else ""
            data = frames.data[k, :length].tobytes().hex()
            lines.append(f'{{"t": {t}{head}{can_id}{ext}{rule}{more}, "data": "{data}"}}\n')
        return lines


class CsvWriter(RecordWriter):
    name = "csv"
    HEADER = ("t", "bus", "id", "ext", "message", "signal", "value")

    def __init__(self, out: TextIO, *, choices: bool = False, vehicle: str | None = None) -> None:
        super().__init__(out, choices=choices, vehicle=vehicle)
        header = self.HEADER if vehicle is None else ("t", "vehicle", *self.HEADER[1:])
        csv.writer(out, lineterminator="\n").writerow(header)

    def block_lines(self, block: Block) -> list[str]:
        info = block.message
        vehicle = "" if self.vehicle is None else f"{_csv_field(self.vehicle)},"
        source = f"{vehicle}{_csv_field(block.bus)},"
        message = f",{int(info.is_extended)},{_csv_field(info.name)},"
        names = [_csv_field(c.name) for c in block.signals]
        values = [[_csv_value(v) for v in column_text(c, self.choices)] for c in block.signals]
        times = seconds_text(block.t_ns)
        ids = block.can_id.tolist()
        lines = []
        for k, (t, i, carried) in enumerate(zip(times, ids, _present_rows(block), strict=True)):
            head = f"{t},{source}{i}{message}"
            lines.append("".join(f"{head}{names[c]},{values[c][k]}\n" for c in carried))
        return lines


def _csv_value(text: str) -> str:
    """A JSON value's text as a CSV field: strings unquoted from JSON, null as empty."""
    if text.startswith('"'):
        return _csv_field(json.loads(text))
    return "" if text == "null" else text


def _csv_field(text: str) -> str:
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


WRITERS: dict[str, type[RecordWriter]] = {w.name: w for w in (JsonLinesWriter, CsvWriter)}
