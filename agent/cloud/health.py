"""`telemetry-agent health`: the health reports of vehicles (their metrics and warning
lines, docs/campaigns.md), as they come, through a broker or a receiver's gRPC server."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cloud.control import control_client, control_options, link_errors, target


async def follow(args: argparse.Namespace) -> int:
    """How many reports were printed: --count of them, or as many as came until
    --timeout."""
    printed = 0
    async with control_client(args) as fleet:
        async for report in fleet.health(args.vehicle):
            print(json.dumps(report, sort_keys=True), flush=True)
            printed += 1
            if printed == args.count:
                break
    return printed


def run_health(args: argparse.Namespace) -> int:
    import asyncio

    try:
        printed = asyncio.run(asyncio.wait_for(follow(args), args.timeout))
    except TimeoutError:
        if args.count:
            print(
                f"telemetry-agent health: fewer than {args.count} reports within {args.timeout} s",
                file=sys.stderr,
            )
            return 1
        return 0
    except link_errors() as error:
        print(f"telemetry-agent health: {target(args)}: {error}", file=sys.stderr)
        return 1
    return 0 if printed == args.count or not args.count else 1


def add_parser(commands: Any) -> None:
    health = commands.add_parser(
        "health",
        help="print the health reports of vehicles as they come",
        description="Each health report (a vehicle's metrics and its warning and error log "
        "lines, sent every [health] interval_s) as one JSON line.",
    )
    control_options(health)
    health.add_argument(
        "--vehicle", action="append", default=[], help="only this vehicle; repeatable"
    )
    health.add_argument("--count", type=int, default=0, help="stop after this many reports")
    health.add_argument("--timeout", type=float, help="stop after this many seconds")
    health.set_defaults(handler=run_health)
