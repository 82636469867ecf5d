"""One cache, several event loops one after the other.

A cache created once (at module level, say) is used under successive
``asyncio.run`` calls, or under a test runner's loop per test: each loop gets
its own connections, futures and tasks, and nothing of an earlier (closed) loop
is touched again. The tests here are plain functions that run the loops
themselves, except the last two, which share one module-level cache under
pytest-asyncio's per-test loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tagcache import Cache
from tagcache.backends import Backend, MemoryBackend
from tagcache.backends._signals import KeySignal, SignalWatch
from tagcache.backends.redis import RedisBackend

from tests.conftest import unique_namespace

KINDS = ("memory", "fakeredis", "redis")


@pytest.fixture(params=KINDS)
def make_backend(request: pytest.FixtureRequest) -> Callable[[], Backend]:
    """A factory of backends of one kind, made outside any event loop."""
    kind = request.param
    url = request.getfixturevalue("redis_url") if kind == "redis" else None

    def make() -> Backend:
        if kind == "memory":
            return MemoryBackend()
        if kind == "fakeredis":
            import fakeredis

            return RedisBackend(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(version=7)))
        assert url is not None
        return RedisBackend.from_url(url, socket_timeout=5.0)

    return make


class _SpyWatch:
    """A fill watch that sets ``waiting`` when its holder starts to wait."""

    def __init__(self, inner: Any, waiting: asyncio.Event) -> None:
        self._inner = inner
        self._waiting = waiting

    async def __aenter__(self) -> _SpyWatch:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._inner.__aexit__(*exc_info)

    async def wait(self, timeout: float) -> bool:
        self._waiting.set()
        result: bool = await self._inner.wait(timeout)
        return result


async def _wait_for_other_caller(backend: Any, ns: str, key: str = "w") -> None:
    """A caller waits for another caller's lease (two engines over one backend, as two
    processes would be) and gets its value when the other fills."""
    waiting = asyncio.Event()
    go = asyncio.Event()
    loading = asyncio.Event()
    watch = backend.watch

    def spy(space: str, key: str) -> _SpyWatch:
        return _SpyWatch(watch(space, key), waiting)

    backend.watch = spy
    try:
        leader = Cache(backend, namespace=ns)
        follower = Cache(backend, namespace=ns)

        async def load_slowly() -> str:
            loading.set()
            await go.wait()
            return "from the leader"

        async def must_not_load() -> str:
            raise AssertionError("the follower loaded although the leader held the lease")

        lead = asyncio.ensure_future(leader.get_or_set(key, load_slowly, ttl=60, tags=["w"]))
        await loading.wait()  # the leader holds the key's lease
        follow = asyncio.ensure_future(follower.get_or_set(key, must_not_load, ttl=60, tags=["w"]))
        await waiting.wait()  # the follower waits for the leader's fill
        go.set()
        assert await lead == "from the leader"
        assert await follow == "from the leader"
    finally:
        del backend.watch


def test_one_cache_under_successive_event_loops(make_backend: Callable[[], Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace("loops")
    cache = Cache(backend, namespace=ns)
    calls: list[int] = []

    @cache.cached(ttl=60, tags=["double:{x}"])
    async def double(x: int) -> int:
        calls.append(x)
        return 2 * x

    async def use(i: int) -> None:
        await cache.set("k", i, ttl=60, tags=["t"])
        assert await cache.get("k") == i

        async def load() -> int:
            return 10 * i

        assert await cache.get_or_set(f"g{i}", load, ttl=60, tags=["t"]) == 10 * i
        assert await cache.get_or_set(f"g{i}", load, ttl=60, tags=["t"]) == 10 * i
        assert await asyncio.gather(*(double(i) for _ in range(20))) == [2 * i] * 20
        assert await double(i) == 2 * i
        assert calls.count(i) == 1
        await cache.invalidate_tags(["t", f"double:{i}"])
        assert await cache.get("k") is None
        assert await double(i) == 2 * i
        assert calls.count(i) == 2
        if i == 1:
            await asyncio.wait_for(_wait_for_other_caller(backend, ns), 30)

    for i in range(3):
        asyncio.run(use(i))

    async def close() -> None:
        await cache.clear()
        await cache.aclose()

    asyncio.run(close())


def test_aclose_under_another_loop_than_the_one_used(make_backend: Callable[[], Backend]) -> None:
    backend = make_backend()
    cache = Cache(backend, namespace=unique_namespace("loops"))

    async def use() -> None:
        await cache.set("k", 1, tags=["t"])
        assert await cache.get("k") == 1

    async def close() -> None:
        await asyncio.wait_for(cache.aclose(), 10)

    asyncio.run(use())
    asyncio.run(close())


def test_loop_left_open_then_another_loop(make_backend: Callable[[], Backend]) -> None:
    """An earlier loop that is not closed (it may run again) does not break a later one."""
    backend = make_backend()
    cache = Cache(backend, namespace=unique_namespace("loops"))
    first = asyncio.new_event_loop()
    second = asyncio.new_event_loop()
    try:

        async def use(i: int) -> None:
            await cache.set("k", i, tags=["t"])
            assert await cache.get("k") == i

        first.run_until_complete(use(1))
        second.run_until_complete(use(2))
        first.run_until_complete(use(3))
        second.run_until_complete(cache.aclose())
    finally:
        for loop in (first, second):
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def test_signal_future_of_a_closed_loop_is_replaced() -> None:
    """A waiter's future left by a loop that closed mid-wait neither breaks a later
    signal nor a later loop's waiter."""
    signals: dict[str, KeySignal] = {}
    watch = SignalWatch(signals, "k")

    async def wait_forever() -> None:
        await watch.__aenter__()
        await watch.wait(60)

    loop = asyncio.new_event_loop()
    task = loop.create_task(wait_forever())
    loop.run_until_complete(asyncio.sleep(0))  # the task waits, its future made by `loop`
    loop.close()  # abandoned without cancelling the task: the signal keeps its future
    assert signals["k"].future is not None
    signals["k"].fire()  # must not call into the closed loop

    async def wait_again() -> bool:
        other = SignalWatch(signals, "k")
        async with other:
            assert signals["k"].future is None
            # A stale future of another loop (as the one above) is replaced.
            signals["k"].future = asyncio.Future(loop=loop)
            waiter = asyncio.ensure_future(other.wait(60))
            await asyncio.sleep(0)
            signals["k"].fire()
            return await waiter

    assert asyncio.run(wait_again()) is True
    del task


