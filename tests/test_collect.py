"""Collection rules: each mode against a plain reference written here (loops over the decoded
values), on the real RAV4 log and on hypothesis-generated series, as the cloud receives it
(encoded, sent through the wire format, parsed back)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.batcher import FIRST_AFTER_CHANGE_S
from agent.cloud.parser import ReceivedBatch, SchemaStore, parse_batch
from agent.collect import Collected, CollectError, Collector, CollectRule
from agent.collect.sample import SampleSettings
from agent.collect.trigger import RING_SLACK_NS, Trigger
from agent.config import Config, load_config, parse_config
from agent.decode import ALL_BUSES, Decoder, bus_decoders
from agent.frames import FrameBatch, FrameFlag
from agent.j1939.groups import GroupReader
from agent.logs import open_log
from agent.service import Agent
from agent.wire import telemetry_pb2 as pb
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import WireError, read_envelope
from harness.data import RAV4_ADAS_DBC, RAV4_LOG, RAV4_PT_DBC
from harness.outputs import outbox_lines, records
from harness.services import ReceiverProcess, broker, run_agent

Point = tuple[int, float]  # (t_ns, physical value)
#: (rule, message, signal, or signal.stat) -> the values the cloud got, in arrival order
Received = dict[tuple[str, str, str], list[Point]]

SECOND = 1_000_000_000
MS = 1_000_000


def config(bus: str, rules: str) -> Config:
    return parse_config(
        f'vehicle_id = "v"\n[[bus]]\nname = "can0"\nsource = "replay"\npath = "{RAV4_LOG}"\n'
        f"{bus}\n"
        f"{rules}",
        "test.toml",
        Path("."),
    )


def one_second_batches(frames: Iterable[FrameBatch]) -> Iterator[FrameBatch]:
    """The frames cut where the agent cuts them by default: every second of frame time."""
    pending: list[FrameBatch] = []
    current = None
    for batch in frames:
        second = batch.t_ns // SECOND
        for value in np.unique(second):
            if current is not None and value != current:
                yield FrameBatch.concat(pending)
                pending = []
            current = int(value)
            pending.append(batch.take(second == value))
    if pending:
        yield FrameBatch.concat(pending)


class Cloud:
    """Encodes what the rules kept into wire batches and reads them back, as the receiver
    does."""

    def __init__(self) -> None:
        self.encoder = BatchEncoder("v", "s", b"", compression="zstd")
        self.schemas = SchemaStore()
        self.sequence = 0
        self.values: Received = {}
        self.raw: dict[str, list[FrameBatch]] = {}
        self.bytes = 0

    def send(self, collected: Collected) -> ReceivedBatch | None:
        self.sequence += 1
        wire = self.encoder.encode([collected], self.sequence)
        if wire is None:
            assert not collected
            return None
        self.bytes += len(wire)
        self.schemas.add(read_envelope(self.encoder.announcement(wire.schema_id)), 1 << 30)
        batch = parse_batch(read_envelope(wire.payload), self.schemas)
        assert batch.frames == wire.frames and batch.signals == wire.signals
        for block in batch.blocks:
            assert block.rule
            for k, column in enumerate(block.signals):
                rows = np.ones(len(block), bool) if block.present is None else block.present[k]
                values = np.asarray(column.physical(), np.float64)[rows]
                self.values.setdefault((block.rule, block.message.name, column.name), []).extend(
                    zip(block.t_ns[rows].tolist(), values.tolist(), strict=True)
                )
        for capture in batch.raw:
            self.raw.setdefault(capture.rule, []).append(capture.frames)
        return batch


def run_batches(cfg: Config, batches: Iterable[tuple[str, FrameBatch]]) -> Cloud:
    decoders = bus_decoders(cfg.buses)
    collector = Collector(cfg.collect, decoders)
    groups = GroupReader()  # as the pipeline reads J1939 transfers for the rules
    cloud = Cloud()
    for bus, frames in batches:
        decoded = decoders[bus].decode(frames)
        completed = groups.read(decoders[bus], bus, frames, decoded)
        cloud.send(collector.collect(bus, frames, decoded, completed))
    cloud.send(collector.flush())
    return cloud


def run_rules(cfg: Config, batches: Iterable[FrameBatch]) -> Cloud:
    """`run_batches` for batches of bus can0."""
    return run_batches(cfg, (("can0", frames) for frames in batches))


def decoded_series(
    cfg: Config, batches: Iterable[FrameBatch]
) -> dict[tuple[str, str], list[Point]]:
    """Every signal's values, (message, signal) -> [(t, value)], by a loop over the decoder's
    columns (the decoder itself is checked against cantools elsewhere)."""
    decoder = bus_decoders(cfg.buses)["can0"]
    series: dict[tuple[str, str], list[Point]] = {}
    for frames in batches:
        for block in decoder.decode(frames).blocks:
            times = block.t_ns.tolist()
            for column in block.signals:
                values = np.asarray(column.physical(), np.float64).tolist()
                rows = [True] * len(times) if column.present is None else column.present.tolist()
                points = series.setdefault((block.message.name, column.name), [])
                for t, value, present in zip(times, values, rows, strict=True):
                    if present:
                        points.append((t, value))
    return series


# The references: the rules' documented behaviour, one value at a time.


def reference_sample(points: list[Point], period_ns: int, reduce: str) -> list[Point]:
    periods: dict[int, list[Point]] = {}
    for t, value in points:
        periods.setdefault(t // period_ns, []).append((t, value))
    out = []
    for period, group in periods.items():
        if reduce == "first":
            out.append(group[0])
        elif reduce == "last":
            out.append(group[-1])
        elif reduce == "mean":
            out.append((period * period_ns, sum(v for _, v in group) / len(group)))
        else:
            numbers = [p for p in group if not math.isnan(p[1])] or group[:1]
            best = min(v for _, v in numbers) if reduce == "min" else max(v for _, v in numbers)
            out.append(next(p for p in numbers if p[1] == best or math.isnan(best)))
    return out


def reference_change(
    points: list[Point], deadband: float, relative: float, heartbeat_ns: int
) -> list[Point]:
    out: list[Point] = []
    for t, value in points:
        if not out:
            out.append((t, value))
            continue
        last_t, last = out[-1]
        if math.isnan(last) or math.isnan(value):
            moved = math.isnan(last) != math.isnan(value)
        else:
            moved = abs(value - last) > max(deadband, relative * abs(last))
        if moved or (heartbeat_ns and t - last_t >= heartbeat_ns):
            out.append((t, value))
    return out


def reference_aggregate(points: list[Point], window_ns: int, stat: str) -> list[Point]:
    windows: dict[int, list[float]] = {}
    for t, value in points:
        windows.setdefault(t // window_ns, []).append(value)
    functions: dict[str, Callable[[list[float]], float]] = {
        "min": min,
        "max": max,
        "mean": statistics.fmean,
        "count": len,
        "stddev": statistics.pstdev,
    }
    return [(w * window_ns, float(functions[stat](values))) for w, values in windows.items()]


def reference_trigger(
    condition_series: dict[str, list[Point]],
    condition: Callable[[dict[str, float], int], bool],
    selected: list[Point],
    before_ns: int,
    after_ns: int,
    min_interval_ns: int,
    edge: str,
) -> tuple[list[int], list[Point]]:
    """The firing times, and the selected values within a firing's window."""
    changes: dict[int, list[tuple[str, float]]] = {}
    for name, points in condition_series.items():
        for t, value in points:
            changes.setdefault(t, []).append((name, value))
    held = dict.fromkeys(condition_series, math.nan)
    was_true = False
    fired: list[int] = []
    for t in sorted(changes):
        for name, value in changes[t]:
            held[name] = value
        true = condition(held, t)
        firing = true and (edge == "always" or not was_true)
        was_true = true
        if firing and (not fired or t - fired[-1] >= min_interval_ns):
            fired.append(t)
    kept = [
        (t, value)
        for t, value in selected
        if any(f - before_ns <= t <= f + after_ns for f in fired)
    ]
    return fired, kept


