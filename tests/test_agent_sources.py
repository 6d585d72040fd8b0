"""The agent fed by python-can's virtual interface and by `simulate`, and its metrics."""

from __future__ import annotations

import asyncio
import io
import itertools
import re
import time
from pathlib import Path

import can
import numpy as np

from agent.config import BusConfig, parse_config
from agent.decode import Decoder
from agent.frames import FrameBatch, FrameFlag
from agent.logs import open_log
from agent.records import JsonLinesWriter
from agent.service import Agent
from agent.sources.pythoncan import PythonCanSettings, PythonCanSource
from harness import REPO
from harness.data import RAV4_ADAS_DBC, RAV4_LOG, RAV4_PT_DBC, TESLA_DBC, TESLA_EXCERPT
from harness.outputs import outbox_lines, scrape_metrics
from harness.services import free_port
from tests.test_agent_end_to_end import replay_bus

DEMO_DBC = REPO / "dbc" / "demo.dbc"


def received_lines(outbox: Path) -> list[str]:
    """The records of the batch files in `outbox`, sorted, without "vehicle"."""
    return sorted(line.replace(', "vehicle": "v1"', "") for line in outbox_lines(outbox))


def agent_for(tmp_path: Path, buses: str, extra: str = "") -> Agent:
    text = (
        f'vehicle_id = "v1"\nstate_dir = "{tmp_path}"\nstatus_interval_s = 60\n{buses}\n'
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n{extra}'
    )
    if "[metrics]" not in extra:
        text += '[metrics]\nlisten = ""\n'
    return Agent(parse_config(text, "test.toml", tmp_path), status=None)


async def test_python_can_virtual_frames_arrive_decoded(tmp_path: Path) -> None:
    channel = f"test-{free_port()}"
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "can0"\nsource = "python-can"\ninterface = "virtual"\n'
        f'channel = "{channel}"\ndbc = ["{DEMO_DBC}"]\n',
        "[batch]\nmax_age_ms = 100\n",
    )
    running = asyncio.create_task(agent.run())
    sender = can.Bus(interface="virtual", channel=channel)
    await asyncio.sleep(0.5)  # the agent's bus is open
    rng = np.random.default_rng(5)
    sent = FrameBatch.allocate(600, ("can0",))
    ids = [0x100, 0x101, 0x201, 0x18FF50E5, 0x7AB]  # the last one is not in the DBC
    for row in range(600):
        can_id = ids[row % len(ids)]
        data = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        message = can.Message(
            arbitration_id=can_id, is_extended_id=can_id > 0x7FF, data=data, timestamp=row * 0.001
        )
        sender.send(message)
        sent.can_id[row] = can_id
        sent.flags[row] = FrameFlag.EXTENDED * (can_id > 0x7FF)
        sent.length[row] = 8
        sent.data[row, :8] = np.frombuffer(data, np.uint8)
        if row % 100 == 99:
            await asyncio.sleep(0.05)
    for _ in range(100):  # bounded: the frames reach the outbox within a few batch ages
        await asyncio.sleep(0.1)
        if agent.totals.frames == 600 and not len(agent.spool):
            break
    agent.stop()
    assert await running == 0
    sender.shutdown()
    assert agent.totals.frames == 600
    assert agent.totals.unknown == 120
    # python-can's virtual bus stamps frames on receipt: compare all but the times.
    expected = Decoder({"*": [DEMO_DBC]}).decode(sent)
    received = [re.sub(r'"t": [0-9.]+', "", line) for line in received_lines(tmp_path / "outbox")]
    out = io.StringIO()
    JsonLinesWriter(out).write(expected.blocks)
    want = [re.sub(r'"t": [0-9.]+', "", line) for line in out.getvalue().splitlines()]
    assert sorted(received) == sorted(want)


def test_python_can_frames_with_an_impossible_id_are_counted_and_skipped() -> None:
    # python-can does not check what an interface hands over; a frame batch holds 29 bits.
    settings = PythonCanSettings(interface="virtual")
    source = PythonCanSource(BusConfig(name="can0", source="python-can", dbc=(), settings=settings))
    ids = [0x100, 1 << 29, 0x18FF50E5, 1 << 40, -1, 0x7FF]
    messages = [
        can.Message(arbitration_id=i, is_extended_id=i > 0x7FF, data=b"\x01", check=False)
        for i in ids
    ]
    # A standard frame past 11 bits, as some BLF files hold; an error frame's class.
    messages.append(can.Message(arbitration_id=0x800, is_extended_id=False, check=False))
    messages.append(can.Message(arbitration_id=0x1000, is_error_frame=True, check=False))
    batch = source._batch(messages)
    assert batch.can_id.tolist() == [0x100, 0x18FF50E5, 0x7FF, 0x1000]
    assert source.stats.malformed == 4


