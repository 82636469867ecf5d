"""One "process" of the cross-process stampede tests: N concurrent callers of one
decorated function on a cold key. Run as ``python -m tests.stampede_worker``.

Prints one JSON line: the results the callers got and how long each waited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import redis.asyncio as redis

from tagcache import Cache


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("--callers", type=int, default=250)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start calling")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.url)
    counter = f"stampede:{args.namespace}:calls"
    async with Cache.from_url(args.url, namespace=args.namespace) as cache:

        @cache.cached(ttl=60, tags=["stampede"])
        async def load(item: int) -> dict[str, int]:
            calls = await client.incr(counter)
            await asyncio.sleep(args.delay)
            return {"item": item, "call": int(calls)}

        await cache.get("warm-up")  # connect and load scripts before the start
        pause = args.start_at - time.time()
        if pause > 0:
            await asyncio.sleep(pause)
        results = await asyncio.gather(*(load(1) for _ in range(args.callers)))
    await client.aclose()
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    asyncio.run(main())
