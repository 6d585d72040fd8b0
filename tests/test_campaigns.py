"""Campaigns: signed documents pushed over a real mosquitto change what an agent sends;
refused documents say why in the check-in; restarts, outages, expiry and reloads."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import json
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent.campaigns.document import (
    CampaignError,
    canonical,
    check_document,
    document_from_toml,
    public_key_text,
    sign,
    verify,
)
from agent.campaigns.manager import Campaigns, with_dbc
from agent.collect import Collector
from agent.collect.rules import CollectRule
from agent.config import BusConfig, Config, demo_dbc
from agent.decode import bus_decoders, default_cache_dir
from agent.wire import telemetry_pb2 as pb
from agent.wire.transport import SNAPSHOT_METHOD
from harness.campaigns import (
    agent_config,
    campaign_of,
    publish,
    signed,
    state_is,
    to_group,
    to_vehicle,
    wait_checkins,
)
from harness.data import TESLA_DBC, TESLA_LOG
from harness.outputs import scrape_metrics
from harness.services import ReceiverProcess, agent_command, broker, free_port
from tests.test_diagnostics import until

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


# -- the document and the vehicle's checks, without a broker --------------------------------


def manager(folder: Path, now: list[float] | None = None) -> Campaigns:
    bus = BusConfig("can0", "simulate", (demo_dbc(),))

    def fits(rules: tuple[CollectRule, ...], extra: Mapping[str, list[Path]]) -> None:
        Collector(rules, bus_decoders(with_dbc([bus], extra), default_cache_dir()))

    clock = (lambda: now[0]) if now is not None else time.time
    campaigns = Campaigns(folder, [public_key_text(KEY.public_key())], ["can0"], fits, clock)
    campaigns.load()
    return campaigns


def tampered(payload: bytes) -> bytes:
    envelope = json.loads(payload)
    envelope["document"]["collect"][0]["period_ms"] = 1
    return canonical(envelope)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (tampered(signed(KEY, "c")), "bad signature"),
        (canonical({"document": json.loads(signed(KEY, "c"))["document"]}), "unsigned"),
        (signed(OTHER, "c"), "unknown key"),
        (b"name = 'c'", "not JSON"),
        (
            signed(
                KEY,
                "c",
                collect=[{"name": "x", "mode": "sample", "signals": ["Nope"], "period_ms": 100}],
            ),
            "no signal matches Nope",
        ),
        (signed(KEY, "c", buses=["can9"]), "no [[bus]] is named 'can9'"),
        (signed(KEY, "other"), "the document 'other'"),
    ],
)
def test_a_refused_document_says_why_and_runs_nothing(
    tmp_path: Path, payload: bytes, reason: str
) -> None:
    campaigns = manager(tmp_path)
    assert campaigns.offer(to_vehicle("v", "c"), payload)
    [entry] = campaigns.checkin()
    assert entry["state"] == "rejected"
    assert reason in "; ".join(entry["errors"])
    assert campaigns.rules() == ()


def test_versions_replace_and_a_signed_removal_stops(tmp_path: Path) -> None:
    campaigns = manager(tmp_path)
    topic = to_vehicle("v", "c")
    assert campaigns.offer(topic, signed(KEY, "c", 2))
    assert [r.name for r in campaigns.rules()] == ["c/fast"]
    assert not campaigns.offer(topic, signed(KEY, "c", 2))  # again: nothing changes
    assert campaigns.offer(topic, signed(KEY, "c", 2, buses=["can0"]))  # same version
    [entry] = campaigns.checkin()
    assert entry["state"] == "active" and entry["version"] == 2
    assert "not newer" in entry["rejected"]["errors"][0]
    assert campaigns.offer(
        topic,
        signed(
            KEY,
            "c",
            3,
            collect=[{"name": "slow", "mode": "sample", "signals": ["Speed"], "period_ms": 1000}],
        ),
    )
    assert [r.name for r in campaigns.rules()] == ["c/slow"]
    removal = sign(check_document({"kind": "removal", "name": "c", "version": 4}), KEY)
    assert campaigns.offer(topic, removal)
    assert campaigns.rules() == ()
    assert campaigns.checkin()[0]["state"] == "removed"
    # An older version, still retained for a group, does not come back.
    campaigns.offer(to_group("g", "c"), signed(KEY, "c", 3))
    assert campaigns.rules() == ()


def test_garbage_in_the_state_folder_is_refused_and_the_rest_runs(tmp_path: Path) -> None:
    campaigns = manager(tmp_path)
    campaigns.offer(to_vehicle("v", "good"), signed(KEY, "good"))
    (tmp_path / "bad.json").write_bytes(b"\x00\xff not a document")
    (tmp_path / "state.json").write_text("[{")  # cut short by a crash of the disk
    again = manager(tmp_path)
    states = {c["name"]: c for c in again.checkin()}
    assert states["good"]["state"] == "active"
    assert states["bad"]["state"] == "rejected" and "not JSON" in states["bad"]["errors"][0]
    assert [r.name for r in again.rules()] == ["good/fast"]


TESLA_RULE = [{"name": "x", "mode": "all", "signals": ["DI_systemStatusCounter"]}]


def test_a_campaign_waits_for_the_dbc_files_it_names_and_takes_only_the_right_bytes(
    tmp_path: Path,
) -> None:
    campaigns = manager(tmp_path)
    tesla = TESLA_DBC.read_bytes()
    digest = hashlib.sha256(tesla).hexdigest()
    payload = signed(KEY, "c", dbc={"can0": [digest]}, collect=TESLA_RULE)
    assert campaigns.offer(to_vehicle("v", "c"), payload)
    [entry] = campaigns.checkin()
    assert entry["state"] == "waiting" and entry["waiting_for"]["dbc"] == [digest]
    assert campaigns.needed_dbc() == {digest} and campaigns.rules() == ()
    assert not campaigns.add_dbc(digest, tesla + b"\n")  # other bytes: refused
    assert not campaigns.add_dbc("0" * 64, tesla)  # not asked for
    assert campaigns.add_dbc(digest, tesla)
    assert [r.name for r in campaigns.rules()] == ["c/x"]
    assert campaigns.checkin()[0]["state"] == "active" and campaigns.needed_dbc() == set()
    kept = tmp_path / "dbc" / f"{digest}.dbc"
    assert campaigns.dbc_files() == {"can0": [kept]} and kept.read_bytes() == tesla
    # A new version that waits for another file leaves this one running meanwhile.
    other = hashlib.sha256(tesla + b"\n").hexdigest()
    assert campaigns.offer(to_vehicle("v", "c"), signed(KEY, "c", 2, dbc={"can0": [other]}))
    [entry] = campaigns.checkin()
    assert entry["state"] == "active" and entry["version"] == 1
    assert entry["waiting_for"] == {
        "version": 2,
        "hash": entry["waiting_for"]["hash"],
        "dbc": [other],
    }
    again = manager(tmp_path)  # a restart: both kept
    assert [r.name for r in again.rules()] == ["c/x"] and again.needed_dbc() == {other}


async def test_a_campaign_cannot_count_on_another_campaigns_dbc(tmp_path: Path) -> None:
    """A runs with the DBC it brought when the agent starts; B names A's messages without
    bringing that DBC: refused, since A's end would leave B's rules without their DBC."""
    from agent.config import load_config
    from agent.service import Agent as Service

    uplink = f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n'
    config = agent_config(tmp_path, "v", "mqtt://127.0.0.1:1", [KEY], uplink=uplink)
    kept = manager(tmp_path / "v" / "campaigns")
    tesla = TESLA_DBC.read_bytes()
    digest = hashlib.sha256(tesla).hexdigest()
    kept.offer(to_vehicle("v", "a"), signed(KEY, "a", dbc={"can0": [digest]}, collect=TESLA_RULE))
    assert kept.add_dbc(digest, tesla) and [r.name for r in kept.rules()] == ["a/x"]
    service = Service(load_config(config), status=None)
    try:
        campaigns = service.campaigns
        assert campaigns is not None
        assert campaigns.offer(to_vehicle("v", "b"), signed(KEY, "b", collect=TESLA_RULE))
        states = {c["name"]: c for c in campaigns.checkin()}
        assert states["b"]["state"] == "rejected"
        assert "no signal matches DI_systemStatusCounter" in states["b"]["errors"][0]
        assert [r.name for r in campaigns.rules()] == ["a/x"]
    finally:
        await service.spool.close()


async def test_a_campaign_may_select_the_answers_of_the_ecus(tmp_path: Path) -> None:
    """`can0.diagnostics` is a stream rules select as they select buses; no DBC file goes
    to it (its DBC is the agent's own)."""
    from agent.config import load_config
    from agent.service import Agent as Service

    asking = '[[diagnostics]]\nbus = "can0"\necus = [0x7E8]\npoll = [{pids = [0x0C]}]\n'
    uplink = f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n'
    bus = (  # never opened: the agent does not run
        f'[[bus]]\nname = "can0"\nsource = "python-can"\ninterface = "virtual"\n'
        f'channel = "{tmp_path.name}"\ndbc = ["{demo_dbc()}"]\n'
    )
    config = agent_config(
        tmp_path, "v", "mqtt://127.0.0.1:1", [KEY], uplink=uplink, extra=asking, bus=bus
    )
    tesla = TESLA_DBC.read_bytes()
    digest = hashlib.sha256(tesla).hexdigest()
    kept = tmp_path / "v" / "campaigns" / "dbc" / f"{digest}.dbc"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(tesla)  # so that the document does not wait for it
    service = Service(load_config(config), status=None)
    try:
        campaigns = service.campaigns
        assert campaigns is not None
        obd = [{"name": "obd", "mode": "all", "signals": ["EngineSpeed*"]}]
        stream = ["can0.diagnostics"]
        assert campaigns.offer(
            to_vehicle("v", "obd"), signed(KEY, "obd", buses=stream, collect=obd)
        )
        assert [r.name for r in campaigns.rules()] == ["obd/obd"]
        dbc = {"can0.diagnostics": [digest]}
        assert campaigns.offer(to_vehicle("v", "d"), signed(KEY, "d", dbc=dbc, collect=obd))
        coolant = [{"name": "t", "mode": "all", "signals": ["CoolantTemperature"]}]
        assert campaigns.offer(
            to_vehicle("v", "t"), signed(KEY, "t", buses=["can0"], collect=coolant)
        )
        states = {c["name"]: c for c in campaigns.checkin()}
        assert states["obd"]["state"] == "active"
        assert states["d"]["errors"] == ["dbc: no [[bus]] is named 'can0.diagnostics'"]
        assert states["t"]["errors"][1].endswith("select buses = ['can0.diagnostics']")
    finally:
        await service.spool.close()


def test_a_reload_names_a_new_uplink_url_the_control_link_would_follow(tmp_path: Path) -> None:
    from agent.config import load_config, restart_changes

    def config(uplink: str, control: str) -> Config:
        path = agent_config(tmp_path, "v", control, [KEY], uplink=uplink)
        return load_config(path)

    old = '[uplink]\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:1"\n'
    new = old.replace(":1", ":2")
    assert restart_changes(config(old, ""), config(new, "")) == [
        "uplink.url of the control link (campaigns.url is empty)"
    ]
    # With its own URL the control link stays where it is, and the uplink moves alone.
    own = "mqtt://127.0.0.1:3"
    assert restart_changes(config(old, own), config(new, own)) == []
    # Its TLS files and keepalive are the uplink's whatever its URL: a reload names them.
    (tmp_path / "ca.pem").write_text("a CA")
    secure = old + f'keepalive_s = 5\n[uplink.tls]\nca_file = "{tmp_path / "ca.pem"}"\n'
    assert restart_changes(config(old, own), config(secure, own)) == [
        "uplink.tls of the control link",
        "uplink.keepalive_s of the control link",
    ]


def test_start_and_expiry_follow_the_agents_clock_and_survive_a_restart(tmp_path: Path) -> None:
    now = [1_790_000_000.0]  # 2026-09-21, before the start
    campaigns = manager(tmp_path, now)
    payload = signed(KEY, "c", start="2027-01-15T08:00:00Z", expiry="2027-01-15T08:01:00Z")
    campaigns.offer(to_vehicle("v", "c"), payload)
    assert campaigns.checkin()[0]["state"] == "waiting"
    start = verify(payload, campaigns.keys).start
    assert start is not None and campaigns.next_change() == start
    now[0] = start
    assert campaigns.tick() and campaigns.checkin()[0]["state"] == "active"
    again = manager(tmp_path, now)  # a restart: the folder holds it
    assert again.checkin() == campaigns.checkin()
    assert [r.name for r in again.rules()] == ["c/fast"]
    now[0] = start + 60
    assert again.tick() and again.checkin()[0]["state"] == "expired" and again.rules() == ()


def test_a_campaign_file_is_checked_as_check_config_checks_rules(tmp_path: Path) -> None:
    text = 'name = "c"\nversion = 1\nexpiry = 2027-01-01T00:00:00Z\n[[collect]]\nname = "x"\n'
    text += 'mode = "sample"\nsignals = ["*"]\nperiod_ms = 0\ncolour = 1\n'
    with pytest.raises(CampaignError) as error:
        document_from_toml(text, "c.toml")
    assert error.value.problems == [
        "c.toml: collect[0].colour: unknown key",
        "c.toml: collect[0].period_ms: must be 1 to 86,400,000 ms",
    ]


def test_campaign_check_tries_a_file_against_a_vehicles_config(tmp_path: Path) -> None:
    config = agent_config(tmp_path, "v", "mqtt://127.0.0.1:1", [KEY])
    campaign = tmp_path / "c.toml"
    campaign.write_text(
        'name = "c"\nversion = 1\n[[collect]]\nname = "x"\nmode = "all"\nsignals = ["Nope*"]\n'
    )

    def check() -> subprocess.CompletedProcess[str]:
        command = agent_command("campaign", "check", campaign, "--config", config)
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    refused = check()
    assert refused.returncode == 78
    assert "collect rule 'c/x': no signal matches Nope*" in refused.stderr
    campaign.write_text(campaign.read_text().replace("Nope*", "Speed"))
    accepted = check()
    assert accepted.returncode == 0 and "OK" in accepted.stdout and "(c/x)" in accepted.stdout


def test_campaign_check_knows_the_streams_of_the_ecus_answers(tmp_path: Path) -> None:
    """Rules on the answers' signals (agent/diagnostics/pids.py) pass where the bus has a
    [[diagnostics]], and are refused with where they are where it has none."""
    asking = '[[diagnostics]]\nbus = "can0"\necus = [0x7E8]\npoll = [{pids = [0x05]}]\n'
    bus = (  # never opened
        f'[[bus]]\nname = "can0"\nsource = "python-can"\ninterface = "virtual"\n'
        f'channel = "{tmp_path.name}"\ndbc = ["{demo_dbc()}"]\n'
    )
    asked = agent_config(tmp_path, "asked", "mqtt://127.0.0.1:1", [KEY], bus=bus, extra=asking)
    silent = agent_config(tmp_path, "silent", "mqtt://127.0.0.1:1", [KEY], bus=bus)

    def check(config: Path, buses: list[str], signal: str) -> subprocess.CompletedProcess[str]:
        campaign = tmp_path / "obd.toml"
        campaign.write_text(
            f'name = "obd"\nversion = 1\nbuses = {json.dumps(buses)}\n'
            f'[[collect]]\nname = "x"\nmode = "all"\nsignals = ["{signal}"]\n'
        )
        command = agent_command("campaign", "check", campaign, "--config", config)
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    ok = check(asked, ["can0.diagnostics"], "CoolantTemperature")
    assert ok.returncode == 0 and "(obd/x)" in ok.stdout, ok.stderr
    # The stream's signals are checked as a bus's are.
    assert (
        "no signal matches Nope on bus can0.diagnostics"
        in check(asked, ["can0.diagnostics"], "Nope").stderr
    )
    refused = check(silent, ["can0.diagnostics"], "CoolantTemperature")
    assert refused.returncode == 78
    assert (
        "buses: 'can0.diagnostics' is the stream of the ECUs' answers on bus 'can0', "
        "and no [[diagnostics]] asks them (bus = 'can0')"
    ) in refused.stderr
    # On the bus itself the answers' signals are not: the error says where they are.
    hint = "obd/x: CoolantTemperature: signals of the ECUs' answers, which come on a bus's "
    hint += "diagnostics stream only: "
    assert check(asked, [], "CoolantTemperature").returncode == 0  # every bus and stream
    on_bus = check(asked, ["can0"], "CoolantTemperature")
    assert on_bus.returncode == 78
    assert hint + "select buses = ['can0.diagnostics']" in on_bus.stderr, on_bus.stderr
    unasked = check(silent, ["can0"], "CoolantTemperature")
    assert hint + "no [[diagnostics]] asks the ECUs on can0" in unasked.stderr, unasked.stderr


# -- a real broker, real agents ---------------------------------------------------------


class Agent:
    """`telemetry-agent run` in the background, its log in a file."""

    def __init__(self, config: Path) -> None:
        self.log = config.with_suffix(".log")
        self.process = subprocess.Popen(
            agent_command("run", "--config", config),
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),  # noqa: SIM115
        )

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)
        text = self.log.read_text()
        assert "Traceback" not in text, text
        return text


