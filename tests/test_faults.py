"""Store and forward under faults: the broker down or killed, the agent killed or stopped,
the spool damaged or over budget, the disk failing. Each test checks, frame by frame, what
arrived against what `decode` gives for the same log, and that batches arrived in sequence
order (the receiver's --batches log)."""

from __future__ import annotations

import asyncio
import errno
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import pytest

from agent import spool as spool_module
from agent.cloud.receiver import Receiver, accept_files
from agent.cloud.sinks.jsonl import JsonLinesSink
from agent.config import load_config
from agent.service import Agent
from agent.spool import RECORD, scan_segment
from harness.data import RAV4_LOG
from harness.outputs import records, scrape_metrics, spooled_frames
from harness.services import Broker, ReceiverProcess, agent_command, free_port, persistent_settings
from tests.test_agent_end_to_end import decoded, write_config


def canonical(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True) for r in rows)


def first_arrivals(batches: Path) -> dict[str, list[int]]:
    """Each stream's sequence numbers in the order they first arrived."""
    streams: dict[str, list[int]] = {}
    for line in batches.read_text().splitlines():
        batch = json.loads(line)
        if not batch.get("duplicate"):
            streams.setdefault(batch["stream"], []).append(batch["sequence"])
    return streams


def check_in_order(batches: Path, first: int = 1) -> list[int]:
    """The one stream's batches arrived in sequence order, none missing from `first` on."""
    [sequences] = first_arrivals(batches).values()
    assert sequences == list(range(first, first + len(sequences)))
    return sequences


