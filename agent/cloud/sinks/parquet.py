"""Parquet (pyarrow): a lake partitioned hive style by vehicle, message and date, one column
per signal with its physical type, files rolled by size and age and renamed into place
whole. Rows not yet in a closed file are in a journal (Arrow IPC, fsynced) before `write`
returns, and are taken back from it at start: acknowledged means durable.

Layout (docs/sinks.md): `DIR/vehicle=V/message=M/date=YYYY-MM-DD/part-N.parquet`, the
journal in `DIR/_journal/` (readers skip names starting with `_` or `.`).
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from agent.cloud.parser import ReceivedBatch, ReceivedBlock, ReceivedRaw
from agent.cloud.sinks.base import Sink

#: A partition's rows are closed into a file once this large in memory, or this old.
ROLL_BYTES = 64 * 1024 * 1024
ROLL_AGE_S = 300.0
#: The partition of the raw frames that collection rules capture.
RAW_MESSAGE = "_raw_frames"
TIME = pa.timestamp("us", tz="UTC")
#: The lake's own columns and partition keys, lower case: engines match column names
#: ignoring case, and a partition key read from the path hides a column of its name.
OWN_COLUMNS = frozenset({"time", "bus", "can_id", "rule", "data", "vehicle", "message", "date"})

Partition = tuple[str, str, str]  # vehicle, message, date


@dataclass
class _Open:
    """A partition's rows not yet in a closed file, and the journal files holding them."""

    first: int  # the number of its first journal file: its closed file's name
    opened: float
    tables: list[pa.Table] = field(default_factory=list)
    journal: list[Path] = field(default_factory=list)
    bytes: int = 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, write: object) -> None:
    """`write(temp path)`, fsync, rename over `path`, fsync the folder: a reader sees the
    whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)  # type: ignore[operator]
    with open(temp, "rb") as written:
        os.fsync(written.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


#: What Hive escapes in a partition value (as %XX): control characters and those that mean
#: something in a path or a partition. Everything else, UTF-8 included, stays as it is, as
#: Spark and Athena read it back; they decode each escaped byte as a character of its own.
_ESCAPED = frozenset("\"#%'*/:=?\\{[]^\x7f") | {chr(c) for c in range(1, 0x20)}


def _escape(value: str) -> str:
    return "".join(f"%{ord(c):02X}" if c in _ESCAPED else c for c in value)


def _folder(root: Path, partition: Partition) -> Path:
    vehicle, message, date = (_escape(p) for p in partition)
    return root / f"vehicle={vehicle}" / f"message={message}" / f"date={date}"


class ParquetSink(Sink):
    def __init__(
        self, folder: Path, roll_bytes: int = ROLL_BYTES, roll_age_s: float = ROLL_AGE_S
    ) -> None:
        self.folder = folder
        self.journal = folder / "_journal"
        self.roll_bytes = roll_bytes
        self.roll_age_s = roll_age_s
        self._open: dict[Partition, _Open] = {}
        self._seen: set[Partition] = set()  # partitions whose closed files were counted
        self.journal.mkdir(parents=True, exist_ok=True)
        self._next = 1 + max((int(p.stem) for p in self.journal.rglob("*.arrow")), default=0)
        self._recover()

    def _recover(self) -> None:
        """The journal's rows back into their open partitions, in the order written; a
        journal file that was never renamed into place was never acknowledged."""
        for temp in self.folder.rglob(".*.tmp"):
            temp.unlink()
        for path in sorted(self.journal.rglob("*.arrow"), key=lambda p: int(p.stem)):
            folder = path.parent.relative_to(self.journal)
            key = tuple(urllib.parse.unquote(part.partition("=")[2]) for part in folder.parts)
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
            self._add((key[0], key[1], key[2]), table, path, int(path.stem))

    def _add(self, partition: Partition, table: pa.Table, journal: Path, number: int) -> None:
        open_ = self._open.setdefault(partition, _Open(number, time.monotonic()))
        open_.tables.append(table)
        open_.journal.append(journal)
        open_.bytes += table.nbytes

    def write(self, batches: Sequence[ReceivedBatch]) -> list[ReceivedBatch]:
        gathered: dict[Partition, list[pa.Table]] = {}
        for batch in batches:
            for partition, table in _tables(batch):
                gathered.setdefault(partition, []).append(table)
        for partition, tables in gathered.items():
            table = pa.concat_tables(tables, promote_options="permissive")
            if partition not in self._seen:
                self._seen.add(partition)
                self._next = max(self._next, 1 + self._last_closed(partition))
            number = self._next
            self._next += 1
            path = _folder(self.journal, partition) / f"{number}.arrow"

            def dump(temp: Path, table: pa.Table = table) -> None:
                with pa.OSFile(str(temp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as ipc:
                    ipc.write_table(table)

            _write_atomically(path, dump)
            self._add(partition, table, path, number)
        now = time.monotonic()
        for partition, open_ in list(self._open.items()):
            if open_.bytes >= self.roll_bytes or now - open_.opened >= self.roll_age_s:
                self._roll(partition)
        return []

    def _last_closed(self, partition: Partition) -> int:
        """The highest number of the partition's closed files. A clean stop empties the
        journal, so numbers taken from it alone start again at 1 and a later run's file would
        be renamed over an earlier run's."""
        folder = _folder(self.folder, partition)
        names = folder.glob("part-*.parquet") if folder.is_dir() else iter(())
        return max((int(p.stem.removeprefix("part-")) for p in names), default=0)

    def _roll(self, partition: Partition) -> None:
        """A partition's open rows into a closed file, then out of the journal. Its name is
        its first journal file's number: a roll repeated after a crash before the journal
        was cleared writes the same file again, not a second copy."""
        open_ = self._open.pop(partition)
        table = pa.concat_tables(open_.tables, promote_options="permissive").sort_by("time")
        path = _folder(self.folder, partition) / f"part-{open_.first:012d}.parquet"

        def dump(temp: Path) -> None:
            pq.write_table(table, temp, compression="zstd")

        _write_atomically(path, dump)
        for journal in open_.journal:
            journal.unlink()
        with contextlib.suppress(OSError):
            _fsync_dir(open_.journal[0].parent)

    def close(self) -> None:
        for partition in list(self._open):
            self._roll(partition)


