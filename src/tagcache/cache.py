"""The :class:`Cache`: a backend, the tag index, a codec and key rules composed.

See ``docs/design.md`` for how the tag index keeps invalidation O(1) and
reads free of stale data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeAlias, TypeVar, overload
from urllib.parse import parse_qsl, urlsplit

from tagcache.backends.base import Backend, BackendInfo, HealthReporting, Lookup, NowaitReads
from tagcache.codec import Codec, JsonCodec, KeyBoundCodec
from tagcache.exceptions import (
    BackendError,
    ConfigurationError,
    SerializationError,
    TagCacheError,
    ValueTooLargeError,
)
from tagcache.stats import CacheStats, Counters, note_not_stored, note_write
from tagcache.tags import MAX_KEY_LENGTH, check_key, check_tags, ttl_seconds

if TYPE_CHECKING:
    from tagcache.decorator import CachedFunction

__all__ = ["Cache", "EntryView", "LoadPolicy"]

logger: Final = logging.getLogger("tagcache")

T = TypeVar("T")
P = ParamSpec("P")
D = TypeVar("D")

_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Control characters, and lone surrogates (not encodable as UTF-8): never in a pattern.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

#: When true in the current context, every cache reads as a miss and writes nothing.
#: Set it with :func:`tagcache.testing.caching_disabled`.
_DISABLED: Final[ContextVar[bool]] = ContextVar("tagcache_disabled", default=False)

#: When true in the current context, a loaded value that cannot be stored because of
#: the value itself raises instead of being returned uncached (``Cache(strict=True)``
#: for one cache). Set it with :func:`tagcache.testing.strict`.
_STRICT: Final[ContextVar[bool]] = ContextVar("tagcache_strict", default=False)

#: Seconds a lease release running in the background may take; past that the lease
#: is left to expire by itself.
_RELEASE_TIMEOUT: Final = 2.0
#: Seconds one backend call re-applying a pending invalidation may take.
_REPLAY_TIMEOUT: Final = 10.0
#: Tags of failed invalidations remembered for replay; beyond this many, the
#: replay becomes one clear of the namespace.
_MAX_PENDING_TAGS: Final = 10_000
#: Key shapes whose failures to store have been logged, at most.
_MAX_SHAPES: Final = 256

# A key's shape for logging: alphanumeric runs that are hex with a digit in them
# (hashes, UUID parts) and then any digit run become "*": "user:123" and
# "user:456" are both "user:*".
_HEX_RUN: Final = re.compile(r"(?<![A-Za-z0-9])[0-9A-Fa-f]*[0-9][0-9A-Fa-f]*(?![A-Za-z0-9])")
_DIGIT_RUN: Final = re.compile(r"[0-9]+")


def _key_shape(key: str) -> str:
    """The key with runs of digits and hexadecimal identifiers replaced by ``*``
    (``"user:42:posts"`` -> ``"user:*:posts"``): failures are logged once per shape."""
    return _DIGIT_RUN.sub("*", _HEX_RUN.sub("*", key))


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


# Entries written with stale-while-revalidate or early refresh carry an envelope:
# this marker byte, then the logical expiry (Unix time) and the load duration
# (seconds) as two little-endian doubles, then the codec's payload. Codec
# payloads never start with this byte.
_ENVELOPE: Final = b"\x05"
_ENVELOPE_BYTE: Final = _ENVELOPE[0]
_META: Final = struct.Struct("<dd")


@dataclass(frozen=True, slots=True)
class LoadPolicy:
    """How a read-through load behaves (compiled once per decorated function)."""

    #: Wait for another caller's lease instead of loading too (cross-process stampede protection).
    lock: bool = True
    #: Seconds after expiry during which the stale value is served while one caller refreshes it.
    stale_while_revalidate: float = 0.0
    #: Probabilistic early refresh (XFetch) before expiry.
    early_refresh: bool = False
    #: XFetch's beta: above 1 refreshes earlier, below 1 later.
    beta: float = 1.0
    #: Fraction of the TTL removed at random from each write, so entries written
    #: together do not expire together.
    jitter: float = 0.0
    #: On backend failure, call the loader directly instead of raising.
    fail_open: bool = False
    #: Try a plain read before the snapshot read: hits are as cheap as ``get``, a
    #: miss costs one more round trip (read, snapshot and lease, fill).
    read_first: bool = True

    @property
    def envelope(self) -> bool:
        """Whether entries need their expiry and load time stored beside the value."""
        return self.stale_while_revalidate > 0 or self.early_refresh

    def physical_ttl(self, seconds: float | None, delta: float) -> float | None:
        """How long the backend keeps an entry whose value took ``delta`` seconds to compute:
        the TTL, plus the stale window, plus (with early refresh) a grace of twice the
        compute time (at most a tenth of the TTL) in which a refresh that started just
        before expiry can finish while the current value is still served."""
        if seconds is None:
            return None
        grace = min(2.0 * delta + 0.01, 0.1 * seconds) if self.early_refresh else 0.0
        return seconds + max(self.stale_while_revalidate, grace)

    def jittered(self, seconds: float | None) -> float | None:
        """``seconds`` less a random fraction (up to ``jitter``) of it."""
        if seconds is None or not self.jitter:
            return seconds
        return seconds * (1.0 - self.jitter * random.random())

    def due(self, expires_at: float, delta: float) -> bool:
        """Whether an entry expiring at ``expires_at`` should be refreshed now."""
        now = time.time()
        if now >= expires_at:
            return True  # stale: served within the stale window, refreshed in the background
        if self.early_refresh:
            # XFetch: refresh with a probability growing as expiry nears,
            # earlier for values that take long (delta) to compute.
            return now - delta * self.beta * math.log(1.0 - random.random()) >= expires_at
        return False


#: get_or_set's policies, by fail_open.
_OPEN_POLICY: Final = LoadPolicy(read_first=False, fail_open=True)
_CLOSED_POLICY: Final = LoadPolicy(read_first=False, fail_open=False)
#: Returned by Cache._hit for a payload that could not be decoded.
_MISS: Final = object()


def _wrap(payload: bytes, seconds: float, delta: float) -> bytes:
    return _ENVELOPE + _META.pack(time.time() + seconds, delta) + payload


def _strip(payload: bytes) -> bytes:
    """The codec payload inside an (optional) envelope."""
    if payload[:1] == _ENVELOPE:
        return payload[_META.size + 1 :]
    return payload


class _Abandoned(Exception):
    """Set on a flight whose leader was cancelled: its waiters retry instead of failing.

    ``released`` is false when the leader's lease could not be released: it stays
    held until it expires, so a waiter loads without it instead of waiting it out.
    """

    def __init__(self, released: bool) -> None:
        super().__init__()
        self.released = released


class _Shared:
    """A flight's value handed to its waiters as is: it had no payload to decode a copy from."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value


