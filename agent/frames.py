"""The frame batch: CAN and CAN FD frames as columns, the unit that moves through the agent."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Bytes of payload room per frame: a CAN FD frame carries up to 64.
MAX_PAYLOAD = 64


def id_fits(can_id: int, extended: bool, error: bool = False) -> bool:
    """Whether a frame can carry `can_id`: 29 bits in an extended frame, 11 in a standard one
    (an error frame's holds its error class). Every reader counts a frame that cannot as
    malformed and skips it: some BLF files hold standard frames with wider IDs, which no bus
    carries and no DBC lookup would match."""
    return 0 <= can_id < (1 << 29 if extended or error else 1 << 11)


class FrameFlag(enum.IntFlag):
    """Bits of the `flags` column."""

    EXTENDED = 0x01  # 29-bit identifier
    REMOTE = 0x02  # remote transmission request, no payload
    ERROR = 0x04  # error frame reported by the controller; can_id holds the error class
    FD = 0x08  # CAN FD frame
    BRS = 0x10  # CAN FD bit rate switch
    ESI = 0x20  # CAN FD error state indicator


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """A batch of frames as numpy columns, one row per frame, in arrival order.

    `bus` indexes `buses`, the names of the buses the frames came from. The payload
    bytes past `length` in a row are zero.
    """

    t_ns: npt.NDArray[np.int64]  # nanoseconds since the epoch, or since the log's start
    bus: npt.NDArray[np.uint8]
    can_id: npt.NDArray[np.uint32]  # 11 or 29 bits, without flag bits
    flags: npt.NDArray[np.uint8]  # FrameFlag bits
    length: npt.NDArray[np.uint8]  # payload length in bytes (0..64)
    data: npt.NDArray[np.uint8]  # shape (n, 64)
    buses: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.t_ns)
        columns = (self.bus, self.can_id, self.flags, self.length)
        if any(len(c) != n for c in columns) or self.data.shape != (n, MAX_PAYLOAD):
            raise ValueError("frame batch columns differ in length")

    def __len__(self) -> int:
        return len(self.t_ns)

    @classmethod
    def empty(cls, buses: Sequence[str] = ()) -> FrameBatch:
        return cls.allocate(0, buses)

    @classmethod
    def allocate(cls, n: int, buses: Sequence[str]) -> FrameBatch:
        """A zero-filled batch of `n` frames, for readers that fill rows in place."""
        return cls(
            t_ns=np.zeros(n, np.int64),
            bus=np.zeros(n, np.uint8),
            can_id=np.zeros(n, np.uint32),
            flags=np.zeros(n, np.uint8),
            length=np.zeros(n, np.uint8),
            data=np.zeros((n, MAX_PAYLOAD), np.uint8),
            buses=tuple(buses),
        )

    def take(self, rows: npt.NDArray[np.intp] | npt.NDArray[np.bool_] | slice) -> FrameBatch:
        """The frames at `rows` (indices, a boolean mask or a slice), as a new batch."""
        return FrameBatch(
            t_ns=self.t_ns[rows],
            bus=self.bus[rows],
            can_id=self.can_id[rows],
            flags=self.flags[rows],
            length=self.length[rows],
            data=self.data[rows],
            buses=self.buses,
        )

    @classmethod
    def concat(cls, batches: Sequence[FrameBatch]) -> FrameBatch:
        """Join batches that share one bus table (the later table extends the earlier)."""
        if not batches:
            return cls.empty()
        buses = max((b.buses for b in batches), key=len)
        for b in batches:
            if buses[: len(b.buses)] != b.buses:
                raise ValueError("frame batches with different bus tables cannot be joined")
        return cls(
            t_ns=np.concatenate([b.t_ns for b in batches]),
            bus=np.concatenate([b.bus for b in batches]),
            can_id=np.concatenate([b.can_id for b in batches]),
            flags=np.concatenate([b.flags for b in batches]),
            length=np.concatenate([b.length for b in batches]),
            data=np.concatenate([b.data for b in batches]),
            buses=buses,
        )

    def payload(self, row: int) -> bytes:
        """The payload of one frame, for tests and diagnostics (not the hot path)."""
        return self.data[row, : self.length[row]].tobytes()
