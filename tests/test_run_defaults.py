"""README's first command: `make run`, the agent on its embedded defaults."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from harness import REPO
from harness.outputs import records
from harness.services import agent_command


def test_the_embedded_defaults_run_and_stop_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    agent = subprocess.Popen(
        agent_command("run"),
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        scraped = ""
        for _ in range(100):  # bounded: the endpoint is up within a few seconds
            time.sleep(0.1)
            try:
                scraped = (
                    urllib.request.urlopen("http://127.0.0.1:9108/metrics", timeout=1)
                    .read()
                    .decode()
                )
                break
            except OSError:
                continue
        time.sleep(6)  # more than one status interval
    finally:
        agent.send_signal(signal.SIGINT)
        _, stderr = agent.communicate(timeout=30)
    assert agent.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "telemetry_agent_frames_received_total" in scraped
    assert stderr.count("frames (") >= 2  # status lines: one on the way, one at the end
    outbox = tmp_path / "state" / "outbox"
    assert list(outbox.glob("*.schema"))
    assert len(list(outbox.glob("*.batch"))) >= 5
    received = subprocess.run(
        agent_command(
            "receive",
            "--dir",
            str(outbox),
            "--idle-exit",
            "0.5",
            "--output",
            str(tmp_path / "out.jsonl"),
        ),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert "0 rejected" in received.stderr
    messages = {r["message"] for r in records(tmp_path / "out.jsonl")}
    assert {"EngineData", "VehicleSpeed", "BatteryCells", "GpsPosition"} <= messages
