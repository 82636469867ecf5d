"""Cache hits over Redis: tagcache ``get`` (tags validated) against a hand-written
redis-py ``GET`` + ``orjson.loads``, measured in the same run.

Workload: 10k keys, Zipf(1.1) access, ~200-byte dict values, 2 tags per
entry, 1 caller and 50 concurrent callers. Rounds alternate the two clients;
the median of the rounds is reported with the ratio.

    python benchmarks/hit_path.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
import redis.asyncio as redis

from tagcache import Cache

from _common import median, ops_per_second, sample_value, table, zipf_indices


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=50_000, help="gets per round and caller count")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callers", default="1,50")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.keys, args.ops, args.rounds = 1000, 3000, 1

    raw = redis.Redis.from_url(args.url, max_connections=64)
    cache = Cache.from_url(args.url, namespace="bench-hit", default_ttl=3600)
    try:
        await cache.clear()
        values = [sample_value(i) for i in range(args.keys)]
        for start in range(0, args.keys, 500):
            batch = range(start, min(start + 500, args.keys))
            await asyncio.gather(
                *(cache.set(f"k{i}", values[i], tags=[f"user:{i}", f"group:{i % 50}"]) for i in batch)
            )
            async with raw.pipeline(transaction=False) as pipe:
                for i in batch:
                    pipe.set(f"bench-raw:k{i}", orjson.dumps(values[i]), ex=3600)
                await pipe.execute()
        indices = zipf_indices(args.keys, args.ops)
        keys = [f"k{i}" for i in range(args.keys)]
        raw_keys = [f"bench-raw:k{i}" for i in range(args.keys)]

        async def raw_get(i: int) -> object:
            data = await raw.get(raw_keys[i])
            return orjson.loads(data)

        async def tc_get(i: int) -> object:
            return await cache.get(keys[i])

        # Sanity: both return the same data.
        assert await tc_get(0) == await raw_get(0) == values[0]
        rows = []
        for callers in [int(c) for c in args.callers.split(",")]:
            await ops_per_second(raw_get, indices[:1000], callers)  # warm-up
            await ops_per_second(tc_get, indices[:1000], callers)
            raw_rates, tc_rates = [], []
            for _ in range(args.rounds):
                raw_rates.append(await ops_per_second(raw_get, indices, callers))
                tc_rates.append(await ops_per_second(tc_get, indices, callers))
            r, t = median(raw_rates), median(tc_rates)
            rows.append((callers, f"{r:,.0f}", f"{t:,.0f}", f"{t / r:.2f}x"))
        stats = await cache.stats()
        print(
            f"hit path over {args.url}: {args.keys} keys, Zipf(1.1), {args.ops} gets x {args.rounds} rounds"
        )
        print(table(["callers", "redis-py GET+orjson ops/s", "tagcache get ops/s", "ratio"], rows))
        print(f"tagcache hit ratio during the run: {stats.hit_ratio:.3f} (errors: {stats.errors})")
        if stats.errors or stats.misses:
            sys.exit("benchmark saw misses or errors: the figures above are not hits")
    finally:
        await cache.clear()
        await cache.aclose()
        keys_left = [k async for k in raw.scan_iter(match="bench-raw:*", count=1000)]
        for start in range(0, len(keys_left), 1000):
            await raw.unlink(*keys_left[start : start + 1000])
        await raw.aclose()


if __name__ == "__main__":
    asyncio.run(main())
