"""The checks of `make vm-test`, run inside the gateway VM by its vm-test unit at boot.

Runs as root under systemd (PID 1) on Debian's kernel with SocketCAN, with the system's
python3 and nothing but its standard library: the agent is what `deploy/install.sh`
installs, the broker is Debian's mosquitto on the VM's loopback. The host's payload folder
is /mnt/payload (read-only: the wheels, the deploy folder, the logs and DBCs, and `phase`,
which says what this boot is for), its out folder /mnt/out (what the host compares).

Each check is a function registered with @check: it returns its figures, or raises Failed;
its result goes to ttyS1 as a line `VMTEST CHECK {json}`, which the host reads. A power
cut spans boots: the first writes `VMTEST SPOOLED mode seq` lines until the host kills
the VM, the next boot's recovery reports what arrived (`VMTEST PART`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAYLOAD = Path("/mnt/payload")
OUT = Path("/mnt/out")
PREFIX = Path("/opt/telemetry-agent")
AGENT = str(PREFIX / "bin/telemetry-agent")
CONF = Path("/etc/telemetry-agent")
UNIT = "telemetry-agent.service"
METRICS = "http://127.0.0.1:9108/metrics"
SPOOL = Path("/var/lib/private/telemetry-agent/spool")
WORK = Path("/var/tmp/vm-test")
# Ignoring the log's times (-t), canplayer sends the whole file at once: its gap (-g) only
# paces its waits for those times and its loops (-l).
FULL_SPEED = ("-t", "-g", "0")
BUSES = {"can0": "vcan0", "can1": "vcan1", "fd0": "vcan2"}
DBCS = {"can0": "toyota_new_mc_pt_generated.dbc", "can1": "toyota_adas.dbc", "fd0": "vm_fd.dbc"}

Figures = dict[str, Any]
CHECKS: list[tuple[str, Callable[[], Figures]]] = []


class Failed(Exception):
    """A check's condition did not hold; its message is the check's detail, and it may carry
    the figures measured before."""

    def __init__(self, detail: str, **figures: Any) -> None:
        super().__init__(detail)
        self.figures = figures


def check(name: str) -> Callable[[Callable[[], Figures]], Callable[[], Figures]]:
    def register(function: Callable[[], Figures]) -> Callable[[], Figures]:
        CHECKS.append((name, function))
        return function

    return register


def emit(kind: str, payload: object) -> None:
    print(f"VMTEST {kind} {json.dumps(payload)}", flush=True)


def run(
    *command: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def must(*command: str, timeout: float = 300) -> str:
    done = run(*command, timeout=timeout)
    if done.returncode != 0:
        raise Failed(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


def wait_for(what: str, condition: Callable[[], bool], timeout: float, every: float = 0.2) -> float:
    """Seconds until `condition` held; Failed after `timeout`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise Failed(f"{what}: not after {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - start


# -- the agent and what it says --


def config(max_age_ms: int = 1000, fsync: str = "batch", rules: str = "") -> str:
    buses = "".join(
        f'[[bus]]\nname = "{bus}"\nsource = "socketcan"\nchannel = "{interface}"\n'
        f'dbc = ["dbc/{DBCS[bus]}"]\n\n'
        for bus, interface in BUSES.items()
    )
    return (
        'vehicle_id = "VMTEST"\nstate_dir = "/var/lib/telemetry-agent"\nlog_level = "info"\n\n'
        f"{buses}"
        f'[batch]\nmax_age_ms = {max_age_ms}\nmax_bytes = 120000\ncompression = "zstd"\n\n'
        '[uplink]\nkind = "mqtt"\nurl = "mqtt://127.0.0.1:1883"\n\n'
        f'[spool]\nfsync = "{fsync}"\n\n[metrics]\nlisten = "127.0.0.1:9108"\n{rules}'
    )


def write_config(text: str) -> None:
    (CONF / "agent.toml").write_text(text)


def show(*properties: str) -> dict[str, str]:
    out = must("systemctl", "show", UNIT, *(f"-p{p}" for p in properties))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def main_pid() -> int:
    return int(show("MainPID")["MainPID"])


def active() -> bool:
    return run("systemctl", "is-active", "--quiet", UNIT).returncode == 0


def metrics() -> dict[str, float]:
    """Every sample by its name and labels, as Prometheus writes them; Failed when the agent
    does not answer (a dead agent must not read as an empty spool)."""
    try:
        with urllib.request.urlopen(METRICS, timeout=5) as response:
            text = response.read().decode()
    except OSError as error:
        raise Failed(f"no metrics at {METRICS}: {error}") from None
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key.removeprefix("telemetry_agent_")] = float(value)
    return samples


