"""Counters kept by a :class:`tagcache.Cache` and the :class:`CacheStats` snapshot it reports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Final

from tagcache.backends.base import BackendInfo

__all__ = ["CacheStats", "Counters", "WriteCount", "count_writes", "note_write"]


class WriteCount:
    """Entries written by any cache inside a :func:`count_writes` block."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0


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


class Counters:
    """Mutable per-cache counters. Plain attributes: incrementing one is a single
    bytecode-level add, cheap enough for the hit path."""

    __slots__ = ("deletes", "errors", "hits", "invalidations", "misses", "sets")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.sets = 0
        self.deletes = 0
        self.invalidations = 0
        self.errors = 0

    def reset(self) -> None:
        """Set every counter back to zero."""
        self.hits = self.misses = self.sets = self.deletes = self.invalidations = self.errors = 0


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of a cache's counters, plus what its backend knows about itself.

    Counters are per :class:`~tagcache.Cache` object (per process); backend
    figures (``keys``, ``memory_bytes``, ``evictions``) are the backend's own
    and ``None`` where it does not know them.
    """

    hits: int
    misses: int
    sets: int
    deletes: int
    #: Number of tags invalidated (a call with three tags counts three).
    invalidations: int
    #: Corrupt or foreign payloads read (served as misses) and backend failures.
    errors: int
    keys: int | None = None
    memory_bytes: int | None = None
    evictions: int | None = None
    backend: dict[str, Any] = field(default_factory=dict)

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, or ``0.0`` before the first read."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @classmethod
    def from_counters(cls, counters: Counters, info: BackendInfo) -> CacheStats:
        """Combine the cache's counters with the backend's figures."""
        return cls(
            hits=counters.hits,
            misses=counters.misses,
            sets=counters.sets,
            deletes=counters.deletes,
            invalidations=counters.invalidations,
            errors=counters.errors,
            keys=info.keys,
            memory_bytes=info.memory_bytes,
            evictions=info.evictions,
            backend=dict(info.extra),
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
            "keys": self.keys,
            "memory_bytes": self.memory_bytes,
            "evictions": self.evictions,
            "backend": dict(self.backend),
        }
