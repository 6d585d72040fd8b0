"""The uplink interface: one small abstract class, one module per kind, registered by name."""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from agent.config import Settings, UplinkConfig
from agent.uplinks import KINDS
from agent.wire.envelope import WireBatch


class UplinkError(Exception):
    """The link failed (refused, dropped, timed out): the sender reconnects and re-sends."""


@dataclass(frozen=True)
class UplinkSettings(Settings):
    """An uplink's own keys of the [uplink] table. A reload applies them all: a changed
    [uplink] replaces the uplink."""


class Uplink(abc.ABC):
    """Carries wire batches to the cloud. `send` returns once the cloud acknowledged the
    batch; up to `config.window` sends run at once. An uplink that loses its connection
    raises UplinkError from `send` or `connect`; the sender takes care of the retries."""

    kind: ClassVar[str]
    Settings: ClassVar[type[UplinkSettings]] = UplinkSettings

    def __init__(self, config: UplinkConfig, vehicle_id: str) -> None:
        self.config = config
        self.vehicle_id = vehicle_id

    @property
    def window(self) -> int:
        return self.config.window

    @property
    def target(self) -> str:
        """Where batches go, for logs and status lines."""
        return self.config.url

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the link; UplinkError when it cannot be opened now."""

    @abc.abstractmethod
    async def announce(self, schema_id: bytes, announcement: bytes) -> None:
        """Deliver a schema announcement, ahead of the batches that name it; the sender
        announces each schema once per connection, before its first batch."""

    @abc.abstractmethod
    async def send(self, batch: WireBatch) -> None:
        """Deliver `batch` and wait for its acknowledgement."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the link (also after a failure); never raises."""


_UPLINKS: dict[str, type[Uplink]] = {}

UplinkClass = TypeVar("UplinkClass", bound=type[Uplink])


def register(cls: UplinkClass) -> UplinkClass:
    _UPLINKS[cls.kind] = cls
    return cls


def uplink_class(kind: str) -> type[Uplink]:
    """The uplink of a kind, its module imported on first use."""
    importlib.import_module(KINDS[kind])  # its class registers itself
    return _UPLINKS[kind]


def create_uplink(config: UplinkConfig, vehicle_id: str) -> Uplink:
    return uplink_class(config.kind)(config, vehicle_id)
