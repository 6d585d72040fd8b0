"""The numpy candump reader against python-can's, and against everything a log can throw at it."""

from __future__ import annotations

import re
from decimal import Decimal
from functools import cache
from pathlib import Path

import can
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.frames import FrameBatch, FrameFlag
from agent.logs import LogError, open_log
from agent.logs.candump import CHUNK_BYTES, CandumpReader
from harness.data import RAV4_LOG, TESLA_LOG, TRUCK_LOG


def read(path: Path, max_frames: int = 100_000, **options: int) -> tuple[FrameBatch, CandumpReader]:
    reader = CandumpReader(path, **options)
    batches = list(reader.batches(max_frames))
    for batch in batches:
        assert len(batch) <= max_frames
    return FrameBatch.concat(batches) if batches else FrameBatch.empty(), reader


@cache
def python_can(path: Path) -> list[can.Message]:
    return list(can.CanutilsLogReader(str(path)))


def exact_ns(line: str) -> int:
    return int(Decimal(line.split(")")[0][1:]) * 1_000_000_000)


@pytest.mark.parametrize("log", [TESLA_LOG, RAV4_LOG, TRUCK_LOG], ids=lambda p: p.name)
def test_real_logs_read_as_python_can_reads_them(log: Path) -> None:
    frames, reader = read(log)
    reference = python_can(log)
    assert len(frames) == len(reference) == reader.stats.frames
    assert reader.stats.malformed == 0
    lines = log.read_text().splitlines()
    assert frames.t_ns.tolist() == [exact_ns(line) for line in lines]
    for row, msg in enumerate(reference):
        assert frames.buses[frames.bus[row]] == msg.channel
        assert frames.can_id[row] == msg.arbitration_id
        flags = int(frames.flags[row])
        assert bool(flags & FrameFlag.EXTENDED) == msg.is_extended_id
        assert bool(flags & FrameFlag.REMOTE) == msg.is_remote_frame
        assert bool(flags & FrameFlag.FD) == msg.is_fd
        assert frames.payload(row) == bytes(msg.data)


KINDS = """\
(1.000001) can0 123#DEADBEEF
(2.5) can0 12345678#0102030405060708
(3.000000) can0 123#R
(3.100000) can0 123#R5
(4.000000) vcan1 20000004#0000080000000000
(5.000000) can0 123##1000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F\
202122232425262728292A2B2C2D2E2F303132333435363738393A3B3C3D3E3F
(6.000000) can0 7FF##2AABB
(7.000000) can0 123#1122_C
(8.000000) can0 456#0102 R\r
(9.123456789) can0 000#
 \t
(10.000000) can0 321#AABB T
(11.000000) can0 321#CCDD \t \r
(12.000000) can0 321#EEFF R\t"""


def test_every_kind_of_line(tmp_path: Path) -> None:
    log = tmp_path / "kinds.log"
    log.write_text(KINDS)
    frames, reader = read(log)
    assert reader.stats.malformed == 0, reader.stats.examples
    assert frames.buses == ("can0", "vcan1")
    F = FrameFlag
    expected = [
        (1_000_001_000, 0x123, 0, b"\xde\xad\xbe\xef"),
        (2_500_000_000, 0x12345678, F.EXTENDED, bytes(range(1, 9))),
        (3_000_000_000, 0x123, F.REMOTE, b""),
        (3_100_000_000, 0x123, F.REMOTE, b"\0" * 5),
        (4_000_000_000, 0x4, F.ERROR, bytes.fromhex("0000080000000000")),
        (5_000_000_000, 0x123, F.FD | F.BRS, bytes(range(64))),
        (6_000_000_000, 0x7FF, F.FD | F.ESI, b"\xaa\xbb"),
        (7_000_000_000, 0x123, 0, b"\x11\x22"),
        (8_000_000_000, 0x456, 0, b"\x01\x02"),
        (9_123_456_789, 0x000, 0, b""),
        (10_000_000_000, 0x321, 0, b"\xaa\xbb"),
        # Blanks after the last field, as can-utils, python-can and cantools allow.
        (11_000_000_000, 0x321, 0, b"\xcc\xdd"),
        (12_000_000_000, 0x321, 0, b"\xee\xff"),
    ]
    assert len(frames) == len(expected)
    for row, (t_ns, can_id, flags, payload) in enumerate(expected):
        assert (int(frames.t_ns[row]), int(frames.can_id[row]), int(frames.flags[row])) == (
            t_ns,
            can_id,
            flags,
        ), row
        if flags & F.REMOTE:
            assert frames.length[row] == len(payload) and not frames.data[row].any()
        else:
            assert frames.payload(row) == payload
            assert not frames.data[row, len(payload) :].any()


