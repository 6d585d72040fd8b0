"""What an ECU's answer says, as records of the bus's diagnostics stream: pure functions of
the answer's bytes, shared by the poller (the agent asks) and the listener (someone else
asks, the agent hears).

Each record is a frame of the stream (agent/diagnostics/pids.py): the frame ID says what it
answers, bytes 0-3 the ECU, the rest the answer's data bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from udsoncan.common.DidCodec import DidCodec
from udsoncan.Response import Response
from udsoncan.services.ReadDTCInformation import ReadDTCInformation

from agent.diagnostics.pids import (
    DTC_IDS,
    DTC_SERVICES,
    DTC_TEXT_BYTES,
    ECU_BYTES,
    PIDS,
    SUPPORTED_RANGES,
    UDS_DTC_ID,
    UDS_SNAPSHOT_ID,
    VIN_ID,
    VIN_LENGTH,
    dtc_text,
    pid_frame_id,
)
from agent.frames import FrameBatch, FrameFlag

#: The positive answer's first byte: the service asked, plus 0x40.
POSITIVE = 0x40
#: Services 03, 07, 0A by the first byte of their positive answers.
DTC_KINDS_BY_ANSWER = {service + POSITIVE: kind for kind, service in DTC_SERVICES.items()}
_BY_STATUS_MASK = ReadDTCInformation.Subfunction.reportDTCByStatusMask
_SNAPSHOTS = ReadDTCInformation.Subfunction.reportDTCSnapshotRecordByDTCNumber


class AnswerError(ValueError):
    """An answer whose bytes do not read as its service defines them."""


@dataclass(frozen=True)
class Answer:
    """A record to emit: the frame ID of what it answers, the ECU, the data bytes."""

    frame_id: int
    ecu: int
    data: bytes


def read_pids(data: bytes) -> dict[int, bytes]:
    """A service 01 answer (41 PID data PID data ...) as {PID: data}, read by PID number;
    a PID the table does not know ends the reading, as its size is not known."""
    values: dict[int, bytes] = {}
    at = 1
    while at < len(data):
        pid = data[at]
        size = 4 if pid in SUPPORTED_RANGES else PIDS[pid].size if pid in PIDS else None
        if size is None or at + 1 + size > len(data):
            break
        values[pid] = data[at + 1 : at + 1 + size]
        at += 1 + size
    return values


def pid_answers(ecu: int, data: bytes, wanted: Collection[int] | None = None) -> list[Answer]:
    """A record per PID of a service 01 answer that the table knows (of `wanted`, where
    given); the supported-PID bitmaps are none."""
    return [
        Answer(pid_frame_id(pid), ecu, value)
        for pid, value in read_pids(data).items()
        if pid in PIDS and (wanted is None or pid in wanted)
    ]


def is_vin(data: bytes) -> bool:
    return len(data) >= 2 + VIN_LENGTH and data[0] == 0x49 and data[1] == 0x02


def vin_answer(ecu: int, data: bytes) -> Answer | None:
    """The VIN record of a service 09 PID 02 answer: 49 02, then on CAN the number of data
    items (1), then the 17 characters."""
    if not is_vin(data):
        return None
    return Answer(VIN_ID, ecu, data[-VIN_LENGTH:])


def dtc_answers(kind: str, ecu: int, data: bytes) -> list[Answer]:
    """A record per DTC of a service 03, 07 or 0A answer (`kind`: stored, pending,
    permanent): on CAN the count comes first, then two bytes per DTC."""
    body = data[2 : 2 + 2 * data[1]] if len(data) > 1 else b""
    records = []
    for k in range(0, len(body) - 1, 2):
        code = body[k : k + 2]
        if code == b"\0\0":
            continue  # padding, not a DTC
        padded = dtc_text(code).encode("ascii").ljust(DTC_TEXT_BYTES, b"\0")
        records.append(Answer(DTC_IDS[kind], ecu, code + padded))
    return records


def dtc_of(answer: Answer) -> str:
    """The text of a DTC record, as J2012 writes it."""
    return answer.data[2:].rstrip(b"\0").decode("ascii")


def uds_dtc_answers(ecu: int, data: bytes) -> list[Answer]:
    """A record per DTC of a UDS ReadDTCInformation by status mask answer (0x59 0x02),
    read with udsoncan; AnswerError where it does not read."""
    response = Response.from_payload(data)
    try:
        ReadDTCInformation.interpret_response(
            response,
            subfunction=_BY_STATUS_MASK,
            tolerate_zero_padding=True,
            ignore_all_zero_dtc=True,
        )
    except Exception as error:  # udsoncan raises several kinds for a bad answer
        raise AnswerError(str(error)) from None
    return [
        Answer(UDS_DTC_ID, ecu, dtc.id.to_bytes(3, "big") + bytes([dtc.status.get_byte_as_int()]))
        for dtc in getattr(response.service_data, "dtcs", [])
    ]


class _DidValue(DidCodec):
    """A snapshot's data identifier read as one unsigned big-endian number (udsoncan's
    DID codec interface): its meaning is the ECU maker's, the agent sends it raw."""

    def __init__(self, size: int) -> None:
        self.size = size

    def decode(self, payload: bytes) -> Any:
        return int.from_bytes(payload[: self.size], "big")

    def __len__(self) -> int:
        return self.size


