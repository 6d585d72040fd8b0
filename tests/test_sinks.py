"""The receiver's sinks against the real things: PostgreSQL on 127.0.0.1:5432 (`make
postgres` starts it; each test has a schema of its own), mosquitto with MQTT 5 shared
subscriptions, receivers killed with SIGKILL mid-stream. What arrives is compared with
what the agent sent: the batches of one agent run, taken once into JSON Lines as the
reference."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import grpc
import paho.mqtt.client as paho
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.cloud.receiver import Receiver, accept_files
from agent.cloud.sinks.jsonl import JsonLinesSink
from agent.cloud.sinks.parquet import ParquetSink
from agent.cloud.sinks.postgres import MIGRATIONS, PostgresSink
from agent.wire import telemetry_pb2 as pb
from agent.wire.envelope import read_envelope
from agent.wire.transport import SCHEMA_SUFFIX, SUFFIX, batch_file_name
from harness import REPO
from harness.data import TRUCK_DBC
from harness.services import (
    ReceiverProcess,
    agent_command,
    broker,
    free_port,
    persistent_settings,
    run_agent,
)
from tests.test_j1939 import bam
from tests.test_j1939_wire import EEC1, write_log

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEMO_DBC = REPO / "dbc" / "demo.dbc"

Value = tuple[str, str, int, float]  # message, signal, time in us, value


@pytest.fixture(scope="module")
def outbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The batch files of a minute of simulated traffic, a batch every quarter second."""
    folder = tmp_path_factory.mktemp("agent")
    return simulated_outbox(folder, "sink-test", DEMO_DBC, 60, "[batch]\nmax_age_ms = 250\n")


def simulated_outbox(folder: Path, vehicle: str, dbc: Path, seconds: int, more: str = "") -> Path:
    """The batch files of an agent that simulates `seconds` of the traffic of `dbc`, as
    fast as it goes; `more`: more of its config."""
    config = folder / "agent.toml"
    config.write_text(
        f'vehicle_id = "{vehicle}"\nstate_dir = "{folder}"\n'
        f'[[bus]]\nname = "can0"\nsource = "simulate"\npace = "max"\nduration_s = {seconds}\n'
        f'dbc = ["{dbc}"]\n{more}'
        f'[uplink]\nkind = "file"\nurl = "{folder / "outbox"}"\n[metrics]\nlisten = ""\n'
    )
    result = run_agent(config)
    assert result.returncode == 0, result.stderr
    return folder / "outbox"


@pytest.fixture(scope="module")
def sent(outbox: Path) -> Counter[Value]:
    """Every signal value of the outbox, as the JSON Lines sink writes them."""
    return values_of(outbox, batch_files(outbox))


def values_of(outbox: Path, files: list[Path]) -> Counter[Value]:
    """The signal values of these batch files, as the JSON Lines sink writes them."""
    out = io.StringIO()
    receiver = Receiver(JsonLinesSink(out))
    for path in [*outbox.glob(f"*{SCHEMA_SUFFIX}"), *files]:
        receiver.accept(path.read_bytes(), str(path))
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
    """The batches in the ledger; none before the receiver made its tables."""
    with psycopg.connect(PG_URL) as connection:
        made = connection.execute("SELECT to_regclass(%s)", (f"{schema}.batches",)).fetchone()
        if made is None or made[0] is None:
            return set()
        rows = connection.execute(f"SELECT stream_id, sequence FROM {schema}.batches").fetchall()
    return {(str(s), int(n)) for s, n in rows}


def batch_files(outbox: Path) -> list[Path]:
    return sorted(outbox.glob(f"*{SUFFIX}"))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
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
    assert versions == [(1,), (2,)]
    assert latest is not None and latest[0] == latest[1] == len({k[:2] for k in sent})


