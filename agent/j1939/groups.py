"""Reassembled parameter groups decoded through the DBC, as single frames are.

A transfer carries up to 1,785 bytes, past the 64 of a frame batch's rows, and the J1939 DBC
gives text parameters (VIN, ECU and software identification) as 200-byte signals. Transfers
are few (a DM1 a second, an identification now and then), so each is decoded on its own,
its payload read as one Python integer, its text signals as agent.decode.text reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.decode import (
    DecodedBatch,
    Decoder,
    MessageBlock,
    MessageInfo,
    MessagePlan,
    SignalColumn,
)
from agent.decode.plan import text_column
from agent.decode.text import TextArray, payload_values
from agent.frames import FrameBatch, FrameFlag
from agent.j1939.transport import Reassembler, Transfer


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
    values = payload_values(plan.signals, transfer.data)
    present = np.array([[v is not None] for v in values], np.bool_)  # (signals, transfers)
    columns = []
    for k, (signal, value) in enumerate(zip(plan.signals, values, strict=True)):
        if signal.is_text:
            columns.append(text_column(signal, np.array([value], object)))
            continue
        assert not isinstance(value, str)  # only text signals have text
        raw = signal.raw_from_bits(np.array([value or 0], np.uint64))
        columns.append(SignalColumn(signal, raw, None if value is not None else present[k]))
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
    signals are absent from the numeric columns and given as the blocks' `texts`."""
    found: dict[
        tuple[str, int],
        tuple[MessagePlan, list[Transfer], list[list[int | None]], list[list[str | None]]],
    ] = {}
    for transfer in transfers:
        plan = decoder.message_of(transfer.bus, transfer.can_id)
        if plan is None:
            continue
        decoded = payload_values(plan.signals, transfer.data)
        values = [
            v if isinstance(v, int) and not (s.is_float and s.length not in (16, 32, 64)) else None
            for s, v in zip(plan.signals, decoded, strict=True)
        ]  # a float of another length is never present, as in frames (docs/wire-format.md)
        text = [v if isinstance(v, str) else None for v in (decoded[k] for k in plan.text)]
        if all(v is None for v in values) and all(v is None for v in text):
            continue
        entry = found.setdefault((transfer.bus, id(plan)), (plan, [], [], []))
        entry[1].append(transfer)
        entry[2].append(values)
        entry[3].append(text)
    if not found:
        return None
    count = sum(len(entry[1]) for entry in found.values())
    channels = tuple(dict.fromkeys(bus for bus, _ in found))
    frames = FrameBatch.allocate(count, channels)
    frames.flags[:] = FrameFlag.EXTENDED
    bits, present, spans = [], [], []
    row = value = 0
    text_of: list[dict[int, TextArray]] = []
    for (bus, _), (plan, kept, by_transfer, texts) in found.items():
        end = row + len(kept)
        frames.t_ns[row:end] = [t.t_ns for t in kept]
        frames.can_id[row:end] = [t.can_id for t in kept]
        frames.bus[row:end] = channels.index(bus)
        # (signals, transfers), signal-major as a decoder's blocks are
        bits.append(np.array([[v or 0 for v in r] for r in by_transfer], np.uint64).T.reshape(-1))
        carried = [[v is not None for v in r] for r in by_transfer]
        present.append(np.array(carried, np.bool_).T.reshape(-1))
        spans.append((bus, plan, (row, end, value, value + len(bits[-1]))))
        by_signal = np.array(texts, object).reshape(len(kept), len(plan.text)).T
        text_of.append(dict(zip(plan.text, by_signal, strict=True)))
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
            MessageBlock(bus, plan, frames, rows, all_bits, kept_present, span, texts)
            for (bus, plan, span), texts in zip(spans, text_of, strict=True)
        ],
        rows=rows,
        bits=all_bits,
        present=kept_present,
        text_blocks=[k for k, (_, plan, _) in enumerate(spans) if plan.text],
    )
