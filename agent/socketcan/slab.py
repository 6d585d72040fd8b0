"""A slab of frames as the kernel writes them, drained from a CAN socket in as few system
calls as it allows and decoded into a frame batch with numpy, all frames at once.

A drain is one `recvmmsg(2)` call: `struct mmsghdr` records, made once, point each at its
own 72-byte slot of the slab and its own room for ancillary data, and the kernel fills as
many as it has frames, writing each one's size and flags into its record; numpy views over
the records and the rooms read those without a copy. Where libc lacks `recvmmsg` (or for a
stand-in of a socket, as tests use), a drain makes one `recvmsg_into` per frame into the
same slots and keeps its results in a list.

Decoding reads the slab through a numpy structured view: a 16-byte datagram is a `struct
can_frame`, a 72-byte one a `struct canfd_frame`, anything else is counted as malformed.
The receive times come from the ancillary data: the kernel sends the same items every time
(the timestamp, then the drop counter once it has dropped frames), so the timestamps are
read at a fixed offset of every room; frames whose first item is anything else are parsed
one by one, which only odd kernels or 32-bit boards need.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import time
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.frames import MAX_PAYLOAD, FrameBatch, FrameFlag
from agent.socketcan.abi import (
    ANCILLARY_SIZE,
    CAN_EFF_MASK,
    CAN_ERR_BUSOFF,
    CAN_ERR_MASK,
    CAN_MTU,
    CAN_SFF_MASK,
    CANFD_BRS,
    CANFD_ESI,
    CANFD_MTU,
    FRAME_DTYPE,
    SO_TIMESTAMPNS_NEW,
    SO_TIMESTAMPNS_OLD,
)
from agent.socketcan.ancillary import CMSG_DTYPE, CMSG_HEADER, cmsgs, drop_count, receive_times
from agent.socketcan.recvmmsg import (
    MMSG_DTYPE,
    MMSG_SIZE,
    MSG_DONTWAIT,
    RECVMMSG,
    IoVec,
    MMsgHdr,
    RecvMMsg,
)

#: ...or when it holds this many frames (the slab's size).
BATCH_FRAMES = 2048


def _flags_table() -> npt.NDArray[np.uint8]:
    """FrameFlag bits by a 6-bit index: can_id's ERR, RTR and EFF bits (bits 0 to 2), FD
    (3), and the FD frame's BRS and ESI bits (4, 5)."""
    table = np.zeros(64, np.uint8)
    for index in range(64):
        if index & 1:  # an error frame is only an error frame, whatever else its id says
            table[index] = FrameFlag.ERROR
            continue
        flags = FrameFlag.EXTENDED * bool(index & 4) | FrameFlag.REMOTE * bool(index & 2)
        if index & 8:
            flags |= FrameFlag.FD | FrameFlag.BRS * bool(index & 16)
            flags |= FrameFlag.ESI * bool(index & 32)
        table[index] = flags
    return table


_FLAGS = _flags_table()
#: The ID bits of can_id by its ERR, RTR and EFF bits: an error frame's are its class.
_ID_MASKS = np.array(
    [CAN_ERR_MASK if top & 1 else CAN_EFF_MASK if top & 4 else CAN_SFF_MASK for top in range(8)],
    np.uint32,
)

#: One more than the longest payload a datagram of each size (0 to 72 bytes, and 73 for
#: any longer) may carry.
_ROOM = np.zeros(CANFD_MTU + 2, np.int16)
_ROOM[CAN_MTU], _ROOM[CANFD_MTU] = 8 + 1, MAX_PAYLOAD + 1
_REMOTE = np.uint8(FrameFlag.REMOTE)
_ERROR = np.uint8(FrameFlag.ERROR)
_COLUMNS = np.arange(MAX_PAYLOAD, dtype=np.uint8)
#: What `recvmsg_into` returns: size, ancillary data, message flags, address.
Received = tuple[int, list[tuple[int, int, bytes]], int, Any]
_SIZE, _ANCILLARY, _MESSAGE_FLAGS = itemgetter(0), itemgetter(1), itemgetter(2)


