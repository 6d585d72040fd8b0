"""The one entry point: `telemetry-agent COMMAND ...` (also `python -m agent`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _may_read_mf4(argv: Sequence[str]) -> bool:
    """Whether this command line could read an MF4 log: an argument, or a file it names
    (a config), that mentions mf4. Errs towards yes."""
    for arg in argv:
        for part in (arg, arg.partition("=")[2]):
            if "mf4" in part.lower():
                return True
            path = Path(part)
            try:
                small = path.is_file() and path.stat().st_size < 1 << 20
                if small and b"mf4" in path.read_bytes().lower():
                    return True
            except OSError:
                continue  # the command reports it
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not _may_read_mf4(args):
        # python-can imports asammdf, where it is installed, for its MF4 reader alone: 50 MB
        # and a quarter of a second at every start. A command that reads no MF4 log keeps
        # it out; python-can then reports MF4 as unavailable, which nothing here asks for.
        sys.modules.setdefault("asammdf", None)  # type: ignore[arg-type]
    # The agent does no linear algebra. numpy's OpenBLAS would start a thread per core when
    # numpy is imported (0.05 s of CPU at every start, spent spinning) and keep them idle.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from agent import commands

    return commands.main(args)
