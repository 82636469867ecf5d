"""The :class:`Cache`: a backend, the tag index, a codec and key rules composed.

See ``docs/design.md`` for how the tag index keeps invalidation O(1) and
reads free of stale data.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, TypeVar, overload
from urllib.parse import parse_qsl, urlsplit

from tagcache.backends.base import Backend, NowaitReads
from tagcache.codec import Codec, JsonCodec
from tagcache.exceptions import (
    ConfigurationError,
    SerializationError,
    TagCacheError,
    ValueTooLargeError,
)
from tagcache.stats import CacheStats, Counters
from tagcache.tags import MAX_KEY_LENGTH, check_key, check_tags, ttl_seconds

__all__ = ["Cache", "EntryView"]

logger: Final = logging.getLogger("tagcache")

T = TypeVar("T")
D = TypeVar("D")

_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")

#: When true in the current context, every cache reads as a miss and writes nothing.
#: Set it with :func:`tagcache.testing.caching_disabled`.
_DISABLED: Final[ContextVar[bool]] = ContextVar("tagcache_disabled", default=False)


class _Unset:
    """Marker for "argument not given" (distinct from ``None``, which means "no expiry")."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Final = _Unset()


@dataclass(frozen=True, slots=True)
class EntryView:
    """What :meth:`Cache.peek` shows of a stored entry."""

    #: The decoded value (``None`` if it could not be decoded: see ``error``).
    value: Any
    #: Seconds until the entry expires; ``None`` if it has no expiry.
    ttl: float | None
    #: The tags the entry carries.
    tags: tuple[str, ...]
    #: ``True`` when a ``get`` would return it (no tag invalidated since it was written).
    valid: bool
    #: Why the payload could not be decoded, if it could not.
    error: str | None = None


class _Abandoned(Exception):
    """Set on a flight whose leader was cancelled: its waiters retry instead of failing."""


class _Flight:
    """An in-process load of one key that concurrent callers may join."""

    __slots__ = ("future", "tags", "tokens")

    def __init__(self, tags: tuple[str, ...], tokens: tuple[str, ...]) -> None:
        self.tags = tags
        self.tokens = tokens
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # A flight nobody joined must not log "exception was never retrieved".
        self.future.add_done_callback(_consume)


