"""`telemetry-agent decode` run as a user runs it, against records built independently."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import can

from agent.commands import DecodeTotals, Progress
from agent.decode.cache import CACHE_ENV
from agent.logs import open_log
from harness.data import (
    RAV4_ADAS_DBC,
    RAV4_LOG,
    RAV4_PT_DBC,
    TESLA_DBC,
    TESLA_LOG,
    TRUCK_DBC,
    TRUCK_DIR,
)
from tests.oracle import load_cantools


def decode(*args: str | Path, cache: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command in its own process; `cache`: where it keeps compiled DBCs (None: in the
    test run's cache; "": nowhere)."""
    env = None if cache is None else {**os.environ, CACHE_ENV: str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "agent", "decode", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def expected_records(
    log: Path, dbcs: dict[str, Path], choices: bool = False
) -> list[dict[str, Any]]:
    """The records `decode` must print, built from python-can's reader and cantools."""
    databases = {bus: load_cantools(p) for bus, p in dbcs.items()}
    records = []
    for msg in can.CanutilsLogReader(str(log)):
        db = databases.get(str(msg.channel)) or databases.get("*")
        if db is None:
            continue
        try:
            message = db.get_message_by_frame_id(msg.arbitration_id)
        except KeyError:
            continue
        values: dict[str, Any] = message.decode(
            bytes(msg.data), decode_choices=choices, allow_truncated=True
        )
        record: dict[str, Any] = {"t": msg.timestamp, "bus": msg.channel, "id": msg.arbitration_id}
        if msg.is_extended_id:
            record["ext"] = True
        record["message"] = message.name
        record["signals"] = {
            k: v if isinstance(v, int | float) else str(v) for k, v in values.items()
        }
        records.append(record)
    return records


def test_jsonl_equals_cantools_record_for_record() -> None:
    done = decode(TESLA_LOG, "--dbc", TESLA_DBC)
    assert done.returncode == 0, done.stderr
    ours = [json.loads(line) for line in done.stdout.splitlines()]
    assert ours == expected_records(TESLA_LOG, {"*": TESLA_DBC})
    assert len(ours) == 12_138
    assert "12138 frames read, 12138 decoded, 0 unknown" in done.stderr


def test_first_record_has_the_documented_shape() -> None:
    done = decode(RAV4_LOG, "--dbc", f"can0={RAV4_PT_DBC}", "--dbc", f"can1={RAV4_ADAS_DBC}")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith('{"t": 46408.58493, "bus": "can0", "id": 608, "message": ')
    assert list(json.loads(first)) == ["t", "bus", "id", "message", "signals"]


def test_bus_specific_dbcs_and_choices() -> None:
    done = decode(
        RAV4_LOG, "--dbc", f"can0={RAV4_PT_DBC}", "--dbc", f"can1={RAV4_ADAS_DBC}", "--choices"
    )
    assert done.returncode == 0, done.stderr
    ours = [json.loads(line) for line in done.stdout.splitlines()]
    assert ours == expected_records(RAV4_LOG, {"can0": RAV4_PT_DBC, "can1": RAV4_ADAS_DBC}, True)
    assert any(isinstance(v, str) for r in ours for v in r["signals"].values())


def test_j1939_matches_by_pgn_on_every_bus() -> None:
    without = decode(TRUCK_DIR / "truck.candump.log", "--dbc", TRUCK_DBC, "--format", "none")
    with_pgn = decode(
        TRUCK_DIR / "truck.candump.log", "--dbc", TRUCK_DBC, "--j1939", "*", "--format", "none"
    )
    assert with_pgn.returncode == 0 and without.returncode == 0
    assert with_pgn.stdout == ""

    def decoded(stderr: str) -> int:
        summary = stderr.strip().splitlines()[-1]
        return int(summary.split(" decoded")[0].split()[-1])

    assert decoded(with_pgn.stderr) > decoded(without.stderr)


def test_other_formats_decode_like_candump(tmp_path: Path) -> None:
    def records(log: Path) -> list[tuple[int, str, dict[str, Any]]]:
        done = decode(log, "--dbc", TRUCK_DBC, "--j1939", "*")
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        return [(r["id"], r["message"], r["signals"]) for r in rows]

    reference = records(TRUCK_DIR / "truck.candump.log")
    assert len(reference) > 40_000
    for name in ("truck.asc", "truck.blf", "truck.trc"):
        assert records(TRUCK_DIR / name) == reference, name


def test_csv_has_one_row_per_signal_value(tmp_path: Path) -> None:
    out = tmp_path / "tesla.csv"
    done = decode(TESLA_LOG, "--dbc", TESLA_DBC, "--format", "csv", "--output", out)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    signals = int(done.stderr.strip().splitlines()[-1].split(" signals")[0].split()[-1])
    assert len(rows) == signals > 12_138
    assert set(rows[0]) == {"t", "bus", "id", "ext", "message", "signal", "value"}


def test_none_prints_only_the_summary() -> None:
    done = decode(TESLA_LOG, "--dbc", TESLA_DBC, "--format", "none")
    assert done.returncode == 0
    assert done.stdout == ""
    summary = done.stderr.strip().splitlines()[-1]
    for part in ("frames read", "decoded", "unknown", "error frames", "malformed lines", "signals"):
        assert part in summary
    assert "frames/s" in summary


def test_a_missing_dbc_names_the_file(tmp_path: Path) -> None:
    done = decode(TESLA_LOG, "--dbc", tmp_path / "nope.dbc")
    assert done.returncode == 2
    assert "nope.dbc" in done.stderr and "Traceback" not in done.stderr


def test_an_unparseable_dbc_gives_cantools_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dbc"
    bad.write_text('VERSION ""\n\nBO_ 12 Broken: 8 Vector__XXX\n SG_ Oops : 0|8@1+ (1,0 [0|1] ""\n')
    done = decode(TESLA_LOG, "--dbc", bad)
    assert done.returncode == 2
    assert "bad.dbc" in done.stderr and "Traceback" not in done.stderr


def test_an_unreadable_log_is_a_clear_error_and_the_rest_still_decodes(tmp_path: Path) -> None:
    done = decode(tmp_path / "missing.log", TESLA_LOG, "--dbc", TESLA_DBC, "--format", "none")
    assert done.returncode == 1
    assert "missing.log" in done.stderr and "Traceback" not in done.stderr
    assert "12138 frames read" in done.stderr


def test_a_log_forced_to_a_format_it_is_not_is_unreadable(tmp_path: Path) -> None:
    # A binary BLF read as ASC: python-can's reader fails on its first bytes.
    done = decode(
        TRUCK_DIR / "truck.blf", "--log-format", "asc", "--dbc", TESLA_DBC, "--format", "none"
    )
    assert done.returncode == 1, done.stderr
    assert "truck.blf: cannot read the asc log" in done.stderr
    assert "Traceback" not in done.stderr


def test_garbage_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    lines = TESLA_LOG.read_text().splitlines()[:100]
    lines[10] = "this is not a frame"
    lines[20] = "(1637353675.975229) vcan0 243#00000080A2004000AABB"  # 10 bytes: impossible length
    lines[30] = "\x00\x01\x02 binary junk"
    log = tmp_path / "damaged.log"
    log.write_text("\n".join(lines) + "\n")
    done = decode(log, "--dbc", TESLA_DBC)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "3 malformed lines" in done.stderr
    assert "line 11" in done.stderr and "line 21" in done.stderr
    assert len(done.stdout.splitlines()) == 97


def test_a_short_frame_keeps_the_signals_it_carries(tmp_path: Path) -> None:
    db = load_cantools(TESLA_DBC)
    message = max(
        db.messages, key=lambda m: len(m.signals) if m.length == 8 and not m.is_multiplexed() else 0
    )
    log = tmp_path / "short.log"
    log.write_text(f"(1.000000) can0 {message.frame_id:03X}#FFFFFF\n")
    done = decode(log, "--dbc", TESLA_DBC)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    expected = message.decode(b"\xff" * 3, decode_choices=False, allow_truncated=True)
    assert record["signals"] == expected
    assert 0 < len(record["signals"]) < len(message.signals)


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "telemetry-agent"
    done = subprocess.run([script, "decode", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "--j1939" in done.stdout


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_on_a_terminal_and_nothing_elsewhere() -> None:
    totals = DecodeTotals(frames=5_000)
    shown = Terminal()
    Progress(shown).show("drive.log", 0.5, totals, started=0.0)
    assert f"drive.log [{'#' * 15}{'.' * 15}]  50% 5,000 frames" in shown.getvalue()
    quiet = io.StringIO()
    Progress(quiet).show("drive.log", 0.5, totals, started=0.0)
    assert quiet.getvalue() == ""


def test_the_candump_reader_reports_how_far_it_is() -> None:
    reader = open_log(TESLA_LOG)
    seen: list[float] = []
    for _ in reader.batches(1_000):
        done = reader.progress()
        assert done is not None
        seen.append(done)
    assert seen == sorted(seen) and seen[-1] == 1.0


def test_log_format_overrides_the_suffix(tmp_path: Path) -> None:
    renamed = tmp_path / "capture.txt"
    renamed.write_bytes(TESLA_LOG.read_bytes())
    guessed = decode(renamed, "--dbc", TESLA_DBC, "--format", "none")
    assert guessed.returncode == 1 and "cannot tell the log format" in guessed.stderr
    told = decode(renamed, "--dbc", TESLA_DBC, "--format", "none", "--log-format", "candump")
    assert told.returncode == 0 and "12138 decoded" in told.stderr


def test_asammdf_is_left_out_only_where_no_mf4_log_can_be_read(tmp_path: Path) -> None:
    from agent.cli import _may_read_mf4

    assert _may_read_mf4(["decode", str(TRUCK_DIR / "truck_00000001.MF4"), "--dbc", "x.dbc"])
    assert _may_read_mf4(["decode", "drive.bin", "--log-format", "mf4"])
    config = tmp_path / "agent.toml"
    config.write_text('[[bus]]\npath = "drive.mf4"\n')
    assert _may_read_mf4(["run", "--config", str(config)])
    config.write_text('[[bus]]\npath = "drive.log"\n')
    assert not _may_read_mf4(["run", "--config", str(config)])
    assert not _may_read_mf4(["decode", "drive.log", "--dbc", "x.dbc"])


def test_an_mf4_log_decodes_from_the_command_line(tmp_path: Path) -> None:
    mf4 = decode(TRUCK_DIR / "truck_00000001.MF4", "--dbc", TRUCK_DBC, "--j1939", "*")
    candump = decode(TRUCK_DIR / "truck.candump.log", "--dbc", TRUCK_DBC, "--j1939", "*")
    assert mf4.returncode == 0, mf4.stderr
    assert len(mf4.stdout.splitlines()) == len(candump.stdout.splitlines()) > 0


def test_compiled_dbcs_kept_between_runs_decode_the_same(tmp_path: Path) -> None:
    args = (RAV4_LOG, "--dbc", f"can0={RAV4_PT_DBC}", "--dbc", f"can1={RAV4_ADAS_DBC}")
    uncached = decode(*args, cache="")
    first = decode(*args, cache=tmp_path)
    kept = {entry.name: entry.stat().st_ino for entry in tmp_path.iterdir()}
    second = decode(*args, cache=tmp_path)
    # The same files, not made again: read.
    assert len(kept) == 2
    assert {entry.name: entry.stat().st_ino for entry in tmp_path.iterdir()} == kept
    assert uncached.returncode == first.returncode == second.returncode == 0
    assert uncached.stdout == first.stdout == second.stdout != ""
    # The warnings of loading each DBC are kept with it.
    warnings = [line for line in uncached.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and warnings == [
        line for line in second.stderr.splitlines() if line.startswith("warning:")
    ]
