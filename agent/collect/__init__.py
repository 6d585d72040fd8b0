"""Edge computing: collection rules decide on the device which signals leave the vehicle,
how often and in what form (see docs/collection-rules.md)."""

from agent.collect import aggregate, change, faults, keep_all, raw, sample, trigger
from agent.collect.base import Collected, CollectedBlock, RawCapture, Selection
from agent.collect.collector import CollectError, Collector
from agent.collect.rules import CollectRule

# The modes register themselves by name on import.
__all__ = [
    "CollectError",
    "CollectRule",
    "Collected",
    "CollectedBlock",
    "Collector",
    "RawCapture",
    "Selection",
    "aggregate",
    "change",
    "faults",
    "keep_all",
    "raw",
    "sample",
    "trigger",
]
