"""Helpers for testing code that uses tagcache.

* :func:`isolated` — point the app's own cache (and every function decorated
  with it) at a fresh in-memory backend for a block or a test.
* :func:`memory_cache` — a fresh, separate in-memory cache (strict by default).
* :func:`cache_fixture` — the same as a pytest fixture.
* :func:`caching_disabled` — turn caching off inside a block.
* :func:`strict` — inside a block, a value that cannot be cached raises.
* :class:`BackendContract` — the test suite a :class:`~tagcache.backends.Backend`
  implementation must pass (subclass it in your tests; see :mod:`tagcache.contract`).

In production a value a loader produced is returned even when it cannot be
stored (it is not encodable, is over ``max_value_size``, or a ``tags=``
callable fails on it): the failure is logged once and counted in
``stats().not_stored``. A test suite should fail instead, so the helpers here
are strict: :func:`memory_cache` (and so :func:`cache_fixture`) builds strict
caches, and :func:`strict` makes every cache strict inside a block, for an
application whose cache is built elsewhere (``Cache.from_url(settings.CACHE_URL)``).
Backend failures are not affected: tests of fail-open behaviour keep working.

Example, for an app whose cache is created at import and configured at start-up::

    # conftest.py
    import pytest
    from tagcache.testing import isolated

    from myapp.caching import cache  # cache = Cache(namespace="app", default_ttl=300)

    @pytest.fixture(autouse=True)
    def fresh_cache():               # a plain fixture: works for sync and async tests
        with isolated(cache):        # every @cache.cached function uses a fresh memory backend
            yield cache

Or, with separate caches::

    # conftest.py
    import pytest
    from tagcache.testing import cache_fixture, caching_disabled, strict

    cache = cache_fixture()          # a fixture named "cache": fresh and strict per test

    @pytest.fixture(autouse=True)
    def strict_caching():            # a plain (sync) fixture also covers async tests
        with strict():
            yield

    async def test_reads_through(cache):
        with caching_disabled():
            ...                      # every read misses, nothing is stored
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from tagcache.backends.memory import MemoryBackend
from tagcache.cache import BackendSwap, Cache
from tagcache.readthrough import DISABLED, STRICT

if TYPE_CHECKING:
    from tagcache.contract import BackendContract

__all__ = ["BackendContract", "cache_fixture", "caching_disabled", "isolated", "memory_cache", "strict"]


def __getattr__(name: str) -> Any:
    # The contract imports pytest: loaded only when a test suite asks for it.
    if name == "BackendContract":
        from tagcache.contract import BackendContract

        return BackendContract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def isolated(
    cache: Cache, *, clock: Callable[[], float] | None = None, **backend_options: Any
) -> BackendSwap:
    """Point ``cache`` — and so every function decorated with it — at a fresh
    :class:`~tagcache.backends.MemoryBackend` inside the block, then back.

    A context manager for ``with`` and ``async with``, usable on a configured
    cache or one not configured yet (an app whose lifespan configures it).
    Inside the block the cache starts empty, with its own statistics; on exit
    its own backend, in-process loads and statistics are restored, untouched.
    ``clock`` (a function returning seconds) drives time inside the block:
    the memory backend's expiry and leases, and the cache's
    stale-while-revalidate, early refresh and ``stale_if_error``.
    ``backend_options`` go to :class:`~tagcache.backends.MemoryBackend`
    (``max_entries``, ``max_bytes``).

    As a pytest fixture (a plain ``def`` fixture covers async tests too)::

        @pytest.fixture(autouse=True)
        def fresh_cache():
            with isolated(cache):
                yield cache
    """
    if clock is not None:
        backend_options["clock"] = clock
    return cache.using(MemoryBackend(**backend_options), clock=clock)


def memory_cache(
    *,
    namespace: str = "test",
    default_ttl: float | timedelta | None = 300,
    clock: Callable[[], float] | None = None,
    strict: bool = True,
    **options: Any,
) -> Cache:
    """Return a new :class:`~tagcache.Cache` over its own :class:`~tagcache.backends.MemoryBackend`.

    Nothing is shared with any other cache. ``clock`` (a function returning
    seconds) lets a test drive time without sleeping: the backend's expiry and
    leases, and the cache's stale-while-revalidate, early refresh and
    ``stale_if_error`` windows all read it. ``strict`` (default
    ``True``): a loaded value that cannot be cached raises
    (:class:`~tagcache.SerializationError`, :class:`~tagcache.ValueTooLargeError`,
    or the ``tags=`` callable's error) instead of being returned uncached;
    pass ``strict=False`` to test the production behaviour. Other keyword
    ``options`` go to :class:`~tagcache.Cache`.
    """
    backend = MemoryBackend(clock=clock) if clock is not None else MemoryBackend()
    return Cache(backend, namespace=namespace, default_ttl=default_ttl, strict=strict, clock=clock, **options)


@contextmanager
def caching_disabled() -> Iterator[None]:
    """Disable every cache inside the block, in the current context.

    Reads miss (``get_or_set`` always runs its loader), writes store nothing;
    deletes and invalidations still reach the backend so nothing stale
    survives the block. Blocks nest; leaving one restores the state before it.
    Tasks started inside the block inherit the setting (context variables).
    """
    token = DISABLED.set(True)
    try:
        yield
    finally:
        DISABLED.reset(token)


@contextmanager
def strict() -> Iterator[None]:
    """Make every cache strict inside the block, in the current context.

    A value that ``get_or_set``, a ``@cached`` function or a refresh loaded
    but cannot store because of the value itself raises instead of being
    returned uncached: :class:`~tagcache.SerializationError` (not encodable),
    :class:`~tagcache.ValueTooLargeError` (over ``max_value_size``), or the
    error of a ``tags=`` callable. Callers sharing that load get the same
    error, and nothing is stored. Backend failures are unchanged (fail-open
    still applies). Blocks nest; tasks started inside inherit the setting.

    From pytest, enter it in a fixture; a plain ``def`` fixture also covers
    ``async def`` tests run by pytest-asyncio::

        @pytest.fixture(autouse=True)
        def strict_caching():
            with strict():
                yield
    """
    token = STRICT.set(True)
    try:
        yield
    finally:
        STRICT.reset(token)


def cache_fixture(name: str = "cache", **options: Any) -> Any:
    """Return a pytest fixture (named ``name``) giving each test a fresh :func:`memory_cache`.

    Assign the result to a module-level name in a ``conftest.py`` or test
    module: ``cache = cache_fixture()``. ``options`` go to :func:`memory_cache`
    (so the cache is strict unless ``strict=False``).
    """
    import pytest  # only needed in test suites

    def _fixture() -> Iterator[Cache]:
        yield memory_cache(**options)

    _fixture.__name__ = name
    return pytest.fixture(name=name)(_fixture)
