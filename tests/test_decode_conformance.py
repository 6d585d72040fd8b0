"""Parity with cantools over every DBC of the conformance set: edge cases and generated payloads."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Any

import cantools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.decode import DbcError, Decoder, load_dbc
from harness.data import CONFORMANCE_DIR
from tests.oracle import batch_of, decoded_rows, mismatches, reference

DBC_FILES = sorted(CONFORMANCE_DIR.glob("*.dbc"))


@cache
def cantools_database(path: Path) -> Any:
    try:
        return cantools.database.load_file(path, database_format="dbc", strict=False)
    except Exception:
        return None


@cache
def decoder_and_messages(path: Path) -> tuple[Decoder, list[Any]]:
    """Our decoder for `path` on bus can0, and the cantools messages it knows, in key order."""
    decoder = Decoder({"can0": [path]})
    database = cantools_database(path)
    messages = []
    for plan in decoder.messages("can0"):
        matches = [
            m
            for m in database.messages
            if m.name == plan.info.name and m.frame_id == plan.info.frame_id
        ]
        messages.append(matches[0])
    return decoder, messages


def extended(message: Any) -> bool:
    return bool(message.is_extended_frame or message.frame_id > 0x7FF)


def put(payload: bytearray, signal: Any, raw: int) -> None:
    """Write a raw value into a payload, bit by bit (the slow obvious way, for tests)."""
    raw &= (1 << signal.length) - 1
    for i in range(signal.length):
        if signal.byte_order == "little_endian":
            byte, bit = divmod(signal.start + i, 8)
        else:
            first = 8 * (signal.start // 8) + 7 - signal.start % 8
            network = first + signal.length - 1 - i
            byte, bit = network // 8, 7 - network % 8
        if byte < len(payload):
            payload[byte] = (payload[byte] & ~(1 << bit)) | (((raw >> i) & 1) << bit)


def multiplexer_payloads(message: Any, rng: random.Random) -> list[bytes]:
    """Payloads that put every multiplexer through its selector values (capped)."""
    payloads = [bytearray(rng.randbytes(message.length))]
    muxes = [s for s in message.signals if s.is_multiplexer]
    for mux in muxes:
        ids = sorted(
            {
                i
                for s in message.signals
                if s.multiplexer_signal == mux.name
                for i in s.multiplexer_ids or ()
            }
        )
        if len(ids) > 16:
            ids = ids[:8] + ids[-8:]
        expanded = []
        for payload in payloads:
            for value in [*ids, max(ids, default=0) + 1]:
                raw = round((value - mux.offset) / mux.scale) if mux.scale else value
                copy = bytearray(payload)
                put(copy, mux, raw)
                expanded.append(copy)
        payloads = expanded[:512]
    return [bytes(p) for p in payloads]


def edge_payloads(message: Any) -> list[bytes]:
    rng = random.Random(message.frame_id)
    length = message.length
    pattern = rng.randbytes(length)
    payloads = [bytes(length), b"\xff" * length, pattern]
    payloads += [b"\xff" * t for t in range(length)] + [pattern[:t] for t in range(length)]
    payloads.append(pattern + rng.randbytes(min(64 - length, 3)))
    if message.is_multiplexed():
        payloads += multiplexer_payloads(message, rng)
    return payloads


def assert_parity(path: Path, frames: list[tuple[int, bytes]]) -> int:
    """Decode (message index, payload) frames in one batch; compare each row with cantools."""
    decoder, messages = decoder_and_messages(path)
    batch = batch_of([(messages[i].frame_id, extended(messages[i]), p) for i, p in frames])
    result = decoder.decode(batch)
    assert result.unknown == 0 and result.decoded == len(frames)
    rows = decoded_rows(result)
    compared = 0
    for row, (index, payload) in enumerate(frames):
        message = messages[index]
        name, ours = rows[row]
        assert name == message.name
        theirs = reference(message, payload)
        if theirs is None:
            continue
        problems = mismatches(ours, theirs, message)
        assert not problems, f"{path.name} {message.name} payload {payload.hex()}: {problems}"
        compared += 1
    return compared


LOADABLE = [p for p in DBC_FILES if cantools_database(p) is not None]
UNLOADABLE = [p for p in DBC_FILES if cantools_database(p) is None]


def test_the_conformance_set_is_there() -> None:
    assert len(DBC_FILES) >= 80 and UNLOADABLE and len(LOADABLE) > 70


@pytest.mark.parametrize("path", UNLOADABLE, ids=lambda p: p.name)
def test_a_dbc_cantools_refuses_is_a_clear_error(path: Path) -> None:
    with pytest.raises(DbcError, match=path.name):
        load_dbc(path)


@pytest.mark.parametrize("path", LOADABLE, ids=lambda p: p.name)
def test_edge_cases_match_cantools(path: Path) -> None:
    _, messages = decoder_and_messages(path)
    frames = [(i, p) for i, m in enumerate(messages) for p in edge_payloads(m)]
    compared = assert_parity(path, frames)
    decodable = [m for m in messages if reference(m, bytes(m.length)) is not None]
    assert compared >= len(decodable)


@pytest.mark.parametrize("path", LOADABLE, ids=lambda p: p.name)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_payloads_match_cantools(path: Path, data: st.DataObject) -> None:
    _, messages = decoder_and_messages(path)
    if not messages:
        return
    frames = data.draw(
        st.lists(
            st.integers(0, len(messages) - 1).flatmap(
                lambda i: st.tuples(
                    st.just(i),
                    st.one_of(
                        st.binary(min_size=messages[i].length, max_size=messages[i].length),
                        st.binary(max_size=64),
                    ),
                )
            ),
            min_size=1,
            max_size=40,
        )
    )
    assert_parity(path, frames)
