"""The real logs decode to the same frames and values as cantools, and SPEED tracks the truth."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import cantools
import numpy as np
import pytest

from agent.decode import ALL_BUSES, DecodedBatch, Decoder
from agent.frames import FrameBatch, FrameFlag
from agent.logs import open_log
from harness.data import (
    RAV4_ADAS_DBC,
    RAV4_LOG,
    RAV4_PT_DBC,
    RAV4_SPEED_CSV,
    TESLA_DBC,
    TESLA_LOG,
    TRUCK_DBC,
    TRUCK_LOG,
)
from tests.oracle import decoded_rows, load_cantools, mismatches, reference

CASES: dict[str, tuple[Path, dict[str, list[Path]], list[str]]] = {
    "tesla": (TESLA_LOG, {ALL_BUSES: [TESLA_DBC]}, []),
    "rav4": (RAV4_LOG, {"can0": [RAV4_PT_DBC], "can1": [RAV4_ADAS_DBC]}, []),
    "truck": (TRUCK_LOG, {ALL_BUSES: [TRUCK_DBC]}, [ALL_BUSES]),
}


@cache
def decoded(case: str) -> tuple[list[tuple[FrameBatch, DecodedBatch]], Decoder]:
    log, dbcs, j1939 = CASES[case]
    decoder = Decoder(dbcs, j1939)
    return [(b, decoder.decode(b)) for b in open_log(log).batches(5_000)], decoder


class Oracle:
    """cantools' own message lookup: by frame ID, or by PGN through cantools.j1939."""

    def __init__(self, dbcs: Mapping[str, Sequence[Path]], j1939: bool) -> None:
        self.databases = {bus: [load_cantools(p) for p in paths] for bus, paths in dbcs.items()}
        self.j1939 = j1939

    def message(self, bus: str, can_id: int, extended: bool) -> Any:
        for db in self.databases.get(bus, []) + self.databases.get(ALL_BUSES, []):
            for message in db.messages:
                if self._matches(message, can_id, extended):
                    return message
        return None

    def _matches(self, message: Any, can_id: int, extended: bool) -> bool:
        if extended != bool(message.is_extended_frame or message.frame_id > 0x7FF):
            return False
        if self.j1939 and extended:
            return bool(self._pgn(message.frame_id) == self._pgn(can_id))
        return bool(message.frame_id == can_id)

    @staticmethod
    def _pgn(frame_id: int) -> int:
        parts = cantools.j1939.frame_id_unpack(frame_id)
        specific = parts.pdu_specific if parts.pdu_format >= 240 else 0
        return int(
            cantools.j1939.pgn_pack(parts.reserved, parts.data_page, parts.pdu_format, specific)
        )


@pytest.mark.parametrize("case", list(CASES))
def test_every_frame_decodes_as_cantools_does(case: str) -> None:
    log, dbcs, j1939 = CASES[case]
    oracle = Oracle(dbcs, bool(j1939))
    lookup_cache: dict[tuple[str, int, bool], Any] = {}
    batches, _ = decoded(case)
    compared = 0
    for batch, result in batches:
        rows = decoded_rows(result)
        for row in range(len(batch)):
            bus = batch.buses[batch.bus[row]]
            can_id = int(batch.can_id[row])
            extended = bool(batch.flags[row] & FrameFlag.EXTENDED)
            key = (bus, can_id, extended)
            if key not in lookup_cache:
                lookup_cache[key] = oracle.message(*key)
            message = lookup_cache[key]
            if message is None:
                assert row not in rows, (
                    f"{log.name} row {row}: decoded an ID cantools does not know"
                )
                continue
            name, ours = rows[row]
            assert name == message.name
            theirs = reference(message, batch.payload(row))
            assert theirs is not None
            problems = mismatches(ours, theirs, message)
            assert not problems, f"{log.name} {name}: {problems}"
            compared += 1
    assert compared == sum(r.decoded for _, r in batches)
    assert compared > 10_000


def test_counts_of_the_rav4_log() -> None:
    batches, _ = decoded("rav4")
    frames = sum(r.frames for _, r in batches)
    unknown = sum(r.unknown for _, r in batches)
    assert frames == 135_468
    # The README of the data: about a third of the frames have IDs that no DBC knows.
    assert 0.25 < unknown / frames < 0.5
    assert sum(r.decoded + r.unknown for _, r in batches) == frames


def test_j1939_matches_any_source_and_keeps_the_received_id() -> None:
    batches, _ = decoded("truck")
    other_source = 0
    for batch, result in batches:
        for block in result.blocks:
            assert np.array_equal(block.can_id, batch.can_id[block.rows])
            other_source += int(
                np.count_nonzero((block.can_id & 0xFF) != block.message.frame_id & 0xFF)
            )
    # The DBC writes every PGN with source address 0x00 (the engine); frames that other ECUs
    # send still match their PGN.
    assert other_source > 500


def test_the_same_id_on_two_buses_is_two_messages() -> None:
    batches, _ = decoded("rav4")
    names: dict[tuple[str, int], set[str]] = {}
    for _, result in batches:
        for block in result.blocks:
            names.setdefault((block.bus, block.message.frame_id), set()).add(block.message.name)
    pt = load_cantools(RAV4_PT_DBC)
    adas = load_cantools(RAV4_ADAS_DBC)
    for can_id in (0x224, 0x228):
        if ("can0", can_id) in names:
            assert names["can0", can_id] == {pt.get_message_by_frame_id(can_id).name}
        if ("can1", can_id) in names:
            assert names["can1", can_id] == {adas.get_message_by_frame_id(can_id).name}


def test_rav4_speed_follows_the_ground_truth() -> None:
    batches, _ = decoded("rav4")
    times, speeds = [], []
    for _, result in batches:
        for block in result.blocks:
            if block.bus == "can0" and block.message.name == "SPEED":
                column = block.signal("SPEED")
                times.append(block.t_ns / 1e9)
                speeds.append(column.physical() / 3.6)
    t, speed = np.concatenate(times), np.concatenate(speeds)
    with RAV4_SPEED_CSV.open() as f:
        truth = np.array([(float(r["t"]), float(r["speed_mps"])) for r in csv.DictReader(f)])
    inside = (truth[:, 0] >= t[0]) & (truth[:, 0] <= t[-1])
    ours = np.interp(truth[inside, 0], t, speed)
    assert len(ours) > 1000
    assert np.corrcoef(ours, truth[inside, 1])[0, 1] > 0.999
