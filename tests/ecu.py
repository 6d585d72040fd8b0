"""A simulated ECU on python-can's virtual bus: answers OBD-II service 01 PIDs (with the
supported-PID bitmaps), the VIN (09 02), DTCs (03, 07, 0A) and UDS ReadDTCInformation by
status mask (19 02) with snapshots (19 04), over can-isotp, physically and functionally
addressed, 11- or 29-bit.

It can answer in CAN FD frames (`fd`), be slow (`delay_s`), say "response pending" first
(`pending_s`), answer the PIDs of a request in reverse order and send a stale copy of its
previous answer first (`out_of_order`), refuse services (a negative response, 0x7F), or
never answer (`silent`).
As real ECUs do, it refuses a request for seven PIDs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import can
import isotp

from agent.diagnostics.settings import FUNCTIONAL_11BIT, FUNCTIONAL_29BIT, request_id


@dataclass
class EcuAnswers:
    """What an ECU answers, and how."""

    response_id: int = 0x7E8
    extended: bool = False
    pids: Mapping[int, bytes] = field(default_factory=dict)  # PID -> data bytes (A, B, ...)
    vin: str | None = None
    dtcs: Mapping[int, list[bytes]] = field(default_factory=dict)  # service -> 2-byte codes
    uds_dtcs: list[tuple[int, int]] = field(default_factory=list)  # (DTC, status)
    #: DTC -> its snapshot records: (record number, [(DID, data)])
    snapshots: Mapping[int, list[tuple[int, list[tuple[int, bytes]]]]] = field(default_factory=dict)
    refuses: frozenset[int] = frozenset()  # services answered with 0x7F ... 0x11
    delay_s: float = 0.0
    #: first says "response pending" (0x78), then answers this much later
    pending_s: float = 0.0
    out_of_order: bool = False
    silent: bool = False
    fd: bool = False  # answers in CAN FD frames of up to 64 bytes


def supported_bitmap(pids: Mapping[int, bytes], base: int) -> bytes:
    """The answer to PID `base` (00, 20, ...): which of the next 32 PIDs are supported,
    the last bit saying whether the next range is asked for."""
    bits = 0
    for pid in pids:
        if base < pid <= base + 0x20:
            bits |= 1 << (31 - (pid - base - 1))
    if any(pid > base + 0x20 for pid in pids):
        bits |= 1
    return bits.to_bytes(4, "big")


class SimulatedEcu:
    """Runs on `channel` of the virtual bus until closed."""

    def __init__(self, channel: str, answers: EcuAnswers) -> None:
        self.answers = answers
        self.requests: list[bytes] = []  # every request it received, in order
        self.request_times: list[float] = []  # when each came (time.monotonic)
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.notifier = can.Notifier(self.bus, [self._functional], timeout=0.05)
        mode = (
            isotp.AddressingMode.Normal_29bits
            if answers.extended
            else isotp.AddressingMode.Normal_11bits
        )
        address = isotp.Address(
            mode, txid=answers.response_id, rxid=request_id(answers.response_id, answers.extended)
        )
        params: dict[str, Any] = {"tx_padding": 0xAA}
        if answers.fd:
            params |= {"can_fd": True, "tx_data_length": 64}
        self.stack = isotp.NotifierBasedCanStack(
            self.bus, self.notifier, address=address, params=params
        )
        self.stack.start()
        self.functional_id = FUNCTIONAL_29BIT if answers.extended else FUNCTIONAL_11BIT
        self._work: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._last: bytes | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._physical, daemon=True),
            threading.Thread(target=self._answer, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> SimulatedEcu:
        return self

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._work.put(None)
        for thread in self._threads:
            thread.join(2)
        self.stack.stop()
        self.notifier.stop()
        with contextlib.suppress(Exception):
            self.bus.shutdown()

    def _functional(self, message: Any) -> None:
        if message.arbitration_id != self.functional_id or not message.data:
            return
        length = message.data[0] & 0x0F
        if message.data[0] >> 4 == 0 and 0 < length < len(message.data):
            self._work.put(bytes(message.data[1 : 1 + length]))

    def _physical(self) -> None:
        while not self._stop.is_set():
            data = self.stack.recv(block=True, timeout=0.05)
            if data is not None:
                self._work.put(bytes(data))

    def _answer(self) -> None:
        while True:
            request = self._work.get()
            if request is None:
                return
            self.requests.append(request)
            self.request_times.append(time.monotonic())
            answer = reply(self.answers, request)
            if answer is None or self.answers.silent:
                continue
            if self.answers.delay_s:
                time.sleep(self.answers.delay_s)
            if self.answers.pending_s:
                self.stack.send(bytes([0x7F, request[0], 0x78]))
                time.sleep(self.answers.pending_s)
            if self.answers.out_of_order and self._last is not None:
                self.stack.send(self._last)
            self.stack.send(answer)
            self._last = answer


def reply(a: EcuAnswers, request: bytes) -> bytes | None:
    """What an ECU that answers as `a` says to a request; None where a real ECU stays silent
    (also the answering of the kernel ISO-TP ECU of `make vm-test`)."""
    service = request[0]
    if service in a.refuses:
        return bytes([0x7F, service, 0x11])  # serviceNotSupported
    if service == 0x01:
        pids = request[1:]
        if len(pids) > 6:
            return bytes([0x7F, 0x01, 0x13])  # incorrectMessageLengthOrInvalidFormat
        parts = []
        for pid in pids:
            if pid % 0x20 == 0 and (pid == 0 or pid in supported_ranges(a.pids)):
                parts.append(bytes([pid]) + supported_bitmap(a.pids, pid))
            elif pid in a.pids:
                parts.append(bytes([pid]) + a.pids[pid])
        if a.out_of_order:
            parts.reverse()
        return bytes([0x41]) + b"".join(parts) if parts else None
    if service == 0x09 and request[1:] == b"\x02" and a.vin:
        return bytes([0x49, 0x02, 0x01]) + a.vin.encode()
    if service in (0x03, 0x07, 0x0A):
        codes = a.dtcs.get(service, [])
        return bytes([service + 0x40, len(codes)]) + b"".join(codes)
    if service == 0x19 and len(request) == 3 and request[1] == 0x02:
        mask = request[2]
        records = b"".join(
            dtc.to_bytes(3, "big") + bytes([status]) for dtc, status in a.uds_dtcs if status & mask
        )
        return bytes([0x59, 0x02, 0xFF]) + records
    if service == 0x19 and len(request) == 6 and request[1] == 0x04:
        dtc = int.from_bytes(request[2:5], "big")
        status = dict(a.uds_dtcs).get(dtc)
        if status is None:
            return bytes([0x7F, 0x19, 0x31])  # requestOutOfRange
        body = b"".join(
            bytes([number, len(values)]) + b"".join(d.to_bytes(2, "big") + v for d, v in values)
            for number, values in a.snapshots.get(dtc, [])
        )
        return bytes([0x59, 0x04]) + request[2:5] + bytes([status]) + body
    return bytes([0x7F, service, 0x11])


def supported_ranges(pids: Mapping[int, bytes]) -> set[int]:
    """The range PIDs (20, 40, ...) an ECU answers: those up to its highest PID."""
    top = max(pids, default=0)
    return {base for base in range(0x20, 0x100, 0x20) if base < top}
