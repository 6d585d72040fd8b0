"""Reassembled J1939 groups on the wire: the whole agent on the truck log, through a file
uplink and the receiver, against the log's engine configuration (EC1) transfers read by hand
and decoded by cantools; and groups built here, for text and for rules beside them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import zstandard

from agent.cloud.parser import SchemaStore, parse_batch
from agent.collect import Collected, CollectedBlock, Collector, Selection
from agent.collect.collector import CollectError
from agent.config import parse_config
from agent.decode import Decoder
from agent.frames import FrameBatch
from agent.j1939 import Transfer
from agent.j1939.groups import decode_groups
from agent.logs import open_log
from agent.service import Agent
from agent.snapshot import LastValues
from agent.wire import telemetry_pb2 as pb
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import WireError, read_envelope
from harness.data import TRUCK_DBC, TRUCK_LOG
from harness.outputs import outbox_lines
from tests.oracle import load_cantools
from tests.test_j1939 import bam, reference_transfers, truck_decoder

J1939_BUS = f'dbc = ["{TRUCK_DBC}"]\nj1939 = true'
EC1_RULE = '[[collect]]\nname = "ec1"\nmode = "all"\nmessages = ["EC1"]\nsignals = ["*"]\n'
EC1_PGN = 0xFEE3


async def run_agent(folder: Path, rules: str, log: Path = TRUCK_LOG) -> list[dict[str, Any]]:
    """Every record the receiver reads from the agent's outbox after a replay of a log."""
    text = (
        f'vehicle_id = "truck"\nstate_dir = "{folder}"\n'
        f'[[bus]]\nname = "can1"\nsource = "replay"\npath = "{log}"\n{J1939_BUS}\n'
        f'[uplink]\nkind = "file"\nurl = "{folder / "outbox"}"\n[metrics]\nlisten = ""\n'
        f"{rules}"
    )
    agent = Agent(parse_config(text, "test.toml", folder), status=None)
    assert await agent.run() == 0
    return [json.loads(line) for line in outbox_lines(folder / "outbox")]


def expected_ec1() -> list[tuple[float, int, dict[str, Any]]]:
    """(time, source, physical values) of each EC1 transfer, read and decoded apart."""
    ec1 = load_cantools(TRUCK_DBC).get_message_by_name("EC1")
    return [
        (float(t), source, ec1.decode(payload, decode_choices=False))
        for t, source, pgn, payload in reference_transfers(TRUCK_LOG)
        if pgn == EC1_PGN
    ]


def ec1_records(records: list[dict[str, Any]]) -> list[tuple[float, int, dict[str, Any]]]:
    found = [r for r in records if r["message"] == "EC1"]
    for record in found:
        assert (record["id"] >> 8) & 0x3FFFF == EC1_PGN
    return [(r["t"], r["id"] & 0xFF, r["signals"]) for r in found]


@pytest.mark.parametrize("rules", ["", EC1_RULE], ids=["no rules", "rule selecting EC1"])
async def test_the_agent_sends_the_truck_logs_engine_configuration(
    tmp_path: Path, rules: str
) -> None:
    records = await run_agent(tmp_path, rules)
    expected = expected_ec1()
    assert len(expected) == 25
    assert ec1_records(records) == expected
    if rules:
        assert {(r["message"], r.get("rule")) for r in records} == {("EC1", "ec1")}
    else:
        assert "rule" not in records[0]
        # DM1 transfers are sent by a rule of mode faults only (tests/test_fault_rule.py).
        assert not [r for r in records if r["message"] == "DM1"]


async def test_a_change_rule_sends_the_engine_configurations_changes(tmp_path: Path) -> None:
    rule = '[[collect]]\nname = "ec1"\nmode = "change"\nmessages = ["EC1"]\nsignals = ["*"]\n'
    records = await run_agent(tmp_path, rule)
    expected = []
    last: dict[str, Any] = {}
    for t, source, values in expected_ec1():
        changed = {k: v for k, v in values.items() if k not in last or last[k] != v}
        last.update(changed)
        if changed:
            expected.append((t, source, changed))
    assert 1 < len(expected) < 25
    assert ec1_records(records) == expected


