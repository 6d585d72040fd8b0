"""The vehicle's campaigns: each offered document verified, checked against this vehicle's
buses and DBCs, kept in state_dir, and its state (waiting, active, expired...) kept by the
agent's clock. No I/O but the state folder: the control link (agent/campaigns/link.py)
brings documents in and takes check-ins out."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.campaigns.document import (
    CampaignError,
    Document,
    document_name,
    parse_public_key,
    verify,
)
from agent.collect.rules import CollectRule, parse_rules
from agent.config import BusConfig, Checker, Config
from agent.diagnostics.settings import no_stream
from agent.diagnostics.streams import answers_hints
from agent.durable import write_atomically

if TYPE_CHECKING:
    from agent.decode import Decoder
    from agent.decode.decoder import BusDbcs

log = logging.getLogger(__name__)

#: The states of a campaign on a vehicle, as check-ins give them.
STATES = ("accepted", "rejected", "waiting", "active", "expired", "removed")
#: The states whose rules are to run (at the right time): those of an accepted campaign.
_SCHEDULED = ("accepted", "waiting", "active", "expired")
#: Between a campaign's name and its rule's in the records: `campaign/rule`.
SEPARATOR = "/"


def utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Entry:
    """One campaign name on this vehicle: the document it runs (or ran), its state since
    when, and the last document refused for it."""

    name: str
    state: str
    since: float
    document: Document | None = None
    rules: tuple[CollectRule, ...] = ()
    errors: list[str] = field(default_factory=list)
    rejected: dict[str, Any] | None = None  # a refusal while another version runs
    waiting: dict[str, Any] | None = None  # a version that waits for its DBC files

    def report(self) -> dict[str, Any]:
        doc = self.document
        out: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "since": utc(self.since),
            "version": doc.version if doc else None,
            "hash": doc.hash if doc else None,
            "key": doc.key if doc else None,
        }
        if self.errors:
            out["errors"] = self.errors
        if self.rejected:
            out["rejected"] = self.rejected
        if self.waiting:
            out["waiting_for"] = self.waiting
        return out


class Campaigns:
    """The campaigns of one vehicle. `validate` raises CollectError (or ValueError) when
    rules do not fit the vehicle's DBCs, as check-config does for the file's rules.
    `answers`: the streams of the ECUs' answers (`can0.diagnostics`), which rules may
    select as they select buses, but which take no DBC files."""

    def __init__(
        self,
        folder: Path,
        keys: Iterable[str],
        buses: Iterable[str],
        validate: Callable[[tuple[CollectRule, ...], Mapping[str, list[Path]]], None],
        clock: Callable[[], float] = time.time,
        answers: Iterable[str] = (),
    ) -> None:
        self.folder = folder
        self.keys = [parse_public_key(k) for k in keys]
        self.buses = set(buses)
        self.streams = self.buses | set(answers)  # what rules may select
        self.validate = validate
        self.clock = clock
        self.entries: dict[str, Entry] = {}
        #: Documents that wait for DBC files: name -> (document, its payload)
        self.pending: dict[str, tuple[Document, bytes]] = {}
        self.dbc_folder = folder / "dbc"

    # -- what runs ------------------------------------------------------------------------

    def rules(self) -> tuple[CollectRule, ...]:
        """The rules of the active campaigns, named `campaign/rule`."""
        return tuple(
            rule
            for name in sorted(self.entries)
            if self.entries[name].state == "active"
            for rule in self.entries[name].rules
        )

    def dbc_files(self) -> dict[str, list[Path]]:
        """The DBC files the active campaigns bring, per bus (each once)."""
        files: dict[str, list[Path]] = {}
        for name in sorted(self.entries):
            entry = self.entries[name]
            if entry.state == "active" and entry.document is not None:
                for bus, paths in self._dbc_paths(entry.document).items():
                    files.setdefault(bus, [])
                    files[bus] += [p for p in paths if p not in files[bus]]
        return files

    def _dbc_paths(self, doc: Document) -> dict[str, list[Path]]:
        return {
            bus: [self.dbc_folder / f"{h}.dbc" for h in hashes] for bus, hashes in doc.dbc.items()
        }

    def needed_dbc(self) -> set[str]:
        """The hashes of the DBC files that waiting documents need."""
        return {
            h
            for doc, _ in self.pending.values()
            for hashes in doc.dbc.values()
            for h in hashes
            if not (self.dbc_folder / f"{h}.dbc").is_file()
        }

    def add_dbc(self, digest: str, payload: bytes) -> bool:
        """A DBC file from the cloud, taken when a waiting document needs it and its bytes
        have that hash; the documents it completes are offered again. Whether anything
        changed."""
        if digest not in self.needed_dbc():
            return False
        if hashlib.sha256(payload).hexdigest() != digest:
            log.warning("DBC file %s refused: its bytes have another hash", digest[:12])
            return False
        self.dbc_folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.dbc_folder / f"{digest}.dbc", payload)
        needed = self.needed_dbc()
        for name, (doc, document) in list(self.pending.items()):
            if not any(h in needed for hashes in doc.dbc.values() for h in hashes):
                del self.pending[name]
                (self.folder / "pending" / f"{name}.json").unlink(missing_ok=True)
                self.offer(f"pending/{name}", document)
        return True

    def tick(self) -> bool:
        """Bring each accepted campaign's state to the clock; whether any changed."""
        now = self.clock()
        changed = False
        for entry in self.entries.values():
            if entry.state not in _SCHEDULED or entry.document is None:
                continue
            doc = entry.document
            if doc.expiry is not None and now >= doc.expiry:
                state = "expired"
            elif doc.start is not None and now < doc.start:
                state = "waiting"
            else:
                state = "active"
            if state != entry.state:
                log.info("campaign %s version %d: %s", entry.name, doc.version, state)
                entry.state, entry.since = state, now
                changed = True
        if changed:
            self._save_state()
        return changed

    def next_change(self) -> float | None:
        """When the clock next moves a campaign on (a start or an expiry to come)."""
        now = self.clock()
        times = [
            t
            for entry in self.entries.values()
            if entry.document is not None and entry.state in _SCHEDULED
            for t in (entry.document.start, entry.document.expiry)
            if t is not None and t > now
        ]
        return min(times, default=None)

    def checkin(self) -> list[dict[str, Any]]:
        return [self.entries[name].report() for name in sorted(self.entries)]

    # -- what comes in --------------------------------------------------------------------

    def offer(self, topic: str, payload: bytes) -> bool:
        """A document from the cloud; whether what the vehicle reports changed. A refused
        document changes nothing that runs: its entry (or the running campaign's
        `rejected`) says why."""
        if not payload:
            return False  # a retained message cleared: nothing is said by it
        claimed = topic.rpartition("/")[2] or document_name(payload) or "?"
        try:
            doc = verify(payload, self.keys)
            if doc.name != claimed:
                raise CampaignError(
                    [f"topic {topic} is for {claimed!r}, the document {doc.name!r}"]
                )
            running = self.entries.get(doc.name)
            if running is not None and running.document is not None:
                old = running.document
                if doc.hash == old.hash:
                    return False  # the same document again (retained, or per group)
                if doc.version <= old.version:
                    raise CampaignError(
                        [f"version {doc.version} is not newer than version {old.version}"]
                    )
            waiting = self.pending.get(doc.name)
            if waiting is not None and doc.hash == waiting[0].hash:
                return False
            if doc.kind == "campaign" and any(
                not p.is_file() for paths in self._dbc_paths(doc).values() for p in paths
            ):
                self._wait(doc, payload)
                return True
            rules = self.rules_of(doc)
        except CampaignError as error:
            return self._refuse(claimed, payload, error.problems)
        self._accept(doc, rules, payload)
        return True

    def _wait(self, doc: Document, payload: bytes) -> None:
        """Keep a document until the DBC files it needs have come; a running version of it
        runs on meanwhile."""
        pending = self.folder / "pending"
        pending.mkdir(parents=True, exist_ok=True)
        write_atomically(pending / f"{doc.name}.json", payload)
        self.pending[doc.name] = (doc, payload)
        missing = sorted(
            h
            for hashes in doc.dbc.values()
            for h in hashes
            if not (self.dbc_folder / f"{h}.dbc").is_file()
        )
        waiting = {"version": doc.version, "hash": doc.hash, "dbc": missing}
        log.info("campaign %s version %d waits for DBC files %s", doc.name, doc.version, missing)
        entry = self.entries.get(doc.name)
        if entry is not None and entry.document is not None:
            entry.waiting = waiting
        else:
            self.entries[doc.name] = Entry(doc.name, "waiting", self.clock(), waiting=waiting)
        self._save_state()

    def rules_of(
        self, doc: Document, dbc: Mapping[str, list[Path]] | None = None
    ) -> tuple[CollectRule, ...]:
        """The campaign's rules checked against this vehicle (its buses, its DBCs and the
        campaign's own, `dbc` or those kept in the folder), named `campaign/rule`;
        CampaignError with every problem."""
        if doc.kind == "removal":
            return ()
        problems = [f"buses: {no_stream(b)}" for b in doc.buses if b not in self.streams]
        problems += [f"dbc: no [[bus]] is named {b!r}" for b in doc.dbc if b not in self.buses]
        if problems:
            raise CampaignError(problems)  # and not again for each rule that targets them
        tables = [
            {"buses": list(doc.buses), **table} if doc.buses else dict(table)
            for table in doc.collect
        ]
        check = Checker(self.folder)
        parsed = parse_rules(check, tables, self.streams)
        if check.problems:
            raise CampaignError(check.problems)
        rules = tuple(replace(r, name=f"{doc.name}{SEPARATOR}{r.name}") for r in parsed)
        try:
            self.validate(rules, self._dbc_paths(doc) if dbc is None else dbc)
        except ValueError as error:  # CollectError and DbcError are ones
            hints = answers_hints(rules, self.buses, self.streams)
            raise CampaignError([str(error), *hints]) from None
        return rules

    def _accept(self, doc: Document, rules: tuple[CollectRule, ...], payload: bytes) -> None:
        now = self.clock()
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / f"{doc.name}.json", payload)
        state = "removed" if doc.kind == "removal" else "accepted"
        log.info("campaign %s version %d %s (%s)", doc.name, doc.version, state, doc.hash[:12])
        self.entries[doc.name] = Entry(doc.name, state, now, doc, rules)
        self.tick()
        self._save_state()

    def _refuse(self, name: str, payload: bytes, problems: list[str]) -> bool:
        now = self.clock()
        log.warning("campaign %s refused: %s", name, "; ".join(problems))
        entry = self.entries.get(name)
        if entry is not None and entry.document is not None:
            entry.rejected = {"since": utc(now), "errors": problems}
        else:
            self.entries[name] = Entry(name, "rejected", now, errors=problems)
        self._save_state()
        return True

    # -- the state folder -----------------------------------------------------------------

    def load(self) -> None:
        """The campaigns kept in the folder, verified again (a key taken out of the config
        since then no longer vouches for them), with their states' times."""
        saved: dict[str, Any] = {}
        state_file = self.folder / "state.json"
        if state_file.is_file():
            try:
                saved = {e["name"]: e for e in json.loads(state_file.read_text())}
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("campaigns: %s unreadable (%s); states start again", state_file, error)
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else ():
            if path.name == "state.json":
                continue
            payload = path.read_bytes()
            self.offer(f"stored/{path.stem}", payload)
        for path in sorted((self.folder / "pending").glob("*.json")):
            self.offer(f"pending/{path.stem}", path.read_bytes())
        for name, entry in self.entries.items():
            was = saved.get(name)
            if (
                was
                and was.get("state") == entry.state
                and was.get("hash") == entry.report()["hash"]
            ):
                entry.since = dt.datetime.fromisoformat(was["since"]).timestamp()
        for name, was in saved.items():
            if name not in self.entries and was.get("state") == "rejected":
                since = dt.datetime.fromisoformat(was["since"]).timestamp()
                self.entries[name] = Entry(name, "rejected", since, errors=was.get("errors", []))
        self._save_state()

    def _save_state(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / "state.json", json.dumps(self.checkin(), indent=1).encode())