def _consume(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


class Cache:
    """An async cache with tag-based invalidation.

    Args:
        backend: where entries live: :class:`~tagcache.backends.MemoryBackend`,
            :class:`~tagcache.backends.RedisBackend` or your own
            :class:`~tagcache.backends.Backend`.
        namespace: prefix isolating this cache's keys from every other
            namespace on the same backend (letters, digits, ``_.-``; at most 64).
        default_ttl: TTL used when a write gives none: seconds, a ``timedelta``,
            or ``None`` for no expiry.
        codec: turns values into bytes; :class:`~tagcache.codec.JsonCodec` by default.
        max_value_size: largest encoded value accepted, in bytes.
        lease_ttl: seconds a loader in :meth:`get_or_set` may take and still
            store its value; a slower load is returned but not cached.
        owns_backend: close the backend in :meth:`aclose` (default ``True``).

    Use :meth:`from_url` to build one from a URL.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        namespace: str = "default",
        default_ttl: float | timedelta | None = 300,
        codec: Codec | None = None,
        max_value_size: int = 1024 * 1024,
        lease_ttl: float | timedelta = 10.0,
        owns_backend: bool = True,
    ) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigurationError(
                f"namespace {namespace!r} is invalid: use 1 to 64 letters, digits, '_', '.' or '-'"
            )
        missing = [
            name
            for name in ("get", "fetch", "set", "fill", "release", "delete", "invalidate", "clear")
            if not callable(getattr(backend, name, None))
        ]
        if missing:
            raise ConfigurationError(
                f"{type(backend).__name__} is not a tagcache Backend: it lacks {', '.join(missing)}; "
                "pass a MemoryBackend, a RedisBackend or an implementation of tagcache.backends.Backend"
            )
        if type(max_value_size) is not int or max_value_size <= 0:
            raise ConfigurationError(f"max_value_size must be a positive int (bytes), got {max_value_size!r}")
        lease = ttl_seconds(lease_ttl, what="lease_ttl")
        if not lease:
            raise ConfigurationError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        self._backend = backend
        self._ns = namespace
        self._default_ttl = ttl_seconds(default_ttl, what="default_ttl")
        self._codec: Codec = codec if codec is not None else JsonCodec()
        # Bound methods looked up once: the hit path runs them on every call.
        self._backend_get = backend.get
        self._get_nowait = backend.get_nowait if isinstance(backend, NowaitReads) else None
        self._decode_payload = self._codec.decode
        self._max_value_size = max_value_size
        self._lease_ttl = lease
        self._owns_backend = owns_backend
        self._counters = Counters()
        self._flights: dict[str, _Flight] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Cache:
        """Build a cache from a URL.

        * ``memory://`` — an in-process :class:`~tagcache.backends.MemoryBackend`;
          query parameters ``max_entries`` and ``max_bytes`` size it
          (``memory://?max_entries=50000``).
        * ``redis://``, ``rediss://``, ``unix://`` — a
          :class:`~tagcache.backends.RedisBackend` over a bounded, blocking
          connection pool (needs ``pip install 'tagcache[redis]'``). Query
          parameters are redis-py's (``?socket_timeout=2``), plus
          ``max_connections``.

        Keyword ``options`` go to :class:`Cache` (``namespace``, ``default_ttl``, ...).
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"cache URL must be a str, got {type(url).__name__}")
        scheme = urlsplit(url).scheme.lower()
        backend: Backend
        if scheme == "memory":
            from tagcache.backends.memory import MemoryBackend

            params = dict(parse_qsl(urlsplit(url).query))
            sizes: dict[str, int] = {}
            for name in ("max_entries", "max_bytes"):
                if name in params:
                    try:
                        sizes[name] = int(params.pop(name))
                    except ValueError:
                        raise ConfigurationError(f"{name} in {url!r} must be an integer") from None
            if params:
                raise ConfigurationError(
                    f"unknown memory:// parameter(s) {sorted(params)}; known: max_entries, max_bytes"
                )
            backend = MemoryBackend(
                max_entries=sizes.get("max_entries", 10_000), max_bytes=sizes.get("max_bytes", 64 * 2**20)
            )
        elif scheme in ("redis", "rediss", "unix"):
            try:
                from tagcache.backends.redis import RedisBackend
            except ImportError as exc:
                raise ConfigurationError(
                    f"{url.split('://')[0]}:// needs redis-py: pip install 'tagcache[redis]'"
                ) from exc
            backend = RedisBackend.from_url(url)
        else:
            raise ConfigurationError(
                f"unknown cache URL scheme {scheme!r} in {url!r}; use memory://, redis://, rediss:// or unix://"
            )
        return cls(backend, **options)

    @property
    def backend(self) -> Backend:
        """The backend this cache stores into."""
        return self._backend

    @property
    def namespace(self) -> str:
        """This cache's namespace."""
        return self._ns

    @property
    def default_ttl(self) -> float | None:
        """The TTL, in seconds, used when a write gives none (``None``: no expiry)."""
        return self._default_ttl

    @property
    def codec(self) -> Codec:
        """The codec turning values into bytes."""
        return self._codec

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _key(key: object) -> str:
        # Inline fast check for the common valid case; check_key explains failures.
        if type(key) is str and key and len(key) <= MAX_KEY_LENGTH and key.isprintable():
            return key
        return check_key(key)

    def _ttl(self, ttl: object) -> float | None:
        if ttl is _UNSET:
            return self._default_ttl
        return ttl_seconds(ttl)

    def _encode(self, key: str, value: object) -> bytes:
        try:
            payload = self._codec.encode(value)
        except SerializationError as exc:
            raise SerializationError(f"cannot cache key {key!r}: {exc}") from exc
        except Exception as exc:  # a user-registered encoder failed
            raise SerializationError(
                f"cannot cache key {key!r}: encoding {type(value).__name__} failed: {exc}"
            ) from exc
        if len(payload) > self._max_value_size:
            raise ValueTooLargeError(
                f"value for key {key!r} is {len(payload)} bytes encoded, over max_value_size="
                f"{self._max_value_size}; store less, or raise max_value_size"
            )
        return payload

    def _decode(self, key: str, payload: bytes) -> tuple[bool, Any]:
        """Decode a stored payload; a corrupt or foreign one is logged, counted and a miss."""
        try:
            return True, self._decode_payload(payload)
        except Exception as exc:
            self._corrupt(key, exc)
            return False, None

    def _corrupt(self, key: str, exc: Exception) -> None:
        self._counters.errors += 1
        logger.warning("tagcache: unreadable value under key %r treated as a miss: %s", key, exc)

    # ------------------------------------------------------------------ reads

    @overload
    async def get(self, key: str) -> Any: ...
    @overload
    async def get(self, key: str, default: D) -> Any | D: ...

    async def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored under ``key``, or ``default`` when absent.

        Pass a sentinel as ``default`` to tell a cached ``None`` from a miss.
        An entry is absent once expired, deleted, or when any of its tags was
        invalidated after its value was read from the source.
        """
        # Fast path for the usual key; check_key handles (and explains) the rest.
        # A printable str has no control characters.
        if type(key) is not str or not key.isprintable() or len(key) > MAX_KEY_LENGTH or not key:
            key = check_key(key)
        counters = self._counters
        if _DISABLED.get():
            counters.misses += 1
            return default
        nowait = self._get_nowait
        if nowait is not None:
            payload = nowait(self._ns, key)
        else:
            try:
                payload = await self._backend_get(self._ns, key)
            except TagCacheError:
                counters.errors += 1
                raise
        if payload is not None:
            try:
                value = self._decode_payload(payload)
            except Exception as exc:
                self._corrupt(key, exc)
            else:
                counters.hits += 1
                return value
        counters.misses += 1
        return default

    async def peek(self, key: str) -> EntryView | None:
        """Show the entry under ``key`` — value, TTL left, tags and whether it is
        still valid — without counting a hit or refreshing its recency. For operators."""
        key = self._key(key)
        info = await self._backend.peek(self._ns, key)
        if info is None:
            return None
        try:
            value = self._codec.decode(info.payload)
        except Exception as exc:
            self._counters.errors += 1
            return EntryView(None, info.ttl, info.tags, False, error=str(exc))
        return EntryView(value, info.ttl, info.tags, info.valid)

    async def keys(self, pattern: str = "*", *, limit: int | None = 100) -> list[str]:
        """Return up to ``limit`` keys of this namespace matching ``pattern``.

        ``pattern`` uses Redis glob syntax (``*``, ``?``, ``[abc]``; ``\\*``
        matches a literal star). Listing walks the namespace in batches (SCAN
        on Redis, never KEYS); keys of invalidated but unexpired entries may
        be listed. ``limit=None`` lists all.
        """
        if not isinstance(pattern, str) or not pattern or _CONTROL.search(pattern):
            raise ValueError(f"pattern must be a non-empty str without control characters, got {pattern!r}")
        if limit is not None and (type(limit) is not int or limit <= 0):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        return await self._backend.keys(self._ns, pattern, limit)

    # ------------------------------------------------------------------ writes

    async def set(
        self,
        key: str,
        value: Any,
        ttl: float | timedelta | _Unset | None = _UNSET,
        tags: Iterable[str] | None = None,
    ) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds, carrying ``tags``.

        ``ttl`` omitted means the cache's ``default_ttl``; ``None`` means no
        expiry (the entry and the tokens of its tags then persist until
        invalidated, deleted or evicted); ``0`` stores nothing and removes any
        current value. A value that cannot be encoded raises
        :class:`~tagcache.SerializationError` and nothing is written.
        """
        key = self._key(key)
        seconds = self._ttl(ttl)
        tag_tuple = check_tags(tags)
        payload = self._encode(key, value)
        if _DISABLED.get():
            return
        self._flights.pop(key, None)
        if seconds == 0:
            await self._backend.delete(self._ns, key)
            return
        await self._backend.set(self._ns, key, payload, seconds, tag_tuple)
        self._counters.sets += 1

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was stored. An in-flight
        :meth:`get_or_set` fill of ``key`` will not store its value."""
        key = self._key(key)
        self._flights.pop(key, None)
        deleted = await self._backend.delete(self._ns, key)
        self._counters.deletes += 1
        return deleted

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Invalidate every entry carrying any of ``tags``.

        Costs one backend round trip whatever the number of entries. Once this
        returns, no read returns a value loaded before the call.
        """
        tag_tuple = check_tags(tags)
        if not tag_tuple:
            return
        await self._backend.invalidate(self._ns, tag_tuple)
        self._counters.invalidations += len(tag_tuple)

    async def invalidate_tag(self, tag: str) -> None:
        """Invalidate every entry carrying ``tag`` (shorthand for ``invalidate_tags([tag])``)."""
        await self.invalidate_tags([tag])

    async def clear(self) -> int:
        """Remove every entry of this namespace (and nothing else); return how many.

        Other namespaces and foreign keys on the same Redis are untouched:
        never FLUSHDB, never KEYS.
        """
        self._flights.clear()
        return await self._backend.clear(self._ns)

    # ------------------------------------------------------------------ get_or_set

    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | timedelta | _Unset | None = _UNSET,
        tags: Iterable[str] | None = None,
    ) -> T:
        """Return the cached value of ``key``, or run ``loader()`` and cache its result.

        Race-free: the tag tokens are read before ``loader`` runs and the value
        is stored only if none of ``tags`` was invalidated meanwhile, so a value
        read from the source before an invalidation is never served after
        :meth:`invalidate_tags` returned.

        Stampede-safe within the process: concurrent callers of the same key
        wait for one load (run in the first caller's task, so it may use that
        task's resources such as a database session). If that caller is
        cancelled, a waiter takes over; if the loader raises, every waiter gets
        the same exception and nothing is cached. Across processes a lease
        lets one caller fill the key; a caller that finds the lease held by
        another process loads the value itself without storing it.
        """
        key = self._key(key)
        seconds = self._ttl(ttl)
        tag_tuple = check_tags(tags)
        if _DISABLED.get():
            self._counters.misses += 1
            return await loader()
        backend, ns = self._backend, self._ns
        while True:
            lookup = await backend.fetch(ns, key, tag_tuple, self._lease_ttl)
            if lookup.payload is not None:
                ok, value = self._decode(key, lookup.payload)
                if ok:
                    self._counters.hits += 1
                    return value  # type: ignore[no-any-return]  # decoded payload of a T stored by loader
                # Corrupt or foreign payload: drop it and read again (now a miss).
                await backend.delete(ns, key)
                continue
            self._counters.misses += 1
            flight = self._flights.get(key)
            if flight is not None and flight.tags == tag_tuple and flight.tokens == lookup.tokens:
                # No invalidation of these tags since that load began: share it.
                try:
                    payload = await asyncio.shield(flight.future)
                except _Abandoned:
                    continue
                return self._codec.decode(payload)  # type: ignore[no-any-return]  # same as above
            return await self._lead(key, loader, seconds, tag_tuple, lookup.tokens, lookup.lease)

    async def _lead(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        tokens: tuple[str, ...],
        lease: str | None,
    ) -> T:
        backend, ns = self._backend, self._ns
        flight = _Flight(tags, tokens)
        self._flights[key] = flight
        try:
            try:
                value = await loader()
                payload = self._encode(key, value)
            except asyncio.CancelledError:
                # Wake the waiters only once the lease is released, so one of
                # them can take it and load in its own task.
                self._spawn(self._abandon(flight, key, lease))
                raise
            except BaseException as exc:
                if lease is not None:
                    await self._release(key, lease)
                flight.future.set_exception(exc)
                raise
            flight.future.set_result(payload)
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        if lease is not None:
            if seconds == 0:
                await self._release(key, lease)
            elif await backend.fill(ns, key, payload, seconds, tags, tokens, lease):
                self._counters.sets += 1
        return value

    async def _release(self, key: str, lease: str) -> None:
        try:
            await self._backend.release(self._ns, key, lease)
        except Exception:  # the lease expires by itself; the loader's outcome matters more
            self._counters.errors += 1
            logger.warning("tagcache: could not release the lease on key %r", key, exc_info=True)

    async def _abandon(self, flight: _Flight, key: str, lease: str | None) -> None:
        try:
            if lease is not None:
                await self._release(key, lease)
        finally:
            if not flight.future.done():
                flight.future.set_exception(_Abandoned())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ stats & lifecycle

    async def stats(self) -> CacheStats:
        """Return this cache's counters and the backend's figures (memory, keys, evictions)."""
        return CacheStats.from_counters(self._counters, await self._backend.info())

    def reset_stats(self) -> None:
        """Set this cache's counters back to zero."""
        self._counters.reset()

    async def aclose(self) -> None:
        """Finish background work and close the backend (if the cache owns it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_backend:
            await self._backend.aclose()

    async def __aenter__(self) -> Cache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Cache({type(self._backend).__name__}, namespace={self._ns!r})"