VIN = b"1FUJGLDR5CLBP8834*"
EC1_DATA = bytes(range(1, 40))
#: A single frame beside the transfers: EEC1 (PGN 0xF004) from source 0.
EEC1 = (10, 0x0CF00400, bytes.fromhex("607D84481400F084"))


def write_log(path: Path, frames: list[tuple[int, int, bytes]]) -> Path:
    """Frames built here, (milliseconds, 29-bit ID, payload), as a candump log."""
    lines = [
        f"({1_700_000_000 + ms / 1000:.6f}) can1 {can_id:08X}#{data.hex().upper()}"
        for ms, can_id, data in sorted(frames, key=lambda f: f[0])
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


SOFT_RULE = '[[collect]]\nname = "soft"\nmode = "all"\nmessages = ["SOFT"]\nsignals = ["*"]\n'
SOFT = b"\x02SW1.0*SW2.0*"  # software identification: two fields, then their text


@pytest.mark.parametrize("rules", ["", EC1_RULE + SOFT_RULE], ids=["no rules", "rules"])
async def test_groups_go_beside_frames_with_their_text(tmp_path: Path, rules: str) -> None:
    ec1_frames = bam(20, 0x00, EC1_PGN, EC1_DATA)
    vin_frames = bam(500, 0x00, 0xFEEC, VIN)
    soft_frames = bam(800, 0x00, 0xFEDA, SOFT)
    log = write_log(tmp_path / "built.log", [EEC1, *ec1_frames, *vin_frames, *soft_frames])
    records = await run_agent(tmp_path, rules, log)
    ec1 = load_cantools(TRUCK_DBC).get_message_by_name("EC1")
    t = 1_700_000_000 + ec1_frames[-1][0] / 1000
    assert ec1_records(records) == [(t, 0, ec1.decode(EC1_DATA, decode_choices=False))]
    expected = ["EC1", "SOFT"] if rules else ["EEC1", "EC1", "VI", "SOFT"]
    assert [r["message"] for r in records] == expected
    if not rules:
        assert records[2]["signals"] == {"Vehicle_Identification_Number": "1FUJGLDR5CLBP8834"}
    assert records[-1]["t"] == 1_700_000_000 + soft_frames[-1][0] / 1000
    # Both fields in one text signal: the DBC gives the parameter one signal.
    assert records[-1]["signals"] == {
        "Number of Software Identification Fields": 2,
        "Software_Identification": "SW1.0*SW2.0",
    }


def soft_batch(
    texts: dict[int, npt.NDArray[np.object_]], numbers: bool = False
) -> tuple[SchemaStore, pb.Batch]:
    """A batch of two software identification rows with the given text, announced; with
    `numbers`, the text signal has numeric values too, as no agent sends."""
    soft = truck_decoder().message_of("can0", 0x18FEDA00)
    assert soft is not None
    block = CollectedBlock(
        "can0",
        Selection(soft.info, tuple(soft.signals), "soft"),
        np.array([0, 5], np.int64),
        np.array([0x18FEDA00, 0x18FEDA00], np.uint32),
        np.array([[2, 1], [0, 0]], np.uint64),
        np.array([[True, True], [numbers, False]]),
        texts,
    )
    encoder = BatchEncoder("v", "s", b"")
    wire = encoder.encode([Collected([block])], 1)
    assert wire is not None
    schemas = SchemaStore()
    schemas.add(read_envelope(encoder.announcement(wire.schema_id)), 1 << 30)
    return schemas, read_envelope(wire.payload)


def test_text_values_travel_apart_and_older_readers_see_them_absent() -> None:
    schemas, batch = soft_batch({1: np.array(["A*B", None], object)})
    received = parse_batch(batch, schemas)
    (block,) = received.blocks
    assert block.signals[1].physical().tolist() == ["A*B", None]
    assert block.present is not None and block.present.tolist() == [[True, True], [True, False]]
    assert batch.signals == received.signals == 3
    # What a reader without `texts` parses: the body with the field dropped reads whole,
    # the text signal absent.
    body = pb.Body.FromString(zstandard.ZstdDecompressor().decompress(batch.body))
    assert len(body.texts) == 1
    del body.texts[:]
    old = pb.Batch()
    old.CopyFrom(batch)
    raw = body.SerializeToString()
    old.compression, old.body, old.body_size = pb.COMPRESSION_NONE, raw, len(raw)
    (before,) = parse_batch(old, schemas).blocks
    assert before.present is not None and not before.present[1].any()


def test_a_receiver_refuses_numbers_of_a_text_signal() -> None:
    schemas, batch = soft_batch({}, numbers=True)
    with pytest.raises(WireError, match="Software_Identification of 1600 bits has values"):
        parse_batch(batch, schemas)


def test_a_receiver_refuses_text_that_does_not_fit_its_block() -> None:
    schemas, batch = soft_batch({1: np.array(["A", "B"], object)})
    body = pb.Body.FromString(zstandard.ZstdDecompressor().decompress(batch.body))
    for broken, message in (
        ({"signal": 0}, "not text"),
        ({"block": 3}, "text values of block 3"),
        ({"frames": [1, 0]}, "out of order"),
        ({"frames": [0, 2]}, "out of order or range"),
        ({"values": ["A"]}, "frames and values differ"),
        ({"values": ["A", "B\0C"]}, "a NUL character"),
    ):
        copy = pb.Body()
        copy.CopyFrom(body)
        text = copy.texts[0]
        for key, value in broken.items():
            if isinstance(value, list):
                del getattr(text, key)[:]
                getattr(text, key).extend(value)
            else:
                setattr(text, key, value)
        raw = copy.SerializeToString()
        bad = pb.Batch()
        bad.CopyFrom(batch)
        bad.compression, bad.body, bad.body_size = pb.COMPRESSION_NONE, raw, len(raw)
        with pytest.raises(WireError, match=message):
            parse_batch(bad, schemas)


def test_a_batch_too_large_for_one_wire_batch_keeps_its_groups(tmp_path: Path) -> None:
    text = (
        f'vehicle_id = "truck"\nstate_dir = "{tmp_path}"\n'
        f'[[bus]]\nname = "can1"\nsource = "replay"\npath = "{TRUCK_LOG}"\n{J1939_BUS}\n'
        "[batch]\nmax_bytes = 4096\n[spool]\nmax_bytes = 4194304\n"
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n[metrics]\nlisten = ""\n'
    )
    pipeline = Agent(parse_config(text, "test.toml", tmp_path), status=None).pipeline
    frames = FrameBatch.concat(list(open_log(TRUCK_LOG).batches()))
    decoded = pipeline.decoders["can1"].decode(frames)
    groups = pipeline.groups.read(pipeline.decoders["can1"], "can1", frames, decoded)
    assert groups is not None
    wires = pipeline._encode_decoded("can1", frames, decoded, groups.decoded)
    assert len(wires) > 8 and all(len(w) <= 4096 for w in wires)
    assert [w.sequence for w in wires] == list(range(1, len(wires) + 1))
    schemas = SchemaStore()
    rows = []
    for wire in wires:
        schemas.add(read_envelope(pipeline.encoder.announcement(wire.schema_id)), 1 << 20)
        batch = parse_batch(read_envelope(wire.payload), schemas)
        rows += [(t, b.message.name) for b in batch.blocks for t in b.t_ns.tolist()]
    assert len(rows) == decoded.decoded + 25
    ec1 = sorted(t for t, name in rows if name == "EC1")
    written = [t for t, _, pgn, _ in reference_transfers(TRUCK_LOG) if pgn == EC1_PGN]
    assert ec1 == [
        int(t.split(".")[0]) * 10**9 + int(t.split(".")[1].ljust(9, "0")) for t in written
    ]


def last_values(folder: Path, log: Path) -> LastValues:
    """The last values of an agent's pipeline that closed every batch of a J1939 log."""
    text = (
        f'vehicle_id = "truck"\nstate_dir = "{folder}"\n'
        f'[[bus]]\nname = "can1"\nsource = "replay"\npath = "{log}"\n{J1939_BUS}\n'
        f'[uplink]\nkind = "file"\nurl = "{folder / "outbox"}"\n[metrics]\nlisten = ""\n'
    )
    pipeline = Agent(parse_config(text, "test.toml", folder), status=None).pipeline
    last = pipeline.last_values = LastValues()
    for frames in open_log(log).batches():
        pipeline.close("can1", frames)
    return last


def test_a_snapshot_holds_the_last_group(tmp_path: Path) -> None:
    t, _, values = expected_ec1()[-1]
    got = last_values(tmp_path, TRUCK_LOG).snapshot(["EC1.*"])
    assert {v["signal"]: v["value"] for v in got} == values
    assert {v["t"] for v in got} == {t}


async def test_a_raw_rule_on_a_group_message_keeps_the_frames_it_names(tmp_path: Path) -> None:
    """A reassembled group is no frame: a raw rule naming its message captures frames of
    the other messages it names, and the group's values go by the rules that select them."""
    ec1_frames = bam(20, 0x00, EC1_PGN, EC1_DATA)
    eec1 = (1000, *EEC1[1:])  # after the transfer, whose first frame is row 0
    log = write_log(tmp_path / "built.log", [*ec1_frames, eec1])
    raw = '[[collect]]\nname = "log"\nmode = "raw"\nmessages = ["EC1", "EEC1"]\n'
    records = await run_agent(tmp_path, raw + EC1_RULE, log)
    assert [(r.get("message"), r["rule"], r["id"]) for r in records] == [
        ("EC1", "ec1", 0x1CFEE300),
        (None, "log", EEC1[1]),
    ]


ODD_DBC = """VERSION ""

BS_:

BU_:

BO_ 2566857216 ODD: 8 Vector__XXX
 SG_ Odd : 0|24@1+ (1,0) [0|0] "" Vector__XXX
 SG_ Count : 24|8@1+ (1,0) [0|255] "" Vector__XXX
 SG_ Far : 72|16@1+ (1,0) [0|65535] "" Vector__XXX

SIG_VALTYPE_ 2566857216 Odd : 1;
"""


def test_a_group_row_holds_what_a_column_can(tmp_path: Path) -> None:
    """Past a frame's 8 bytes as in it; a float of no IEEE length never present, as in
    frames; the ID the group would have in one frame, the time of its last packet."""
    dbc = tmp_path / "odd.dbc"
    dbc.write_text(ODD_DBC)
    decoder = Decoder({"*": [str(dbc)]}, ["*"])
    transfer = Transfer(5_000, "can0", 6, 0x22, 0xFF, 0xFF22, bytes(range(1, 13)), 3)
    groups = decode_groups(decoder, [transfer])
    assert groups is not None
    (block,) = groups.blocks
    assert [s.name for s in block.plan.signals] == ["Odd", "Count", "Far"]
    assert block.bits[1:, 0].tolist() == [4, 0x0B0A]
    assert block.present is not None and block.present[:, 0].tolist() == [False, True, True]
    assert block.can_id.tolist() == [0x18FF2222] and block.t_ns.tolist() == [5_000]


def test_a_snapshot_holds_the_last_text(tmp_path: Path) -> None:
    first, second = b"1FUJGLDR5CLBP8834*", b"2FUJGLDR5CLBP8835*"
    frames = [EEC1, *bam(100, 0x00, 0xFEEC, first), *bam(900, 0x00, 0xFEEC, second)]
    log = write_log(tmp_path / "vins.log", frames)
    (vin,) = last_values(tmp_path, log).snapshot(["VI.*"])
    assert vin["value"] == "2FUJGLDR5CLBP8835"
    assert vin["t"] == 1_700_000_000 + frames[-1][0] / 1000


RULES_BUS = (
    f'vehicle_id = "v"\n[[bus]]\nname = "can1"\nsource = "replay"\npath = "{TRUCK_LOG}"\n'
    f"{J1939_BUS}\n"
)


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (
            'mode = "aggregate"\nwindow_ms = 1000\nsignals = ["Vehicle_Identification_Number"]',
            "collect rule 'r': mode aggregate takes numbers: signal "
            "VI.Vehicle_Identification_Number is text",
        ),
        (
            'mode = "change"\nsignals = ["SOFT.Software_Identification"]',
            "collect rule 'r': mode change takes numbers: signal SOFT.Software_Identification",
        ),
        (
            'mode = "trigger"\nmessages = ["EEC1"]\nsignals = ["*"]\n'
            'when = "Vehicle_Identification_Number > 0"',
            "collect rule 'r': when: Vehicle_Identification_Number is text",
        ),
    ],
)
def test_modes_that_compute_refuse_a_text_signal_they_name(rule: str, problem: str) -> None:
    text = f'{RULES_BUS}[[collect]]\nname = "r"\n'
    rules = parse_config(text + rule, "t.toml", Path(".")).collect
    with pytest.raises(CollectError, match=re.escape(problem)):
        Collector(rules, {"can1": truck_decoder()})


