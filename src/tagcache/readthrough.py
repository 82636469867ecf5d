"""The read-through engine: load a key on a miss, once per key, and store the value
only if none of its tags was invalidated meanwhile.

This is tagcache's internal interface for everything that reads through the
cache: :meth:`tagcache.Cache.get_or_set`, ``@cache.cached`` functions and their
``refresh``, and the warming jobs that call them. An integration describes one
load with a :class:`LoadRequest` and hands it to the :class:`ReadThrough`
engine its :class:`~tagcache.Cache` owns (:attr:`tagcache.Cache.engine`):

* :meth:`ReadThrough.load` — return the cached value, or run the loader (once
  per key in the process, under the key's lease across processes) and store
  its value with a compare-and-set against the tag tokens read before it ran;
* :meth:`ReadThrough.recompute` — run the loader now and store its value if
  this caller gets the key's lease (a refresh).

The engine also owns what every read path shares: the in-process flights, the
background tasks (lease releases, refreshes), and the failed invalidations
waiting to be re-applied before the next read. See ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from tagcache.backends.base import Backend, LocalReads, Lookup, NowaitReads, ScopedInvalidation, SupportsWatch
from tagcache.codec import Codec, KeyBoundCodec
from tagcache.envelope import ENVELOPE, META, strip, wrap
from tagcache.exceptions import BackendError, PartialInvalidationError, SerializationError, ValueTooLargeError
from tagcache.stats import Counters, note_not_stored, note_write
from tagcache.tags import check_tags

__all__ = ["DISABLED", "NOT_FOUND", "STRICT", "LoadPolicy", "LoadRequest", "ReadThrough", "Uncached"]

logger: Final = logging.getLogger("tagcache")

T = TypeVar("T")

#: When true in the current context, every cache reads as a miss and writes nothing.
#: Set it with :func:`tagcache.testing.caching_disabled`.
DISABLED: Final[ContextVar[bool]] = ContextVar("tagcache_disabled", default=False)

#: When true in the current context, a loaded value that cannot be stored because of
#: the value itself raises instead of being returned uncached (``Cache(strict=True)``
#: for one cache). Set it with :func:`tagcache.testing.strict`.
STRICT: Final[ContextVar[bool]] = ContextVar("tagcache_strict", default=False)

#: Seconds a lease release running in the background may take; past that the lease
#: is left to expire by itself.
_RELEASE_TIMEOUT: Final = 2.0
#: Seconds one backend call re-applying a pending invalidation may take.
_REPLAY_TIMEOUT: Final = 10.0
#: Seconds between the background replays started by reads that the pending
#: invalidations do not concern (after a partial failure).
_REPLAY_KICK_INTERVAL: Final = 0.1
#: Tags of failed invalidations remembered for replay; beyond this many, the
#: replay becomes one clear of the namespace.
_MAX_PENDING_TAGS: Final = 10_000
#: Keys whose latest background refresh is remembered (see ReadThrough._refresh_soon), at most.
_MAX_REFRESHED: Final = 10_000
#: Key shapes whose failures to store have been logged, at most.
_MAX_SHAPES: Final = 256

# A key's shape for logging: alphanumeric runs that are hex with a digit in them
# (hashes, UUID parts) and then any digit run become "*": "user:123" and
# "user:456" are both "user:*".
_HEX_RUN: Final = re.compile(r"(?<![A-Za-z0-9])[0-9A-Fa-f]*[0-9][0-9A-Fa-f]*(?![A-Za-z0-9])")
_DIGIT_RUN: Final = re.compile(r"[0-9]+")

#: Returned by ReadThrough._hit for a payload that could not be decoded.
_MISS: Final = object()
#: Returned by ReadThrough._join when the load it joined was abandoned: read again.
_RETRY: Final = object()


class _Expired:
    """Returned by ReadThrough._hit for an entry past its expiry and stale window, kept
    only for ``stale_if_error``: its decoded value, the fallback if loading fails."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _NotFound:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<not found>"


#: Returned by :meth:`ReadThrough.cached_nowait` when it has no value to give at once.
NOT_FOUND: Final = _NotFound()
#: Polling a key whose lease another caller holds, on a backend without
#: :class:`~tagcache.backends.base.SupportsWatch`: first and longest pause, seconds.
_POLL_FIRST: Final = 0.005
_POLL_MAX: Final = 0.1
#: A loader's keyword arguments when a request gives none.
_NO_KWARGS: Final[Mapping[str, Any]] = MappingProxyType({})


