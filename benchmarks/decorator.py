"""The decorator's hit path and its stampede protection.

Hits (same run): a ``@cache.cached`` function against ``cache.get`` of the
same key at 1 and 50 callers, and against a hand-written redis-py ``GET`` +
``orjson.loads`` at 50 concurrent callers (~200-byte dict values). A decorated
call is one ``fetch`` (a read that snapshots and leases only on a miss, so a
miss costs 2 round trips); ``cache.get`` is a plain read.

Stampede: loader calls when 1000 callers ask for one cold key whose loader
takes 50 ms, from 1 process and from 4 processes (250 callers each).

    python benchmarks/decorator.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

import orjson
import redis.asyncio as redis

from tagcache import Cache

from _common import median, ops_per_second, sample_value, table, zipf_indices


async def hits(url: str, ops: int, rounds: int, keys: int) -> list[tuple[str, ...]]:
    raw = redis.Redis.from_url(url, max_connections=64)
    cache = Cache.from_url(url, namespace="bench-dec", default_ttl=3600)
    values = [sample_value(i) for i in range(keys)]

    @cache.cached(ttl=3600, tags=["users", "user:{user_id}"])
    async def get_user(user_id: int) -> dict[str, object]:
        return values[user_id]

    try:
        for start in range(0, keys, 500):
            batch = range(start, min(start + 500, keys))
            await asyncio.gather(*(get_user(i) for i in batch))
            async with raw.pipeline(transaction=False) as pipe:
                for i in batch:
                    pipe.set(f"bench-dec-raw:{i}", orjson.dumps(values[i]), ex=3600)
                await pipe.execute()
        keys_of = [get_user.key_for(i) for i in range(keys)]
        raw_keys = [f"bench-dec-raw:{i}" for i in range(keys)]
        indices = zipf_indices(keys, ops)

        async def decorated(i: int) -> object:
            return await get_user(i)

        async def plain_get(i: int) -> object:
            return await cache.get(keys_of[i])

        async def raw_get(i: int) -> object:
            return orjson.loads(await raw.get(raw_keys[i]))

        assert await decorated(3) == await plain_get(3) == await raw_get(3)
        rows = []
        cases = ((1, plain_get, "cache.get"), (50, plain_get, "cache.get"), (50, raw_get, "redis-py GET+orjson"))
        for callers, baseline, label in cases:
            await ops_per_second(baseline, indices[:1000], callers)
            await ops_per_second(decorated, indices[:1000], callers)
            base_rates, dec_rates = [], []
            for _ in range(rounds):
                base_rates.append(await ops_per_second(baseline, indices, callers))
                dec_rates.append(await ops_per_second(decorated, indices, callers))
            b, d = median(base_rates), median(dec_rates)
            rows.append((str(callers), label, f"{b:,.0f}", f"{d:,.0f}", f"{d / b:.2f}x"))
        stats = await cache.stats()
        if stats.errors:
            sys.exit(f"benchmark saw {stats.errors} errors")
        return rows
    finally:
        await cache.clear()
        await cache.aclose()
        doomed = [k async for k in raw.scan_iter(match="bench-dec-raw:*", count=1000)]
        for start in range(0, len(doomed), 1000):
            await raw.unlink(*doomed[start : start + 1000])
        await raw.aclose()


async def stampede(url: str, ns: str, callers: int, delay: float, start_at: float) -> list[object]:
    """One process's share of the stampede: ``callers`` concurrent calls of a cold key."""
    client = redis.Redis.from_url(url)
    async with Cache.from_url(url, namespace=ns) as cache:

        @cache.cached(ttl=60)
        async def load(item: int) -> int:
            await client.incr(f"{ns}:calls")
            await asyncio.sleep(delay)
            return item

        await cache.get("warm-up")
        await asyncio.sleep(max(0.0, start_at - time.time()))
        results = await asyncio.gather(*(load(1) for _ in range(callers)))
    await client.aclose()
    return list(results)


async def stampede_calls(url: str, processes: int, total: int) -> int:
    ns = f"bench-stampede-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 1.5
    per = total // processes
    if processes == 1:
        await stampede(url, ns, per, 0.05, start_at)
    else:
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--url",
                url,
                "--worker",
                ns,
                str(per),
                str(start_at),
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(processes)
        ]
        for proc in procs:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            if proc.returncode != 0 or len(json.loads(out)) != per:
                sys.exit("a stampede worker failed")
    client = redis.Redis.from_url(url)
    calls = int(await client.get(f"{ns}:calls") or 0)
    await client.delete(f"{ns}:calls")
    await client.aclose()
    async with Cache.from_url(url, namespace=ns) as cache:
        await cache.clear()
    return calls


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--worker", nargs=3, metavar=("NS", "CALLERS", "START_AT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ns, callers, start_at = args.worker
        print(json.dumps(await stampede(args.url, ns, int(callers), 0.05, float(start_at))))
        return
    if args.smoke:
        args.keys, args.ops, args.rounds = 1000, 3000, 1

    rows = await hits(args.url, args.ops, args.rounds, args.keys)
    print(
        f"decorated hits over {args.url}: {args.keys} keys, Zipf(1.1), {args.ops} calls x {args.rounds} rounds"
    )
    print(table(["callers", "baseline", "baseline ops/s", "@cache.cached ops/s", "ratio"], rows))
    stampede_rows = []
    for processes in (1, 4):
        calls = await stampede_calls(args.url, processes, 1000)
        stampede_rows.append((str(processes), "1000", str(calls)))
    print("stampede: 1000 concurrent callers of one cold key, loader takes 50 ms")
    print(table(["processes", "callers", "loader calls"], stampede_rows))


if __name__ == "__main__":
    asyncio.run(main())
