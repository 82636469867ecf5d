"""``LocalCache``: an in-process L1 in front of Redis, coherent through pushed changes.

Two (or four) ``Cache`` objects, each with its own ``RedisBackend``, its own feed
connection and its own L1, over one Redis server stand for processes: they share
nothing but the server. The contract suite, the stateful test and the stale-read
test also run with an L1 (backend kind ``l1`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tagcache import BackendError, Cache, ConfigurationError, LocalCache, PartialInvalidationError
from tagcache.backends import MemoryBackend, RedisBackend
from tagcache.backends.cluster import DEFAULT_CLUSTER_BUCKETS
from tagcache.backends.feed import RedisFeed
from tagcache.backends.local import LocalLayer
from tagcache.backends.redis import bucket_index

from tests.conftest import unique_namespace

TIMEOUT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def layer_of(cache: Cache) -> LocalLayer:
    backend = cache.backend
    assert isinstance(backend, LocalLayer)
    return backend


async def until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> float:
    """Wait (polling every millisecond, at most ``timeout``) until ``condition()``; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not reached in {timeout} s: {what}")
        await asyncio.sleep(0.001)
    return time.monotonic() - start


async def copied(cache: Cache, key: str) -> None:
    """Read ``key`` until ``cache``'s L1 keeps a copy (a read while a change that may
    concern it is heard is not kept: the change message of its own write, say)."""
    start = time.monotonic()
    while layer_of(cache).get_local(cache.namespace, key) is None:
        if time.monotonic() - start > TIMEOUT:
            raise AssertionError(f"no copy of {key!r} kept in {TIMEOUT} s")
        await cache.get(key)
        await asyncio.sleep(0.001)


async def live(cache: Cache) -> Cache:
    """Make ``cache``'s L1 subscribe, and wait until its subscription is confirmed."""
    await cache.get("__warm__")
    await until(lambda: layer_of(cache).health()["local_live"] is True, "the feed is subscribed")
    return cache


@pytest.fixture
async def processes(redis_url: str) -> AsyncIterator[list[Cache]]:
    """Four caches of one namespace, each with its own Redis connections and L1."""
    ns = unique_namespace("l1")
    caches = [
        Cache.from_url(redis_url, namespace=ns, local=LocalCache(ttl=60), default_ttl=300) for _ in range(4)
    ]
    try:
        for cache in caches:
            await live(cache)
        yield caches
    finally:
        await caches[0].clear()
        for cache in caches:
            await cache.aclose()


