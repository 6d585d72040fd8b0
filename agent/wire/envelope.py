"""The envelope of a batch (`proto/telemetry.proto`'s Batch) as both ends read it, and the
formats of its body."""

from __future__ import annotations

from dataclasses import dataclass

from agent.wire import telemetry_pb2 as pb

#: The Body layout of what collection rules kept. Format 2 added rules, window statistics
#: and raw frames; a batch of every decoded signal is written as format 1, which it is, so
#: a cloud that reads only format 1 keeps working with an agent that has no rules.
FORMAT = 2
READABLE_FORMATS = (1, 2)


class WireError(ValueError):
    """A batch that cannot be read: corrupt, truncated, oversized or of an unknown format."""


@dataclass(frozen=True, slots=True)
class WireBatch:
    """An encoded batch with the envelope fields the agent needs without parsing it again."""

    stream_id: str
    sequence: int
    frames: int
    signals: int
    first_t_ns: int
    last_t_ns: int
    body_size: int  # before compression
    payload: bytes  # the serialized Batch
    schema_id: bytes  # the Schema it needs; `BatchEncoder.announcement` carries it

    def __len__(self) -> int:
        return len(self.payload)


def read_envelope(payload: bytes) -> pb.Batch:
    """A batch's envelope; WireError when it is none, or of a format this does not read."""
    try:
        batch = pb.Batch.FromString(payload)
    except Exception as error:  # protobuf raises its DecodeError, or others on garbage
        raise WireError(f"not a telemetry batch: {error}") from None
    if batch.format not in READABLE_FORMATS:
        readable = " and ".join(str(f) for f in READABLE_FORMATS)
        raise WireError(
            f"batch format {batch.format} is not supported (this receiver reads {readable})"
        )
    return batch


def wire_batch(payload: bytes) -> WireBatch:
    """The WireBatch of a serialized batch (one read back from the spool)."""
    batch = read_envelope(payload)
    return WireBatch(
        batch.stream_id,
        batch.sequence,
        batch.frames,
        batch.signals,
        batch.first_t_ns,
        batch.last_t_ns,
        batch.body_size,
        payload,
        batch.schema_id,
    )
