"""Where batches go: MQTT, gRPC, or files in a folder.

The interface is in `agent.uplinks.base`. Each kind is one module of this package, imported
only when the config names it, so that an agent sending over MQTT never loads gRPC: a new
kind is a new module, named here.
"""

#: uplink name (the config's `uplink.kind`) -> the module whose class registers it
KINDS = {
    "mqtt": "agent.uplinks.mqtt",
    "grpc": "agent.uplinks.grpc",
    "file": "agent.uplinks.file",
}
