"""Hearing others' diagnostic conversations ([[diagnostics]] listen = true, `decode
--obd-ecus`): a tester (a second python-can client, over can-isotp) asks simulated ECUs
(tests/ecu.py) on python-can's virtual bus, 11- and 29-bit, classic and CAN FD; the
conversation is recorded as a candump log, with damaged sequences added (a lost frame, a
timeout, an overflow, an abandoned message). The agent's records of it, live and replayed,
and `decode`'s, are checked against the ECUs' own data read with the J1979 formulas."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import can
import isotp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, parse_config
from agent.diagnostics.answers import AnswerError, answer_frames, heard_answers
from agent.diagnostics.listener import AnswerListener
from agent.diagnostics.settings import FUNCTIONAL_11BIT, request_id
from agent.frames import FrameBatch, FrameFlag
from agent.service import Agent
from agent.sources.socketcan import SocketCanSource
from harness import REPO
from harness.data import TESLA_DBC, TESLA_EXCERPT, TESLA_LOG
from harness.services import free_port
from tests.ecu import EcuAnswers, SimulatedEcu
from tests.test_agent_end_to_end import replay_bus
from tests.test_agent_sources import agent_for, received_lines
from tests.test_cli_decode import decode
from tests.test_diagnostics import DEMO_DBC, EXPECTED, PID_DATA, VIN, until

#: The ECUs of the recorded conversation: an engine (11-bit), a second ECU that answers its
#: PIDs in reverse order, one on 29-bit IDs that speaks UDS, and one that answers over CAN FD.
ENGINE = EcuAnswers(
    0x7E8,
    pids=PID_DATA,
    vin=VIN,
    dtcs={0x03: [b"\x03\x01", b"\x01\x71"], 0x07: [b"\x04\x20"], 0x0A: []},
    refuses=frozenset({0x22}),
)
JUMBLED = EcuAnswers(0x7E9, pids={0x0C: b"\x0f\xa0", 0x05: bytes([100])}, out_of_order=True)
UDS = EcuAnswers(
    0x18DAF110,
    extended=True,
    pids={0x0C: b"\x0b\xb8"},
    vin="WDB2030461A123456",
    uds_dtcs=[(0x123456, 0x09), (0xABCDEF, 0x10)],
)
FD = EcuAnswers(
    0x7EA, pids={0x0C: b"\x07\xd0", 0x0D: bytes([42])}, vin="JH4KA8260MC000000", fd=True
)
ECUS = (ENGINE, JUMBLED, UDS, FD)
#: (ECU, request, answers it gets from each ECU) in the order the tester asks; no ECU:
#: functionally addressed, to the 11-bit ECUs.
REQUESTS: list[tuple[EcuAnswers | None, bytes, int]] = [
    (None, bytes([0x01, 0x0C, 0x0D, 0x05, 0x04, 0x10, 0x11]), 1),
    (None, bytes([0x01, 0x0F, 0x2F, 0xA6]), 1),
    (ENGINE, bytes([0x09, 0x02]), 1),
    (ENGINE, bytes([0x03]), 1),
    (ENGINE, bytes([0x07]), 1),
    (ENGINE, bytes([0x0A]), 1),
    (ENGINE, bytes([0x22, 0xF1, 0x90]), 1),  # refused: no record
    (JUMBLED, bytes([0x01, 0x05, 0x0C]), 2),  # its previous answer again, then this one
    (UDS, bytes([0x01, 0x0C]), 1),
    (UDS, bytes([0x19, 0x02, 0x08]), 1),
    (UDS, bytes([0x09, 0x02]), 1),
    (FD, bytes([0x09, 0x02]), 1),
    (FD, bytes([0x01, 0x0C, 0x0D]), 1),
]
#: The ECUs' records (message, ECU, signals but ECU), from their data and J1979's formulas
#: (EXPECTED), and what the tester asked.
Record = tuple[str, int, tuple[tuple[str, Any], ...]]


def record(message: str, ecu: int, **signals: Any) -> Record:
    return (message, ecu, tuple(sorted(signals.items())))


def expected_records(ecus: set[int]) -> Counter[Record]:
    asked = [0x0C, 0x0D, 0x05, 0x04, 0x10, 0x11, 0x0F, 0x2F, 0xA6]
    names = {0x0C: "EngineSpeed", 0x0D: "VehicleSpeed", 0x05: "CoolantTemperature"}
    names |= {0x04: "EngineLoad", 0x10: "MassAirFlow", 0x11: "ThrottlePosition"}
    names |= {0x0F: "IntakeAirTemperature", 0x2F: "FuelTankLevel", 0xA6: "Odometer"}
    found = [record(names[pid], 0x7E8, **{names[pid]: EXPECTED[names[pid]]}) for pid in asked]
    # The reversed ECU's two PIDs, three times: the functional request, then its stale copy
    # of that answer before its answer to the physical one (an answer on the bus all the same).
    found += [record("EngineSpeed", 0x7E9, EngineSpeed=1000.0)] * 3
    found += [record("CoolantTemperature", 0x7E9, CoolantTemperature=60)] * 3
    # The FD ECU's two, asked functionally and physically.
    found += [record("EngineSpeed", 0x7EA, EngineSpeed=500.0)] * 2
    found += [record("VehicleSpeed", 0x7EA, VehicleSpeed=42)] * 2
    found += [
        record("VehicleIdentificationNumber", 0x7E8, VIN=VIN),
        record("StoredDTC", 0x7E8, System=0, Code=0x0301, DTC="P0301"),
        record("StoredDTC", 0x7E8, System=0, Code=0x0171, DTC="P0171"),
        record("PendingDTC", 0x7E8, System=0, Code=0x0420, DTC="P0420"),
        record("EngineSpeed", 0x18DAF110, EngineSpeed=750.0),
        record("UdsDTC", 0x18DAF110, DTC=0x123456, Status=0x09, TestFailed=1, PendingDTC=0),
        record("VehicleIdentificationNumber", 0x18DAF110, VIN="WDB2030461A123456"),
        record("VehicleIdentificationNumber", 0x7EA, VIN="JH4KA8260MC000000"),
        # The abandoned VIN answer's successor, whole: damaged() adds it.
        record("VehicleIdentificationNumber", 0x7E8, VIN=VIN),
    ]
    return Counter(r for r in found if r[1] in ecus)


def records_of(lines: list[dict[str, Any]]) -> Counter[Record]:
    found: Counter[Record] = Counter()
    for line in lines:
        if not line["bus"].endswith(".diagnostics"):
            continue
        signals = dict(line["signals"])
        ecu = signals.pop("ECU")
        if line["message"] == "UdsDTC":  # the status bits the reference names
            signals = {k: signals[k] for k in ("DTC", "Status", "TestFailed", "PendingDTC")}
        rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in signals.items()}
        found[(line["message"], ecu, tuple(sorted(rounded.items())))] += 1
    return found


def rounded(records: Counter[Record]) -> Counter[Record]:
    return Counter(
        {
            (m, e, tuple((k, round(v, 6) if isinstance(v, float) else v) for k, v in s)): n
            for (m, e, s), n in records.items()
        }
    )


class ScanTool:
    """A scan tool on the virtual bus: asks the ECUs over can-isotp, physically (its own
    stack per ECU) or functionally (one single frame to all), and waits for the answers."""

    def __init__(self, channel: str, ecus: tuple[EcuAnswers, ...]) -> None:
        self.ecus = ecus
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.notifier = can.Notifier(self.bus, [], timeout=0.05)
        self.stacks: dict[int, Any] = {}
        for ecu in ecus:
            mode = (
                isotp.AddressingMode.Normal_29bits
                if ecu.extended
                else isotp.AddressingMode.Normal_11bits
            )
            rxid, txid = ecu.response_id, request_id(ecu.response_id, ecu.extended)
            params: dict[str, Any] = {"tx_padding": 0x55, "stmin": 0, "blocksize": 0}
            if ecu.fd:
                params |= {"can_fd": True, "tx_data_length": 64}
            stack = isotp.NotifierBasedCanStack(
                self.bus,
                self.notifier,
                address=isotp.Address(mode, txid=txid, rxid=rxid),
                params=params,
            )
            stack.start()
            self.stacks[ecu.response_id] = stack

    def ask(self, ecu: EcuAnswers | None, request: bytes, answers: int) -> None:
        """One request, and the answers it gets (or two seconds of silence)."""
        if ecu is not None:
            self.stacks[ecu.response_id].send(request)
            answering = [ecu]
        else:
            data = bytes([len(request), *request]).ljust(8, b"\x55")
            self.bus.send(
                can.Message(arbitration_id=FUNCTIONAL_11BIT, is_extended_id=False, data=data)
            )
            answering = [
                e for e in self.ecus if not e.extended and any(p in e.pids for p in request[1:])
            ]
        for answerer in answering:
            for _ in range(answers):
                assert self.stacks[answerer.response_id].recv(block=True, timeout=2.0) is not None

    def close(self) -> None:
        for stack in self.stacks.values():
            stack.stop()
        self.notifier.stop()
        self.bus.shutdown()


@pytest.fixture(scope="module")
def conversation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The recorded conversation with the damaged sequences, as a candump log."""
    folder = tmp_path_factory.mktemp("conversation")
    channel = f"listen-{free_port()}"
    recorder = can.Bus(interface="virtual", channel=channel)
    heard: list[can.Message] = []
    notifier = can.Notifier(recorder, [heard.append], timeout=0.05)
    ecus = [SimulatedEcu(channel, answers) for answers in ECUS]
    tester = ScanTool(channel, ECUS)
    try:
        for ecu, request, answers in REQUESTS:
            tester.ask(ecu, request, answers)
        time.sleep(0.2)  # the last flow control, if any, reaches the recorder
    finally:
        tester.close()
        for simulated in ecus:
            simulated.close()
        notifier.stop()
        recorder.shutdown()
    log = folder / "conversation.candump.log"
    writer = can.CanutilsLogWriter(log, channel="can0")
    for message in [*heard, *damaged(heard)]:
        message.channel = "can0"  # the bus's name, not the virtual channel's
        writer.on_message_received(message)
    writer.stop()
    return log


