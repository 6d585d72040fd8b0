"""Compiled DBCs kept on disk: a hit gives what a parse gives, without importing cantools;
a changed, damaged or foreign entry is never used; a cache that cannot be written costs only
the parse."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from agent.decode import DbcError, Decoder, MessagePlan, load_dbc
from agent.decode import cache as dbc_cache
from agent.logs import open_log
from harness import REPO
from harness.data import RAV4_PT_DBC, TESLA_DBC, TESLA_LOG
from tests.oracle import decoded_rows


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dbc.pickle"))


def same_plans(a: list[MessagePlan], b: list[MessagePlan]) -> bool:
    def shape(plan: MessagePlan) -> tuple[object, ...]:
        return (
            plan.info,
            plan.signals,
            plan.word.tolist(),
            plan.shift_left.tolist(),
            plan.shift_right.tolist(),
            plan.never.tolist(),
            plan.straddlers,
            [(m.parent, m.children.tolist()) for m in plan.multiplexers],
        )

    return [shape(p) for p in a] == [shape(p) for p in b]


def test_a_hit_gives_what_the_parse_gave(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    parsed = load_dbc(RAV4_PT_DBC)
    first = load_dbc(RAV4_PT_DBC, cache_dir=folder)
    assert len(entries(folder)) == 1
    second = load_dbc(RAV4_PT_DBC, cache_dir=folder)
    assert same_plans(parsed.plans, first.plans) and same_plans(parsed.plans, second.plans)
    assert parsed.warnings == first.warnings == second.warnings != []
    # The same file elsewhere: its warnings name where it is now.
    copy = tmp_path / "elsewhere" / RAV4_PT_DBC.name
    copy.parent.mkdir()
    copy.write_bytes(RAV4_PT_DBC.read_bytes())
    moved = load_dbc(copy, cache_dir=folder)
    assert len(entries(folder)) == 1
    assert moved.warnings == [w.replace(str(RAV4_PT_DBC), str(copy)) for w in parsed.warnings]


def test_a_cached_decoder_decodes_as_an_uncached_one(tmp_path: Path) -> None:
    batch = next(open_log(TESLA_LOG).batches(5000))
    plain = decoded_rows(Decoder({"*": [TESLA_DBC]}).decode(batch))
    Decoder({"*": [TESLA_DBC]}, cache_dir=tmp_path)
    cached = Decoder({"*": [TESLA_DBC]}, cache_dir=tmp_path)
    assert len(entries(tmp_path)) == 1
    assert decoded_rows(cached.decode(batch)) == plain


def test_a_hit_does_not_import_cantools_or_python_can(tmp_path: Path) -> None:
    load_dbc(RAV4_PT_DBC, cache_dir=tmp_path)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.decode import Decoder\n"
        f"d = Decoder({{'*': [{str(RAV4_PT_DBC)!r}]}}, cache_dir=Path({str(tmp_path)!r}))\n"
        "assert d.messages('can0'), 'no messages'\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cantools', 'can')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_changed_dbc_is_parsed_again(tmp_path: Path) -> None:
    dbc = tmp_path / "engine.dbc"
    dbc.write_text(DBC.format(length=16))
    folder = tmp_path / "cache"
    assert load_dbc(dbc, cache_dir=folder).plans[0].signals[0].length == 16
    dbc.write_text(DBC.format(length=12))
    assert load_dbc(dbc, cache_dir=folder).plans[0].signals[0].length == 12
    assert len(entries(folder)) == 2
    # And a strict load is not served what a lenient one compiled.
    dbc.write_text(OVERLAPPING)
    assert load_dbc(dbc, cache_dir=folder).warnings
    with pytest.raises(DbcError, match="overlapping"):
        load_dbc(dbc, strict=True, cache_dir=folder)


DBC = """VERSION ""

BU_: ECU

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|{length}@1+ (0.01,0) [0|655.35] "km/h" ECU
"""

OVERLAPPING = """VERSION ""

BU_: ECU

BO_ 256 Engine: 8 ECU
 SG_ Speed : 0|16@1+ (0.01,0) [0|655.35] "km/h" ECU
 SG_ Torque : 8|16@1+ (1,0) [0|0] "" ECU
