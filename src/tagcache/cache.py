"""The :class:`Cache`: a backend, the tag index, a codec and key rules composed.

See ``docs/design.md`` for how the tag index keeps invalidation O(1) and
reads free of stale data.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload
from urllib.parse import parse_qsl, urlsplit

from tagcache.backends.base import (
    Backend,
    BackendInfo,
    EntryInfo,
    FillWatch,
    HealthReporting,
    LocalReads,
    Lookup,
    NowaitReads,
    SupportsInfo,
    SupportsInvalidationFeed,
    SupportsKeys,
    SupportsPeek,
)
from tagcache.backends.local import LocalCache, LocalLayer
from tagcache.codec import Codec, JsonCodec
from tagcache.decorator import DEFAULT, check_source_options, is_decoratable, make_decorator
from tagcache.envelope import ENVELOPE_BYTE, META, strip
from tagcache.exceptions import (
    BackendError,
    ConfigurationError,
    PartialInvalidationError,
    TagCacheError,
    UnsupportedOperationError,
)
from tagcache.readthrough import DISABLED, LoadPolicy, LoadRequest, ReadThrough
from tagcache.sentinel import MISSING, Missing
from tagcache.stats import CacheStats, Counters, FunctionStats, note_write
from tagcache.tags import MAX_KEY_LENGTH, check_key, check_tags, ttl_seconds

if TYPE_CHECKING:
    from tagcache.decorator import CachedFunction

__all__ = ["Cache", "EntryView", "LoadPolicy"]


T = TypeVar("T")
P = ParamSpec("P")
D = TypeVar("D")

_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Control characters, and lone surrogates (not encodable as UTF-8): never in a pattern.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Module-level names the inline hit path of Cache.get reads.
_DISABLED: Final = DISABLED
_ENVELOPE_BYTE: Final = ENVELOPE_BYTE
_META: Final = META


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


#: get_or_set's policies, by fail_open.
_OPEN_POLICY: Final = LoadPolicy(fail_open=True)
_CLOSED_POLICY: Final = LoadPolicy(fail_open=False)
#: Distinct function names with counters of their own (metric labels must stay bounded).
_MAX_FUNCTION_NAMES: Final = 1000
_OTHER_FUNCTIONS: Final = "(other)"
#: The operations every backend implements (see tagcache.backends.base.Backend).
_CORE: Final = ("get", "fetch", "lease", "set", "fill", "release", "delete", "invalidate", "clear", "aclose")


def check_backend(backend: object) -> Backend:
    """Return ``backend`` if it has the core :class:`~tagcache.backends.Backend` operations,
    else raise :class:`~tagcache.ConfigurationError` naming the missing ones."""
    missing = [name for name in _CORE if not callable(getattr(backend, name, None))]
    if missing:
        raise ConfigurationError(
            f"{type(backend).__name__} is not a tagcache Backend: it lacks {', '.join(missing)}; "
            "pass a MemoryBackend, a RedisBackend, a cache URL or an implementation of "
            "tagcache.backends.Backend"
        )
    return backend  # type: ignore[return-value]  # checked structurally just above


def with_local(backend: Backend, local: LocalCache, owns_backend: bool) -> Backend:
    """``backend`` behind an in-process L1 (:class:`~tagcache.backends.local.LocalLayer`)."""
    if not isinstance(backend, SupportsInvalidationFeed):
        raise ConfigurationError(
            f"local=LocalCache(...) needs a shared backend that pushes changes to every process "
            f"(RedisBackend or RedisClusterBackend), got {type(backend).__name__}; the memory backend "
            "is in process memory already"
        )
    return LocalLayer(backend, backend.invalidation_feed(), local, owns_remote=owns_backend)


def backend_from_url(url: str) -> Backend:
    """Build the backend a cache URL names (see :meth:`Cache.from_url`)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"cache URL must be a str, got {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
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
        return MemoryBackend(
            max_entries=sizes.get("max_entries", 10_000), max_bytes=sizes.get("max_bytes", 64 * 2**20)
        )
    if scheme in ("redis", "rediss", "unix"):
        try:
            from tagcache.backends.redis import RedisBackend
        except ImportError as exc:
            raise ConfigurationError(
                f"{url.split('://')[0]}:// needs redis-py: pip install 'tagcache[redis]'"
            ) from exc
        return RedisBackend.from_url(url)
    if scheme in ("redis+cluster", "rediss+cluster"):
        try:
            from tagcache.backends.cluster import RedisClusterBackend
        except ImportError as exc:
            raise ConfigurationError(f"{scheme}:// needs redis-py: pip install 'tagcache[redis]'") from exc
        return RedisClusterBackend.from_url(url)
    raise ConfigurationError(
        f"unknown cache URL scheme {scheme!r} in {url!r}; use memory://, redis://, rediss://, unix://, "
        "redis+cluster:// or rediss+cluster://"
    )


