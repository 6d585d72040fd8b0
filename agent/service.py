"""The daemon: sources -> decode -> batches -> uplink, under one asyncio supervisor.

One task per bus reads its source and adds the frames to the bus's open batch; the batch
closes when it spans `max_age_ms` of the bus's frame time, when it has been open that long
in wall time (a quiet bus still reports), or when it would outgrow `max_bytes`. Each bus
batches on its own: sources hand over frames in chunks of their own size and buses may run
on different clocks (a replayed log beside a live bus), so one batch for all buses would
mix unrelated time spans. Closing decodes the frames in one pass, encodes one wire batch and
puts it in the spool, from which the uplink takes it (agent/spool.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np

from agent.collect import Collected, CollectError, Collector
from agent.collect.raw import Raw
from agent.config import (
    RESTART_KEYS,
    Config,
    ConfigError,
    load_config,
    restart_changes,
    rules_key,
)
from agent.decode import DecodedBatch, bus_decoders, default_cache_dir
from agent.frames import FrameBatch
from agent.metrics import Metrics
from agent.notify import Notifier
from agent.sources import Source, SourceError, create_sources
from agent.spool import Spool
from agent.uplinks import create_uplink
from agent.uplinks.sender import Sender
from agent.wire import BatchEncoder, Section, WireBatch, dbc_hash

log = logging.getLogger(__name__)

#: The shortest wait between checks of the open batches' wall age.
TICK_S = 0.05
#: Until the first batch is measured, frames are assumed to cost this much on the wire.
FIRST_BYTES_PER_FRAME = 40.0
#: Close a batch when its estimated size reaches this share of max_bytes.
SIZE_MARGIN = 0.7
#: On Ctrl-C or SIGTERM: how long to wait for the last batches' acknowledgements (what is
#: not acknowledged by then stays in the spool for the next start).
STOP_DRAIN_S = 5.0


@dataclass
class OpenBatch:
    """A bus's frames waiting for their batch to close."""

    pieces: list[FrameBatch] = field(default_factory=list)
    frames: int = 0
    first_t_ns: int | None = None
    opened: float = 0.0

    def add(self, frames: FrameBatch) -> None:
        if not len(frames):
            return
        if self.first_t_ns is None:
            self.first_t_ns = int(frames.t_ns[0])
            self.opened = time.monotonic()
        self.pieces.append(frames)
        self.frames += len(frames)


@dataclass
class Totals:
    frames: int = 0
    decoded: int = 0
    unknown: int = 0
    batches: int = 0


