"""`source = "socketcan"`: our raw-socket reader, fed the kernel's frame layouts.

This kernel may have no SocketCAN, so the reader is handed one end of an AF_UNIX
SOCK_SEQPACKET socketpair: it keeps datagram boundaries as CAN_RAW does, and the tests write
`struct can_frame` and `struct canfd_frame` bytes into the other end. One test uses a real
CAN_RAW socket on `vcan0` where there is one.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import io
import itertools
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import BusConfig
from agent.decode import Decoder
from agent.frames import FrameBatch, FrameFlag
from agent.records import JsonLinesWriter
from agent.socketcan import recvmmsg as recvmmsg_module
from agent.socketcan import slab as slab_module
from agent.socketcan.abi import (
    ANCILLARY_SIZE,
    CAN_EFF_FLAG,
    CAN_ERR_BUSOFF,
    CAN_ERR_FLAG,
    CAN_RTR_FLAG,
    SO_RXQ_OVFL,
    SO_TIMESTAMPNS_NEW,
    SO_TIMESTAMPNS_OLD,
)
from agent.socketcan.ancillary import receive_times
from agent.socketcan.slab import FrameSlab
from agent.socketcan.sockets import (
    FRAME_CHARGE,
    MAX_BUS_RATE,
    MAX_FILTERS,
    enable_timestamps,
    gather_limit,
    kernel_filters,
    open_can_socket,
)
from agent.sources import socketcan as source_module
from agent.sources.base import SourceError, create_sources
from agent.sources.socketcan import FLUSH_S, SocketCanSettings, SocketCanSource
from tests.test_agent_sources import DEMO_DBC, agent_for, received_lines

FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
CAN_ERR_CRTL = 0x00000004  # error class: controller problem (not bus-off)


@dataclass(frozen=True)
class Frame:
    """One frame as the agent should see it, and how the kernel lays it out."""

    can_id: int
    data: bytes = b""
    extended: bool = False
    remote: bool = False
    error: bool = False
    fd: bool = False
    brs: bool = False
    esi: bool = False
    length: int | None = None  # a remote frame's requested length

    @property
    def flags(self) -> int:
        if self.error:
            return FrameFlag.ERROR
        return (
            FrameFlag.EXTENDED * self.extended
            | FrameFlag.REMOTE * self.remote
            | FrameFlag.FD * self.fd
            | FrameFlag.BRS * self.brs
            | FrameFlag.ESI * self.esi
        )

    @property
    def size(self) -> int:
        return len(self.data) if self.length is None else self.length

    def kernel_bytes(self) -> bytes:
        raw_id = (
            self.can_id
            | CAN_EFF_FLAG * self.extended
            | CAN_RTR_FLAG * self.remote
            | CAN_ERR_FLAG * self.error
        )
        if self.fd:
            # struct canfd_frame: can_id, len, flags (BRS 1, ESI 2, FDF 4), 2 reserved, data[64]
            fd_flags = 0x04 | 0x01 * self.brs | 0x02 * self.esi
            return struct.pack("=IBBBB64s", raw_id, self.size, fd_flags, 0, 0, self.data)
        # struct can_frame: can_id, len, __pad, __res0, len8_dlc, data[8]
        return struct.pack("=IBBBB8s", raw_id, self.size, 0, 0, 0, self.data)


def expected_batch(frames: Sequence[Frame], bus: str = "can0") -> FrameBatch:
    batch = FrameBatch.allocate(len(frames), (bus,))
    for row, frame in enumerate(frames):
        batch.can_id[row] = frame.can_id
        batch.flags[row] = frame.flags
        batch.length[row] = frame.size
        if not frame.remote:
            batch.data[row, : len(frame.data)] = np.frombuffer(frame.data, np.uint8)
    return batch


def assert_same_frames(got: FrameBatch, want: FrameBatch) -> None:
    """Equal in every column but the times."""
    assert len(got) == len(want)
    assert got.buses == want.buses
    np.testing.assert_array_equal(got.bus, want.bus)
    np.testing.assert_array_equal(got.can_id, want.can_id)
    np.testing.assert_array_equal(got.flags, want.flags)
    np.testing.assert_array_equal(got.length, want.length)
    np.testing.assert_array_equal(got.data, want.data)


def random_frames(n: int, seed: int) -> list[Frame]:
    """Every kind of frame the kernel delivers, in a random mix."""
    rng = np.random.default_rng(seed)
    frames: list[Frame] = []
    for _ in range(n):
        kind = int(rng.integers(0, 10))
        extended = bool(rng.integers(0, 2))
        can_id = int(rng.integers(0, 0x20000000 if extended else 0x800))
        if kind < 4:
            data = rng.bytes(int(rng.integers(0, 9)))
            frames.append(Frame(can_id, data, extended=extended))
        elif kind < 8:
            data = rng.bytes(int(rng.choice(FD_LENGTHS)))
            brs, esi = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
            frames.append(Frame(can_id, data, extended=extended, fd=True, brs=brs, esi=esi))
        elif kind == 8:
            length = int(rng.integers(0, 9))
            frames.append(Frame(can_id, extended=extended, remote=True, length=length))
        else:
            error_class = CAN_ERR_BUSOFF if rng.integers(0, 2) else CAN_ERR_CRTL
            frames.append(Frame(error_class, rng.bytes(8), error=True))
    return frames


def socketpair() -> tuple[socket.socket, socket.socket]:
    """(the reader's end, the writer's end) of a SEQPACKET socketpair. AF_UNIX charges the
    queued datagrams to the writer's send buffer: a large one lets tests send thousands of
    frames before the reader runs."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024 * 1024)
    return reader, writer


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    reader, writer = socketpair()
    yield reader, writer
    reader.close()
    writer.close()


