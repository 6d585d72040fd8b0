"""Every signal layout: generated DBC files, each message one signal anywhere in its payload,
of any length from 1 to 64, Intel or Motorola, signed or not, integer or IEEE float, with any
scale and offset, in classic and CAN FD messages; decoded against cantools."""

from __future__ import annotations

from pathlib import Path

import cantools
from cantools.database.can import Message, Signal
from cantools.database.conversion import BaseConversion
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode import Decoder
from tests.oracle import batch_of, decoded_rows, load_cantools, mismatches, reference

FD_LENGTHS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64]


@st.composite
def signal_layout(draw: st.DrawFn) -> tuple[int, dict[str, object]]:
    """(message length, Signal keyword arguments) for a signal that fits the message."""
    is_float = draw(st.booleans()) and draw(st.booleans())
    length = draw(st.sampled_from([32, 64])) if is_float else draw(st.integers(1, 64))
    message_length = draw(st.sampled_from([n for n in FD_LENGTHS if 8 * n >= length]))
    first = draw(st.integers(0, 8 * message_length - length))  # lowest bit in payload order
    big_endian = draw(st.booleans())
    start = 8 * (first // 8) + 7 - first % 8 if big_endian else first
    scale = draw(st.sampled_from([1, 2, -1, 0.5, 0.1, -0.25, 1e-3, 3]))
    offset = draw(st.sampled_from([0, 1, -40, 0.5, -1000.25]))
    return message_length, {
        "start": start,
        "length": length,
        "byte_order": "big_endian" if big_endian else "little_endian",
        "is_signed": bool(draw(st.booleans())) and not is_float,
        "conversion": BaseConversion.factory(scale=scale, offset=offset, is_float=is_float),
    }


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(layouts=st.lists(signal_layout(), min_size=1, max_size=6), data=st.data())
def test_any_layout_decodes_as_cantools_does(
    tmp_path: Path, layouts: list[tuple[int, dict[str, object]]], data: st.DataObject
) -> None:
    messages = [
        Message(
            frame_id=0x100 + i,
            name=f"M{i}",
            length=length,
            signals=[Signal(name=f"S{i}", **options)],  # type: ignore[arg-type]
            is_fd=length > 8,
            strict=False,
        )
        for i, (length, options) in enumerate(layouts)
    ]
    path = tmp_path / "layouts.dbc"
    path.write_text(cantools.database.can.Database(messages).as_dbc_string())
    known = load_cantools(path)
    frames = []
    for i, (length, _) in enumerate(layouts):
        for payload in data.draw(
            st.lists(
                st.one_of(st.binary(min_size=length, max_size=length), st.binary(max_size=64)),
                min_size=1,
                max_size=5,
            )
        ):
            frames.append((i, payload))
    result = Decoder({"*": [path]}).decode(batch_of([(0x100 + i, False, p) for i, p in frames]))
    rows = decoded_rows(result)
    for row, (i, payload) in enumerate(frames):
        message = known.get_message_by_frame_id(0x100 + i)
        theirs = reference(message, payload)
        if theirs is None:
            continue
        name, ours = rows[row]
        assert name == message.name
        assert not mismatches(ours, theirs, message), (message.signals[0], payload.hex())
