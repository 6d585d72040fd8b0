"""The spool on its own, on real batches: restarts, torn and corrupt records, the disk
budget, a failing disk, and the fsync modes."""

from __future__ import annotations

import errno
import functools
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from agent import spool as spool_module
from agent.config import SpoolConfig
from agent.decode import ALL_BUSES, DecodedBatch, Decoder
from agent.logs import open_log
from agent.metrics import Metrics
from agent.spool import RECORD, SEGMENT_HEADER, Spool, SpoolError
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import WireBatch
from harness.data import TRUCK_DBC, TRUCK_LOG

Batch = tuple[WireBatch, bytes]  # a batch and its schema announcement


@functools.cache
def decoded_truck() -> list[DecodedBatch]:
    decoder = Decoder({ALL_BUSES: [TRUCK_DBC]}, [ALL_BUSES])
    return [decoder.decode(frames) for frames in open_log(TRUCK_LOG).batches(1000)]


def make_batches(stream_id: str, count: int, first: int = 1) -> list[Batch]:
    """`count` real batches of the truck log (1,000 frames each, repeating the log)."""
    encoder = BatchEncoder("truck", stream_id, b"digest")
    results = decoded_truck()
    batches = []
    for k in range(count):
        wire = encoder.encode([results[k % len(results)]], first + k)
        assert wire is not None
        batches.append((wire, encoder.announcement(wire.schema_id)))
    return batches


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"telemetry_agent_{name}", labels)
    return value or 0.0


class Opened:
    """A spool opened on a folder, as the agent opens it."""

    def __init__(self, folder: Path, config: SpoolConfig | None = None) -> None:
        self.metrics = Metrics()
        self.spool = Spool(folder, config or SpoolConfig(), self.metrics)
        self.recovery = self.spool.open()

    def payloads(self) -> dict[int, bytes]:
        out = {}
        for sequence, entry in list(self.spool.pending.items()):
            batch = self.spool.batch(entry)
            assert batch is not None
            out[sequence] = batch.payload
        return out


async def filled(folder: Path, count: int, config: SpoolConfig | None = None) -> list[Batch]:
    """A spool in `folder` holding `count` batches, closed as the agent closes it."""
    opened = Opened(folder, config)
    batches = make_batches(opened.spool.stream_id, count)
    for wire, announcement in batches:
        opened.spool.add(wire, announcement)
    await opened.spool.close()
    return batches


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.seg"))


async def test_batches_and_the_stream_survive_a_restart(tmp_path: Path) -> None:
    first = Opened(tmp_path)
    batches = make_batches(first.spool.stream_id, 30)
    for wire, announcement in batches:
        first.spool.add(wire, announcement)
    await first.spool.sync()
    assert list(first.spool.pending) == list(range(1, 31))
    for sequence in range(1, 11):
        assert first.spool.acknowledge(sequence)
    assert not first.spool.acknowledge(5)  # twice: nothing happens
    await first.spool.close()

    second = Opened(tmp_path)
    assert second.spool.stream_id == first.spool.stream_id
    assert second.spool.next_sequence == 31
    assert second.recovery.batches == 20
    assert second.payloads() == {w.sequence: w.payload for w, _ in batches[10:]}
    assert sample(second.metrics, "spool_recovered_batches_total") == 20
    # Each spooled batch's schema is still there to announce, though no encoder made it.
    schema_id = batches[0][0].schema_id
    assert second.spool.announcement(schema_id) == batches[0][1]


async def test_acknowledged_segments_are_deleted(tmp_path: Path) -> None:
    config = SpoolConfig(max_bytes=200_000)  # segments of 25 kB: several batches each
    opened = Opened(tmp_path, config)
    for wire, announcement in make_batches(opened.spool.stream_id, 40):
        opened.spool.add(wire, announcement)
    await opened.spool.sync()
    assert len(segments(tmp_path)) > 3
    for sequence in range(1, 41):
        opened.spool.acknowledge(sequence)
    await opened.spool.sync()
    assert len(segments(tmp_path)) == 1  # the one being written
    assert opened.spool.disk_bytes == segments(tmp_path)[0].stat().st_size
    await opened.spool.close()
    assert Opened(tmp_path).recovery.batches == 0  # the position says they were acked


