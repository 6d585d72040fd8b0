"""`kind = "mqtt"`: QoS 1 publishes over MQTT 5 (aiomqtt); the PUBACK is the acknowledgement.

The client id is the vehicle id, and a retained status topic says `online` while the agent
is connected and `offline` (the will, or on a clean stop) otherwise. Schema announcements
are retained on `{schema_topic}/{schema id in hex}`, so a receiver that comes later has them.
"""

from __future__ import annotations

import contextlib
import ssl

import aiomqtt
from aiomqtt import ProtocolVersion, Will

from agent.config import URL_SCHEMES, UplinkConfig, split_url
from agent.uplinks.base import Uplink, UplinkError, register
from agent.uplinks.tls import client_context
from agent.wire import WireBatch


@register
class MqttUplink(Uplink):
    kind = "mqtt"

    def __init__(self, config: UplinkConfig, vehicle_id: str) -> None:
        super().__init__(config, vehicle_id)
        self.host, self.port, use_tls = split_url(config.url, URL_SCHEMES["mqtt"])
        use_tls = use_tls or config.tls is not None
        self.tls: ssl.SSLContext | None = client_context(config.tls) if use_tls else None
        self.topic = config.topic.format(vehicle_id=vehicle_id)
        self.status_topic = config.status_topic.format(vehicle_id=vehicle_id)
        self.schema_topic = config.schema_topic.format(vehicle_id=vehicle_id)
        self._client: aiomqtt.Client | None = None

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
        try:
            await client.publish(self.status_topic, b"online", qos=1, retain=True)
        except aiomqtt.MqttError as error:
            raise UplinkError(f"{self.config.url}: {error}") from None

    async def announce(self, schema_id: bytes, announcement: bytes) -> None:
        await self._publish(f"{self.schema_topic}/{schema_id.hex()}", announcement, retain=True)

    async def send(self, batch: WireBatch) -> None:
        await self._publish(self.topic, batch.payload)

    async def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self._client is None:
            raise UplinkError("not connected")
        try:
            await self._client.publish(
                topic, payload, qos=1, retain=retain, timeout=self.config.ack_timeout_s
            )
        except aiomqtt.MqttError as error:
            raise UplinkError(f"{self.config.url}: {error}") from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            # A clean stop: say so, since the broker sends the will only on a lost link.
            await client.publish(self.status_topic, b"offline", qos=1, retain=True, timeout=2)
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)
