"""The real CAN logs and DBC files that the tests and benchmarks read.

They live in tests/data compressed with xz, each source's licence beside its files (its
README.md says what each is). cantools, python-can's readers used as oracles and the
benchmarks, which time the plain-file path, need plain files: the first import unpacks them
under build/data, and again whenever a compressed file is newer than its plain copy.
"""

import lzma
import os
import shutil

from harness import REPO

PACKED = REPO / "tests" / "data"
DATA = REPO / "build" / "data"


def _unpack() -> None:
    for packed in sorted(PACKED.glob("*/*.xz")):
        plain = DATA / packed.parent.name / packed.name.removesuffix(".xz")
        if plain.exists() and plain.stat().st_mtime >= packed.stat().st_mtime:
            continue
        plain.parent.mkdir(parents=True, exist_ok=True)
        # Unpacked beside its place and renamed into it: a test run killed mid-unpack, or
        # two runs at once, never leave a short file that looks whole.
        part = plain.with_name(f".{plain.name}.{os.getpid()}.part")
        with lzma.open(packed) as source, part.open("wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        os.replace(part, plain)


_unpack()

TESLA_LOG = DATA / "tesla-model3" / "candump_Manual_SOC_DogMode_CabinTemp.log"
#: The first 3.6 s of the Tesla log: replays that run at the log's own pace.
TESLA_EXCERPT = DATA / "tesla-model3" / "excerpt.candump.log"
TESLA_DBC = DATA / "tesla-model3" / "Model3CAN.dbc"
RAV4_LOG = DATA / "rav4-comma2k19" / "rav4_seg40.candump.log"
RAV4_PT_DBC = DATA / "rav4-comma2k19" / "toyota_new_mc_pt_generated.dbc"
RAV4_ADAS_DBC = DATA / "rav4-comma2k19" / "toyota_adas.dbc"
RAV4_SPEED_CSV = DATA / "rav4-comma2k19" / "speed_ground_truth.csv"
TRUCK_DIR = DATA / "j1939-truck"
TRUCK_LOG = TRUCK_DIR / "truck.candump.log"
TRUCK_DBC = TRUCK_DIR / "j1939.dbc"
CONFORMANCE_DIR = DATA / "dbc-conformance"
