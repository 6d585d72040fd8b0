"""The sink interface: one small abstract class, one module per kind."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from agent.cloud.parser import ReceivedBatch


class Sink(abc.ABC):
    """Keeps the records of the batches a receiver takes. The receiver hands each batch over
    once (the duplicates it knows of are dropped before), in groups of the batches that
    came while the last group was written, from a thread of its own; it acknowledges a
    batch to the agent only after `write` returns: a sink that keeps data durably makes
    the whole group durable before returning."""

    @abc.abstractmethod
    def write(self, batches: Sequence[ReceivedBatch]) -> list[ReceivedBatch]:
        """Keep these batches' records; the batches it already had (from an earlier
        delivery, or another receiver), which it did not write again. An empty group comes
        about once a second while no batch does, for a sink to close what has grown old."""

    def close(self) -> None:
        """Finish what is open (the receiver stops)."""
        return None
