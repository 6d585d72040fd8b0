"""Where frames come from: a replayed log, a python-can interface, or simulated traffic."""

from agent.sources.base import Source, SourceError, SourceStats, create_sources

from . import pythoncan, replay, simulate

__all__ = [
    "Source",
    "SourceError",
    "SourceStats",
    "create_sources",
    "pythoncan",
    "replay",
    "simulate",
]
