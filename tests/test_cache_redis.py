"""Cache-level properties that need a real Redis server: round trips counted on
the wire, a TTL on every key, eviction never giving a false hit, and many
concurrent callers sharing bounded connections."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
import redis.asyncio as redis

from tagcache import Cache
from tagcache.backends import RedisBackend

from tests.conftest import unique_namespace
from tests.wire import Wire

pytestmark = pytest.mark.redis
#: No test here is about timeouts: a loaded machine must not turn a slow reply into a
#: failure (the backend's default of 0.5 s is meant for production).
TIMEOUT = 5.0


def patient(url: str) -> str:
    """``url`` with a socket timeout of TIMEOUT seconds."""
    return f"{url}{'&' if '?' in url else '?'}socket_timeout={TIMEOUT:g}"


async def namespace_ttls(client: redis.Redis, ns: str) -> dict[bytes, int]:
    keys = [k async for k in client.scan_iter(match=f"tc:{{{ns}:*", count=1000)]
    return {k: await client.pttl(k) for k in keys}


async def test_round_trips_on_the_wire(redis_url: str) -> None:
    async with Wire(redis_url) as proxy:
        cache = Cache.from_url(patient(proxy.url), namespace=unique_namespace("wire"))

        async def load() -> dict[str, int]:
            return {"n": 1}

        # Warm up: connection handshakes and script loading are not per-operation costs.
        await cache.set("warm", 1, tags=["w"])
        await cache.get("warm")
        await cache.get_or_set("warm2", load, tags=["w"])
        await cache.invalidate_tags(["w"])
        await cache.delete("warm")

        async def turns(coro: object) -> int:
            proxy.reset()
            await coro  # type: ignore[misc]  # a coroutine object
            return proxy.turns

        assert await turns(cache.set("k", 1, ttl=60, tags=["a", "b"])) == 1
        assert await turns(cache.get("k")) == 1  # a hit, both tags validated
        assert await turns(cache.get("absent")) == 1
        assert await turns(cache.get_or_set("m", load, ttl=60, tags=["a"])) == 2  # miss + fill
        assert await turns(cache.get_or_set("m", load, ttl=60, tags=["a"])) == 1  # hit
        assert await turns(cache.invalidate_tags(["a", "b", "c"])) == 1
        assert await turns(cache.get("k")) == 1
        assert await cache.get("k") is None
        await cache.set("k", 1)

        @cache.cached(ttl=60, tags=["user:{user_id}"])
        async def get_user(user_id: int) -> dict[str, int]:
            return {"id": user_id}

        await get_user(0)  # warm-up
        assert await turns(get_user(1)) == 2  # a miss: fetch (it snapshots and leases), fill
        assert await turns(get_user(1)) == 1  # a decorated hit is one round trip
        # Concurrent reads in one tick share round trips: far fewer turns than reads.
        proxy.reset()
        await asyncio.gather(*(cache.get("k") for _ in range(50)))
        assert proxy.turns <= 2
        await cache.clear()
        await cache.aclose()


async def test_every_written_key_has_a_ttl(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    ns = unique_namespace("ttl")
    cache = Cache.from_url(patient(redis_url), namespace=ns, default_ttl=120)
    gate = asyncio.Event()
    loading = asyncio.Event()

    async def slow() -> int:
        loading.set()
        await gate.wait()
        return 1

    async def fast() -> int:
        return 2

    await cache.set("a", 1, tags=["t1", "t2"])
    await cache.set("b", 1, ttl=5, tags=["t2", "t3"])
    await cache.get_or_set("c", fast, tags=["t4"])
    pending = asyncio.create_task(cache.get_or_set("d", slow, tags=["t5"]))
    await loading.wait()  # the lease and the token of t5 are written
    await cache.invalidate_tags(["t1"])
    await cache.get_or_set("a", fast, tags=["t1"])
    ttls = await namespace_ttls(client, ns)
    assert len(ttls) >= 8  # entries, tokens and the lease were all seen
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # Tokens outlive the entries that carry them.
    entry_ttl = ttls[f"tc:{{{ns}:0}}:e:a".encode()]
    assert ttls[f"tc:{{{ns}:0}}:t:t1".encode()] >= entry_ttl
    gate.set()
    await pending

    # ttl=None: the entry and its tags' tokens persist, nothing else does.
    await cache.set("forever", 1, ttl=None, tags=["p"])
    ttls = await namespace_ttls(client, ns)
    persistent = {k for k, ttl in ttls.items() if ttl == -1}
    prefix = f"tc:{{{ns}:0}}:".encode()
    # The entry without expiry, its tag's token and the namespace's generation token.
    assert persistent == {prefix + b"e:forever", prefix + b"t:p", prefix + b"t:\x01gen"}
    await cache.clear()
    await cache.aclose()
    await client.aclose()


async def test_eviction_never_yields_a_stale_or_false_hit(redis_server_factory: Callable[..., str]) -> None:
    url = redis_server_factory("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
    cache = Cache.from_url(patient(url), namespace="evict", default_ttl=600)
    rng = random.Random(5)
    source = dict.fromkeys(range(400), 0)
    floor = dict.fromkeys(range(400), 0)
    stale = 0
    big = "x" * 20_000

    async def reader() -> None:
        nonlocal stale
        for _ in range(150):
            item = rng.randrange(400)
            must_see = floor[item]

            async def load(item: int = item) -> dict[str, object]:
                version = source[item]
                await asyncio.sleep(rng.random() * 0.002)
                return {"v": version, "pad": big}

            got = await cache.get_or_set(f"i{item}", load, tags=[f"item:{item}", "all"])
            if got["v"] < must_see:
                stale += 1

    async def writer() -> None:
        for _ in range(300):
            item = rng.randrange(400)
            source[item] += 1
            version = source[item]
            await cache.invalidate_tags([f"item:{item}"])
            floor[item] = max(floor[item], version)
            await asyncio.sleep(0.001)

    await asyncio.gather(writer(), *(reader() for _ in range(20)))
    client = redis.Redis.from_url(url)
    info = await client.info("stats")
    assert info["evicted_keys"] > 0, "the workload must have caused evictions"
    assert stale == 0
    ttls = await namespace_ttls(client, "evict")
    # -2: evicted between SCAN and PTTL; -1 (no TTL) must never appear.
    assert all(ttl > 0 or ttl == -2 for ttl in ttls.values()), ttls
    await client.aclose()
    await cache.aclose()


@pytest.mark.parametrize("pool", ["from_url", "small user pool"])
async def test_thousand_concurrent_callers_all_succeed(redis_url: str, pool: str) -> None:
    if pool == "from_url":
        cache = Cache.from_url(patient(redis_url), namespace=unique_namespace("many"))
        client = None
    else:
        # redis-py's default pool raises "Too many connections" past its limit.
        client = redis.Redis.from_url(redis_url, max_connections=10)
        cache = Cache(RedisBackend(client, socket_timeout=TIMEOUT), namespace=unique_namespace("many"))

    async def caller(i: int) -> object:
        async def load() -> int:
            await asyncio.sleep(0.001)
            return i

        await cache.set(f"s{i}", i, tags=[f"own{i}", "shared"])
        got = await cache.get(f"s{i}")
        assert got == i
        await cache.invalidate_tags([f"other{i % 7}"])
        return await cache.get_or_set(f"g{i % 100}", load, tags=["g"])

    results = await asyncio.gather(*(caller(i) for i in range(1000)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    await cache.clear()
    await cache.aclose()
    if client is not None:
        await client.aclose()
