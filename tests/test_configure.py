"""Late configuration, ``Cache.using`` and ``tagcache.testing.isolated``: the app-testing story.

A cache is created at import (decorators need it), configured at start-up from
settings, and swapped for a fresh in-memory backend in tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tagcache import Cache, ConfigurationError, UnsupportedOperationError
from tagcache.backends import Backend, MemoryBackend
from tagcache.testing import isolated

from tests.conftest import unique_namespace


def make_app_cache() -> tuple[Cache, list[int], object]:
    """A cache as an app module would create it, with one decorated function."""
    cache = Cache(namespace=unique_namespace("app"), default_ttl=300)
    calls: list[int] = []

    @cache.cached(ttl=60, tags=["user:{user_id}"])
    async def get_user(user_id: int) -> dict[str, int]:
        calls.append(user_id)
        return {"id": user_id}

    return cache, calls, get_user


async def test_unconfigured_cache_raises_configuration_error_naming_configure() -> None:
    cache, calls, get_user = make_app_cache()
    assert not cache.configured
    for call in (
        lambda: cache.get("k"),
        lambda: cache.set("k", 1),
        lambda: cache.delete("k"),
        lambda: cache.invalidate_tags(["t"]),
        lambda: cache.get_or_set("k", lambda: asyncio.sleep(0, 1)),
        lambda: get_user(1),  # type: ignore[operator]  # a CachedFunction
    ):
        with pytest.raises(ConfigurationError, match=r"cache\.configure\(") as info:
            await call()
        assert "lifespan" in str(info.value)
    # Fail-open never hides a missing configuration: the function was not called.
    assert calls == []
    # Nothing was remembered for replay either.
    assert (await cache.stats()).pending_invalidations == 0
    with pytest.raises(ConfigurationError, match="no backend yet"):
        _ = cache.backend
    assert "unconfigured" in repr(cache)


async def test_configure_later_with_a_url_then_decorated_functions_cache() -> None:
    cache, calls, get_user = make_app_cache()
    cache.configure("memory://")
    assert cache.configured
    assert isinstance(cache.backend, MemoryBackend)
    assert await get_user(1) == {"id": 1}  # type: ignore[operator]
    assert await get_user(1) == {"id": 1}  # type: ignore[operator]
    assert calls == [1]
    await cache.aclose()


async def test_configure_later_with_redis_url(redis_url: str) -> None:
    cache, calls, get_user = make_app_cache()
    cache.configure(redis_url)
    try:
        assert await get_user(7) == {"id": 7}  # type: ignore[operator]
        assert await get_user(7) == {"id": 7}  # type: ignore[operator]
        assert calls == [7]
        await cache.invalidate_tags(["user:7"])
        assert await get_user(7) == {"id": 7}  # type: ignore[operator]
        assert calls == [7, 7]
    finally:
        await cache.clear()
        await cache.aclose()


async def test_configure_twice_is_refused_until_closed() -> None:
    cache, _, _ = make_app_cache()
    cache.configure(MemoryBackend())
    with pytest.raises(ConfigurationError, match="already has a backend"):
        cache.configure("memory://")
    await cache.set("k", 1)
    await cache.aclose()
    # An app started again (a second lifespan in one test session) configures again.
    cache.configure("memory://")
    assert await cache.get("k") is None
    await cache.set("k", 2)
    assert await cache.get("k") == 2
    await cache.aclose()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("mysql://localhost", "unknown cache URL scheme"),
        (object(), "is not a tagcache Backend"),
        (42, "is not a tagcache Backend"),
    ],
)
def test_configure_rejects_what_is_not_a_backend(target: object, message: str) -> None:
    cache, _, _ = make_app_cache()
    with pytest.raises(ConfigurationError, match=message):
        cache.configure(target)  # type: ignore[arg-type]
    assert not cache.configured


def test_cache_given_a_url_says_to_use_from_url() -> None:
    with pytest.raises(ConfigurationError, match="from_url"):
        Cache("redis://localhost", namespace="x")  # type: ignore[arg-type]


def test_isolated_sync_block_on_an_unconfigured_cache() -> None:
    cache, calls, get_user = make_app_cache()

    async def scenario() -> None:
        assert await get_user(1) == {"id": 1}  # type: ignore[operator]
        assert await get_user(1) == {"id": 1}  # type: ignore[operator]
        stats = await cache.stats()
        assert (stats.hits, stats.misses) == (1, 1)

    with isolated(cache) as backend:
        assert isinstance(backend, MemoryBackend)
        assert cache.backend is backend
        asyncio.run(scenario())
    assert calls == [1]
    assert not cache.configured
    with pytest.raises(ConfigurationError):
        asyncio.run(cache.get("k"))


async def test_isolated_async_block_restores_the_apps_backend_entries_and_stats() -> None:
    cache, calls, get_user = make_app_cache()
    own = MemoryBackend()
    cache.configure(own)
    await cache.set("kept", "app value")
    assert await cache.get("kept") == "app value"
    async with isolated(cache):
        assert cache.backend is not own
        assert await cache.get("kept") is None  # a fresh, empty backend
        await cache.set("kept", "test value")
        assert await get_user(2) == {"id": 2}  # type: ignore[operator]
        assert (await cache.stats()).hits == 0
    assert cache.backend is own
    assert await cache.get("kept") == "app value"
    stats = await cache.stats()
    assert (stats.hits, stats.sets) == (2, 1)  # the app's own counters, untouched by the block
    assert calls == [2]
    await cache.aclose()


def test_isolated_gives_each_block_a_fresh_backend() -> None:
    cache, calls, get_user = make_app_cache()
    for _ in range(2):
        with isolated(cache):
            asyncio.run(get_user(5))  # type: ignore[arg-type, operator]
    assert calls == [5, 5]  # the second block did not see the first block's entry


def test_isolated_blocks_nest() -> None:
    cache, _, _ = make_app_cache()
    with isolated(cache) as outer:
        asyncio.run(cache.set("k", "outer"))
        with isolated(cache) as inner:
            assert cache.backend is inner
            assert asyncio.run(cache.get("k")) is None
        assert cache.backend is outer
        assert asyncio.run(cache.get("k")) == "outer"


@pytest.fixture
def app_cache() -> Iterator[tuple[Cache, list[int], object]]:
    """The documented fixture recipe: a plain fixture isolating the app's cache."""
    cache, calls, get_user = make_app_cache()
    with isolated(cache):
        yield cache, calls, get_user


