"""The per-frame way, for comparison: python-can's log reader and cantools, frame by frame.

Usage: python -m bench.baseline_decode LOG --dbc BUS=PATH [--dbc BUS=PATH ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

# As the agent's CLI does: python-can would import asammdf (0.4 s here) for MF4 alone.
sys.modules.setdefault("asammdf", None)  # type: ignore[arg-type]

import can  # noqa: E402
import cantools  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--dbc", action="append", required=True)
    args = parser.parse_args()
    known: dict[tuple[str, int], Any] = {}
    for option in args.dbc:
        bus, _, path = option.partition("=")
        database: Any = cantools.database.load_file(path, strict=False)
        for message in database.messages:
            known.setdefault((bus, message.frame_id), message)
    started = time.perf_counter()
    frames = decoded = signals = 0
    for msg in can.CanutilsLogReader(args.log):
        frames += 1
        message = known.get((str(msg.channel), msg.arbitration_id))
        if message is not None:
            values = message.decode(bytes(msg.data), decode_choices=False, allow_truncated=True)
            decoded += 1
            signals += len(values)
    elapsed = time.perf_counter() - started
    print(
        f"{frames} frames, {decoded} decoded, {signals} signals in {elapsed:.3f} s", file=sys.stderr
    )


if __name__ == "__main__":
    main()
