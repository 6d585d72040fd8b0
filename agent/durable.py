"""Files that outlive a power cut: written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (files created, renamed, deleted) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, payload: bytes) -> None:
    """Write `final` so that a reader, or a restart after a power cut, sees the whole file
    or the previous one: written under a name no reader picks up and no other write
    shares, flushed, renamed, and the rename flushed with the folder."""
    fd, partial = tempfile.mkstemp(dir=final.parent, prefix=".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    fsync_folder(final.parent)