def rule_records(path: Path, rule: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in rows if r.get("rule") == rule]


async def wait_records(path: Path, rule: str, count: int = 1, timeout: float = 10) -> float:
    """When (time.monotonic()) `count` records of the rule had arrived."""
    deadline = time.monotonic() + timeout
    while len(rule_records(path, rule)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} records of {rule} in {path}")
        await asyncio.sleep(0.02)
    return time.monotonic()


async def ended_before(path: Path, rule: str, other: str, checkin: Mapping[str, Any]) -> None:
    """No record of `rule` from later than its campaign's end (the check-in's `since`, by
    the agent's clock) and the batch open then; waited for by a record of `other`, which
    keeps running, from after that."""
    campaign = campaign_of(checkin, rule.split("/")[0])
    assert campaign is not None
    ended = dt.datetime.strptime(campaign["since"], "%Y-%m-%dT%H:%M:%S.%fZ")
    # The batch's max age (200 ms, agent_config), and a late tick on a loaded machine.
    bound = ended.replace(tzinfo=dt.UTC).timestamp() + 0.2 + 0.5
    deadline = time.monotonic() + 15
    while not any(float(r["t"]) > bound for r in rule_records(path, other)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no record of {other} from after {campaign['since']}")
        await asyncio.sleep(0.05)
    late = [r["t"] for r in rule_records(path, rule) if float(r["t"]) > bound]
    assert late == [], f"{rule} ended at {campaign['since']}"


def frames_read(port: int) -> float:
    try:
        return scrape_metrics(port).get('telemetry_agent_frames_received_total{bus="can0"}', 0.0)
    except OSError:  # not serving yet
        return 0.0


async def test_a_campaign_closes_the_open_batch_to_send_its_first_records(
    tmp_path: Path,
) -> None:
    """Batches of two minutes and 4 MB: the campaign's records come long before one closes
    by age or size."""
    port = free_port()
    with broker(tmp_path) as mqtt:
        received = tmp_path / "received.jsonl"
        receiver = ReceiverProcess(received, "--mqtt", mqtt.url)
        receiver.wait_ready("subscribed to")
        config = agent_config(
            tmp_path,
            "v1",
            mqtt.url,
            [KEY],
            max_age_ms=120_000,
            max_bytes=4_000_000,
            metrics=f"127.0.0.1:{port}",
        )
        agent = Agent(config)
        try:
            await wait_checkins(mqtt.url, ["v1"], lambda c: True)
            # A second of frames in the open batch (the bus sends 336 a second), so the
            # campaign's rule has 100 ms periods that its frames have passed.
            await until(lambda: frames_read(port) > 336, 30)
            await publish(mqtt.url, {to_vehicle("v1", "speed"): signed(KEY, "speed")})
            await wait_records(received, "speed/fast", timeout=30)
        finally:
            agent.stop()
            receiver.process.kill()


async def test_a_pushed_campaign_changes_what_arrives(tmp_path: Path) -> None:
    with broker(tmp_path) as mqtt:
        received = tmp_path / "received.jsonl"
        receiver = ReceiverProcess(received, "--mqtt", mqtt.url)
        receiver.wait_ready("subscribed to")
        agent = Agent(agent_config(tmp_path, "v1", mqtt.url, [KEY], groups=("fleet",)))
        try:
            await wait_checkins(mqtt.url, ["v1"], lambda c: True)
            await wait_records(received, "base")
            await publish(mqtt.url, {to_group("fleet", "speed"): signed(KEY, "speed")})
            # A wide bound: how fast is the benchmark's to measure (bench.campaigns).
            await wait_records(received, "speed/fast", timeout=15)
            found = await wait_checkins(mqtt.url, ["v1"], state_is("speed", "active"))
            campaign = campaign_of(found["v1"][1], "speed")
            assert campaign is not None and campaign["version"] == 1
            assert len(campaign["hash"]) == 64
            demo = hashlib.sha256(demo_dbc().read_bytes()).hexdigest()
            assert found["v1"][1]["dbc"] == {"can0": [demo]}
            # Tampered on the way: refused, the running version stays, the reason is told.
            bad = tampered(signed(KEY, "speed", 2))
            await publish(mqtt.url, {to_vehicle("v1", "speed"): bad})
            found = await wait_checkins(
                mqtt.url, ["v1"], lambda c: "rejected" in (campaign_of(c, "speed") or {})
            )
            campaign = campaign_of(found["v1"][1], "speed")
            assert campaign is not None and campaign["state"] == "active"
            assert "bad signature" in campaign["rejected"]["errors"][0]
            # Unsigned, under another name: rejected, with the reason.
            unsigned = canonical({"document": json.loads(signed(KEY, "cheap"))["document"]})
            await publish(mqtt.url, {to_vehicle("v1", "cheap"): unsigned})
            found = await wait_checkins(mqtt.url, ["v1"], state_is("cheap", "rejected"))
            assert campaign_of(found["v1"][1], "cheap")["errors"] == ["unsigned: no signature"]  # type: ignore[index]
            status = subprocess.run(
                agent_command("campaign", "status", "--mqtt", mqtt.url),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            assert "v1       speed     1        active" in status, status
            # A signed removal, from the CLI, to the group: the campaign's records end.
            key_file = tmp_path / "fleet.key"
            key_file.write_bytes(
                KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            )
            subprocess.run(
                agent_command(
                    "campaign",
                    "remove",
                    "speed",
                    "--version",
                    "3",
                    "--key",
                    key_file,
                    "--mqtt",
                    mqtt.url,
                    "--group",
                    "fleet",
                ),
                capture_output=True,
                timeout=30,
                check=True,
            )
            found = await wait_checkins(mqtt.url, ["v1"], state_is("speed", "removed"))
            await ended_before(received, "speed/fast", "base", found["v1"][1])
        finally:
            agent.stop()
            receiver.process.kill()
        assert rule_records(received, "cheap/fast") == []


def outbox_records(folder: Path, outbox: Path, rule: str) -> list[dict[str, Any]]:
    out = folder / f"{outbox.name}.jsonl"
    subprocess.run(
        agent_command("receive", "--dir", outbox, "--idle-exit", "0.5", "--output", out),
        capture_output=True,
        timeout=60,
        check=True,
    )
    return rule_records(out, rule)


async def test_a_campaign_holds_through_a_restart_with_the_broker_away(tmp_path: Path) -> None:
    def config(outbox: str) -> Path:
        uplink = f'[uplink]\nkind = "file"\nurl = "{tmp_path / outbox}"\n'
        return agent_config(tmp_path, "v2", mqtt.url, [KEY], uplink=uplink)

    with broker(tmp_path) as mqtt:
        agent = Agent(config("before"))
        try:
            await publish(mqtt.url, {to_vehicle("v2", "speed"): signed(KEY, "speed")})
            await wait_checkins(mqtt.url, ["v2"], state_is("speed", "active"))
        finally:
            agent.stop()
        mqtt.stop()  # the broker is away for the whole second run
        restarted = time.time()
        agent = Agent(config("after"))
        try:
            outbox = tmp_path / "after"
            deadline = time.monotonic() + 20
            while len(list(outbox.glob("*.batch"))) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            log = agent.stop()
    assert "campaign speed version 1 accepted" in log
    after = outbox_records(tmp_path, tmp_path / "after", "speed/fast")
    assert after, log
    assert min(float(r["t"]) for r in after) >= restarted - 1
    state = json.loads((tmp_path / "v2" / "campaigns" / "state.json").read_text())
    assert [(c["name"], c["state"]) for c in state] == [("speed", "active")]


async def test_expiry_ends_a_campaign_and_a_reload_leaves_campaigns_running(
    tmp_path: Path,
) -> None:
    with broker(tmp_path) as mqtt:
        received = tmp_path / "received.jsonl"
        receiver = ReceiverProcess(received, "--mqtt", mqtt.url)
        receiver.wait_ready("subscribed to")
        config = agent_config(tmp_path, "v3", mqtt.url, [KEY])
        agent = Agent(config)
        try:
            await wait_checkins(mqtt.url, ["v3"], lambda c: True)
            # Far enough ahead that a slow machine sees it active first.
            expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 10))
            await publish(
                mqtt.url,
                {
                    to_vehicle("v3", "short"): signed(KEY, "short", expiry=expiry),
                    to_vehicle("v3", "long"): signed(KEY, "long"),
                },
            )
            await wait_checkins(mqtt.url, ["v3"], state_is("short", "active"))
            await wait_records(received, "short/fast")
            # The file's rules change under a running campaign; so does the keepalive, which
            # the control link keeps until a restart.
            text = config.read_text().replace('"base"', '"base2"')
            config.write_text(text.replace("\n[batch]", "keepalive_s = 20\n\n[batch]"))
            agent.process.send_signal(signal.SIGHUP)
            await wait_records(received, "base2")
            kept = len(rule_records(received, "long/fast"))
            await wait_records(received, "long/fast", kept + 3)
            found = await wait_checkins(mqtt.url, ["v3"], state_is("short", "expired"), timeout=30)
            assert campaign_of(found["v3"][1], "long")["state"] == "active"  # type: ignore[index]
            await ended_before(received, "short/fast", "long/fast", found["v3"][1])
        finally:
            log = agent.stop()
            receiver.process.kill()
    assert "reloaded" in log
    assert "uplink.keepalive_s of the control link changed, which takes a restart" in log