def test_watch_across_loops(make_backend: Callable[[], Backend]) -> None:
    backend = make_backend()
    ns = unique_namespace("loops")
    for i in range(3):
        # (Bounded: without per-loop state the wait hung for good.)
        asyncio.run(asyncio.wait_for(_wait_for_other_caller(backend, ns, f"w{i}"), 30))
    asyncio.run(backend.aclose())


# -- a module-level cache under pytest-asyncio's loop per test ------------------------

_MODULE_NS = unique_namespace("module-cache")
_module_cache: Cache | None = None
_first_ran = False


@pytest.fixture
def module_cache(redis_url: str) -> Cache:
    """The module's one cache, made outside any loop by the first test that needs it."""
    global _module_cache
    if _module_cache is None:
        _module_cache = Cache(RedisBackend.from_url(redis_url, socket_timeout=5.0), namespace=_MODULE_NS)
    return _module_cache


@pytest.fixture
async def module_cache_closed_last(module_cache: Cache) -> AsyncIterator[Cache]:
    yield module_cache
    await module_cache.clear()
    await module_cache.aclose()


async def test_module_level_cache_first_loop(module_cache: Cache) -> None:
    global _first_ran
    await module_cache.set("m", 1, ttl=60, tags=["m"])
    assert await module_cache.get("m") == 1

    async def load() -> int:
        return 5

    assert await module_cache.get_or_set("n", load, ttl=60, tags=["m"]) == 5
    _first_ran = True


async def test_module_level_cache_second_loop(module_cache_closed_last: Cache) -> None:
    cache = module_cache_closed_last
    if not _first_ran:
        pytest.skip("runs after test_module_level_cache_first_loop")
    assert await cache.get("m") == 1

    async def load() -> int:
        raise AssertionError("stored by the first test")

    assert await cache.get_or_set("n", load, ttl=60, tags=["m"]) == 5
    await cache.invalidate_tags(["m"])
    assert await cache.get("m") is None
