"""Every example in README.md and docs/*.md runs, so that none can rot.

A fenced block's info string says what it is (docs/development.md, "The docs are tested"):
`sh` commands run and must exit 0; `toml` configs must pass `check-config` (`toml invalid`
ones must fail it); `python` runs; `text output` must be what the block before it printed;
`text` is an illustration. `sh gateway` blocks need a gateway (root, systemd, a CAN
interface, a running service, the fleet's broker): they are checked for what can be checked
here, and the test insists that exactly the blocks naming such commands are marked so.

Each page runs top to bottom in a folder of its own whose entries link to the repository's,
so relative paths read as from the repository's root while what the examples write stays
out of the checkout. The key tables of the configuration pages and the metrics table are
checked against the code they describe, and the links between the pages must resolve.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent import config as agent_config
from agent.campaigns.document import document_from_toml
from agent.collect.base import MODES
from agent.collect.rules import RULE_KEYS
from agent.commands import build_parser
from agent.config import (
    RESTART_KEYS,
    BatchConfig,
    CampaignsConfig,
    Config,
    HealthConfig,
    MetricsConfig,
    SpoolConfig,
    TlsConfig,
    UplinkConfig,
    load_config,
    parse_config,
)
from agent.diagnostics.settings import DIAGNOSTICS_KEYS
from agent.exits import EX_CONFIG
from agent.metrics import Metrics
from agent.sources.base import source_class
from agent.uplinks.base import uplink_class
from harness import REPO
from harness.services import Broker, broker, make_certificates

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LANGUAGES = {"sh", "toml", "python", "text"}
#: The flags each language may carry in its info string.
FLAGS = {
    "sh": {"gateway", "broker", "postgres"},
    "toml": {"invalid", "broker", "campaign"},
    "text": {"output"},
}
#: Where a `broker` block expects the broker; the test's own takes its place.
BROKER_ADDRESS = "127.0.0.1:1883"
#: The schema a `postgres` block writes in the test database; one named per run takes its
#: place, so that two runs on one machine do not write into each other's.
POSTGRES_SCHEMA = "docs_sinks"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Commands that only a gateway runs: root, systemd, a CAN interface, a running service.
GATEWAY_PROGRAMS = {
    "sudo",
    "sudoedit",
    "systemctl",
    "journalctl",
    "networkctl",
    "ip",
    "candump",
    "cansend",
    "canplayer",
    "curl",
}
#: Words that only make sense on a gateway: an installed agent, the fleet's broker or receiver.
GATEWAY_WORDS = re.compile(
    r"^/(etc|opt|var/lib)/telemetry-agent|(broker|receiver)\.example\.com|^install-service$"
)
STATUS_LINE = re.compile(r"^\[\s*[\d.]+ s\] [\d,]+ frames \(", re.MULTILINE)
RUN_TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    flags: frozenset[str]
    options: dict[str, str]
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line} ```{self.language}"


FENCE = re.compile(r"^(\s*)```(.*)$")


def blocks(page: Path) -> list[Block]:
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    k = 0
    while k < len(lines):
        opening = FENCE.match(lines[k])
        if not opening:
            k += 1
            continue
        indent, info = opening.group(1), opening.group(2).split()
        body: list[str] = []
        end = k + 1
        while end < len(lines) and lines[end].strip() != "```":
            line = lines[end]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            end += 1
        assert end < len(lines), f"{page.name}:{k + 1}: the block is never closed"
        words = [w for w in info[1:] if "=" not in w]
        options = dict(w.split("=", 1) for w in info[1:] if "=" in w)
        language = info[0] if info else ""
        found.append(
            Block(page, k + 1, language, frozenset(words), options, "\n".join(body) + "\n")
        )
        k = end + 1
    return found


def commands(text: str) -> list[str]:
    """The commands of an `sh` block: its lines, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [line.strip() for line in joined.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command of a line (pipelines and lists split), comments
    dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in {"|", "||", "&&", ";", "&"}:
            parts.append([])
        else:
            parts[-1].append(token)
    return [part for part in parts if part]


def without_sudo(words: list[str]) -> list[str]:
    return words[1:] if words[:1] == ["sudo"] else words


def needs_gateway(block: Block) -> bool:
    for command in commands(block.text):
        for words in simple_commands(command):
            if words[0] in GATEWAY_PROGRAMS or any(GATEWAY_WORDS.search(w) for w in words):
                return True
    return False


def is_agent(words: list[str]) -> bool:
    return bool(words) and Path(words[0]).name == "telemetry-agent"


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


# -- what the blocks are --


def test_every_block_says_what_it_is() -> None:
    for block in ALL_BLOCKS:
        assert block.language in LANGUAGES, f"{block}: a block needs one of {LANGUAGES}"
        allowed = FLAGS.get(block.language, set())
        assert block.flags <= allowed, f"{block}: {sorted(block.flags - allowed)} unknown here"
        assert set(block.options) <= ({"file"} if block.language == "toml" else set()), block


def test_gateway_blocks_are_exactly_those_naming_gateway_commands() -> None:
    for block in ALL_BLOCKS:
        if block.language == "sh":
            marked = "gateway" in block.flags
            assert needs_gateway(block) == marked, (
                f"{block}: {'marked gateway, but runs anywhere' if marked else 'needs a gateway'}"
            )


def test_the_readme_starts_with_the_two_commands_a_new_user_types() -> None:
    first = blocks(REPO / "README.md")[0]
    assert first.language == "sh" and not first.flags
    assert [simple_commands(c) for c in commands(first.text)] == [
        [["make", "run"]],
        [["make", "test"]],
    ]


def install_options() -> set[str]:
    usage = subprocess.run(
        ["sh", str(REPO / "deploy" / "install.sh"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(re.findall(r"(--[a-z][a-z-]*)", usage))


def test_gateway_blocks_name_what_exists() -> None:
    """What a gateway block can be checked for here: valid shell, the repository's files it
    names exist, and the options it gives the agent and the install script are theirs."""
    options = install_options()
    gateway = [b for b in ALL_BLOCKS if "gateway" in b.flags]
    assert gateway
    for block in gateway:
        syntax = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
        for command in commands(block.text):
            for words in map(without_sudo, simple_commands(command)):
                for word in words:
                    if re.match(r"(deploy|dbc|tests|proto)/", word):
                        assert list(REPO.glob(word)), f"{block}: no {word} in the repository"
                if is_agent(words):
                    try:
                        build_parser().parse_args(words[1:])
                    except SystemExit:
                        pytest.fail(f"{block}: telemetry-agent does not take {command!r}")
                given: list[str] = []
                if any(w.endswith("deploy/install.sh") for w in words):
                    given = words
                for word in words:
                    if word.startswith("INSTALL_ARGS="):
                        given = shlex.split(word.partition("=")[2])
                unknown = {w.split("=")[0] for w in given if w.startswith("--")} - options
                assert not unknown, f"{block}: deploy/install.sh has no {sorted(unknown)}"


# -- running them --


def workspace(folder: Path) -> Path:
    """A folder whose entries link to the repository's, except what examples write into:
    `build` is a folder of links, `state` and `out` are left out."""
    folder.mkdir()
    for entry in REPO.iterdir():
        if entry.name in {".git", "build", "state", "out"}:
            continue
        (folder / entry.name).symlink_to(entry)
    (folder / "build").mkdir()
    for entry in (REPO / "build").iterdir():
        (folder / "build" / entry.name).symlink_to(entry)
    return folder


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # The examples' make runs as a user's would, not as a child of `make test`.
    for key in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(key, None)
    return env


def process_tree(pid: int) -> dict[int, list[int]]:
    """`pid` and the processes under it, each with its children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended meanwhile
        children.setdefault(int(after_name[1]), []).append(int(stat.parent.name))
    tree: dict[int, list[int]] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        tree[current] = children.get(current, [])
        todo += tree[current]
    return tree


def interrupt(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C as the program that runs takes it: SIGINT to the innermost processes, so that
    a `make` or a shell around the agent ends as the agent does (make itself would report
    an interrupted recipe)."""
    for pid, children in process_tree(process.pid).items():
        if not children:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                continue


def ends_by_itself(words: list[str], folder: Path) -> bool:
    """Whether a `run` ends on its own: its config's buses all end (a replay without loop,
    a simulation with a duration). `make run` and the embedded defaults never do."""
    if not is_agent(words) or "--config" not in words:
        return False
    config = load_config(folder / words[words.index("--config") + 1])
    return all(
        (bus.source == "replay" and not bus.settings.loop)
        or (bus.source == "simulate" and bus.settings.duration_s is not None)
        for bus in config.buses
    )


@dataclass
class Page:
    """The state of a page's run: its folder, its broker, and the last block's output."""

    folder: Path
    stack: ExitStack
    env: dict[str, str]
    output: str | None = None
    mqtt: Broker | None = None
    certificates: Path | None = None
    schema: str | None = None

    def postgres_schema(self) -> str:
        if self.schema is None:
            schema = f"{POSTGRES_SCHEMA}_{uuid.uuid4().hex[:12]}"
            self.schema = schema

            def drop() -> None:
                with psycopg.connect(POSTGRES_URL, autocommit=True) as connection:
                    connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

            self.stack.callback(drop)
        return self.schema

    def broker_address(self) -> str:
        if self.mqtt is None:
            folder = self.folder.parent / "broker"
            folder.mkdir()
            self.mqtt = self.stack.enter_context(broker(folder))
        return f"127.0.0.1:{self.mqtt.port}"


def run_command(page: Page, command: str, block: Block) -> str:
    simple = simple_commands(command)
    words = simple[0]
    if words[0] == "make" and words[1:] != ["run"]:
        # The suite itself (`make test`), minutes of work, or root: that the target exists
        # and its prerequisites resolve is what a dry run shows.
        assert len(simple) == 1, f"{block}: a make target alone on its line: {command}"
        command = shlex.join(["make", "-n", *words[1:]])
    forever = words[:2] == ["make", "run"] or (is_agent(words) and words[1:2] == ["run"])
    if not forever:
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=page.folder,
            env=page.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{block}: {command}\nexit {result.returncode}\n{output}"
        return output
    log = page.folder / f".run-{block.line}.log"
    ends = ends_by_itself(words, page.folder)
    before = batch_files(page.folder)
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=page.folder,
            env=page.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            running = log.read_text(errors="replace")
            if not ends and (STATUS_LINE.search(running) or batch_files(page.folder) - before):
                interrupt(process)
                process.wait(30)
                break
            time.sleep(0.1)
    finally:
        if process.poll() is None:
            for pid in process_tree(process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            process.wait()
            pytest.fail(f"{block}: {command} neither ended, nor printed a status line, nor sent")
    output = log.read_text(errors="replace")
    assert process.returncode == 0, f"{block}: {command}\nexit {process.returncode}\n{output}"
    # The agent's last status line comes as it ends, however soon that is.
    assert STATUS_LINE.search(output), f"{block}: {command} printed no status line\n{output}"
    return output


def batch_files(folder: Path) -> set[Path]:
    """The batch files a file uplink wrote under `folder` (links to the repository are not
    followed)."""
    return {
        Path(root) / name
        for root, _, names in os.walk(folder)
        for name in names
        if name.endswith(".batch")
    }


def make_tls_files(page: Page, path: Path) -> None:
    """The TLS files a config names are the operator's: made here where missing."""
    try:
        uplink = tomllib.loads(path.read_text()).get("uplink", {})
    except tomllib.TOMLDecodeError:
        return  # check-config says what is wrong with it
    if page.certificates is None:
        page.certificates = page.folder.parent / "certificates"
        page.certificates.mkdir()
        make_certificates(page.certificates)
    made = {"ca_file": "ca.pem", "cert_file": "client.pem", "key_file": "client.key"}
    for key, value in uplink.get("tls", {}).items():
        target = path.parent / value
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((page.certificates / made[key]).read_bytes())


def run_block(page: Page, block: Block) -> str | None:
    """Runs a block; what it printed, or None for a block that prints nothing to compare."""
    text = block.text
    if "broker" in block.flags:
        assert BROKER_ADDRESS in text, f"{block}: a broker block names {BROKER_ADDRESS}"
        text = text.replace(BROKER_ADDRESS, page.broker_address())
    if "postgres" in block.flags:
        assert POSTGRES_SCHEMA in text, f"{block}: a postgres block names {POSTGRES_SCHEMA}"
        text = text.replace(POSTGRES_SCHEMA, page.postgres_schema())
    if block.language == "sh":
        if "gateway" in block.flags:
            return None
        return "".join(run_command(page, c, block) for c in commands(text))
    if block.language == "python":
        result = subprocess.run(
            [sys.executable, "-"],
            input=text,
            cwd=page.folder,
            env=page.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{block}:\n{output}"
        return output
    if block.language == "toml":
        path = page.folder / block.options.get("file", f".block-{block.line}.toml")
        path.write_text(text)
        if "campaign" in block.flags:
            # A campaign file: what `campaign sign` checks before it signs.
            document_from_toml(text, str(block))
            return None
        make_tls_files(page, path)
        result = subprocess.run(
            ["telemetry-agent", "check-config", path.name],
            cwd=page.folder,
            env=page.env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
        )
        output = result.stdout + result.stderr
        expected = EX_CONFIG if "invalid" in block.flags else 0
        assert result.returncode == expected, f"{block}: check-config said\n{output}"
        return output
    if "output" in block.flags:
        assert page.output is not None, f"{block}: no block before it printed anything"
        printed = [line.rstrip() for line in page.output.splitlines()]
        for wanted in filter(None, text.splitlines()):
            pattern = ".*".join(map(re.escape, wanted.rstrip().split("...")))
            assert any(re.fullmatch(pattern, line) for line in printed), (
                f"{block}: nothing printed reads\n{wanted}\nbut:\n{page.output[-3000:]}"
            )
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_examples_of_each_page_run(page: Path, tmp_path: Path) -> None:
    # `make` in the page's folder must find the install up to date: an install from there
    # would point the virtual environment at a folder that is about to be deleted.
    subprocess.run(["make", "-s", "install"], cwd=REPO, env=environment(), check=True)
    with ExitStack() as stack:
        state = Page(workspace(tmp_path / "page"), stack, environment())
        for block in blocks(page):
            state.output = run_block(state, block)


# -- the key tables and the metrics table, against the code --


def tables(page: Path, header: list[str]) -> Iterator[tuple[str, list[list[str]]]]:
    """Each table with this header: the text of the heading above it, and its rows."""
    heading = ""
    lines = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8")).splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if [c.strip() for c in line.strip().strip("|").split("|")] == header:
            rows = []
            k += 2  # past the separator
            while k < len(lines) and lines[k].startswith("|"):
                cells = [c.strip() for c in lines[k].strip().strip("|").split("|")]
                assert len(cells) == len(header), f"{page.name}: {lines[k]}"
                rows.append(cells)
                k += 1
            yield heading, rows
            continue
        k += 1


Scope = tuple[str, str | None]


def scope_of(heading: str) -> Scope:
    """`[batch]` -> ("batch", None); `source = "replay"` -> ("bus", "replay"); no code: the
    top level."""
    code = re.search(r"`([^`]*)`", heading)
    if code is None:
        return ("", None)
    name = code.group(1)
    kind = re.fullmatch(r'(source|mode|kind) = "([^"]+)"', name)
    if kind:
        section = {"source": "bus", "mode": "collect", "kind": "uplink"}[kind.group(1)]
        return (section, kind.group(2))
    return (name.strip("[]"), None)


def known_keys() -> dict[Scope, set[str]]:
    sections = {
        "buses",
        "batch",
        "uplink",
        "spool",
        "metrics",
        "collect",
        "source",
        "diagnostics",
        "campaigns",
        "health",
    }
    keys: dict[Scope, set[str]] = {
        ("", None): {f.name for f in fields(Config)} - sections,
        ("bus", None): set(agent_config._BUS_KEYS),
        ("batch", None): {f.name for f in fields(BatchConfig)},
        ("uplink", None): {f.name for f in fields(UplinkConfig)} - {"tls", "settings"},
        ("uplink.tls", None): {f.name for f in fields(TlsConfig)},
        ("spool", None): {f.name for f in fields(SpoolConfig)},
        ("metrics", None): {f.name for f in fields(MetricsConfig)},
        ("collect", None): set(RULE_KEYS),
        ("diagnostics", None): set(DIAGNOSTICS_KEYS),
        ("campaigns", None): {f.name for f in fields(CampaignsConfig)},
        ("health", None): {f.name for f in fields(HealthConfig)},
    }
    for source in agent_config.SOURCES:
        keys[("bus", source)] = set(source_class(source).Settings.own_keys())
    for kind in agent_config.UPLINKS:
        own = set(uplink_class(kind).Settings.own_keys())
        if own:
            keys[("uplink", kind)] = own
    for mode, mode_class in MODES.items():
        if mode_class.Settings.own_keys():
            keys[("collect", mode)] = set(mode_class.Settings.own_keys())
    return keys


KEY_HEADER = ["key", "default", "reload", "what it is"]


def documented_keys() -> dict[tuple[Scope, str], tuple[str, str]]:
    """(scope, key) -> (default, reload) from every key table of the docs."""
    found: dict[tuple[Scope, str], tuple[str, str]] = {}
    for page in PAGES:
        for heading, rows in tables(page, KEY_HEADER):
            for key, default, reload, _ in rows:
                where = (scope_of(heading), key.strip("`"))
                assert where not in found, f"{page.name}: {where} is documented twice"
                found[where] = (default, reload)
    return found


SIMULATE_BUS = '[[bus]]\nname = "can0"\nsource = "simulate"\ndbc = ["dbc/demo.dbc"]\n'
SOURCE_LINES = {
    "replay": 'path = "tests/data/tesla-model3/excerpt.candump.log.xz"\n',
    "python-can": 'interface = "virtual"\n',
}
RULE_LINES = {
    "sample": "period_ms = 1000\n",
    "aggregate": "window_ms = 1000\n",
    "trigger": 'when = "VehicleSpeed.Speed > 1"\n',
}


def config_with(scope: Scope, line: str) -> Config:
    """A small valid config, with `line` in the table of `scope`."""
    section, kind = scope
    text = 'vehicle_id = "v"\n'
    if section == "":
        text += line + SIMULATE_BUS
    elif section == "bus":
        source = kind or "simulate"
        text += SIMULATE_BUS.replace("simulate", source) + SOURCE_LINES.get(source, "") + line
    elif section == "collect":
        mode = kind or "all"
        selection = 'messages = ["Climate"]\n' if mode == "raw" else 'signals = ["*"]\n'
        rule = f'[[collect]]\nname = "r"\nmode = "{mode}"\n{selection}'
        text += SIMULATE_BUS + rule + RULE_LINES.get(mode, "") + line
    elif section == "diagnostics":
        bus = SIMULATE_BUS.replace("simulate", "python-can") + SOURCE_LINES["python-can"]
        text += bus + '[[diagnostics]]\nbus = "can0"\n' + line
    elif section == "uplink" and kind:
        text += SIMULATE_BUS + f'[uplink]\nkind = "{kind}"\nurl = "{kind}://127.0.0.1"\n' + line
    else:
        text += SIMULATE_BUS + f"[{section}]\n" + line
    return parse_config(text, "docs", REPO)


def test_every_config_key_is_documented_with_its_default_and_reload() -> None:
    documented = documented_keys()
    known = {(scope, key) for scope, keys in known_keys().items() for key in keys}
    assert sorted(set(documented) - known, key=str) == [], "documented, but no such key"
    assert sorted(known - set(documented), key=str) == [], "keys missing from the docs"
    for (scope, key), (default, reload) in documented.items():
        attribute = {"": key, "bus": "buses", "uplink.tls": "uplink"}.get(scope[0], scope[0])
        expected = "restart" if attribute in RESTART_KEYS else "applies"
        assert reload == expected, f"{scope} {key}: the reload column says {reload}"
        literal = re.fullmatch(r"`([^`]*)`", default)
        if literal is None:
            continue  # "required", or a default that is said in words
        value = literal.group(1)
        tomllib.loads(f"v = {value}")  # a TOML value, or this raises
        assert config_with(scope, f"{key} = {value}\n") == config_with(scope, ""), (
            f"{scope} {key}: the default is not {value}"
        )


METRIC_HEADER = ["metric", "type", "labels", "what it counts"]


def test_every_metric_is_documented_with_its_type_and_labels() -> None:
    documented = set()
    for _, rows in tables(REPO / "docs" / "metrics.md", METRIC_HEADER):
        for name, kind, labels, _ in rows:
            documented.add((name.strip("`"), kind, tuple(re.findall(r"`([^`]+)`", labels))))
    exposed = set()
    for metric in vars(Metrics()).values():
        # prometheus_client's metrics say their type and labels only in these attributes.
        metric_type: Any = getattr(metric, "_type", None)
        if metric_type is None:
            continue  # the registry
        name = metric._name + ("_total" if metric_type == "counter" else "")
        exposed.add((name, metric_type, tuple(metric._labelnames)))
    assert sorted(documented - exposed) == [], "documented, but the agent has no such metric"
    assert sorted(exposed - documented) == [], "metrics missing from docs/metrics.md"


# -- links --


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
    return {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)
    }


def test_links_between_the_pages_resolve() -> None:
    for page in PAGES:
        text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: a link to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked), f"{page.name}: no heading for {target}"
