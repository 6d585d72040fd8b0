"""Health reports: the agent's metrics and its warning lines, on their own topic, at the
interval of its config, over a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.health import HEALTH_TOPIC
from harness.campaigns import agent_config, client, publish, signed, to_vehicle
from harness.services import agent_command, broker
from tests.test_campaigns import Agent, tampered


async def reports(
    url: str, vehicle: str, count: int, after_two: dict[str, bytes], timeout: float = 15
) -> list[dict[str, Any]]:
    """`count` health reports in a row; after the second, `after_two` is published."""
    found: list[dict[str, Any]] = []
    async with client(url) as mqtt:
        await mqtt.subscribe(HEALTH_TOPIC.format(vehicle=vehicle), qos=1)
        async with asyncio.timeout(timeout):
            async for message in mqtt.messages:
                found.append(json.loads(bytes(message.payload)))
                if len(found) == 2:
                    await publish(url, after_two)
                if len(found) == count:
                    break
    return found


async def test_health_reports_carry_the_metrics_and_the_warnings(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    with broker(tmp_path) as mqtt:
        config = agent_config(tmp_path, "v6", mqtt.url, [key], extra="[health]\ninterval_s = 0.5\n")
        agent = Agent(config)
        try:
            bad = {to_vehicle("v6", "c"): tampered(signed(key, "c"))}
            first, second, *later = await reports(mqtt.url, "v6", 5, bad)
        finally:
            agent.stop()
    frames = 'telemetry_agent_frames_received_total{bus="can0"}'
    assert first["metrics"][frames] < second["metrics"][frames]
    assert first["vehicle"] == "v6" and first["log_dropped"] == 0
    lines = [line for report in later for line in report["log"]]
    assert any(
        line["level"] == "warning" and "campaign c refused: bad signature" in line["message"]
        for line in lines
    ), lines
    # Each line goes up once: the next report starts empty.
    assert sum("campaign c refused" in line["message"] for line in lines) == 1


def test_the_health_command_prints_the_reports_as_they_come(tmp_path: Path) -> None:
    """`telemetry-agent health --mqtt` (`--grpc`: tests/test_campaigns.py)."""
    key = Ed25519PrivateKey.generate()
    with broker(tmp_path) as mqtt:
        config = agent_config(tmp_path, "v4", mqtt.url, [key], extra="[health]\ninterval_s = 0.5\n")
        agent = Agent(config)
        try:
            command = ["health", "--mqtt", mqtt.url, "--vehicle", "v4", "--count", "2"]
            result = subprocess.run(
                agent_command(*command, "--timeout", "20"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            agent.stop()
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["vehicle"] for r in reports] == ["v4", "v4"]
    assert reports[0]["time"] < reports[1]["time"]
