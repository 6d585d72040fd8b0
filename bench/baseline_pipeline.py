"""The per-frame agent, for comparison: python-can's log reader, cantools' decode, one
protobuf message per frame, and a paho QoS 1 publish per frame, all acknowledged; every
frame of the log, as the agent reads. Issue 3's baseline.

Usage: python -m bench.baseline_pipeline LOG mqtt://HOST:PORT
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Any
from urllib.parse import urlsplit

# As the agent's CLI does: python-can would import asammdf (0.4 s here) for MF4 alone.
sys.modules.setdefault("asammdf", None)  # type: ignore[arg-type]

import can  # noqa: E402
import cantools  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.common import LOGS  # noqa: E402

#: Publishes awaiting their PUBACK at most: paho's message ids run to 65,535, and one still in
#: use refuses the publish (ERR_QUEUE_SIZE), so a log's worth cannot all be outstanding.
WINDOW = 10_000


def main() -> None:
    log, url = sys.argv[1], urlsplit(sys.argv[2])
    _, dbcs, _ = LOGS["rav4"]
    known: dict[tuple[str, int], Any] = {}
    for bus, paths in dbcs.items():
        for path in paths:
            database: Any = cantools.database.load_file(path, strict=False)
            for message in database.messages:
                known.setdefault((bus, message.frame_id), message)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-baseline")
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    client.loop_start()
    pending: deque[mqtt.MQTTMessageInfo] = deque()
    frames = decoded = 0
    for frame in can.CanutilsLogReader(log):
        frames += 1
        message = known.get((str(frame.channel), frame.arbitration_id))
        if message is None:
            continue
        values = message.decode(bytes(frame.data), decode_choices=False, allow_truncated=True)
        decoded += 1
        record = struct_pb2.Struct()
        record.update(
            {
                "t": frame.timestamp,
                "bus": str(frame.channel),
                "id": frame.arbitration_id,
                "message": message.name,
                "signals": {k: float(v) for k, v in values.items()},
            }
        )
        if len(pending) >= WINDOW:
            pending.popleft().wait_for_publish(30)
        pending.append(
            client.publish("vehicles/baseline/telemetry", record.SerializeToString(), qos=1)
        )
    for info in pending:
        info.wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    print(f"{frames} frames, {decoded} decoded", file=sys.stderr)


if __name__ == "__main__":
    main()
