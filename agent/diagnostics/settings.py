"""The `[[diagnostics]]` tables: which bus the agent asks, whom, what and how often.

Transmitting is a right the agent has only where a table gives it: a bus without one is
never written to, and a table on a bus marked `listen_only`, or read by a source that
cannot send (a replay, the simulation), is refused with the key that asks for it. A table
with `listen = true` asks nothing: it hears the answers to someone else's requests, on any
bus. This module only reads the config, so that `check-config` imports no CAN library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config import Checker, one_of, positive
from agent.diagnostics.pids import PIDS

if TYPE_CHECKING:
    from agent.config import BusConfig

#: Sources that can put a frame on their bus.
TRANSMITTING_SOURCES = ("socketcan", "python-can")
#: OBD-II requests name at most six PIDs (SAE J1979): ECUs answer a seventh with a negative
#: response, so larger poll groups are split.
MAX_PIDS_PER_REQUEST = 6
DTC_KINDS = ("stored", "pending", "permanent")
ADDRESSING = ("functional", "physical")
#: The functional (broadcast) request IDs of OBD-II.
FUNCTIONAL_11BIT = 0x7DF
FUNCTIONAL_29BIT = 0x18DB33F1

#: The keys that only asking gives a meaning to: refused with `listen = true`.
ASKING_KEYS = (
    "addressing",
    "poll",
    "discover",
    "vin",
    "dtcs",
    "dtc_interval_s",
    "uds_dtc_status_mask",
    "uds_snapshot_dids",
    "timeout_s",
    "max_requests_per_s",
)
DIAGNOSTICS_KEYS = {"bus", "listen", "extended", "ecus", *ASKING_KEYS}
POLL_KEYS = {"pids", "interval_s"}
SNAPSHOT_KEYS = {"did", "bytes"}
#: The widest snapshot value the answers' DBC holds.
MAX_SNAPSHOT_BYTES = 4


STREAM_SUFFIX = ".diagnostics"


def stream_name(bus: str) -> str:
    """The name of a bus's diagnostics stream, as records and metrics show it."""
    return bus + STREAM_SUFFIX


def no_stream(name: str) -> str:
    """Why a rule cannot select `name`, which is neither a bus nor a stream of answers."""
    bus = name.removesuffix(STREAM_SUFFIX)
    if bus != name:
        return (
            f"{name!r} is the stream of the ECUs' answers on bus {bus!r}, and no "
            f"[[diagnostics]] asks them (bus = {bus!r})"
        )
    return f"no [[bus]] is named {name!r}"


@dataclass(frozen=True)
class PollGroup:
    """PIDs of service 01 asked together, every `interval_s`."""

    pids: tuple[int, ...]
    interval_s: float


@dataclass(frozen=True)
class DiagnosticsConfig:
    bus: str
    #: hear the answers to requests that others send, never asking (agent/diagnostics/listener.py)
    listen: bool = False
    addressing: str = "functional"
    extended: bool = False  # 29-bit IDs (0x18DB33F1, 0x18DAxxF1) instead of 11-bit ones
    ecus: tuple[int, ...] = ()  # the ECUs' response IDs; () is the first engine ECU
    poll: tuple[PollGroup, ...] = ()
    discover: bool = True
    vin: bool = False
    dtcs: tuple[str, ...] = ()
    dtc_interval_s: float = 60.0
    uds_dtc_status_mask: int = 0  # 0: no UDS ReadDTCInformation
    #: the data identifiers of the snapshots (0x19 0x04) to read, with their sizes in bytes;
    #: none: no snapshots
    uds_snapshot_dids: tuple[tuple[int, int], ...] = ()
    timeout_s: float = 1.0
    max_requests_per_s: float = 10.0

    @property
    def responders(self) -> tuple[int, ...]:
        """The response IDs listened to: those configured, or the first engine ECU's."""
        if self.ecus:
            return self.ecus
        return (0x18DAF110,) if self.extended else (0x7E8,)

    @property
    def functional_id(self) -> int:
        return FUNCTIONAL_29BIT if self.extended else FUNCTIONAL_11BIT


def request_id(response_id: int, extended: bool) -> int:
    """The physical request ID of the ECU that answers on `response_id` (ISO 15765-4):
    0x7E8 + n answers 0x7E0 + n; 0x18DAF1xx answers 0x18DAxxF1."""
    if not extended:
        return response_id - 8
    ecu, tester = response_id & 0xFF, (response_id >> 8) & 0xFF
    return (response_id & 0x1FFF0000) | (ecu << 8) | tester


