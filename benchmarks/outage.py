"""What a Redis outage costs 50 concurrent callers of a decorated function.

A throwaway ``redis-server`` is started on a free loopback port; 50 callers
read a Zipf(1.1) key set through ``@cache.cached`` (loader: 2 ms). Then the
server is paused with SIGSTOP (it accepts connections and answers nothing)
for 5 s and for 12 s, or killed and restarted empty after 5 s. Every call is
timed; the table compares the calls made while Redis was healthy (same run)
with those made during the outage, and reports when the breaker opened and how
long after the server came back the callers were served from the cache again.

    python benchmarks/outage.py            # default settings (0.5 s timeouts, 1 s cool-down)
    python benchmarks/outage.py --smoke    # a 1 s pause, to keep the script working
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tagcache import Cache

from _common import table
from tests.outage_workload import Call, Workload, wait_until
from tests.redis_server import RedisProcess


def ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.1f}"


async def scenario(fault: str, outage: float) -> list[str]:
    server = RedisProcess()
    server.start()
    cache = Cache.from_url(server.url, namespace="bench-outage")
    work = Workload(cache)
    runner = asyncio.ensure_future(work.run(seed=11))
    try:
        await wait_until(lambda: sum(not c.loaded for c in work.calls) >= 5000, 60)  # warm
        healthy_from = time.monotonic()
        await asyncio.sleep(2.0)
        down = time.monotonic()
        server.pause() if fault == "pause" else server.kill()
        await asyncio.sleep(outage)
        up = time.monotonic()
        server.resume() if fault == "pause" else server.start()
        await wait_until(lambda: work.first_hit_after(up) is not None, 30)
        await asyncio.sleep(1.0)
    finally:
        work.stop.set()
        await runner
        opened = cache.backend.health()["breaker_opened"]  # type: ignore[attr-defined]  # RedisBackend
        await cache.aclose()
        server.close()
    healthy = [c.took for c in work.between(healthy_from, down)]
    during: list[Call] = work.between(down, up)
    took = [c.took for c in during]
    # The breaker opened once the first calls had timed out: from then on calls fail over at once.
    first_fast = next((c.started - down for c in during if c.started > down + 0.5 and c.took < 0.05), None)
    resumed = work.first_hit_after(up)
    return [
        f"{fault} {outage:g} s",
        f"{ms(healthy, 0.5)} / {ms(healthy, 0.99)}",
        f"{ms(took, 0.5)} / {ms(took, 0.99)} / {1000 * max(took, default=0):.0f}",
        f"{len(during):,}",
        f"{len(work.errors)}",
        f"{opened}",
        "-" if first_fast is None else f"{first_fast:.2f} s",
        "-" if resumed is None else f"{resumed:.2f} s",
        f"{statistics.fmean(c.loaded for c in during):.0%}" if during else "-",
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one short pause, to keep the script working")
    args = parser.parse_args()
    plan = [("pause", 1.0)] if args.smoke else [("pause", 5.0), ("pause", 12.0), ("kill", 5.0)]
    rows = [await scenario(fault, outage) for fault, outage in plan]
    print(
        table(
            [
                "outage",
                "healthy p50 / p99 ms",
                "outage p50 / p99 / max ms",
                "calls in outage",
                "exceptions",
                "breaker opened",
                "fail-over at once after",
                "cached again after recovery",
                "loader share in outage",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