def damaged(heard: list[can.Message]) -> list[can.Message]:
    """Copies of the engine's VIN answer (first frame, flow control, two consecutive
    frames), broken as buses break them, each 5 s after the last: a consecutive frame lost,
    one 1.5 s late, an overflow, and a first frame abandoned for a new whole answer."""
    engine = [m for m in heard if m.arbitration_id in (0x7E8, 0x7E0) and not m.is_extended_id]
    first = next(
        k for k, m in enumerate(engine) if m.data[0] >> 4 == 1 and m.data[2:4] == b"\x49\x02"
    )
    ff, fc, cf1, cf2 = engine[first : first + 4]
    assert (fc.arbitration_id, cf1.data[0], cf2.data[0]) == (0x7E0, 0x21, 0x22)
    overflow = can.Message(
        arbitration_id=0x7E0, is_extended_id=False, data=bytes([0x32, 0, 0]).ljust(8, b"\x55")
    )
    sequences = [
        [(0, ff), (1, fc), (10, cf2)],  # the first consecutive frame lost
        [(0, ff), (1, fc), (10, cf1), (1510, cf2)],  # the second after more than 1 s
        [(0, ff), (1, overflow), (10, cf1), (20, cf2)],  # the tester has no room
        [(0, ff), (5, ff), (6, fc), (10, cf1), (20, cf2)],  # abandoned, then whole
    ]
    start = heard[-1].timestamp + 5
    out = []
    for sequence in sequences:
        for ms, message in sequence:
            copy = can.Message(
                timestamp=start + ms / 1000,
                arbitration_id=message.arbitration_id,
                is_extended_id=message.is_extended_id,
                data=message.data,
            )
            out.append(copy)
        start += 5
    return out


