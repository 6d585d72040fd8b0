"""What collection works on and what it gives: the selected signals of each message, the
blocks a rule keeps, and the interface every mode implements."""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt

from agent.collect.rules import CollectRule, ModeSettings
from agent.decode import DecodedBatch, MessageBlock, MessageInfo, MessagePlan, SignalInfo
from agent.decode.text import TextArray, text_present
from agent.frames import FrameBatch
from agent.j1939.groups import Groups
from agent.j1939.transport import Transfer

if TYPE_CHECKING:
    from agent.collect.expression import Expression


@dataclass(frozen=True, eq=False, slots=True)
class Selection:
    """What one rule keeps of one message: the columns of its blocks. Made once per rule and
    message, so the encoder's schema can be keyed by identity, as it is by a decoder's
    message plan when no rule applies."""

    info: MessageInfo
    signals: tuple[SignalInfo, ...]  # one per column
    rule: str
    stats: tuple[str, ...] = ()  # per column, for window statistics; empty: raw values
    window_ms: int = 0


@dataclass(slots=True)
class CollectedBlock:
    """Frames of one message that one rule keeps: a time-ordered row per frame (per window
    for statistics), a column per selected signal."""

    bus: str
    plan: Selection
    t_ns: npt.NDArray[np.int64]
    can_id: npt.NDArray[np.uint32]
    bits: npt.NDArray[np.uint64]  # (columns, rows): bit fields, or a statistic's bits
    present: npt.NDArray[np.bool_] | None  # (columns, rows); None: every value is there
    # Text columns by index: a str per row, None where absent; their `present` rows stay
    # clear, as text is in no numeric column.
    texts: dict[int, TextArray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.t_ns)


@dataclass(slots=True)
class RawCapture:
    """Frames of one bus that a raw rule keeps, as the bus carried them."""

    rule: str
    bus: str
    frames: FrameBatch


