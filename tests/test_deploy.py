"""deploy/: the systemd unit, the install script and the config it installs, the networkd
file, and the Prometheus and Grafana files, checked against the agent they deploy."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import MetricsConfig
from agent.metrics import Metrics
from agent.socketcan.sockets import FRAME_CHARGE, MAX_BUS_RATE, RECEIVE_BUFFER
from agent.sources.socketcan import FLUSH_S

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "telemetry-agent.service"
INSTALL = DEPLOY / "install.sh"
EXAMPLE_CONFIG = DEPLOY / "agent.toml"
SYSCTL = DEPLOY / "10-telemetry-agent.conf"
INSTALLED_AGENT = "/opt/telemetry-agent/bin/telemetry-agent"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """A systemd unit file as (key, value) pairs per section, in order: keys may repeat
    (SystemCallFilter=), and an empty value (CapabilityBoundingSet=) is a setting too."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number}: not KEY=VALUE in a section: {line}"
        assert not value.endswith("\\"), f"line {number}: continuation lines are not parsed here"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times: {found}"
    return found[0]


# The unit


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: `make test` installs it (package systemd)")
    # verify checks that ExecStart's binary exists, and the agent is not installed here, so
    # a copy runs this venv's agent; --root= would look for /bin/sh and every unit that
    # ours pulls in under the root too. The name stays: it is the unit's name.
    text = UNIT.read_text()
    assert INSTALLED_AGENT in text
    agent = Path(sys.executable).parent / "telemetry-agent"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_AGENT, str(agent if agent.exists() else sys.executable)))
    result = subprocess.run(
        [analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # A misspelt key or a value systemd cannot parse is a warning ("..., ignoring") and
    # exit 0: the setting silently does not apply. Any word about our unit is a failure.
    about_ours = [line for line in output.splitlines() if UNIT.name in line]
    assert not about_ours, output


def test_the_unit_has_the_settings_the_agent_relies_on() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert "network-online.target" in one(unit, "Unit", "After").split()
    assert "network-online.target" in one(unit, "Unit", "Wants").split()
    assert one(unit, "Install", "WantedBy") == "multi-user.target"

    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "RestartSec": "5s",
        "TimeoutStopSec": "30s",
        "StateDirectory": "telemetry-agent",
        "CacheDirectory": "telemetry-agent",
        "ConfigurationDirectory": "telemetry-agent",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
    }
    actual = {key: one(unit, "Service", key) for key in expected}
    assert actual == expected
    # A reload checks the file (an invalid one fails `systemctl reload`), then signals the
    # agent with the shell's kill: a minimal Debian has no /bin/kill (procps).
    assert values(unit, "Service", "ExecReload") == [
        f"{INSTALLED_AGENT} check-config /etc/telemetry-agent/agent.toml",
        "/bin/sh -c 'kill -HUP \"$$MAINPID\"'",
    ]
    commands = [v for k, v in unit["Service"] if k.startswith("Exec")]
    assert not [c for c in commands if "/bin/kill" in c]
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_CAN", "AF_NETLINK"}
    # CPython's ctypes/cffi callbacks may need writable+executable memory.
    assert not values(unit, "Service", "MemoryDenyWriteExecute")
    # The agent reads the host's can0 and reaches the broker.
    assert not values(unit, "Service", "PrivateNetwork")

    # The paths agree with the agent's and the example config's.
    command = one(unit, "Service", "ExecStart").split()
    assert command == [INSTALLED_AGENT, "run", "--config", "/etc/telemetry-agent/agent.toml"]
    assert command[3] == f"/etc/{expected['ConfigurationDirectory']}/agent.toml"
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert config["state_dir"] == f"/var/lib/{expected['StateDirectory']}"
    # On SIGTERM the agent waits up to 5 s for acks: systemd must wait longer.
    assert int(expected["TimeoutStopSec"].removesuffix("s")) > 5


# The example config, the networkd file, Prometheus


def test_the_example_config_matches_the_unit_and_the_metrics_default() -> None:
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert config["metrics"]["listen"] == MetricsConfig().listen == "127.0.0.1:9108"
    (bus,) = config["bus"]
    assert bus["source"] == "socketcan"
    assert bus["dbc"] == ["dbc/demo.dbc"]
    assert (REPO / "dbc" / "demo.dbc").is_file()  # what install.sh copies beside it
    assert config["uplink"]["kind"] == "mqtt"
    assert "collect" not in config  # the rules are examples, commented


def test_the_networkd_file_brings_the_example_bus_up() -> None:
    network = parse_unit((DEPLOY / "80-can0.network").read_text())
    bus = tomllib.loads(EXAMPLE_CONFIG.read_text())["bus"][0]["name"]
    assert one(network, "Match", "Name") == bus
    assert int(one(network, "CAN", "BitRate")) > 0
    assert one(network, "CAN", "RestartSec")  # bus-off recovery
    # The agent starts after network-online.target, which must not wait for a CAN link.
    assert one(network, "Link", "RequiredForOnline") == "no"


def test_the_sysctl_file_lets_the_reader_sleep_a_whole_batch() -> None:
    settings = {}
    for line in SYSCTL.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            settings[key] = value
    assert settings == {"net.core.rmem_max": str(RECEIVE_BUFFER)}
    # The kernel caps what a socket asks for, then grants twice that for its overhead.
    granted = 2 * int(settings["net.core.rmem_max"])
    assert granted / FRAME_CHARGE / MAX_BUS_RATE >= FLUSH_S


def test_the_prometheus_config_scrapes_the_metrics_endpoint() -> None:
    text = (DEPLOY / "prometheus.yml").read_text()
    # No YAML parser among the project's dependencies: check the text, and parse it where a
    # Python with PyYAML is at hand (Debian's python3-yaml).
    assert "\t" not in text
    for number, line in enumerate(text.splitlines(), 1):
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"line {number}: odd indentation"
    assert re.search(r"^  - job_name: telemetry-agent$", text, re.M)
    assert re.search(r'^      - targets: \["127\.0\.0\.1:9108"\]$', text, re.M)
    assert re.search(r"^    metrics_path: /metrics$", text, re.M)
    assert "relabel_configs" in text  # the comment on labelling the vehicle

    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        parsed = _yaml_as_json(python, DEPLOY / "prometheus.yml")
        if parsed is not None:
            (job,) = parsed["scrape_configs"]
            assert job["job_name"] == "telemetry-agent"
            assert job["static_configs"] == [{"targets": ["127.0.0.1:9108"]}]
            assert "vehicle" in parsed["global"]["external_labels"]
            break


def _yaml_as_json(python: str, path: Path) -> Any:
    """The YAML file parsed by `python`'s PyYAML; None where it has none."""
    if not os.access(python, os.X_OK):
        return None
    script = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))"
    result = subprocess.run(
        [python, "-c", script, str(path)], capture_output=True, text=True, check=False
    )
    if "No module named 'yaml'" in result.stderr:
        return None
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Grafana

