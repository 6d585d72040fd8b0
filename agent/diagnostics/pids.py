"""What the ECUs' answers mean: the common SAE J1979 service 01 PIDs with their formulas,
and the records the agent makes of every answer, as a DBC.

An answer becomes a frame on the bus's diagnostics stream (`<bus>.diagnostics`): the ECU's
response ID in bytes 0 to 3 (little-endian), then the answer's data bytes (A, B, C, ...).
The frame's extended ID says what it answers, `service << 8 | PID` (0x10C: engine speed),
so the decoder turns answers into signals with the same code as any frame, and they leave
the vehicle as every decoded value does. `dbc_text` writes that DBC from the table below:
the formulas live in one place.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: Bytes 0-3 of every answer frame hold the ECU's response ID.
ECU_BYTES = 4


@dataclass(frozen=True)
class Field:
    """One value in a PID's data: `bits` from bit `start` (LSB 0 of byte A, counting on
    through B, C, ...) for one-byte values, or a big-endian field of whole bytes."""

    name: str
    byte: int  # 0 is A
    bits: int
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    signed: bool = False
    bit: int = 0  # first bit within the byte, for fields narrower than a byte
    big_endian: bool = False  # then `bit` is the most significant bit within byte `byte`


@dataclass(frozen=True)
class Pid:
    pid: int
    name: str
    size: int  # data bytes in the answer
    fields: tuple[Field, ...]


def _wide(name: str, bits: int, scale: float = 1.0, offset: float = 0.0, unit: str = "") -> Field:
    """A big-endian value of whole bytes from A: 256 A + B, and so on."""
    return Field(name, 0, bits, scale, offset, unit, bit=7, big_endian=True)


def _byte(pid: int, name: str, scale: float = 1.0, offset: float = 0.0, unit: str = "") -> Pid:
    """A = the value."""
    return Pid(pid, name, 1, (Field(name, 0, 8, scale, offset, unit),))


def _word(pid: int, name: str, scale: float = 1.0, offset: float = 0.0, unit: str = "") -> Pid:
    """256 A + B = the value."""
    return Pid(pid, name, 2, (_wide(name, 16, scale, offset, unit),))


PERCENT = 100 / 255
TRIM = 100 / 128

_TABLE = (
    Pid(
        0x01,
        "MonitorStatus",
        4,
        (Field("DtcCount", 0, 7), Field("MilOn", 0, 1, bit=7)),
    ),
    _byte(0x04, "EngineLoad", PERCENT, 0, "%"),
    _byte(0x05, "CoolantTemperature", 1, -40, "degC"),
    _byte(0x06, "ShortTermFuelTrimBank1", TRIM, -100, "%"),
    _byte(0x07, "LongTermFuelTrimBank1", TRIM, -100, "%"),
    _byte(0x08, "ShortTermFuelTrimBank2", TRIM, -100, "%"),
    _byte(0x09, "LongTermFuelTrimBank2", TRIM, -100, "%"),
    _byte(0x0A, "FuelPressure", 3, 0, "kPa"),
    _byte(0x0B, "IntakeManifoldPressure", 1, 0, "kPa"),
    _word(0x0C, "EngineSpeed", 0.25, 0, "rpm"),
    _byte(0x0D, "VehicleSpeed", 1, 0, "km/h"),
    _byte(0x0E, "TimingAdvance", 0.5, -64, "deg"),
    _byte(0x0F, "IntakeAirTemperature", 1, -40, "degC"),
    _word(0x10, "MassAirFlow", 0.01, 0, "g/s"),
    _byte(0x11, "ThrottlePosition", PERCENT, 0, "%"),
    _byte(0x1C, "ObdStandard"),
    _word(0x1F, "RunTime", 1, 0, "s"),
    _word(0x21, "DistanceWithMil", 1, 0, "km"),
    _word(0x22, "FuelRailPressure", 0.079, 0, "kPa"),
    _word(0x23, "FuelRailGaugePressure", 10, 0, "kPa"),
    _byte(0x2C, "CommandedEgr", PERCENT, 0, "%"),
    _byte(0x2D, "EgrError", TRIM, -100, "%"),
    _byte(0x2E, "CommandedEvapPurge", PERCENT, 0, "%"),
    _byte(0x2F, "FuelTankLevel", PERCENT, 0, "%"),
    _byte(0x30, "WarmUpsSinceCodesCleared"),
    _word(0x31, "DistanceSinceCodesCleared", 1, 0, "km"),
    Pid(
        0x32,
        "EvapVaporPressure",
        2,
        (Field("EvapVaporPressure", 0, 16, 0.25, 0, "Pa", True, 7, True),),
    ),
    _byte(0x33, "BarometricPressure", 1, 0, "kPa"),
    _word(0x3C, "CatalystTemperatureB1S1", 0.1, -40, "degC"),
    _word(0x3D, "CatalystTemperatureB2S1", 0.1, -40, "degC"),
    _word(0x3E, "CatalystTemperatureB1S2", 0.1, -40, "degC"),
    _word(0x3F, "CatalystTemperatureB2S2", 0.1, -40, "degC"),
    _word(0x42, "ControlModuleVoltage", 0.001, 0, "V"),
    _word(0x43, "AbsoluteLoad", PERCENT, 0, "%"),
    _word(0x44, "CommandedAirFuelRatio", 2 / 65536, 0, ""),
    _byte(0x45, "RelativeThrottlePosition", PERCENT, 0, "%"),
    _byte(0x46, "AmbientAirTemperature", 1, -40, "degC"),
    _byte(0x47, "AbsoluteThrottlePositionB", PERCENT, 0, "%"),
    _byte(0x48, "AbsoluteThrottlePositionC", PERCENT, 0, "%"),
    _byte(0x49, "AcceleratorPedalPositionD", PERCENT, 0, "%"),
    _byte(0x4A, "AcceleratorPedalPositionE", PERCENT, 0, "%"),
    _byte(0x4B, "AcceleratorPedalPositionF", PERCENT, 0, "%"),
    _byte(0x4C, "CommandedThrottleActuator", PERCENT, 0, "%"),
    _word(0x4D, "TimeWithMil", 1, 0, "min"),
    _word(0x4E, "TimeSinceCodesCleared", 1, 0, "min"),
    _byte(0x51, "FuelType"),
    _byte(0x52, "EthanolFuel", PERCENT, 0, "%"),
    _word(0x59, "FuelRailAbsolutePressure", 10, 0, "kPa"),
    _byte(0x5A, "RelativeAcceleratorPedalPosition", PERCENT, 0, "%"),
    _byte(0x5B, "HybridBatteryRemainingLife", PERCENT, 0, "%"),
    _byte(0x5C, "EngineOilTemperature", 1, -40, "degC"),
    _word(0x5D, "FuelInjectionTiming", 1 / 128, -210, "deg"),
    _word(0x5E, "EngineFuelRate", 0.05, 0, "L/h"),
    _byte(0x61, "DriverDemandTorque", 1, -125, "%"),
    _byte(0x62, "ActualEngineTorque", 1, -125, "%"),
    _word(0x63, "EngineReferenceTorque", 1, 0, "Nm"),
    Pid(0xA6, "Odometer", 4, (_wide("Odometer", 32, 0.1, 0, "km"),)),
)

#: Service 01 PIDs by number.
PIDS: dict[int, Pid] = {p.pid: p for p in _TABLE}
#: The PIDs whose answer is a bitmap of the next 32 PIDs supported (00, 20, 40, ...).
SUPPORTED_RANGES = tuple(range(0x00, 0x100, 0x20))

#: Frame IDs of the answers that are no service 01 PID.
VIN_ID = 0x0902
DTC_IDS = {"stored": 0x0300, "pending": 0x0700, "permanent": 0x0A00}
DTC_SERVICES = {"stored": 0x03, "pending": 0x07, "permanent": 0x0A}
UDS_DTC_ID = 0x1902
UDS_SNAPSHOT_ID = 0x1904
VIN_LENGTH = 17
#: The first letter of a J2012 DTC, from its two top bits.
DTC_SYSTEMS = {0: "P", 1: "C", 2: "B", 3: "U"}
#: The DTC as text ("P0301") in a field of this many bytes, NUL-padded: text is longer
#: than 64 bits.
DTC_TEXT_BYTES = 9


def dtc_text(code: bytes) -> str:
    """A two-byte OBD-II DTC as J2012 writes it: P0301."""
    return f"{DTC_SYSTEMS[code[0] >> 6]}{int.from_bytes(code[:2], 'big') & 0x3FFF:04X}"


def pid_frame_id(pid: int) -> int:
    return 0x0100 | pid


def _signal(name: str, field: Field) -> str:
    first = ECU_BYTES + field.byte
    if field.big_endian:  # the DBC names the most significant bit
        layout = f"{8 * first + field.bit}|{field.bits}@0"
    else:
        layout = f"{8 * first + field.bit}|{field.bits}@1"
    sign = "-" if field.signed else "+"
    return (
        f' SG_ {name} : {layout}{sign} ({field.scale!r},{field.offset!r}) [0|0] "{field.unit}" '
        "Vector__XXX\n"
    )


def _message(frame_id: int, name: str, size: int, fields: list[Field]) -> str:
    text = f"BO_ {frame_id | 0x80000000} {name}: {ECU_BYTES + size} Vector__XXX\n"
    text += ' SG_ ECU : 0|32@1+ (1,0) [0|0] "" Vector__XXX\n'
    return text + "".join(_signal(f.name, f) for f in fields) + "\n"


def dbc_text() -> str:
    """The DBC of the answer frames."""
    parts = ['VERSION ""\n\nNS_ :\n\nBS_:\n\nBU_:\n\n']
    for pid in _TABLE:
        parts.append(_message(pid_frame_id(pid.pid), pid.name, pid.size, list(pid.fields)))
    # Text (agent.decode.text): whole bytes, longer than 64 bits.
    vin = [Field("VIN", 0, 8 * VIN_LENGTH)]
    parts.append(_message(VIN_ID, "VehicleIdentificationNumber", VIN_LENGTH, vin))
    # Code: the 14 bits after the system letter (P0301 is P and 0x0301); DTC: the code as
    # text, after the two bytes of the answer.
    dtc = [
        Field("System", 0, 2, bit=6),
        Field("Code", 0, 14, bit=5, big_endian=True),
        Field("DTC", 2, 8 * DTC_TEXT_BYTES),
    ]
    names = {"stored": "StoredDTC", "pending": "PendingDTC", "permanent": "PermanentDTC"}
    letters = " ".join(f'{k} "{v}"' for k, v in DTC_SYSTEMS.items())
    for kind, frame_id in DTC_IDS.items():
        parts.append(_message(frame_id, names[kind], 2 + DTC_TEXT_BYTES, dtc))
    uds = [
        _wide("DTC", 24),
        Field("Status", 3, 8),
        Field("TestFailed", 3, 1, bit=0),
        Field("PendingDTC", 3, 1, bit=2),
        Field("ConfirmedDTC", 3, 1, bit=3),
        Field("WarningIndicator", 3, 1, bit=7),
    ]
    parts.append(_message(UDS_DTC_ID, "UdsDTC", 4, uds))
    snapshot = [
        _wide("DTC", 24),
        Field("RecordNumber", 3, 8),
        Field("DID", 4, 16, bit=7, big_endian=True),
        Field("Value", 6, 32, bit=7, big_endian=True),
    ]
    parts.append(_message(UDS_SNAPSHOT_ID, "UdsDTCSnapshot", 10, snapshot))
    for frame_id in DTC_IDS.values():
        parts.append(f"VAL_ {frame_id | 0x80000000} System {letters} ;\n")
    return "".join(parts)


@functools.cache
def answer_signals() -> tuple[tuple[str, str], ...]:
    """(message, signal) of every signal of the answers' DBC."""
    import cantools

    database = cantools.database.can.Database(strict=False)
    database.add_dbc_string(dbc_text())
    return tuple((m.name, s.name) for m in database.messages for s in m.signals)
