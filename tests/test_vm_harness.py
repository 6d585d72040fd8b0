"""The parts of `make vm-test` that run without a VM: the configs the guest writes, the CAN FD
traffic and its DBC, and how the host counts what arrived and what a power cut lost.
The VM itself needs root, qemu and debootstrap, and runs in `make vm-test` alone."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.services import agent_command
from tests.oracle import load_cantools, mismatches, reference
from tests.vm import guest, host


def check_config(folder: Path, text: str) -> subprocess.CompletedProcess[str]:
    """`check-config` of `text` as the guest's agent.toml, beside the guest's DBCs."""
    (folder / "dbc").mkdir()
    for bus, name in guest.DBCS.items():
        shutil.copy(host.DBCS[bus], folder / "dbc" / name)
    (folder / "agent.toml").write_text(text)
    return subprocess.run(
        agent_command("check-config", folder / "agent.toml"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "text",
    [
        guest.config(),
        guest.config(max_age_ms=30000),
        guest.config(max_age_ms=100, fsync="never"),
        guest.config(rules=guest.speed_rule("vm-reload")),
    ],
    ids=["checks", "stop-drain", "power-cut", "reload"],
)
def test_every_config_the_guest_writes_passes_check_config(tmp_path: Path, text: str) -> None:
    checked = check_config(tmp_path, text)
    assert checked.returncode == 0, checked.stderr


def test_the_invalid_config_of_the_reload_check_is_refused(tmp_path: Path) -> None:
    checked = check_config(tmp_path, guest.invalid_config())
    assert checked.returncode == 78
    assert "bogus_key" in checked.stderr


def test_the_can_fd_traffic_decodes_as_cantools_decodes_it(tmp_path: Path) -> None:
    log = tmp_path / "fd.log"
    host.fd_log(log)
    records = host.decode(log)
    lines = log.read_text().splitlines()
    assert len(records) == len(lines) == 2000
    database = load_cantools(host.DBCS["fd0"])
    lengths = set()
    for line, record in zip(lines, records, strict=True):
        frame_id, data = line.split()[2].split("##")
        payload = bytes.fromhex(data[1:])  # after the flags digit (1: BRS)
        lengths.add(len(payload))
        message = database.get_message_by_frame_id(int(frame_id, 16))
        assert record["message"] == message.name
        theirs = reference(message, payload)
        assert theirs is not None
        ours = record["signals"]
        # JSON has no NaN or infinities: the records write them as null.
        for name, value in ours.items():
            if value is None:
                assert not math.isfinite(theirs[name]), line
                ours[name] = theirs[name]
        assert not mismatches(ours, theirs, message), line
    assert lengths == {32, 48, 64}


def test_compare_counts_frames_missing_extra_and_differing(tmp_path: Path) -> None:
    def record(frame_id: int, value: int, t: float) -> dict[str, Any]:
        return {"t": t, "bus": "can0", "id": frame_id, "message": "M", "signals": {"S": value}}

    expected = [record(1, 1, 0.0), record(1, 2, 0.1), record(2, 5, 0.2), record(3, 7, 0.3)]
    # Other times, another order across IDs, one value changed, one frame missing, one extra.
    received = [record(2, 5, 9.0), record(1, 1, 9.1), record(1, 3, 9.2), record(4, 0, 9.3)]
    path = tmp_path / "received.jsonl.gz"
    with gzip.open(path, "wt") as out:
        out.writelines(json.dumps({**r, "vehicle": "V"}) + "\n" for r in received)
    assert host.compare(expected, path) == {
        "frames_expected": 4,
        "frames_received": 4,
        "missing": 1,
        "extra": 1,
        "differing": 1,
        "reordered": 0,
    }
    assert host.compare(expected, tmp_path / "never-written.jsonl.gz")["missing"] == 4
    # All there, but two frames of one ID swapped.
    with gzip.open(path, "wt") as out:
        for r in (expected[1], expected[0], *expected[2:]):
            out.write(json.dumps(r) + "\n")
    assert host.compare(expected, path) == {
        "frames_expected": 4,
        "frames_received": 4,
        "missing": 0,
        "extra": 0,
        "differing": 0,
        "reordered": 1,
    }


def boot_with(tmp_path: Path, phase: str, lines: list[tuple[str, dict[str, Any]]]) -> host.Boot:
    boot = host.Boot(phase, [], tmp_path, tmp_path, tmp_path)
    boot.lines = lines
    boot.cut = any(kind == "CUT" for kind, _ in lines)
    return boot


def test_a_power_cut_counts_the_spooled_batches_that_never_arrived(tmp_path: Path) -> None:
    write = boot_with(
        tmp_path,
        "checks",
        [
            ("SPOOLED", {"mode": "batch", "sequence": 3}),
            ("CUT", {"mode": "batch"}),
            ("SPOOLED", {"mode": "batch", "sequence": 6}),
        ],
    )
    recovered = {"name": "power-cut", "mode": "batch", "recovered": 6, "torn": 1, "corrupt": 0}
    complete = boot_with(
        tmp_path, "recover", [("PART", {**recovered, "received": [1, 2, 3, 4, 5, 6, 7]})]
    )
    assert host.power_cut(write, complete, "batch") == {
        "mode": "batch",
        "spooled_before_cut": 6,
        "lost": 0,
        "arrived": 7,
        "recovered": 6,
        "torn_repaired": 1,
        "corrupt": 0,
        "cut_after_s": None,
    }
    short = boot_with(tmp_path, "recover", [("PART", {**recovered, "received": [1, 2, 5]})])
    assert host.power_cut(write, short, "batch")["lost"] == 3
    assert "error" in host.power_cut(write, None, "batch")
    uncut = boot_with(tmp_path, "checks", [("SPOOLED", {"mode": "batch", "sequence": 3})])
    assert host.power_cut(uncut, complete, "batch") == {"mode": "batch", "error": "no power cut"}
    # A gauge that never moved proves nothing.
    idle = boot_with(
        tmp_path, "checks", [("SPOOLED", {"mode": "batch", "sequence": 0}), ("CUT", {})]
    )
    assert "error" in host.power_cut(idle, complete, "batch")
    failed = boot_with(tmp_path, "checks", [("PART", {"mode": "batch", "error": "canplayer"})])
    assert host.power_cut(failed, complete, "batch") == {"mode": "batch", "error": "canplayer"}


def test_the_image_script_is_valid_sh() -> None:
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    subprocess.run(["sh", "-n", str(host.HERE / "image.sh")], check=True, timeout=30)