def same(got: list[Point], expected: list[Point], exact: bool = True) -> None:
    """Equal values at equal times; NaN equals NaN; `exact=False`: floating-point sums."""
    assert len(got) == len(expected), (len(got), len(expected))
    for (t, value), (t_expected, value_expected) in zip(sorted(got), sorted(expected), strict=True):
        assert t == t_expected
        if math.isnan(value_expected):
            assert math.isnan(value)
        elif exact:
            assert value == value_expected, (t, value, value_expected)
        else:
            assert math.isclose(value, value_expected, rel_tol=1e-9, abs_tol=1e-9), (
                t,
                value,
                value_expected,
            )


# The real RAV4 log, every mode in one rule set.

RAV4_BUS = f'dbc = ["{RAV4_PT_DBC}", "{RAV4_ADAS_DBC}"]'
RAV4_RULES = """
[[collect]]
name = "all-steer"
mode = "all"
signals = ["STEER_*"]
messages = ["STEER_ANGLE_SENSOR"]

[[collect]]
name = "speed-last"
mode = "sample"
signals = ["SPEED.SPEED"]
period_ms = 1000

[[collect]]
name = "wheels-first"
mode = "sample"
signals = ["WHEEL_SPEED_F?"]
period_ms = 700
reduce = "first"

[[collect]]
name = "wheels-min"
mode = "sample"
signals = ["WHEEL_SPEED_R?"]
period_ms = 1300
reduce = "min"

[[collect]]
name = "gas-max"
mode = "sample"
signals = ["GAS_PEDAL.GAS_PEDAL"]
period_ms = 2000
reduce = "max"

[[collect]]
name = "speed-mean"
mode = "sample"
signals = ["SPEED.SPEED"]
period_ms = 500
reduce = "mean"

[[collect]]
name = "steer-deadband"
mode = "change"
signals = ["STEER_ANGLE_SENSOR.STEER_ANGLE", "STEER_RATE"]
deadband = 1.0
heartbeat_ms = 2500

[[collect]]
name = "wheel-relative"
mode = "change"
signals = ["WHEEL_SPEED_FL"]
deadband_rel = 0.01

[[collect]]
name = "brake-changes"
mode = "change"
signals = ["BRAKE_MODULE.BRAKE_PRESSURE"]

[[collect]]
name = "wheel-stats"
mode = "aggregate"
signals = ["WHEEL_SPEED_*"]
window_ms = 1000

[[collect]]
name = "etq-stats"
mode = "aggregate"
signals = ["ETQREAL"]
window_ms = 3000
stats = ["stddev", "count"]

[[collect]]
name = "fast"
mode = "trigger"
when = "SPEED.SPEED > 60"
signals = ["SPEED.SPEED", "WHEEL_SPEED_FL"]
before_ms = 2000
after_ms = 3000

[[collect]]
name = "gas"
mode = "trigger"
when = "GAS_PEDAL.GAS_PEDAL > 20 and SPEED.SPEED > 40"
signals = ["GAS_PEDAL.GAS_PEDAL", "WHEEL_SPEED_RR"]
before_ms = 1500
after_ms = 500
min_interval_ms = 4000
edge = "always"

[[collect]]
name = "speeding-up"
mode = "trigger"
when = "SPEED.SPEED - mean(SPEED.SPEED, 3000) > 1.5 and abs(STEER_ANGLE_SENSOR.STEER_ANGLE) < 2"
signals = ["SPEED.SPEED"]
before_ms = 500
after_ms = 500

[[collect]]
name = "steer-log"
mode = "raw"
messages = ["STEER_ANGLE_SENSOR"]
ids = [180]
"""


def rav4_frames() -> Iterator[FrameBatch]:
    """The frames of the log's can0, as a replay bus named can0 takes them."""
    for batch in open_log(RAV4_LOG).batches():
        yield batch.take(batch.bus == batch.buses.index("can0"))


@pytest.fixture(scope="module")
def rav4() -> tuple[Config, Cloud, dict[tuple[str, str], list[Point]]]:
    cfg = config(RAV4_BUS, RAV4_RULES)
    cloud = run_rules(cfg, one_second_batches(rav4_frames()))
    return cfg, cloud, decoded_series(cfg, rav4_frames())


def test_all_sends_every_value(rav4: Any) -> None:
    _, cloud, series = rav4
    for signal in ("STEER_ANGLE", "STEER_FRACTION", "STEER_RATE"):
        same(
            cloud.values["all-steer", "STEER_ANGLE_SENSOR", signal],
            series["STEER_ANGLE_SENSOR", signal],
        )
    assert {k[2] for k in cloud.values if k[0] == "all-steer"} == {
        "STEER_ANGLE",
        "STEER_FRACTION",
        "STEER_RATE",
    }