def per_bus(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    buses: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        buses.setdefault(str(row["bus"]), []).append(row)
    return buses


def check_prefix(received: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """What arrived of each bus is the start of its log, without a gap or a duplicate."""
    wanted = per_bus(expected)
    for bus, rows in per_bus(received).items():
        last = max(float(r["t"]) for r in rows)
        start = [r for r in wanted[bus] if float(r["t"]) <= last]
        assert canonical(rows) == canonical(start), bus


def check_suffix(received: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """What arrived of each bus is the end of its log, without a gap or a duplicate."""
    wanted = per_bus(expected)
    for bus, rows in per_bus(received).items():
        first = min(float(r["t"]) for r in rows)
        end = [r for r in wanted[bus] if float(r["t"]) >= first]
        assert canonical(rows) == canonical(end), bus


class AgentProcess:
    """`telemetry-agent run` in the background, its stderr in a file."""

    def __init__(self, config: Path) -> None:
        self.stderr_path = config.with_suffix(f".{time.monotonic_ns()}.stderr")
        self._stderr: IO[str] = open(self.stderr_path, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            agent_command("run", "--config", config), stderr=self._stderr, text=True
        )

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        code = self.process.wait(timeout)
        self._stderr.close()
        stderr = self.stderr_path.read_text()
        assert "Traceback" not in stderr, stderr
        return code, stderr

    def kill(self) -> None:
        self.process.kill()
        self.wait()


def uplink_mqtt(port: int, extra: str = "") -> str:
    return (
        f'[uplink]\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:{port}"\ndrain_timeout_s = 60\n{extra}'
    )


def drain_config(folder: Path, uplink: str) -> Path:
    """A config on the same state_dir as write_config's, whose replay has no frames: the
    agent only sends what its spool holds, then exits."""
    empty = folder / "empty.log"
    empty.write_text("")
    config = write_config(folder, "rav4", uplink)
    text = config.read_text().replace(f'path = "{RAV4_LOG}"', f'path = "{empty}"')
    drain = folder / "drain.toml"
    drain.write_text(text)
    return drain


def mqtt_receiver(folder: Path, url: str, name: str = "received") -> ReceiverProcess:
    receiver = ReceiverProcess(
        folder / f"{name}.jsonl",
        "--mqtt",
        url,
        "--session",
        f"receiver-{name}",
        "--batches",
        folder / f"{name}.batches",
    )
    receiver.wait_ready("subscribed to")
    return receiver


def finish(receiver: ReceiverProcess) -> str:
    """The receiver's summary, once what the agent delivered has come through (the agent
    has ended: the broker acknowledged all of it)."""
    receiver.interrupt_once_quiet()
    return receiver.finish()


def check_everything_arrived(folder: Path, agent: AgentProcess, receiver: ReceiverProcess) -> None:
    """The agent ended after losing its link; every frame of the log arrived once, in order."""
    code, stderr = agent.wait()
    assert code == 0, stderr
    assert "retrying" in stderr  # it did lose the link
    summary = finish(receiver)
    assert "0 rejected" in summary
    # Batches sent again after a reconnect are dropped as duplicates: each frame once.
    assert canonical(records(receiver.output)) == canonical(decoded(folder, "rav4"))
    check_in_order(folder / "received.batches")


def deliver_the_spool(folder: Path) -> tuple[ReceiverProcess, str]:
    """Runs the agent on `folder`'s state_dir with nothing new to read, into a broker and a
    receiver started first: what its spool holds arrives. The receiver, done, and the
    agent's stderr."""
    mqtt = Broker(free_port(), folder, "allow_anonymous true\n")
    mqtt.start()
    try:
        receiver = mqtt_receiver(folder, mqtt.url)
        code, stderr = AgentProcess(drain_config(folder, uplink_mqtt(mqtt.port))).wait()
        assert code == 0, stderr
        finish(receiver)
    finally:
        mqtt.stop()
    return receiver, stderr


def test_broker_down_at_start_and_up_5_s_later(tmp_path: Path) -> None:
    mqtt = Broker(free_port(), tmp_path, persistent_settings(tmp_path))
    # The receiver's session is made first and saved, so it is there when the broker comes
    # back, whoever reconnects first.
    mqtt.start()
    receiver = mqtt_receiver(tmp_path, mqtt.url)
    mqtt.stop(graceful=True)
    agent = AgentProcess(write_config(tmp_path, "rav4", uplink_mqtt(mqtt.port), pace=10))
    time.sleep(5)
    mqtt.start()
    try:
        check_everything_arrived(tmp_path, agent, receiver)
    finally:
        mqtt.stop()


def test_broker_killed_mid_stream_and_restarted(tmp_path: Path) -> None:
    mqtt = Broker(free_port(), tmp_path, persistent_settings(tmp_path))
    mqtt.start()
    try:
        receiver = mqtt_receiver(tmp_path, mqtt.url)
        agent = AgentProcess(write_config(tmp_path, "rav4", uplink_mqtt(mqtt.port), pace=8))
        time.sleep(4)  # half of the replay
        mqtt.stop()  # SIGKILL
        time.sleep(2)
        mqtt.start()
        check_everything_arrived(tmp_path, agent, receiver)
    finally:
        mqtt.stop()


def test_grpc_server_killed_mid_stream_and_restarted(tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"

    def server(name: str) -> ReceiverProcess:
        receiver = ReceiverProcess(
            tmp_path / f"{name}.jsonl",
            "--grpc-listen",
            listen,
            "--batches",
            tmp_path / f"{name}.batches",
        )
        receiver.wait_ready("listening for gRPC")
        return receiver

    first = server("first")
    uplink = f'[uplink]\nkind = "grpc"\nurl = "{listen}"\nwindow = 4\ndrain_timeout_s = 60\n'
    agent = AgentProcess(write_config(tmp_path, "rav4", uplink, pace=10))
    time.sleep(2.5)  # a quarter of the replay
    first.process.kill()
    first.finish()
    second = server("second")
    code, stderr = agent.wait()
    assert code == 0, stderr
    assert "retrying" in stderr  # it did lose the link
    summary = finish(second)
    assert "0 rejected" in summary
    # The batches the killed server took but could not acknowledge came again, to the new one:
    # in sequence order, each frame of the log, none missing.
    arrivals = [
        json.loads(line)["sequence"]
        for name in ("first", "second")
        for line in (tmp_path / f"{name}.batches").read_text().splitlines()
    ]
    firsts = list(dict.fromkeys(arrivals))
    assert firsts == list(range(1, len(firsts) + 1))
    received = records(first.output) + records(second.output)
    assert set(canonical(received)) == set(canonical(decoded(tmp_path, "rav4")))


def test_agent_killed_mid_stream_loses_at_most_its_open_batch(tmp_path: Path) -> None:
    mqtt = Broker(free_port(), tmp_path, "allow_anonymous true\n")
    mqtt.start()
    metrics = free_port()
    try:
        receiver = mqtt_receiver(tmp_path, mqtt.url)
        config = write_config(tmp_path, "rav4", uplink_mqtt(mqtt.port), pace=8)
        config.write_text(
            config.read_text().replace('listen = ""', f'listen = "127.0.0.1:{metrics}"')
        )
        agent = AgentProcess(config)
        time.sleep(4)
        closed = scrape_metrics(metrics)  # frames in closed batches, so far
        agent.kill()
        code, stderr = AgentProcess(drain_config(tmp_path, uplink_mqtt(mqtt.port))).wait()
        assert code == 0, stderr
        summary = finish(receiver)
    finally:
        mqtt.stop()
    assert "0 rejected" in summary
    received = records(receiver.output)
    expected = decoded(tmp_path, "rav4")
    check_prefix(received, expected)
    for bus, rows in per_bus(received).items():
        # Every batch closed before the kill arrived: only the open one can be missing.
        assert len(rows) >= closed[f'telemetry_agent_frames_decoded_total{{bus="{bus}"}}']
    assert len(received) < len(expected)  # it was killed mid-stream
    check_in_order(tmp_path / "received.batches")


def test_sigterm_puts_the_open_batch_in_the_spool_and_ends_promptly(tmp_path: Path) -> None:
    down = uplink_mqtt(free_port())
    agent = AgentProcess(write_config(tmp_path, "rav4", down, pace=10))
    time.sleep(3)
    agent.process.terminate()
    started = time.monotonic()
    code, stderr = agent.wait(30)
    assert time.monotonic() - started < 10
    assert code == 0, stderr
    assert "stay in the spool" in stderr
    read = int(re.findall(r"([\d,]+) decoded", stderr)[-1].replace(",", ""))

    receiver, stderr = deliver_the_spool(tmp_path)
    received = records(receiver.output)
    assert len(received) == read  # every frame the agent decoded, the open batch's too
    check_prefix(received, decoded(tmp_path, "rav4"))
    check_in_order(tmp_path / "received.batches")


def test_a_damaged_spool_delivers_every_intact_batch(tmp_path: Path) -> None:
    # The whole log is read and spooled, the link stays down: the agent gives up after 1 s
    # and exits 1, leaving its batches in the spool.
    down = uplink_mqtt(free_port()).replace("drain_timeout_s = 60", "drain_timeout_s = 1")
    code, stderr = AgentProcess(write_config(tmp_path, "rav4", down)).wait()
    assert code == 1 and "stay in the spool" in stderr, stderr
    spool = tmp_path / "state" / "spool"
    frames = spooled_frames(spool)
    segment = sorted(spool.glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    records_in_segment = scan_segment(memoryview(bytes(data)))[0]
    # A bit flipped in the first record's payload, and the last record cut in half.
    first, first_length, *_ = records_in_segment[0]
    data[first + RECORD.size + first_length // 2] ^= 0x10
    last, _, last_sequence, *_ = records_in_segment[-1]
    segment.write_bytes(data[: last + (len(data) - last) // 2])

    receiver, stderr = deliver_the_spool(tmp_path)
    assert "1 torn and 1 corrupt records" in stderr
    [sequences] = first_arrivals(tmp_path / "received.batches").values()
    assert sequences == sorted(sequences)
    lost = set(frames) - set(sequences)
    assert last_sequence in lost and len(lost) == 2  # the cut one and the flipped one
    received = records(receiver.output)
    assert len(received) == sum(frames.values()) - sum(frames[s] for s in lost)
    assert not canonical(received) - canonical(decoded(tmp_path, "rav4"))
    assert list((spool / "damaged").iterdir())


def test_a_long_outage_with_a_small_spool_keeps_the_newest(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, "rav4", uplink_mqtt(port))
    config.write_text(
        config.read_text()
        + "[batch]\nmax_bytes = 8192\n[spool]\nmax_bytes = 65536\nmemory_bytes = 16384\n"
    )
    # The receiver's session is made before the outage, so that it gets what the agent
    # sends the moment the broker is back, before the receiver itself reconnects.
    mqtt = Broker(port, tmp_path, persistent_settings(tmp_path))
    mqtt.start()
    receiver = mqtt_receiver(tmp_path, mqtt.url)
    mqtt.stop(graceful=True)
    agent = AgentProcess(config)
    peak = 0
    deadline = time.monotonic() + 5  # the whole log is read meanwhile, the link down
    while time.monotonic() < deadline:
        status = Path(f"/proc/{agent.process.pid}/status").read_text()
        peak = max(peak, int(re.search(r"VmRSS:\s+(\d+)", status)[1]))  # type: ignore[index]
        time.sleep(0.2)
    mqtt.start()
    try:
        code, stderr = agent.wait()
        assert code == 0, stderr
        finish(receiver)
    finally:
        mqtt.stop()
    dropped = int(re.findall(r"([\d,]+) dropped \(spool_full\)", stderr)[-1].replace(",", ""))
    built = int(re.findall(r"([\d,]+) batches,", stderr)[-1].replace(",", ""))
    sequences = check_in_order(tmp_path / "received.batches", first=dropped + 1)
    assert sequences[-1] == built  # the newest arrived, the oldest were dropped and counted
    assert dropped > built / 2
    check_suffix(records(receiver.output), decoded(tmp_path, "rav4"))
    assert peak < 200_000  # kB: the spool's memory is bounded, whatever the outage


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
async def test_failing_spool_writes_do_not_stop_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, code: int
) -> None:
    """The disk fails while the link is down too: the agent holds the batches in memory,
    writes them once the disk takes writes again, and sends them once the link is back."""
    failing = True
    write_all = spool_module._write_all

    def write(fd: int, parts: list[bytes]) -> None:
        if failing:
            raise OSError(code, "injected")
        write_all(fd, parts)

    monkeypatch.setattr(spool_module, "_write_all", write)
    outbox = tmp_path / "outbox"
    outbox.write_text("")  # a file where the folder should be: the uplink cannot connect
    config = load_config(
        write_config(tmp_path, "rav4", f'[uplink]\nkind = "file"\nurl = "{outbox}"\n', pace=20)
    )
    agent = Agent(config, status=None)
    running = asyncio.create_task(agent.run())
    await asyncio.sleep(1.5)
    failing = False
    await asyncio.sleep(2.5)  # the replay ends
    outbox.unlink()
    assert await asyncio.wait_for(running, 60) == 0
    errors = agent.metrics.registry.get_sample_value(
        "telemetry_agent_spool_disk_errors_total", {"operation": "write"}
    )
    assert errors and errors > 0
    assert "holding batches in memory" in caplog.text
    assert "writing to disk again" in caplog.text
    receiver_out = tmp_path / "received.jsonl"
    with open(receiver_out, "w") as out:
        receiver = Receiver(JsonLinesSink(out))
        accept_files(receiver, outbox, set())
        receiver.flush()
    assert canonical(records(receiver_out)) == canonical(decoded(tmp_path, "rav4"))


def test_state_dir_is_where_the_spool_lives(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, "tesla", f'[uplink]\nkind = "file"\nurl = "{tmp_path / "out"}"\n'
    )
    first = AgentProcess(config).wait()
    assert first[0] == 0, first[1]
    state = json.loads((tmp_path / "state" / "spool" / "state.json").read_text())
    second = AgentProcess(config).wait()
    assert second[0] == 0, second[1]
    again = json.loads((tmp_path / "state" / "spool" / "state.json").read_text())
    assert again["stream_id"] == state["stream_id"]
    assert again["next_sequence"] > state["next_sequence"] > 1
    # The two runs' batches are one stream, numbered on: none is mistaken for a duplicate.
    names = sorted(p.name for p in (tmp_path / "out").glob("*.batch"))
    assert len(names) == again["next_sequence"] - 1
    assert {n.split("-")[0] for n in names} == {state["stream_id"]}
