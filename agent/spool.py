"""The spool: every encoded batch, on disk under `state_dir` before an uplink sees it.

`state_dir/spool/` holds:
- `NNNNNNNNNN.seg`, segment files: a header (magic, format version), then records of a
  32-byte header (magic, payload length, sequence, spool time, payload CRC-32, header CRC-32)
  and the payload, a serialized Batch. The agent appends to one segment, starts a new one at
  every start and when the current one is full, and deletes a segment once every batch in it
  is acknowledged or dropped. The disk budget drops whole segments, oldest first.
- `state.json`, written atomically: the stream id (sequence numbers continue across
  restarts, so the receiver's duplicate check works across them), the sequence through
  which every batch is acknowledged, and the next sequence number.
- `schemas/HEX`: the announcement of each schema a spooled batch names, so that batches
  spooled before a restart can still be announced after it.
- `damaged/`: the bytes of corrupt records, moved aside at start for inspection.

All of it runs on the event loop's thread except fsync, which runs in a worker thread
while the loop goes on writing: with `fsync = "batch"` a batch reaches the uplink once an
fsync that began after it was written has ended, so batches closed meanwhile share the
next fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import time
import uuid
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.config import SpoolConfig
from agent.durable import fsync_folder, write_atomically
from agent.metrics import Metrics
from agent.wire.envelope import WireBatch, WireError, read_envelope, wire_batch

log = logging.getLogger(__name__)

#: The spool's format version; a spool of another version is refused, never misread.
FORMAT = 1
SEGMENT_HEADER = struct.Struct("<7sB")
SEGMENT_MAGIC = b"TASPOOL"
SEGMENT_SUFFIX = ".seg"
RECORD = struct.Struct("<4sIQQII")  # magic, length, sequence, spooled ns, payload crc, header crc
RECORD_MAGIC = b"\xa5TAr"
STATE_FILE = "state.json"
#: Segment size: an eighth of the budget, so the budget drops an eighth at a time.
SEGMENT_SHARE = 8
SEGMENT_MIN_BYTES = 16 * 1024
SEGMENT_MAX_BYTES = 64 * 1024 * 1024
#: A full spool drops batches for as long as the link is down: say so at once, then at most
#: this often, with the running count, so the journal shows it without a line per batch.
DROP_WARNING_INTERVAL_S = 60.0
#: With `fsync = "batch"`, fsync at most this often: an fsync costs a few hundred
#: microseconds of CPU whatever the bytes it carries, so at full speed (hundreds of batches
#: a second) the batches closed within this time share one. A batch waits this long at
#: most; a live bus's batch (one a second) seldom waits at all.
GROUP_COMMIT_S = 0.1
#: How often the acknowledged position is saved at most (losing it re-sends, never loses).
STATE_SAVE_S = 1.0
#: After a failed write, the spool holds batches in memory and tries the disk again this often.
DISK_RETRY_S = 1.0


class SpoolError(Exception):
    """The spool cannot be used: its folder is unusable, or it was written in another format."""


@dataclass(eq=False, slots=True)
class Segment:
    number: int
    path: Path
    fd: int
    size: int
    live: int = 0  # batches in it that are neither acknowledged nor dropped


@dataclass(eq=False, slots=True)
class Entry:
    """A batch in the spool. `segment` is None while the disk did not take it; `batch` is
    kept in memory for the newest batches and for those not on disk."""

    sequence: int
    size: int
    spooled: float  # Unix time
    crc: int
    segment: Segment | None = None
    offset: int = 0  # of the payload in the segment
    batch: WireBatch | None = None
    done: bool = False  # acknowledged or dropped


@dataclass
class Recovery:
    batches: int = 0
    torn: int = 0
    corrupt: int = 0


def _record_at(data: memoryview, pos: int) -> tuple[int, int, int, int] | None:
    """(length, sequence, spooled ns, crc) of an intact record at `pos`, or None."""
    if len(data) - pos < RECORD.size:
        return None
    magic, length, sequence, spooled, crc, header_crc = RECORD.unpack_from(data, pos)
    if magic != RECORD_MAGIC or zlib.crc32(data[pos : pos + RECORD.size - 4]) != header_crc:
        return None
    end = pos + RECORD.size + length
    if end > len(data) or zlib.crc32(data[pos + RECORD.size : end]) != crc:
        return None
    return length, sequence, spooled, crc


def _is_torn(data: memoryview, pos: int) -> bool:
    """Whether the bytes from `pos` to the end are the start of a record that a crash cut
    short (rather than damage)."""
    left = len(data) - pos
    if left < RECORD.size:
        return bytes(data[pos : pos + min(left, 4)]) == RECORD_MAGIC[: min(left, 4)]
    magic, length, _, _, _, header_crc = RECORD.unpack_from(data, pos)
    intact = magic == RECORD_MAGIC and zlib.crc32(data[pos : pos + RECORD.size - 4]) == header_crc
    return intact and pos + RECORD.size + int(length) > len(data)


def scan_segment(
    data: memoryview,
) -> tuple[list[tuple[int, int, int, int, int]], list[tuple[int, int]], int | None]:
    """The intact records of a segment's bytes, as (record offset, length, sequence, spooled
    ns, crc); the damaged spans between them; and where a torn last record starts, if any.
    After damage, the scan goes on at the next intact record."""
    records: list[tuple[int, int, int, int, int]] = []
    damaged: list[tuple[int, int]] = []
    pos = SEGMENT_HEADER.size
    while pos < len(data):
        found = _record_at(data, pos)
        if found is not None:
            records.append((pos, *found))
            pos += RECORD.size + found[0]
            continue
        following = _next_record(data, pos + 1)
        if following is None:
            if _is_torn(data, pos):
                return records, damaged, pos
            damaged.append((pos, len(data)))
            break
        damaged.append((pos, following))
        pos = following
    return records, damaged, None


def _next_record(data: memoryview, start: int) -> int | None:
    raw = data.obj
    assert isinstance(raw, bytes)
    while (at := raw.find(RECORD_MAGIC, start)) >= 0:
        if _record_at(data, at) is not None:
            return at
        start = at + 1
    return None


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write every byte of `parts` (os.writev may write less than asked)."""
    total = sum(len(p) for p in parts)
    written = os.writev(fd, parts)
    if written < total:
        rest = b"".join(parts)[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _fsync_all(fds: list[int], folder: Path | None) -> None:
    for fd in fds:
        os.fdatasync(fd)
    if folder is not None:
        fsync_folder(folder)


class Spool:
    """A durable queue of wire batches in sequence order; see the module's notes."""

    def __init__(self, folder: Path, config: SpoolConfig, metrics: Metrics) -> None:
        self.folder = folder
        self.config = config
        self.metrics = metrics
        self.segment_bytes = min(
            max(config.max_bytes // SEGMENT_SHARE, SEGMENT_MIN_BYTES), SEGMENT_MAX_BYTES
        )
        self.stream_id = ""
        self.next_sequence = 1
        #: Batches the uplink may send, in sequence order.
        self.pending: OrderedDict[int, Entry] = OrderedDict()
        self.disk_bytes = 0
        self.memory_bytes = 0
        self.dropped: Counter[str] = Counter()  # batches dropped unsent, by reason
        self._drop_warned: dict[str, float] = {}  # reason -> when it was last logged
        self._last_spooled = 0  # of this run: the spool_last_sequence gauge
        self._writing: list[Entry] = []  # written, waiting for their fsync
        self._segments: OrderedDict[int, Segment] = OrderedDict()
        self._current: Segment | None = None
        self._next_segment = 1
        self._unsynced: set[Segment] = set()
        self._folder_unsynced = False
        self._emptied: list[Segment] = []  # closed and deleted after the running fsync
        self._memory: deque[Entry] = deque()  # entries holding their batch, oldest first
        self._schemas: dict[bytes, bytes] = {}  # announcements by schema id
        self._unsaved_schemas: set[bytes] = set()
        self._saved_state: tuple[int, int] | None = None
        self._state_saved_at = 0.0
        self._failing_since: float | None = None
        self._retry_at = 0.0
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty = asyncio.Event()
        self._syncing = asyncio.Lock()
        metrics.spool_oldest_age.set_function(self._oldest_age)

    # -- start-up --

    def open(self) -> Recovery:
        """Create or recover the spool. SpoolError when it cannot be used."""
        try:
            for folder in (self.folder, self.folder / "schemas", self.folder / "damaged"):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpoolError(f"cannot create the spool {self.folder}: {error.strerror}") from None
        for folder in (self.folder, self.folder / "schemas"):
            for partial in folder.glob(".*.partial"):  # of a write a crash interrupted
                with contextlib.suppress(OSError):
                    partial.unlink()
        acked_through = self._load_state()
        recovery, schema_ids = self._recover(acked_through)
        if self.config.fsync == "batch" and self._segments:
            # The last run may have been killed between a write and its fsync, or have run
            # with another fsync mode: what the uplink sees must be on the disk.
            try:
                _fsync_all([s.fd for s in self._segments.values()], None)
            except OSError as error:
                self._disk_error("fsync", error)
        self._load_schemas(schema_ids)
        if not self.stream_id:
            self.stream_id = uuid.uuid4().hex
        try:
            self._save_state()
        except OSError as error:
            self._disk_error("state", error)  # a full disk: the agent runs on, and saves later
        self._update_gauges()
        return recovery

    def _load_state(self) -> int:
        path = self.folder / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as error:
            # Written atomically, so this is damage from outside: batches still on disk
            # are sent again rather than lost.
            log.warning("%s: unreadable (%s); the spool's batches will be sent again", path, error)
            return 0
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise SpoolError(
                f"{path}: spool format {found!r}, this agent reads format {FORMAT}; "
                f"move {self.folder} aside to start with an empty spool"
            )
        try:
            self.stream_id = str(state["stream_id"])
            self.next_sequence = int(state["next_sequence"])
            return int(state["acked_through"])
        except (KeyError, TypeError, ValueError) as error:
            log.warning(
                "%s: %r missing or wrong; the spool's batches will be sent again", path, error
            )
            self.stream_id, self.next_sequence = "", 1
            return 0

    def _recover(self, acked_through: int) -> tuple[Recovery, set[bytes]]:
        recovery = Recovery()
        schema_ids: set[bytes] = set()
        entries: dict[int, Entry] = {}
        paths = sorted(self.folder.glob(f"*{SEGMENT_SUFFIX}"))
        for path in paths:
            try:
                number = int(path.stem)
                data = path.read_bytes()
            except ValueError:
                log.warning("%s: not a spool segment name; left alone", path)
                continue
            except OSError as error:
                # Left where it is, for the next start or for inspection; the rest is sent.
                self.metrics.spool_disk_errors.labels("read").inc()
                log.error("%s: cannot read: %s; left alone", path, error.strerror)
                continue
            self._next_segment = max(self._next_segment, number + 1)
            if len(data) < SEGMENT_HEADER.size:
                # A crash between creating a segment and writing its header.
                recovery.torn += 1
                path.unlink()
                continue
            magic, version = SEGMENT_HEADER.unpack_from(data)
            if magic != SEGMENT_MAGIC:
                recovery.corrupt += 1
                self._move_aside(path.name, 0, data)
                path.unlink()
                continue
            if version != FORMAT:
                raise SpoolError(
                    f"{path}: spool format {version}, this agent reads format {FORMAT}; "
                    f"move {self.folder} aside to start with an empty spool"
                )
            view = memoryview(data)
            records, damaged, torn_at = scan_segment(view)
            for start, end in damaged:
                recovery.corrupt += 1
                self._move_aside(path.name, start, data[start:end])
                log.warning(
                    "%s: damaged record at byte %d: %d bytes moved aside", path, start, end - start
                )
            if torn_at is not None:
                recovery.torn += 1
                log.warning("%s: last record cut short at byte %d: cut off", path, torn_at)
            kept: list[tuple[int, int, int, int, int]] = []
            for record in records:
                offset, length, sequence = record[0], record[1], record[2]
                payload = data[offset + RECORD.size : offset + RECORD.size + length]
                try:
                    envelope = read_envelope(payload)
                except WireError as error:
                    recovery.corrupt += 1
                    self._move_aside(
                        path.name, offset, data[offset : offset + RECORD.size + length]
                    )
                    log.warning(
                        "%s: record at byte %d is no batch (%s): moved aside", path, offset, error
                    )
                    continue
                if not self.stream_id:
                    self.stream_id = envelope.stream_id
                if envelope.stream_id == self.stream_id:
                    self.next_sequence = max(self.next_sequence, sequence + 1)
                kept.append(record)
                if sequence > acked_through:
                    schema_ids.add(envelope.schema_id)
            if damaged or torn_at is not None or len(kept) < len(records):
                data, kept = self._rewrite(path, view, kept)
            segment = Segment(number, path, os.open(path, os.O_RDWR), len(data))
            self._segments[number] = segment
            self.disk_bytes += segment.size
            for offset, length, sequence, spooled, crc in kept:
                if sequence <= acked_through or sequence in entries:
                    continue
                entries[sequence] = Entry(
                    sequence, length, spooled / 1e9, crc, segment, offset + RECORD.size
                )
                segment.live += 1
        for sequence in sorted(entries):
            self.pending[sequence] = entries[sequence]
        for segment in [s for s in self._segments.values() if not s.live]:
            self._retire(segment)
        recovery.batches = len(self.pending)
        self.metrics.spool_recovered.inc(recovery.batches)
        self.metrics.spool_damaged.labels("torn").inc(recovery.torn)
        self.metrics.spool_damaged.labels("corrupt").inc(recovery.corrupt)
        if self.pending or recovery.torn or recovery.corrupt:
            log.info(
                "spool %s: %d batches to send, %d torn and %d corrupt records",
                self.folder,
                recovery.batches,
                recovery.torn,
                recovery.corrupt,
            )
        return recovery, schema_ids

    def _rewrite(
        self, path: Path, data: memoryview, records: list[tuple[int, int, int, int, int]]
    ) -> tuple[bytes, list[tuple[int, int, int, int, int]]]:
        """The segment with only its intact records, written over the old one."""
        parts = [bytes(data[: SEGMENT_HEADER.size])]
        moved = []
        at = SEGMENT_HEADER.size
        for offset, length, sequence, spooled, crc in records:
            parts.append(bytes(data[offset : offset + RECORD.size + length]))
            moved.append((at, length, sequence, spooled, crc))
            at += RECORD.size + length
        clean = b"".join(parts)
        try:
            write_atomically(path, clean)
        except OSError as error:
            # Left as it is, the damage is found and counted again at the next start.
            log.warning("%s: cannot rewrite without its damage: %s", path, error.strerror)
            return bytes(data), records
        return clean, moved

    def _move_aside(self, name: str, offset: int, data: bytes) -> None:
        try:
            write_atomically(self.folder / "damaged" / f"{name}.{offset}", data)
        except OSError as error:
            log.warning("cannot keep damaged spool bytes: %s", error.strerror)

    def _load_schemas(self, needed: set[bytes]) -> None:
        for path in (self.folder / "schemas").iterdir():
            try:
                schema_id = bytes.fromhex(path.name)
            except ValueError:
                continue
            if schema_id in needed:
                with contextlib.suppress(OSError):
                    self._schemas[schema_id] = path.read_bytes()
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        missing = needed - self._schemas.keys()
        if missing:
            log.warning(
                "spool: %d schemas of spooled batches are missing; receivers that have not "
                "seen them cannot read those batches",
                len(missing),
            )

    # -- adding batches --

    def add(self, batch: WireBatch, announcement: bytes) -> None:
        """Spool a batch (its `announcement` carries its schema)."""
        self.next_sequence = max(self.next_sequence, batch.sequence + 1)
        if batch.schema_id not in self._schemas:
            self._schemas[batch.schema_id] = announcement
            self._unsaved_schemas.add(batch.schema_id)
        entry = Entry(batch.sequence, len(batch), time.time(), zlib.crc32(batch.payload))
        entry.batch = batch
        if self._disk_usable():
            if self._failing_since is not None:
                self._write_held()
            if self._disk_usable() and not self._store(entry):
                return
        self._memory.append(entry)
        self.memory_bytes += entry.size
        if self._writing or (self.config.fsync == "batch" and entry.segment is not None):
            self._writing.append(entry)
            self._dirty.set()
        else:
            self._publish([entry])
            self._spooled([entry])
        self._trim_memory()
        self._update_gauges()

    def _disk_usable(self) -> bool:
        return self._failing_since is None or time.monotonic() >= self._retry_at

    def _store(self, entry: Entry) -> bool:
        """Write an entry to disk, making room as `when_full` says. False when the entry
        itself was dropped; a failing disk leaves it in memory (True)."""
        assert entry.batch is not None
        need = RECORD.size + entry.size
        while self.disk_bytes + need > self.config.max_bytes:
            if self.config.when_full == "drop_newest":
                self._drop(entry, "spool_full")
                return False
            oldest = next((s for s in self._segments.values() if s is not self._current), None)
            if oldest is None:
                self._current = None  # the next segment starts; this one becomes the oldest
                continue
            for dropped in [e for e in self._entries() if e.segment is oldest]:
                self._drop(dropped, "spool_full")
            if oldest.number in self._segments:  # an empty segment: none of its entries left
                self._retire(oldest)
        try:
            self._schemas_to_disk()
            segment = self._segment_for(need)
            header = RECORD.pack(
                RECORD_MAGIC, entry.size, entry.sequence, int(entry.spooled * 1e9), entry.crc, 0
            )
            header = header[:-4] + struct.pack("<I", zlib.crc32(header[:-4]))
            try:
                _write_all(segment.fd, [header, entry.batch.payload])
            except OSError:
                self._cut_back(segment)
                raise
        except OSError as error:
            self._disk_error("write", error)
            return True
        entry.segment, entry.offset = segment, segment.size + RECORD.size
        segment.size += need
        segment.live += 1
        self.disk_bytes += need
        self._unsynced.add(segment)
        self._disk_ok()
        return True

    def _schemas_to_disk(self) -> None:
        for schema_id in sorted(self._unsaved_schemas):
            write_atomically(self.folder / "schemas" / schema_id.hex(), self._schemas[schema_id])
            self._unsaved_schemas.discard(schema_id)

    def _segment_for(self, need: int) -> Segment:
        current = self._current
        if current is not None and (
            current.size + need <= self.segment_bytes or current.size == SEGMENT_HEADER.size
        ):
            return current
        number = self._next_segment
        path = self.folder / f"{number:010d}{SEGMENT_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        self._next_segment += 1
        try:
            _write_all(fd, [SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT)])
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        segment = Segment(number, path, fd, SEGMENT_HEADER.size)
        self._segments[number] = segment
        self.disk_bytes += segment.size
        self._folder_unsynced = True
        self._unsynced.add(segment)
        if current is not None and not current.live:
            self._retire(current)
        self._current = segment
        return segment

    def _cut_back(self, segment: Segment) -> None:
        """Take a failed write's partial record off the segment, so what follows it is
        not mistaken for damage; a segment that cannot be cut is written no more."""
        try:
            os.ftruncate(segment.fd, segment.size)
        except OSError:
            if segment is self._current:
                self._current = None

    def _write_held(self) -> None:
        """Write the batches held in memory while the disk failed, oldest first."""
        for entry in [e for e in self._entries() if e.segment is None]:
            if self._failing_since is not None and not self._disk_usable():
                return
            self._store(entry)

    def _disk_error(self, operation: str, error: OSError) -> None:
        self.metrics.spool_disk_errors.labels(operation).inc()
        now = time.monotonic()
        self._retry_at = now + DISK_RETRY_S
        if self._failing_since is None:
            self._failing_since = now
            log.error(
                "spool %s: %s failed: %s; holding batches in memory (up to %d bytes) until "
                "the disk takes them again",
                self.folder,
                operation,
                os.strerror(error.errno) if error.errno else error,
                self.config.memory_bytes,
            )

    def _disk_ok(self) -> None:
        if self._failing_since is not None:
            log.warning(
                "spool %s: writing to disk again after %.1f s",
                self.folder,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None

    def _trim_memory(self) -> None:
        """Keep the batches in memory within `memory_bytes`: forget the oldest that are on
        disk, then, if those held only in memory are still too many, drop as `when_full`
        says."""
        budget = self.config.memory_bytes
        held: deque[Entry] = deque()
        while self.memory_bytes > budget and self._memory:
            entry = self._memory.popleft()
            if entry.done or entry.batch is None:
                continue
            if entry.segment is not None:
                entry.batch = None
                self.memory_bytes -= entry.size
            else:
                held.append(entry)
        self._memory.extendleft(reversed(held))
        while self.memory_bytes > budget and self._memory:
            entry = (
                self._memory.pop()
                if self.config.when_full == "drop_newest"
                else self._memory.popleft()
            )
            if not entry.done:
                self._drop(entry, "memory_full")

    def _entries(self) -> Iterator[Entry]:
        """Every entry not yet acknowledged or dropped, oldest first."""
        yield from self.pending.values()
        yield from (e for e in self._writing if not e.done)

    def _drop(self, entry: Entry, reason: str) -> None:
        self.dropped[reason] += 1
        self.metrics.spool_dropped.labels(reason).inc()
        now = time.monotonic()
        if now - self._drop_warned.get(reason, -DROP_WARNING_INTERVAL_S) >= DROP_WARNING_INTERVAL_S:
            self._drop_warned[reason] = now
            log.warning(
                "spool %s: dropping batches unsent (%s, when_full = %s): %d so far",
                self.folder,
                reason.replace("_", " "),
                self.config.when_full,
                self.dropped[reason],
            )
        self.pending.pop(entry.sequence, None)
        self._finish(entry)

    def _finish(self, entry: Entry) -> None:
        entry.done = True
        if entry.batch is not None:
            entry.batch = None
            self.memory_bytes -= entry.size
        segment = entry.segment
        if segment is not None:
            segment.live -= 1
            if not segment.live and segment is not self._current:
                self._retire(segment)

    def _retire(self, segment: Segment) -> None:
        """Delete an emptied segment; after the running fsync, if one may be using it."""
        if self._segments.pop(segment.number, None) is not None:
            self.disk_bytes -= segment.size
            self._unsynced.discard(segment)
            self._emptied.append(segment)
            if segment is self._current:
                self._current = None
            if not self._syncing.locked():
                self._delete_emptied()

    def _publish(self, entries: list[Entry]) -> None:
        for entry in entries:
            if not entry.done:
                self.pending[entry.sequence] = entry
        self._notify()

    def _spooled(self, entries: list[Entry]) -> None:
        """Raise spool_last_sequence to the newest of `entries` that are on disk (and, with
        fsync = "batch", were in an fsync that succeeded: the caller knows)."""
        sequences = [e.sequence for e in entries if not e.done and e.segment is not None]
        if sequences and max(sequences) > self._last_spooled:
            self._last_spooled = max(sequences)
            self.metrics.spool_last_sequence.set(self._last_spooled)

    # -- the uplink's side --

    def __len__(self) -> int:
        return len(self.pending) + sum(1 for e in self._writing if not e.done)

    def batch(self, entry: Entry) -> WireBatch | None:
        """An entry's batch, read back from disk when it is not in memory; None (and the
        entry dropped) when it cannot be read back intact, or was dropped meanwhile."""
        if entry.done:
            return None
        if entry.batch is not None:
            return entry.batch
        assert entry.segment is not None
        try:
            payload = os.pread(entry.segment.fd, entry.size, entry.offset)
            if len(payload) != entry.size or zlib.crc32(payload) != entry.crc:
                raise WireError("checksum failed")
            return wire_batch(payload)
        except (OSError, WireError) as error:
            log.error(
                "spool %s: batch %d unreadable (%s): dropped",
                entry.segment.path,
                entry.sequence,
                error,
            )
            self._drop(entry, "unreadable")
            self._update_gauges()
            return None

    def announcement(self, schema_id: bytes) -> bytes | None:
        return self._schemas.get(schema_id)

    def acknowledge(self, sequence: int) -> bool:
        """Forget an acknowledged batch; False when it was not pending (dropped meanwhile,
        or acknowledged twice)."""
        entry = self.pending.pop(sequence, None)
        if entry is None:
            return False
        self._finish(entry)
        self._update_gauges()
        self._notify()
        return True

    def changed(self) -> asyncio.Future[None]:
        """A future resolved at the next change (a batch added, acknowledged or dropped).
        Take it before checking, so no change between the check and the wait is missed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    # -- keeping it durable --

    async def run(self) -> None:
        """fsync what was written (with `fsync = "batch"` as soon as a batch waits for it,
        at most every GROUP_COMMIT_S; with "interval" every `fsync_interval_ms`), retry a
        failing disk, save the acknowledged position; until cancelled."""
        wait = STATE_SAVE_S
        if self.config.fsync == "interval":
            wait = self.config.fsync_interval_ms / 1000
        synced = 0.0
        while True:
            if self.config.fsync != "batch" or not self._dirty.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._dirty.wait(), wait)
            if self.config.fsync == "batch":
                await asyncio.sleep(max(0.0, synced + GROUP_COMMIT_S - time.monotonic()))
            self._dirty.clear()
            synced = time.monotonic()
            await self.sync()
            if self._failing_since is not None and self._disk_usable():
                self._write_held()
                self._update_gauges()
            if time.monotonic() - self._state_saved_at >= STATE_SAVE_S:
                try:
                    self._save_state()
                except OSError as error:
                    self._disk_error("state", error)

    async def sync(self) -> None:
        """Make everything written so far durable (unless `fsync = "never"`) and hand it to
        the uplink; then delete the segments emptied meanwhile."""
        async with self._syncing:
            # They stay in the writing list meanwhile: the disk budget may drop them.
            count = len(self._writing)
            segments, self._unsynced = list(self._unsynced), set()
            folder, self._folder_unsynced = self._folder_unsynced, False
            synced = set(segments)
            if self.config.fsync != "never" and (segments or folder):
                started = time.perf_counter()
                try:
                    await asyncio.get_running_loop().run_in_executor(
                        None, _fsync_all, [s.fd for s in segments], self.folder if folder else None
                    )
                except OSError as error:
                    self._disk_error("fsync", error)
                    synced.clear()
                self.metrics.spool_fsync.observe(time.perf_counter() - started)
            # Not those written meanwhile (held batches that a recovered disk took): their
            # segment waits for the next fsync.
            self._spooled([e for e in self._writing[:count] if e.segment in synced])
            self._publish(self._writing[:count])
            del self._writing[:count]
            self._delete_emptied()
            self._update_gauges()

    def _delete_emptied(self) -> None:
        emptied, self._emptied = self._emptied, []
        for segment in emptied:
            os.close(segment.fd)
            try:
                segment.path.unlink()
            except OSError as error:
                self._disk_error("delete", error)

    def _save_state(self) -> None:
        first = next((e.sequence for e in self._entries()), self.next_sequence)
        state = (first - 1, self.next_sequence)
        self._state_saved_at = time.monotonic()
        if state == self._saved_state:
            return
        text = json.dumps(
            {
                "format": FORMAT,
                "stream_id": self.stream_id,
                "acked_through": state[0],
                "next_sequence": state[1],
            }
        )
        write_atomically(self.folder / STATE_FILE, text.encode())
        self._saved_state = state

    async def close(self) -> None:
        """Sync, save the acknowledged position, and close the files."""
        await self.sync()
        try:
            self._save_state()
        except OSError as error:
            self._disk_error("state", error)
        for segment in self._segments.values():
            os.close(segment.fd)
        self._segments.clear()
        self._current = None

    # -- metrics --

    def _oldest_age(self) -> float:
        oldest = next(iter(self.pending.values()), None)
        return max(0.0, time.time() - oldest.spooled) if oldest is not None else 0.0

    def _update_gauges(self) -> None:
        self.metrics.spool_batches.set(len(self))
        self.metrics.spool_bytes.set(self.disk_bytes)
        self.metrics.spool_memory_bytes.set(self.memory_bytes)