class _Flight:
    """An in-process load of one key that concurrent callers may join.

    Its future holds the payload the leader encoded, from which each waiter
    decodes a private copy, or a :class:`_Shared` value when the value could
    not be encoded.
    """

    __slots__ = ("epoch", "future", "tags", "tokens")

    def __init__(self, tags: tuple[str, ...], lookup: Lookup) -> None:
        self.tags = tags
        self.tokens = lookup.tokens
        self.epoch = lookup.epoch
        self.future: asyncio.Future[bytes | _Shared] = asyncio.get_running_loop().create_future()
        # A flight nobody joined must not log "exception was never retrieved".
        self.future.add_done_callback(_consume)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Loaded:
    """A value a loader returned, made ready for storing."""

    __slots__ = ("extra", "payload", "problem", "ttl")

    def __init__(
        self,
        payload: bytes | None,
        ttl: float | None,
        extra: tuple[str, ...],
        problem: Exception | None,
    ) -> None:
        #: What is stored, and what callers sharing the load decode their copy from;
        #: ``None`` when the value could not be encoded.
        self.payload = payload
        #: The physical TTL.
        self.ttl = ttl
        #: Tags known only from the value (a ``tags=`` callable), beyond the snapshot ones.
        self.extra = extra
        #: Why the value cannot be stored (not encodable, too large, unusable result
        #: tags), or ``None``.
        self.problem = problem


