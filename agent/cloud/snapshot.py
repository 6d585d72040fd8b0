"""`telemetry-agent snapshot --vehicle ID [SIGNAL...]`: asks a vehicle for the last values
its agent decoded, over its control link (through a broker or a receiver's gRPC server),
and prints the answer (docs/campaigns.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from agent.cloud.control import control_client, control_options, link_errors, target


async def ask(args: argparse.Namespace) -> dict[str, Any] | None:
    """The vehicle's answer, or None when none came within --timeout."""
    request = {"id": uuid.uuid4().hex, "signals": args.signals}
    async with control_client(args) as fleet:
        return await fleet.snapshot(args.vehicle, request, args.timeout)


def run_snapshot(args: argparse.Namespace) -> int:
    try:
        answer = asyncio.run(ask(args))
    except link_errors() as error:
        print(f"telemetry-agent snapshot: {target(args)}: {error}", file=sys.stderr)
        return 1
    if answer is None:
        print(
            f"telemetry-agent snapshot: no answer from {args.vehicle} within {args.timeout} s "
            "(offline, or campaigns are off in its config)",
            file=sys.stderr,
        )
        return 1
    if "error" in answer:
        print(f"telemetry-agent snapshot: {args.vehicle}: {answer['error']}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=1))
        return 0
    header = ["bus", "message", "signal", "value", "unit", "t"]
    rows = [
        [str(s[k]) for k in ("bus", "message", "signal", "value", "unit", "t")]
        for s in answer["signals"]
    ]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def add_parser(commands: Any) -> None:
    snapshot = commands.add_parser(
        "snapshot",
        help="ask a vehicle for the last values of signals",
        description="The last decoded value of each named signal (Signal, Message.Signal or "
        "globs; none: every signal), from a vehicle whose [campaigns] are on.",
    )
    snapshot.add_argument("signals", nargs="*", metavar="SIGNAL")
    control_options(snapshot)
    snapshot.add_argument("--vehicle", required=True, help="the vehicle to ask")
    snapshot.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    snapshot.add_argument("--json", action="store_true", help="the answer as it came")
    snapshot.set_defaults(handler=run_snapshot)
