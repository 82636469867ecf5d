"""A reader process for the L1 stale-read test (``tests/test_local.py``).

``python -m tests.l1_worker URL NAMESPACE ITEMS SECONDS``: reads random items through a
``Cache`` with a ``LocalCache`` for SECONDS (the loader reads the item's version from
the plain Redis key ``<NAMESPACE>:src:<item>``, the "database"), then prints one JSON
object: ``{"reads": [[item, began, version], ...], "local_hits": n}`` with
``time.monotonic()`` times (one clock for every process of the machine). Prints
``ready`` first, once its L1 is subscribed, and waits for a line on stdin to start.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import redis.asyncio as aioredis

from tagcache import Cache, LocalCache


async def main(url: str, ns: str, items: int, seconds: float) -> None:
    cache = Cache.from_url(url, namespace=ns, local=LocalCache(ttl=60))
    db = aioredis.Redis.from_url(url)
    layer: Any = cache.backend
    await cache.get("warm")
    while not layer.health()["local_live"]:  # noqa: ASYNC110  # a figure, no event to wait on
        await asyncio.sleep(0.001)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    rng = random.Random()
    reads: list[list[float]] = []

    async def reader() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            item = rng.randrange(items)

            async def load(item: int = item) -> int:
                version = int(await db.get(f"{ns}:src:{item}") or 0)
                await asyncio.sleep(rng.random() * 0.002)
                return version

            began = time.monotonic()
            got = await cache.get_or_set(f"item:{item}", load, ttl=60, tags=[f"item:{item}"])
            reads.append([item, began, got])
            await asyncio.sleep(rng.random() * 0.002)

    await asyncio.gather(*(reader() for _ in range(8)))
    print(json.dumps({"reads": reads, "local_hits": layer.health()["local_hits"]}), flush=True)
    await cache.aclose()
    await db.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
