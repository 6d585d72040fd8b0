"""The daemon's supervisor: starts the stages of the flow, watches them, reloads them on
SIGHUP and stops them in order.

One task per bus reads its source into the batcher (agent/batcher.py); each closed batch goes
through the pipeline (agent/pipeline.py: decode, collect, encode) into the spool
(agent/spool.py), from which the sender hands batches to the uplink (agent/uplinks/).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from agent.batcher import TICK_S, Batcher
from agent.collect import CollectError, Collector
from agent.collect.rules import CollectRule
from agent.config import (
    RESTART_KEYS,
    Config,
    ConfigError,
    control_url,
    load_config,
    restart_changes,
)
from agent.decode import DbcError, Decoder, bus_decoders, default_cache_dir
from agent.decode.decoder import BusDbcs
from agent.diagnostics.streams import diagnostics_streams
from agent.metrics import Metrics, following
from agent.notify import Notifier
from agent.pipeline import Pipeline, Totals
from agent.snapshot import LastValues
from agent.sources.base import Source, SourceError, create_sources
from agent.spool import Spool
from agent.uplinks.base import create_uplink
from agent.uplinks.sender import Sender
from agent.wire.encoder import BatchEncoder, dbc_hash

if TYPE_CHECKING:
    # Campaigns and health bring cryptography, aiomqtt and grpc: loaded only when configured.
    from agent.campaigns.link import ControlLink
    from agent.campaigns.manager import Campaigns
    from agent.diagnostics.listener import AnswerListener
    from agent.diagnostics.poller import Poller
    from agent.health import Health

log = logging.getLogger(__name__)

#: On Ctrl-C or SIGTERM: how long to wait for the last batches' acknowledgements (what is
#: not acknowledged by then stays in the spool for the next start).
STOP_DRAIN_S = 5.0
#: At start: how long the buses' interfaces may take to open before the agent says it is
#: ready all the same.
READY_WAIT_S = 5.0


class Ending(enum.Enum):
    """Why the agent stops reading its buses."""

    ENDED = "every source has ended"
    STOPPED = "a stop was asked for"
    BROKEN = "a stage stopped by a bug"


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
        # Each bus with a [[diagnostics]] table gets a stream of the ECUs' answers.
        self._answers = diagnostics_streams(config)
        self._campaign_dbc: dict[str, list[Path]] = {}  # the DBC files campaigns brought
        decoders = bus_decoders(self._decoded(self._campaign_dbc), default_cache_dir())
        for name, decoder in decoders.items():
            for warning in decoder.warnings:
                log.warning("bus %s: %s", name, warning)
        self.spool = Spool(config.state_dir / "spool", config.spool, self.metrics)
        self.spool.open()
        self.stream_id = self.spool.stream_id
        self.campaigns: Campaigns | None = None
        self.control: ControlLink | None = None
        last_values = LastValues()
        self.health: Health | None = None
        if config.health.interval_s:
            from agent.health import Health

            self.health = Health(config.vehicle_id, self.metrics.registry, config.health.interval_s)
        if config.campaigns.keys or self.health is not None:
            from agent.campaigns.link import ControlLink
            from agent.campaigns.manager import vehicle_campaigns

            # Checked against the config's own DBCs: `decoders` gets those of the campaigns
            # active now below, which another campaign must not count on.
            self.campaigns = vehicle_campaigns(config, self._answers, decoders)
            self.campaigns.load()
            self.control = ControlLink(
                self.campaigns,
                config.vehicle_id,
                control_url(config.campaigns.url, config.uplink),
                config.uplink.tls,
                config.campaigns.groups,
                self._apply_campaigns,
                config.uplink.keepalive_s,
                last_values.snapshot,
                self.health,
                {
                    bus.name: [hashlib.sha256(path.read_bytes()).hexdigest() for path in bus.dbc]
                    for bus in config.buses
                },
            )
        if self.campaigns is not None and self.campaigns.dbc_files():
            self._campaign_dbc = self.campaigns.dbc_files()
            decoders = bus_decoders(self._decoded(self._campaign_dbc), default_cache_dir())
        encoder = BatchEncoder(
            config.vehicle_id,
            self.stream_id,
            self._dbc_digest(),
            compression=config.batch.compression,
        )
        collector = self._collector(config.collect, decoders)
        self.pipeline = Pipeline(
            decoders, collector, encoder, config.batch, self.spool, self.metrics
        )
        if self.control is not None:
            self.pipeline.last_values = last_values
        self.batcher = Batcher(
            [bus.name for bus in config.buses] + [s.name for s in self._answers],
            config.batch,
            self.pipeline.close,
        )
        self.sources: list[Source] = create_sources(config.buses)
        # Buses whose ECUs' answers to others' requests are heard ([[diagnostics]] listen).
        self._listeners: dict[str, AnswerListener] = {}
        if any(table.listen for table in config.diagnostics):
            from agent.diagnostics.listener import AnswerListener

            self._listeners = {
                table.bus: AnswerListener.of(table) for table in config.diagnostics if table.listen
            }
        self._filter_sources()
        self.uplink = create_uplink(config.uplink, config.vehicle_id)
        self.sender = Sender(self.uplink, self.metrics, self.spool)
        self._stop = asyncio.Event()
        self.failed_buses: list[str] = []
        self._started = time.monotonic()  # when `run` began
        self._draining = False  # the sources have ended or a stop came: no more batch ages
        self._reloading: asyncio.Task[None] | None = None
        self._counts: list[Callable[[], None]] = []  # the sources' counters into metrics

    @property
    def totals(self) -> Totals:
        return self.pipeline.totals

    def stop(self) -> None:
        """Stop as Ctrl-C does: close the open batch, wait briefly for acks, return."""
        if not self._stop.is_set():
            self.notifier.notify(STOPPING=1, STATUS="stopping: delivering the last batches")
        self._stop.set()

    def reload(self) -> None:
        """Read the config file again and apply what can change while running (SIGHUP)."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self._reload())

    def _collector(
        self, file_rules: tuple[CollectRule, ...], decoders: Mapping[str, Decoder]
    ) -> Collector | None:
        """The file's rules and the active campaigns' (agent/campaigns/)."""
        rules = file_rules
        if self.campaigns is not None:
            from agent.campaigns.manager import combined

            rules = combined(file_rules, self.campaigns.rules())
        return Collector(rules, decoders) if rules else None

    def _decoded(self, extra: Mapping[str, list[Path]]) -> list[BusDbcs]:
        """What the agent decodes: the buses with the DBC files campaigns brought, and the
        streams of the ECUs' answers."""
        buses: list[BusDbcs] = list(self.config.buses)
        if extra:  # only campaigns bring DBC files
            from agent.campaigns.manager import with_dbc

            buses = list(with_dbc(self.config.buses, extra))
        return [*buses, *self._answers]

    def _dbc_digest(self) -> bytes:
        """Which definitions decode: the buses' DBC files, those campaigns brought and the
        answers' DBC."""
        return dbc_hash([(bus.name, bus.dbc) for bus in self._decoded(self._campaign_dbc)])

    def _apply_campaigns(self) -> None:
        """The active campaigns changed: run their rules from the open batches on, which
        close at once, as the next ones soon after (the open windows of the old rules go
        out, no frame is lost), and decode with the DBC files they bring."""
        assert self.campaigns is not None
        extra = self.campaigns.dbc_files()
        decoders = self.pipeline.decoders
        try:
            if extra != self._campaign_dbc:
                decoders = bus_decoders(self._decoded(extra), default_cache_dir())
            collector = self._collector(self.config.collect, decoders)
        except (CollectError, DbcError) as error:  # checked on arrival: only a bug comes here
            log.error("campaigns not applied: %s", error)
            return
        self.pipeline.set_rules(collector)
        if extra != self._campaign_dbc:
            self._campaign_dbc = extra
            self.pipeline.decoders = decoders
            self.pipeline.encoder.dbc_digest = self._dbc_digest()
        # The open batches close now, under the new rules, and the next ones soon after: a
        # campaign's first records reach the cloud moments after it arrives, not a whole
        # batch age later.
        self.batcher.rules_changed()
        self._filter_sources()

    def _filter_sources(self) -> None:
        for source in self.sources:
            ids = self.pipeline.frame_ids(source.bus.name)
            listener = self._listeners.get(source.bus.name)
            if ids is not None and listener is not None:
                ids |= listener.frame_ids()  # the ECUs' conversations, which the listener hears
            source.frame_ids = ids

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
        batching = asyncio.create_task(self.batcher.run(), name="batch-age")
        report = asyncio.create_task(self._report(started), name="status")
        control = [asyncio.create_task(self.control.run(), name="control")] if self.control else []
        buses = [
            asyncio.create_task(self._read(source), name=f"bus-{source.bus.name}")
            for source in self.sources
        ]
        # Ready once config, spool and metrics are up and the buses' interfaces were tried:
        # the cloud may well be out of reach, which is normal in a vehicle and no reason to
        # hold systemd back, and so may a bus, which the agent keeps retrying.
        await self._interfaces_tried()
        self.notifier.notify(READY=1, STATUS=self._summary(started))
        watchdog = asyncio.create_task(self._watchdog([spool, sender]), name="watchdog")
        asking = [
            asyncio.create_task(poller.run(), name=f"diagnostics-{poller.bus.name}")
            for poller in self._pollers()
        ]
        try:
            ending = await self._until_end(buses, {spool, sender, batching})
            delivered = await self._wind_down(ending, [*asking, *buses, batching])
        finally:
            tasks = [batching, report, sender, spool, watchdog, *control]
            if self._reloading is not None:
                tasks.append(self._reloading)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.spool.close()
            if self.health is not None:
                self.health.close()
            for signum in handlers:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
        self._print_status(started)
        if not delivered:
            # A stop that came while the spool drained counts as a stop.
            stopped = ending is not Ending.BROKEN and self._stop.is_set()
            log.log(
                logging.WARNING if stopped else logging.ERROR,
                "%d batches not acknowledged by %s (last error: %s); they stay in the spool "
                "%s for the next start",
                len(self.spool),
                self.uplink.target,
                self.sender.last_error or "none",
                self.spool.folder,
            )
            if not stopped:
                return 1
        return 1 if self.failed_buses else 0

    async def _interfaces_tried(self) -> None:
        """Until every source has tried to open its interface, READY_WAIT_S at most (a
        driver that hangs must not keep systemd waiting, nor the watchdog quiet)."""
        deadline = time.monotonic() + READY_WAIT_S
        waiting = [source for source in self.sources if not source.tried.is_set()]
        while waiting and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
            waiting = [source for source in waiting if not source.tried.is_set()]
        for source in waiting:
            log.warning(
                "bus %s: its interface is not open after %.0f s; the agent is ready without it",
                source.bus.name,
                READY_WAIT_S,
            )

    def _pollers(self) -> list[Poller]:
        """A poller per [[diagnostics]] table that asks: the only parts of the agent that
        transmit."""
        from agent.diagnostics.poller import Poller
        from agent.diagnostics.transport import SharedBus, open_transport

        buses = {bus.name: bus for bus in self.config.buses}
        # A python-can interface is read and written through the one bus its source opened.
        shared = {s.bus.name: s for s in self.sources if isinstance(s, SharedBus)}
        return [
            Poller(
                table,
                buses[table.bus],
                self.metrics,
                self.batcher.add,
                functools.partial(open_transport, shared=shared.get(table.bus)),
            )
            for table in self.config.diagnostics
            if not table.listen
        ]

    async def _until_end(
        self, buses: list[asyncio.Task[None]], stages: set[asyncio.Task[None]]
    ) -> Ending:
        """Wait until every bus's task has ended, a stop is asked for, or a stage stops."""
        stop = asyncio.create_task(self._stop.wait())
        running = set(buses)
        try:
            while running and not self._stop.is_set():
                watched = [*running, stop, *stages]
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                broken = done & stages
                for task in broken:
                    # They only end by a bug: say so, and stop rather than run on without.
                    log.error("%s stopped: %r", task.get_name(), task.exception())
                if broken:
                    return Ending.BROKEN
                running -= done
        finally:
            stop.cancel()
        return Ending.STOPPED if self._stop.is_set() else Ending.ENDED

    async def _wind_down(self, ending: Ending, readers: list[asyncio.Task[None]]) -> bool:
        """Stop reading, put the open batches and the rules' open windows into the spool,
        and deliver it; whether every batch was acknowledged."""
        if ending is Ending.ENDED:
            self.notifier.notify(STATUS="every source has ended: delivering the spool")
        self._draining = True
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        self.batcher.close_all()
        self.pipeline.flush()
        await self.spool.sync()
        if ending is Ending.BROKEN:
            return False
        return await self._deliver(stopped=ending is Ending.STOPPED)

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
        count = following(counters, lambda key: int(getattr(source.stats, key)))

        # Also with the status line: an interface that is down delivers no batches.
        self._counts.append(count)
        listener = self._listeners.get(name)
        if listener is not None:
            heard = listener.counting(self.metrics, name)
            self._counts.append(heard)
        try:
            async for frames in source.batches():
                received.inc(len(frames))
                count()
                self.batcher.add(name, frames)
                if listener is not None:
                    try:
                        for answers in listener.hear(frames):
                            self.batcher.add(answers.stream, answers.frames)
                    except Exception:  # a bug: it costs the batch's answers, not the bus
                        log.exception("bus %s: the ECUs' answers of a batch were not read", name)
                    heard()
        except SourceError as error:
            log.error("%s", error)
            self.failed_buses.append(name)
        except Exception:
            log.exception("bus %s stopped by an error", name)
            self.failed_buses.append(name)
        finally:
            count()

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
            late = 0.0 if self._draining else time.monotonic() - self.batcher.ticked
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
                collector = self.pipeline.collector
                if loaded.collect != self.config.collect:
                    decoders = self.pipeline.decoders
                    collector = self._collector(loaded.collect, decoders)
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
        if collector is not self.pipeline.collector:
            self.pipeline.set_rules(collector)
            # As for a campaign: the new rules' first records go out moments after the
            # reload, not a whole batch age later.
            self.batcher.rules_changed()
            self._filter_sources()
        if loaded.batch.compression != running.batch.compression:
            self.pipeline.encoder.set_compression(loaded.batch.compression)
        self.pipeline.batch = self.batcher.config = loaded.batch
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
