"""The vehicle's control link: a connection of its own that takes the campaigns for the
vehicle and its groups, sends the vehicle's check-in on connect and on each change,
answers snapshot requests and sends health reports. Apart from the uplink: the control
plane works with any uplink, and a spool draining never delays a campaign.

Over MQTT (client id `{vehicle}/control`) on the topics of docs/campaigns.md:
`vehicles/{vehicle}/campaigns/{name}`, `groups/{group}/campaigns/{name}`, the retained
check-in `vehicles/{vehicle}/checkin`, `vehicles/{vehicle}/snapshot/request` and
`.../answer`, `vehicles/{vehicle}/health`. Over gRPC, the same documents on the
`Telemetry.Control` call (proto/telemetry.proto). What the link does with them is one
code; a session of either kind only moves them (`_Out`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol

import aiomqtt
from aiomqtt import ProtocolVersion

from agent import __version__
from agent.campaigns.manager import Campaigns, utc
from agent.config import URL_SCHEMES, TlsConfig, split_url
from agent.health import HEALTH_TOPIC, Health
from agent.tls import client_context, grpc_channel
from agent.wire import telemetry_pb2 as pb
from agent.wire.transport import CONTROL_METHOD, channel_options

if TYPE_CHECKING:
    from grpc import aio

log = logging.getLogger(__name__)

VEHICLE_TOPIC = "vehicles/{vehicle}/campaigns/{name}"
GROUP_TOPIC = "groups/{group}/campaigns/{name}"
CHECKIN_TOPIC = "vehicles/{vehicle}/checkin"
#: A snapshot's request (`{"id": ..., "signals": [...]}`) and its answer, not retained.
SNAPSHOT_REQUEST = "vehicles/{vehicle}/snapshot/request"
SNAPSHOT_ANSWER = "vehicles/{vehicle}/snapshot/answer"
#: A DBC file a campaign needs, retained under its SHA-256 (hex): sent once for the fleet.
DBC_TOPIC = "dbc/{hash}"
#: Between two attempts to reach the broker: doubled from the first up to the last.
RETRY_S = (0.2, 10.0)


def _matches(pattern: str, topic: str) -> bool:
    """Whether a topic matches a filter whose wildcard is a whole last `+` level."""
    head, _, last = pattern.rpartition("/")
    if last != "+":
        return pattern == topic
    return topic.startswith(head + "/") and "/" not in topic[len(head) + 1 :]


def _unimplemented(error: Exception) -> bool:
    """Whether a gRPC call failed for the server's want of the method."""
    code = getattr(error, "code", None)
    return callable(code) and getattr(code(), "name", "") == "UNIMPLEMENTED"


def checkin_topic(vehicle: str) -> str:
    return CHECKIN_TOPIC.format(vehicle=vehicle)


class _Out(Protocol):
    """What a session sends up; raises one of the link's `lost` errors when it cannot."""

    async def checkin(self, payload: bytes) -> None: ...
    async def answer(self, payload: bytes) -> None: ...
    async def health(self, payload: bytes) -> None: ...
    async def want_dbc(self, hashes: set[str]) -> None:
        """Ask for the DBC files that waiting campaigns need (all of them, each time)."""


class _MqttOut:
    def __init__(self, client: aiomqtt.Client, vehicle: str) -> None:
        self.client = client
        self.topics = (
            checkin_topic(vehicle),
            SNAPSHOT_ANSWER.format(vehicle=vehicle),
            HEALTH_TOPIC.format(vehicle=vehicle),
        )
        self.subscribed: set[str] = set()

    async def want_dbc(self, hashes: set[str]) -> None:
        """Subscribe to each file's retained topic, once per session."""
        for digest in sorted(hashes - self.subscribed):
            await self.client.subscribe(DBC_TOPIC.format(hash=digest), qos=1)
            self.subscribed.add(digest)

    async def checkin(self, payload: bytes) -> None:
        await self.client.publish(self.topics[0], payload, qos=1, retain=True)

    async def answer(self, payload: bytes) -> None:
        await self.client.publish(self.topics[1], payload, qos=1)

    async def health(self, payload: bytes) -> None:
        await self.client.publish(self.topics[2], payload, qos=1)


