"""Snapshots: the last decoded value of each signal, against a loop over every value of a
real log (multiplexed signals among them), and asked of a running agent over mosquitto."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.decode import ALL_BUSES, Decoder, default_cache_dir
from agent.logs import open_log
from agent.snapshot import LastValues
from agent.wire.snapshot import named
from harness.campaigns import agent_config, wait_checkins
from harness.data import TESLA_DBC, TESLA_LOG
from harness.services import agent_command, broker
from tests.test_campaigns import Agent


def test_the_last_values_are_those_of_the_last_frames_that_carried_each_signal() -> None:
    decoder = Decoder({ALL_BUSES: [str(TESLA_DBC)]}, cache_dir=default_cache_dir())
    last = LastValues()
    expected: dict[str, tuple[int, Any]] = {}
    partial = 0  # signals absent from some frames of a block: multiplexed, or cut short
    for batch in open_log(TESLA_LOG).batches(500):
        decoded = decoder.decode(batch)
        last.update("can0", decoded)
        # The oracle: every value, one at a time, the latest kept.
        for block in decoded.blocks:
            times = block.t_ns.tolist()
            for column in block.signals:
                partial += column.present is not None
                values = column.physical().tolist()
                for row, (t, value) in enumerate(zip(times, values, strict=True)):
                    if column.present is not None and not column.present[row]:
                        continue
                    name = f"{block.message.name}.{column.name}"
                    if name not in expected or t >= expected[name][0]:
                        expected[name] = (t, value)
    found = {f"{s['message']}.{s['signal']}": (s["t"], s["value"]) for s in last.snapshot([])}
    assert found.keys() == expected.keys()
    for name, (t, value) in expected.items():
        assert found[name][0] == t / 1e9, name
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        assert found[name][1] == value, name
    assert len(found) > 40 and partial > 0
    some = next(iter(expected)).split(".")
    chosen = last.snapshot([some[1], f"{some[0]}.*"])
    assert {s["message"] for s in chosen} >= {some[0]}
    assert last.snapshot(["NoSuchSignal"]) == []


@pytest.mark.parametrize("signals", [["Speed"], []])
def test_a_running_agent_answers_a_snapshot_now(tmp_path: Path, signals: list[str]) -> None:
    key = Ed25519PrivateKey.generate()
    with broker(tmp_path) as mqtt:

        def ask() -> tuple[float, dict[str, Any]]:
            asked = time.time()
            result = subprocess.run(
                agent_command(
                    "snapshot", "--vehicle", "v5", "--mqtt", mqtt.url, "--json", *signals
                ),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            return asked, json.loads(result.stdout)

        agent = Agent(agent_config(tmp_path, "v5", mqtt.url, [key]))
        try:
            asyncio.run(wait_checkins(mqtt.url, ["v5"], lambda c: True))
            asked, answer = ask()
            deadline = time.monotonic() + 30
            while not answer["signals"] and time.monotonic() < deadline:  # none decoded yet
                asked, answer = ask()
        finally:
            agent.stop()
    names = {s["signal"] for s in answer["signals"]}
    if signals:
        assert names == {"Speed"}
    else:
        assert {"Speed", "Odometer", "EngineSpeed", "PackVoltage"} <= names
    speed = next(s for s in answer["signals"] if s["signal"] == "Speed")
    assert speed["unit"] == "km/h" and 0 <= speed["value"] <= 300
    # The value is from the last decoded batch: a batch's age (200 ms) old, and its way.
    assert asked - 10.0 < speed["t"] <= time.time()


@pytest.mark.parametrize(
    ("patterns", "message", "signal", "expected"),
    [
        ([], "VehicleSpeed", "Speed", True),
        (["Speed"], "VehicleSpeed", "Speed", True),
        (["VehicleSpeed.Speed"], "VehicleSpeed", "Speed", True),
        (["Other.Speed"], "VehicleSpeed", "Speed", False),
        (["Spe*"], "VehicleSpeed", "Speed", True),
        # A window statistic: its signal's name has a dot.
        (["Speed.mean"], "VehicleSpeed", "Speed.mean", True),
        (["*.mean"], "VehicleSpeed", "Speed.mean", True),
        (["VehicleSpeed.Speed.*"], "VehicleSpeed", "Speed.max", True),
        (["Speed"], "VehicleSpeed", "Speed.mean", False),
    ],
)
def test_a_snapshots_patterns_name_signals_and_window_statistics(
    patterns: list[str], message: str, signal: str, expected: bool
) -> None:
    assert named(patterns, message, signal) is expected


def test_a_snapshot_from_a_database_that_does_not_answer_ends_at_its_timeout() -> None:
    # A socket that listens but never answers: the command must give up, not hang.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
        result = subprocess.run(
            agent_command("snapshot", "--vehicle", "v1", "--postgres", url, "--timeout", "1"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert "telemetry-agent snapshot: PostgreSQL:" in result.stderr
