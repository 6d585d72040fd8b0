"""Where frames come from: a replayed log, a SocketCAN interface (our own reader), any
python-can interface, or simulated traffic.

The interface is in `agent.sources.base`. Each kind is one module of this package, imported
only when a bus uses it, so that an agent reading SocketCAN never imports python-can: a new
kind is a new module, named here.
"""

#: source name (the config's `source`) -> the module whose class registers it
KINDS = {
    "replay": "agent.sources.replay",
    "python-can": "agent.sources.pythoncan",
    "simulate": "agent.sources.simulate",
    "socketcan": "agent.sources.socketcan",
}
