"""ISO-TP (ISO 15765-2), heard passively: the messages of diagnostic conversations
(OBD-II, UDS) reassembled from whole frame batches, per pair of IDs, classic CAN and CAN FD.

A message of up to 7 bytes (62 on CAN FD) goes in a single frame; a longer one in a first
frame that gives its length, then consecutive frames numbered 1 to 15 and round again, paced
by flow-control frames that the receiver sends on the pair's other ID. Normal addressing:
the protocol byte opens the payload. The IDs of a pair are told, as a listener cannot tell
a diagnostic frame from any other: the frames of those IDs are found in one vectorised
pass, and only they are walked one by one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from agent.frames import FrameBatch, FrameFlag

SINGLE, FIRST, CONSECUTIVE, FLOW_CONTROL = 0, 1, 2, 3
#: Marks a 29-bit ID (linux/can.h)
CAN_EFF_FLAG = 0x80000000
CONTINUE, WAIT, OVERFLOW = 0, 1, 2
#: N_Bs and N_Cr: a sender waits this long for flow control, a receiver for the next
#: consecutive frame, before the message is given up.
TIMEOUT_NS = 1_000_000_000
_NOT_DATA = np.uint8(FrameFlag.REMOTE | FrameFlag.ERROR)


@dataclass(frozen=True, slots=True)
class IsoTpMessage:
    """One message, whole: when its last frame arrived, on which bus and ID."""

    t_ns: int
    bus: str
    can_id: int
    extended: bool
    data: bytes
    row: int  # the row of the frame that completed it, in the batch that held that frame


@dataclass(slots=True)
class IsoTpCounts:
    messages: int = 0
    aborted: int = 0  # an overflow, or a first frame over an unfinished message
    timed_out: int = 0
    bad_frames: int = 0  # frames of a pair that break the protocol: counted, skipped


@dataclass(slots=True)
class _Message:
    size: int
    data: bytearray
    next_index: int  # the sequence number (0..15) the next consecutive frame carries
    deadline: int


class IsoTpListener:
    """Reassembles the messages sent on the given pairs of IDs (each ID of a pair sends, the
    other answers with flow control), on every bus of the batches it is fed. A 29-bit ID is
    given with CAN_EFF_FLAG set, as SocketCAN writes it: 0x7E8 and 0x80007E8 are two IDs."""

    def __init__(self, pairs: Iterable[tuple[int, int]]) -> None:
        self.counts = IsoTpCounts()
        self._partner: dict[int, int] = {}
        for one, other in pairs:
            self._partner[one], self._partner[other] = other, one
        self._ids = np.array(sorted(self._partner), np.uint32)
        # (bus, sending ID with its flag) -> the message under way
        self._open: dict[tuple[str, int], _Message] = {}

    def feed(self, batch: FrameBatch) -> list[IsoTpMessage]:
        """The messages that the frames of `batch` complete, in frame order."""
        extended = (batch.flags & FrameFlag.EXTENDED) != 0
        keys = batch.can_id | np.where(extended, np.uint32(CAN_EFF_FLAG), np.uint32(0))
        rows = np.flatnonzero(np.isin(keys, self._ids))
        rows = rows[(batch.flags[rows] & _NOT_DATA) == 0]
        done: list[IsoTpMessage] = []
        for row in rows.tolist():
            length = int(batch.length[row])
            if length == 0:
                self.counts.bad_frames += 1
                continue
            self._frame(batch, row, batch.data[row, :length].tobytes(), done)
        if self._open and len(batch):
            now = int(batch.t_ns[-1])
            for key in [k for k, m in self._open.items() if now > m.deadline]:
                del self._open[key]
                self.counts.timed_out += 1
        return done

    def _frame(self, batch: FrameBatch, row: int, payload: bytes, done: list[IsoTpMessage]) -> None:
        bus = batch.buses[batch.bus[row]]
        can_id, t_ns = int(batch.can_id[row]), int(batch.t_ns[row])
        extended = bool(batch.flags[row] & FrameFlag.EXTENDED)
        flagged = can_id | CAN_EFF_FLAG if extended else can_id
        kind = payload[0] >> 4
        key = (bus, flagged)

        def complete(data: bytes) -> None:
            self.counts.messages += 1
            done.append(IsoTpMessage(t_ns, bus, can_id, extended, data, row))

        if kind == SINGLE:
            size, start = payload[0] & 0x0F, 1
            if size == 0 and len(payload) > 8:  # CAN FD: the length in the next byte
                size, start = payload[1], 2
            if size == 0 or start + size > len(payload):
                self.counts.bad_frames += 1
                return
            complete(payload[start : start + size])
        elif kind == FIRST:
            if len(payload) < 8:  # a first frame fills a whole frame
                self.counts.bad_frames += 1
                return
            size, start = (payload[0] & 0x0F) << 8 | payload[1], 2
            if size == 0:  # more than 4,095 bytes: 32 bits of length
                size, start = int.from_bytes(payload[2:6], "big"), 6
            if size <= len(payload) - start:
                self.counts.bad_frames += 1  # a first frame whose message fits in it
                return
            if key in self._open:
                self.counts.aborted += 1
            self._open[key] = _Message(size, bytearray(payload[start:]), 1, t_ns + TIMEOUT_NS)
        elif kind == CONSECUTIVE:
            message = self._open.get(key)
            if message is None:
                self.counts.bad_frames += 1  # of no message this listener heard begin
                return
            if t_ns > message.deadline:
                del self._open[key]
                self.counts.timed_out += 1
                return
            if payload[0] & 0x0F != message.next_index:
                del self._open[key]  # a frame lost: the message cannot be whole
                self.counts.bad_frames += 1
                return
            message.data += payload[1:]
            message.next_index = (message.next_index + 1) & 0x0F
            message.deadline = t_ns + TIMEOUT_NS
            if len(message.data) >= message.size:
                del self._open[key]
                complete(bytes(message.data[: message.size]))
        elif kind == FLOW_CONTROL:
            # Sent by the receiver, on the pair's other ID, about the message sent on it.
            sender = (bus, self._partner[flagged])
            message = self._open.get(sender)
            if message is None:
                return  # flow control for a message this listener did not hear begin
            status = payload[0] & 0x0F
            if status == OVERFLOW:
                del self._open[sender]
                self.counts.aborted += 1
            elif status in (CONTINUE, WAIT):
                message.deadline = t_ns + TIMEOUT_NS
            else:
                self.counts.bad_frames += 1
        else:
            self.counts.bad_frames += 1
