"""What a snapshot request means on both ends: which signals its patterns name. The agent
answers from its last decoded values, the cloud from the receivers' latest table."""

from __future__ import annotations

import fnmatch


def named(patterns: list[str], message: str, signal: str) -> bool:
    """Whether a snapshot's patterns (`Signal`, `Message.Signal`, globs; none: every
    signal) name this signal. A window statistic is a signal named `Signal.stat`, so a
    pattern with a dot is tried on the signal's own name too (`Speed.mean`)."""
    qualified = f"{message}.{signal}"
    return not patterns or any(
        fnmatch.fnmatchcase(signal, p) or ("." in p and fnmatch.fnmatchcase(qualified, p))
        for p in patterns
    )
