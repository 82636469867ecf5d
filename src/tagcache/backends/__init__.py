"""Storage backends: the :class:`Backend` protocol, its optional capabilities and its implementations.

:class:`Backend` is the core every backend implements; :class:`SupportsWatch`,
:class:`SupportsPeek`, :class:`SupportsKeys`, :class:`SupportsInfo`,
:class:`NowaitReads`, :class:`HealthReporting` and :class:`ScopedInvalidation` are optional
capabilities.

``RedisBackend`` and ``RedisClusterBackend`` need redis-py (``pip install 'tagcache[redis]'``);
they are imported on first access, so this package imports without redis installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tagcache.backends.base import (
    Backend,
    BackendInfo,
    EntryInfo,
    FillWatch,
    HealthReporting,
    Lookup,
    NowaitReads,
    ScopedInvalidation,
    SupportsInfo,
    SupportsKeys,
    SupportsPeek,
    SupportsWatch,
)
from tagcache.backends.breaker import CircuitBreaker
from tagcache.backends.memory import MemoryBackend

if TYPE_CHECKING:
    from tagcache.backends.cluster import RedisClusterBackend
    from tagcache.backends.redis import RedisBackend

__all__ = [
    "Backend",
    "BackendInfo",
    "CircuitBreaker",
    "EntryInfo",
    "FillWatch",
    "HealthReporting",
    "Lookup",
    "MemoryBackend",
    "NowaitReads",
    "RedisBackend",
    "RedisClusterBackend",
    "ScopedInvalidation",
    "SupportsInfo",
    "SupportsKeys",
    "SupportsPeek",
    "SupportsWatch",
]


def __getattr__(name: str) -> Any:
    if name == "RedisBackend":
        from tagcache.backends.redis import RedisBackend

        return RedisBackend
    if name == "RedisClusterBackend":
        from tagcache.backends.cluster import RedisClusterBackend

        return RedisClusterBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
