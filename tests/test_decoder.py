"""The decoder's own rules: what is counted, what is matched, what the DBC loader reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.decode import DbcError, Decoder, load_dbc
from agent.frames import FrameBatch, FrameFlag
from harness.data import RAV4_PT_DBC, TRUCK_DBC
from tests.oracle import batch_of, decoded_rows, load_cantools

DBC = """VERSION ""

BU_: ECU

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|16@1+ (0.01,0) [0|655.35] "km/h" ECU
 SG_ Torque : 16|12@1- (0.5,-10) [-1034|1013.5] "Nm" ECU
 SG_ Gear : 63|4@0+ (1,0) [0|15] "" ECU

BO_ 2566844926 Wide: 64 ECU
 SG_ Across : 60|64@1+ (1,0) [0|0] "" ECU
 SG_ Last : 504|8@1+ (1,0) [0|255] "" ECU

VAL_ 256 Gear 0 "Park" 1 "Drive" ;
"""

OTHER = """VERSION ""

BU_: ECU

BO_ 256 Body: 2 ECU
 SG_ Door : 0|1@1+ (1,0) [0|1] "" ECU
"""


@pytest.fixture
def dbc(tmp_path: Path) -> Path:
    path = tmp_path / "engine.dbc"
    path.write_text(DBC)
    return path


def test_remote_error_and_unknown_frames_are_counted_not_decoded(dbc: Path) -> None:
    batch = batch_of([(0x100, False, bytes(8)), (0x101, False, bytes(8)), (0x100, False, bytes(8))])
    batch.flags[1] |= FrameFlag.REMOTE
    batch.flags[2] |= FrameFlag.ERROR
    more = batch_of([(0x100, False, bytes(8)), (0x7FF, False, bytes(8))])
    result = Decoder({"can0": [dbc]}).decode(FrameBatch.concat([batch, more]))
    assert (result.frames, result.decoded, result.unknown) == (5, 2, 1)
    assert (result.remote_frames, result.error_frames) == (1, 1)
    assert sorted(decoded_rows(result)) == [0, 3]


def test_values_raw_and_physical(dbc: Path) -> None:
    payload = bytes([0x10, 0x27, 0xFF, 0x0F, 0, 0, 0, 0x10])  # 100.00 km/h, torque raw -1, gear 1
    result = Decoder({"*": [dbc]}).decode(batch_of([(0x100, False, payload)]))
    block = result.blocks[0]
    assert block.signal("Speed").raw.tolist() == [10_000]
    assert block.signal("Speed").physical().tolist() == [100.0]
    assert block.signal("Torque").raw.tolist() == [-1]
    assert block.signal("Torque").physical().tolist() == [-10.5]
    assert block.signal("Gear").physical().tolist() == [1]
    assert block.signal("Gear").info.choices == {0: "Park", 1: "Drive"}
    assert result.signals == 3


def test_fd_signals_across_words_and_at_the_end(dbc: Path) -> None:
    payload = bytearray(64)
    value = 0x0123456789ABCDEF
    as_int = value << 60
    payload[: len(as_int.to_bytes(17, "little"))] = as_int.to_bytes(17, "little")
    payload[63] = 0xA5
    rows = decoded_rows(
        Decoder({"*": [dbc]}).decode(batch_of([(0x18FEF1FE, True, bytes(payload))]))
    )
    assert rows[0] == ("Wide", {"Across": value, "Last": 0xA5})


def test_a_short_frame_drops_only_the_signals_past_its_end(dbc: Path) -> None:
    rows = decoded_rows(Decoder({"*": [dbc]}).decode(batch_of([(0x100, False, b"\x10\x27\xff")])))
    assert rows[0] == ("Engine", {"Speed": 100.0})


def test_each_bus_has_its_own_dbcs(dbc: Path, tmp_path: Path) -> None:
    other = tmp_path / "body.dbc"
    other.write_text(OTHER)
    batch = FrameBatch.concat([batch_of([(0x100, False, b"\x01" * 8)], bus) for bus in ("can0",)])
    batch = FrameBatch(
        np.array([0, 1]),
        np.array([0, 1], np.uint8),
        np.array([0x100, 0x100], np.uint32),
        np.zeros(2, np.uint8),
        np.array([8, 2], np.uint8),
        np.repeat(batch.data, 2, axis=0),
        ("can0", "can1"),
    )
    rows = decoded_rows(Decoder({"can0": [dbc], "can1": [other]}).decode(batch))
    assert rows[0][0] == "Engine" and rows[1] == ("Body", {"Door": 1})


def test_a_bus_without_dbc_decodes_nothing(dbc: Path) -> None:
    result = Decoder({"can0": [dbc]}).decode(batch_of([(0x100, False, bytes(8))], "can9"))
    assert (result.decoded, result.unknown) == (0, 1)


def test_j1939_matches_pdu2_by_group_extension_and_pdu1_without_destination() -> None:
    decoder = Decoder({"*": [TRUCK_DBC]}, ["*"])
    plain = Decoder({"*": [TRUCK_DBC]})
    eec1 = 0x0CF00400  # PDU2: PF 0xF0, PS 0x04 is part of the PGN
    frames = [
        (eec1, True, bytes(8)),
        (0x18F00431, True, bytes(8)),  # other priority and source: same PGN 0xF004
        (0x18F00531, True, bytes(8)),  # PS 0x05: another PGN
        (0x0C010003, True, bytes(8)),  # PDU1 TC1 (PGN 0x0100) to 0x00 from 0x03
        (0x0C01FF17, True, bytes(8)),  # the same PGN to everyone, from elsewhere
    ]
    rows = decoded_rows(decoder.decode(batch_of(frames)))
    names = {row: name for row, (name, _) in rows.items()}
    assert names[0] == names[1] == "EEC1"
    assert names.get(2) != "EEC1"
    assert names[3] == names[4] == "TC1"
    assert 1 not in decoded_rows(plain.decode(batch_of(frames)))


def test_dbc_warnings_name_the_file_and_the_problem() -> None:
    warnings = load_dbc(RAV4_PT_DBC).warnings
    assert any("PCS_HUD" in w and "overlapping" in w for w in warnings)
    assert all(w.startswith(str(RAV4_PT_DBC)) for w in warnings)
    truck = load_dbc(TRUCK_DBC)
    assert any("is decoded as" in w and "#2" in w for w in truck.warnings)


def test_strict_loading_refuses_what_lenient_loading_lists() -> None:
    with pytest.raises(DbcError, match=r"toyota_new_mc_pt_generated\.dbc"):
        load_dbc(RAV4_PT_DBC, strict=True)


def test_a_missing_dbc_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DbcError, match=r"nope\.dbc: cannot read"):
        Decoder({"*": [tmp_path / "nope.dbc"]})


def test_an_empty_batch(dbc: Path) -> None:
    result = Decoder({"*": [dbc]}).decode(FrameBatch.empty(("can0",)))
    assert (result.frames, result.decoded, result.signals, result.blocks) == (0, 0, 0, [])


BIG_SELECTORS = """VERSION ""

