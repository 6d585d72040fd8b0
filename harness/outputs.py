"""What the agent and the receiver leave behind, read back for the tests and benchmarks: the
receiver's JSON Lines, an outbox's batch files, a spool folder's batches, the agent's
Prometheus samples."""

from __future__ import annotations

import contextlib
import io
import json
import re
import urllib.request
from pathlib import Path

from agent.cloud.receiver import Receiver, accept_files
from agent.cloud.sinks.jsonl import JsonLinesSink
from agent.spool import RECORD, SEGMENT_HEADER, SEGMENT_SUFFIX, scan_segment
from agent.wire.envelope import WireError, read_envelope


def records(path: Path) -> list[dict[str, object]]:
    """JSON Lines records without the receiver's "vehicle", in a stable order (frames
    with one timestamp may come in another order from the receiver)."""
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        row.pop("vehicle", None)
        rows.append(row)
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


def outbox_lines(outbox: Path) -> list[str]:
    """The records of the batch files in `outbox`, as the receiver writes them (JSON lines),
    none of the files rejected."""
    out = io.StringIO()
    receiver = Receiver(JsonLinesSink(out))
    accept_files(receiver, outbox, set())
    receiver.flush()  # it writes in groups after taking the files
    assert receiver.stats.rejected == 0
    return out.getvalue().splitlines()


def scrape_metrics(port: int, timeout: float = 5) -> dict[str, float]:
    """The agent's Prometheus samples, by name with labels (`telemetry_agent_...{...}`);
    OSError when it does not answer."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(telemetry_agent_\S+) (\S+)$", text, re.MULTILINE)
    }


def spooled_frames(spool: Path) -> dict[int, int]:
    """Frames of each intact batch in a spool folder's segments, by sequence."""
    frames: dict[int, int] = {}
    for segment in sorted(spool.glob(f"*{SEGMENT_SUFFIX}")):
        data = segment.read_bytes()
        if len(data) < SEGMENT_HEADER.size:
            continue
        for offset, length, sequence, _, _ in scan_segment(memoryview(data))[0]:
            start = offset + RECORD.size
            with contextlib.suppress(WireError):
                frames[sequence] = read_envelope(data[start : start + length]).frames
    return frames
