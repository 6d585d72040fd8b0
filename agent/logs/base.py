"""The log reader interface: one small abstract class, one module per format, registered by name."""

from __future__ import annotations

import abc
import bz2
import gzip
import io
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar, TypeVar, cast

from agent.frames import FrameBatch

#: Frames per batch when the caller does not say: large enough to amortise numpy's
#: per-call overhead, small enough to keep a batch's memory in the low megabytes.
DEFAULT_BATCH_FRAMES = 10_000

#: How many malformed lines a reader quotes in its stats (all are counted).
MAX_EXAMPLES = 5


class LogError(Exception):
    """A log file that cannot be read at all (missing, unreadable, not this format)."""


def _zstd(raw: IO[bytes]) -> io.BufferedIOBase:
    import zstandard  # the wire's compression: installed with the agent

    # Across frames: pzstd and zstd --long write several into one file.
    stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(stream)


#: Logs as users keep them, compressed around any format's own suffix (`drive.log.gz`,
#: `truck.blf.zst`): each suffix's decompressing reader of the raw file (LogFile closes it).
COMPRESSIONS: dict[str, Callable[[IO[bytes]], io.BufferedIOBase]] = {
    ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    ".bz2": lambda raw: bz2.BZ2File(raw),
    ".xz": lambda raw: lzma.LZMAFile(raw),  # noqa: SIM115
    ".zst": _zstd,
}


def decompression_errors() -> tuple[type[Exception], ...]:
    """What a damaged compressed log raises while it is read."""
    import zstandard

    return (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError)


class LogFile:
    """A log's bytes, decompressed where its name says so; `raw` is the file on disk,
    whose position tells how much has been read."""

    def __init__(self, path: Path) -> None:
        self.raw: IO[bytes] = path.open("rb")
        decompress = COMPRESSIONS.get(path.suffix.lower())
        # python-can's MF4 reader takes a BufferedIOBase as a file object: each of these is.
        self.stream = self.raw if decompress is None else cast(IO[bytes], decompress(self.raw))

    def close(self) -> None:
        self.stream.close()
        self.raw.close()


@dataclass
class LogStats:
    """What a reader has seen so far; updated as batches are produced."""

    frames: int = 0
    malformed: int = 0
    #: The first few malformed records, as "line N: <text>" (or the reader's own locator).
    examples: list[str] = field(default_factory=list)

    def add_malformed(self, count: int, examples: list[str]) -> None:
        self.malformed += count
        room = MAX_EXAMPLES - len(self.examples)
        if room > 0:
            self.examples.extend(examples[:room])


class LogReader(abc.ABC):
    """Reads one recorded log as frame batches, in the log's order, in bounded memory.

    Bus names are the log's own channel names (`can0` in candump). Each batch's `buses`
    table only ever grows, so a bus keeps its index for the whole file.
    """

    #: Format name, as given to `open_log(..., fmt=...)`.
    format: ClassVar[str]
    #: File name suffixes (lower case, with the dot) that select this format.
    suffixes: ClassVar[tuple[str, ...]]

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        #: Whether the file is compressed around the format (then read through LogFile).
        self.compressed = self.path.suffix.lower() in COMPRESSIONS
        self.stats = LogStats()
        #: The channels a caller wants, where not all: a reader may then skip the others'
        #: frames cheaply (uncounted); it may also return them.
        self.channels: frozenset[str] | None = None
        if not self.path.is_file():
            raise LogError(f"{self.path}: no such log file")

    @abc.abstractmethod
    def batches(self, max_frames: int = DEFAULT_BATCH_FRAMES) -> Iterator[FrameBatch]:
        """Yield batches of at most `max_frames` frames until the log ends."""

    def progress(self) -> float | None:
        """How much of the file has been read, 0 to 1, where the reader can tell."""
        return None


_READERS: dict[str, type[LogReader]] = {}


ReaderClass = TypeVar("ReaderClass", bound=type[LogReader])


def register(cls: ReaderClass) -> ReaderClass:
    """Make a reader class known to `open_log` under its format name."""
    _READERS[cls.format] = cls
    return cls


def formats() -> dict[str, type[LogReader]]:
    return dict(_READERS)


def open_log(path: str | Path, fmt: str | None = None) -> LogReader:
    """A reader for `path`, chosen by `fmt` or else by the file's suffix (the one before a
    compression suffix, such as `.gz`)."""
    path = Path(path)
    if fmt is not None:
        if fmt not in _READERS:
            raise LogError(f"{path}: unknown log format {fmt!r} (known: {', '.join(_READERS)})")
        return _READERS[fmt](path)
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        suffix = Path(path.stem).suffix.lower()
    for cls in _READERS.values():
        if suffix in cls.suffixes:
            return cls(path)
    known = ", ".join(s for cls in _READERS.values() for s in cls.suffixes)
    raise LogError(
        f"{path}: cannot tell the log format from the suffix {suffix!r} (known: {known}, "
        f"each also compressed: {', '.join(COMPRESSIONS)})"
    )
