"""The config file: its keys, its defaults, and every problem reported with its key path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.collect.aggregate import AggregateSettings
from agent.collect.expression import parse
from agent.collect.raw import RawSettings
from agent.collect.sample import SampleSettings
from agent.collect.trigger import TriggerSettings
from agent.config import ConfigError, load_config, parse_config
from agent.exits import EX_CONFIG
from agent.sources.pacing import Pace
from agent.sources.replay import ReplaySettings
from agent.uplinks.mqtt import MqttSettings
from harness import REPO
from harness.data import RAV4_LOG, RAV4_PT_DBC
from harness.services import agent_command


def config_text(bus: str = "", rest: str = "") -> str:
    return (
        'vehicle_id = "v1"\nstate_dir = "state"\n'
        f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{RAV4_LOG}"\n'
        f'dbc = ["{RAV4_PT_DBC}"]\n{bus}\n{rest}'
    )


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "agent.toml", Path("/etc/agent"))
    return raised.value.problems


def test_an_uplink_key_of_another_kind_is_named_as_such() -> None:
    found = problems(config_text("", '[uplink]\nkind = "file"\ntopic = "t"\nwindows = 2\n'))
    assert "uplink.topic: does not apply to uplink 'file' (only to 'mqtt')" in found
    assert "uplink.windows: unknown key" in found


def test_the_contract_example_parses_with_its_defaults() -> None:
    config = parse_config(
        config_text(
            "pace = 10\nloop = true\nj1939 = false\n",
            '[uplink]\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:1883"\n',
        ),
        "agent.toml",
        Path("/etc/agent"),
    )
    assert config.vehicle_id == "v1"
    assert config.state_dir == Path("/etc/agent/state")  # relative to the config's folder
    bus = config.buses[0]
    assert bus.source == "replay"
    assert bus.settings == ReplaySettings(path=RAV4_LOG, pace=Pace(10.0), loop=True)
    assert config.batch.max_age_ms == 1000 and config.batch.max_bytes == 120_000
    assert config.batch.compression == "zstd"
    assert config.uplink.settings == MqttSettings(topic="vehicles/{vehicle_id}/telemetry")
    assert config.metrics.listen == "127.0.0.1:9108"


def test_every_problem_is_named_by_its_key_path() -> None:
    found = problems(
        config_text(
            'pace = "fast"\nbitrate = 500000\ncolour = "red"\n',
            '[batch]\nmax_age_ms = -1\ncompression = "lz4"\n[uplink]\nkind = "carrier-pigeon"\n'
            '[metrics]\nlisten = "nowhere"\n[extra]\n',
        )
    )
    text = "\n".join(found)
    for expected in (
        "bus[0].pace:",
        "bus[0].bitrate: does not apply to source 'replay'",
        "bus[0].colour: unknown key",
        "batch.max_age_ms: must be greater than 0",
        "batch.compression: must be one of zstd, none",
        "uplink.kind: must be one of mqtt, grpc, file",
        "metrics.listen: expected HOST:PORT",
        "extra: unknown key",
    ):
        assert expected in text, text


def test_the_spool_table() -> None:
    config = parse_config(config_text(), "agent.toml", Path("/etc/agent"))
    spool = config.spool
    assert (spool.max_bytes, spool.when_full, spool.fsync) == (512 * 2**20, "drop_oldest", "batch")
    config = parse_config(
        config_text(
            rest='[spool]\nmax_bytes = 1000000\nwhen_full = "drop_newest"\nfsync = "interval"\n'
            "fsync_interval_ms = 250\nmemory_bytes = 300000\n"
        ),
        "agent.toml",
        Path("/etc/agent"),
    )
    assert config.spool.when_full == "drop_newest" and config.spool.fsync_interval_ms == 250
    found = "\n".join(
        problems(
            config_text(
                rest='[spool]\nmax_bytes = 100000\nwhen_full = "panic"\nfsync = "sometimes"\n'
                "memory_bytes = 1000\nsize = 1\n"
            )
        )
    )
    for expected in (
        "spool.max_bytes: must be at least 4 times batch.max_bytes (480000)",
        "spool.when_full: must be one of drop_oldest, drop_newest; got 'panic'",
        "spool.fsync: must be one of batch, interval, never; got 'sometimes'",
        "spool.memory_bytes: must be at least 2 times batch.max_bytes (240000)",
        "spool.size: unknown key",
    ):
        assert expected in found, found


def test_missing_and_mistyped_keys() -> None:
    found = "\n".join(problems('state_dir = 5\n[[bus]]\nname = "can0"\nsource = "replay"\n'))
    assert "vehicle_id: missing" in found
    assert "state_dir: expected str, got 5" in found
    assert "bus[0].path: missing" in found
    assert "bus[0].dbc: missing" in found
    assert "not valid TOML" in "\n".join(problems("vehicle_id = "))


def test_missing_files_and_duplicate_buses() -> None:
    text = (
        config_text()
        + '[[bus]]\nname = "can0"\nsource = "replay"\npath = "nope.log"\ndbc = ["no.dbc"]\n'
    )
    found = "\n".join(problems(text))
    assert "bus[1].name: 'can0' is used by another bus" in found
    assert "bus[1].path: no such file /etc/agent/nope.log" in found
    assert "bus[1].dbc[0]: no such file /etc/agent/no.dbc" in found


def test_check_config_exits_78_with_the_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(config_text("pace = 0\n"))
    result = subprocess.run(
        agent_command("check-config", str(bad)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == EX_CONFIG
    assert f"{bad}: bus[0].pace:" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text(config_text())
    result = subprocess.run(
        agent_command("check-config", str(good)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert load_config(good).buses[0].name == "can0"


def test_run_refuses_a_bad_config_with_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("vehicle_id = 1\n")
    result = subprocess.run(
        agent_command("run", "--config", str(bad)),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == EX_CONFIG
    assert "vehicle_id: expected str" in result.stderr
    assert "Traceback" not in result.stderr


def test_uplink_urls_seeds_sizes_and_templates_are_checked() -> None:
    found = "\n".join(
        problems(
            config_text(
                "",
                '[batch]\nmax_bytes = 100000000\n[uplink]\nkind = "mqtt"\nurl = "broker:1883"\n'
                'topic = "{vehicle_id.x}"\n',
            )
        )
    )
    assert (
        "uplink.url: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got 'broker:1883'" in found
    )
    assert "batch.max_bytes: must be 4096 to 4194304" in found
    assert "uplink.topic: only {vehicle_id} may be substituted" in found
    grpc = "\n".join(problems(config_text("", '[uplink]\nkind = "grpc"\nurl = "http://x:1"\n')))
    assert "uplink.url: expected grpc://HOST[:PORT] or grpcs://HOST[:PORT]" in grpc
    simulate = (
        'vehicle_id = "v"\n[[bus]]\nname = "can0"\nsource = "simulate"\nseed = -1\n'
        f'dbc = ["{RAV4_PT_DBC}"]\n'
    )
    assert "bus[0].seed: must be 0 or more" in "\n".join(problems(simulate))


def test_collection_rules_parse_with_their_defaults() -> None:
    text = config_text(
        rest='[[collect]]\nname = "speed"\nmode = "sample"\nsignals = ["SPEED"]\n'
        "period_ms = 1000\n"
        '[[collect]]\nname = "stats"\nmode = "aggregate"\nsignals = "WHEEL_*"\n'
        "window_ms = 500\n"
        '[[collect]]\nname = "fast"\nmode = "trigger"\nsignals = ["*"]\n'
        'when = "SPEED.SPEED > 60 and mean(WHEEL_SPEED_FL, 1000) > 50"\n'
        '[[collect]]\nname = "log"\nmode = "raw"\nids = [37, 0x1FFFFFFF]\nbuses = ["can0"]\n'
    )
    config = parse_config(text, "agent.toml", Path("/etc/agent"))
    # Read again, the rules are the same: a reload that leaves them keeps their state.
    assert parse_config(text, "agent.toml", Path("/etc/agent")).collect == config.collect
    speed, stats, fast, log = config.collect
    assert (speed.mode, speed.signals, speed.settings) == (
        "sample",
        ("SPEED",),
        SampleSettings(period_ms=1000, reduce="last"),
    )
    assert stats.signals == ("WHEEL_*",) and stats.settings == AggregateSettings(
        window_ms=500, stats=("min", "max", "mean", "count", "stddev")
    )
    when = "SPEED.SPEED > 60 and mean(WHEEL_SPEED_FL, 1000) > 50"
    assert fast.settings == TriggerSettings(
        when=parse(when), before_ms=1000, after_ms=1000, min_interval_ms=0, edge="rising"
    )
    assert isinstance(fast.settings, TriggerSettings) and fast.settings.when is not None
    assert fast.settings.when.signals == {"SPEED.SPEED", "WHEEL_SPEED_FL"}
    assert log.settings == RawSettings(ids=(37, 0x1FFFFFFF)) and log.buses == ("can0",)
    assert parse_config(config_text(), "agent.toml", Path(".")).collect == ()


def test_collection_rule_problems_are_named_by_rule_and_key() -> None:
    found = "\n".join(
        problems(
            config_text(
                rest='[[collect]]\nname = "a"\nmode = "sample"\nsignals = ["X"]\n'
                "window_ms = 5\n"
                '[[collect]]\nname = "a"\nmode = "teleport"\n'
                '[[collect]]\nmode = "change"\nsignals = ["X"]\ndeadband = 1\n'
                "deadband_rel = inf\nheartbeat_ms = -1\n"
                '[[collect]]\nname = "t"\nmode = "trigger"\nsignals = ["X"]\n'
                'when = "SPEED > (60"\nedge = "falling"\nbefore_ms = 0\nafter_ms = 0\n'
                "min_interval_ms = 10000000000000\n"
                '[[collect]]\nname = "s"\nmode = "aggregate"\nsignals = []\n'
                'stats = ["median"]\nbuses = ["can9"]\n'
                '[[collect]]\nname = "r"\nmode = "raw"\nsignals = ["X"]\nids = [-1]\n'
                '[[collect]]\nname = "u"\nmode = "all"\nsignals = ["X"]\ncolour = 1\n'
            )
        )
    )
    for expected in (
        "collect[0].period_ms: missing",
        "collect[0].window_ms: does not apply to mode 'sample'",
        "collect[1].name: 'a' is used by another rule",
        "collect[1].mode: must be one of aggregate, all, change, faults, raw, sample, trigger",
        "collect[2].name: missing",
        "collect[2]: deadband and deadband_rel exclude each other",
        "collect[2].heartbeat_ms: must be 0 to 86,400,000 ms",
        "collect[2].deadband_rel: must be a number of 0 or more",
        "collect[3]: before_ms and after_ms are both 0",
        "collect[3].min_interval_ms: must be 0 to 86,400,000 ms",
        "collect[3].when: position 12: expected ')', found end of expression",
        "collect[3].edge: must be one of rising, always",
        "collect[4].signals: missing",
        "collect[4].stats: expected a list of distinct min, max, mean, count, stddev",
        "collect[4].buses: no [[bus]] is named 'can9'",
        "collect[5].signals: mode raw takes whole frames",
        "collect[5].ids: expected a list of frame IDs",
        "collect[6].colour: unknown key",
    ):
        assert expected in found, f"{expected!r} not in:\n{found}"


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        (
            'mode = "all"\nsignals = ["NO_SUCH_*"]\n',
            "collect rule 'r': no signal matches NO_SUCH_* on bus can0",
        ),
        (
            'mode = "trigger"\nsignals = ["SPEED"]\nwhen = "BRAKE_PRESSED > 0"\n',
            "collect rule 'r': when: BRAKE_PRESSED is in several messages (can0 ",
        ),
        (
            'mode = "trigger"\nsignals = ["SPEED"]\nwhen = "SPEED.NOPE > 0"\n',
            "collect rule 'r': when: no signal SPEED.NOPE on bus can0",
        ),
        (
            'mode = "raw"\nmessages = ["NOPE"]\n',
            "collect rule 'r': no message matches NOPE",
        ),
    ],
)
def test_rules_that_do_not_fit_the_dbcs_are_config_errors(
    tmp_path: Path, rule: str, problem: str
) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(config_text(rest=f'[[collect]]\nname = "r"\n{rule}'))
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = subprocess.run(
            agent_command(*command), capture_output=True, text=True, check=False, timeout=60
        )
        assert result.returncode == EX_CONFIG, result.stderr
        assert f"{path}: {problem}" in result.stderr
        assert "Traceback" not in result.stderr


def test_the_documented_example_of_collection_rules_shows_every_mode() -> None:
    page = (REPO / "docs" / "collection-rules.md").read_text()
    start = page.index("```toml file=rules.toml\n")
    example = page[page.index("\n", start) + 1 : page.index("```\n", start + 3)]
    config = parse_config(example, "docs/collection-rules.md", REPO)
    assert [rule.mode for rule in config.collect] == [
        "sample",
        "change",
        "aggregate",
        "trigger",
        "raw",
        "all",
    ]
