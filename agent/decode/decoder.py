"""The decoder: frame batches in, per-message signal columns out, one vectorised pass per batch."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.decode.dbc import Dbc, load_dbc
from agent.decode.plan import MessageBlock, MessagePlan
from agent.frames import FrameBatch, FrameFlag

#: The bus name that stands for every bus, in the DBC mapping and in the J1939 list.
ALL_BUSES = "*"

_EXTENDED_KEY = 1 << 31


def j1939_pgn(can_id: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The parameter group number of 29-bit J1939 identifiers.

    In PDU1 (PF below 240) the PS byte is a destination address, not part of the PGN;
    in PDU2 it is the group extension. Priority and source address never are.
    """
    pf = (can_id >> 16) & 0xFF
    ps = (can_id >> 8) & 0xFF
    page = (can_id >> 24) & 0x3  # data page and extended data page
    return (page << 16) | (pf << 8) | np.where(pf >= 240, ps, 0)


def _message_key(plan: MessagePlan, j1939: bool) -> int:
    info = plan.info
    if not info.is_extended:
        return info.frame_id
    if j1939:
        return _EXTENDED_KEY | int(j1939_pgn(np.array([info.frame_id], np.int64))[0])
    return _EXTENDED_KEY | info.frame_id


@dataclass(slots=True)
class DecodedBatch:
    """What a frame batch decoded into, with the counts of what could not be decoded."""

    frames: int
    decoded: int
    unknown: int
    error_frames: int
    remote_frames: int
    blocks: list[MessageBlock] = field(default_factory=list)

    @property
    def signals(self) -> int:
        """Signal values decoded (present in their frames)."""
        return sum(column.count() for block in self.blocks for column in block.signals)


@dataclass(frozen=True, slots=True)
class _Lookup:
    """Every known message key of the buses of one bus table, sorted for searchsorted."""

    keys: npt.NDArray[np.int64]
    plans: list[tuple[str, MessagePlan]]
    j1939: npt.NDArray[np.bool_]  # per bus index


class Decoder:
    """Decodes frame batches with the DBC files of each bus.

    `dbcs` maps a bus name to its DBC files; the bus `"*"` gives DBCs for every bus (a
    bus's own DBCs win where both define an ID). Buses named in `j1939` (or `"*"`) match
    extended frames by PGN, so priority and source address may vary.
    """

    def __init__(
        self,
        dbcs: Mapping[str, Sequence[str | Path]],
        j1939: Iterable[str] = (),
        *,
        strict: bool = False,
    ) -> None:
        loaded: dict[Path, Dbc] = {}
        for paths in dbcs.values():
            for path in paths:
                key = Path(path).resolve()
                if key not in loaded:
                    loaded[key] = load_dbc(path, strict=strict)
        self.databases = list(loaded.values())
        self.warnings: list[str] = [w for db in self.databases for w in db.warnings]
        self._dbcs = {
            bus: [loaded[Path(p).resolve()] for p in paths] for bus, paths in dbcs.items()
        }
        self._j1939 = frozenset(j1939)
        self._bus_plans: dict[str, dict[int, MessagePlan]] = {}
        self._lookups: dict[tuple[str, ...], _Lookup] = {}

    def is_j1939(self, bus: str) -> bool:
        return bus in self._j1939 or ALL_BUSES in self._j1939

    def messages(self, bus: str) -> list[MessagePlan]:
        """The messages this decoder knows on `bus`."""
        return list(self._plans_of(bus).values())

    def _plans_of(self, bus: str) -> dict[int, MessagePlan]:
        plans = self._bus_plans.get(bus)
        if plans is None:
            plans = {}
            j1939 = self.is_j1939(bus)
            for db in [*self._dbcs.get(bus, []), *self._dbcs.get(ALL_BUSES, [])]:
                for plan in db.plans:
                    key = _message_key(plan, j1939)
                    other = plans.setdefault(key, plan)
                    if other is not plan:
                        self.warnings.append(
                            f"bus {bus}: {plan.info.dbc} message {plan.info.name} has the same "
                            f"{'PGN' if j1939 and plan.info.is_extended else 'ID'} as "
                            f"{other.info.dbc} message {other.info.name}, which is kept"
                        )
            self._bus_plans[bus] = plans
        return plans

    def _lookup(self, buses: tuple[str, ...]) -> _Lookup:
        lookup = self._lookups.get(buses)
        if lookup is None:
            entries = sorted(
                ((index << 32) | key, bus, plan)
                for index, bus in enumerate(buses)
                for key, plan in self._plans_of(bus).items()
            )
            lookup = _Lookup(
                keys=np.array([e[0] for e in entries], np.int64),
                plans=[(bus, plan) for _, bus, plan in entries],
                j1939=np.array([self.is_j1939(b) for b in buses], np.bool_),
            )
            self._lookups[buses] = lookup
        return lookup

    def decode(self, batch: FrameBatch) -> DecodedBatch:
        """Decode every frame of `batch` that a DBC of its bus knows."""
        n = len(batch)
        flags = batch.flags
        error = (flags & FrameFlag.ERROR) != 0
        remote = ((flags & FrameFlag.REMOTE) != 0) & ~error
        extended = (flags & FrameFlag.EXTENDED) != 0
        lookup = self._lookup(batch.buses)
        n_error, n_remote = int(np.count_nonzero(error)), int(np.count_nonzero(remote))
        if n == 0 or len(lookup.keys) == 0:
            return DecodedBatch(n, 0, n - n_error - n_remote, n_error, n_remote)

        ids = batch.can_id.astype(np.int64)
        if lookup.j1939.any():
            ids = np.where(lookup.j1939[batch.bus] & extended, j1939_pgn(ids), ids)
        keys = (batch.bus.astype(np.int64) << 32) | (extended.astype(np.int64) << 31) | ids
        position = np.minimum(np.searchsorted(lookup.keys, keys), len(lookup.keys) - 1)
        known = (lookup.keys[position] == keys) & ~error & ~remote
        # A narrow key makes numpy's stable sort a radix sort: one pass, no comparisons.
        dtype = np.int16 if len(lookup.keys) < 2**15 else np.int32
        message_index = np.where(known, position, -1).astype(dtype)
        order = np.argsort(message_index, kind="stable")
        grouped = message_index[order]
        first = int(np.searchsorted(grouped, 0))
        starts = [first, *(np.flatnonzero(np.diff(grouped[first:])) + first + 1).tolist()]
        ends = [*starts[1:], n]
        blocks = []
        if first < n:
            for start, end in zip(starts, ends, strict=True):
                bus, plan = lookup.plans[int(grouped[start])]
                blocks.append(plan.decode(batch, order[start:end], bus))
        decoded = n - first
        return DecodedBatch(n, decoded, n - decoded - n_error - n_remote, n_error, n_remote, blocks)
