"""Asking the ECUs: the [[diagnostics]] table's checks, the answers' DBC against J1979's
formulas, and the poller against simulated ECUs (tests/ecu.py) on python-can's virtual
bus: a healthy one, a slow one, one that answers out of order, one that refuses a service
and one that never answers; then the whole agent, its answers arriving as records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import can
import numpy as np
import pytest
from can.interfaces import virtual
from hypothesis import given
from hypothesis import strategies as st

from agent.config import BusConfig, ConfigError, parse_config, restart_changes
from agent.decode import Decoder
from agent.diagnostics.answers import read_pids
from agent.diagnostics.pids import PIDS, dbc_text
from agent.diagnostics.poller import Poller, pid_matcher
from agent.diagnostics.settings import DiagnosticsConfig, PollGroup, request_id
from agent.diagnostics.streams import answers_dbc
from agent.diagnostics.transport import (
    CanIsoTpTransport,
    TransportError,
    kernel_isotp,
    open_transport,
    own_bus,
)
from agent.frames import FrameBatch
from agent.metrics import Metrics
from agent.service import Agent
from agent.sources.pythoncan import PythonCanSource
from harness import REPO
from harness.services import free_port
from tests.ecu import EcuAnswers, SimulatedEcu
from tests.test_agent_sources import received_lines

DEMO_DBC = REPO / "dbc" / "demo.dbc"
VIN = "1HGCM82633A004352"
#: Engine speed 1726 rpm, vehicle speed 88 km/h, coolant 92 degC, load 50.2 %, MAF 12.34
#: g/s, throttle 20 %, intake 25 degC, fuel level 75.3 %.
PID_DATA = {
    0x0C: bytes([0x1A, 0xF8]),
    0x0D: bytes([88]),
    0x05: bytes([132]),
    0x04: bytes([128]),
    0x10: bytes([0x04, 0xD2]),
    0x11: bytes([51]),
    0x0F: bytes([65]),
    0x2F: bytes([192]),
    0xA6: (123456).to_bytes(4, "big"),
}
EXPECTED = {
    "EngineSpeed": 1726.0,
    "VehicleSpeed": 88,
    "CoolantTemperature": 92,
    "EngineLoad": 128 * 100 / 255,
    "MassAirFlow": 12.34,
    "ThrottlePosition": 51 * 100 / 255,
    "IntakeAirTemperature": 25,
    "FuelTankLevel": 192 * 100 / 255,
    "Odometer": 12345.6,
}


def bus_table(channel: str, extra: str = "") -> str:
    return (
        f'[[bus]]\nname = "can0"\nsource = "python-can"\ninterface = "virtual"\n'
        f'channel = "{channel}"\ndbc = ["{DEMO_DBC}"]\n{extra}'
    )


def config_text(buses: str, diagnostics: str) -> str:
    return f'vehicle_id = "v1"\n{buses}\n[[diagnostics]]\n{diagnostics}'


# -- the config --


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as error:
        parse_config(text, "test.toml", REPO)
    return error.value.problems


def test_a_listen_only_bus_is_never_asked() -> None:
    text = config_text(bus_table("c", "listen_only = true\n"), 'bus = "can0"\n')
    assert problems(text) == [
        "diagnostics[0].bus: bus 'can0' is listen_only: the agent never transmits on it, "
        "so it cannot ask its ECUs"
    ]


def test_a_bus_whose_source_cannot_transmit_is_refused() -> None:
    replay = bus_table("c").replace('source = "python-can"\ninterface = "virtual"\n', "")
    replay = replay.replace('channel = "c"\n', 'source = "replay"\npath = "x.log"\n')
    text = config_text(replay, 'bus = "can0"\n')
    assert (
        "diagnostics[0].bus: bus 'can0' is read by source 'replay', which cannot transmit "
        "(only socketcan and python-can can)"
    ) in problems(text)


def test_the_keys_of_a_table_are_checked() -> None:
    text = config_text(
        bus_table("c"),
        'bus = "can1"\necus = [0x7E0]\npoll = [{pids = [0x0C, 0x02], interval_s = 0}]\n'
        'dtcs = ["cleared"]\naddressing = "broadcast"\nspeed = 1\n'
        "uds_snapshot_dids = [{did = 0xF40C, bytes = 9}, {did = 1}, {did = 2, bytes = 1}]\n",
    )
    assert problems(text) == [
        "diagnostics[0].speed: unknown key",
        "diagnostics[0].ecus[0]: 0x7E0 is no 11-bit response ID (0x7E8 to 0x7EF)",
        "diagnostics[0].poll[0].pids[1]: 2 is no service 01 PID the agent knows "
        "(docs/diagnostics.md lists them)",
        "diagnostics[0].poll[0].interval_s: must be greater than 0",
        "diagnostics[0].dtcs[0]: must be one of stored, pending, permanent",
        "diagnostics[0].uds_snapshot_dids[0].bytes: must be 1 to 4",
        "diagnostics[0].uds_snapshot_dids[1].bytes: missing",
        "diagnostics[0].uds_snapshot_dids: needs uds_dtc_status_mask",
        "diagnostics[0].addressing: must be one of functional, physical; got 'broadcast'",
        "diagnostics[0].bus: no [[bus]] is named 'can1'",
    ]


def test_a_valid_table_reads_into_its_settings() -> None:
    text = config_text(
        bus_table("c"),
        'bus = "can0"\nextended = true\necus = [0x18DAF110, 0x18DAF118]\n'
        "poll = [{pids = [0x0C, 0x0D], interval_s = 0.5}]\nvin = true\n"
        'dtcs = ["stored", "permanent"]\nuds_dtc_status_mask = 0x08\n'
        "uds_snapshot_dids = [{did = 0xF40C, bytes = 2}]\n",
    )
    (table,) = parse_config(text, "test.toml", REPO).diagnostics
    assert table.poll == (PollGroup((0x0C, 0x0D), 0.5),)
    assert table.uds_snapshot_dids == ((0xF40C, 2),)
    assert table.functional_id == 0x18DB33F1
    assert [request_id(e, True) for e in table.responders] == [0x18DA10F1, 0x18DA18F1]
    assert request_id(0x7E9, False) == 0x7E1


# -- the answers' DBC --


def answer_frames(rows: list[tuple[int, bytes]]) -> FrameBatch:
    frames = FrameBatch.allocate(len(rows), ("can0.diagnostics",))
    for k, (frame_id, data) in enumerate(rows):
        payload = (0x7E8).to_bytes(4, "little") + data
        frames.can_id[k] = frame_id
        frames.flags[k] = 1 | (8 if len(payload) > 8 else 0)
        frames.length[k] = len(payload)
        frames.data[k, : len(payload)] = np.frombuffer(payload, np.uint8)
    return frames


def values_of(decoder: Decoder, frames: FrameBatch) -> dict[str, dict[str, float | str]]:
    found: dict[str, dict[str, float | str]] = {}
    for block in decoder.decode(frames).blocks:
        found[block.message.name] = {c.name: c.physical().tolist()[0] for c in block.signals}
    return found


def test_the_answers_decode_with_the_j1979_formulas(tmp_path: Path) -> None:
    decoder = Decoder({"*": [answers_dbc(tmp_path)]})
    frames = answer_frames([(0x100 | pid, data) for pid, data in PID_DATA.items()])
    found = values_of(decoder, frames)
    for name, value in EXPECTED.items():
        assert found[name][name] == pytest.approx(value), name
        assert found[name]["ECU"] == 0x7E8
    dtcs = values_of(
        decoder,
        answer_frames(
            [
                (0x300, b"\x03\x01P0301\0\0\0\0"),
                (0x700, b"\xc1\x23U0123\0\0\0\0"),
                (0x1902, b"\x12\x34\x56\x09"),
                (0x902, VIN.encode()),
            ]
        ),
    )
    assert dtcs["StoredDTC"] == {"ECU": 0x7E8, "System": 0, "Code": 0x0301, "DTC": "P0301"}
    assert dtcs["PendingDTC"] == {"ECU": 0x7E8, "System": 3, "Code": 0x0123, "DTC": "U0123"}
    assert dtcs["VehicleIdentificationNumber"] == {"ECU": 0x7E8, "VIN": VIN}
    assert dtcs["UdsDTC"]["DTC"] == 0x123456
    assert dtcs["UdsDTC"]["TestFailed"] == 1 and dtcs["UdsDTC"]["ConfirmedDTC"] == 1
    assert len(PIDS) >= 45
    assert answers_dbc(tmp_path).read_text() == dbc_text()


# -- the poller and simulated ECUs --


@pytest.fixture
def channel() -> str:
    return f"diag-{free_port()}"


@pytest.fixture
def ecus(channel: str) -> Iterator[Callable[[EcuAnswers], SimulatedEcu]]:
    started: list[SimulatedEcu] = []

    def start(answers: EcuAnswers) -> SimulatedEcu:
        ecu = SimulatedEcu(channel, answers)
        started.append(ecu)
        return ecu

    yield start
    for ecu in started:
        ecu.close()


class Collected:
    """What a poller delivers, decoded."""

    def __init__(self, folder: Path) -> None:
        self.decoder = Decoder({"*": [answers_dbc(folder)]})
        self.records: list[tuple[str, dict[str, float | str]]] = []

    def __call__(self, stream: str, frames: FrameBatch) -> None:
        assert stream == "can0.diagnostics"
        for block in self.decoder.decode(frames).blocks:
            columns = {c.name: c.physical().tolist() for c in block.signals}
            for k in range(len(block)):
                self.records.append(
                    (block.message.name, {name: v[k] for name, v in columns.items()})
                )

    def of(self, message: str, ecu: int) -> list[dict[str, float | str]]:
        return [v for m, v in self.records if m == message and v["ECU"] == ecu]


def bus_config(channel: str) -> BusConfig:
    text = config_text(bus_table(channel), 'bus = "can0"\n')
    return parse_config(text, "t.toml", REPO).buses[0]


@contextlib.asynccontextmanager
async def polling(
    config: DiagnosticsConfig, channel: str, folder: Path
) -> AsyncIterator[tuple[Collected, Metrics]]:
    """A poller of `config` on the virtual `channel` while the block runs: what it delivered
    and what it counted."""
    metrics = Metrics()
    collected = Collected(folder)
    running = asyncio.create_task(Poller(config, bus_config(channel), metrics, collected).run())
    try:
        yield collected, metrics
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def until(condition: Callable[[], bool], seconds: float = 8.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def counter(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(f"telemetry_agent_{name}_total", {"bus": "can0"})
    return value or 0.0


async def test_the_poller_asks_every_ecu_and_counts_those_that_fail(
    tmp_path: Path, channel: str, ecus: Callable[[EcuAnswers], SimulatedEcu]
) -> None:
    healthy = ecus(
        EcuAnswers(
            0x7E8,
            pids=PID_DATA,
            vin=VIN,
            dtcs={0x03: [b"\x03\x01", b"\x01\x71"], 0x07: [b"\x04\x20"]},
        )
    )
    slow = ecus(EcuAnswers(0x7E9, pids={0x0D: bytes([87])}, delay_s=0.3, dtcs={0x03: []}))
    jumbled = ecus(
        EcuAnswers(0x7EA, pids={0x0C: b"\x0f\xa0", 0x05: bytes([100])}, out_of_order=True)
    )
    refusing = ecus(EcuAnswers(0x7EB, pids={0x0D: bytes([86])}, refuses=frozenset({0x03})))
    ecus(EcuAnswers(0x7EC, pids={0x0D: bytes([1])}, silent=True))
    config = DiagnosticsConfig(
        bus="can0",
        ecus=(0x7E8, 0x7E9, 0x7EA, 0x7EB, 0x7EC),
        poll=(PollGroup(tuple(PID_DATA), 0.2),),
        vin=True,
        dtcs=("stored", "pending"),
        timeout_s=0.6,
        max_requests_per_s=50,
    )
    async with polling(config, channel, tmp_path) as (collected, metrics):
        await until(
            lambda: (
                len(collected.of("EngineSpeed", 0x7EA)) >= 3
                and len(collected.of("VehicleSpeed", 0x7E9)) >= 3
                and len(collected.of("VehicleSpeed", 0x7EB)) >= 3
            )
        )
    for name, value in EXPECTED.items():
        assert collected.of(name, 0x7E8)[0][name] == pytest.approx(value), name
    assert collected.of("EngineSpeed", 0x7EA)[0]["EngineSpeed"] == 1000.0
    assert collected.of("CoolantTemperature", 0x7EA)[0]["CoolantTemperature"] == 60
    assert collected.of("VehicleSpeed", 0x7E9)[0]["VehicleSpeed"] == 87
    vin = collected.of("VehicleIdentificationNumber", 0x7E8)[0]
    assert vin["VIN"] == VIN
    stored = collected.of("StoredDTC", 0x7E8)
    assert [(d["System"], d["Code"], d["DTC"]) for d in stored[:2]] == [
        (0, 0x0301, "P0301"),
        (0, 0x0171, "P0171"),
    ]
    assert [d["Code"] for d in collected.of("PendingDTC", 0x7E8)][:1] == [0x0420]
    # Never more than six PIDs in one request: the group of nine went in two.
    asked = [r for r in healthy.requests if r[0] == 0x01]
    assert asked and max(len(r) - 1 for r in asked) <= 6
    assert any(len(r) == 7 for r in asked)
    # The silent ECU cost timeouts (it never answered the discovery), the refusing one a
    # negative answer, the out-of-order one's stale answers were dropped; the others were
    # polled all along.
    assert counter(metrics, "diagnostics_timeouts") >= 1
    assert counter(metrics, "diagnostics_negative_answers") >= 1
    assert counter(metrics, "diagnostics_unexpected_answers") >= 1
    assert counter(metrics, "diagnostics_answers") >= 12
    assert len(collected.of("VehicleSpeed", 0x7EC)) == 0
    assert refusing.requests and slow.requests and jumbled.requests


async def test_physical_addressing_with_29_bit_ids_and_uds_dtcs(
    tmp_path: Path, channel: str, ecus: Callable[[EcuAnswers], SimulatedEcu]
) -> None:
    ecu = ecus(
        EcuAnswers(
            0x18DAF110,
            extended=True,
            pids={0x0C: b"\x0b\xb8"},
            vin=VIN,
            uds_dtcs=[(0x123456, 0x09), (0xABCDEF, 0x10)],
            snapshots={
                0x123456: [
                    (1, [(0xF40C, b"\x1a\xf8"), (0xF40D, b"\x58")]),
                    (2, [(0xF40C, b"\x0f\xa0"), (0xF40D, b"\x00")]),
                ]
            },
            dtcs={0x0A: [b"\x03\x00"]},
        )
    )
    config = DiagnosticsConfig(
        bus="can0",
        addressing="physical",
        extended=True,
        poll=(PollGroup((0x0C,), 0.2),),
        vin=True,
        dtcs=("permanent",),
        uds_dtc_status_mask=0x08,
        uds_snapshot_dids=((0xF40C, 2), (0xF40D, 1)),
        timeout_s=0.6,
        max_requests_per_s=50,
    )
    async with polling(config, channel, tmp_path) as (collected, metrics):
        await until(
            lambda: (
                bool(collected.of("UdsDTC", 0x18DAF110))
                and len(collected.of("EngineSpeed", 0x18DAF110)) >= 2
            )
        )
    assert collected.of("EngineSpeed", 0x18DAF110)[0]["EngineSpeed"] == 750.0
    (uds,) = collected.of("UdsDTC", 0x18DAF110)[:1]
    assert uds["DTC"] == 0x123456 and uds["Status"] == 0x09  # 0x10 is not in the mask
    assert len([r for r in collected.records if r[0] == "UdsDTC"]) == 1
    snapshots = [
        (s["RecordNumber"], s["DID"], s["Value"])
        for s in collected.of("UdsDTCSnapshot", 0x18DAF110)
    ]
    assert snapshots == [(1, 0xF40C, 6904), (1, 0xF40D, 88), (2, 0xF40C, 4000), (2, 0xF40D, 0)]
    assert {s["DTC"] for s in collected.of("UdsDTCSnapshot", 0x18DAF110)} == {0x123456}
    assert collected.of("PermanentDTC", 0x18DAF110)[0]["Code"] == 0x0300
    # The VIN is 20 bytes: a multi-frame answer, with the agent's flow control.
    assert collected.of("VehicleIdentificationNumber", 0x18DAF110)
    assert counter(metrics, "diagnostics_timeouts") == 0
    assert all(len(r) <= 7 for r in ecu.requests)


async def test_functional_29_bit_and_an_ecu_that_asks_for_more_time(
    tmp_path: Path, channel: str, ecus: Callable[[EcuAnswers], SimulatedEcu]
) -> None:
    """0x18DB33F1 to all; one ECU says "response pending" and answers after timeout_s."""
    ecus(EcuAnswers(0x18DAF110, extended=True, pids={0x0C: b"\x0b\xb8"}))
    # timeout_s is ample for the first answers on a loaded machine; the late one comes after.
    ecus(EcuAnswers(0x18DAF118, extended=True, pids={0x0C: b"\x07\xd0"}, pending_s=2.0))
    config = DiagnosticsConfig(
        bus="can0",
        extended=True,
        ecus=(0x18DAF110, 0x18DAF118),
        poll=(PollGroup((0x0C,), 0.2),),
        timeout_s=1.5,
        max_requests_per_s=50,
    )
    async with polling(config, channel, tmp_path) as (collected, metrics):
        await until(lambda: len(collected.of("EngineSpeed", 0x18DAF118)) >= 2, 30)
    assert collected.of("EngineSpeed", 0x18DAF110)[0]["EngineSpeed"] == 750.0
    assert collected.of("EngineSpeed", 0x18DAF118)[0]["EngineSpeed"] == 500.0
    assert counter(metrics, "diagnostics_timeouts") == 0
    assert counter(metrics, "diagnostics_negative_answers") == 0


async def test_requests_keep_to_the_rate_limit(
    tmp_path: Path, channel: str, ecus: Callable[[EcuAnswers], SimulatedEcu]
) -> None:
    """Three groups due every 10 ms, and still at most 10 requests a second."""
    ecu = ecus(EcuAnswers(0x7E8, pids=PID_DATA))
    config = DiagnosticsConfig(
        bus="can0",
        discover=False,
        poll=tuple(PollGroup((pid,), 0.01) for pid in (0x0C, 0x0D, 0x05)),
        max_requests_per_s=10,
    )
    async with polling(config, channel, tmp_path):
        await until(lambda: len(ecu.request_times) >= 8)
    # The rate over the whole run: single gaps, as the ECU's thread sees them, jitter.
    times = ecu.request_times
    assert (len(times) - 1) / (times[-1] - times[0]) <= 10 * 1.1, np.diff(times)
    # Each group had its turn.
    assert {r[1] for r in ecu.requests} == {0x0C, 0x0D, 0x05}


async def test_an_interface_that_cannot_send_ends_only_the_asking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def cannot_open(config: DiagnosticsConfig, bus: BusConfig) -> CanIsoTpTransport:
        raise TransportError("cannot open 'pcan': the channel is in use")

    config = DiagnosticsConfig(bus="can0", poll=(PollGroup((0x0C,), 0.1),))
    metrics = Metrics()
    poller = Poller(config, bus_config("c"), metrics, Collected(tmp_path), open=cannot_open)
    await asyncio.wait_for(poller.run(), 5)
    assert "bus can0: diagnostics cannot transmit: cannot open 'pcan'" in caplog.text
    assert counter(metrics, "diagnostics_requests") == 0


def test_a_reload_does_not_change_what_is_asked() -> None:
    old = parse_config(config_text(bus_table("c"), 'bus = "can0"\n'), "t.toml", REPO)
    new = parse_config(config_text(bus_table("c"), 'bus = "can0"\nvin = true\n'), "t.toml", REPO)
    assert restart_changes(old, new) == ["diagnostics"]


@given(st.binary(max_size=80))
def test_any_answer_is_read_without_error(data: bytes) -> None:
    """Garbage from an ECU: read as far as it makes sense, never raising."""
    values = read_pids(bytes([0x41]) + data)
    assert all(pid in PIDS or pid % 0x20 == 0 for pid in values)
    assert all(len(v) == (PIDS[p].size if p in PIDS else 4) for p, v in values.items())
    assert pid_matcher({0x0C})(data) in (True, False)


def test_pids_are_read_by_number_in_any_order() -> None:
    answer = bytes([0x41, 0x0D, 88, 0x0C, 0x1A, 0xF8, 0x05, 132])
    assert read_pids(answer) == {0x0D: b"X", 0x0C: b"\x1a\xf8", 0x05: bytes([132])}
    # A PID whose size is not known ends the reading: what follows cannot be placed.
    assert read_pids(bytes([0x41, 0x0D, 88, 0x02, 1, 2, 0x0C, 0x1A, 0xF8])) == {0x0D: b"X"}
    assert read_pids(bytes([0x41, 0x0C, 0x1A])) == {}  # cut short


def test_seven_pids_in_one_request_get_a_negative_answer(
    channel: str, ecus: Callable[[EcuAnswers], SimulatedEcu]
) -> None:
    """What the agent never sends, and why: the ECU refuses it (0x13, wrong length)."""
    ecus(EcuAnswers(0x7E8, pids=PID_DATA))
    config = DiagnosticsConfig(bus="can0")
    transport = CanIsoTpTransport(config, own_bus({"interface": "virtual", "channel": channel}))
    try:
        transport.send(0x7E8, bytes([0x01, *list(PID_DATA)[:7]]))
        assert transport.receive(0x7E8, 2.0) == bytes([0x7F, 0x01, 0x13])
        transport.send(0x7E8, bytes([0x01, *list(PID_DATA)[:6]]))
        answer = transport.receive(0x7E8, 2.0)
        assert answer is not None and answer[0] == 0x41
    finally:
        transport.close()


# -- the whole agent --


#: A collection rule that keeps only the engine speed of the answers.
ENGINE_SPEED_RULE = (
    '[[collect]]\nname = "obd"\nmode = "all"\nsignals = ["EngineSpeed.*"]\n'
    'buses = ["can0.diagnostics"]\n'
)


@pytest.mark.parametrize("rules", ["", ENGINE_SPEED_RULE], ids=["every-answer", "a-rule"])
async def test_the_agent_sends_the_answers_as_records(
    tmp_path: Path, channel: str, ecus: Callable[[EcuAnswers], SimulatedEcu], rules: str
) -> None:
    ecus(EcuAnswers(0x7E8, pids=PID_DATA, dtcs={0x03: [b"\x03\x01"]}, vin=VIN))
    ecus(EcuAnswers(0x7E9, pids={0x0D: bytes([5])}, silent=True))
    text = (
        f'vehicle_id = "v1"\nstate_dir = "{tmp_path}"\nstatus_interval_s = 60\n'
        f"{bus_table(channel)}\n"
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n'
        '[batch]\nmax_age_ms = 100\n[metrics]\nlisten = ""\n'
        '[[diagnostics]]\nbus = "can0"\necus = [0x7E8, 0x7E9]\ntimeout_s = 0.5\n'
        'poll = [{pids = [0x0C, 0x0D, 0x05], interval_s = 0.2}]\ndtcs = ["stored"]\nvin = true\n'
        f"{rules}"
    )
    agent = Agent(parse_config(text, "test.toml", tmp_path), status=None)
    running = asyncio.create_task(agent.run())

    def decoded() -> float:
        labels = {"bus": "can0.diagnostics"}
        value = agent.metrics.registry.get_sample_value(
            "telemetry_agent_frames_decoded_total", labels
        )
        return value or 0.0

    # Three PIDs twice, the DTC and the VIN.
    await until(lambda: decoded() >= 8)
    # The agent asks on the bus its source reads: the channel holds it and the two ECUs.
    assert len(virtual.channels[channel]) == 3
    agent.stop()
    assert await running == 0
    (source,) = agent.sources
    assert isinstance(source, PythonCanSource) and source.taps == []  # the transport let go
    lines = [json.loads(line) for line in received_lines(tmp_path / "outbox")]
    answers = [r for r in lines if r["bus"] == "can0.diagnostics"]
    speeds = [r["signals"] for r in answers if r["message"] == "EngineSpeed"]
    assert speeds and speeds[0] == {"ECU": 0x7E8, "EngineSpeed": 1726.0}
    if rules:
        assert {r["message"] for r in answers} == {"EngineSpeed"}
        assert {r["rule"] for r in answers} == {"obd"}
    else:
        dtc = next(r["signals"] for r in answers if r["message"] == "StoredDTC")
        assert dtc == {"ECU": 0x7E8, "System": 0, "Code": 0x0301, "DTC": "P0301"}
        vin = next(r["signals"] for r in answers if r["message"] == "VehicleIdentificationNumber")
        assert vin == {"ECU": 0x7E8, "VIN": VIN}
    assert counter(agent.metrics, "diagnostics_timeouts") >= 1


def test_a_socketcan_bus_uses_the_kernels_iso_tp_or_falls_back_to_can_isotp() -> None:
    """This machine's kernel has no CAN: no CAN_ISOTP socket, so can-isotp over python-can's
    socketcan, which cannot open the interface either: a clear error, naming it."""
    import socket

    try:
        socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_ISOTP).close()
    except OSError:
        pass
    else:
        pytest.skip("this kernel has ISO-TP sockets: make vm-test covers them")
    text = config_text('[[bus]]\nname = "can9"\nsource = "socketcan"\ndbc = []\n', 'bus = "can9"\n')
    config = parse_config(text, "t.toml", REPO)
    assert kernel_isotp(config.diagnostics[0], "can9") is None
    with pytest.raises(TransportError, match="cannot open 'socketcan'"):
        open_transport(config.diagnostics[0], config.buses[0])


async def test_a_failing_reader_of_the_frames_never_stops_the_bus(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = PythonCanSource(bus_config(channel))

    def broken(message: can.Message) -> None:
        raise RuntimeError("a bug")

    source.taps = [broken]
    got: list[int] = []

    async def read() -> None:
        async for batch in source.batches():
            got.extend(batch.can_id.tolist())

    reading = asyncio.create_task(read())
    sender = can.Bus(interface="virtual", channel=channel)
    try:
        await until(lambda: source.can_bus is not None)
        for n in range(3):
            sender.send(can.Message(arbitration_id=0x100 + n, is_extended_id=False))
        await until(lambda: len(got) == 3)
    finally:
        sender.shutdown()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    assert got == [0x100, 0x101, 0x102] and source.taps == []
    assert "a reader of its frames failed" in caplog.text


# -- the page --


def _number(value: float) -> str:
    return f"{value:.10g}"


def pid_rows() -> list[list[str]]:
    """The rows of docs/diagnostics.md's PID table, from the agent's table."""
    rows = []
    for pid in PIDS.values():
        for f in pid.fields:
            letters = "ABCD"[f.byte : f.byte + f.bits // 8] if f.bits >= 8 else "ABCD"[f.byte]
            raw = " ".join(letters) if len(letters) > 1 else letters
            if f.bits == 1:
                raw = f"bit {f.bit} of {letters}"
            elif f.bits < 8:
                raw = f"bits {f.bit}-{f.bit + f.bits - 1} of {letters}"
            formula = raw if f.scale == 1 else f"{raw} * {_number(f.scale)}"
            if f.offset:
                formula += f" {'-' if f.offset < 0 else '+'} {_number(abs(f.offset))}"
            if f.signed:
                formula += " (signed)"
            rows.append(
                [f"`{pid.pid:02X}`", f"`{pid.name}`", f"`{f.name}`", f.unit or "-", formula]
            )
    return rows


def test_the_pages_pid_table_is_the_agents() -> None:
    from tests.test_docs import tables

    page = REPO / "docs" / "diagnostics.md"
    ((_, rows),) = tables(page, ["PID", "message", "signal", "unit", "formula"])
    assert rows == pid_rows()
