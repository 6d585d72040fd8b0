"""The source interface: one small abstract class, one module per kind, registered by name."""

from __future__ import annotations

import abc
import asyncio
import importlib
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from agent.config import BusConfig, Settings
from agent.frames import FrameBatch
from agent.sources import KINDS

#: Batches a reader thread has handed over that wait for the event loop; beyond this the
#: thread waits (backpressure: frames wait in the interface's buffer meanwhile).
MAX_PENDING = 64
#: How often a reader thread waiting to hand a batch over looks whether its source stopped.
HAND_OVER_WAIT_S = 0.05


def hand_over(
    loop: asyncio.AbstractEventLoop,
    queue: asyncio.Queue[FrameBatch | BaseException],
    item: FrameBatch | BaseException,
    stop: threading.Event,
) -> None:
    """From a reader thread: put `item` (a batch, or the error that ended the reading) on
    the event loop's queue, waiting while the queue is full, unless the source stops.
    An empty batch is not handed over."""
    if isinstance(item, FrameBatch) and not len(item):
        return
    future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
    while not stop.is_set():
        try:
            future.result(timeout=HAND_OVER_WAIT_S)
            return
        except TimeoutError:
            continue
    future.cancel()


class SourceError(Exception):
    """A source that cannot start or go on (a missing log, an interface that fails to open)."""


@dataclass
class SourceStats:
    """What a source counts; the agent exports each as a metric per bus."""

    malformed: int = 0  # records a reader could not parse, skipped
    bus_off: int = 0  # times the bus's controller went bus-off
    dropped: int = 0  # frames lost before the agent saw them (a full receive queue)
    outages: int = 0  # times the interface was missing, went away or went down


@dataclass(frozen=True)
class SourceSettings(Settings):
    """A source's own keys of a [[bus]] table. None of them changes on a reload: a bus's
    settings take a restart."""


class Source(abc.ABC):
    """Produces the frames of one configured bus as batches, until it ends (a replay
    without loop) or is cancelled. Blocking reads happen in a thread, never in the loop."""

    kind: ClassVar[str]
    Settings: ClassVar[type[SourceSettings]]
    #: Whether the source opens an interface, which frames reach only once it is open
    opens_interface: ClassVar[bool] = False

    def __init__(self, bus: BusConfig) -> None:
        self.bus = bus
        self.stats = SourceStats()
        #: Set once the source has first tried to open its interface, whether it could or
        #: not: the agent tells systemd it is ready only then, so that frames sent once
        #: `systemctl start` returns are read. A replay or a simulation opens nothing.
        self.tried = threading.Event()
        if not self.opens_interface:
            self.tried.set()
        # The frames the agent uses, as (ID, extended) pairs: those its DBCs decode, or
        # its collection rules select. None: all of them (raw capture of everything, J1939
        # buses, or not known). A source that can filter in the kernel uses it; the agent
        # sets it before `batches` starts.
        self.frame_ids: frozenset[tuple[int, bool]] | None = None

    @abc.abstractmethod
    def batches(self) -> AsyncIterator[FrameBatch]:
        """Frame batches in arrival order."""

    @classmethod
    def create_all(cls, buses: Sequence[BusConfig]) -> list[Source]:
        """The sources of every bus of this kind, which may share work (one log read)."""
        return [cls(bus) for bus in buses]


_SOURCES: dict[str, type[Source]] = {}

SourceClass = TypeVar("SourceClass", bound=type[Source])


def register(cls: SourceClass) -> SourceClass:
    _SOURCES[cls.kind] = cls
    return cls


def source_class(kind: str) -> type[Source]:
    """The source of a kind, its module imported on first use."""
    if kind not in KINDS:
        raise SourceError(f"unknown source {kind!r}")
    importlib.import_module(KINDS[kind])  # its class registers itself
    return _SOURCES[kind]


def create_sources(buses: Sequence[BusConfig]) -> list[Source]:
    """A source per bus, in the order given."""
    made: dict[str, Source] = {}
    for kind in dict.fromkeys(bus.source for bus in buses):
        of_kind = [bus for bus in buses if bus.source == kind]
        for bus, source in zip(of_kind, source_class(kind).create_all(of_kind), strict=True):
            made[bus.name] = source
    return [made[bus.name] for bus in buses]
