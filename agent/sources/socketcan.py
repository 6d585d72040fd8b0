"""`source = "socketcan"`: our own reader of a raw SocketCAN socket, draining it in batches.

Why not python-can: its SocketCAN `recv` costs 70 to 110 us of CPU per frame (python-can
PR 2097): a `select` before every read, then a `Message` built field by field; a small ARM
board keeps up with about a quarter of a busy bus. This reader runs no Python per frame
at all where libc has `recvmmsg`, and decodes whole batches with numpy:

- A thread (never the event loop) waits in `poll` for the first frame, then drains the
  non-blocking socket until EAGAIN or the batch is full, then sleeps while the next
  frames queue up in the kernel (which has stamped their times already): until the batch
  is due, but never longer than the socket's receive buffer takes to fill at the highest
  rate a CAN bus carries (`gather_limit`). With the 8 MiB buffer the reader asks for, a
  wake-up comes every FLUSH_S whatever the bus's load; with the kernel's default cap of
  208 KiB, every 12 ms. A wake-up costs more than the work it does: on a 2-vCPU VM, a
  drain and decode of 1,000 frames after 0.2 s of sleep take 2 to 3 times as long as
  right after sending them (bench/socketcan.py). So the fewer wake-ups, the less CPU: at
  5,000 frames/s, 1.6 to 2 us a frame instead of 6. The price is latency: frames reach the
  event loop up to FLUSH_S after they arrive.
- A drain is one `recvmmsg(2)` call (libc's, through ctypes; the socket module lacks it):
  `struct mmsghdr` records, made once, point each at its own 72-byte slot of a slab and
  its own room for ancillary data, and the kernel fills as many as it has frames, writing
  each one's size and flags into its record. numpy views over the records and the
  ancillary rooms read those without a copy. Flooded, on a 2-vCPU VM, the whole reader
  then costs about 1 us of CPU a frame, against 1.5 to 1.9 us with one `recvmsg_into` a
  frame, whose call alone costs 1.2 to 1.3 us (bench/socketcan.py). Where libc lacks
  `recvmmsg` (or for a stand-in of a socket, as tests use), a drain makes one
  `recvmsg_into` per frame into the same slots and keeps its results in a list.
- When a batch is handed over (full, or FLUSH_S after its first frame) the slab is decoded
  at once through a numpy structured view: a 16-byte datagram is a `struct can_frame`, a
  72-byte one a `struct canfd_frame`, anything else is counted as malformed. The kernel's
  receive times (SO_TIMESTAMPNS) come from the ancillary data: the kernel sends the same
  items every time (the timestamp, then the drop counter once it has dropped frames), so
  the timestamps are read at a fixed offset of every room; frames whose first item is
  anything else are parsed one by one, which only odd kernels or 32-bit boards need.
- The kernel filters by ID (CAN_RAW_FILTER, from `frame_ids`), so frames no DBC or rule
  uses never wake the thread. When a config reload assigns new `frame_ids` the reader sees
  it at its next wake-up (FLUSH_S at most) and sets the new filter on the open socket.
  Error frames come too (CAN_RAW_ERR_FILTER): they are counted, bus-off separately, and
  passed on for the decoder to count.
- An interface that is missing or goes away is retried with a backoff and logged once per
  outage; one that goes down keeps its socket, which the kernel resumes when it comes up.

How the socket is opened is `SocketCanSource.open_socket`, which tests replace with one end
of a `socketpair(AF_UNIX, SOCK_SEQPACKET)`: it keeps datagram boundaries as CAN_RAW does,
and carries the same frame layouts. Such a socket has no CAN_RAW filter to change:
`SocketCanSource.set_filters` leaves it alone.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from agent.config import BusConfig, Checker
from agent.frames import MAX_PAYLOAD, FrameBatch, FrameFlag
from agent.sources.base import (
    MAX_PENDING,
    Source,
    SourceError,
    SourceSettings,
    SourceStats,
    hand_over,
    register,
)

log = logging.getLogger(__name__)

#: The reader hands a batch over at most this long after its first frame...
FLUSH_S = 0.2
#: ...or when it holds this many frames (the slab's size).
BATCH_FRAMES = 2048
#: The longest the reader waits for a frame before it looks at the stop flag again.
WAIT_S = 0.05
#: Reopening a missing interface: after this long, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
#: Asked for as the socket's receive buffer. Without CAP_NET_ADMIN the kernel caps it at
#: net.core.rmem_max (212,992 bytes unless raised, as deploy/10-telemetry-agent.conf does).
RECEIVE_BUFFER = 8 * 1024 * 1024
#: What the kernel charges a receive buffer for a queued frame (an sk_buff and its data,
#: 0.7 to 1 KiB), taken at its most.
FRAME_CHARGE = 1024
#: More frames a second than a CAN bus carries: at 1 Mbit/s the shortest classic frames
#: (47 bits) come 21,300 a second; CAN FD frames without data, switching to 8 Mbit/s for
#: their data phase, 29,400. (A vcan interface has no such limit: past it frames may drop,
#: and the kernel counts them.)
MAX_BUS_RATE = 35_000
#: Above this many IDs no kernel filter is set (CAN_RAW_FILTER_MAX in the kernel is 512).
MAX_FILTERS = 512

# From <linux/can.h>: flag bits of can_id, and the frames' sizes (the MTUs).
CAN_EFF_FLAG = 0x80000000
CAN_RTR_FLAG = 0x40000000
CAN_ERR_FLAG = 0x20000000
CAN_SFF_MASK = 0x000007FF
CAN_EFF_MASK = 0x1FFFFFFF
CAN_ERR_MASK = 0x1FFFFFFF
CAN_MTU = 16
CANFD_MTU = 72
CANFD_BRS = 0x01
CANFD_ESI = 0x02
# From <linux/can/error.h>: the error class of a controller that went bus-off.
CAN_ERR_BUSOFF = 0x00000040
# From <linux/can/raw.h>.
SOL_CAN_RAW = 101
CAN_RAW_FILTER = 1
CAN_RAW_ERR_FILTER = 2
CAN_RAW_FD_FRAMES = 5
# From <asm-generic/socket.h> (x86, arm, arm64, riscv; alpha, mips, parisc and sparc differ),
# which Python's socket module does not name.
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS_OLD = 35
SO_RXQ_OVFL = 40
SO_TIMESTAMPNS_NEW = 64
_STAMP_KINDS = frozenset({SO_TIMESTAMPNS_OLD, SO_TIMESTAMPNS_NEW})

#: Room for the ancillary data of one frame: a timespec and the drop counter.
ANCILLARY_SIZE = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(4)

#: `struct can_frame` and `struct canfd_frame` share their first 8 bytes and the data's
#: offset, so one view reads both; a classic frame's byte 5 (padding) is ignored.
FRAME_DTYPE = np.dtype(
    {
        "names": ["can_id", "len", "fd_flags", "data"],
        "formats": ["=u4", "u1", "u1", ("u1", MAX_PAYLOAD)],
        "offsets": [0, 4, 5, 8],
        "itemsize": CANFD_MTU,
    }
)


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

#: The errors of a kernel without SocketCAN: no retry will help.
_NO_SOCKETCAN = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})

#: What `recvmsg_into` returns: size, ancillary data, message flags, address.
Received = tuple[int, list[tuple[int, int, bytes]], int, Any]
_SIZE, _ANCILLARY, _MESSAGE_FLAGS = itemgetter(0), itemgetter(1), itemgetter(2)
#: Of an ancillary item (level, kind, data).
_KIND, _DATA = itemgetter(1), itemgetter(2)

#: `struct cmsghdr` (size_t cmsg_len; int cmsg_level; int cmsg_type), then the data at
#: CMSG_LEN(0); every item starts aligned to a size_t.
_CMSGHDR = struct.Struct("@Nii")
_CMSG_HEADER = socket.CMSG_LEN(0)
_ALIGN = ctypes.sizeof(ctypes.c_size_t)
_CMSG_DTYPE = np.dtype(
    {
        "names": ["cmsg_len", "cmsg_level", "cmsg_type"],
        "formats": [np.uintp, "=i4", "=i4"],
        "offsets": [0, _ALIGN, _ALIGN + 4],
        "itemsize": ANCILLARY_SIZE,
    }
)


class _IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    # glibc's layout; musl's int msg_iovlen and msg_controllen plus padding read the same
    # on a little-endian 64-bit board, as long as the padding is zero (it is: we write it).
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint))


_MMSG_SIZE = ctypes.sizeof(_MMsgHdr)
#: The fields of `struct mmsghdr` that the kernel writes, for numpy views over the array.
_MMSG_DTYPE = np.dtype(
    {
        "names": ["msg_controllen", "msg_flags", "msg_len"],
        "formats": [np.uintp, "=i4", "=u4"],
        "offsets": [
            _MsgHdr.msg_controllen.offset,
            _MsgHdr.msg_flags.offset,
            _MMsgHdr.msg_len.offset,
        ],
        "itemsize": _MMSG_SIZE,
    }
)
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)

#: `int recvmmsg(int fd, struct mmsghdr *vec, unsigned vlen, int flags, struct timespec *)`.
RecvMMsg = Callable[[int, int, int, int, None], int]


def _libc_recvmmsg() -> RecvMMsg | None:
    """libc's recvmmsg (Linux since 2.6.33), or None where libc lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    function.argtypes = (
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    )
    function.restype = ctypes.c_int
    return cast(RecvMMsg, function)