BU_: ECU

BO_ 1024 Paged: 8 ECU
 SG_ Page M : 0|32@1+ (1,0) [0|0] "" ECU
 SG_ Low m3 : 32|16@1+ (1,0) [0|0] "" ECU
 SG_ High m70000 : 32|16@1- (1,0) [0|0] "" ECU
"""


def test_selector_values_beyond_the_lookup_table(tmp_path: Path) -> None:
    path = tmp_path / "paged.dbc"
    path.write_text(BIG_SELECTORS)
    database = load_cantools(path)
    message = database.get_message_by_name("Paged")
    payloads = [
        (3).to_bytes(4, "little") + b"\x01\x02\0\0",
        (70000).to_bytes(4, "little") + b"\xff\xff\0\0",
        (5).to_bytes(4, "little") + b"\x01\x02\0\0",
    ]
    rows = decoded_rows(
        Decoder({"*": [path]}).decode(batch_of([(1024, False, p) for p in payloads]))
    )
    assert (
        rows[0][1] == message.decode(payloads[0], decode_choices=False) == {"Page": 3, "Low": 513}
    )
    assert (
        rows[1][1]
        == message.decode(payloads[1], decode_choices=False)
        == {"Page": 70000, "High": -1}
    )
    assert rows[2][1] == {"Page": 5}  # cantools refuses a value no signal is selected by


HIGHEST_SELECTOR = """VERSION ""

BU_: ECU

BO_ 1024 Paged: 8 ECU
 SG_ Page M : 0|32@1+ (1,0) [0|0] "" ECU
 SG_ Zero m0 : 32|8@1+ (1,0) [0|0] "" ECU
 SG_ Top m65535 : 40|8@1+ (1,0) [0|0] "" ECU