class _Unconfigured:
    """The backend of a cache created without one: every operation explains how to
    configure the cache. Raises :class:`~tagcache.ConfigurationError`, which is not a
    :class:`~tagcache.BackendError`, so fail-open never hides it."""

    def __init__(self, namespace: str) -> None:
        self._ns = namespace

    def _error(self) -> ConfigurationError:
        return ConfigurationError(
            f"the cache of namespace {self._ns!r} has no backend yet: call cache.configure(url) "
            "(for example cache.configure('redis://localhost:6379/0'), or a Backend) at start-up, "
            "typically in your app's lifespan, before the first call; in tests, use "
            "tagcache.testing.isolated(cache)"
        )

    async def get(self, ns: str, key: str) -> bytes | None:
        raise self._error()

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        raise self._error()

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        raise self._error()

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        raise self._error()

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
        raise self._error()

    async def release(self, ns: str, key: str, lease: str) -> None:
        raise self._error()

    async def delete(self, ns: str, key: str) -> bool:
        raise self._error()

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        raise self._error()

    async def clear(self, ns: str) -> int:
        raise self._error()

    def watch(self, ns: str, key: str) -> FillWatch:
        raise self._error()

    async def peek(self, ns: str, key: str) -> EntryInfo | None:
        raise self._error()

    async def keys(self, ns: str, pattern: str, limit: int | None) -> list[str]:
        raise self._error()

    async def info(self) -> BackendInfo:
        raise self._error()

    async def aclose(self) -> None:
        return None


class _Binding:
    """What :meth:`Cache.using` swaps: a backend with its engine and counters."""

    __slots__ = ("backend", "closed", "counters", "engine", "owns")

    def __init__(
        self, backend: Backend, owns: bool, engine: ReadThrough, counters: Counters, closed: bool
    ) -> None:
        self.backend = backend
        self.owns = owns
        self.engine = engine
        self.counters = counters
        self.closed = closed


class BackendSwap:
    """The context manager :meth:`Cache.using` returns; usable with ``with`` and ``async with``.

    Entering points the cache at the other backend (with counters of its own);
    leaving restores the previous backend, engine and counters. ``async with``
    also waits for the block's background work and closes the other backend if
    the cache owns it; plain ``with`` cannot await, so it only restores.
    """

    def __init__(
        self, cache: Cache, backend: Backend, owns: bool, clock: Callable[[], float] | None = None
    ) -> None:
        self._cache = cache
        self._backend = backend
        self._owns = owns
        self._clock = clock
        self._saved: _Binding | None = None
        self._block: _Binding | None = None

    def __enter__(self) -> Backend:
        if self._saved is not None:
            raise RuntimeError("this Cache.using() block is already active; call cache.using() again")
        self._saved = self._cache._swap_in(self._backend, self._owns, self._clock)
        return self._backend

    def __exit__(self, *exc_info: object) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            self._block = self._cache._swap_back(saved)

    async def __aenter__(self) -> Backend:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()
        block, self._block = self._block, None
        if block is not None:
            await block.engine.aclose()
            if block.owns:
                await block.backend.aclose()


