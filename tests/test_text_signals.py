"""Text signals in frames (agent.decode.text): generated DBC files with a text signal
anywhere on byte boundaries of a CAN FD message, beside a number, and payloads of any text,
padding and length. cantools decodes a text signal as the integer of its bytes: that, turned
back into bytes and read by the rule written here from J1939-71, is the reference. And the
collection rules that take text, on the diagnostics' answers, through the wire."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cloud.parser import SchemaStore, parse_batch
from agent.collect import Collector
from agent.config import parse_config
from agent.decode import Decoder
from agent.diagnostics.pids import dbc_text
from agent.frames import FrameBatch
from agent.records import JsonLinesWriter
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import read_envelope
from tests.oracle import load_cantools

FRAME_ID = 0x123
#: The number beside the text: its first byte.
DBC = """VERSION ""

NS_ :

BS_:

BU_:

BO_ {frame_id} Identification: 64 Vector__XXX
 SG_ Count : 0|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ Name : {start}|{length}@1+ (1,0) [0|0] "" Vector__XXX
"""


def reference(field: bytes) -> str:
    """The text of a field's bytes: up to a NUL, without the 0xFF and spaces after it, each
    byte one ISO 8859-1 character."""
    text = field.split(b"\0")[0]
    while text and text[-1] in (0xFF, 0x20):
        text = text[:-1]
    return "".join(chr(b) for b in text)


@st.composite
def case(draw: st.DrawFn) -> tuple[int, int, list[bytes]]:
    """(first byte, bytes, payloads) of a text signal longer than 8 bytes and its frames."""
    first = draw(st.integers(1, 55))
    size = draw(st.integers(9, 64 - first))
    characters = st.binary(max_size=size).map(lambda b: bytes(c for c in b if c not in b"\0*"))
    padding = st.sampled_from([b"", b"\0", b"\xff", b" ", b"\0\xff\xff", b"  \xff"])
    payloads = []
    for _ in range(draw(st.integers(1, 12))):
        text = draw(characters) + draw(padding)
        field = text[:size].ljust(size, draw(st.sampled_from([b"\0", b"\xff", b" "])))
        payload = bytes([draw(st.integers(0, 255))]) + bytes(first - 1) + field
        payload += bytes(64 - len(payload))
        payloads.append(payload[: draw(st.sampled_from([1, first, first + 1, 64]))])
    return first, size, payloads


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case())
def test_a_text_signal_in_frames_reads_as_the_reference(
    tmp_path_factory: object, case: tuple[int, int, list[bytes]]
) -> None:
    first, size, payloads = case
    folder: Path = tmp_path_factory.mktemp("text")  # type: ignore[attr-defined]
    dbc = folder / "text.dbc"
    dbc.write_text(DBC.format(frame_id=FRAME_ID, start=8 * first, length=8 * size))
    frames = FrameBatch.allocate(len(payloads), ("can0",))
    frames.can_id[:] = FRAME_ID
    frames.t_ns[:] = np.arange(len(payloads))
    for k, payload in enumerate(payloads):
        frames.length[k] = len(payload)
        frames.data[k, : len(payload)] = np.frombuffer(payload, np.uint8)
    (block,) = Decoder({"can0": [dbc]}).decode(frames).blocks
    count, name = block.signals
    message = load_cantools(dbc).get_message_by_frame_id(FRAME_ID)
    for k, payload in enumerate(payloads):
        expected = None if len(payload) <= first else reference(payload[first : first + size])
        if len(payload) == 64:
            bits = message.decode(payload, decode_choices=False)["Name"]
            assert expected == reference(bits.to_bytes(size, "little"))
        assert name.raw[k] == expected
        assert name.present is None or name.present[k] == (expected is not None)
        assert count.raw[k] == payload[0]
    # The number's column is as before: the text is absent from the numeric pass.
    assert block.present is not None and not block.present[1].any()


def answers(rows: list[tuple[int, int, bytes]]) -> FrameBatch:
    """Diagnostic answer frames, (milliseconds, frame ID, data after the ECU's ID 0x7E8)."""
    frames = FrameBatch.allocate(len(rows), ("can0",))
    for k, (ms, frame_id, data) in enumerate(rows):
        payload = (0x7E8).to_bytes(4, "little") + data
        frames.t_ns[k], frames.can_id[k], frames.flags[k] = ms * 1_000_000, frame_id, 1
        frames.length[k] = len(payload)
        frames.data[k, : len(payload)] = np.frombuffer(payload, np.uint8)
    return frames


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            'mode = "all"\nsignals = ["VIN", "DTC", "Code"]',
            [
                ("VehicleIdentificationNumber", {"VIN": "1HGCM82633A004352"}),
                ("StoredDTC", {"Code": 0x0301, "DTC": "P0301"}),
                ("StoredDTC", {"Code": 0x0171}),
                ("StoredDTC", {"Code": 0x0420, "DTC": "P0420"}),
            ],
        ),
        (
            'mode = "sample"\nperiod_ms = 1000\nreduce = "last"\nsignals = ["DTC", "Code"]',
            # Each signal's last value of the first second, then of the second.
            [
                ("StoredDTC", {"DTC": "P0301"}),
                ("StoredDTC", {"Code": 0x0171}),
                ("StoredDTC", {"Code": 0x0420, "DTC": "P0420"}),
            ],
        ),
    ],
)
def test_rules_keep_text_of_frames_as_the_receiver_reads_it(
    tmp_path: Path, rule: str, expected: list[tuple[str, dict[str, object]]]
) -> None:
    dbc = tmp_path / "answers.dbc"
    dbc.write_text(dbc_text())
    frames = answers(
        [
            (0, 0x902, b"1HGCM82633A004352"),
            (100, 0x300, b"\x03\x01P0301\0\0\0\0"),
            (900, 0x300, b"\x01\x71"),  # an answer without the text
            (1100, 0x300, b"\x04\x20P0420\0\0\0\0"),
            (3000, 0x10C, b"\x1a\xf8"),  # closes the sample's periods
        ]
    )
    decoders = {"can0": Decoder({"can0": [dbc]})}
    text = (
        f'vehicle_id = "v"\n[[bus]]\nname = "can0"\nsource = "simulate"\ndbc = ["{dbc}"]\n'
        '[[collect]]\nname = "r"\n'
    )
    collector = Collector(parse_config(text + rule, "t.toml", tmp_path).collect, decoders)
    collected = collector.collect("can0", frames, decoders["can0"].decode(frames))
    collected.blocks += collector.flush().blocks
    encoder = BatchEncoder("v", "s", b"")
    wire = encoder.encode([collected], 1)
    assert wire is not None
    schemas = SchemaStore()
    schemas.add(read_envelope(encoder.announcement(wire.schema_id)), 1 << 20)
    received = parse_batch(read_envelope(wire.payload), schemas)
    out = io.StringIO()
    JsonLinesWriter(out).write(received.blocks)
    got = [(r["message"], r["signals"]) for r in map(json.loads, out.getvalue().splitlines())]
    assert got == expected