async def test_the_control_link_comes_back_with_a_broker_that_lost_everything(
    tmp_path: Path,
) -> None:
    with broker(tmp_path) as mqtt:
        agent = Agent(agent_config(tmp_path, "v7", mqtt.url, [KEY]))
        try:
            await publish(mqtt.url, {to_vehicle("v7", "speed"): signed(KEY, "speed")})
            await wait_checkins(mqtt.url, ["v7"], state_is("speed", "active"))
            mqtt.stop()  # killed, without persistence: its retained messages are gone
            mqtt.start()
            # The agent reconnects, held the campaign meanwhile, and checks in again.
            found = await wait_checkins(mqtt.url, ["v7"], state_is("speed", "active"))
            assert campaign_of(found["v7"][1], "speed")["version"] == 1  # type: ignore[index]
        finally:
            log = agent.stop()
    assert "control link" in log and "lost" in log


def tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """A cloud tool (`campaign status`, `snapshot`, `health`) to its end."""
    command = agent_command(*args)
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def grpc_checkin(url: str, vehicle: str, ready: Any, timeout: float = 20) -> dict[str, Any]:
    """The vehicle's check-in as `campaign status --grpc` reads it, once `ready(it)`."""
    deadline = time.monotonic() + timeout
    while True:
        status = tool("campaign", "status", "--grpc", url, "--vehicle", vehicle, "--json")
        assert status.returncode == 0, status.stderr
        found = json.loads(status.stdout)
        if found and ready(found[0]):
            return found[0]  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no such check-in of {vehicle}: {found}")
        time.sleep(0.1)