def ecu_problem(value: Any, extended: bool) -> str | None:
    """What is wrong with `value` as an ECU's response ID, or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected a response ID, got {value!r}"
    if extended:
        if value >> 16 != 0x18DA:
            return f"0x{value:X} is no 29-bit response ID (0x18DAF1xx)"
    elif not 0x7E8 <= value <= 0x7EF:
        return f"0x{value:X} is no 11-bit response ID (0x7E8 to 0x7EF)"
    return None


def parse_diagnostics(
    check: Checker, tables: Any, buses: Sequence[BusConfig]
) -> tuple[DiagnosticsConfig, ...]:
    """The [[diagnostics]] tables, with every problem added to `check`."""
    if not isinstance(tables, list):
        check.problems.append("diagnostics: expected [[diagnostics]] tables")
        return ()
    by_name = {bus.name: bus for bus in buses}
    made: list[DiagnosticsConfig] = []
    for k, data in enumerate(tables):
        where = f"diagnostics[{k}]"
        if not isinstance(data, dict):
            check.problems.append(f"{where}: expected a table")
            continue
        check.table(data, where, DIAGNOSTICS_KEYS)
        config = _table(check, data, where)
        bus = by_name.get(config.bus)
        if config.listen:
            for key in ASKING_KEYS:
                if key in data:
                    check.problems.append(
                        f"{where}.{key}: asks the ECUs, and a table with listen = true never "
                        "asks: it hears the answers to others' requests"
                    )
        if "bus" not in data:
            check.problems.append(f"{where}.bus: missing (the name of a [[bus]])")
        elif bus is None:
            check.problems.append(f"{where}.bus: no [[bus]] is named {config.bus!r}")
        elif config.listen:
            pass  # hearing transmits nothing: any bus, any source
        elif bus.listen_only:
            check.problems.append(
                f"{where}.bus: bus {bus.name!r} is listen_only: the agent never transmits "
                "on it, so it cannot ask its ECUs"
            )
        elif bus.source not in TRANSMITTING_SOURCES:
            check.problems.append(
                f"{where}.bus: bus {bus.name!r} is read by source {bus.source!r}, which "
                f"cannot transmit (only {' and '.join(TRANSMITTING_SOURCES)} can)"
            )
        if any(c.bus == config.bus for c in made):
            check.problems.append(f"{where}.bus: bus {config.bus!r} has another [[diagnostics]]")
        made.append(config)
    return tuple(made)


def _table(check: Checker, data: Mapping[str, Any], where: str) -> DiagnosticsConfig:
    defaults = DiagnosticsConfig(bus="")
    extended = check.get(data, where, "extended", bool, False)
    ecus: list[int] = []
    for n, value in enumerate(check.get(data, where, "ecus", list, [])):
        problem = ecu_problem(value, extended)
        if problem:
            check.problems.append(f"{where}.ecus[{n}]: {problem}")
        else:
            ecus.append(value)
    polls: list[PollGroup] = []
    for n, group in enumerate(check.get(data, where, "poll", list, [])):
        at = f"{where}.poll[{n}]"
        if not isinstance(group, dict):
            check.problems.append(f"{at}: expected a table {{pids = [...], interval_s = ...}}")
            continue
        check.table(group, at, POLL_KEYS)
        pids: list[int] = []
        for m, pid in enumerate(check.get(group, at, "pids", list, [])):
            if isinstance(pid, bool) or not isinstance(pid, int) or pid not in PIDS:
                check.problems.append(
                    f"{at}.pids[{m}]: {pid!r} is no service 01 PID the agent knows "
                    "(docs/diagnostics.md lists them)"
                )
            else:
                pids.append(pid)
        if "pids" not in group:
            check.problems.append(f"{at}.pids: missing (a list of service 01 PIDs)")
        interval = check.get(group, at, "interval_s", (int, float), 1.0, positive)
        polls.append(PollGroup(tuple(dict.fromkeys(pids)), float(interval)))
    dtcs: list[str] = []
    for n, kind in enumerate(check.get(data, where, "dtcs", list, [])):
        if kind not in DTC_KINDS:
            check.problems.append(f"{where}.dtcs[{n}]: must be one of {', '.join(DTC_KINDS)}")
        else:
            dtcs.append(kind)
    mask = check.get(
        data,
        where,
        "uds_dtc_status_mask",
        int,
        0,
        lambda v: None if 0 <= v <= 0xFF else "must be 0 to 0xFF",
    )
    dids: list[tuple[int, int]] = []
    for n, item in enumerate(check.get(data, where, "uds_snapshot_dids", list, [])):
        at = f"{where}.uds_snapshot_dids[{n}]"
        if not isinstance(item, dict):
            check.problems.append(f"{at}: expected a table {{did = 0xF40C, bytes = 2}}")
            continue
        check.table(item, at, SNAPSHOT_KEYS)
        did = check.get(
            item, at, "did", int, -1, lambda v: None if 0 <= v <= 0xFFFF else "must be 0 to 0xFFFF"
        )
        size = check.get(
            item,
            at,
            "bytes",
            int,
            0,
            lambda v: (
                None if 1 <= v <= MAX_SNAPSHOT_BYTES else f"must be 1 to {MAX_SNAPSHOT_BYTES}"
            ),
        )
        for key in SNAPSHOT_KEYS - set(item):
            check.problems.append(f"{at}.{key}: missing")
        if did >= 0 and size:
            dids.append((did, size))
    if dids and not mask:
        check.problems.append(f"{where}.uds_snapshot_dids: needs uds_dtc_status_mask")
    addressing = check.get(data, where, "addressing", str, "functional", one_of(ADDRESSING))
    return DiagnosticsConfig(
        bus=check.get(data, where, "bus", str, ""),
        listen=check.get(data, where, "listen", bool, False),
        addressing=addressing,
        extended=extended,
        ecus=tuple(dict.fromkeys(ecus)),
        poll=tuple(polls),
        discover=check.get(data, where, "discover", bool, defaults.discover),
        vin=check.get(data, where, "vin", bool, defaults.vin),
        dtcs=tuple(dict.fromkeys(dtcs)),
        dtc_interval_s=float(
            check.get(data, where, "dtc_interval_s", (int, float), 60.0, positive)
        ),
        uds_dtc_status_mask=mask,
        uds_snapshot_dids=tuple(dids),
        timeout_s=float(check.get(data, where, "timeout_s", (int, float), 1.0, positive)),
        max_requests_per_s=float(
            check.get(data, where, "max_requests_per_s", (int, float), 10.0, positive)
        ),
    )