#: None: every socket is read with `recvmsg_into`, one system call per frame.
RECVMMSG: RecvMMsg | None = _libc_recvmmsg() if sys.platform.startswith("linux") else None


def kernel_filters(frame_ids: frozenset[tuple[int, bool]] | None) -> bytes | None:
    """The CAN_RAW_FILTER value for `frame_ids`: an array of `struct can_filter {u32 can_id;
    u32 can_mask}`, one exact match per ID, in ID order. None: set no filter (everything),
    as for `frame_ids` None or more than MAX_FILTERS IDs.

    The masks include CAN_RTR_FLAG and CAN_EFF_FLAG, the form the kernel files in its
    per-ID tables (af_can.c `can_rcv_list_find`, "the subscription of a single non-RTR
    can_id") instead of a list it walks for every frame. So remote frames of these IDs do
    not pass (they carry no signals), nor does a standard frame match an extended ID with
    the same low bits. An ID above 0x7FF marked standard (as messy DBCs have them) is
    matched as the extended frame it must be.
    """
    if frame_ids is None or len(frame_ids) > MAX_FILTERS:
        return None
    pairs: set[tuple[int, int]] = set()
    for can_id, extended in frame_ids:
        if not 0 <= can_id <= CAN_EFF_MASK:
            raise ValueError(f"not a CAN ID: {can_id:#x}")
        if extended or can_id > CAN_SFF_MASK:
            pairs.add((can_id | CAN_EFF_FLAG, CAN_EFF_FLAG | CAN_RTR_FLAG | CAN_EFF_MASK))
        else:
            pairs.add((can_id, CAN_EFF_FLAG | CAN_RTR_FLAG | CAN_SFF_MASK))
    ordered = sorted(pairs, key=lambda pair: (pair[0] & CAN_EFF_FLAG, pair[0]))
    return struct.pack(f"={2 * len(ordered)}I", *itertools.chain.from_iterable(ordered))


