"""Vectorised DBC decoding: cantools parses the DBC, numpy decodes whole frame batches."""

from agent.decode.cache import default_cache_dir
from agent.decode.dbc import Dbc, DbcError, load_dbc
from agent.decode.decoder import ALL_BUSES, DecodedBatch, Decoder, bus_decoders, j1939_pgn
from agent.decode.plan import MessageBlock, MessageInfo, MessagePlan, SignalColumn, SignalInfo

__all__ = [
    "ALL_BUSES",
    "Dbc",
    "DbcError",
    "DecodedBatch",
    "Decoder",
    "MessageBlock",
    "MessageInfo",
    "MessagePlan",
    "SignalColumn",
    "SignalInfo",
    "bus_decoders",
    "default_cache_dir",
    "j1939_pgn",
    "load_dbc",
]