def metric(name: str, **labels: str) -> float:
    key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return metrics().get(key, 0.0)


def received(buses: tuple[str, ...] = ("can0", "can1")) -> float:
    samples = metrics()
    return sum(samples.get(f'frames_received_total{{bus="{bus}"}}', 0.0) for bus in buses)


def dropped() -> float:
    return sum(metric("frames_dropped_total", bus=bus) for bus in BUSES)


def agent_counts() -> dict[str, float]:
    """The counts that show where frames stopped on their way to a rule, for a failure's
    detail."""
    wanted = ("frames_", "collect_", "batches_built", "spool_batches", "signals_decoded")
    return {k: v for k, v in metrics().items() if k.startswith(wanted) and "_created" not in k}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_agent() -> float:
    started = time.monotonic()
    must("systemctl", "start", UNIT, timeout=120)
    return time.monotonic() - started


def journal(lines: int = 40) -> str:
    return run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "-n", str(lines)).stdout


def journal_has(text: str, since: str) -> bool:
    out = run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "--since", since).stdout
    return text in out


def now_for_journal() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class Receiver:
    """`telemetry-agent receive` from the VM's mosquitto: records and the batch ledger."""

    def __init__(self, name: str) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        self.records = WORK / f"{name}.jsonl"
        self.batches = WORK / f"{name}.batches"
        self.log = WORK / f"{name}.log"
        self.name = name
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [AGENT, "receive", "--mqtt", "mqtt://127.0.0.1:1883", "--output", str(self.records),
                 "--batches", str(self.batches)],
                stderr=log,
            )  # fmt: skip
        # Batches published before it subscribed would pass it by.
        wait_for("the receiver subscribed", lambda: "subscribed to" in self.log.read_text(), 120)

    def taken(self) -> list[dict[str, Any]]:
        if not self.batches.exists():
            return []
        return [json.loads(line) for line in self.batches.read_text().splitlines() if line]

    def settle(self, timeout: float = 180) -> None:
        """Until the spool is empty and for three seconds no batch came and no record was
        written: the receiver writes batches in groups and notes them once a group is
        written, which under emulation can take seconds while its records grow."""
        wait_for("the spool emptied", lambda: metric("spool_batches") == 0, timeout)
        if not active():
            raise Failed("the agent is not running")
        last: tuple[tuple[int, int], float] = ((-1, -1), time.monotonic())

        def quiet() -> bool:
            nonlocal last
            size = self.records.stat().st_size if self.records.exists() else 0
            progress = (len(self.taken()), size)
            if progress != last[0]:
                last = (progress, time.monotonic())
            return time.monotonic() - last[1] >= 3

        wait_for("the receiver caught up", quiet, timeout)

    def stop(self) -> list[dict[str, Any]]:
        """Stops it and copies its records, compressed, to the out folder for the host."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.records.touch()
        with (
            self.records.open("rb") as src,
            gzip.open(OUT / f"{self.name}.jsonl.gz", "wb", 1) as dst,
        ):
            shutil.copyfileobj(src, dst)
        return self.taken()


def canplayer(log: str, *options: str, timeout: float = 300) -> float:
    """Plays a payload log onto the vcans by its bus names; the seconds it took. In real time
    (the kernel stamps frames as they arrive, and a sample rule sends a period's value only
    once the bus's time has passed the period's end), or with FULL_SPEED as fast as it can."""
    started = time.monotonic()
    mapping = [f"{interface}={bus}" for bus, interface in BUSES.items()]
    must("canplayer", *options, "-I", str(PAYLOAD / log), *mapping, timeout=timeout)
    return time.monotonic() - started


# -- the checks, in the order they run --


@check("install")
def install() -> Figures:
    wheel = next(PAYLOAD.glob("wheels/vehicle_telemetry_agent-*.whl"))
    script = str(PAYLOAD / "src/deploy/install.sh")
    args = ("sh", script, "--wheelhouse", str(PAYLOAD / "wheels"), "--wheel", str(wheel))
    started = time.monotonic()
    must(*args, "--vehicle-id", "VMTEST", timeout=900)
    first = time.monotonic() - started
    for name in DBCS.values():
        shutil.copy(PAYLOAD / "dbc" / name, CONF / "dbc" / name)
    write_config(config())
    before = (CONF / "agent.toml").read_bytes()
    started = time.monotonic()
    upgrade = must(*args, timeout=900)
    second = time.monotonic() - started
    if (CONF / "agent.toml").read_bytes() != before:
        raise Failed("the upgrade changed agent.toml")
    if not (CONF / "agent.toml.example").exists() or "kept" not in upgrade:
        raise Failed(f"the upgrade did not keep agent.toml aside its example: {upgrade}")
    must(AGENT, "check-config", str(CONF / "agent.toml"))
    verify = run("systemd-analyze", "verify", UNIT)
    if verify.returncode != 0 or verify.stderr.strip() or verify.stdout.strip():
        raise Failed(f"systemd-analyze verify: {(verify.stderr + verify.stdout).strip()}")
    rmem = int(Path("/proc/sys/net/core/rmem_max").read_text())
    if rmem < 8388608:
        raise Failed(f"net.core.rmem_max is {rmem}: the sysctl file was not applied")
    return {
        "detail": "installed, upgraded keeping agent.toml; check-config and verify clean",
        "install_s": round(first, 1),
        "upgrade_s": round(second, 1),
    }


@check("ready")
def ready() -> Figures:
    for interface in BUSES.values():
        must("ip", "link", "add", "dev", interface, "type", "vcan")
        must("ip", "link", "set", interface, "mtu", "72", "up")
    seconds = start_agent()
    state = show("ActiveState", "SubState", "Type", "StatusText")
    if state["ActiveState"] != "active" or state["Type"] != "notify":
        raise Failed(f"after start: {state}")
    metrics()
    return {"detail": f"active via READY=1: {state['StatusText']}", "ready_s": round(seconds, 1)}


@check("security")
def security() -> Figures:
    out = must("systemd-analyze", "security", "--no-pager", UNIT)
    last = out.strip().splitlines()[-1]  # → Overall exposure level for ...: 1.5 OK 🙂
    exposure = float(last.split(":")[1].split()[0])
    if exposure > 2.0:
        raise Failed(f"exposure {exposure} over 2.0: {last}")
    return {"detail": last.strip("→ ").strip(), "exposure": exposure}


@check("socketcan-replay")
def socketcan_replay() -> Figures:
    receiver = Receiver("replay")
    pid = main_pid()
    frames0, cpu0, dropped0 = received(), cpu_seconds(pid), dropped()
    played = canplayer("rav4.log", timeout=600)
    receiver.settle()
    if main_pid() != pid:
        raise Failed("the agent restarted during the replay")
    frames, cpu = received() - frames0, cpu_seconds(pid) - cpu0
    taken = receiver.stop()
    figures = {
        "detail": "compared on the host",
        "played_s": round(played, 1),
        "frames_read": int(frames),
        "batches": len(taken),
        "kernel_drops": int(dropped() - dropped0),
        "agent_cpu_s": round(cpu, 2),
        "agent_cpu_us_per_frame": round(cpu / max(frames, 1) * 1e6, 1),
    }
    return {**figures, **reader_benchmark(figures)}


def reader_benchmark(replay: Figures) -> Figures:
    """bench/socketcan.py on a vcan of its own: the reader alone on real AF_CAN, beside the
    socketpair that `make bench` uses and python-can's path, all in this VM."""
    must("ip", "link", "add", "dev", "vcan9", "type", "vcan")
    must("ip", "link", "set", "vcan9", "mtu", "72", "up")
    bench = run(
        str(PREFIX / "bin/python"), "-m", "bench.socketcan", "--interface", "vcan9",
        "--frames", "5000", timeout=900, cwd=PAYLOAD,
    )  # fmt: skip
    if bench.returncode != 0:
        raise Failed(f"bench.socketcan: {bench.stderr.strip()[-600:]}", **replay)
    emit("TABLE", {"name": "socketcan-reader", "text": bench.stdout})
    figures = {}
    for line in bench.stdout.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        kind, traffic = cells[0].split()[0], cells[1]
        figures[f"reader_us_per_frame_{kind}_{traffic}"] = float(cells[3])
        figures[f"reader_socketpair_us_per_frame_{kind}_{traffic}"] = float(cells[4])
        figures[f"python_can_us_per_frame_{kind}_{traffic}"] = float(cells[5])
    return figures


