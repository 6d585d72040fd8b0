"""`source = "python-can"`: any python-can interface, read in a thread, handed over in batches."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import can

from agent.config import BusConfig, Checker, positive
from agent.frames import FrameBatch, FrameFlag, id_fits
from agent.sources.base import (
    MAX_PENDING,
    Source,
    SourceError,
    SourceSettings,
    hand_over,
    register,
)

log = logging.getLogger(__name__)

#: The reader thread hands frames over at least this often, and at most this many at once.
FLUSH_S = 0.05
FLUSH_FRAMES = 2_000


@dataclass(frozen=True)
class PythonCanSettings(SourceSettings):
    interface: str = ""  # python-can's interface name; required
    channel: str | None = None
    bitrate: int | None = None
    fd: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)  # more arguments of can.Bus

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> PythonCanSettings:
        interface = check.get(data, where, "interface", str, "")
        if not interface:
            check.problems.append(f"{where}.interface: missing (a python-can interface name)")
        return cls(
            interface=interface,
            channel=check.get(data, where, "channel", str, "") or None,
            bitrate=check.get(data, where, "bitrate", int, 0, positive) or None,
            fd=check.get(data, where, "fd", bool, False),
            options=check.get(data, where, "options", dict, {}),
        )


@register
class PythonCanSource(Source):
    kind = "python-can"
    Settings = PythonCanSettings
    opens_interface = True

    def __init__(self, bus: BusConfig) -> None:
        super().__init__(bus)
        self.settings: PythonCanSettings = bus.settings
        #: The open interface, which diagnostics transmit on: many interfaces open a
        #: channel only once (agent/diagnostics/transport.py's SharedBus).
        self.can_bus: can.BusABC | None = None
        #: Called with each frame received, in the reader thread; replaced, never changed
        #: in place, as the reader iterates it.
        self.taps: list[Callable[[can.Message], None]] = []

    async def batches(self) -> AsyncIterator[FrameBatch]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[FrameBatch | BaseException] = asyncio.Queue(MAX_PENDING)
        stop = threading.Event()
        try:
            settings = self.settings
            # In a thread: a driver that hangs must not stop the loop (nor READY's limit).
            bus = await asyncio.to_thread(
                functools.partial(
                    can.Bus,
                    interface=settings.interface,
                    channel=settings.channel,
                    bitrate=settings.bitrate,
                    fd=settings.fd,
                    **dict(settings.options),
                )
            )
        except Exception as error:  # python-can raises many kinds for a bad interface
            raise SourceError(
                f"bus {self.bus.name}: cannot open python-can interface "
                f"{self.settings.interface!r}: {error}"
            ) from None
        finally:
            self.tried.set()
        self.can_bus = bus
        reader = threading.Thread(
            target=self._read,
            args=(bus, loop, queue, stop),
            name=f"can-{self.bus.name}",
            daemon=True,
        )
        reader.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise SourceError(f"bus {self.bus.name}: {item}") from item
                yield item
        finally:
            stop.set()
            await asyncio.to_thread(reader.join, 1.0)
            self.can_bus = None
            with contextlib.suppress(Exception):
                bus.shutdown()

    def _read(
        self,
        bus: Any,
        loop: asyncio.AbstractEventLoop,
        queue: asyncio.Queue[FrameBatch | BaseException],
        stop: threading.Event,
    ) -> None:
        pending: list[Any] = []
        flushed = time.monotonic()
        while not stop.is_set():
            try:
                message = bus.recv(timeout=FLUSH_S)
            except Exception as error:
                hand_over(loop, queue, error, stop)
                return
            if message is not None:
                pending.append(message)
                for tap in self.taps:
                    try:
                        tap(message)
                    except Exception:  # a bug: it costs the tap, never the bus
                        log.exception("bus %s: a reader of its frames failed", self.bus.name)
                        self.taps = [t for t in self.taps if t != tap]
            now = time.monotonic()
            if pending and (len(pending) >= FLUSH_FRAMES or now - flushed >= FLUSH_S):
                hand_over(loop, queue, self._batch(pending), stop)
                pending = []
                flushed = now

    def _batch(self, messages: list[Any]) -> FrameBatch:
        # python-can does not check what an interface hands over: an ID that no CAN frame
        # can carry is counted and skipped.
        valid = [
            m for m in messages if id_fits(m.arbitration_id, m.is_extended_id, m.is_error_frame)
        ]
        self.stats.malformed += len(messages) - len(valid)
        messages = valid
        batch = FrameBatch.allocate(len(messages), (self.bus.name,))
        for row, message in enumerate(messages):
            batch.t_ns[row] = round(message.timestamp * 1e9)
            batch.can_id[row] = message.arbitration_id
            batch.flags[row] = (
                FrameFlag.EXTENDED * message.is_extended_id
                | FrameFlag.REMOTE * message.is_remote_frame
                | FrameFlag.ERROR * message.is_error_frame
                | FrameFlag.FD * message.is_fd
                | FrameFlag.BRS * message.bitrate_switch
                | FrameFlag.ESI * message.error_state_indicator
            )
            data = message.data
            length = min(len(data), 64)
            batch.length[row] = length
            batch.data[row, :length] = memoryview(data)[:length]
        return batch
