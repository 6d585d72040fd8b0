"""Reassembled parameter groups decoded through the DBC, as single frames are.

A transfer carries up to 1,785 bytes, past the 64 of a frame batch's rows, and the J1939 DBC
gives text parameters (VIN, ECU and software identification) as 200-byte signals. Transfers
are few (a DM1 a second, an identification now and then), so each is decoded on its own,
its payload read as one Python integer. A signal longer than 64 bits that starts and ends
on byte boundaries is text: ISO 8859-1 characters, each field ended by `*` (J1939-71), where
several text signals that share a start bit are the consecutive fields of one parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.decode import (
    DecodedBatch,
    Decoder,
    MessageBlock,
    MessageInfo,
    MessagePlan,
    SignalColumn,
    SignalInfo,
)
from agent.frames import FrameBatch, FrameFlag
from agent.j1939.transport import Reassembler, Transfer

#: Bytes that pad a text field after its end.
_PADDING = b"\x00\xff "


@dataclass(frozen=True, slots=True)
class GroupBlock:
    """Records that are not single frames, in the shape of a decoder's message block (the
    record writers' `Block`): each row is one transfer, or one fault of a transfer."""

    bus: str
    message: MessageInfo
    t_ns: npt.NDArray[np.int64]
    can_id: npt.NDArray[np.uint32]
    signals: list[SignalColumn]
    present: npt.NDArray[np.bool_] | None
    rows: npt.NDArray[np.intp]

    def __len__(self) -> int:
        return len(self.t_ns)


def decode_transfer(decoder: Decoder, transfer: Transfer) -> GroupBlock | None:
    """The transfer decoded with its bus's DBCs, or None where none defines its PGN."""
    plan = decoder.message_of(transfer.bus, transfer.can_id)
    if plan is None:
        return None
    values = _values(plan.signals, transfer.data)
    present = np.array([[v is not None] for v in values], np.bool_)  # (signals, transfers)
    columns = []
    for k, (signal, value) in enumerate(zip(plan.signals, values, strict=True)):
        info = signal
        if isinstance(value, str):
            # Text has no scale: its column's physical value is the text itself.
            info = replace(signal, scale=1, offset=0, is_signed=False, is_float=False)
            raw: npt.NDArray[Any] = np.array([value], object)
        else:
            raw = signal.raw_from_bits(np.array([value or 0], np.uint64))
        columns.append(SignalColumn(info, raw, None if value is not None else present[k]))
    return GroupBlock(
        transfer.bus,
        plan.info,
        np.array([transfer.t_ns], np.int64),
        np.array([transfer.can_id], np.uint32),
        columns,
        None if present.all() else present,
        np.zeros(1, np.intp),
    )


@dataclass(frozen=True, slots=True)
class Groups:
    """What a batch's transport frames completed: every transfer, and those whose groups
    the DBCs define, decoded (None: none)."""

    transfers: list[Transfer]
    decoded: DecodedBatch | None


class GroupReader:
    """The J1939 groups of a stream of batches, bus by bus: each bus's transfers reassembled
    from its first transport frame on and decoded through its DBCs. A bus that never carried
    a transport frame costs a lookup per batch."""

    def __init__(self) -> None:
        self.reassemblers: dict[str, Reassembler] = {}

    def read(
        self, decoder: Decoder, bus: str, frames: FrameBatch, decoded: DecodedBatch
    ) -> Groups | None:
        """The transfers that `frames` (which `decoder` made `decoded` of) complete, with
        their groups as `decode_groups` gives them; None when there are none."""
        reassembler = self.reassemblers.get(bus)
        if reassembler is None:
            if not len(decoded.transport):
                return None
            reassembler = self.reassemblers[bus] = Reassembler()
        transfers = reassembler.feed(frames, decoded.transport)
        return Groups(transfers, decode_groups(decoder, transfers)) if transfers else None


