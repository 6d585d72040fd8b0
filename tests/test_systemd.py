"""The agent under systemd: sd_notify over a real datagram socket (READY, STATUS, WATCHDOG,
RELOADING, STOPPING), SIGHUP reloads, and journald's priority prefix on stderr."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import parse_config, restart_changes
from agent.notify import Notifier
from agent.service import Agent
from agent.sources.socketcan import SocketCanSource
from harness import REPO
from harness.outputs import outbox_lines
from harness.services import agent_command

DEMO_DBC = REPO / "dbc" / "demo.dbc"


class SystemdSocket:
    """The notification socket systemd would hold: datagrams of KEY=value lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float) -> dict[str, str] | None:
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(fields)
        return fields

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20) -> dict[str, str]:
        """The next notification with `key` (and `value`), within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.next(max(0.01, deadline - time.monotonic()))
            if fields is not None and key in fields and value in (None, fields[key]):
                return fields
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s: {self.received}")

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[SystemdSocket]:
    listener = SystemdSocket(tmp_path / "notify")
    yield listener
    listener.close()


def test_notifications_reach_the_socket_and_nothing_happens_without_one(
    systemd: SystemdSocket,
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "4000000"})
    assert notifier.enabled and notifier.watchdog_s == 4.0
    notifier.notify(READY=1, STATUS="two\nlines")
    assert systemd.next(2) == {"READY": "1", "STATUS": "two lines"}
    notifier.close()
    quiet = Notifier({})
    assert not quiet.enabled and quiet.watchdog_s is None
    quiet.notify(READY=1)  # no socket: nothing, no error
    other = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify", "WATCHDOG_PID": "1"})
    assert other.watchdog_s is None  # the watchdog is another process's
    other.notify(READY=1)  # logged once, never raised


def test_an_abstract_socket_name_is_used_as_systemd_gives_it() -> None:
    name = f"telemetry-agent-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).notify(WATCHDOG=1)
        listener.settimeout(2)
        assert listener.recv(100) == b"WATCHDOG=1"
    finally:
        listener.close()


def config_text(folder: Path, outbox: str, extra: str = "") -> str:
    return (
        f'vehicle_id = "sd"\nstate_dir = "{folder / "state"}"\nstatus_interval_s = 0.5\n'
        f'[[bus]]\nname = "can0"\nsource = "simulate"\ndbc = ["{DEMO_DBC}"]\n'
        f'[batch]\nmax_age_ms = 200\n[uplink]\nkind = "file"\nurl = "{folder / outbox}"\n'
        f'[metrics]\nlisten = ""\n{extra}'
    )


def received(outbox: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in outbox_lines(outbox)]


def test_the_agent_under_systemd_notifies_reloads_and_stops(
    tmp_path: Path, systemd: SystemdSocket
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(config_text(tmp_path, "outbox"))
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        status = os.fstat(err.fileno())
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(systemd.path),
            "WATCHDOG_USEC": "1000000",
            # stderr is the journal stream: lines get journald's priority prefix
            "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}",
        }
        agent = subprocess.Popen(
            agent_command("run", "--config", config), stderr=err, env=env, cwd=REPO
        )
    try:
        systemd.wait_for("READY", "1")
        systemd.wait_for("WATCHDOG", "1")
        assert "frames" in systemd.wait_for("STATUS")["STATUS"]

        # A valid change: a collection rule, another outbox, another status interval; and a
        # key that needs a restart, which keeps its running value.
        config.write_text(
            config_text(
                tmp_path,
                "outbox2",
                '[[collect]]\nname = "speed"\nmode = "sample"\nsignals = ["Speed"]\n'
                "period_ms = 1000\n",
            ).replace('vehicle_id = "sd"', 'vehicle_id = "other"')
        )
        agent.send_signal(signal.SIGHUP)
        systemd.wait_for("RELOADING", "1")
        systemd.wait_for("READY", "1")
        # Batches spooled before the reload and not yet sent go to the new outbox too, ahead
        # of the new rule's: from its first record on, every record is the rule's.
        deadline = time.monotonic() + 20
        records: list[dict[str, object]] = []
        while time.monotonic() < deadline and not records:
            sent = received(tmp_path / "outbox2")
            ruled = [row for row, record in enumerate(sent) if record.get("rule") == "speed"]
            records = sent[ruled[0] :] if ruled else []
            time.sleep(0.2)
        assert records and all(r.get("rule") == "speed" for r in records)
        assert {str(r["vehicle"]) for r in records} == {"sd"}
        signals = records[0]["signals"]
        assert isinstance(signals, dict) and set(signals) == {"Speed"}

        # An invalid config is refused and the running one goes on.
        config.write_text(
            config_text(tmp_path, "outbox3").replace("max_age_ms = 200", "max_age_ms = -1")
        )
        agent.send_signal(signal.SIGHUP)
        systemd.wait_for("RELOADING", "1")
        systemd.wait_for("READY", "1")
        systemd.wait_for("WATCHDOG", "1")
        assert agent.poll() is None
        before = len(received(tmp_path / "outbox2"))
        time.sleep(1.0)
        assert len(received(tmp_path / "outbox2")) > before
        assert not (tmp_path / "outbox3").exists()

        agent.send_signal(signal.SIGTERM)
        systemd.wait_for("STOPPING", "1")
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    lines = stderr.read_text().splitlines()
    assert lines and all(line.startswith(("<3>", "<4>", "<6>", "<7>")) for line in lines), lines
    text = "\n".join(lines)
    assert "<6>telemetry-agent: INFO: reloaded" in text
    assert "<4>telemetry-agent: WARNING: reload: vehicle_id changed, which takes a restart" in text
    assert "<3>telemetry-agent: ERROR: reload refused, the running config stays:" in text
    assert "batch.max_age_ms: must be greater than 0" in text


async def test_the_watchdog_goes_quiet_when_batches_stop_being_checked(
    tmp_path: Path, systemd: SystemdSocket, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "400000"})
    config = parse_config(config_text(tmp_path, "outbox"), "agent.toml", tmp_path)
    agent = Agent(config, status=None, notifier=notifier)
    checks = agent.batcher.run

    async def stuck_after_a_second() -> None:
        """The batch-age task as if it hung after a second (a blocked loop, a bug)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(checks(), 1.0)
        await asyncio.Event().wait()

    agent.batcher.run = stuck_after_a_second  # type: ignore[method-assign]
    running = asyncio.create_task(agent.run())
    try:
        fields = await asyncio.to_thread(systemd.wait_for, "WATCHDOG", "1", 10)
        assert fields == {"WATCHDOG": "1"}
        for _ in range(40):  # bounded: the watchdog looks every 0.2 s
            await asyncio.sleep(0.1)
            if "no progress" in caplog.text:
                break
        assert "no progress (batch ages unchecked for" in caplog.text
        # Drain what came before the watchdog noticed (bounded); then no WATCHDOG comes.
        for _ in range(200):
            if await asyncio.to_thread(systemd.next, 0.3) is None:
                break
        systemd.received.clear()
        deadline = time.monotonic() + 1.2  # six watchdog rounds
        while time.monotonic() < deadline:
            await asyncio.to_thread(systemd.next, 0.1)
        assert {"WATCHDOG": "1"} not in systemd.received
        assert any("STATUS" in fields for fields in systemd.received)  # the agent is alive
    finally:
        agent.stop()
        await running


