"""Text signals: a signal longer than 64 bits that starts and ends on byte boundaries, in
Intel byte order, is text, as the J1939 DBC gives VIN, ECU and software identification (up
to 200 characters) and a diagnostic answer its VIN. Its characters are ISO 8859-1 (J1939-71)
up to a NUL, the padding after them (0xFF, space) is not part of the value, and a `*` ends a
field: where several text signals share a start bit they are the consecutive fields of one
parameter (ECU identification's part number, serial number, location, type).

Text is never on the numeric path: the batch pass leaves text signals absent, and a message
that has any is read here, payload by payload, only when its values are asked for. Text
comes in identification messages and diagnostic answers, a few a second at most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from agent.decode.plan import SignalInfo

#: Bytes that pad a text field after its end (besides NUL, which ends it).
PADDING = b"\xff "

#: Text values of a column: a str per row, None where the row does not carry it.
TextArray = npt.NDArray[np.object_]


def payload_values(signals: list[SignalInfo], data: bytes) -> list[int | str | None]:
    """Each signal's bit field (or text) in a payload of any length; None where absent: a
    signal beyond the payload, or a multiplexed one that its multiplexer does not select."""
    little = int.from_bytes(data, "little")
    big = int.from_bytes(data, "big")
    size = 8 * len(data)
    values: list[int | str | None] = []
    fields = text_fields(signals, data)
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


def text_fields(signals: list[SignalInfo], data: bytes) -> dict[int, str | None]:
    """Each text signal's field: the k-th of the text signals sharing a start bit takes the
    k-th `*`-ended field there; the last of them takes the rest. A payload that ends inside
    a field gives what it holds of it; one that ends before it, None."""
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
        # A NUL ends the text (C strings; nor does PostgreSQL's text hold one).
        text = data[first:end].split(b"\0", 1)[0].rstrip(PADDING).decode("latin-1")
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


def frame_texts(
    signals: list[SignalInfo],
    columns: tuple[int, ...],
    data: npt.NDArray[np.uint8],
    length: npt.NDArray[np.uint8],
) -> dict[int, TextArray]:
    """The text `columns` of a message in frames (`data` a row per frame, `length` each
    frame's payload length): a column per text signal, None where a frame has none."""
    texts = {column: np.full(len(length), None, object) for column in columns}
    for row, (payload, size) in enumerate(zip(data, length.tolist(), strict=True)):
        values = payload_values(signals, payload[:size].tobytes())
        for column in columns:
            texts[column][row] = values[column]
    return texts


def text_present(values: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Which rows of a text column carry a value."""
    return np.array([value is not None for value in values.tolist()], np.bool_)
