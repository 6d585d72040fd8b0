"""`telemetry-agent campaign keygen|check|sign|push|remove|status`: the cloud's half of
campaigns. Makes the signing key, checks campaign files against a vehicle's config, signs
them, publishes them retained to vehicles or groups, and reads the fleet's check-ins
(docs/campaigns.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.exits import EX_CONFIG


def _private_key(path: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def run_keygen(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.campaigns.document import key_id, public_key_text

    path = Path(args.output)
    if path.exists():
        print(f"telemetry-agent campaign keygen: {path} exists; not replaced", file=sys.stderr)
        return 1
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public = key.public_key()
    print(f"# key {key_id(public)}, private key in {path}; in each vehicle's config:")
    print(f'[campaigns]\nkeys = ["{public_key_text(public)}"]')
    return 0


def run_sign(args: argparse.Namespace) -> int:
    from agent.campaigns.document import CampaignError, document_from_toml, sign

    source = Path(args.campaign)
    try:
        text = source.read_text(encoding="utf-8")
        document = document_from_toml(text, str(source), source.parent)
        envelope = sign(document, _private_key(args.key))
    except CampaignError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except (OSError, ValueError) as error:
        print(f"telemetry-agent campaign sign: {error}", file=sys.stderr)
        return 1
    output = Path(args.output) if args.output else source.with_suffix(".signed.json")
    output.write_bytes(envelope)
    print(f"{output}: {document['name']} version {document['version']}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """A campaign file against a vehicle's config: its buses, its DBC files, and the
    streams of the answers of the ECUs it asks."""
    with tempfile.TemporaryDirectory() as folder:  # for the answers' DBC: no state_dir here
        return _check(args, Path(folder))


def _check(args: argparse.Namespace, answers_folder: Path) -> int:
    from agent.campaigns.document import (
        DBC_HASH,
        CampaignError,
        canonical,
        document_from_toml,
        document_of,
    )
    from agent.campaigns.manager import vehicle_campaigns
    from agent.config import ConfigError, load_config
    from agent.decode import DbcError
    from agent.diagnostics.streams import diagnostics_streams

    source = Path(args.campaign)
    try:
        config = load_config(args.config)
        # The streams of the ECUs' answers that the vehicle's [[diagnostics]] ask for.
        answers = diagnostics_streams(config, answers_folder)
        vehicle = vehicle_campaigns(config, answers)
        data = document_from_toml(source.read_text(encoding="utf-8"), str(source), source.parent)
    except ConfigError as error:
        for problem in error.problems:
            print(f"{error.source}: {problem}", file=sys.stderr)
        return EX_CONFIG
    except CampaignError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except (OSError, DbcError) as error:
        print(f"telemetry-agent campaign check: {error}", file=sys.stderr)
        return EX_CONFIG

    # The campaign's own DBC files, as its file names them (the document has their hashes).
    named = tomllib.loads(source.read_text(encoding="utf-8")).get("dbc", {})
    extra = {
        bus: [source.parent / f for f in files if not DBC_HASH.fullmatch(f)]
        for bus, files in named.items()
    }
    try:
        rules = vehicle.rules_of(document_of(data, canonical(data)), extra)
    except CampaignError as error:
        for problem in error.problems:
            print(f"{source}: {problem}", file=sys.stderr)
        return EX_CONFIG
    print(f"{source}: OK for {args.config} ({', '.join(r.name for r in rules)})")
    return 0


def _topics(args: argparse.Namespace, name: str) -> list[str]:
    from agent.campaigns.link import GROUP_TOPIC, VEHICLE_TOPIC

    return [VEHICLE_TOPIC.format(vehicle=v, name=name) for v in args.vehicle] + [
        GROUP_TOPIC.format(group=g, name=name) for g in args.group
    ]


async def _publish(args: argparse.Namespace, messages: list[tuple[str, bytes]]) -> None:
    from agent.cloud.control import mqtt_client

    if args.folder is not None:
        for topic, payload in messages:
            print(f"{_write_document(Path(args.folder), topic, payload)}: written")
        return
    async with mqtt_client(args) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, retain=True)
            print(f"{topic}: published")


def _write_document(folder: Path, topic: str, payload: bytes) -> Path:
    """A topic's document into the folder a gRPC receiver serves (`receive --campaigns`),
    laid out as the topics: written aside, then renamed into place, so that no call sends
    half of it."""
    path = folder / (topic + (".dbc" if topic.startswith("dbc/") else ".json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("wb") as out:
        out.write(payload)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    return path


def run_push(args: argparse.Namespace) -> int:
    from agent.campaigns.document import document_name

    if not args.vehicle and not args.group:
        print("telemetry-agent campaign push: name a --vehicle or a --group", file=sys.stderr)
        return 2
    messages = []
    for path in args.signed:
        payload = Path(path).read_bytes()
        name = document_name(payload)
        if name is None:
            print(f"{path}: not a signed campaign (`campaign sign` makes one)", file=sys.stderr)
            return EX_CONFIG
        messages += [(topic, payload) for topic in _topics(args, name)]
    from agent.campaigns.link import DBC_TOPIC

    # DBC files ahead of the campaigns that need them: once, for the whole fleet.
    dbc = [Path(path).read_bytes() for path in args.dbc]
    messages = [(DBC_TOPIC.format(hash=hashlib.sha256(d).hexdigest()), d) for d in dbc] + messages
    return _run(args, _publish(args, messages))


def run_remove(args: argparse.Namespace) -> int:
    from agent.campaigns.document import check_document, sign

    if not args.vehicle and not args.group:
        print("telemetry-agent campaign remove: name a --vehicle or a --group", file=sys.stderr)
        return 2
    removal = check_document({"kind": "removal", "name": args.name, "version": args.version})
    payload = sign(removal, _private_key(args.key))
    return _run(args, _publish(args, [(t, payload) for t in _topics(args, args.name)]))


def status_rows(checkins: Sequence[dict[str, Any]]) -> list[list[str]]:
    """vehicle, campaign, version, state, since: one row per campaign of each vehicle."""
    rows = []
    for checkin in checkins:
        for campaign in checkin.get("campaigns", []):
            state = campaign["state"]
            if campaign.get("errors"):
                state += f" ({'; '.join(campaign['errors'])})"
            elif campaign.get("rejected"):
                state += f", refused later: {'; '.join(campaign['rejected']['errors'])}"
            version = campaign.get("version")
            rows.append(
                [
                    str(checkin["vehicle"]),
                    str(campaign["name"]),
                    "-" if version is None else str(version),
                    state,
                    str(campaign["since"]),
                ]
            )
        if not checkin.get("campaigns"):
            rows.append([str(checkin["vehicle"]), "-", "-", "none", str(checkin.get("time", ""))])
    return rows


def run_status(args: argparse.Namespace) -> int:
    from agent.cloud.control import control_client

    checkins: list[dict[str, Any]] = []

    async def read() -> None:
        async with control_client(args) as fleet:
            checkins.extend(await fleet.checkins(args.vehicle))

    code = _run(args, read())
    if code:
        return code
    if args.json:
        print(json.dumps(checkins, indent=1))
        return 0
    header = ["vehicle", "campaign", "version", "state", "since"]
    rows = status_rows(checkins)
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4])
    return 0


def _run(args: argparse.Namespace, work: Any) -> int:
    import asyncio

    from agent.cloud.control import link_errors, target

    try:
        asyncio.run(work)
    except link_errors() as error:
        print(f"telemetry-agent campaign: {target(args)}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the folder of --folder
        print(f"telemetry-agent campaign: {error}", file=sys.stderr)
        return 1
    return 0


def _targets(parser: argparse.ArgumentParser) -> None:
    from agent.cloud.control import control_options

    # A receiver's campaigns are files it watches, not something to send it over gRPC.
    folder = (
        "--folder",
        "DIR",
        "the folder of a receiver that serves the vehicles' gRPC control calls "
        "(receive --campaigns DIR)",
    )
    control_options(parser, grpc=False, other=folder)
    parser.add_argument("--vehicle", action="append", default=[], help="a vehicle; repeatable")
    parser.add_argument(
        "--group", action="append", default=[], help="a group of vehicles; repeatable"
    )


def add_parser(commands: Any) -> None:
    """The `campaign` command and its subcommands, into the CLI's parser."""
    from agent.cloud.control import control_options

    campaign = commands.add_parser(
        "campaign",
        help="sign campaigns, push them to vehicles, read their check-ins",
        description="The cloud's half of campaigns (docs/campaigns.md).",
    )
    sub = campaign.add_subparsers(dest="action", required=True, metavar="ACTION")

    keygen = sub.add_parser("keygen", help="make a signing key pair")
    keygen.add_argument("--output", required=True, metavar="PATH", help="the private key (PEM)")
    keygen.set_defaults(handler=run_keygen)

    check = sub.add_parser("check", help="check a campaign file against a vehicle's config")
    check.add_argument("campaign", metavar="CAMPAIGN.toml")
    check.add_argument("--config", required=True, metavar="PATH", help="a vehicle's config")
    check.set_defaults(handler=run_check)

    sign = sub.add_parser("sign", help="check and sign a campaign file (TOML)")
    sign.add_argument("campaign", metavar="CAMPAIGN.toml")
    sign.add_argument("--key", required=True, metavar="PATH", help="the private key (PEM)")
    sign.add_argument("--output", metavar="PATH", help="default: CAMPAIGN.signed.json")
    sign.set_defaults(handler=run_sign)

    push = sub.add_parser("push", help="publish signed campaigns, retained")
    push.add_argument("signed", nargs="+", metavar="SIGNED.json")
    push.add_argument(
        "--dbc",
        action="append",
        default=[],
        metavar="PATH",
        help="a DBC file the campaigns name, published retained under its hash; repeatable",
    )
    _targets(push)
    push.set_defaults(handler=run_push)

    remove = sub.add_parser("remove", help="publish a signed removal, retained")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument(
        "--version", type=int, required=True, help="higher than the campaign's version"
    )
    remove.add_argument("--key", required=True, metavar="PATH", help="the private key (PEM)")
    _targets(remove)
    remove.set_defaults(handler=run_remove)

    status = sub.add_parser("status", help="the fleet's check-ins as a table")
    control_options(status)
    status.add_argument(
        "--vehicle", action="append", default=[], help="only this vehicle; repeatable"
    )
    status.add_argument("--json", action="store_true", help="the check-ins as they came")
    status.set_defaults(handler=run_status)
