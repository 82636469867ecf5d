"""The fake clock of ``memory_cache(clock=...)`` drives stale-while-revalidate, early
refresh and lease expiry: no test has to sleep for time to pass."""

from __future__ import annotations

import asyncio

from tagcache import Cache
from tagcache.backends import MemoryBackend
from tagcache.testing import memory_cache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def stored(cache: Cache, sets: int) -> None:
    """Yield to the loop until the cache has stored ``sets`` entries (a background
    refresh's fill: the memory backend completes it without waiting for I/O)."""
    for _ in range(1000):
        if (await cache.stats()).sets >= sets:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"no {sets} stored entries after 1000 loop turns")


async def test_stale_while_revalidate_serves_stale_and_refreshes_under_a_fake_clock() -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    version = 1
    refreshed = asyncio.Event()

    @cache.cached(ttl=60, stale_while_revalidate=30, jitter=0)
    async def item() -> int:
        if version == 2:
            refreshed.set()
        return version

    assert await item() == 1
    clock.now = 59
    version = 2
    assert await item() == 1  # fresh: no refresh
    assert not refreshed.is_set()
    clock.now = 70  # expired 10 s ago, inside the 30 s window
    assert await item() == 1  # the stale value at once...
    await asyncio.wait_for(refreshed.wait(), 10)  # ...while one caller refreshes in the background
    await stored(cache, 2)
    assert await item() == 2
    stats = await cache.stats()
    assert stats.misses == 1  # only the first call missed


async def test_past_the_stale_window_a_call_waits_for_the_fresh_value() -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    version = 1

    @cache.cached(ttl=60, stale_while_revalidate=30, jitter=0)
    async def item() -> int:
        return version

    assert await item() == 1
    version = 2
    clock.now = 60 + 31
    assert await item() == 2


async def test_early_refresh_happens_just_before_expiry_never_long_before() -> None:
    clock = Clock()
    cache = memory_cache(clock=clock)
    loads = 0

    @cache.cached(ttl=60, early_refresh=True, jitter=0)
    async def item() -> int:
        nonlocal loads
        loads += 1
        clock.now += 1.0  # the value takes one (fake) second to compute
        return loads

    assert await item() == 1  # loaded from 0 to 1: expires at 61
    clock.now = 2.0  # 59 s before expiry: P(refresh) = e**-59 per call
    for _ in range(5):
        assert await item() == 1
    assert loads == 1
    clock.now = 60.99  # 0.01 s before expiry: P(no refresh) = 0.01 per call
    for _ in range(5):
        await item()
        if loads == 2:
            break
    await stored(cache, 2)
    assert loads == 2
    assert await item() == 2


async def test_an_expired_lease_is_taken_over_when_the_fake_clock_passes_lease_ttl() -> None:
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    # Two caches over one backend: two processes, the first one's loader hangs.
    first = Cache(backend, namespace="lease", lease_ttl=10, clock=clock, owns_backend=False)
    second = Cache(backend, namespace="lease", lease_ttl=10, clock=clock, owns_backend=False)
    hang = asyncio.Event()
    started = asyncio.Event()

    async def stuck() -> str:
        started.set()
        await hang.wait()
        return "late"

    async def fresh() -> str:
        return "fresh"

    holder = asyncio.create_task(first.get_or_set("k", stuck, tags=["t"]))
    await asyncio.wait_for(started.wait(), 10)
    clock.now += 11  # the holder's lease has expired
    assert await second.get_or_set("k", fresh, tags=["t"]) == "fresh"
    assert await second.get("k") == "fresh"
    hang.set()
    assert await holder == "late"  # returned to its caller...
    assert await first.get("k") == "fresh"  # ...but never stored over the newer value
