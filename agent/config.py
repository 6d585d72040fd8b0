"""The agent's one config file (TOML), validated into typed settings.

Every problem is reported with its key path (`bus[1].pace`, `uplink.url`), all at once, so
one run of `telemetry-agent check-config` shows everything to fix. Unknown keys are errors:
a misspelt key silently ignored is a setting that silently does not apply. Relative paths
are relative to the config file's folder.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import urlsplit

from agent.sources import KINDS as source_kinds
from agent.uplinks import KINDS as uplink_kinds

if TYPE_CHECKING:
    from agent.collect.rules import CollectRule
    from agent.diagnostics.settings import DiagnosticsConfig

MIB = 1024 * 1024
#: The largest batch the agent builds: receivers refuse larger ones (four times this,
#: uncompressed), and brokers cap messages too.
MAX_BATCH_BYTES = 4 * MIB

SOURCES = tuple(source_kinds)
UPLINKS = tuple(uplink_kinds)
COMPRESSIONS = ("zstd", "none")
WHEN_FULL = ("drop_oldest", "drop_newest")
FSYNC_MODES = ("batch", "interval", "never")
LOG_LEVELS = ("debug", "info", "warning", "error")

_REPO_DBC = Path(__file__).resolve().parents[1] / "dbc"
_INSTALLED_DBC = Path(sys.prefix) / "share" / "telemetry-agent" / "dbc"


def demo_dbc() -> Path:
    """The demo DBC that the embedded defaults simulate: in the source tree, or installed."""
    for folder in (_REPO_DBC, _INSTALLED_DBC):
        if (folder / "demo.dbc").is_file():
            return folder / "demo.dbc"
    return _REPO_DBC / "demo.dbc"


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists each one with its key path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class BusConfig:
    """A [[bus]] table: the keys of every bus, and its source's own (`settings`, declared
    by the source's module in agent/sources/)."""

    name: str
    source: str
    dbc: tuple[Path, ...]
    j1939: bool = False
    settings: Any = None
    listen_only: bool = False  # the agent never transmits on it


@dataclass(frozen=True)
class BatchConfig:
    max_age_ms: int = 1000
    max_bytes: int = 120_000
    compression: str = "zstd"


@dataclass(frozen=True)
class TlsConfig:
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class UplinkConfig:
    kind: str = "file"
    url: str = "outbox"
    tls: TlsConfig | None = None
    keepalive_s: int = 30
    ack_timeout_s: float = 10.0
    window: int = 8  # batches sent but not yet acknowledged
    drain_timeout_s: float = 30.0  # at the end of a replay: how long to wait for acks
    #: the uplink's own keys, as its module declares them (agent/uplinks/)
    settings: Any = None


@dataclass(frozen=True)
class SpoolConfig:
    max_bytes: int = 512 * MIB  # on disk, under state_dir
    when_full: str = "drop_oldest"
    fsync: str = "batch"
    fsync_interval_ms: int = 1000
    memory_bytes: int = 16 * MIB  # batches kept in memory, and held there while the disk fails


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9108"  # "" turns the endpoint off


@dataclass(frozen=True)
class CampaignsConfig:
    """[campaigns]: who may sign campaigns, the groups a vehicle is in, the control link."""

    keys: tuple[str, ...] = ()  # ed25519:BASE64 public keys; none: campaigns are off
    groups: tuple[str, ...] = ()
    url: str = ""  # "": the uplink's URL (an mqtt or grpc uplink)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 0.0  # 0: no health reports


@dataclass(frozen=True)
class Config:
    vehicle_id: str
    state_dir: Path
    buses: tuple[BusConfig, ...]
    batch: BatchConfig = BatchConfig()
    uplink: UplinkConfig = UplinkConfig()
    spool: SpoolConfig = SpoolConfig()
    metrics: MetricsConfig = MetricsConfig()
    collect: tuple[CollectRule, ...] = ()  # none: every decoded signal is sent
    diagnostics: tuple[DiagnosticsConfig, ...] = ()  # none: the agent never transmits
    status_interval_s: float = 5.0
    log_level: str = "info"
    campaigns: CampaignsConfig = CampaignsConfig()
    health: HealthConfig = HealthConfig()
    source: str = "<embedded defaults>"


def embedded_defaults(state_dir: Path = Path("state")) -> Config:
    """What `telemetry-agent run` uses without a config: simulated traffic of the demo DBC
    into batch files under `state_dir`, metrics on 127.0.0.1:9108."""
    from agent.sources.base import source_class

    simulated = source_class("simulate").Settings()
    return Config(
        vehicle_id="demo-1",
        state_dir=state_dir,
        buses=(BusConfig(name="can0", source="simulate", dbc=(demo_dbc(),), settings=simulated),),
        uplink=UplinkConfig(kind="file", url=str(state_dir / "outbox")),
    )


