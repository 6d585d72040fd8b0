"""Mode `faults`: each J1939 fault (DM1 active, DM2 previously active) sent once when it
appears and once when it clears, not with every message that repeats it.

An ECU sends its DM1 every second while it has active faults, and one that lists none (the
lamps alone) when they are gone: a fault is new when the sender's message lists it and its
last one did not, cleared when its next one no longer does. Each record holds the fault's
fields (SPN, FMI, occurrence count, conversion method), the lamps of the message that made
the change, and `active`: 1 appeared, 0 cleared. Multi-packet DM1s are the transfers the
pipeline reassembled (agent/j1939/groups.py); on buses not read as J1939 the rule finds
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from agent.collect.base import (
    BusBatch,
    Collected,
    CollectedBlock,
    Mode,
    Reference,
    Selection,
    Selects,
    Target,
    register,
)
from agent.collect.rules import CollectRule, ModeSettings
from agent.decode import MessageInfo
from agent.j1939.faults import ACTIVE, DM1, DM2, FAULTS_SOURCE, FIELDS, NAMES, dm_frames, read_dm

_COLUMNS = (*FIELDS, ACTIVE)


@register
class Faults(Mode[ModeSettings]):
    name = "faults"
    selects = Selects.NOTHING  # DM1/DM2 of its J1939 buses, which no DBC need describe
    no_signals = "sends DM1/DM2 faults, not signals"
    reads_j1939 = "DM1/DM2 messages"

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        super().__init__(rule, targets, buses, references)
        # Made once, so the encoder's schema keys them by identity.
        self.selections = {
            pgn: Selection(
                MessageInfo(name, 0x18000000 | pgn << 8, True, 8, FAULTS_SOURCE),
                _COLUMNS,
                rule.name,
            )
            for pgn, name in NAMES.items()
        }
        # (channel, PGN, sender) -> its faults by (SPN, FMI): the fields last sent
        self.active: dict[tuple[str, int, int], dict[tuple[int, int], tuple[int, int]]] = {}

    def frame_ids(self, bus: str) -> frozenset[tuple[int, bool]] | None:
        return None  # J1939 IDs vary with their sender: every frame

    def collect(self, batch: BusBatch, out: Collected) -> None:
        decoded = batch.decoded
        messages = dm_frames(batch.frames, decoded.diagnostic)
        messages += [t for t in batch.transfers if t.pgn in (DM1, DM2)]
        rows: dict[int, list[tuple[int, int, list[int]]]] = {}  # PGN -> (t_ns, ID, fields)
        for message in sorted(messages, key=lambda m: m.row):
            read = read_dm(message.data)
            if read is None:
                continue
            lamps, faults = read
            key = (message.bus, message.pgn, message.source)
            before = self.active.get(key, {})
            now = {(spn, fmi): (count, method) for spn, fmi, count, method in faults}
            changes = [
                [*lamps, spn, fmi, *now[spn, fmi], 1]
                for spn, fmi in now
                if (spn, fmi) not in before
            ]
            changes += [
                [*lamps, spn, fmi, *before[spn, fmi], 0]
                for spn, fmi in before
                if (spn, fmi) not in now
            ]
            self.active[key] = now
            for fields in changes:
                rows.setdefault(message.pgn, []).append((message.t_ns, message.can_id, fields))
        for pgn, found in rows.items():
            out.blocks.append(
                CollectedBlock(
                    batch.bus,
                    self.selections[pgn],
                    np.array([t for t, _, _ in found], np.int64),
                    np.array([i for _, i, _ in found], np.uint32),
                    np.array([f for _, _, f in found], np.uint64).T.copy(),
                    None,
                )
            )