def snapshot_answers(ecu: int, data: bytes, dids: Sequence[tuple[int, int]]) -> list[Answer]:
    """A record per data identifier of a DTC snapshot answer (0x59 0x04), whose DIDs and
    their sizes are `dids`; AnswerError where it does not read (an unknown DID, a bad
    length: udsoncan says which)."""
    response = Response.from_payload(data)
    codecs: dict[int | str, Any] = {did: _DidValue(size) for did, size in dids}
    try:
        ReadDTCInformation.interpret_response(
            response,
            subfunction=_SNAPSHOTS,
            dtc_snapshot_did_size=2,
            didconfig=codecs,
            tolerate_zero_padding=True,
        )
    except Exception as error:  # udsoncan raises several kinds for a bad answer
        raise AnswerError(str(error)) from None
    return [
        Answer(
            UDS_SNAPSHOT_ID,
            ecu,
            found.id.to_bytes(3, "big")
            + bytes([snapshot.record_number])
            + snapshot.did.to_bytes(2, "big")
            + int(snapshot.data).to_bytes(4, "big"),
        )
        for found in getattr(response.service_data, "dtcs", [])
        for snapshot in found.snapshots
    ]


def heard_answers(ecu: int, data: bytes) -> list[Answer]:
    """The records of any answer the agent can read without knowing the request: service
    01 PIDs, the VIN, OBD-II DTCs and UDS DTCs by status mask; none of anything else (a
    request, a negative answer, a service it does not read). AnswerError where a UDS DTC
    answer does not read."""
    if not data:
        return []
    first = data[0]
    if first == 0x01 + POSITIVE:
        return pid_answers(ecu, data)
    if first == 0x09 + POSITIVE:
        vin = vin_answer(ecu, data)
        return [vin] if vin is not None else []
    kind = DTC_KINDS_BY_ANSWER.get(first)
    if kind is not None:
        return dtc_answers(kind, ecu, data)
    if first == 0x19 + POSITIVE and len(data) >= 2 and data[1] == _BY_STATUS_MASK:
        return uds_dtc_answers(ecu, data)
    return []


def answer_frames(stream: str, records: Sequence[Answer], t_ns: Sequence[int]) -> FrameBatch:
    """The records as frames of the diagnostics stream `stream`, each at its time."""
    frames = FrameBatch.allocate(len(records), (stream,))
    frames.t_ns[:] = np.asarray(t_ns, np.int64)
    for row, record in enumerate(records):
        length = ECU_BYTES + len(record.data)
        frames.can_id[row] = record.frame_id
        frames.flags[row] = FrameFlag.EXTENDED | (FrameFlag.FD if length > 8 else 0)
        frames.length[row] = length
        frames.data[row, :ECU_BYTES] = np.frombuffer(
            record.ecu.to_bytes(ECU_BYTES, "little"), np.uint8
        )
        frames.data[row, ECU_BYTES:length] = np.frombuffer(record.data, np.uint8)
    return frames
