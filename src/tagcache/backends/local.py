"""An in-process L1 in front of a shared backend, kept coherent by pushed changes.

::

    cache = Cache.from_url("redis://127.0.0.1:6379/0", namespace="app",
                           local=LocalCache(max_entries=10_000, ttl=5))

:class:`LocalLayer` wraps the shared backend (:class:`~tagcache.backends.RedisBackend` or
:class:`~tagcache.backends.RedisClusterBackend`) and is itself a
:class:`~tagcache.backends.Backend`, so the decorator, ``get_or_set``, the query cache
and the response cache use it unchanged. What it holds:

- copies of entries read or written by this process, each with the entry's exact tags
  (from the write, or read back with ``peek`` after a read found the entry), for at
  most ``ttl`` seconds (and never past the entry's own expiry), bounded by
  ``max_entries`` and ``max_bytes`` (least recently used first out). A copy is served
  without a round trip; the cache decodes a private copy of the value for each read,
  as it does for the memory backend.

How it stays coherent:

- **In this process**, a write, delete, clear or invalidation drops the copies it
  touches before it returns, and a copy read from the shared store is kept only if
  no change that may concern it (its key, one of its tags, its namespace cleared,
  the feed lost) was made or heard while it was read: a read that begins after
  ``invalidate_tags`` returned never sees the old value.
- **Across processes**, every change is published on the shared store's
  :class:`~tagcache.backends.base.InvalidationFeed` (Redis pub/sub) after it is
  made, and every process drops what it hears. A copy in another process can be
  served until the message arrives: staleness is bounded by propagation
  (``benchmarks/propagation.py`` measures it).
- **When the feed is lost** (a connection error, or a server that stops answering
  pings), every copy is dropped and none is served or kept until the subscription
  is back; the copies' own ``ttl`` bounds what a lost message could leave behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import orjson

from tagcache.backends.base import (
    Backend,
    BackendInfo,
    EntryInfo,
    FillWatch,
    HealthReporting,
    InvalidationFeed,
    Lookup,
    ScopedInvalidation,
    SupportsInfo,
    SupportsKeys,
    SupportsPeek,
    SupportsWatch,
)
from tagcache.exceptions import ConfigurationError, UnsupportedOperationError

__all__ = ["LocalCache", "LocalLayer"]

logger: Final = logging.getLogger("tagcache")

_sources = itertools.count()
#: Changes remembered for the copies being read meanwhile; a read older than that is not kept.
_LOG_SIZE: Final = 1024


@dataclass(frozen=True, slots=True)
class LocalCache:
    """Settings of an in-process L1 (:class:`LocalLayer`) in front of a shared backend.

    :param max_entries: most entries held in process memory.
    :param max_bytes: most payload bytes held (``None``: no byte bound).
    :param ttl: seconds a copy is served at most (it is also never served past the
        entry's own expiry); bounds how long a lost change message could leave a copy
        behind.
    """

    max_entries: int = 10_000
    max_bytes: int | None = 64 * 2**20
    ttl: float = 5.0

    def __post_init__(self) -> None:
        if type(self.max_entries) is not int or self.max_entries < 1:
            raise ConfigurationError(
                f"LocalCache max_entries must be a positive int, got {self.max_entries!r}"
            )
        if self.max_bytes is not None and (type(self.max_bytes) is not int or self.max_bytes < 1):
            raise ConfigurationError(
                f"LocalCache max_bytes must be a positive int or None, got {self.max_bytes!r}"
            )
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, (int, float)) or not 0 < self.ttl <= 3600:
            raise ConfigurationError(
                f"LocalCache ttl must be a number of seconds above 0 and at most 3600, got {self.ttl!r}"
            )


class _Copy:
    __slots__ = ("expires", "ns", "payload", "tags")

    def __init__(self, ns: str, payload: bytes, tags: tuple[str, ...], expires: float) -> None:
        self.ns = ns
        self.payload = payload
        self.tags = tags
        self.expires = expires


class LocalLayer:
    """A :class:`~tagcache.backends.Backend` holding copies of a shared backend's entries in
    process memory, coherent through an :class:`~tagcache.backends.base.InvalidationFeed`.

    :param remote: the shared backend; it must support ``peek`` for copies of entries
        this process did not write (otherwise only its own writes are copied).
    :param feed: the feed of changes (``remote.invalidation_feed()``).
    :param settings: sizes and lifetime of the copies.
    :param owns_remote: close ``remote`` in :meth:`aclose`.
    :param clock: monotonic seconds, for the copies' lifetime (tests give a fake one).

    See the module documentation for what is held and how it stays coherent.
    """

    def __init__(
        self,
        remote: Backend,
        feed: InvalidationFeed,
        settings: LocalCache | None = None,
        *,
        owns_remote: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.remote = remote
        self.settings = settings if settings is not None else LocalCache()
        self._feed = feed
        self._owns = owns_remote
        self._clock = clock if clock is not None else time.monotonic
        self._copies: OrderedDict[tuple[str, str], _Copy] = OrderedDict()
        self._by_tag: dict[tuple[str, str], set[str]] = {}
        self._bytes = 0
        # Bumped by every change made or heard, each noted in the log: a copy read while
        # a change that may concern it was made or heard is not kept.
        self._epoch = 0
        self._log: deque[tuple[int, str | None, frozenset[str], frozenset[str], bool]] = deque(
            maxlen=_LOG_SIZE
        )
        # Whether the feed's subscription is confirmed (copies are used only then).
        self._live = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._filling: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._source = f"{os.getpid()}:{next(_sources)}"
        self._closed = False
        self._can_peek = isinstance(remote, SupportsPeek)
        #: Copies served, and reads that found none (for health()).
        self.local_hits = 0
        self.local_misses = 0

    # -- the feed ------------------------------------------------------------------

    def _follow(self) -> None:
        """Make sure the subscription runs under the current event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        if self._closed:
            return
        if self._loop is not loop:
            self._drop_all()
            self._live = False
            self._background = set()
            self._filling.clear()
        self._loop = loop
        self._task = loop.create_task(self._feed.run(self._heard, self._feed_state))

    def _feed_state(self, live: bool) -> None:
        self._drop_all()
        self._changed(None)
        self._live = live

    def _changed(
        self, ns: str | None, keys: Sequence[str] = (), tags: Sequence[str] = (), cleared: bool = False
    ) -> None:
        """Note a change (made or heard; ``ns=None``: anything may have changed) for the
        copies being read meanwhile (:meth:`_touched`)."""
        self._epoch += 1
        self._log.append((self._epoch, ns, frozenset(keys), frozenset(tags), cleared))

    def _touched(self, since: int, ns: str, key: str, tags: Sequence[str]) -> bool:
        """Whether a change noted after epoch ``since`` may concern the entry ``key``
        (of namespace ``ns``, carrying ``tags``); ``True`` when the log no longer reaches back."""
        log = self._log
        if not log or log[0][0] > since + 1:
            return True
        for epoch, changed_ns, keys, changed_tags, cleared in reversed(log):
            if epoch <= since:
                return False
            if changed_ns is None:
                return True
            if changed_ns == ns and (cleared or key in keys or not changed_tags.isdisjoint(tags)):
                return True
        return False

    def _heard(self, data: bytes) -> None:
        """A change published by any process (this one's own are skipped: applied already)."""
        try:
            message = orjson.loads(data)
            if message.get("s") == self._source:
                return
            ns = message["n"]
            keys, tags, cleared = message.get("k", ()), message.get("t", ()), message.get("c", False)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            logger.warning("tagcache: ignored a malformed change message: %r", data[:200])
            self._changed(None)
            self._drop_all()  # cannot know what it was about: keep nothing
            return
        self._changed(ns, keys, tags, cleared)
        self._apply(ns, keys, tags, cleared)

    def _apply(self, ns: str, keys: Sequence[str], tags: Sequence[str], cleared: bool) -> None:
        if cleared:
            for copy_key in [k for k in self._copies if k[0] == ns]:
                self._drop(copy_key)
            return
        for key in keys:
            self._drop((ns, key))
        for tag in tags:
            for key in list(self._by_tag.get((ns, tag), ())):
                self._drop((ns, key))

    async def _publish(
        self, ns: str, *, keys: Sequence[str] = (), tags: Sequence[str] = (), cleared: bool = False
    ) -> None:
        message: dict[str, Any] = {"s": self._source, "n": ns}
        if keys:
            message["k"] = list(keys)
        if tags:
            message["t"] = list(tags)
        if cleared:
            message["c"] = True
        await self._feed.publish(orjson.dumps(message))

    # -- the copies ----------------------------------------------------------------

    def _drop(self, copy_key: tuple[str, str]) -> None:
        copy = self._copies.pop(copy_key, None)
        if copy is None:
            return
        self._bytes -= len(copy.payload)
        for tag in copy.tags:
            keys = self._by_tag.get((copy.ns, tag))
            if keys is not None:
                keys.discard(copy_key[1])
                if not keys:
                    del self._by_tag[(copy.ns, tag)]

    def _drop_all(self) -> None:
        self._copies.clear()
        self._by_tag.clear()
        self._bytes = 0

    def _keep(
        self, ns: str, key: str, payload: bytes, tags: Sequence[str], ttl: float | None, epoch: int
    ) -> None:
        """Keep a copy, unless the feed is down or anything changed since ``epoch``."""
        if not self._live or self._closed or (epoch != self._epoch and self._touched(epoch, ns, key, tags)):
            return
        settings = self.settings
        if settings.max_bytes is not None and len(payload) > settings.max_bytes:
            return
        lifetime = settings.ttl if ttl is None else min(settings.ttl, ttl)
        if lifetime <= 0:
            return
        copy_key = (ns, key)
        self._drop(copy_key)
        copy = _Copy(ns, payload, tuple(tags), self._clock() + lifetime)
        self._copies[copy_key] = copy
        self._bytes += len(payload)
        for tag in copy.tags:
            self._by_tag.setdefault((ns, tag), set()).add(key)
        while len(self._copies) > settings.max_entries or (
            settings.max_bytes is not None and self._bytes > settings.max_bytes
        ):
            self._drop(next(iter(self._copies)))

    def get_local(self, ns: str, key: str) -> bytes | None:
        """The copy of ``key`` held in process memory, or ``None`` (see
        :class:`~tagcache.backends.base.LocalReads`)."""
        if not self._live or self._loop is not asyncio.get_running_loop():
            return None  # no subscription (or only one of an earlier event loop): nothing is trusted
        copy_key = (ns, key)
        copy = self._copies.get(copy_key)
        if copy is None:
            self.local_misses += 1
            return None
        if copy.expires <= self._clock():
            self._drop(copy_key)
            self.local_misses += 1
            return None
        self._copies.move_to_end(copy_key)
        self.local_hits += 1
        return copy.payload

    def _copy_soon(self, ns: str, key: str) -> None:
        """Read the entry's tags (``peek``) in the background and keep a copy of it."""
        if not self._live or not self._can_peek or (ns, key) in self._filling or self._closed:
            return
        self._filling.add((ns, key))
        task = asyncio.get_running_loop().create_task(self._copy(ns, key, self._epoch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _copy(self, ns: str, key: str, epoch: int) -> None:
        try:
            info = await self.remote.peek(ns, key)  # type: ignore[attr-defined]  # SupportsPeek, checked
        except Exception:  # a copy is an optimisation: the next read tries again
            return
        finally:
            self._filling.discard((ns, key))
        if info is not None and info.valid:
            self._keep(ns, key, info.payload, info.tags, info.ttl, epoch)

    # -- the Backend protocol --------------------------------------------------------

    async def get(self, ns: str, key: str) -> bytes | None:
        """The copy, else the shared backend's entry (a copy of which is then made)."""
        self._follow()
        payload = self.get_local(ns, key)
        if payload is not None:
            return payload
        payload = await self.remote.get(ns, key)
        if payload:
            self._copy_soon(ns, key)
        return payload

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """The copy as a hit, else the shared backend's :meth:`~tagcache.backends.Backend.fetch`."""
        self._follow()
        payload = self.get_local(ns, key)
        if payload is not None:
            return Lookup(payload)
        lookup = await self.remote.fetch(ns, key, tags, lease_ttl)
        if lookup.payload:
            self._copy_soon(ns, key)
        return lookup

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        """The shared backend's lease (refreshes are never served from copies)."""
        return await self.remote.lease(ns, key, tags, lease_ttl)

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        """Write through, tell the other processes, keep a copy."""
        self._follow()
        self._changed(ns, (key,))
        epoch = self._epoch
        self._drop((ns, key))
        await self.remote.set(ns, key, payload, ttl, tags)
        self._keep(ns, key, payload, tags, ttl, epoch)
        await self._publish(ns, keys=(key,))

    async def fill(
        self,
        ns: str,
        key: str,
        payload: bytes,
        ttl: float | None,
        tags: Sequence[str],
        tokens: Sequence[str],
        lease: str,
        epoch: str | None = None,
    ) -> bool:
        """Compare-and-set through; when stored, tell the other processes and keep a copy."""
        self._follow()
        mark = self._epoch
        stored = await self.remote.fill(ns, key, payload, ttl, tags, tokens, lease, epoch)
        if stored:
            self._keep(ns, key, payload, tags, ttl, mark)
            await self._publish(ns, keys=(key,))
        return stored

    async def release(self, ns: str, key: str, lease: str) -> None:
        """See :meth:`~tagcache.backends.Backend.release`."""
        await self.remote.release(ns, key, lease)

    async def delete(self, ns: str, key: str) -> bool:
        """Delete through, drop the copy, tell the other processes."""
        self._follow()
        self._changed(ns, (key,))
        self._drop((ns, key))
        found = await self.remote.delete(ns, key)
        self._changed(ns, (key,))
        self._drop((ns, key))
        await self._publish(ns, keys=(key,))
        return found

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        """Invalidate through, drop the copies carrying the tags, tell the other processes.

        The copies are dropped and the other processes told even when the shared
        backend failed (in part: a :class:`~tagcache.PartialInvalidationError`), since
        it may have applied the invalidation: the cache then bypasses only the failed
        part and keeps reading copies of the rest."""
        await self._invalidate(ns, tags, self.remote.invalidate(ns, tags))

    async def invalidate_scope(self, ns: str, tags: Sequence[str], scope: frozenset[int]) -> None:
        """The shared backend's :meth:`~tagcache.backends.ScopedInvalidation.invalidate_scope`,
        with the copies handled as by :meth:`invalidate`."""
        remote = self.remote
        if not isinstance(remote, ScopedInvalidation):
            raise UnsupportedOperationError(f"{type(remote).__name__} cannot invalidate part of a namespace")
        await self._invalidate(ns, tags, remote.invalidate_scope(ns, tags, scope))

    def scope_of(self, ns: str, key: str) -> int:
        """The shared backend's bucket of ``key`` (0 when it has no buckets to fail apart)."""
        remote = self.remote
        return remote.scope_of(ns, key) if isinstance(remote, ScopedInvalidation) else 0

    async def _invalidate(self, ns: str, tags: Sequence[str], call: Awaitable[None]) -> None:
        self._follow()
        self._changed(ns, (), tags)
        try:
            await call
        except Exception:
            self._changed(ns, (), tags)
            self._apply(ns, (), tags, False)
            with contextlib.suppress(Exception):  # the backend's own error is the one to raise
                await self._publish(ns, tags=tags)
            raise
        self._changed(ns, (), tags)
        self._apply(ns, (), tags, False)
        await self._publish(ns, tags=tags)

    async def clear(self, ns: str) -> int:
        """Clear through, drop the namespace's copies, tell the other processes."""
        self._follow()
        self._changed(ns, cleared=True)
        removed = await self.remote.clear(ns)
        self._changed(ns, cleared=True)
        self._apply(ns, (), (), True)
        await self._publish(ns, cleared=True)
        return removed

    def watch(self, ns: str, key: str) -> FillWatch:
        """The shared backend's watch."""
        remote = self.remote
        if not isinstance(remote, SupportsWatch):
            raise UnsupportedOperationError(f"{type(remote).__name__} cannot watch keys")
        return remote.watch(ns, key)

    async def peek(self, ns: str, key: str) -> EntryInfo | None:
        """The shared backend's entry (copies are not shown)."""
        remote = self.remote
        if not isinstance(remote, SupportsPeek):
            raise UnsupportedOperationError(f"{type(remote).__name__} cannot peek")
        return await remote.peek(ns, key)

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        """The shared backend's keys."""
        remote = self.remote
        if not isinstance(remote, SupportsKeys):
            raise UnsupportedOperationError(f"{type(remote).__name__} cannot list keys")
        return await remote.keys(ns, pattern, limit)

    async def info(self) -> BackendInfo:
        """The shared backend's figures."""
        remote = self.remote
        return await remote.info() if isinstance(remote, SupportsInfo) else BackendInfo()

    def health(self) -> dict[str, object]:
        """The shared backend's health, plus the copies' figures: ``local_live`` (the feed
        is subscribed), ``local_entries``, ``local_bytes``, ``local_hits``, ``local_misses``."""
        remote = self.remote
        figures: dict[str, object] = dict(remote.health()) if isinstance(remote, HealthReporting) else {}
        figures.update(
            local_live=self._live,
            local_entries=len(self._copies),
            local_bytes=self._bytes,
            local_hits=self.local_hits,
            local_misses=self.local_misses,
        )
        return figures

    async def aclose(self) -> None:
        """Stop the subscription, drop the copies, close the feed (and the shared backend if owned)."""
        if self._closed:
            return
        self._closed = True
        self._live = False
        self._drop_all()
        task = self._task
        if task is not None and not task.done() and self._loop is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pending in list(self._background):
            pending.cancel()
        await self._feed.aclose()
        if self._owns:
            await self.remote.aclose()

    async def __aenter__(self) -> LocalLayer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