def count_remote_reads(cache: Cache, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every read that reaches Redis through ``cache``'s L1."""
    remote = layer_of(cache).remote
    calls: list[str] = []
    for name in ("get", "fetch"):
        original = getattr(remote, name)

        async def counted(*args: Any, _original: Any = original, _name: str = name) -> Any:
            calls.append(_name)
            return await _original(*args)

        monkeypatch.setattr(remote, name, counted)
    return calls


# ---------------------------------------------------------------- configuration


def test_local_cache_settings_are_checked() -> None:
    for bad in ({"max_entries": 0}, {"max_bytes": -1}, {"ttl": 0}, {"ttl": True}):
        with pytest.raises(ConfigurationError, match="LocalCache"):
            LocalCache(**bad)  # type: ignore[arg-type]  # wrong values on purpose


def test_a_memory_backend_is_refused_with_a_reason() -> None:
    with pytest.raises(ConfigurationError, match="pushes changes to every process"):
        Cache(MemoryBackend(), namespace="x", local=LocalCache())


async def test_configure_later_wraps_the_backend(redis_url: str) -> None:
    cache = Cache(namespace=unique_namespace("later"), local=LocalCache())
    cache.configure(redis_url)
    try:
        assert isinstance(cache.backend, LocalLayer)
        await cache.set("k", 1)
        assert await cache.get("k") == 1
    finally:
        await cache.clear()
        await cache.aclose()


async def test_configure_decides_the_l1_from_settings(redis_url: str) -> None:
    cache = Cache(namespace=unique_namespace("settings"))
    cache.configure(redis_url, local=LocalCache(max_entries=100))
    try:
        assert isinstance(cache.backend, LocalLayer)
    finally:
        await cache.aclose()
    # Over memory:// (development) the L1 is turned off rather than refused.
    cache.configure("memory://", local=None)
    assert isinstance(cache.backend, MemoryBackend)
    await cache.aclose()
    with pytest.raises(ConfigurationError, match=r"local must be a tagcache\.LocalCache or None"):
        cache.configure(redis_url, local=100)  # type: ignore[arg-type]  # the mistake under test


# ---------------------------------------------------------------- hits


async def test_a_hit_from_l1_costs_no_round_trip_and_is_a_private_copy(
    processes: list[Cache], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, reader = processes[0], processes[1]
    await writer.set("user:1", {"name": "ada", "roles": ["admin"]}, tags=["users"])
    first = await reader.get("user:1")  # from Redis; a copy is then made in the background
    assert first == {"name": "ada", "roles": ["admin"]}
    await copied(reader, "user:1")
    calls = count_remote_reads(reader, monkeypatch)
    for _ in range(3):
        value = await reader.get("user:1")
        assert value == first
        value["roles"].append("mutated")  # the caller's own copy
    assert calls == []

    @reader.cached(ttl=60, tags=["users"])
    async def profile(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    assert await profile(7) == {"id": 7}
    assert await profile(7) == {"id": 7}  # filled by this process: kept at once
    assert calls.count("fetch") == 1
    assert (await reader.stats()).hits >= 4


async def test_a_copy_expires_with_its_own_ttl(redis_url: str) -> None:
    clock = Clock()
    remote = RedisBackend.from_url(redis_url)
    layer = LocalLayer(remote, remote.invalidation_feed(), LocalCache(ttl=5), clock=clock)
    cache = await live(Cache(layer, namespace=unique_namespace("ttl")))
    try:
        await cache.set("k", 1)
        assert layer.get_local(cache.namespace, "k") is not None
        clock.now += 5
        assert layer.get_local(cache.namespace, "k") is None
        assert await cache.get("k") == 1  # from Redis again
    finally:
        await cache.clear()
        await cache.aclose()


async def test_copies_are_bounded_by_entries_and_bytes(redis_url: str) -> None:
    remote = RedisBackend.from_url(redis_url)
    layer = LocalLayer(remote, remote.invalidation_feed(), LocalCache(max_entries=10, max_bytes=400))
    cache = await live(Cache(layer, namespace=unique_namespace("bound")))
    try:
        for n in range(30):
            await cache.set(f"k{n}", "x" * 30)
        health = layer.health()
        assert 0 < int(health["local_entries"]) <= 10  # type: ignore[call-overload]  # an int here
        assert int(health["local_bytes"]) <= 400  # type: ignore[call-overload]  # an int here
        assert layer.get_local(cache.namespace, "k29") is not None  # the newest stay
        assert layer.get_local(cache.namespace, "k0") is None
    finally:
        await cache.clear()
        await cache.aclose()


# ---------------------------------------------------------------- coherence


async def test_in_process_a_read_after_invalidate_never_sees_the_old_value(processes: list[Cache]) -> None:
    cache = processes[0]
    await cache.set("k", "old", tags=["t"])
    assert layer_of(cache).get_local(cache.namespace, "k") is not None
    await cache.invalidate_tags(["t"])
    assert await cache.get("k") is None
    await cache.set("k", "new", tags=["t"])
    await cache.delete("k")
    assert await cache.get("k") is None


async def test_other_processes_drop_their_copies_when_told(processes: list[Cache]) -> None:
    writer, others = processes[0], processes[1:]
    ns = writer.namespace
    await writer.set("k", "v1", tags=["t"])
    await writer.set("j", "v1", tags=["u"])
    for other in others:
        assert await other.get("k") == "v1" and await other.get("j") == "v1"
    for other in others:
        await copied(other, "k")
        await copied(other, "j")
    await writer.invalidate_tags(["t"])  # drops k, not j
    for other in others:
        await until(lambda o=other: layer_of(o).get_local(ns, "k") is None, "the tag's copies are dropped")
        assert await other.get("k") is None
        assert layer_of(other).get_local(ns, "j") is not None
    await writer.set("j", "v2", tags=["u"])  # a write drops the key's copies too
    for other in others:
        await until(lambda o=other: layer_of(o).get_local(ns, "j") is None, "the key's copies are dropped")
        assert await other.get("j") == "v2"
    await writer.clear()
    for other in others:
        assert layer_of(other).health()["local_live"] is True
        await until(lambda o=other: layer_of(o).health()["local_entries"] == 0, "clear drops every copy")


async def test_losing_the_feed_empties_and_bypasses_l1_until_it_is_back(
    processes: list[Cache], redis_url: str
) -> None:
    cache = processes[1]
    layer = layer_of(cache)
    await processes[0].set("k", "v", tags=["t"])
    await copied(cache, "k")
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    finally:
        await admin.aclose()
    await until(lambda: layer.health()["local_live"] is False, "the loss is noticed")
    assert layer.health()["local_entries"] == 0
    await until(lambda: layer.health()["local_live"] is True, "the feed resubscribes")
    assert layer.get_local(cache.namespace, "k") is None  # nothing from before the loss
    assert await cache.get("k") == "v"


async def test_a_hung_server_is_noticed_by_the_feed_pings(redis_process: Callable[..., Any]) -> None:
    server = redis_process()
    remote = RedisBackend.from_url(server.url)
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    # A short ping interval keeps the test short.
    feed = RedisFeed([{"host": host, "port": int(port)}], ping_interval=0.2)
    layer = LocalLayer(remote, feed, LocalCache())
    cache = await live(Cache(layer, namespace=unique_namespace("hang")))
    try:
        await cache.set("k", 1)
        assert layer.get_local(cache.namespace, "k") is not None
        server.pause()
        try:
            took = await until(lambda: layer.health()["local_live"] is False, "the hang is noticed")
            assert took < 5.0
            assert layer.get_local(cache.namespace, "k") is None
        finally:
            server.resume()
        await until(lambda: layer.health()["local_live"] is True, "the feed is back")
    finally:
        await cache.aclose()


@pytest.mark.slow
async def test_four_processes_see_no_read_staler_than_the_propagation_bound(processes: list[Cache]) -> None:
    """Readers in four caches, a writer in one: a read that begins more than ``BOUND``
    after an invalidation returned must see the new version (in the writer's own cache:
    any read that begins after it returned)."""
    bound = 0.25  # seconds; the measured p99 is ~1 ms (benchmarks/propagation.py), CI machines are slow
    rng = random.Random(7)
    items = 6
    source = dict.fromkeys(range(items), 0)
    done_at: dict[int, list[tuple[float, int]]] = {i: [(0.0, 0)] for i in range(items)}
    stale: list[tuple[int, int, int, int]] = []
    writer_cache = processes[0]

    async def load(item: int) -> int:
        version = source[item]
        await asyncio.sleep(rng.random() * 0.002)
        return version

    async def reader(n: int) -> None:
        cache = processes[n % 4]
        for _ in range(150):
            item = rng.randrange(items)
            began = time.monotonic()
            must = max(
                (v for t, v in done_at[item] if t <= began - (0 if cache is writer_cache else bound)),
                default=0,
            )
            got = await cache.get_or_set(
                f"item:{item}", lambda item=item: load(item), ttl=60, tags=[f"item:{item}"]
            )
            if got < must:
                stale.append((n % 4, item, got, must))
            await asyncio.sleep(rng.random() * 0.003)

    async def writer() -> None:
        for _ in range(60):
            item = rng.randrange(items)
            source[item] += 1
            version = source[item]
            await writer_cache.invalidate_tags([f"item:{item}"])
            done_at[item].append((time.monotonic(), version))
            await asyncio.sleep(rng.random() * 0.01)

    await asyncio.gather(writer(), *(reader(n) for n in range(16)))
    assert stale == [], stale[:5]
    local_hits = sum(int(layer_of(c).health()["local_hits"]) for c in processes)  # type: ignore[call-overload]  # an int here
    assert local_hits > 100, local_hits  # the L1 served reads


ROOT = Path(__file__).resolve().parent.parent


def start_worker(url: str, ns: str, items: int, seconds: float) -> subprocess.Popen[str]:
    """A ``tests.l1_worker`` reader process (see that module)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.l1_worker", url, ns, str(items), str(seconds)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )


@pytest.mark.slow
async def test_four_processes_with_l1_read_nothing_staler_than_the_bound(redis_url: str) -> None:
    """Three reader processes (``tests/l1_worker.py``) and this one, each with its own L1;
    this one also writes: bumps an item's version in Redis, then invalidates its tag. A
    read that began more than ``bound`` after an invalidation returned saw its version."""
    bound = 0.25  # seconds: propagation measures ~1 ms at p99; room for a loaded CI machine
    ns, items, seconds = unique_namespace("l1proc"), 6, 3.0
    workers = [start_worker(redis_url, ns, items, seconds) for _ in range(3)]
    cache = await live(Cache.from_url(redis_url, namespace=ns, local=LocalCache(ttl=60)))
    db = aioredis.Redis.from_url(redis_url)
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdin is not None
            line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 60)
            assert line.strip() == "ready", line
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        done: list[tuple[int, float, int]] = []  # item, invalidate_tags returned at, version
        reads: list[tuple[int, float, int, bool]] = []  # item, began, version, in the writer's process
        end = time.monotonic() + seconds
        rng = random.Random(3)

        async def writer() -> None:
            while time.monotonic() < end:
                item = rng.randrange(items)
                version = int(await db.incr(f"{ns}:src:{item}"))
                await cache.invalidate_tags([f"item:{item}"])
                done.append((item, time.monotonic(), version))
                await asyncio.sleep(rng.random() * 0.02)

        async def reader() -> None:
            while time.monotonic() < end:
                item = rng.randrange(items)

                async def load(item: int = item) -> int:
                    return int(await db.get(f"{ns}:src:{item}") or 0)

                began = time.monotonic()
                got = await cache.get_or_set(f"item:{item}", load, ttl=60, tags=[f"item:{item}"])
                reads.append((item, began, got, True))
                await asyncio.sleep(rng.random() * 0.002)

        await asyncio.gather(writer(), *(reader() for _ in range(4)))
        local_hits = [int(layer_of(cache).health()["local_hits"])]  # type: ignore[call-overload]  # an int here
        for worker in workers:
            out, _ = await asyncio.wait_for(asyncio.to_thread(worker.communicate), 60)
            report = json.loads(out.strip().splitlines()[-1])
            reads.extend((int(i), float(t), int(v), False) for i, t, v in report["reads"])
            local_hits.append(int(report["local_hits"]))
        stale = []
        for item, began, got, own in reads:
            lag = 0.0 if own else bound
            must = max((v for i, t, v in done if i == item and t <= began - lag), default=0)
            if got < must:
                stale.append((item, began, got, must, own))
        assert len(done) > 30 and len(reads) > 1000, (len(done), len(reads))
        assert stale == [], f"{len(stale)} stale reads of {len(reads)}: {stale[:5]}"
        assert min(local_hits) > 50, local_hits  # every process's L1 served reads
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        await cache.clear()
        await cache.aclose()
        await db.aclose()


async def test_on_a_redis_cluster_copies_are_dropped_across_processes(redis_cluster_url: str) -> None:
    ns = unique_namespace("l1cluster")
    one, two = (Cache.from_url(redis_cluster_url, namespace=ns, local=LocalCache(ttl=60)) for _ in range(2))
    try:
        await live(one)
        await live(two)
        keys = [f"k{n}" for n in range(20)]  # over several buckets, hence primaries
        for key in keys:
            await one.set(key, key, tags=["t"])
            assert await two.get(key) == key
        for key in keys:
            await copied(two, key)
        await one.invalidate_tags(["t"])
        for key in keys:
            await until(lambda key=key: layer_of(two).get_local(ns, key) is None, "copies are dropped")
            assert await two.get(key) is None
    finally:
        await one.clear()
        await one.aclose()
        await two.aclose()


async def test_an_invalidation_failing_on_one_primary_still_drops_the_copies(
    redis_cluster_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = unique_namespace("l1partial")
    one, two = (Cache.from_url(redis_cluster_url, namespace=ns, local=LocalCache(ttl=60)) for _ in range(2))
    keys = [f"k{n}" for n in range(20)]  # over several buckets, hence primaries
    failing = bucket_index(keys[0].encode(), DEFAULT_CLUSTER_BUCKETS)
    original = RedisBackend.invalidate

    async def fails_on_one_primary(self: RedisBackend, ns: str, tags: Any, **options: Any) -> None:
        if failing in options.get("buckets", ()):
            raise BackendError("this primary is down")
        await original(self, ns, tags, **options)

    try:
        await live(one)
        await live(two)
        for key in keys:
            await one.set(key, key, tags=["t"])
        for key in keys:
            await copied(one, key)
            await copied(two, key)
        monkeypatch.setattr(RedisBackend, "invalidate", fails_on_one_primary)
        with pytest.raises(PartialInvalidationError) as caught:
            await one.invalidate_tags(["t"])
        lost = [k for k in keys if bucket_index(k.encode(), DEFAULT_CLUSTER_BUCKETS) in caught.value.scope]
        kept = [k for k in keys if k not in lost]
        assert lost and kept
        # In the issuing process: no copy survives, the applied part reads as invalidated,
        # the failed part bypasses the cache.
        assert all(layer_of(one).get_local(ns, k) is None for k in keys)
        assert [await one.get(k) for k in keys] == [None] * len(keys)
        # The other process was told: it drops its copies and reads the applied part as invalidated.
        for key in keys:
            await until(lambda key=key: layer_of(two).get_local(ns, key) is None, "copies are dropped")
        assert [await two.get(k) for k in kept] == [None] * len(kept)
        monkeypatch.setattr(RedisBackend, "invalidate", original)
        assert (await one.stats()).pending_invalidations == 1
        assert await one.get(lost[0]) is None  # re-applied there now
        assert (await one.stats()).pending_invalidations == 0
        assert await two.get(lost[0]) is None
    finally:
        await one.clear()
        await one.aclose()
        await two.aclose()
