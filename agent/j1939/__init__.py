"""J1939 beyond single frames, heard passively: transport transfers reassembled, decoded
through the DBC, and DM1/DM2 diagnostic messages decoded into one record per fault."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from agent.decode import DecodedBatch, Decoder
from agent.frames import FrameBatch
from agent.j1939.faults import FAULTS_SOURCE, decode_faults, dm_frames
from agent.j1939.groups import GroupBlock, decode_transfer
from agent.j1939.transport import Reassembler, Transfer, TransportCounts

__all__ = ["GroupBlock", "J1939Listener", "Reassembler", "Transfer", "TransportCounts"]


class J1939Listener:
    """The records of a J1939 bus that a frame decoder does not give: each transfer's
    parameter group (through the decoder's DBCs) and each DM1/DM2 fault. Only buses that
    the decoder reads as J1939 have transport and DM frames."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.reassembler = Reassembler()
        self.faults = 0

    @property
    def counts(self) -> TransportCounts:
        return self.reassembler.counts

    def summary(self) -> str:
        counts = self.counts
        return (
            f"J1939: {counts.transfers} transfers, {counts.aborted} aborted, "
            f"{counts.timed_out} timed out, {counts.bad_frames} bad transport frames; "
            f"{self.faults} DM1/DM2 fault records"
        )

    def listen(self, batch: FrameBatch, decoded: DecodedBatch) -> list[GroupBlock]:
        """The records that the frames of `batch` (which the decoder made `decoded` of)
        complete, in frame order; each record's rows are the row of the frame that
        completed it."""
        transfers = self.reassembler.feed(batch, decoded.transport)
        if len(decoded.diagnostic):
            singles = dm_frames(batch, decoded.diagnostic)
            transfers = sorted([*transfers, *singles], key=lambda t: t.row)
        blocks: list[GroupBlock] = []
        for transfer in transfers:
            block = decode_faults(transfer) or decode_transfer(self.decoder, transfer)
            if block is None:
                continue
            if block.message.dbc == FAULTS_SOURCE and block.present is None:
                self.faults += len(block)
            blocks.append(replace(block, rows=np.full(len(block), transfer.row, np.intp)))
        return blocks
