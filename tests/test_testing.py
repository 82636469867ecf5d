"""The helpers users get in :mod:`tagcache.testing`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tagcache import Cache, SerializationError
from tagcache.backends import MemoryBackend
from tagcache.testing import cache_fixture, caching_disabled, memory_cache, strict

cache = cache_fixture()
other = cache_fixture(name="other", namespace="other")
lenient = cache_fixture(name="lenient", strict=False)


class Unencodable:
    """A value the default codec cannot encode."""


async def unencodable() -> Unencodable:
    return Unencodable()


@pytest.fixture
def strict_caching() -> Iterator[None]:
    """What a user's conftest.py does: a plain (sync) fixture around async tests."""
    with strict():
        yield


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


async def test_caching_disabled_makes_refresh_store_nothing() -> None:
    c = memory_cache()
    calls: list[int] = []

    @c.cached(ttl=60)
    async def f(x: int) -> int:
        calls.append(x)
        return len(calls)

    with caching_disabled():
        assert await f.refresh(1) == 1
    assert await c.peek(f.key_for(1)) is None
    assert await f(1) == 2


async def test_fixture_cache_is_strict(cache: Cache) -> None:
    with pytest.raises(SerializationError, match="Unencodable"):
        await cache.get_or_set("k", unencodable)

    @cache.cached(ttl=60)
    async def decorated() -> Unencodable:
        return Unencodable()

    with pytest.raises(SerializationError):
        await decorated()


async def test_fixture_and_memory_cache_can_be_lenient(lenient: Cache) -> None:
    assert isinstance(await lenient.get_or_set("k", unencodable), Unencodable)
    assert isinstance(await memory_cache(strict=False).get_or_set("k", unencodable), Unencodable)
    assert (await lenient.stats()).not_stored == 1


async def test_strict_from_a_sync_fixture_reaches_async_tests(strict_caching: None) -> None:
    app_cache = Cache(MemoryBackend())  # built by the application, not by tagcache.testing
    with pytest.raises(SerializationError):
        await app_cache.get_or_set("k", unencodable)
    # Tasks started by the test inherit it.
    with pytest.raises(SerializationError):
        await asyncio.create_task(app_cache.get_or_set("k", unencodable))


async def test_strict_is_off_again_after_that_fixture() -> None:
    assert isinstance(await Cache(MemoryBackend()).get_or_set("k", unencodable), Unencodable)


async def test_strict_block_is_restored_after_an_exception() -> None:
    app_cache = Cache(MemoryBackend())
    with pytest.raises(RuntimeError), strict():
        raise RuntimeError
    assert isinstance(await app_cache.get_or_set("k", unencodable), Unencodable)
