"""Where frames come from: a replayed log, a SocketCAN interface (our own reader), any
python-can interface, or simulated traffic."""

from agent.sources.base import Source, SourceError, SourceStats, create_sources

from . import pythoncan, replay, simulate, socketcan

__all__ = [
    "Source",
    "SourceError",
    "SourceStats",
    "create_sources",
    "pythoncan",
    "replay",
    "simulate",
    "socketcan",
]
