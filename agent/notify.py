"""systemd's service notifications (sd_notify), spoken directly: a datagram of `KEY=value`
lines to the socket named by NOTIFY_SOCKET. No package needed for a few lines of protocol.

Outside systemd (no NOTIFY_SOCKET) every call does nothing. A notification that cannot be
sent is logged once and never stops the agent: systemd would restart an agent that stops
sending WATCHDOG=1, which is the right outcome for a broken notify socket too.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._failed = False
        self.watchdog_s: float | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is for; another (a child) ignores it.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> None:
        """Send fields in one datagram: `notify(READY=1, STATUS="...")`. A value is one line
        (newlines become spaces)."""
        if not self.address:
            return
        text = "\n".join(
            f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()
        )
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto(text.encode(), self.address)
        except OSError as error:
            if not self._failed:
                log.error("cannot notify systemd at %s: %s", self.address.lstrip("\0"), error)
                self._failed = True
            return
        self._failed = False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
