"""`source = "socketcan"`: our own reader of a raw SocketCAN socket, draining it in batches.

Why not python-can: its SocketCAN `recv` runs a `select` before every read, then builds a
`Message` field by field, so a small ARM board keeps up with a fraction of a busy bus
(BENCHMARKS.md has the figures). This reader runs no Python per frame where libc has
`recvmmsg`, and decodes whole batches with numpy (agent/socketcan/):

- A thread (never the event loop) waits in `poll` for the first frame, then drains the
  non-blocking socket until EAGAIN or the batch is full, then sleeps while the next frames
  queue up in the kernel (which has stamped their times already): until the batch is due,
  but never longer than the socket's receive buffer takes to fill at the highest rate a
  CAN bus carries (`gather_limit`). A wake-up costs more than the work it does, so the
  fewer wake-ups, the less CPU; the price is latency: frames reach the event loop up to
  FLUSH_S after they arrive.
- A drain is one `recvmmsg(2)` call into a slab of 72-byte slots (agent/socketcan/slab.py);
  the slab is decoded at once when the batch is handed over (full, or FLUSH_S after its
  first frame).
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
import errno
import logging
import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.config import BusConfig, Checker
from agent.frames import FrameBatch
from agent.socketcan.slab import FrameSlab
from agent.socketcan.sockets import gather_limit, open_can_socket, set_kernel_filters
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
#: The longest the reader waits for a frame before it looks at the stop flag again.
WAIT_S = 0.05
#: Reopening a missing interface: after this long, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
#: The errors of a kernel without SocketCAN: no retry will help.
_NO_SOCKETCAN = frozenset({errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})


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
    opens_interface = True
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
                self.tried.set()
                if error.errno in _NO_SOCKETCAN:
                    raise SourceError(
                        f"bus {self.bus.name}: this kernel has no SocketCAN: {error}"
                    ) from None
                self._lost(f"cannot open interface {self.interface}: {_reason(error)}")
            else:
                self.tried.set()  # bound: the kernel queues the bus's frames from now on
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
