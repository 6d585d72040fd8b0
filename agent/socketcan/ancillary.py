"""The ancillary data the kernel sends with each frame: its receive time and the socket's
drop counter."""

from __future__ import annotations

import ctypes
import itertools
import socket
import struct
from collections.abc import Sequence
from operator import itemgetter

import numpy as np
import numpy.typing as npt

from agent.socketcan.abi import ANCILLARY_SIZE, SO_RXQ_OVFL, STAMP_KINDS

#: Of an ancillary item (level, kind, data).
_KIND, _DATA = itemgetter(1), itemgetter(2)
#: `struct cmsghdr` (size_t cmsg_len; int cmsg_level; int cmsg_type), then the data at
#: CMSG_LEN(0); every item starts aligned to a size_t.
_CMSGHDR = struct.Struct("@Nii")
CMSG_HEADER = socket.CMSG_LEN(0)
_ALIGN = ctypes.sizeof(ctypes.c_size_t)
CMSG_DTYPE = np.dtype(
    {
        "names": ["cmsg_len", "cmsg_level", "cmsg_type"],
        "formats": [np.uintp, "=i4", "=i4"],
        "offsets": [0, _ALIGN, _ALIGN + 4],
        "itemsize": ANCILLARY_SIZE,
    }
)


def receive_times(
    ancillary: Sequence[list[tuple[int, int, bytes]]], fallback: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Each frame's kernel receive time from its ancillary data, in nanoseconds since the
    epoch; `fallback` (the wall clock when it was read) where there is none."""
    n = len(ancillary)
    flat = list(itertools.chain.from_iterable(ancillary))
    if not flat:
        return fallback
    # Usually every frame has the same ancillary items, the timestamp first (and the drop
    # count second once the kernel has dropped frames): then no Python runs per frame.
    per, extra = divmod(len(flat), n)
    if not extra and per <= 2:
        stamps = flat[::per] if per > 1 else flat
        if set(map(_KIND, stamps)) <= STAMP_KINDS:
            joined = b"".join(map(_DATA, stamps))
            if len(joined) in (16 * n, 8 * n):
                return _nanoseconds(joined, n)
    times = fallback.copy()
    for row, items in enumerate(ancillary):
        for level, kind, data in items:
            if level == socket.SOL_SOCKET and kind in STAMP_KINDS and len(data) in (8, 16):
                times[row] = _nanoseconds(data, 1)[0]
    return times


def _nanoseconds(timespecs: bytes, n: int) -> npt.NDArray[np.int64]:
    # 16 bytes: two 64-bit fields; 8: the old option's two 32-bit longs on a 32-bit board.
    fields = np.frombuffer(timespecs, "=i8" if len(timespecs) == 16 * n else "=i4")
    pairs = fields.reshape(n, 2).astype(np.int64)
    result: npt.NDArray[np.int64] = pairs[:, 0] * 1_000_000_000 + pairs[:, 1]
    return result


def cmsgs(buffer: bytearray, at: int, size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary items (level, kind, data) in `size` bytes of `buffer` from `at`, as
    `recvmsg_into` would have returned them."""
    items: list[tuple[int, int, bytes]] = []
    end = at + size
    while at + CMSG_HEADER <= end:
        length, level, kind = _CMSGHDR.unpack_from(buffer, at)
        if length < CMSG_HEADER or at + length > end:
            break  # truncated (MSG_CTRUNC)
        items.append((level, kind, bytes(buffer[at + CMSG_HEADER : at + length])))
        at += -(-length // _ALIGN) * _ALIGN
    return items


def drop_count(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    # The kernel's count is cumulative for the socket, so the last frame's says it all.
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) == 4:
            count: int = struct.unpack("=I", data)[0]
            return count
    return None
