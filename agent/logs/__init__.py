"""Recorded CAN logs read as frame batches: candump by a numpy parser, the rest via python-can."""

from agent.logs.base import (
    DEFAULT_BATCH_FRAMES,
    LogError,
    LogReader,
    LogStats,
    formats,
    open_log,
)

from . import candump, pythoncan

__all__ = [
    "DEFAULT_BATCH_FRAMES",
    "LogError",
    "LogReader",
    "LogStats",
    "candump",
    "formats",
    "open_log",
    "pythoncan",
]
