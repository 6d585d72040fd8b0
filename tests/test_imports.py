"""Each entry point loads what it uses and nothing more: a gateway reading SocketCAN never
imports python-can, the cloud's receiver none of the device's stages, the config file alone
not numpy, and the benchmarks nothing of the tests. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import REPO


def loaded(code: str) -> set[str]:
    """The modules a fresh interpreter has after running `code`."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_config_file_alone_loads_no_numpy_and_no_transport() -> None:
    modules = loaded("import agent.config")
    assert not {"numpy", "can", "grpc", "aiomqtt"} & modules


def test_a_socketcan_bus_over_mqtt_loads_neither_python_can_nor_grpc() -> None:
    modules = loaded(
        "from pathlib import Path\n"
        "from agent.config import parse_config\n"
        "from agent.sources.base import create_sources\n"
        "from agent.uplinks.base import create_uplink\n"
        "config = parse_config(\n"
        '    \'vehicle_id = "v"\\n[[bus]]\\nname = "can0"\\nsource = "socketcan"\\n\'\n'
        '    \'dbc = ["dbc/demo.dbc"]\\n[uplink]\\nkind = "mqtt"\\nurl = "mqtt://127.0.0.1"\\n\',\n'
        "    'agent.toml', Path('.'))\n"
        "create_sources(config.buses)\n"
        "create_uplink(config.uplink, config.vehicle_id)\n"
    )
    assert {"agent.sources.socketcan", "agent.uplinks.mqtt"} <= modules
    assert not {"can", "grpc", "agent.sources.pythoncan", "agent.uplinks.grpc"} & modules


def test_the_agent_loads_campaigns_and_their_transports_only_when_configured() -> None:
    # A file uplink with campaigns and health off: no control link, no signatures.
    modules = loaded("import agent.service")
    assert not {"grpc", "aiomqtt", "cryptography", "agent.campaigns.link"} & modules
    # A control link over MQTT needs no grpc.
    assert "grpc" not in loaded("import agent.campaigns.link")


def test_the_receiver_loads_nothing_of_the_device_side() -> None:
    modules = loaded("import agent.cloud.receiver")
    device = {
        m
        for m in modules
        if m.startswith(("agent.sources.", "agent.uplinks.", "agent.collect", "agent.wire.encoder"))
        or m in {"agent.spool", "agent.service", "agent.batcher", "agent.pipeline", "can"}
    }
    assert device == set()


def test_the_receiver_loads_a_sink_library_only_when_its_sink_is_chosen() -> None:
    # The gateway's install has no `cloud` extra: JSON Lines must not need it.
    modules = loaded(
        "from agent.commands import build_parser, _receiver_sink\n"
        "import io\n"
        "_receiver_sink(build_parser().parse_args(['receive', '--dir', '.']), io.StringIO())\n"
    )
    assert "agent.cloud.sinks.jsonl" in modules
    assert not {"psycopg", "pyarrow", "duckdb"} & modules


def test_the_benchmarks_load_nothing_of_the_tests() -> None:
    # What they share with the tests lives in `harness`: a benchmark must not change when the
    # tests do. Importing bench/__main__.py runs every benchmark: it is left out.
    benchmarks = sorted(path.stem for path in (REPO / "bench").glob("[!_]*.py"))
    modules = loaded("\n".join(f"import bench.{name}" for name in benchmarks))
    assert {"bench.soak", "harness.services"} <= modules
    assert not {m for m in modules if m == "tests" or m.startswith("tests.")}


def test_the_command_line_loads_the_cloud_tools_only_when_one_runs() -> None:
    # Every command starts by building the parser: `decode` on a short log must not pay
    # for asyncio, TLS or the config file, which only the fleet's tools and `run` need.
    modules = loaded(
        "from agent.commands import build_parser\n"
        "build_parser().parse_args(['decode', 'a.log', '--dbc', 'a.dbc'])"
    )
    assert "agent.cloud.snapshot" in modules
    assert not {"asyncio", "ssl", "agent.config"} & modules
