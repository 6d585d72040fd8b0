"""Where batches go: MQTT, gRPC, or files in a folder."""

from agent.uplinks.base import Uplink, UplinkError, create_uplink

from . import file, grpc, mqtt

__all__ = ["Uplink", "UplinkError", "create_uplink", "file", "grpc", "mqtt"]
