"""A raw CAN socket opened and set up for the reader: CAN FD, error frames, kernel ID
filters, receive times, the drop counter and a receive buffer sized for a bus's worst rate."""

from __future__ import annotations

import itertools
import socket
import struct

from agent.socketcan.abi import (
    CAN_EFF_FLAG,
    CAN_EFF_MASK,
    CAN_ERR_MASK,
    CAN_RAW_ERR_FILTER,
    CAN_RAW_FD_FRAMES,
    CAN_RAW_FILTER,
    CAN_RTR_FLAG,
    CAN_SFF_MASK,
    SO_RCVBUFFORCE,
    SO_RXQ_OVFL,
    SO_TIMESTAMPNS_NEW,
    SO_TIMESTAMPNS_OLD,
    SOL_CAN_RAW,
)

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