def _key_shape(key: str) -> str:
    """The key with runs of digits and hexadecimal identifiers replaced by ``*``
    (``"user:42:posts"`` -> ``"user:*:posts"``): failures are logged once per shape."""
    return _DIGIT_RUN.sub("*", _HEX_RUN.sub("*", key))


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
    #: On a backend whose reads wait for I/O, try a plain read before the snapshot
    #: read (a miss then costs one more round trip). Off by default: the backend's
    #: ``fetch`` is a read that snapshots and leases only on a miss. Backends with
    #: :class:`~tagcache.backends.base.NowaitReads` always read first (it is free).
    read_first: bool = False
    #: Seconds after expiry during which an expired value is returned when loading a
    #: fresh one raises or runs past ``timeout``.
    stale_if_error: float = 0.0
    #: Seconds the loader may run; past that it is cancelled and the call fails with
    #: :class:`TimeoutError` (or returns the stale value, within ``stale_if_error``).
    timeout: float | None = None

    @property
    def envelope(self) -> bool:
        """Whether entries need their expiry and load time stored beside the value."""
        return self.stale_while_revalidate > 0 or self.early_refresh or self.stale_if_error > 0

    def stale_window(self, seconds: float | None, delta: float) -> float:
        """Seconds after expiry during which an entry is served as a hit while one caller
        refreshes it: the stale-while-revalidate window, or (with early refresh) a grace
        of twice the compute time, at most a tenth of the TTL, in which a refresh that
        started just before expiry can finish while the current value is still served."""
        grace = min(2.0 * delta + 0.01, 0.1 * seconds) if self.early_refresh and seconds else 0.0
        return max(self.stale_while_revalidate, grace)

    def physical_ttl(self, seconds: float | None, delta: float) -> float | None:
        """How long the backend keeps an entry whose value took ``delta`` seconds to compute:
        the TTL plus the longer of :meth:`stale_window` and ``stale_if_error``."""
        if seconds is None:
            return None
        return seconds + max(self.stale_window(seconds, delta), self.stale_if_error)

    def jittered(self, seconds: float | None) -> float | None:
        """``seconds`` less a random fraction (up to ``jitter``) of it."""
        if seconds is None or not self.jitter:
            return seconds
        return seconds * (1.0 - self.jitter * random.random())

    def due(self, expires_at: float, delta: float, now: float) -> bool:
        """Whether an entry expiring at ``expires_at`` should be refreshed at time ``now``."""
        if now >= expires_at:
            return True  # stale: served within the stale window, refreshed in the background
        if self.early_refresh:
            # XFetch: refresh with a probability growing as expiry nears,
            # earlier for values that take long (delta) to compute.
            return now - delta * self.beta * math.log(1.0 - random.random()) >= expires_at
        return False