GARBAGE = [
    "garbage",
    "(1.0) can0 123#ABC",  # odd number of hex digits
    "(1.0) can0 123#0102030405060708090A",  # 10 bytes in a classic frame
    "(1.0) can0 1234#00",  # a 4-digit ID
    "(1.0) can0 800#00",  # above 0x7FF in a standard frame
    "(x.0) can0 123#00",
    "(1.0) can0 123#GG",
    "(1.0) can0 123##1" + "00" * 10,  # 10 bytes is no CAN FD length
    "(1.0) can0 123###00",  # CAN XL
    "(1.0) can0 123#R5x",
    "(1.0) can0 123#00 X",
    "(1.0)can0 123#00",
    "(1.0) averyveryverylongifname 123#00",
    "(99999999999.0) can0 123#00",  # seconds beyond int64 nanoseconds
    "(1.0) can0",
    "\x00\x01\x02\xff binary",
]


def test_malformed_lines_are_counted_with_their_numbers_and_skipped(tmp_path: Path) -> None:
    lines = []
    for i, bad in enumerate(GARBAGE):
        lines += [f"({i}.000000) can0 1{i % 10}0#{i:02X}", bad]
    log = tmp_path / "mixed.log"
    log.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    frames, reader = read(log)
    assert len(frames) == len(GARBAGE)
    assert frames.payload(3) == b"\x03"
    assert reader.stats.malformed == len(GARBAGE)
    assert reader.stats.examples[0] == "line 2: 'garbage'"
    assert reader.stats.examples[1].startswith("line 4: ")


def test_a_binary_file_is_malformed_lines_not_a_crash(tmp_path: Path) -> None:
    log = tmp_path / "random.log"
    log.write_bytes(np.random.default_rng(7).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    frames, reader = read(log)
    assert len(frames) == 0 and reader.stats.malformed > 0


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=r"missing\.log"):
        open_log(tmp_path / "missing.log")
    with pytest.raises(LogError, match="a-folder"):
        (tmp_path / "a-folder.log").mkdir()
        open_log(tmp_path / "a-folder.log")


@pytest.mark.parametrize(
    ("max_frames", "chunk_bytes"), [(1, 1 << 20), (7, 64), (1000, 333), (10, 1)]
)
def test_batch_and_chunk_boundaries_change_nothing(
    tmp_path: Path, max_frames: int, chunk_bytes: int
) -> None:
    whole, _ = read(TESLA_LOG)
    n = 3000 if chunk_bytes < 100 or max_frames == 1 else len(whole)
    path = tmp_path / "excerpt.log"
    path.write_bytes(b"".join(TESLA_LOG.read_bytes().splitlines(keepends=True)[:n]))
    parts, reader = read(path, max_frames, chunk_bytes=chunk_bytes)
    expected = whole.take(slice(0, n))
    for column in ("t_ns", "bus", "can_id", "flags", "length", "data"):
        assert np.array_equal(getattr(parts, column), getattr(expected, column)), column
    assert reader.stats.frames == n


FRAME = st.tuples(
    st.integers(0, 9_223_372_035),  # whole seconds whose nanoseconds fit int64 (to 2262)
    st.integers(0, 999_999),
    st.sampled_from(["can0", "can1", "vcan12", "x"]),
    st.booleans(),
    st.integers(0, 0x1FFFFFFF),
    st.binary(max_size=8),
)