def bus_config(name: str, settings: SocketCanSettings | None = None) -> BusConfig:
    return BusConfig(name, "socketcan", (), settings=settings or SocketCanSettings())


def source_on(sock: socket.socket | None = None, name: str = "can0") -> SocketCanSource:
    source = SocketCanSource(bus_config(name))
    if sock is not None:
        source.open_socket = lambda: sock
    return source


def send_bursts(
    writer: socket.socket, datagrams: Sequence[bytes], burst: int = 250, pause_s: float = 0.002
) -> None:
    for start in range(0, len(datagrams), burst):
        for datagram in datagrams[start : start + burst]:
            writer.send(datagram)
        time.sleep(pause_s)


async def received_batches(
    source: SocketCanSource, n: int, timeout: float = 10.0
) -> list[tuple[int, FrameBatch]]:
    """The batches of the source's first `n` frames, each with the wall clock (ns) when it
    came; the source is then closed (its thread stopped)."""
    received: list[tuple[int, FrameBatch]] = []
    frames = 0
    stream = cast(AsyncGenerator[FrameBatch, None], source.batches())
    try:
        async with asyncio.timeout(timeout):
            async for batch in stream:
                received.append((time.time_ns(), batch))
                frames += len(batch)
                if frames >= n:
                    break
    finally:
        await stream.aclose()
    return received


async def collect(source: SocketCanSource, n: int, timeout: float = 10.0) -> FrameBatch:
    """The source's first `n` frames; it is then closed (its thread stopped)."""
    return FrameBatch.concat([batch for _, batch in await received_batches(source, n, timeout)])


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("socketcan-")]


# Kernel filters


def test_kernel_filters_are_exact_matches_in_id_order() -> None:
    eff_mask = CAN_EFF_FLAG | CAN_RTR_FLAG | 0x1FFFFFFF
    sff_mask = CAN_EFF_FLAG | CAN_RTR_FLAG | 0x7FF
    ids = frozenset({(0x7FF, False), (0x123, False), (0x18FF50E5, True), (0x123, True)})
    assert kernel_filters(ids) == struct.pack(
        "=8I",
        *(0x123, sff_mask),
        *(0x7FF, sff_mask),
        *(CAN_EFF_FLAG | 0x123, eff_mask),
        *(CAN_EFF_FLAG | 0x18FF50E5, eff_mask),
    )


def test_an_id_above_0x7ff_marked_standard_is_filtered_as_extended() -> None:
    eff_mask = CAN_EFF_FLAG | CAN_RTR_FLAG | 0x1FFFFFFF
    assert kernel_filters(frozenset({(0x900, False), (0x900, True)})) == struct.pack(
        "=2I", CAN_EFF_FLAG | 0x900, eff_mask
    )


def test_no_filter_for_all_frames_or_too_many_ids() -> None:
    assert kernel_filters(None) is None
    many = frozenset((i, False) for i in range(MAX_FILTERS + 1))
    assert kernel_filters(many) is None
    assert kernel_filters(frozenset(list(many)[:MAX_FILTERS])) is not None
    assert kernel_filters(frozenset()) == b""  # no frame wanted: error frames only


def test_kernel_filters_refuse_what_is_no_can_id() -> None:
    with pytest.raises(ValueError, match="not a CAN ID"):
        kernel_filters(frozenset({(0x20000000, True)}))


# The slab: draining and decoding, without the thread


def drain_all(slab: FrameSlab, sock: socket.socket) -> None:
    sock.setblocking(False)
    while slab.drain(sock) and not slab.full:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(0, 300))
def test_the_slab_decodes_every_kind_of_frame(seed: int, n: int) -> None:
    frames = random_frames(n, seed)
    reader, writer = socketpair()
    with reader, writer:
        for frame in frames:
            writer.send(frame.kernel_bytes())
        slab = FrameSlab(capacity=512)
        drain_all(slab, reader)
        decoded = slab.take(("can0",))
    assert_same_frames(decoded.batch, expected_batch(frames))
    assert decoded.malformed == 0
    assert decoded.error_frames == sum(f.error for f in frames)
    assert decoded.bus_off == sum(f.error and f.can_id == CAN_ERR_BUSOFF for f in frames)