@check("can-fd")
def can_fd() -> Figures:
    receiver = Receiver("fd")
    frames0 = received(("fd0",))
    canplayer("fd.log")
    receiver.settle()
    taken = receiver.stop()
    return {
        "detail": "compared on the host",
        "frames_read": int(received(("fd0",)) - frames0),
        "batches": len(taken),
    }


def speed_rule(name: str) -> str:
    return (
        f'\n[[collect]]\nname = "{name}"\nmode = "sample"\nsignals = ["SPEED.SPEED"]\n'
        'period_ms = 100\nreduce = "last"\n'
    )


def invalid_config() -> str:
    """A key no agent knows, and a rule that must never run."""
    return "bogus_key = 1\n" + config(rules=speed_rule("vm-invalid"))


@check("reload")
def reload() -> Figures:
    pid = main_pid()
    write_config(config(rules=speed_rule("vm-reload")))
    since = now_for_journal()
    started = time.monotonic()
    must("systemctl", "reload", UNIT, timeout=120)
    wait_for("the agent's 'reloaded' line", lambda: journal_has("reloaded ", since), 60)
    applied = time.monotonic() - started
    before = agent_counts()
    canplayer("slice.log")
    try:
        wait_for(
            "the new rule keeps values",
            lambda: metric("collect_values_total", rule="vm-reload") > 0,
            30,
        )
    except Failed as error:
        raise Failed(f"{error}; before the slice {before}, after {agent_counts()}") from None
    # An invalid file (with another rule, which must not run): systemctl reload fails and
    # the agent is not even told.
    write_config(invalid_config())
    refused = run("systemctl", "reload", UNIT, timeout=120)
    if refused.returncode == 0:
        raise Failed("systemctl reload accepted an invalid config")
    # SIGHUP sent past systemctl: the agent refuses the file itself.
    since = now_for_journal()
    must("systemctl", "kill", "--kill-whom=main", "--signal=HUP", UNIT)
    wait_for("the agent's 'reload refused' line", lambda: journal_has("reload refused", since), 60)
    kept = metric("collect_values_total", rule="vm-reload")
    canplayer("slice.log")
    wait_for(
        "the old rule still runs",
        lambda: metric("collect_values_total", rule="vm-reload") > kept,
        30,
    )
    if metric("collect_values_total", rule="vm-invalid"):
        raise Failed("the invalid file's rule runs")
    if main_pid() != pid or not active():
        raise Failed("the agent restarted or stopped")
    write_config(config())
    must("systemctl", "reload", UNIT, timeout=120)
    return {
        "detail": "a new rule applied; an invalid file refused by systemctl reload and by "
        "the agent on SIGHUP, the old rule kept",
        "reload_s": round(applied, 1),
    }