class Agent:
    def __init__(
        self,
        config: Config,
        status: TextIO | None = sys.stderr,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """`config_path`: the file SIGHUP reloads (None: nothing to reload)."""
        self.config = config
        self.config_path = config_path
        self.status = status
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        set_log_level(config.log_level)
        self.decoders = bus_decoders(config.buses, default_cache_dir())
        for name, decoder in self.decoders.items():
            for warning in decoder.warnings:
                log.warning("bus %s: %s", name, warning)
        self.collector = Collector(config.collect, self.decoders) if config.collect else None
        for rule in config.collect:
            self.metrics.collect_values.labels(rule.name)
            if rule.mode == "trigger":
                self.metrics.collect_triggers.labels(rule.name)
        self.spool = Spool(config.state_dir / "spool", config.spool, self.metrics)
        self.spool.open()
        self.stream_id = self.spool.stream_id
        digest = dbc_hash([(bus.name, bus.dbc) for bus in config.buses])
        self.encoder = BatchEncoder(
            config.vehicle_id, self.stream_id, digest, compression=config.batch.compression
        )
        self.sources: list[Source] = create_sources(config.buses)
        self._filter_sources()
        self.uplink = create_uplink(config.uplink, config.vehicle_id)
        self.sender = Sender(self.uplink, self.metrics, self.spool)
        self.next_sequence = self.spool.next_sequence
        self.totals = Totals()
        self._open: dict[str, OpenBatch] = {bus.name: OpenBatch() for bus in config.buses}
        self._bytes_per_frame = FIRST_BYTES_PER_FRAME
        self._stop = asyncio.Event()
        self.failed_buses: list[str] = []
        self._started = time.monotonic()  # when `run` began
        self._ticked = time.monotonic()  # the batch-age task's last round
        self._draining = False  # the sources have ended or a stop came: no more batch ages
        self._reloading: asyncio.Task[None] | None = None
        self._counts: list[Callable[[], None]] = []  # the sources' counters into metrics

    def stop(self) -> None:
        """Stop as Ctrl-C does: close the open batch, wait briefly for acks, return."""
        if not self._stop.is_set():
            self.notifier.notify(STOPPING=1, STATUS="stopping: delivering the last batches")
        self._stop.set()

    def reload(self) -> None:
        """Read the config file again and apply what can change while running (SIGHUP)."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self._reload())

    def _filter_sources(self) -> None:
        for source in self.sources:
            source.frame_ids = self._frame_ids(source.bus.name)

    def _frame_ids(self, bus: str) -> frozenset[tuple[int, bool]] | None:
        """The (ID, extended) pairs of the frames the agent uses on a bus, for a source
        that can filter in the kernel: those its DBCs decode, or those its rules read.
        None (all) on J1939 buses, whose IDs vary in priority and source address, and for
        raw capture of everything."""
        decoder = self.decoders[bus]
        if decoder.is_j1939(bus):
            return None
        if self.collector is None:
            return frozenset((p.info.frame_id, p.info.is_extended) for p in decoder.messages(bus))
        ids: set[tuple[int, bool]] = set()
        for mode in self.collector.rules:
            if bus not in mode.buses:
                continue
            if isinstance(mode, Raw):
                if mode.everything:
                    return None
                ids |= {(i, True) for i in mode.ids.tolist()}
                ids |= {(i, False) for i in mode.ids.tolist() if i <= 0x7FF}
            plans = [t.plan for t in mode.targets.get(bus, ())]
            plans += [r.plan for r in mode.references.values() if r.bus == bus]
            ids |= {(p.info.frame_id, p.info.is_extended) for p in plans}
        return frozenset(ids)

    @property
    def max_age_ns(self) -> int:
        return self.config.batch.max_age_ms * 1_000_000

    async def run(self) -> int:
        """Run until every source has ended (then deliver everything and return 0) or a
        stop is asked for (Ctrl-C, SIGTERM: the open batches go into the spool, and what is
        not acknowledged within STOP_DRAIN_S stays there for the next start)."""
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGINT: self.stop, signal.SIGTERM: self.stop, signal.SIGHUP: self.reload}
        for signum, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, handler)
        if self.config.metrics.listen:
            self.metrics.serve(self.config.metrics.listen)
        started = self._started = time.monotonic()
        spool = asyncio.create_task(self.spool.run(), name="spool")
        sender = asyncio.create_task(self.sender.run(), name="uplink")
        tick = asyncio.create_task(self._tick(), name="batch-age")
        report = asyncio.create_task(self._report(started), name="status")
        # Ready once config, spool and metrics are up: the cloud may well be out of reach,
        # which is normal in a vehicle and no reason to hold systemd back.
        self.notifier.notify(READY=1, STATUS=self._summary(started))
        watchdog = asyncio.create_task(self._watchdog([spool, sender]), name="watchdog")
        buses = [
            asyncio.create_task(self._read(source), name=f"bus-{source.bus.name}")
            for source in self.sources
        ]
        stop = asyncio.create_task(self._stopped())
        services = {spool, sender, tick}
        broken = False
        delivered = False
        try:
            running = set(buses)
            while running and not self._stop.is_set():
                watched = [*running, stop, *services]
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                running -= done
                for task in done & services:
                    # They only end by a bug: say so, and stop rather than run on without.
                    log.error("%s stopped: %r", task.get_name(), task.exception())
                    broken = True
                if broken:
                    break
            stopped = self._stop.is_set() or broken
            if not stopped:
                self.notifier.notify(STATUS="every source has ended: delivering the spool")
            self._draining = True
            for task in [*buses, tick]:
                task.cancel()
            await asyncio.gather(*buses, tick, return_exceptions=True)
            for bus in self._open:
                self._close(bus)
            self._flush_rules()
            await self.spool.sync()
            if not broken:
                delivered = await self._deliver(stopped)
            stopped = stopped or self._stop.is_set()
        finally:
            tasks = [tick, report, stop, sender, spool, watchdog]
            if self._reloading is not None:
                tasks.append(self._reloading)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.spool.close()
            for signum in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
        self._print_status(started)
        if not delivered:
            log.log(
                logging.WARNING if stopped and not broken else logging.ERROR,
                "%d batches not acknowledged by %s (last error: %s); they stay in the spool "
                "%s for the next start",
                len(self.spool),
                self.uplink.target,
                self.sender.last_error or "none",
                self.spool.folder,
            )
            if not stopped or broken:
                return 1
        return 1 if self.failed_buses else 0

    async def _deliver(self, stopped: bool) -> bool:
        """Wait for the spool's batches to be acknowledged: up to drain_timeout_s once the
        sources ended, STOP_DRAIN_S once a stop is asked for (also in the middle of the
        former). Whether they all were."""
        if not stopped:
            drain = asyncio.ensure_future(self.sender.drain(self.config.uplink.drain_timeout_s))
            stop = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([drain, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if drain.done():
                return drain.result()
            drain.cancel()
        return await self.sender.drain(STOP_DRAIN_S)

    async def _stopped(self) -> None:
        await self._stop.wait()

    async def _read(self, source: Source) -> None:
        name = source.bus.name
        received = self.metrics.frames_received.labels(name)
        # The source's counters, and the metric each goes to.
        counters = {
            "malformed": self.metrics.frames_malformed.labels(name),
            "bus_off": self.metrics.bus_off.labels(name),
            "dropped": self.metrics.frames_dropped.labels(name),
            "outages": self.metrics.bus_outages.labels(name),
        }
        counted = dict.fromkeys(counters, 0)

        def count() -> None:
            for key, metric in counters.items():
                value = getattr(source.stats, key)
                metric.inc(value - counted[key])
                counted[key] = value

        # Also with the status line: an interface that is down delivers no batches.
        self._counts.append(count)
        try:
            async for frames in source.batches():
                received.inc(len(frames))
                count()
                self.add(name, frames)
        except SourceError as error:
            log.error("%s", error)
            self.failed_buses.append(name)
        except Exception:
            log.exception("bus %s stopped by an error", name)
            self.failed_buses.append(name)
        finally:
            count()

    def add(self, bus: str, frames: FrameBatch) -> None:
        """Add a bus's frames to its open batch, closing it where they pass its time span
        or would outgrow max_bytes; closed batches go into the spool at once."""
        while len(frames):
            first = self._open[bus].first_t_ns
            if first is None:
                first = int(frames.t_ns[0])
            late = frames.t_ns >= first + self.max_age_ns
            cut = int(np.argmax(late)) if late.any() else len(frames)
            self._open[bus].add(frames.take(slice(0, cut)) if cut < len(frames) else frames)
            if cut == len(frames):
                break
            self._close(bus)
            frames = frames.take(slice(cut, None))
        limit = SIZE_MARGIN * self.config.batch.max_bytes / self._bytes_per_frame
        if self._open[bus].frames >= limit:
            self._close(bus)

    async def _tick(self) -> None:
        """Close batches that have been open `max_age_ms` of wall time; sleeps until the
        oldest one is due (at least TICK_S), so a quiet agent wakes rarely."""
        while True:
            max_age_s = self.config.batch.max_age_ms / 1000  # a reload may change it
            now = time.monotonic()
            self._ticked = now
            for bus, batch in self._open.items():
                if batch.frames and now - batch.opened >= max_age_s:
                    self._close(bus)
            due = min(
                (b.opened + max_age_s for b in self._open.values() if b.frames),
                default=now + max_age_s,
            )
            await asyncio.sleep(max(TICK_S, due - time.monotonic()))

    def _close(self, bus: str) -> None:
        """Decode (and collect) a bus's open batch, and encode it into the spool (nothing
        when empty)."""
        batch, self._open[bus] = self._open[bus], OpenBatch()
        if not batch.frames:
            return
        frames = FrameBatch.concat(batch.pieces)
        decoded = self._decode(bus, frames, count=True)
        if self.collector is None:
            wires = self._encode(decoded, bus)
        else:
            wires = self._collect(lambda c: c.collect(bus, frames, decoded))
        if wires:
            per_frame = sum(len(w) for w in wires) / batch.frames
            if len(wires) > 1:  # it was too large: take no chances with the next one
                self._bytes_per_frame = max(self._bytes_per_frame, per_frame)
            else:
                self._bytes_per_frame = 0.5 * self._bytes_per_frame + 0.5 * per_frame
        self._spool(wires)

    def _flush_rules(self) -> None:
        """At the end: what the collection rules still hold (their open windows)."""
        if self.collector is not None:
            self._spool(self._collect(lambda c: c.flush()))

    def _collect(self, run: Callable[[Collector], Collected]) -> list[WireBatch]:
        """The wire batches of what the rules keep. A failure in a rule costs that batch's
        values, counted and logged, and never the agent."""
        assert self.collector is not None
        started = time.perf_counter()
        try:
            collected = run(self.collector)
            wires = self._encode(collected)
        except Exception:
            log.exception("the collection rules failed on a batch; its values are not sent")
            self.metrics.collect_errors.inc()
            return []
        finally:
            self.metrics.collect_seconds.inc(time.perf_counter() - started)
        kept: dict[str, int] = {}
        for block in collected.blocks:
            values = block.bits.size if block.present is None else block.present.sum()
            kept[block.plan.rule] = kept.get(block.plan.rule, 0) + int(values)
        for capture in collected.raw:
            kept[capture.rule] = kept.get(capture.rule, 0) + len(capture.frames)
        for rule, values in kept.items():
            self.metrics.collect_values.labels(rule).inc(values)
        for mode in self.collector.rules:
            if mode.firings:
                self.metrics.collect_triggers.labels(mode.rule.name).inc(mode.firings)
                mode.firings = 0
        return wires

    def _spool(self, wires: list[WireBatch]) -> None:
        for wire in wires:
            self.spool.add(wire, self.encoder.announcement(wire.schema_id))

    def _decode(self, bus: str, frames: FrameBatch, count: bool) -> DecodedBatch:
        started = time.perf_counter()
        result = self.decoders[bus].decode(frames)
        self.metrics.decode_seconds.inc(time.perf_counter() - started)
        if count:
            self.metrics.frames_decoded.labels(bus).inc(result.decoded)
            self.metrics.frames_unknown.labels(bus).inc(result.unknown)
            self.metrics.error_frames.labels(bus).inc(result.error_frames)
            self.metrics.signals_decoded.labels(bus).inc(result.signals)
            self.totals.frames += result.frames
            self.totals.decoded += result.decoded
            self.totals.unknown += result.unknown
        return result

    def _encode(self, section: Section, bus: str = "") -> list[WireBatch]:
        """The wire batches of a section: one, or more where one would exceed max_bytes
        (it is split in halves until each fits). `bus`: a decoded section's, which is
        decoded again in halves (a decoded batch is views of its frames)."""
        wire = self.encoder.encode([section], self.next_sequence)
        if wire is None:
            return []
        if len(wire) > self.config.batch.max_bytes and _rows(section) > 1:
            if isinstance(section, DecodedBatch):
                frames = section.blocks[0].batch
                middle = len(frames) // 2
                halves: tuple[Section, Section] = (
                    self._decode(bus, frames.take(slice(0, middle)), count=False),
                    self._decode(bus, frames.take(slice(middle, None)), count=False),
                )
            else:
                halves = section.halves()
            return [w for half in halves for w in self._encode(half, bus)]
        self.next_sequence += 1
        self.totals.batches += 1
        self.metrics.batches_built.inc()
        self.metrics.batch_body_bytes.inc(wire.body_size)
        self.metrics.batch_wire_bytes.inc(len(wire))
        return [wire]

    async def _report(self, started: float) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            self._print_status(started)

    def _summary(self, started: float) -> str:
        """The one-line status: for the terminal, and for systemd's STATUS=."""
        elapsed = time.monotonic() - started
        totals = self.totals
        link = "up" if self.sender.connected else "down"
        dropped = "".join(f", {n:,} dropped ({why})" for why, n in self.spool.dropped.items())
        return (
            f"{totals.frames:,} frames ({totals.frames / max(elapsed, 1e-9):,.0f}/s), "
            f"{totals.decoded:,} decoded, {totals.unknown:,} unknown; {totals.batches:,} batches, "
            f"{self.sender.acked:,} acknowledged, {len(self.spool):,} in the spool{dropped}; "
            f"uplink {self.uplink.kind} {self.uplink.target} {link}"
        )

    def _print_status(self, started: float) -> None:
        for count in self._counts:
            count()
        summary = self._summary(started)
        self.notifier.notify(STATUS=summary)
        if self.status is None or self.notifier.enabled:
            return  # under systemd, `systemctl status` shows it, and the journal keeps events
        self.status.write(f"[{time.monotonic() - started:6.1f} s] {summary}\n")
        self.status.flush()

    async def _watchdog(self, services: list[asyncio.Task[None]]) -> None:
        """WATCHDOG=1 while the pipeline makes progress: the tasks that move batches are
        alive, and the batch-age task (which closes the batches of quiet buses) has run
        recently, so the event loop is not stuck. A silent bus is no failure: a parked
        vehicle sends nothing. Without a watchdog (no WATCHDOG_USEC) this ends at once."""
        interval = self.notifier.watchdog_s
        if interval is None:
            return
        stuck = False
        while True:
            await asyncio.sleep(interval / 2)
            late = 0.0 if self._draining else time.monotonic() - self._ticked
            dead = [task.get_name() for task in services if task.done()]
            if dead or late > max(interval / 2, 2 * TICK_S + self.config.batch.max_age_ms / 1000):
                if not stuck:
                    log.error(
                        "no progress (%s): not telling systemd's watchdog",
                        f"{', '.join(dead)} stopped"
                        if dead
                        else f"batch ages unchecked for {late:.1f} s",
                    )
                stuck = True
                continue
            stuck = False
            self.notifier.notify(WATCHDOG=1)

    async def _reload(self) -> None:
        """SIGHUP: apply a valid new config's rules, batch, uplink and log settings; refuse
        an invalid one and keep the running one; name the keys that need a restart."""
        path = self.config_path
        if path is None:
            log.warning("reload: the agent runs on its embedded defaults, no file to read")
            return
        self.notifier.notify(
            RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000, STATUS="reloading"
        )
        try:
            try:
                loaded = load_config(path)
                collector = self.collector
                if rules_key(loaded.collect) != rules_key(self.config.collect):
                    collector = Collector(loaded.collect, self.decoders) if loaded.collect else None
            except ConfigError as error:
                for problem in error.problems:
                    log.error("reload refused, the running config stays: %s: %s", path, problem)
                return
            except CollectError as error:
                log.error("reload refused, the running config stays: %s: %s", path, error)
                return
            self._apply(loaded, collector)
        except Exception:
            log.exception("reload failed; the running config stays where it was not applied")
        finally:
            self.notifier.notify(READY=1, STATUS=self._summary(self._started))

    def _apply(self, loaded: Config, collector: Collector | None) -> None:
        running = self.config
        later = restart_changes(running, loaded)
        if collector is not self.collector:
            self._flush_rules()  # the old rules' open windows go out as they are
            self.collector = collector
            for rule in loaded.collect:
                self.metrics.collect_values.labels(rule.name)
                if rule.mode == "trigger":
                    self.metrics.collect_triggers.labels(rule.name)
            self._filter_sources()
        if loaded.batch.compression != running.batch.compression:
            self.encoder.set_compression(loaded.batch.compression)
        if loaded.uplink != running.uplink:
            self.uplink = create_uplink(loaded.uplink, running.vehicle_id)
            self.sender.replace_uplink(self.uplink)
        set_log_level(loaded.log_level)
        # Everything of the new config but what takes a restart.
        self.config = replace(loaded, **{key: getattr(running, key) for key in RESTART_KEYS})
        log.info("reloaded %s", self.config_path)
        if later:
            log.warning(
                "reload: %s changed, which takes a restart; the running values stay",
                ", ".join(later),
            )


def set_log_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def _rows(section: Section) -> int:
    if isinstance(section, DecodedBatch):
        return section.frames
    return sum(len(b) for b in section.blocks) + sum(len(r.frames) for r in section.raw)
