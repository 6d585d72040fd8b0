"""ISO-TP (ISO 15765-2) to the ECUs of one bus: the kernel's CAN_ISOTP sockets where the bus
is a SocketCAN interface and the kernel has them, else `can-isotp` over a python-can bus.

One small interface: a request goes to one ECU (physical addressing) or to all of them in
one single frame (functional addressing: every OBD-II request fits one, and ISO 15765-4
says the answers come back physically, with flow control on each ECU's own request ID);
answers are read per ECU. The calls block: the poller runs them in threads.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import queue
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent.config import BusConfig
from agent.diagnostics.settings import DiagnosticsConfig, request_id

if TYPE_CHECKING:  # python-can is imported only where a transport uses it
    import can

log = logging.getLogger(__name__)

#: Unused bytes of a frame the agent sends (ISO 15765-4 pads to 8 bytes).
PADDING = 0xCC
_CAN_EFF_FLAG = 0x80000000
#: linux/can/isotp.h: SOL_CAN_BASE + CAN_ISOTP, CAN_ISOTP_OPTS, CAN_ISOTP_TX_PADDING; the
#: options are struct can_isotp_options (flags, frame_txtime, ext_address, txpad_content,
#: rxpad_content, rx_ext_address).
_SOL_CAN_ISOTP = 106
_CAN_ISOTP_OPTS = 1
_CAN_ISOTP_TX_PADDING = 0x004


class TransportError(Exception):
    """An interface that cannot be opened for transmitting."""


class Transport(abc.ABC):
    """ISO-TP to the ECUs answering on `responders` (their response IDs)."""

    #: Which ISO-TP it is, as the agent's log says when it starts asking.
    kind: str

    def __init__(self, config: DiagnosticsConfig) -> None:
        self.config = config
        self.extended = config.extended
        self.responders = config.responders

    @abc.abstractmethod
    def send(self, ecu: int, payload: bytes) -> None:
        """A request to the ECU answering on `ecu`, physically addressed."""

    @abc.abstractmethod
    def broadcast(self, payload: bytes) -> None:
        """A request of up to 7 bytes to every ECU, in one functionally addressed frame."""

    @abc.abstractmethod
    def receive(self, ecu: int, timeout: float) -> bytes | None:
        """The next whole answer of an ECU, or None after `timeout` seconds."""

    def discard(self, ecu: int) -> int:
        """Drop the answers of an ECU not read yet (late answers to an earlier request);
        how many."""
        dropped = 0
        while self.receive(ecu, 0) is not None:
            dropped += 1
        return dropped

    @abc.abstractmethod
    def close(self) -> None: ...

    def single_frame(self, payload: bytes) -> bytes:
        if len(payload) > 7:
            raise ValueError(f"a single frame carries up to 7 bytes, not {len(payload)}")
        return bytes([len(payload), *payload]).ljust(8, bytes([PADDING]))


@runtime_checkable
class SharedBus(Protocol):
    """A python-can bus that a source reads: the transport sends on it, and the source
    passes each frame it receives to the taps (`deliver`), in its reader thread, which
    iterates the list it finds: taps are added and removed by replacing the list."""

    can_bus: can.BusABC | None
    taps: list[Callable[[can.Message], None]]


class CanIsoTpTransport(Transport):
    """`can-isotp` stacks (one per ECU) over a python-can bus: one the transport opened
    and reads, or the one a source reads (`shared`), which hands each frame to `deliver`:
    many interfaces (PCAN, Vector, Kvaser) open a channel only once. The stacks' flow
    control and the poller's requests come from several threads, and python-can does not
    promise that an interface takes concurrent sends: they take turns."""

    kind = "can-isotp"

    def __init__(
        self, config: DiagnosticsConfig, bus: can.BusABC, shared: SharedBus | None = None
    ) -> None:
        super().__init__(config)
        import can
        import isotp

        self._can = can
        self.bus = bus
        self.shared = shared
        self._sending = threading.Lock()
        self._closed = False
        mode = (
            isotp.AddressingMode.Normal_29bits
            if self.extended
            else isotp.AddressingMode.Normal_11bits
        )
        params = {
            "tx_padding": PADDING,
            "blocking_send": False,
            # Answers come as fast as the ECU sends them: ask for no separation time.
            "stmin": 0,
            "blocksize": 0,
        }
        self._inboxes: dict[int, queue.SimpleQueue[can.Message]] = {}
        self.stacks: dict[int, Any] = {}
        for ecu in self.responders:
            inbox = self._inboxes[ecu] = queue.SimpleQueue()
            address = isotp.Address(mode, txid=request_id(ecu, self.extended), rxid=ecu)
            stack = isotp.TransportLayer(
                functools.partial(_next_frame, inbox), self._send_frame, address, params=params
            )
            stack.start()
            self.stacks[ecu] = stack
        self.notifier = None
        if shared is None:
            self.notifier = can.Notifier(bus, [self.deliver], timeout=0.05)
        else:
            shared.taps = [*shared.taps, self.deliver]

    def deliver(self, message: can.Message) -> None:
        """A frame received on the bus: to the stack of the ECU that sent it."""
        if self._closed or message.is_error_frame or message.is_remote_frame:
            return
        if message.is_extended_id == self.extended:
            inbox = self._inboxes.get(message.arbitration_id)
            if inbox is not None:
                inbox.put(message)

    def _send_frame(self, frame: Any) -> None:
        self._send(
            self._can.Message(
                arbitration_id=frame.arbitration_id,
                is_extended_id=frame.is_extended_id,
                data=frame.data,
                is_fd=frame.is_fd,
                bitrate_switch=frame.bitrate_switch,
            )
        )

    def _send(self, message: can.Message) -> None:
        with self._sending:
            self.bus.send(message)

    def _check_open(self) -> None:
        if self.shared is not None and self.shared.can_bus is not self.bus:
            raise TransportError("the bus's interface was closed")

    def send(self, ecu: int, payload: bytes) -> None:
        self._check_open()
        self.stacks[ecu].send(payload)

    def broadcast(self, payload: bytes) -> None:
        self._check_open()
        message = self._can.Message(
            arbitration_id=self.config.functional_id,
            is_extended_id=self.extended,
            data=self.single_frame(payload),
        )
        self._send(message)

    def receive(self, ecu: int, timeout: float) -> bytes | None:
        data = self.stacks[ecu].recv(block=timeout > 0, timeout=timeout or None)
        return None if data is None else bytes(data)

    def close(self) -> None:
        self._closed = True
        if self.shared is not None:
            self.shared.taps = [t for t in self.shared.taps if t != self.deliver]
        for stack in self.stacks.values():
            with contextlib.suppress(Exception):
                stack.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.shared is None:
            with contextlib.suppress(Exception):
                self.bus.shutdown()


def _next_frame(inbox: queue.SimpleQueue[can.Message], timeout: float) -> Any:
    """can-isotp's `rxfn`: the ECU's next frame within `timeout` seconds, or None."""
    import isotp

    try:
        message = inbox.get(timeout=timeout)
    except queue.Empty:
        return None
    return isotp.CanMessage(
        arbitration_id=message.arbitration_id,
        dlc=message.dlc,
        data=bytes(message.data),
        extended_id=message.is_extended_id,
        is_fd=message.is_fd,
        bitrate_switch=message.bitrate_switch,
    )


def own_bus(args: Mapping[str, Any]) -> can.BusABC:
    """A python-can bus of the transport's own."""
    import can

    try:
        return can.Bus(**args)
    except Exception as error:  # python-can raises many kinds for a bad interface
        raise TransportError(f"cannot open {args.get('interface')!r}: {error}") from None


