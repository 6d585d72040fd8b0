"""Prometheus metrics, prefix `telemetry_agent_`, in the agent's own registry."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from agent import __version__

PREFIX = "telemetry_agent"


def following(counters: Mapping[str, Counter], count: Callable[[str], int]) -> Callable[[], None]:
    """A function that brings each counter up to what `count(key)` says now: for counts
    kept as plain numbers by parts that know nothing of metrics (a source's reader thread,
    a listener)."""
    counted = dict.fromkeys(counters, 0)

    def follow() -> None:
        for key, metric in counters.items():
            value = count(key)
            if value != counted[key]:
                metric.inc(value - counted[key])
                counted[key] = value

    return follow


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.frames_received = counter("frames_received", "Frames read from a bus.", ("bus",))
        self.frames_decoded = counter("frames_decoded", "Frames decoded with a DBC.", ("bus",))
        self.frames_unknown = counter(
            "frames_unknown", "Frames with an ID no DBC of their bus knows.", ("bus",)
        )
        self.frames_malformed = counter(
            "frames_malformed", "Log records that could not be parsed, skipped.", ("bus",)
        )
        self.error_frames = counter("error_frames", "CAN error frames.", ("bus",))
        self.bus_off = counter(
            "bus_off", "Times a bus's controller went bus-off (its error frames say so).", ("bus",)
        )
        self.frames_dropped = counter(
            "frames_dropped",
            "Frames lost before the agent read them: the socket's receive queue was full.",
            ("bus",),
        )
        self.bus_outages = counter(
            "bus_outages", "Times a bus's interface was missing, went away or went down.", ("bus",)
        )
        self.signals_decoded = counter("signals_decoded", "Signal values decoded.", ("bus",))
        self.decode_seconds = counter("decode_seconds", "Time spent decoding frames.")
        self.collect_seconds = counter(
            "collect_seconds", "Time spent running the collection rules over decoded batches."
        )
        self.collect_values = counter(
            "collect_values",
            "Values a collection rule kept (signal values, window statistics, raw frames).",
            ("rule",),
        )
        self.collect_errors = counter(
            "collect_errors",
            "Batches whose collection rules failed (a bug): their values are not sent.",
        )
        self.collect_triggers = counter(
            "collect_triggers", "Times a trigger rule's condition fired.", ("rule",)
        )
        self.diagnostics_requests = counter(
            "diagnostics_requests", "Diagnostic requests sent to a bus's ECUs.", ("bus",)
        )
        self.diagnostics_answers = counter(
            "diagnostics_answers", "Positive answers of ECUs to the agent's requests.", ("bus",)
        )
        self.diagnostics_negative = counter(
            "diagnostics_negative_answers",
            "Negative answers (0x7F) of ECUs: a service or request they refuse.",
            ("bus",),
        )
        self.diagnostics_timeouts = counter(
            "diagnostics_timeouts", "Answers an ECU owed and did not give in time.", ("bus",)
        )
        self.diagnostics_unexpected = counter(
            "diagnostics_unexpected_answers",
            "Answers to no request outstanding (late ones, to an earlier request), dropped.",
            ("bus",),
        )
        self.diagnostics_heard = counter(
            "diagnostics_answers_heard",
            "Answers of ECUs to others' requests, heard (listen = true) and made records.",
            ("bus",),
        )
        self.isotp_messages = counter(
            "isotp_messages", "ISO-TP messages heard whole on a bus (listen = true).", ("bus",)
        )
        self.isotp_aborted = counter(
            "isotp_aborted",
            "ISO-TP messages given up: an overflow, or a first frame over an unfinished one.",
            ("bus",),
        )
        self.isotp_timed_out = counter(
            "isotp_timed_out",
            "ISO-TP messages given up after more than 1 s without their next frame.",
            ("bus",),
        )
        self.isotp_bad_frames = counter(
            "isotp_bad_frames",
            "Frames of the ECUs' conversations that break ISO-TP (a lost frame, garbage).",
            ("bus",),
        )
        self.batches_built = counter("batches_built", "Wire batches built.")
        self.batch_body_bytes = counter(
            "batch_body_bytes", "Bytes of batch bodies before compression."
        )
        self.batch_wire_bytes = counter("batch_wire_bytes", "Bytes of batches on the wire.")
        self.batches_sent = counter(
            "uplink_batches_sent", "Batches handed to the uplink.", ("uplink",)
        )
        self.batches_acked = counter(
            "uplink_batches_acked", "Batches the cloud acknowledged.", ("uplink",)
        )
        self.uplink_failures = counter(
            "uplink_failures", "Connection attempts and links that failed.", ("uplink",)
        )
        self.ack_latency = Histogram(
            f"{PREFIX}_uplink_ack_latency_seconds",
            "From sending a batch to its acknowledgement.",
            ("uplink",),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.uplink_connected = gauge(
            "uplink_connected", "1 while the uplink is connected.", ("uplink",)
        )
        self.spool_batches = gauge("spool_batches", "Batches in the spool, not yet acknowledged.")
        self.spool_bytes = gauge("spool_bytes", "Bytes of the spool's segment files on disk.")
        self.spool_memory_bytes = gauge(
            "spool_memory_bytes", "Bytes of batches the spool keeps in memory."
        )
        self.spool_last_sequence = gauge(
            "spool_last_sequence",
            "Sequence number of the newest batch handed to the uplink: on disk, and with "
            'fsync = "batch" synced. What a power cut may not lose.',
        )
        self.spool_oldest_age = gauge(
            "spool_oldest_age_seconds", "Age of the oldest batch not yet acknowledged."
        )
        self.spool_dropped = counter(
            "spool_dropped_batches",
            "Batches dropped unsent: spool_full (max_bytes), memory_full (while the disk "
            "fails), unreadable (failed its checksum when read back).",
            ("reason",),
        )
        self.spool_recovered = counter(
            "spool_recovered_batches", "Unacknowledged batches found in the spool at start."
        )
        self.spool_damaged = counter(
            "spool_damaged_records",
            "Damaged spool records found at start: torn (cut off by a crash) or corrupt "
            "(moved aside).",
            ("kind",),
        )
        self.spool_disk_errors = counter(
            "spool_disk_errors", "Spool writes, syncs and deletes that failed.", ("operation",)
        )
        self.spool_fsync = Histogram(
            f"{PREFIX}_spool_fsync_seconds",
            "Time of one spool fsync (every segment written since the last one).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=registry,
        )
        # Known label values start at 0, so a scrape shows them before the first event.
        for reason in ("spool_full", "memory_full", "unreadable"):
            self.spool_dropped.labels(reason)
        for kind in ("torn", "corrupt"):
            self.spool_damaged.labels(kind)
        for operation in ("write", "fsync", "state", "delete", "read"):
            self.spool_disk_errors.labels(operation)
        self.build_info = gauge("build_info", "The agent's version.", ("version", "python"))
        self.build_info.labels(__version__, sys.version.split()[0]).set(1)

    def serve(self, listen: str) -> None:
        """Serve /metrics on HOST:PORT in a background thread."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
