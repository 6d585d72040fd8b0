"""Passive ISO-TP: messages of OBD-II and UDS conversations built here frame by frame as
ISO 15765-2 sends them, classic CAN and CAN FD, with the protocol's faults."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.frames import FrameBatch, FrameFlag
from agent.isotp import CAN_EFF_FLAG, IsoTpListener

REQUEST, RESPONSE = 0x7E0, 0x7E8
# (milliseconds, ID, payload, CAN FD)
Frame = tuple[int, int, bytes, bool]


def batch_of(frames: Sequence[Frame]) -> FrameBatch:
    batch = FrameBatch.allocate(len(frames), ("can0",))
    for row, (ms, can_id, data, fd) in enumerate(frames):
        batch.t_ns[row] = ms * 1_000_000
        batch.can_id[row] = can_id
        batch.flags[row] = FrameFlag.FD if fd else 0
        batch.length[row] = len(data)
        batch.data[row, : len(data)] = np.frombuffer(data, np.uint8)
    return batch


def send(message: bytes, fd: bool = False, start: int = 0, gap: int = 5) -> list[Frame]:
    """The frames of `message` sent on RESPONSE, with the receiver's flow control, padded
    with 0xCC as ECUs pad."""
    width = 64 if fd else 8
    if len(message) <= (62 if fd else 7):
        head = bytes([len(message)]) if len(message) <= 7 else bytes([0, len(message)])
        return [(start, RESPONSE, (head + message).ljust(8 if not fd else 64, b"\xcc"), fd)]
    first = bytes([0x10 | len(message) >> 8, len(message) & 0xFF])
    if len(message) > 4095:  # the length in 32 bits after a 12-bit 0
        first = bytes([0x10, 0]) + len(message).to_bytes(4, "big")
    frames = [(start, RESPONSE, first + message[: width - len(first)], fd)]
    frames.append((start + 1, REQUEST, bytes([0x30, 0, 0]).ljust(8, b"\xcc"), False))
    rest, index, t = message[width - len(first) :], 1, start + 1
    while rest:
        t += gap
        chunk, rest = rest[: width - 1], rest[width - 1 :]
        frame = (bytes([0x20 | index]) + chunk).ljust(width if fd else 8, b"\xcc")
        frames.append((t, RESPONSE, frame, fd))
        index = (index + 1) & 0x0F
    return frames


def test_single_and_multi_frame_messages_classic_and_fd() -> None:
    rpm = bytes([0x41, 0x0C, 0x1A, 0xF8])
    vin = bytes([0x49, 0x02, 0x01]) + b"1FUJGLDR5CLBP8834"
    long = bytes(range(256)) * 2  # past 15 consecutive frames: the index wraps
    listener = IsoTpListener([(REQUEST, RESPONSE)])
    frames = send(rpm) + send(vin, start=100) + send(long, start=300)
    frames += send(bytes(range(40)), fd=True, start=1000)
    frames += send(bytes(range(200)), fd=True, start=1100)
    huge = bytes(range(250)) * 20  # 5,000 bytes: a 32-bit length
    frames += send(huge, fd=True, start=2000, gap=1)
    other = [(t + 1, 0x123, bytes([0x10, 0x20, 1, 2, 3, 4, 5, 6]), False) for t, *_ in frames]
    everything = sorted(frames + other)
    got = listener.feed(batch_of(everything[:30])) + listener.feed(batch_of(everything[30:]))
    expected = [rpm, vin, long, bytes(range(40)), bytes(range(200)), huge]
    assert [m.data for m in got] == expected
    assert {m.can_id for m in got} == {RESPONSE}
    assert listener.counts.bad_frames == 0 and listener.counts.messages == 6


def test_a_lost_consecutive_frame_costs_its_message_alone() -> None:
    vin = b"\x49\x02\x01" + b"1FUJGLDR5CLBP8834"
    frames = send(vin)
    del frames[2]  # the first consecutive frame: the second arrives out of turn
    listener = IsoTpListener([(REQUEST, RESPONSE)])
    assert listener.feed(batch_of(frames)) == []
    assert listener.counts.bad_frames == 1
    (again,) = listener.feed(batch_of(send(vin, start=500)))
    assert again.data == vin


def test_timeouts_and_overflow() -> None:
    message = bytes(range(30))
    listener = IsoTpListener([(REQUEST, RESPONSE)])
    assert listener.feed(batch_of(send(message, gap=1001))) == []
    assert listener.counts.timed_out == 1
    overflow = send(message, start=5000)
    overflow[1] = (5001, REQUEST, bytes([0x32, 0, 0]).ljust(8, b"\xcc"), False)
    assert listener.feed(batch_of(overflow[:2])) == []
    assert listener.counts.aborted == 1
    # A message left unfinished ends when a batch ends past its deadline.
    listener.feed(batch_of(send(message, start=9000)[:3]))
    listener.feed(batch_of([(11_000, 0x123, bytes(8), False)]))
    assert listener.counts.timed_out == 2


def test_garbage_on_a_pair_is_counted() -> None:
    frames: list[Frame] = [
        (0, RESPONSE, bytes([0x00]).ljust(8, b"\xcc"), False),  # a single frame of 0 bytes
        (1, RESPONSE, bytes([0x07, 1, 2]), False),  # says 7 bytes, carries 2
        (2, RESPONSE, bytes([0x21, 1, 2, 3, 4, 5, 6, 7]), False),  # of no message
        (3, RESPONSE, bytes([0x10, 5, 1, 2, 3, 4, 5, 6]), False),  # fits one frame
        (4, RESPONSE, bytes([0x40, 1, 2, 3, 4, 5, 6, 7]), False),  # no such frame type
        (5, RESPONSE, b"", False),
        (6, RESPONSE, bytes([0x10]), False),  # a first frame cut short
        (7, RESPONSE, bytes([0x10, 0x20, 1]), False),
    ]
    listener = IsoTpListener([(REQUEST, RESPONSE)])
    assert listener.feed(batch_of(frames)) == []
    assert listener.counts.bad_frames == len(frames)


def test_an_id_of_the_other_width_is_another_conversation() -> None:
    """A 29-bit frame numbered 0x7E8 neither ends nor breaks the 11-bit answer under way;
    a 29-bit pair is heard on its own."""
    vin = b"\x49\x02\x01" + b"1FUJGLDR5CLBP8834"
    frames = send(vin)
    other_width = (3, RESPONSE, bytes([0x10, 0x30, 1, 2, 3, 4, 5, 6]), False)
    batch = batch_of([*frames[:3], other_width])
    batch.flags[3] |= np.uint8(FrameFlag.EXTENDED)
    listener = IsoTpListener([(REQUEST, RESPONSE)])
    assert listener.feed(batch) == []
    (whole,) = listener.feed(batch_of(frames[3:]))
    assert whole.data == vin and not whole.extended
    assert listener.counts.bad_frames == 0 and listener.counts.aborted == 0
    wide = IsoTpListener([(REQUEST | CAN_EFF_FLAG, RESPONSE | CAN_EFF_FLAG)])
    extended = batch_of(send(vin))
    extended.flags[:] |= np.uint8(FrameFlag.EXTENDED)
    assert [m.data for m in wide.feed(extended)] == [vin]
    assert wide.feed(batch_of(send(vin))) == []
