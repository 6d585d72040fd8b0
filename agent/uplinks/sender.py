"""Moves wire batches from the agent's bounded queue through an uplink, until acknowledged.

A batch leaves the queue only when the cloud acknowledged it. When the link fails, the
sender reconnects with exponential backoff and jitter, and sends again every batch that was
not acknowledged: a batch can arrive twice, never not at all, and the receiver drops the
duplicates by (stream, sequence).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from agent.metrics import Metrics
from agent.uplinks.base import Uplink, UplinkError
from agent.wire import WireBatch

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class Sender:
    def __init__(
        self,
        uplink: Uplink,
        metrics: Metrics,
        max_batches: int,
        announcement: Callable[[bytes], bytes],
    ) -> None:
        self.uplink = uplink
        self.announcement = announcement
        self.metrics = metrics
        self.max_batches = max_batches
        self.pending: OrderedDict[int, WireBatch] = OrderedDict()
        self.pending_bytes = 0
        self.acked = 0
        self.connected = False
        self.last_error = ""
        # Futures resolved when a batch is added or acknowledged. Each waiter registers
        # before it yields, so no change between its check and its wait goes unnoticed.
        self._waiters: list[asyncio.Future[None]] = []
        self._labels = (uplink.kind,)

    async def put(self, batch: WireBatch) -> None:
        """Queue a batch; waits while the queue is full (the sources slow down)."""
        while len(self.pending) >= self.max_batches:
            await self._wait_change()
        self.pending[batch.sequence] = batch
        self.pending_bytes += len(batch)
        self._update_gauges()
        self._notify()

    def put_nowait(self, batches: deque[WireBatch]) -> None:
        """Queue batches now, past the bound: the last ones, when the agent stops."""
        while batches:
            batch = batches.popleft()
            self.pending[batch.sequence] = batch
            self.pending_bytes += len(batch)
        self._update_gauges()
        self._notify()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued batch is acknowledged; False if the time ran out."""
        deadline = time.monotonic() + timeout
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._wait_change(), left)
            except TimeoutError:
                return False
        return True

    def _change(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    async def _wait_change(self) -> None:
        await self._change()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _update_gauges(self) -> None:
        self.metrics.queue_batches.set(len(self.pending))
        self.metrics.queue_bytes.set(self.pending_bytes)

    async def run(self) -> None:
        """Connect, send, reconnect: until cancelled."""
        backoff = BACKOFF_FIRST_S
        while True:
            try:
                await self.uplink.connect()
                self._set_connected(True)
                log.info("uplink %s connected to %s", self.uplink.kind, self.uplink.target)
                backoff = BACKOFF_FIRST_S
                await self._pump()
            except (UplinkError, OSError, ValueError) as error:
                # OSError, ValueError: a certificate file that went missing or went bad, say;
                # worth retrying as much as a link that failed.
                self.last_error = str(error)
                self.metrics.uplink_failures.labels(*self._labels).inc()
                log.warning("uplink %s: %s; retrying in %.1f s", self.uplink.kind, error, backoff)
            finally:
                self._set_connected(False)
                await self.uplink.close()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.uplink_connected.labels(*self._labels).set(int(connected))

    async def _pump(self) -> None:
        in_flight: dict[asyncio.Future[None], tuple[WireBatch, float]] = {}
        announced: set[bytes] = set()  # on this connection
        try:
            while True:
                sent = {batch.sequence for batch, _ in in_flight.values()}
                for sequence, batch in list(self.pending.items()):
                    if len(in_flight) >= self.uplink.window:
                        break
                    if sequence not in sent:
                        if batch.schema_id not in announced:
                            await self.uplink.announce(
                                batch.schema_id, self.announcement(batch.schema_id)
                            )
                            announced.add(batch.schema_id)
                        sending = asyncio.ensure_future(self.uplink.send(batch))
                        in_flight[sending] = (batch, time.monotonic())
                        self.metrics.batches_sent.labels(*self._labels).inc()
                waiter = self._change()
                done, _ = await asyncio.wait(
                    [*in_flight, waiter], return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                for finished in done:
                    if finished is waiter:
                        continue
                    batch, started = in_flight.pop(finished)
                    finished.result()  # raises the link's failure
                    self._acknowledged(batch, time.monotonic() - started)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    def _acknowledged(self, batch: WireBatch, latency: float) -> None:
        if self.pending.pop(batch.sequence, None) is not None:
            self.pending_bytes -= len(batch)
            self.acked += 1
            self.metrics.batches_acked.labels(*self._labels).inc()
            self.metrics.ack_latency.labels(*self._labels).observe(latency)
            self._update_gauges()
            self._notify()
