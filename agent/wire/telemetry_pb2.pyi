from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_PLAIN: _ClassVar[Encoding]
    ENCODING_DELTA: _ClassVar[Encoding]
    ENCODING_DELTA2: _ClassVar[Encoding]
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression
ENCODING_PLAIN: Encoding
ENCODING_DELTA: Encoding
ENCODING_DELTA2: Encoding

class Batch(_message.Message):
    __slots__ = ("format", "vehicle_id", "stream_id", "sequence", "first_t_ns", "last_t_ns", "frames", "signals", "compression", "dbc_hash", "body_size", "body", "schema_id", "schema")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    FIRST_T_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_T_NS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    DBC_HASH_FIELD_NUMBER: _ClassVar[int]
    BODY_SIZE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_ID_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    format: int
    vehicle_id: str
    stream_id: str
    sequence: int
    first_t_ns: int
    last_t_ns: int
    frames: int
    signals: int
    compression: Compression
    dbc_hash: bytes
    body_size: int
    body: bytes
    schema_id: bytes
    schema: bytes
    def __init__(self, format: _Optional[int] = ..., vehicle_id: _Optional[str] = ..., stream_id: _Optional[str] = ..., sequence: _Optional[int] = ..., first_t_ns: _Optional[int] = ..., last_t_ns: _Optional[int] = ..., frames: _Optional[int] = ..., signals: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., dbc_hash: _Optional[bytes] = ..., body_size: _Optional[int] = ..., body: _Optional[bytes] = ..., schema_id: _Optional[bytes] = ..., schema: _Optional[bytes] = ...) -> None: ...

class Schema(_message.Message):
    __slots__ = ("buses", "blocks")
    BUSES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    buses: _containers.RepeatedScalarFieldContainer[str]
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    def __init__(self, buses: _Optional[_Iterable[str]] = ..., blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ...) -> None: ...

class Body(_message.Message):
    __slots__ = ("blocks", "frames", "time_unit_ns", "encodings", "values", "value_width", "present", "raw", "texts")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIT_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    VALUE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedScalarFieldContainer[int]
    frames: _containers.RepeatedScalarFieldContainer[int]
    time_unit_ns: int
    encodings: bytes
    values: bytes
    value_width: int
    present: bytes
    raw: _containers.RepeatedCompositeFieldContainer[RawFrames]
    texts: _containers.RepeatedCompositeFieldContainer[TextValues]
    def __init__(self, blocks: _Optional[_Iterable[int]] = ..., frames: _Optional[_Iterable[int]] = ..., time_unit_ns: _Optional[int] = ..., encodings: _Optional[bytes] = ..., values: _Optional[bytes] = ..., value_width: _Optional[int] = ..., present: _Optional[bytes] = ..., raw: _Optional[_Iterable[_Union[RawFrames, _Mapping]]] = ..., texts: _Optional[_Iterable[_Union[TextValues, _Mapping]]] = ...) -> None: ...

class TextValues(_message.Message):
    __slots__ = ("block", "signal", "frames", "values")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    block: int
    signal: int
    frames: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, block: _Optional[int] = ..., signal: _Optional[int] = ..., frames: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class RawFrames(_message.Message):
    __slots__ = ("rule", "bus", "frames", "flags", "lengths", "data")
    RULE_FIELD_NUMBER: _ClassVar[int]
    BUS_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    rule: str
    bus: int
    frames: int
    flags: bytes
    lengths: bytes
    data: bytes
    def __init__(self, rule: _Optional[str] = ..., bus: _Optional[int] = ..., frames: _Optional[int] = ..., flags: _Optional[bytes] = ..., lengths: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("bus", "message", "frame_id", "extended", "has_can_id", "signals", "rule", "window_ms")
    BUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    EXTENDED_FIELD_NUMBER: _ClassVar[int]
    HAS_CAN_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNALS_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    bus: int
    message: str
    frame_id: int
    extended: bool
    has_can_id: bool
    signals: _containers.RepeatedCompositeFieldContainer[Signal]
    rule: str
    window_ms: int
    def __init__(self, bus: _Optional[int] = ..., message: _Optional[str] = ..., frame_id: _Optional[int] = ..., extended: _Optional[bool] = ..., has_can_id: _Optional[bool] = ..., signals: _Optional[_Iterable[_Union[Signal, _Mapping]]] = ..., rule: _Optional[str] = ..., window_ms: _Optional[int] = ...) -> None: ...

class Signal(_message.Message):
    __slots__ = ("name", "length", "is_signed", "is_float", "scale", "offset", "stat")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    IS_SIGNED_FIELD_NUMBER: _ClassVar[int]
    IS_FLOAT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    length: int
    is_signed: bool
    is_float: bool
    scale: float
    offset: float
    stat: str
    def __init__(self, name: _Optional[str] = ..., length: _Optional[int] = ..., is_signed: _Optional[bool] = ..., is_float: _Optional[bool] = ..., scale: _Optional[float] = ..., offset: _Optional[float] = ..., stat: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("stream_id", "sequence")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    sequence: int
    def __init__(self, stream_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

class CampaignsRequest(_message.Message):
    __slots__ = ("vehicle_id", "groups")
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    vehicle_id: str
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vehicle_id: _Optional[str] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class Campaign(_message.Message):
    __slots__ = ("topic", "document")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    topic: str
    document: bytes
    def __init__(self, topic: _Optional[str] = ..., document: _Optional[bytes] = ...) -> None: ...

class ControlUp(_message.Message):
    __slots__ = ("hello", "checkin", "snapshot_answer", "health", "dbc_wanted")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    CHECKIN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_ANSWER_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    DBC_WANTED_FIELD_NUMBER: _ClassVar[int]
    hello: CampaignsRequest
    checkin: bytes
    snapshot_answer: bytes
    health: bytes
    dbc_wanted: DbcWanted
    def __init__(self, hello: _Optional[_Union[CampaignsRequest, _Mapping]] = ..., checkin: _Optional[bytes] = ..., snapshot_answer: _Optional[bytes] = ..., health: _Optional[bytes] = ..., dbc_wanted: _Optional[_Union[DbcWanted, _Mapping]] = ...) -> None: ...

class DbcWanted(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class DbcFile(_message.Message):
    __slots__ = ("sha256", "data")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    data: bytes
    def __init__(self, sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ControlDown(_message.Message):
    __slots__ = ("campaign", "snapshot_request", "dbc")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    DBC_FIELD_NUMBER: _ClassVar[int]
    campaign: Campaign
    snapshot_request: bytes
    dbc: DbcFile
    def __init__(self, campaign: _Optional[_Union[Campaign, _Mapping]] = ..., snapshot_request: _Optional[bytes] = ..., dbc: _Optional[_Union[DbcFile, _Mapping]] = ...) -> None: ...

class VehiclesRequest(_message.Message):
    __slots__ = ("vehicle_ids",)
    VEHICLE_IDS_FIELD_NUMBER: _ClassVar[int]
    vehicle_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, vehicle_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("vehicle_id", "document")
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    vehicle_id: str
    document: bytes
    def __init__(self, vehicle_id: _Optional[str] = ..., document: _Optional[bytes] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("vehicle_id", "request")
    VEHICLE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    vehicle_id: str
    request: bytes
    def __init__(self, vehicle_id: _Optional[str] = ..., request: _Optional[bytes] = ...) -> None: ...
