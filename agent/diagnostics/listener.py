"""Diagnostics on the edge, the hearing part: the answers of ECUs to requests that someone
else sends (a workshop tester, a telematics dongle, an OEM unit polling OBD-II or UDS),
reassembled from a bus's frames (agent/isotp.py) and turned into the same records of the
bus's diagnostics stream as the poller makes of the answers it asks for
(agent/diagnostics/answers.py). It transmits nothing.

Each record carries the time of the frame that completed its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from agent.diagnostics.answers import Answer, AnswerError, answer_frames, heard_answers
from agent.diagnostics.settings import DiagnosticsConfig, request_id, stream_name
from agent.frames import FrameBatch
from agent.isotp import CAN_EFF_FLAG, IsoTpListener

if TYPE_CHECKING:
    from agent.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Heard:
    """The records one batch's frames completed, on one diagnostics stream: `frames`, and
    for each of them the row of the frame that completed its answer in that batch."""

    stream: str
    frames: FrameBatch
    rows: npt.NDArray[np.intp]


class AnswerListener:
    """Hears the answers of the ECUs answering on `ecus` ((response ID, 29-bit)), on every
    bus of the batches it is fed; the ECUs' request IDs follow from their response IDs
    (ISO 15765-4), and carry the flow control of multi-frame answers."""

    def __init__(self, ecus: Iterable[tuple[int, bool]]) -> None:
        self.ecus = frozenset(ecus)
        self.isotp = IsoTpListener(
            (request_id(ecu, x) | flag, ecu | flag)
            for ecu, x in self.ecus
            for flag in [CAN_EFF_FLAG if x else 0]
        )
        self.answers = 0
        self.unreadable = 0

    @classmethod
    def of(cls, config: DiagnosticsConfig) -> AnswerListener:
        """The listener of a [[diagnostics]] table."""
        return cls((ecu, config.extended) for ecu in config.responders)

    def frame_ids(self) -> frozenset[tuple[int, bool]]:
        """(ID, extended) of every frame of the ECUs' conversations: answers and requests."""
        return frozenset(
            (can_id, extended)
            for ecu, extended in self.ecus
            for can_id in (ecu, request_id(ecu, extended))
        )

    def counting(self, metrics: Metrics, bus: str) -> Callable[[], None]:
        """What brings the metrics of `bus` up to this listener's counts."""
        from agent.metrics import following  # the agent's: `decode` counts without metrics

        counters = {
            "answers": metrics.diagnostics_heard.labels(bus),
            "messages": metrics.isotp_messages.labels(bus),
            "aborted": metrics.isotp_aborted.labels(bus),
            "timed_out": metrics.isotp_timed_out.labels(bus),
            "bad_frames": metrics.isotp_bad_frames.labels(bus),
        }
        return following(
            counters,
            lambda key: self.answers if key == "answers" else int(getattr(self.isotp.counts, key)),
        )

    def summary(self) -> str:
        counts = self.isotp.counts
        return (
            f"ISO-TP: {counts.messages} messages, {counts.aborted} aborted, "
            f"{counts.timed_out} timed out, {counts.bad_frames} bad frames; "
            f"{self.answers} diagnostic answers heard, {self.unreadable} unreadable"
        )

    def hear(self, batch: FrameBatch) -> list[Heard]:
        """The records of the answers that the frames of `batch` complete, per stream."""
        found: dict[str, tuple[list[Answer], list[int], list[int]]] = {}
        for message in self.isotp.feed(batch):
            if (message.can_id, message.extended) not in self.ecus:
                continue  # a request, or a frame of the other ID width
            try:
                records = heard_answers(message.can_id, message.data)
            except AnswerError as error:
                self.unreadable += 1
                log.debug(
                    "bus %s: ECU 0x%X: unreadable answer: %s", message.bus, message.can_id, error
                )
                continue
            if not records:
                continue
            self.answers += 1
            answers, times, rows = found.setdefault(stream_name(message.bus), ([], [], []))
            answers += records
            times += [message.t_ns] * len(records)
            rows += [message.row] * len(records)
        return [
            Heard(stream, answer_frames(stream, answers, times), np.array(rows, np.intp))
            for stream, (answers, times, rows) in found.items()
        ]
