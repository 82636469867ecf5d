"""Redis pub/sub as an :class:`~tagcache.backends.base.InvalidationFeed`: how the in-process
copies of :class:`~tagcache.backends.local.LocalLayer` learn what other processes changed.

The feed keeps connections of its own: one to publish, one subscribed. The subscribed
one is checked with a ``PING`` every ``ping_interval`` seconds without traffic; a reply
missing for two intervals (a server that hangs rather than refuses) counts as a lost
subscription, as does any connection error, and the feed reconnects (to the next
endpoint, on a cluster) after a short pause. On a Redis Cluster a ``PUBLISH`` reaches
the subscribers of every node, so one subscription is enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tagcache.exceptions import BackendError

__all__ = ["DEFAULT_CHANNEL", "RedisFeed"]

logger: Final = logging.getLogger("tagcache")

DEFAULT_CHANNEL: Final = b"tagcache:local"
"""The channel every process of every namespace publishes its changes on."""

#: Pause before reconnecting the subscription, first and longest (seconds).
_RETRY_FIRST: Final = 0.05
_RETRY_MAX: Final = 1.0
#: Connections used to publish at once (more publishers queue).
_PUBLISHERS: Final = 8


class RedisFeed:
    """An invalidation feed over Redis pub/sub.

    :param endpoints: connection options of each server to try, in order (``host``
        and ``port``, or ``path``; plus ``password``, ``username``, TLS options...).
    :param connection_class: redis-py's connection class (``SSLConnection`` for TLS).
    :param socket_timeout: seconds a reply (publish, subscription) may take.
    :param connect_timeout: seconds opening a connection may take.
    :param ping_interval: seconds without traffic after which the subscription is pinged.
    :param channel: the channel used.
    """

    def __init__(
        self,
        endpoints: Sequence[Mapping[str, Any]],
        *,
        connection_class: type[Any] | None = None,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        ping_interval: float = 1.0,
        channel: bytes = DEFAULT_CHANNEL,
    ) -> None:
        if not endpoints:
            raise ValueError("RedisFeed needs at least one endpoint")
        self._endpoints = [dict(e) for e in endpoints]
        self._connection_class = connection_class
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._channel = channel
        self._at = 0  # the endpoint in use
        self._publisher: aioredis.Redis | None = None
        self._publisher_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _client(self, max_connections: int) -> aioredis.Redis:
        options = dict(self._endpoints[self._at % len(self._endpoints)])
        if self._connection_class is not None:
            options["connection_class"] = self._connection_class
        # Blocking: publishers beyond max_connections queue for a connection (bounded
        # by the timeouts) instead of failing.
        pool = aioredis.BlockingConnectionPool(
            max_connections=max_connections,
            timeout=self._connect_timeout + self._socket_timeout,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._connect_timeout,
            **options,
        )
        return aioredis.Redis(connection_pool=pool)

    def _where(self) -> str:
        options = self._endpoints[self._at % len(self._endpoints)]
        if "path" in options:
            return str(options["path"])
        return f"{options.get('host', 'localhost')}:{options.get('port', 6379)}"

    async def publish(self, message: bytes) -> None:
        """``PUBLISH`` ``message``; raise :class:`~tagcache.BackendError` on failure."""
        loop = asyncio.get_running_loop()
        if self._publisher is None or self._publisher_loop is not loop:
            # A client per event loop; one of an earlier loop is dropped, not awaited.
            self._publisher, self._publisher_loop = self._client(_PUBLISHERS), loop
        try:
            await self._publisher.publish(self._channel, message)
        except (RedisError, OSError) as exc:
            self._at += 1  # the next publish tries the next endpoint (a cluster's other node)
            publisher, self._publisher = self._publisher, None
            with contextlib.suppress(Exception):
                await _close(publisher)
            raise BackendError(
                f"Redis publish of a change to {self._where()} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def run(self, on_message: Callable[[bytes], None], on_state: Callable[[bool], None]) -> None:
        """Stay subscribed until cancelled; see :meth:`InvalidationFeed.run`."""
        loop = asyncio.get_running_loop()
        pause = _RETRY_FIRST
        while not self._closed:
            client = self._client(1)
            pubsub = client.pubsub()
            subscribed = False
            try:
                await pubsub.subscribe(self._channel)
                deadline = loop.time() + self._connect_timeout + self._socket_timeout
                while not subscribed:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise TimeoutError("no subscription confirmation")
                    reply = await pubsub.get_message(timeout=left)
                    subscribed = reply is not None and reply["type"] == "subscribe"
                on_state(True)
                pause = _RETRY_FIRST
                heard = loop.time()
                pinged = False
                while True:
                    reply = await pubsub.get_message(timeout=self._ping_interval)
                    now = loop.time()
                    if reply is not None:
                        heard, pinged = now, False
                        if reply["type"] == "message":
                            on_message(reply["data"])
                        continue
                    if pinged and now - heard >= 2 * self._ping_interval:
                        raise TimeoutError(f"no reply to PING in {now - heard:.1f} s")
                    if not pinged:
                        await pubsub.ping()
                        pinged = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if subscribed:
                    logger.warning(
                        "tagcache: lost the subscription to changes at %s (%s: %s); in-process copies "
                        "are dropped and bypassed until it is back",
                        self._where(),
                        type(exc).__name__,
                        exc,
                    )
                self._at += 1
            finally:
                if subscribed:
                    on_state(False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
                with contextlib.suppress(Exception):
                    await _close(client)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)

    async def aclose(self) -> None:
        """Close the publishing connection; a running :meth:`run` is stopped by its caller."""
        self._closed = True
        publisher, self._publisher = self._publisher, None
        if publisher is not None and self._publisher_loop is asyncio.get_running_loop():
            await _close(publisher)


async def _close(client: aioredis.Redis) -> None:
    """Close ``client`` and the connections of its pool (given to it, so not closed by it)."""
    await client.aclose()
    await client.connection_pool.disconnect()
