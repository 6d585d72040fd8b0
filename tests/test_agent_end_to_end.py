"""The whole agent, as a user runs it: replay real logs over a real mosquitto, gRPC and files;
the receiver's records must equal `decode`'s for the same log, frame for frame."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.data import (
    RAV4_ADAS_DBC,
    RAV4_LOG,
    RAV4_PT_DBC,
    TESLA_DBC,
    TESLA_LOG,
    TRUCK_DBC,
    TRUCK_LOG,
)
from harness.outputs import records
from harness.services import (
    ReceiverProcess,
    agent_command,
    broker,
    free_port,
    make_certificates,
    run_agent,
)
from tests.test_j1939 import reference_transfers


def replay_bus(name: str, log: Path, dbc: Path, extra: str = "") -> str:
    return f'[[bus]]\nname = "{name}"\nsource = "replay"\npath = "{log}"\ndbc = ["{dbc}"]\n{extra}'


#: name -> (the [[bus]] tables of the replay, the `decode` arguments for the same log)
CASES: dict[str, tuple[str, list[str]]] = {
    "tesla": (
        replay_bus("vcan0", TESLA_LOG, TESLA_DBC),
        [str(TESLA_LOG), "--dbc", str(TESLA_DBC)],
    ),
    "rav4": (
        replay_bus("can0", RAV4_LOG, RAV4_PT_DBC) + replay_bus("can1", RAV4_LOG, RAV4_ADAS_DBC),
        [str(RAV4_LOG), "--dbc", f"can0={RAV4_PT_DBC}", "--dbc", f"can1={RAV4_ADAS_DBC}"],
    ),
    "truck": (
        replay_bus("truck", TRUCK_LOG, TRUCK_DBC, 'channel = "*"\nj1939 = true\n'),
        [str(TRUCK_LOG), "--dbc", str(TRUCK_DBC), "--j1939", "*"],
    ),
}


def write_config(folder: Path, case: str, uplink: str, pace: float | None = None) -> Path:
    """The agent's config for a case; `pace`: its replay's speed factor (default: max)."""
    buses = CASES[case][0]
    if pace is not None:
        buses = buses.replace('source = "replay"\n', f'source = "replay"\npace = {pace}\n')
    config = folder / "agent.toml"
    config.write_text(
        f'vehicle_id = "test-{case}"\nstate_dir = "{folder / "state"}"\n'
        f'{buses}\n{uplink}\n[metrics]\nlisten = ""\n'
    )
    return config


def decoded(folder: Path, case: str) -> list[dict[str, object]]:
    out = folder / "decode.jsonl"
    subprocess.run(
        agent_command("decode", *CASES[case][1], "--output", out),
        check=True,
        capture_output=True,
        timeout=120,
    )
    found = records(out)
    if case == "truck":
        # `decode` writes the J1939 transfers too (docs/j1939.md); the agent sends the
        # engine configuration's as any message, and DM1 faults only through a rule of mode
        # faults, which this config has not.
        transfers = {
            (float(t), source, pgn)
            for t, source, pgn, _ in reference_transfers(TRUCK_LOG)
            if pgn == 0xFECA
        }
        found = [
            r
            for r in found
            if (r["t"], int(str(r["id"])) & 0xFF, int(str(r["id"])) >> 8 & 0x3FFFF) not in transfers
        ]
    return found


def check_delivered(
    folder: Path,
    case: str,
    receiver: ReceiverProcess,
    agent_result: subprocess.CompletedProcess[str],
) -> None:
    assert agent_result.returncode == 0, agent_result.stderr
    assert "Traceback" not in agent_result.stderr
    summary = receiver.finish()
    assert "0 rejected" in summary, summary
    received = records(receiver.output)
    expected = decoded(folder, case)
    assert len(received) == len(expected)
    assert received == expected


@pytest.mark.parametrize("case", sorted(CASES))
def test_replay_over_mqtt_arrives_as_decode_gives_it(tmp_path: Path, case: str) -> None:
    with broker(tmp_path) as mqtt:
        receiver = ReceiverProcess(
            tmp_path / "received.jsonl", "--mqtt", mqtt.url, "--idle-exit", "3"
        )
        receiver.wait_ready("subscribed to")
        config = write_config(tmp_path, case, f'[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\n')
        check_delivered(tmp_path, case, receiver, run_agent(config))


def test_replay_over_grpc_arrives_as_decode_gives_it(tmp_path: Path) -> None:
    port = free_port()
    receiver = ReceiverProcess(
        tmp_path / "received.jsonl", "--grpc-listen", f"127.0.0.1:{port}", "--idle-exit", "3"
    )
    receiver.wait_ready("listening for gRPC")
    config = write_config(tmp_path, "rav4", f'[uplink]\nkind = "grpc"\nurl = "127.0.0.1:{port}"\n')
    check_delivered(tmp_path, "rav4", receiver, run_agent(config))


def test_replay_over_mqtt_with_mutual_tls(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    settings = (
        f"allow_anonymous true\ncafile {certs.ca}\ncertfile {certs.server_cert}\n"
        f"keyfile {certs.server_key}\nrequire_certificate true\n"
    )
    with broker(tmp_path, settings) as mqtt:
        url = f"mqtts://127.0.0.1:{mqtt.port}"
        receiver = ReceiverProcess(
            tmp_path / "received.jsonl",
            "--mqtt",
            url,
            "--idle-exit",
            "3",
            "--ca-file",
            certs.ca,
            "--cert-file",
            certs.client_cert,
            "--key-file",
            certs.client_key,
        )
        receiver.wait_ready("subscribed to")
        uplink = (
            f'[uplink]\nkind = "mqtt"\nurl = "{url}"\n[uplink.tls]\nca_file = "{certs.ca}"\n'
            f'cert_file = "{certs.client_cert}"\nkey_file = "{certs.client_key}"\n'
        )
        config = write_config(tmp_path, "tesla", uplink)
        check_delivered(tmp_path, "tesla", receiver, run_agent(config))


def test_replay_into_files_arrives_as_decode_gives_it(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    config = write_config(tmp_path, "truck", f'[uplink]\nkind = "file"\nurl = "{outbox}"\n')
    result = run_agent(config)
    receiver = ReceiverProcess(tmp_path / "received.jsonl", "--dir", outbox, "--idle-exit", "1")
    check_delivered(tmp_path, "truck", receiver, result)


def test_an_unreachable_broker_is_reported_and_nothing_is_claimed_delivered(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        "tesla",
        f'[uplink]\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:{free_port()}"\ndrain_timeout_s = 2\n',
    )
    result = run_agent(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "not acknowledged" in result.stderr
    assert "cannot connect" in result.stderr


def test_a_broker_that_refuses_the_client_is_reported(tmp_path: Path) -> None:
    (tmp_path / "passwords").write_text("")
    with broker(
        tmp_path, f"allow_anonymous false\npassword_file {tmp_path / 'passwords'}\n"
    ) as mqtt:
        config = write_config(
            tmp_path,
            "tesla",
            f'[uplink]\nkind = "mqtt"\nurl = "{mqtt.url}"\ndrain_timeout_s = 2\n',
        )
        result = run_agent(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Not authorized" in result.stderr or "not authorized" in result.stderr.lower()


def test_replay_over_grpc_with_mutual_tls(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    port = free_port()
    receiver = ReceiverProcess(
        tmp_path / "received.jsonl",
        "--grpc-listen",
        f"127.0.0.1:{port}",
        "--idle-exit",
        "3",
        "--ca-file",
        certs.ca,
        "--cert-file",
        certs.server_cert,
        "--key-file",
        certs.server_key,
    )
    receiver.wait_ready("listening for gRPC")
    uplink = (
        f'[uplink]\nkind = "grpc"\nurl = "grpcs://127.0.0.1:{port}"\n[uplink.tls]\n'
        f'ca_file = "{certs.ca}"\ncert_file = "{certs.client_cert}"\n'
        f'key_file = "{certs.client_key}"\n'
    )
    config = write_config(tmp_path, "tesla", uplink)
    check_delivered(tmp_path, "tesla", receiver, run_agent(config))