"""


def _one_entry(tmp_path: Path) -> tuple[Path, Path]:
    dbc = tmp_path / "engine.dbc"
    dbc.write_text(DBC.format(length=16))
    folder = tmp_path / "cache"
    load_dbc(dbc, cache_dir=folder)
    (entry,) = entries(folder)
    return dbc, entry


def test_a_damaged_entry_is_made_again(tmp_path: Path) -> None:
    dbc, entry = _one_entry(tmp_path)
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])  # cut mid-record, as by a power cut
    assert load_dbc(dbc, cache_dir=entry.parent).plans[0].signals[0].length == 16
    assert entry.read_bytes() == whole


def test_an_entry_under_another_key_is_not_used(tmp_path: Path) -> None:
    dbc, entry = _one_entry(tmp_path)
    other = tmp_path / "other.dbc"
    other.write_text(DBC.format(length=12))
    load_dbc(other, cache_dir=entry.parent)
    (theirs,) = [e for e in entries(entry.parent) if e != entry]
    # An entry renamed to another DBC's key is refused, and that DBC parsed.
    os.replace(theirs, entry)
    assert load_dbc(dbc, cache_dir=entry.parent).plans[0].signals[0].length == 16


def test_entries_that_others_may_write_are_not_trusted(tmp_path: Path) -> None:
    dbc, entry = _one_entry(tmp_path)
    planted = pickle.dumps((entry.name.removesuffix(".dbc.pickle"), ([], ["planted"])))
    entry.write_bytes(planted)
    entry.chmod(0o666)
    assert load_dbc(dbc, cache_dir=entry.parent).plans  # parsed, not the planted entry
    entry.write_bytes(planted)
    entry.chmod(0o600)
    entry.parent.chmod(0o777)
    assert load_dbc(dbc, cache_dir=entry.parent).plans
    entry.parent.chmod(0o700)
    assert load_dbc(dbc, cache_dir=entry.parent).warnings == [f"{dbc}: planted"]


def test_a_cache_that_cannot_be_written_costs_only_the_parse(tmp_path: Path) -> None:
    dbc = tmp_path / "engine.dbc"
    dbc.write_text(DBC.format(length=16))
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert load_dbc(dbc, cache_dir=blocked / "cache").plans[0].signals[0].length == 16


def test_the_oldest_entries_go_beyond_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dbc_cache, "MAX_ENTRIES", 3)
    folder = tmp_path / "cache"
    for length in range(1, 6):
        dbc = tmp_path / f"m{length}.dbc"
        dbc.write_text(DBC.format(length=length))
        before = set(entries(folder))
        load_dbc(dbc, cache_dir=folder)
        for made in set(entries(folder)) - before:  # as if made a second apart
            os.utime(made, ns=(length * 10**9, length * 10**9))
        if length == 3:  # the first one, used again, is kept as the most recently used
            load_dbc(tmp_path / "m1.dbc", cache_dir=folder)
    left = [pickle.loads(e.read_bytes())[1][0][0].signals[0].length for e in entries(folder)]
    assert sorted(left) == [1, 4, 5]


def test_where_the_cache_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(dbc_cache.CACHE_ENV, str(tmp_path))
    assert dbc_cache.default_cache_dir() == tmp_path
    monkeypatch.setenv(dbc_cache.CACHE_ENV, "")
    assert dbc_cache.default_cache_dir() is None
    monkeypatch.delenv(dbc_cache.CACHE_ENV)
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/telemetry-agent")
    assert dbc_cache.default_cache_dir() == Path("/var/cache/telemetry-agent")
    monkeypatch.delenv("CACHE_DIRECTORY")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dbc_cache.default_cache_dir() == tmp_path / "xdg" / "telemetry-agent"
    monkeypatch.delenv("XDG_CACHE_HOME")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert dbc_cache.default_cache_dir() == home / ".cache" / "telemetry-agent"
    # Another user's home (sudo keeps HOME): no cache, rather than folders of ours in it.
    if os.geteuid() == 0:
        os.chown(home, 65534, 65534)
    else:
        monkeypatch.setenv("HOME", "/")
    assert dbc_cache.default_cache_dir() is None