async def test_simulate_runs_for_its_duration_and_delivers_every_frame(tmp_path: Path) -> None:
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "can0"\nsource = "simulate"\npace = "max"\nduration_s = 10\n'
        f'dbc = ["{DEMO_DBC}"]\n',
    )
    assert await agent.run() == 0
    # 10 s of the demo DBC's cycle times: 100+50+50+100+10+20+1+5 frames per second.
    assert agent.totals.frames == agent.totals.decoded == 3360
    assert agent.totals.batches == 10
    lines = received_lines(tmp_path / "outbox")
    assert len(lines) == 3360
    speeds = [line for line in lines if '"VehicleSpeed"' in line]
    assert len(speeds) == 500
    # Multiplexed: each CellGroup frame carries its group's two cells only.
    cells = [line for line in lines if '"BatteryCells"' in line]
    assert all(line.count("CellVoltage") == 2 for line in cells)


async def test_a_metrics_scrape_matches_the_replayed_log(tmp_path: Path) -> None:
    port = free_port()
    agent = agent_for(
        tmp_path,
        replay_bus("can0", RAV4_LOG, RAV4_PT_DBC) + replay_bus("can1", RAV4_LOG, RAV4_ADAS_DBC),
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
    )
    assert await agent.run() == 0
    metrics = scrape_metrics(port)

    def value(name: str, labels: str = "") -> float:
        return metrics[f"telemetry_agent_{name}" + (f"{{{labels}}}" if labels else "")]

    frames = FrameBatch.concat(list(open_log(RAV4_LOG).batches()))
    for bus, dbc in (("can0", RAV4_PT_DBC), ("can1", RAV4_ADAS_DBC)):
        on_bus = frames.take(frames.bus == frames.buses.index(bus))
        result = Decoder({"*": [dbc]}).decode(on_bus)
        label = f'bus="{bus}"'
        assert value("frames_received_total", label) == len(on_bus)
        assert value("frames_decoded_total", label) == result.decoded
        assert value("frames_unknown_total", label) == result.unknown
        assert value("signals_decoded_total", label) == result.signals
    assert value("batches_built_total") == agent.totals.batches
    assert value("uplink_batches_acked_total", 'uplink="file"') == agent.totals.batches
    assert value("batch_wire_bytes_total") > 0
    assert value("spool_batches") == 0
    assert value("spool_dropped_batches_total", 'reason="spool_full"') == 0
    assert any(name.startswith("telemetry_agent_build_info{") for name in metrics)


async def test_replay_at_a_speed_factor_takes_the_log_time_over_the_factor(
    tmp_path: Path,
) -> None:
    # The excerpt spans 3.63 s; at 4 times realtime it takes about 0.9 s.
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "vcan0"\nsource = "replay"\npath = "{TESLA_EXCERPT}"\npace = 4\n'
        f'dbc = ["{TESLA_DBC}"]\n',
    )
    started = time.monotonic()
    assert await agent.run() == 0
    elapsed = time.monotonic() - started
    assert 0.85 < elapsed < 3.0
    assert agent.totals.frames == 2000


async def test_a_looped_replay_follows_on_in_time(tmp_path: Path) -> None:
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "vcan0"\nsource = "replay"\npath = "{TESLA_EXCERPT}"\nloop = true\n'
        f'dbc = ["{TESLA_DBC}"]\n',
    )
    running = asyncio.create_task(agent.run())
    for _ in range(200):  # bounded: three passes take well under the 20 s this allows
        await asyncio.sleep(0.1)
        if agent.totals.frames >= 6000:
            break
    agent.stop()
    assert await running == 0
    lines = received_lines(tmp_path / "outbox")
    times = sorted(float(line.split('"t": ')[1].split(",")[0]) for line in lines)
    assert len(lines) >= 6000
    # Each pass starts 1 ms after the last frame of the one before.
    first, span = 1637353675.975229, 1637353679.605817 - 1637353675.975229
    assert times[0] == first
    assert any(abs(t - (first + span + 0.001)) < 1e-6 for t in times)
    assert all(b - a < 1.0 for a, b in itertools.pairwise(times))


async def test_a_bus_can_take_another_channel_under_its_own_name(tmp_path: Path) -> None:
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "powertrain"\nsource = "replay"\npath = "{RAV4_LOG}"\n'
        f'channel = "can0"\ndbc = ["{RAV4_PT_DBC}"]\n',
    )
    assert await agent.run() == 0
    frames = FrameBatch.concat(list(open_log(RAV4_LOG).batches()))
    on_can0 = frames.take(frames.bus == frames.buses.index("can0"))
    assert agent.totals.frames == len(on_can0)
    lines = received_lines(tmp_path / "outbox")
    assert lines and all('"bus": "powertrain"' in line for line in lines)


async def test_malformed_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    log = tmp_path / "damaged.log"
    lines = TESLA_EXCERPT.read_text().splitlines()
    lines[10:10] = ["garbage", "(1637353676.0) vcan0 12G#00", "(x) vcan0 123#00"]
    log.write_text("\n".join(lines) + "\n")
    port = free_port()
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "vcan0"\nsource = "replay"\npath = "{log}"\ndbc = ["{TESLA_DBC}"]\n',
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n',
    )
    assert await agent.run() == 0
    assert agent.totals.frames == 2000
    assert scrape_metrics(port)['telemetry_agent_frames_malformed_total{bus="vcan0"}'] == 3