# Text that is never a frame line: it does not start with '(' and stays on one line.
GARBAGE_TEXT = st.text(max_size=30).filter(
    lambda t: "\n" not in t and "\r" not in t and not t.startswith("(")
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(st.one_of(FRAME, GARBAGE_TEXT), max_size=60))
def test_generated_lines_round_trip(
    tmp_path: Path, frames: list[tuple[int, int, str, bool, int, bytes] | str]
) -> None:
    lines: list[str] = []
    expected: list[tuple[int, str, int, bool, bytes]] = []
    for item in frames:
        if isinstance(item, str):
            lines.append(item)
            continue
        seconds, micros, bus, extended, can_id, payload = item
        can_id = can_id if extended else can_id & 0x7FF
        text_id = f"{can_id:08X}" if extended else f"{can_id:03X}"
        if extended and can_id & 0x20000000:
            continue
        lines.append(f"({seconds}.{micros:06d}) {bus} {text_id}#{payload.hex().upper()}")
        expected.append((seconds * 10**9 + micros * 1000, bus, can_id, extended, payload))
    log = tmp_path / "generated.log"
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got, reader = read(log, 5, chunk_bytes=97)
    assert len(got) == len(expected)
    for row, (t_ns, bus, can_id, extended, payload) in enumerate(expected):
        assert int(got.t_ns[row]) == t_ns
        assert got.buses[got.bus[row]] == bus
        assert int(got.can_id[row]) == can_id
        assert bool(got.flags[row] & FrameFlag.EXTENDED) == extended
        assert got.payload(row) == payload
    # A line of blanks alone is a blank line, which no reader counts.
    garbage = [item for item in frames if isinstance(item, str)]
    assert reader.stats.malformed == sum(1 for line in garbage if line.strip(" \t\r"))


def test_a_line_longer_than_many_chunks_is_one_malformed_line(tmp_path: Path) -> None:
    log = tmp_path / "long.log"
    log.write_bytes(b"(1.0) can0 123#00\n" + b"x" * 10_000 + b"\n(2.0) can0 124#01\n")
    frames, reader = read(log, chunk_bytes=100)
    assert frames.can_id.tolist() == [0x123, 0x124]
    assert reader.stats.malformed >= 1


@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
def test_a_channel_filter_leaves_out_only_other_channels(chunk_bytes: int) -> None:
    everything = FrameBatch.concat(list(CandumpReader(RAV4_LOG).batches(1_000_000)))
    reader = CandumpReader(RAV4_LOG, chunk_bytes=chunk_bytes)
    reader.channels = frozenset({"can0", "can1"})
    some = FrameBatch.concat(list(reader.batches(1_000_000)))
    wanted = np.isin(np.array(everything.buses)[everything.bus], ["can0", "can1"])
    expected = everything.take(wanted)
    assert len(some) == len(expected) < len(everything)
    assert (np.array(some.buses)[some.bus] == np.array(expected.buses)[expected.bus]).all()
    for column in ("t_ns", "can_id", "flags", "length", "data"):
        assert (getattr(some, column) == getattr(expected, column)).all(), column


def test_a_channel_filter_still_counts_malformed_lines_by_their_numbers(tmp_path: Path) -> None:
    log = tmp_path / "mixed.log"
    log.write_text(
        "(1.000000) can0 100#01\n"
        "(1.000001) can9 100#01\n"  # another channel: left out
        "(1.000002) can9 1G0#01\n"  # another channel, malformed past its name: left out
        "garbage\n"  # no channel to read: malformed
        "(1.000003) can0 1G0#01\n"  # this channel, malformed
        "(1.000004) can0 101#02\n"
    )
    reader = CandumpReader(log)
    reader.channels = frozenset({"can0"})
    frames = FrameBatch.concat(list(reader.batches()))
    assert frames.can_id.tolist() == [0x100, 0x101]
    assert reader.stats.malformed == 2
    assert reader.stats.examples == ["line 4: 'garbage'", "line 5: '(1.000003) can0 1G0#01'"]


# The grammar the reader accepts, as a regular expression: the oracle for mutated lines.
ORACLE = re.compile(
    r"\((?P<sec>\d{1,10})\.(?P<frac>\d{1,9})\) (?P<bus>[^ ]{1,15}) "
    r"(?P<id>[0-9A-Fa-f]{3}|[0-9A-Fa-f]{8})#"
    r"(?:[Rr](?P<rlen>\d)?|#(?P<fd>[0-9A-Fa-f])(?P<fd_data>(?:[0-9A-Fa-f]{2})*)"
    r"|(?P<data>(?:[0-9A-Fa-f]{2})*)(?:_[0-9A-Fa-f])?)"
    r"(?: [RT])?[ \t\r]*"
)
FD_LENGTHS = {*range(9), 12, 16, 20, 24, 32, 48, 64}


