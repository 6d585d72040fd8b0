"""Moves wire batches from the spool through an uplink, until acknowledged.

A batch leaves the spool only when the cloud acknowledged it. When the link fails, the
sender reconnects with exponential backoff and jitter, and sends again every batch that was
not acknowledged: a batch can arrive twice, never not at all, and the receiver drops the
duplicates by (stream, sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from agent.metrics import Metrics
from agent.spool import Entry, Spool
from agent.uplinks.base import Uplink, UplinkError
from agent.wire.envelope import WireBatch

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0


class Sender:
    """Sends the spool's batches through an uplink, in sequence order, up to the uplink's
    window at once; a batch leaves the spool when the cloud acknowledged it."""

    def __init__(self, uplink: Uplink, metrics: Metrics, spool: Spool) -> None:
        self.uplink = uplink
        self.metrics = metrics
        self.spool = spool
        self.acked = 0
        self.connected = False
        self.last_error = ""
        self._labels = (uplink.kind,)
        self._switch = asyncio.Event()
        self._replacement: Uplink | None = None
        self._had_link = False  # whether the last session connected

    async def drain(self, timeout: float) -> bool:
        """Wait until every spooled batch is acknowledged; False if the time ran out."""
        deadline = time.monotonic() + timeout
        while len(self.spool):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.spool.changed(), left)
            except TimeoutError:
                return False
        return True

    def replace_uplink(self, uplink: Uplink) -> None:
        """Send through `uplink` from now on (a reload changed the uplink's settings): the
        current link is closed, and what it had in flight is sent again on the new one."""
        self._replacement = uplink
        self._switch.set()

    async def run(self) -> None:
        """Connect, send, reconnect: until cancelled."""
        backoff = BACKOFF_FIRST_S
        while True:
            session = asyncio.ensure_future(self._session())
            switch = asyncio.ensure_future(self._switch.wait())
            try:
                await asyncio.wait([session, switch], return_when=asyncio.FIRST_COMPLETED)
                if not switch.done():
                    error = session.exception()
                    # OSError, ValueError: a certificate file that went missing or went bad,
                    # say; worth retrying as much as a link that failed. Others are bugs.
                    if not isinstance(error, UplinkError | OSError | ValueError):
                        raise error or RuntimeError("uplink session ended")
                    if self._had_link:
                        backoff = BACKOFF_FIRST_S
                    self.last_error = str(error)
                    self.metrics.uplink_failures.labels(*self._labels).inc()
                    log.warning(
                        "uplink %s: %s; retrying in %.1f s", self.uplink.kind, error, backoff
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            asyncio.shield(switch), backoff * random.uniform(0.5, 1.5)
                        )
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
            finally:
                for task in (session, switch):
                    task.cancel()
                await asyncio.gather(session, switch, return_exceptions=True)
            if self._switch.is_set() and self._replacement is not None:
                self.uplink, self._replacement = self._replacement, None
                self._switch.clear()
                self._labels = (self.uplink.kind,)
                backoff = BACKOFF_FIRST_S
                log.info("uplink now %s to %s", self.uplink.kind, self.uplink.target)

    async def _session(self) -> None:
        """One connection: connect and send until the link fails (the error is raised)."""
        self._had_link = False
        try:
            await self.uplink.connect()
            self._set_connected(True)
            self._had_link = True
            log.info("uplink %s connected to %s", self.uplink.kind, self.uplink.target)
            await self._pump()
        finally:
            self._set_connected(False)
            await self.uplink.close()

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.uplink_connected.labels(*self._labels).set(int(connected))

    def _next(self, in_flight: set[int]) -> list[Entry]:
        """The oldest spooled batches not in flight, to fill the window."""
        room = self.uplink.window - len(in_flight)
        chosen: list[Entry] = []
        # The batches in flight are the oldest, so this looks at little more than the window.
        for sequence, entry in self.spool.pending.items():
            if len(chosen) >= room:
                break
            if sequence not in in_flight:
                chosen.append(entry)
        return chosen

    async def _pump(self) -> None:
        in_flight: dict[asyncio.Future[None], tuple[WireBatch, float]] = {}
        announced: set[bytes] = set()  # on this connection
        try:
            while True:
                waiter = self.spool.changed()
                sequences = {batch.sequence for batch, _ in in_flight.values()}
                for entry in self._next(sequences):
                    batch = self.spool.batch(entry)
                    if batch is None:
                        continue
                    if batch.schema_id not in announced:
                        announcement = self.spool.announcement(batch.schema_id)
                        if announcement is not None:
                            await self.uplink.announce(batch.schema_id, announcement)
                        announced.add(batch.schema_id)
                    sending = asyncio.ensure_future(self.uplink.send(batch))
                    in_flight[sending] = (batch, time.monotonic())
                    self.metrics.batches_sent.labels(*self._labels).inc()
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
        if self.spool.acknowledge(batch.sequence):
            self.acked += 1
            self.metrics.batches_acked.labels(*self._labels).inc()
            self.metrics.ack_latency.labels(*self._labels).observe(latency)
