"""J1939 transport, transfers decoded through the DBC, and DM1 faults: the truck log's
transfers against a reader written here by hand from J1939-21 and J1939-73, and the
protocol's corners (connections, holds, aborts, timeouts, garbage) on frames built here."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.decode import Decoder
from agent.frames import FrameBatch, FrameFlag
from agent.j1939 import GroupBlock, J1939Listener, Reassembler, Transfer
from agent.logs import open_log
from agent.records import JsonLinesWriter
from harness.data import TESLA_DBC, TESLA_LOG, TRUCK_DBC, TRUCK_LOG
from tests.oracle import load_cantools

_LINE = re.compile(r"\((\d+)\.(\d+)\) (\S+) ([0-9A-F]{8})#([0-9A-F]*)")


def reference_transfers(log: Path) -> list[tuple[str, int, int, bytes]]:
    """Every BAM transfer of a candump log, read line by line: (time as written, source,
    PGN, payload). Written apart from the agent's reader and reassembler."""
    found = []
    open_bam: dict[int, tuple[int, int, bytearray]] = {}
    for line in log.read_text().splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        seconds, fraction, _, ident, hex_data = match.groups()
        can_id, data = int(ident, 16), bytes.fromhex(hex_data)
        pf, source = (can_id >> 16) & 0xFF, can_id & 0xFF
        if pf == 0xEC and data[0] == 0x20:
            size = data[1] + 256 * data[2]
            pgn = data[5] + 256 * data[6] + 65536 * data[7]
            open_bam[source] = (size, pgn, bytearray())
        elif pf == 0xEB and source in open_bam:
            size, pgn, collected = open_bam[source]
            collected += data[1:]
            if len(collected) >= size:
                del open_bam[source]
                t = f"{seconds}.{fraction}".rstrip("0")
                found.append((t, source, pgn, bytes(collected[:size])))
    return found


