"""The campaign document: TOML as its author writes it, a canonical JSON envelope on the
wire, signed with Ed25519 over the canonical bytes of the document.

Both ends share this module: the cloud signs with it, the vehicle verifies with it. The
envelope is `{"document": {...}, "key": KEY_ID, "signature": BASE64}`; the document's hash
(sha256 of its canonical bytes) names what a vehicle runs in its check-ins.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.config import Checker

#: The prefix of a public key as the config's `[campaigns] keys` and `keygen` write it.
KEY_PREFIX = "ed25519:"
KINDS = ("campaign", "removal")
DOCUMENT_KEYS = {"kind", "name", "version", "start", "expiry", "buses", "collect", "dbc"}
#: A DBC file as a campaign names it: the SHA-256 of its bytes, in hex.
DBC_HASH = re.compile(r"[0-9a-f]{64}")


class CampaignError(Exception):
    """A document that cannot be used: `problems` says each reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Document:
    """A verified (or, for the signer, checked) campaign or removal."""

    kind: str
    name: str
    version: int
    start: float | None = None  # Unix seconds
    expiry: float | None = None
    buses: tuple[str, ...] = ()  # the target; empty: every bus
    collect: tuple[Mapping[str, Any], ...] = ()  # the [[collect]] tables as written
    dbc: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # bus -> DBC hashes
    hash: str = ""  # sha256 hex of the canonical document
    key: str = ""  # the id of the key that signed it
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)


def canonical(value: Any) -> bytes:
    """The one byte form of a JSON value: keys sorted, no spaces, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def key_id(public: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]


def public_key_text(public: Ed25519PublicKey) -> str:
    return KEY_PREFIX + base64.b64encode(public.public_bytes_raw()).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A key as `ed25519:BASE64` of its 32 raw bytes; ValueError when it is not one."""
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"expected {KEY_PREFIX}BASE64, got {text!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX) :], validate=True)
    except binascii.Error:
        raise ValueError(f"not base64: {text!r}") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def _time(value: Any, where: str, problems: list[str]) -> str | None:
    """A TOML date-time (with its offset) as RFC 3339 in UTC, or None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            problems.append(f"{where}: expected an RFC 3339 time, got {value!r}")
            return None
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        problems.append(f"{where}: expected a time with its offset (2026-12-06T20:00:00Z)")
        return None
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def document_from_toml(text: str, source: str, base: Path | None = None) -> dict[str, Any]:
    """The document of a campaign file, checked and in canonical form; CampaignError with
    every problem, each naming the file and key. Its `[dbc]` files (paths relative to
    `base`) become their hashes."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise CampaignError([f"{source}: not valid TOML: {error}"]) from None
    data.setdefault("kind", "campaign")
    problems: list[str] = []
    if isinstance(data.get("dbc"), dict):
        data["dbc"] = {
            bus: [_dbc_hash(f, base, f"dbc.{bus}[{k}]", problems) for k, f in enumerate(files)]
            if isinstance(files, list)
            else files
            for bus, files in data["dbc"].items()
        }
    if problems:
        raise CampaignError([f"{source}: {p}" for p in problems])
    try:
        return check_document(data)
    except CampaignError as error:
        raise CampaignError([f"{source}: {p}" for p in error.problems]) from None


def _dbc_hash(value: Any, base: Path | None, where: str, problems: list[str]) -> Any:
    """A DBC file named in a campaign file: its hash (a hash stays as it is)."""
    if not isinstance(value, str) or DBC_HASH.fullmatch(value):
        return value
    path = Path(value) if base is None else base / value
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        problems.append(f"{where}: cannot read {path}: {error.strerror}")
        return value


