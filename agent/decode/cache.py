"""Compiled DBC files kept on disk, so that a start does not parse them again.

cantools parses a DBC in pure Python: tens of milliseconds for a car's DBC, seconds for a big
J1939 one on a gateway's CPU, and importing cantools (with python-can, which it imports)
costs a tenth of a second more. What the agent keeps of a DBC, its decode plans and what
loading it warned about, is stored here under a key made of the file's content and of the
code that compiled it, and read back in milliseconds.

Entries are pickles, so only a directory and files that this user owns and that no one else
may write are trusted. A damaged, foreign or stale entry is ignored and made again; a cache
that cannot be written only costs the parse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Where the cache is: a directory, or empty for none. Else systemd's CacheDirectory=, else
#: the XDG cache directory.
CACHE_ENV = "TELEMETRY_AGENT_CACHE"
#: Entries kept: each DBC, and each version of it, is one.
MAX_ENTRIES = 64
_SUFFIX = ".dbc.pickle"
#: A temporary file older than this was left by a process that did not finish writing it.
_ABANDONED_S = 3600


def default_cache_dir() -> Path | None:
    explicit = os.environ.get(CACHE_ENV)
    if explicit is not None:
        return Path(explicit) if explicit else None
    systemd = os.environ.get("CACHE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        home = os.environ.get("HOME")
        # Not in another user's home (sudo keeps HOME): its folders would become root's.
        if not home or not _owned(home):
            return None
        base = os.path.join(home, ".cache")
    return Path(base) / "telemetry-agent"


def _owned(path: str) -> bool:
    try:
        return os.stat(path).st_uid == os.geteuid()
    except OSError:
        return False


#: Raised by hand when what an entry holds changes shape.
FORMAT = 1
#: The modules whose code makes or reads entries, stamped by the files they were loaded from.
_COMPILERS = ("agent.decode.cache", "agent.decode.dbc", "agent.decode.plan", "agent.frames")

_code: str | None = None


def _cantools_version() -> str:
    """cantools' version from its installed metadata's folder name, without importing it
    (what a hit saves) or importlib.metadata (a third of that)."""
    spec = importlib.util.find_spec("cantools")
    if spec is None or spec.origin is None:
        return "-"
    site = Path(spec.origin).parent.parent
    found = sorted(p.name for p in site.glob("cantools-*.dist-info"))
    return ",".join(found) or _stamp(spec.origin)


def _stamp(file: str | None) -> str:
    try:
        info = os.stat(file) if file else None
    except OSError:
        info = None
    return f"{info.st_size}:{info.st_mtime_ns}" if info else "-"


def _code_signature() -> str:
    """What made the entries: Python, numpy, cantools and this package, by version, and the
    compiler's own files by size and modification time (an edit or reinstall changes them)."""
    global _code
    if _code is None:
        from agent import __version__

        stamps = []
        for name in _COMPILERS:
            spec = getattr(sys.modules.get(name), "__spec__", None)
            stamps.append(_stamp(spec.origin if spec else None))
        versions = [sys.version, np.__version__, _cantools_version(), __version__, str(FORMAT)]
        _code = "\0".join(versions + stamps)
    return _code


def key(content: bytes, name: str, strict: bool) -> str:
    """The entry of a DBC: its bytes, its file name (plans carry it) and the load mode."""
    digest = hashlib.sha256(content)
    digest.update(f"\0{name}\0{strict}\0{_code_signature()}".encode())
    return digest.hexdigest()


def _trusted(info: os.stat_result) -> bool:
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def load(folder: Path, entry: str) -> Any | None:
    """The value stored under `entry`, or None."""
    try:
        if not _trusted(folder.stat()):
            return None
        with open(folder / (entry + _SUFFIX), "rb") as file:
            if not _trusted(os.fstat(file.fileno())):
                return None
            stored, value = pickle.load(file)
        if stored != entry:
            return None
        # Used now: pruning drops what is least recently used.
        os.utime(file.name)
    except Exception:  # missing, damaged, or made by code that no longer exists
        return None
    return value


def store(folder: Path, entry: str, value: Any) -> None:
    """Keep `value` under `entry`, if the cache can be written; then drop the oldest
    entries beyond MAX_ENTRIES."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _trusted(folder.stat()):
            return
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as file:
                pickle.dump((entry, value), file, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, folder / (entry + _SUFFIX))
        except BaseException:
            os.unlink(temporary)
            raise
        entries = sorted(folder.glob("*" + _SUFFIX), key=lambda p: p.stat().st_mtime_ns)
        for old in entries[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
        # What a power cut left half written.
        for left in folder.glob(".*.tmp"):
            if left.stat().st_mtime < time.time() - _ABANDONED_S:
                left.unlink(missing_ok=True)
    except Exception:  # a read-only or full disk: the DBC is parsed at every start instead
        return