def record_offsets(data: bytes) -> list[int]:
    offsets = []
    pos = SEGMENT_HEADER.size
    while pos < len(data):
        offsets.append(pos)
        pos += RECORD.size + RECORD.unpack_from(data, pos)[1]
    return offsets


async def test_a_torn_last_record_is_cut_off_at_any_offset(tmp_path: Path) -> None:
    batches = await filled(tmp_path / "spool", 12)
    [segment] = segments(tmp_path / "spool")
    data = segment.read_bytes()
    last = record_offsets(data)[-1]
    inside = range(last + 1, len(data))  # every cut leaves part of the last record
    cuts = sorted({*inside[: RECORD.size + 2], *random.Random(1).sample(inside, 40)})
    expected = {w.sequence: w.payload for w, _ in batches[:-1]}
    for cut in cuts:
        folder = tmp_path / f"cut-{cut}"
        shutil.copytree(tmp_path / "spool", folder)
        with open(folder / segment.name, "r+b") as torn:
            torn.truncate(cut)
        opened = Opened(folder)
        assert (opened.recovery.torn, opened.recovery.corrupt) == (1, 0), cut
        assert opened.payloads() == expected, cut
        assert sample(opened.metrics, "spool_damaged_records_total", kind="torn") == 1
        await opened.spool.close()
        again = Opened(folder)  # cut off for good: nothing to count the next time
        assert (again.recovery.torn, again.recovery.corrupt) == (0, 0)
        assert again.payloads() == expected
        await again.spool.close()


async def test_a_corrupt_record_is_moved_aside_and_the_rest_kept(tmp_path: Path) -> None:
    batches = await filled(tmp_path / "spool", 12)
    [segment] = segments(tmp_path / "spool")
    data = segment.read_bytes()
    offsets = record_offsets(data)
    chance = random.Random(7)
    for trial in range(25):
        victim = chance.randrange(len(offsets))
        end = offsets[victim + 1] if victim + 1 < len(offsets) else len(data)
        position = chance.randrange(offsets[victim], end)
        damaged = bytearray(data)
        damaged[position] ^= 1 << chance.randrange(8)
        folder = tmp_path / f"flip-{trial}"
        shutil.copytree(tmp_path / "spool", folder)
        (folder / segment.name).write_bytes(damaged)
        opened = Opened(folder)
        assert (opened.recovery.torn, opened.recovery.corrupt) == (0, 1), position
        assert opened.payloads() == {
            w.sequence: w.payload for k, (w, _) in enumerate(batches) if k != victim
        }
        [aside] = (folder / "damaged").iterdir()
        assert aside.read_bytes() == bytes(damaged[offsets[victim] : end])
        await opened.spool.close()
        assert Opened(folder).recovery.corrupt == 0  # the segment was rewritten without it


async def test_garbage_between_records_is_skipped(tmp_path: Path) -> None:
    batches = await filled(tmp_path, 6)
    [segment] = segments(tmp_path)
    data = segment.read_bytes()
    third = record_offsets(data)[3]
    segment.write_bytes(data[:third] + b"\xa5TAr" + bytes(range(256)) * 3 + data[third:])
    opened = Opened(tmp_path)
    assert opened.recovery.corrupt == 1
    assert opened.payloads() == {w.sequence: w.payload for w, _ in batches}


async def test_a_spool_of_another_format_is_refused(tmp_path: Path) -> None:
    await filled(tmp_path, 3)
    [segment] = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    data[SEGMENT_HEADER.size - 1] = 2
    segment.write_bytes(data)
    with pytest.raises(SpoolError, match=rf"{segment.name}: spool format 2, this agent reads"):
        Opened(tmp_path)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "format": 9}))
    with pytest.raises(SpoolError, match=r"state\.json: spool format 9"):
        Opened(tmp_path)


