"""The read-through engine's internal interface: ``LoadRequest`` and ``ReadThrough.load``/``recompute``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from tagcache import BackendError, Cache, PartialInvalidationError
from tagcache.backends import Lookup, MemoryBackend, ScopedInvalidation
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


# ---------------------------------------------------------------- an invalidation that fails in part


class TwoServers:
    """A backend spread over two in-process servers (bucket = first character's parity),
    either of which can be made to fail: what a Redis Cluster's primaries do."""

    def __init__(self) -> None:
        self.servers = (MemoryBackend(), MemoryBackend())
        self.failing: set[int] = set()
        self.scoped_calls: list[frozenset[int]] = []
        self.replayed = asyncio.Event()

    def scope_of(self, ns: str, key: str) -> int:
        return ord(key[0]) % 2

    def _server(self, key: str) -> MemoryBackend:
        b = ord(key[0]) % 2
        if b in self.failing:
            raise BackendError(f"server {b} is down")
        return self.servers[b]

    async def get(self, ns: str, key: str) -> bytes | None:
        return await self._server(key).get(ns, key)

    async def fetch(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        return await self._server(key).fetch(ns, key, tags, lease_ttl)

    async def lease(self, ns: str, key: str, tags: Sequence[str], lease_ttl: float) -> Lookup:
        return await self._server(key).lease(ns, key, tags, lease_ttl)

    async def set(self, ns: str, key: str, payload: bytes, ttl: float | None, tags: Sequence[str]) -> None:
        await self._server(key).set(ns, key, payload, ttl, tags)

    async def fill(self, ns: str, key: str, *args: Any) -> bool:
        return await self._server(key).fill(ns, key, *args)

    async def release(self, ns: str, key: str, lease: str) -> None:
        await self._server(key).release(ns, key, lease)

    async def delete(self, ns: str, key: str) -> bool:
        return await self._server(key).delete(ns, key)

    async def invalidate(self, ns: str, tags: Sequence[str]) -> None:
        await self._invalidate(ns, tags, frozenset({0, 1}))

    async def invalidate_scope(self, ns: str, tags: Sequence[str], scope: frozenset[int]) -> None:
        self.scoped_calls.append(scope)
        await self._invalidate(ns, tags, scope)
        self.replayed.set()

    async def _invalidate(self, ns: str, tags: Sequence[str], scope: frozenset[int]) -> None:
        for b in scope - self.failing:
            await self.servers[b].invalidate(ns, tags)
        failed = scope & self.failing
        if failed == scope:
            raise BackendError("every server is down")
        if failed:
            raise PartialInvalidationError(f"buckets {sorted(failed)} failed", frozenset(failed))

    async def clear(self, ns: str) -> int:
        if self.failing:
            raise BackendError("a server is down")
        return sum([await s.clear(ns) for s in self.servers])

    async def aclose(self) -> None:
        for server in self.servers:
            await server.aclose()


# Keys by bucket: "a" (97) is odd, "b" (98) even.
EVEN, ODD = "b-key", "a-key"


async def test_a_partial_failure_bypasses_only_the_keys_of_the_failed_part() -> None:
    backend = TwoServers()
    assert isinstance(backend, ScopedInvalidation)
    cache = Cache(backend, namespace="ns")
    version = {"v": 1}

    async def load() -> int:
        return version["v"]

    for key in (EVEN, ODD):
        assert await cache.get_or_set(key, load, tags=["t"]) == 1
    backend.failing = {1}
    version["v"] = 2
    with pytest.raises(PartialInvalidationError) as caught:
        await cache.invalidate_tags(["t"])
    assert caught.value.scope == frozenset({1})
    assert isinstance(caught.value, BackendError)  # callers catching BackendError still do
    assert (await cache.stats()).pending_invalidations == 1

    # The part that applied it: one reload, then hits, while the invalidation is pending.
    assert await cache.get_or_set(EVEN, load, tags=["t"]) == 2
    hits = (await cache.stats()).hits
    assert await cache.get(EVEN) == 2
    assert await cache.get_or_set(EVEN, load, tags=["t"]) == 2
    assert (await cache.stats()).hits == hits + 2
    # The failed part is bypassed: a miss for get, the loader for get_or_set; never the old 1.
    assert await cache.get(ODD) is None
    assert await cache.get_or_set(ODD, load, tags=["t"]) == 2

    # Once the failed part answers, the invalidation is re-applied there only, and
    # the key is cached again.
    backend.failing = set()
    backend.scoped_calls.clear()
    assert await cache.get_or_set(ODD, load, tags=["t"]) == 2
    assert backend.scoped_calls == [frozenset({1})]
    assert (await cache.stats()).pending_invalidations == 0
    hits = (await cache.stats()).hits
    assert await cache.get(ODD) == 2
    assert (await cache.stats()).hits == hits + 1
    await cache.aclose()


async def test_reads_of_the_healthy_part_replay_the_failed_part_in_the_background() -> None:
    backend = TwoServers()
    cache = Cache(backend, namespace="ns")
    await cache.set(ODD, "old", tags=["t"])
    backend.failing = {1}
    with pytest.raises(PartialInvalidationError):
        await cache.invalidate_tags(["t"])
    backend.failing = set()
    # Only keys of the healthy part are read; their reads start the replay.
    assert await cache.get(EVEN) is None
    await asyncio.wait_for(backend.replayed.wait(), 10)
    assert backend.scoped_calls == [frozenset({1})]
    assert (await cache.stats()).pending_invalidations == 0
    assert await cache.get(ODD) is None  # re-applied: the old value is gone
    await cache.aclose()


async def test_a_whole_failure_is_narrowed_by_a_replay_that_fails_in_part() -> None:
    backend = TwoServers()
    cache = Cache(backend, namespace="ns")
    await cache.set(EVEN, "old", tags=["t"])
    await cache.set(ODD, "old", tags=["t"])
    backend.failing = {0, 1}
    with pytest.raises(BackendError) as caught:
        await cache.invalidate_tags(["t"])
    assert not isinstance(caught.value, PartialInvalidationError)
    assert await cache.get(EVEN) is None  # every key is bypassed
    backend.failing = {1}
    # The replay applies it on server 0 and narrows it to bucket 1: server 0's keys are
    # read again (the invalidated entry is a miss), server 1's still bypassed.
    assert await cache.get(EVEN) is None
    assert (await cache.stats()).pending_invalidations == 1
    await cache.set(EVEN, "new", tags=["t"])
    assert await cache.get(EVEN) == "new"
    assert (await cache.stats()).pending_invalidations == 1
    # A new invalidation meanwhile is applied where it can be and reported in part.
    with pytest.raises(PartialInvalidationError) as again:
        await cache.invalidate_tags(["u"])
    assert again.value.scope == frozenset({1})
    assert (await cache.stats()).pending_invalidations == 2
    assert await cache.get(ODD) is None
    backend.failing = set()
    assert await cache.get(ODD) is None  # replayed: the entry from before it is gone
    assert (await cache.stats()).pending_invalidations == 0
    await cache.aclose()


async def test_a_clear_settles_partially_failed_invalidations() -> None:
    backend = TwoServers()
    cache = Cache(backend, namespace="ns")
    backend.failing = {1}
    with pytest.raises(PartialInvalidationError):
        await cache.invalidate_tags(["t"])
    backend.failing = set()
    backend.replayed = asyncio.Event()
    await cache.clear()
    assert (await cache.stats()).pending_invalidations == 0
    await cache.aclose()
