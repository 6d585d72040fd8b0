"""The receiver's sinks against the real things: PostgreSQL on 127.0.0.1:5432 (`make
postgres` starts it; each test has a schema of its own), mosquitto with MQTT 5 shared
subscriptions, receivers killed with SIGKILL mid-stream. What arrives is compared with
what the agent sent: the batches of one agent run, taken once into JSON Lines as the
reference."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import grpc
import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud.receiver import Receiver, accept_files
from agent.cloud.sinks.jsonl import JsonLinesSink
from agent.wire import telemetry_pb2 as pb
from agent.wire.transport import SCHEMA_SUFFIX, SUFFIX
from tests.data import REPO
from tests.services import ReceiverProcess, broker, free_port, persistent_settings, run_agent

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEMO_DBC = REPO / "dbc" / "demo.dbc"

Value = tuple[str, str, int, float]  # message, signal, time in us, value


@pytest.fixture(scope="module")
def outbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The batch files of a minute of simulated traffic, a batch every quarter second."""
    folder = tmp_path_factory.mktemp("agent")
    config = folder / "agent.toml"
    config.write_text(
        f'vehicle_id = "sink-test"\nstate_dir = "{folder}"\n'
        f'[[bus]]\nname = "can0"\nsource = "simulate"\npace = "max"\nduration_s = 60\n'
        f'dbc = ["{DEMO_DBC}"]\n[batch]\nmax_age_ms = 250\n'
        f'[uplink]\nkind = "file"\nurl = "{folder / "outbox"}"\n[metrics]\nlisten = ""\n'
    )
    result = run_agent(config)
    assert result.returncode == 0, result.stderr
    return folder / "outbox"


@pytest.fixture(scope="module")
def sent(outbox: Path) -> Counter[Value]:
    """Every signal value of the outbox, as the JSON Lines sink writes them."""
    out = io.StringIO()
    receiver = Receiver(JsonLinesSink(out))
    accept_files(receiver, outbox, set())
    receiver.finish()
    values: Counter[Value] = Counter()
    for line in out.getvalue().splitlines():
        record = json.loads(line, parse_float=Decimal)
        t_us = int(record["t"] * 1_000_000)
        for name, value in record["signals"].items():
            values[(record["message"], name, t_us, float(value))] += 1
    return values


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def stored(schema: str) -> Counter[Value]:
    with psycopg.connect(PG_URL) as connection:
        rows = connection.execute(
            "SELECT message, signal, (extract(epoch FROM time) * 1000000)::bigint, value "
            f"FROM {schema}.signals"
        ).fetchall()
    return Counter((str(m), str(s), int(t), float(v)) for m, s, t, v in rows)


def ledger(schema: str) -> set[tuple[str, int]]:
    with psycopg.connect(PG_URL) as connection:
        rows = connection.execute(f"SELECT stream_id, sequence FROM {schema}.batches").fetchall()
    return {(str(s), int(n)) for s, n in rows}


def batch_files(outbox: Path) -> list[Path]:
    return sorted(outbox.glob(f"*{SUFFIX}"))