@pytest.mark.parametrize("when_full", ["drop_oldest", "drop_newest"])
async def test_the_disk_budget_drops_batches_and_counts_them(
    tmp_path: Path, when_full: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = SpoolConfig(max_bytes=200_000, when_full=when_full)
    opened = Opened(tmp_path, config)
    batches = make_batches(opened.spool.stream_id, 200)
    before: list[int] = []
    for wire, announcement in batches:
        opened.spool.add(wire, announcement)
        assert opened.spool.disk_bytes <= config.max_bytes
        assert sum(p.stat().st_size for p in segments(tmp_path)) <= config.max_bytes
        await opened.spool.sync()  # a batch is pending once written
        after = list(opened.spool.pending)
        if when_full == "drop_oldest":  # the new batch stays, and only the oldest leave
            assert after[-1] == wire.sequence
            assert after[:-1] == before[len(before) - len(after) + 1 :]
        else:  # what the spool holds stays; the new batch only if it fits
            assert after[: len(before)] == before and after[len(before) :] in ([], [wire.sequence])
        before = after
    await opened.spool.sync()
    kept = list(opened.spool.pending)
    dropped = sample(opened.metrics, "spool_dropped_batches_total", reason="spool_full")
    assert dropped == 200 - len(kept) > 100
    # Said in the log once, not once per batch dropped.
    warnings = [r.getMessage() for r in caplog.records if "dropping batches" in r.getMessage()]
    assert warnings == [
        f"spool {tmp_path}: dropping batches unsent (spool full, when_full = {when_full}): 1 so far"
    ]
    if when_full == "drop_oldest":
        assert kept == list(range(201 - len(kept), 201))  # the newest
    else:
        # The oldest; once the budget is reached, a later batch smaller than the one that did
        # not fit may still fit.
        assert kept[:50] == list(range(1, 51))
    assert opened.payloads() == {w.sequence: w.payload for w, _ in batches if w.sequence in kept}
    await opened.spool.close()
    assert list(Opened(tmp_path, config).spool.pending) == kept


def fail_writes(monkeypatch: pytest.MonkeyPatch, code: int) -> list[bool]:
    """Make spool writes fail with `code` while the returned switch holds True; a failed
    write has written part of its bytes first, as a full disk does."""
    switch = [True]
    write_all = spool_module._write_all

    def failing(fd: int, parts: list[bytes]) -> None:
        if switch[0]:
            os.write(fd, parts[0][:5])
            raise OSError(code, os.strerror(code))
        write_all(fd, parts)

    monkeypatch.setattr(spool_module, "_write_all", failing)
    monkeypatch.setattr(spool_module, "DISK_RETRY_S", 0.0)
    return switch


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
async def test_failing_writes_hold_batches_in_memory_until_the_disk_is_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    opened = Opened(tmp_path)
    spool = opened.spool
    batches = make_batches(spool.stream_id, 30)
    for wire, announcement in batches[:10]:
        spool.add(wire, announcement)
    await spool.sync()
    failing = fail_writes(monkeypatch, code)
    for wire, announcement in batches[10:20]:
        spool.add(wire, announcement)
    await spool.sync()
    assert list(spool.pending) == list(range(1, 21))  # the uplink still gets them, in order
    assert sample(opened.metrics, "spool_disk_errors_total", operation="write") >= 10
    # Held in memory only: not what a power cut spares.
    assert sample(opened.metrics, "spool_last_sequence") == 10
    assert spool.memory_bytes >= sum(len(w) for w, _ in batches[10:20])
    failing[0] = False
    for wire, announcement in batches[20:]:
        spool.add(wire, announcement)
    await spool.close()
    # Written once the disk took writes again: all of them survive a restart, and the
    # partial writes of the failed attempts were cut back, not left as damage.
    again = Opened(tmp_path)
    assert (again.recovery.torn, again.recovery.corrupt) == (0, 0)
    assert again.payloads() == {w.sequence: w.payload for w, _ in batches}


async def test_memory_is_bounded_while_the_disk_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SpoolConfig(memory_bytes=100_000)
    opened = Opened(tmp_path, config)
    batches = make_batches(opened.spool.stream_id, 100)
    fail_writes(monkeypatch, errno.ENOSPC)
    for wire, announcement in batches:
        opened.spool.add(wire, announcement)
        assert opened.spool.memory_bytes <= config.memory_bytes
    kept = list(opened.spool.pending)
    dropped = sample(opened.metrics, "spool_dropped_batches_total", reason="memory_full")
    assert dropped == 100 - len(kept) > 50
    assert kept == list(range(101 - len(kept), 101))


async def test_with_fsync_batch_the_uplink_sees_a_batch_once_it_is_synced(
    tmp_path: Path,
) -> None:
    opened = Opened(tmp_path)
    wire, announcement = make_batches(opened.spool.stream_id, 1)[0]
    opened.spool.add(wire, announcement)
    assert not opened.spool.pending and len(opened.spool) == 1
    # What a power cut may not lose: nothing yet.
    assert sample(opened.metrics, "spool_last_sequence") == 0
    await opened.spool.sync()
    assert list(opened.spool.pending) == [1]
    assert sample(opened.metrics, "spool_fsync_seconds_count") == 1
    assert sample(opened.metrics, "spool_last_sequence") == 1


async def test_a_batch_whose_fsync_failed_is_not_reported_as_spooled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened = Opened(tmp_path)
    batches = make_batches(opened.spool.stream_id, 2)
    opened.spool.add(*batches[0])
    await opened.spool.sync()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    opened.spool.add(*batches[1])
    await opened.spool.sync()
    assert list(opened.spool.pending) == [1, 2]  # sent all the same: the disk may be fine
    assert sample(opened.metrics, "spool_disk_errors_total", operation="fsync") == 1
    assert sample(opened.metrics, "spool_last_sequence") == 1


@pytest.mark.parametrize("fsync", ["interval", "never"])
async def test_other_fsync_modes_hand_batches_over_at_once(tmp_path: Path, fsync: str) -> None:
    opened = Opened(tmp_path, SpoolConfig(fsync=fsync))
    wire, announcement = make_batches(opened.spool.stream_id, 1)[0]
    opened.spool.add(wire, announcement)
    assert list(opened.spool.pending) == [1]
    assert sample(opened.metrics, "spool_last_sequence") == 1
    await opened.spool.sync()
    synced = sample(opened.metrics, "spool_fsync_seconds_count")
    assert synced == (1 if fsync == "interval" else 0)


async def test_the_oldest_batch_age_is_measured(tmp_path: Path) -> None:
    opened = Opened(tmp_path, SpoolConfig(fsync="never"))
    assert sample(opened.metrics, "spool_oldest_age_seconds") == 0
    wire, announcement = make_batches(opened.spool.stream_id, 1)[0]
    opened.spool.add(wire, announcement)
    assert 0 <= sample(opened.metrics, "spool_oldest_age_seconds") < 60
    assert sample(opened.metrics, "spool_batches") == 1
    assert sample(opened.metrics, "spool_bytes") == segments(tmp_path)[0].stat().st_size


def test_an_unusable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match=f"cannot create the spool {blocker}/spool"):
        Opened(blocker / "spool")


async def test_a_spool_that_cannot_save_its_state_still_starts(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()  # neither readable nor replaceable as a file
    opened = Opened(tmp_path)
    assert sample(opened.metrics, "spool_disk_errors_total", operation="state") == 1
    wire, announcement = make_batches(opened.spool.stream_id, 1)[0]
    opened.spool.add(wire, announcement)
    await opened.spool.sync()
    assert list(opened.spool.pending) == [1]
