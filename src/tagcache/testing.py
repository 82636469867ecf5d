"""Helpers for testing code that uses tagcache.

* :func:`memory_cache` — a fresh, isolated in-memory cache.
* :func:`cache_fixture` — the same as a pytest fixture.
* :func:`caching_disabled` — turn caching off inside a block.

Example::

    from tagcache.testing import cache_fixture, caching_disabled

    cache = cache_fixture()          # in conftest.py: a fixture named "cache"

    async def test_reads_through(cache):
        with caching_disabled():
            ...                      # every read misses, nothing is stored
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from tagcache.backends.memory import MemoryBackend
from tagcache.cache import _DISABLED, Cache

__all__ = ["cache_fixture", "caching_disabled", "memory_cache"]


def memory_cache(
    *,
    namespace: str = "test",
    default_ttl: float | timedelta | None = 300,
    clock: Callable[[], float] | None = None,
    **options: Any,
) -> Cache:
    """Return a new :class:`~tagcache.Cache` over its own :class:`~tagcache.backends.MemoryBackend`.

    Nothing is shared with any other cache. ``clock`` (a function returning
    seconds) lets a test drive expiry without sleeping. Other keyword
    ``options`` go to :class:`~tagcache.Cache`.
    """
    backend = MemoryBackend(clock=clock) if clock is not None else MemoryBackend()
    return Cache(backend, namespace=namespace, default_ttl=default_ttl, **options)


@contextmanager
def caching_disabled() -> Iterator[None]:
    """Disable every cache inside the block, in the current context.

    Reads miss (``get_or_set`` always runs its loader), writes store nothing;
    deletes and invalidations still reach the backend so nothing stale
    survives the block. Blocks nest; leaving one restores the state before it.
    Tasks started inside the block inherit the setting (context variables).
    """
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


def cache_fixture(name: str = "cache", **options: Any) -> Any:
    """Return a pytest fixture (named ``name``) giving each test a fresh :func:`memory_cache`.

    Assign the result to a module-level name in a ``conftest.py`` or test
    module: ``cache = cache_fixture()``. ``options`` go to :func:`memory_cache`.
    """
    import pytest  # only needed in test suites

    def _fixture() -> Iterator[Cache]:
        yield memory_cache(**options)

    _fixture.__name__ = name
    return pytest.fixture(name=name)(_fixture)