class LoadRequest(Generic[T]):
    """One read-through load: what to load, under which key and tags, and how.

    Built per call by an integration and handed to :meth:`ReadThrough.load` or
    :meth:`ReadThrough.recompute`; the engine never changes it. A slots class
    with a plain constructor rather than a frozen dataclass, because one is
    built on every decorated call, hits included.

    Attributes:
        key: the checked cache key.
        loader: called with ``args`` and ``kwargs`` (none by default) on a miss or a
            refresh; returns an awaitable of the value. A decorated call passes
            the function and the call's arguments, so it builds no closure.
        ttl: the logical TTL in seconds (``None``: no expiry), before jitter.
        tags: the checked tags, known before ``loader`` runs.
        policy: how the load behaves (locking, stale-while-revalidate, fail-open...).
        result_tags: tags computed from the value (``None``: only ``tags``).
        args: positional arguments for ``loader``.
        kwargs: keyword arguments for ``loader``.
        stats: the caller's own counters (a decorated function's, see
            :meth:`tagcache.Cache.function_counters`), counted in besides the
            cache's: hits, misses, lock waits, and the errors, stale values,
            timeouts and values not stored of this call.
    """

    __slots__ = ("args", "key", "kwargs", "loader", "policy", "result_tags", "stats", "tags", "ttl")

    def __init__(
        self,
        key: str,
        loader: Callable[..., Awaitable[T]],
        ttl: float | None,
        tags: tuple[str, ...],
        policy: LoadPolicy,
        result_tags: Callable[[T], Iterable[str]] | None = None,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] = _NO_KWARGS,
        stats: Counters | None = None,
    ) -> None:
        self.key = key
        self.loader = loader
        self.ttl = ttl
        self.tags = tags
        self.policy = policy
        self.result_tags = result_tags
        self.args = args
        self.kwargs = kwargs
        self.stats = stats

    def call(self) -> Awaitable[T]:
        """Call the loader with the request's arguments."""
        return self.loader(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"LoadRequest(key={self.key!r}, ttl={self.ttl!r}, tags={self.tags!r})"


class _Abandoned(Exception):
    """Set on a flight whose leader was cancelled: its waiters retry instead of failing.

    ``released`` is false when the leader's lease could not be released: it stays
    held until it expires, so a waiter loads without it instead of waiting it out.
    """

    def __init__(self, released: bool) -> None:
        super().__init__()
        self.released = released


class Uncached(Generic[T]):
    """What a loader returns for a value that must not be stored (a query result over
    a row limit, a value of a type the integration cannot keep exactly).

    :meth:`ReadThrough.load` and :meth:`ReadThrough.recompute` return it as is, to
    the caller that ran the loader and to the callers sharing its load, store
    nothing, release the lease, and count it in ``stats().not_stored`` (not in
    ``errors``: nothing failed); ``reason`` is logged at INFO once per key shape.
    """

    __slots__ = ("reason", "value")

    def __init__(self, value: T, reason: str) -> None:
        self.value = value
        self.reason = reason

    def __repr__(self) -> str:
        return f"Uncached({self.reason!r})"


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


class _Pending:
    """A failed invalidation waiting to be re-applied."""

    __slots__ = ("first", "scope", "seq", "tags")

    def __init__(
        self, seq: int, tags: tuple[str, ...] | None, scope: frozenset[int] | None, first: int
    ) -> None:
        #: The sequence number of the (latest) invalidation it stands for.
        self.seq = seq
        #: The smallest sequence number it stands for (several collapse into one clear).
        self.first = first
        #: Its tags; ``None``: clear the whole namespace, what too many pending tags collapse into.
        self.tags = tags
        #: The buckets where it may not be applied (a partial failure); ``None``: all of them.
        self.scope = scope


class ReadThrough:
    """The read-through engine of one :class:`~tagcache.Cache` (one backend and namespace).

    Integrations call :meth:`load` and :meth:`recompute` with a :class:`LoadRequest`.
    The owning cache also uses the payload helpers (:meth:`encode`,
    :meth:`too_large`, :meth:`decode`, :attr:`decode_payload`,
    :meth:`decode_bound`, :meth:`corrupt`), the shared state (:attr:`flights`,
    :attr:`pending`, :attr:`counters`) and the pending-invalidation queue
    (:meth:`remember`, :meth:`replay_pending`, :meth:`cleared`).
    """

    def __init__(
        self,
        backend: Backend,
        namespace: str,
        codec: Codec,
        *,
        max_value_size: int,
        lease_ttl: float,
        strict: bool,
        counters: Counters,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._ns = namespace
        self._codec = codec
        #: Unix time for the expiry written into enveloped entries and read back
        #: from them (stale-while-revalidate, early refresh, stale-if-error).
        self._clock = clock
        # Bound methods looked up once: the hit path runs them on every call.
        self._backend_get = backend.get
        self._get_nowait = backend.get_nowait if isinstance(backend, NowaitReads) else None
        # A read without I/O for cached_nowait: the in-process store's, or the copies an L1
        # keeps in process memory (a hit when present; else load() asks the backend).
        local = backend.get_local if isinstance(backend, LocalReads) else None
        self._read_nowait = self._get_nowait or local
        self._can_watch = isinstance(backend, SupportsWatch)
        #: The codec's ``decode``, or ``None`` for a codec binding payloads to their
        #: place (it gets "namespace NUL key" as context): then hit paths call
        #: :meth:`decode_bound` instead.
        self.decode_payload: Callable[[bytes], Any] | None = codec.decode
        self._context: bytes | None = None
        if isinstance(codec, KeyBoundCodec):
            self._context = namespace.encode() + b"\x00"
            self._encode_for = codec.encode_for
            self._decode_for = codec.decode_for
            self.decode_payload = None
        self._max_value_size = max_value_size
        self._lease_ttl = lease_ttl
        self._strict = strict
        #: The owning cache's counters (``stats()``).
        self.counters = counters
        #: In-process loads by key; a write or delete of the key drops its flight.
        self.flights: dict[str, _Flight] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._refreshing: set[str] = set()
        # Key -> expiry of the entry whose background refresh this process ran last.
        self._refreshed: dict[str, float] = {}
        self._incident = False
        self._closed = False
        #: Failed invalidations, oldest first, re-applied before the next read of a key
        #: they concern (every key, unless a backend said which part of it failed).
        self.pending: deque[_Pending] = deque()
        self._pending_tags = 0
        #: Sequence number of the latest invalidation remembered.
        self.seq = 0
        self._scope_of = backend.scope_of if isinstance(backend, ScopedInvalidation) else None
        self._invalidate_scope = backend.invalidate_scope if isinstance(backend, ScopedInvalidation) else None
        self._replaying: asyncio.Task[Any] | None = None
        # Monotonic time before which reads the pending invalidations do not concern
        # start no replay in the background (a failing part is retried this often).
        self._next_kick = 0.0
        #: Why the latest replay failed (``None`` after one succeeded).
        self.replay_error: BaseException | None = None
        self._replay_failing = False
        # (failure kind, key shape) pairs logged already.
        self._logged_shapes: set[tuple[str, str]] = set()
        self._logged_uncached: set[str] = set()
        # The event loop the flights and background tasks belong to (see _follow_loop).
        self._loop: asyncio.AbstractEventLoop | None = None

    def _follow_loop(self) -> None:
        """Forget the flights and tasks of an earlier event loop when running under a new one.

        A cache may outlive its event loop (a module-level cache under successive
        ``asyncio.run`` calls, or pytest's per-test loops): futures and tasks of a
        closed loop can never complete, so waiting on them would fail.
        """
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        if self._loop is not None:
            self.flights.clear()
            self._background = set()
            self._refreshing.clear()
            self._replaying = None
        self._loop = loop

    # ------------------------------------------------------------------ payloads

    def encode(self, key: str, value: object) -> bytes:
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

    def too_large(self, key: str, payload: bytes) -> ValueTooLargeError | None:
        """The error for a payload over ``max_value_size``, or ``None``."""
        if len(payload) <= self._max_value_size:
            return None
        return ValueTooLargeError(
            f"value for key {key!r} is {len(payload)} bytes encoded, over max_value_size="
            f"{self._max_value_size}; store less, or raise max_value_size"
        )

    def decode(self, key: str, payload: bytes) -> Any:
        """Decode the codec payload stored under ``key`` (outside the hit paths)."""
        context = self._context
        if context is None:
            return self._codec.decode(payload)
        return self._decode_for(payload, context + key.encode())

    def decode_bound(self, key: str, payload: bytes) -> Any:
        """Decode with a key-bound codec (:attr:`decode_payload` is ``None``)."""
        context = self._context
        assert context is not None
        return self._decode_for(payload, context + key.encode())

    def corrupt(self, key: str, exc: Exception, stats: Counters | None = None) -> None:
        """Count and log a payload under ``key`` that could not be decoded (read as a miss)."""
        self.counters.errors += 1
        if stats is not None:
            stats.errors += 1
        logger.warning("tagcache: unreadable value under key %r treated as a miss: %s", key, exc)

    def _strict_now(self) -> bool:
        return self._strict or STRICT.get()

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

    def _not_stored(self, key: str, exc: BaseException, stats: Counters | None) -> None:
        """Count and log (once per key shape) a loaded value returned without being stored."""
        for counters in (self.counters, stats):
            if counters is not None:
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

    def _uncached(self, key: str, value: Uncached[Any], stats: Counters | None) -> None:
        """Count and log (once per key shape) a loaded value its loader asked not to store."""
        self.counters.not_stored += 1
        if stats is not None:
            stats.not_stored += 1
        note_not_stored()
        shape = _key_shape(key)
        if len(self._logged_uncached) < _MAX_SHAPES and shape not in self._logged_uncached:
            self._logged_uncached.add(shape)
            logger.info(
                "tagcache: the value loaded for key %r is returned but not cached: %s", key, value.reason
            )

    # ------------------------------------------------------------------ the interface

    def cached_nowait(self, key: str, stats: Counters | None = None) -> Any:
        """The value cached under ``key`` when it can be had without waiting: the backend
        reads without I/O (:class:`~tagcache.backends.base.NowaitReads`) and holds a plain,
        fresh entry. Otherwise :data:`NOT_FOUND` (nothing is counted then): the caller
        goes on with :meth:`load`. The fast path of decorated calls on in-process backends.
        """
        nowait = self._read_nowait
        if nowait is None or self.pending or DISABLED.get():
            return NOT_FOUND
        try:
            payload = nowait(self._ns, key)
            if payload is None or payload[:1] == ENVELOPE or not payload:
                return NOT_FOUND  # a miss, an entry with an expiry to check, or a corrupt one
            decode = self.decode_payload
            value = decode(payload) if decode is not None else self.decode_bound(key, payload)
        except Exception:
            return NOT_FOUND  # load() reads it again, and counts, logs or raises what failed
        self.counters.hits += 1
        if stats is not None:
            stats.hits += 1
        return value

    async def load(self, request: LoadRequest[T]) -> T:
        """Return the value cached under ``request.key``, or load, store and return it.

        The read-through path of :meth:`tagcache.Cache.get_or_set` and of
        ``@cached`` functions: one ``fetch`` per call (a read that, on a miss,
        reads the tag tokens and takes the key's lease before the loader runs),
        so a miss costs two round trips (fetch, fill); concurrent callers in the
        process share one load, callers in other processes wait for the lease
        holder's value, and the value is stored only if no tag was invalidated
        meanwhile. A backend failure raises, or with ``policy.fail_open`` calls
        the loader directly. A value that cannot be stored is returned anyway
        (counted in ``not_stored``), unless the cache is strict. An expired
        entry kept for ``policy.stale_if_error`` is returned if loading a fresh
        value fails.
        """
        key, policy, stats = request.key, request.policy, request.stats
        counters = self.counters
        if DISABLED.get():
            counters.misses += 1
            if stats is not None:
                stats.misses += 1
            return await self._call(request)
        if self.pending and not await self.may_read(key):
            # A failed invalidation is not re-applied yet: the store may be stale.
            counters.misses += 1
            if stats is not None:
                stats.misses += 1
            return await self._call(request)
        backend, ns = self._backend, self._ns
        nowait = self._get_nowait
        if nowait is not None or policy.read_first:
            # A plain read first: free on an in-process backend; elsewhere hits take
            # the backend's fastest path and only a miss pays for the snapshot below.
            try:
                payload = nowait(ns, key) if nowait is not None else await self._backend_get(ns, key)
            except BackendError as exc:
                self._backend_failed(exc, policy, stats)
                return await self._call(request)
            if self._incident:
                self._backend_recovered()
            if payload is not None:
                found = self._hit(request, payload)
                if found is not _MISS:
                    if type(found) is _Expired:
                        return await self._load_expired(request, found.value)
                    return found  # type: ignore[no-any-return]  # decoded payload of a T stored by loader
        self._follow_loop()
        tags, result_tags = request.tags, request.result_tags
        # When this call must stop waiting for other callers' loads (set at the first wait).
        deadline: float | None = None
        corrupt = False
        while True:
            try:
                lookup = await backend.fetch(ns, key, tags, self._lease_ttl)
                if lookup.payload is not None:
                    found = self._hit(request, lookup.payload)
                    if found is not _MISS:
                        if type(found) is _Expired:
                            return await self._load_expired(request, found.value)
                        return found  # type: ignore[no-any-return]  # as above
                    if corrupt:  # written again at once: do not loop on it
                        return await self._call(request)
                    # Corrupt or foreign payload: drop it and read again (now a miss).
                    corrupt = True
                    await backend.delete(ns, key)
                    continue
            except BackendError as exc:
                self._backend_failed(exc, policy, stats)
                return await self._call(request)
            if self._incident:
                self._backend_recovered()
            counters.misses += 1
            if stats is not None:
                stats.misses += 1
            flight = self.flights.get(key)
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
                    counters.lock_waits += 1
                    if stats is not None:
                        stats.lock_waits += 1
                joined = await self._join(request, flight, deadline - now, None)
                if joined is _RETRY:
                    continue
                return joined  # type: ignore[no-any-return]  # the leader's value, a T
            if lookup.lease is None and policy.lock:
                # Another caller (in another process, or one that started before
                # an invalidation) holds the lease: wait for its value.
                now = asyncio.get_running_loop().time()
                if deadline is None:
                    deadline = now + self._lease_ttl
                    counters.lock_waits += 1
                    if stats is not None:
                        stats.lock_waits += 1
                elif now >= deadline:
                    return await self._stop_waiting(key, request)
                try:
                    own = await self._await_fill(key, tags, deadline - now)
                except BackendError as exc:
                    self._backend_failed(exc, policy, stats)
                    return await self._call(request)
                if own is None:
                    continue
                lookup = own
            return await self._lead(request, lookup)

    async def _join(
        self, request: LoadRequest[T], flight: _Flight, timeout: float, stale: tuple[T] | None
    ) -> Any:
        """Wait (at most ``timeout`` seconds) for an in-process load of the key and return a
        private copy of its value; :data:`_RETRY` when its leader was cancelled and released
        its lease (read the key again). With ``stale``, a failed load returns ``stale[0]``."""
        key = request.key
        future = flight.future
        if not future.done() and timeout > 0:
            await asyncio.wait((future,), timeout=timeout)
        if not future.done():
            return await self._stop_waiting(key, request)
        try:
            shared = future.result()
        except _Abandoned as abandoned:
            if abandoned.released:
                return _RETRY
            return await self._call(request)
        except Exception as exc:
            if stale is None:
                raise
            return self._serve_stale(key, stale[0], exc, request.stats)
        if isinstance(shared, _Shared):
            return shared.value
        return self.decode(key, strip(shared))

    async def _load_expired(self, request: LoadRequest[T], stale: T) -> T:
        """Load a key whose entry expired but is kept for ``stale_if_error``: take its lease
        (or join the process's load of it) and return ``stale`` if the load fails.

        Without the lease (another caller is refreshing the key) this call loads too,
        without storing, rather than wait: an expired value is not served without an error.
        """
        key, policy, stats = request.key, request.policy, request.stats
        self.counters.misses += 1
        if stats is not None:
            stats.misses += 1
        self._follow_loop()
        try:
            lookup = await self._backend.lease(self._ns, key, request.tags, self._lease_ttl)
        except BackendError as exc:
            self._backend_failed(exc, policy, stats)
            return await self._load_or_stale(request, stale)
        if self._incident:
            self._backend_recovered()
        flight = self.flights.get(key)
        if (
            flight is not None
            and flight.tags == request.tags
            and flight.tokens == lookup.tokens
            and (request.result_tags is None or flight.epoch == lookup.epoch)
        ):
            if lookup.lease is not None:
                self._release_soon(key, lookup.lease)
            joined = await self._join(request, flight, self._lease_ttl, (stale,))
            if joined is _RETRY:
                return await self._load_or_stale(request, stale)
            return joined  # type: ignore[no-any-return]  # the leader's value, a T
        return await self._lead(request, lookup, (stale,))

    async def _load_or_stale(self, request: LoadRequest[T], stale: T) -> T:
        """Call the loader without storing; return ``stale`` if it fails."""
        try:
            return await self._call(request)
        except Exception as exc:
            return self._serve_stale(request.key, stale, exc, request.stats)

    def _serve_stale(self, key: str, stale: T, exc: Exception, stats: Counters | None) -> T:
        """Count and log (once per key shape) an expired value served because loading failed."""
        for counters in (self.counters, stats):
            if counters is not None:
                counters.stale_on_error += 1
                counters.errors += 1
        self._log_once(
            "stale",
            key,
            "tagcache: serving the expired value of key %r (stale_if_error): loading it failed: %s: %s",
            key,
            type(exc).__name__,
            exc,
        )
        return stale

    async def _call(self, request: LoadRequest[T]) -> T:
        """Run the request's loader, bounded by ``policy.timeout`` when it has one.

        Past the timeout the loader is cancelled and :class:`TimeoutError` raised
        (counted in ``timeouts`` and ``errors``). The loader runs in the caller's
        task (on Python 3.11+), so it may use the caller's resources.
        """
        timeout = request.policy.timeout
        if timeout is None:
            return await request.call()
        if sys.version_info < (3, 11):
            try:
                return await asyncio.wait_for(request.call(), timeout)
            except asyncio.TimeoutError as exc:
                raise self._timed_out(request.key, timeout, request.stats) from exc
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await request.call()
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the loader's own TimeoutError
            raise self._timed_out(request.key, timeout, request.stats) from exc

    def _timed_out(self, key: str, timeout: float, stats: Counters | None) -> TimeoutError:
        for counters in (self.counters, stats):
            if counters is not None:
                counters.timeouts += 1
                counters.errors += 1
        return TimeoutError(f"loading key {key!r} took longer than timeout={timeout:g} s; it was cancelled")

    async def recompute(self, request: LoadRequest[T]) -> tuple[T] | None:
        """Run the request's loader and store its value if this caller gets the key's lease.

        Returns ``(value,)``, or ``None`` without running the loader when
        another caller holds the lease (it is refreshing the key already). A
        backend failure taking the lease raises; one storing the value does not
        (the value is returned, counted in ``not_stored``).
        """
        key = request.key
        if DISABLED.get():  # caching_disabled(): nothing is stored
            return (await self._call(request),)
        lookup = await self._backend.lease(self._ns, key, request.tags, self._lease_ttl)
        if lookup.lease is None:
            return None
        lease = lookup.lease
        try:
            started = self._clock()
            value = await self._call(request)
        except BaseException:
            self._release_soon(key, lease)
            raise
        if isinstance(value, Uncached):
            self._release_soon(key, lease)
            self._uncached(key, value, request.stats)
            return (value,)
        loaded = self._prepare(request, value, max(0.0, self._clock() - started))
        if loaded.problem is not None:
            self._release_soon(key, lease)
            if self._strict_now():
                raise loaded.problem
            self._not_stored(key, loaded.problem, request.stats)
            return (value,)
        await self._store(key, loaded, request.tags, lookup, lease, request.stats)
        return (value,)

    # ------------------------------------------------------------------ the engine

    def _hit(self, request: LoadRequest[Any], payload: bytes) -> Any:
        """Decode a hit, starting a background refresh when it is stale or due for early
        refresh; :data:`_MISS` when the payload is corrupt (counted and logged); an
        :class:`_Expired` when it is past its stale window and kept for ``stale_if_error``."""
        enveloped = payload[:1] == ENVELOPE
        data = payload[META.size + 1 :] if enveloped else payload
        try:
            decode = self.decode_payload
            value = decode(data) if decode is not None else self.decode_bound(request.key, data)
        except Exception as exc:
            self.corrupt(request.key, exc, request.stats)
            return _MISS
        if enveloped:
            expires_at, delta = META.unpack_from(payload, 1)
            if expires_at:
                policy = request.policy
                now = self._clock()
                if (
                    policy.stale_if_error
                    and now >= expires_at
                    and now - expires_at >= policy.stale_window(request.ttl, delta)
                ):
                    return _Expired(value)  # kept only as the fallback of a failing load
                if policy.due(expires_at, delta, now):
                    self._refresh_soon(request, expires_at)
        self.counters.hits += 1
        stats = request.stats
        if stats is not None:
            stats.hits += 1
        return value

    async def _await_fill(self, key: str, tags: tuple[str, ...], timeout: float) -> Lookup | None:
        """Wait, without polling and at most ``timeout`` seconds, until the key's lease
        holder fills or gives up.

        Returns a miss with this caller's own lease when it may load now, or
        ``None`` when the caller should read the key again.
        """
        backend, ns = self._backend, self._ns
        if not self._can_watch:
            return await self._poll_fill(key, tags, timeout)
        async with backend.watch(ns, key) as watch:  # type: ignore[attr-defined]  # SupportsWatch, checked at construction
            # Read again now that the watch is ready: the fill may have happened already.
            lookup = await backend.fetch(ns, key, tags, self._lease_ttl)
            if lookup.payload is not None:
                return None
            if lookup.lease is not None:
                return lookup
            await watch.wait(timeout)
        return None

    async def _poll_fill(self, key: str, tags: tuple[str, ...], timeout: float) -> Lookup | None:
        """:meth:`_await_fill` for a backend that cannot signal fills (no
        :class:`~tagcache.backends.base.SupportsWatch`): read the key again after pauses
        growing from 5 ms to 100 ms, for at most ``timeout`` seconds."""
        backend, ns = self._backend, self._ns
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        pause = _POLL_FIRST
        while True:
            left = end - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _POLL_MAX)
            lookup = await backend.fetch(ns, key, tags, self._lease_ttl)
            if lookup.payload is not None:
                return None
            if lookup.lease is not None:
                return lookup

    async def _stop_waiting(self, key: str, request: LoadRequest[T]) -> T:
        """Load without storing: this call waited ``lease_ttl`` for others' loads of ``key``."""
        self.counters.errors += 1
        if request.stats is not None:
            request.stats.errors += 1
        self._log_once(
            "wait",
            key,
            "tagcache: waited lease_ttl (%g s) for another caller to load key %r (a lease holder "
            "that does not finish, or foreign data under the lease); loading it here without storing",
            self._lease_ttl,
            key,
        )
        return await self._call(request)

    async def _lead(self, request: LoadRequest[T], lookup: Lookup, stale: tuple[T] | None = None) -> T:
        """Run the loader as the key's in-process flight; store its value under the lease.
        With ``stale``, a loader that raises (or times out) makes this return ``stale[0]``."""
        key, tags = request.key, request.tags
        flight = _Flight(tags, lookup)
        self.flights[key] = flight
        lease = lookup.lease
        try:
            started = self._clock()
            try:
                value = await self._call(request)
            except asyncio.CancelledError:
                # Wake the waiters only once the lease is released, so one of
                # them can take it and load in its own task.
                self._spawn(self._abandon(flight, key, lease))
                raise
            except BaseException as exc:
                released = self._spawn(self._release(key, lease)) if lease is not None else None
                flight.future.set_exception(exc)
                if stale is not None and isinstance(exc, Exception):
                    if released is not None:
                        # The next caller should find the lease free and try the source
                        # itself, not load without storing behind this failed attempt.
                        await asyncio.shield(released)
                    return self._serve_stale(key, stale[0], exc, request.stats)
                raise
            if isinstance(value, Uncached):
                flight.future.set_result(_Shared(value))
                if lease is not None:
                    self._release_soon(key, lease)
                self._uncached(key, value, request.stats)
                return value
            loaded = self._prepare(request, value, max(0.0, self._clock() - started))
            problem = loaded.problem
            if problem is not None and self._strict_now():
                if lease is not None:
                    self._release_soon(key, lease)
                flight.future.set_exception(problem)
                raise problem
            payload = loaded.payload
            flight.future.set_result(payload if payload is not None else _Shared(value))
        finally:
            if self.flights.get(key) is flight:
                del self.flights[key]
        if problem is not None:
            if lease is not None:
                self._release_soon(key, lease)
            self._not_stored(key, problem, request.stats)
        elif lease is not None:
            await self._store(key, loaded, tags, lookup, lease, request.stats)
        return value

    def _prepare(self, request: LoadRequest[T], value: T, delta: float) -> _Loaded:
        """Encode a value the loader took ``delta`` seconds to produce, with its physical
        TTL and result tags, noting (never raising) why it cannot be stored."""
        key, policy, result_tags = request.key, request.policy, request.result_tags
        problem: Exception | None = None
        payload: bytes | None = None
        try:
            payload = self.encode(key, value)
        except SerializationError as exc:
            problem = exc
        else:
            problem = self.too_large(key, payload)
        seconds = policy.jittered(request.ttl)
        if payload is not None and policy.envelope and seconds is not None:
            payload = wrap(payload, seconds, delta, self._clock())
        extra: tuple[str, ...] = ()
        if result_tags is not None and problem is None:
            try:
                extra = tuple(t for t in check_tags(result_tags(value)) if t not in request.tags)
            except Exception as exc:  # the tags callable failed, or returned bad tags
                problem = exc
        return _Loaded(payload, policy.physical_ttl(seconds, delta), extra, problem)

    async def _store(
        self,
        key: str,
        loaded: _Loaded,
        tags: tuple[str, ...],
        lookup: Lookup,
        lease: str,
        stats: Counters | None,
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
            self._not_stored(key, exc, stats)
            return False
        if stored:
            self.counters.sets += 1
            note_write()
        return stored

    def _refresh_soon(self, request: LoadRequest[Any], expires_at: float) -> None:
        """Refresh the key, whose entry read expires at ``expires_at``, in the background,
        once per process (the lease makes it once overall).

        Not again for an entry this process refreshed already: a read whose reply
        was on its way while the refresh stored the new value still shows the old one.
        """
        key = request.key
        if key in self._refreshing or self._closed or self._refreshed.get(key, -math.inf) >= expires_at:
            return
        self._refreshing.add(key)
        self._spawn(self._refresh(request, expires_at))

    async def _refresh(self, request: LoadRequest[Any], expires_at: float) -> None:
        try:
            if await self.recompute(request) is not None:
                refreshed = self._refreshed
                if len(refreshed) >= _MAX_REFRESHED:
                    refreshed.clear()
                refreshed[request.key] = expires_at
        except Exception:
            self.counters.errors += 1
            if request.stats is not None:
                request.stats.errors += 1
            logger.warning("tagcache: background refresh of key %r failed", request.key, exc_info=True)
        finally:
            self._refreshing.discard(request.key)

    def _backend_failed(self, exc: BackendError, policy: LoadPolicy, stats: Counters | None) -> None:
        """Count a backend failure; re-raise it unless the policy fails open, in which
        case log it once per incident (until the backend answers again)."""
        self.counters.errors += 1
        if stats is not None:
            stats.errors += 1
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
            self.counters.errors += 1
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
        self._follow_loop()
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ------------------------------------------------------------------ pending invalidations

    def remember(self, tags: tuple[str, ...], scope: frozenset[int] | None = None) -> int:
        """Queue a failed invalidation of ``tags`` for re-applying (in the buckets of
        ``scope`` only, when the backend said which part failed); return its sequence number."""
        seq = self.seq = self.seq + 1
        pending = self.pending
        first = not pending
        if (pending and pending[0].tags is None) or self._pending_tags + len(tags) > _MAX_PENDING_TAGS:
            if not pending or pending[0].tags is not None:
                logger.error(
                    "tagcache: more than %d tags of failed invalidations pending in namespace %r; "
                    "they will be re-applied as one clear of the namespace",
                    _MAX_PENDING_TAGS,
                    self._ns,
                )
            # A clear begun before this invalidation would not cover it: a new entry,
            # standing for every invalidation it replaces.
            oldest = pending[0].first if pending else seq
            pending.clear()
            pending.append(_Pending(seq, None, None, oldest))
            self._pending_tags = 0
        else:
            pending.append(_Pending(seq, tags, scope, seq))
            self._pending_tags += len(tags)
        if first:
            logger.error(
                "tagcache: invalidation of %s in namespace %r failed%s; it will be re-applied before "
                "this cache reads again, and until then reads bypass the cache%s",
                list(tags),
                self._ns,
                "" if scope is None else f" in {len(scope)} bucket(s)",
                "" if scope is None else " for the keys of those buckets",
            )
        return seq

    def unapplied(self, seq: int) -> _Pending | None:
        """The pending invalidation standing for the one numbered ``seq``, if not applied yet."""
        for item in self.pending:
            if item.first <= seq <= item.seq:
                return item
        return None

    def failed_in_part(self) -> bool:
        """Whether every pending invalidation failed in part only (the backend said where)."""
        return all(item.scope is not None for item in self.pending)

    def cleared(self, started: int) -> None:
        """Settle the pending invalidations covered by a clear of the namespace that
        began when :attr:`seq` was ``started``."""
        pending = self.pending
        for item in [item for item in pending if item.seq <= started]:
            pending.remove(item)
            if item.tags is not None:
                self._pending_tags -= len(item.tags)

    def _covers(self, key: str) -> bool:
        """Whether a pending invalidation may concern ``key``."""
        scope_of = self._scope_of
        bucket = -1
        for item in self.pending:
            scope = item.scope
            if scope is None or scope_of is None:
                return True
            if bucket < 0:
                bucket = scope_of(self._ns, key)
            if bucket in scope:
                return True
        return False

    async def may_read(self, key: str) -> bool:
        """With invalidations pending: whether ``key`` may be read from the backend now.

        A key they concern waits for a replay of them (shared), and may be read if
        that leaves none concerning it. A key in a part of the namespace where
        every pending invalidation was applied (a partial failure) may be read at
        once; a replay is started in the background, at most every 0.1 s."""
        if not self._covers(key):
            now = time.monotonic()
            if self._replaying is None and now >= self._next_kick:
                self._next_kick = now + _REPLAY_KICK_INTERVAL
                self._follow_loop()
                self._replaying = self._spawn(self._replay())
            return True
        await self.replay_pending()
        return not self.pending or not self._covers(key)

    async def replay_pending(self) -> bool:
        """Re-apply the pending invalidations (one replay at a time, shared by the callers
        that need it); return whether none is left."""
        self._follow_loop()
        task = self._replaying
        if task is None:
            task = self._replaying = self._spawn(self._replay())
        await asyncio.shield(task)
        return not self.pending

    async def _replay(self) -> None:
        """Re-apply the pending invalidations, oldest first. One that fails in part is
        narrowed to the part that failed, and one limited to a part already that fails
        there is kept; then the next is tried. One that fails on the whole namespace
        stops the replay (the backend is failing)."""
        pending, backend, ns = self.pending, self._backend, self._ns
        invalidate_scope = self._invalidate_scope
        replayed = 0
        failure: BaseException | None = None
        try:
            for item in list(pending):
                tags, scope = item.tags, item.scope
                try:
                    if tags is None:
                        await asyncio.wait_for(backend.clear(ns), _REPLAY_TIMEOUT)
                    elif scope is None or invalidate_scope is None:
                        await asyncio.wait_for(backend.invalidate(ns, tags), _REPLAY_TIMEOUT)
                    else:
                        await asyncio.wait_for(invalidate_scope(ns, tags, scope), _REPLAY_TIMEOUT)
                except PartialInvalidationError as exc:
                    item.scope = exc.scope if scope is None else scope & exc.scope
                    failure = exc
                    continue
                except BackendError as exc:
                    if scope is None:
                        raise
                    failure = exc  # its part still fails; the others may not
                    continue
                if tags is not None:
                    self.counters.invalidations += len(tags)
                # A collapse or a clear() may have replaced the queue meanwhile.
                if item in pending:
                    pending.remove(item)
                    if tags is not None:
                        self._pending_tags -= len(tags)
                replayed += 1
        except Exception as exc:
            failure = exc
        finally:
            self._replaying = None
        if failure is not None:
            self.counters.errors += 1
            self.replay_error = failure
            if not self._replay_failing:
                self._replay_failing = True
                logger.error(
                    "tagcache: %d failed invalidation(s) in namespace %r cannot be re-applied yet "
                    "(%s: %s); reads bypass the cache until they are",
                    len(pending),
                    ns,
                    type(failure).__name__,
                    failure,
                )
        else:
            self._replay_failing = False
            self.replay_error = None
            if replayed:
                logger.warning("tagcache: re-applied %d failed invalidation(s) in namespace %r", replayed, ns)

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Stop starting refreshes, re-apply the pending invalidations one last time
        (logging at ERROR the ones that still fail), and wait for the background tasks."""
        self._closed = True
        self._follow_loop()
        if self.pending:
            await self.replay_pending()
            if self.pending:
                logger.error(
                    "tagcache: closing namespace %r with %d failed invalidation(s) not re-applied: %s; "
                    "other processes may serve entries carrying these tags until they expire",
                    self._ns,
                    len(self.pending),
                    "the whole namespace"
                    if self.pending[0].tags is None
                    else sorted({tag for item in self.pending for tag in item.tags or ()}),
                )
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
