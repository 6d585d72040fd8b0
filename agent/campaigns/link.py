"""The vehicle's control link: an MQTT connection of its own (client id `{vehicle}/control`)
that takes the campaigns retained for the vehicle and its groups, publishes the vehicle's
check-in, retained, on connect and on each change, and answers snapshot requests. Apart
from the uplink: the control plane works with any uplink, and a spool draining never
delays a campaign.

Topics (docs/campaigns.md): `vehicles/{vehicle}/campaigns/{name}`,
`groups/{group}/campaigns/{name}`, the check-in `vehicles/{vehicle}/checkin`, and
`vehicles/{vehicle}/snapshot/request` and `.../answer`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
from aiomqtt import ProtocolVersion

from agent import __version__
from agent.campaigns.manager import Campaigns, utc
from agent.collect.rules import rules_key
from agent.config import URL_SCHEMES, TlsConfig, split_url
from agent.health import Health
from agent.tls import client_context

log = logging.getLogger(__name__)

VEHICLE_TOPIC = "vehicles/{vehicle}/campaigns/{name}"
GROUP_TOPIC = "groups/{group}/campaigns/{name}"
CHECKIN_TOPIC = "vehicles/{vehicle}/checkin"
#: A snapshot's request (`{"id": ..., "signals": [...]}`) and its answer, not retained.
SNAPSHOT_REQUEST = "vehicles/{vehicle}/snapshot/request"
SNAPSHOT_ANSWER = "vehicles/{vehicle}/snapshot/answer"
#: Between two attempts to reach the broker: doubled from the first up to the last.
RETRY_S = (0.2, 10.0)


def checkin_topic(vehicle: str) -> str:
    return CHECKIN_TOPIC.format(vehicle=vehicle)


class ControlLink:
    """Keeps `campaigns` in step with what the cloud retains, and the cloud told."""

    def __init__(
        self,
        campaigns: Campaigns,
        vehicle: str,
        url: str,
        tls: TlsConfig | None,
        groups: tuple[str, ...],
        apply: Callable[[], None],
        keepalive_s: int = 30,
        snapshot: Callable[[list[str]], list[dict[str, Any]]] | None = None,
        health: Health | None = None,
    ) -> None:
        """`apply`: called when the rules to run changed (campaigns.rules()); `snapshot`:
        the last values of the signals named (none: all); `health`: reports to send at
        its interval. Campaigns without keys take no campaign topics."""
        self.campaigns = campaigns
        self.vehicle = vehicle
        self.host, self.port, use_tls = split_url(url, URL_SCHEMES["mqtt"])
        self.tls: ssl.SSLContext | None = client_context(tls) if use_tls or tls else None
        self.filters: list[str] = []
        if campaigns.keys:
            self.filters = [VEHICLE_TOPIC.format(vehicle=vehicle, name="+")] + [
                GROUP_TOPIC.format(group=g, name="+") for g in groups
            ]
        self.health = health
        self.apply = apply
        self.snapshot = snapshot
        self.request_topic = SNAPSHOT_REQUEST.format(vehicle=vehicle)
        if snapshot is not None:
            self.filters.append(self.request_topic)
        self.keepalive_s = keepalive_s
        self.connected = False
        self._client: aiomqtt.Client | None = None
        self._changed = asyncio.Event()  # a check-in to publish
        self._applied = rules_key(campaigns.rules())  # what the agent runs

    def checkin(self) -> bytes:
        return json.dumps(
            {
                "vehicle": self.vehicle,
                "agent_version": __version__,
                "time": utc(time.time()),
                "campaigns": self.campaigns.checkin(),
            },
            sort_keys=True,
        ).encode()

    def _update(self, changed: bool) -> None:
        """After an offer or a tick: report a change, and apply the rules if they changed
        (a refusal changes the report only, and the running rules keep their windows)."""
        if not changed:
            return
        rules = rules_key(self.campaigns.rules())
        if rules != self._applied:
            self._applied = rules
            self.apply()
        self._changed.set()

    async def run(self) -> None:
        """The clock and the link, until cancelled."""
        clock = asyncio.create_task(self._clock(), name="campaign-clock")
        try:
            await self._connect_forever()
        finally:
            clock.cancel()
            await asyncio.gather(clock, return_exceptions=True)

    async def _clock(self) -> None:
        """Starts and expiries as the agent's clock reaches them (checked at least every
        10 s, so a clock set forward is noticed too)."""
        while True:
            at = self.campaigns.next_change()
            wait = 10.0 if at is None else min(10.0, max(0.0, at - time.time()) + 0.001)
            await asyncio.sleep(wait)
            self._update(self.campaigns.tick())

    async def _connect_forever(self) -> None:
        delay = RETRY_S[0]
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as error:
                if self.connected:
                    log.warning("control link %s:%d lost: %s", self.host, self.port, error)
                    delay = RETRY_S[0]
                else:
                    log.debug("control link %s:%d: %s", self.host, self.port, error)
            self.connected = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_S[1])

    async def _session(self) -> None:
        async with aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"{self.vehicle}/control",
            protocol=ProtocolVersion.V5,
            keepalive=self.keepalive_s,
            tls_context=self.tls,
        ) as client:
            self.connected = True
            log.info("control link %s:%d connected", self.host, self.port)
            for topic in self.filters:
                await client.subscribe(topic, qos=1)
            self._changed.set()  # a check-in on every connect
            publisher = asyncio.create_task(self._publish_checkins(client))
            reporter = asyncio.create_task(self._report_health(client))
            try:
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    if str(message.topic) == self.request_topic:
                        await self._answer(client, bytes(payload))
                    else:
                        self._update(self.campaigns.offer(str(message.topic), bytes(payload)))
            finally:
                publisher.cancel()
                reporter.cancel()
                await asyncio.gather(publisher, reporter, return_exceptions=True)

    async def _answer(self, client: aiomqtt.Client, payload: bytes) -> None:
        """A snapshot request: the last values, at once, on the answer topic."""
        assert self.snapshot is not None
        try:
            request = json.loads(payload)
            signals = request.get("signals") or []
            if not isinstance(signals, list) or not all(isinstance(s, str) for s in signals):
                raise ValueError("signals: expected a list of names")
            answer: dict[str, Any] = {"signals": self.snapshot(signals)}
        except (ValueError, AttributeError) as error:
            request, answer = {}, {"error": f"not a snapshot request: {error}"}
        answer |= {"id": request.get("id"), "vehicle": self.vehicle, "time": utc(time.time())}
        topic = SNAPSHOT_ANSWER.format(vehicle=self.vehicle)
        await client.publish(topic, json.dumps(answer).encode(), qos=1)

    async def _report_health(self, client: aiomqtt.Client) -> None:
        """A health report at once on connect, then at each interval while connected."""
        health = self.health
        if health is None or not health.interval_s:
            return
        while True:
            try:
                await client.publish(health.topic, health.report(), qos=1)
            except aiomqtt.MqttError as error:
                log.warning("health report not published: %s", error)
            await asyncio.sleep(health.interval_s)

    async def _publish_checkins(self, client: aiomqtt.Client) -> None:
        topic = checkin_topic(self.vehicle)
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await client.publish(topic, self.checkin(), qos=1, retain=True)
            except aiomqtt.MqttError as error:
                # The link is going (the session's loop notices) or the broker is slow:
                # the check-in goes again, with what is true by then.
                log.warning("check-in not published: %s", error)
                self._changed.set()
                await asyncio.sleep(RETRY_S[0])
