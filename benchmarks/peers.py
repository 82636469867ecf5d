"""tagcache against its peers: the same workloads, in the same run, for tagcache, a
hand-written redis-py cache, cashews and aiocache, all on the same Redis.

Libraries and configurations (printed with the results):

- tagcache: ``Cache.from_url(url, namespace=...)`` (JSON codec, defaults), ``cache.get``,
  ``@cache.cached(tags=...)`` and ``cache.invalidate_tags``;
- redis-py: a hand-written cache, ``GET``/``SET`` + ``orjson``, a read-through function
  (``GET``, on a miss call the loader and ``SET``), and for tags a member SET per tag
  (``SADD`` on write, ``SMEMBERS`` + ``DEL`` on invalidation); no lock, no single flight;
- cashews: ``cache.setup(url, max_connections=64)`` (Redis backend, its default pickle
  serializer), ``cache.get``, ``@cache(ttl, key, tags)`` (in-process single flight on by
  default) and ``@cache(..., lock=True)`` (a Redis lock as well) for stampedes,
  ``cache.delete_tags`` (its tags are member SETs too);
- aiocache: ``Cache(Cache.REDIS, serializer=JsonSerializer(), namespace=..., pool_max_size=64,
  connection_pool_class=BlockingConnectionPool)`` (its default pool fails past 100
  connections), ``cache.get``, ``@cached`` and ``@cached_stampede`` (a Redis lock, lease
  2 s); no tags: the nearest equivalent is a namespace clear (``cache.clear(namespace=...)``:
  ``KEYS ns:*`` + ``DEL``), labelled as such.

Workloads:

1. hits: ``get`` at 1 and 50 concurrent callers, and a decorated function's hit at 50,
   Zipf(1.1) over 10k keys, ~200-byte dict values (ops/s; rounds rotate the libraries'
   order; median of the rounds);
2. stampede: 1000 concurrent callers of one cold key through each read-through decorator
   (loader takes 50 ms), in 1 process and spread over 4 processes: loader calls and the
   time until every caller had its value;
3. invalidation: one tag carried by 1 entry and by 100k entries (median ms);
4. stale reads: the project's stale-read test (``tests/test_concurrency.py``) through each
   library's read-through decorator: readers, a writer that updates the source and then
   invalidates (by tag, or by key where that is all there is); a read that began after an
   invalidation returned and got an older value is stale. Also a deterministic overlap: a
   slow load begins, the source changes and is invalidated, then a read begins (does it
   get the old value?) and, once everything is done, a last read (was the old value
   stored after the invalidation?).

Each library writes under its own prefix; only those keys are removed at the end (SCAN +
UNLINK), nothing is flushed. Exits non-zero only if tagcache shows a stale read or an
error, or something crashes.

    python benchmarks/peers.py --redis redis://127.0.0.1:6379/3
    python benchmarks/peers.py --redis redis://127.0.0.1:6379/3 --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import orjson
import redis.asyncio as redis

from tagcache import Cache

from _common import median, ops_per_second, sample_value, table, zipf_indices

PREFIX = "bench-peers"
Get = Callable[[int], Awaitable[object]]
Loader = Callable[[int], Awaitable[Any]]
ReadThrough = Callable[[int], Awaitable[Any]]


async def unlink_matching(client: redis.Redis, pattern: str) -> int:
    """Remove the keys matching ``pattern`` (SCAN + UNLINK in batches); return how many."""
    removed = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += await client.unlink(*batch)
            batch = []
    if batch:
        removed += await client.unlink(*batch)
    return removed


class Peer:
    """One library behind the operations the workloads need."""

    name = ""
    config = ""
    #: How it invalidates a group of entries (workload 3).
    bulk_how = ""
    #: What its stampede-protected decorator is (None: it has none).
    lock_how: str | None = None

    async def open(self) -> None:
        """Connect, so that no timed call pays for it."""

    async def aclose(self) -> None: ...

    async def cleanup(self) -> None:
        """Remove every key this library wrote in the run."""

    async def fill(self, values: list[dict[str, object]]) -> None:
        """Store ``values[i]`` under key ``k{i}`` (tagcache: with 2 tags, which its reads validate)."""

    def getter(self, n: int) -> Get:
        raise NotImplementedError

    async def decorated(self, values: list[dict[str, object]]) -> Get:
        """A decorated function returning ``values[i]``, called once for every ``i`` (filled)."""
        raise NotImplementedError

    def read_through(self, scope: str, loader: Loader, locked: bool) -> ReadThrough | None:
        """``loader`` behind the library's read-through decorator, its entries tagged per item;
        ``locked``: the stampede-protected variant (None if there is none)."""
        raise NotImplementedError

    async def invalidate(self, scope: str, item: int) -> None:
        """Invalidate ``item`` of a read-through function made with ``scope``."""
        raise NotImplementedError

    async def bulk_fill(self, r: int, entries: int) -> None:
        """``entries`` entries carrying tag ``all``; the first also carries tag ``one``."""
        raise NotImplementedError

    async def bulk_invalidate(self, r: int, tag: str) -> None:
        raise NotImplementedError

    async def bulk_present(self, r: int, entries: int) -> tuple[bool, bool]:
        """Whether the first and the last entry of round ``r`` are still served."""
        raise NotImplementedError

    async def bulk_cleanup(self, r: int) -> None: ...


class TagcachePeer(Peer):
    name = "tagcache"
    bulk_how = "invalidate_tags (one token DEL)"
    lock_how = "@cache.cached (the same: always single flight + cross-process lease)"

    def __init__(self, url: str) -> None:
        self.url = url
        self.cache = Cache.from_url(url, namespace=f"{PREFIX}-tagcache", default_ttl=3600)
        self.bulk = Cache.from_url(url, namespace=f"{PREFIX}-tagcache-inv", default_ttl=600)
        self.config = (
            f"Cache.from_url(url, namespace=...) {version('tagcache')}: JSON codec, defaults "
            "(pool of 50, 0.5 s timeouts); get; @cache.cached(ttl, key, tags); invalidate_tags"
        )

    async def open(self) -> None:
        await self.cache.get("warm-up")
        await self.bulk.get("warm-up")
        await self.bulk.invalidate_tags(["warm-up"])  # loads the script: not timed later

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.bulk.aclose()

    async def cleanup(self) -> None:
        await self.cache.clear()
        await self.bulk.clear()

    async def fill(self, values: list[dict[str, object]]) -> None:
        for start in range(0, len(values), 500):
            await asyncio.gather(
                *(
                    self.cache.set(f"k{i}", values[i], tags=[f"user:{i}", f"group:{i % 50}"])
                    for i in range(start, min(start + 500, len(values)))
                )
            )

    def getter(self, n: int) -> Get:
        keys = [f"k{i}" for i in range(n)]
        cache = self.cache

        async def get(i: int) -> object:
            return await cache.get(keys[i])

        return get

    async def decorated(self, values: list[dict[str, object]]) -> Get:
        @self.cache.cached(ttl=3600, key="dec:{i}", tags=["users", "user:{i}"])
        async def user(i: int) -> dict[str, object]:
            return values[i]

        for start in range(0, len(values), 500):
            await asyncio.gather(*(user(i) for i in range(start, min(start + 500, len(values)))))
        return user

    def read_through(self, scope: str, loader: Loader, locked: bool) -> ReadThrough | None:
        @self.cache.cached(ttl=60, key=f"{scope}:{{item}}", tags=[f"{scope}:{{item}}"])
        async def load(item: int) -> Any:
            return await loader(item)

        return load

    async def invalidate(self, scope: str, item: int) -> None:
        await self.cache.invalidate_tags([f"{scope}:{item}"])

    async def bulk_fill(self, r: int, entries: int) -> None:
        await self.bulk.set(f"inv{r}:e0", 0, tags=[f"inv{r}:one", f"inv{r}:all"])
        for start in range(1, entries, 1000):
            await asyncio.gather(
                *(
                    self.bulk.set(f"inv{r}:e{i}", i, tags=[f"inv{r}:all"])
                    for i in range(start, min(start + 1000, entries))
                )
            )

    async def bulk_invalidate(self, r: int, tag: str) -> None:
        await self.bulk.invalidate_tags([f"inv{r}:{tag}"])

    async def bulk_present(self, r: int, entries: int) -> tuple[bool, bool]:
        first = await self.bulk.get(f"inv{r}:e0")
        last = await self.bulk.get(f"inv{r}:e{entries - 1}")
        return first is not None, last is not None

    async def bulk_cleanup(self, r: int) -> None:
        await self.bulk.clear()


class RedisPyPeer(Peer):
    name = "redis-py"
    bulk_how = "member SET: SMEMBERS + DEL"

    def __init__(self, url: str) -> None:
        self.client = redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(url, max_connections=64)
        )
        self.p = f"{PREFIX}-raw:"
        self.config = (
            f"redis-py {version('redis')} Redis over a BlockingConnectionPool of 64, hand-written: "
            "GET/SET + orjson; read-through = GET, on a miss the loader then SET; tags = a member "
            "SET per tag (SADD on write, SMEMBERS + DEL on invalidation); no lock, no single flight"
        )

    async def open(self) -> None:
        await self._invalidate_tag("warm-up")

    async def aclose(self) -> None:
        await self.client.aclose()

    async def cleanup(self) -> None:
        await unlink_matching(self.client, f"*{self.p}*")

    async def _store(self, key: str, value: object, ttl: int, tags: list[str]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(key, orjson.dumps(value), ex=ttl)
            for tag in tags:
                pipe.sadd(f"{self.p}tag:{tag}", key)
                pipe.expire(f"{self.p}tag:{tag}", ttl)
            await pipe.execute()

    async def fill(self, values: list[dict[str, object]]) -> None:
        for start in range(0, len(values), 500):
            async with self.client.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + 500, len(values))):
                    # No tags: a read never looks at them (member SETs are for invalidation).
                    pipe.set(f"{self.p}k{i}", orjson.dumps(values[i]), ex=3600)
                await pipe.execute()

    def getter(self, n: int) -> Get:
        keys = [f"{self.p}k{i}" for i in range(n)]
        client = self.client

        async def get(i: int) -> object:
            data = await client.get(keys[i])
            return None if data is None else orjson.loads(data)

        return get

    def _read_through(self, key_of: Callable[[int], str], loader: Loader, ttl: int) -> ReadThrough:
        client = self.client

        async def load(item: int) -> Any:
            key = key_of(item)
            data = await client.get(key)
            if data is not None:
                return orjson.loads(data)
            value = await loader(item)
            await self._store(key, value, ttl, [key.removeprefix(self.p)])
            return value

        return load

    async def decorated(self, values: list[dict[str, object]]) -> Get:
        keys = [f"{self.p}dec:{i}" for i in range(len(values))]

        async def loader(i: int) -> dict[str, object]:
            return values[i]

        user = self._read_through(keys.__getitem__, loader, 3600)
        for start in range(0, len(values), 500):
            await asyncio.gather(*(user(i) for i in range(start, min(start + 500, len(values)))))
        return user

    def read_through(self, scope: str, loader: Loader, locked: bool) -> ReadThrough | None:
        if locked:
            return None
        return self._read_through(lambda item: f"{self.p}{scope}:{item}", loader, 60)

    async def _invalidate_tag(self, tag: str) -> None:
        members = await self.client.smembers(f"{self.p}tag:{tag}")
        if members:
            await self.client.delete(*members)
        await self.client.delete(f"{self.p}tag:{tag}")

    async def invalidate(self, scope: str, item: int) -> None:
        await self._invalidate_tag(f"{scope}:{item}")

    async def bulk_fill(self, r: int, entries: int) -> None:
        for start in range(0, entries, 5000):
            async with self.client.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + 5000, entries)):
                    pipe.set(f"{self.p}inv{r}:e{i}", i, ex=600)
                    pipe.sadd(f"{self.p}tag:inv{r}:all", f"{self.p}inv{r}:e{i}")
                if start == 0:
                    pipe.sadd(f"{self.p}tag:inv{r}:one", f"{self.p}inv{r}:e0")
                await pipe.execute()

    async def bulk_invalidate(self, r: int, tag: str) -> None:
        await self._invalidate_tag(f"inv{r}:{tag}")

    async def bulk_present(self, r: int, entries: int) -> tuple[bool, bool]:
        first = await self.client.exists(f"{self.p}inv{r}:e0")
        last = await self.client.exists(f"{self.p}inv{r}:e{entries - 1}")
        return bool(first), bool(last)

    async def bulk_cleanup(self, r: int) -> None:
        await unlink_matching(self.client, f"{self.p}*inv{r}:*")


class CashewsPeer(Peer):
    name = "cashews"
    bulk_how = "delete_tags (member SET: SPOP 100 at a time + UNLINK + SREM)"
    lock_how = "@cache(..., lock=True)"

    def __init__(self, url: str) -> None:
        from cashews import Cache as CashewsCache

        self.p = f"{PREFIX}-cashews:"
        self.cache = CashewsCache()
        self.cache.setup(url, max_connections=64)
        # Workload 3 on a cache object of its own: delete_tags matches every deleted key
        # against every tag template registered on the object, so the decorators made by
        # the other workloads would add to its cost (as an application's own would).
        self.bulk = CashewsCache()
        self.bulk.setup(url, max_connections=64)
        self.bulk.register_tag(f"{self.p}inv:all", self.p + "inv:e{i}")
        self.bulk.register_tag(f"{self.p}inv:one", f"{self.p}inv:e0")
        self.client = redis.Redis.from_url(url)
        self.config = (
            f"cashews {version('cashews')} cache.setup(url, max_connections=64) (Redis backend, "
            "default pickle serializer, no client_side; its default pool is 10); get; "
            "@cache(ttl, key, tags) (in-process single flight on by default), lock=True for the "
            "locked variant; delete_tags"
        )

    async def open(self) -> None:
        await self.cache.init()
        await self.bulk.init()
        await self.cache.get(f"{self.p}warm-up")
        await self.bulk.delete_tags(f"{self.p}warm-up")

    async def aclose(self) -> None:
        await self.cache.close()
        await self.bulk.close()
        await self.client.aclose()

    async def cleanup(self) -> None:
        # Entries, tag sets (_tag:...) and locks (lock:...): every key naming the prefix.
        await unlink_matching(self.client, f"*{self.p}*")

    async def fill(self, values: list[dict[str, object]]) -> None:
        # No tags: a cashews read never looks at them (they are member SETs, written and invalidated).
        for start in range(0, len(values), 500):
            pairs = {f"{self.p}k{i}": values[i] for i in range(start, min(start + 500, len(values)))}
            await self.cache.set_many(pairs, expire=3600)

    def getter(self, n: int) -> Get:
        keys = [f"{self.p}k{i}" for i in range(n)]
        cache = self.cache

        async def get(i: int) -> object:
            return await cache.get(keys[i])

        return get

    async def decorated(self, values: list[dict[str, object]]) -> Get:
        p = self.p

        @self.cache(ttl=3600, key=p + "dec:{i}", tags=[p + "users", p + "user:{i}"])
        async def user(i: int) -> dict[str, object]:
            return values[i]

        for start in range(0, len(values), 500):
            await asyncio.gather(*(user(i) for i in range(start, min(start + 500, len(values)))))
        return user

    def read_through(self, scope: str, loader: Loader, locked: bool) -> ReadThrough | None:
        template = f"{self.p}{scope}:{{item}}"

        @self.cache(ttl=60, key=template, tags=[template + ":tag"], lock=locked)
        async def load(item: int) -> Any:
            return await loader(item)

        return load

    async def invalidate(self, scope: str, item: int) -> None:
        await self.cache.delete_tags(f"{self.p}{scope}:{item}:tag")

    async def bulk_fill(self, r: int, entries: int) -> None:
        # What its decorator (or set(..., tags=...)) leaves in Redis: the values, and each key
        # SADDed to its tags' sets (the tags are registered with the template of their keys,
        # in __init__, so that deleting a key removes it from its tags' sets). Stored in
        # batches: set(..., tags=...) one entry at a time takes about 1 ms an entry here.
        p = f"{self.p}inv:"
        tags = self.bulk._tags_key_prefix  # "_tag:", where cashews keeps a tag's member set
        for start in range(0, entries, 1000):
            pairs = {f"{p}e{i}": i for i in range(start, min(start + 1000, entries))}
            await self.bulk.set_many(pairs, expire=600)
            await self.bulk.set_add(tags + p + "all", *pairs, expire=600)
        await self.bulk.set_add(tags + p + "one", p + "e0", expire=600)

    async def bulk_invalidate(self, r: int, tag: str) -> None:
        await self.bulk.delete_tags(f"{self.p}inv:{tag}")

    async def bulk_present(self, r: int, entries: int) -> tuple[bool, bool]:
        first = await self.bulk.get(f"{self.p}inv:e0")
        last = await self.bulk.get(f"{self.p}inv:e{entries - 1}")
        return first is not None, last is not None

    async def bulk_cleanup(self, r: int) -> None:
        await unlink_matching(self.client, f"*{self.p}inv:*")


class AiocachePeer(Peer):
    name = "aiocache"
    bulk_how = "n/a: no tags; closest: a namespace clear (KEYS ns:* + DEL), one namespace per entry"
    lock_how = "@cached_stampede (lease 2 s)"

    def __init__(self, url: str) -> None:
        from aiocache import Cache as AioCache
        from aiocache.serializers import JsonSerializer

        parsed = urlparse(url)
        # Its default pool (pool_max_size=None) is redis-py's ConnectionPool, which in
        # redis-py 8 holds at most 100 connections and raises MaxConnectionsError beyond:
        # 1000 concurrent callers crash. A blocking pool of 64, as for the others.
        self.kwargs: dict[str, Any] = {
            "endpoint": parsed.hostname or "127.0.0.1",
            "port": parsed.port or 6379,
            "db": int(parsed.path.strip("/") or 0),
            "pool_max_size": 64,
            "connection_pool_class": redis.BlockingConnectionPool,
        }
        if parsed.password:
            self.kwargs["password"] = parsed.password
        self.ns = f"{PREFIX}-aiocache"
        self.cache = AioCache(AioCache.REDIS, serializer=JsonSerializer(), namespace=self.ns, **self.kwargs)
        self.client = redis.Redis.from_url(url)
        self.decorated_caches: list[Any] = []
        self.config = (
            f"aiocache {version('aiocache')} Cache(Cache.REDIS, serializer=JsonSerializer(), "
            "namespace=..., pool_max_size=64, connection_pool_class=BlockingConnectionPool) (RedisCache's "
            "default JSON serializer and 5 s op timeout); "
            "get; @cached(ttl, key_builder, same settings), @cached_stampede (lease 2 s) for the "
            "locked variant; no tags (invalidation by key: delete)"
        )

    async def open(self) -> None:
        await self.cache.get("warm-up")
        await self.cache.clear(namespace=f"{self.ns}-warm-up")

    async def aclose(self) -> None:
        await self.cache.close()
        for c in self.decorated_caches:
            await c.close()
        await self.client.aclose()

    async def cleanup(self) -> None:
        await unlink_matching(self.client, f"*{self.ns}*")

    async def fill(self, values: list[dict[str, object]]) -> None:
        for start in range(0, len(values), 500):
            pairs = [(f"k{i}", values[i]) for i in range(start, min(start + 500, len(values)))]
            await self.cache.multi_set(pairs, ttl=3600)

    def getter(self, n: int) -> Get:
        keys = [f"k{i}" for i in range(n)]
        cache = self.cache

        async def get(i: int) -> object:
            return await cache.get(keys[i])

        return get

    def _decorate(self, decorator: Any, ttl: int, key_of: Callable[[int], str], func: Any) -> Any:
        from aiocache import Cache as AioCache
        from aiocache.serializers import JsonSerializer

        wrapped = decorator(
            ttl=ttl,
            key_builder=lambda f, item: key_of(item),
            cache=AioCache.REDIS,
            serializer=JsonSerializer(),
            namespace=self.ns,
            **self.kwargs,
        )(func)
        self.decorated_caches.append(wrapped.cache)
        return wrapped

    async def decorated(self, values: list[dict[str, object]]) -> Get:
        from aiocache import cached

        async def user(i: int) -> dict[str, object]:
            return values[i]

        wrapped = self._decorate(cached, 3600, lambda i: f"dec:{i}", user)
        for start in range(0, len(values), 500):
            await asyncio.gather(*(wrapped(i) for i in range(start, min(start + 500, len(values)))))
        return wrapped  # type: ignore[no-any-return]

    def read_through(self, scope: str, loader: Loader, locked: bool) -> ReadThrough | None:
        from aiocache import cached, cached_stampede

        async def load(item: int) -> Any:
            return await loader(item)

        return self._decorate(cached_stampede if locked else cached, 60, lambda i: f"{scope}:{i}", load)  # type: ignore[no-any-return]

    async def invalidate(self, scope: str, item: int) -> None:
        await self.cache.delete(f"{scope}:{item}")

    async def bulk_fill(self, r: int, entries: int) -> None:
        await self.cache.set("e0", 0, ttl=600, namespace=f"{self.ns}-inv{r}-one")
        for start in range(0, entries, 1000):
            pairs = [(f"e{i}", i) for i in range(start, min(start + 1000, entries))]
            await self.cache.multi_set(pairs, ttl=600, namespace=f"{self.ns}-inv{r}-all")

    async def bulk_invalidate(self, r: int, tag: str) -> None:
        await self.cache.clear(namespace=f"{self.ns}-inv{r}-{tag}")

    async def bulk_present(self, r: int, entries: int) -> tuple[bool, bool]:
        first = await self.cache.get("e0", namespace=f"{self.ns}-inv{r}-one")
        last = await self.cache.get(f"e{entries - 1}", namespace=f"{self.ns}-inv{r}-all")
        return first is not None, last is not None

    async def bulk_cleanup(self, r: int) -> None:
        await unlink_matching(self.client, f"{self.ns}-inv{r}-*")


PEERS: list[Callable[[str], Peer]] = [TagcachePeer, RedisPyPeer, CashewsPeer, AiocachePeer]


def rotated(peers: list[Peer], r: int) -> list[Peer]:
    """The libraries in round ``r``'s order: each goes first in turn, so load drifts hit all."""
    k = r % len(peers)
    return peers[k:] + peers[:k]