def grpc_receiver(folder: Path) -> tuple[ReceiverProcess, str]:
    """`receive --grpc-listen` on a free port, its records in `folder/received.jsonl`, the
    campaigns of `folder/campaigns`, ready; and its URL."""
    port = free_port()
    receiver = ReceiverProcess(
        folder / "received.jsonl",
        "--grpc-listen",
        f"127.0.0.1:{port}",
        "--campaigns",
        folder / "campaigns",
    )
    receiver.wait_ready("listening")
    return receiver, f"grpc://127.0.0.1:{port}"


async def test_the_whole_control_plane_goes_over_grpc(tmp_path: Path) -> None:
    """Campaigns from the receiver's folder, check-ins, snapshots and health reports, all
    over the receiver's gRPC server, read by the tools with --grpc."""
    receiver, url = grpc_receiver(tmp_path)
    folder, received = tmp_path / "campaigns", receiver.output
    config = agent_config(
        tmp_path,
        "v8",
        url,
        [KEY],
        uplink=f'[uplink]\nkind = "grpc"\nurl = "{url}"\n',
        groups=("fleet",),
        extra="[health]\ninterval_s = 0.5\n",
    )
    agent = Agent(config)
    try:
        # A check-in on connect, with nothing to run yet.
        first = grpc_checkin(url, "v8", lambda c: True)
        assert first["campaigns"] == [] and first["dbc"]["can0"]
        await wait_records(received, "base")
        place = folder / "groups" / "fleet" / "campaigns"
        place.mkdir(parents=True)
        (place / ".speed.partial").write_bytes(signed(KEY, "speed"))
        (place / ".speed.partial").rename(place / "speed.json")
        # Another group's campaign is not this vehicle's.
        other = folder / "groups" / "other" / "campaigns"
        other.mkdir(parents=True)
        (other / "slow.json").write_bytes(signed(KEY, "slow"))
        await wait_records(received, "speed/fast")
        # And a check-in on the change.
        grpc_checkin(url, "v8", state_is("speed", "active"))
        table = tool("campaign", "status", "--grpc", url)
        assert table.stdout.splitlines()[1].split()[:4] == ["v8", "speed", "1", "active"]

        answer = tool("snapshot", "--vehicle", "v8", "--grpc", url, "--json", "Speed")
        assert answer.returncode == 0, answer.stderr
        assert [s["signal"] for s in json.loads(answer.stdout)["signals"]] == ["Speed"]
        absent = tool("snapshot", "--vehicle", "v9", "--grpc", url, "--timeout", "2")
        assert absent.returncode == 1
        assert "v9 is not connected" in absent.stderr and "no answer from v9" in absent.stderr
        # An answer is matched by its request's id: a request must carry one.
        with grpc.insecure_channel(url.removeprefix("grpc://")) as channel:
            ask = channel.unary_unary(
                SNAPSHOT_METHOD,
                request_serializer=pb.SnapshotRequest.SerializeToString,
                response_deserializer=pb.Report.FromString,
            )
            with pytest.raises(grpc.RpcError) as refused:
                ask(pb.SnapshotRequest(vehicle_id="v8", request=b'{"signals": []}'), timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        health = tool("health", "--grpc", url, "--vehicle", "v8", "--count", "2", "--timeout", "20")
        assert health.returncode == 0, health.stderr
        reports = [json.loads(line) for line in health.stdout.splitlines()]
        frames = 'telemetry_agent_frames_received_total{bus="can0"}'
        assert [r["vehicle"] for r in reports] == ["v8", "v8"]
        assert reports[0]["metrics"][frames] < reports[1]["metrics"][frames]
    finally:
        log = agent.stop()
        receiver.process.kill()
    assert "control link grpc 127.0.0.1" in log and "connected" in log
    assert "control call of v8 from" in receiver.stderr_path.read_text()
    state = json.loads((tmp_path / "v8" / "campaigns" / "state.json").read_text())
    assert [(c["name"], c["state"]) for c in state] == [("speed", "active")]


async def test_the_campaigns_call_still_serves_the_folder(tmp_path: Path) -> None:
    """Telemetry.Campaigns, which agents took campaigns by before Control, is kept."""
    from grpc import aio

    from agent.wire import telemetry_pb2 as pb

    place = tmp_path / "campaigns" / "vehicles" / "v1" / "campaigns"
    place.mkdir(parents=True)
    (place / "speed.json").write_bytes(signed(KEY, "speed"))
    receiver, url = grpc_receiver(tmp_path)
    try:
        async with aio.insecure_channel(url.removeprefix("grpc://")) as channel:
            call = channel.unary_stream(
                "/telemetry.v1.Telemetry/Campaigns",
                request_serializer=pb.CampaignsRequest.SerializeToString,
                response_deserializer=pb.Campaign.FromString,
            )(pb.CampaignsRequest(vehicle_id="v1"), timeout=10)
            first = await anext(aiter(call))
            call.cancel()
    finally:
        receiver.process.kill()
    assert first.topic == "vehicles/v1/campaigns/speed"
    assert first.document == signed(KEY, "speed")


def test_rules_changed_again_and_again_keep_their_names_on_the_wire() -> None:
    """Each campaign change makes new rule selections; one made after an old one was freed
    may have its id(), which the encoder must never take for the old one's schema block."""
    from agent.cloud.parser import SchemaStore, parse_batch
    from agent.logs import open_log
    from agent.wire.encoder import BatchEncoder
    from agent.wire.envelope import read_envelope
    from harness.data import TESLA_EXCERPT

    bus = BusConfig("can0", "replay", (TESLA_DBC,))
    decoders = bus_decoders([bus], default_cache_dir())
    encoder = BatchEncoder("v", "s", b"")
    schemas = SchemaStore()
    frames = next(iter(open_log(TESLA_EXCERPT).batches(1000)))
    decoded = decoders["can0"].decode(frames)
    for k in range(60):
        rule = CollectRule(name=f"c{k}/fast", mode="all", signals=("DI_systemStatusCounter",))
        collector = Collector((rule,), decoders)
        wire = encoder.encode([collector.collect("can0", frames, decoded)], k + 1)
        assert wire is not None
        schemas.add(read_envelope(encoder.announcement(wire.schema_id)), 1 << 30)
        batch = parse_batch(read_envelope(wire.payload), schemas)
        assert {b.rule for b in batch.blocks} == {f"c{k}/fast"}
        del collector, wire


async def test_a_campaign_brings_its_dbc_file_and_decodes_with_it(tmp_path: Path) -> None:
    """The bus carries a Tesla's frames, which the vehicle's own DBC does not know: the
    campaign's DBC file, pushed once under its hash, decodes them."""
    bus = (
        f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{TESLA_LOG}"\n'
        f'channel = "vcan0"\npace = "realtime"\nloop = true\ndbc = ["{demo_dbc()}"]\n'
    )
    campaign = tmp_path / "tesla.toml"
    campaign.write_text(
        f'name = "tesla"\nversion = 1\n[dbc]\ncan0 = ["{TESLA_DBC}"]\n[[collect]]\n'
        'name = "x"\nmode = "all"\nsignals = ["DI_systemStatusCounter"]\n'
    )
    key_file = tmp_path / "fleet.key"
    key_file.write_bytes(KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))

    def cli(*args: str | Path) -> None:
        subprocess.run(
            agent_command("campaign", *args), capture_output=True, timeout=60, check=True
        )

    with broker(tmp_path) as mqtt:
        received = tmp_path / "received.jsonl"
        receiver = ReceiverProcess(received, "--mqtt", mqtt.url)
        receiver.wait_ready("subscribed to")
        agent = Agent(agent_config(tmp_path, "v9", mqtt.url, [KEY], bus=bus))
        try:
            cli("sign", campaign, "--key", key_file)
            signed_file = tmp_path / "tesla.signed.json"
            cli("push", signed_file, "--mqtt", mqtt.url, "--vehicle", "v9")
            found = await wait_checkins(mqtt.url, ["v9"], state_is("tesla", "waiting"))
            digest = hashlib.sha256(TESLA_DBC.read_bytes()).hexdigest()
            assert campaign_of(found["v9"][1], "tesla")["waiting_for"]["dbc"] == [digest]  # type: ignore[index]
            cli("push", signed_file, "--dbc", TESLA_DBC, "--mqtt", mqtt.url, "--vehicle", "v9")
            await wait_checkins(mqtt.url, ["v9"], state_is("tesla", "active"))
            await wait_records(received, "tesla/x")
        finally:
            agent.stop()
            receiver.process.kill()
    assert (tmp_path / "v9" / "campaigns" / "dbc" / f"{digest}.dbc").is_file()


