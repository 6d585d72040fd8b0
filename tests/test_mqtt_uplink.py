"""What the MQTT uplink promises beyond delivery: the retained status and schema topics, and
shared subscriptions that split one fleet's traffic between receivers."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import aiomqtt

from harness import REPO
from harness.outputs import records
from harness.services import ReceiverProcess, agent_command, broker, run_agent
from tests.test_agent_end_to_end import decoded, write_config

DEMO_DBC = REPO / "dbc" / "demo.dbc"


async def retained(url_port: int, topic: str) -> dict[str, bytes]:
    """The retained messages on a topic filter, by topic."""
    found: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", url_port) as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(1.0):
                async for message in client.messages:
                    if isinstance(message.payload, bytes):
                        found[str(message.topic)] = message.payload
        except TimeoutError:
            pass
    return found


async def test_status_is_online_while_connected_and_offline_after(tmp_path: Path) -> None:
    with broker(tmp_path) as mqtt:
        seen: list[bytes] = []
        async with aiomqtt.Client("127.0.0.1", mqtt.port) as client:
            await client.subscribe("vehicles/test-tesla/status", qos=1)
            config = write_config(
                tmp_path, "tesla", f'[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\n'
            )
            agent = await asyncio.create_subprocess_exec(
                *agent_command("run", "--config", config),
                cwd=REPO,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                async with asyncio.timeout(60):
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        seen.append(message.payload)
                        if message.payload == b"offline":
                            break
            finally:
                assert await agent.wait() == 0
        assert seen == [b"online", b"offline"]
        status = await retained(mqtt.port, "vehicles/+/status")
        assert status == {"vehicles/test-tesla/status": b"offline"}
        schemas = await retained(mqtt.port, "vehicles/+/schema/+")
        assert len(schemas) == 1
        assert next(iter(schemas)).startswith("vehicles/test-tesla/schema/")


def test_a_receiver_that_comes_later_gets_the_retained_schema(tmp_path: Path) -> None:
    with broker(tmp_path) as mqtt:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'vehicle_id = "late"\nstate_dir = "{tmp_path}"\n'
            f'[[bus]]\nname = "can0"\nsource = "simulate"\npace = "realtime"\nduration_s = 6\n'
            f'dbc = ["{DEMO_DBC}"]\n'
            f'[batch]\nmax_age_ms = 500\n[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\n'
            f'[metrics]\nlisten = ""\n'
        )
        agent = subprocess.Popen(
            agent_command("run", "--config", str(config)),
            cwd=REPO,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(3)  # the agent has announced its schema and sent batches
        receiver = ReceiverProcess(tmp_path / "late.jsonl", "--mqtt", mqtt.url, "--idle-exit", "2")
        assert agent.wait(60) == 0
        summary = receiver.finish()
    assert "0 rejected" in summary, summary
    assert "1 schemas" in summary
    assert len(records(tmp_path / "late.jsonl")) > 0


def test_shared_subscriptions_split_the_batches_between_receivers(tmp_path: Path) -> None:
    with broker(tmp_path) as mqtt:
        receivers = [
            ReceiverProcess(
                tmp_path / f"received-{k}.jsonl",
                "--mqtt",
                mqtt.url,
                "--share",
                "ingest",
                "--idle-exit",
                "3",
            )
            for k in range(2)
        ]
        for receiver in receivers:
            receiver.wait_ready("subscribed to")
        config = write_config(tmp_path, "rav4", f'[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\n')
        result = run_agent(config)
        assert result.returncode == 0, result.stderr
        summaries = [receiver.finish() for receiver in receivers]
    parts = [records(receiver.output) for receiver in receivers]
    assert all(parts), summaries  # each receiver got some of the batches
    joined = sorted(parts[0] + parts[1], key=lambda r: str(sorted(r.items())))
    expected = sorted(decoded(tmp_path, "rav4"), key=lambda r: str(sorted(r.items())))
    assert joined == expected  # together, everything, once
