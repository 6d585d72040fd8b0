"""ASC, BLF, TRC, CSV and MF4 logs through python-can's readers, gathered into frame batches.

python-can hands over one `Message` at a time, so this path is per frame by nature; the
frames go straight into preallocated columns. Bus names are python-can's channel (`"1"`,
for example), or `can0` where the format has none.
"""

from __future__ import annotations

import abc
import functools
import io
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from agent.frames import MAX_PAYLOAD, FrameBatch, FrameFlag, id_fits
from agent.logs.base import DEFAULT_BATCH_FRAMES, LogError, LogFile, LogReader, register

#: The bus name of frames whose format records no channel.
DEFAULT_BUS = "can0"


class PythonCanReader(LogReader):
    """A log read by one of python-can's readers."""

    #: Whether python-can reads the format as text (else as bytes).
    text: ClassVar[bool]

    @staticmethod
    @abc.abstractmethod
    def open_reader(source: Path | IO[Any]) -> Any:
        """python-can's reader object for the file, or for a file object of its content."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._buses: list[str] = []
        self._bus_index: dict[Any, int] = {}
        self._file: LogFile | None = None

    def _open(self) -> Any:
        try:
            if not self.compressed:
                return self.open_reader(self.path)
            self._file = LogFile(self.path)
            stream = self._file.stream
            return self.open_reader(io.TextIOWrapper(stream, "utf-8") if self.text else stream)
        except Exception as error:  # python-can raises many kinds for a file it cannot read
            if self._file is not None:
                self._file.close()
            if isinstance(error, ImportError):
                raise LogError(f"{self.path}: {error}") from None
            reason = str(error).strip() or type(error).__name__
            raise LogError(f"{self.path}: cannot read the {self.format} log: {reason}") from None

    def batches(self, max_frames: int = DEFAULT_BATCH_FRAMES) -> Iterator[FrameBatch]:
        reader = self._open()
        try:
            yield from self._fill(iter(reader), max_frames)
        finally:
            stop = getattr(reader, "stop", None)
            if stop is not None:
                stop()
            if self._file is not None:
                self._file.close()

    def _fill(self, messages: Iterator[Any], max_frames: int) -> Iterator[FrameBatch]:
        position = 0
        while True:
            batch = FrameBatch.allocate(max_frames, ())
            n = 0
            ended = False
            while n < max_frames:
                try:
                    msg = next(messages)
                except StopIteration:
                    ended = True
                    break
                except Exception as error:  # a damaged file: keep what was read before it
                    reason = str(error).strip() or type(error).__name__
                    if not position:  # nothing was: not a log of this format at all
                        raise LogError(
                            f"{self.path}: cannot read the {self.format} log: {reason}"
                        ) from None
                    self.stats.add_malformed(
                        1, [f"after frame {position}: {reason}; reading stopped"]
                    )
                    ended = True
                    break
                position += 1
                problem = self._put(batch, n, msg)
                if problem:
                    self.stats.add_malformed(1, [f"frame {position}: {problem}"])
                    continue
                n += 1
            if n:
                self.stats.frames += n
                # The bus table may have grown while the batch filled.
                yield replace(batch.take(slice(0, n)), buses=tuple(self._buses))
            if ended:
                return

    def _put(self, batch: FrameBatch, row: int, msg: Any) -> str | None:
        """Write one message into a row; the reason it cannot be, if it cannot."""
        data = msg.data or b""
        if len(data) > MAX_PAYLOAD:
            return f"{len(data)} bytes of payload"
        if not id_fits(msg.arbitration_id, msg.is_extended_id, msg.is_error_frame):
            kind = "an extended" if msg.is_extended_id else "a standard"
            return f"ID 0x{msg.arbitration_id:X} out of range for {kind} frame"
        channel = msg.channel
        bus = self._bus_index.get(channel)
        if bus is None:
            if len(self._buses) > 255:
                return "more than 256 buses"
            bus = self._bus_index[channel] = len(self._buses)
            self._buses.append(DEFAULT_BUS if channel is None else str(channel))
        batch.t_ns[row] = round(msg.timestamp * 1e9)
        batch.bus[row] = bus
        batch.can_id[row] = msg.arbitration_id
        batch.flags[row] = (
            (FrameFlag.EXTENDED if msg.is_extended_id else 0)
            | (FrameFlag.REMOTE if msg.is_remote_frame else 0)
            | (FrameFlag.ERROR if msg.is_error_frame else 0)
            | (FrameFlag.FD if msg.is_fd else 0)
            | (FrameFlag.BRS if msg.bitrate_switch else 0)
            | (FrameFlag.ESI if msg.error_state_indicator else 0)
        )
        if msg.is_remote_frame:
            batch.length[row] = min(msg.dlc, MAX_PAYLOAD)
        else:
            batch.length[row] = len(data)
            batch.data[row, : len(data)] = np.frombuffer(bytes(data), np.uint8)
        return None


def _reader(
    name: str, suffix: str, is_text: bool, factory: Callable[[Any], Any]
) -> type[PythonCanReader]:
    class Reader(PythonCanReader):
        format: ClassVar[str] = name
        suffixes: ClassVar[tuple[str, ...]] = (suffix,)
        text: ClassVar[bool] = is_text

        @staticmethod
        def open_reader(source: Path | IO[Any]) -> Any:
            return factory(source)

    Reader.__name__ = Reader.__qualname__ = f"{name.upper()}Reader"
    return register(Reader)


def _source(source: Path | IO[Any]) -> str | IO[Any]:
    """What python-can's readers take: a path as text, or the file object as it is."""
    return str(source) if isinstance(source, Path) else source


def _can() -> Any:
    import can  # when a log needs it: importing python-can takes a tenth of a second

    return can


def _mf4(source: Path | IO[Any]) -> Any:
    try:
        import asammdf  # noqa: F401  (python-can's MF4Reader needs it)
    except ImportError:
        raise ImportError(
            "reading MF4 needs asammdf: pip install 'vehicle-telemetry-agent[mf4]'"
        ) from None
    # A file object of a compressed log is read whole into memory by python-can.
    return _can().MF4Reader(_source(source))


@functools.cache
def _utc_asc_reader() -> Any:
    """python-can's ASCReader, reading the `date` and trigger lines as UTC.

    python-can reads them as the machine's local time, so the same log gave other times on a
    machine in another zone. An ASC log does not say its zone; UTC is the one that every
    machine reads alike (and what loggers in vehicles mostly keep)."""

    class UtcASCReader(_can().ASCReader):  # type: ignore[misc]
        def _datetime_to_timestamp(self, datetime_string: str) -> float | None:
            local = super()._datetime_to_timestamp(datetime_string)
            if local is None:
                return None
            # Back to the wall-clock time the line says (the round trip is exact but in the
            # hours a daylight-saving change skips or repeats), then that time in UTC.
            wall = datetime.fromtimestamp(local)
            return float(wall.replace(tzinfo=UTC).timestamp())

    return UtcASCReader


# ASC keeps a start date: absolute timestamps then match the other formats of the same log.
ASCReader = _reader(
    "asc", ".asc", True, lambda s: _utc_asc_reader()(_source(s), relative_timestamp=False)
)
BLFReader = _reader("blf", ".blf", False, lambda s: _can().BLFReader(_source(s)))
TRCReader = _reader("trc", ".trc", True, lambda s: _can().TRCReader(_source(s)))
CSVReader = _reader("csv", ".csv", True, lambda s: _can().CSVReader(_source(s)))
MF4Reader = _reader("mf4", ".mf4", False, _mf4)
