"""candump `-L` logs, parsed a chunk at a time with numpy rather than line by line.

A line is `(SECONDS.FRACTION) IFACE FRAME`, optionally followed by ` R` or ` T` (direction).
FRAME is `III#DATA` (standard ID), `IIIIIIII#DATA` (extended; with 0x20000000 set, an error
frame), `ID#R` or `ID#R5` (remote, with an optional length), `ID##F` + DATA (CAN FD, F
being the flags nibble: 1 BRS, 2 ESI), and a classic frame may end in `_D` (a raw DLC).

Each chunk of the file is one numpy byte array. The fields of every line are found from
the positions of its newline and spaces (')' and '#' sit at fixed offsets from them in a
well-formed line, and so does the dot where the fraction has six digits; the dot alone is
searched for, on the lines where it is not there), then read through
fixed-width windows (`sliding_window_view(...)[starts]`, one index per line) and decoded
with lookup tables. Every check is a column operation; a line that fails any of them is
counted as malformed and dropped, and the lines around it are kept.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from agent.frames import MAX_PAYLOAD, FrameBatch, FrameFlag
from agent.logs.base import (
    DEFAULT_BATCH_FRAMES,
    LogError,
    LogFile,
    LogReader,
    decompression_errors,
    register,
)

#: Bytes read at a time; about 12,000 lines of classic CAN. A chunk's columns then stay in
#: the core's cache: 1 MiB chunks parse 10 to 20% slower, 4 MiB ones 30%.
CHUNK_BYTES = 1 << 19
#: The longest interface name Linux allows (IFNAMSIZ less the terminating NUL).
MAX_IFACE = 15
_PAD = 160  # room before and after a chunk for the widest window (an FD payload, 128 chars)
_INT_DIGITS = 10  # whole seconds: up to 9,999,999,999, still in int64 as nanoseconds
_FRACTION_DIGITS = 9
_MAX_SECONDS = (2**63 - 1) // 1_000_000_000  # nanoseconds since the epoch fit in int64
_HUNDREDS = 100 ** np.arange(_INT_DIGITS // 2 - 1, -1, -1, dtype=np.int64)
_BYTES = 256 ** np.arange(3, -1, -1, dtype=np.int64)
_FD_LENGTHS = np.zeros(MAX_PAYLOAD + 1, np.bool_)
_FD_LENGTHS[[*range(9), 12, 16, 20, 24, 32, 48, 64]] = True

_HEX = np.full(256, -1, np.int16)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_BLANK = np.zeros(256, np.bool_)
_BLANK[[ord(" "), ord("\t"), ord("\r")]] = True
_DIGIT = np.full(256, -1, np.int16)
_DIGIT[ord("0") : ord("9") + 1] = np.arange(10)


def _pairs(single: npt.NDArray[np.int16], base: int) -> npt.NDArray[np.int16]:
    """A table from two characters, read as one little-endian uint16, to their value as two
    digits of `base`, or -1: one lookup decodes and checks two characters at once."""
    first, second = single[np.arange(1 << 16) & 0xFF], single[np.arange(1 << 16) >> 8]
    return np.where((first >= 0) & (second >= 0), first * base + second, -1).astype(np.int16)


_HEX_PAIRS = _pairs(_HEX, 16)
_DECIMAL_PAIRS = _pairs(_DIGIT, 10)
_ZERO = np.uint8(ord("0"))
# _NAME_MASKS[k] keeps the first k bytes of a little-endian 64-bit word.
_NAME_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)
# " R" and " T" read as little-endian uint16.
_RECEIVED = ord(" ") | ord("R") << 8
_TRANSMITTED = ord(" ") | ord("T") << 8


@functools.cache
def _field_masks(width: int, right: bool) -> npt.NDArray[np.uint8]:
    """Row k: 1 for each of `width` characters that a field of k characters occupies,
    aligned to the right or to the left of the window."""
    k = np.arange(width + 1)[:, None]
    column = np.arange(width)[None, :]
    return (column >= width - k if right else column < k).astype(np.uint8)


def _decode_pairs(
    chars: npt.NDArray[np.uint8],
    lengths: npt.NDArray[np.intp],
    right: bool,
    pairs: npt.NDArray[np.int16],
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
    """Each row's characters (an even number), two by two, as values 0..255 (or 0..99),
    reading only the row's field of `lengths` characters (aligned `right` or left) and the
    rest as '0'; and whether every character of the field was valid."""
    width = chars.shape[1]
    # A row of a small contiguous table per line: take() copies it ten times faster than a
    # broadcast comparison makes it. Lengths out of range belong to malformed lines.
    used = _field_masks(width, right).take(lengths, axis=0, mode="clip")
    # (c - '0') * used + '0' wraps around in uint8 and gives c back where used: ten times
    # faster than np.where, which has no fast path for uint8. Likewise take() over indexing.
    text = chars - _ZERO
    text *= used
    text += _ZERO
    values = pairs.take(text.view(np.uint16))
    # Row-wise reductions over a few columns are slow in numpy; invalid values are rare,
    # so find them in the flat array and mark their rows.
    valid = np.ones(len(values), np.bool_)
    valid[np.flatnonzero(values < 0) // values.shape[1]] = False
    return values, valid


def _first_after(
    positions: npt.NDArray[np.intp], after: npt.NDArray[np.intp], limit: npt.NDArray[np.intp]
) -> npt.NDArray[np.intp]:
    """For each line, the first of `positions` at or after `after`, or `limit` if none
    comes before `limit` (the line's end)."""
    index = np.searchsorted(positions, after)
    found = np.append(positions, limit.max(initial=0) + 1)[index]
    first: npt.NDArray[np.intp] = np.minimum(found, limit)
    return first


class _Windows:
    """A chunk padded on both sides, read through fixed-width windows."""

    def __init__(self, chunk: bytes) -> None:
        self.buf = np.zeros(len(chunk) + 2 * _PAD, np.uint8)
        self.buf[_PAD : _PAD + len(chunk)] = np.frombuffer(chunk, np.uint8)
        self._views: dict[int, npt.NDArray[np.uint8]] = {}

    def char(self, positions: npt.NDArray[np.intp]) -> npt.NDArray[np.uint8]:
        """The character at each position (a chunk position)."""
        return self.buf.take(positions + _PAD)

    def take(self, starts: npt.NDArray[np.intp], width: int) -> npt.NDArray[np.uint8]:
        """`width` bytes from each start (a chunk position), as an (n, width) array."""
        view = self._views.get(width)
        if view is None:
            view = self._views[width] = sliding_window_view(self.buf, width)
        result: npt.NDArray[np.uint8] = view[starts + _PAD]
        return result


class _BusNames:
    """Interface names, in bus index order, each as two little-endian 64-bit words: its
    first 8 bytes, then the rest with the name's length in the top byte (so that a name
    ending in NUL bytes is not another name). A name hashes to a slot of a table that holds
    its index, so finding the names of a chunk's lines is a few column operations whatever
    the number of buses (a binary search per line cost a tenth of the parse)."""

    _SLOT_BITS = 16
    # Stands for an empty slot: no name of at most MAX_IFACE bytes reads as these words.
    _NONE = np.uint64(2**64 - 1)

    def __init__(self) -> None:
        self.names: list[str] = []
        self._low = np.array([self._NONE], np.uint64)  # the names' words, then the sentinel
        self._high = self._low.copy()
        self._slots = np.full(1 << self._SLOT_BITS, -1, np.int16)
        self._multipliers = (np.uint64(1), np.uint64(1))

    def __len__(self) -> int:
        return len(self.names)

    @staticmethod
    def key(name: str) -> tuple[int, int] | None:
        """A name's two words, or None for a name no candump line can carry."""
        try:
            raw = name.encode("latin-1")
        except UnicodeEncodeError:
            return None
        if not 1 <= len(raw) <= MAX_IFACE:
            return None
        low = int.from_bytes(raw[:8].ljust(8, b"\0"), "little")
        return low, int.from_bytes(raw[8:].ljust(8, b"\0"), "little") | len(raw) << 56

    def _hash(self, low: npt.NDArray[np.uint64], high: npt.NDArray[np.uint64]) -> Any:
        # Multiplicative hashing: the top bits of odd multiples; uint64 arrays wrap silently.
        m_low, m_high = self._multipliers
        return ((low * m_low + high * m_high) >> np.uint64(64 - self._SLOT_BITS)).view(np.int64)

    def find(
        self, low: npt.NDArray[np.uint64], high: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.bool_]]:
        """Each name's bus index, and whether it is a known name at all."""
        index = self._slots.take(self._hash(low, high))  # -1 reads the sentinel
        match = self._low.take(index) == low
        match &= self._high.take(index) == high
        return index, match

    def add(self, low: int, high: int) -> None:
        name = low.to_bytes(8, "little") + high.to_bytes(8, "little")
        self.names.append(name[: high >> 56].decode("latin-1"))
        self._low = np.insert(self._low, -1, np.uint64(low))  # before the sentinel
        self._high = np.insert(self._high, -1, np.uint64(high))
        # Multipliers under which every known name has a slot of its own: with a few names
        # the first pair does; with 256 names in 65,536 slots, a few tries. The next pairs
        # come from a 64-bit LCG (Knuth's MMIX constants).
        m_low, m_high = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F
        while True:
            self._multipliers = (np.uint64(m_low | 1), np.uint64(m_high | 1))
            slots = self._hash(self._low[:-1], self._high[:-1])
            if len(set(slots.tolist())) == len(slots):
                break
            m_low = (m_low * 6364136223846793005 + 1442695040888963407) % 2**64
            m_high = (m_high * 6364136223846793005 + 1442695040888963407) % 2**64
        self._slots[:] = -1
        self._slots[slots] = np.arange(len(slots), dtype=np.int16)