async def test_ready_waits_until_the_bus_interfaces_were_tried(
    tmp_path: Path, systemd: SystemdSocket
) -> None:
    """Frames sent once `systemctl start` returns must reach the agent: READY comes only
    once each SocketCAN interface is bound, or found missing (which the agent retries)."""
    text = config_text(tmp_path, "outbox").replace('source = "simulate"', 'source = "socketcan"')
    text += f'[[bus]]\nname = "can1"\nsource = "socketcan"\ndbc = ["{DEMO_DBC}"]\n'
    notifier = Notifier({"NOTIFY_SOCKET": str(systemd.path)})
    agent = Agent(parse_config(text, "agent.toml", tmp_path), status=None, notifier=notifier)
    opening, missing = agent.sources
    assert isinstance(opening, SocketCanSource) and isinstance(missing, SocketCanSource)
    release = threading.Event()
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def slow_to_bind() -> socket.socket:
        release.wait(10)
        return reader

    def no_such_device() -> socket.socket:
        raise OSError(errno.ENODEV, "No such device")

    opening.open_socket = slow_to_bind
    missing.open_socket = no_such_device
    running = asyncio.create_task(agent.run())
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            await asyncio.to_thread(systemd.next, 0.1)
        assert missing.tried.is_set()
        assert not any("READY" in fields for fields in systemd.received)
        release.set()
        await asyncio.to_thread(systemd.wait_for, "READY", "1", 10)
        assert opening.tried.is_set()
    finally:
        release.set()
        agent.stop()
        await running
        writer.close()


def test_a_reload_names_the_keys_that_need_a_restart(tmp_path: Path) -> None:
    running = parse_config(config_text(tmp_path, "outbox"), "agent.toml", tmp_path)
    loaded = parse_config(
        config_text(tmp_path, "outbox2", "[spool]\nmax_bytes = 1048576\n")
        .replace('source = "simulate"', 'source = "simulate"\nseed = 3')
        .replace('listen = ""', 'listen = "127.0.0.1:9999"'),
        "agent.toml",
        tmp_path,
    )
    assert restart_changes(running, loaded) == [
        "bus[0].seed",
        "spool.max_bytes",
        "metrics.listen",
    ]
    assert restart_changes(running, running) == []


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            "",
            {(i, False) for i in (256, 257, 258, 259, 512, 513, 768)} | {(0x18FF50E5, True)},
        ),
        (
            '[[collect]]\nname = "s"\nmode = "sample"\nsignals = ["Speed"]\nperiod_ms = 100\n',
            {(257, False)},
        ),
        (
            '[[collect]]\nname = "t"\nmode = "trigger"\nwhen = "EngineSpeed > 3000"\n'
            'signals = ["WheelSpeedFL"]\n[[collect]]\nname = "r"\nmode = "raw"\nids = [2015]\n',
            {(256, False), (258, False), (2015, False), (2015, True)},
        ),
        ('[[collect]]\nname = "r"\nmode = "raw"\n', None),
    ],
)
def test_sources_learn_which_frames_the_agent_uses(
    tmp_path: Path, rules: str, expected: set[tuple[int, bool]] | None
) -> None:
    """What a SocketCAN source turns into kernel filters: the DBC's IDs without rules,
    those the rules read with them, and all of them for raw capture of everything."""
    agent = Agent(parse_config(config_text(tmp_path, "outbox", rules), "a.toml", tmp_path))
    (source,) = agent.sources
    assert source.frame_ids == (None if expected is None else frozenset(expected))