def test_a_pattern_of_a_mode_that_computes_leaves_text_out() -> None:
    text = (
        f"{RULES_BUS}"
        '[[collect]]\nname = "soft"\nmode = "change"\nmessages = ["SOFT"]\nsignals = ["*"]\n'
    )
    decoder = truck_decoder()
    collector = Collector(parse_config(text, "t.toml", Path(".")).collect, {"can1": decoder})
    (target,) = collector.rules[0].targets["can1"]
    assert [s.name for s in target.signals] == ["Number of Software Identification Fields"]


@pytest.mark.parametrize("reduce", ["first", "last"])
async def test_a_sample_rule_sends_the_first_or_last_text_of_a_period(
    tmp_path: Path, reduce: str
) -> None:
    vins = [b"1FUJGLDR5CLBP8834*", b"2FUJGLDR5CLBP8835*"]
    softs = [b"\x01SW1.0.0.1*", b"\x02SW2.0*SW2.1*"]  # a transfer is 9 bytes or more
    frames = [
        EEC1,
        *bam(100, 0x00, 0xFEEC, vins[0]),
        *bam(300, 0x00, 0xFEDA, softs[0]),
        *bam(900, 0x00, 0xFEEC, vins[1]),
        *bam(1200, 0x00, 0xFEDA, softs[1]),
    ]
    log = write_log(tmp_path / "texts.log", frames)
    rule = (
        f'[[collect]]\nname = "ids"\nmode = "sample"\nperiod_ms = 60000\nreduce = "{reduce}"\n'
        'messages = ["VI", "SOFT"]\nsignals = ["*"]\n'
    )
    records = await run_agent(tmp_path, rule, log)
    got = {r["message"]: r["signals"] for r in records}
    k = 0 if reduce == "first" else 1
    assert got == {
        "VI": {"Vehicle_Identification_Number": vins[k][:-1].decode()},
        "SOFT": {
            "Number of Software Identification Fields": k + 1,
            "Software_Identification": ["SW1.0.0.1", "SW2.0*SW2.1"][k],
        },
    }
