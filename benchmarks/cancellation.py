"""Throughput when some callers are cancelled (client disconnects, timeouts).

50 concurrent callers read a Zipf(1.1) set of 100 items through ``get_or_set``
and through ``@cache.cached`` while a writer invalidates about 200 items a
second; the loader reads the item's version from Redis and takes ~2 ms. The
same workload runs with no cancellations and with 0.5% and 5% of calls
cancelled at a random point, in the same run (each row: 1,600 calls per caller);
the table gives reads per second of uncancelled calls, their worst wait, stale reads, and the ratio to the run
without cancellations (a lease left without an owner would stall its key for
``lease_ttl``, 10 s).

    python benchmarks/cancellation.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

import redis.asyncio as redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tagcache import Cache

from _common import table
from tests.cancel_workload import leases_left, read_load, write_load


async def run(url: str, mode: str, rate: float, calls: int) -> tuple[float, float, int, int, int, int]:
    ns = f"bench-cancel-{uuid.uuid4().hex[:8]}"
    db = redis.Redis.from_url(url)
    async with Cache.from_url(url, namespace=ns) as cache:
        started = time.perf_counter()
        reading = asyncio.ensure_future(
            read_load(cache, db, mode=mode, callers=50, calls=calls, cancel_rate=rate, seed=1)
        )
        await write_load(cache, db, until=reading, seed=2)
        duration = time.perf_counter() - started
        reads = reading.result()
        await cache.clear()
    left = len(await leases_left(db, ns))
    async for key in db.scan_iter(match=f"*:{ns}:*"):
        await db.delete(key)
    await db.aclose()
    return reads.completed / duration, reads.worst, reads.stale, reads.cancelled, left, len(reads.errors)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=1600, help="calls per caller per row")
    parser.add_argument("--smoke", action="store_true", help="short runs, to keep the script working")
    args = parser.parse_args()
    calls = 40 if args.smoke else args.calls
    rows = []
    for mode in ("get_or_set", "decorator"):
        base = None
        for rate in (0.0, 0.005, 0.05):
            ops, worst, stale, cancelled, left, errors = await run(args.url, mode, rate, calls)
            base = base or ops
            rows.append(
                [
                    mode,
                    f"{rate:.1%}",
                    f"{cancelled:,}",
                    f"{ops:,.0f}",
                    f"{ops / base:.2f}x",
                    f"{1000 * worst:.0f}",
                    str(stale),
                    str(left),
                    str(errors),
                ]
            )
    print(
        table(
            [
                "path",
                "cancelled",
                "calls cancelled",
                "uncancelled reads/s",
                "vs none cancelled",
                "worst wait ms",
                "stale reads",
                "leases left",
                "errors",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
