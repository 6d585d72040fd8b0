"""make vm-test: the agent on a Debian VM with systemd and SocketCAN (see host.py)."""
