"""Invalidation cost against the number of entries carrying the tag.

Each round stores N entries: all of them carry tag ``all``, one of them also
carries tag ``one``. It then times ``invalidate_tags(["one"])`` (1 entry
carries it) and ``invalidate_tags(["all"])`` (N entries carry it), each the
first time and with live entries — on Redis and in memory — beside the
common member-set design (a Redis SET of keys per tag; invalidation reads
the set and deletes every member), measured in the same run on the same data
shape. Same store size in both cases, so only the tag's reach differs.

With ``--cluster URL`` (or ``local``: a 3-primary cluster started for the run),
the same rounds also run on a Redis Cluster (``RedisClusterBackend``, 64 buckets:
one token deleted per bucket, pipelined per primary, the primaries at once).

    python benchmarks/invalidation.py --url redis://127.0.0.1:6379/0
    python benchmarks/invalidation.py --url redis://127.0.0.1:6379/0 --cluster local
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as redis

from tagcache import Cache
from tagcache.backends import MemoryBackend

from _common import cluster_url, median, table


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    gc.disable()  # a collection inside the timed call would be noise, not invalidation cost
    try:
        start = time.perf_counter()
        await call()
        return (time.perf_counter() - start) * 1000
    finally:
        gc.enable()


async def tagcache_round(cache: Cache, entries: int, r: int) -> tuple[float, float]:
    one, every = f"one-{r}", f"all-{r}"
    await cache.set("e0", 0, tags=[one, every])
    for start in range(1, entries, 1000):
        await asyncio.gather(
            *(cache.set(f"e{i}", i, tags=[every]) for i in range(start, min(start + 1000, entries)))
        )
    assert await cache.get("e0") == 0
    assert await cache.get(f"e{entries - 1}") == entries - 1
    t_one = await timed(lambda: cache.invalidate_tags([one]))
    assert await cache.get("e0") is None
    assert await cache.get(f"e{entries - 1}") == entries - 1
    t_all = await timed(lambda: cache.invalidate_tags([every]))
    assert await cache.get(f"e{entries - 1}") is None
    await cache.clear()
    return t_one, t_all


async def member_set_round(client: redis.Redis, entries: int, r: int) -> tuple[float, float]:
    prefix = f"bench-sets:{r}"
    for start in range(0, entries, 5000):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 5000, entries)):
                pipe.set(f"{prefix}:e{i}", i, ex=600)
                pipe.sadd(f"{prefix}:tag:all", f"{prefix}:e{i}")
            if start == 0:
                pipe.sadd(f"{prefix}:tag:one", f"{prefix}:e0")
            await pipe.execute()

    async def invalidate(tag: str) -> None:
        members = await client.smembers(f"{prefix}:tag:{tag}")
        if members:
            await client.delete(*members)
        await client.delete(f"{prefix}:tag:{tag}")

    return await timed(lambda: invalidate("one")), await timed(lambda: invalidate("all"))


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cluster", default=None, help="a redis+cluster:// URL, or 'local'")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.entries, args.rounds = 2000, 1
    with cluster_url(args.cluster) as cluster:
        await run(args, cluster)


async def run(args: argparse.Namespace, cluster: str | None) -> None:
    redis_cache = Cache.from_url(args.url, namespace="bench-inval", default_ttl=600)
    memory_cache = Cache(MemoryBackend(max_entries=args.entries * 2, max_bytes=None), namespace="bench")
    client = redis.Redis.from_url(args.url)
    cluster_cache = (
        None if cluster is None else Cache.from_url(cluster, namespace="bench-inval", default_ttl=600)
    )
    results: dict[str, list[tuple[float, float]]] = {"redis": [], "memory": [], "sets": [], "cluster": []}
    try:
        await redis_cache.clear()
        for r in range(args.rounds):
            results["redis"].append(await tagcache_round(redis_cache, args.entries, r))
            if cluster_cache is not None:
                results["cluster"].append(await tagcache_round(cluster_cache, args.entries, r))
            results["memory"].append(await tagcache_round(memory_cache, args.entries, r))
            results["sets"].append(await member_set_round(client, args.entries, r))
    finally:
        await redis_cache.clear()
        await redis_cache.aclose()
        if cluster_cache is not None:
            await cluster_cache.clear()
            await cluster_cache.aclose()
        await memory_cache.aclose()
        await client.aclose()

    def cell(kind: str, which: int) -> str:
        return f"{median([sample[which] for sample in results[kind]]):.3f}"

    print(
        f"time to invalidate one tag, first time, with live entries; {args.entries:,} entries stored; "
        f"median of {args.rounds} rounds, milliseconds"
    )
    print(
        table(
            ["entries carrying the tag", "tagcache Redis", "tagcache memory", "member-set design (Redis)"],
            [
                ("1", cell("redis", 0), cell("memory", 0), cell("sets", 0)),
                (f"{args.entries:,}", cell("redis", 1), cell("memory", 1), cell("sets", 1)),
            ],
        )
    )
    if cluster is not None:
        print(f"tagcache on the Redis Cluster {cluster} (3 primaries, 64 buckets), same rounds:")
        print(
            table(
                ["entries carrying the tag", "tagcache Redis Cluster ms", "tagcache single Redis ms"],
                [
                    ("1", cell("cluster", 0), cell("redis", 0)),
                    (f"{args.entries:,}", cell("cluster", 1), cell("redis", 1)),
                ],
            )
        )
    kinds = [("redis", "tagcache Redis"), ("memory", "tagcache memory"), ("sets", "member sets")]
    if cluster is not None:
        kinds.append(("cluster", "tagcache Redis Cluster"))
    for kind, label in kinds:
        ratio = float(cell(kind, 1)) / max(float(cell(kind, 0)), 1e-9)
        print(f"{label}: {args.entries:,}-entry tag / 1-entry tag = {ratio:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