@pytest.mark.parametrize(
    ("rule", "message", "signals", "period_ms", "reduce"),
    [
        ("speed-last", "SPEED", ["SPEED"], 1000, "last"),
        ("wheels-first", "WHEEL_SPEEDS", ["WHEEL_SPEED_FL", "WHEEL_SPEED_FR"], 700, "first"),
        ("wheels-min", "WHEEL_SPEEDS", ["WHEEL_SPEED_RL", "WHEEL_SPEED_RR"], 1300, "min"),
        ("gas-max", "GAS_PEDAL", ["GAS_PEDAL"], 2000, "max"),
    ],
)
def test_sample_sends_one_value_per_period(
    rav4: Any, rule: str, message: str, signals: list[str], period_ms: int, reduce: str
) -> None:
    _, cloud, series = rav4
    for signal in signals:
        expected = reference_sample(series[message, signal], period_ms * MS, reduce)
        same(cloud.values[rule, message, signal], expected)
        assert len(expected) >= 60_000 // period_ms - 1


def test_sample_mean_is_the_period_mean(rav4: Any) -> None:
    _, cloud, series = rav4
    expected = reference_sample(series["SPEED", "SPEED"], 500 * MS, "mean")
    same(cloud.values["speed-mean", "SPEED", "SPEED.mean"], expected, exact=False)


@pytest.mark.parametrize(
    ("rule", "message", "signal", "deadband", "relative", "heartbeat_ms"),
    [
        ("steer-deadband", "STEER_ANGLE_SENSOR", "STEER_ANGLE", 1.0, 0.0, 2500),
        ("steer-deadband", "STEER_ANGLE_SENSOR", "STEER_RATE", 1.0, 0.0, 2500),
        ("wheel-relative", "WHEEL_SPEEDS", "WHEEL_SPEED_FL", 0.0, 0.01, 0),
        ("brake-changes", "BRAKE_MODULE", "BRAKE_PRESSURE", 0.0, 0.0, 0),
    ],
)
def test_change_sends_what_moved_past_the_deadband(
    rav4: Any,
    rule: str,
    message: str,
    signal: str,
    deadband: float,
    relative: float,
    heartbeat_ms: int,
) -> None:
    _, cloud, series = rav4
    points = series[message, signal]
    expected = reference_change(points, deadband, relative, heartbeat_ms * MS)
    same(cloud.values[rule, message, signal], expected)
    assert 1 < len(expected) < len(points)


def test_aggregate_sends_window_statistics(rav4: Any) -> None:
    _, cloud, series = rav4
    for wheel in ("FL", "FR", "RL", "RR"):
        points = series["WHEEL_SPEEDS", f"WHEEL_SPEED_{wheel}"]
        for stat in ("min", "max", "mean", "count", "stddev"):
            got = cloud.values["wheel-stats", "WHEEL_SPEEDS", f"WHEEL_SPEED_{wheel}.{stat}"]
            same(
                got,
                reference_aggregate(points, SECOND, stat),
                exact=stat in ("min", "max", "count"),
            )
    points = series["GAS_PEDAL", "ETQREAL"]
    for stat in ("stddev", "count"):
        got = cloud.values["etq-stats", "GAS_PEDAL", f"ETQREAL.{stat}"]
        same(got, reference_aggregate(points, 3 * SECOND, stat), exact=stat == "count")
    assert not any(k[2].endswith(".mean") for k in cloud.values if k[0] == "etq-stats")


def test_trigger_captures_exactly_the_window_around_each_rising_edge(rav4: Any) -> None:
    _, cloud, series = rav4
    speed = series["SPEED", "SPEED"]
    fired, _ = reference_trigger(
        {"speed": speed}, lambda v, t: v["speed"] > 60, [], 2000 * MS, 3000 * MS, 0, "rising"
    )
    # The log crosses 60 km/h upwards more than once, and not at every value above it.
    rising = [t for (_, a), (t, b) in itertools.pairwise(speed) if a <= 60 < b]
    assert fired == [t for t, v in speed[:1] if v > 60] + rising
    assert len(rising) >= 2
    for message, signal in (("SPEED", "SPEED"), ("WHEEL_SPEEDS", "WHEEL_SPEED_FL")):
        points = series[message, signal]
        _, expected = reference_trigger(
            {"speed": speed},
            lambda v, t: v["speed"] > 60,
            points,
            2000 * MS,
            3000 * MS,
            0,
            "rising",
        )
        got = cloud.values["fast", message, signal]
        same(got, expected)
        # Each firing's window is there whole: before and after the edge.
        times = {t for t, _ in got}
        for f in fired:
            window = [t for t, _ in points if f - 2000 * MS <= t <= f + 3000 * MS]
            assert window and times.issuperset(window)
        assert len(got) < len(points)


def test_trigger_always_on_signals_of_two_messages_with_a_minimum_interval(rav4: Any) -> None:
    _, cloud, series = rav4
    condition = {"gas": series["GAS_PEDAL", "GAS_PEDAL"], "speed": series["SPEED", "SPEED"]}

    def when(v: dict[str, float], t: int) -> bool:
        return v["gas"] > 20 and v["speed"] > 40

    for message, signal in (("GAS_PEDAL", "GAS_PEDAL"), ("WHEEL_SPEEDS", "WHEEL_SPEED_RR")):
        fired, expected = reference_trigger(
            condition, when, series[message, signal], 1500 * MS, 500 * MS, 4000 * MS, "always"
        )
        assert len(fired) >= 2
        assert all(b - a >= 4000 * MS for a, b in itertools.pairwise(fired))
        same(cloud.values["gas", message, signal], expected)


def test_trigger_with_a_window_function(rav4: Any) -> None:
    _, cloud, series = rav4
    speed = series["SPEED", "SPEED"]

    def when(v: dict[str, float], t: int) -> bool:
        window = [value for s, value in speed if t - 3000 * MS < s <= t]
        mean = sum(window) / len(window) if window else math.nan
        return v["speed"] - mean > 1.5 and abs(v["steer"]) < 2

    fired, expected = reference_trigger(
        {"speed": speed, "steer": series["STEER_ANGLE_SENSOR", "STEER_ANGLE"]},
        when,
        speed,
        500 * MS,
        500 * MS,
        0,
        "rising",
    )
    assert len(fired) >= 2
    same(cloud.values["speeding-up", "SPEED", "SPEED"], expected)


