"""Counters kept by a :class:`tagcache.Cache` and the :class:`CacheStats` snapshot it reports."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from tagcache.backends.base import BackendInfo

__all__ = [
    "CacheStats",
    "Counters",
    "FunctionStats",
    "WriteCount",
    "count_writes",
    "note_not_stored",
    "note_write",
]


class WriteCount:
    """Entries written by any cache inside a :func:`count_writes` block."""

    __slots__ = ("not_stored", "written")

    def __init__(self) -> None:
        self.written = 0
        #: Loaded values returned without being stored because storing them failed.
        self.not_stored = 0


_WRITES: Final[ContextVar[WriteCount | None]] = ContextVar("tagcache_writes", default=None)


@contextmanager
def count_writes() -> Iterator[WriteCount]:
    """Count the entries every cache stores inside the block (in this context and
    the tasks it starts). Used by :class:`tagcache.CacheWarmer` for its reports."""
    counter = WriteCount()
    token = _WRITES.set(counter)
    try:
        yield counter
    finally:
        _WRITES.reset(token)


def note_write() -> None:
    """Record one stored entry in the innermost :func:`count_writes` block, if any."""
    counter = _WRITES.get()
    if counter is not None:
        counter.written += 1


def note_not_stored() -> None:
    """Record, in the innermost :func:`count_writes` block if any, one loaded value
    that could not be stored."""
    counter = _WRITES.get()
    if counter is not None:
        counter.not_stored += 1


class Counters:
    """Mutable per-cache counters. Plain attributes: incrementing one is a single
    bytecode-level add, cheap enough for the hit path."""

    __slots__ = (
        "deletes",
        "errors",
        "hits",
        "invalidations",
        "lock_waits",
        "misses",
        "not_stored",
        "sets",
        "stale_on_error",
        "timeouts",
    )

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.invalidations = 0
        self.errors = 0
        self.not_stored = 0
        self.stale_on_error = 0
        self.timeouts = 0
        self.lock_waits = 0

    def reset(self) -> None:
        """Set every counter back to zero."""
        self.hits = self.misses = self.sets = self.deletes = self.invalidations = self.errors = 0
        self.not_stored = self.stale_on_error = self.timeouts = self.lock_waits = 0


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a cache's counters, plus what its backend knows about itself.

    Counters are per :class:`~tagcache.Cache` object (per process). ``keys``
    counts this cache's namespace where the backend can do so without a scan
    (the memory backend can; Redis cannot, so it is ``None`` there). The other
    backend figures (``server_keys``, ``memory_bytes``, ``evictions``) are
    backend-wide, shared by every namespace (for Redis: the whole server or
    database), and ``None`` where the backend does not know them.

    Every figure is a field, ``hit_ratio`` included (computed at construction),
    so :meth:`as_dict` and :func:`dataclasses.asdict` both carry all of them.
    """

    #: Reads answered from the cache (``get``, ``get_or_set``, decorated calls, the integrations).
    hits: int
    #: Reads not answered from the cache (absent, expired, invalidated, or bypassed).
    misses: int
    #: Values written (``set``, and fills after a miss or a refresh).
    sets: int
    #: ``delete`` calls.
    deletes: int
    #: Number of tags invalidated (a call with three tags counts three).
    invalidations: int
    #: Corrupt or foreign payloads read (served as misses), backend failures, values
    #: not stored, and calls that stopped waiting for another caller's load.
    errors: int
    #: Entries stored in this cache's namespace, including expired entries not
    #: reclaimed yet; ``None`` where the backend cannot count them cheaply (Redis).
    keys: int | None = None
    #: Backend-wide, as are ``evictions``: bytes used by the backend (for Redis the
    #: server's ``used_memory``).
    memory_bytes: int | None = None
    #: Backend-wide: entries the backend evicted to stay within its memory limit
    #: (for Redis the server's ``evicted_keys``).
    evictions: int | None = None
    #: The backend's own figures beyond these (for Redis: ``maxmemory_policy`` and such).
    backend: dict[str, Any] = field(default_factory=dict)
    #: Values a loader produced that were returned but not stored because storing
    #: them failed: a backend error during the fill, a value that cannot be encoded
    #: or is over ``max_value_size``, unusable tags from a ``tags=`` callable.
    #: Each is also counted in ``errors``.
    not_stored: int = 0
    #: Failed invalidations waiting to be re-applied (a collapse into clearing the
    #: namespace counts as one); while any is, reads bypass the cache.
    pending_invalidations: int = 0
    #: The backend's own health figures, read without a round trip (for
    #: :class:`~tagcache.backends.RedisBackend`: its circuit breaker's ``breaker``
    #: state, ``breaker_opened``, ``breaker_open_since``, and its timeouts);
    #: empty for a backend without :class:`~tagcache.backends.base.HealthReporting`.
    health: dict[str, Any] = field(default_factory=dict)
    #: Keys the whole backend holds, every namespace together (for Redis: the
    #: database's ``DBSIZE``, which also counts tagcache's tag tokens and leases
    #: and any other program's keys in that database).
    server_keys: int | None = None
    #: Expired values served because the function (or loader) raised or ran past its
    #: ``timeout`` within its ``stale_if_error`` window; each is also counted in ``errors``.
    stale_on_error: int = 0
    #: Loader calls stopped by their ``timeout`` (each is also counted in ``errors``).
    timeouts: int = 0
    #: Reads that missed and waited for another caller's load of the same key (a
    #: load in this process, or one under another process's lease) instead of loading.
    lock_waits: int = 0
    #: ``hits / (hits + misses)``, or ``0.0`` before the first read. Computed from
    #: ``hits`` and ``misses`` when the snapshot is made; not a constructor argument.
    hit_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        total = self.hits + self.misses
        # frozen: a computed field is set the way dataclasses set fields themselves
        object.__setattr__(self, "hit_ratio", self.hits / total if total else 0.0)

    @classmethod
    def from_counters(
        cls,
        counters: Counters,
        info: BackendInfo,
        *,
        pending_invalidations: int = 0,
        health: Mapping[str, object] | None = None,
        namespace: str | None = None,
    ) -> CacheStats:
        """Combine the cache's counters with the backend's figures.

        ``keys`` is the backend's entry count for ``namespace`` when the backend
        reports counts per namespace (:attr:`BackendInfo.entries`), else ``None``;
        the backend-wide ``info.keys`` becomes ``server_keys``.
        """
        keys = None
        if namespace is not None and info.entries is not None:
            keys = info.entries.get(namespace, 0)
        return cls(
            hits=counters.hits,
            misses=counters.misses,
            sets=counters.sets,
            deletes=counters.deletes,
            invalidations=counters.invalidations,
            errors=counters.errors,
            keys=keys,
            server_keys=info.keys,
            memory_bytes=info.memory_bytes,
            evictions=info.evictions,
            backend=dict(info.extra),
            not_stored=counters.not_stored,
            pending_invalidations=pending_invalidations,
            health=dict(health) if health else {},
            stale_on_error=counters.stale_on_error,
            timeouts=counters.timeouts,
            lock_waits=counters.lock_waits,
        )

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict, ``hit_ratio`` included."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hit_ratio,
            "sets": self.sets,
            "deletes": self.deletes,
            "invalidations": self.invalidations,
            "errors": self.errors,
            "not_stored": self.not_stored,
            "pending_invalidations": self.pending_invalidations,
            "stale_on_error": self.stale_on_error,
            "timeouts": self.timeouts,
            "lock_waits": self.lock_waits,
            "keys": self.keys,
            "server_keys": self.server_keys,
            "memory_bytes": self.memory_bytes,
            "evictions": self.evictions,
            "backend": dict(self.backend),
            "health": dict(self.health),
        }


