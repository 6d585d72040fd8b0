"""libc's `recvmmsg(2)` through ctypes (the socket module lacks it), and the `struct
mmsghdr` records it fills: many frames a system call."""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import sys
from collections.abc import Callable
from typing import cast

import numpy as np


class IoVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class MsgHdr(ctypes.Structure):
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


class MMsgHdr(ctypes.Structure):
    _fields_ = (("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint))


MMSG_SIZE = ctypes.sizeof(MMsgHdr)
#: The fields of `struct mmsghdr` that the kernel writes, for numpy views over the array.
MMSG_DTYPE = np.dtype(
    {
        "names": ["msg_controllen", "msg_flags", "msg_len"],
        "formats": [np.uintp, "=i4", "=u4"],
        "offsets": [
            MsgHdr.msg_controllen.offset,
            MsgHdr.msg_flags.offset,
            MMsgHdr.msg_len.offset,
        ],
        "itemsize": MMSG_SIZE,
    }
)

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
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