def reference_dm1(payload: bytes) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """J1939-73 5.7.1 read by hand: lamps (status then flash, two bits each from the top),
    then (SPN, FMI, occurrence count, conversion method) per four bytes."""
    lamps = [(payload[0] >> (6 - 2 * k)) & 3 for k in range(4)]
    lamps += [(payload[1] >> (6 - 2 * k)) & 3 for k in range(4)]
    faults = []
    for k in range((len(payload) - 2) // 4):
        b = payload[2 + 4 * k : 6 + 4 * k]
        spn = b[0] + (b[1] << 8) + ((b[2] & 0xE0) << 11)
        faults.append((spn, b[2] & 0x1F, b[3] & 0x7F, b[3] >> 7))
    return lamps, faults


LAMP_NAMES = ["off", "on", "error", "not available"]
FLASH_NAMES = ["slow flash", "fast flash", "reserved", "not available"]


def test_decode_shows_every_dm1_fault_of_the_truck_log() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent",
            "decode",
            str(TRUCK_LOG),
            "--dbc",
            str(TRUCK_DBC),
            "--j1939",
            "*",
            "--choices",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    by_time: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["message"] == "DM1":
            by_time.setdefault(str(record["t"]), []).append(record)
    reference = [r for r in reference_transfers(TRUCK_LOG) if r[2] == 0xFECA]
    assert len(reference) == 127
    assert len(by_time) == 127
    for t, source, _, payload in reference:
        lamps, faults = reference_dm1(payload)
        got = by_time[t]
        assert [r["id"] & 0xFF for r in got] == [source] * len(faults)
        assert [
            (
                r["signals"]["SPN"],
                r["signals"]["FMI"],
                r["signals"]["occurrence_count"],
                r["signals"]["SPN_conversion_method"],
            )
            for r in got
        ] == faults
        names = [LAMP_NAMES[v] for v in lamps[:4]] + [FLASH_NAMES[v] for v in lamps[4:]]
        for record in got:
            signals = list(record["signals"].values())
            assert signals[:8] == names
    assert "J1939: 152 transfers, 0 aborted, 0 timed out" in done.stderr
    assert "never decoded: 1600 bits" not in done.stderr


def test_engine_configuration_transfers_decode_as_cantools_decodes_them() -> None:
    reference = [r for r in reference_transfers(TRUCK_LOG) if r[2] == 0xFEE3]
    assert len(reference) == 25
    ec1 = load_cantools(TRUCK_DBC).get_message_by_name("EC1")
    listener = J1939Listener(truck_decoder())
    blocks = [
        b
        for batch in open_log(TRUCK_LOG).batches()
        for b in listener.listen(batch, listener.decoder.decode(batch))
    ]
    decoded = [b for b in blocks if b.message.name == "EC1"]
    assert len(decoded) == 25
    for block, (_, _, _, payload) in zip(decoded, reference, strict=True):
        expected = ec1.decode(payload, decode_choices=False)
        got = {c.name: c.physical().tolist()[0] for c in block.signals}
        assert got == expected


# Frames built here: (milliseconds, 29-bit ID, payload).
Frame = tuple[int, int, bytes]


@functools.cache
def truck_decoder() -> Decoder:
    return Decoder({"*": [TRUCK_DBC]}, ["*"])


def feed(reassembler: Reassembler, frames: Sequence[Frame]) -> list[Transfer]:
    """What the frames complete, given the TP frames that the decoder finds."""
    batch = batch_of(frames)
    return reassembler.feed(batch, truck_decoder().decode(batch).transport)


def listen(listener: J1939Listener, frames: Sequence[Frame]) -> list[GroupBlock]:
    batch = batch_of(frames)
    return listener.listen(batch, listener.decoder.decode(batch))


def batch_of(frames: Sequence[Frame], bus: str = "can0") -> FrameBatch:
    batch = FrameBatch.allocate(len(frames), (bus,))
    for row, (ms, can_id, data) in enumerate(frames):
        batch.t_ns[row] = ms * 1_000_000
        batch.can_id[row] = can_id
        batch.flags[row] = FrameFlag.EXTENDED
        batch.length[row] = len(data)
        batch.data[row, : len(data)] = np.frombuffer(data, np.uint8)
    return batch


def tp_cm(ms: int, source: int, destination: int, data: list[int]) -> Frame:
    return (ms, 0x1CEC0000 | destination << 8 | source, bytes(data))


def tp_dt(ms: int, source: int, destination: int, sequence: int, chunk: bytes) -> Frame:
    return (ms, 0x1CEB0000 | destination << 8 | source, bytes([sequence]) + chunk.ljust(7, b"\xff"))


def pgn_bytes(pgn: int) -> list[int]:
    return [pgn & 0xFF, (pgn >> 8) & 0xFF, pgn >> 16]


def bam(ms: int, source: int, pgn: int, payload: bytes, gap: int = 50) -> list[Frame]:
    packets = -(-len(payload) // 7)
    frames = [
        tp_cm(
            ms,
            source,
            0xFF,
            [0x20, len(payload) & 0xFF, len(payload) >> 8, packets, 0xFF, *pgn_bytes(pgn)],
        )
    ]
    frames += [
        tp_dt(ms + gap * (k + 1), source, 0xFF, k + 1, payload[7 * k : 7 * k + 7])
        for k in range(packets)
    ]
    return frames


def test_rts_cts_with_hold_and_retransmission_completes_on_the_acknowledgement() -> None:
    payload = bytes(range(30))  # 5 packets
    a, b, pgn = 0x00, 0x3D, 0xFEE3
    size = [len(payload), 0]
    frames = [
        tp_cm(0, a, b, [0x10, *size, 5, 2, *pgn_bytes(pgn)]),  # RTS, 2 packets per CTS
        tp_cm(10, b, a, [0x11, 2, 1, 0xFF, 0xFF, *pgn_bytes(pgn)]),  # CTS 1..2
        tp_dt(20, a, b, 1, payload[0:7]),
        tp_dt(30, a, b, 2, b"garbage"),
        tp_cm(40, b, a, [0x11, 0, 0xFF, 0xFF, 0xFF, *pgn_bytes(pgn)]),  # hold
        tp_cm(1000, b, a, [0x11, 2, 2, 0xFF, 0xFF, *pgn_bytes(pgn)]),  # resend 2, then 3
        tp_dt(1010, a, b, 2, payload[7:14]),
        tp_dt(1020, a, b, 3, payload[14:21]),
        tp_cm(1030, b, a, [0x11, 2, 4, 0xFF, 0xFF, *pgn_bytes(pgn)]),
        tp_dt(1040, a, b, 4, payload[21:28]),
        tp_dt(1050, a, b, 5, payload[28:30]),
    ]
    reassembler = Reassembler()
    # Split across batches: sessions outlive a batch.
    assert feed(reassembler, (frames[:5])) == []
    assert feed(reassembler, (frames[5:])) == []
    ack = tp_cm(1060, b, a, [0x13, *size, 5, 0xFF, *pgn_bytes(pgn)])
    (done,) = feed(reassembler, ([ack]))
    assert (done.source, done.destination, done.pgn, done.data) == (a, b, pgn, payload)
    assert (done.t_ns, done.row) == (1060 * 1_000_000, 0)
    assert reassembler.counts.transfers == 1
    assert reassembler.counts.bad_frames == 0


def test_hold_past_t4_times_out() -> None:
    pgn = 0xFEE3
    frames = [
        tp_cm(0, 1, 2, [0x10, 20, 0, 3, 3, *pgn_bytes(pgn)]),
        tp_cm(10, 2, 1, [0x11, 0, 0xFF, 0xFF, 0xFF, *pgn_bytes(pgn)]),
        tp_cm(10 + 1051, 2, 1, [0x11, 3, 1, 0xFF, 0xFF, *pgn_bytes(pgn)]),
    ]
    reassembler = Reassembler()
    assert feed(reassembler, (frames)) == []
    assert reassembler.counts.timed_out == 1


def test_abort_from_either_side_ends_the_connection() -> None:
    pgn = 0xFEE3
    for sender, receiver in ((1, 2), (2, 1)):
        frames = [
            tp_cm(0, 1, 2, [0x10, 20, 0, 3, 3, *pgn_bytes(pgn)]),
            tp_cm(5, 2, 1, [0x11, 3, 1, 0xFF, 0xFF, *pgn_bytes(pgn)]),
            tp_dt(10, 1, 2, 1, b"1234567"),
            tp_cm(15, sender, receiver, [0xFF, 3, 0xFF, 0xFF, 0xFF, *pgn_bytes(pgn)]),
            tp_dt(20, 1, 2, 2, b"1234567"),  # after the abort: data of no transfer
        ]
        reassembler = Reassembler()
        assert feed(reassembler, (frames)) == []
        assert reassembler.counts.aborted == 1
        assert reassembler.counts.bad_frames == 1


def test_bam_gap_past_t1_times_out_and_a_new_bam_replaces_an_unfinished_one() -> None:
    payload = bytes(range(20))
    reassembler = Reassembler()
    late = bam(0, 0x17, 0xFEEC, payload, gap=751)
    assert feed(reassembler, (late)) == []
    assert reassembler.counts.timed_out == 1
    # A batch that ends past a session's deadline ends the session too.
    feed(reassembler, (bam(10_000, 0x17, 0xFEEC, payload)[:2]))
    feed(reassembler, ([(12_000, 0x18F00400, bytes(8))]))
    assert reassembler.counts.timed_out == 2
    restarted = bam(20_000, 0x17, 0xFEEC, payload)
    (done,) = feed(reassembler, (restarted[:2] + bam(20_200, 0x17, 0xFEEC, payload)))
    assert done.data == payload
    assert reassembler.counts.aborted == 1


def test_interleaved_broadcasts_from_two_sources() -> None:
    one, two = bytes(range(10)), bytes(range(100, 130))
    frames = sorted(bam(0, 0x00, 0xFEE3, one, gap=40) + bam(5, 0x03, 0xFECA, two, gap=30))
    done = feed(Reassembler(), frames)
    assert {(t.source, t.pgn, t.data) for t in done} == {(0, 0xFEE3, one), (3, 0xFECA, two)}


@pytest.mark.parametrize(
    "frames",
    [
        [tp_cm(0, 1, 0xFF, [0x20, 8, 0, 2, 0xFF, 0xCA, 0xFE, 0])],  # too short for TP
        [tp_cm(0, 1, 0xFF, [0x20, 20, 0, 9, 0xFF, 0xCA, 0xFE, 0])],  # packets != size
        [tp_cm(0, 1, 0x02, [0x20, 20, 0, 3, 0xFF, 0xCA, 0xFE, 0])],  # BAM to one address
        [tp_cm(0, 1, 0xFF, [0x10, 20, 0, 3, 3, 0xCA, 0xFE, 0])],  # RTS to everyone
        [tp_cm(0, 1, 0xFF, [0x20, 20, 0, 3])],  # a short TP.CM
        [tp_dt(0, 1, 0xFF, 1, b"1234567")],  # data without an announcement
        [tp_cm(0, 2, 1, [0x13, 20, 0, 3, 0xFF, 0xCA, 0xFE, 0])],  # ack of nothing
        [tp_cm(0, 2, 1, [0x42, 20, 0, 3, 0xFF, 0xCA, 0xFE, 0])],  # no such control byte
    ],
)
def test_protocol_garbage_is_counted_and_skipped(frames: list[Frame]) -> None:
    reassembler = Reassembler()
    assert feed(reassembler, (frames)) == []
    assert reassembler.counts.bad_frames == 1
    (done,) = feed(reassembler, (bam(5000, 1, 0xFECA, bytes(10))))
    assert done.data == bytes(10)


def test_the_decoder_finds_transport_and_dm_frames_on_j1939_buses_alone() -> None:
    tesla = Decoder({"*": [TESLA_DBC]})
    for batch in open_log(TESLA_LOG).batches():
        decoded = tesla.decode(batch)
        assert len(decoded.transport) == len(decoded.diagnostic) == 0
    truck = FrameBatch.concat(list(open_log(TRUCK_LOG).batches()))
    for decoder, expected in ((truck_decoder(), True), (Decoder({"*": [TRUCK_DBC]}), False)):
        decoded = decoder.decode(truck)
        pf = (truck.can_id >> 16) & 0xFF
        tp = np.flatnonzero((pf == 0xEB) | (pf == 0xEC))
        assert np.array_equal(decoded.transport, tp) == expected
        # Counted as unknown, as before they had codes of their own.
        assert decoded.unknown == (16_009 if expected else len(truck))
    assert len(truck_decoder().decode(truck).transport) == 152 + 531


def test_text_fields_come_out_as_text() -> None:
    vin = b"1FUJGLDR5CLBP8834*"
    ecu = b"PN-123*SN-456*CHASSIS*ENGINE*ACME*"
    frames = bam(0, 0x00, 0xFEEC, vin) + bam(2000, 0x00, 0xFDC5, ecu + b"\xff\xff")
    listener = J1939Listener(truck_decoder())
    vi, ecuid = listen(listener, frames)
    assert [c.physical().tolist() for c in vi.signals] == [["1FUJGLDR5CLBP8834"]]
    assert {c.name: c.physical().tolist()[0] for c in ecuid.signals} == {
        "ECU_Part_Number": "PN-123",
        "ECU_Serial_Number": "SN-456",
        "ECU_Location": "CHASSIS",
        "ECU_Type": "ENGINE",
        "ECU_Manufacturer_Name": "ACME",
    }
    out = io.StringIO()
    JsonLinesWriter(out).write([vi])
    assert json.loads(out.getvalue())["signals"] == {
        "Vehicle_Identification_Number": "1FUJGLDR5CLBP8834"
    }


def test_single_frame_dm1_and_a_dm2_without_faults() -> None:
    one_fault = bytes([0x44, 0x00, 0x64, 0x00, 0x03, 0x85, 0xFF, 0xFF])  # SPN 100 FMI 3
    no_fault = bytes([0x00, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF])
    frames = [
        (0, 0x18FECA00, one_fault),
        (3, 0x18EFCA00, one_fault),  # PS 0xCA as a destination address: not a DM1
        (5, 0x18FECB03, no_fault),
        (9, 0x18FECA00, b"\x44"),  # too short for the lamps
    ]
    listener = J1939Listener(truck_decoder())
    dm1, dm2 = listen(listener, frames)
    values = {c.name: c.physical().tolist()[0] for c in dm1.signals}
    assert values["SPN"] == 100 and values["FMI"] == 3
    assert values["occurrence_count"] == 5 and values["SPN_conversion_method"] == 1
    assert values["malfunction_indicator_lamp"] == 1 and values["amber_warning_lamp"] == 1
    assert dm2.message.name == "DM2" and dm2.present is not None
    assert [c.name for c, p in zip(dm2.signals, dm2.present[:, 0], strict=True) if p] == [
        c.name for c in dm2.signals[:8]
    ]
    assert listener.faults == 1


def test_a_dbc_message_at_a_pgn_that_j1939_defines_is_left_out_with_a_warning(
    tmp_path: Path,
) -> None:
    dbc = tmp_path / "dm1.dbc"
    # DM1 as some DBCs give it: the lamps and the first fault's SPN bytes, one frame.
    dbc.write_text(
        'VERSION ""\n\nBS_:\n\nBU_:\n\n'
        "BO_ 2566834688 DM1: 8 Vector__XXX\n"
        ' SG_ Lamps : 0|16@1+ (1,0) [0|65535] "" Vector__XXX\n\n'
    )
    j1939, plain = Decoder({"*": [dbc]}, ["*"]), Decoder({"*": [dbc]})
    frame = batch_of([(0, 0x18FECA00, bytes([0x44, 0, 0x64, 0, 3, 5, 0xFF, 0xFF]))])
    decoded = j1939.decode(frame)
    assert any("message DM1 has PGN 0xFECA" in w for w in j1939.warnings)
    assert decoded.decoded == 0 and decoded.diagnostic.tolist() == [0]
    # On a bus not read as J1939 the DBC's message is decoded as it was.
    assert plain.decode(frame).decoded == 1 and not plain.warnings


def test_long_groups_decode_as_cantools_decodes_them(tmp_path: Path) -> None:
    """Motorola, signed, scaled and multiplexed signals past byte 8, and one past the
    payload's end, in a transfer of 20 bytes."""
    dbc = tmp_path / "long.dbc"
    dbc.write_text(
        'VERSION ""\n\nBS_:\n\nBU_:\n\n'
        "BO_ 2566848512 LONG: 21 Vector__XXX\n"
        ' SG_ Mux M : 0|8@1+ (1,0) [0|255] "" Vector__XXX\n'
        ' SG_ Scaled m1 : 72|16@1+ (0.5,-10) [0|0] "" Vector__XXX\n'
        ' SG_ Signed m2 : 72|16@1- (1,0) [0|0] "" Vector__XXX\n'
        ' SG_ Moto : 103|20@0+ (1,0) [0|0] "" Vector__XXX\n'
        ' SG_ Tail : 144|8@1+ (1,0) [0|0] "" Vector__XXX\n'
        ' SG_ Past : 152|16@1+ (1,0) [0|0] "" Vector__XXX\n\n'
    )
    message = load_cantools(dbc).get_message_by_name("LONG")
    listener = J1939Listener(Decoder({"*": [dbc]}, ["*"]))
    for mux in (1, 2, 3):
        payload = bytes([mux]) + bytes(range(200, 219))
        (block,) = listen(listener, bam(0, 0x21, 0xFF00, payload))
        got = {
            c.name: c.physical().tolist()[0]
            for c in block.signals
            if c.present is None or c.present[0]
        }
        if mux == 3:  # selects no signal: cantools refuses the frame, ours leaves both out
            expected = message.decode(
                bytes([1]) + payload[1:], decode_choices=False, allow_truncated=True
            )
            del expected["Scaled"]
            expected["Mux"] = 3
        else:
            expected = message.decode(payload, decode_choices=False, allow_truncated=True)
        assert got == expected


def test_transport_frames_only_on_the_buses_read_as_j1939() -> None:
    frames = bam(0, 0x00, 0xFEEC, b"1FUJGLDR5CLBP8834*")
    both = batch_of(frames + frames)
    both = dataclasses.replace(both, buses=("can0", "can1"))
    both.bus[len(frames) :] = 1
    decoder = Decoder({"*": [TRUCK_DBC]}, ["can1"])
    decoded = decoder.decode(both)
    assert decoded.transport.tolist() == list(range(len(frames), 2 * len(frames)))
    (vin,) = J1939Listener(decoder).listen(both, decoded)
    assert (vin.bus, vin.signals[0].physical().tolist()) == ("can1", ["1FUJGLDR5CLBP8834"])