DROPINS = Path(f"/run/systemd/system/{UNIT}.d")
WATCHDOG_S = 10  # the drop-in's, instead of the unit's 30
ABORT_S = 2


@check("watchdog")
def watchdog() -> Figures:
    DROPINS.mkdir(parents=True, exist_ok=True)
    (DROPINS / "vm-test-watchdog.conf").write_text(
        f"[Service]\nWatchdogSec={WATCHDOG_S}s\nTimeoutAbortSec={ABORT_S}s\n"
    )
    must("systemctl", "daemon-reload")
    must("systemctl", "restart", UNIT, timeout=120)
    restarts, pid = int(show("NRestarts")["NRestarts"]), main_pid()
    os.kill(pid, signal.SIGSTOP)
    killed = wait_for("the watchdog killed the agent", lambda: main_pid() != pid, 60)
    back = wait_for("the agent is back", lambda: active() and main_pid() not in (0, pid), 90)
    shutil.rmtree(DROPINS)
    must("systemctl", "daemon-reload")
    after = int(show("NRestarts")["NRestarts"])
    # WatchdogSec, then TimeoutAbortSec for SIGABRT to turn SIGKILL; a few seconds of slack
    # for systemd's timer and this loop on an emulated CPU.
    if killed > WATCHDOG_S + ABORT_S + 5:
        raise Failed(f"killed {killed:.1f} s after the agent stopped, WatchdogSec={WATCHDOG_S}")
    if after != restarts + 1:
        raise Failed(f"NRestarts went from {restarts} to {after}")
    if "watchdog timeout" not in run("journalctl", "-u", UNIT, "--no-pager").stdout.lower():
        raise Failed("no watchdog timeout in the journal")
    must("systemctl", "restart", UNIT, timeout=120)
    return {
        "detail": f"killed by the watchdog, NRestarts {restarts} -> {after}",
        "killed_after_s": round(killed, 1),
        "active_again_after_s": round(killed + back, 1),
    }