def test_the_latest_table_keeps_each_signals_newest_value_and_answers_a_snapshot(
    outbox: Path, sent: Counter[Value], schema: str
) -> None:
    # The batches come newest first, a group each: a late batch never overwrites a newer value.
    receiver = Receiver(PostgresSink(PG_URL, schema))
    for path in [*outbox.glob(f"*{SCHEMA_SUFFIX}"), *reversed(batch_files(outbox))]:
        receiver.accept(path.read_bytes(), str(path))
        receiver.flush()
    receiver.finish()
    assert receiver.stats.rejected == 0
    newest: dict[tuple[str, str], tuple[int, float]] = {}
    for message, name, t_us, value in sent:
        if (message, name) not in newest or t_us > newest[(message, name)][0]:
            newest[(message, name)] = (t_us, value)

    def snapshot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            agent_command("snapshot", "--postgres", PG_URL, "--postgres-schema", schema, *args),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=REPO,
        )

    answer = snapshot("--vehicle", "sink-test", "--json")
    assert answer.returncode == 0, answer.stderr
    found = {
        (s["message"], s["signal"]): (round(s["t"] * 1e6), s["value"])
        for s in json.loads(answer.stdout)["signals"]
    }
    assert found == newest
    table = snapshot("--vehicle", "sink-test", "VehicleSpeed.*").stdout.splitlines()
    assert table[0].split() == ["bus", "message", "signal", "value", "unit", "t"]
    assert {line.split()[1] for line in table[1:]} == {"VehicleSpeed"}
    unknown = snapshot("--vehicle", "no-such-vehicle")
    assert unknown.returncode == 1 and "no values of no-such-vehicle" in unknown.stderr


def test_a_schema_of_version_1_migrates_to_text_with_its_values(schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
        connection.execute(f"CREATE TABLE {schema}.schema_migrations (version integer)")
        connection.execute(MIGRATIONS[0].format(s=schema))
        connection.execute(f"INSERT INTO {schema}.schema_migrations VALUES (1)")
        connection.execute(
            f"INSERT INTO {schema}.series (vehicle, bus, message, signal, rule) "
            "VALUES ('v', 'can0', 'M', 'S', '')"
        )
        connection.execute(
            f"INSERT INTO {schema}.signal_values VALUES (1, '2026-01-01T00:00:00Z', 2.5)"
        )
    PostgresSink(PG_URL, schema).close()
    with psycopg.connect(PG_URL) as connection:
        versions = connection.execute(f"SELECT version FROM {schema}.schema_migrations").fetchall()
        rows = connection.execute(f"SELECT signal, value, text FROM {schema}.signals").fetchall()
    assert versions == [(1,), (2,)]
    assert rows == [("S", 2.5, None)]


def test_a_receiver_whose_database_session_ends_writes_again_over_a_new_one(
    outbox: Path, sent: Counter[Value], schema: str, tmp_path: Path
) -> None:
    files = [*outbox.glob(f"*{SCHEMA_SUFFIX}"), *batch_files(outbox)]
    folder = tmp_path / "incoming"
    folder.mkdir()
    schemas = len(list(outbox.glob(f"*{SCHEMA_SUFFIX}")))
    half = len(files) // 2
    for path in files[:half]:
        (folder / path.name).write_bytes(path.read_bytes())
    receiver = receive("--dir", folder, "--postgres-schema", schema, output=tmp_path / "r")
    wait_for(lambda: len(ledger(schema)) == half - schemas, "the first half written")
    with psycopg.connect(PG_URL, autocommit=True) as connection:
        ended = connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"telemetry-agent receive {schema}",),
        ).fetchall()
    assert ended == [(True,)]
    for path in files[half:]:
        (folder / path.name).write_bytes(path.read_bytes())
    wait_for(lambda: len(ledger(schema)) == len(files) - schemas, "the second half written")
    receiver.process.send_signal(signal.SIGINT)
    summary = receiver.finish()
    assert "the sink failed" in summary
    assert stored(schema) == sent


def publish(
    port: int, outbox: Path, progress: threading.Event, at: int, resume: threading.Event
) -> None:
    """Publish the outbox as the agent does (QoS 1, the schema retained), each batch once
    the broker acknowledged the one before; after batch `at`, `progress` is set and the
    rest waits for `resume`."""
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
                resume.wait(60)
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
        progress, resume = threading.Event(), threading.Event()
        count = len(batch_files(outbox))
        at = count // 3
        publisher = threading.Thread(target=publish, args=(mqtt.port, outbox, progress, at, resume))
        publisher.start()
        try:
            assert progress.wait(60)
            # Killed mid-stream, maybe with batches in hand: what it had not acknowledged
            # the broker gives the other, and the rest is not even published yet.
            receivers[0].process.send_signal(signal.SIGKILL)
            receivers[0].process.wait(10)
            written_before = len(ledger(schema))
            resume.set()
            receivers[0] = start(0)
        finally:
            resume.set()
            publisher.join(120)
        wait_for(lambda: len(ledger(schema)) == count, "every batch in the ledger", 60)
        for receiver in receivers:
            receiver.process.send_signal(signal.SIGINT)
        summaries = [receiver.finish() for receiver in receivers]
    assert written_before <= at + 1 < count
    assert stored(schema) == sent, summaries  # every value, once