def oracle(line: str) -> tuple[int, str, int, int, bytes] | None:
    """(t_ns, bus, id, flags, payload) of a line, or None for a malformed one."""
    match = ORACLE.fullmatch(line)
    if match is None:
        return None
    g = match.groupdict()
    seconds, raw_id = int(g["sec"]), int(g["id"], 16)
    if seconds > (2**63 - 1) // 10**9 - 1 or (len(g["id"]) == 3 and raw_id > 0x7FF):
        return None
    flags = 0
    if len(g["id"]) == 8:
        flags = FrameFlag.ERROR if raw_id & 0x20000000 else FrameFlag.EXTENDED
    if g["fd"] is not None:
        payload = bytes.fromhex(g["fd_data"])
        if len(payload) not in FD_LENGTHS:
            return None
        fd = int(g["fd"], 16)
        flags |= FrameFlag.FD | (FrameFlag.BRS if fd & 1 else 0) | (FrameFlag.ESI if fd & 2 else 0)
    elif g["data"] is not None:
        payload = bytes.fromhex(g["data"])
        if len(payload) > 8:
            return None
    else:
        payload = bytes(int(g["rlen"] or 0))
        flags |= FrameFlag.REMOTE
        if len(payload) > 8:
            return None
    t_ns = seconds * 10**9 + int(g["frac"].ljust(9, "0"))
    return t_ns, g["bus"], raw_id & 0x1FFFFFFF, flags, payload


VALID_LINE = st.builds(
    lambda sec, digits, frac, bus, ext, can_id, data, fd, tail: (
        f"({sec}.{frac % 10**digits:0{digits}d}) {bus} "
        + (f"{can_id & 0x1FFFFFFF:08X}" if ext else f"{can_id & 0x7FF:03x}")
        + (f"##{fd}" if fd is not None else "#")
        + data.hex().upper()
        + tail
    ),
    st.integers(0, 9_999_999_999),
    st.integers(1, 9),
    st.integers(0, 999_999_999),
    # Names are bytes (read as latin-1): NUL and 0xFF bytes, 8 of them, two that differ
    # only past their eighth byte, 15 of them.
    st.sampled_from(
        ["can0", "can0\0", "\0", "\xff" * 8, "canbus12\x01", "canbus12\x02", "averylongname15"]
    ),
    st.booleans(),
    st.integers(0, 0x3FFFFFFF),
    st.binary(max_size=12),
    st.sampled_from([None, "0", "1", "3"]),
    st.sampled_from(["", " R", " T", "\r", " ", "\t", " R \t\r"]),
)


@st.composite
def mutated_line(draw: st.DrawFn) -> str:
    """A valid line with a character inserted, deleted or replaced: mostly malformed, and
    hard to tell from a good line for a parser that takes shortcuts."""
    line: str = draw(VALID_LINE)
    at = draw(st.integers(0, len(line)))
    char = draw(st.sampled_from(list(".#() _R0aF\r\t")))
    edit = draw(st.sampled_from(["insert", "delete", "replace"]))
    if edit == "insert":
        return line[:at] + char + line[at:]
    return line[:at] + (char if edit == "replace" else "") + line[at + 1 :]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.one_of(VALID_LINE, mutated_line(), GARBAGE_TEXT), max_size=40),
    chunk_bytes=st.sampled_from([1, 61, 997, CHUNK_BYTES]),
)
def test_every_line_reads_as_the_grammar_says(
    tmp_path: Path, lines: list[str], chunk_bytes: int
) -> None:
    lines = [line for line in lines if "\n" not in line]
    log = tmp_path / "mutated.log"
    # Frame lines as the bytes they stand for; garbage beyond latin-1 as UTF-8.
    encoded = []
    for line in lines:
        try:
            encoded.append(line.encode("latin-1"))
        except UnicodeEncodeError:
            encoded.append(line.encode("utf-8"))
    log.write_bytes(b"\n".join(encoded) + b"\n")
    got, reader = read(log, 7, chunk_bytes=chunk_bytes)
    expected = [frame for frame in map(oracle, lines) if frame is not None]
    blank = sum(1 for line in lines if not line.strip(" \t\r"))
    assert reader.stats.malformed == len(lines) - len(expected) - blank, reader.stats.examples
    assert len(got) == len(expected)
    for row, (t_ns, bus, can_id, flags, payload) in enumerate(expected):
        assert int(got.t_ns[row]) == t_ns, row
        assert got.buses[got.bus[row]] == bus, row
        assert (int(got.can_id[row]), int(got.flags[row])) == (can_id, flags), row
        if flags & FrameFlag.REMOTE:
            assert got.length[row] == len(payload) and not got.data[row].any()
        else:
            assert got.payload(row) == payload, row