@dataclass(frozen=True, slots=True)
class FunctionStats:
    """The read-path counters of one cached function (:meth:`tagcache.Cache.function_stats`).

    Counted for a ``@cache.cached`` function (named ``module.qualname``) and for the
    query and response caches' loads, besides the cache's own totals in
    :class:`CacheStats`. ``errors`` are this function's calls' own: backend
    failures met by its reads, corrupt payloads it read, values not stored,
    timeouts, stale values served, waits given up; background refreshes that
    failed. ``hit_ratio`` is ``hits / (hits + misses)``, ``0.0`` before the first call.
    """

    hits: int
    misses: int
    lock_waits: int
    errors: int
    not_stored: int
    stale_on_error: int
    timeouts: int
    hit_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        total = self.hits + self.misses
        object.__setattr__(self, "hit_ratio", self.hits / total if total else 0.0)

    @classmethod
    def from_counters(cls, counters: Counters) -> FunctionStats:
        """Snapshot a function's :class:`Counters`."""
        return cls(
            hits=counters.hits,
            misses=counters.misses,
            lock_waits=counters.lock_waits,
            errors=counters.errors,
            not_stored=counters.not_stored,
            stale_on_error=counters.stale_on_error,
            timeouts=counters.timeouts,
        )

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a JSON-ready dict, ``hit_ratio`` included."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hit_ratio,
            "lock_waits": self.lock_waits,
            "errors": self.errors,
            "not_stored": self.not_stored,
            "stale_on_error": self.stale_on_error,
            "timeouts": self.timeouts,
        }
