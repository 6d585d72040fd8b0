"""ASC, BLF, TRC, MF4 and CSV logs through python-can: the same frames as the candump log."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import can
import numpy as np
import pytest

from agent.frames import FrameBatch, FrameFlag
from agent.logs import LogError, open_log
from harness.data import TRUCK_DIR, TRUCK_LOG

# The ASC file dates its trigger block 179 ms after the frames' recorded epoch times (the
# converter that wrote it rounded the start); offsets from that date are exact.
TIME_TOLERANCE_NS = {"truck.asc": 200_000_000}


@cache
def read(path: Path, max_frames: int = 100_000) -> tuple[FrameBatch, int]:
    reader = open_log(path)
    frames = FrameBatch.concat(list(reader.batches(max_frames)))
    return frames, reader.stats.malformed


@pytest.mark.parametrize("name", ["truck.asc", "truck.blf", "truck.trc", "truck_00000001.MF4"])
def test_each_format_gives_the_candump_frames(name: str) -> None:
    frames, malformed = read(TRUCK_DIR / name)
    reference, _ = read(TRUCK_LOG)
    assert malformed == 0
    assert len(frames) == len(reference) == 57_849
    for column in ("can_id", "flags", "length", "data"):
        assert np.array_equal(getattr(frames, column), getattr(reference, column)), column
    offset = frames.t_ns - reference.t_ns
    # Constant offset at most (a header's start time), never drift between frames.
    assert offset.max() - offset.min() <= 1_000
    assert abs(int(offset[0])) <= TIME_TOLERANCE_NS.get(name, 1_000)


def test_bus_names_are_python_cans_channels() -> None:
    frames, _ = read(TRUCK_DIR / "truck.blf")
    reference = list(can.BLFReader(str(TRUCK_DIR / "truck.blf")))
    assert [frames.buses[b] for b in frames.bus[:1000]] == [
        str(m.channel) for m in reference[:1000]
    ]


@pytest.mark.parametrize("max_frames", [1, 7, 10_000])
def test_batch_boundaries_change_nothing(max_frames: int) -> None:
    whole, _ = read(TRUCK_DIR / "truck.blf")
    reader = open_log(TRUCK_DIR / "truck.blf")
    parts = []
    for batch in reader.batches(max_frames):
        assert len(batch) <= max_frames
        parts.append(batch)
        if sum(len(p) for p in parts) >= 3000 and max_frames < 10:
            break
    joined = FrameBatch.concat(parts)
    n = len(joined)
    assert (
        np.array_equal(joined.data, whole.data[:n])
        and joined.buses == whole.buses[: len(joined.buses)]
    )
    assert np.array_equal(joined.bus, whole.bus[:n])


def test_csv_written_by_python_can_reads_back(tmp_path: Path) -> None:
    messages = [
        can.Message(timestamp=1.5, arbitration_id=0x123, data=b"\x01\x02", is_extended_id=False),
        can.Message(timestamp=2.25, arbitration_id=0x1ABCDEF0, data=bytes(8), is_extended_id=True),
        can.Message(
            timestamp=3.0, arbitration_id=0x7FF, is_remote_frame=True, dlc=4, is_extended_id=False
        ),
        can.Message(
            timestamp=4.0, is_error_frame=True, arbitration_id=0, data=b"\x04", is_extended_id=False
        ),
    ]
    path = tmp_path / "frames.csv"
    with can.CSVWriter(str(path)) as writer:
        for msg in messages:
            writer.on_message_received(msg)
    frames, malformed = read(path)
    assert malformed == 0
    assert frames.t_ns.tolist() == [1_500_000_000, 2_250_000_000, 3_000_000_000, 4_000_000_000]
    assert frames.can_id.tolist() == [0x123, 0x1ABCDEF0, 0x7FF, 0]
    assert frames.flags.tolist() == [0, FrameFlag.EXTENDED, FrameFlag.REMOTE, FrameFlag.ERROR]
    assert frames.length.tolist() == [2, 8, 4, 1]
    assert frames.payload(0) == b"\x01\x02"


def test_a_cut_blf_keeps_what_came_before_the_cut(tmp_path: Path) -> None:
    original = (TRUCK_DIR / "truck.blf").read_bytes()
    cut = tmp_path / "cut.blf"
    cut.write_bytes(original[: len(original) // 2])
    frames, _ = read(cut)
    whole, _ = read(TRUCK_DIR / "truck.blf")
    assert 0 < len(frames) < len(whole)
    assert np.array_equal(frames.data, whole.data[: len(frames)])


def test_garbage_in_a_blf_is_counted_not_raised(tmp_path: Path) -> None:
    original = bytearray((TRUCK_DIR / "truck.blf").read_bytes())
    middle = len(original) // 2
    original[middle : middle + 4096] = np.random.default_rng(3).bytes(4096)
    damaged = tmp_path / "damaged.blf"
    damaged.write_bytes(bytes(original))
    reader = open_log(damaged)
    frames = FrameBatch.concat(list(reader.batches(10_000)))
    whole, _ = read(TRUCK_DIR / "truck.blf")
    assert 0 < len(frames) <= len(whole)
    assert reader.stats.malformed >= 1 or len(frames) < len(whole)


def test_an_asc_with_a_garbage_line(tmp_path: Path) -> None:
    lines = (TRUCK_DIR / "truck.asc").read_text().splitlines()[:200]
    lines.insert(100, "this line is not ASC at all #$%")
    path = tmp_path / "garbage.asc"
    path.write_text("\n".join(lines) + "\n")
    frames, _ = read(path)
    assert len(frames) >= 180


def test_a_missing_or_unreadable_log(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=r"nope\.blf"):
        open_log(tmp_path / "nope.blf")
    not_blf = tmp_path / "text.blf"
    not_blf.write_text("hello")
    with pytest.raises(LogError, match=r"text\.blf"):
        list(open_log(not_blf).batches())


def test_an_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "frames.xyz"
    path.write_text("")
    with pytest.raises(LogError, match="cannot tell the log format"):
        open_log(path)


def test_mf4_without_asammdf_says_what_to_install() -> None:
    script = (
        "import sys\n"
        "sys.modules['asammdf'] = None  # as if the mf4 extra were not installed\n"
        "from agent.logs import LogError, open_log\n"
        "try:\n"
        f"    list(open_log({str(TRUCK_DIR / 'truck_00000001.MF4')!r}).batches())\n"
        "except LogError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert "pip install 'vehicle-telemetry-agent[mf4]'" in done.stdout, done.stderr
    assert "truck_00000001.MF4" in done.stdout


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_asc_times_are_utc_whatever_the_machine_s_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zone: str
) -> None:
    log = tmp_path / "dated.asc"
    log.write_text(
        "date Mon Jul 14 09:30:00.000 2025\nbase hex  timestamps absolute\n"
        "internal events logged\n"
        "   1.500000 1  123             Rx   d 2 01 02\n"
    )
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        frames = FrameBatch.concat(list(open_log(log).batches()))
    finally:
        monkeypatch.undo()
        time.tzset()
    started = datetime(2025, 7, 14, 9, 30, tzinfo=UTC).timestamp()
    assert frames.t_ns.tolist() == [round((started + 1.5) * 1e9)]


def test_a_standard_frame_past_11_bits_is_malformed_in_every_format(tmp_path: Path) -> None:
    # Some BLF files hold such frames; candump's reader refuses "800#..." alike.
    log = tmp_path / "wide.blf"
    with can.BLFWriter(str(log)) as writer:
        for can_id, extended in ((0x123, False), (0x800, False), (0x800, True)):
            writer.on_message_received(
                can.Message(timestamp=1.0, arbitration_id=can_id, is_extended_id=extended,
                            data=b"\x01", check=False)
            )  # fmt: skip
    reader = open_log(log)
    frames = FrameBatch.concat(list(reader.batches()))
    assert frames.can_id.tolist() == [0x123, 0x800]
    assert frames.flags.tolist() == [0, FrameFlag.EXTENDED]
    assert reader.stats.malformed == 1
    assert "ID 0x800 out of range for a standard frame" in reader.stats.examples[0]
    candump = tmp_path / "wide.log"
    candump.write_text("(1.000000) can0 123#01\n(1.000000) can0 800#01\n")
    reader = open_log(candump)
    assert [len(b) for b in reader.batches()] == [1] and reader.stats.malformed == 1