def check_document(data: Any) -> dict[str, Any]:
    """The document's fields checked (not its rules against a vehicle's buses: that is
    the vehicle's part), in the canonical form that is signed."""
    if not isinstance(data, dict):
        raise CampaignError(["document: expected a table"])
    check = Checker(Path("."))
    check.table(data, "", DOCUMENT_KEYS)
    problems = check.problems
    kind = data.get("kind")
    if kind not in KINDS:
        problems.append(f"kind: must be one of {', '.join(KINDS)}; got {kind!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.append("name: missing")
    elif any(c in name for c in "/+#") or not name.isprintable():
        problems.append(f"name: {name!r} cannot be part of an MQTT topic")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        problems.append(f"version: expected a whole number of 1 or more, got {version!r}")
    document: dict[str, Any] = {"kind": kind, "name": name, "version": version}
    if kind == "removal":
        for key in ("start", "expiry", "buses", "collect", "dbc"):
            if key in data:
                problems.append(f"{key}: a removal has only a name and a version")
    else:
        start = _time(data.get("start"), "start", problems)
        expiry = _time(data.get("expiry"), "expiry", problems)
        if start and expiry and expiry <= start:
            problems.append("expiry: must come after start")
        buses = data.get("buses", [])
        if not isinstance(buses, list) or not all(isinstance(b, str) and b for b in buses):
            problems.append(f"buses: expected a list of bus names, got {buses!r}")
            buses = []
        collect = data.get("collect")
        if not isinstance(collect, list) or not collect:
            problems.append("collect: expected at least one [[collect]] table")
            collect = []
        else:
            from agent.collect.rules import parse_rules

            # The rules alone (their buses are the vehicle's to check).
            rule_check = Checker(Path("."))
            parse_rules(rule_check, collect, _AnyBus())
            problems += rule_check.problems
        dbc = data.get("dbc", {})
        if not isinstance(dbc, dict) or not all(
            isinstance(files, list)
            and all(isinstance(f, str) and DBC_HASH.fullmatch(f) for f in files)
            for files in dbc.values()
        ):
            problems.append(
                f"dbc: expected a table of bus names to lists of DBC files, got {dbc!r}"
            )
            dbc = {}
        document |= {"start": start, "expiry": expiry, "buses": buses, "collect": collect}
        if dbc:
            document["dbc"] = dbc
    if problems:
        raise CampaignError(problems)
    # Through JSON and back: dates and other TOML values become what the wire carries.
    loaded: dict[str, Any] = json.loads(canonical(_plain(document)))
    return loaded


class _AnyBus(set[str]):
    """Every bus name: the signer does not know the vehicles' buses."""

    def __contains__(self, item: object) -> bool:
        return True


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def sign(document: Mapping[str, Any], private: Ed25519PrivateKey) -> bytes:
    """The envelope of a checked document, signed."""
    body = canonical(document)
    return canonical(
        {
            "document": document,
            "key": key_id(private.public_key()),
            "signature": base64.b64encode(private.sign(body)).decode(),
        }
    )


def _seconds(text: str | None) -> float | None:
    return None if text is None else dt.datetime.fromisoformat(text).timestamp()


def verify(payload: bytes, keys: Sequence[Ed25519PublicKey]) -> Document:
    """The document of an envelope signed by one of `keys`; CampaignError saying why not
    (not JSON, unsigned, an unknown key, a bad signature, a bad document)."""
    try:
        envelope = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CampaignError([f"not a signed campaign (not JSON: {error})"]) from None
    if not isinstance(envelope, dict) or "document" not in envelope:
        raise CampaignError(["not a signed campaign: no document"])
    signature, signer = envelope.get("signature"), envelope.get("key")
    if not signature or not signer:
        raise CampaignError(["unsigned: no signature"])
    known = {key_id(k): k for k in keys}
    if signer not in known:
        raise CampaignError([f"signed by an unknown key {signer!r}: not in [campaigns] keys"])
    try:
        body = canonical(envelope["document"])
        known[signer].verify(base64.b64decode(signature, validate=True), body)
    except (InvalidSignature, binascii.Error, TypeError, ValueError):
        raise CampaignError([f"bad signature (key {signer}): the document was altered"]) from None
    return document_of(check_document(envelope["document"]), body, signer)


def document_of(data: Mapping[str, Any], body: bytes, key: str = "") -> Document:
    """A checked document's fields (`check_document`), `body` its signed bytes."""
    return Document(
        kind=data["kind"],
        name=data["name"],
        version=data["version"],
        start=_seconds(data.get("start")),
        expiry=_seconds(data.get("expiry")),
        buses=tuple(data.get("buses", ())),
        collect=tuple(data.get("collect", ())),
        dbc={bus: tuple(files) for bus, files in data.get("dbc", {}).items()},
        hash=hashlib.sha256(body).hexdigest(),
        key=key,
        raw=data,
    )


def document_name(payload: bytes) -> str | None:
    """The name an envelope claims, read without trusting it (for reporting a refusal)."""
    try:
        name = json.loads(payload)["document"]["name"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None