def sender(interface: str, stop: threading.Event) -> None:
    """SPEED frames (0xB4) onto `interface` until stopped, through its ups and downs."""
    with socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW) as sock:
        sock.bind((interface,))
        frame = struct.pack("=IB3x8s", 0xB4, 8, bytes(8))
        while not stop.is_set():
            with contextlib.suppress(OSError):  # down: ENETDOWN; full: ENOBUFS
                sock.send(frame)
            time.sleep(0.005)


@check("bus-down")
def bus_down() -> Figures:
    pid = main_pid()
    outages = metric("bus_outages_total", bus="can0")
    stop = threading.Event()
    thread = threading.Thread(target=sender, args=("vcan0", stop))
    thread.start()
    try:
        start = received(("can0",))
        wait_for("frames arrive", lambda: received(("can0",)) > start + 50, 30)
        must("ip", "link", "set", "vcan0", "down")
        counted = wait_for(
            "an outage counted", lambda: metric("bus_outages_total", bus="can0") > outages, 30
        )
        time.sleep(2)
        must("ip", "link", "set", "vcan0", "up")
        up = received(("can0",))
        resumed = wait_for("frames arrive again", lambda: received(("can0",)) > up + 50, 30)
    finally:
        stop.set()
        thread.join()
    if main_pid() != pid or not active():
        raise Failed("the agent restarted or stopped")
    return {
        "detail": "down counted as an outage, frames again after up, same process",
        "outages": int(metric("bus_outages_total", bus="can0") - outages),
        "outage_counted_after_s": round(counted, 1),
        "resumed_after_s": round(resumed, 1),
    }


#: The [[diagnostics]] table of the diagnostics check: tests/vm/kernel_ecu.py answers it.
DIAGNOSTICS = (
    '\n[[diagnostics]]\nbus = "can0"\nvin = true\ndtcs = ["stored"]\ntimeout_s = 2.0\n'
    "poll = [{ pids = [0x0C, 0x0D, 0x05], interval_s = 0.5 }]\n"
)
#: Hearing what a tester asks: the agent asks nothing, its raw socket's filter lets the
#: conversation through.
HEARING = '\n[[diagnostics]]\nbus = "can0"\nlisten = true\necus = [0x7E8]\n'
#: What the tester asks: PIDs, the VIN (a multi-frame answer) and the stored DTCs.
TESTER_REQUESTS = (bytes([0x01, 0x0C, 0x0D, 0x05]), bytes([0x09, 0x02]), bytes([0x03]))
ECU = 0x7E8
#: kernel_ecu.py's data bytes by the J1979 formulas: 0x1AF8 / 4 rpm, 88 km/h, 132 - 40 degC.
EXPECTED_PIDS = {
    "EngineSpeed": {"ECU": ECU, "EngineSpeed": 1726.0},
    "VehicleSpeed": {"ECU": ECU, "VehicleSpeed": 88.0},
    "CoolantTemperature": {"ECU": ECU, "CoolantTemperature": 92.0},
}
EXPECTED_VIN = "VMTESTISOTPKERNEL"
EXPECTED_DTCS = {(0, 0x0301, "P0301"), (1, 0x0123, "C0123")}
ISOTP_REFS = Path("/sys/module/can_isotp/refcnt")


