"""Health: the agent's own metrics and its warning and error log lines, sent up at an
interval on `vehicles/{vehicle}/health` by the control link, for fleets that cannot
scrape a gateway behind a cellular NAT."""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry

from agent.campaigns.manager import utc

HEALTH_TOPIC = "vehicles/{vehicle}/health"
#: Log lines kept between two reports; older ones are counted as dropped.
MAX_LINES = 200


class _Lines(logging.Handler):
    """Warning and error lines, kept until the next report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_LINES)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) == MAX_LINES:
            self.dropped += 1
        self.lines.append(
            {
                "time": utc(record.created),
                "level": record.levelname.lower(),
                "message": record.getMessage(),
            }
        )


class Health:
    """What a health report holds; `close` stops taking log lines."""

    def __init__(self, vehicle: str, registry: CollectorRegistry, interval_s: float) -> None:
        self.vehicle = vehicle
        self.registry = registry
        self.interval_s = interval_s
        self._lines = _Lines()
        logging.getLogger().addHandler(self._lines)

    def report(self) -> bytes:
        """The metrics now (`name{label="value"}` -> value) and the log lines since the
        last report, which it takes."""
        metrics: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # when a counter was made: no news
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                metrics[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        lines, dropped = list(self._lines.lines), self._lines.dropped
        self._lines.lines.clear()
        self._lines.dropped = 0
        return json.dumps(
            {
                "vehicle": self.vehicle,
                "time": utc(time.time()),
                "metrics": metrics,
                "log": lines,
                "log_dropped": dropped,
            }
        ).encode()

    def close(self) -> None:
        logging.getLogger().removeHandler(self._lines)
