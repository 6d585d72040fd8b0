"""Mode `all`: every value of the selected signals, text (agent.decode.text) included."""

from __future__ import annotations

from agent.collect.base import (
    BusBatch,
    Collected,
    CollectedBlock,
    Mode,
    Target,
    register,
    time_order,
)
from agent.collect.rules import ModeSettings
from agent.decode import MessageBlock
from agent.decode.text import TextArray, text_present


@register
class KeepAll(Mode[ModeSettings]):
    name = "all"

    @classmethod
    def takes_text(cls, settings: ModeSettings) -> bool:
        return True

    def collect(
        self,
        batch: BusBatch,
        out: Collected,
    ) -> None:
        for target, block in self.blocks(batch):
            piece = selected(target, block)
            if piece is not None:
                out.blocks.append(piece)


def selected(target: Target, block: MessageBlock) -> CollectedBlock | None:
    """The target's signals in the frames of a decoded block that carry any of them."""
    bits = block.bits[target.columns]
    t_ns, can_id = block.t_ns, block.can_id
    present = block.present
    texts = _texts(target, block)
    if present is not None:
        present = present[target.columns]
        carried = present.any(axis=0)
        for values in texts.values():
            carried |= text_present(values)
        if not carried.all():
            bits, present = bits[:, carried], present[:, carried]
            t_ns, can_id = t_ns[carried], can_id[carried]
            texts = {j: values[carried] for j, values in texts.items()}
        if present.all():
            present = None
    if not len(t_ns):
        return None
    order = time_order(t_ns)
    if order is not None:
        t_ns, can_id, bits = t_ns[order], can_id[order], bits[:, order]
        present = None if present is None else present[:, order]
        texts = {j: values[order] for j, values in texts.items()}
    return CollectedBlock(block.bus, target.selection, t_ns, can_id, bits, present, texts)


def _texts(target: Target, block: MessageBlock) -> dict[int, TextArray]:
    """The block's text values of the target's columns, by column of the selection."""
    found = block.texts
    if not found:
        return {}
    return {j: found[c] for j, c in enumerate(target.columns.tolist()) if c in found}