@dataclass
class Decoded:
    """A slab's frames as a batch, and what the counters learn from them."""

    batch: FrameBatch
    malformed: int
    error_frames: int
    bus_off: int
    dropped: int | None  # the kernel's drop counter of the socket, if it said


class FrameSlab:
    """Room for BATCH_FRAMES frames, as the kernel writes them, one 72-byte slot each.

    `drain` is the hot path. On a real socket where libc has `recvmmsg`, one system call
    fills as many slots as there are frames queued, through `struct mmsghdr` records made
    once, each pointing at its slot and at its own room for ancillary data; the kernel
    writes each frame's size, flags and ancillary data into them, and no Python runs per
    frame at all. Elsewhere (and for stand-ins of sockets) each frame costs one
    `recvmsg_into` and one append. `take` decodes what was drained, all frames at once, and
    empties the slab."""

    def __init__(self, capacity: int = BATCH_FRAMES) -> None:
        self.capacity = capacity
        self._slab = bytearray(capacity * CANFD_MTU)
        view = memoryview(self._slab)
        # One-item lists made once: recvmsg_into takes a list of buffers.
        self._slots = [[view[at : at + CANFD_MTU]] for at in range(0, len(view), CANFD_MTU)]
        self._received: list[Received] = []  # recvmsg_into's results, as they came
        self._count = 0  # frames in the slab, however they were received
        self._drains: list[tuple[int, int]] = []  # (first row, wall clock ns) of each drain
        #: Monotonic time since when the slab's frames may have waited: the first drain's
        #: into an empty slab, or the `since` it was given.
        self.first_at = 0.0
        #: How real sockets are read; None: with recvmsg_into (tests replace it).
        self.recvmmsg: RecvMMsg | None = RECVMMSG
        # For recvmmsg: the records, the iovecs and the ancillary rooms live in buffers of
        # our own, so numpy reads what the kernel wrote without copying. The ctypes arrays
        # over them hold buffer exports, so none of them can be resized or moved.
        self._records = bytearray(capacity * MMSG_SIZE)
        self._control = bytearray(capacity * ANCILLARY_SIZE)
        self._iovecs = (IoVec * capacity)()
        self._pinned = (
            (ctypes.c_char * len(self._slab)).from_buffer(self._slab),
            (ctypes.c_char * len(self._control)).from_buffer(self._control),
            (MMsgHdr * capacity).from_buffer(self._records),
        )
        slab_at = ctypes.addressof(self._pinned[0])
        control_at = ctypes.addressof(self._pinned[1])
        self._records_at = ctypes.addressof(self._pinned[2])
        iovecs_at = ctypes.addressof(self._iovecs)
        headers = self._pinned[2]
        for row in range(capacity):
            self._iovecs[row].iov_base = slab_at + row * CANFD_MTU
            self._iovecs[row].iov_len = CANFD_MTU
            header = headers[row].msg_hdr
            header.msg_iov = iovecs_at + row * ctypes.sizeof(IoVec)
            header.msg_iovlen = 1
            header.msg_control = control_at + row * ANCILLARY_SIZE
        self._results = np.frombuffer(self._records, MMSG_DTYPE)
        # The kernel overwrites msg_controllen with what it used: the rows past the frames
        # received are kept at the full room, and a row is reset once it is decoded.
        self._results["msg_controllen"] = ANCILLARY_SIZE
        self._first_cmsg = np.frombuffer(self._control, CMSG_DTYPE)
        # The data of each row's first ancillary item, as a 64-bit timespec.
        self._timespec = np.ndarray(
            (capacity, 2), "=i8", self._control, CMSG_HEADER, (ANCILLARY_SIZE, 8)
        )

    def __len__(self) -> int:
        return self._count

    def clear(self) -> None:
        self._received, self._drains, self._count = [], [], 0
        self._results["msg_controllen"] = ANCILLARY_SIZE

    @property
    def full(self) -> bool:
        return self._count >= self.capacity

    def drain(self, sock: socket.socket, since: float | None = None) -> int:
        """Receive from the non-blocking `sock` until it has nothing more or the slab is
        full; the number of datagrams received. OSError (other than EAGAIN) passes on.
        `since`: when the queue was last found empty, if the caller knows (the monotonic
        clock); frames drained into an empty slab have waited since then at most."""
        start = self._count
        if start >= self.capacity:
            return 0
        if not start:
            self.first_at = time.monotonic() if since is None else since
        clock = time.time_ns()
        # A stand-in of a socket (tests') has no file descriptor to give libc. The two
        # ways keep their results apart, so a slab is read one way until it is taken.
        try:
            if self.recvmmsg is not None and isinstance(sock, socket.socket) and not self._received:
                self._receive_many(self.recvmmsg, sock.fileno(), start)
            elif len(self._received) == start:
                self._receive_each(sock, start)
            else:
                raise RuntimeError("take the slab's frames before reading another kind of socket")
        finally:
            if self._count > start:
                self._drains.append((start, clock))
        return self._count - start

    def _receive_many(self, recvmmsg: RecvMMsg, fd: int, start: int) -> None:
        records_at, room = self._records_at + start * MMSG_SIZE, self.capacity - start
        while True:
            # Returns fewer than `room` only when the queue ran dry (or failed, which the
            # kernel reports on the next call): one call drains the socket.
            got = recvmmsg(fd, records_at, room, MSG_DONTWAIT, None)
            if got >= 0:
                self._count = start + got
                return
            error = ctypes.get_errno()
            if error in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            if error != errno.EINTR:
                raise OSError(error, os.strerror(error))  # its subclass, as the socket's

    def _receive_each(self, sock: socket.socket, start: int) -> None:
        received = self._received
        append = received.append
        recv = sock.recvmsg_into
        slots = self._slots
        try:
            for row in range(start, self.capacity):
                try:
                    append(recv(slots[row], ANCILLARY_SIZE))
                except BlockingIOError:
                    break
        finally:
            # An error (the interface went down) keeps what was received before it.
            self._count = len(received)

    def end_of_stream(self) -> bool:
        """Whether the last drain read to the end of a socket whose peer has closed it (a
        socketpair's: it then reads empty datagrams); if so, forget those reads."""
        n = self._count
        if self._received:
            if self._received[-1][0]:
                return False
            while self._received and self._received[-1][0] == 0:
                self._received.pop()
            self._count = len(self._received)
        else:
            sizes = self._results["msg_len"][:n]
            if not n or sizes[-1]:
                return False
            nonzero = np.flatnonzero(sizes)
            self._count = int(nonzero[-1]) + 1 if len(nonzero) else 0
            self._results["msg_controllen"][self._count : n] = ANCILLARY_SIZE
        while self._drains and self._drains[-1][0] >= self._count:
            self._drains.pop()
        return True

    def take(self, buses: tuple[str, ...]) -> Decoded:
        """Decode the frames received so far into a batch (its own copy), and empty the slab."""
        n, received, drains = self._count, self._received, self._drains
        self._received, self._drains, self._count = [], [], 0
        if not n:
            return Decoded(FrameBatch.empty(buses), 0, 0, 0, None)
        starts = np.array([start for start, _ in drains] + [n], np.int64)
        clock = np.repeat(np.array([t for _, t in drains], np.int64), np.diff(starts))
        rows = np.frombuffer(self._slab, FRAME_DTYPE, count=n)
        truncated: npt.NDArray[np.bool_] | None = None
        if received:
            # Each pass over the results is a C loop (map, itemgetter): no Python per frame.
            size = np.fromiter(map(_SIZE, received), np.intp, n)
            if any(map(_MESSAGE_FLAGS, received)):
                message_flags = np.fromiter(map(_MESSAGE_FLAGS, received), np.int64, n)
                truncated = (message_flags & socket.MSG_TRUNC) != 0
            t_ns = receive_times(list(map(_ANCILLARY, received)), clock)
            dropped = drop_count(received[-1][1])
        else:
            results = self._results[:n]
            # The kernel says how much it wrote (72 at most), but a longer size indexes no
            # table either way.
            size = np.minimum(results["msg_len"], CANFD_MTU + 1).astype(np.intp)
            truncated = (results["msg_flags"] & socket.MSG_TRUNC) != 0
            t_ns, dropped = self._control_data(n, clock)
            results["msg_controllen"] = ANCILLARY_SIZE  # the full room again, for the kernel
        return _decode_rows(rows, size, truncated, t_ns, buses, dropped)

    def _control_data(
        self, n: int, clock: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], int | None]:
        """The receive times and the drop counter from the ancillary data recvmmsg wrote."""
        used = self._results["msg_controllen"][:n]
        first = self._first_cmsg[:n]
        # Each frame's first item is its 64-bit timespec (as the kernel sends it every time,
        # the drop count after it): then it is read at a fixed place, no Python per frame.
        kind = first["cmsg_type"]
        stamped = (
            (used >= CMSG_HEADER + 16)
            & (first["cmsg_len"] == CMSG_HEADER + 16)
            & (first["cmsg_level"] == socket.SOL_SOCKET)
            & ((kind == SO_TIMESTAMPNS_NEW) | (kind == SO_TIMESTAMPNS_OLD))
        )
        timespec = self._timespec[:n]
        stamps = timespec[:, 0] * 1_000_000_000 + timespec[:, 1]
        if stamped.all():
            return stamps, self._dropped(n - 1, int(used[-1]))
        times = np.where(stamped, stamps, clock)
        # Anything else (no stamp, another order, a 32-bit timespec) is parsed, row by row.
        for row in np.flatnonzero(~stamped & (used > 0)).tolist():
            items = cmsgs(self._control, row * ANCILLARY_SIZE, int(used[row]))
            times[row] = receive_times([items], clock[row : row + 1])[0]
        return times, self._dropped(n - 1, int(used[-1]))

    def _dropped(self, row: int, used: int) -> int | None:
        return drop_count(cmsgs(self._control, row * ANCILLARY_SIZE, used))