#: A failed invalidation waiting to be re-applied: its sequence number and its tags
#: (``None``: clear the whole namespace, what too many pending tags collapse into).
_Pending: TypeAlias = "tuple[int, tuple[str, ...] | None]"


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
            store its value; a slower load is returned but not cached. Also the
            longest one call waits for other callers' loads of its key.
        owns_backend: close the backend in :meth:`aclose` (default ``True``).
        fail_open: when the backend fails (any :class:`~tagcache.BackendError`,
            including :class:`~tagcache.BackendUnavailableError` from an open
            circuit breaker), :meth:`get_or_set` and ``@cached`` functions call the
            loader and return its value instead of raising (default ``True``;
            logged once per incident, counted in ``stats().errors``). Each call
            and decorator can override it. :meth:`get`, :meth:`set`,
            :meth:`delete` and :meth:`invalidate_tags` always raise.
        strict: raise when a loaded value cannot be stored because of the value
            itself (not encodable, over ``max_value_size``, unusable result tags)
            instead of returning it uncached. For test suites:
            :func:`tagcache.testing.memory_cache` turns it on, and
            :func:`tagcache.testing.strict` turns it on for every cache in a block.

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
        fail_open: bool = True,
        strict: bool = False,
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
        for name, flag in (("fail_open", fail_open), ("strict", strict)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{name} must be True or False, got {flag!r}")
        self._backend = backend
        self._ns = namespace
        self._default_ttl = ttl_seconds(default_ttl, what="default_ttl")
        self._codec: Codec = codec if codec is not None else JsonCodec()
        # Bound methods looked up once: the hit path runs them on every call.
        self._backend_get = backend.get
        self._get_nowait = backend.get_nowait if isinstance(backend, NowaitReads) else None
        # A codec binding payloads to their place gets "namespace NUL key" as context;
        # then _decode_payload is None and the hit path calls _decode_bound instead.
        self._decode_payload: Callable[[bytes], Any] | None = self._codec.decode
        self._context: bytes | None = None
        if isinstance(self._codec, KeyBoundCodec):
            self._context = namespace.encode() + b"\x00"
            self._encode_for = self._codec.encode_for
            self._decode_for = self._codec.decode_for
            self._decode_payload = None
        self._health = backend.health if isinstance(backend, HealthReporting) else None
        self._max_value_size = max_value_size
        self._lease_ttl = lease
        self._owns_backend = owns_backend
        self._fail_open = fail_open
        self._strict = strict
        self._policy = _OPEN_POLICY if fail_open else _CLOSED_POLICY
        self._counters = Counters()
        self._flights: dict[str, _Flight] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._refreshing: set[str] = set()
        self._incident = False
        self._closed = False
        # Failed invalidations, oldest first, re-applied before the next read.
        self._pending: deque[_Pending] = deque()
        self._pending_tags = 0
        self._seq = 0  # sequence number of the latest invalidation remembered
        self._applied = 0  # every remembered invalidation numbered up to this is applied
        self._replaying: asyncio.Task[Any] | None = None
        self._replay_error: BaseException | None = None
        self._replay_failing = False
        # (failure kind, key shape) pairs logged already.
        self._logged_shapes: set[tuple[str, str]] = set()

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

    @property
    def fail_open(self) -> bool:
        """Whether :meth:`get_or_set` and ``@cached`` functions call the loader when the
        backend fails (unless a call or decorator says otherwise)."""
        return self._fail_open

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
        """The codec's payload for ``value`` stored under ``key`` (no size check)."""
        try:
            context = self._context
            if context is None:
                return self._codec.encode(value)
            return self._encode_for(value, context + key.encode())
        except SerializationError as exc:
            raise SerializationError(f"cannot cache key {key!r}: {exc}") from exc
        except Exception as exc:  # a user-registered encoder failed
            raise SerializationError(
                f"cannot cache key {key!r}: encoding {type(value).__name__} failed: {exc}"
            ) from exc

    def _too_large(self, key: str, payload: bytes) -> ValueTooLargeError | None:
        if len(payload) <= self._max_value_size:
            return None
        return ValueTooLargeError(
            f"value for key {key!r} is {len(payload)} bytes encoded, over max_value_size="
            f"{self._max_value_size}; store less, or raise max_value_size"
        )

    def _decode(self, key: str, payload: bytes) -> Any:
        """Decode the codec payload stored under ``key`` (outside the hit paths)."""
        context = self._context
        if context is None:
            return self._codec.decode(payload)
        return self._decode_for(payload, context + key.encode())

    def _decode_bound(self, key: str, payload: bytes) -> Any:
        """Decode with a key-bound codec (``_decode_payload`` is ``None``)."""
        context = self._context
        assert context is not None
        return self._decode_for(payload, context + key.encode())

    def _corrupt(self, key: str, exc: Exception) -> None:
        self._counters.errors += 1
        logger.warning("tagcache: unreadable value under key %r treated as a miss: %s", key, exc)

    def _strict_now(self) -> bool:
        return self._strict or _STRICT.get()

    def _log_once(self, kind: str, key: str, message: str, *args: object) -> None:
        """Log a failure at WARNING once per kind and key shape (a bounded number of shapes)."""
        shapes = self._logged_shapes
        if len(shapes) > _MAX_SHAPES:
            return
        shape = (kind, _key_shape(key))
        if shape in shapes:
            return
        shapes.add(shape)
        if len(shapes) > _MAX_SHAPES:
            logger.warning(
                "tagcache: failures of %d key shapes logged; further ones are only counted in stats()",
                _MAX_SHAPES,
            )
            return
        logger.warning(message + " (logged once for keys shaped %r)", *args, shape[1])

    def _not_stored(self, key: str, exc: BaseException) -> None:
        """Count and log (once per key shape) a loaded value returned without being stored."""
        counters = self._counters
        counters.errors += 1
        counters.not_stored += 1
        note_not_stored()
        self._log_once(
            f"store:{type(exc).__name__}",
            key,
            "tagcache: the value loaded for key %r is returned but not cached: %s: %s",
            key,
            type(exc).__name__,
            exc,
        )

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

        A backend failure raises :class:`~tagcache.BackendError` (counted in
        ``stats().errors``). While an invalidation that failed could not be
        re-applied yet (see :meth:`invalidate_tags`), this returns ``default``
        without reading the backend, counted as a miss.
        """
        # Fast path for the usual key; check_key handles (and explains) the rest.
        # A printable str has no control characters.
        if type(key) is not str or not key.isprintable() or len(key) > MAX_KEY_LENGTH or not key:
            key = check_key(key)
        counters = self._counters
        if _DISABLED.get():
            counters.misses += 1
            return default
        if self._pending and not await self._replay_pending():
            counters.misses += 1
            return default
        try:
            nowait = self._get_nowait
            if nowait is not None:
                payload = nowait(self._ns, key)
            else:
                payload = await self._backend_get(self._ns, key)
        except TagCacheError:
            counters.errors += 1
            raise
        if payload is not None:
            try:
                if payload[0] == _ENVELOPE_BYTE:  # IndexError for b"": corrupt
                    payload = payload[_META.size + 1 :]
                decode = self._decode_payload
                value = decode(payload) if decode is not None else self._decode_bound(key, payload)
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
            value = self._decode(key, _strip(info.payload))
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
            raise ValueError(
                f"pattern must be a non-empty str without control characters or lone surrogates, "
                f"got {pattern!r}"
            )
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
        :class:`~tagcache.SerializationError`, one over ``max_value_size``
        :class:`~tagcache.ValueTooLargeError`, and nothing is written. A
        backend failure raises :class:`~tagcache.BackendError`.
        """
        key = self._key(key)
        seconds = self._ttl(ttl)
        tag_tuple = check_tags(tags)
        payload = self._encode(key, value)
        too_large = self._too_large(key, payload)
        if too_large is not None:
            raise too_large
        if _DISABLED.get():
            return
        self._flights.pop(key, None)
        try:
            if seconds == 0:
                await self._backend.delete(self._ns, key)
                return
            await self._backend.set(self._ns, key, payload, seconds, tag_tuple)
        except TagCacheError:
            self._counters.errors += 1
            raise
        self._counters.sets += 1
        note_write()

    async def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was stored. An in-flight
        :meth:`get_or_set` fill of ``key`` will not store its value.
        A backend failure raises :class:`~tagcache.BackendError`."""
        key = self._key(key)
        self._flights.pop(key, None)
        try:
            deleted = await self._backend.delete(self._ns, key)
        except TagCacheError:
            self._counters.errors += 1
            raise
        self._counters.deletes += 1
        return deleted

    async def invalidate_tags(self, tags: Iterable[str]) -> None:
        """Invalidate every entry carrying any of ``tags``.

        Costs one backend round trip whatever the number of entries. Once this
        returns, no read returns a value loaded before the call.

        If the backend fails, this raises :class:`~tagcache.BackendError` (the
        caller must know), and this cache remembers the invalidation: it is
        re-applied, in order with other failed ones, before this cache reads
        from the backend again. Until that succeeds, reads through this cache
        bypass it: :meth:`get` returns its default (a miss), :meth:`get_or_set`
        and ``@cached`` functions call the loader and store nothing. At most
        10,000 tags are remembered; beyond that the replay clears the whole
        namespace instead (correct, only costlier). ``stats().pending_invalidations``
        shows what is waiting.

        Other processes do not know about this cache's pending invalidations:
        between the backend's recovery and this cache's replay (its next read,
        or :meth:`aclose`), they may read entries the failed invalidation should
        have removed. A backend whose circuit breaker opened in every process
        that saw the outage narrows that window (they fail fast instead of
        reading); invalidate again from a process that saw the failure to close it.
        """
        tag_tuple = check_tags(tags)
        if not tag_tuple:
            return
        if self._pending:
            # Earlier failed invalidations go first.
            seq = self._remember(tag_tuple)
            await self._replay_pending()
            if self._applied < seq:
                raise BackendError(
                    f"invalidation of tags {list(tag_tuple)} in namespace {self._ns!r} not applied: "
                    f"the backend is failing ({self._replay_error}); it will be re-applied before "
                    "this cache reads again"
                ) from self._replay_error
            return
        try:
            await self._backend.invalidate(self._ns, tag_tuple)
        except BaseException as exc:
            # Cancelled callers too: the invalidation may not have reached the backend.
            if isinstance(exc, Exception):
                self._counters.errors += 1
            self._remember(tag_tuple)
            raise
        self._counters.invalidations += len(tag_tuple)

    async def invalidate_tag(self, tag: str) -> None:
        """Invalidate every entry carrying ``tag`` (shorthand for ``invalidate_tags([tag])``)."""
        await self.invalidate_tags([tag])

    async def clear(self) -> int:
        """Remove every entry of this namespace (and nothing else); return how many.

        Other namespaces and foreign keys on the same Redis are untouched:
        never FLUSHDB, never KEYS. A successful clear also settles the failed
        invalidations this cache was waiting to re-apply.
        """
        self._flights.clear()
        started = self._seq
        removed = await self._backend.clear(self._ns)
        # Every invalidation remembered before the clear began is covered by it.
        pending = self._pending
        while pending and pending[0][0] <= started:
            tags = pending.popleft()[1]
            if tags is not None:
                self._pending_tags -= len(tags)
        self._applied = max(self._applied, started)
        return removed

    # ------------------------------------------------------------------ pending invalidations

    def _remember(self, tags: tuple[str, ...]) -> int:
        """Queue ``tags`` for re-applying; return the invalidation's sequence number."""
        seq = self._seq = self._seq + 1
        pending = self._pending
        first = not pending
        if (pending and pending[0][1] is None) or self._pending_tags + len(tags) > _MAX_PENDING_TAGS:
            if not pending or pending[0][1] is not None:
                logger.error(
                    "tagcache: more than %d tags of failed invalidations pending in namespace %r; "
                    "they will be re-applied as one clear of the namespace",
                    _MAX_PENDING_TAGS,
                    self._ns,
                )
            # A clear begun before this invalidation would not cover it: a new entry.
            pending.clear()
            pending.append((seq, None))
            self._pending_tags = 0
        else:
            pending.append((seq, tags))
            self._pending_tags += len(tags)
        if first:
            logger.error(
                "tagcache: invalidation of %s in namespace %r failed; it will be re-applied before "
                "this cache reads again, and until then reads bypass the cache",
                list(tags),
                self._ns,
            )
        return seq

    async def _replay_pending(self) -> bool:
        """Re-apply the pending invalidations (one replay at a time, shared by the callers
        that need it); return whether none is left."""
        task = self._replaying
        if task is None:
            task = self._replaying = self._spawn(self._replay())
        await asyncio.shield(task)
        return not self._pending

    async def _replay(self) -> None:
        pending, backend, ns = self._pending, self._backend, self._ns
        replayed = 0
        try:
            while pending:
                item = pending[0]
                seq, tags = item
                if tags is None:
                    await asyncio.wait_for(backend.clear(ns), _REPLAY_TIMEOUT)
                else:
                    await asyncio.wait_for(backend.invalidate(ns, tags), _REPLAY_TIMEOUT)
                    self._counters.invalidations += len(tags)
                # A collapse or a clear() may have replaced the queue meanwhile.
                if pending and pending[0] is item:
                    pending.popleft()
                    if tags is not None:
                        self._pending_tags -= len(tags)
                self._applied = max(self._applied, seq)
                replayed += 1
        except Exception as exc:
            self._counters.errors += 1
            self._replay_error = exc
            if not self._replay_failing:
                self._replay_failing = True
                logger.error(
                    "tagcache: %d failed invalidation(s) in namespace %r cannot be re-applied yet "
                    "(%s: %s); reads bypass the cache until they are",
                    len(pending),
                    ns,
                    type(exc).__name__,
                    exc,
                )
        else:
            self._replay_failing = False
            self._replay_error = None
            if replayed:
                logger.warning("tagcache: re-applied %d failed invalidation(s) in namespace %r", replayed, ns)
        finally:
            self._replaying = None

    # ------------------------------------------------------------------ decorator

    @overload
    def cached(self, ttl: Callable[P, Awaitable[T]], /) -> CachedFunction[P, T]: ...
    @overload
    def cached(
        self,
        ttl: float | timedelta | _Unset | None = _UNSET,
        *,
        key: str | None = None,
        tags: Sequence[str] | Callable[..., Iterable[str]] | None = None,
        ignore: Iterable[str] = (),
        stale_while_revalidate: float | timedelta = 0,
        early_refresh: bool = False,
        beta: float = 1.0,
        jitter: float = 0.05,
        lock: bool = True,
        fail_open: bool | None = None,
    ) -> Callable[[Callable[P, Awaitable[T]]], CachedFunction[P, T]]: ...

    def cached(
        self,
        ttl: float | timedelta | _Unset | Callable[P, Awaitable[T]] | None = _UNSET,
        *,
        key: str | None = None,
        tags: Sequence[str] | Callable[..., Iterable[str]] | None = None,
        ignore: Iterable[str] = (),
        stale_while_revalidate: float | timedelta = 0,
        early_refresh: bool = False,
        beta: float = 1.0,
        jitter: float = 0.05,
        lock: bool = True,
        fail_open: bool | None = None,
    ) -> CachedFunction[P, T] | Callable[[Callable[P, Awaitable[T]]], CachedFunction[P, T]]:
        """Cache an async function's results::

            @cache.cached(ttl=600, tags=["users", "user:{user_id}"])
            async def get_user(user_id: int) -> User: ...

            @cache.cached  # the same as @cache.cached(): every option at its default
            async def list_plans() -> list[Plan]: ...

        Args:
            ttl: seconds or ``timedelta``; ``None`` for no expiry; omitted: the cache's ``default_ttl``.
            key: a key template such as ``"feed:{user.id}:{page}"``; by default the key is
                ``module.qualname:`` plus a hash of the bound arguments (stable across processes).
            tags: templates formatted from the arguments (``"user:{user_id}"``), or a callable
                ``tags(result, **arguments)`` returning the tags of a result.
            ignore: parameters left out of the key (a database session, say). A method
                (first parameter ``self``) needs ``ignore=("self",)`` (instances share its
                entries) or a ``key`` naming ``self`` (``key="repo:{self.id}:{x}"``).
            stale_while_revalidate: seconds after expiry during which the stale value is
                returned at once while one caller refreshes it in the background.
            early_refresh: refresh a hot entry shortly before it expires (XFetch), so the
                hit ratio does not dip at expiry; ``beta`` above 1 refreshes earlier.
            jitter: fraction of the TTL taken off at random per write (default 5%), so
                entries written together do not expire together.
            lock: on a miss, wait for another process that is already computing the
                value (default); ``False`` computes it here too (for cheap functions).
            fail_open: if the backend fails, call the function directly and return its
                result (logged once per incident, counted in ``stats().errors``);
                ``False`` raises :class:`~tagcache.BackendError`. Omitted: the
                cache's ``fail_open`` setting (``True`` unless set otherwise).

        The wrapper has ``invalidate(*args)``, ``refresh(*args)``, ``key_for(*args)``
        and ``__wrapped__``. Background refreshes (stale-while-revalidate, early
        refresh) call the function in a task of their own, with the same
        arguments: pass resources that outlive the request (an engine or a
        session factory, not a request's session) to functions using them.
        """
        from tagcache.decorator import DEFAULT, is_decoratable, make_decorator

        if is_decoratable(ttl):  # bare @cache.cached: the function came in place of the TTL
            return self.cached()(ttl)
        return make_decorator(
            self,
            ttl=DEFAULT if ttl is _UNSET else ttl,
            key=key,
            tags=tags,
            ignore=ignore,
            stale_while_revalidate=stale_while_revalidate,
            early_refresh=early_refresh,
            beta=beta,
            jitter=jitter,
            lock=lock,
            fail_open=self._fail_open if fail_open is None else fail_open,
        )

    # ------------------------------------------------------------------ get_or_set

    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | timedelta | _Unset | None = _UNSET,
        tags: Iterable[str] | None = None,
        *,
        fail_open: bool | None = None,
    ) -> T:
        """Return the cached value of ``key``, or run ``loader()`` and cache its result.

        Race-free: the tag tokens are read before ``loader`` runs and the value
        is stored only if none of ``tags`` was invalidated meanwhile, so a value
        read from the source before an invalidation is never served after
        :meth:`invalidate_tags` returned.

        Stampede-safe: concurrent callers of the same key in the process wait
        for one load (run in the first caller's task, so it may use that
        task's resources such as a database session). If that caller is
        cancelled, a waiter takes over; if the loader raises, every waiter gets
        the same exception and nothing is cached. Across processes a lease
        lets one caller fill the key while callers elsewhere wait for its
        value (woken by a notification, not by polling) and take over if the
        lease holder fails or its lease (``lease_ttl``) expires. One call waits
        for other callers' loads at most ``lease_ttl`` in all; then it runs
        ``loader`` itself and stores nothing (counted in ``stats().errors``).

        Failures: with ``fail_open`` (default: the cache's setting, ``True``
        unless configured otherwise) a failing backend makes this call
        ``loader()`` and return its value (logged once per incident, counted
        in ``stats().errors``); ``fail_open=False`` raises
        :class:`~tagcache.BackendError` instead. A value ``loader`` produced is
        returned even when storing it fails — a backend error during the fill,
        a value that cannot be encoded or is over ``max_value_size`` — and
        counted in ``stats().not_stored`` and ``stats().errors``, logged once
        per key shape (``user:*``); a strict cache
        (:func:`tagcache.testing.strict`) raises for the value's own problems
        instead. Callers sharing the load receive their own decoded copy of
        the value, or, when it could not be encoded, the loader's object itself.

        ``loader`` is the function, not its result: passing a coroutine object
        (``get_or_set(key, load())``) or a value raises :class:`TypeError`
        before the backend is touched (a coroutine object is closed).
        """
        if not callable(loader):
            what = f"{type(loader).__name__} ({loader!r:.80})"
            if asyncio.iscoroutine(loader):
                loader.close()  # never awaited on purpose: no "never awaited" warning
                what = f"the coroutine object {getattr(loader, '__qualname__', 'loader')}()"
            raise TypeError(
                f"get_or_set needs a function returning an awaitable as loader, got {what}; "
                "pass the function itself, e.g. get_or_set(key, load) "
                "or get_or_set(key, lambda: load(x))"
            )
        key = self._key(key)
        seconds = self._ttl(ttl)
        tag_tuple = check_tags(tags)
        if fail_open is None:
            policy = self._policy
        elif fail_open is True:
            policy = _OPEN_POLICY
        elif fail_open is False:
            policy = _CLOSED_POLICY
        else:
            raise ConfigurationError(f"fail_open must be True, False or None, got {fail_open!r}")
        return await self._load(key, loader, seconds, tag_tuple, policy)

    async def _load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None = None,
    ) -> T:
        """The read-through path shared by :meth:`get_or_set` and the decorator."""
        counters = self._counters
        if _DISABLED.get():
            counters.misses += 1
            return await loader()
        if self._pending and not await self._replay_pending():
            # A failed invalidation is not re-applied yet: the store may be stale.
            counters.misses += 1
            return await loader()
        backend, ns = self._backend, self._ns
        if policy.read_first:
            # A plain read first: hits take the backend's fastest path (batched
            # with concurrent reads); only a miss pays for the snapshot below.
            try:
                nowait = self._get_nowait
                payload = nowait(ns, key) if nowait is not None else await self._backend_get(ns, key)
            except TagCacheError as exc:
                self._backend_failed(exc, policy)
                return await loader()
            if self._incident:
                self._backend_recovered()
            if payload is not None:
                found = self._hit(key, payload, loader, seconds, tags, policy, result_tags)
                if found is not _MISS:
                    return found  # type: ignore[no-any-return]  # decoded payload of a T stored by loader
        # When this call must stop waiting for other callers' loads (set at the first wait).
        deadline: float | None = None
        corrupt = False
        while True:
            try:
                lookup = await backend.fetch(ns, key, tags, self._lease_ttl)
                if lookup.payload is not None:
                    found = self._hit(key, lookup.payload, loader, seconds, tags, policy, result_tags)
                    if found is not _MISS:
                        return found  # type: ignore[no-any-return]  # as above
                    if corrupt:  # written again at once: do not loop on it
                        return await loader()
                    # Corrupt or foreign payload: drop it and read again (now a miss).
                    corrupt = True
                    await backend.delete(ns, key)
                    continue
            except TagCacheError as exc:
                self._backend_failed(exc, policy)
                return await loader()
            if self._incident:
                self._backend_recovered()
            counters.misses += 1
            flight = self._flights.get(key)
            if (
                flight is not None
                and flight.tags == tags
                and flight.tokens == lookup.tokens
                and (result_tags is None or flight.epoch == lookup.epoch)
            ):
                # No invalidation of these tags since that load began (nor of any
                # tag, when tags come from the result): share it.
                now = asyncio.get_running_loop().time()
                if deadline is None:
                    deadline = now + self._lease_ttl
                future = flight.future
                if not future.done() and deadline > now:
                    await asyncio.wait((future,), timeout=deadline - now)
                if not future.done():
                    return await self._stop_waiting(key, loader)
                try:
                    shared = future.result()
                except _Abandoned as abandoned:
                    if abandoned.released:
                        continue
                    return await loader()
                if isinstance(shared, _Shared):
                    return shared.value  # type: ignore[return-value]  # the leader's value, a T
                return self._decode(key, _strip(shared))  # type: ignore[no-any-return]  # as above
            if lookup.lease is None and policy.lock:
                # Another caller (in another process, or one that started before
                # an invalidation) holds the lease: wait for its value.
                now = asyncio.get_running_loop().time()
                if deadline is None:
                    deadline = now + self._lease_ttl
                elif now >= deadline:
                    return await self._stop_waiting(key, loader)
                try:
                    own = await self._await_fill(key, tags, deadline - now)
                except TagCacheError as exc:
                    self._backend_failed(exc, policy)
                    return await loader()
                if own is None:
                    continue
                lookup = own
            return await self._lead(key, loader, seconds, tags, policy, result_tags, lookup)

    def _hit(
        self,
        key: str,
        payload: bytes,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None,
    ) -> Any:
        """Decode a hit, starting a background refresh when it is stale or due for early
        refresh; :data:`_MISS` when the payload is corrupt (counted and logged)."""
        enveloped = payload[:1] == _ENVELOPE
        data = payload[_META.size + 1 :] if enveloped else payload
        try:
            decode = self._decode_payload
            value = decode(data) if decode is not None else self._decode_bound(key, data)
        except Exception as exc:
            self._corrupt(key, exc)
            return _MISS
        if enveloped:
            expires_at, delta = _META.unpack_from(payload, 1)
            if expires_at and policy.due(expires_at, delta):
                self._refresh_soon(key, loader, seconds, tags, policy, result_tags)
        self._counters.hits += 1
        return value

    async def _await_fill(self, key: str, tags: tuple[str, ...], timeout: float) -> Lookup | None:
        """Wait, without polling and at most ``timeout`` seconds, until the key's lease
        holder fills or gives up.

        Returns a miss with this caller's own lease when it may load now, or
        ``None`` when the caller should read the key again.
        """
        backend, ns = self._backend, self._ns
        async with backend.watch(ns, key) as watch:
            # Read again now that the watch is ready: the fill may have happened already.
            lookup = await backend.fetch(ns, key, tags, self._lease_ttl)
            if lookup.payload is not None:
                return None
            if lookup.lease is not None:
                return lookup
            await watch.wait(timeout)
        return None

    async def _stop_waiting(self, key: str, loader: Callable[[], Awaitable[T]]) -> T:
        """Load without storing: this call waited ``lease_ttl`` for others' loads of ``key``."""
        self._counters.errors += 1
        self._log_once(
            "wait",
            key,
            "tagcache: waited lease_ttl (%g s) for another caller to load key %r (a lease holder "
            "that does not finish, or foreign data under the lease); loading it here without storing",
            self._lease_ttl,
            key,
        )
        return await loader()

    async def _lead(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None,
        lookup: Lookup,
    ) -> T:
        """Run ``loader`` as the key's in-process flight; store its value under the lease."""
        flight = _Flight(tags, lookup)
        self._flights[key] = flight
        lease = lookup.lease
        try:
            started = time.monotonic()
            try:
                value = await loader()
            except asyncio.CancelledError:
                # Wake the waiters only once the lease is released, so one of
                # them can take it and load in its own task.
                self._spawn(self._abandon(flight, key, lease))
                raise
            except BaseException as exc:
                if lease is not None:
                    self._release_soon(key, lease)
                flight.future.set_exception(exc)
                raise
            loaded = self._prepare(key, value, seconds, time.monotonic() - started, tags, policy, result_tags)
            problem = loaded.problem
            if problem is not None and self._strict_now():
                if lease is not None:
                    self._release_soon(key, lease)
                flight.future.set_exception(problem)
                raise problem
            payload = loaded.payload
            flight.future.set_result(payload if payload is not None else _Shared(value))
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
        if problem is not None:
            if lease is not None:
                self._release_soon(key, lease)
            self._not_stored(key, problem)
        elif lease is not None:
            await self._store(key, loaded, tags, lookup, lease)
        return value

    def _prepare(
        self,
        key: str,
        value: T,
        seconds: float | None,
        delta: float,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None,
    ) -> _Loaded:
        """Encode a value ``loader`` took ``delta`` seconds to produce, with its physical
        TTL and result tags, noting (never raising) why it cannot be stored."""
        problem: Exception | None = None
        payload: bytes | None = None
        try:
            payload = self._encode(key, value)
        except SerializationError as exc:
            problem = exc
        else:
            problem = self._too_large(key, payload)
        seconds = policy.jittered(seconds)
        if payload is not None and policy.envelope and seconds is not None:
            payload = _wrap(payload, seconds, delta)
        extra: tuple[str, ...] = ()
        if result_tags is not None and problem is None:
            try:
                extra = tuple(t for t in check_tags(result_tags(value)) if t not in tags)
            except Exception as exc:  # the tags callable failed, or returned bad tags
                problem = exc
        return _Loaded(payload, policy.physical_ttl(seconds, delta), extra, problem)

    async def _store(
        self, key: str, loaded: _Loaded, tags: tuple[str, ...], lookup: Lookup, lease: str
    ) -> bool:
        """Compare-and-set ``loaded`` under ``lease``; return whether it was stored.

        Never raises a backend error: a failed store is counted and logged, and the
        lease released in the background (also when the caller is cancelled).
        """
        backend, ns = self._backend, self._ns
        seconds, payload = loaded.ttl, loaded.payload
        if seconds == 0 or payload is None:
            self._release_soon(key, lease)
            return False
        tokens, epoch = lookup.tokens, None
        try:
            if loaded.extra:
                # Tags known only from the result could not be snapshot at the
                # miss: read their tokens now, and store only if no tag at all
                # was invalidated since the miss (the epoch), which covers an
                # invalidation of these tags while the value was computed.
                current = await backend.lease(ns, key, loaded.extra, self._lease_ttl)
                if current.lease is not None:
                    # Our lease expired during the load (this one is new): the value
                    # is too late to store, and the new lease must not linger.
                    self._release_soon(key, current.lease)
                    return False
                tags, tokens, epoch = tags + loaded.extra, tokens + current.tokens, lookup.epoch
            stored = await backend.fill(ns, key, payload, seconds, tags, tokens, lease, epoch)
        except asyncio.CancelledError:
            self._release_soon(key, lease)
            raise
        except Exception as exc:
            self._release_soon(key, lease)
            self._not_stored(key, exc)
            return False
        if stored:
            self._counters.sets += 1
            note_write()
        return stored

    def _refresh_soon(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None,
    ) -> None:
        """Refresh ``key`` in the background, once per process; the lease makes it once overall."""
        if key in self._refreshing or self._closed:
            return
        self._refreshing.add(key)
        self._spawn(self._refresh(key, loader, seconds, tags, policy, result_tags))

    async def _refresh(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None,
    ) -> None:
        try:
            await self._recompute(key, loader, seconds, tags, policy, result_tags)
        except Exception:
            self._counters.errors += 1
            logger.warning("tagcache: background refresh of key %r failed", key, exc_info=True)
        finally:
            self._refreshing.discard(key)

    async def _recompute(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        seconds: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None,
    ) -> tuple[T] | None:
        """Run ``loader`` and store its value if this caller gets the key's lease.

        Returns ``(value,)``, or ``None`` without running the loader when
        another caller holds the lease (it is refreshing the key already). A
        backend failure taking the lease raises; one storing the value does not
        (the value is returned, counted in ``not_stored``).
        """
        lookup = await self._backend.lease(self._ns, key, tags, self._lease_ttl)
        if lookup.lease is None:
            return None
        lease = lookup.lease
        try:
            started = time.monotonic()
            value = await loader()
        except BaseException:
            self._release_soon(key, lease)
            raise
        loaded = self._prepare(key, value, seconds, time.monotonic() - started, tags, policy, result_tags)
        if loaded.problem is not None:
            self._release_soon(key, lease)
            if self._strict_now():
                raise loaded.problem
            self._not_stored(key, loaded.problem)
            return (value,)
        await self._store(key, loaded, tags, lookup, lease)
        return (value,)

    def _backend_failed(self, exc: TagCacheError, policy: LoadPolicy) -> None:
        """Count a backend failure; re-raise it unless the policy fails open, in which
        case log it once per incident (until the backend answers again)."""
        self._counters.errors += 1
        if not policy.fail_open:
            raise exc
        if not self._incident:
            self._incident = True
            logger.error("tagcache: backend failing, calling functions directly: %s", exc)

    def _backend_recovered(self) -> None:
        self._incident = False
        logger.warning("tagcache: backend answering again")

    async def _release(self, key: str, lease: str) -> bool:
        """Give up ``lease``; return whether that succeeded. Run in a background task and
        bounded in time, so the caller's cancellation never leaves the lease held."""
        try:
            await asyncio.wait_for(self._backend.release(self._ns, key, lease), _RELEASE_TIMEOUT)
        except Exception as exc:  # the lease expires by itself; the loader's outcome matters more
            self._counters.errors += 1
            self._log_once(
                "release",
                key,
                "tagcache: could not release the lease on key %r (it expires after lease_ttl): %s: %s",
                key,
                type(exc).__name__,
                exc,
            )
            return False
        return True

    async def _abandon(self, flight: _Flight, key: str, lease: str | None) -> None:
        """Release the lease of a cancelled leader, then wake the callers sharing its load."""
        released = False
        try:
            released = lease is None or await self._release(key, lease)
        finally:
            if not flight.future.done():
                flight.future.set_exception(_Abandoned(released))

    def _release_soon(self, key: str, lease: str) -> None:
        """Release ``lease`` in a background task, whatever happens to the caller."""
        self._spawn(self._release(key, lease))

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> asyncio.Task[Any]:
        """Run ``coro`` in a background task of its own (the caller's cancellation does
        not reach it); :meth:`aclose` waits for it."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ stats & lifecycle

    async def stats(self) -> CacheStats:
        """Return this cache's counters and the backend's figures (memory, keys, evictions).

        ``keys`` counts this namespace's entries where the backend can do so
        without a scan (the memory backend), else it is ``None`` (Redis);
        ``server_keys``, ``memory_bytes`` and ``evictions`` are backend-wide
        (for Redis: ``DBSIZE`` and the server's ``INFO``). If the backend
        cannot be reached, its figures are ``None`` and ``backend["error"]``
        says why; the counters are still reported. A backend that knows its
        own health (a circuit breaker's state, see
        :class:`~tagcache.backends.base.HealthReporting`) adds it as
        ``health``, read without a round trip.
        """
        try:
            info = await self._backend.info()
        except TagCacheError as exc:
            info = BackendInfo(extra={"error": str(exc)})
        health: Mapping[str, object] = {}
        if self._health is not None:
            try:
                health = self._health()
            except Exception as exc:  # a report must not fail because one figure did
                health = {"error": f"{type(exc).__name__}: {exc}"}
        return CacheStats.from_counters(
            self._counters, info, pending_invalidations=len(self._pending), health=health, namespace=self._ns
        )

    def reset_stats(self) -> None:
        """Set this cache's counters back to zero."""
        self._counters.reset()

    async def aclose(self) -> None:
        """Finish background work (lease releases, refreshes, the replay of failed
        invalidations) and close the backend (if the cache owns it). Idempotent.

        Failed invalidations still pending are re-applied one last time; if that
        fails too they are lost, and logged at ERROR with their tags.
        """
        if self._closed:
            return
        self._closed = True
        if self._pending:
            await self._replay_pending()
            if self._pending:
                logger.error(
                    "tagcache: closing namespace %r with %d failed invalidation(s) not re-applied: %s; "
                    "other processes may serve entries carrying these tags until they expire",
                    self._ns,
                    len(self._pending),
                    "the whole namespace"
                    if self._pending[0][1] is None
                    else sorted({tag for _, tags in self._pending for tag in tags or ()}),
                )
        while self._background:
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
