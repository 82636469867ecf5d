"""The helpers users get in :mod:`tagcache.testing`."""

from __future__ import annotations

import asyncio

from tagcache import Cache
from tagcache.backends import MemoryBackend
from tagcache.testing import cache_fixture, caching_disabled, memory_cache

cache = cache_fixture()
other = cache_fixture(name="other", namespace="other")


async def test_fixture_gives_a_fresh_memory_cache(cache: Cache, other: Cache) -> None:
    assert isinstance(cache.backend, MemoryBackend)
    assert cache.backend is not other.backend
    assert other.namespace == "other"
    await cache.set("k", 1)
    assert await cache.get("k") == 1
    assert await other.get("k") is None


async def test_fixture_is_fresh_per_test(cache: Cache) -> None:
    assert await cache.get("k") is None


async def test_memory_cache_with_fake_clock_expires_without_sleeping() -> None:
    now = [0.0]
    c = memory_cache(clock=lambda: now[0])
    await c.set("k", 1, ttl=10)
    now[0] = 9.9
    assert await c.get("k") == 1
    now[0] = 10.1
    assert await c.get("k") is None


async def test_caching_disabled_is_restored_after_an_exception() -> None:
    c = memory_cache()
    await c.set("k", 1)
    try:
        with caching_disabled():
            raise RuntimeError
    except RuntimeError:
        pass
    assert await c.get("k") == 1


async def test_caching_disabled_reaches_tasks_started_inside() -> None:
    c = memory_cache()
    await c.set("k", 1)
    with caching_disabled():
        inside = asyncio.create_task(c.get("k"))
    outside = asyncio.create_task(c.get("k"))
    assert await inside is None
    assert await outside == 1