#: What the dashboard must show (brief: buses, decoding, batches, uplink, spool, rules).
DASHBOARD_METRICS = {
    "telemetry_agent_frames_received_total",
    "telemetry_agent_frames_decoded_total",
    "telemetry_agent_frames_unknown_total",
    "telemetry_agent_frames_malformed_total",
    "telemetry_agent_error_frames_total",
    "telemetry_agent_decode_seconds_total",
    "telemetry_agent_batches_built_total",
    "telemetry_agent_batch_wire_bytes_total",
    "telemetry_agent_uplink_connected",
    "telemetry_agent_uplink_batches_acked_total",
    "telemetry_agent_uplink_ack_latency_seconds_bucket",
    "telemetry_agent_spool_batches",
    "telemetry_agent_spool_bytes",
    "telemetry_agent_spool_oldest_age_seconds",
    "telemetry_agent_spool_dropped_batches_total",
    "telemetry_agent_collect_values_total",
    "telemetry_agent_collect_triggers_total",
}


def exported_names() -> set[str]:
    """Every series name the agent's registry can export, by metric type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # those of a collapsed row


def test_the_grafana_dashboard_uses_the_agents_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]

    exprs: list[str] = []
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            exprs.append(target["expr"])
    for variable in dashboard["templating"]["list"]:
        exprs.append(variable["definition"])
    used = set(re.findall(r"\btelemetry_agent_\w+", "\n".join(exprs)))

    unknown = used - exported_names()
    assert not unknown, f"not metrics of agent/metrics.py: {sorted(unknown)}"
    missing = DASHBOARD_METRICS - used
    assert not missing, f"no panel shows {sorted(missing)}"


def test_the_grafana_panels_have_unique_ids_and_do_not_overlap() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


# The install script


def test_the_install_script_is_valid_shell() -> None:
    for shell in ("sh", "bash"):
        subprocess.run([shell, "-n", str(INSTALL)], check=True, timeout=10)
    shellcheck = shutil.which("shellcheck")
    if shellcheck:  # not a dependency; used where installed
        result = subprocess.run([shellcheck, str(INSTALL)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    assert os.access(INSTALL, os.X_OK), "deploy/install.sh lost its executable bit"
    usage = subprocess.run([INSTALL, "--help"], capture_output=True, text=True, timeout=10)
    assert usage.returncode == 0 and "--root DIR" in usage.stdout
    wrong = subprocess.run([INSTALL, "--bogus"], capture_output=True, text=True, timeout=10)
    assert wrong.returncode != 0 and "unknown option: --bogus" in wrong.stderr


def test_installing_into_the_real_root_needs_root() -> None:
    command = [str(INSTALL)]
    if os.geteuid() == 0:  # as nobody: the script must stop before it touches anything
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is missing: cannot drop root")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    assert result.returncode != 0
    assert "installing into / needs root: sudo make install-service" in result.stderr


#: The real system's paths that an install under --root must leave alone.
SYSTEM_PATHS = (
    Path("/opt/telemetry-agent"),
    Path("/etc/telemetry-agent"),
    Path("/etc/systemd/system/telemetry-agent.service"),
    Path("/etc/sysctl.d/10-telemetry-agent.conf"),
)


@dataclass
class Installed:
    root: Path
    install: Callable[[], subprocess.CompletedProcess[str]]
    host_calls: Path  # what the install asked of this machine's systemctl and sysctl
    system_before: dict[Path, float | None]
    #: The root as the first install left it (later tests run the install again).
    first: dict[str, tuple[int, str]]

    @property
    def agent(self) -> Path:
        return self.root / INSTALLED_AGENT.lstrip("/")

    @property
    def config(self) -> Path:
        return self.root / "etc/telemetry-agent/agent.toml"

    def run_agent(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run(self.agent, *args)

    def run(self, program: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """A program of the installed venv, the dependencies from this venv's: the install
        took none from PyPI (--no-deps), to stay fast and offline. PYTHONPATH does not read
        this venv's .pth files (its editable install of the agent), and the working folder
        is the root, not the repository, so `agent` itself comes from the installed venv."""
        env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
        return subprocess.run(
            [str(program), *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            cwd=self.root,
            timeout=60,
            check=False,
        )


def _mtime(path: Path) -> float | None:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    system_before = {path: _mtime(path) for path in SYSTEM_PATHS}
    work = tmp_path_factory.mktemp("deploy")
    # A wheel built here from a copy of the project: pip builds a source folder in place
    # (build/, *.egg-info), and the repository is not the test's to write.
    source = work / "source"
    left_out = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*left_out, "state", "tests"))
    wheels = work / "wheels"
    # This venv's setuptools builds it (no build isolation): nothing comes from PyPI.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"]
    pip_wheel += ["--no-build-isolation", "--wheel-dir", str(wheels), str(source)]
    subprocess.run(pip_wheel, check=True, timeout=120)
    (wheel,) = wheels.glob("*.whl")

    # A systemctl and a sysctl that record being called: an install under --root must not
    # tell systemd, nor change this machine's kernel settings.
    fake_bin = work / "bin"
    fake_bin.mkdir()
    host_calls = work / "host-calls.log"
    for name in ("systemctl", "sysctl"):
        fake = fake_bin / name
        fake.write_text(f'#!/bin/sh\necho "{name} $@" >> {host_calls}\n')
        fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}",
        "PIP_CACHE_DIR": str(work / "pip-cache"),
    }
    root = work / "root"
    command = [str(INSTALL), "--root", str(root), "--python", sys.executable]
    command += ["--wheel", str(wheel), "--no-deps"]

    def install() -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=180, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    install()
    return Installed(root, install, host_calls, system_before, _snapshot(root))


def test_install_lays_out_the_venv_the_unit_the_config_and_the_dbc(installed: Installed) -> None:
    # Files as the first install wrote them: (mode, sha256).
    expected = {
        "etc/systemd/system/telemetry-agent.service": _hash(UNIT),
        "etc/telemetry-agent/agent.toml": _hash(EXAMPLE_CONFIG),
        "etc/telemetry-agent/dbc/demo.dbc": _hash(REPO / "dbc" / "demo.dbc"),
        "etc/sysctl.d/10-telemetry-agent.conf": _hash(SYSCTL),
    }
    for path, digest in expected.items():
        mode, content = installed.first[path]
        assert content == digest, f"{path} is not the repository's"
        # The dynamic user reads the config: nothing it needs may be root-only.
        assert stat.S_IMODE(mode) == 0o644, path
    for folder in ("etc/telemetry-agent", "etc/telemetry-agent/dbc"):
        assert stat.S_IMODE(installed.first[folder][0]) == 0o755, folder
    assert "etc/telemetry-agent/agent.toml.example" not in installed.first
    # Nothing else under the root.
    assert {tuple(path.split("/")[:2]) for path in installed.first} == {
        ("etc",),
        ("etc", "sysctl.d"),
        ("etc", "systemd"),
        ("etc", "telemetry-agent"),
        ("opt",),
        ("opt", "telemetry-agent"),
    }

    # The unit's ExecStart, under the root, is the installed agent, and it runs.
    assert os.access(installed.agent, os.X_OK)
    version = installed.run_agent("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.split() == ["telemetry-agent", _project_version()]
    where = installed.run(
        installed.root / "opt/telemetry-agent/bin/python",
        "-c",
        "import agent; print(agent.__file__)",
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.root / "opt/telemetry-agent")


def test_the_installed_agent_accepts_the_installed_config(installed: Installed) -> None:
    checked = installed.run_agent("check-config", installed.config)
    assert checked.returncode == 0, checked.stderr
    assert "OK (1 buses, uplink mqtt)" in checked.stdout

    # The commented collection rules are examples to uncomment: they must work as such.
    with_rules = installed.config.parent / "with-rules.toml"  # beside it: dbc/ resolves
    try:
        with_rules.write_text(uncomment_rules(EXAMPLE_CONFIG.read_text()))
        checked = installed.run_agent("check-config", with_rules)
    finally:
        with_rules.unlink()
    assert checked.returncode == 0, checked.stderr


def uncomment_rules(config: str) -> str:
    """The config with its commented [[collect]] examples, the end of the file, uncommented."""
    lines = config.splitlines()
    start = lines.index("# [[collect]]")
    assert all(line.startswith("#") for line in lines[start:])
    rules = [line.removeprefix("#").removeprefix(" ") for line in lines[start:]]
    text = "\n".join(lines[:start] + rules) + "\n"
    assert len(tomllib.loads(text)["collect"]) >= 2
    return text


def test_install_again_keeps_the_config_and_changes_nothing_else(installed: Installed) -> None:
    before = installed.first
    edited = installed.config.read_text() + "# edited on the gateway\n"
    installed.config.write_text(edited)
    installed.install()
    assert installed.config.read_text() == edited
    example = installed.config.with_name("agent.toml.example")
    assert example.read_text() == EXAMPLE_CONFIG.read_text()
    after = _snapshot(installed.root)
    changed = {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}
    assert changed == {"etc/telemetry-agent/agent.toml", "etc/telemetry-agent/agent.toml.example"}

    # And once more: the same result.
    installed.install()
    assert _snapshot(installed.root) == after


def test_install_under_a_root_touches_nothing_outside_it(installed: Installed) -> None:
    assert not installed.host_calls.exists(), installed.host_calls.read_text()
    assert {path: _mtime(path) for path in SYSTEM_PATHS} == installed.system_before
    pyvenv = (installed.root / "opt/telemetry-agent/pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in pyvenv


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Each path under root: its mode and content hash (a link: its target). Python's
    bytecode caches are left out: the runs of the agent write them."""
    found: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        info = path.lstat()
        if path.is_symlink():
            content = os.readlink(path)
        elif path.is_file():
            content = _hash(path)
        else:
            content = ""
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


def _hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])
