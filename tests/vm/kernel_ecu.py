"""A simulated engine ECU on a vcan over the kernel's ISO-TP (CAN_ISOTP sockets): the answers
of tests/ecu.py, for the diagnostics check of `make vm-test`. It runs in the guest with the
installed agent's python (which has python-can and can-isotp, which tests/ecu.py imports):
`python -m tests.vm.kernel_ecu vcan0`. It prints `ready` once its sockets are bound, then
a line per request (the request, its answer, in hex) until it is killed.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading

from agent.diagnostics.settings import FUNCTIONAL_11BIT, request_id
from tests.ecu import EcuAnswers, reply

#: Engine speed 1726 rpm, vehicle speed 88 km/h, coolant 92 degC (J1979), a VIN, and two
#: stored DTCs, P0301 and C0123: guest.py's diagnostics check expects these.
ANSWERS = EcuAnswers(
    0x7E8,
    pids={0x0C: bytes([0x1A, 0xF8]), 0x0D: bytes([88]), 0x05: bytes([132])},
    vin="VMTESTISOTPKERNEL",
    dtcs={0x03: [b"\x03\x01", b"\x41\x23"]},
)
_CAN_FRAME = "=IB3x8s"  # struct can_frame
_SOL_CAN_RAW = 101
_CAN_RAW_FILTER = 1


def main(interface: str) -> None:
    physical = socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_ISOTP)
    physical.bind((interface, request_id(ANSWERS.response_id, False), ANSWERS.response_id))
    # Functional requests are single frames to 0x7DF, read raw; answers go out physically.
    functional = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    functional.setsockopt(
        _SOL_CAN_RAW, _CAN_RAW_FILTER, struct.pack("=II", FUNCTIONAL_11BIT, 0x7FF)
    )
    functional.bind((interface,))
    sending = threading.Lock()

    def answer(request: bytes) -> None:
        data = reply(ANSWERS, request)
        print(request.hex(), "-" if data is None else data.hex(), flush=True)
        if data is not None:
            with sending:
                physical.send(data)

    def broadcasts() -> None:
        while True:
            _, _, data = struct.unpack(_CAN_FRAME, functional.recv(16))
            length = data[0] & 0x0F
            if data[0] >> 4 == 0 and 0 < length < 8:
                answer(data[1 : 1 + length])

    threading.Thread(target=broadcasts, daemon=True).start()
    print("ready", flush=True)
    while True:
        answer(physical.recv(4095))


if __name__ == "__main__":
    main(sys.argv[1])