@register
class CandumpReader(LogReader):
    format = "candump"
    suffixes = (".log", ".candump")

    def __init__(self, path: str | Path, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(path)
        self.chunk_bytes = chunk_bytes
        self._names = _BusNames()
        self._wanted: _BusNames | None = None  # the channels, where only some are read
        self._consumed = 0
        self._size = 1

    def progress(self) -> float:
        return min(self._consumed / self._size, 1.0)

    def batches(self, max_frames: int = DEFAULT_BATCH_FRAMES) -> Iterator[FrameBatch]:
        lines_before = 0
        carry = b""
        try:
            f = LogFile(self.path)
            self._size = max(self.path.stat().st_size, 1)
        except OSError as error:
            raise LogError(f"{self.path}: cannot read the log: {error.strerror or error}") from None
        damaged = decompression_errors()

        def read() -> bytes:
            try:
                block = f.stream.read(self.chunk_bytes)
            except damaged as error:
                reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
                raise LogError(f"{self.path}: cannot read the log: {reason}") from None
            self._consumed = f.raw.tell()
            return block

        if self.channels is not None:
            self._wanted = _BusNames()
            for key in filter(None, map(_BusNames.key, sorted(self.channels))):
                self._wanted.add(*key)
        # A line longer than this (garbage: a frame's line has under 200 bytes) is counted
        # once and skipped to its end, so that memory stays bounded.
        longest = max(64 * self.chunk_bytes, 1 << 20)
        skipping = False
        with contextlib.closing(f):
            block = read()
            while block:
                # One block ahead, so that the last chunk is known as such (its last line
                # may lack a line end), and a short last block joins the one before: a parse
                # costs about 0.1 ms whatever its size.
                following = read()
                if 0 < len(following) < self.chunk_bytes // 2:
                    block, following = block + following, read()
                chunk = carry + block
                block, carry = following, b""
                if skipping:
                    end = chunk.find(b"\n")
                    if end < 0:
                        continue
                    chunk, skipping = chunk[end + 1 :], False
                if following:
                    cut = chunk.rfind(b"\n") + 1
                    if cut == 0 and len(chunk) < longest:
                        carry = chunk  # no line end yet: read on
                        continue
                    if cut == 0:
                        text = chunk[:80].decode("utf-8", "replace")
                        self.stats.add_malformed(1, [f"line {lines_before + 1}: {text!r}"])
                        lines_before += 1
                        skipping = True
                        continue
                    chunk, carry = chunk[:cut], chunk[cut:]
                elif not chunk:
                    continue  # the file ended with the end of a skipped line
                elif not chunk.endswith(b"\n"):
                    chunk += b"\n"
                frames, lines = self._parse(chunk, lines_before)
                lines_before += lines
                self.stats.frames += len(frames)
                for start in range(0, len(frames), max_frames):
                    yield frames.take(slice(start, start + max_frames))

    def _parse(self, chunk: bytes, lines_before: int) -> tuple[FrameBatch, int]:
        """The frames of a chunk of whole lines, and how many lines it had."""
        w = _Windows(chunk)
        buf = w.buf[_PAD : _PAD + len(chunk)]
        newlines = np.flatnonzero(buf == ord("\n"))
        starts = np.concatenate([[0], newlines[:-1] + 1])
        n_lines = len(newlines)
        # A line ends before its carriage return and any blanks after its last field, which
        # can-utils, python-can and cantools read past too.
        ends = newlines
        while True:
            trailing = (ends > starts) & _BLANK.take(buf.take(np.maximum(ends - 1, 0)))
            if not trailing.any():
                break
            ends = ends - trailing
        blank = ends == starts
        ok = ~blank & (buf[np.minimum(starts, len(buf) - 1)] == ord("("))

        # In a clean chunk every line has as many spaces: then their positions, reshaped,
        # are the lines' own, and no search is needed.
        spaces = np.flatnonzero(buf == ord(" "))
        per_line = len(spaces) // max(n_lines, 1)
        # A space after ')', one after the interface, and one before a direction.
        clean = not blank.any() and 2 <= per_line <= 3 and len(spaces) == per_line * n_lines
        if clean:
            table = spaces.reshape(n_lines, per_line)
            clean = bool((table[:, 0] > starts).all() and (table[:, -1] < ends).all())

        def space(after: npt.NDArray[np.intp], nth: int) -> npt.NDArray[np.intp]:
            """The first space at or after `after` in each line (the line's `nth` in a
            clean chunk), or the line's end."""
            if clean:
                return table[:, nth]
            return _first_after(spaces, after, ends)

        # A timestamp holds no space, so ')' is right before the first space, or the line is
        # malformed.
        close = space(starts, 0) - 1
        ok &= w.char(close) == ord(")")
        # candump writes six decimals, so the dot is 7 before ')'; the dots are searched for
        # only where a line has it elsewhere. (A second dot in a timestamp fails the line
        # wherever the dot is taken to be.)
        dot = close - 7
        elsewhere = (w.char(dot) != ord(".")) | (dot <= starts)  # not in an earlier line
        if elsewhere.any():
            dots = np.flatnonzero(buf == ord("."))
            dot[elsewhere] = _first_after(dots, starts[elsewhere], ends[elsewhere])
        ok &= (close + 1 < ends) & (dot < close)  # the space after ")" is in the line
        iface_start = close + 2
        iface_end = space(iface_start, 1)
        iface_length = iface_end - iface_start
        ok &= (iface_length >= 1) & (iface_length <= MAX_IFACE) & (iface_end < ends)
        id_start = iface_end + 1
        # An ID has 3 or 8 characters, so its '#' is at one of two places (a '#' inside an
        # ID is no hex digit: such a line fails below).
        short = w.char(id_start + 3) == ord("#")
        hash_ = id_start + np.where(short, 3, 8)
        ok &= (short | (w.char(id_start + 8) == ord("#"))) & (hash_ < ends)
        id_length = hash_ - id_start
        last_space = table[:, 2] if clean and per_line == 3 else None
        line_of = np.arange(n_lines)
        if self._wanted is not None:
            # Lines of other channels leave before the costly part of the parse, their names
            # never entered among the log's buses. A line whose channel cannot be read stays,
            # to be counted as malformed.
            named = np.flatnonzero(ok)
            _, wanted = self._wanted.find(
                *self._name_keys(w, iface_start[named], iface_length[named])
            )
            keep = np.ones(n_lines, np.bool_)
            keep[named] = wanted
            if not keep.all():
                line_of = np.flatnonzero(keep)
                starts, ends, blank, ok = starts[keep], ends[keep], blank[keep], ok[keep]
                close, dot, hash_ = close[keep], dot[keep], hash_[keep]
                iface_start, iface_length = iface_start[keep], iface_length[keep]
                id_length = id_length[keep]
                if last_space is not None:
                    last_space = last_space[keep]

        # Timestamp: whole seconds right-aligned before the dot, fraction left-aligned after.
        whole_length = dot - starts - 1
        ok &= (whole_length >= 1) & (whole_length <= _INT_DIGITS)
        # One window for both (each window costs a copy per line, however narrow).
        stamp = w.take(dot - _INT_DIGITS, 2 * _INT_DIGITS + 1)
        pairs, valid = _decode_pairs(stamp[:, :_INT_DIGITS], whole_length, True, _DECIMAL_PAIRS)
        whole = pairs.astype(np.int64) @ _HUNDREDS
        ok &= valid & (whole < _MAX_SECONDS)
        fraction_length = close - dot - 1
        ok &= (fraction_length >= 1) & (fraction_length <= _FRACTION_DIGITS)
        fraction = stamp[:, _INT_DIGITS + 1 :]
        pairs, valid = _decode_pairs(fraction, fraction_length, False, _DECIMAL_PAIRS)
        ok &= valid
        # Ten digits after the dot, the tenth always 0: tenths of nanoseconds.
        t_ns = whole * 1_000_000_000 + (pairs.astype(np.int64) @ _HUNDREDS) // 10

        # The ID right-aligned before '#', and the three characters after it.
        around = w.take(hash_ - 8, 12)
        pairs, valid = _decode_pairs(around[:, :8], id_length, True, _HEX_PAIRS)
        raw_id = pairs.astype(np.int64) @ _BYTES
        ok &= valid
        extended = id_length == 8
        error = extended & ((raw_id & 0x20000000) != 0)
        can_id = np.where(extended, raw_id & 0x1FFFFFFF, raw_id)
        ok &= extended | (raw_id <= 0x7FF)

        # After '#': '#F' + data (FD), 'R[n]' (remote) or data.
        after = around[:, 9:]
        fd = after[:, 0] == ord("#")
        ok &= ~(fd & (after[:, 1] == ord("#")))  # CAN XL: not a CAN frame
        fd_flags = np.where(fd, _HEX[after[:, 1]], 0)
        ok &= fd_flags >= 0
        remote = ~fd & ((after[:, 0] == ord("R")) | (after[:, 0] == ord("r")))
        remote_length = np.where(remote, _DIGIT[after[:, 1]], -1)
        data_start = hash_ + 1 + np.where(fd, 2, 0) + np.where(remote, 1 + (remote_length >= 0), 0)
        underscores = np.flatnonzero(buf == ord("_"))
        data_end = _first_after(underscores, data_start, ends) if len(underscores) else ends
        if not clean:
            data_end = np.minimum(data_end, _first_after(spaces, data_start, ends))
        elif last_space is not None:  # every line ends in " R" or " T"
            data_end = np.minimum(data_end, last_space)
        data_chars = np.where(remote, 0, data_end - data_start)
        ok &= ~remote | (data_end == data_start)
        ok &= (data_chars % 2 == 0) & (data_chars <= np.where(fd, 128, 16))
        # What may follow the data: `_D` (a raw DLC of a classic frame), then ` R` or ` T`.
        tail = w.take(data_end, 4)
        dlc = ~fd & ~remote & (tail[:, 0] == ord("_")) & (_HEX[tail[:, 1]] >= 0)
        rest = data_end + np.where(dlc, 2, 0)
        rest_length = ends - rest
        two = tail.view("<u2")
        suffix = np.where(dlc, two[:, 1], two[:, 0])
        direction = (suffix == _RECEIVED) | (suffix == _TRANSMITTED)
        ok &= (rest_length == 0) | ((rest_length == 2) & direction)
        length = np.where(remote, np.maximum(remote_length, 0), data_chars // 2)
        ok &= np.where(fd, _FD_LENGTHS[np.minimum(length, MAX_PAYLOAD)], length <= 8)

        width = int(data_chars[ok].max(initial=0))
        payload = np.zeros((int(ok.sum()), MAX_PAYLOAD), np.uint8)
        if width:
            window = w.take(data_start[ok], width)
            pairs, valid = _decode_pairs(window, data_chars[ok], False, _HEX_PAIRS)
            payload[:, : width // 2] = pairs
            if not valid.all():
                ok[np.flatnonzero(ok)[~valid]] = False
                payload = payload[valid]

        rows = np.flatnonzero(ok)
        buses = self._bus_indices(*self._name_keys(w, iface_start[rows], iface_length[rows]))
        flags = np.zeros(len(ok), np.uint8)
        for flag, where in (
            (FrameFlag.EXTENDED, extended & ~error),
            (FrameFlag.ERROR, error),
            (FrameFlag.REMOTE, remote),
            (FrameFlag.FD, fd),
            (FrameFlag.BRS, fd & ((fd_flags & 1) != 0)),
            (FrameFlag.ESI, fd & ((fd_flags & 2) != 0)),
        ):
            flags |= where.view(np.uint8) * np.uint8(flag)  # a bool is a 0 or 1 byte
        bad_rows = np.flatnonzero(~ok & ~blank)
        if len(bad_rows):
            self.stats.add_malformed(
                len(bad_rows),
                [
                    self._example(buf, starts, ends, r, lines_before + int(line_of[r]))
                    for r in bad_rows[:5]
                ],
            )
        batch = FrameBatch(
            t_ns=t_ns[rows],
            bus=buses,
            can_id=can_id[rows].astype(np.uint32),
            flags=flags.take(rows),
            length=length[rows].astype(np.uint8),
            data=payload,
            buses=tuple(self._names.names),
        )
        return batch, n_lines

    @staticmethod
    def _name_keys(
        w: _Windows, starts: npt.NDArray[np.intp], lengths: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """Interface names (of 1 to MAX_IFACE bytes) as the two words of `_BusNames`."""
        words = w.take(starts, MAX_IFACE + 1).view("<u8")
        low = words[:, 0] & _NAME_MASKS.take(np.minimum(lengths, 8))
        high = words[:, 1] & _NAME_MASKS.take(np.clip(lengths - 8, 0, 8))
        high |= lengths.astype(np.uint64) << np.uint64(56)
        return low, high

    def _bus_indices(
        self, low: npt.NDArray[np.uint64], high: npt.NDArray[np.uint64]
    ) -> npt.NDArray[np.uint8]:
        """Bus indices of interface names, looked up among the names seen so far: only a
        new name costs a Python step."""
        while True:
            found, match = self._names.find(low, high)
            missing = np.flatnonzero(~match)
            if not len(missing):
                return found.astype(np.uint8)
            if len(self._names) > 255:
                raise LogError(f"{self.path}: more than 256 buses in one log")
            self._names.add(int(low[missing[0]]), int(high[missing[0]]))

    @staticmethod
    def _example(buf: npt.NDArray[np.uint8], starts: Any, ends: Any, row: int, line: int) -> str:
        """Row `row` of the parse, quoted; `line` counts the log's lines from 0."""
        text = bytes(buf[starts[row] : min(ends[row], starts[row] + 80)]).decode("utf-8", "replace")
        return f"line {line + 1}: {text!r}"
