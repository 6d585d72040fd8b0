"""The wire: protobuf batches with a compressed columnar body (`proto/telemetry.proto`)."""

from agent.wire.codec import (
    FORMAT,
    BatchEncoder,
    ReceivedBatch,
    ReceivedBlock,
    ReceivedRaw,
    SchemaStore,
    Section,
    UnknownSchema,
    WireBatch,
    WireError,
    dbc_hash,
    parse_batch,
    read_envelope,
    wire_batch,
)

__all__ = [
    "FORMAT",
    "BatchEncoder",
    "ReceivedBatch",
    "ReceivedBlock",
    "ReceivedRaw",
    "SchemaStore",
    "Section",
    "UnknownSchema",
    "WireBatch",
    "WireError",
    "dbc_hash",
    "parse_batch",
    "read_envelope",
    "wire_batch",
]
