"""Collection mode `faults`: J1939 faults sent when they appear and when they clear, through
the wire and back, on the truck log and on DM1 messages built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.collect import CollectError, Collector
from agent.config import ConfigError, parse_config
from agent.decode import bus_decoders
from agent.logs import open_log
from agent.service import Agent
from harness.data import TRUCK_DBC, TRUCK_LOG
from harness.outputs import outbox_lines
from tests.test_collect import Cloud, config, one_second_batches, run_rules
from tests.test_j1939 import bam, batch_of, reference_dm1, reference_transfers

J1939_BUS = f'dbc = ["{TRUCK_DBC}"]\nj1939 = true'
RULE = '[[collect]]\nname = "faults"\nmode = "faults"\n'
FIELDS = ("SPN", "FMI", "occurrence_count", "active", "malfunction_indicator_lamp")


def received(cloud: Cloud, message: str = "DM1") -> list[tuple[int, ...]]:
    """(t_ns, SPN, FMI, occurrence count, active, MIL) of each record the cloud got."""
    columns = [cloud.values.get(("faults", message, name), []) for name in FIELDS]
    assert len({len(c) for c in columns}) == 1
    return [(points[0][0], *(int(v) for _, v in points)) for points in zip(*columns, strict=True)]


def test_the_truck_log_sends_its_four_faults_once() -> None:
    cfg = config(J1939_BUS, RULE)
    cloud = run_rules(cfg, one_second_batches(open_log(TRUCK_LOG).batches()))
    t, _, _, payload = next(r for r in reference_transfers(TRUCK_LOG) if r[2] == 0xFECA)
    lamps, faults = reference_dm1(payload)
    got = received(cloud)
    assert [g[1:] for g in got] == [(spn, fmi, count, 1, lamps[0]) for spn, fmi, count, _ in faults]
    seconds, fraction = t.split(".")
    t_ns = int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0"))
    assert {g[0] for g in got} == {t_ns}


def dm1(*faults: tuple[int, int, int]) -> bytes:
    """A DM1 payload: MIL on, then each (SPN, FMI, occurrence count)."""
    codes = b"".join(
        bytes([spn & 0xFF, spn >> 8 & 0xFF, (spn >> 16) << 5 | fmi, count])
        for spn, fmi, count in faults
    )
    return bytes([0x40, 0xFF]) + (codes or bytes(4))


def test_faults_are_sent_as_they_appear_and_as_they_clear() -> None:
    cfg = config(J1939_BUS, RULE)
    first = [(0, 0x18FECA00, dm1((100, 3, 1)).ljust(8, b"\xff"))]
    other_sender = [(500, 0x18FECA03, dm1((100, 3, 7)).ljust(8, b"\xff"))]
    two = bam(1000, 0x00, 0xFECA, dm1((100, 3, 2), (200, 4, 1)))
    repeated = bam(1500, 0x00, 0xFECA, dm1((100, 3, 2), (200, 4, 1)))
    gone = [(2000, 0x18FECA00, dm1().ljust(8, b"\xff"))]
    frames = first + other_sender + two + repeated + gone
    batches = [batch_of(frames[:3]), batch_of(frames[3:])]  # a transfer across two batches
    cloud = run_rules(cfg, batches)
    ms = 1_000_000
    end_of_two = two[-1][0] * ms
    assert received(cloud) == [
        (0, 100, 3, 1, 1, 1),
        (500 * ms, 100, 3, 7, 1, 1),
        (end_of_two, 200, 4, 1, 1, 1),
        (2000 * ms, 100, 3, 2, 0, 1),
        (2000 * ms, 200, 4, 1, 0, 1),
    ]


def test_mode_faults_needs_a_j1939_bus_and_takes_no_signals() -> None:
    plain = config(f'dbc = ["{TRUCK_DBC}"]', RULE)
    with pytest.raises(CollectError, match="no bus of can0 is J1939"):
        Collector(plain.collect, bus_decoders(plain.buses))
    with pytest.raises(ConfigError, match="mode faults sends DM1/DM2 faults, not signals"):
        config(J1939_BUS, RULE + 'signals = ["*"]\n')


async def test_the_agent_sends_the_faults_to_the_cloud(tmp_path: Path) -> None:
    text = (
        f'vehicle_id = "truck"\nstate_dir = "{tmp_path}"\n'
        f'[[bus]]\nname = "can1"\nsource = "replay"\npath = "{TRUCK_LOG}"\n{J1939_BUS}\n'
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n[metrics]\nlisten = ""\n'
        f"{RULE}"
    )
    agent = Agent(parse_config(text, "test.toml", tmp_path), status=None)
    assert await agent.run() == 0
    rows = [json.loads(line) for line in outbox_lines(tmp_path / "outbox")]
    _, _, _, payload = next(r for r in reference_transfers(TRUCK_LOG) if r[2] == 0xFECA)
    _, faults = reference_dm1(payload)
    assert [(r["message"], r["rule"], r["id"] & 0xFF) for r in rows] == [("DM1", "faults", 0)] * 4
    assert [(r["signals"]["SPN"], r["signals"]["FMI"], r["signals"]["active"]) for r in rows] == [
        (spn, fmi, 1) for spn, fmi, _, _ in faults
    ]
    registry = agent.metrics.registry
    assert (
        registry.get_sample_value("telemetry_agent_collect_values_total", {"rule": "faults"})
        == 4 * 13
    )
