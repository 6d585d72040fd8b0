"""PostgreSQL (psycopg 3): signal values in one long table, written with binary COPY, each
group of batches in one transaction with its rows in the `batches` ledger, so a batch
delivered twice (to one receiver or to two of one share group) is written once.

The schema is the receiver's: created and migrated at start, under an advisory lock, by
the versions in `MIGRATIONS` (docs/sinks.md describes the tables).
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Sequence
from datetime import UTC

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from agent.cloud.parser import ReceivedBatch
from agent.cloud.sinks.base import Sink
from agent.decode.text import text_present

log = logging.getLogger(__name__)

DEFAULT_SCHEMA = "telemetry"

#: The schema's versions, in order: a new version is a new entry, never an edit of one that
#: has shipped. `{s}` is the receiver's schema.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE {s}.batches (
        stream_id text NOT NULL,
        sequence bigint NOT NULL,
        vehicle text NOT NULL,
        frames integer NOT NULL,
        signal_values integer NOT NULL,
        written_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream_id, sequence)
    );
    CREATE TABLE {s}.series (
        series_id serial PRIMARY KEY,
        vehicle text NOT NULL,
        bus text NOT NULL,
        message text NOT NULL,
        signal text NOT NULL,
        rule text NOT NULL,
        UNIQUE (vehicle, bus, message, signal, rule)
    );
    CREATE TABLE {s}.signal_values (
        series_id integer NOT NULL,
        time timestamptz NOT NULL,
        value double precision NOT NULL
    );
    CREATE INDEX ON {s}.signal_values (series_id, time);
    CREATE TABLE {s}.latest (
        series_id integer PRIMARY KEY,
        time timestamptz NOT NULL,
        value double precision NOT NULL
    );
    CREATE TABLE {s}.raw_frames (
        vehicle text NOT NULL,
        bus text NOT NULL,
        time timestamptz NOT NULL,
        can_id bigint NOT NULL,
        rule text NOT NULL,
        data bytea NOT NULL
    );
    CREATE VIEW {s}.signals AS
        SELECT s.vehicle, s.bus, s.message, s.signal, s.rule, v.time, v.value
        FROM {s}.signal_values v JOIN {s}.series s USING (series_id);
    CREATE VIEW {s}.latest_values AS
        SELECT s.vehicle, s.bus, s.message, s.signal, s.rule, l.time, l.value
        FROM {s}.latest l JOIN {s}.series s USING (series_id);
    """,
    # Text signals (docs/wire-format.md): a long table and latest values of their own; the
    # views give them in a column `text`, their `value` null.
    """
    CREATE TABLE {s}.text_values (
        series_id integer NOT NULL,
        time timestamptz NOT NULL,
        value text NOT NULL
    );
    CREATE INDEX ON {s}.text_values (series_id, time);
    CREATE TABLE {s}.latest_text (
        series_id integer PRIMARY KEY,
        time timestamptz NOT NULL,
        value text NOT NULL
    );
    CREATE OR REPLACE VIEW {s}.signals AS
        SELECT s.vehicle, s.bus, s.message, s.signal, s.rule, v.time, v.value, NULL::text AS text
        FROM {s}.signal_values v JOIN {s}.series s USING (series_id)
        UNION ALL
        SELECT s.vehicle, s.bus, s.message, s.signal, s.rule, t.time, NULL, t.value
        FROM {s}.text_values t JOIN {s}.series s USING (series_id);
    CREATE OR REPLACE VIEW {s}.latest_values AS
        SELECT s.vehicle, s.bus, s.message, s.signal, s.rule, l.time, l.value, NULL::text AS text
        FROM {s}.latest l JOIN {s}.series s USING (series_id)
        UNION ALL
        SELECT s.vehicle, s.bus, s.message, s.signal, s.rule, t.time, NULL, t.value
        FROM {s}.latest_text t JOIN {s}.series s USING (series_id);
    """,
)