def test_raw_sends_the_frames_as_the_bus_carried_them(rav4: Any) -> None:
    _cfg, cloud, _ = rav4
    got = FrameBatch.concat(cloud.raw["steer-log"])
    frames = FrameBatch.concat(list(rav4_frames()))
    steer = 0x25  # STEER_ANGLE_SENSOR
    expected = frames.take(np.isin(frames.can_id, [steer, 180]))
    assert len(got) == len(expected) > 0
    for field in ("t_ns", "can_id", "flags", "length"):
        assert np.array_equal(getattr(got, field), getattr(expected, field)), field
    for k in range(len(got)):
        assert got.payload(k) == expected.payload(k)
    # The cloud decodes them with the DBC into what the device would have decoded.
    decoder = Decoder({ALL_BUSES: [RAV4_PT_DBC, RAV4_ADAS_DBC]})
    cloud_side = {
        (b.message.name, c.name): c.physical().tolist()
        for b in decoder.decode(got).blocks
        for c in b.signals
    }
    device = {
        (b.message.name, c.name): c.physical().tolist()
        for b in decoder.decode(expected).blocks
        for c in b.signals
    }
    assert cloud_side == device and ("STEER_ANGLE_SENSOR", "STEER_ANGLE") in device


def test_a_signal_in_several_rules_is_sent_by_each(rav4: Any) -> None:
    _, cloud, _ = rav4
    rules = {k[0] for k in cloud.values if k[1:] == ("SPEED", "SPEED")}
    assert rules == {"speed-last", "fast", "speeding-up"}
    assert ("speed-mean", "SPEED", "SPEED.mean") in cloud.values


# Hypothesis: random series cut into random batches, through every mode.

SYNTHETIC_DBC = """VERSION ""

NS_ :

BS_:

BU_: ECU

BO_ 256 FAST: 8 ECU
 SG_ X : 0|16@1+ (0.5,-10) [0|0] "" ECU
 SG_ Y : 16|8@1- (1,0) [0|0] "" ECU
 SG_ MODE M : 24|2@1+ (1,0) [0|0] "" ECU
 SG_ Q m1 : 32|8@1+ (1,0) [0|0] "" ECU

BO_ 512 SLOW: 2 ECU
 SG_ Z : 0|8@1+ (1,0) [0|0] "" ECU
"""


@st.composite
def traffic(draw: st.DrawFn) -> tuple[list[tuple[int, int, bytes]], list[int]]:
    """(t_ns, frame id, payload) in time order, and where the batches are cut."""
    count = draw(st.integers(1, 300))
    frames = []
    t = draw(st.integers(0, 10 * SECOND))
    x = draw(st.integers(0, 65535))
    for _ in range(count):
        t += draw(st.sampled_from([0, 1, 7 * MS, 10 * MS, 100 * MS, 900 * MS, 3 * SECOND]))
        if draw(st.booleans()):
            x = draw(
                st.one_of(st.integers(0, 65535), st.integers(max(0, x - 30), min(65535, x + 30)))
            )
            y = draw(st.integers(-128, 127))
            mode = draw(st.integers(0, 3))
            q = draw(st.integers(0, 255))
            length = draw(st.sampled_from([8, 8, 8, 4, 2]))
            payload = x.to_bytes(2, "little") + (y & 0xFF).to_bytes(1, "little") + bytes([mode, q])
            frames.append((t, 256, (payload + bytes(3))[:length]))
        else:
            frames.append((t, 512, bytes([draw(st.integers(0, 255)), 0])))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, count - 1)), max_size=8))))
    return frames, cuts


def frames_of(rows: list[tuple[Any, ...]], buses: tuple[str, ...] = ("can0",)) -> FrameBatch:
    """Frames from (t_ns, id, payload[, flags[, channel index]]) rows."""
    batch = FrameBatch.allocate(len(rows), buses)
    for k, row in enumerate(rows):
        t, can_id, payload = row[:3]
        batch.t_ns[k], batch.can_id[k], batch.length[k] = t, can_id, len(payload)
        batch.data[k, : len(payload)] = np.frombuffer(payload, np.uint8)
        batch.flags[k] = row[3] if len(row) > 3 else 0
        batch.bus[k] = row[4] if len(row) > 4 else 0
    return batch


def frame_batches(frames: list[tuple[int, int, bytes]], cuts: list[int]) -> list[FrameBatch]:
    """The frames in batches cut before each of `cuts`, except where that would part frames
    of one instant: the agent never does (it cuts batches by frame time)."""
    batch = frames_of(list(frames))
    cuts = [c for c in cuts if c < len(frames) and frames[c][0] != frames[c - 1][0]]
    edges = [0, *cuts, len(frames)]
    return [batch.take(slice(a, b)) for a, b in itertools.pairwise(edges) if b > a]


@pytest.fixture(scope="module")
def synthetic_dbc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dbc") / "synthetic.dbc"
    path.write_text(SYNTHETIC_DBC)
    return path


HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def check_rule(
    dbc: Path, rule: str, frames: list[tuple[int, int, bytes]], cuts: list[int]
) -> tuple[Cloud, dict[tuple[str, str], list[Point]]]:
    cfg = config(f'dbc = ["{dbc}"]', rule)
    cloud = run_rules(cfg, frame_batches(frames, cuts))
    return cloud, decoded_series(cfg, [frame_batches(frames, [])[0]])


@HYPOTHESIS
@given(
    traffic(),
    st.sampled_from(["first", "last", "min", "max", "mean"]),
    st.sampled_from([1, 10, 250, 1000, 5000]),
)
def test_sample_matches_the_reference(
    synthetic_dbc: Path, data: Any, reduce: str, period_ms: int
) -> None:
    frames, cuts = data
    rule = (
        '[[collect]]\nname = "r"\nmode = "sample"\nsignals = ["X", "Y", "Q"]\n'
        f'period_ms = {period_ms}\nreduce = "{reduce}"\n'
    )
    cloud, series = check_rule(synthetic_dbc, rule, frames, cuts)
    for signal in ("X", "Y", "Q"):
        key = f"{signal}.mean" if reduce == "mean" else signal
        expected = reference_sample(series.get(("FAST", signal), []), period_ms * MS, reduce)
        same(cloud.values.get(("r", "FAST", key), []), expected, exact=reduce != "mean")