def wait_for(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def receive(*args: str | Path, output: Path) -> ReceiverProcess:
    return ReceiverProcess(output, *args, "--postgres", PG_URL)


def test_a_batch_delivered_twice_is_written_once(
    outbox: Path, sent: Counter[Value], schema: str, tmp_path: Path
) -> None:
    # Two receivers on the same batches at once (as two of a share group would be, after a
    # redelivery), then a third over all of them again.
    together = [
        receive("--dir", outbox, "--postgres-schema", schema, "--idle-exit", "1", output=out)
        for out in (tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    ]
    summaries = [r.finish() for r in together]
    again = receive(
        "--dir", outbox, "--postgres-schema", schema, "--idle-exit", "1", output=tmp_path / "c"
    ).finish()
    assert stored(schema) == sent
    written = sum(int(s.split(" batches received")[0].split()[-1]) for s in summaries)
    assert written == len(batch_files(outbox)), summaries
    assert f"0 batches received, {len(batch_files(outbox))} duplicates dropped" in again
    with psycopg.connect(PG_URL) as connection:
        versions = connection.execute(f"SELECT version FROM {schema}.schema_migrations").fetchall()
        latest = connection.execute(
            f"SELECT count(*), count(DISTINCT (message, signal)) FROM {schema}.latest_values"
        ).fetchone()
    assert versions == [(1,)]
    assert latest is not None and latest[0] == latest[1] == len({k[:2] for k in sent})


def publish(port: int, outbox: Path, progress: threading.Event, at: int) -> None:
    """Publish the outbox as the agent does (QoS 1, the schema retained), each batch once
    the broker acknowledged the one before; `progress` is set after `at` batches."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for path in sorted(outbox.glob(f"*{SCHEMA_SUFFIX}")):
            topic = f"vehicles/sink-test/schema/{path.name.removesuffix(SCHEMA_SUFFIX)}"
            client.publish(topic, path.read_bytes(), qos=1, retain=True).wait_for_publish(10)
        for k, path in enumerate(batch_files(outbox)):
            info = client.publish("vehicles/sink-test/telemetry", path.read_bytes(), qos=1)
            info.wait_for_publish(10)
            if k == at:
                progress.set()
            time.sleep(0.01)
    finally:
        client.loop_stop()
        client.disconnect()


def test_two_receivers_of_a_share_group_one_killed_write_every_batch_once(
    outbox: Path, sent: Counter[Value], schema: str, tmp_path: Path
) -> None:
    with broker(tmp_path, persistent_settings(tmp_path)) as mqtt:

        def start(k: int) -> ReceiverProcess:
            receiver = receive(
                "--mqtt",
                mqtt.url,
                "--share",
                "ingest",
                "--session",
                f"receiver-{k}",
                "--postgres-schema",
                schema,
                output=tmp_path / f"r{k}-{time.monotonic_ns()}.out",
            )
            receiver.wait_ready("subscribed to")
            return receiver

        receivers = [start(0), start(1)]
        progress = threading.Event()
        count = len(batch_files(outbox))
        publisher = threading.Thread(target=publish, args=(mqtt.port, outbox, progress, count // 3))
        publisher.start()
        try:
            assert progress.wait(60)
            # Mid-stream and mid-write: it has written some, and has more in hand.
            receivers[0].process.send_signal(signal.SIGKILL)
            receivers[0].process.wait(10)
            written_before = len(ledger(schema))
            receivers[0] = start(0)
        finally:
            publisher.join(120)
        wait_for(lambda: len(ledger(schema)) == count, "every batch in the ledger", 60)
        for receiver in receivers:
            receiver.process.send_signal(signal.SIGINT)
        summaries = [receiver.finish() for receiver in receivers]
    assert 0 < written_before < count
    assert stored(schema) == sent, summaries  # every value, once


def test_a_receiver_killed_mid_write_has_every_batch_it_acknowledged(
    outbox: Path, schema: str, tmp_path: Path
) -> None:
    port = free_port()
    receiver = receive(
        "--grpc-listen", f"127.0.0.1:{port}", "--postgres-schema", schema, output=tmp_path / "r"
    )
    receiver.wait_ready("listening for gRPC")
    schemas = sorted(outbox.glob(f"*{SCHEMA_SUFFIX}"))
    payloads = [p.read_bytes() for p in [*schemas, *batch_files(outbox)]]

    def requests() -> Iterator[bytes]:
        yield from payloads

    acknowledged: set[tuple[str, int]] = set()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream(
            "/telemetry.v1.Telemetry/Stream",
            request_serializer=None,
            response_deserializer=pb.Ack.FromString,
        )
        with pytest.raises(grpc.RpcError):
            for ack in stream(requests()):
                acknowledged.add((ack.stream_id, ack.sequence))
                if len(acknowledged) == len(payloads) // 3:
                    receiver.process.send_signal(signal.SIGKILL)
    receiver.process.wait(10)
    assert len(acknowledged) >= len(payloads) // 3
    assert acknowledged <= ledger(schema)  # what the agent may delete from its spool
