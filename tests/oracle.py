"""cantools as the oracle: compare our decoded values with `decode_message`, value for value."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path
from typing import Any

import cantools
import numpy as np

from agent.decode import DecodedBatch
from agent.frames import FrameBatch, FrameFlag


def load_cantools(path: Path) -> Any:
    """cantools' database for a DBC file, loaded leniently as the decoder does."""
    return cantools.database.load_file(path, database_format="dbc", strict=False)


def same_value(ours: Any, reference: Any) -> bool:
    """Equal as cantools means it: ints as ints, floats bit for bit (NaN payloads too)."""
    if isinstance(reference, float):
        if not isinstance(ours, float | np.floating):
            return False
        return struct.pack("<d", float(ours)) == struct.pack("<d", reference)
    if isinstance(reference, int):
        return isinstance(ours, int | np.integer) and int(ours) == reference
    return bool(ours == reference)


def decoded_rows(result: DecodedBatch) -> dict[int, tuple[str, dict[str, Any]]]:
    """Row of the frame batch -> (message name, {signal: physical value}) for present signals."""
    rows: dict[int, tuple[str, dict[str, Any]]] = {}
    for block in result.blocks:
        columns = [(c.name, c.physical(), c.present) for c in block.signals]
        for k, row in enumerate(block.rows.tolist()):
            values = {
                name: values[k]
                for name, values, present in columns
                if present is None or present[k]
            }
            rows[row] = (block.message.name, values)
    return rows


def reference(message: Any, payload: bytes) -> dict[str, Any] | None:
    """cantools' decoding of one payload, or None where cantools refuses it."""
    try:
        decoded = message.decode(payload, decode_choices=False, allow_truncated=True)
    except (cantools.database.DecodeError, ValueError, KeyError):
        return None
    assert isinstance(decoded, dict)
    return decoded


def mismatches(ours: dict[str, Any], theirs: dict[str, Any], message: Any) -> list[str]:
    """Differences, leaving out the columns we keep where the DBC repeats a signal name
    (`NAME#2`...: cantools has one value for all of them, the first one's)."""
    names = Counter(s.name for s in message.signals)
    extra = {f"{n}#{k}" for n, count in names.items() for k in range(2, count + 1)}
    ours = {k: v for k, v in ours.items() if k not in extra}
    problems = [
        f"{k}: ours={ours.get(k)!r} cantools={theirs.get(k)!r}" for k in set(ours) ^ set(theirs)
    ]
    problems += [
        f"{k}: ours={ours[k]!r} cantools={theirs[k]!r}"
        for k in set(ours) & set(theirs)
        if not same_value(ours[k], theirs[k])
    ]
    return problems


def batch_of(frames: list[tuple[int, bool, bytes]], bus: str = "can0") -> FrameBatch:
    """A frame batch of (can_id, extended, payload) on one bus, 1 ms apart."""
    batch = FrameBatch.allocate(len(frames), (bus,))
    for row, (can_id, extended, payload) in enumerate(frames):
        batch.t_ns[row] = row * 1_000_000
        batch.can_id[row] = can_id
        fd = len(payload) > 8
        batch.flags[row] = (FrameFlag.EXTENDED if extended else 0) | (FrameFlag.FD if fd else 0)
        batch.length[row] = len(payload)
        batch.data[row, : len(payload)] = np.frombuffer(payload, np.uint8)
    return batch