def _tables(batch: ReceivedBatch) -> Iterator[tuple[Partition, pa.Table]]:
    for block in batch.blocks:
        yield from _split_by_date(batch.vehicle_id, block.message.name, _block_table(block))
    for raw in batch.raw:
        yield from _split_by_date(batch.vehicle_id, RAW_MESSAGE, _raw_table(raw))


def _split_by_date(
    vehicle: str, message: str, table: pa.Table
) -> Iterator[tuple[Partition, pa.Table]]:
    days = table.column("time").cast(pa.int64()).to_numpy() // 86_400_000_000
    for day in np.unique(days).tolist():
        date = str(np.datetime64(day, "D"))
        rows = table if days[0] == days[-1] else table.filter(pa.array(days == day))
        yield (vehicle, message, date), rows


def _times(t_ns: npt.NDArray[np.int64]) -> pa.Array:
    return pa.array(t_ns // 1000, TIME)


def _block_table(block: ReceivedBlock) -> pa.Table:
    n = len(block)
    columns: dict[str, pa.Array] = {
        "time": _times(block.t_ns),
        "bus": pa.array([block.bus] * n, pa.string()),
        "can_id": pa.array(block.can_id.astype(np.int64)),
        "rule": pa.array([block.rule] * n, pa.string()),
    }
    for signal in block.signals:
        if signal.raw.dtype == object:  # text
            columns[_column(signal.name)] = pa.array(signal.raw.tolist(), pa.string())
            continue
        values = np.asarray(signal.physical())
        if values.dtype == np.uint64 and signal.info.length < 64:
            values = values.astype(np.int64)  # most engines have no unsigned 64-bit type
        mask = None if signal.present is None else ~signal.present
        columns[_column(signal.name)] = pa.array(values, mask=mask)
    return pa.table(columns)


def _column(signal: str) -> str:
    """A signal's column: its name, or `signal_NAME` where the name is one of the lake's own
    columns (a signal `Date` or `time`), whose values it would replace or be hidden by. A
    name that starts with `signal_` takes the prefix too, so that a message with signals
    `time` and `signal_time` keeps both."""
    renamed = signal.lower() in OWN_COLUMNS or signal.lower().startswith("signal_")
    return f"signal_{signal}" if renamed else signal


def _raw_table(raw: ReceivedRaw) -> pa.Table:
    frames = raw.frames
    n = len(frames)
    data = [bytes(frames.data[k, : frames.length[k]]) for k in range(n)]
    return pa.table(
        {
            "time": _times(frames.t_ns),
            "bus": pa.array([frames.buses[0]] * n, pa.string()),
            "can_id": pa.array(frames.can_id.astype(np.int64)),
            "rule": pa.array([raw.rule] * n, pa.string()),
            "data": pa.array(data, pa.binary()),
        }
    )
