"""Where frames come from: a replayed log, a python-can interface, or simulated traffic."""

from agent.sources.base import Source, SourceError, SourceStats, create_source

from . import pythoncan, replay, simulate

__all__ = [
    "Source",
    "SourceError",
    "SourceStats",
    "create_source",
    "pythoncan",
    "replay",
    "simulate",
]