def test_a_reused_slot_holds_no_bytes_of_the_frame_before(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    slab = FrameSlab(capacity=4)
    writer.send(Frame(0x100, bytes(range(1, 65)), fd=True).kernel_bytes())
    drain_all(slab, reader)
    slab.take(("can0",))
    short = [Frame(0x101, b"\xaa"), Frame(0x102, length=8, remote=True)]
    for frame in short:
        writer.send(frame.kernel_bytes())
    drain_all(slab, reader)
    assert_same_frames(slab.take(("can0",)).batch, expected_batch(short))


def test_kernel_timestamps_are_the_frames_times(pair: tuple[socket.socket, socket.socket]) -> None:
    reader, writer = pair
    enable_timestamps(reader)
    sent = time.time_ns()
    writer.send(Frame(0x100, b"\x01").kernel_bytes())
    time.sleep(0.2)  # the kernel stamped the frame on arrival, not when it is read
    slab = FrameSlab()
    drain_all(slab, reader)
    t_ns = int(slab.take(("can0",)).batch.t_ns[0])
    assert sent <= t_ns < sent + 100_000_000


def test_without_timestamps_the_wall_clock_at_receipt_stands_in(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    writer.send(Frame(0x100, b"\x01").kernel_bytes())
    time.sleep(0.2)
    before = time.time_ns()
    slab = FrameSlab()
    drain_all(slab, reader)
    batch = slab.take(("can0",)).batch
    assert before <= int(batch.t_ns[0]) <= time.time_ns()


def stamp(seconds: int, nanoseconds: int) -> bytes:
    return struct.pack("=qq", seconds, nanoseconds)


def test_receive_times_take_each_frames_own_stamp_whatever_comes_with_it() -> None:
    fallback = np.array([7, 8, 9, 10], np.int64)
    drops = (socket.SOL_SOCKET, SO_RXQ_OVFL, struct.pack("=I", 3))
    mixed = [
        [(socket.SOL_SOCKET, SO_TIMESTAMPNS_NEW, stamp(1, 5))],
        [],  # no stamp: the fallback
        [(socket.SOL_SOCKET, SO_TIMESTAMPNS_OLD, stamp(2, 6)), drops],
        [drops],
    ]
    np.testing.assert_array_equal(
        receive_times(mixed, fallback), [1_000_000_005, 8, 2_000_000_006, 10]
    )
    # The usual case, decoded without Python per frame: a stamp, and the drop count.
    uniform = [[(socket.SOL_SOCKET, SO_TIMESTAMPNS_NEW, stamp(s, 1)), drops] for s in (4, 5)]
    np.testing.assert_array_equal(
        receive_times(uniform, fallback[:2]), [4_000_000_001, 5_000_000_001]
    )
    np.testing.assert_array_equal(receive_times([[], []], fallback[:2]), fallback[:2])


class Recorded:
    """A socket stand-in that returns recorded `recvmsg_into` results (what AF_UNIX never
    produces: the kernel's drop counter)."""

    def __init__(self, results: list[tuple[bytes, list[tuple[int, int, bytes]], int]]) -> None:
        self.results = results

    def recvmsg_into(
        self, buffers: list[memoryview], ancbufsize: int
    ) -> tuple[int, list[tuple[int, int, bytes]], int, None]:
        if not self.results:
            raise BlockingIOError(errno.EAGAIN, "empty")
        data, ancillary, flags = self.results.pop(0)
        buffers[0][: len(data)] = data
        return len(data), ancillary, flags, None


def test_the_kernels_drop_counter_is_read_from_the_last_frame() -> None:
    def drops(count: int) -> tuple[int, int, bytes]:
        return (socket.SOL_SOCKET, SO_RXQ_OVFL, struct.pack("=I", count))

    frame = Frame(0x100, b"\x01").kernel_bytes()
    now = (socket.SOL_SOCKET, SO_TIMESTAMPNS_NEW, stamp(1, 0))
    slab = FrameSlab()
    recorded = Recorded([(frame, [now, drops(2)], 0), (frame, [now, drops(5)], 0)])
    slab.drain(recorded)  # type: ignore[arg-type]
    decoded = slab.take(("can0",))
    assert decoded.dropped == 5
    np.testing.assert_array_equal(decoded.batch.t_ns, [1_000_000_000] * 2)
    slab.drain(Recorded([(frame, [now], 0)]))  # type: ignore[arg-type]
    assert slab.take(("can0",)).dropped is None


def test_datagrams_of_a_wrong_size_or_length_are_malformed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    good = random_frames(40, seed=3)
    bad = [
        b"",
        b"\x01",
        bytes(15),
        bytes(17),
        bytes(71),
        bytes(73),  # longer than any frame: arrives truncated
        bytes(200),
        struct.pack("=IBBBB8s", 0x100, 9, 0, 0, 0, bytes(8)),  # classic, 9 bytes long
        struct.pack("=IBBBB64s", 0x100, 65, 4, 0, 0, bytes(64)),  # FD, 65 bytes long
    ]
    for k, frame in enumerate(good):
        writer.send(frame.kernel_bytes())
        if k < len(bad):
            writer.send(bad[k])
    slab = FrameSlab()
    drain_all(slab, reader)
    decoded = slab.take(("can0",))
    assert decoded.malformed == len(bad)
    assert_same_frames(decoded.batch, expected_batch(good))
    assert decoded.error_frames == sum(f.error for f in good) > 0
    assert decoded.bus_off == sum(f.error and f.can_id == CAN_ERR_BUSOFF for f in good)


# recvmmsg: many frames a system call


needs_recvmmsg = pytest.mark.skipif(recvmmsg_module.RECVMMSG is None, reason="libc has no recvmmsg")


@needs_recvmmsg
def test_recvmmsg_drains_the_queue_in_one_call_as_recvmsg_into_would() -> None:
    frames = random_frames(700, seed=21)
    datagrams = [f.kernel_bytes() for f in frames] + [b"", bytes(17), bytes(73)]
    results = []
    for fast in (True, False):
        reader, writer = socketpair()
        with reader, writer:
            enable_timestamps(reader)
            for datagram in datagrams:
                writer.send(datagram)
            slab = FrameSlab(capacity=1024)
            calls: list[int] = []
            libc = recvmmsg_module.RECVMMSG
            assert libc is not None

            def counted(
                fd: int,
                at: int,
                room: int,
                flags: int,
                timeout: None,
                calls: list[int] = calls,
                libc: recvmmsg_module.RecvMMsg = libc,
            ) -> int:
                calls.append(room)
                return libc(fd, at, room, flags, timeout)

            slab.recvmmsg = counted if fast else None
            reader.setblocking(False)
            assert slab.drain(reader) == len(datagrams)
            assert slab.drain(reader) == 0
            assert calls == ([1024, 1024 - len(datagrams)] if fast else [])
            results.append(slab.take(("can0",)))
    fast_decoded, slow_decoded = results
    assert_same_frames(fast_decoded.batch, expected_batch(frames))
    assert_same_frames(slow_decoded.batch, expected_batch(frames))
    np.testing.assert_array_equal(fast_decoded.batch.t_ns, np.sort(fast_decoded.batch.t_ns))
    assert fast_decoded.malformed == slow_decoded.malformed == 3
    assert fast_decoded.error_frames == slow_decoded.error_frames
    assert fast_decoded.bus_off == slow_decoded.bus_off


def cmsg(level: int, kind: int, data: bytes) -> bytes:
    item = struct.pack("@Nii", socket.CMSG_LEN(len(data)), level, kind) + data
    return item.ljust(socket.CMSG_SPACE(len(data)), b"\0")


class FakeKernel:
    """A recvmmsg that fills the slab's records with recorded datagrams and ancillary data
    (what AF_UNIX never sends: the drop counter, other orders), as the kernel would."""

    def __init__(self, results: list[tuple[bytes, bytes]]) -> None:
        self.results = results

    def __call__(self, fd: int, at: int, room: int, flags: int, timeout: None) -> int:
        if not self.results:
            ctypes.set_errno(errno.EAGAIN)
            return -1
        got = 0
        while self.results and got < room:
            data, control = self.results.pop(0)
            record = recvmmsg_module.MMsgHdr.from_address(
                at + got * ctypes.sizeof(recvmmsg_module.MMsgHdr)
            )
            header = record.msg_hdr
            iov = recvmmsg_module.IoVec.from_address(header.msg_iov)
            assert iov.iov_len == 72 and header.msg_controllen == ANCILLARY_SIZE
            ctypes.memmove(iov.iov_base, data, min(len(data), 72))
            ctypes.memmove(header.msg_control, control, len(control))
            header.msg_controllen = len(control)
            header.msg_flags = socket.MSG_TRUNC * (len(data) > 72)
            record.msg_len = len(data)  # the kernel would say 72: the code copes with both
            got += 1
        return got


def test_recvmmsgs_ancillary_data_in_any_layout() -> None:
    frame = Frame(0x100, b"\x01").kernel_bytes()

    def drops(count: int) -> bytes:
        return cmsg(socket.SOL_SOCKET, SO_RXQ_OVFL, struct.pack("=I", count))

    def new(seconds: int) -> bytes:
        return cmsg(socket.SOL_SOCKET, SO_TIMESTAMPNS_NEW, stamp(seconds, 7))

    slab = FrameSlab()
    # The usual layout, read at fixed places: the stamp, then the drop count.
    slab.recvmmsg = FakeKernel([(frame, new(1) + drops(2)), (frame, new(2) + drops(5))])
    with socket.socket() as sock:
        slab.drain(sock)
    decoded = slab.take(("can0",))
    assert decoded.dropped == 5
    np.testing.assert_array_equal(decoded.batch.t_ns, [1_000_000_007, 2_000_000_007])
    # Other layouts: parsed. No stamp (the wall clock), the drop count first, a 32-bit
    # board's old timespec, a truncated item.
    old32 = cmsg(socket.SOL_SOCKET, SO_TIMESTAMPNS_OLD, struct.pack("=ii", 3, 9))
    before = time.time_ns()
    slab.recvmmsg = FakeKernel(
        [
            (frame, b""),
            (frame, drops(1) + new(4)),
            (frame, old32),
            (frame, new(5)[:20]),
            (bytes(80), new(6)),  # too long: truncated, malformed
            (frame, new(7)),
        ]
    )
    with socket.socket() as sock:
        slab.drain(sock)
    decoded = slab.take(("can0",))
    t_ns = decoded.batch.t_ns
    assert decoded.malformed == 1 and decoded.dropped is None
    assert before <= t_ns[0] <= time.time_ns() and before <= t_ns[3] <= time.time_ns()
    np.testing.assert_array_equal(t_ns[[1, 2, 4]], [4_000_000_007, 3_000_000_009, 7_000_000_007])
    # Every record has its full room for ancillary data again.
    slab.recvmmsg = FakeKernel([(frame, new(8) + drops(9))] * 3)
    with socket.socket() as sock:
        slab.drain(sock)
    decoded = slab.take(("can0",))
    assert decoded.dropped == 9
    np.testing.assert_array_equal(decoded.batch.t_ns, [8_000_000_007] * 3)


async def test_without_recvmmsg_the_source_reads_with_recvmsg_into(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    monkeypatch.setattr(slab_module, "RECVMMSG", None)
    source = source_on(reader)
    assert source._slab.recvmmsg is None
    frames = random_frames(3000, seed=12)
    sending = asyncio.create_task(
        asyncio.to_thread(send_bursts, writer, [f.kernel_bytes() for f in frames])
    )
    got = await collect(source, len(frames))
    await sending
    assert_same_frames(got, expected_batch(frames))
    assert source.stats.malformed == 0


@needs_recvmmsg
async def test_recvmmsg_reports_a_downed_interface_by_errno(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    libc = recvmmsg_module.RECVMMSG
    assert libc is not None
    failures = [errno.ENETDOWN, errno.EINTR]

    def goes_down(fd: int, at: int, room: int, flags: int, timeout: None) -> int:
        if failures:
            ctypes.set_errno(failures.pop(0))
            return -1
        return libc(fd, at, room, flags, timeout)

    monkeypatch.setattr(slab_module, "RECVMMSG", goes_down)
    source = source_on(reader)
    frames = random_frames(20, seed=4)
    for frame in frames:
        writer.send(frame.kernel_bytes())
    got = await collect(source, len(frames))
    assert_same_frames(got, expected_batch(frames))
    assert source.stats.outages == 1 and not failures


@needs_recvmmsg
def test_recvmmsg_raises_other_errors_as_the_socket_module_would() -> None:
    def fails(fd: int, at: int, room: int, flags: int, timeout: None) -> int:
        ctypes.set_errno(errno.ENODEV)
        return -1

    slab = FrameSlab(capacity=4)
    slab.recvmmsg = fails
    with socket.socket() as sock, pytest.raises(OSError) as raised:
        slab.drain(sock)
    assert raised.value.errno == errno.ENODEV and "No such device" in str(raised.value)
    assert not len(slab)


# Kernel filters changed while the source runs (a config reload)


async def test_changed_frame_ids_are_applied_to_the_open_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    source = source_on(reader)
    source.frame_ids = frozenset({(0x100, False)})
    applied: list[tuple[socket.socket, frozenset[tuple[int, bool]] | None]] = []
    source.set_filters = lambda sock, ids: applied.append((sock, ids))
    stream = cast(AsyncGenerator[FrameBatch, None], source.batches())
    try:
        writer.send(Frame(0x100, b"\x01").kernel_bytes())
        assert len(await anext(stream)) == 1
        assert applied == []  # opened with these
        source.frame_ids = frozenset({(0x100, False)})  # a reload, but the same IDs
        await asyncio.sleep(0.2)
        assert applied == []
        source.frame_ids = wanted = frozenset({(0x100, False), (0x18FF50E5, True)})
        for _ in range(50):
            if applied:
                break
            await asyncio.sleep(0.02)  # the reader looks at least every WAIT_S
        assert applied == [(reader, wanted)]
        source.frame_ids = None
        writer.send(Frame(0x101, b"\x02").kernel_bytes())
        assert len(await anext(stream)) == 1
        assert applied == [(reader, wanted), (reader, None)]
    finally:
        await stream.aclose()


async def test_changed_frame_ids_leave_a_socket_that_is_not_can_alone(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    source = source_on(reader)  # the real set_filters: a socketpair has no CAN_RAW_FILTER
    stream = cast(AsyncGenerator[FrameBatch, None], source.batches())
    try:
        writer.send(Frame(0x100, b"\x01").kernel_bytes())
        assert len(await anext(stream)) == 1
        source.frame_ids = frozenset({(0x100, False)})
        await asyncio.sleep(0.1)
        writer.send(Frame(0x101, b"\x02").kernel_bytes())
        assert len(await anext(stream)) == 1
        assert source.stats.outages == 0
    finally:
        await stream.aclose()


# The source: its thread, hand-over, outages and cancellation


async def test_thousands_of_frames_in_bursts_arrive_once_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    frames = random_frames(6000, seed=11)
    source = source_on(reader)
    started = time.time_ns()
    sending = asyncio.create_task(
        asyncio.to_thread(send_bursts, writer, [f.kernel_bytes() for f in frames])
    )
    got = await collect(source, len(frames))
    await sending
    assert_same_frames(got, expected_batch(frames))
    assert np.all(np.diff(got.t_ns) >= 0)
    assert started <= got.t_ns[0] and got.t_ns[-1] <= time.time_ns()
    assert source.stats.error_frames == sum(f.error for f in frames)
    assert source.stats.bus_off == sum(f.error and f.can_id == CAN_ERR_BUSOFF for f in frames)
    assert source.stats.bus_off > 0
    assert source.stats.malformed == 0


def send_paced(writer: socket.socket, frames: Sequence[bytes], rate: float) -> None:
    """Send `frames` at `rate` a second, as a bus brings them."""
    started = time.monotonic()
    for k, frame in enumerate(frames):
        delay = started + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writer.send(frame)


@dataclass
class Drain:
    started: float
    ended: float
    got: int


def record_drains(source: SocketCanSource) -> list[Drain]:
    """Each drain the source's reader makes, from now on: when, and how many frames."""
    drains: list[Drain] = []
    drain = source._slab.drain

    def recorded(sock: socket.socket, since: float | None = None) -> int:
        started = time.monotonic()
        got = drain(sock, since)
        drains.append(Drain(started, time.monotonic(), got))
        return got

    source._slab.drain = recorded  # type: ignore[method-assign]
    return drains


async def test_paced_frames_are_drained_once_a_batch_and_handed_over_in_time(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    reader.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS_OLD, 1)
    # As with a receive buffer that lasts longer than a batch (AF_UNIX has none to fill).
    monkeypatch.setattr(source_module, "gather_limit", lambda sock: 1.0)
    frames = random_frames(2000, seed=12)
    source = source_on(reader)
    drains = record_drains(source)
    sending = asyncio.create_task(
        asyncio.to_thread(send_paced, writer, [f.kernel_bytes() for f in frames], 2000)
    )
    received = await received_batches(source, len(frames))
    await sending
    batches = [batch for _, batch in received]
    # How long after its first frame came each batch was handed over.
    late_ns = [at - int(batch.t_ns[0]) for at, batch in received]
    assert_same_frames(FrameBatch.concat(batches), expected_batch(frames))
    # One second of frames: about five batches, and one wake-up to drain each (the first
    # frame of all wakes the reader once more), not one every few milliseconds.
    assert 4 <= len(batches) <= 8, [len(b) for b in batches]
    assert len([d for d in drains if d.got]) <= len(batches) + 2, drains
    # The frames gathered while the reader slept make a batch due FLUSH_S after its first
    # frame came, not FLUSH_S after they were drained.
    assert sorted(late_ns)[len(late_ns) // 2] < (FLUSH_S + 0.06) * 1e9, late_ns


async def test_the_reader_lets_frames_wait_no_longer_than_the_buffer_lasts(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    limit, decoding_s = 0.1, 0.09
    monkeypatch.setattr(source_module, "gather_limit", lambda sock: limit)
    frames = random_frames(1000, seed=14)
    source = source_on(reader)
    drains = record_drains(source)
    decode = source._decode

    def slow_decode() -> FrameBatch:  # as when the event loop is slow to take a batch
        time.sleep(decoding_s)
        return decode()

    source._decode = slow_decode  # type: ignore[method-assign]
    sending = asyncio.create_task(
        asyncio.to_thread(send_paced, writer, [f.kernel_bytes() for f in frames], 1000)
    )
    got = await collect(source, len(frames))
    await sending
    assert_same_frames(got, expected_batch(frames))
    # How long the frames were left to queue up between two drains: the limit, or the
    # decoding and hand-over when that takes longer, never the two one after the other.
    waits = [b.started - a.ended for a, b in itertools.pairwise(drains) if a.got and b.got]
    assert len(waits) >= 5, drains
    assert max(waits) < max(limit, decoding_s) + 0.06, waits


async def test_bursts_further_apart_than_a_batch_make_a_batch_each(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a burst the reader sleeps, finds the queue empty, and waits: the next burst
    # starts a batch of its own, due FLUSH_S after it came, not at once.
    reader, writer = pair
    monkeypatch.setattr(source_module, "gather_limit", lambda sock: 1.0)
    frames = random_frames(100, seed=15)
    source = source_on(reader)
    datagrams = [f.kernel_bytes() for f in frames]
    sending = asyncio.create_task(
        asyncio.to_thread(send_bursts, writer, datagrams, 20, FLUSH_S + 0.15)
    )
    received = await received_batches(source, len(frames))
    await sending
    assert [len(batch) for _, batch in received] == [20] * 5


def test_the_reader_sleeps_no_longer_than_the_receive_buffer_lasts(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # However long it sleeps, the frames of a full bus meanwhile fit in the buffer the
    # kernel granted: a short sleep where net.core.rmem_max is the kernel's default.
    reader, _ = pair
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 212_992)
    granted = reader.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    limit = gather_limit(reader)
    assert limit * MAX_BUS_RATE * FRAME_CHARGE <= granted
    assert 0.005 < limit < FLUSH_S


async def test_garbage_is_counted_and_skipped_by_the_running_source(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    frames = random_frames(300, seed=5)
    for k, frame in enumerate(frames):
        writer.send(frame.kernel_bytes())
        if k % 30 == 0:
            writer.send(bytes(k % 100 + 20))  # 20 to 119 bytes: never 16 or 72
    source = source_on(reader)
    got = await collect(source, len(frames))
    assert_same_frames(got, expected_batch(frames))
    assert source.stats.malformed == 10


async def test_cancelling_stops_the_reader_promptly(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    source = source_on(reader)
    received = asyncio.Event()

    async def consume() -> None:
        async for _ in source.batches():
            received.set()

    task = asyncio.create_task(consume())
    writer.send(Frame(0x100, b"\x01").kernel_bytes())
    await asyncio.wait_for(received.wait(), 5)
    assert reader_threads()
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert not reader_threads()


async def test_cancelling_while_the_interface_is_missing_is_prompt() -> None:
    def missing() -> socket.socket:
        raise OSError(errno.ENODEV, "No such device")

    source = source_on()
    source.open_socket = missing
    source.retry_first_s = 30.0
    task = asyncio.create_task(collect(source, 1))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.5
    assert not reader_threads()


async def test_an_interface_that_cannot_be_opened_is_retried_then_read(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = pair
    calls: list[float] = []

    def opener() -> socket.socket:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise OSError(errno.ENODEV, "No such device")
        return reader

    source = source_on()
    source.open_socket = opener
    source.retry_first_s = 0.05
    frames = random_frames(100, seed=2)
    for frame in frames:
        writer.send(frame.kernel_bytes())
    with caplog.at_level(logging.INFO, "agent.sources.socketcan"):
        got = await collect(source, len(frames))
    assert_same_frames(got, expected_batch(frames))
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # the backoff doubles
    assert source.stats.outages == 1
    outage_logs = [r for r in caplog.records if "cannot open interface can0" in r.message]
    assert len(outage_logs) == 1  # once per outage, not per attempt
    assert "No such device" in outage_logs[0].message
    assert any("frames arrive again" in r.message for r in caplog.records)


async def test_a_closed_socket_is_opened_again_and_no_frame_is_lost() -> None:
    pairs = [socketpair() for _ in range(2)]
    opened = iter(reader for reader, _ in pairs)
    source = source_on()
    source.open_socket = lambda: next(opened)
    source.retry_first_s = 0.05
    first, second = random_frames(50, seed=8), random_frames(50, seed=9)
    for frame in first:
        pairs[0][1].send(frame.kernel_bytes())
    pairs[0][1].close()  # its reader sees the end of the stream after the frames
    for frame in second:
        pairs[1][1].send(frame.kernel_bytes())
    got = await collect(source, 100)
    assert_same_frames(got, expected_batch(first + second))
    assert source.stats.outages == 1
    assert source.stats.malformed == 0
    for reader, writer in pairs:
        reader.close()
        writer.close()


class GoesDown:
    """A socket whose interface goes down once, after `after` frames: the read fails with
    ENETDOWN, as the kernel reports it, and then frames come again on the same socket."""

    def __init__(self, sock: socket.socket, after: int = 0) -> None:
        self.sock = sock
        self.down = True
        self.after = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def __enter__(self) -> GoesDown:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def recvmsg_into(self, buffers: list[memoryview], ancbufsize: int) -> Any:
        if self.down and not self.after:
            self.down = False
            raise OSError(errno.ENETDOWN, "Network is down")
        self.after -= 1
        return self.sock.recvmsg_into(buffers, ancbufsize)


def test_frames_read_before_the_interface_went_down_are_kept(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    reader.setblocking(False)
    frames = random_frames(10, seed=13)
    for frame in frames:
        writer.send(frame.kernel_bytes())
    slab = FrameSlab()
    down = GoesDown(reader, after=3)
    with pytest.raises(OSError, match="Network is down"):
        slab.drain(down)  # type: ignore[arg-type]
    assert len(slab) == 3
    assert slab.drain(down) == 7  # type: ignore[arg-type]
    assert_same_frames(slab.take(("can0",)).batch, expected_batch(frames))


async def test_an_interface_that_goes_down_keeps_its_socket(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    reader, writer = pair
    opened: list[GoesDown] = []

    def opener() -> socket.socket:
        opened.append(GoesDown(reader))
        return opened[-1]  # type: ignore[return-value]

    source = source_on()
    source.open_socket = opener
    frames = random_frames(20, seed=4)
    for frame in frames:
        writer.send(frame.kernel_bytes())
    got = await collect(source, len(frames))
    assert_same_frames(got, expected_batch(frames))
    assert len(opened) == 1
    assert source.stats.outages == 1


async def test_a_kernel_without_socketcan_is_an_error() -> None:
    def no_can() -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    source = source_on()
    source.open_socket = no_can
    with pytest.raises(SourceError, match="no SocketCAN"):
        await collect(source, 1, timeout=5)


def _has_socketcan() -> bool:
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except (OSError, AttributeError):
        return False
    return True


async def test_the_real_opener_on_a_missing_interface(caplog: pytest.LogCaptureFixture) -> None:
    source = source_on(name="nosuchcan9")
    source.retry_first_s = 0.05
    if not _has_socketcan():  # as on this kernel: say so, do not retry
        with pytest.raises(SourceError, match="no SocketCAN"):
            await collect(source, 1, timeout=5)
        return
    with caplog.at_level(logging.WARNING, "agent.sources.socketcan"), pytest.raises(TimeoutError):
        await collect(source, 1, timeout=0.5)
    assert source.stats.outages == 1
    assert [r.message for r in caplog.records] == [
        "bus nosuchcan9: cannot open interface nosuchcan9: No such device; retrying"
    ]


def test_the_interface_is_the_channel_else_the_bus_name() -> None:
    (named, other) = create_sources(
        [
            bus_config("can0"),
            bus_config("powertrain", SocketCanSettings(channel="can1")),
        ]
    )
    assert isinstance(named, SocketCanSource) and named.interface == "can0"
    assert isinstance(other, SocketCanSource) and other.interface == "can1"


# The agent, in-process


async def test_frames_written_to_the_socket_arrive_decoded(
    tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    reader, writer = pair
    enable_timestamps(reader)
    agent = agent_for(
        tmp_path,
        f'[[bus]]\nname = "can0"\nsource = "socketcan"\ndbc = ["{DEMO_DBC}"]\n',
        "[batch]\nmax_age_ms = 100\n",
    )
    (source,) = agent.sources
    assert isinstance(source, SocketCanSource)
    assert source.frame_ids is not None and (0x100, False) in source.frame_ids
    source.open_socket = lambda: reader
    running = asyncio.create_task(agent.run())
    rng = np.random.default_rng(5)
    ids = [0x100, 0x101, 0x201, 0x18FF50E5, 0x7AB]  # the last one is not in the DBC
    frames = [
        Frame(can_id, rng.bytes(8), extended=can_id > 0x7FF)
        for can_id in (ids[row % len(ids)] for row in range(600))
    ]
    # The controller goes bus-off twice on the way, and a datagram of no frame's size comes.
    bus_off = Frame(CAN_ERR_BUSOFF, bytes(8), error=True)
    datagrams = [f.kernel_bytes() for f in frames]
    datagrams[200:200] = [bus_off.kernel_bytes(), b"\0" * 20]
    datagrams[400:400] = [bus_off.kernel_bytes()]
    await asyncio.to_thread(send_bursts, writer, datagrams, 100)
    for _ in range(100):  # bounded: the frames reach the outbox within a few batch ages
        await asyncio.sleep(0.1)
        if agent.totals.frames == 602 and not len(agent.spool):
            break
    agent.stop()
    assert await running == 0
    assert agent.totals.frames == 602
    assert agent.totals.unknown == 120
    registry = agent.metrics.registry
    for metric, value in (("bus_off", 2), ("error_frames", 2), ("frames_malformed", 1)):
        name = f"telemetry_agent_{metric}_total"
        assert registry.get_sample_value(name, {"bus": "can0"}) == value, metric
    # Kernel receive times: compare all but the times.
    expected = Decoder({"*": [DEMO_DBC]}).decode(expected_batch(frames))
    received = [re.sub(r'"t": [0-9.]+', "", line) for line in received_lines(tmp_path / "outbox")]
    out = io.StringIO()
    JsonLinesWriter(out).write(expected.blocks)
    want = [re.sub(r'"t": [0-9.]+', "", line) for line in out.getvalue().splitlines()]
    assert sorted(received) == sorted(want)


# A real CAN_RAW socket, where the kernel has one


def _has_vcan0() -> bool:
    return _has_socketcan() and os.path.exists("/sys/class/net/vcan0")


@pytest.mark.skipif(
    not _has_vcan0(),
    reason="needs SocketCAN and a vcan0 interface "
    "(ip link add dev vcan0 type vcan && ip link set vcan0 mtu 72 up)",
)
async def test_a_real_vcan0_socket_with_kernel_filters() -> None:
    with open_can_socket("vcan0", fd=False) as probe:
        assert probe.family == socket.AF_CAN
    source = source_on(name="vcan0")
    wanted = [Frame(0x123, b"\x01\x02"), Frame(0x18FF50E5, bytes(8), extended=True)]
    unwanted = [Frame(0x124, b"\x03"), Frame(0x123, b"\x04", extended=True)]
    source.frame_ids = frozenset((f.can_id, f.extended) for f in wanted)
    fd_mtu = Path("/sys/class/net/vcan0/mtu").read_text().strip() == "72"
    if fd_mtu:
        wanted.append(Frame(0x123, bytes(range(64)), fd=True, brs=True))
    task = asyncio.create_task(collect(source, len(wanted), timeout=5))
    await asyncio.sleep(0.3)  # the source's socket is bound
    with socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW) as sender:
        if fd_mtu:
            sender.setsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FD_FRAMES, 1)
        sender.bind(("vcan0",))
        for frame in unwanted + wanted:
            sender.send(frame.kernel_bytes())
    got = await task
    assert_same_frames(got, expected_batch(wanted, "vcan0"))
    assert np.all(np.abs(got.t_ns - time.time_ns()) < 5 * 10**9)  # kernel times, epoch-based