T = TypeVar("T")


class Checker:
    """Reads typed values out of a TOML table, collecting problems instead of raising."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.problems: list[str] = []

    def table(self, data: Mapping[str, Any], path: str, known: set[str]) -> None:
        for key in data:
            if key not in known:
                where = f"{path}.{key}" if path else key
                self.problems.append(f"{where}: unknown key")

    def get(
        self,
        data: Mapping[str, Any],
        path: str,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        where = f"{path}.{key}" if path else key
        if key not in data:
            return default
        value = data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML booleans are not numbers here, though Python's bool is an int.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            self.problems.append(f"{where}: expected {names}, got {value!r}")
            return default
        if check is not None:
            problem = check(value)
            if problem:
                self.problems.append(f"{where}: {problem}")
                return default
        return value  # type: ignore[return-value]

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def component_keys(
        self,
        data: Mapping[str, Any],
        where: str,
        shared: Collection[str],
        component: tuple[str, str],
        settings_of: Callable[[str], type[Settings]],
        kinds: Sequence[str],
    ) -> None:
        """The keys of a component's table (`component`: what it is, and its kind, such as
        ("source", "replay")) that are neither `shared` nor its kind's own: a key that
        another kind takes does not apply, naming that kind; one that none takes is unknown.
        The other kinds' modules are imported only to place such a key."""
        noun, kind = component
        own = settings_of(kind).own_keys() if kind in kinds else frozenset()
        for key in data:
            if key in shared or key in own:
                continue
            other = [k for k in kinds if key in settings_of(k).own_keys()]
            if other and kind in kinds:
                self.problems.append(
                    f"{where}.{key}: does not apply to {noun} {kind!r} (only to {other[0]!r})"
                )
            elif not other:
                self.problems.append(f"{where}.{key}: unknown key")


@dataclass(frozen=True)
class Settings:
    """A component's own keys of its table (a source's of [[bus]], an uplink's of [uplink],
    a rule mode's of [[collect]]): a frozen dataclass declared beside the component, whose
    fields are the keys with their defaults, and whose `parse` reads them."""

    @classmethod
    def parse(cls, check: Checker, data: Mapping[str, Any], where: str) -> Self:
        """The settings in the component's table, with every problem added to `check`."""
        return cls()

    @classmethod
    def own_keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}; got {value!r}"

    return check


def _listen(value: str) -> str | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"expected HOST:PORT, got {value!r}"
    return None


_BUS_KEYS = {"name", "source", "dbc", "j1939", "listen_only"}


def _bus(check: Checker, data: Any, where: str) -> BusConfig | None:
    from agent.sources.base import source_class

    if not isinstance(data, dict):
        check.problems.append(f"{where}: expected a table")
        return None
    source = check.get(data, where, "source", str, "", one_of(SOURCES))
    if "source" not in data:
        check.problems.append(f"{where}.source: missing (one of {', '.join(SOURCES)})")
    settings_type = source_class(source).Settings if source in SOURCES else None
    check.component_keys(
        data, where, _BUS_KEYS, ("source", source), lambda s: source_class(s).Settings, SOURCES
    )
    name = check.get(data, where, "name", str, "")
    if not name:
        check.problems.append(f"{where}.name: missing")
    dbc_list = check.get(data, where, "dbc", list, [])
    dbcs: list[Path] = []
    for k, item in enumerate(dbc_list):
        if not isinstance(item, str):
            check.problems.append(f"{where}.dbc[{k}]: expected a path, got {item!r}")
            continue
        path = check.path(item)
        if not path.is_file():
            check.problems.append(f"{where}.dbc[{k}]: no such file {path}")
        dbcs.append(path)
    if "dbc" not in data:
        check.problems.append(f"{where}.dbc: missing (a list of DBC files)")
    return BusConfig(
        name=name,
        source=source,
        dbc=tuple(dbcs),
        j1939=check.get(data, where, "j1939", bool, False),
        settings=settings_type.parse(check, data, where) if settings_type else None,
        listen_only=check.get(data, where, "listen_only", bool, False),
    )


