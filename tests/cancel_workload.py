"""A read/invalidate workload in which some callers are cancelled at random moments.

Shared by ``tests/test_faults.py`` (in process, and as ``python -m
tests.cancel_workload`` in a second process) and ``benchmarks/cancellation.py``.

The "database" lives in Redis under ``src:<ns>:<item>`` (a version number),
so several processes share it. A writer bumps an item's version, invalidates
its tag, and only then raises the item's *floor* (``floor:<ns>:<item>``): a
read that began after the floor was raised and returned a lower version is a
stale read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import redis.asyncio as redis

from tagcache import Cache

ITEMS = 100


@dataclass
class Result:
    """What one process saw."""

    completed: int = 0
    cancelled: int = 0
    stale: int = 0
    loads: int = 0
    worst: float = 0.0
    slow: int = 0  # uncancelled calls that took 1 s or more
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


def zipf(rng: random.Random, n: int) -> list[int]:
    weights = [1 / (k + 1) ** 1.1 for k in range(ITEMS)]
    return rng.choices(range(ITEMS), weights, k=n)


async def read_load(
    cache: Cache,
    db: redis.Redis,
    *,
    mode: str,
    callers: int,
    calls: int,
    cancel_rate: float,
    seed: int,
) -> Result:
    """``callers`` concurrent readers making ``calls`` calls each through ``mode``
    (``"get_or_set"`` or ``"decorator"``); a ``cancel_rate`` share of calls is
    cancelled after a random number of event-loop steps. A fixed number of calls,
    not a fixed time: what the run does does not depend on the machine's speed."""
    ns = cache.namespace
    result = Result()

    async def load(item: int) -> int:
        result.loads += 1
        version = int(await db.get(f"src:{ns}:{item}") or 0)
        await asyncio.sleep(0.002)  # the rest of the query
        return version

    @cache.cached(ttl=60, tags=["item:{item}"])
    async def decorated(item: int) -> int:
        return await load(item)

    def call(item: int) -> Awaitable[int]:
        if mode == "decorator":
            return decorated(item)
        return cache.get_or_set(f"item:{item}", lambda: load(item), ttl=60, tags=[f"item:{item}"])

    async def reader(n: int) -> None:
        rng = random.Random(seed * 7919 + n)
        for item in zipf(rng, calls):
            floor = int(await db.get(f"floor:{ns}:{item}") or 0)
            task = asyncio.ensure_future(call(item))
            if rng.random() < cancel_rate:
                for _ in range(rng.randrange(40)):  # a random moment in the call
                    if task.done():
                        break
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    result.cancelled += 1
                    continue
                except Exception as exc:
                    result.errors.append(repr(exc))
                    continue
            started = time.monotonic()
            try:
                got = await task
            except Exception as exc:
                result.errors.append(repr(exc))
                continue
            took = time.monotonic() - started
            result.completed += 1
            result.worst = max(result.worst, took)
            if took >= 1.0:
                result.slow += 1
            if got < floor:
                result.stale += 1

    await asyncio.gather(*(reader(n) for n in range(callers)))
    return result


async def write_load(cache: Cache, db: redis.Redis, *, until: Awaitable[object], seed: int) -> int:
    """Bump, invalidate, raise the floor, about 200 times a second, until ``until`` is done.
    Returns the writes made."""
    ns = cache.namespace
    rng = random.Random(seed)
    items = zipf(rng, 100_000)
    done = asyncio.ensure_future(until)
    writes = 0
    while not done.done():
        item = items[writes % len(items)]
        version = int(await db.incr(f"src:{ns}:{item}"))
        await cache.invalidate_tags([f"item:{item}"])
        await db.set(f"floor:{ns}:{item}", version)
        writes += 1
        await asyncio.wait((done,), timeout=0.005)
    await done
    return writes


async def leases_left(db: redis.Redis, ns: str) -> list[bytes]:
    """Lease keys of namespace ``ns`` still in Redis."""
    return [key async for key in db.scan_iter(match=f"tc:{{{ns}:*}}:l:*")]


async def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--mode", default="decorator")
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--calls", type=int, default=30, help="calls per caller")
    parser.add_argument("--cancel-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start")
    args = parser.parse_args()
    db = redis.Redis.from_url(args.url)
    async with Cache.from_url(args.url, namespace=args.namespace) as cache:
        await cache.get("warm-up")  # connect and load the scripts before the start
        pause = args.start_at - time.time()
        if pause > 0:
            await asyncio.sleep(pause)
        result = await read_load(
            cache,
            db,
            mode=args.mode,
            callers=args.callers,
            calls=args.calls,
            cancel_rate=args.cancel_rate,
            seed=args.seed,
        )
    await db.aclose()
    print(json.dumps(result.as_dict()))


if __name__ == "__main__":
    asyncio.run(_main())