def test_a_short_fraction_after_a_line_with_a_dot_where_six_decimals_put_it(
    tmp_path: Path,
) -> None:
    # Seven characters before this line's ')' is the '.' of the line before: the dot is
    # where six decimals would put it, but in another line.
    log = tmp_path / "short.log"
    log.write_text("garbage.a\n(1.5) can0 123#00\n")
    frames, reader = read(log)
    assert frames.t_ns.tolist() == [1_500_000_000]
    assert reader.stats.malformed == 1


def test_every_interface_name_of_a_log_with_256_buses(tmp_path: Path) -> None:
    # Enough names that some hash to one slot, so the reader picks other multipliers.
    names = [f"{'x' * (i % 11)}{i:03d}n" for i in range(256)]  # 4 to 14 characters
    order = np.random.default_rng(3).permutation(np.repeat(np.arange(256), 3))
    log = tmp_path / "buses.log"
    log.write_text(
        "".join(f"({row}.000000) {names[i]} 123#{i % 256:02X}\n" for row, i in enumerate(order))
    )
    frames, reader = read(log, chunk_bytes=1000)
    assert reader.stats.malformed == 0
    assert [frames.buses[b] for b in frames.bus] == [names[i] for i in order]
    log.write_text(log.read_text() + "(9.0) one-too-many 123#00\n")
    with pytest.raises(LogError, match="more than 256 buses"):
        read(log)


def test_interface_names_that_end_in_nul_bytes_are_names_of_their_own(tmp_path: Path) -> None:
    log = tmp_path / "nul.log"
    log.write_bytes(b"(1.0) can0\0 123#00\n(2.0) can0 123#01\n(3.0) \0 123#02\n(4.0) can0 123#03\n")
    frames, reader = read(log)
    assert reader.stats.malformed == 0
    assert [frames.buses[b] for b in frames.bus] == ["can0\0", "can0", "\0", "can0"]


def test_other_channels_take_no_bus_of_the_log(tmp_path: Path) -> None:
    # 300 names of other channels would be more buses than a batch can name.
    lines = [f"({i}.0) other{i} 123#00" for i in range(300)]
    lines[150:150] = ["(1.5) can0 124#01", "(1.6) can0 12G#01"]
    log = tmp_path / "many.log"
    log.write_text("\n".join(lines) + "\n")
    reader = CandumpReader(log, chunk_bytes=1000)
    reader.channels = frozenset({"can0", "not-in-the-log-and-longer-than-15"})
    frames = FrameBatch.concat(list(reader.batches()))
    assert frames.buses == ("can0",) and frames.can_id.tolist() == [0x124]
    assert reader.stats.malformed == 1
    assert reader.stats.examples == ["line 152: '(1.6) can0 12G#01'"]


@pytest.mark.parametrize("chunk_bytes", [100, CHUNK_BYTES])
def test_a_line_longer_than_a_mebibyte_is_one_malformed_line_skipped(
    tmp_path: Path, chunk_bytes: int
) -> None:
    log = tmp_path / "long.log"
    log.write_bytes(
        b"(1.0) can0 123#00\n"
        + b"x" * (3 << 20)
        + b"\n(2.0) can0 124##1"
        + b"AB" * 64
        + b"\ngarbage\n(3.0) can0 125#02"
    )
    frames, reader = read(log, chunk_bytes=chunk_bytes)
    assert frames.can_id.tolist() == [0x123, 0x124, 0x125]
    assert frames.payload(1) == b"\xab" * 64
    assert reader.stats.malformed == 2
    assert reader.stats.examples == ["line 2: '" + "x" * 80 + "'", "line 4: 'garbage'"]


def test_a_can_fd_line_read_a_byte_at_a_time(tmp_path: Path) -> None:
    log = tmp_path / "fd.log"
    log.write_bytes(b"(2.0) can0 124##1" + b"AB" * 64 + b"\n(3.0) can0 125#02\n")
    frames, reader = read(log, chunk_bytes=1)  # the FD line is 145 one-byte chunks
    assert frames.can_id.tolist() == [0x124, 0x125] and reader.stats.malformed == 0
