"""DBC files loaded through cantools, leniently, with what a strict load would refuse listed."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.decode import cache
from agent.decode.plan import MessageInfo, MessagePlan, SignalInfo


class DbcError(Exception):
    """A DBC file that cannot be used: the message names the file and cantools' reason."""


@dataclass(frozen=True, slots=True)
class Dbc:
    path: Path
    plans: list[MessagePlan]
    #: What cantools warned about while loading, and what a strict load would refuse.
    warnings: list[str]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load_dbc(path: str | Path, *, strict: bool = False, cache_dir: Path | None = None) -> Dbc:
    """Load a DBC file and compile every message into a decode plan.

    Real DBC files overlap signals and mis-flag IDs, so the default is cantools'
    `strict=False`; each message that a strict load would refuse is named in `warnings`.
    With `cache_dir`, what a DBC compiles into is kept there and read back next time.
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DbcError(f"{path}: cannot read the DBC file: {error.strerror or error}") from None
    if cache_dir is None:
        plans, problems = _compile(path, content, strict)
    else:
        entry = cache.key(content, path.name, strict)
        found = cache.load(cache_dir, entry)
        if found is None:
            found = _compile(path, content, strict)
            cache.store(cache_dir, entry, found)
        plans, problems = found
    return Dbc(path, plans, [f"{path}: {problem}" for problem in problems])


def _compile(path: Path, content: bytes, strict: bool) -> tuple[list[MessagePlan], list[str]]:
    """The plans of a DBC's messages, and what loading it warned about."""
    import cantools  # only where no compiled DBC is kept: a tenth of a second

    collect = _Collect()
    logger = logging.getLogger("cantools")
    logger.addHandler(collect)
    # Collected here and listed with the rest, not printed once more by logging itself.
    propagate, logger.propagate = logger.propagate, False
    # Decoded as cantools' load_file decodes a DBC file, line endings included.
    text = io.TextIOWrapper(io.BytesIO(content), encoding="cp1252", errors="replace").read()
    try:
        database: Any = cantools.database.load_string(text, database_format="dbc", strict=strict)
    except Exception as error:  # cantools raises many kinds for a file it cannot parse
        reason = str(error).strip() or type(error).__name__
        raise DbcError(f"{path}: not a valid DBC file: {reason}") from None
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
    problems = list(collect.messages)
    plans = []
    for message in database.messages:
        problems.extend(_strict_problems(message))
        plan = compile_message(message, path.name)
        problems.extend(f"message {message.name}: {problem}" for problem in plan.problems)
        problems.extend(
            f"message {message.name}: another signal named {original.name!r} "
            f"is decoded as {s.name!r}"
            for s, original in zip(plan.signals, message.signals, strict=True)
            if s.name != original.name
        )
        plans.append(plan)
    return plans, problems


def _strict_problems(message: Any) -> list[str]:
    problems = []
    if message.frame_id > 0x7FF and not message.is_extended_frame:
        problems.append(
            f"message {message.name} has ID 0x{message.frame_id:X} but is marked standard; "
            "matched as an extended frame"
        )
    try:
        message.refresh(strict=True)
    except Exception as error:
        problems.append(f"message {message.name}: {error}")
    finally:
        message.refresh(strict=False)
    return problems


def compile_message(message: Any, source: str) -> MessagePlan:
    """A decode plan for one cantools message."""
    info = MessageInfo(
        name=message.name,
        frame_id=message.frame_id,
        # A 29-bit ID can only travel in an extended frame, whatever the DBC's flag says.
        is_extended=bool(message.is_extended_frame or message.frame_id > 0x7FF),
        length=message.length,
        dbc=source,
        cycle_time_ms=message.cycle_time or None,
    )
    # Converters that shorten names can give two signals one name; cantools then returns
    # one value for both. Each keeps its own column here: the first under the DBC's name.
    seen: dict[str, int] = {}
    signals = []
    for signal in message.signals:
        seen[signal.name] = count = seen.get(signal.name, 0) + 1
        signals.append(
            _signal_info(signal, signal.name if count == 1 else f"{signal.name}#{count}")
        )
    return MessagePlan(info, signals)


def _signal_info(signal: Any, name: str) -> SignalInfo:
    choices = signal.choices
    ids = signal.multiplexer_ids
    return SignalInfo(
        name=name,
        start=signal.start,
        length=signal.length,
        byte_order=signal.byte_order,
        is_signed=bool(signal.is_signed),
        is_float=bool(signal.is_float),
        scale=signal.scale,
        offset=signal.offset,
        unit=signal.unit,
        choices={int(k): str(v) for k, v in choices.items()} if choices else None,
        multiplexer=signal.multiplexer_signal,
        multiplexer_ids=frozenset(int(i) for i in ids) if ids is not None else None,
        is_multiplexer=bool(signal.is_multiplexer),
        minimum=signal.minimum,
        maximum=signal.maximum,
    )
