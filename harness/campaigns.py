"""What the campaign tests and the campaign benchmark share: a signing key, signed documents,
agent configs with campaigns on, and a watcher of check-ins on a real broker."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.campaigns.document import check_document, public_key_text, sign
from agent.campaigns.link import GROUP_TOPIC, VEHICLE_TOPIC, checkin_topic
from agent.config import demo_dbc


def signed(key: Ed25519PrivateKey, name: str, version: int = 1, **fields: Any) -> bytes:
    """A campaign of the demo DBC's Speed, every 100 ms, signed by `key`; `fields` add to
    or replace the document's."""
    document: dict[str, Any] = {
        "kind": "campaign",
        "name": name,
        "version": version,
        "collect": [{"name": "fast", "mode": "sample", "signals": ["Speed"], "period_ms": 100}],
    }
    document.update(fields)
    return sign(check_document(document), key)


SIMULATED_BUS = f'[[bus]]\nname = "can0"\nsource = "simulate"\ndbc = ["{demo_dbc()}"]\n'


def agent_config(
    folder: Path,
    vehicle: str,
    broker_url: str,
    keys: list[Ed25519PrivateKey],
    *,
    uplink: str | None = None,
    groups: tuple[str, ...] = (),
    rules: str = '[[collect]]\nname = "base"\nmode = "sample"\nsignals = ["Odometer"]\n'
    "period_ms = 500\n",
    extra: str = "",
    bus: str | None = None,
    max_age_ms: int = 200,
    max_bytes: int = 120_000,
    metrics: str = "",
) -> Path:
    """An agent on the demo DBC's simulated bus in real time (or `bus`), campaigns on;
    batches over MQTT (or `uplink`), closed every `max_age_ms` or at `max_bytes`; metrics
    served on `metrics` (none: "")."""
    key_list = ", ".join(f'"{public_key_text(k.public_key())}"' for k in keys)
    uplink = uplink or f'[uplink]\nkind = "mqtt"\nurl = "{broker_url}"\n'
    config = folder / f"{vehicle}.toml"
    config.write_text(
        f'vehicle_id = "{vehicle}"\nstate_dir = "{folder / vehicle}"\n'
        f"{bus or SIMULATED_BUS}"
        f"{uplink}\n[batch]\nmax_age_ms = {max_age_ms}\nmax_bytes = {max_bytes}\n"
        f'[metrics]\nlisten = "{metrics}"\n'
        f"[campaigns]\nkeys = [{key_list}]\ngroups = {json.dumps(list(groups))}\n"
        f'url = "{broker_url}"\n{extra}\n{rules}'
    )
    return config


def client(url: str) -> aiomqtt.Client:
    host, _, port = url.removeprefix("mqtt://").partition(":")
    return aiomqtt.Client(host, int(port), protocol=aiomqtt.ProtocolVersion.V5)


async def publish(url: str, messages: Mapping[str, bytes]) -> None:
    async with client(url) as mqtt:
        for topic, payload in messages.items():
            await mqtt.publish(topic, payload, qos=1, retain=True)


def to_vehicle(vehicle: str, name: str) -> str:
    return VEHICLE_TOPIC.format(vehicle=vehicle, name=name)


def to_group(group: str, name: str) -> str:
    return GROUP_TOPIC.format(group=group, name=name)


def campaign_of(checkin: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for campaign in checkin.get("campaigns", []):
        if campaign["name"] == name:
            return dict(campaign)
    return None


async def wait_checkins(
    url: str,
    vehicles: list[str],
    done: Callable[[Mapping[str, Any]], bool],
    timeout: float = 20,
) -> dict[str, tuple[float, dict[str, Any]]]:
    """For each vehicle, the first check-in for which `done` holds, and when it came
    (time.monotonic()); TimeoutError naming the vehicles still waited for."""
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    last: dict[str, Any] = {}
    async with client(url) as mqtt:
        await mqtt.subscribe(checkin_topic("+"), qos=1)
        deadline = time.monotonic() + timeout
        while len(found) < len(vehicles):
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(anext(mqtt.messages), max(left, 0.01))
            except TimeoutError:
                waiting = sorted(set(vehicles) - set(found))
                raise TimeoutError(
                    f"no such check-in from {waiting[:5]}; last: {last.get(waiting[0])}"
                ) from None
            checkin = json.loads(bytes(message.payload))
            vehicle = checkin["vehicle"]
            last[vehicle] = checkin
            if vehicle in vehicles and vehicle not in found and done(checkin):
                found[vehicle] = (time.monotonic(), checkin)
    return found


def state_is(name: str, *states: str) -> Callable[[Mapping[str, Any]], bool]:
    def done(checkin: Mapping[str, Any]) -> bool:
        campaign = campaign_of(checkin, name)
        return campaign is not None and campaign["state"] in states

    return done