def parse_config(text: str, source: str, base: Path) -> Config:
    """A config from TOML text; ConfigError with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, [f"not valid TOML: {error}"]) from None
    check = Checker(base)
    check.table(
        data,
        "",
        {
            "vehicle_id",
            "state_dir",
            "bus",
            "batch",
            "uplink",
            "spool",
            "metrics",
            "collect",
            "diagnostics",
            "status_interval_s",
            "log_level",
            "campaigns",
            "health",
        },
    )
    vehicle_id = check.get(data, "", "vehicle_id", str, "")
    if not vehicle_id:
        check.problems.append("vehicle_id: missing")
    elif any(c in vehicle_id for c in "/+#") or not vehicle_id.isprintable():
        check.problems.append(f"vehicle_id: {vehicle_id!r} cannot be part of an MQTT topic")
    state_dir = check.path(check.get(data, "", "state_dir", str, "/var/lib/telemetry-agent"))

    buses = _buses(check, data)
    batch = _batch(check, data)
    uplink = _uplink(check, data)
    spool = _spool(check, data, batch)
    metrics = _metrics(check, data)
    diagnostics: tuple[DiagnosticsConfig, ...] = ()
    streams = {bus.name for bus in buses}
    if "diagnostics" in data:
        from agent.diagnostics.settings import parse_diagnostics, stream_name

        diagnostics = parse_diagnostics(check, data["diagnostics"], buses)
        # Rules may select the answers of the ECUs too.
        streams |= {stream_name(table.bus) for table in diagnostics}
    rules: tuple[CollectRule, ...] = ()
    rule_tables = data.get("collect", [])
    if rule_tables:
        # Only a config with rules loads their condition language, and numpy with it.
        from agent.collect.rules import parse_rules

        rules = parse_rules(check, rule_tables, streams)
    health = _health(check, data)
    campaigns = _campaigns(check, data, uplink, health)
    status = check.get(data, "", "status_interval_s", (int, float), 5.0, positive)
    log_level = check.get(data, "", "log_level", str, "info", one_of(LOG_LEVELS))
    if check.problems:
        raise ConfigError(source, check.problems)
    return Config(
        vehicle_id=vehicle_id,
        state_dir=state_dir,
        buses=buses,
        batch=batch,
        uplink=uplink,
        spool=spool,
        metrics=metrics,
        collect=rules,
        diagnostics=diagnostics,
        status_interval_s=float(status),
        log_level=log_level,
        campaigns=campaigns,
        health=health,
        source=source,
    )


def _buses(check: Checker, data: Mapping[str, Any]) -> tuple[BusConfig, ...]:
    buses: list[BusConfig] = []
    bus_tables = data.get("bus", [])
    if not isinstance(bus_tables, list) or not bus_tables:
        check.problems.append("bus: expected at least one [[bus]] table")
        bus_tables = []
    for k, table in enumerate(bus_tables):
        bus = _bus(check, table, f"bus[{k}]")
        if bus is not None:
            if bus.name and any(b.name == bus.name for b in buses):
                check.problems.append(f"bus[{k}].name: {bus.name!r} is used by another bus")
            buses.append(bus)
    return tuple(buses)


def _metrics(check: Checker, data: Mapping[str, Any]) -> MetricsConfig:
    return MetricsConfig(
        listen=check.get(
            _section(check, data, "metrics", {"listen"}),
            "metrics",
            "listen",
            str,
            "127.0.0.1:9108",
            _listen,
        )
    )


def _batch(check: Checker, data: Mapping[str, Any]) -> BatchConfig:
    batch = _section(check, data, "batch", {"max_age_ms", "max_bytes", "compression"})
    return BatchConfig(
        max_age_ms=check.get(batch, "batch", "max_age_ms", int, 1000, positive),
        max_bytes=check.get(
            batch,
            "batch",
            "max_bytes",
            int,
            120_000,
            lambda v: (
                None if 4096 <= v <= MAX_BATCH_BYTES else f"must be 4096 to {MAX_BATCH_BYTES}"
            ),
        ),
        compression=check.get(batch, "batch", "compression", str, "zstd", one_of(COMPRESSIONS)),
    )


def _uplink(check: Checker, data: Mapping[str, Any]) -> UplinkConfig:
    uplink, uplink_settings = _uplink_section(check, data)
    kind = check.get(uplink, "uplink", "kind", str, "file", one_of(UPLINKS))
    url = check.get(uplink, "uplink", "url", str, "")
    if not url:
        url = "outbox" if kind == "file" else ""
        if kind != "file":
            check.problems.append("uplink.url: missing")
    if kind == "file":
        url = str(check.path(url))
    if kind in URL_SCHEMES and url:
        schemes = URL_SCHEMES[kind]
        address = url if "://" in url or kind != "grpc" else f"grpc://{url}"
        try:
            split_url(address, schemes)
        except ValueError as error:
            check.problems.append(f"uplink.url: {error}")

    return UplinkConfig(
        kind=kind,
        url=url,
        tls=_tls(check, uplink) if "tls" in uplink else None,
        keepalive_s=check.get(uplink, "uplink", "keepalive_s", int, 30, positive),
        ack_timeout_s=float(
            check.get(uplink, "uplink", "ack_timeout_s", (int, float), 10.0, positive)
        ),
        window=check.get(uplink, "uplink", "window", int, 8, positive),
        drain_timeout_s=float(
            check.get(uplink, "uplink", "drain_timeout_s", (int, float), 30.0, positive)
        ),
        settings=uplink_settings,
    )


def _tls(check: Checker, uplink: Mapping[str, Any]) -> TlsConfig:
    table = _section(check, uplink, "tls", {"ca_file", "cert_file", "key_file"}, "uplink.tls")
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value = check.get(table, "uplink.tls", key, str, "")
        files[key] = check.path(value) if value else None
        if files[key] is not None and not files[key].is_file():  # type: ignore[union-attr]
            check.problems.append(f"uplink.tls.{key}: no such file {files[key]}")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        check.problems.append("uplink.tls: cert_file and key_file go together")
    return TlsConfig(**files)


def _spool(check: Checker, data: Mapping[str, Any], batch: BatchConfig) -> SpoolConfig:
    spool = _section(
        check,
        data,
        "spool",
        {"max_bytes", "when_full", "fsync", "fsync_interval_ms", "memory_bytes"},
    )
    return SpoolConfig(
        max_bytes=check.get(
            spool,
            "spool",
            "max_bytes",
            int,
            SpoolConfig.max_bytes,
            # Room for several segments of the largest batches, so dropping the oldest
            # segment never has to drop the one being written.
            lambda v: (
                None
                if v >= 4 * batch.max_bytes
                else f"must be at least 4 times batch.max_bytes ({4 * batch.max_bytes})"
            ),
        ),
        when_full=check.get(
            spool, "spool", "when_full", str, SpoolConfig.when_full, one_of(WHEN_FULL)
        ),
        fsync=check.get(spool, "spool", "fsync", str, SpoolConfig.fsync, one_of(FSYNC_MODES)),
        fsync_interval_ms=check.get(
            spool, "spool", "fsync_interval_ms", int, SpoolConfig.fsync_interval_ms, positive
        ),
        memory_bytes=check.get(
            spool,
            "spool",
            "memory_bytes",
            int,
            SpoolConfig.memory_bytes,
            lambda v: (
                None
                if v >= 2 * batch.max_bytes
                else f"must be at least 2 times batch.max_bytes ({2 * batch.max_bytes})"
            ),
        ),
    )


def _health(check: Checker, data: Mapping[str, Any]) -> HealthConfig:
    health_table = _section(check, data, "health", {"interval_s"})
    return HealthConfig(
        interval_s=float(
            check.get(
                health_table,
                "health",
                "interval_s",
                (int, float),
                0.0,
                lambda v: None if v >= 0 else "must be 0 (off) or more",
            )
        )
    )


def _campaigns(
    check: Checker, data: Mapping[str, Any], uplink: UplinkConfig, health: HealthConfig
) -> CampaignsConfig:
    import base64
    import binascii

    table = _section(check, data, "campaigns", {"keys", "groups", "url"})
    keys: list[str] = []
    for k, key in enumerate(check.get(table, "campaigns", "keys", list, [])):
        text = key if isinstance(key, str) else ""
        try:
            raw = base64.b64decode(text.removeprefix("ed25519:"), validate=True)
        except binascii.Error:
            raw = b""
        if not text.startswith("ed25519:") or len(raw) != 32:
            check.problems.append(
                f"campaigns.keys[{k}]: expected ed25519:BASE64 of a 32-byte public key "
                f"(`telemetry-agent campaign keygen` prints one), got {key!r}"
            )
        keys.append(text)
    groups = check.get(table, "campaigns", "groups", list, [])
    for k, group in enumerate(groups):
        if not isinstance(group, str) or not group or any(c in group for c in "/+#"):
            check.problems.append(f"campaigns.groups[{k}]: {group!r} cannot be part of a topic")
    url = check.get(table, "campaigns", "url", str, "")
    if url:
        try:
            split_url(url, URL_SCHEMES["mqtt"] | URL_SCHEMES["grpc"])
        except ValueError as error:
            check.problems.append(f"campaigns.url: {error}")
    elif (keys or health.interval_s) and uplink.kind == "file":
        check.problems.append("campaigns.url: missing (the uplink writes files)")
    return CampaignsConfig(keys=tuple(keys), groups=tuple(map(str, groups)), url=url)


#: The URL schemes of each networked uplink, with their default ports; a scheme that ends
#: in "s" uses TLS (so does an [uplink.tls] table).
URL_SCHEMES: dict[str, dict[str, int]] = {
    "mqtt": {"mqtt": 1883, "mqtts": 8883},
    "grpc": {"grpc": 50051, "grpcs": 443},
}


def control_url(campaigns_url: str, uplink: UplinkConfig) -> str:
    """The control link's URL: campaigns.url, else the uplink's with its scheme (a gRPC
    uplink's may be HOST:PORT alone)."""
    if campaigns_url:
        return campaigns_url
    return uplink.url if "://" in uplink.url else f"{uplink.kind}://{uplink.url}"


def split_url(url: str, schemes: Mapping[str, int]) -> tuple[str, int, bool]:
    """(host, port, tls) from `scheme://host[:port]`; the scheme's port when none is given."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        choices = " or ".join(f"{s}://HOST[:PORT]" for s in schemes)
        raise ValueError(f"expected {choices}, got {url!r}")
    return parts.hostname, port or schemes[parts.scheme], parts.scheme.endswith("s")


_UPLINK_KEYS = {
    "kind",
    "url",
    "tls",
    "keepalive_s",
    "ack_timeout_s",
    "window",
    "drain_timeout_s",
}


def _uplink_section(check: Checker, data: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any]:
    """The [uplink] table, and its uplink's own settings (None for an unknown kind)."""
    from agent.uplinks.base import uplink_class

    uplink = data.get("uplink", {})
    if not isinstance(uplink, dict):
        check.problems.append("uplink: expected a table")
        return {}, None
    kind = uplink.get("kind", "file")
    settings_type = uplink_class(kind).Settings if kind in UPLINKS else None
    check.component_keys(
        uplink,
        "uplink",
        _UPLINK_KEYS,
        ("uplink", kind),
        lambda u: uplink_class(u).Settings,
        UPLINKS,
    )
    return uplink, settings_type.parse(check, uplink, "uplink") if settings_type else None


def _section(
    check: Checker, data: Mapping[str, Any], key: str, known: set[str], where: str | None = None
) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        check.problems.append(f"{where or key}: expected a table")
        return {}
    check.table(value, where or key, known)
    return value


#: What a reload (SIGHUP) cannot change in a running agent: new values wait for a restart.
RESTART_KEYS = (
    "vehicle_id",
    "state_dir",
    "buses",
    "spool",
    "metrics",
    "diagnostics",
    "campaigns",
    "health",
)


def restart_changes(running: Config, loaded: Config) -> list[str]:
    """The key paths whose values differ between two configs but need a restart."""
    changed: list[str] = []
    for key in RESTART_KEYS:
        old, new = getattr(running, key), getattr(loaded, key)
        if old == new:
            continue
        if key == "buses" and len(old) == len(new):
            for k, (a, b) in enumerate(zip(old, new, strict=True)):
                changed += [f"bus[{k}].{f}" for f in _changed(a, b) if f != "settings"]
                if a.source == b.source:
                    changed += [f"bus[{k}].{f}" for f in _changed(a.settings, b.settings)]
        elif key in ("spool", "metrics"):
            changed += [f"{key}.{f}" for f in _changed(old, new)]
        else:
            changed.append("bus" if key == "buses" else key)
    # The uplink changes on a reload, the control link that follows its URL does not.
    link = running.campaigns.keys or running.health.interval_s
    before = control_url(running.campaigns.url, running.uplink)
    if link and before != control_url(running.campaigns.url, loaded.uplink):
        changed.append("uplink.url of the control link (campaigns.url is empty)")
    # Whatever its URL, the control link takes the uplink's TLS files and keepalive, and
    # keeps the ones it connected with until a restart.
    for key in ("tls", "keepalive_s"):
        if link and getattr(running.uplink, key) != getattr(loaded.uplink, key):
            changed.append(f"uplink.{key} of the control link")
    return changed


def _changed(old: Any, new: Any) -> list[str]:
    """The fields of two settings of one kind whose values differ."""
    return [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def load_config(path: str | Path) -> Config:
    """The config in a TOML file; ConfigError naming the file and every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), [f"cannot read: {error.strerror}"]) from None
    return parse_config(text, str(path), path.resolve().parent)
