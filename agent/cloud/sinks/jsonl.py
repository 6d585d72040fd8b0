"""JSON Lines: one record per frame, as `telemetry-agent decode` writes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TextIO

from agent.cloud.parser import ReceivedBatch
from agent.cloud.sinks.base import Sink
from agent.records import JsonLinesWriter


class JsonLinesSink(Sink):
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, batches: Sequence[ReceivedBatch]) -> list[ReceivedBatch]:
        for batch in batches:
            JsonLinesWriter(self.out, vehicle=batch.vehicle_id).write(batch.blocks, batch.raw)
        self.out.flush()
        return []