"""


def test_the_highest_selector_value_of_the_lookup_table(tmp_path: Path) -> None:
    # 65535 is the last value the table holds; 65536 and a frame too short for the
    # multiplexer select nothing.
    path = tmp_path / "top.dbc"
    path.write_text(HIGHEST_SELECTOR)
    message = load_cantools(path).get_message_by_name("Paged")
    payloads = [
        (65535).to_bytes(4, "little") + b"\x05\x06\0\0",
        (65536).to_bytes(4, "little") + b"\x05\x06\0\0",
        (0).to_bytes(4, "little") + b"\x05\x06\0\0",
        b"\0\0",
    ]
    rows = decoded_rows(
        Decoder({"*": [path]}).decode(batch_of([(1024, False, p) for p in payloads]))
    )
    assert (
        rows[0][1]
        == message.decode(payloads[0], decode_choices=False)
        == {
            "Page": 65535,
            "Top": 6,
        }
    )
    assert rows[1][1] == {"Page": 65536}
    assert (
        rows[2][1]
        == message.decode(payloads[2], decode_choices=False)
        == {
            "Page": 0,
            "Zero": 5,
        }
    )
    assert rows[3][1] == {}


def test_an_id_past_32_bits_signed_is_unknown(dbc: Path) -> None:
    # Read as signed 32-bit numbers these IDs are negative, and one of them is 0x100 plus a
    # multiple of 2**32 in the table's arithmetic: no frame that a CAN bus carries.
    batch = batch_of([(0x80000001, False, bytes(8)), (0xFFFFF100, False, bytes(8))])
    result = Decoder({"*": [dbc]}).decode(batch)
    assert (result.decoded, result.unknown) == (0, 2)


def _dbc_of(messages: list[tuple[str, int]]) -> str:
    """A DBC of (name, DBC frame ID) messages, each one byte-wide signal named after it."""
    lines = ['VERSION ""', "", "BU_: ECU", ""]
    for name, frame_id in messages:
        lines += [f"BO_ {frame_id} {name}: 8 ECU", f' SG_ {name}_B : 8|8@1+ (1,0) [0|0] "" ECU', ""]
    return "\n".join(lines)


_EXTENDED_BIT = 0x80000000  # how a DBC marks a 29-bit ID


@pytest.mark.parametrize("j1939", [["can1"], ["can1", "can2"], ["*"]])
@pytest.mark.parametrize("seed", range(4))
def test_each_frame_finds_its_message_whatever_its_bus_flags_and_id(
    tmp_path: Path, j1939: list[str], seed: int
) -> None:
    # Standard, plain extended and J1939 messages (PDU1 and PDU2), on J1939 buses and
    # others; can2 has DBC of its own, with the same IDs and PGNs for other messages.
    standard = {0x000: "S0", 0x123: "S123", 0x7FF: "S7FF"}
    extended = {0x1ABCDE0: "X1", 0x18FEF100: "CCVS", 0x0C010000: "TC1"}
    messages: dict[str, tuple[dict[int, str], dict[int, str]]] = {}
    dbcs: dict[str, list[Path]] = {}
    for bus, prefix in (("can2", "own"), ("*", "all")):
        std = {i: f"{prefix}_{name}" for i, name in standard.items()}
        ext = {i: f"{prefix}_{name}" for i, name in extended.items()}
        messages[bus] = std, ext
        dbcs[bus] = [tmp_path / f"{prefix}.dbc"]
        dbcs[bus][0].write_text(
            _dbc_of(
                [(n, i) for i, n in std.items()] + [(n, i | _EXTENDED_BIT) for i, n in ext.items()]
            )
        )
    decoder = Decoder(dbcs, j1939)
    buses = ("can0", "can1", "can2")

    def pgn(can_id: int) -> int:
        pf = (can_id >> 16) & 0xFF
        return (can_id >> 8) & (0x3FF00 if pf < 0xF0 else 0x3FFFF)

    rng = np.random.default_rng(seed)
    n = 3000
    batch = FrameBatch.allocate(n, buses)
    batch.bus[:] = rng.integers(0, len(buses), n)
    choices = np.array(
        [*standard, 0x800, 0xFFF, 0x1234, *extended, 0x18FEF1AA, 0x0C0105FE, 0x1ABCDE1, 0x0CF00400]
    )
    batch.can_id[:] = rng.choice(choices, n)
    anywhere = rng.random(n) < 0.2
    batch.can_id[anywhere] = rng.integers(0, 1 << 29, int(anywhere.sum()))
    flag_sets = [0, 0, 0, FrameFlag.EXTENDED, FrameFlag.EXTENDED, FrameFlag.REMOTE, FrameFlag.ERROR]
    flag_sets += [FrameFlag.EXTENDED | FrameFlag.REMOTE, FrameFlag.EXTENDED | FrameFlag.ERROR]
    batch.flags[:] = rng.choice(np.array(flag_sets, np.uint8), n)
    batch.flags[rng.random(n) < 0.1] |= np.uint8(FrameFlag.FD)
    batch.length[:] = 8
    batch.data[:, 1] = np.arange(n) % 256

    expected: dict[int, str] = {}
    counts = {"error": 0, "remote": 0, "unknown": 0}
    for row in range(n):
        bus, can_id, flags = buses[batch.bus[row]], int(batch.can_id[row]), int(batch.flags[row])
        std, ext = messages[bus if bus in messages else "*"]
        if flags & FrameFlag.ERROR:
            counts["error"] += 1
            continue
        if flags & FrameFlag.REMOTE:
            counts["remote"] += 1
            continue
        if not flags & FrameFlag.EXTENDED:
            name = std.get(can_id)
        elif decoder.is_j1939(bus):
            name = {pgn(i): name for i, name in ext.items()}.get(pgn(can_id))
        else:
            name = ext.get(can_id)
        if name is None:
            counts["unknown"] += 1
        else:
            expected[row] = name

    result = decoder.decode(batch)
    rows = decoded_rows(result)
    assert {row: name for row, (name, _) in rows.items()} == expected
    assert all(values[f"{name}_B"] == row % 256 for row, (name, values) in rows.items())
    assert all((np.diff(block.rows) > 0).all() for block in result.blocks)
    assert (result.error_frames, result.remote_frames, result.unknown) == (
        counts["error"],
        counts["remote"],
        counts["unknown"],
    )


@pytest.mark.parametrize("present", [40, 300])
def test_hundreds_of_messages_in_a_batch(tmp_path: Path, present: int) -> None:
    # More messages than one byte can number, and a batch with more or fewer than 256 of them.
    path = tmp_path / "many.dbc"
    path.write_text(_dbc_of([(f"M{i}", i) for i in range(300)]))
    rng = np.random.default_rng(present)
    can_id = rng.permutation(np.repeat(rng.choice(300, present, replace=False), 7))
    frames = [(int(i), False, bytes([0, k % 256, 0, 0, 0, 0, 0, 0])) for k, i in enumerate(can_id)]
    result = Decoder({"*": [path]}).decode(batch_of(frames))
    assert all((np.diff(block.rows) > 0).all() for block in result.blocks)
    assert decoded_rows(result) == {
        k: (f"M{i}", {f"M{i}_B": k % 256}) for k, i in enumerate(can_id.tolist())
    }


UNREADABLE_CHILDREN = """VERSION ""