def test_push_and_remove_write_the_folder_a_grpc_receiver_serves(tmp_path: Path) -> None:
    key_file = tmp_path / "fleet.key"
    key_file.write_bytes(KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    document = tmp_path / "tesla.signed.json"
    document.write_bytes(signed(KEY, "tesla"))
    folder = tmp_path / "fleet"

    def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            agent_command("campaign", *args), capture_output=True, text=True, timeout=60
        )

    pushed = cli("push", document, "--group", "trucks", "--vehicle", "v1", "--dbc", TESLA_DBC,
                 "--folder", folder)  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    digest = hashlib.sha256(TESLA_DBC.read_bytes()).hexdigest()
    assert (folder / "dbc" / f"{digest}.dbc").read_bytes() == TESLA_DBC.read_bytes()
    for place in ("groups/trucks", "vehicles/v1"):
        assert (folder / place / "campaigns" / "tesla.json").read_bytes() == document.read_bytes()
    removed = cli("remove", "tesla", "--version", "2", "--key", key_file, "--group", "trucks",
                  "--folder", folder)  # fmt: skip
    assert removed.returncode == 0, removed.stderr
    removal = json.loads((folder / "groups/trucks/campaigns/tesla.json").read_bytes())
    assert removal["document"]["kind"] == "removal" and removal["document"]["version"] == 2
    assert not list(folder.rglob("*.partial"))
    blocked = tmp_path / "file"
    blocked.write_text("")
    refused = cli("push", document, "--vehicle", "v1", "--folder", blocked)
    assert refused.returncode == 1 and str(blocked) in refused.stderr


