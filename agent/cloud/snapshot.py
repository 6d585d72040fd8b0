"""`telemetry-agent snapshot --vehicle ID [SIGNAL...]`: asks a vehicle for the last values
its agent decoded, over its control link (through a broker or a receiver's gRPC server), or
reads the last values its batches brought from the receivers' PostgreSQL, and prints the
answer (docs/campaigns.md)."""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from agent.cloud.control import control_client, control_options, link_errors, target
from agent.wire.snapshot import answer_signal, named


async def ask(args: argparse.Namespace) -> dict[str, Any] | None:
    """The vehicle's answer, or None when none came within --timeout."""
    request = {"id": uuid.uuid4().hex, "signals": args.signals}
    async with control_client(args) as fleet:
        return await fleet.snapshot(args.vehicle, request, args.timeout)


def stored(args: argparse.Namespace) -> dict[str, Any] | None:
    """The answer from the latest tables that receivers keep in PostgreSQL (docs/sinks.md),
    or None when they have no value of the vehicle. For a vehicle that is offline, or a
    dashboard that must not wake one: the values are as old as its last batch, without
    units, numbers as doubles."""
    from agent.cloud.sinks.postgres import latest_values

    rows = latest_values(args.postgres, args.postgres_schema, args.vehicle, args.timeout)
    if not rows:
        return None
    return {
        "signals": [
            answer_signal(bus, message, signal, value, "", t)
            for bus, message, signal, value, t in rows
            if named(args.signals, message, signal)
        ]
    }


def run_snapshot(args: argparse.Namespace) -> int:
    import asyncio

    if args.postgres:
        try:
            import psycopg
        except ImportError:
            print(
                "telemetry-agent snapshot: --postgres needs the cloud extra: "
                "pip install 'vehicle-telemetry-agent[cloud]'",
                file=sys.stderr,
            )
            return 1
        try:
            answer = stored(args)
        except psycopg.Error as error:
            print(f"telemetry-agent snapshot: PostgreSQL: {error}", file=sys.stderr)
            return 1
        if answer is None:
            print(
                f"telemetry-agent snapshot: no values of {args.vehicle} in PostgreSQL "
                f"(schema {args.postgres_schema})",
                file=sys.stderr,
            )
            return 1
        show(answer, args.json)
        return 0
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
    show(answer, args.json)
    return 0


def show(answer: dict[str, Any], as_json: bool) -> None:
    """The answer as it came (JSON), or as a table."""
    if as_json:
        print(json.dumps(answer, indent=1))
        return
    header = ["bus", "message", "signal", "value", "unit", "t"]
    rows = [
        [str(s[k]) for k in ("bus", "message", "signal", "value", "unit", "t")]
        for s in answer["signals"]
    ]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def add_parser(commands: Any) -> None:
    snapshot = commands.add_parser(
        "snapshot",
        help="ask a vehicle for the last values of signals",
        description="The last decoded value of each named signal (Signal, Message.Signal or "
        "globs; none: every signal), from a vehicle whose [campaigns] are on, or with "
        "--postgres as its last batches brought them.",
    )
    snapshot.add_argument("signals", nargs="*", metavar="SIGNAL")
    postgres = (
        "--postgres",
        "URL",
        "read the last values that receivers wrote into PostgreSQL instead of asking the "
        "vehicle (telemetry-agent receive --postgres; docs/sinks.md)",
    )
    control_options(snapshot, other=postgres)
    snapshot.add_argument(
        "--postgres-schema",
        default="telemetry",
        metavar="NAME",
        help="the receivers' PostgreSQL schema (default telemetry)",
    )
    snapshot.add_argument("--vehicle", required=True, help="the vehicle to ask")
    snapshot.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help="seconds to wait for the vehicle's answer, or for PostgreSQL",
    )
    snapshot.add_argument("--json", action="store_true", help="the answer as it came")
    snapshot.set_defaults(handler=run_snapshot)
