"""Logs compressed as users keep them (`.gz`, `.xz`, `.bz2`, `.zst` around any format): read
without unpacking to disk, by `open_log`, the `decode` command and a replay source."""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard

from agent.frames import FrameBatch
from agent.logs import LogError, open_log
from harness.data import TESLA_DBC, TESLA_LOG, TRUCK_DIR, TRUCK_LOG
from tests.test_agent_sources import agent_for, received_lines
from tests.test_cli_decode import decode
from tests.test_pythoncan_logs import read

# The fastest levels: the reading is what is tested.
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": lambda data: gzip.compress(data, 1),
    ".xz": lambda data: lzma.compress(data, preset=0),
    ".bz2": lambda data: bz2.compress(data, 1),
    ".zst": zstandard.ZstdCompressor(level=1).compress,
}
# Every compression around our candump reader, and each once around a python-can format
# (the same decompressing file object serves them all; their readers take seconds each).
CASES = [("truck.candump.log", suffix) for suffix in COMPRESS] + [
    ("truck.asc", ".gz"),
    ("truck.blf", ".bz2"),
    ("truck.trc", ".xz"),
    ("truck_00000001.MF4", ".zst"),
]


def compressed(tmp_path: Path, log: Path, suffix: str) -> Path:
    path = tmp_path / (log.name + suffix)
    path.write_bytes(COMPRESS[suffix](log.read_bytes()))
    return path


def frames_of(path: Path, chunk_bytes: int | None = None) -> FrameBatch:
    reader = open_log(path)
    if chunk_bytes is not None:
        reader.chunk_bytes = chunk_bytes  # type: ignore[attr-defined]
    frames = FrameBatch.concat(list(reader.batches()))
    assert reader.stats.malformed == 0
    return frames


def same_frames(ours: FrameBatch, theirs: FrameBatch) -> bool:
    columns = ("t_ns", "can_id", "flags", "length", "data")
    return len(ours) == len(theirs) and all(
        np.array_equal(getattr(ours, c), getattr(theirs, c)) for c in columns
    )


@pytest.mark.parametrize(("name", "suffix"), CASES)
def test_every_format_reads_the_same_compressed(tmp_path: Path, name: str, suffix: str) -> None:
    plain, _ = read(TRUCK_DIR / name)  # cached: test_pythoncan_logs reads each too
    assert same_frames(frames_of(compressed(tmp_path, TRUCK_DIR / name, suffix)), plain)


def test_a_multi_frame_zstd_file_reads_whole(tmp_path: Path) -> None:
    # pzstd and `zstd --long` write several frames into one file.
    data = TRUCK_LOG.read_bytes()
    half = data.index(b"\n", len(data) // 2) + 1
    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "truck.candump.log.zst"
    path.write_bytes(compressor.compress(data[:half]) + compressor.compress(data[half:]))
    assert same_frames(frames_of(path, chunk_bytes=4096), read(TRUCK_LOG)[0])


def test_a_cut_compressed_log_keeps_its_frames_and_is_reported(tmp_path: Path) -> None:
    whole = gzip.compress(TRUCK_LOG.read_bytes())
    path = tmp_path / "cut.log.gz"
    path.write_bytes(whole[: len(whole) // 2])
    reader = open_log(path)
    got: list[FrameBatch] = []
    with pytest.raises(LogError, match=r"cut\.log\.gz"):
        got.extend(reader.batches(1000))
    frames = FrameBatch.concat(got)
    reference, _ = read(TRUCK_LOG)
    assert 0 < len(frames) < len(reference)
    assert np.array_equal(frames.data, reference.data[: len(frames)])


def test_the_format_comes_from_the_suffix_inside_the_compression(tmp_path: Path) -> None:
    with pytest.raises(LogError, match=r"'\.txt'.*\.gz"):
        open_log(tmp_path / "notes.txt.gz")
    path = compressed(tmp_path, TRUCK_DIR / "truck.blf", ".gz")
    assert open_log(path).format == "blf"


def test_decode_reads_a_compressed_log_as_the_plain_one(tmp_path: Path) -> None:
    plain = decode(TESLA_LOG, "--dbc", TESLA_DBC)
    packed = decode(compressed(tmp_path, TESLA_LOG, ".xz"), "--dbc", TESLA_DBC)
    assert plain.returncode == packed.returncode == 0, packed.stderr
    assert packed.stdout == plain.stdout


async def test_a_replay_source_reads_a_compressed_log(tmp_path: Path) -> None:
    lines = {}
    for label, log in (("plain", TESLA_LOG), ("zst", compressed(tmp_path, TESLA_LOG, ".zst"))):
        folder = tmp_path / label
        folder.mkdir()
        bus = f'[[bus]]\nname = "vcan0"\nsource = "replay"\npath = "{log}"\ndbc = ["{TESLA_DBC}"]\n'
        assert await agent_for(folder, bus).run() == 0
        lines[label] = received_lines(folder / "outbox")
    assert lines["zst"] == lines["plain"] and lines["plain"]