async def test_a_campaigns_dbc_file_comes_over_grpc_too(tmp_path: Path) -> None:
    """The vehicle asks its Control call for the file by hash; the receiver sends it from
    its folder's `dbc/` once it is there."""
    bus = (
        f'[[bus]]\nname = "can0"\nsource = "replay"\npath = "{TESLA_LOG}"\n'
        f'channel = "vcan0"\npace = "realtime"\nloop = true\ndbc = ["{demo_dbc()}"]\n'
    )
    tesla = TESLA_DBC.read_bytes()
    digest = hashlib.sha256(tesla).hexdigest()
    collect = [{"name": "x", "mode": "all", "signals": ["DI_systemStatusCounter"]}]
    receiver, url = grpc_receiver(tmp_path)
    folder, received = tmp_path / "campaigns", receiver.output
    uplink = f'[uplink]\nkind = "grpc"\nurl = "{url}"\n'
    agent = Agent(agent_config(tmp_path, "v9", url, [KEY], uplink=uplink, bus=bus))
    try:
        # Half of the file, as while it is being copied: not sent, so not refused.
        dbc_file = folder / "dbc" / f"{digest}.dbc"
        dbc_file.parent.mkdir(parents=True)
        dbc_file.write_bytes(tesla[: len(tesla) // 2])
        place = folder / "vehicles" / "v9" / "campaigns"
        place.mkdir(parents=True)
        document = signed(KEY, "tesla", dbc={"can0": [digest]}, collect=collect)
        (place / "tesla.json").write_bytes(document)
        waiting = grpc_checkin(url, "v9", state_is("tesla", "waiting"))
        assert campaign_of(waiting, "tesla")["waiting_for"]["dbc"] == [digest]  # type: ignore[index]
        dbc_file.write_bytes(tesla)
        grpc_checkin(url, "v9", state_is("tesla", "active"))
        await wait_records(received, "tesla/x")
    finally:
        agent.stop()
        receiver.process.kill()
    assert (tmp_path / "v9" / "campaigns" / "dbc" / f"{digest}.dbc").read_bytes() == tesla


async def test_a_receiver_without_the_control_call_is_named_once(tmp_path: Path) -> None:
    """A server that serves Stream alone (a receiver older than the agent): the agent says
    so once, and asks again with its waits growing, not in a tight loop."""
    import grpc
    from grpc import aio

    asked: list[float] = []

    class StreamOnly(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            if details.method.endswith("/Control"):
                asked.append(time.monotonic())
            return None  # UNIMPLEMENTED

    server = aio.server()
    server.add_generic_rpc_handlers([StreamOnly()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    url = f"grpc://127.0.0.1:{port}"
    uplink = f'[uplink]\nkind = "file"\nurl = "{tmp_path / "outbox"}"\n'
    agent = Agent(agent_config(tmp_path, "v1", url, [KEY], uplink=uplink))
    try:
        await until(lambda: len(asked) >= 4, seconds=30)
    finally:
        log = agent.stop()
        await server.stop(None)
    assert log.count("has no Telemetry.Control call") == 1, log
    assert "control link grpc" not in log and " lost" not in log, log  # never taken
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert gaps[2] > 1.5 * gaps[0], gaps