class _GrpcOut:
    """Up the Control call, one message at a time. A call that ended takes no more, and
    says nothing of why: its reader gets the call's status and ends the session, and the
    next session checks in anew."""

    def __init__(self, call: aio.StreamStreamCall[pb.ControlUp, pb.ControlDown]) -> None:
        from grpc import aio

        self.call = call
        self.wanted: set[str] = set()
        self._writing = asyncio.Lock()  # the call takes one write at a time
        self._ended = (asyncio.InvalidStateError, aio.AioRpcError)

    async def send(self, message: pb.ControlUp) -> None:
        async with self._writing:
            with contextlib.suppress(*self._ended):
                await self.call.write(message)

    async def want_dbc(self, hashes: set[str]) -> None:
        if hashes != self.wanted:
            self.wanted = set(hashes)
            await self.send(pb.ControlUp(dbc_wanted=pb.DbcWanted(sha256=sorted(hashes))))

    async def checkin(self, payload: bytes) -> None:
        await self.send(pb.ControlUp(checkin=payload))

    async def answer(self, payload: bytes) -> None:
        await self.send(pb.ControlUp(snapshot_answer=payload))

    async def health(self, payload: bytes) -> None:
        await self.send(pb.ControlUp(health=payload))


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
        dbc: dict[str, list[str]] | None = None,
    ) -> None:
        """`apply`: called when the rules to run changed (campaigns.rules()); `snapshot`:
        the last values of the signals named (none: all); `health`: reports to send at
        its interval; `dbc`: each bus's DBC files' SHA-256, for the check-ins. Campaigns
        without keys take no campaign topics."""
        self.campaigns = campaigns
        self.vehicle = vehicle
        self.over_grpc = url.split("://")[0] in URL_SCHEMES["grpc"]
        schemes = URL_SCHEMES["grpc" if self.over_grpc else "mqtt"]
        self.host, self.port, self.use_tls = split_url(url, schemes)
        self.use_tls = self.use_tls or tls is not None
        self.tls_files = tls
        self.tls: ssl.SSLContext | None = None
        if self.use_tls and not self.over_grpc:
            self.tls = client_context(tls)
        #: What ends a session: grpc is loaded only for a link over gRPC.
        self.lost: tuple[type[Exception], ...] = (aiomqtt.MqttError,)
        if self.over_grpc:
            from grpc import aio

            self.lost = (aio.AioRpcError,)
        self.groups = groups
        self.filters: list[str] = []
        if campaigns.keys:
            self.filters = [VEHICLE_TOPIC.format(vehicle=vehicle, name="+")] + [
                GROUP_TOPIC.format(group=g, name="+") for g in groups
            ]
        self.health = health
        self.dbc = dbc or {}
        self.apply = apply
        self.snapshot = snapshot
        self.request_topic = SNAPSHOT_REQUEST.format(vehicle=vehicle)
        if snapshot is not None:
            self.filters.append(self.request_topic)
        self.keepalive_s = keepalive_s
        self.connected = False
        self.no_control = False  # the gRPC server said it has no Control call
        self._changed = asyncio.Event()  # a check-in to publish
        self._applied = campaigns.rules()  # what the agent runs

    def checkin(self) -> bytes:
        return json.dumps(
            {
                "vehicle": self.vehicle,
                "agent_version": __version__,
                "time": utc(time.time()),
                "campaigns": self.campaigns.checkin(),
                "dbc": self.dbc,
            },
            sort_keys=True,
        ).encode()

    def _update(self, changed: bool) -> None:
        """After an offer or a tick: report a change, and apply the rules if they changed
        (a refusal changes the report only, and the running rules keep their windows)."""
        if not changed:
            return
        rules = self.campaigns.rules()
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
                await (self._grpc_session() if self.over_grpc else self._session())
            except self.lost as error:
                if _unimplemented(error):
                    # A receiver older than the agent: said once, and asked again as the
                    # wait grows to its longest (it may be upgraded), never in a tight loop.
                    if not self.no_control:
                        log.warning(
                            "control link %s:%d: the server has no Telemetry.Control call "
                            "(a receiver older than this agent?): %s",
                            self.host,
                            self.port,
                            error,
                        )
                    self.no_control = True
                elif self.connected:
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
            async with self._sending(_MqttOut(client, self.vehicle)) as out:
                async for message in client.messages:
                    payload = message.payload
                    if not isinstance(payload, bytes | bytearray):
                        continue
                    topic = str(message.topic)
                    if topic == self.request_topic:
                        await out.answer(self._answer(bytes(payload)))
                    elif topic.startswith("dbc/"):
                        digest = topic.removeprefix("dbc/")
                        self._update(self.campaigns.add_dbc(digest, bytes(payload)))
                    else:
                        self._update(self.campaigns.offer(topic, bytes(payload)))
                    await out.want_dbc(self.campaigns.needed_dbc())

    async def _grpc_session(self) -> None:
        """The cloud's `Telemetry.Control` call (proto/telemetry.proto): campaigns and
        snapshot requests come down it, the rest goes up."""
        address = f"{self.host}:{self.port}"
        options = channel_options(self.keepalive_s)
        async with grpc_channel(address, self.use_tls, self.tls_files, options) as channel:
            call = channel.stream_stream(
                CONTROL_METHOD,
                request_serializer=pb.ControlUp.SerializeToString,
                response_deserializer=pb.ControlDown.FromString,
            )()
            # The server's answer to the call's opening (the receiver sends its metadata at
            # once) before anything is written: a server without Control refuses the call
            # then, and a write would hide its status behind its own failure.
            await call.initial_metadata()
            if call.done():
                await call.wait_for_connection()  # raises with the call's status
            out = _GrpcOut(call)
            hello = pb.CampaignsRequest(vehicle_id=self.vehicle, groups=list(self.groups))
            await out.send(pb.ControlUp(hello=hello))
            self.connected = True
            log.info("control link grpc %s connected", address)
            async with self._sending(out):
                async for down in call:
                    kind = down.WhichOneof("message")
                    if kind == "snapshot_request" and self.snapshot is not None:
                        await out.answer(self._answer(down.snapshot_request))
                    elif kind == "dbc":
                        self._update(self.campaigns.add_dbc(down.dbc.sha256, down.dbc.data))
                    elif kind == "campaign" and self.campaigns.keys:  # none: health alone
                        topic = down.campaign.topic
                        if any(_matches(f, topic) for f in self.filters):
                            self._update(self.campaigns.offer(topic, down.campaign.document))
                        else:
                            log.warning("campaign on %s ignored: not for this vehicle", topic)
                    await out.want_dbc(self.campaigns.needed_dbc())

    @asynccontextmanager
    async def _sending(self, out: _Out) -> AsyncIterator[_Out]:
        """A session's asks for the DBC files waited for, its check-ins (one at once: on
        every connect) and its health reports."""
        await out.want_dbc(self.campaigns.needed_dbc())
        self._changed.set()
        publisher = asyncio.create_task(self._publish_checkins(out))
        reporter = asyncio.create_task(self._report_health(out))
        try:
            yield out
        finally:
            publisher.cancel()
            reporter.cancel()
            await asyncio.gather(publisher, reporter, return_exceptions=True)

    def _answer(self, payload: bytes) -> bytes:
        """A snapshot request's answer: the last values, now."""
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
        return json.dumps(answer).encode()

    async def _report_health(self, out: _Out) -> None:
        """A health report at once on connect, then at each interval while connected."""
        health = self.health
        if health is None or not health.interval_s:
            return
        while True:
            try:
                await out.health(health.report())
            except self.lost as error:
                log.warning("health report not published: %s", error)
            await asyncio.sleep(health.interval_s)

    async def _publish_checkins(self, out: _Out) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await out.checkin(self.checkin())
            except self.lost as error:
                # The link is going (the session's loop notices) or the broker is slow:
                # the check-in goes again, with what is true by then.
                log.warning("check-in not published: %s", error)
                self._changed.set()
                await asyncio.sleep(RETRY_S[0])