@HYPOTHESIS
@given(
    traffic(),
    st.sampled_from([0.0, 0.5, 3.0, 100.0]),
    st.sampled_from([0.0, 0.01, 0.2]),
    st.sampled_from([0, 5, 1000, 4000]),
)
def test_change_matches_the_reference(
    synthetic_dbc: Path, data: Any, deadband: float, relative: float, heartbeat_ms: int
) -> None:
    frames, cuts = data
    band = f"deadband = {deadband}\n" if relative == 0 else f"deadband_rel = {relative}\n"
    beat = f"heartbeat_ms = {heartbeat_ms}\n" if heartbeat_ms else ""
    rule = f'[[collect]]\nname = "r"\nmode = "change"\nsignals = ["X", "Q", "Z"]\n{band}{beat}'
    cloud, series = check_rule(synthetic_dbc, rule, frames, cuts)
    for message, signal in (("FAST", "X"), ("FAST", "Q"), ("SLOW", "Z")):
        expected = reference_change(
            series.get((message, signal), []),
            deadband if relative == 0 else 0.0,
            relative,
            heartbeat_ms * MS,
        )
        same(cloud.values.get(("r", message, signal), []), expected)


@HYPOTHESIS
@given(traffic(), st.sampled_from([1, 100, 1000, 7000]))
def test_aggregate_matches_the_reference(synthetic_dbc: Path, data: Any, window_ms: int) -> None:
    frames, cuts = data
    rule = (
        '[[collect]]\nname = "r"\nmode = "aggregate"\nsignals = ["X", "Q"]\n'
        f"window_ms = {window_ms}\n"
    )
    cloud, series = check_rule(synthetic_dbc, rule, frames, cuts)
    for signal in ("X", "Q"):
        for stat in ("min", "max", "mean", "count", "stddev"):
            expected = reference_aggregate(series.get(("FAST", signal), []), window_ms * MS, stat)
            got = cloud.values.get(("r", "FAST", f"{signal}.{stat}"), [])
            same(got, expected, exact=stat in ("min", "max", "count"))


@HYPOTHESIS
@given(
    traffic(),
    st.sampled_from(["rising", "always"]),
    st.sampled_from([0, 10, 1000]),
    st.sampled_from([1, 5, 2000]),
    st.sampled_from([0, 500, 5000]),
)
def test_trigger_matches_the_reference(
    synthetic_dbc: Path, data: Any, edge: str, before_ms: int, after_ms: int, min_interval_ms: int
) -> None:
    frames, cuts = data
    rule = (
        '[[collect]]\nname = "r"\nmode = "trigger"\nwhen = "X > 100 and Y < 0 or Z > 200"\n'
        f'signals = ["Y", "Q", "Z"]\nedge = "{edge}"\nbefore_ms = {before_ms}\n'
        f"after_ms = {after_ms}\nmin_interval_ms = {min_interval_ms}\n"
    )
    cloud, series = check_rule(synthetic_dbc, rule, frames, cuts)
    condition = {
        name: series.get((m, name), []) for m, name in (("FAST", "X"), ("FAST", "Y"), ("SLOW", "Z"))
    }

    def when(v: dict[str, float], t: int) -> bool:
        return (v["X"] > 100 and v["Y"] < 0) or v["Z"] > 200

    for message, signal in (("FAST", "Y"), ("FAST", "Q"), ("SLOW", "Z")):
        _, expected = reference_trigger(
            condition,
            when,
            series.get((message, signal), []),
            before_ms * MS,
            after_ms * MS,
            min_interval_ms * MS,
            edge,
        )
        same(cloud.values.get(("r", message, signal), []), expected)


@HYPOTHESIS
@given(traffic())
def test_all_and_raw_match_the_reference(synthetic_dbc: Path, data: Any) -> None:
    frames, cuts = data
    rules = (
        '[[collect]]\nname = "a"\nmode = "all"\nsignals = ["Q", "Z"]\n'
        '[[collect]]\nname = "w"\nmode = "raw"\nids = [512]\n'
    )
    cloud, series = check_rule(synthetic_dbc, rules, frames, cuts)
    for message, signal in (("FAST", "Q"), ("SLOW", "Z")):
        same(cloud.values.get(("a", message, signal), []), series.get((message, signal), []))
    raw = [
        (t, payload)
        for batch in cloud.raw.get("w", [])
        for t, payload in zip(
            batch.t_ns.tolist(), (batch.payload(k) for k in range(len(batch))), strict=True
        )
    ]
    assert raw == [(t, payload) for t, can_id, payload in frames if can_id == 512]


# The agent as a user runs it: rules in the config file, MQTT, the reference receiver.

AGENT_RULES = """
[[collect]]
name = "speed-1hz"
mode = "sample"
signals = ["SPEED.SPEED"]
period_ms = 1000

[[collect]]
name = "wheel-stats"
mode = "aggregate"
signals = ["WHEEL_SPEED_FL"]
window_ms = 2000
stats = ["mean", "count"]

[[collect]]
name = "fast"
mode = "trigger"
when = "SPEED.SPEED > 60"
signals = ["SPEED.SPEED"]
before_ms = 2000
after_ms = 3000

[[collect]]
name = "steer-log"
mode = "raw"
messages = ["STEER_ANGLE_SENSOR"]
"""