def test_a_receiver_killed_mid_write_has_every_batch_it_acknowledged(
    outbox: Path, schema: str, tmp_path: Path
) -> None:
    port = free_port()
    receiver = receive(
        "--grpc-listen", f"127.0.0.1:{port}", "--postgres-schema", schema, output=tmp_path / "r"
    )
    acknowledged = send_until_killed(receiver, port, outbox)
    assert acknowledged <= ledger(schema)  # what the agent may delete from its spool


def test_an_mqtt_receiver_killed_mid_write_loses_nothing_the_broker_let_go(
    outbox: Path, sent: Counter[Value], schema: str, tmp_path: Path
) -> None:
    # The broker forgets a batch once the receiver's PUBACK came: sent before the batch
    # was written, a kill between the two would lose it for good. The ledger is locked
    # here, so the receiver is killed with every batch in hand and its write waiting.
    with broker(tmp_path, persistent_settings(tmp_path)) as mqtt:

        def start() -> ReceiverProcess:
            receiver = receive(
                "--mqtt",
                mqtt.url,
                "--session",
                "killed",
                "--postgres-schema",
                schema,
                output=tmp_path / f"r-{time.monotonic_ns()}.out",
            )
            receiver.wait_ready("subscribed to")
            return receiver

        receiver = start()
        count = len(batch_files(outbox))
        with psycopg.connect(PG_URL) as lock:
            lock.execute(f"LOCK TABLE {schema}.batches IN ACCESS EXCLUSIVE MODE")
            publish(mqtt.port, outbox, threading.Event(), count, threading.Event())

            def waiting() -> bool:
                with psycopg.connect(PG_URL) as connection:
                    row = connection.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = %s AND wait_event_type = 'Lock'",
                        (f"telemetry-agent receive {schema}",),
                    ).fetchone()
                return row == (1,)

            wait_for(waiting, "the receiver's write waiting on the ledger")
            receiver.process.send_signal(signal.SIGKILL)
            receiver.process.wait(10)
            lock.rollback()
        assert not ledger(schema)
        receiver = start()
        wait_for(lambda: len(ledger(schema)) == count, "every batch in the ledger")
        receiver.process.send_signal(signal.SIGINT)
        summary = receiver.finish()
    assert stored(schema) == sent, summary


def send_until_killed(receiver: ReceiverProcess, port: int, outbox: Path) -> set[tuple[str, int]]:
    """The outbox sent over gRPC as an agent sends it, the receiver SIGKILLed once it
    acknowledged a third; the batches it acknowledged."""
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
    return acknowledged


def lake_values(lake: Path) -> Counter[Value]:
    """The lake's signal values, read by DuckDB."""
    relation = duckdb.sql(
        f"SELECT * FROM read_parquet('{lake}/**/*.parquet', hive_partitioning = true, "
        "union_by_name = true)"
    )
    assert relation is not None
    table = relation.arrow()
    if isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    messages = table.column("message").to_pylist()
    times = table.column("time").cast(pa.int64()).to_pylist()
    values: Counter[Value] = Counter()
    for name in table.column_names:
        if name in {"time", "bus", "can_id", "rule", "vehicle", "message", "date"}:
            continue
        for message, t_us, value in zip(
            messages, times, table.column(name).to_pylist(), strict=True
        ):
            if value is not None:
                values[(message, name, t_us, float(value))] += 1
    return values


