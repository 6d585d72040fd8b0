"""A loopback TCP proxy that can black-hole its connections, for half-open link tests.

`StallingProxy(target_port)` listens on a free loopback port and forwards each connection
to `127.0.0.1:target_port`. `stall()` makes it a black hole: from then on it forwards no
byte in either direction, yet keeps every socket open. It still reads what each side sends
and drops it, so the peer's writes never block and TCP sees nothing wrong: only an
application-level keepalive (an MQTT PINGREQ, an HTTP/2 PING) can tell the link is dead.
A connection accepted while stalled is black-holed too (accepted, never forwarded).
`resume()` forwards new connections again; a stalled connection stays stalled until the
client closes it, as a link whose path went away does not come back by itself. An upstream
that closes a stalled connection is not passed on to the client either: a black hole passes
nothing, a FIN included.

It runs its own asyncio loop in a thread, so a synchronous test drives it; `close()` (or
leaving the `with` block) closes every socket and joins the thread, within bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: How long a call from the test's thread waits for the proxy's loop, at most.
CALL_TIMEOUT_S = 10.0
CHUNK = 64 * 1024


class _Link:
    """One accepted connection and, unless black-holed from the start, its upstream."""

    def __init__(self, client: asyncio.StreamWriter, stalled: bool) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.stalled = stalled
        self.tasks: set[asyncio.Task[None]] = set()

    def close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def close(self) -> None:
        self.close_upstream()
        self.client.close()


class StallingProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self._stalled = False
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()  # one per accepted connection
        self._accepted: list[float] = []  # time.monotonic() of each accept
        self._accepted_lock = threading.Condition()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"stalling-proxy->{target_port}", daemon=True
        )
        self._thread.start()
        try:
            self.port: int = self._call(self._listen())
        except BaseException:
            self._stop_loop()
            raise

    # The test's side -------------------------------------------------------------------

    @property
    def accepted(self) -> list[float]:
        """When each connection was accepted (time.monotonic()), in order."""
        with self._accepted_lock:
            return list(self._accepted)

    def wait_for_connections(self, count: int, timeout: float) -> float | None:
        """The accept time of the `count`th connection, once there is one; None if it did
        not come within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._accepted_lock:
            while len(self._accepted) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._accepted_lock.wait(left)
            return self._accepted[count - 1]

    def stall(self) -> None:
        """Stop forwarding on every connection, open or to come, until `resume()`."""
        self._call(self._set_stalled(True))

    def resume(self) -> None:
        """Forward new connections again; the stalled ones stay stalled."""
        self._call(self._set_stalled(False))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._shutdown())
        finally:
            self._stop_loop()

    def __enter__(self) -> StallingProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(CALL_TIMEOUT_S)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError("the proxy's thread did not stop")
        self._loop.close()

    # The proxy's loop ------------------------------------------------------------------

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _set_stalled(self, stalled: bool) -> None:
        self._stalled = stalled
        if stalled:
            for link in self._links:
                link.stalled = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, self._stalled)
        self._links.add(link)
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        with self._accepted_lock:
            self._accepted.append(time.monotonic())
            self._accepted_lock.notify_all()
        try:
            if not link.stalled:
                try:
                    up_reader, link.upstream = await asyncio.open_connection(
                        self.host, self.target_port
                    )
                except OSError:
                    return  # nothing listens upstream: the client sees its link close
                self._spawn(link, self._pump(link, up_reader, link.client, from_client=False))
            self._spawn(link, self._pump(link, reader, link.upstream, from_client=True))
            await asyncio.gather(*link.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # close() cancels the handlers. One must still end normally: asyncio's stream
            # server (3.11) asks a finished handler for its exception, which raises for a
            # cancelled one.
            pass
        finally:
            link.close()
            self._links.discard(link)
            self._handlers.discard(handler)

    def _spawn(self, link: _Link, work: Coroutine[Any, Any, None]) -> None:
        link.tasks.add(asyncio.get_running_loop().create_task(work))

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None,
        from_client: bool,
    ) -> None:
        """Copy one direction until its sender closes; drop the bytes while stalled."""
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                if link.stalled or writer is None:
                    continue
                writer.write(data)
                await writer.drain()
        if from_client or not link.stalled:
            # The client went away, or the upstream did while forwarding: end the link.
            link.close()
            for task in link.tasks:
                if task is not asyncio.current_task():
                    task.cancel()
        else:
            link.close_upstream()  # a black hole keeps the client's side open

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        writers = [w for link in self._links for w in (link.client, link.upstream) if w]
        for link in list(self._links):
            link.close()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()  # its pumps end with it: gather cancels what it waits for
        await asyncio.gather(*handlers, return_exceptions=True)
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
