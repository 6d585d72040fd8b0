"""The pipeline: a closed batch of one bus decoded in one pass, passed through the
collection rules where there are any, encoded into wire batches and put into the spool, from
which the uplink takes them (agent/spool.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.collect import Collected, Collector
from agent.config import BatchConfig
from agent.decode import DecodedBatch, Decoder
from agent.frames import FrameBatch
from agent.j1939.groups import GroupReader
from agent.metrics import Metrics
from agent.snapshot import LastValues
from agent.spool import Spool
from agent.wire.encoder import BatchEncoder
from agent.wire.envelope import WireBatch

log = logging.getLogger(__name__)


@dataclass
class Totals:
    """What the status line reports."""

    frames: int = 0
    decoded: int = 0
    unknown: int = 0
    batches: int = 0


class Pipeline:
    def __init__(
        self,
        decoders: Mapping[str, Decoder],
        collector: Collector | None,
        encoder: BatchEncoder,
        batch: BatchConfig,
        spool: Spool,
        metrics: Metrics,
    ) -> None:
        self.decoders = decoders
        self.collector: Collector | None = None
        self.encoder = encoder
        self.batch = batch  # a reload may replace it
        self.spool = spool
        self.metrics = metrics
        self.next_sequence = spool.next_sequence
        self.totals = Totals()
        #: The last value of each signal, for snapshots; None: not asked for (no control link)
        self.last_values: LastValues | None = None
        #: The J1939 groups that transfers carry, sent as any message
        self.groups = GroupReader()
        self.set_rules(collector)

    def set_rules(self, collector: Collector | None) -> None:
        """Run other collection rules from now on; what the old ones still hold (their open
        windows) goes out as it is."""
        self.flush()
        self.collector = collector
        for mode in collector.rules if collector else ():
            # Every rule shows in the metrics from the start, at 0.
            self.metrics.collect_values.labels(mode.rule.name)
            if mode.condition(mode.settings) is not None:  # a rule that fires
                self.metrics.collect_triggers.labels(mode.rule.name)

    def frame_ids(self, bus: str) -> frozenset[tuple[int, bool]] | None:
        """The (ID, extended) pairs of the frames used on a bus, for a source that can
        filter in the kernel: those its DBCs decode, or those its rules read. None (all) on
        J1939 buses, whose IDs vary in priority and source address, and where a rule
        captures every frame."""
        decoder = self.decoders[bus]
        if decoder.is_j1939(bus):
            return None
        if self.collector is None:
            return frozenset((p.info.frame_id, p.info.is_extended) for p in decoder.messages(bus))
        return self.collector.frame_ids(bus)

    def close(self, bus: str, frames: FrameBatch) -> list[int]:
        """Decode, collect and encode a bus's closed batch into the spool; the sizes of the
        wire batches it made."""
        decoded = self._decode(bus, frames, count=True)
        groups = self.groups.read(self.decoders[bus], bus, frames, decoded)
        decoded_groups = groups.decoded if groups else None
        if decoded_groups is not None and self.last_values is not None:
            self.last_values.update(bus, decoded_groups)
        if self.collector is None:
            wires = self._encode_decoded(bus, frames, decoded, decoded_groups)
        else:
            wires = self._collect(lambda c: c.collect(bus, frames, decoded, groups))
        self._spool(wires)
        return [len(wire) for wire in wires]

    def flush(self) -> None:
        """What the collection rules still hold (their open windows), into the spool."""
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
        for rule, firings in collected.firings.items():
            self.metrics.collect_triggers.labels(rule).inc(firings)
        return wires

    def _spool(self, wires: list[WireBatch]) -> None:
        for wire in wires:
            self.spool.add(wire, self.encoder.announcement(wire.schema_id))

    def _decode(self, bus: str, frames: FrameBatch, count: bool) -> DecodedBatch:
        started = time.perf_counter()
        result = self.decoders[bus].decode(frames)
        self.metrics.decode_seconds.inc(time.perf_counter() - started)
        if count and self.last_values is not None:
            self.last_values.update(bus, result)
        if count:
            self.metrics.frames_decoded.labels(bus).inc(result.decoded)
            self.metrics.frames_unknown.labels(bus).inc(result.unknown)
            self.metrics.error_frames.labels(bus).inc(result.error_frames)
            self.metrics.signals_decoded.labels(bus).inc(result.signals)
            self.totals.frames += result.frames
            self.totals.decoded += result.decoded
            self.totals.unknown += result.unknown
        return result

    def _encode_decoded(
        self,
        bus: str,
        frames: FrameBatch,
        decoded: DecodedBatch,
        groups: DecodedBatch | None = None,
    ) -> list[WireBatch]:
        """The wire batches of a decoded batch (and of the groups its transfers completed):
        one, or, where one would exceed max_bytes, those of its frames' halves, the groups
        apart. The halves are decoded again: a decoded batch is views of its frames, and a
        batch too large is rare."""
        sections = [decoded] if groups is None else [decoded, groups]
        wire = self.encoder.encode(sections, self.next_sequence)
        if wire is None:
            return []
        if len(wire) > self.batch.max_bytes and len(frames) > 1:
            middle = len(frames) // 2
            halves = (frames.take(slice(0, middle)), frames.take(slice(middle, None)))
            wires = [
                batch
                for half in halves
                for batch in self._encode_decoded(bus, half, self._decode(bus, half, count=False))
            ]
            alone = None if groups is None else self.encoder.encode([groups], self.next_sequence)
            return wires if alone is None else [*wires, self._built(alone)]
        return [self._built(wire)]

    def _encode(self, collected: Collected) -> list[WireBatch]:
        """The wire batches of what the rules kept: one, or more where one would exceed
        max_bytes (split in halves until each fits)."""
        wire = self.encoder.encode([collected], self.next_sequence)
        if wire is None:
            return []
        if len(wire) > self.batch.max_bytes and _rows(collected) > 1:
            return [w for half in collected.halves() for w in self._encode(half)]
        return [self._built(wire)]

    def _built(self, wire: WireBatch) -> WireBatch:
        """A wire batch that goes out: its sequence number is taken."""
        self.next_sequence += 1
        self.totals.batches += 1
        self.metrics.batches_built.inc()
        self.metrics.batch_body_bytes.inc(wire.body_size)
        self.metrics.batch_wire_bytes.inc(len(wire))
        return wire


def _rows(collected: Collected) -> int:
    return sum(len(b) for b in collected.blocks) + sum(len(r.frames) for r in collected.raw)