def test_the_parquet_lake_reads_back_in_duckdb_as_sent(
    outbox: Path, sent: Counter[Value], tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    # A batch at a time, as they come over a link, with files rolled at 20 kB.
    receiver = Receiver(ParquetSink(lake, roll_bytes=20_000))
    for path in [*outbox.glob(f"*{SCHEMA_SUFFIX}"), *batch_files(outbox)]:
        receiver.accept(path.read_bytes(), str(path))
        receiver.flush()
    receiver.finish()
    assert receiver.stats.rejected == 0
    files = list(lake.rglob("*.parquet"))
    assert len(files) > 2 * len({k[0] for k in sent})  # rolled by size
    assert not list((lake / "_journal").rglob("*.arrow"))  # all closed at the end
    assert lake_values(lake) == sent
    dataset = pads.dataset(lake, format="parquet", partitioning="hive")
    frames = sum(read_envelope(p.read_bytes()).frames for p in batch_files(outbox))
    assert dataset.count_rows() == frames
    schema = pq.read_schema(files[0])
    assert schema.field("time").type == pa.timestamp("us", tz="UTC")
    # Each signal's physical type: whole numbers where scale and offset are (as cantools
    # decodes them), doubles where either is a fraction.
    # pandas, as docs/sinks.md says to read it: a message's folder, its partitions as columns.
    speeds = pd.read_parquet(lake / "vehicle=sink-test" / "message=VehicleSpeed")
    assert Counter(
        ("VehicleSpeed", "Speed", int(t.value) // 1000, float(v))
        for t, v in zip(speeds["time"], speeds["Speed"], strict=True)
    ) == Counter({k: n for k, n in sent.items() if k[:2] == ("VehicleSpeed", "Speed")})
    assert set(speeds["date"].astype(str)) == {str(t.date()) for t in speeds["time"]}
    columns = pa.unify_schemas([pq.read_schema(f) for f in files])
    types = {
        name: columns.field(name).type
        for name in ("EngineCounter", "CoolantTemp", "SteeringAngle", "Speed", "Latitude")
    }
    assert types == {
        "EngineCounter": pa.int64(),
        "CoolantTemp": pa.int64(),
        "SteeringAngle": pa.int64(),
        "Speed": pa.float64(),
        "Latitude": pa.float64(),
    }


def test_readers_of_the_lake_never_see_a_half_written_file(outbox: Path, tmp_path: Path) -> None:
    # A writer thread rolls a file every 20 kB while this thread reads the whole lake over
    # and over, as a query engine would: every read must succeed, and rows only appear.
    lake = tmp_path / "lake"
    lake.mkdir()
    batches = batch_files(outbox)[:80]  # 20 s of traffic: dozens of files, in seconds
    files = [*outbox.glob(f"*{SCHEMA_SUFFIX}"), *batches]
    frames = sum(read_envelope(p.read_bytes()).frames for p in batches)
    failed: list[BaseException] = []

    def write() -> None:
        try:
            receiver = Receiver(ParquetSink(lake, roll_bytes=20_000))
            for path in files:
                receiver.accept(path.read_bytes(), str(path))
                receiver.flush()
            receiver.finish()
        except BaseException as error:
            failed.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    seen = [0]
    deadline = time.monotonic() + 120
    while writer.is_alive() and time.monotonic() < deadline:
        rows = pads.dataset(lake, format="parquet", partitioning="hive").count_rows()
        if rows:  # DuckDB refuses a pattern that matches no file
            query = (
                f"SELECT count(*) FROM read_parquet('{lake}/**/*.parquet', union_by_name = true)"
            )
            counted = duckdb.connect().execute(query).fetchone()
            assert counted is not None and counted[0] >= rows
        assert rows >= seen[-1]
        seen.append(rows)
    writer.join()
    assert not failed
    assert len(set(seen)) > 3  # the reads saw the lake grow, file by file
    assert pads.dataset(lake, format="parquet", partitioning="hive").count_rows() == frames
    assert lake_values(lake) == values_of(outbox, batches)


CLOCK_DBC = """VERSION ""
NS_ :
BS_:
BU_: ECU
BO_ 1280 Clock: 4 ECU
 SG_ time : 0|8@1+ (1,0) [0|255] "s" ECU
 SG_ Date : 8|8@1+ (1,0) [0|31] "" ECU
 SG_ Hours : 16|8@1+ (1,0) [0|23] "h" ECU
 SG_ signal_time : 24|8@1+ (1,0) [0|255] "s" ECU
"""


def test_signals_named_as_the_lakes_own_columns_keep_their_values(tmp_path: Path) -> None:
    # A signal `time` would take the place of the time column, and one `Date` would be
    # hidden by the partition key `date` in engines that ignore case; `signal_time` must
    # not then meet the renamed `time`. The vehicle's name is kept as Hive keeps it, UTF-8
    # as it is, so that Spark and Athena read it back as DuckDB does.
    dbc = tmp_path / "clock.dbc"
    dbc.write_text(CLOCK_DBC)
    outbox = simulated_outbox(tmp_path, "Uhr ä=1", dbc, 5)
    lake = tmp_path / "lake"
    receiver = Receiver(ParquetSink(lake))
    accept_files(receiver, outbox, set())
    receiver.finish()
    assert receiver.stats.rejected == 0
    renamed = {
        "time": "signal_time",
        "Date": "signal_Date",
        "Hours": "Hours",
        "signal_time": "signal_signal_time",
    }
    sent = values_of(outbox, batch_files(outbox))
    assert {name for _, name, _, _ in sent} == set(renamed)
    assert lake_values(lake) == Counter(
        {(m, renamed[name], t, v): n for (m, name, t, v), n in sent.items()}
    )
    assert [p.name for p in lake.iterdir() if p.name.startswith("vehicle=")] == [
        "vehicle=Uhr ä%3D1"
    ]
    dataset = pads.dataset(lake, format="parquet", partitioning="hive")
    assert set(dataset.to_table(columns=["vehicle"]).column("vehicle").to_pylist()) == {"Uhr ä=1"}


def test_a_quiet_receiver_closes_its_parquet_files_by_age(outbox: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    receiver = ReceiverProcess(
        tmp_path / "r", "--dir", outbox, "--parquet", lake, "--parquet-roll-s", "1"
    )

    def closed() -> bool:
        journal = list((lake / "_journal").rglob("*.arrow"))
        return bool(list(lake.rglob("*.parquet"))) and not journal

    try:
        wait_for(closed, "the files closed by age while no batch comes", 20)
    finally:
        receiver.process.send_signal(signal.SIGINT)
        receiver.finish()


def test_a_parquet_receiver_killed_mid_write_recovers_what_it_acknowledged(
    outbox: Path, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    port = free_port()
    receiver = ReceiverProcess(
        tmp_path / "r", "--grpc-listen", f"127.0.0.1:{port}", "--parquet", lake
    )
    acknowledged = send_until_killed(receiver, port, outbox)
    assert not list(lake.rglob("*.parquet"))  # none rolled: all of it in the journal
    # The next start takes the journal back, and closes it into files as it stops.
    empty = tmp_path / "empty"
    empty.mkdir()
    ReceiverProcess(
        tmp_path / "r2", "--dir", empty, "--parquet", lake, "--idle-exit", "0.2"
    ).finish()
    names = {batch_file_name(stream, sequence) for stream, sequence in acknowledged}
    files = [path for path in batch_files(outbox) if path.name in names]
    assert len(files) == len(acknowledged)
    assert not values_of(outbox, files) - lake_values(lake)  # every acknowledged value


def test_a_parquet_lake_written_again_after_a_clean_stop_keeps_the_earlier_files(
    outbox: Path, sent: Counter[Value], tmp_path: Path
) -> None:
    # A clean stop empties the journal; the next run writes the same vehicle, messages and
    # date again, and its files must come beside the first run's, not over them.
    lake = tmp_path / "lake"
    files = batch_files(outbox)
    half = len(files) // 2
    closed: list[set[Path]] = []
    for part in (files[:half], files[half:]):
        receiver = Receiver(ParquetSink(lake))
        for path in [*outbox.glob(f"*{SCHEMA_SUFFIX}"), *part]:
            receiver.accept(path.read_bytes(), str(path))
        receiver.finish()
        assert receiver.stats.rejected == 0
        closed.append(set(lake.rglob("*.parquet")))
    assert closed[0] < closed[1]
    assert lake_values(lake) == sent


# --- Text values: the agent to every sink -------------------------------------------------

VIN = "1FUJGLDR5CLBP8834"
ECU_ID = {
    "ECU_Part_Number": "PN-123",
    "ECU_Serial_Number": "SN-456",
    "ECU_Location": "CHASSIS",
    "ECU_Type": "ENGINE",
    "ECU_Manufacturer_Name": "ACME",
}
#: (message, signal) -> text, as the frames below carry it, read by hand from J1939-71.
TEXTS = {
    ("VI", "Vehicle_Identification_Number"): VIN,
    ("SOFT", "Software_Identification"): "SW1.0*SW2.0",
    **{("ECUID", name): text for name, text in ECU_ID.items()},
}


def text_log(folder: Path) -> Path:
    """A J1939 log built here: an engine frame, then a VIN, a software identification and
    an ECU identification, each sent by BAM and padded as ECUs pad them."""
    ecu = "*".join(ECU_ID.values()).encode() + b"*\xff\xff"
    return write_log(
        folder / "text.log",
        [
            EEC1,
            *bam(100, 0x00, 0xFEEC, VIN.encode() + b"*"),
            *bam(400, 0x00, 0xFEDA, b"\x02SW1.0*SW2.0*"),
            *bam(700, 0x17, 0xFDC5, ecu),
        ],
    )


def test_text_values_go_from_the_agent_through_mosquitto_into_every_sink(
    schema: str, tmp_path: Path
) -> None:
    log = text_log(tmp_path)
    lake = tmp_path / "lake"
    with broker(tmp_path) as mqtt:
        common = ("--mqtt", mqtt.url, "--idle-exit", "3")
        receivers = [
            ReceiverProcess(tmp_path / "received.jsonl", *common),
            receive(*common, "--postgres-schema", schema, output=tmp_path / "pg.out"),
            ReceiverProcess(tmp_path / "lake.out", *common, "--parquet", lake),
        ]
        for receiver in receivers:
            receiver.wait_ready("subscribed to")
        config = tmp_path / "agent.toml"
        config.write_text(
            f'vehicle_id = "truck"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[[bus]]\nname = "can1"\nsource = "replay"\npath = "{log}"\n'
            f'dbc = ["{TRUCK_DBC}"]\nj1939 = true\n'
            f'[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\n[metrics]\nlisten = ""\n'
        )
        result = run_agent(config)
        assert result.returncode == 0, result.stderr
        for receiver in receivers:
            assert "0 rejected" in receiver.finish()

    # JSON Lines: what `decode` gives of the log, text as JSON strings.
    decoded = subprocess.run(
        agent_command("decode", log, "--dbc", TRUCK_DBC, "--j1939", "*"),
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    expected = [json.loads(line) for line in decoded.stdout.splitlines()]
    received = [json.loads(line) for line in (tmp_path / "received.jsonl").read_text().splitlines()]
    for record in received:
        assert record.pop("vehicle") == "truck"
    assert received == expected
    texts = {
        (r["message"], name): value
        for r in received
        for name, value in r["signals"].items()
        if isinstance(value, str)
    }
    assert texts == TEXTS

    with psycopg.connect(PG_URL) as connection:
        rows = connection.execute(
            f"SELECT message, signal, text, value FROM {schema}.signals WHERE text IS NOT NULL"
        ).fetchall()
        latest = connection.execute(
            f"SELECT message, signal, text FROM {schema}.latest_values WHERE text IS NOT NULL"
        ).fetchall()
        numbers = connection.execute(
            f"SELECT count(*) FROM {schema}.signals WHERE text IS NULL"
        ).fetchone()
    assert {(m, s): t for m, s, t, _ in rows} == TEXTS and len(rows) == len(TEXTS)
    assert {v for *_, v in rows} == {None}
    assert {(m, s): t for m, s, t in latest} == TEXTS
    numeric = sum(1 for r in received for v in r["signals"].values() if not isinstance(v, str))
    assert numbers == (numeric,)

    lake_texts = {
        (message, name): value
        for message in ("VI", "SOFT", "ECUID")
        for name, value in pq.read_table(next(lake.glob(f"vehicle=truck/message={message}/*/*")))
        .to_pylist()[0]
        .items()
        if (message, name) in TEXTS
    }
    assert lake_texts == TEXTS
    vi = pq.read_table(next(lake.glob("vehicle=truck/message=VI/*/*")))
    assert vi.schema.field("Vehicle_Identification_Number").type == pa.string()


def test_a_receiver_stopped_by_sigterm_closes_its_lake_with_every_batch(
    outbox: Path, sent: Counter[Value], tmp_path: Path
) -> None:
    # systemd and Kubernetes stop a service with SIGTERM: the receiver must stop as Ctrl-C
    # stops it, its open files closed into the lake, not leave them to the next start.
    lake, taken = tmp_path / "lake", tmp_path / "taken.jsonl"
    receiver = ReceiverProcess(
        tmp_path / "r", "--dir", outbox, "--parquet", lake, "--batches", taken
    )
    count = len(batch_files(outbox))

    def all_taken() -> bool:
        return taken.exists() and len(taken.read_text().splitlines()) == count

    try:
        wait_for(all_taken, "every batch taken", 30)
    finally:
        receiver.process.terminate()
        stderr = receiver.finish()
    assert receiver.process.returncode == 0, stderr
    assert f"{count} batches received" in stderr
    assert not list((lake / "_journal").rglob("*.arrow"))
    assert lake_values(lake) == sent
