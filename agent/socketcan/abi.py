"""The kernel's SocketCAN interface as its headers define it: the flag bits and sizes of
`struct can_frame` and `struct canfd_frame`, the CAN_RAW socket options, and the socket
options Python's socket module does not name."""

from __future__ import annotations

import socket

import numpy as np

from agent.frames import MAX_PAYLOAD

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
STAMP_KINDS = frozenset({SO_TIMESTAMPNS_OLD, SO_TIMESTAMPNS_NEW})
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
