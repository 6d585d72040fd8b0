"""Mode `all`: every value of the selected signals."""

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
from agent.decode import MessageBlock


@register
class KeepAll(Mode):
    name = "all"

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
    if present is not None:
        present = present[target.columns]
        carried = present.any(axis=0)
        if not carried.all():
            bits, present = bits[:, carried], present[:, carried]
            t_ns, can_id = t_ns[carried], can_id[carried]
        if present.all():
            present = None
    if not len(t_ns):
        return None
    order = time_order(t_ns)
    if order is not None:
        t_ns, can_id, bits = t_ns[order], can_id[order], bits[:, order]
        present = None if present is None else present[:, order]
    return CollectedBlock(block.bus, target.selection, t_ns, can_id, bits, present)
