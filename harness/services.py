"""Real services for the tests and benchmarks: a mosquitto broker on a free loopback port,
certificates, and the agent and receiver run as the user runs them."""

from __future__ import annotations

import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: The checkout, where the agent and the receiver run as a developer runs them.
from harness import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        raise RuntimeError("mosquitto is missing: `make test` installs it")
    return found


@dataclass
class Broker:
    port: int
    folder: Path
    settings: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.folder / "mosquitto.conf"
        # Started as root, mosquitto would switch to its own user, which cannot read the
        # test's private folder: it stays who started it.
        config.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n{self.settings}"
        )
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.folder / "mosquitto.log", "ab"),  # noqa: SIM115
        )
        wait_for_port(self.port)

    def stop(self, graceful: bool = False) -> None:
        """SIGKILL, or SIGTERM with `graceful` (mosquitto then saves its persistence)."""
        if self.process is not None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            self.process.wait(10)
            self.process = None


def persistent_settings(folder: Path) -> str:
    """mosquitto settings that keep sessions and queued messages on disk, saved every
    second, so that a receiver's subscription (`receive --session`) outlives a broker that
    is killed; no limit on the messages queued for a receiver that is catching up."""
    return (
        f"allow_anonymous true\npersistence true\npersistence_location {folder}/\n"
        "autosave_interval 1\nmax_queued_messages 1000000\n"
    )


@contextlib.contextmanager
def broker(folder: Path, settings: str = "allow_anonymous true\n") -> Iterator[Broker]:
    running = Broker(free_port(), folder, settings)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    )
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
        )
    return Certificates(
        folder / "ca.pem",
        folder / "server.pem",
        folder / "server.key",
        folder / "client.pem",
        folder / "client.key",
    )


def agent_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "agent", *map(str, args)]


def run_agent(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        agent_command("run", "--config", config),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


class ReceiverProcess:
    """`telemetry-agent receive ...` in the background, ready once it says it listens."""

    def __init__(self, output: Path, *args: str | Path) -> None:
        self.output = output
        self.stderr_path = output.with_suffix(".stderr")
        self.process = subprocess.Popen(
            agent_command("receive", *args, "--output", output),
            stdout=subprocess.DEVNULL,
            stderr=open(self.stderr_path, "w"),  # noqa: SIM115
            cwd=REPO,
        )

    def wait_ready(self, marker: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.stderr_path.read_text():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"receiver exited: {self.stderr_path.read_text()}")
            time.sleep(0.05)
        raise TimeoutError(f"receiver not ready: {self.stderr_path.read_text()}")

    def interrupt_once_quiet(self, quiet_s: float = 2.0, timeout: float = 30) -> None:
        """Ctrl-C once the output has not grown for `quiet_s` seconds (or after `timeout`):
        an end without --idle-exit, for a test whose link goes quiet for a while on purpose.
        `finish` then has its summary."""
        deadline = time.monotonic() + timeout
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline and self.process.poll() is None:
            now_size = self.output.stat().st_size if self.output.exists() else 0
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
            time.sleep(0.1)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 60) -> str:
        """Waits for the receiver's idle exit; its stderr."""
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
        return self.stderr_path.read_text()
