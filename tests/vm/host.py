"""`make vm-test`: the agent on a real gateway, a Debian VM with systemd and SocketCAN.

The host's side: it installs its tools where missing (qemu, debootstrap), builds or reuses
the image (`image.sh`), builds the wheels that the guest installs with `deploy/install.sh`,
lays out the payload (the logs and DBCs the checks play, and `guest.py`, which runs them),
boots the VM up to three times on one copy-on-write disk (the checks, then the recovery
after each of two power cuts, with fsync "batch" and "never"), compares what arrived in the
VM with `telemetry-agent decode` of the same logs, and writes build/vm-test/report.json.
Exit status 1 when a check failed or never ran; 2 when the VM could not run at all.

Settings (environment): VM_CACHE (default ~/.cache/telemetry-agent-vm: the image and the
wheels of the dependencies), VM_ACCEL (auto | kvm | tcg), VM_MIRROR (a Debian mirror).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.common import table
from harness.data import RAV4_ADAS_DBC, RAV4_LOG, RAV4_PT_DBC
from harness.services import agent_command

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD = REPO / "build" / "vm-test"
CACHE = Path(os.environ.get("VM_CACHE", Path.home() / ".cache" / "telemetry-agent-vm"))
CHECKS = (
    "install",
    "ready",
    "security",
    "socketcan-replay",
    "can-fd",
    "reload",
    "watchdog",
    "bus-down",
    "diagnostics",
    "stop-drain",
    "power-cut",
)
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
}
#: The logs' buses and the DBC of each; the guest's config has the same.
DBCS = {"can0": RAV4_PT_DBC, "can1": RAV4_ADAS_DBC, "fd0": HERE / "vm_fd.dbc"}
SLICE_S = 2.0  # of the RAV4 log, played by the reload and stop-drain checks
BOOT_TIMEOUT_S = 1500
CUT_AFTER_S = (1.0, 3.0)  # the power goes this long after the guest says CUT


class Unusable(Exception):
    """The VM cannot run here: make vm-test fails loudly, without a report of checks."""


def say(text: str) -> None:
    print(f"vm-test: {text}", file=sys.stderr, flush=True)


def host_tools() -> None:
    if os.geteuid() != 0:
        raise Unusable("needs root (debootstrap, chroot, mkfs.ext4 -d of a root tree)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)})
    if missing:
        say(f"installing {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        ):
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def image() -> tuple[Path, float | None]:
    """The image's folder, and the seconds it took to build (None: it was cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cached = {p.name for p in CACHE.glob("image-*")}
    out = subprocess.run(
        ["sh", str(HERE / "image.sh"), str(CACHE)], check=True, stdout=subprocess.PIPE, text=True
    )
    folder = Path(out.stdout.strip().splitlines()[-1])
    for old in [*CACHE.glob("image-*"), *CACHE.glob("build.*")]:
        if old != folder:
            shutil.rmtree(old)  # of an earlier image.sh, or of a build that was killed
    built = None if folder.name in cached else time.monotonic() - started
    return folder, built


def wheels(into: Path) -> None:
    """The project's wheel, built now, and its dependencies' (kept in the cache, keyed by
    pyproject.toml): what install.sh takes offline in the guest."""
    deps = (
        CACHE / f"wheels-{hashlib.sha256((REPO / 'pyproject.toml').read_bytes()).hexdigest()[:16]}"
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet"]
    into.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as source:
        # A copy, so that the build leaves nothing in the checkout.
        shutil.copytree(
            REPO,
            source,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "build", "state", "*.egg-info", "__pycache__", ".*_cache"
            ),
        )
        if not deps.is_dir():
            for old in CACHE.glob("wheels-*"):
                shutil.rmtree(old)
            partial = Path(tempfile.mkdtemp(dir=CACHE))
            subprocess.run([*pip, "--wheel-dir", str(partial), source], check=True)
            partial.rename(deps)
        subprocess.run([*pip, "--no-deps", "--wheel-dir", str(into), source], check=True)
    for wheel in deps.glob("*.whl"):
        if not wheel.name.startswith("vehicle_telemetry_agent-"):
            shutil.copy(wheel, into)


