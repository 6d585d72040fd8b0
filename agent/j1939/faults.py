"""DM1 (active) and DM2 (previously active) diagnostic messages of J1939-73, one record per
fault.

The message opens with two bytes of lamp states (malfunction indicator, red stop, amber
warning, protect; then how each flashes), followed by four bytes per diagnostic trouble
code: the suspect parameter number (19 bits), the failure mode identifier (5 bits), the
SPN conversion method bit and the occurrence count (7 bits). A message with one fault fits
in a frame; more travel by the transport protocol. SPN 0 with FMI 0 stands for no fault:
its record carries only the lamps.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.decode import MessageInfo, SignalColumn, SignalInfo
from agent.frames import FrameBatch
from agent.j1939.groups import GroupBlock
from agent.j1939.transport import Transfer

DM1, DM2 = 0xFECA, 0xFECB
NAMES = {DM1: "DM1", DM2: "DM2"}
#: What fault records name as their source, where decoded messages name their DBC.
FAULTS_SOURCE = "J1939-73"

_LAMP = {0: "off", 1: "on", 2: "error", 3: "not available"}
_FLASH = {0: "slow flash", 1: "fast flash", 2: "reserved", 3: "not available"}


def _field(name: str, length: int, choices: dict[int, str] | None = None) -> SignalInfo:
    return SignalInfo(
        name=name,
        start=0,
        length=length,
        byte_order="little_endian",
        is_signed=False,
        is_float=False,
        scale=1,
        offset=0,
        unit=None,
        choices=choices,
        multiplexer=None,
        multiplexer_ids=None,
        is_multiplexer=False,
    )


#: Lamp fields, from the high bits of byte 1 (and of byte 2 for their flash states) down.
LAMPS = ("malfunction_indicator_lamp", "red_stop_lamp", "amber_warning_lamp", "protect_lamp")
FIELDS = (
    *(_field(name, 2, _LAMP) for name in LAMPS),
    *(_field(f"{name}_flash", 2, _FLASH) for name in LAMPS),
    _field("SPN", 19),
    _field("FMI", 5),
    _field("occurrence_count", 7),
    _field("SPN_conversion_method", 1),
)
_LAMP_FIELDS = 2 * len(LAMPS)
#: Where a fault is sent as it appears and clears: which of the two this record is.
ACTIVE = _field("active", 1, {0: "cleared", 1: "appeared"})


def dm_frames(batch: FrameBatch, rows: npt.NDArray[np.intp]) -> list[Transfer]:
    """DM frames (at `rows`, as the decoder finds them: `DecodedBatch.diagnostic`) as
    transfers of one frame, so that both decode alike."""
    return [
        Transfer(
            int(batch.t_ns[row]),
            batch.buses[batch.bus[row]],
            int(batch.can_id[row]) >> 26,
            int(batch.can_id[row]) & 0xFF,
            0xFF,
            int(batch.can_id[row] >> 8) & 0x3FFFF,
            batch.payload(int(row)),
            int(row),
        )
        for row in rows.tolist()
    ]


Fault = tuple[int, int, int, int]  # SPN, FMI, occurrence count, conversion method


def read_dm(data: bytes) -> tuple[list[int], list[Fault]] | None:
    """The lamp fields (status, then flash, in FIELDS' order) and the faults of a DM1 or
    DM2 payload; None where it is too short for the lamps."""
    if len(data) < 2:
        return None
    status, flash = data[0], data[1]
    lamps = [(status >> shift) & 3 for shift in (6, 4, 2, 0)]
    lamps += [(flash >> shift) & 3 for shift in (6, 4, 2, 0)]
    faults = []
    for at in range(2, len(data) - 3, 4):
        code = data[at : at + 4]
        spn = code[0] | code[1] << 8 | (code[2] >> 5) << 16
        fmi = code[2] & 0x1F
        if spn == 0 and fmi == 0:
            continue  # the placeholder of a message without faults
        faults.append((spn, fmi, code[3] & 0x7F, code[3] >> 7))
    return lamps, faults


def decode_faults(transfer: Transfer) -> GroupBlock | None:
    """A DM1 or DM2 as one record per fault (one with the lamps alone where it lists none),
    or None for any other group or a message too short for its lamps."""
    name = NAMES.get(transfer.pgn)
    read = read_dm(transfer.data) if name is not None else None
    if name is None or read is None:
        return None
    lamps, faults = read
    rows = len(faults) or 1
    values = np.zeros((len(FIELDS), rows), np.uint64)
    values[:_LAMP_FIELDS] = np.array(lamps, np.uint64)[:, None]
    present: npt.NDArray[np.bool_] | None = None
    if faults:
        values[_LAMP_FIELDS:] = np.array(faults, np.uint64).T
    else:
        present = np.zeros((len(FIELDS), 1), np.bool_)
        present[:_LAMP_FIELDS] = True
    columns = [
        SignalColumn(info, values[k], None if present is None else present[k])
        for k, info in enumerate(FIELDS)
    ]
    return GroupBlock(
        transfer.bus,
        MessageInfo(name, transfer.can_id, True, len(transfer.data), FAULTS_SOURCE),
        np.full(rows, transfer.t_ns, np.int64),
        np.full(rows, transfer.can_id, np.uint32),
        columns,
        present,
        np.zeros(rows, np.intp),
    )