def test_the_agent_sends_what_its_rules_keep_and_the_receiver_names_the_rule(
    tmp_path: Path,
) -> None:
    with broker(tmp_path) as mqtt:
        receiver = ReceiverProcess(
            tmp_path / "received.jsonl", "--mqtt", mqtt.url, "--idle-exit", "3"
        )
        receiver.wait_ready("subscribed to")
        path = tmp_path / "agent.toml"
        path.write_text(
            f'vehicle_id = "rules"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{RAV4_LOG}"\n{RAV4_BUS}\n'
            f'[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\n[metrics]\nlisten = ""\n{AGENT_RULES}'
        )
        result = run_agent(path)
        assert result.returncode == 0, result.stderr
        summary = receiver.finish()
    assert "0 rejected" in summary, summary
    got: dict[str, list[dict[str, Any]]] = {}
    for row in records(receiver.output):
        got.setdefault(str(row["rule"]), []).append(row)
    assert set(got) == {"speed-1hz", "wheel-stats", "fast", "steer-log"}
    cfg = config(RAV4_BUS, AGENT_RULES)
    series = decoded_series(cfg, rav4_frames())

    def points(rule: str, key: str) -> list[Point]:
        return [(round(float(r["t"]) * SECOND), r["signals"][key]) for r in got[rule]]

    same(points("speed-1hz", "SPEED"), reference_sample(series["SPEED", "SPEED"], SECOND, "last"))
    wheel = series["WHEEL_SPEEDS", "WHEEL_SPEED_FL"]
    same(
        points("wheel-stats", "WHEEL_SPEED_FL.mean"),
        reference_aggregate(wheel, 2 * SECOND, "mean"),
        exact=False,
    )
    same(
        points("wheel-stats", "WHEEL_SPEED_FL.count"),
        reference_aggregate(wheel, 2 * SECOND, "count"),
    )
    assert all(r["window_ms"] == 2000 for r in got["wheel-stats"])
    _, fast = reference_trigger(
        {"speed": series["SPEED", "SPEED"]},
        lambda v, t: v["speed"] > 60,
        series["SPEED", "SPEED"],
        2000 * MS,
        3000 * MS,
        0,
        "rising",
    )
    same(points("fast", "SPEED"), fast)
    frames = FrameBatch.concat(list(rav4_frames()))
    steer = frames.take(frames.can_id == 0x25)
    assert sorted(
        (round(float(r["t"]) * SECOND), r["id"], r["data"]) for r in got["steer-log"]
    ) == [(t, 0x25, steer.payload(k).hex()) for k, t in enumerate(steer.t_ns.tolist())]


async def test_the_agent_counts_what_each_rule_kept_and_each_firing(tmp_path: Path) -> None:
    text = (
        f'vehicle_id = "v"\nstate_dir = "{tmp_path}"\nstatus_interval_s = 60\n'
        f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{RAV4_LOG}"\n{RAV4_BUS}\n'
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n[metrics]\nlisten = ""\n'
        f"{AGENT_RULES}"
    )
    agent = Agent(parse_config(text, "test.toml", tmp_path), status=None)
    assert await agent.run() == 0
    kept: dict[str, int] = {}
    for line in outbox_lines(tmp_path / "outbox"):
        row = json.loads(line)
        kept[row["rule"]] = kept.get(row["rule"], 0) + (
            len(row["signals"]) if "signals" in row else 1
        )
    registry = agent.metrics.registry
    for rule, values in kept.items():
        assert (
            registry.get_sample_value("telemetry_agent_collect_values_total", {"rule": rule})
            == values
        )
    series = decoded_series(config(RAV4_BUS, AGENT_RULES), rav4_frames())
    fired, _ = reference_trigger(
        {"speed": series["SPEED", "SPEED"]}, lambda v, t: v["speed"] > 60, [], 0, 0, 0, "rising"
    )
    assert registry.get_sample_value(
        "telemetry_agent_collect_triggers_total", {"rule": "fast"}
    ) == len(fired)
    assert (registry.get_sample_value("telemetry_agent_collect_seconds_total") or 0) > 0


def test_damaged_raw_sections_are_refused_with_a_reason(synthetic_dbc: Path) -> None:
    frames = [(k * 10 * MS, 512, bytes([k % 256, 0])) for k in range(50)]
    cfg = config(f'dbc = ["{synthetic_dbc}"]', '[[collect]]\nname = "w"\nmode = "raw"\n')
    batch = frame_batches(frames, [])[0]
    decoders = bus_decoders(cfg.buses)
    collected = Collector(cfg.collect, decoders).collect(
        "can0", batch, decoders["can0"].decode(batch)
    )
    encoder = BatchEncoder("v", "s", b"", compression="none")
    wire = encoder.encode([collected], 1)
    assert wire is not None
    schemas = SchemaStore()
    schemas.add(read_envelope(encoder.announcement(wire.schema_id)), 1 << 20)
    assert len(parse_batch(read_envelope(wire.payload), schemas).raw[0].frames) == 50
    for damage, reason in (
        (lambda raw: setattr(raw, "lengths", raw.lengths[:-1]), "flags or lengths missing"),
        (lambda raw: setattr(raw, "data", raw.data[:-1]), "payload lengths do not add up"),
        (lambda raw: setattr(raw, "bus", 7), "name bus 7"),
        (lambda raw: setattr(raw, "frames", 51), "column|value planes|flags or lengths"),
    ):
        envelope = pb.Batch.FromString(wire.payload)
        body = pb.Body.FromString(envelope.body)
        damage(body.raw[0])
        envelope.body = body.SerializeToString()
        envelope.body_size = len(envelope.body)
        with pytest.raises(WireError, match=reason):
            parse_batch(envelope, schemas)


@pytest.mark.parametrize("other_bus", [False, True])
def test_a_trigger_ring_stays_bounded_while_its_condition_is_false(
    synthetic_dbc: Path, other_bus: bool
) -> None:
    """On the same bus, the condition is known false up to the bus's last frame: the ring
    holds before_ms of values. On another bus that stays silent, nothing is known: the ring
    holds before_ms plus RING_SLACK_NS behind the newest value, not the whole drive."""
    bus = f'dbc = ["{synthetic_dbc}"]\n'
    condition = "Z > 1"
    if other_bus:
        other = synthetic_dbc.with_name("other.dbc")
        other.write_text(SYNTHETIC_DBC.replace(" Z :", " Z1 :").replace("FAST", "FAST1"))
        bus += f'[[bus]]\nname = "can1"\nsource = "replay"\npath = "{RAV4_LOG}"\n'
        bus += f'dbc = ["{other}"]\n'
        condition = "Z1 > 1"
    cfg = config(
        bus,
        f'[[collect]]\nname = "t"\nmode = "trigger"\nwhen = "{condition}"\n'
        'signals = ["FAST.X"]\nbefore_ms = 2000\n',
    )
    decoders = bus_decoders(cfg.buses)
    collector = Collector(cfg.collect, decoders)
    (mode,) = collector.rules
    assert isinstance(mode, Trigger)
    step = 10 * MS
    bound = (2 * SECOND + (RING_SLACK_NS if other_bus else 0)) // step
    held = 0
    for second in range(60):
        frames = [(second * SECOND + k * step, 256, bytes(8)) for k in range(100)]
        batch = frame_batches(frames, [])[0]
        assert not collector.collect("can0", batch, decoders["can0"].decode(batch))
        held = sum(len(piece) for piece in mode.ring)
        assert held <= bound + 100
    assert held >= bound - 100


