"""In-process hits: tagcache ``get`` over ``MemoryBackend`` with 3 tags per
entry, a ``@cache.cached`` function's hit (key built from the argument
included), and an ``async-lru`` cached coroutine, measured in the same run.

    python benchmarks/memory_hit.py
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from async_lru import alru_cache

from tagcache import Cache
from tagcache.backends import MemoryBackend

from _common import median, sample_value, table, zipf_indices


async def tagcache_us(cache: Cache, keys: list[str], indices: list[int]) -> float:
    get = cache.get
    start = time.perf_counter()
    for i in indices:
        await get(keys[i])
    return (time.perf_counter() - start) / len(indices) * 1e6


async def decorated_us(load: Callable[[int], Awaitable[object]], indices: list[int]) -> float:
    start = time.perf_counter()
    for i in indices:
        await load(i)
    return (time.perf_counter() - start) / len(indices) * 1e6


def key_us(key_for: Callable[[int], str], indices: list[int]) -> float:
    start = time.perf_counter()
    for i in indices:
        key_for(i)
    return (time.perf_counter() - start) / len(indices) * 1e6


async def alru_us(load: Callable[[int], Awaitable[object]], indices: list[int]) -> float:
    start = time.perf_counter()
    for i in indices:
        await load(i)
    return (time.perf_counter() - start) / len(indices) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a second or two, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.ops, args.rounds = 20_000, 1

    values = [sample_value(i) for i in range(args.keys)]
    cache = Cache(MemoryBackend(max_entries=args.keys * 2), namespace="bench", default_ttl=3600)
    keys = [f"k{i}" for i in range(args.keys)]
    for i in range(args.keys):
        await cache.set(keys[i], values[i], tags=[f"user:{i}", f"group:{i % 50}", "users"])

    @alru_cache(maxsize=args.keys * 2)
    async def lru_load(i: int) -> dict[str, object]:
        return values[i]

    for i in range(args.keys):
        await lru_load(i)

    @cache.cached(ttl=3600, tags=["user:{i}", "users"])
    async def user(i: int) -> dict[str, object]:
        return values[i]

    for i in range(args.keys):
        await user(i)

    indices = zipf_indices(args.keys, args.ops)
    cache.reset_stats()
    tc, dec, lru, kb = [], [], [], []
    for _ in range(args.rounds):
        tc.append(await tagcache_us(cache, keys, indices))
        dec.append(await decorated_us(user, indices))
        lru.append(await alru_us(lru_load, indices))
        kb.append(key_us(user.key_for, indices))
    stats = await cache.stats()
    assert stats.misses == 0, "every read must be a hit"
    t, d, a, k = median(tc), median(dec), median(lru), median(kb)
    print(
        f"in-process hits: {args.keys} keys, Zipf(1.1), 3 tags per entry, {args.ops} gets x {args.rounds} rounds"
    )
    print(
        table(
            ["cache", "µs per hit"],
            [
                ("tagcache MemoryBackend get (3 tags validated, a private copy decoded)", f"{t:.2f}"),
                (
                    "tagcache @cache.cached hit (int argument: key and tags from the call memo, 2 tags)",
                    f"{d:.2f}",
                ),
                ("async-lru alru_cache hit (no tags, one shared object)", f"{a:.2f}"),
                (
                    "building a key without the call memo (key_for: a call whose arguments are not remembered)",
                    f"{k:.2f}",
                ),
            ],
        )
    )
    print(f"tagcache get / async-lru time per hit: {t / a:.2f}")
    print(f"decorated hit / tagcache get: {d / t:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
