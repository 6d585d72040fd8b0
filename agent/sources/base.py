"""The source interface: one small abstract class, one module per kind, registered by name."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from agent.config import BusConfig
from agent.frames import FrameBatch


class SourceError(Exception):
    """A source that cannot start or go on (a missing log, an interface that fails to open)."""


@dataclass
class SourceStats:
    malformed: int = 0  # records a reader could not parse, skipped


class Source(abc.ABC):
    """Produces the frames of one configured bus as batches, until it ends (a replay
    without loop) or is cancelled. Blocking reads happen in a thread, never in the loop."""

    kind: ClassVar[str]

    def __init__(self, bus: BusConfig) -> None:
        self.bus = bus
        self.stats = SourceStats()

    @abc.abstractmethod
    def batches(self) -> AsyncIterator[FrameBatch]:
        """Frame batches in arrival order."""


_SOURCES: dict[str, type[Source]] = {}

SourceClass = TypeVar("SourceClass", bound=type[Source])


def register(cls: SourceClass) -> SourceClass:
    _SOURCES[cls.kind] = cls
    return cls


def create_source(bus: BusConfig) -> Source:
    try:
        factory: Callable[[BusConfig], Source] = _SOURCES[bus.source]
    except KeyError:
        raise SourceError(f"bus {bus.name}: unknown source {bus.source!r}") from None
    return factory(bus)