#: PostgreSQL's binary COPY: the header, and a row of (series_id int4, time timestamptz,
#: value float8) with each field's length before it, big-endian.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)
_COPY_TRAILER = struct.pack("!h", -1)
_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("series_len", ">i4"),
        ("series", ">i4"),
        ("time_len", ">i4"),
        ("time", ">i8"),
        ("value_len", ">i4"),
        ("value", ">f8"),
    ]
)
#: timestamptz counts microseconds from 2000-01-01 UTC.
_PG_EPOCH_US = 946_684_800_000_000

SeriesKey = tuple[str, str, str, str, str]  # vehicle, bus, message, signal, rule


def migrate(connection: psycopg.Connection[TupleRow], schema: str) -> int:
    """Bring `schema` to the last version, once across receivers that start together; the
    version it is at."""
    s = sql.Identifier(schema)
    with connection.transaction():
        # Two receivers starting at once: the second waits here, then finds nothing to do.
        connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"telemetry:{schema}",))
        connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
        connection.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(s)
        )
        row = connection.execute(
            sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_migrations").format(s)
        ).fetchone()
        current = int(row[0]) if row else 0
        for version, script in enumerate(MIGRATIONS[current:], start=current + 1):
            connection.execute(sql.SQL(script).format(s=s))
            connection.execute(
                sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)").format(s),
                (version,),
            )
            log.info("PostgreSQL schema %s migrated to version %d", schema, version)
    return len(MIGRATIONS)


def latest_values(
    url: str, schema: str, vehicle: str, timeout_s: float
) -> list[tuple[str, str, str, float | str, float]]:
    """A vehicle's newest value of each signal in `schema`'s latest tables: bus, message,
    signal, value (a double, or the text of a text signal) and Unix seconds; of a signal
    that several collection rules keep, the newest of theirs. A database that does not
    answer within `timeout_s` is an error, not a wait."""
    query = sql.SQL(
        "SELECT DISTINCT ON (bus, message, signal) bus, message, signal, "
        "value, text, extract(epoch FROM time)::float8 "
        "FROM {}.latest_values WHERE vehicle = %s ORDER BY bus, message, signal, time DESC"
    ).format(sql.Identifier(schema))
    whole_seconds = max(1, math.ceil(timeout_s))
    with psycopg.connect(url, connect_timeout=whole_seconds) as connection:
        timeout = sql.SQL("SET statement_timeout = {}").format(sql.Literal(whole_seconds * 1000))
        connection.execute(timeout)
        rows = connection.execute(query, (vehicle,)).fetchall()
    return [
        (str(bus), str(message), str(signal), text if value is None else float(value), float(t))
        for bus, message, signal, value, text, t in rows
    ]


def _keep_latest(schema: sql.Identifier, table: str, value_type: str) -> sql.Composed:
    """An upsert of each series' newest value into `table`, from arrays of series ids, times
    (microseconds since 1970) and values of `value_type`: kept where newer."""
    return sql.SQL(
        "INSERT INTO {s}.{t} AS l (series_id, time, value) "
        "SELECT series_id, timestamptz 'epoch' + time_us * interval '1 microsecond', value "
        "FROM unnest(%s::int[], %s::bigint[], %s::{v}[]) AS u(series_id, time_us, value) "
        "ON CONFLICT (series_id) DO UPDATE SET time = excluded.time, value = excluded.value "
        "WHERE excluded.time >= l.time"
    ).format(s=schema, t=sql.Identifier(table), v=sql.SQL(value_type))


