"""Where the real CAN logs and DBC files live: `../shared/data` beside the repository."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TESLA_LOG = SHARED_DATA / "tesla-model3" / "candump_Manual_SOC_DogMode_CabinTemp.log"
TESLA_DBC = SHARED_DATA / "tesla-model3" / "Model3CAN.dbc"
RAV4_LOG = SHARED_DATA / "rav4-comma2k19" / "rav4_seg40.candump.log"
RAV4_PT_DBC = SHARED_DATA / "rav4-comma2k19" / "toyota_new_mc_pt_generated.dbc"
RAV4_ADAS_DBC = SHARED_DATA / "rav4-comma2k19" / "toyota_adas.dbc"
RAV4_SPEED_CSV = SHARED_DATA / "rav4-comma2k19" / "speed_ground_truth.csv"
TRUCK_DIR = SHARED_DATA / "j1939-truck"
TRUCK_LOG = TRUCK_DIR / "truck.candump.log"
TRUCK_DBC = TRUCK_DIR / "j1939.dbc"
CONFORMANCE_DIR = SHARED_DATA / "dbc-conformance"

if not SHARED_DATA.is_dir():
    raise RuntimeError(f"the shared test data is missing: expected {SHARED_DATA}")
