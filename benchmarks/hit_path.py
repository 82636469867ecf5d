"""Cache hits over Redis: tagcache ``get`` (tags validated) against a hand-written
redis-py ``GET`` + ``orjson.loads``, measured in the same run.

Workload: 10k keys, Zipf(1.1) access, ~200-byte dict values, 2 tags per
entry, 1 caller and 50 concurrent callers. Rounds alternate the clients;
the median of the rounds is reported with the ratio.

With ``--cluster URL`` (``redis+cluster://host:port/``, or ``local`` to start a
3-primary cluster on free loopback ports for the run), the same workload also
runs on the cluster, in the same rounds: tagcache (``RedisClusterBackend``)
against redis-py's ``RedisCluster`` ``GET`` + ``orjson.loads``, and tagcache on
the cluster against tagcache on the single node.

With ``--local``, the same rounds also measure a ``Cache`` with an in-process L1
(``LocalCache``) in front of the same Redis, and a ``Cache`` over ``MemoryBackend``.

    python benchmarks/hit_path.py --url redis://127.0.0.1:6379/0
    python benchmarks/hit_path.py --url redis://127.0.0.1:6379/0 --cluster local
    python benchmarks/hit_path.py --url redis://127.0.0.1:6379/0 --local
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as redis

from tagcache import Cache, LocalCache
from tagcache.backends import MemoryBackend

from _common import cluster_url, median, ops_per_second, sample_value, table, zipf_indices

Get = Callable[[int], Awaitable[object]]


async def fill(cache: Cache, raw: Any, values: list[dict[str, object]]) -> None:
    """Store every value in ``cache`` (with 2 tags) and, as JSON, under ``bench-raw:`` keys."""
    await cache.clear()
    for start in range(0, len(values), 500):
        batch = range(start, min(start + 500, len(values)))
        await asyncio.gather(
            *(cache.set(f"k{i}", values[i], tags=[f"user:{i}", f"group:{i % 50}"]) for i in batch)
        )
        async with raw.pipeline(transaction=False) as pipe:  # per node on a cluster client
            for i in batch:
                pipe.set(f"bench-raw:k{i}", orjson.dumps(values[i]), ex=3600)
            await pipe.execute()


async def open_connections(raw: Any, key: str, callers: int) -> None:
    """Open ``callers`` connections of a redis-py client before anything is timed.

    redis-py's ``RedisCluster`` can fail a command whose connection is being opened
    while others open theirs (``'NoneType' object has no attribute 'writelines'``);
    opening them here, retried, keeps that out of the timed rounds.
    """
    for attempt in range(5):
        try:
            await asyncio.gather(*(raw.get(key) for _ in range(callers)))
            return
        except AttributeError:
            if attempt == 4:
                raise


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster", default=None, help="a redis+cluster:// URL, or 'local'")
    parser.add_argument("--local", action="store_true", help="also an L1 (LocalCache) and the memory backend")
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=50_000, help="gets per round and caller count")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--callers", default="1,50")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    args = parser.parse_args()
    if args.smoke:
        args.keys, args.ops, args.rounds = 1000, 3000, 1
    with cluster_url(args.cluster) as cluster:
        await run(args, cluster)


async def run(args: argparse.Namespace, cluster: str | None) -> None:
    values = [sample_value(i) for i in range(args.keys)]
    keys = [f"k{i}" for i in range(args.keys)]
    raw_keys = [f"bench-raw:k{i}" for i in range(args.keys)]
    clients: list[tuple[Cache, Any]] = []
    raw = redis.Redis.from_url(args.url, max_connections=64)
    cache = Cache.from_url(args.url, namespace="bench-hit", default_ttl=3600)
    clients.append((cache, raw))
    if cluster is not None:
        host_port = cluster.split("://", 1)[1].split("/", 1)[0].split(",")[0]
        host, _, port = host_port.rpartition(":")
        raw_cluster: Any = redis.RedisCluster(host=host, port=int(port), max_connections=64)
        cluster_cache = Cache.from_url(cluster, namespace="bench-hit", default_ttl=3600)
        clients.append((cluster_cache, raw_cluster))
    extra: list[Cache] = []
    if args.local:
        l1_cache = Cache.from_url(
            args.url,
            namespace="bench-hit",
            default_ttl=3600,
            local=LocalCache(max_entries=args.keys, ttl=3600),
        )
        memory = Cache(MemoryBackend(max_entries=args.keys * 2, max_bytes=None), namespace="bench-hit")
        extra = [l1_cache, memory]
    try:
        for c, r in clients:
            await fill(c, r, values)
        if args.local:
            layer: Any = l1_cache.backend
            await l1_cache.get(keys[0])  # starts the L1's subscription to changes
            while not layer.health()["local_live"]:  # noqa: ASYNC110  # a figure, no event to wait on
                await asyncio.sleep(0.01)
            for i in range(args.keys):
                await memory.set(keys[i], values[i], tags=[f"user:{i}", f"group:{i % 50}"])
                await l1_cache.get(keys[i])  # from Redis: the L1 then keeps a copy
            while layer.health()["local_entries"] < args.keys:  # noqa: ASYNC110  # as above
                await asyncio.sleep(0.01)
        indices = zipf_indices(args.keys, args.ops)

        def raw_getter(client: Any) -> Get:
            async def raw_get(i: int) -> object:
                return orjson.loads(await client.get(raw_keys[i]))

            return raw_get

        def tc_getter(c: Cache) -> Get:
            async def tc_get(i: int) -> object:
                return await c.get(keys[i])

            return tc_get

        getters: dict[str, Get] = {"raw": raw_getter(raw), "tc": tc_getter(cache)}
        if cluster is not None:
            getters["raw cluster"] = raw_getter(raw_cluster)
            getters["tc cluster"] = tc_getter(cluster_cache)
        if args.local:
            getters["tc l1"] = tc_getter(l1_cache)
            getters["tc memory"] = tc_getter(memory)
        for client in (raw, raw_cluster) if cluster is not None else (raw,):
            await open_connections(client, raw_keys[0], max(int(c) for c in args.callers.split(",")))
        for name, get in getters.items():  # sanity: every client returns the same data
            assert await get(0) == values[0], name
        rates: dict[tuple[str, int], float] = {}
        for callers in [int(c) for c in args.callers.split(",")]:
            for get in getters.values():  # warm-up
                await ops_per_second(get, indices[:1000], callers)
            per_round: dict[str, list[float]] = {name: [] for name in getters}
            for _ in range(args.rounds):
                for name, get in getters.items():
                    per_round[name].append(await ops_per_second(get, indices, callers))
            for name, found in per_round.items():
                rates[name, callers] = median(found)
        callers_list = sorted({c for _, c in rates})
        print(
            f"hit path over {args.url}: {args.keys} keys, Zipf(1.1), {args.ops} gets x {args.rounds} rounds"
        )
        print(
            table(
                ["callers", "redis-py GET+orjson ops/s", "tagcache get ops/s", "ratio"],
                [
                    (
                        c,
                        f"{rates['raw', c]:,.0f}",
                        f"{rates['tc', c]:,.0f}",
                        f"{rates['tc', c] / rates['raw', c]:.2f}x",
                    )
                    for c in callers_list
                ],
            )
        )
        if cluster is not None:
            print(f"\nthe same on the Redis Cluster {cluster} (3 primaries on this machine), same rounds:")
            print(
                table(
                    [
                        "callers",
                        "redis-py RedisCluster GET+orjson ops/s",
                        "tagcache get ops/s (cluster)",
                        "ratio",
                        "tagcache cluster / single node",
                    ],
                    [
                        (
                            c,
                            f"{rates['raw cluster', c]:,.0f}",
                            f"{rates['tc cluster', c]:,.0f}",
                            f"{rates['tc cluster', c] / rates['raw cluster', c]:.2f}x",
                            f"{rates['tc cluster', c] / rates['tc', c]:.2f}x",
                        )
                        for c in callers_list
                    ],
                )
            )
        if args.local:
            print(
                "\nin-process L1 (LocalCache) in front of the same Redis, and the memory backend, same rounds:"
            )
            print(
                table(
                    [
                        "callers",
                        "tagcache get, L1 hit ops/s",
                        "tagcache get, Redis hit ops/s",
                        "tagcache get, MemoryBackend ops/s",
                        "L1 / Redis (target >= 20x)",
                        "memory / L1 (target <= 1.5x)",
                    ],
                    [
                        (
                            c,
                            f"{rates['tc l1', c]:,.0f}",
                            f"{rates['tc', c]:,.0f}",
                            f"{rates['tc memory', c]:,.0f}",
                            f"{rates['tc l1', c] / rates['tc', c]:.1f}x",
                            f"{rates['tc memory', c] / rates['tc l1', c]:.2f}x",
                        )
                        for c in callers_list
                    ],
                )
            )
            layer_health: Any = l1_cache.backend
            print(f"L1: {layer_health.health()['local_hits']:,} copies served")
        for c in extra:
            stats = await c.stats()
            if stats.errors or stats.misses:
                sys.exit(f"{c.backend.__class__.__name__} saw misses or errors: the figures are not hits")
        for c, _ in clients:
            stats = await c.stats()
            print(
                f"tagcache hit ratio ({c.backend.__class__.__name__}): {stats.hit_ratio:.3f} (errors: {stats.errors})"
            )
            if stats.errors or stats.misses:
                sys.exit("benchmark saw misses or errors: the figures above are not hits")
    finally:
        for c in extra:
            await c.aclose()
        for c, r in clients:
            await c.clear()
            await c.aclose()
            for start in range(0, len(raw_keys), 50):
                await asyncio.gather(*(r.unlink(k) for k in raw_keys[start : start + 50]))
            await r.aclose()


if __name__ == "__main__":
    asyncio.run(main())
