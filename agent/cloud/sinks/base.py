"""The sink interface: one small abstract class, one module per kind."""

from __future__ import annotations

import abc

from agent.cloud.parser import ReceivedBatch


class Sink(abc.ABC):
    """Keeps the records of the batches a receiver takes. The receiver hands each batch over
    once (duplicates are dropped before) and acknowledges it to the agent only after
    `write` returns: a sink that keeps data durably makes it durable before returning."""

    @abc.abstractmethod
    def write(self, batch: ReceivedBatch) -> None:
        """Keep one batch's records."""

    def close(self) -> None:
        """Finish what is open (the receiver stops)."""
        return None