class Cache:
    """An async cache with tag-based invalidation.

    Args:
        backend: where entries live: :class:`~tagcache.backends.MemoryBackend`,
            :class:`~tagcache.backends.RedisBackend` or your own
            :class:`~tagcache.backends.Backend`. Omitted: the cache is created
            unconfigured (decorators can be applied at import) and
            :meth:`configure` sets the backend later, typically in the app's
            lifespan; until then every operation raises
            :class:`~tagcache.ConfigurationError`.
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
        clock: Unix time in seconds (default :func:`time.time`) for the expiry
            written into entries that need it (stale-while-revalidate, early
            refresh, ``stale_if_error``) and read back from them. Tests pass a
            fake clock (:func:`tagcache.testing.memory_cache` gives the same
            clock to the cache and its memory backend).
        local: a :class:`~tagcache.LocalCache`: keep hot entries in process memory
            in front of a Redis (or Redis Cluster) backend, coherent through
            pushed change messages (see :mod:`tagcache.backends.local`). The
            backend given (or configured later) is wrapped in a
            :class:`~tagcache.backends.local.LocalLayer`, which the cache owns.

    Use :meth:`from_url` to build one from a URL.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        namespace: str = "default",
        default_ttl: float | timedelta | None = 300,
        codec: Codec | None = None,
        max_value_size: int = 1024 * 1024,
        lease_ttl: float | timedelta = 10.0,
        owns_backend: bool = True,
        fail_open: bool = True,
        strict: bool = False,
        clock: Callable[[], float] | None = None,
        local: LocalCache | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigurationError(
                f"namespace {namespace!r} is invalid: use 1 to 64 letters, digits, '_', '.' or '-'"
            )
        if isinstance(backend, str):
            raise ConfigurationError(
                f"Cache() takes a Backend, got the URL {backend!r}; use Cache.from_url(url, ...) "
                "or cache.configure(url)"
            )
        if backend is not None:
            check_backend(backend)
        if local is not None and not isinstance(local, LocalCache):
            raise ConfigurationError(f"local must be a tagcache.LocalCache, got {local!r:.80}")
        self._local = local
        if backend is not None and local is not None:
            backend, owns_backend = with_local(backend, local, owns_backend), True
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a function returning seconds, got {clock!r}")
        if type(max_value_size) is not int or max_value_size <= 0:
            raise ConfigurationError(f"max_value_size must be a positive int (bytes), got {max_value_size!r}")
        lease = ttl_seconds(lease_ttl, what="lease_ttl")
        if not lease:
            raise ConfigurationError(f"lease_ttl must be a positive number of seconds, got {lease_ttl!r}")
        for name, flag in (("fail_open", fail_open), ("strict", strict)):
            if not isinstance(flag, bool):
                raise ConfigurationError(f"{name} must be True or False, got {flag!r}")
        self._ns = namespace
        self._default_ttl = ttl_seconds(default_ttl, what="default_ttl")
        self._codec: Codec = codec if codec is not None else JsonCodec()
        self._max_value_size = max_value_size
        self._lease_ttl = lease
        self._strict = strict
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._fail_open = fail_open
        self._policy = _OPEN_POLICY if fail_open else _CLOSED_POLICY
        self._policies: dict[tuple[bool, float, float | None], LoadPolicy] = {}
        self._function_counters: dict[str, Counters] = {}
        self._configured = backend is not None
        target: Backend = backend if backend is not None else _Unconfigured(namespace)
        self._install(_Binding(target, owns_backend, self._new_engine(target), Counters(), False))

    def _new_engine(self, backend: Backend, clock: Callable[[], float] | None = None) -> ReadThrough:
        return ReadThrough(
            backend,
            self._ns,
            self._codec,
            max_value_size=self._max_value_size,
            lease_ttl=self._lease_ttl,
            strict=self._strict,
            counters=Counters(),
            clock=self._clock if clock is None else clock,
        )

    def _install(self, binding: _Binding) -> None:
        """Point this cache at ``binding``'s backend, engine and counters."""
        backend = binding.backend
        engine = self._engine = binding.engine
        self._backend = backend
        self._owns_backend = binding.owns
        self._counters = engine.counters = binding.counters
        self._closed = binding.closed
        # Bound methods and shared state looked up once: the hit path of get runs
        # them on every call. The engine owns the flights and the failed
        # invalidations waiting to be re-applied; these are the same objects.
        self._backend_get = backend.get
        self._get_nowait = backend.get_nowait if isinstance(backend, NowaitReads) else None
        self._get_local = backend.get_local if isinstance(backend, LocalReads) else None
        # With a codec binding payloads to their place, _decode_payload is None and
        # the hit path calls _decode_bound instead.
        self._decode_payload = engine.decode_payload
        self._decode_bound = engine.decode_bound
        self._corrupt = engine.corrupt
        self._replay_pending = engine.replay_pending
        self._may_read = engine.may_read
        self._flights = engine.flights
        self._pending = engine.pending
        self._health = backend.health if isinstance(backend, HealthReporting) else None

    def _binding(self) -> _Binding:
        return _Binding(self._backend, self._owns_backend, self._engine, self._counters, self._closed)

    def _swap_in(self, backend: Backend, owns: bool, clock: Callable[[], float] | None) -> _Binding:
        """Install ``backend`` with a new engine and counters; return what it replaced."""
        saved = self._binding()
        self._install(_Binding(backend, owns, self._new_engine(backend, clock), Counters(), False))
        return saved

    def _swap_back(self, saved: _Binding) -> _Binding:
        """Reinstall ``saved``; return the binding it replaced."""
        block = self._binding()
        self._install(saved)
        return block

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
          ``max_connections`` and the circuit breaker's ``breaker_failures`` and
          ``breaker_cooldown``.
        * ``redis+cluster://``, ``rediss+cluster://`` — a
          :class:`~tagcache.backends.RedisClusterBackend` (see its ``from_url``).

        Keyword ``options`` go to :class:`Cache` (``namespace``, ``default_ttl``, ...).
        """
        return cls(backend_from_url(url), **options)

    def configure(
        self,
        backend: str | Backend,
        *,
        owns_backend: bool = True,
        local: LocalCache | Missing | None = MISSING,
    ) -> None:
        """Set the backend of a cache created without one: a cache URL (as for
        :meth:`from_url`) or a :class:`~tagcache.backends.Backend`.

        ``local`` replaces the cache's :class:`~tagcache.LocalCache` setting (``None``:
        no L1), so settings read at start-up can decide it too (an L1 in production,
        none over ``memory://`` in development); omitted, the setting given to the
        constructor applies.

        Decorators are applied at import, before settings are read; configure
        the cache at start-up, typically in the app's lifespan::

            cache = Cache(namespace="app", default_ttl=300)      # at import

            @asynccontextmanager
            async def lifespan(app):
                cache.configure(settings.cache_url)              # "redis://..." or "memory://"
                yield
                await cache.aclose()

        A cache that is configured and open refuses a second backend
        (:class:`~tagcache.ConfigurationError`); after :meth:`aclose` it may be
        configured again (an app started twice in one test session). To point
        a cache at another backend for a block, use :meth:`using`.
        """
        if self._configured and not self._closed:
            raise ConfigurationError(
                f"the cache of namespace {self._ns!r} already has a backend "
                f"({type(self._backend).__name__}); close it first (await cache.aclose()) to configure "
                "another, or use cache.using(backend) for a block"
            )
        if local is not MISSING:
            if local is not None and not isinstance(local, LocalCache):
                raise ConfigurationError(f"local must be a tagcache.LocalCache or None, got {local!r:.80}")
            self._local = local
        target = backend_from_url(backend) if isinstance(backend, str) else check_backend(backend)
        if self._local is not None:
            target, owns_backend = with_local(target, self._local, owns_backend), True
        self._install(_Binding(target, owns_backend, self._new_engine(target), self._counters, False))
        self._configured = True

    def using(
        self, backend: Backend, *, owns_backend: bool = True, clock: Callable[[], float] | None = None
    ) -> BackendSwap:
        """Point this cache, and every function decorated with it, at ``backend`` inside a
        ``with`` or ``async with`` block, and back at its own backend afterwards::

            async with cache.using(MemoryBackend()):
                await get_user(1)        # cached in the block's memory backend

        The block has its own counters (``stats()`` inside it counts only the
        block) and its own in-process loads; the cache's own are restored on
        exit. Works on an unconfigured cache too. ``async with`` closes
        ``backend`` on exit unless ``owns_backend=False``; a plain ``with``
        cannot await, so it leaves ``backend`` open (a memory backend needs no
        closing). ``clock`` replaces the cache's clock inside the block (see
        :class:`Cache`). :func:`tagcache.testing.isolated` is this with a fresh
        memory backend.
        """
        if clock is not None and not callable(clock):
            raise ConfigurationError(f"clock must be a function returning seconds, got {clock!r}")
        return BackendSwap(self, check_backend(backend), owns_backend, clock)

    @property
    def configured(self) -> bool:
        """Whether the cache has a backend (given at construction or by :meth:`configure`)."""
        return self._configured

    @property
    def backend(self) -> Backend:
        """The backend this cache stores into (inside a :meth:`using` block: the block's)."""
        if not self._configured and isinstance(self._backend, _Unconfigured):
            raise self._backend._error()
        return self._backend

    @property
    def engine(self) -> ReadThrough:
        """The read-through engine behind :meth:`get_or_set` and ``@cached`` functions.

        An internal interface for tagcache's own integrations (the decorator,
        and caches built on this one): they describe a load with a
        :class:`~tagcache.readthrough.LoadRequest` and call its ``load`` or
        ``recompute``. Not needed by applications.
        """
        return self._engine

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
        if self._pending and not await self._may_read(key):
            counters.misses += 1
            return default
        try:
            nowait = self._get_nowait
            if nowait is not None:
                payload = nowait(self._ns, key)
            else:
                local = self._get_local
                payload = None if local is None else local(self._ns, key)
                if payload is None:
                    payload = await self._backend_get(self._ns, key)
        except BackendError:
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
        backend = self._backend
        if not isinstance(backend, SupportsPeek):
            raise UnsupportedOperationError(
                f"{type(backend).__name__} cannot show an entry: it does not implement peek() "
                "(tagcache.backends.SupportsPeek)"
            )
        info = await backend.peek(self._ns, key)
        if info is None:
            return None
        try:
            value = self._engine.decode(key, strip(info.payload))
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
        backend = self._backend
        if not isinstance(backend, SupportsKeys):
            raise UnsupportedOperationError(
                f"{type(backend).__name__} cannot list keys: it does not implement keys() "
                "(tagcache.backends.SupportsKeys)"
            )
        return await backend.keys(self._ns, pattern, limit)

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
        payload = self._engine.encode(key, value)
        too_large = self._engine.too_large(key, payload)
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
        except BackendError:
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
        except BackendError:
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
        engine = self._engine
        if self._pending and not engine.failed_in_part():
            # Earlier failed invalidations go first (the backend was failing as a whole;
            # after failures in part only, this one is tried directly: its keys are served).
            seq = engine.remember(tag_tuple)
            await self._replay_pending()
            left = engine.unapplied(seq)
            if left is not None:
                message = (
                    f"invalidation of tags {list(tag_tuple)} in namespace {self._ns!r} not applied"
                    f"{'' if left.scope is None else f' in {len(left.scope)} bucket(s)'}: the backend "
                    f"is failing ({engine.replay_error}); it will be re-applied before this cache "
                    "reads again"
                )
                if left.scope is None:
                    raise BackendError(message) from engine.replay_error
                raise PartialInvalidationError(message, left.scope) from engine.replay_error
            return
        try:
            await self._backend.invalidate(self._ns, tag_tuple)
        except ConfigurationError:
            raise  # not configured: nothing to re-apply later
        except PartialInvalidationError as exc:
            # Applied, except in the buckets it names: only their keys bypass the cache.
            self._counters.errors += 1
            engine.remember(tag_tuple, exc.scope)
            raise
        except BaseException as exc:
            # Cancelled callers too: the invalidation may not have reached the backend.
            if isinstance(exc, Exception):
                self._counters.errors += 1
            engine.remember(tag_tuple)
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
        started = self._engine.seq
        removed = await self._backend.clear(self._ns)
        # Every invalidation remembered before the clear began is covered by it.
        self._engine.cleared(started)
        return removed

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
        stale_if_error: float | timedelta = 0,
        timeout: float | timedelta | None = None,
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
        stale_if_error: float | timedelta = 0,
        timeout: float | timedelta | None = None,
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
            stale_if_error: seconds an entry is kept past its TTL as a fallback: if the
                function raises (or runs past ``timeout``) while the expired value is at
                most that old, the expired value is returned instead (logged once per
                key shape, counted in ``stats().stale_on_error``). Never an invalidated one.
            timeout: seconds the function may run; past that it is cancelled and the
                call raises :class:`TimeoutError` (or returns the stale value, above).

        The wrapper has ``invalidate(*args)``, ``refresh(*args)``, ``key_for(*args)``
        and ``__wrapped__``. Background refreshes (stale-while-revalidate, early
        refresh) call the function in a task of their own, with the same
        arguments: pass resources that outlive the request (an engine or a
        session factory, not a request's session) to functions using them.
        """
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
            stale_if_error=stale_if_error,
            timeout=timeout,
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
        stale_if_error: float | timedelta = 0,
        timeout: float | timedelta | None = None,
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

        When the source fails: ``timeout`` (seconds) bounds how long ``loader``
        may run (past it, it is cancelled and :class:`TimeoutError` raised);
        with ``stale_if_error=N`` (seconds) an entry is kept ``N`` seconds past
        its TTL, and if ``loader`` raises or times out while the expired value
        is at most ``N`` seconds old, that value is returned instead (logged
        once per key shape, counted in ``stats().stale_on_error``). An
        invalidated entry is never returned this way. Without it the error
        propagates.

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
        if stale_if_error or timeout is not None:
            policy = self._source_policy(policy.fail_open, stale_if_error, timeout)
        return await self._engine.load(LoadRequest(key, loader, seconds, tag_tuple, policy))

    def _source_policy(
        self, fail_open: bool, stale_if_error: float | timedelta, timeout: float | timedelta | None
    ) -> LoadPolicy:
        """get_or_set's policy with ``stale_if_error`` and ``timeout`` (checked; kept per setting)."""
        window, limit = check_source_options(stale_if_error, timeout)
        cache_key = (fail_open, window, limit)
        policy = self._policies.get(cache_key)
        if policy is None:
            policy = LoadPolicy(fail_open=fail_open, stale_if_error=window, timeout=limit)
            if len(self._policies) < 64:
                self._policies[cache_key] = policy
        return policy

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
        backend = self._backend
        try:
            info = await backend.info() if isinstance(backend, SupportsInfo) else BackendInfo()
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
        """Set this cache's counters back to zero, the per-function ones too."""
        self._counters.reset()
        for counters in self._function_counters.values():
            counters.reset()

    def function_counters(self, name: str) -> Counters:
        """The counters of the cached function ``name``, created at the first call.

        ``@cache.cached`` functions get theirs (named ``module.qualname``) when they
        are decorated and pass them to the engine with every call
        (:attr:`~tagcache.readthrough.LoadRequest.stats`); the query and response
        caches use ``tagcache.QueryCache`` and ``tagcache.ResponseCache``. Functions
        with the same name share counters. The names are bounded, since they are
        metric labels: past 1,000 distinct names, new ones share ``"(other)"``.
        """
        counters = self._function_counters.get(name)
        if counters is None:
            if len(self._function_counters) >= _MAX_FUNCTION_NAMES:
                name = _OTHER_FUNCTIONS
                counters = self._function_counters.get(name)
            if counters is None:
                counters = self._function_counters[name] = Counters()
        return counters

    def function_stats(self) -> dict[str, FunctionStats]:
        """Per cached function, its read-path counters (hits, misses, lock waits, errors...).

        Keyed by the names of :meth:`function_counters`, in the order they were
        first seen. Counted besides the cache's totals (:meth:`stats`), in this
        process, since the function was decorated or the last :meth:`reset_stats`;
        a :meth:`using` block does not swap them.
        """
        return {name: FunctionStats.from_counters(c) for name, c in self._function_counters.items()}

    async def aclose(self) -> None:
        """Finish background work (lease releases, refreshes, the replay of failed
        invalidations) and close the backend (if the cache owns it). Idempotent.

        Failed invalidations still pending are re-applied one last time; if that
        fails too they are lost, and logged at ERROR with their tags.
        """
        if self._closed:
            return
        self._closed = True
        await self._engine.aclose()
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
        what = (
            type(self._backend).__name__
            if self._configured or not isinstance(self._backend, _Unconfigured)
            else "unconfigured"
        )
        return f"Cache({what}, namespace={self._ns!r})"
