"""`kind = "mqtt"`: QoS 1 publishes over MQTT 5 (aiomqtt); the PUBACK is the acknowledgement.

The client id is the vehicle id, and a retained status topic says `online` while the agent
is connected and `offline` (the will, or on a clean stop) otherwise. Schema announcements
are retained on `{schema_topic}/{schema id in hex}`, so a receiver that comes later has them.

A half-open link (the path went away, nothing closed it) is noticed by the keepalive: paho
sends a PINGREQ after `keepalive_s` without traffic and drops the link when no PINGRESP came
`keepalive_s` later (checked once a second). Every publish still waiting for its PUBACK then
fails at once, rather than at its own `ack_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt import ProtocolVersion, Will

from agent.config import URL_SCHEMES, Checker, UplinkConfig, split_url
from agent.tls import client_context
from agent.uplinks.base import Uplink, UplinkError, UplinkSettings, register
from agent.wire.envelope import WireBatch


@dataclass(frozen=True)
class MqttSettings(UplinkSettings):
    topic: str = "vehicles/{vehicle_id}/telemetry"  # the batches
    status_topic: str = "vehicles/{vehicle_id}/status"  # online/offline, retained
    schema_topic: str = "vehicles/{vehicle_id}/schema"  # the schemas, retained, by ID

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> MqttSettings:
        settings = cls(
            **{
                key: check.get(data, where, key, str, getattr(cls, key))
                for key in ("topic", "status_topic", "schema_topic")
            }
        )
        for key in ("topic", "status_topic", "schema_topic"):
            try:
                getattr(settings, key).format(vehicle_id="v")
            except (KeyError, IndexError, ValueError, AttributeError):
                check.problems.append(f"{where}.{key}: only {{vehicle_id}} may be substituted")
        return settings


@register
class MqttUplink(Uplink):
    kind = "mqtt"
    Settings = MqttSettings

    def __init__(self, config: UplinkConfig, vehicle_id: str) -> None:
        super().__init__(config, vehicle_id)
        self.host, self.port, use_tls = split_url(config.url, URL_SCHEMES["mqtt"])
        use_tls = use_tls or config.tls is not None
        self.tls: ssl.SSLContext | None = client_context(config.tls) if use_tls else None
        settings: MqttSettings = config.settings
        self.topic = settings.topic.format(vehicle_id=vehicle_id)
        self.status_topic = settings.status_topic.format(vehicle_id=vehicle_id)
        self.schema_topic = settings.schema_topic.format(vehicle_id=vehicle_id)
        self._client: aiomqtt.Client | None = None
        # Resolved with the reason when the connection is lost; see _watch.
        self._lost: asyncio.Future[str] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.vehicle_id,
            protocol=ProtocolVersion.V5,
            will=Will(self.status_topic, b"offline", qos=1, retain=True),
            keepalive=self.config.keepalive_s,
            timeout=self.config.ack_timeout_s,
            tls_context=self.tls,
            max_inflight_messages=self.config.window,
        )
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as error:
            raise UplinkError(f"cannot connect to {self.config.url}: {error}") from None
        self._client = client
        self._lost = asyncio.get_running_loop().create_future()
        self._watcher = asyncio.create_task(self._watch(client, self._lost))
        await self._publish(self.status_topic, b"online", retain=True)

    @staticmethod
    async def _watch(client: aiomqtt.Client, lost: asyncio.Future[str]) -> None:
        """Resolves `lost` when the connection ends. When paho drops a link (no PINGRESP
        within the keepalive, or the broker closed it), aiomqtt ends the message iterator
        with an error, but leaves each publish waiting for its PUBACK until its own timeout:
        with a full window of them and no new publish to fail, a half-open link would be
        noticed only after `ack_timeout_s`, not within the keepalive."""
        reason = "the connection ended"
        try:
            # Nothing is subscribed, so no message comes: this returns only with the link.
            async for _ in client.messages:
                pass
        except aiomqtt.MqttError as error:
            reason = f"connection lost: {error.__cause__ or error}"
        if not lost.done():
            lost.set_result(reason)

    async def announce(self, schema_id: bytes, announcement: bytes) -> None:
        await self._publish(f"{self.schema_topic}/{schema_id.hex()}", announcement, retain=True)

    async def send(self, batch: WireBatch) -> None:
        await self._publish(self.topic, batch.payload)

    async def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        client, lost = self._client, self._lost
        if client is None or lost is None:
            raise UplinkError("not connected")
        # Until the PUBACK comes, or the link is lost: whichever is first.
        publish = asyncio.ensure_future(
            client.publish(topic, payload, qos=1, retain=retain, timeout=self.config.ack_timeout_s)
        )
        try:
            either: list[asyncio.Future[Any]] = [publish, lost]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not publish.done():
                raise UplinkError(f"{self.config.url}: {lost.result()}")
            publish.result()
        except aiomqtt.MqttError as error:
            raise UplinkError(f"{self.config.url}: {error}") from None
        finally:
            if not publish.done():
                publish.cancel()

    async def close(self) -> None:
        client, self._client = self._client, None
        watcher, self._watcher = self._watcher, None
        self._lost = None
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if client is None:
            return
        with contextlib.suppress(Exception):
            # A clean stop: say so, since the broker sends the will only on a lost link.
            await client.publish(self.status_topic, b"offline", qos=1, retain=True, timeout=2)
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)
