"""Text records: the exact JSON and CSV a user gets for known frames."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from agent.decode import Decoder
from agent.records import CsvWriter, JsonLinesWriter, seconds_text
from tests.oracle import batch_of

DBC = """VERSION ""

BU_: ECU

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|16@1+ (0.01,0) [0|655.35] "km/h" ECU
 SG_ Gear : 16|4@1+ (1,0) [0|15] "" ECU

BO_ 2147484160 Flow: 4 ECU
 SG_ Rate : 0|32@1- (1,0) [0|0] "" ECU

BO_ 768 Muxed: 8 ECU
 SG_ Page M : 0|8@1+ (1,0) [0|255] "" ECU
 SG_ A m1 : 8|8@1+ (1,0) [0|255] "" ECU
 SG_ B m2 : 8|8@1+ (1,0) [0|255] "" ECU, ECU

SIG_VALTYPE_ 2147484160 Rate : 1;
VAL_ 256 Gear 0 "Park" 1 "Drive, forward" ;
"""


def decoded(tmp_path: Path) -> Decoder:
    path = tmp_path / "test.dbc"
    path.write_text(DBC)
    return Decoder({"*": [path]})


def frames() -> list[tuple[int, bool, bytes]]:
    nan = bytes.fromhex("0000c07f")
    return [
        (0x300, False, bytes([2, 7, 0, 0, 0, 0, 0, 0])),
        (0x100, False, bytes([0x10, 0x27, 1, 0, 0, 0, 0, 0])),
        (0x200, True, nan),
        (0x123, False, bytes(8)),
        (0x100, False, bytes([0x01, 0x00])),
    ]


def test_jsonl_lines_in_frame_order(tmp_path: Path) -> None:
    out = io.StringIO()
    JsonLinesWriter(out).write(decoded(tmp_path).decode(batch_of(frames())).blocks)
    assert out.getvalue().splitlines() == [
        '{"t": 0.0, "bus": "can0", "id": 768, "message": "Muxed", "signals": {"Page": 2, "B": 7}}',
        '{"t": 0.001, "bus": "can0", "id": 256, "message": "Engine", '
        '"signals": {"Speed": 100.0, "Gear": 1}}',
        '{"t": 0.002, "bus": "can0", "id": 512, "ext": true, "message": "Flow", '
        '"signals": {"Rate": null}}',
        '{"t": 0.004, "bus": "can0", "id": 256, "message": "Engine", "signals": {"Speed": 0.01}}',
    ]
    for line in out.getvalue().splitlines():
        json.loads(line)


def test_jsonl_with_choices(tmp_path: Path) -> None:
    out = io.StringIO()
    JsonLinesWriter(out, choices=True).write(decoded(tmp_path).decode(batch_of(frames())).blocks)
    assert '"Gear": "Drive, forward"' in out.getvalue().splitlines()[1]


def test_csv_rows(tmp_path: Path) -> None:
    out = io.StringIO()
    CsvWriter(out, choices=True).write(decoded(tmp_path).decode(batch_of(frames())).blocks)
    assert out.getvalue().splitlines() == [
        "t,bus,id,ext,message,signal,value",
        "0.0,can0,768,0,Muxed,Page,2",
        "0.0,can0,768,0,Muxed,B,7",
        "0.001,can0,256,0,Engine,Speed,100.0",
        '0.001,can0,256,0,Engine,Gear,"Drive, forward"',
        "0.002,can0,512,1,Flow,Rate,",
        "0.004,can0,256,0,Engine,Speed,0.01",
    ]


def test_times_are_written_with_their_sign_and_every_digit() -> None:
    t_ns = np.array(
        [-100_000_000, -1_250_000_000, -1, 0, 1, 1_700_000_000_123_456_789, -5_000_000_000],
        dtype=np.int64,
    )
    assert seconds_text(t_ns) == [
        "-0.1",
        "-1.25",
        "-0.000000001",
        "0.0",
        "0.000000001",
        "1700000000.123456789",
        "-5.0",
    ]