def lines_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_decode_prints_the_answers_heard_in_a_log(conversation: Path) -> None:
    done = decode(
        conversation,
        "--dbc",
        DEMO_DBC,
        "--obd-ecus",
        "0x7E8,0x7E9,0x7EA",
        "--obd-ecus",
        "0x18DAF110",
    )
    assert done.returncode == 0, done.stderr
    lines = lines_of(done.stdout)
    everything = {0x7E8, 0x7E9, 0x7EA, 0x18DAF110}
    assert records_of(lines) == rounded(expected_records(everything))
    assert {line["bus"] for line in lines} == {"can0.diagnostics"}
    # Each record at the time of the frame that completed its answer: the engine's whole
    # VIN answers end with their second consecutive frame.
    frames = list(can.CanutilsLogReader(conversation))
    ends = {
        round(m.timestamp, 6) for m in frames if m.arbitration_id == 0x7E8 and m.data[0] == 0x22
    }
    vins = [
        line
        for line in lines
        if line["message"] == "VehicleIdentificationNumber" and line["signals"]["ECU"] == 0x7E8
    ]
    assert len(vins) == 2 and {round(v["t"], 6) for v in vins} <= ends
    sent = {(round(m.timestamp, 6), m.arbitration_id) for m in frames}
    assert all((round(line["t"], 6), line["signals"]["ECU"]) in sent for line in lines)
    summary = next(line for line in done.stderr.splitlines() if line.startswith("ISO-TP:"))
    assert "1 timed out" in summary and "2 aborted" in summary