async def test_fixture_recipe_works_for_async_tests(app_cache: tuple[Cache, list[int], object]) -> None:
    cache, calls, get_user = app_cache
    await get_user(3)  # type: ignore[operator]
    await get_user(3)  # type: ignore[operator]
    assert calls == [3]
    assert (await cache.stats()).hits == 1


async def test_using_an_explicit_backend_and_closing_it() -> None:
    cache = Cache(MemoryBackend(), namespace="u")
    closed: list[bool] = []

    class Tracked(MemoryBackend):
        async def aclose(self) -> None:
            closed.append(True)
            await super().aclose()

    async with cache.using(Tracked()):
        await cache.set("k", 1)
    assert closed == [True]
    async with cache.using(Tracked(), owns_backend=False):
        pass
    assert closed == [True]
    await cache.aclose()


class CoreOnly:
    """A backend with the core operations only (no peek, keys, info or watch)."""

    def __init__(self) -> None:
        self._inner = MemoryBackend()
        for name in (
            "get",
            "fetch",
            "lease",
            "set",
            "fill",
            "release",
            "delete",
            "invalidate",
            "clear",
            "aclose",
        ):
            setattr(self, name, getattr(self._inner, name))


async def test_a_core_only_backend_works_and_optional_operations_explain_themselves() -> None:
    backend = CoreOnly()
    cache = Cache(backend, namespace="core")  # type: ignore[arg-type]  # structurally a Backend
    assert isinstance(backend, Backend)
    await cache.set("k", 1, tags=["t"])
    assert await cache.get("k") == 1
    with pytest.raises(UnsupportedOperationError, match=r"peek\(\)"):
        await cache.peek("k")
    with pytest.raises(UnsupportedOperationError, match=r"keys\(\)"):
        await cache.keys()
    stats = await cache.stats()  # without info(): backend figures unknown
    assert stats.hits == 1 and stats.server_keys is None and stats.memory_bytes is None
    await cache.aclose()


async def test_a_backend_without_watch_polls_for_another_callers_fill() -> None:
    """Two caches (two "processes") over one core-only backend: the second caller
    finds the lease held, cannot watch, and polls until the first one's fill."""
    backend = CoreOnly()
    first = Cache(backend, namespace="poll", owns_backend=False)  # type: ignore[arg-type]
    second = Cache(backend, namespace="poll", owns_backend=False)  # type: ignore[arg-type]
    gate = asyncio.Event()
    started = asyncio.Event()
    loads: list[str] = []

    async def slow() -> str:
        loads.append("first")
        started.set()
        await gate.wait()
        return "value"

    async def other() -> str:
        loads.append("second")
        return "other"

    leader = asyncio.create_task(first.get_or_set("k", slow, tags=["t"]))
    await started.wait()
    follower = asyncio.create_task(second.get_or_set("k", other, tags=["t"]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not follower.done()
    gate.set()
    assert await leader == "value"
    assert await follower == "value"  # it waited for the fill instead of loading
    assert loads == ["first"]


async def test_isolated_with_a_fake_clock_drives_stale_while_revalidate() -> None:
    cache, _, _ = make_app_cache()
    now = [0.0]
    version = [1]

    @cache.cached(ttl=60, stale_while_revalidate=30, jitter=0)
    async def item() -> int:
        return version[0]

    async with isolated(cache, clock=lambda: now[0]):
        assert await item() == 1
        version[0] = 2
        now[0] = 70.0  # expired, inside the stale window: served stale, refreshed in the background
        assert await item() == 1
        for _ in range(1000):
            if (await cache.stats()).sets == 2:
                break
            await asyncio.sleep(0)
        assert await item() == 2