def vehicle_campaigns(
    config: Config, answers: Sequence[BusDbcs], own: Mapping[str, Decoder] | None = None
) -> Campaigns:
    """A vehicle's campaigns as its config makes them: its buses and the streams of its
    ECUs' answers (`answers`, from diagnostics_streams), which rules select as buses, and
    the config's own DBC files and the answers' to check rules against (`own`: their
    decoders, made when None)."""
    from agent.decode import bus_decoders, default_cache_dir

    def decoded(extra: Mapping[str, list[Path]]) -> list[BusDbcs]:
        return [*with_dbc(config.buses, extra), *answers]

    if own is None:
        own = bus_decoders(decoded({}), default_cache_dir())
    return Campaigns(
        config.state_dir / "campaigns",
        config.campaigns.keys,
        [bus.name for bus in config.buses],
        fits_dbcs(own, decoded),
        answers=[stream.name for stream in answers],
    )


def fits_dbcs(
    own: Mapping[str, Decoder],
    decoded: Callable[[Mapping[str, list[Path]]], Iterable[BusDbcs]],
) -> Callable[[tuple[CollectRule, ...], Mapping[str, list[Path]]], None]:
    """The `validate` of Campaigns: a campaign's rules must find their signals in the
    config's own DBC files (`own`, their decoders) and in those the campaign brings
    (`decoded(extra)`: what is decoded with them), never in another campaign's. Raises
    CollectError where they do not, ValueError for a DBC file that does not load."""
    from agent.collect import Collector
    from agent.decode import DbcError, bus_decoders, default_cache_dir

    def fits(rules: tuple[CollectRule, ...], extra: Mapping[str, list[Path]]) -> None:
        fitted = own
        if extra:
            try:
                fitted = bus_decoders(decoded(extra), default_cache_dir())
            except DbcError as error:
                raise ValueError(str(error)) from None
        Collector(rules, fitted)

    return fits


def with_dbc(buses: Iterable[BusConfig], extra: Mapping[str, list[Path]]) -> list[BusConfig]:
    """The buses with the DBC files campaigns bring added after their own."""
    return [
        replace(bus, dbc=(*bus.dbc, *(p for p in extra.get(bus.name, ()) if p not in bus.dbc)))
        for bus in buses
    ]


#: The file's rules when it has none: every decoded signal, as without any rule, so a
#: campaign adds to what the vehicle sends and never narrows it.
EVERY_SIGNAL = CollectRule(name="", mode="all", signals=("*",))


def combined(
    file_rules: tuple[CollectRule, ...], campaign_rules: tuple[CollectRule, ...]
) -> tuple[CollectRule, ...]:
    """The rules to run: the config file's, always, and the active campaigns'."""
    if not campaign_rules:
        return file_rules
    return (*(file_rules or (EVERY_SIGNAL,)), *campaign_rules)