class KernelIsoTpTransport(Transport):
    """The kernel's CAN_ISOTP sockets (one per ECU) and a CAN_RAW one for broadcasts."""

    kind = "kernel ISO-TP"

    def __init__(self, config: DiagnosticsConfig, interface: str) -> None:
        super().__init__(config)
        flag = _CAN_EFF_FLAG if self.extended else 0
        self.sockets: dict[int, socket.socket] = {}
        try:
            for ecu in self.responders:
                sock = socket.socket(socket.AF_CAN, socket.SOCK_DGRAM, socket.CAN_ISOTP)
                self.sockets[ecu] = sock
                # ISO 15765-4 wants every frame 8 bytes long; the kernel pads only if asked.
                options = struct.pack("=IIBBBB", _CAN_ISOTP_TX_PADDING, 0, 0, PADDING, 0, 0)
                sock.setsockopt(_SOL_CAN_ISOTP, _CAN_ISOTP_OPTS, options)
                sock.bind((interface, ecu | flag, request_id(ecu, self.extended) | flag))
            self.raw = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
            self.raw.bind((interface,))
        except OSError:
            self.close()
            raise

    def send(self, ecu: int, payload: bytes) -> None:
        self.sockets[ecu].send(payload)

    def broadcast(self, payload: bytes) -> None:
        flag = _CAN_EFF_FLAG if self.extended else 0
        frame = struct.pack(
            "=IB3x8s", self.config.functional_id | flag, 8, self.single_frame(payload)
        )
        self.raw.send(frame)

    def receive(self, ecu: int, timeout: float) -> bytes | None:
        sock = self.sockets[ecu]
        sock.settimeout(timeout if timeout > 0 else 0.0)
        try:
            return sock.recv(4096)
        except (TimeoutError, BlockingIOError):
            return None

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        raw = getattr(self, "raw", None)
        if raw is not None:
            raw.close()


def kernel_isotp(config: DiagnosticsConfig, interface: str) -> Transport | None:
    """The kernel's ISO-TP sockets on `interface`, or None where the kernel has no
    CAN_ISOTP (or no CAN at all): the caller falls back to can-isotp."""
    if not hasattr(socket, "CAN_ISOTP"):
        return None
    try:
        return KernelIsoTpTransport(config, interface)
    except OSError as error:
        log.info("bus %s: no kernel ISO-TP (%s): using can-isotp", config.bus, error.strerror)
        return None


def open_transport(
    config: DiagnosticsConfig, bus: BusConfig, shared: SharedBus | None = None
) -> Transport:
    """The transport to the ECUs of a bus: the kernel's where it has one, else can-isotp
    on the bus a source reads (`shared`), else on a python-can bus of its own."""
    settings = bus.settings
    if bus.source == "socketcan":
        interface = settings.channel or bus.name
        transport = kernel_isotp(config, interface)
        if transport is not None:
            return transport
        return CanIsoTpTransport(config, own_bus({"interface": "socketcan", "channel": interface}))
    if shared is not None:
        if shared.can_bus is None:
            raise TransportError(f"bus {bus.name} is not open")
        return CanIsoTpTransport(config, shared.can_bus, shared)
    args: dict[str, Any] = {
        "interface": settings.interface,
        "channel": settings.channel,
        "bitrate": settings.bitrate,
        "fd": settings.fd,
        **dict(settings.options),
    }
    return CanIsoTpTransport(config, own_bus(args))
