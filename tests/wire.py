"""A loopback TCP proxy in front of Redis that counts request/response turns.

A *turn* is a burst of client-to-server bytes on one connection that follows
a server reply (or opens the connection): a pipeline of many commands
written at once is one turn; a command sent after the reply to the previous
one is another. Usage (``CountingProxy(redis_url)`` works the same as ``count_turns``)::

    async with count_turns(redis_url) as wire:
        backend = RedisBackend.from_url(wire.url_for(15))
        ...
        wire.reset()
        await backend.get("ns", "key")
        assert wire.turns == 1

``hold()`` keeps server replies in the proxy (the client sees a slow server)
until ``release()``, to put a request in flight deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

__all__ = ["CountingProxy", "Wire", "count_turns"]


class Wire:
    """The running proxy: its port, the turns counted and a gate on server replies."""

    def __init__(self, target_url: str) -> None:
        parts = urlsplit(target_url)
        if parts.scheme not in ("redis", ""):
            raise ValueError(f"the counting proxy supports redis:// URLs only, got {target_url!r}")
        self._parts = parts
        self._host = parts.hostname or "127.0.0.1"
        self._target_port = parts.port or 6379
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._gate = asyncio.Event()
        self._gate.set()
        self._counted = asyncio.Event()
        #: Request turns counted over all connections since the last reset().
        self.turns = 0
        #: Connections accepted so far.
        self.connections = 0
        self.port = 0

    def url_for(self, db: int | None = None) -> str:
        """A ``redis://`` URL through the proxy, with the target's credentials, for ``db``
        (default: the target URL's database)."""
        parts = self._parts
        auth = ""
        if parts.username or parts.password:
            auth = f"{parts.username or ''}:{parts.password or ''}@"
        path = f"/{db}" if db is not None else parts.path
        return urlunsplit(("redis", f"{auth}127.0.0.1:{self.port}", path, parts.query, ""))

    @property
    def url(self) -> str:
        """A ``redis://`` URL through the proxy to the target URL's database."""
        return self.url_for()

    async def __aenter__(self) -> Wire:
        await self._start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    def reset(self) -> None:
        """Set the turn counter back to zero."""
        self.turns = 0

    def hold(self) -> None:
        """Keep server replies in the proxy until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        """Deliver held and further server replies."""
        self._gate.set()

    async def wait_turns(self, turns: int, timeout: float = 5.0) -> None:
        """Wait until at least ``turns`` turns were counted."""

        async def poll() -> None:
            while self.turns < turns:
                self._counted.clear()
                await self._counted.wait()

        await asyncio.wait_for(poll(), timeout)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        # "c" after client bytes, "s" after server bytes: a client burst after
        # a server reply (or first on the connection) starts a new turn.
        state = ["s"]

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if state[0] != "c":
                    state[0] = "c"
                    self.turns += 1
                    self._counted.set()
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                await self._gate.wait()
                state[0] = "s"
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.ensure_future(client_to_server()), asyncio.ensure_future(server_to_client())]
        for pump in pumps:
            self._tasks.add(pump)
            pump.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _stop(self) -> None:
        self._gate.set()
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)


@contextlib.asynccontextmanager
async def count_turns(target_url: str) -> AsyncIterator[Wire]:
    """Run a counting proxy to the Redis at ``target_url`` for the duration of the block."""
    async with Wire(target_url) as wire:
        yield wire


#: The proxy as an async context manager: ``async with CountingProxy(url) as proxy``.
CountingProxy = Wire
