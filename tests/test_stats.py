"""What ``Cache.stats()`` reports: this namespace's entries versus the backend-wide
key count, every figure surviving JSON, and the ``MISSING`` sentinel."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import redis.asyncio as redis

import tagcache
from tagcache import MISSING, Cache, CacheStats
from tagcache.backends import BackendInfo, MemoryBackend, RedisBackend
from tagcache.stats import Counters

from tests.conftest import unique_namespace

TIMEOUT = 5.0


# ------------------------------------------------------------------ keys per namespace


async def test_memory_keys_count_this_namespace_only() -> None:
    backend = MemoryBackend()
    app = Cache(backend, namespace="app")
    other = Cache(backend, namespace="other")
    empty = Cache(backend, namespace="empty")
    for i in range(3):
        await app.set(f"k{i}", i)
    await other.set("k", 1)

    app_stats, other_stats, empty_stats = await app.stats(), await other.stats(), await empty.stats()
    assert (app_stats.keys, other_stats.keys, empty_stats.keys) == (3, 1, 0)
    assert app_stats.server_keys == other_stats.server_keys == empty_stats.server_keys == 4

    await app.delete("k0")
    assert (await app.stats()).keys == 2
    assert (await app.stats()).as_dict()["keys"] == 2
    assert (await app.stats()).as_dict()["server_keys"] == 3


async def test_memory_backend_reports_entries_per_namespace() -> None:
    backend = MemoryBackend()
    await Cache(backend, namespace="a").set("x", 1, tags=["t"])
    await Cache(backend, namespace="a").set("y", 1)
    await Cache(backend, namespace="b").set("x", 1)
    info = await backend.info()
    assert info.keys == 3
    assert info.entries == {"a": 2, "b": 1}


def test_keys_are_none_where_the_backend_cannot_count_a_namespace() -> None:
    stats = CacheStats.from_counters(Counters(), BackendInfo(keys=42), namespace="app")
    assert (stats.keys, stats.server_keys) == (None, 42)
    stats = CacheStats.from_counters(Counters(), BackendInfo(keys=42, entries={"app": 7}), namespace="app")
    assert (stats.keys, stats.server_keys) == (7, 42)


async def test_redis_keys_are_labelled_server_wide(cache: Cache) -> None:
    """Every backend kind: Redis reports no per-namespace count (it would need a SCAN)."""
    await cache.set("k", 1, tags=["t"])
    stats = await cache.stats()
    assert stats.server_keys is not None and stats.server_keys >= 1
    if isinstance(cache.backend, MemoryBackend):
        assert stats.keys == 1
    else:
        assert stats.keys is None
        assert (await cache.backend.info()).entries is None


@pytest.mark.redis
async def test_redis_server_keys_is_dbsize_including_foreign_keys(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    ns = unique_namespace("stats")
    cache = Cache(RedisBackend.from_url(redis_url, socket_timeout=TIMEOUT), namespace=ns)
    foreign = f"not-tagcache:{ns}"
    try:
        await client.set(foreign, b"x")
        await cache.set("k", 1, tags=["t"])
        stats = await cache.stats()
        assert stats.keys is None
        assert stats.server_keys == await client.dbsize()
        assert stats.as_dict()["server_keys"] == stats.server_keys
    finally:
        await client.delete(foreign)
        await cache.clear()
        await cache.aclose()
        await client.aclose()


async def test_unreachable_backend_reports_no_key_figures() -> None:
    class Broken(MemoryBackend):
        async def info(self) -> BackendInfo:
            raise tagcache.BackendError("down")

    stats = await Cache(Broken(), namespace="app").stats()
    assert (stats.keys, stats.server_keys) == (None, None)
    assert stats.backend == {"error": "down"}


# ------------------------------------------------------------------ serialisation


async def test_every_figure_survives_json(cache: Cache) -> None:
    await cache.set("k", 1)
    await cache.get("k")
    await cache.get("k")
    await cache.get("missing")
    stats = await cache.stats()

    loaded = json.loads(json.dumps(stats.as_dict()))
    names = {f.name for f in dataclasses.fields(CacheStats)}
    assert set(loaded) == names
    for name in ("hit_ratio", "not_stored", "pending_invalidations", "health", "keys", "server_keys"):
        assert name in loaded
    assert loaded["hit_ratio"] == pytest.approx(2 / 3)
    assert (loaded["hits"], loaded["misses"], loaded["not_stored"], loaded["pending_invalidations"]) == (
        2,
        1,
        0,
        0,
    )
    if isinstance(cache.backend, RedisBackend):
        assert loaded["health"]["breaker"] == "closed"
    assert loaded == json.loads(json.dumps(dataclasses.asdict(stats)))


def test_hit_ratio_is_a_field_computed_at_construction() -> None:
    stats = CacheStats(hits=3, misses=1, sets=0, deletes=0, invalidations=0, errors=0)
    assert stats.hit_ratio == 0.75
    assert dataclasses.asdict(stats)["hit_ratio"] == 0.75
    assert "hit_ratio=0.75" in repr(stats)
    assert dataclasses.replace(stats, misses=3).hit_ratio == 0.5
    assert CacheStats(hits=0, misses=0, sets=0, deletes=0, invalidations=0, errors=0).hit_ratio == 0.0
    with pytest.raises(TypeError):
        CacheStats(hits=1, misses=0, sets=0, deletes=0, invalidations=0, errors=0, hit_ratio=0.1)  # type: ignore[call-arg]  # not a constructor argument


# ------------------------------------------------------------------ MISSING


def test_missing_is_an_exported_singleton() -> None:
    assert "MISSING" in tagcache.__all__
    assert repr(MISSING) == "MISSING"
    assert copy.copy(MISSING) is MISSING
    assert copy.deepcopy(MISSING) is MISSING
    assert pickle.loads(pickle.dumps(MISSING)) is MISSING
    assert isinstance(MISSING, tagcache.Missing)


async def test_missing_tells_a_cached_none_from_a_miss(cache: Cache) -> None:
    assert await cache.get("k", default=MISSING) is MISSING
    await cache.set("k", None)
    assert await cache.get("k", default=MISSING) is None


async def test_lock_waits_count_callers_that_waited_for_another_load(cache: Cache) -> None:
    import asyncio

    release, started = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        await release.wait()
        return "v"

    leader = asyncio.ensure_future(cache.get_or_set("k", slow, tags=["t"]))
    await started.wait()
    followers = [asyncio.ensure_future(cache.get_or_set("k", slow, tags=["t"])) for _ in range(3)]

    async def waiting() -> None:  # until the three followers wait for the leader's load
        while cache.engine.counters.lock_waits < 3:  # noqa: ASYNC110  # a counter has no event to wait on
            await asyncio.sleep(0.001)

    await asyncio.wait_for(waiting(), TIMEOUT)
    release.set()
    assert await asyncio.gather(leader, *followers) == ["v"] * 4
    stats = await cache.stats()
    assert stats.lock_waits == 3
    assert stats.as_dict()["lock_waits"] == 3
    cache.reset_stats()
    assert (await cache.stats()).lock_waits == 0


# ------------------------------------------------------------------ per cached function


async def test_function_stats_count_each_decorated_function_apart(cache: Cache) -> None:
    @cache.cached(ttl=60, tags=["users"])
    async def user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    @cache.cached(ttl=60)
    async def label(text: str) -> str:
        return text.upper()

    for user_id in (1, 1, 2, 1):
        assert await user(user_id) == {"id": user_id}
    assert await label("a") == "A"
    await cache.get("direct")  # a direct read counts in the totals only

    prefix = f"{__name__}.test_function_stats_count_each_decorated_function_apart.<locals>."
    functions = cache.function_stats()
    assert list(functions) == [prefix + "user", prefix + "label"]
    mine = functions[prefix + "user"]
    assert (mine.hits, mine.misses, mine.errors, mine.lock_waits) == (2, 2, 0, 0)
    assert mine.hit_ratio == 0.5
    assert mine.as_dict()["hit_ratio"] == 0.5
    assert (functions[prefix + "label"].hits, functions[prefix + "label"].misses) == (0, 1)
    totals = await cache.stats()
    assert (totals.hits, totals.misses) == (2, 4)

    cache.reset_stats()
    assert all(f.hits == f.misses == 0 for f in cache.function_stats().values())
    assert await user(1) == {"id": 1}
    assert cache.function_stats()[prefix + "user"].hits == 1


async def test_function_stats_count_values_not_stored(cache: Cache) -> None:
    class Opaque:
        pass

    @cache.cached(ttl=60)
    async def opaque() -> Opaque:
        return Opaque()

    assert isinstance(await opaque(), Opaque)  # returned, but the codec cannot store it
    (figures,) = cache.function_stats().values()
    assert (figures.misses, figures.not_stored, figures.errors) == (1, 1, 1)
    assert (await cache.stats()).not_stored == 1


async def test_function_names_are_bounded() -> None:
    cache = Cache(MemoryBackend(), namespace=unique_namespace("names"))
    first = cache.function_counters("f0")
    assert cache.function_counters("f0") is first
    for n in range(1, 1000):
        cache.function_counters(f"f{n}")
    other = cache.function_counters("one too many")
    assert cache.function_counters("another") is other
    names = list(cache.function_stats())
    assert len(names) == 1001 and names[-1] == "(other)" and "one too many" not in names
    await cache.aclose()
