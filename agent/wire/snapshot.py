"""What a snapshot means on both ends: which signals a request's patterns name, and the
form of each signal in the answer. The agent answers from its last decoded values, the
cloud from the receivers' latest table."""

from __future__ import annotations

import fnmatch
import math
from typing import Any


def named(patterns: list[str], message: str, signal: str) -> bool:
    """Whether a snapshot's patterns (`Signal`, `Message.Signal`, globs; none: every
    signal) name this signal. A window statistic is a signal named `Signal.stat`, so a
    pattern with a dot is tried on the signal's own name too (`Speed.mean`)."""
    qualified = f"{message}.{signal}"
    return not patterns or any(
        fnmatch.fnmatchcase(signal, p) or ("." in p and fnmatch.fnmatchcase(qualified, p))
        for p in patterns
    )


def answer_signal(
    bus: str, message: str, signal: str, value: float | str | None, unit: str, t: float
) -> dict[str, Any]:
    """One signal of an answer, as JSON carries it: a value that is not finite (NaN, inf)
    is null, which JSON has, where it has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        value = None
    return {"bus": bus, "message": message, "signal": signal, "value": value, "unit": unit, "t": t}
