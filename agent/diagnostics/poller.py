"""Asking the ECUs of one bus: the schedule of a [[diagnostics]] table, its requests, and
its answers turned into frames of the bus's diagnostics stream (agent/diagnostics/pids.py).

One request is outstanding at a time, and requests are spaced by `max_requests_per_s`.
An ECU that does not answer in `timeout_s` costs a counted timeout, never the others'
answers: a functional request waits for every expected ECU at once. An answer that is not
to the request outstanding (a late one, to an earlier request) is counted and dropped;
PIDs in an answer are read by their number, in whatever order the ECU put them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from udsoncan.services.ReadDTCInformation import ReadDTCInformation

from agent.config import BusConfig
from agent.diagnostics.answers import (
    Answer,
    AnswerError,
    answer_frames,
    dtc_answers,
    dtc_of,
    is_vin,
    pid_answers,
    read_pids,
    snapshot_answers,
    uds_dtc_answers,
    vin_answer,
)
from agent.diagnostics.pids import DTC_SERVICES, PIDS, SUPPORTED_RANGES
from agent.diagnostics.settings import MAX_PIDS_PER_REQUEST, DiagnosticsConfig, stream_name
from agent.diagnostics.transport import Transport, open_transport
from agent.frames import FrameBatch
from agent.metrics import Metrics

log = logging.getLogger(__name__)

NEGATIVE = 0x7F
#: "Request correctly received, response pending": the ECU answers later (ISO 14229).
RESPONSE_PENDING = 0x78
#: How long after a response-pending the answer may take (ISO 15765-4 P2*).
PENDING_S = 5.0
#: How often ECUs that have not answered the supported-PID discovery are asked again.
REDISCOVER_S = 10.0


@dataclass
class _Job:
    interval_s: float
    run: Callable[[], Awaitable[None]]
    due: float = 0.0


@dataclass
class _Ecu:
    response_id: int
    supported: set[int] | None = None  # service 01 PIDs, once discovered
    vin: str | None = None


class Poller:
    """Runs a [[diagnostics]] table until cancelled; answers go to `deliver(stream, frames)`."""

    def __init__(
        self,
        config: DiagnosticsConfig,
        bus: BusConfig,
        metrics: Metrics,
        deliver: Callable[[str, FrameBatch], None],
        open: Callable[[DiagnosticsConfig, BusConfig], Transport] = open_transport,
    ) -> None:
        self.config = config
        self.bus = bus
        self.stream = stream_name(bus.name)
        self.deliver = deliver
        self.open = open
        self.ecus = {ecu: _Ecu(ecu) for ecu in config.responders}
        self.requests = metrics.diagnostics_requests.labels(bus.name)
        self.answers = metrics.diagnostics_answers.labels(bus.name)
        self.negative = metrics.diagnostics_negative.labels(bus.name)
        self.timeouts = metrics.diagnostics_timeouts.labels(bus.name)
        self.unexpected = metrics.diagnostics_unexpected.labels(bus.name)
        self._last_request = 0.0
        self._threads = concurrent.futures.ThreadPoolExecutor(
            len(self.ecus) + 1, thread_name_prefix=f"isotp-{bus.name}"
        )
        self._transport: Transport | None = None
        self._warned: set[int] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport = await loop.run_in_executor(
                self._threads, self.open, self.config, self.bus
            )
        except Exception as error:  # TransportError, or an interface's own
            log.error("bus %s: diagnostics cannot transmit: %s", self.bus.name, error)
            self._threads.shutdown(wait=False)
            return
        log.info(
            "bus %s: asking ECUs %s (%s addressing, over %s)",
            self.bus.name,
            ", ".join(f"0x{e:X}" for e in self.ecus),
            self.config.addressing,
            self._transport.kind,
        )
        try:
            await self._schedule(self._jobs())
        except Exception:
            # Asking is an extra: a bug in it stops the asking, never the reading.
            log.exception("bus %s: diagnostics stopped by an error", self.bus.name)
        finally:
            transport = self._transport
            await loop.run_in_executor(self._threads, transport.close)
            self._threads.shutdown(wait=False)

    def _jobs(self) -> list[_Job]:
        config = self.config
        jobs: list[_Job] = []
        if config.discover:
            jobs.append(_Job(REDISCOVER_S, self._discover))
        if config.vin:
            jobs.append(_Job(config.dtc_interval_s, self._vin))
        for kind in config.dtcs:
            jobs.append(_Job(config.dtc_interval_s, functools.partial(self._dtcs, kind)))
        if config.uds_dtc_status_mask:
            jobs.append(_Job(config.dtc_interval_s, self._uds_dtcs))
        for group in config.poll:
            jobs.append(_Job(group.interval_s, functools.partial(self._pids, group.pids)))
        return jobs

    async def _schedule(self, jobs: list[_Job]) -> None:
        """Each job at its interval, the earliest due first; one at a time."""
        if not jobs:
            await asyncio.Event().wait()
        start = time.monotonic()
        for job in jobs:
            job.due = start
        while True:
            job = min(jobs, key=lambda j: j.due)
            await asyncio.sleep(max(0.0, job.due - time.monotonic()))
            await job.run()
            # A job that falls behind runs again an interval after it ran, not in a burst.
            job.due = max(job.due + job.interval_s, time.monotonic())

    # -- the requests --

    async def _discover(self) -> None:
        """Service 01 PIDs 00, 20, 40, ...: the bitmaps of the PIDs each ECU supports."""
        if all(e.supported is not None for e in self.ecus.values()):
            return
        # All of them again: under functional addressing every ECU answers anyway.
        found: dict[int, set[int]] = {ecu: set() for ecu in self.ecus}
        asking = list(found)
        for base in SUPPORTED_RANGES:
            answers = await self._ask(bytes([0x01, base]), asking, pid_matcher({base}))
            asking = []
            for ecu, data in answers.items():
                bitmap = read_pids(data).get(base)
                if bitmap is None or len(bitmap) < 4:
                    continue
                bits = int.from_bytes(bitmap[:4], "big")
                supported = {base + n + 1 for n in range(32) if bits & (1 << (31 - n))}
                found[ecu] |= supported
                self.ecus[ecu].supported = found[ecu]
                if base + 0x20 in supported:
                    asking.append(ecu)
            if not asking:
                break
        for ecu in found:
            if self.ecus[ecu].supported is not None:
                log.info(
                    "bus %s: ECU 0x%X supports PIDs %s",
                    self.bus.name,
                    ecu,
                    " ".join(f"{p:02X}" for p in sorted(found[ecu])),
                )

    async def _pids(self, pids: tuple[int, ...]) -> None:
        """A poll group, in requests of at most six PIDs, each to the ECUs that support
        one of them."""
        wanted = self._supported(pids)
        records: list[Answer] = []
        for start in range(0, len(wanted), MAX_PIDS_PER_REQUEST):
            chunk = wanted[start : start + MAX_PIDS_PER_REQUEST]
            expected = [e for e in self._expected() if self._supports(e, chunk)]
            answers = await self._ask(bytes([0x01, *chunk]), expected, pid_matcher(set(chunk)))
            for ecu, data in answers.items():
                records += pid_answers(ecu, data, chunk)
        self._emit(records)

    async def _vin(self) -> None:
        """Service 09 PID 02, until an ECU has told it."""
        if any(e.vin for e in self.ecus.values()):
            return
        answers = await self._ask(bytes([0x09, 0x02]), self._expected(), is_vin)
        records = []
        for ecu, data in answers.items():
            record = vin_answer(ecu, data)
            assert record is not None  # the matcher took only VIN answers
            self.ecus[ecu].vin = record.data.decode("ascii", "replace")
            log.info("bus %s: ECU 0x%X: VIN %s", self.bus.name, ecu, self.ecus[ecu].vin)
            records.append(record)
        self._emit(records)

    async def _dtcs(self, kind: str) -> None:
        """Service 03 (stored), 07 (pending) or 0A (permanent): a record per DTC."""
        service = DTC_SERVICES[kind]
        answers = await self._ask(bytes([service]), self._expected(), _service_matcher(service))
        records = []
        for ecu, data in answers.items():
            for record in dtc_answers(kind, ecu, data):
                log.info("bus %s: ECU 0x%X: %s DTC %s", self.bus.name, ecu, kind, dtc_of(record))
                records.append(record)
        self._emit(records)

    async def _uds_dtcs(self) -> None:
        """UDS ReadDTCInformation by status mask (0x19 0x02), read with udsoncan."""
        request = ReadDTCInformation.make_request(
            subfunction=ReadDTCInformation.Subfunction.reportDTCByStatusMask,
            status_mask=self.config.uds_dtc_status_mask,
        ).get_payload()
        answers = await self._ask(request, self._expected(), _service_matcher(0x19, 0x02))
        records = []
        for ecu, data in answers.items():
            try:
                found = uds_dtc_answers(ecu, data)
            except AnswerError as error:
                log.warning("bus %s: ECU 0x%X: bad DTC answer: %s", self.bus.name, ecu, error)
                self.unexpected.inc()
                continue
            records += found
            if self.config.uds_snapshot_dids:
                for record in found:
                    records += await self._snapshots(ecu, int.from_bytes(record.data[:3], "big"))
        self._emit(records)

    async def _snapshots(self, ecu: int, dtc: int) -> list[Answer]:
        """The snapshots (freeze frames) of a DTC (0x19 0x04, every record), asked of the
        ECU that reported it; a record per data identifier."""
        subfunction = ReadDTCInformation.Subfunction.reportDTCSnapshotRecordByDTCNumber
        request = ReadDTCInformation.make_request(
            subfunction=subfunction, dtc=dtc, snapshot_record_number=0xFF
        ).get_payload()
        answers = await self._ask(request, [ecu], _service_matcher(0x19, 0x04), physical=True)
        if ecu not in answers:
            return []
        try:
            return snapshot_answers(ecu, answers[ecu], self.config.uds_snapshot_dids)
        except AnswerError as error:
            log.warning(
                "bus %s: ECU 0x%X: snapshot of DTC 0x%06X: %s", self.bus.name, ecu, dtc, error
            )
            self.unexpected.inc()
            return []

    # -- asking --

    def _expected(self) -> list[int]:
        """The ECUs expected to answer: with discovery, those that answered it."""
        if not self.config.discover:
            return list(self.ecus)
        return [e.response_id for e in self.ecus.values() if e.supported is not None]

    def _supports(self, ecu: int, pids: Iterable[int]) -> bool:
        supported = self.ecus[ecu].supported
        return supported is None or any(p in supported for p in pids)

    def _supported(self, pids: tuple[int, ...]) -> list[int]:
        """The PIDs some ECU supports (all, before or without discovery); the others are
        logged once and not asked."""
        known = [e.supported for e in self.ecus.values() if e.supported is not None]
        if not known:
            return list(pids)
        kept = [p for p in pids if any(p in s for s in known)]
        for pid in set(pids) - set(kept) - self._warned:
            self._warned.add(pid)
            log.warning(
                "bus %s: no ECU supports PID 0x%02X (%s): not asked",
                self.bus.name,
                pid,
                PIDS[pid].name,
            )
        return kept

    async def _ask(
        self,
        request: bytes,
        ecus: list[int],
        matches: Callable[[bytes], bool],
        physical: bool = False,
    ) -> dict[int, bytes]:
        """`request` to `ecus` (functionally: once to all; physically, or where `physical`:
        to each in turn); each ECU's positive answer."""
        if not ecus:
            return {}
        transport = self._transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        answers: dict[int, bytes] = {}
        if self.config.addressing == "functional" and not physical and len(request) <= 7:
            await self._pace()
            stale = await asyncio.gather(
                *(loop.run_in_executor(self._threads, transport.discard, e) for e in ecus)
            )
            self.unexpected.inc(sum(stale))
            await loop.run_in_executor(self._threads, transport.broadcast, request)
            self.requests.inc()
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(self._threads, self._answer, e, request, matches)
                    for e in ecus
                )
            )
            answers = {e: a for e, a in zip(ecus, results, strict=True) if a is not None}
            return answers
        for ecu in ecus:
            await self._pace()
            self.unexpected.inc(await loop.run_in_executor(self._threads, transport.discard, ecu))
            await loop.run_in_executor(self._threads, transport.send, ecu, request)
            self.requests.inc()
            answer = await loop.run_in_executor(self._threads, self._answer, ecu, request, matches)
            if answer is not None:
                answers[ecu] = answer
        return answers

    def _answer(self, ecu: int, request: bytes, matches: Callable[[bytes], bool]) -> bytes | None:
        """In a thread: the ECU's answer to `request`, within timeout_s (longer after a
        response-pending); None, counted, on a timeout or a negative answer."""
        transport = self._transport
        assert transport is not None
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            data = transport.receive(ecu, max(0.0, deadline - time.monotonic()))
            if data is None:
                self.timeouts.inc()
                log.debug("bus %s: ECU 0x%X did not answer %s", self.bus.name, ecu, request.hex())
                return None
            if len(data) >= 3 and data[0] == NEGATIVE and data[1] == request[0]:
                if data[2] == RESPONSE_PENDING:
                    deadline = time.monotonic() + PENDING_S
                    continue
                self.negative.inc()
                log.debug(
                    "bus %s: ECU 0x%X refused %s: code 0x%02X",
                    self.bus.name,
                    ecu,
                    request.hex(),
                    data[2],
                )
                return None
            if matches(data):
                self.answers.inc()
                return data
            self.unexpected.inc()

    async def _pace(self) -> None:
        """At most max_requests_per_s requests on the bus."""
        gap = 1.0 / self.config.max_requests_per_s
        wait = self._last_request + gap - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._last_request = time.monotonic()

    def _emit(self, records: list[Answer]) -> None:
        """The answers as frames of the diagnostics stream, stamped now."""
        if records:
            now = time.time_ns()
            self.deliver(self.stream, answer_frames(self.stream, records, [now] * len(records)))


def pid_matcher(pids: set[int]) -> Callable[[bytes], bool]:
    def matches(data: bytes) -> bool:
        return len(data) > 1 and data[0] == 0x41 and bool(pids & set(read_pids(data)))

    return matches


def _service_matcher(service: int, subfunction: int | None = None) -> Callable[[bytes], bool]:
    def matches(data: bytes) -> bool:
        if subfunction is not None and (len(data) < 2 or data[1] != subfunction):
            return False
        return len(data) >= 1 and data[0] == service + 0x40

    return matches