def test_decode_of_a_log_without_diagnostic_traffic_has_no_answers() -> None:
    done = decode(TESLA_LOG, "--dbc", DEMO_DBC, "--obd-ecus", "0x7E8,0x7EF", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    assert '.diagnostics"' not in done.stdout
    assert "0 diagnostic answers heard" in done.stderr


def test_decode_refuses_an_id_that_is_no_response_id() -> None:
    done = decode(TESLA_LOG, "--dbc", DEMO_DBC, "--obd-ecus", "0x7E0")
    assert done.returncode == 2
    assert "0x7E0 is no 11-bit response ID" in done.stderr


def listen_table(ecus: str = "[0x7E8, 0x7E9, 0x7EA]", extra: str = "", bus: str = "can0") -> str:
    return f'[[diagnostics]]\nbus = "{bus}"\nlisten = true\necus = {ecus}\n{extra}'


def counter(agent: Agent, name: str, bus: str = "can0") -> float:
    value = agent.metrics.registry.get_sample_value(f"telemetry_agent_{name}_total", {"bus": bus})
    return value or 0.0


async def test_the_agent_hears_a_replayed_conversation(tmp_path: Path, conversation: Path) -> None:
    bus = replay_bus("can0", conversation, DEMO_DBC)
    agent = agent_for(tmp_path, bus + listen_table())
    assert await agent.run() == 0
    lines = [json.loads(line) for line in received_lines(tmp_path / "outbox")]
    assert records_of(lines) == rounded(expected_records({0x7E8, 0x7E9, 0x7EA}))
    # Six answers of the engine (two service 01, two VINs, stored and pending DTCs; its
    # answer of no permanent DTC makes no record), three of the reversed ECU, three of the
    # FD one.
    assert counter(agent, "diagnostics_answers_heard") == 6 + 3 + 3
    assert counter(agent, "isotp_timed_out") == 1
    assert counter(agent, "isotp_aborted") == 2
    assert counter(agent, "isotp_bad_frames") >= 1
    assert counter(agent, "diagnostics_requests") == 0


async def test_a_replayed_log_without_diagnostic_traffic_gives_no_answers(tmp_path: Path) -> None:
    bus = replay_bus("vcan0", TESLA_EXCERPT, TESLA_DBC)
    agent = agent_for(tmp_path, bus + listen_table("[0x7E8, 0x7EF]", bus="vcan0"))
    assert await agent.run() == 0
    assert counter(agent, "frames_received", "vcan0") == 2000
    lines = received_lines(tmp_path / "outbox")
    assert lines and not [line for line in lines if ".diagnostics" in line]
    assert counter(agent, "diagnostics_answers_heard", "vcan0") == 0
    assert counter(agent, "isotp_messages", "vcan0") == 0


@pytest.fixture
def channel() -> Iterator[str]:
    yield f"listen-live-{free_port()}"


async def test_the_agent_hears_a_live_conversation_and_sends_nothing(
    tmp_path: Path, channel: str
) -> None:
    """The agent on the virtual bus beside the tester and an ECU, listen-only."""
    bus = (
        f'[[bus]]\nname = "can0"\nsource = "python-can"\ninterface = "virtual"\n'
        f'channel = "{channel}"\ndbc = ["{DEMO_DBC}"]\nlisten_only = true\n'
    )
    agent = agent_for(tmp_path, bus + listen_table("[0x7E8]"), "[batch]\nmax_age_ms = 100\n")
    running = asyncio.create_task(agent.run())
    ecu = SimulatedEcu(channel, ENGINE)
    tester = ScanTool(channel, (ENGINE,))
    try:
        await until(lambda: bool(agent.sources[0].tried.is_set()))
        for target, request, answers in REQUESTS[:6]:
            await asyncio.to_thread(tester.ask, target, request, answers)
        await until(lambda: counter(agent, "diagnostics_answers_heard") >= 5)
    finally:
        tester.close()
        ecu.close()
        agent.stop()
        await running
    lines = [json.loads(line) for line in received_lines(tmp_path / "outbox")]
    expected = expected_records({0x7E8})
    expected[record("VehicleIdentificationNumber", 0x7E8, VIN=VIN)] -= 1  # the log's alone
    assert records_of(lines) == rounded(expected)
    # Every request the ECU had was the tester's: the agent asked nothing.
    assert len(ecu.requests) == 6


# -- garbage on the ECUs' IDs --


def test_an_answer_that_does_not_read_is_counted_and_makes_no_record() -> None:
    """A UDS DTC answer cut inside its second record; a negative answer; a request."""
    frames = [
        (0x7E8, bytes([0x07, 0x59, 0x02, 0xFF, 0x12, 0x34, 0x56, 0x09])),  # one whole DTC
        (0x7E8, bytes([0x05, 0x59, 0x02, 0xFF, 0x12, 0x34])),
        (0x7E8, bytes([0x03, 0x7F, 0x19, 0x11])),
        (0x7E0, bytes([0x03, 0x19, 0x02, 0x08])),
    ]
    listener = AnswerListener([(0x7E8, False)])
    (heard,) = listener.hear(batch_of(frames))
    assert len(heard.frames) == 1 and heard.rows.tolist() == [0]
    assert (listener.answers, listener.unreadable, listener.isotp.counts.messages) == (1, 1, 4)
    assert listener.summary().endswith("1 diagnostic answers heard, 1 unreadable")


def batch_of(frames: list[tuple[int, bytes]]) -> FrameBatch:
    """Frames on bus can0, a millisecond apart; IDs above 0x7FF are 29-bit."""
    batch = FrameBatch.allocate(len(frames), ("can0",))
    for row, (can_id, data) in enumerate(frames):
        batch.t_ns[row], batch.can_id[row], batch.length[row] = row * 1_000_000, can_id, len(data)
        batch.flags[row] = FrameFlag.EXTENDED if can_id > 0x7FF else 0
        batch.data[row, : len(data)] = np.frombuffer(data, np.uint8)
    return batch


@given(st.binary(max_size=80))
def test_any_answer_is_read_without_error(data: bytes) -> None:
    """What a listener hears may be anything: read as far as it makes sense, or refused
    as unreadable, never raising otherwise."""
    try:
        records = heard_answers(0x7E8, data)
    except AnswerError:
        return
    assert all(len(r.data) <= 60 for r in records)
    assert (
        answer_frames("can0.diagnostics", records, [0] * len(records)).length.max(initial=0) <= 64
    )


@given(
    st.lists(
        st.tuples(st.sampled_from([0x7E8, 0x7E0, 0x18DAF110, 0x123]), st.binary(max_size=64)),
        max_size=40,
    )
)
def test_frames_of_any_content_on_the_ecus_ids_are_heard_without_error(
    frames: list[tuple[int, bytes]],
) -> None:
    listener = AnswerListener([(0x7E8, False), (0x18DAF110, True)])
    heard = listener.hear(batch_of(frames))
    assert sum(len(h.frames) for h in heard) >= listener.answers
    assert all(h.stream == "can0.diagnostics" for h in heard)
    assert all(set(h.rows.tolist()) <= set(range(len(frames))) for h in heard)


# -- the config and the kernel filter --


def socketcan_bus(extra: str = "") -> str:
    return f'[[bus]]\nname = "can0"\nsource = "socketcan"\ndbc = ["{DEMO_DBC}"]\n{extra}'


def test_listening_is_allowed_on_a_listen_only_bus_and_a_replay() -> None:
    text = 'vehicle_id = "v"\n' + socketcan_bus("listen_only = true\n") + listen_table()
    (table,) = parse_config(text, "t.toml", REPO).diagnostics
    assert table.listen and table.ecus == (0x7E8, 0x7E9, 0x7EA)
    replay = f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{TESLA_LOG}"\ndbc = []\n'
    parse_config('vehicle_id = "v"\n' + replay + listen_table(), "t.toml", REPO)


def test_asking_keys_beside_listen_are_refused_by_name() -> None:
    text = 'vehicle_id = "v"\n' + socketcan_bus("listen_only = true\n")
    text += listen_table(extra="vin = true\npoll = [{pids = [0x0C], interval_s = 1}]\n")
    with pytest.raises(ConfigError) as error:
        parse_config(text, "t.toml", REPO)
    assert error.value.problems == [
        f"diagnostics[0].{key}: asks the ECUs, and a table with listen = true never asks: it "
        "hears the answers to others' requests"
        for key in ("poll", "vin")
    ]


def test_the_kernel_filter_lets_the_ecus_conversations_through(tmp_path: Path) -> None:
    text = socketcan_bus() + listen_table("[0x18DAF110]", "extended = true\n")
    agent = agent_for(tmp_path, text)
    (source,) = agent.sources
    assert isinstance(source, SocketCanSource)
    assert source.frame_ids is not None
    assert {(0x18DAF110, True), (0x18DA10F1, True)} <= source.frame_ids
    # The DBC's own frames still come.
    assert any(not extended for _, extended in source.frame_ids)
    # Without a listening table nothing more comes through.
    plain = agent_for(tmp_path / "plain", socketcan_bus())
    assert plain.sources[0].frame_ids is not None
    assert source.frame_ids - plain.sources[0].frame_ids == {(0x18DAF110, True), (0x18DA10F1, True)}
