"""Invalidation cost against the number of entries carrying the tag.

Times ``invalidate_tags([tag])`` the first time, with live entries, for a tag
carried by 1 entry and by 100k entries — on Redis and in memory — beside the
common member-set design (a Redis SET of keys per tag; invalidation reads the
set and deletes every member), measured in the same run.

    python benchmarks/invalidation.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import time

import redis.asyncio as redis

from tagcache import Cache
from tagcache.backends import MemoryBackend

from _common import median, table


async def fill(cache: Cache, tag: str, count: int) -> None:
    for start in range(0, count, 1000):
        await asyncio.gather(
            *(cache.set(f"{tag}:{i}", i, tags=[tag]) for i in range(start, min(start + 1000, count)))
        )


async def time_tagcache(cache: Cache, count: int, rounds: int) -> float:
    samples = []
    for r in range(rounds):
        tag = f"tag{count}-{r}"
        await fill(cache, tag, count)
        assert await cache.get(f"{tag}:0") == 0
        start = time.perf_counter()
        await cache.invalidate_tags([tag])
        samples.append(time.perf_counter() - start)
        assert await cache.get(f"{tag}:0") is None
        await cache.clear()
    return median(samples) * 1000


async def time_member_sets(client: redis.Redis, count: int, rounds: int) -> float:
    samples = []
    for r in range(rounds):
        tag_key = f"bench-sets:tag:{count}-{r}"
        for start in range(0, count, 5000):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + 5000, count)):
                    key = f"bench-sets:{count}-{r}:{i}"
                    pipe.set(key, i, ex=600)
                    pipe.sadd(tag_key, key)
                await pipe.execute()
        start_t = time.perf_counter()
        members = await client.smembers(tag_key)
        if members:
            await client.delete(*members)
        await client.delete(tag_key)
        samples.append(time.perf_counter() - start_t)
    return median(samples) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.entries, args.rounds = 2000, 1

    rows = []
    redis_cache = Cache.from_url(args.url, namespace="bench-inval", default_ttl=600)
    memory_cache = Cache(MemoryBackend(max_entries=args.entries * 2, max_bytes=None), namespace="bench")
    client = redis.Redis.from_url(args.url)
    try:
        await redis_cache.clear()
        for count in (1, args.entries):
            rows.append(
                (
                    f"{count:,}",
                    f"{await time_tagcache(redis_cache, count, args.rounds):.3f}",
                    f"{await time_tagcache(memory_cache, count, args.rounds):.4f}",
                    f"{await time_member_sets(client, count, args.rounds):.3f}",
                )
            )
    finally:
        await redis_cache.clear()
        await redis_cache.aclose()
        await memory_cache.aclose()
        await client.aclose()
    print(f"time to invalidate one tag, first time, live entries (median of {args.rounds}), milliseconds")
    print(
        table(
            ["entries with the tag", "tagcache Redis ms", "tagcache memory ms", "member-set design ms"],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