BU_: ECU

BO_ 512 Paged: 8 ECU
 SG_ Page M : 0|8@1+ (1,0) [0|0] "" ECU
 SG_ Near m1 : 8|8@1+ (1,0) [0|0] "" ECU
 SG_ Odd m1 : 16|8@1+ (1,0) [0|0] "" ECU

BO_ 513 Far: 8 ECU
 SG_ Page M : 0|8@1+ (1,0) [0|0] "" ECU
 SG_ Near m1 : 8|8@1+ (1,0) [0|0] "" ECU
 SG_ Beyond m1 : 600|8@1+ (1,0) [0|0] "" ECU

SIG_VALTYPE_ 512 Odd : 1;
"""


def test_multiplexed_signals_that_no_frame_can_carry_stay_absent(tmp_path: Path) -> None:
    # cantools refuses both messages whole; we decode what can be decoded, and say why not
    # the rest.
    path = tmp_path / "unreadable.dbc"
    path.write_text(UNREADABLE_CHILDREN)
    decoder = Decoder({"*": [path]})
    assert {
        f"{path}: message Paged: signal Odd is never decoded: an IEEE float of 8 bits",
        f"{path}: message Far: signal Beyond is never decoded: it ends past byte 64",
    } <= set(decoder.warnings)
    payloads = [bytes([1, 7, 0, 0, 0, 0, 0, 0]), bytes([2, 7, 0, 0, 0, 0, 0, 0])]
    frames = [(can_id, False, p) for can_id in (512, 513) for p in payloads]
    rows = decoded_rows(decoder.decode(batch_of(frames)))
    assert [values for _, values in rows.values()] == [{"Page": 1, "Near": 7}, {"Page": 2}] * 2
    # Alone, the first message has no frame too short for any signal that it can carry.
    rows = decoded_rows(decoder.decode(batch_of(frames[:2])))
    assert [values for _, values in rows.values()] == [{"Page": 1, "Near": 7}, {"Page": 2}]
