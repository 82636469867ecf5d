"""When the source fails: ``stale_if_error`` and ``timeout``, for ``@cached`` and
``get_or_set``, driven by a fake clock (no sleeping for expiry).

An expired entry is served only when loading a fresh value raises or times out,
only within ``stale_if_error`` seconds of its expiry, and never once one of its
tags was invalidated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from tagcache import Cache, ConfigurationError, InvalidTTLError
from tagcache.testing import memory_cache


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A database stand-in that can be made to fail or hang."""

    def __init__(self) -> None:
        self.version = 1
        self.calls = 0
        self.failing = False
        self.hang: asyncio.Event | None = None

    async def load(self) -> dict[str, int]:
        self.calls += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.failing:
            raise ConnectionError("database down")
        return {"v": self.version}


Loader = Callable[[], Awaitable[dict[str, int]]]


def decorated(cache: Cache, source: Source, **options: Any) -> Loader:
    @cache.cached(ttl=60, tags=["item"], jitter=0, **options)
    async def item() -> dict[str, int]:
        return await source.load()

    return item


def via_get_or_set(cache: Cache, source: Source, **options: Any) -> Loader:
    async def item() -> dict[str, int]:
        return await cache.get_or_set("item", source.load, ttl=60, tags=["item"], **options)

    return item


WAYS = pytest.mark.parametrize("way", [decorated, via_get_or_set], ids=["cached", "get_or_set"])


@WAYS
async def test_expired_value_is_served_when_the_source_raises(
    way: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = way(cache, source, stale_if_error=300)
    assert await item() == {"v": 1}
    clock.now += 61  # expired, within the stale_if_error window
    source.failing = True
    with caplog.at_level(logging.WARNING, logger="tagcache"):
        assert await item() == {"v": 1}
        assert await item() == {"v": 1}
    assert source.calls == 3  # the source was tried each time: the value is not fresh
    stats = await cache.stats()
    assert stats.stale_on_error == 2
    assert stats.errors == 2
    assert sum("stale_if_error" in r.getMessage() for r in caplog.records) == 1  # logged once per key shape
    # The source recovers: a fresh value is loaded and stored.
    source.failing = False
    source.version = 2
    assert await item() == {"v": 2}
    assert await item() == {"v": 2}
    assert source.calls == 4


@WAYS
async def test_without_stale_if_error_the_error_propagates(way: Any) -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = way(cache, source)
    assert await item() == {"v": 1}
    clock.now += 61
    source.failing = True
    with pytest.raises(ConnectionError):
        await item()
    assert (await cache.stats()).stale_on_error == 0


@WAYS
async def test_past_the_window_the_error_propagates(way: Any) -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = way(cache, source, stale_if_error=30)
    assert await item() == {"v": 1}
    clock.now += 60 + 31  # expired 31 s ago: outside the 30 s window (and gone from the backend)
    source.failing = True
    with pytest.raises(ConnectionError):
        await item()


@WAYS
async def test_an_invalidated_value_is_never_served_on_error(way: Any) -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = way(cache, source, stale_if_error=300)
    assert await item() == {"v": 1}
    await cache.invalidate_tags(["item"])
    clock.now += 61
    source.failing = True
    with pytest.raises(ConnectionError):
        await item()
    # Nor before expiry.
    source.failing = False
    assert await item() == {"v": 1}
    await cache.invalidate_tags(["item"])
    source.failing = True
    with pytest.raises(ConnectionError):
        await item()


@WAYS
async def test_a_fresh_value_is_served_without_calling_the_source(way: Any) -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = way(cache, source, stale_if_error=300)
    await item()
    clock.now += 59
    source.failing = True
    assert await item() == {"v": 1}
    assert source.calls == 1


@WAYS
async def test_timeout_cancels_the_loader_and_serves_the_stale_value(way: Any) -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = way(cache, source, stale_if_error=300, timeout=0.05)
    assert await item() == {"v": 1}
    clock.now += 61
    source.hang = asyncio.Event()  # never set: the source hangs
    assert await item() == {"v": 1}
    stats = await cache.stats()
    assert (stats.timeouts, stats.stale_on_error) == (1, 1)


@WAYS
async def test_timeout_without_a_stale_value_raises_timeout_error(way: Any) -> None:
    cache = memory_cache()
    source = Source()
    source.hang = asyncio.Event()
    item = way(cache, source, timeout=0.05)
    with pytest.raises(TimeoutError, match=r"timeout=0\.05"):
        await item()
    assert (await cache.stats()).timeouts == 1
    # The loader was cancelled, its lease released: the next caller loads at once.
    source.hang = None
    assert await item() == {"v": 1}


async def test_a_loaders_own_timeout_error_is_not_counted_as_ours() -> None:
    cache = memory_cache()

    async def load() -> int:
        raise TimeoutError("the database's own timeout")

    with pytest.raises(TimeoutError, match="database's own"):
        await cache.get_or_set("k", load, timeout=30)
    assert (await cache.stats()).timeouts == 0


async def test_callers_sharing_a_failed_refresh_all_get_the_stale_value() -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = decorated(cache, source, stale_if_error=300)
    await item()
    clock.now += 61
    source.failing = True
    source.hang = asyncio.Event()
    callers = [asyncio.create_task(item()) for _ in range(10)]
    for _ in range(10):
        await asyncio.sleep(0)
    source.hang.set()
    assert await asyncio.gather(*callers) == [{"v": 1}] * 10
    assert source.calls == 2  # one shared load for the ten callers


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"stale_if_error": -1}, InvalidTTLError, "stale_if_error"),
        ({"stale_if_error": "60"}, InvalidTTLError, "stale_if_error"),
        ({"timeout": 0}, ConfigurationError, "timeout"),
        ({"timeout": -1.0}, InvalidTTLError, "timeout"),
        ({"timeout": float("nan")}, InvalidTTLError, "timeout"),
    ],
)
async def test_bad_options_are_rejected(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    cache = memory_cache()
    with pytest.raises(error, match=message):
        cache.cached(ttl=60, **options)
    with pytest.raises(error, match=message):
        await cache.get_or_set("k", Source().load, **options)


def test_stale_if_error_needs_a_ttl() -> None:
    cache = memory_cache()
    with pytest.raises(ConfigurationError, match="need a TTL"):
        cache.cached(ttl=None, stale_if_error=60)


async def test_timedelta_options() -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    source = Source()
    item = decorated(cache, source, stale_if_error=timedelta(minutes=5), timeout=timedelta(seconds=5))
    await item()
    clock.now += 61
    source.failing = True
    assert await item() == {"v": 1}