#: The one filter that passes every frame: the kernel's own default for a new socket.
_PASS_ALL = struct.pack("=II", 0, 0)


def set_kernel_filters(sock: socket.socket, frame_ids: frozenset[tuple[int, bool]] | None) -> None:
    """Set the CAN_RAW_FILTER of `frame_ids` on the CAN socket `sock`, replacing the one it
    had (on a bound socket the kernel adds the new filters before it drops the old ones, so
    no wanted frame is missed meanwhile)."""
    filters = kernel_filters(frame_ids)
    sock.setsockopt(SOL_CAN_RAW, CAN_RAW_FILTER, _PASS_ALL if filters is None else filters)


def enable_timestamps(sock: socket.socket) -> None:
    """Ask the kernel for each frame's receive time in nanoseconds, as ancillary data.

    SO_TIMESTAMPNS_NEW gives 64-bit seconds on 32-bit boards too; kernels before 5.1 know
    only the old option."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS_NEW, 1)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS_OLD, 1)


def size_receive_buffer(sock: socket.socket, size: int = RECEIVE_BUFFER) -> None:
    """Ask for a receive buffer of `size` bytes: beyond net.core.rmem_max where the process
    may (CAP_NET_ADMIN), else up to it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def gather_limit(sock: socket.socket) -> float:
    """The longest the reader may let frames queue up in `sock` between two drains, in
    seconds: as long as its receive buffer (what the kernel granted) takes to fill at
    MAX_BUS_RATE, so that no frame is dropped while the reader sleeps."""
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted / FRAME_CHARGE / MAX_BUS_RATE