def test_collected_values_too_large_for_one_batch_are_split(tmp_path: Path) -> None:
    text = (
        f'vehicle_id = "v"\nstate_dir = "{tmp_path}"\n'
        f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{RAV4_LOG}"\n{RAV4_BUS}\n'
        "[batch]\nmax_bytes = 4096\n[spool]\nmax_bytes = 1048576\nmemory_bytes = 65536\n"
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n[metrics]\nlisten = ""\n'
        '[[collect]]\nname = "log"\nmode = "raw"\n'
        '[[collect]]\nname = "wheels"\nmode = "all"\nsignals = ["WHEEL_SPEED_*"]\n'
    )
    agent = Agent(parse_config(text, "test.toml", tmp_path), status=None)
    frames = FrameBatch.concat(list(rav4_frames())).take(slice(0, 20_000))
    pipeline = agent.pipeline
    assert pipeline.collector is not None
    collected = pipeline.collector.collect("can0", frames, pipeline.decoders["can0"].decode(frames))
    wires = pipeline._encode(collected)
    assert len(wires) > 8 and all(len(w) <= 4096 for w in wires)
    cloud = Cloud()
    for wire in wires:
        cloud.schemas.add(read_envelope(pipeline.encoder.announcement(wire.schema_id)), 1 << 20)
        batch = parse_batch(read_envelope(wire.payload), cloud.schemas)
        for capture in batch.raw:
            cloud.raw.setdefault(capture.rule, []).append(capture.frames)
        for block in batch.blocks:
            for column in block.signals:
                key = (block.rule, block.message.name, column.name)
                cloud.values.setdefault(key, []).extend(
                    zip(block.t_ns.tolist(), column.physical().tolist(), strict=True)
                )
    got = FrameBatch.concat(cloud.raw["log"])
    order = np.argsort(got.t_ns, kind="stable")
    assert np.array_equal(got.t_ns[order], frames.t_ns)
    assert np.array_equal(got.data[order], frames.data)
    series = decoded_series(agent.config, [frames])
    for wheel in ("FL", "FR", "RL", "RR"):
        name = f"WHEEL_SPEED_{wheel}"
        same(cloud.values["wheels", "WHEEL_SPEEDS", name], series["WHEEL_SPEEDS", name])


# Edge cases found in review: each a small scenario with its exact outcome.


def fast(x: int = 0, y: int = 0, mode: int = 0, q: int = 0) -> bytes:
    return x.to_bytes(2, "little") + bytes([y & 0xFF, mode, q, 0, 0, 0])


def test_a_batch_at_one_instant_too_large_splits_by_rows(synthetic_dbc: Path) -> None:
    cfg = config(f'dbc = ["{synthetic_dbc}"]', '[[collect]]\nname = "w"\nmode = "raw"\n')
    frames = frames_of([(5, 512, bytes([k % 256, 0])) for k in range(301)])
    decoders = bus_decoders(cfg.buses)
    collected = Collector(cfg.collect, decoders).collect(
        "can0", frames, decoders["can0"].decode(frames)
    )
    early, late = collected.halves()
    assert [len(c.raw[0].frames) for c in (early, late)] == [150, 151]
    both = Collected(raw=[*early.raw, *late.raw])
    assert [len(r.frames) for r in both.halves()[0].raw] == [150]


