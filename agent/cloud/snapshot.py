"""`telemetry-agent snapshot --vehicle ID [SIGNAL...]`: asks a vehicle for the last values
its agent decoded, over its control link, and prints the answer (docs/campaigns.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from agent.cloud.campaigns import broker_options, mqtt_client


async def ask(args: argparse.Namespace) -> dict[str, Any] | None:
    """The vehicle's answer, or None when none came within --timeout."""
    from agent.campaigns.link import SNAPSHOT_ANSWER, SNAPSHOT_REQUEST

    request = {"id": uuid.uuid4().hex, "signals": args.signals}
    async with mqtt_client(args) as client:
        await client.subscribe(SNAPSHOT_ANSWER.format(vehicle=args.vehicle), qos=1)
        topic = SNAPSHOT_REQUEST.format(vehicle=args.vehicle)
        await client.publish(topic, json.dumps(request).encode(), qos=1)
        deadline = time.monotonic() + args.timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(anext(client.messages), left)
            except TimeoutError:
                break
            answer: dict[str, Any] = json.loads(bytes(message.payload))
            if answer.get("id") == request["id"]:
                return answer
    return None


def run_snapshot(args: argparse.Namespace) -> int:
    import aiomqtt

    try:
        answer = asyncio.run(ask(args))
    except aiomqtt.MqttError as error:
        print(f"telemetry-agent snapshot: {args.mqtt}: {error}", file=sys.stderr)
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
    broker_options(snapshot)
    snapshot.add_argument("--vehicle", required=True, help="the vehicle to ask")
    snapshot.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    snapshot.add_argument("--json", action="store_true", help="the answer as it came")
    snapshot.set_defaults(handler=run_snapshot)