def answer_records(path: Path) -> list[dict[str, Any]]:
    """The diagnostics records the receiver has written so far (whole lines only)."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()
    return [r for r in map(json.loads, lines) if r.get("bus") == "can0.diagnostics"]


def all_answers(records: list[dict[str, Any]]) -> bool:
    messages = {r["message"] for r in records}
    dtcs = {
        (r["signals"]["System"], r["signals"]["Code"], r["signals"]["DTC"])
        for r in records
        if r["message"] == "StoredDTC"
    }
    return {*EXPECTED_PIDS, "VehicleIdentificationNumber"} <= messages and dtcs >= EXPECTED_DTCS


def answers_at(
    receiver: Receiver, timeout: float, context: Callable[[], str]
) -> tuple[list[dict[str, Any]], float]:
    """The answer records once every one expected reached the receiver, and the seconds that
    took; Failed naming those seen, and `context()`, when they did not."""
    records: list[dict[str, Any]] = []

    def arrived() -> bool:
        nonlocal records
        records = answer_records(receiver.records)
        return all_answers(records)

    try:
        took = wait_for("every answer at the receiver", arrived, timeout)
    except Failed as error:
        seen = sorted({r["message"] for r in records})
        raise Failed(f"{error}: only {seen}; {context()}") from None
    return records, took


def tester_asks(interface: str) -> int:
    """A scan tool's requests to the ECU over a kernel ISO-TP socket of its own; how many
    it got answers to."""
    answered = 0
    with socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_ISOTP) as sock:
        sock.bind((interface, ECU, ECU - 8))
        sock.settimeout(5)
        for request in TESTER_REQUESTS:
            sock.send(request)
            with contextlib.suppress(TimeoutError):
                answered += bool(sock.recv(4096))
    return answered


def hearing(interface: str) -> Figures:
    """The agent, told to listen, hears the ECU answer a tester: the same records, no
    request of its own."""
    write_config(config(rules=HEARING))
    must("systemctl", "restart", UNIT, timeout=120)
    # What the asking agent left in its spool goes first, to the receiver before this one.
    wait_for("the spool emptied", lambda: metric("spool_batches") == 0, 60)
    receiver = Receiver("hearing")
    try:
        answered = tester_asks(interface)
        records, _ = answers_at(
            receiver,
            60,
            lambda: (
                f"{answered} answered; "
                f"{ {k: v for k, v in metrics().items() if 'isotp' in k or 'heard' in k} }"
            ),
        )
        asked = metric("diagnostics_requests_total", bus="can0")
        if asked:
            raise Failed(f"a listening agent sent {asked:.0f} requests")
        return {
            "heard_records": len(records),
            "heard_answers": int(metric("diagnostics_answers_heard_total", bus="can0")),
        }
    finally:
        receiver.stop()


@check("diagnostics")
def diagnostics() -> Figures:
    """The agent asks a simulated ECU over the kernel's ISO-TP on vcan0: PIDs, VIN, DTCs;
    then, told to listen, hears the same answers to a tester's requests."""
    must("modprobe", "can-isotp")
    module = must("modinfo", "-n", "can-isotp").strip()
    ecu_log = WORK / "ecu.log"
    WORK.mkdir(parents=True, exist_ok=True)
    frames_log = WORK / "isotp.candump"
    with ecu_log.open("w") as out, frames_log.open("w") as frames:
        ecu = subprocess.Popen(
            [str(PREFIX / "bin/python"), "-m", "tests.vm.kernel_ecu", BUSES["can0"]],
            cwd=PAYLOAD, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # The ISO-TP frames on the wire (requests, answers, flow control), for a failure.
        candump = subprocess.Popen(
            ["candump", "-L", f"{BUSES['can0']},7C0:7C0"], stdout=frames, stderr=subprocess.STDOUT
        )
    receiver: Receiver | None = None
    try:
        wait_for(
            "the ECU's ISO-TP socket bound",
            lambda: "ready" in ecu_log.read_text() or ecu.poll() is not None,
            120,
        )
        if ecu.poll() is not None:
            raise Failed(f"the ECU ended: {ecu_log.read_text()[-600:]}")
        refs_ecu = int(ISOTP_REFS.read_text())
        receiver = Receiver("diagnostics")
        write_config(config(rules=DIAGNOSTICS))
        since = now_for_journal()
        must("systemctl", "restart", UNIT, timeout=120)
        started = time.monotonic()
        wait_for(
            "the agent's 'asking ECUs' line",
            lambda: journal_has("bus can0: asking ECUs", since),
            60,
        )
        asking = next(
            line
            for line in run(
                "journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "--since", since
            ).stdout.splitlines()
            if "bus can0: asking ECUs" in line
        )
        if "over kernel ISO-TP" not in asking:
            raise Failed(f"not the kernel's ISO-TP: {asking}")
        # Each CAN_ISOTP socket holds a reference to the module: the agent's for ECU 0x7E8.
        refs_agent = int(ISOTP_REFS.read_text()) - refs_ecu
        records, answered = answers_at(
            receiver,
            120,
            lambda: (
                f"{ {k: v for k, v in metrics().items() if 'diagnostics' in k} }; "
                f"the ECU's last: {ecu_log.read_text()[-300:]!r}; "
                f"frames: {frames_log.read_text()[-600:]!r}"
            ),
        )
        wrong = [
            r
            for r in records
            if r["message"] in EXPECTED_PIDS and r["signals"] != EXPECTED_PIDS[r["message"]]
        ]
        vins = {
            r["signals"]["VIN"] for r in records if r["message"] == "VehicleIdentificationNumber"
        }
        if wrong or vins != {EXPECTED_VIN}:
            raise Failed(f"decoded wrongly: {wrong[:3]}, VINs {sorted(vins)}")
        samples = metrics()

        def count(name: str) -> int:
            return int(samples.get(f'diagnostics_{name}_total{{bus="can0"}}', 0))

        decoded = int(samples.get('frames_decoded_total{bus="can0.diagnostics"}', 0))
        if count("answers") < 4 or decoded < len(records):
            raise Failed(f"metrics: {count('answers')} answers, {decoded} answer frames decoded")
        if main_pid() == 0 or not active():
            raise Failed("the agent stopped")
        figures: Figures = {
            "detail": f"{asking.split(': ', 1)[1]}; {len(records)} answer records decoded "
            f"(PIDs, VIN {EXPECTED_VIN}, DTCs P0301 C0123) {answered:.1f} s after the start; "
            f"{module}",
            "answers_after_start_s": round(time.monotonic() - started, 1),
            "records": len(records),
            "requests": count("requests"),
            "answers": count("answers"),
            "negative": count("negative_answers"),
            "timeouts": count("timeouts"),
            "unexpected": count("unexpected_answers"),
            "answer_frames_decoded": decoded,
            "isotp_sockets_of_the_agent": refs_agent,
            "ecu_requests_answered": sum(
                1 for line in ecu_log.read_text().splitlines() if " " in line
            ),
        }
        figures |= hearing(BUSES["can0"])
        figures["detail"] += f"; told to listen, {figures['heard_records']} records heard"
    finally:
        for process in (ecu, candump):
            process.kill()
            process.wait(30)
        if receiver is not None:
            receiver.stop()
    write_config(config())
    must("systemctl", "restart", UNIT, timeout=120)
    return figures


@check("stop-drain")
def stop_drain() -> Figures:
    # Batches that stay open for 30 s: the stop must close them.
    write_config(config(max_age_ms=30000))
    must("systemctl", "restart", UNIT, timeout=120)
    must("systemctl", "stop", "mosquitto")
    start = received()
    expected = json.loads((PAYLOAD / "meta.json").read_text())["slice_frames_known"]
    canplayer("slice.log", *FULL_SPEED)
    wait_for("the slice read", lambda: received() - start >= expected, 30)
    closed = metric("spool_batches")  # by max_bytes; the broker is away
    started = time.monotonic()
    must("systemctl", "stop", UNIT, timeout=120)
    stopping = time.monotonic() - started
    result = show("Result")["Result"]
    if result != "success":
        raise Failed(f"stop ended with Result={result}")
    spooled = sum(path.stat().st_size for path in SPOOL.glob("*.seg"))
    must("systemctl", "start", "mosquitto")
    write_config(config())
    receiver = Receiver("drain")
    start_agent()
    recovered = metric("spool_recovered_batches_total")
    receiver.settle()
    taken = receiver.stop()
    if recovered <= closed:
        raise Failed(f"{recovered} batches recovered, {closed} were closed before the stop")
    return {
        "detail": "compared on the host",
        "stop_s": round(stopping, 1),
        "batches_closed_by_stop": int(recovered - closed),
        "spool_bytes_at_stop": spooled,
        "recovered_batches": int(recovered),
        "batches": len(taken),
    }


# -- the power cut, over three boots --


def power_cut_write(mode: str) -> None:
    """A fresh spool, the broker away, the log at full speed: lines of what the agent
    says is spooled, until the host pulls the plug."""
    run("systemctl", "stop", UNIT, timeout=120)
    must("systemctl", "stop", "mosquitto")
    shutil.rmtree(SPOOL, ignore_errors=True)
    write_config(config(max_age_ms=100, fsync=mode))
    os.sync()
    start_agent()
    player = subprocess.Popen(
        ["canplayer", *FULL_SPEED, "-l", "i", "-I", str(PAYLOAD / "rav4.log")]
        + [f"{interface}={bus}" for bus, interface in BUSES.items()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    cut = False
    while time.monotonic() - started < 120:
        if player.poll() is not None:
            raise Failed(f"canplayer ended with {player.returncode}")
        sequence = int(metric("spool_last_sequence"))
        emit("SPOOLED", {"mode": mode, "sequence": sequence})
        if not cut and time.monotonic() - started > 10 and sequence > 0:
            emit("CUT", {"mode": mode})
            cut = True
        time.sleep(0.2)
    player.kill()
    raise Failed("the host did not cut the power")


def power_cut_recover(mode: str) -> None:
    for interface in BUSES.values():
        run("ip", "link", "add", "dev", interface, "type", "vcan")
        run("ip", "link", "set", interface, "mtu", "72", "up")
    receiver = Receiver(f"cut-{mode}")
    start_agent()
    samples = metrics()
    receiver.settle()
    taken = receiver.stop()
    emit(
        "PART",
        {
            "name": "power-cut",
            "mode": mode,
            "received": sorted({int(b["sequence"]) for b in taken}),
            "recovered": int(samples.get("spool_recovered_batches_total", 0)),
            "torn": int(samples.get('spool_damaged_records_total{kind="torn"}', 0)),
            "corrupt": int(samples.get('spool_damaged_records_total{kind="corrupt"}', 0)),
        },
    )


def restore() -> None:
    """After a failed check, what the next one starts from: the agent running the checks'
    config, the buses up, the broker running, no drop-in."""
    shutil.rmtree(DROPINS, ignore_errors=True)
    run("systemctl", "daemon-reload")
    with contextlib.suppress(OSError, ValueError):
        os.kill(main_pid(), signal.SIGCONT)
    for interface in BUSES.values():
        run("ip", "link", "set", interface, "up")
    write_config(config())
    run("systemctl", "start", "mosquitto")
    run("systemctl", "restart", UNIT, timeout=120)


def power_cut(mode: str, step: Callable[[str], None]) -> None:
    """A step of the power cut; its failure is the power-cut check's, reported as such."""
    try:
        step(mode)
    except Exception as error:
        emit("PART", {"name": "power-cut", "mode": mode, "error": repr(error)})
        with contextlib.suppress(Exception):
            emit("JOURNAL", journal())


def main() -> int:
    phase = (PAYLOAD / "phase").read_text().strip()
    state = run("systemctl", "is-system-running", "--wait").stdout.strip()
    emit("BEGIN", {"phase": phase, "kernel": os.uname().release, "system": state})
    if phase == "checks":
        must("modprobe", "vcan")
        for name, function in CHECKS:
            started = time.monotonic()
            try:
                figures = {"ok": True, **function()}
            except Failed as error:
                figures = {**error.figures, "ok": False, "detail": str(error)}
            except Exception:
                figures = {"ok": False, "detail": traceback.format_exc()}
            emit(
                "CHECK", {"name": name, **figures, "seconds": round(time.monotonic() - started, 1)}
            )
            if not figures["ok"]:
                emit("JOURNAL", journal())
                restore()
        power_cut("batch", power_cut_write)
    elif phase == "recover-batch":
        power_cut("batch", power_cut_recover)
        power_cut("never", power_cut_write)
    elif phase == "recover-never":
        power_cut("never", power_cut_recover)
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