def open_can_socket(
    interface: str, *, fd: bool = True, frame_ids: frozenset[tuple[int, bool]] | None = None
) -> socket.socket:
    """A raw CAN socket bound to `interface`: CAN FD frames if `fd`, error frames, the
    kernel filters of `frame_ids`, receive times and the drop counter, a large buffer."""
    sock = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    try:
        size_receive_buffer(sock)
        if fd:
            sock.setsockopt(SOL_CAN_RAW, CAN_RAW_FD_FRAMES, 1)
        sock.setsockopt(SOL_CAN_RAW, CAN_RAW_ERR_FILTER, struct.pack("=I", CAN_ERR_MASK))
        set_kernel_filters(sock, frame_ids)
        enable_timestamps(sock)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        # Bound last, so that no frame is queued before the filters apply.
        sock.bind((interface,))
    except BaseException:
        sock.close()
        raise
    return sock


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
        if set(map(_KIND, stamps)) <= _STAMP_KINDS:
            joined = b"".join(map(_DATA, stamps))
            if len(joined) in (16 * n, 8 * n):
                return _nanoseconds(joined, n)
    times = fallback.copy()
    for row, items in enumerate(ancillary):
        for level, kind, data in items:
            if level == socket.SOL_SOCKET and kind in _STAMP_KINDS and len(data) in (8, 16):
                times[row] = _nanoseconds(data, 1)[0]
    return times