@dataclass(slots=True)
class Collected:
    """What the rules keep of a batch: the encoder's input when rules are configured."""

    blocks: list[CollectedBlock] = field(default_factory=list)
    raw: list[RawCapture] = field(default_factory=list)
    #: rule -> how often its trigger fired in this batch
    firings: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.blocks) or bool(self.raw)

    def halves(self) -> tuple[Collected, Collected]:
        """Two parts of a batch that would be too large, each with values: the rows up to
        the middle of the time span and after it, or, when every row has one timestamp,
        the blocks (or rows) in two halves. At least two rows are needed."""
        pieces: list[CollectedBlock | RawCapture] = [*self.blocks, *self.raw]
        every = np.concatenate([_times(p) for p in pieces])
        low, high = int(every.min()), int(every.max())
        early, late = Collected(), Collected()
        if low < high:
            k = (len(every) - 1) // 2
            middle = min(int(np.partition(every, k)[k]), high - 1)
            for piece in pieces:
                t_ns = _times(piece)
                early.add(piece, t_ns <= middle)
                late.add(piece, t_ns > middle)
        elif len(pieces) > 1:
            for k, piece in enumerate(pieces):
                (early if k < len(pieces) // 2 else late).add(piece, slice(None))
        else:
            n = len(every)
            early.add(pieces[0], slice(0, n // 2))
            late.add(pieces[0], slice(n // 2, None))
        return early, late

    def add(self, piece: CollectedBlock | RawCapture, rows: npt.NDArray[np.bool_] | slice) -> None:
        """Add these rows of a block or capture, if there are any."""
        if isinstance(rows, np.ndarray) and not rows.any():
            return
        if isinstance(piece, RawCapture):
            self.raw.append(replace(piece, frames=piece.frames.take(rows)))
        else:
            self.blocks.append(take_rows(piece, rows))


def _times(piece: CollectedBlock | RawCapture) -> npt.NDArray[np.int64]:
    return piece.frames.t_ns if isinstance(piece, RawCapture) else piece.t_ns


def take_rows(
    block: CollectedBlock, rows: npt.NDArray[np.bool_] | npt.NDArray[np.intp] | slice
) -> CollectedBlock:
    """The block with only these rows; rows that keep no value are the caller's to avoid."""
    present = None if block.present is None else block.present[:, rows]
    return CollectedBlock(
        block.bus,
        block.plan,
        block.t_ns[rows],
        block.can_id[rows],
        block.bits[:, rows],
        None if present is None or present.all() else present,
        {column: values[rows] for column, values in block.texts.items()},
    )


@dataclass(frozen=True, eq=False, slots=True)
class Target:
    """The signals a rule selects in one message on one bus."""

    bus: str
    plan: MessagePlan
    columns: npt.NDArray[np.intp]  # indices into plan.signals
    selection: Selection
    # On a J1939 bus a message's frame ID holds its sender (the source address): each
    # sender's values are a stream of their own, with their own periods, windows and last
    # value sent.
    by_sender: bool = False

    @property
    def signals(self) -> list[SignalInfo]:
        return [self.plan.signals[c] for c in self.columns.tolist()]

    def senders(self, values: Samples) -> list[tuple[int, Samples]]:
        """A signal's values per sender, keyed by frame ID (-1: all, off J1939)."""
        ids = values.can_id
        if not self.by_sender or not len(ids):
            return [(-1, values)]
        if int(ids.min()) == int(ids.max()):
            return [(int(ids[0]), values)]
        return [(int(i), values.take(ids == i)) for i in np.unique(ids).tolist()]


@dataclass(frozen=True, slots=True)
class Reference:
    """A signal that a trigger's condition names."""

    bus: str
    plan: MessagePlan
    column: int


@dataclass(slots=True)
class Samples:
    """One signal's values in one block: the frames that carry it, in time order."""

    t_ns: npt.NDArray[np.int64]
    can_id: npt.NDArray[np.uint32]
    bits: npt.NDArray[np.uint64]
    value: npt.NDArray[np.float64]  # physical; NaN for text
    text: TextArray | None = None  # a text signal's values

    def take(self, rows: npt.NDArray[np.bool_] | npt.NDArray[np.intp] | slice) -> Samples:
        text = None if self.text is None else self.text[rows]
        return Samples(self.t_ns[rows], self.can_id[rows], self.bits[rows], self.value[rows], text)

    @staticmethod
    def concat(parts: Sequence[Samples]) -> Samples:
        texts = [p.text for p in parts]
        return Samples(
            np.concatenate([p.t_ns for p in parts]),
            np.concatenate([p.can_id for p in parts]),
            np.concatenate([p.bits for p in parts]),
            np.concatenate([p.value for p in parts]),
            None if any(t is None for t in texts) else np.concatenate(texts),  # type: ignore[arg-type]
        )


def time_order(t_ns: npt.NDArray[np.int64]) -> npt.NDArray[np.intp] | None:
    """The order that sorts frames by time, or None when they are in order already: frames
    come in arrival order, and a source that merges several interfaces may be a little out
    of order, which periods, windows and captures must not see."""
    if len(t_ns) < 2 or bool((t_ns[1:] >= t_ns[:-1]).all()):
        return None
    return np.argsort(t_ns, kind="stable")


class BusBatch:
    """One bus's batch as the rules see it: its frames, its decoded blocks by message, and
    each signal's values, computed once however many rules read them."""

    def __init__(
        self,
        bus: str,
        frames: FrameBatch,
        decoded: DecodedBatch,
        groups: Groups | None = None,
    ) -> None:
        """`groups`: the J1939 transfers the batch completed, their groups decoded in
        blocks over frames of their own (`block.batch` is not `frames`)."""
        self.bus = bus
        self.frames = frames
        self.decoded = decoded
        self.transfers: Sequence[Transfer] = groups.transfers if groups else ()
        group_blocks = groups.decoded.blocks if groups and groups.decoded else ()
        # A bus that replays several channels of a log has a block per channel and
        # message; `block.bus` names the channel.
        self._blocks: dict[int, list[MessageBlock]] = {}
        for block in [*decoded.blocks, *group_blocks]:
            self._blocks.setdefault(id(block.plan), []).append(block)
        self._samples: dict[tuple[int, int], Samples] = {}

    def blocks(self, plan: MessagePlan) -> Sequence[MessageBlock]:
        return self._blocks.get(id(plan), ())

    def samples(self, block: MessageBlock, column: int) -> Samples:
        """Signal `column` of a decoded block, where its frames carry it."""
        key = (id(block), column)
        found = self._samples.get(key)
        if found is None:
            info = block.plan.signals[column]
            if info.is_text:
                found = self._samples[key] = _text_samples(block, column)
                return found
            bits = block.bits[column]
            t_ns, can_id = block.t_ns, block.can_id
            present = block.present
            if present is not None and not present[column].all():
                rows = present[column]
                bits, t_ns, can_id = bits[rows], t_ns[rows], can_id[rows]
            order = time_order(t_ns)
            if order is not None:
                bits, t_ns, can_id = bits[order], t_ns[order], can_id[order]
            value = np.asarray(info.physical(info.raw_from_bits(bits)), dtype=np.float64)
            found = self._samples[key] = Samples(t_ns, can_id, bits, value)
        return found


def _text_samples(block: MessageBlock, column: int) -> Samples:
    """A text signal's values in a block, in time order: no bits, no numbers."""
    values = block.texts[column]
    rows = text_present(values)
    t_ns, can_id, text = block.t_ns[rows], block.can_id[rows], values[rows]
    order = time_order(t_ns)
    if order is not None:
        t_ns, can_id, text = t_ns[order], can_id[order], text[order]
    n = len(t_ns)
    return Samples(t_ns, can_id, np.zeros(n, np.uint64), np.full(n, np.nan), text)


def assemble(
    bus: str,
    selection: Selection,
    t_ns: npt.NDArray[np.int64],
    can_id: npt.NDArray[np.uint32],
    column: npt.NDArray[np.intp],
    bits: npt.NDArray[np.uint64],
    text: TextArray | None = None,
) -> CollectedBlock:
    """A block from single values (each with its frame's time and ID, and its column):
    values of one frame share a row. Frames of one ID at one instant (a log's coarse clock)
    are told apart by their order. `text`: each value's text, for text columns."""
    if len(selection.signals) == 1 and text is None:  # a row per value
        order = np.lexsort((can_id, t_ns))
        column_bits = bits[order].reshape(1, -1)
        return CollectedBlock(bus, selection, t_ns[order], can_id[order], column_bits, None)
    order = np.lexsort((column, can_id, t_ns))
    t_ns, can_id, column, bits = t_ns[order], can_id[order], column[order], bits[order]
    text = None if text is None else text[order]
    n = len(t_ns)
    same = np.zeros(n, np.bool_)
    same[1:] = (t_ns[1:] == t_ns[:-1]) & (can_id[1:] == can_id[:-1]) & (column[1:] == column[:-1])
    if same.any():
        # The k-th value of a column at one (time, ID) goes to that instant's k-th row.
        at = np.arange(n)
        occurrence = at - np.maximum.accumulate(np.where(same, 0, at))
        order = np.lexsort((column, occurrence, can_id, t_ns))
        t_ns, can_id, column, bits = t_ns[order], can_id[order], column[order], bits[order]
        occurrence = occurrence[order]
        text = None if text is None else text[order]
    else:
        occurrence = np.zeros(n, np.intp)
    new_row = np.ones(n, np.bool_)
    new_row[1:] = (
        (t_ns[1:] != t_ns[:-1]) | (can_id[1:] != can_id[:-1]) | (occurrence[1:] != occurrence[:-1])
    )
    row = np.cumsum(new_row) - 1
    rows = int(row[-1]) + 1 if n else 0
    width = len(selection.signals)
    matrix = np.zeros((width, rows), np.uint64)
    matrix[column, row] = bits
    present = np.zeros((width, rows), np.bool_)
    present[column, row] = True
    texts: dict[int, TextArray] = {}
    for j, signal in enumerate(selection.signals):
        if signal.is_text and text is not None:
            # Text is in no numeric column: its presence is its values'.
            texts[j] = np.full(rows, None, object)
            texts[j][row[column == j]] = text[column == j]
            present[j] = False
    return CollectedBlock(
        bus,
        selection,
        t_ns[new_row],
        can_id[new_row],
        matrix,
        None if present.all() else present,
        texts,
    )


S = TypeVar("S", bound=ModeSettings)


class Selects(enum.Enum):
    """Which DBC signals a rule of a mode takes."""

    SIGNALS = "signals"  # those its `signals` patterns name
    MESSAGES = "messages"  # all of the messages its `messages` name (none named: none)
    NOTHING = "nothing"  # none: it reads frames of its own


class Mode(abc.ABC, Generic[S]):
    """How a rule keeps the signals it selects. One instance per rule; it holds whatever the
    rule needs across batches (open windows, last values sent, a trigger's ring buffer)."""

    name: ClassVar[str]
    #: Its own keys of a [[collect]] table; the rule's `settings` are of this type
    Settings: ClassVar[type[ModeSettings]] = ModeSettings
    selects: ClassVar[Selects] = Selects.SIGNALS
    #: Why a rule of the mode takes no `signals` (it keeps frames, or faults); empty: it
    #: needs them
    no_signals: ClassVar[str] = ""
    #: What it reads that only J1939 buses carry; a rule of it needs such a bus
    reads_j1939: ClassVar[str] = ""

    @classmethod
    def takes_text(cls, settings: ModeSettings) -> bool:
        """Whether it keeps text signals, which only a mode that sends values as they came
        can; the others leave out the text signals a pattern matches."""
        return False

    @classmethod
    def condition(cls, settings: ModeSettings) -> Expression | None:
        """The condition whose signals the rule reads besides those it keeps."""
        return None

    def __init__(
        self,
        rule: CollectRule,
        targets: Sequence[Target],
        buses: Sequence[str],
        references: Mapping[str, Reference],
    ) -> None:
        """`targets`: the signals the rule selects; `buses`: the buses it applies to;
        `references`: the signals its condition names. The collector has checked that the
        rule's settings are of the mode's `Settings`."""
        self.rule = rule
        self.settings = cast(S, rule.settings)
        self.buses = frozenset(buses)
        self.references = references
        self.targets: dict[str, list[Target]] = {}
        for target in targets:
            self.targets.setdefault(target.bus, []).append(target)

    @abc.abstractmethod
    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        """Add to `out` what the rule keeps of a bus's batch."""

    def frame_ids(self, bus: str) -> frozenset[tuple[int, bool]] | None:
        """The (ID, extended) pairs of the frames the rule reads on a bus (None: every
        frame), for sources that filter in the kernel."""
        return self.message_ids(bus)

    def message_ids(self, bus: str) -> frozenset[tuple[int, bool]]:
        """The (ID, extended) pairs of its targets' and its condition's messages on a bus."""
        plans = [t.plan for t in self.targets.get(bus, ())]
        plans += [r.plan for r in self.references.values() if r.bus == bus]
        return frozenset((p.info.frame_id, p.info.is_extended) for p in plans)

    def blocks(self, batch: BusBatch) -> Iterator[tuple[Target, MessageBlock]]:
        """The decoded blocks of a bus's batch that hold the rule's signals, with the
        target each serves (a message on several channels has a block per channel)."""
        for target in self.targets.get(batch.bus, ()):
            for block in batch.blocks(target.plan):
                yield target, block

    def flush(self, out: Collected) -> None:
        """Add what the rule still holds (open windows) at the end of the stream."""
        return None


MODES: dict[str, type[Mode[Any]]] = {}

M = TypeVar("M", bound=type[Mode[Any]])


def register(mode: M) -> M:
    MODES[mode.name] = mode
    return mode
