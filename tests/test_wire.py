"""The wire format: what goes in comes out, bit for bit; damage is refused, not misread."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cloud.parser import ReceivedBatch, SchemaStore, UnknownSchema, parse_batch
from agent.collect import Collector, CollectRule
from agent.decode import ALL_BUSES, Decoder
from agent.logs import open_log
from agent.records import JsonLinesWriter
from agent.wire import telemetry_pb2 as pb
from agent.wire.columns import deltas, segment_sums, unzigzag, zigzag
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import WireBatch, WireError, read_envelope
from harness import REPO
from harness.data import RAV4_ADAS_DBC, RAV4_LOG, RAV4_PT_DBC, TRUCK_DBC, TRUCK_LOG
from harness.outputs import records
from harness.services import agent_command
from tests.oracle import batch_of


def received(wire: WireBatch, encoder: BatchEncoder) -> ReceivedBatch:
    schemas = SchemaStore()
    schemas.add(read_envelope(encoder.announcement(wire.schema_id)), 1 << 24)
    return parse_batch(read_envelope(wire.payload), schemas)


def lines(blocks: object) -> list[str]:
    out = io.StringIO()
    JsonLinesWriter(out).write(blocks)  # type: ignore[arg-type]
    return sorted(out.getvalue().splitlines())


@pytest.mark.parametrize(
    ("log", "dbcs", "j1939"),
    [
        (RAV4_LOG, {"can0": [RAV4_PT_DBC], "can1": [RAV4_ADAS_DBC]}, []),
        (TRUCK_LOG, {ALL_BUSES: [TRUCK_DBC]}, [ALL_BUSES]),
    ],
)
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_real_logs_round_trip(
    log: Path, dbcs: dict[str, list[Path]], j1939: list[str], compression: str
) -> None:
    decoder = Decoder(dbcs, j1939)
    encoder = BatchEncoder("v", "stream", b"digest", compression=compression)
    for sequence, frames in enumerate(open_log(log).batches(3_000), start=1):
        result = decoder.decode(frames)
        wire = encoder.encode([result], sequence)
        assert wire is not None
        back = received(wire, encoder)
        assert (back.stream_id, back.sequence) == ("stream", sequence)
        assert back.frames == result.decoded and back.signals == result.signals
        assert lines(back.blocks) == lines(result.blocks)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2**64 - 1), min_size=0, max_size=20), min_size=1, max_size=6)
)
def test_delta_encodings_undo_exactly(columns: list[list[int]]) -> None:
    lengths = np.array([len(c) for c in columns], np.intp)
    values = np.array([v for c in columns for v in c], np.uint64)
    starts = (np.cumsum(lengths) - lengths)[lengths > 0].astype(np.intp)
    if not len(values):
        return
    once = zigzag(deltas(values, starts))
    twice = zigzag(deltas(deltas(values, starts), starts))
    assert (segment_sums(unzigzag(once), starts) == values).all()
    assert (segment_sums(segment_sums(unzigzag(twice), starts), starts) == values).all()


def a_batch() -> tuple[bytes, bytes]:
    """A batch of RAV4 frames, and the announcement of its schema."""
    decoder = Decoder({"can0": [RAV4_PT_DBC]})
    frames = next(open_log(RAV4_LOG).batches(2_000))
    encoder = BatchEncoder("v", "s", b"d")
    wire = encoder.encode([decoder.decode(frames)], 7)
    assert wire is not None
    return wire.payload, encoder.announcement(wire.schema_id)


def test_batches_of_every_signal_stay_format_1() -> None:
    """Format 2 added collection rules. A batch of every decoded signal is laid out as in
    format 1 and says so, so a cloud that reads only format 1 keeps working with an agent
    that has no rules; batches of rules are format 2."""
    payload, announcement = a_batch()
    assert read_envelope(payload).format == 1
    assert read_envelope(announcement).format == 1
    decoder = Decoder({"can0": [RAV4_PT_DBC]})
    frames = next(open_log(RAV4_LOG).batches(2_000))
    collector = Collector((CollectRule("speed", "all", signals=("SPEED",)),), {"can0": decoder})
    encoder = BatchEncoder("v", "s", b"d")
    wire = encoder.encode([collector.collect("can0", frames, decoder.decode(frames))], 1)
    assert wire is not None
    assert (
        read_envelope(wire.payload).format
        == read_envelope(encoder.announcement(wire.schema_id)).format
        == 2
    )


def test_damaged_batches_are_refused_with_a_reason() -> None:
    payload, announcement = a_batch()
    schemas = SchemaStore()
    with pytest.raises(UnknownSchema):
        parse_batch(read_envelope(payload), schemas)
    schemas.add(read_envelope(announcement), 1 << 24)
    with pytest.raises(WireError, match="not a telemetry batch"):
        read_envelope(b"\xff" * 50)
    envelope = pb.Batch.FromString(payload)
    envelope.format = 99
    with pytest.raises(
        WireError, match=r"format 99 is not supported \(this receiver reads 1 and 2\)"
    ):
        read_envelope(envelope.SerializeToString())
    envelope = pb.Batch.FromString(payload)
    envelope.body = envelope.body[:-20]
    with pytest.raises(WireError, match=r"corrupt zstd body|body is"):
        parse_batch(envelope, schemas)
    envelope = pb.Batch.FromString(payload)
    envelope.body_size = 10**9
    with pytest.raises(WireError, match="exceeds"):
        parse_batch(envelope, schemas)
    forged = pb.Batch.FromString(announcement)
    forged.schema_id = bytes(32)
    with pytest.raises(WireError, match="does not match its id"):
        schemas.add(forged, 1 << 24)
    rng = np.random.default_rng(3)
    for _ in range(200):
        damaged = bytearray(payload)
        at = rng.integers(0, len(damaged), 3)
        for i in at:
            damaged[i] ^= 1 << int(rng.integers(0, 8))
        # Refused or read (a flipped bit in a value is still a valid batch): never a crash.
        with contextlib.suppress(WireError):
            parse_batch(read_envelope(bytes(damaged)), schemas)


def test_the_receiver_rejects_garbage_and_keeps_going(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    payload, announcement = a_batch()
    (outbox / "a-000000000001.batch").write_bytes(b"garbage")
    (outbox / "a-000000000002.batch").write_bytes(payload)
    (outbox / "a-000000000003.batch").write_bytes(payload)  # the same batch again
    (outbox / "a-000000000004.batch").write_bytes(announcement[:-5])  # a torn announcement
    (outbox / "z.schema").write_bytes(announcement)
    result = subprocess.run(
        agent_command(
            "receive",
            "--dir",
            str(outbox),
            "--idle-exit",
            "0.5",
            "--output",
            str(tmp_path / "out.jsonl"),
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "1 batches received, 1 duplicates dropped, 2 rejected" in result.stderr
    assert "a-000000000001.batch: rejected: not a telemetry batch" in result.stderr
    assert len(records(tmp_path / "out.jsonl")) > 0


def test_the_committed_protobuf_module_is_what_make_proto_makes(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-Iagent/wire={REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO / "proto" / "telemetry.proto"),
        ],
        check=True,
        cwd=REPO,
    )
    for name in ("telemetry_pb2.py", "telemetry_pb2.pyi"):
        made = (tmp_path / "agent" / "wire" / name).read_text()
        assert made == (REPO / "agent" / "wire" / name).read_text(), f"run `make proto`: {name}"


def test_the_receiver_remembers_every_sequence_in_little_memory() -> None:
    from agent.cloud.receiver import _Seen

    seen = _Seen()
    order = np.random.default_rng(9).permutation(np.arange(1, 5001))
    for k, sequence in enumerate(order.tolist()):
        assert sequence not in seen
        seen.add(sequence)
        assert sequence in seen
        if k % 500 == 0:
            assert all(s in seen for s in order[: k + 1].tolist())
    assert seen.through == 5000 and not seen.beyond


def test_the_receiver_rejects_an_oversized_batch_and_keeps_going(tmp_path: Path) -> None:
    from agent.cloud.receiver import MAX_BATCH_BYTES, Receiver
    from agent.cloud.sinks.jsonl import JsonLinesSink

    payload, announcement = a_batch()
    out = io.StringIO()
    receiver = Receiver(JsonLinesSink(out))
    assert receiver.accept(b"\0" * (MAX_BATCH_BYTES + 1), "big") is None
    assert receiver.accept(announcement, "schema") is not None
    assert receiver.accept(payload, "batch") is not None
    receiver.flush()
    assert (receiver.stats.rejected, receiver.stats.batches) == (1, 1)
    assert out.getvalue().count("\n") == receiver.stats.frames > 0


def test_a_float_signal_of_no_ieee_length_costs_only_itself(tmp_path: Path) -> None:
    # The decoder never decodes an 8-bit float, but the schema names it: a batch with its
    # message must still reach the cloud with the message's other signals.
    dbc = tmp_path / "odd_float.dbc"
    dbc.write_text(
        'VERSION ""\n\nBU_: ECU\n\nBO_ 256 Odd: 2 ECU\n'
        ' SG_ Narrow : 0|8@1- (1,0) [0|0] "" Vector__XXX\n'
        ' SG_ Plain : 8|8@1+ (1,0) [0|0] "" Vector__XXX\n\n'
        "SIG_VALTYPE_ 256 Narrow : 1;\n"
    )
    decoder = Decoder({ALL_BUSES: [dbc]})
    assert any("IEEE float of 8 bits" in warning for warning in decoder.warnings)
    frames = batch_of([(0x100, False, bytes([0x41, value])) for value in (1, 2, 3)])
    encoder = BatchEncoder("v", "s", b"d")
    wire = encoder.encode([decoder.decode(frames)], 1)
    assert wire is not None
    (block,) = received(wire, encoder).blocks
    values = {column.name: column for column in block.signals}
    assert values["Plain"].raw.tolist() == [1, 2, 3]
    narrow = values["Narrow"].present
    assert narrow is not None and not narrow.any()