def decode_groups(decoder: Decoder, transfers: Sequence[Transfer]) -> DecodedBatch | None:
    """The transfers that the decoder's DBCs define, as a decoded batch of their own for the
    wire and the collection rules: a block per channel and message, a row per transfer with
    its time (that of its last frame) and its group's ID, over frames made for them. Text
    signals are absent from every row, as a wire column holds 64 bits, and a group of text
    alone has no row."""
    found: dict[tuple[str, int], tuple[MessagePlan, list[Transfer], list[list[int | None]]]] = {}
    for transfer in transfers:
        plan = decoder.message_of(transfer.bus, transfer.can_id)
        if plan is None:
            continue
        values = [
            v if isinstance(v, int) and not (s.is_float and s.length not in (16, 32, 64)) else None
            for s, v in zip(plan.signals, _values(plan.signals, transfer.data), strict=True)
        ]  # a float of another length is never present, as in frames (docs/wire-format.md)
        if all(v is None for v in values):
            continue  # text alone (a VIN): nothing a column holds
        entry = found.setdefault((transfer.bus, id(plan)), (plan, [], []))
        entry[1].append(transfer)
        entry[2].append(values)
    if not found:
        return None
    count = sum(len(kept) for _, kept, _ in found.values())
    channels = tuple(dict.fromkeys(bus for bus, _ in found))
    frames = FrameBatch.allocate(count, channels)
    frames.flags[:] = FrameFlag.EXTENDED
    bits, present, spans = [], [], []
    row = value = 0
    for (bus, _), (plan, kept, by_transfer) in found.items():
        end = row + len(kept)
        frames.t_ns[row:end] = [t.t_ns for t in kept]
        frames.can_id[row:end] = [t.can_id for t in kept]
        frames.bus[row:end] = channels.index(bus)
        # (signals, transfers), signal-major as a decoder's blocks are
        bits.append(np.array([[v or 0 for v in r] for r in by_transfer], np.uint64).T.reshape(-1))
        carried = [[v is not None for v in r] for r in by_transfer]
        present.append(np.array(carried, np.bool_).T.reshape(-1))
        spans.append((bus, plan, (row, end, value, value + len(bits[-1]))))
        row, value = end, value + len(bits[-1])
    all_bits, all_present = np.concatenate(bits), np.concatenate(present)
    rows = np.arange(count, dtype=np.intp)
    kept_present = None if all_present.all() else all_present
    return DecodedBatch(
        frames=count,
        decoded=count,
        unknown=0,
        error_frames=0,
        remote_frames=0,
        signals=int(all_present.sum()),
        blocks=[
            MessageBlock(bus, plan, frames, rows, all_bits, kept_present, span)
            for bus, plan, span in spans
        ],
        rows=rows,
        bits=all_bits,
        present=kept_present,
    )


def _values(signals: list[SignalInfo], data: bytes) -> list[int | str | None]:
    """Each signal's bit field (or text) in a transfer's payload; None where absent."""
    little = int.from_bytes(data, "little")
    big = int.from_bytes(data, "big")
    size = 8 * len(data)
    values: list[int | str | None] = []
    fields = _text_fields(signals, data)
    for index, signal in enumerate(signals):
        if index in fields:
            values.append(fields[index])
        elif signal.length > 64 or signal.needed_bytes > len(data):
            values.append(None)
        elif signal.byte_order == "little_endian":
            values.append((little >> signal.start) & ((1 << signal.length) - 1))
        else:
            low = size - signal.first_network_bit - signal.length
            values.append((big >> low) & ((1 << signal.length) - 1))
    _select_multiplexed(signals, values)
    return values


def _text_fields(signals: list[SignalInfo], data: bytes) -> dict[int, str | None]:
    """Each text signal's field: the k-th of the text signals sharing a start bit takes the
    k-th `*`-ended field there; the last of them takes the rest."""
    by_start: dict[int, list[int]] = {}
    for index, signal in enumerate(signals):
        if signal.is_text:
            by_start.setdefault(signal.start, []).append(index)
    found: dict[int, str | None] = {}
    for start, members in by_start.items():
        first = start // 8
        if first >= len(data):
            found.update(dict.fromkeys(members))
            continue
        end = first + max(signals[i].length for i in members) // 8
        text = data[first:end].rstrip(_PADDING).decode("latin-1")
        parts = text.split("*")
        if parts and parts[-1] == "":
            parts.pop()  # the delimiter ends the last field too
        for k, index in enumerate(members):
            last = k == len(members) - 1
            found[index] = "*".join(parts[k:]) if last else (parts[k] if k < len(parts) else None)
    return found


def _select_multiplexed(signals: list[SignalInfo], values: list[int | str | None]) -> None:
    """Clears, in place, the multiplexed signals that their multiplexer does not select."""
    by_name = {s.name: i for i, s in enumerate(signals)}
    for index, signal in enumerate(signals):
        if signal.multiplexer is None:
            continue
        parent = by_name.get(signal.multiplexer)
        key = values[parent] if parent is not None else None
        if parent is None or not isinstance(key, int) or signal.multiplexer_ids is None:
            values[index] = None
            continue
        scaled = int(key * signals[parent].scale + signals[parent].offset)
        if scaled not in signal.multiplexer_ids:
            values[index] = None