def _nanoseconds(timespecs: bytes, n: int) -> npt.NDArray[np.int64]:
    # 16 bytes: two 64-bit fields; 8: the old option's two 32-bit longs on a 32-bit board.
    fields = np.frombuffer(timespecs, "=i8" if len(timespecs) == 16 * n else "=i4")
    pairs = fields.reshape(n, 2).astype(np.int64)
    result: npt.NDArray[np.int64] = pairs[:, 0] * 1_000_000_000 + pairs[:, 1]
    return result


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
        self._records = bytearray(capacity * _MMSG_SIZE)
        self._control = bytearray(capacity * ANCILLARY_SIZE)
        self._iovecs = (_IoVec * capacity)()
        self._pinned = (
            (ctypes.c_char * len(self._slab)).from_buffer(self._slab),
            (ctypes.c_char * len(self._control)).from_buffer(self._control),
            (_MMsgHdr * capacity).from_buffer(self._records),
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
            header.msg_iov = iovecs_at + row * ctypes.sizeof(_IoVec)
            header.msg_iovlen = 1
            header.msg_control = control_at + row * ANCILLARY_SIZE
        self._results = np.frombuffer(self._records, _MMSG_DTYPE)
        # The kernel overwrites msg_controllen with what it used: the rows past the frames
        # received are kept at the full room, and a row is reset once it is decoded.
        self._results["msg_controllen"] = ANCILLARY_SIZE
        self._first_cmsg = np.frombuffer(self._control, _CMSG_DTYPE)
        # The data of each row's first ancillary item, as a 64-bit timespec.
        self._timespec = np.ndarray(
            (capacity, 2), "=i8", self._control, _CMSG_HEADER, (ANCILLARY_SIZE, 8)
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
        records_at, room = self._records_at + start * _MMSG_SIZE, self.capacity - start
        while True:
            # Returns fewer than `room` only when the queue ran dry (or failed, which the
            # kernel reports on the next call): one call drains the socket.
            got = recvmmsg(fd, records_at, room, _MSG_DONTWAIT, None)
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
            dropped = _drop_count(received[-1][1])
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
            (used >= _CMSG_HEADER + 16)
            & (first["cmsg_len"] == _CMSG_HEADER + 16)
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
            items = _cmsgs(self._control, row * ANCILLARY_SIZE, int(used[row]))
            times[row] = receive_times([items], clock[row : row + 1])[0]
        return times, self._dropped(n - 1, int(used[-1]))

    def _dropped(self, row: int, used: int) -> int | None:
        return _drop_count(_cmsgs(self._control, row * ANCILLARY_SIZE, used))


def _cmsgs(buffer: bytearray, at: int, size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary items (level, kind, data) in `size` bytes of `buffer` from `at`, as
    `recvmsg_into` would have returned them."""
    items: list[tuple[int, int, bytes]] = []
    end = at + size
    while at + _CMSG_HEADER <= end:
        length, level, kind = _CMSGHDR.unpack_from(buffer, at)
        if length < _CMSG_HEADER or at + length > end:
            break  # truncated (MSG_CTRUNC)
        items.append((level, kind, bytes(buffer[at + _CMSG_HEADER : at + length])))
        at += -(-length // _ALIGN) * _ALIGN
    return items


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


def _drop_count(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    # The kernel's count is cumulative for the socket, so the last frame's says it all.
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(data) == 4:
            count: int = struct.unpack("=I", data)[0]
            return count
    return None


class _SocketLost(Exception):
    """The socket ended (its peer closed it); the reader opens a new one."""


@dataclass
class SocketCanStats(SourceStats):
    """Besides the counts of every source (bus_off, dropped, outages among them)."""

    error_frames: int = 0  # error frames the controller reported (passed on, not decoded)


@dataclass(frozen=True)
class SocketCanSettings(SourceSettings):
    channel: str | None = None  # the interface, where it is not the bus's name
    fd: bool = True  # take CAN FD frames too

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> SocketCanSettings:
        return cls(
            channel=check.get(data, where, "channel", str, "") or None,
            fd=check.get(data, where, "fd", bool, True),
        )


@register
class SocketCanSource(Source):
    """A SocketCAN interface (`channel`, else the bus's name) read by our own reader."""

    kind = "socketcan"
    Settings = SocketCanSettings
    stats: SocketCanStats

    def __init__(self, bus: BusConfig) -> None:
        super().__init__(bus)
        self.settings: SocketCanSettings = bus.settings
        self.stats = SocketCanStats()
        self.interface = self.settings.channel or bus.name
        #: Opens the bus's socket (tests hand the reader one end of a socketpair). It is
        #: called in the reader thread, again after an outage; OSError means: retry later.
        self.open_socket: Callable[[], socket.socket] = self._open_can_socket
        #: Sets the kernel filter of `frame_ids` on the open socket, when they change while
        #: it is read (a config reload); a socket that is no CAN_RAW one is left as it is.
        self.set_filters: Callable[[socket.socket, frozenset[tuple[int, bool]] | None], None] = (
            _set_can_filters
        )
        self.retry_first_s = RETRY_FIRST_S
        self.retry_max_s = RETRY_MAX_S
        self._slab = FrameSlab()
        self._outage: str | None = None  # what is wrong, while the bus is out
        self._delay = self.retry_first_s
        self._dropped_before = 0  # by the sockets of earlier outages

    def _open_can_socket(self) -> socket.socket:
        return open_can_socket(self.interface, fd=self.settings.fd, frame_ids=self.frame_ids)

    async def batches(self) -> AsyncIterator[FrameBatch]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[FrameBatch | BaseException] = asyncio.Queue(MAX_PENDING)
        stop = threading.Event()
        self._slab.clear()  # of frames left over from an earlier run
        reader = threading.Thread(
            target=self._run,
            args=(loop, queue, stop),
            name=f"socketcan-{self.bus.name}",
            daemon=True,
        )
        reader.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, SourceError):
                    raise item
                if isinstance(item, BaseException):
                    raise SourceError(f"bus {self.bus.name}: {item!r}") from item
                yield item
        finally:
            stop.set()
            await asyncio.to_thread(reader.join, 1.0)

    def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[FrameBatch | BaseException],
        stop: threading.Event,
    ) -> None:
        try:
            self._open_and_read(loop, queue, stop)
        except Exception as error:  # a bug, or no SocketCAN: the loop raises it
            hand_over(loop, queue, error, stop)

    def _open_and_read(
        self,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[FrameBatch | BaseException],
        stop: threading.Event,
    ) -> None:
        while not stop.is_set():
            # Taken before opening, which applies the IDs then current: should they change
            # in between, the reader applies them again, which does no harm.
            applied = self.frame_ids
            try:
                sock = self.open_socket()
            except OSError as error:
                if error.errno in _NO_SOCKETCAN:
                    raise SourceError(
                        f"bus {self.bus.name}: this kernel has no SocketCAN: {error}"
                    ) from None
                self._lost(f"cannot open interface {self.interface}: {_reason(error)}")
            else:
                with sock:
                    try:
                        self._read(sock, applied, loop, queue, stop)
                    except (OSError, _SocketLost) as error:
                        self._lost(f"interface {self.interface}: {_reason(error)}")
                    finally:
                        self._dropped_before = self.stats.dropped
                # The frames received before the loss are good: hand them over now.
                if len(self._slab):
                    hand_over(loop, queue, self._decode(), stop)
            if not stop.is_set():
                stop.wait(self._delay)

    def _lost(self, why: str, then: str = "retrying") -> None:
        if self._outage is None:
            log.warning("bus %s: %s; %s", self.bus.name, why, then)
            self.stats.outages += 1
            self._delay = self.retry_first_s
        else:
            self._delay = min(self._delay * 2, self.retry_max_s)
        self._outage = why

    def _read(
        self,
        sock: socket.socket,
        applied: frozenset[tuple[int, bool]] | None,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[FrameBatch | BaseException],
        stop: threading.Event,
    ) -> None:
        """Read `sock` (opened with the kernel filter of the IDs `applied`) until stopped;
        OSError or _SocketLost when it fails for good."""
        # Non-blocking, and waited for with poll: a socket with a timeout would poll
        # before every read, one more system call per frame.
        sock.setblocking(False)
        gather = gather_limit(sock)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        slab = self._slab
        gathered_from: float | None = None  # the reader slept since then, the queue empty
        while not stop.is_set():
            # A reload assigns a new set: an identity test per wake-up is all it costs.
            current = self.frame_ids
            if current is not applied:
                if current != applied:
                    self.set_filters(sock, current)
                applied = current
            wait = WAIT_S
            if gathered_from is not None:
                wait = 0.0  # whatever queued up meanwhile; if nothing, wait anew below
            elif len(slab):
                wait = min(wait, max(0.0, slab.first_at + FLUSH_S - time.monotonic()))
            events = poller.poll(wait * 1000)
            since, gathered_from = gathered_from, None
            got = 0
            if events:
                try:
                    got = slab.drain(sock, since)
                except OSError as error:
                    if error.errno != errno.ENETDOWN:
                        raise
                    # Reported once per down; the socket stays bound and resumes when the
                    # interface comes up again, so keep it.
                    self._lost(f"interface {self.interface} is down", "waiting for it")
                    continue
                if events[0][1] & select.POLLHUP and slab.end_of_stream():
                    raise _SocketLost("the socket was closed")
                if got and self._outage is not None:
                    log.info("bus %s: frames arrive again", self.bus.name)
                    self._outage = None
            now = time.monotonic()
            filled = slab.full
            if len(slab) and (filled or now - slab.first_at >= FLUSH_S):
                hand_over(loop, queue, self._decode(), stop)
            if got and not filled:
                # Frames are coming and the queue was empty at `now`: let the next ones
                # gather in it (the kernel has stamped their times), so that the next
                # wake-up drains many and shares its cost among them. Into an empty slab,
                # they make a batch that is due FLUSH_S from now. The decode and hand-over
                # above count against the time the buffer lasts.
                gathered_from = now
                due = slab.first_at + FLUSH_S if len(slab) else now + FLUSH_S
                stop.wait(max(0.0, min(now + gather, due) - time.monotonic()))

    def _decode(self) -> FrameBatch:
        decoded = self._slab.take((self.bus.name,))
        stats = self.stats
        stats.malformed += decoded.malformed
        stats.error_frames += decoded.error_frames
        stats.bus_off += decoded.bus_off
        if decoded.dropped is not None:
            stats.dropped = self._dropped_before + decoded.dropped
        return decoded.batch


def _set_can_filters(sock: socket.socket, frame_ids: frozenset[tuple[int, bool]] | None) -> None:
    # Tests read a socketpair, which has no CAN_RAW options.
    if sock.family == getattr(socket, "AF_CAN", None):
        set_kernel_filters(sock, frame_ids)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__