class PostgresSink(Sink):
    """Each `write` is one transaction: the ledger first, then the rows of the batches that
    were new, then the latest values. Committed means durable (synchronous_commit)."""

    def __init__(self, url: str, schema: str = DEFAULT_SCHEMA) -> None:
        self.url = url
        self.schema = schema
        self.connection = self._connect()
        migrate(self.connection, schema)
        self._series: dict[SeriesKey, int] = {}
        s = sql.Identifier(schema)
        self._claim = sql.SQL(
            "INSERT INTO {}.batches (stream_id, sequence, vehicle, frames, signal_values) "
            "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::int[], %s::int[]) "
            "ON CONFLICT DO NOTHING RETURNING stream_id, sequence"
        ).format(s)
        self._copy = sql.SQL(
            "COPY {}.signal_values (series_id, time, value) FROM STDIN (FORMAT BINARY)"
        ).format(s)
        self._copy_text = sql.SQL("COPY {}.text_values (series_id, time, value) FROM STDIN").format(
            s
        )
        self._latest_text = _keep_latest(s, "latest_text", "text")
        self._copy_raw = sql.SQL(
            "COPY {}.raw_frames (vehicle, bus, time, can_id, rule, data) FROM STDIN"
        ).format(s)
        self._latest = _keep_latest(s, "latest", "float8")
        self._new_series = sql.SQL(
            "INSERT INTO {s}.series (vehicle, bus, message, signal, rule) "
            "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) "
            "ON CONFLICT DO NOTHING"
        ).format(s=s)
        self._series_ids = sql.SQL(
            "SELECT s.series_id, s.vehicle, s.bus, s.message, s.signal, s.rule FROM {s}.series s "
            "JOIN unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) "
            "AS k(vehicle, bus, message, signal, rule) USING (vehicle, bus, message, signal, rule)"
        ).format(s=s)

    def _connect(self) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(
            self.url, autocommit=True, application_name=f"telemetry-agent receive {self.schema}"
        )

    def write(self, batches: Sequence[ReceivedBatch]) -> list[ReceivedBatch]:
        if not batches:
            return []
        if self.connection.broken or self.connection.closed:
            # The database restarted, or ended this session: the receiver writes the same
            # group again over a new one.
            self.connection = self._connect()
        # Sorted, so two receivers claiming overlapping batches lock them in one order.
        batches = sorted(batches, key=lambda b: (b.stream_id, b.sequence))
        self._learn_series(batches)
        with self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute(
                self._claim,
                (
                    [b.stream_id for b in batches],
                    [b.sequence for b in batches],
                    [b.vehicle_id for b in batches],
                    [b.frames for b in batches],
                    [b.signals for b in batches],
                ),
            )
            claimed = {(str(k), int(n)) for k, n in cursor.fetchall()}
            new = [b for b in batches if (b.stream_id, b.sequence) in claimed]
            series, time_us, value = self._columns(new)
            if len(series):
                rows = np.empty(len(series), _ROW)
                rows["fields"] = 3
                rows["series_len"] = 4
                rows["series"] = series
                rows["time_len"] = 8
                rows["time"] = time_us - _PG_EPOCH_US
                rows["value_len"] = 8
                rows["value"] = value
                with cursor.copy(self._copy) as copy:
                    copy.write(_COPY_HEADER + rows.tobytes() + _COPY_TRAILER)
                self._write_latest(cursor, series, time_us, value)
            self._write_texts(cursor, new)
            self._write_raw(cursor, new)
        return [b for b in batches if (b.stream_id, b.sequence) not in claimed]

    def _learn_series(self, batches: Sequence[ReceivedBatch]) -> None:
        """Ids for the series these batches name, made where new in a transaction of their
        own: an id outlives a write that fails, and two receivers agree on every id."""
        missing = sorted(
            {
                key
                for b in batches
                for block in b.blocks
                for signal in block.signals
                if (key := (b.vehicle_id, block.bus, block.message.name, signal.name, block.rule))
                not in self._series
            }
        )
        if not missing:
            return
        columns = [list(c) for c in zip(*missing, strict=True)]
        with self.connection.transaction():
            self.connection.execute(self._new_series, columns)
            found = self.connection.execute(self._series_ids, columns).fetchall()
        for series_id, vehicle, bus, message, signal, rule in found:
            key = (str(vehicle), str(bus), str(message), str(signal), str(rule))
            self._series[key] = int(series_id)

    def _columns(
        self, batches: Sequence[ReceivedBatch]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Every present value of these batches: its series, time (us since 1970) and value,
        one numpy column each, gathered a signal column at a time."""
        series: list[npt.NDArray[np.int32]] = []
        times: list[npt.NDArray[np.int64]] = []
        values: list[npt.NDArray[np.float64]] = []
        for b in batches:
            for block in b.blocks:
                time_us = block.t_ns // 1000
                for signal in block.signals:
                    if signal.raw.dtype == object:
                        continue  # text: _write_texts
                    key = (b.vehicle_id, block.bus, block.message.name, signal.name, block.rule)
                    value = np.asarray(signal.physical(), np.float64)
                    t = time_us
                    if signal.present is not None:
                        value, t = value[signal.present], t[signal.present]
                    series.append(np.full(len(value), self._series[key], np.int32))
                    times.append(t)
                    values.append(value)
        if not series:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float64)
        return np.concatenate(series), np.concatenate(times), np.concatenate(values)

    def _write_latest(
        self,
        cursor: psycopg.Cursor[TupleRow],
        series: npt.NDArray[np.int32],
        time_us: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
    ) -> None:
        """Each series' last value of these batches, kept where newer than the table's; in
        series order, so concurrent receivers lock the rows in one order."""
        order = np.lexsort((time_us, series))
        last = order[np.r_[series[order][1:] != series[order][:-1], True]]
        cursor.execute(
            self._latest, (series[last].tolist(), time_us[last].tolist(), value[last].tolist())
        )

    def _write_texts(
        self, cursor: psycopg.Cursor[TupleRow], batches: Sequence[ReceivedBatch]
    ) -> None:
        """The text values of these batches, and each text series' latest. Text comes a few
        values a minute (identification, diagnostic answers): written row by row."""
        rows: list[tuple[int, int, str]] = []
        for b in batches:
            for block in b.blocks:
                for signal in block.signals:
                    if signal.raw.dtype != object:
                        continue
                    key = (b.vehicle_id, block.bus, block.message.name, signal.name, block.rule)
                    carried = np.flatnonzero(text_present(signal.raw))
                    time_us = (block.t_ns[carried] // 1000).tolist()
                    values = signal.raw[carried].tolist()
                    series_id = self._series[key]
                    rows += [(series_id, t, v) for t, v in zip(time_us, values, strict=True)]
        if not rows:
            return
        with cursor.copy(self._copy_text) as copy:
            for series_id, time_us, value in rows:
                t = np.datetime64(time_us, "us").astype(object).replace(tzinfo=UTC)
                copy.write_row((series_id, t, value))
        latest: dict[int, tuple[int, str]] = {}
        for series_id, time_us, value in rows:
            if series_id not in latest or time_us >= latest[series_id][0]:
                latest[series_id] = (time_us, value)
        ordered = sorted(latest.items())  # series order: concurrent receivers lock alike
        cursor.execute(
            self._latest_text,
            (
                [k for k, _ in ordered],
                [t for _, (t, _) in ordered],
                [v for _, (_, v) in ordered],
            ),
        )

    def _write_raw(
        self, cursor: psycopg.Cursor[TupleRow], batches: Sequence[ReceivedBatch]
    ) -> None:
        captures = [(b.vehicle_id, raw) for b in batches for raw in b.raw if len(raw.frames)]
        if not captures:
            return
        with cursor.copy(self._copy_raw) as copy:
            for vehicle, raw in captures:
                frames = raw.frames
                bus = frames.buses[0]
                for k in range(len(frames)):
                    t = np.datetime64(int(frames.t_ns[k]) // 1000, "us").astype(object)
                    copy.write_row(
                        (
                            vehicle,
                            bus,
                            t.replace(tzinfo=UTC),
                            int(frames.can_id[k]),
                            raw.rule,
                            bytes(frames.data[k, : frames.length[k]]),
                        )
                    )

    def close(self) -> None:
        self.connection.close()