# --- 1. hits ---------------------------------------------------------------------------------


def counting(get: Get, misses: list[int]) -> Get:
    async def op(i: int) -> object:
        value = await get(i)
        if value is None:
            misses[0] += 1
        return value

    return op


async def hits(args: argparse.Namespace, peers: list[Peer]) -> dict[str, Any]:
    values = [sample_value(i) for i in range(args.keys)]
    indices = zipf_indices(args.keys, args.ops)
    cases: dict[str, dict[str, Get]] = {}
    misses = {p.name: [0] for p in peers}
    plain = {}
    dec = {}
    for peer in peers:
        await peer.fill(values)
        plain[peer.name] = counting(peer.getter(args.keys), misses[peer.name])
        dec[peer.name] = counting(await peer.decorated(values), misses[peer.name])
        for get in (plain[peer.name], dec[peer.name]):
            assert await get(7) == values[7], peer.name
    cases["get, 1 caller"] = plain
    cases["get, 50 callers"] = plain
    cases["decorated hit, 50 callers"] = dec
    out: dict[str, Any] = {}
    for label, getters in cases.items():
        callers = 1 if "1 caller" in label else 50
        for get in getters.values():  # warm-up: connections, scripts, memos
            await ops_per_second(get, indices[: min(1000, max(100, args.ops // 5))], callers)
        samples: dict[str, list[float]] = {p.name: [] for p in peers}
        for r in range(args.rounds):
            for peer in rotated(peers, r):
                samples[peer.name].append(await ops_per_second(getters[peer.name], indices, callers))
        out[label] = {name: {"ops_per_s": median(found), "rounds": found} for name, found in samples.items()}
        print(f"  {label}: " + ", ".join(f"{n} {median(s):,.0f}" for n, s in samples.items()), flush=True)
    for name, count in misses.items():
        if count[0]:
            print(
                f"WARNING: {name} missed {count[0]} reads in the hit workload: its figures are not all hits"
            )
    out["misses"] = {name: count[0] for name, count in misses.items()}
    return out


# --- 2. stampede -----------------------------------------------------------------------------


class Stage:
    """One stampede: ``callers`` concurrent calls of one cold key of one library's decorator."""

    def __init__(self, peer: Peer, scope: str, locked: bool, delay: float) -> None:
        self.calls = 0
        self.delay = delay
        self.fn = peer.read_through(scope, self.load, locked)

    async def load(self, item: int) -> dict[str, object]:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return sample_value(item)

    async def prepare(self, callers: int) -> None:
        """Concurrent calls (up to 100) of another key first: every library's pools hold their
        connections before the timed calls (aiocache makes a pool per decorated function)."""
        assert self.fn is not None
        await asyncio.gather(*(self.fn(2) for _ in range(min(callers, 100))), return_exceptions=True)
        self.calls = 0

    async def run(self, callers: int) -> dict[str, Any]:
        """Time the callers; a caller that raised is counted, not fatal (a peer's bug is a figure)."""
        assert self.fn is not None
        start = time.time()
        results = await asyncio.gather(*(self.fn(1) for _ in range(callers)), return_exceptions=True)
        end = time.time()
        errors = [r for r in results if isinstance(r, BaseException)]
        return {
            "calls": self.calls,
            "start": start,
            "end": end,
            "ok": all(r == sample_value(1) for r in results if not isinstance(r, BaseException)),
            "errors": len(errors),
            "error": repr(errors[0]) if errors else None,
        }


def record(out: dict[str, Any], key: str, per: list[dict[str, Any]], start: float) -> None:
    """Add one stampede (the reports of its processes) to ``out[key]``."""
    entry = out.setdefault(key, {"calls": [], "ms": [], "ok": True, "errors": [], "error": None})
    entry["calls"].append(sum(x["calls"] for x in per))
    entry["ms"].append((max(x["end"] for x in per) - start) * 1000)
    entry["ok"] = entry["ok"] and all(x["ok"] for x in per)
    entry["errors"].append(sum(x["errors"] for x in per))
    entry["error"] = entry["error"] or next((x["error"] for x in per if x["error"]), None)


def stage_list(peers: list[Peer]) -> list[tuple[str, bool]]:
    """(library, locked) pairs that exist: the plain decorator of each, the locked one where there is one."""
    return [(p.name, False) for p in peers] + [(p.name, True) for p in peers if p.lock_how is not None]


async def stampede_local(args: argparse.Namespace, peers: list[Peer]) -> dict[str, Any]:
    by_name = {p.name: p for p in peers}
    out: dict[str, Any] = {}
    for r in range(args.stampede_rounds):
        order = stage_list(rotated(peers, r))
        for name, locked in order:
            stage = Stage(by_name[name], f"st{r}{'l' if locked else 'p'}", locked, 0.05)
            await stage.prepare(args.callers)
            report = await stage.run(args.callers)
            record(out, f"{name}/{'locked' if locked else 'plain'}", [report], report["start"])
    return out


async def stampede_worker(url: str, spec: dict[str, Any]) -> None:
    """A worker process of the multi-process stampede: its share of the callers of every stage.

    Stage by stage, it reads the time to start at from stdin and answers with one JSON line,
    so that a slow stage never delays the start of the next one in some processes only.
    """
    peers = [make(url) for make in PEERS]
    by_name = {p.name: p for p in peers}
    loop = asyncio.get_running_loop()
    try:
        for p in peers:
            await p.open()
        stages = [
            Stage(by_name[n], f"{spec['scope']}{'l' if lk else 'p'}", lk, 0.05) for n, lk in spec["stages"]
        ]
        for stage in stages:
            await stage.prepare(spec["callers"])
        print("ready", flush=True)
        for stage in stages:
            start_at = float(await loop.run_in_executor(None, sys.stdin.readline))
            await asyncio.sleep(max(0.0, start_at - time.time()))
            print(json.dumps(await stage.run(spec["callers"])), flush=True)
    finally:
        for p in peers:
            await p.aclose()


async def stampede_processes(args: argparse.Namespace, peers: list[Peer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in range(args.stampede_rounds):
        stages = stage_list(rotated(peers, r))
        spec = {"scope": f"mp{r}", "stages": stages, "callers": args.callers // args.processes}
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--redis",
                args.redis,
                "--worker-stampede",
                json.dumps(spec),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(args.processes)
        ]

        async def line_of(proc: asyncio.subprocess.Process) -> bytes:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if not line:
                raise RuntimeError(f"a stampede worker stopped (exit code {await proc.wait()})")
            return line

        try:
            for proc in procs:
                if (await line_of(proc)).strip() != b"ready":
                    raise RuntimeError("a stampede worker did not start")
            for name, locked in stages:
                start_at = time.time() + 0.2
                for proc in procs:
                    assert proc.stdin is not None
                    proc.stdin.write(f"{start_at}\n".encode())
                    await proc.stdin.drain()
                per = [json.loads(await line_of(proc)) for proc in procs]
                record(out, f"{name}/{'locked' if locked else 'plain'}", per, start_at)
            for proc in procs:
                if await asyncio.wait_for(proc.wait(), 60) != 0:
                    raise RuntimeError(f"a stampede worker failed with exit code {proc.returncode}")
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    return out


# --- 3. invalidation -------------------------------------------------------------------------


async def timed_ms(call: Callable[[], Awaitable[object]]) -> float:
    gc.disable()  # a collection inside the timed call would be noise, not invalidation cost
    try:
        start = time.perf_counter()
        await call()
        return (time.perf_counter() - start) * 1000
    finally:
        gc.enable()


async def invalidation(args: argparse.Namespace, peers: list[Peer]) -> dict[str, Any]:
    out: dict[str, Any] = {p.name: {"one_ms": [], "all_ms": [], "correct": True} for p in peers}
    for r in range(args.inval_rounds):
        for peer in rotated(peers, r):
            await peer.bulk_fill(r, args.entries)
            before = await peer.bulk_present(r, args.entries)
            t_one = await timed_ms(lambda peer=peer, r=r: peer.bulk_invalidate(r, "one"))
            after_one = await peer.bulk_present(r, args.entries)
            t_all = await timed_ms(lambda peer=peer, r=r: peer.bulk_invalidate(r, "all"))
            after_all = await peer.bulk_present(r, args.entries)
            correct = before == (True, True) and after_one[0] is False and after_all[1] is False
            if peer.name != "aiocache":  # its "one" namespace holds a copy of e0 only
                correct = correct and after_one[1] is True
            out[peer.name]["one_ms"].append(t_one)
            out[peer.name]["all_ms"].append(t_all)
            out[peer.name]["correct"] = out[peer.name]["correct"] and correct
            await peer.bulk_cleanup(r)
        print(f"  invalidation round {r + 1}/{args.inval_rounds} done", flush=True)
    return out


# --- 4. stale reads --------------------------------------------------------------------------


async def stale_test(
    peer: Peer, scope: str, locked: bool, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """tests/test_concurrency.py through ``peer``'s read-through decorator (one process)."""
    items = 8
    rng = random.Random(seed)
    source = dict.fromkeys(range(items), 0)
    floor = dict.fromkeys(range(items), 0)  # highest version whose invalidation has returned
    stale: list[tuple[int, int, int]] = []
    errors: list[BaseException] = []
    loads = 0
    reads = 0
    writing = True

    async def loader(item: int) -> int:
        nonlocal loads
        loads += 1
        version_read = source[item]
        await asyncio.sleep(rng.random() * 0.004)
        return version_read

    fn = peer.read_through(scope, loader, locked)
    assert fn is not None

    async def reader() -> None:
        nonlocal reads
        done = 0
        while done < args.reads_per_reader or writing:
            done += 1
            reads += 1
            item = rng.randrange(items)
            must_see = floor[item]
            try:
                got = await fn(item)
            except Exception as exc:  # a peer's bug is a figure, not the end of the run
                errors.append(exc)
                continue
            if got < must_see:
                stale.append((item, got, must_see))
            await asyncio.sleep(rng.random() * 0.002)

    async def writer() -> None:
        nonlocal writing
        try:
            for _ in range(args.writes):
                item = rng.randrange(items)
                source[item] += 1
                new = source[item]
                await peer.invalidate(scope, item)
                floor[item] = max(floor[item], new)
                await asyncio.sleep(rng.random() * 0.003)
        finally:
            writing = False

    await asyncio.gather(writer(), *(reader() for _ in range(args.readers)))
    await asyncio.sleep(0.05)  # let any load still running finish and store
    left = 0
    for item in range(items):
        if await fn(item) < source[item]:
            left += 1
    return {
        "stale": len(stale),
        "reads": reads,
        "loads": loads,
        "left_stale": left,
        "items": items,
        "errors": len(errors),
        "error": repr(errors[0]) if errors else None,
    }


async def overlap(peer: Peer, scope: str, locked: bool) -> dict[str, Any]:
    """A slow load A begins; the source changes and is invalidated (returned); read B begins;
    after A and B, read C. B or C returning the old value is a stale read."""
    source = {1: 0}
    first = asyncio.Event()
    calls = 0

    async def loader(item: int) -> int:
        nonlocal calls
        calls += 1
        seen = source[item]
        if calls == 1:
            first.set()
            await asyncio.sleep(0.2)
        else:
            await asyncio.sleep(0.01)
        return seen

    fn = peer.read_through(scope, loader, locked)
    assert fn is not None
    a = asyncio.ensure_future(fn(1))
    await asyncio.wait_for(first.wait(), 5)
    source[1] = 1
    await peer.invalidate(scope, 1)
    b = await fn(1)
    await a
    await asyncio.sleep(0.01)
    c = await fn(1)
    return {"b": b, "c": c, "b_stale": b < 1, "c_stale": c < 1, "loads": calls}


async def stale_reads(args: argparse.Namespace, peers: list[Peer]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in range(args.stale_rounds):
        for name, locked in stage_list(rotated(peers, r)):
            peer = next(p for p in peers if p.name == name)
            key = f"{name}/{'locked' if locked else 'plain'}"
            result = await stale_test(peer, f"stale{r}{'l' if locked else 'p'}", locked, args, 1234 + r)
            entry = out.setdefault(
                key,
                {"stale": 0, "reads": 0, "loads": 0, "left_stale": 0, "items": 0, "errors": 0, "error": None},
            )
            for field in ("stale", "reads", "loads", "left_stale", "items", "errors"):
                entry[field] += result[field]
            entry["error"] = entry["error"] or result["error"]
            if r == 0:
                entry["overlap"] = await overlap(peer, f"overlap{'l' if locked else 'p'}", locked)
    return out


# --- report ----------------------------------------------------------------------------------


def fmt_calls_ms(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    calls = entry["calls"]
    low, high = min(calls), max(calls)
    c = f"{low:,}" if low == high else f"{low:,} to {high:,}"
    bad = "" if entry["ok"] else " (wrong values!)"
    if any(entry["errors"]):
        bad += f"; callers raised {'/'.join(str(e) for e in entry['errors'])} errors, e.g. {entry['error']}"
    return f"{c} call{'' if high == 1 else 's'}, {median(entry['ms']):,.0f} ms{bad}"


def ratio(tc: float, other: float, higher_is_better: bool) -> str:
    if tc <= 0 or other <= 0:
        return "—"
    return f"{(tc / other if higher_is_better else other / tc):,.2f}x"


def report(args: argparse.Namespace, peers: list[Peer], results: dict[str, Any]) -> str:
    names = [p.name for p in peers]
    others = names[1:]
    headers = ["workload", *names, *(f"tagcache vs {n}" for n in others)]
    rows: list[list[str]] = []
    for label, per in results["hits"].items():
        if label == "misses":
            continue
        cells = [f"{per[n]['ops_per_s']:,.0f}" for n in names]
        ratios = [ratio(per["tagcache"]["ops_per_s"], per[n]["ops_per_s"], True) for n in others]
        rows.append([f"hits: {label} (ops/s)", *cells, *ratios])
    lock_of = {p.name: p.lock_how for p in peers}
    for part, title in (("stampede_1", "1 process"), ("stampede_n", f"{args.processes} processes")):
        for variant in ("plain", "locked"):
            per = results[part]
            cells = []
            for n in names:
                entry = per.get(f"{n}/{variant}")
                if entry is None:
                    cells.append("n/a (no lock written)" if n == "redis-py" else "n/a")
                else:
                    cells.append(fmt_calls_ms(entry))
            tc = per["tagcache/" + variant]
            ratios = []
            for n in others:
                entry = per.get(f"{n}/{variant}")
                if entry is None:
                    ratios.append("—")
                else:
                    ratios.append(
                        f"{median(entry['calls']) / median(tc['calls']):,.0f}x calls, "
                        f"{ratio(median(tc['ms']), median(entry['ms']), False)} time"
                    )
            what = "decorator" if variant == "plain" else "stampede-locked decorator"
            rows.append([f"stampede: {args.callers} callers, {title}, {what}", *cells, *ratios])
    inval = results["invalidation"]
    for field, label in (("one_ms", "1 entry"), ("all_ms", f"{args.entries:,} entries")):
        cells = []
        for n in names:
            cell = f"{median(inval[n][field]):,.3f}"
            if n == "aiocache":
                cell += " (namespace clear, not a tag)"
            if not inval[n]["correct"]:
                cell += " (did not remove them!)"
            cells.append(cell)
        ratios = [ratio(median(inval["tagcache"][field]), median(inval[n][field]), False) for n in others]
        rows.append([f"invalidate a tag carried by {label} (ms)", *cells, *ratios])
    for variant in ("plain", "locked"):
        cells, ocells = [], []
        for n in names:
            entry = results["stale"].get(f"{n}/{variant}")
            if entry is None:
                cells.append("n/a (no lock written)" if n == "redis-py" else "n/a")
                ocells.append(cells[-1])
                continue
            cells.append(
                f"{entry['stale']:,} of {entry['reads']:,} reads; {entry['left_stale']} of {entry['items']} items left stale"
                + (f"; {entry['errors']} reads raised, e.g. {entry['error']}" if entry["errors"] else "")
            )
            o = entry["overlap"]
            ocells.append(
                f"B {'stale' if o['b_stale'] else 'fresh'}, C {'stale' if o['c_stale'] else 'fresh'}"
            )
        what = "decorator" if variant == "plain" else "stampede-locked decorator"
        rows.append([f"stale reads, {what}", *cells, *("—" for _ in others)])
        rows.append(
            [
                f"overlap: read B after the invalidation, read C after all, {what}",
                *ocells,
                *("—" for _ in others),
            ]
        )
    lines = [
        "Ratios > 1: tagcache better (more ops/s, less time, fewer loader calls). 'locked' variants: "
        + "; ".join(f"{n}: {lock_of[n] or 'none'}" for n in names),
        "",
        table(headers, rows),
    ]
    return "\n".join(lines)


async def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        info = await client.info("server")
        return str(info.get("redis_version", "?"))
    finally:
        await client.aclose()


async def run(args: argparse.Namespace) -> int:
    peers = [make(args.redis) for make in PEERS]
    results: dict[str, Any] = {}
    try:
        for p in peers:
            await p.open()
            await p.cleanup()
        meta = {
            "command": " ".join(["python", "benchmarks/peers.py", *sys.argv[1:]]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "redis_server": await redis_version(args.redis),
            "versions": {pkg: version(pkg) for pkg in ("tagcache", "redis", "cashews", "aiocache", "orjson")},
            "configs": {p.name: p.config for p in peers},
            "invalidation": {p.name: p.bulk_how for p in peers},
            "args": {k: v for k, v in vars(args).items() if k != "worker_stampede"},
        }
        print(
            f"peers over {args.redis}; {meta['date']}; Python {meta['python']}, Redis {meta['redis_server']}"
        )
        for p in peers:
            print(f"- {p.name}: {p.config}")
        began = time.perf_counter()

        def phase(text: str) -> None:
            print(f"[{time.perf_counter() - began:6.1f} s] {text}", flush=True)

        phase(f"1. hits: {args.keys:,} keys, Zipf(1.1), {args.ops:,} reads x {args.rounds} rounds")
        results["hits"] = await hits(args, peers)
        phase(
            f"2. stampede: {args.callers} callers of a cold key, loader 50 ms, {args.stampede_rounds} rounds"
        )
        results["stampede_1"] = await stampede_local(args, peers)
        phase(f"   the same over {args.processes} processes")
        results["stampede_n"] = await stampede_processes(args, peers)
        phase(f"3. invalidation: {args.entries:,} entries, {args.inval_rounds} rounds")
        results["invalidation"] = await invalidation(args, peers)
        phase(
            f"4. stale reads: {args.readers} readers, {args.writes} writes, 8 items, {args.stale_rounds} rounds"
        )
        results["stale"] = await stale_reads(args, peers)
        phase("done")
    finally:
        for p in peers:
            await p.cleanup()
            await p.aclose()
    print()
    print(report(args, peers, results))
    for p in peers:
        print(f"- {p.name} invalidates a group by: {p.bulk_how}")
    if args.json:
        payload = orjson.dumps({"meta": meta, "results": results}, option=orjson.OPT_INDENT_2)
        await asyncio.to_thread(Path(args.json).write_bytes, payload)
        print(f"figures written to {args.json}")
    tc_stale = [v for k, v in results["stale"].items() if k.startswith("tagcache/")]
    bad = sum(
        e["stale"] + e["left_stale"] + e["overlap"]["b_stale"] + e["overlap"]["c_stale"] for e in tc_stale
    )
    errors = sum(e["errors"] for e in tc_stale) + sum(
        sum(v["errors"])
        for part in ("stampede_1", "stampede_n")
        for k, v in results[part].items()
        if k.startswith("tagcache/")
    )
    if bad or errors:
        print(f"FAIL: tagcache showed {bad} stale reads and {errors} errors")
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=20_000, help="reads per round, library and case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callers", type=int, default=1000, help="stampede callers")
    parser.add_argument("--processes", type=int, default=4, help="processes of the second stampede")
    parser.add_argument("--stampede-rounds", type=int, default=3)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--inval-rounds", type=int, default=3)
    parser.add_argument("--readers", type=int, default=40)
    parser.add_argument("--reads-per-reader", type=int, default=60)
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--stale-rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--worker-stampede", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_stampede:
        asyncio.run(stampede_worker(args.redis, json.loads(args.worker_stampede)))
        return
    if args.smoke:
        args.keys, args.ops, args.rounds = 300, 600, 1
        args.callers, args.processes, args.stampede_rounds = 100, 2, 1
        args.entries, args.inval_rounds = 1000, 1
        args.readers, args.reads_per_reader, args.writes, args.stale_rounds = 10, 10, 20, 1
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
