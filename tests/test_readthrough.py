"""The read-through engine's internal interface: ``LoadRequest`` and ``ReadThrough.load``/``recompute``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable

from tagcache import Cache
from tagcache.envelope import ENVELOPE, META, strip, wrap
from tagcache.readthrough import LoadPolicy, LoadRequest, ReadThrough, Uncached
from tagcache.testing import cache_fixture

cache = cache_fixture()


def counting(value: object) -> tuple[list[int], Callable[[], Awaitable[object]]]:
    calls: list[int] = []

    async def load() -> object:
        calls.append(1)
        return value

    return calls, load


def test_a_request_carries_what_to_load() -> None:
    async def load() -> int:
        return 1

    policy = LoadPolicy(read_first=False)
    request = LoadRequest("k", load, 60.0, ("t",), policy)
    assert (request.key, request.loader, request.ttl, request.tags, request.policy) == (
        "k",
        load,
        60.0,
        ("t",),
        policy,
    )
    assert request.result_tags is None
    assert "'k'" in repr(request)


async def test_the_cache_owns_one_engine(cache: Cache) -> None:
    assert isinstance(cache.engine, ReadThrough)
    assert cache.engine is cache.engine


async def test_load_reads_through_and_then_hits(cache: Cache) -> None:
    calls, load = counting({"a": 1})
    request = LoadRequest("k", load, 60.0, ("t",), LoadPolicy())
    assert await cache.engine.load(request) == {"a": 1}
    assert await cache.engine.load(request) == {"a": 1}
    assert len(calls) == 1
    assert await cache.get("k") == {"a": 1}
    await cache.invalidate_tags(["t"])
    assert await cache.engine.load(request) == {"a": 1}
    assert len(calls) == 2


async def test_recompute_stores_even_over_an_entry(cache: Cache) -> None:
    await cache.set("k", "old", tags=["t"])
    calls, load = counting("new")
    request = LoadRequest("k", load, 60.0, ("t",), LoadPolicy())
    assert await cache.engine.recompute(request) == ("new",)
    assert await cache.get("k") == "new"
    assert len(calls) == 1


async def test_result_tags_of_a_request_are_stored(cache: Cache) -> None:
    async def load() -> list[int]:
        return [1, 2]

    request = LoadRequest(
        "k", load, 60.0, (), LoadPolicy(), result_tags=lambda items: [f"item:{i}" for i in items]
    )
    assert await cache.engine.load(request) == [1, 2]
    assert await cache.get("k") == [1, 2]
    await cache.invalidate_tags(["item:2"])
    assert await cache.get("k") is None


def test_the_envelope_round_trips() -> None:
    wrapped = wrap(b"payload", 10.0, 0.5)
    assert wrapped[:1] == ENVELOPE
    assert len(wrapped) == 1 + META.size + len(b"payload") == 17 + len(b"payload")
    assert META.unpack_from(wrapped, 1)[1] == 0.5
    assert strip(wrapped) == b"payload"
    assert strip(b"plain") == b"plain"


def test_the_decorator_imports_first_without_a_cycle() -> None:
    code = "import tagcache.decorator, tagcache.readthrough, tagcache.envelope; import tagcache"
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_a_request_calls_its_loader_with_its_arguments(cache: Cache) -> None:
    async def add(a: int, b: int = 0) -> int:
        return a + b

    request = LoadRequest("k", add, 60.0, (), LoadPolicy(), None, (1,), {"b": 2})
    assert await cache.engine.load(request) == 3
    assert await cache.get("k") == 3


async def test_an_uncached_value_is_returned_to_every_caller_and_not_stored(cache: Cache) -> None:
    gate, started = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def load() -> Uncached[str]:
        calls.append(1)
        started.set()
        await gate.wait()
        return Uncached("too big", "over the row limit")

    request = LoadRequest("k", load, 60.0, ("t",), LoadPolicy())
    first = asyncio.ensure_future(cache.engine.load(request))
    second = asyncio.ensure_future(cache.engine.load(request))
    await started.wait()
    await asyncio.sleep(0)  # let the second caller join the flight (no sleep of any length)
    gate.set()
    results = await asyncio.gather(first, second)
    assert [type(r) for r in results] == [Uncached, Uncached]
    assert results[0].value == "too big" and results[0].reason == "over the row limit"
    assert len(calls) == 1  # the second caller shared the load
    assert await cache.get("k", "absent") == "absent"
    stats = await cache.stats()
    assert (stats.not_stored, stats.errors) == (1, 0)
    # the lease was released: the next load runs at once and may store
    calls.clear()

    async def plain() -> str:
        return "stored"

    assert await cache.engine.load(LoadRequest("k", plain, 60.0, ("t",), LoadPolicy())) == "stored"
    assert await cache.get("k") == "stored"
    refreshed = await cache.engine.recompute(LoadRequest("k", load, 60.0, ("t",), LoadPolicy()))
    assert refreshed is not None and type(refreshed[0]) is Uncached
    assert await cache.get("k") == "stored"  # nothing stored over it
    assert (await cache.stats()).not_stored == 2