def fd_log(path: Path, frames: int = 2000) -> None:
    """CAN FD traffic for vm_fd.dbc: 64- and 48-byte frames with BRS, every 8th of the
    64-byte ones cut to 32 bytes (its signals past byte 32 are missing, not zero)."""
    rng = random.Random(15)
    lines = []
    for n in range(frames):
        t = 1700000000.0 + n * 0.001
        if n % 2:
            length = 32 if n % 16 == 1 else 64
            frame = f"100##1{rng.randbytes(length).hex().upper()}"
        else:
            payload = bytes([n % 4 // 2]) + rng.randbytes(47)  # mode 0 or 1
            frame = f"18FF0010##1{payload.hex().upper()}"
        lines.append(f"({t:.6f}) fd0 {frame}\n")
    path.write_text("".join(lines))


def payload(folder: Path) -> dict[str, Any]:
    """What the guest needs, and the logs the host decodes to compare; returns meta.json."""
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "dbc").mkdir(parents=True)
    for name in ("deploy", "dbc"):
        shutil.copytree(REPO / name, folder / "src" / name)
    # The reader's benchmark runs in the guest too, on a real CAN_RAW socket; bench.common
    # names the logs through harness.data, which finds none of them there and unpacks nothing.
    for package in ("bench", "harness"):
        shutil.copytree(
            REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (folder / "tests" / "vm").mkdir(parents=True)
    # The simulated ECU of the diagnostics check: tests/ecu.py's answers over kernel ISO-TP.
    for module in ("__init__.py", "ecu.py", "vm/__init__.py", "vm/kernel_ecu.py"):
        shutil.copy(REPO / "tests" / module, folder / "tests" / module)
    for dbc in DBCS.values():
        shutil.copy(dbc, folder / "dbc" / dbc.name)
    shutil.copy(HERE / "guest.py", folder)
    wheels(folder / "wheels")
    # The RAV4 log's two buses that have DBCs (can128 and can129 echo them).
    lines = [
        line
        for line in RAV4_LOG.read_text().splitlines(keepends=True)
        if line.split(" ", 2)[1:2] in (["can0"], ["can1"])
    ]
    (folder / "rav4.log").write_text("".join(lines))
    first = float(lines[0][1 : lines[0].index(")")])
    (folder / "slice.log").write_text(
        "".join(line for line in lines if float(line[1 : line.index(")")]) < first + SLICE_S)
    )
    fd_log(folder / "fd.log")
    meta = {
        "rav4_frames": len(lines),
        "slice_frames_known": len(decode(folder / "slice.log")),
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def decode(log: Path) -> list[dict[str, Any]]:
    """`telemetry-agent decode` of a payload log, with each bus's DBC."""
    dbcs = [f"--dbc={bus}={path}" for bus, path in DBCS.items()]
    out = subprocess.run(
        agent_command("decode", log, *dbcs),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def compare(expected: list[dict[str, Any]], received_path: Path) -> dict[str, int]:
    """Frame by frame, per bus and ID, times aside (the VM's kernel stamped them) and the
    vehicle (decode does not know it). A frame with other values counts as differing (not
    as one missing and one extra); an ID whose frames all came, in another order, as
    reordered."""
    received = []
    if received_path.exists():
        with gzip.open(received_path, "rt") as records:
            received = [json.loads(line) for line in records]

    def by_frame_id(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[str]]:
        frames = defaultdict(list)
        for record in records:
            rest = {k: v for k, v in record.items() if k not in ("t", "vehicle")}
            frames[record["bus"], record["id"]].append(json.dumps(rest, sort_keys=True))
        return frames

    sent, got = by_frame_id(expected), by_frame_id(received)
    counts = {"missing": 0, "extra": 0, "differing": 0, "reordered": 0}
    for key in sent.keys() | got.keys():
        ours, theirs = sent.get(key, []), got.get(key, [])
        missing = sum((Counter(ours) - Counter(theirs)).values())
        extra = sum((Counter(theirs) - Counter(ours)).values())
        differing = min(missing, extra)
        counts["differing"] += differing
        counts["missing"] += missing - differing
        counts["extra"] += extra - differing
        counts["reordered"] += not missing and not extra and ours != theirs
    return {"frames_expected": len(expected), "frames_received": len(received), **counts}


def accelerator(kernel: Path) -> list[str]:
    """KVM where it boots a stock kernel, else qemu's TCG. Some hosts have a /dev/kvm that
    cannot (nested PVM): the probe boots the kernel to its 'no root' panic, which a real KVM
    reaches in a second or two."""
    choice = os.environ.get("VM_ACCEL", "auto")
    if choice == "auto":
        choice = "tcg"
        if os.access("/dev/kvm", os.W_OK):
            with tempfile.TemporaryDirectory() as tmp:
                console = Path(tmp) / "console"
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run(
                        [
                            "qemu-system-x86_64",
                            "-accel",
                            "kvm",
                            "-cpu",
                            "host",
                            "-m",
                            "256",
                            "-display",
                            "none",
                            "-nodefaults",
                            "-no-reboot",
                            "-serial",
                            f"file:{console}",
                            "-kernel",
                            str(kernel),
                            "-append",
                            "console=ttyS0 panic=-1",
                        ],
                        capture_output=True,
                        timeout=8,
                        check=False,
                    )
                if console.exists() and b"Kernel panic" in console.read_bytes():
                    choice = "kvm"
        say(f"accelerator: {choice}")
    if choice == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if choice == "tcg":
        # Without AVX2: qemu 7.2's TCG emulates some of it wrongly, and numpy 2's AVX2
        # argsort then returns unsorted orders (seen in the guest: np.argsort of 50 random
        # int64 not sorted), which made the decoder miss 29-bit IDs (the diagnostics answers).
        return ["-accel", "tcg,thread=multi", "-cpu", "max,avx2=off"]
    raise Unusable(f"VM_ACCEL: auto, kvm or tcg, not {choice}")


class Boot:
    """One boot of the VM on the run's disk; the guest's lines as they come."""

    def __init__(self, phase: str, accel: list[str], image: Path, payload: Path, out: Path) -> None:
        self.phase = phase
        (payload / "phase").write_text(phase)
        self.serial = BUILD / f"{phase}.results"
        self.console = BUILD / f"{phase}.console"
        self.errors = BUILD / f"{phase}.qemu-errors"
        self.command = [
            "qemu-system-x86_64", *accel, "-m", "1536", "-smp", "2",
            "-display", "none", "-nodefaults", "-no-reboot",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
            "-drive", f"file={BUILD / 'disk.qcow2'},format=qcow2,if=virtio",
            "-serial", f"file:{self.console}", "-serial", f"file:{self.serial}",
            "-virtfs", f"local,path={payload},mount_tag=payload,security_model=none,readonly=on",
            "-virtfs", f"local,path={out},mount_tag=out,security_model=none",
        ]  # fmt: skip
        self.lines: list[tuple[str, dict[str, Any]]] = []
        self.begin_s: float | None = None
        self.seconds = 0.0
        self.cut = False
        self.cut_after_s: float | None = None  # after the guest's CUT line

    def run(self, cut: bool) -> None:
        """Until the guest powers off, or, with `cut`, the power is pulled after it says CUT."""
        say(f"boot: {self.phase}")
        for stale in (self.serial, self.console):  # of an earlier run
            stale.unlink(missing_ok=True)
        started = time.monotonic()
        with self.errors.open("wb") as errors:
            qemu = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=errors)
        read = 0
        pull_at: float | None = None
        try:
            while True:
                exited = qemu.poll() is not None
                read = self._take(read, started)
                if pull_at is None and cut and any(kind == "CUT" for kind, _ in self.lines):
                    self.cut_after_s = round(random.uniform(*CUT_AFTER_S), 2)
                    pull_at = time.monotonic() + self.cut_after_s
                if pull_at is not None and time.monotonic() >= pull_at:
                    qemu.kill()  # SIGKILL: the guest's page cache is lost, as in a power cut
                    qemu.wait()
                    self._take(read, started)
                    self.cut = True
                    break
                if exited:
                    break
                if time.monotonic() - started > BOOT_TIMEOUT_S:
                    say(f"boot {self.phase}: no end after {BOOT_TIMEOUT_S} s: killed")
                    break
                time.sleep(0.1)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.wait()
        self.seconds = time.monotonic() - started
        if qemu.returncode not in (0, -9):
            say(f"qemu: exit {qemu.returncode}: {self.errors.read_text().strip()[-600:]}")

    def _take(self, read: int, started: float) -> int:
        if not self.serial.exists():
            return read
        data = self.serial.read_bytes()
        end = data.rfind(b"\n") + 1
        for raw in data[read:end].decode(errors="replace").replace("\r", "").splitlines():
            if not raw.startswith("VMTEST "):
                continue
            kind, _, text = raw[7:].partition(" ")
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = {"text": text}
            self.lines.append((kind, value))
            if kind == "BEGIN" and self.begin_s is None:
                self.begin_s = time.monotonic() - started
            if kind == "CHECK":
                verdict = "ok  " if value.get("ok") else "FAIL"
                say(f"  {verdict} {value.get('name')}: {value.get('detail', '')}"[:300])
            if kind == "TABLE":
                say(f"  {value['name']}:\n{value['text']}")
            if kind == "JOURNAL":
                say("  the agent's journal:\n" + str(value))
        return max(read, end)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [value for k, value in self.lines if k == kind]


def power_cut(write: Boot, recover: Boot | None, mode: str) -> dict[str, Any]:
    """What the agent said it had spooled before the cut, against what arrived after it."""
    spooled = [line["sequence"] for line in write.of("SPOOLED") if line.get("mode") == mode]
    failed = next((p for p in write.of("PART") if p.get("mode") == mode), None)
    part = next((p for p in (recover.of("PART") if recover else []) if p.get("mode") == mode), None)
    why = None
    if failed is not None:
        why = failed.get("error")
    elif not write.cut:
        why = "no power cut"
    elif not spooled or spooled[-1] == 0:
        why = "the agent reported no spooled batch"
    elif part is None:
        why = "no report of the recovery"
    elif "error" in part:
        why = part["error"]
    if why is not None or part is None:
        return {"mode": mode, "error": str(why)}
    last = spooled[-1]
    arrived = set(part["received"])
    return {
        "mode": mode,
        "spooled_before_cut": last,
        "lost": sum(1 for sequence in range(1, last + 1) if sequence not in arrived),
        "arrived": len(arrived),
        "recovered": part["recovered"],
        "torn_repaired": part["torn"],
        "corrupt": part["corrupt"],
        "cut_after_s": write.cut_after_s,
    }


def cut_summary(cut: dict[str, Any]) -> str:
    if "error" in cut:
        return f"fsync {cut['mode']}: {cut['error']}"
    return (
        f"fsync {cut['mode']}: {cut['lost']} of {cut['spooled_before_cut']} spooled batches "
        f"lost, {cut['torn_repaired']} torn records repaired"
    )


def report(
    boots: list[Boot], meta: dict[str, Any], out: Path, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    found = {c["name"]: c for boot in boots for c in boot.of("CHECK")}
    payload = BUILD / "payload"
    comparisons = {
        "socketcan-replay": ("rav4.log", "replay.jsonl.gz"),
        "can-fd": ("fd.log", "fd.jsonl.gz"),
        "stop-drain": ("slice.log", "drain.jsonl.gz"),
    }
    for name, (log, received) in comparisons.items():
        if name in found:
            figures = compare(decode(payload / log), out / received)
            check = found[name]
            check.update(figures)
            wrong = ("missing", "extra", "differing", "reordered", "kernel_drops")
            clean = not any(check.get(key) for key in wrong)
            comparison = (
                f"{figures['frames_received']} of {figures['frames_expected']} decoded frames "
                f"arrived: {figures['missing']} missing, {figures['extra']} extra, "
                f"{figures['differing']} differing, {figures['reordered']} IDs reordered"
            )
            # A failure in the guest says why first.
            check["detail"] = comparison if check["ok"] else f"{check['detail']}; {comparison}"
            check["ok"] = bool(check["ok"] and clean and figures["frames_expected"] > 0)
            if name == "socketcan-replay":
                check["frames_sent"] = meta["rav4_frames"]
                check["detail"] = (
                    f"{meta['rav4_frames']} frames played in {check.get('played_s')} s, "
                    f"{check.get('kernel_drops', 'unknown')} dropped by the kernel; "
                    + check["detail"]
                )
    cuts = [
        power_cut(boots[i], boots[i + 1] if i + 1 < len(boots) else None, mode)
        for i, mode in enumerate(("batch", "never"))
        if i < len(boots)
    ]
    batch: dict[str, Any] = cuts[0] if cuts else {"error": "no boot"}
    found["power-cut"] = {
        "name": "power-cut",
        # Something spooled, recovered, and nothing of it lost; the cut with fsync "never"
        # is reported, whatever it lost.
        "ok": "error" not in batch
        and batch.get("lost") == 0
        and batch.get("recovered", 0) > 0
        and len(cuts) == 2
        and "error" not in cuts[1],
        "detail": "; ".join(cut_summary(c) for c in cuts),
        "cuts": cuts,
    }
    checks = [
        found.get(name, {"name": name, "ok": False, "detail": "never ran"}) for name in CHECKS
    ]
    (BUILD / "report.json").write_text(json.dumps({"checks": checks, **extra}, indent=1) + "\n")
    return checks


def summary(checks: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    rows = [[c["name"], "ok" if c["ok"] else "FAIL", c.get("detail", "")] for c in checks]
    figures = {
        c["name"]: {k: v for k, v in c.items() if k not in ("name", "ok", "detail")} for c in checks
    }
    tables = "".join(f"\n\n{name}:\n{text}" for name, text in extra["tables"].items())
    run = {k: v for k, v in extra.items() if k != "tables"}
    return (
        table(["check", "ok", "detail"], rows)
        + tables
        + f"\n\nfigures: {json.dumps(figures)}\nrun: {json.dumps(run)}"
    )


def prepare() -> tuple[Path, float | None, dict[str, Any], list[str]]:
    """The image, the payload, the run's disk and the accelerator; Unusable if any fails."""
    try:
        host_tools()
        folder, built = image()
        say(f"image: {folder} ({f'built in {built:.0f} s' if built else 'cached'})")
        BUILD.mkdir(parents=True, exist_ok=True)
        meta = payload(BUILD / "payload")
        out = BUILD / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        disk = BUILD / "disk.qcow2"
        disk.unlink(missing_ok=True)
        base = str(folder / "rootfs.img")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, str(disk)],
            check=True,
        )
        return folder, built, meta, accelerator(folder / "vmlinuz")
    except (subprocess.CalledProcessError, OSError) as error:
        raise Unusable(str(error)) from error


def main() -> int:
    started = time.monotonic()
    try:
        folder, built, meta, accel = prepare()
    except Unusable as error:
        say(f"cannot run: {error}")
        return 2
    prepared = time.monotonic() - started
    boots = []
    for phase, cut in (("checks", True), ("recover-batch", True), ("recover-never", False)):
        boot = Boot(phase, accel, folder, BUILD / "payload", BUILD / "out")
        boot.run(cut)
        boots.append(boot)
        if cut and not boot.cut:
            break
    (BUILD / "disk.qcow2").unlink(missing_ok=True)
    extra = {
        "accelerator": accel[1],
        "image_built_s": round(built, 1) if built else None,
        "prepare_s": round(prepared, 1),
        "boots": [
            {
                "phase": b.phase,
                "to_checks_s": round(b.begin_s or 0, 1),
                "seconds": round(b.seconds, 1),
            }
            for b in boots
        ],
        "total_s": round(time.monotonic() - started, 1),
        "tables": {t["name"]: t["text"] for boot in boots for t in boot.of("TABLE")},
    }
    checks = report(boots, meta, BUILD / "out", extra)
    print(summary(checks, extra))
    failed = [c["name"] for c in checks if not c["ok"]]
    if failed:
        say(f"FAILED: {', '.join(failed)} (consoles and results in {BUILD})")
        return 1
    say(f"all {len(checks)} checks passed in {extra['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
