"""How batches travel, as both ends agree on it: the files of the file uplink, and the gRPC
stream's method and keepalive."""

from __future__ import annotations

SUFFIX = ".batch"
SCHEMA_SUFFIX = ".schema"


def batch_file_name(stream_id: str, sequence: int) -> str:
    """Names sort in sending order within a stream."""
    return f"{stream_id}-{sequence:012d}{SUFFIX}"


STREAM_METHOD = "/telemetry.v1.Telemetry/Stream"
CONTROL_METHOD = "/telemetry.v1.Telemetry/Control"
#: The cloud's tools' calls (docs/campaigns.md).
CHECKINS_METHOD = "/telemetry.v1.Telemetry/Checkins"
HEALTH_METHOD = "/telemetry.v1.Telemetry/Health"
SNAPSHOT_METHOD = "/telemetry.v1.Telemetry/Snapshot"


def channel_options(keepalive_s: int) -> list[tuple[str, int]]:
    """The keepalive of both ends: a PING after `keepalive_s` without reading anything, and
    the link given up when its ack has not come `keepalive_s` later (10 s at most), so a
    half-open link is noticed within twice the keepalive, as over MQTT."""
    ping_timeout_ms = min(keepalive_s, 10) * 1000
    return [
        ("grpc.keepalive_time_ms", keepalive_s * 1000),
        ("grpc.keepalive_timeout_ms", ping_timeout_ms),
        # What bounds a keepalive PING's wait for its ack in grpcio 1.85 (chttp2): the HTTP/2
        # ping timeout, one minute by default; keepalive_timeout_ms alone does not (measured
        # through a stalled proxy: with both at 2 s and this unset, nothing noticed in 20 s).
        ("grpc.http2.ping_timeout_ms", ping_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ]