def test_a_trigger_on_one_bus_captures_another_in_either_order_of_batches(
    synthetic_dbc: Path,
) -> None:
    slow = synthetic_dbc.with_name("slow.dbc")
    slow.write_text(SYNTHETIC_DBC.split("BO_ 512")[0].replace("FAST", "FAST_A"))
    other = synthetic_dbc.with_name("slow_b.dbc")
    other.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: ECU\n\nBO_ 512' + SYNTHETIC_DBC.split("BO_ 512")[1]
    )
    cfg = config(
        f'dbc = ["{slow}"]\n[[bus]]\nname = "can1"\nsource = "replay"\npath = "{RAV4_LOG}"\n'
        f'dbc = ["{other}"]',
        '[[collect]]\nname = "t"\nmode = "trigger"\nwhen = "FAST_A.Y > 0"\nsignals = ["Z"]\n'
        "before_ms = 100\nafter_ms = 500\n",
    )
    a = frames_of([(t * MS, 256, fast(y=5 if t == 200 else 0)) for t in range(0, 1000, 100)])
    b = frames_of([(t * MS, 512, bytes([t // 10, 0])) for t in range(0, 1000, 50)], ("can1",))
    for order in (("can0", "can1"), ("can1", "can0")):
        cloud = run_batches(cfg, [(bus, a if bus == "can0" else b) for bus in order])
        got = [t // MS for t, _ in cloud.values["t", "SLOW", "Z"]]
        assert got == list(range(100, 701, 50)), order


def test_channels_of_one_bus_stay_apart_in_triggers_and_raw(synthetic_dbc: Path) -> None:
    cfg = config(
        f'dbc = ["{synthetic_dbc}"]',
        '[[collect]]\nname = "t"\nmode = "trigger"\nwhen = "Y > 0"\nsignals = ["Z"]\n'
        "before_ms = 100\nafter_ms = 100\n"
        '[[collect]]\nname = "r"\nmode = "raw"\nmessages = ["SLOW"]\n',
    )
    rows = [
        (0, 512, b"\x01\x00", 0, 0),
        (1 * MS, 512, b"\x02\x00", 0, 1),
        (2 * MS, 256, fast(y=5), 0, 0),
        (3 * MS, 512, b"\x03\x00", 0, 1),
    ]
    frames = frames_of(rows, ("ch1", "ch2"))
    decoders = bus_decoders(cfg.buses)
    collector = Collector(cfg.collect, decoders)
    collected = collector.collect("can0", frames, decoders["can0"].decode(frames))
    trigger = {b.bus: b.t_ns.tolist() for b in collected.blocks}
    assert trigger == {"ch1": [0], "ch2": [1 * MS, 3 * MS]}
    raw = {r.bus: r.frames.t_ns.tolist() for r in collected.raw}
    assert raw == {"ch1": [0], "ch2": [1 * MS, 3 * MS]}


def test_each_j1939_sender_is_a_stream_of_its_own(tmp_path: Path) -> None:
    dbc = tmp_path / "j1939.dbc"
    dbc.write_text(
        'VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_: ECU\n\n'
        'BO_ 2566844926 J: 8 ECU\n SG_ W : 0|8@1+ (1,0) [0|0] "" ECU\n'
    )
    cfg = config(
        f'dbc = ["{dbc}"]\nj1939 = true',
        '[[collect]]\nname = "chg"\nmode = "change"\nsignals = ["W"]\ndeadband = 5\n'
        '[[collect]]\nname = "agg"\nmode = "aggregate"\nsignals = ["W"]\nwindow_ms = 1000\n'
        'stats = ["max", "count"]\n'
        '[[collect]]\nname = "smp"\nmode = "sample"\nsignals = ["W"]\nperiod_ms = 1000\n',
    )
    extended = int(FrameFlag.EXTENDED)
    engine, gearbox = 0x18FEF100, 0x18FEF103  # one PGN from source addresses 0x00 and 0x03
    rows: list[tuple[Any, ...]] = []
    for k in range(4):
        rows.append((k * 10 * MS, engine, bytes([100]) + bytes(7), extended))
        rows.append((k * 10 * MS + 1, gearbox, bytes(8), extended))
    decoders = bus_decoders(cfg.buses)
    collector = Collector(cfg.collect, decoders)
    frames = frames_of(rows)
    out = collector.collect("can0", frames, decoders["can0"].decode(frames))
    flushed = collector.flush()
    change = [(b.can_id.tolist(), b.bits.tolist()) for b in out.blocks if b.plan.rule == "chg"]
    assert change == [([engine, gearbox], [[100, 0]])]
    kept = {
        b.plan.rule: sorted(zip(b.can_id.tolist(), b.t_ns.tolist(), strict=True))
        for b in flushed.blocks
    }
    assert kept["agg"] == [(engine, 0), (gearbox, 0)]
    assert kept["smp"] == [(engine, 30 * MS), (gearbox, 30 * MS + 1)]


def test_frames_a_little_out_of_time_order_make_one_value_per_period(
    synthetic_dbc: Path,
) -> None:
    cfg = config(
        f'dbc = ["{synthetic_dbc}"]',
        '[[collect]]\nname = "smp"\nmode = "sample"\nsignals = ["Z"]\nperiod_ms = 1000\n'
        '[[collect]]\nname = "agg"\nmode = "aggregate"\nsignals = ["Z"]\nwindow_ms = 1000\n'
        'stats = ["count"]\n',
    )
    times = [0, 1500, 900, 2500]
    frames = frames_of([(t * MS, 512, bytes([k + 1, 0])) for k, t in enumerate(times)])
    cloud = run_batches(cfg, [("can0", frames)])
    assert cloud.values["smp", "SLOW", "Z"] == [(900 * MS, 3.0), (1500 * MS, 2.0), (2500 * MS, 4.0)]
    assert cloud.values["agg", "SLOW", "Z.count"] == [(0, 2.0), (SECOND, 1.0), (2 * SECOND, 1.0)]


def test_a_period_is_sent_once_the_bus_has_passed_it(synthetic_dbc: Path) -> None:
    """A multiplexed signal that stops being carried, and a message that goes quiet, have
    their last period sent with the next batch past it, not at the end of the stream."""
    cfg = config(
        f'dbc = ["{synthetic_dbc}"]',
        '[[collect]]\nname = "smp"\nmode = "sample"\nsignals = ["Q", "Z"]\nperiod_ms = 1000\n',
    )
    decoders = bus_decoders(cfg.buses)
    collector = Collector(cfg.collect, decoders)
    first = frames_of([(100 * MS, 256, fast(mode=1, q=7)), (200 * MS, 512, b"\x05\x00")])
    later = frames_of([(s * SECOND + 100 * MS, 256, fast(mode=0)) for s in range(1, 5)])
    assert not collector.collect("can0", first, decoders["can0"].decode(first))
    sent = collector.collect("can0", later, decoders["can0"].decode(later))
    assert sorted((b.plan.info.name, b.t_ns.tolist()) for b in sent.blocks) == [
        ("FAST", [100 * MS]),
        ("SLOW", [200 * MS]),
    ]
    assert not collector.flush()


def test_a_rule_built_in_code_with_another_modes_settings_is_refused() -> None:
    # The config file's rules come with their mode's settings; a rule built by hand may not.
    decoders = bus_decoders(config(RAV4_BUS, "").buses)
    rule = CollectRule("fast", "trigger", signals=("SPEED",), settings=SampleSettings())
    with pytest.raises(CollectError, match="mode trigger takes TriggerSettings, not Sample"):
        Collector((rule,), decoders)


async def test_a_reload_keeps_unchanged_rules_and_runs_new_ones_from_the_open_batch(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.toml"
    text = (
        f'vehicle_id = "v"\nstate_dir = "{tmp_path}"\n'
        f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{RAV4_LOG}"\n{RAV4_BUS}\n'
        f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n[metrics]\nlisten = ""\n'
        '[[collect]]\nname = "fast"\nmode = "trigger"\nsignals = ["SPEED"]\nwhen = "SPEED > 1"\n'
    )
    path.write_text(text)
    agent = Agent(load_config(path), status=None, config_path=path)
    try:
        running = agent.pipeline.collector
        agent.reload()
        assert agent._reloading is not None
        await agent._reloading
        # Read again, the same trigger rule: its ring and state go on.
        assert agent.pipeline.collector is running
        frames = FrameBatch.concat(list(rav4_frames())).take(slice(0, 100))
        agent.batcher.add("can0", frames)
        spooled = len(agent.spool)
        path.write_text(text.replace("SPEED > 1", "SPEED > 2"))
        agent.reload()
        await agent._reloading
        assert agent.pipeline.collector is not running
        # The open batch closed under the new rules, and the next closes soon after.
        assert len(agent.spool) > spooled
        agent.batcher.add("can0", frames)
        assert agent.batcher._age_s(agent.batcher._open["can0"]) == FIRST_AFTER_CHANGE_S
    finally:
        await agent.spool.close()
