"""J1939-21 transport protocol, heard passively: BAM and RTS/CTS transfers reassembled from
whole frame batches.

A parameter group longer than 8 bytes travels as a connection-management frame (TP.CM,
PGN 0xEC00) that announces it, then up to 255 data frames (TP.DT, PGN 0xEB00) of 7 bytes
each. A broadcast (BAM) goes to address 255 unasked; a connection (RTS/CTS) to one address,
which paces it with clear-to-send frames and confirms it with an end-of-message
acknowledgement. Each (source, destination) pair on a bus holds at most one transfer at a
time, so that pair is the session's key.

Most buses carry no transport traffic at all. The decoder's lookup of every frame's PGN finds
the TP frames as it finds the others (`DecodedBatch.transport`), so a bus without them pays
nothing more; only the TP frames are walked one by one. Sessions live across batches, and
time is the frames' own: a timeout is judged when the next frame of a session arrives, or
when a batch ends past a session's deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from agent.frames import FrameBatch

#: The PGN of connection management; the other TP frames (0xEB00) carry the data.
TP_CM = 0xEC00
GLOBAL = 0xFF
#: Control bytes of TP.CM.
RTS, CTS, END_OF_MSG_ACK, BAM, ABORT = 16, 17, 19, 32, 255
#: The longest transfer: 255 packets of 7 bytes.
MAX_SIZE = 1785
PACKET = 7

# J1939-21's timeouts, in nanoseconds. T1: a receiver waiting for the next data frame;
# T2: a receiver waiting for data after its CTS; T3: an originator waiting for a CTS or
# the acknowledgement after its RTS or its last data frame; T4: an originator told to hold
# (CTS of 0 packets) waiting for the next CTS.
_MS = 1_000_000
T1, T2, T3, T4 = 750 * _MS, 1250 * _MS, 1250 * _MS, 1050 * _MS


@dataclass(frozen=True, slots=True)
class Transfer:
    """One parameter group reassembled: when its last frame arrived, from whom, to whom."""

    t_ns: int
    bus: str
    priority: int
    source: int
    destination: int  # 255 for a broadcast
    pgn: int
    data: bytes
    row: int  # the row of the frame that completed it, in the batch that held that frame

    @property
    def can_id(self) -> int:
        """The 29-bit ID the group would carry in one frame: PDU1 groups name their
        destination in the PS byte."""
        ps = self.destination if (self.pgn & 0xFF00) < 0xF000 else self.pgn & 0xFF
        return (self.priority << 26) | ((self.pgn & 0x3FF00) << 8) | (ps << 8) | self.source


@dataclass(slots=True)
class TransportCounts:
    """What the reassembler saw besides completed transfers, as counters."""

    transfers: int = 0
    aborted: int = 0  # an Abort frame, or a new announcement over an unfinished transfer
    timed_out: int = 0
    bad_frames: int = 0  # TP frames that break the protocol: counted, skipped


@dataclass(slots=True)
class _Session:
    broadcast: bool
    priority: int
    pgn: int
    size: int
    packets: int
    deadline: int  # t_ns past which the session has timed out
    data: bytearray
    received: set[int] = field(default_factory=set)
    window_end: int = 0  # RTS/CTS: the last packet the latest CTS asked for

    @property
    def complete(self) -> bool:
        return len(self.received) == self.packets


class Reassembler:
    """Reassembles the transfers of the buses of the batches it is fed, batch by batch."""

    def __init__(self) -> None:
        self.counts = TransportCounts()
        # (bus, source of the data, destination of the data) -> the transfer under way
        self._sessions: dict[tuple[str, int, int], _Session] = {}
        self._row = 0  # the batch row of the frame being read

    def feed(self, batch: FrameBatch, rows: npt.NDArray[np.intp]) -> list[Transfer]:
        """The transfers that the TP frames of `batch` at `rows` (ascending, as the
        decoder finds them: `DecodedBatch.transport`) complete, in frame order."""
        if not len(rows):
            if self._sessions and len(batch):
                self._expire(int(batch.t_ns[-1]))
            return []
        done: list[Transfer] = []
        ids = batch.can_id[rows].tolist()
        times = batch.t_ns[rows].tolist()
        lengths = batch.length[rows].tolist()
        buses = batch.bus[rows].tolist()
        payloads = batch.data[rows, :8].tobytes()
        for k, (row, can_id, t_ns, length, bus) in enumerate(
            zip(rows.tolist(), ids, times, lengths, buses, strict=True)
        ):
            self._row = row
            payload = payloads[8 * k : 8 * k + 8]
            if length < 8:
                # J1939-21 sends TP frames at full length; a short one cannot be trusted.
                self.counts.bad_frames += 1
                continue
            name = batch.buses[bus]
            source, destination = can_id & 0xFF, (can_id >> 8) & 0xFF
            if (can_id >> 16) & 0xFF == TP_CM >> 8:
                self._control(name, t_ns, can_id >> 26, source, destination, payload, done)
            else:
                self._data(name, t_ns, source, destination, payload, done)
        if self._sessions and len(batch):
            self._expire(int(batch.t_ns[-1]))
        return done

    def _control(
        self,
        bus: str,
        t_ns: int,
        priority: int,
        source: int,
        destination: int,
        payload: bytes,
        done: list[Transfer],
    ) -> None:
        control = payload[0]
        pgn = int.from_bytes(payload[5:8], "little")
        if control in (BAM, RTS):
            size = int.from_bytes(payload[1:3], "little")
            packets = payload[3]
            broadcast = control == BAM
            if (
                not 8 < size <= MAX_SIZE
                or packets != -(-size // PACKET)
                or broadcast != (destination == GLOBAL)
            ):
                self.counts.bad_frames += 1
                return
            key = (bus, source, destination)
            if key in self._sessions:
                # A new announcement ends the old transfer unfinished (J1939-21 5.10.3).
                self.counts.aborted += 1
            self._sessions[key] = _Session(
                broadcast,
                priority,
                pgn,
                size,
                packets,
                t_ns + (T1 if broadcast else T3),
                bytearray(packets * PACKET),
            )
            return
        # CTS, acknowledgement and Abort of a connection: sent by its receiver, so the
        # data's source is this frame's destination. An Abort may come from either side.
        key = (bus, destination, source)
        session = self._sessions.get(key)
        if control == ABORT:
            if session is None:
                key = (bus, source, destination)
                session = self._sessions.get(key)
            if session is None or session.broadcast:
                self.counts.bad_frames += 1
                return
            del self._sessions[key]
            self.counts.aborted += 1
            return
        if session is None or session.broadcast or session.pgn != pgn:
            self.counts.bad_frames += 1
            return
        if self._late(key, session, t_ns):
            return
        if control == CTS:
            count, first = payload[1], payload[2]
            if count == 0:
                session.deadline = t_ns + T4  # hold the connection open
                return
            if not 1 <= first <= session.packets or first + count - 1 > session.packets:
                self.counts.bad_frames += 1
                return
            session.window_end = first + count - 1
            session.deadline = t_ns + T2
        elif control == END_OF_MSG_ACK:
            del self._sessions[key]
            if not session.complete:
                self.counts.bad_frames += 1
                return
            self._finish(bus, t_ns, key, session, done)
        else:
            self.counts.bad_frames += 1

    def _data(
        self,
        bus: str,
        t_ns: int,
        source: int,
        destination: int,
        payload: bytes,
        done: list[Transfer],
    ) -> None:
        key = (bus, source, destination)
        session = self._sessions.get(key)
        if session is None:
            self.counts.bad_frames += 1  # data of no transfer this listener heard begin
            return
        if self._late(key, session, t_ns):
            return
        sequence = payload[0]
        limit = session.packets if session.broadcast else session.window_end
        if not 1 <= sequence <= limit:
            self.counts.bad_frames += 1
            return
        session.data[PACKET * (sequence - 1) : PACKET * sequence] = payload[1:8]
        session.received.add(sequence)
        if session.broadcast:
            if session.complete:
                del self._sessions[key]
                self._finish(bus, t_ns, key, session, done)
            else:
                session.deadline = t_ns + T1
        elif sequence == session.window_end:
            # The originator now waits for the next CTS, or for the acknowledgement.
            session.deadline = t_ns + T3
        else:
            session.deadline = t_ns + T1

    def _late(self, key: tuple[str, int, int], session: _Session, t_ns: int) -> bool:
        """Ends the session if `t_ns` is past its deadline."""
        if t_ns <= session.deadline:
            return False
        del self._sessions[key]
        self.counts.timed_out += 1
        return True

    def _expire(self, now: int) -> None:
        for key in [k for k, s in self._sessions.items() if now > s.deadline]:
            del self._sessions[key]
            self.counts.timed_out += 1

    def _finish(
        self,
        bus: str,
        t_ns: int,
        key: tuple[str, int, int],
        session: _Session,
        done: list[Transfer],
    ) -> None:
        self.counts.transfers += 1
        done.append(
            Transfer(
                t_ns,
                bus,
                session.priority,
                key[1],
                key[2],
                session.pgn,
                bytes(session.data[: session.size]),
                self._row,
            )
        )