def _decode_rows(
    rows: npt.NDArray[np.void],
    size: npt.NDArray[np.intp],
    truncated: npt.NDArray[np.bool_] | None,
    t_ns: npt.NDArray[np.int64],
    buses: tuple[str, ...],
    dropped: int | None,
) -> Decoded:
    """The frames in `rows` (of FRAME_DTYPE, `size` bytes received each) as a batch."""
    n = len(rows)
    length = rows["len"].copy()
    ok = length < _ROOM[size]
    if truncated is not None:
        ok &= ~truncated  # longer than a CAN FD frame

    raw_id = rows["can_id"]
    top = (raw_id >> 29).astype(np.uint8)
    fd = (size == CANFD_MTU).view(np.uint8)
    flags = _FLAGS[top | (fd << 3) | ((rows["fd_flags"] & (CANFD_BRS | CANFD_ESI)) << 4)]
    can_id = raw_id & _ID_MASKS[top]
    # Slots are reused: past its length (none for a remote frame) a row holds old bytes.
    shown = np.where((flags & _REMOTE) != 0, np.uint8(0), length)
    data = rows["data"] * (_COLUMNS[None, :] < shown[:, None])

    error = (flags & _ERROR) != 0
    if not ok.all():
        t_ns, can_id, flags, length, data = (
            t_ns[ok],
            can_id[ok],
            flags[ok],
            length[ok],
            data[ok],
        )
        error, raw_id = error[ok], raw_id[ok]
    errors = int(np.count_nonzero(error))
    bus_off = int(np.count_nonzero(raw_id[error] & CAN_ERR_BUSOFF)) if errors else 0
    batch = FrameBatch(
        t_ns=t_ns,
        bus=np.zeros(len(t_ns), np.uint8),
        can_id=can_id,
        flags=flags,
        length=length,
        data=data,
        buses=buses,
    )
    return Decoded(batch, n - len(batch), errors, bus_off, dropped)
