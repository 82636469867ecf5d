"""Cross-process invalidation latency of the in-process L1 (``LocalCache``).

Process A (this one) and process B (a child) each have a ``Cache`` with an L1 over
the same Redis. For each trial, B reads a fresh key carrying a fresh tag and waits
until its L1 holds a copy; A invalidates the tag; B notes the moment its copy is
dropped. The figure is that moment less the moment ``invalidate_tags`` returned in
A (both read ``time.monotonic()``, one clock for every process of the machine); a
copy dropped before the call returned in A counts as 0. Percentiles over the trials.

    python benchmarks/propagation.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection
from typing import Any

from tagcache import Cache, LocalCache

NAMESPACE = "bench-propagation"


async def follower(url: str, pipe: Connection) -> None:
    """Process B: for each key A names, read it, wait for the copy, then time its drop."""
    cache = Cache.from_url(url, namespace=NAMESPACE, local=LocalCache(ttl=60))
    layer: Any = cache.backend
    loop = asyncio.get_running_loop()
    await cache.get("warm")
    while not layer.health()["local_live"]:  # noqa: ASYNC110  # a figure, no event to wait on
        await asyncio.sleep(0.001)
    try:
        while True:
            key = await loop.run_in_executor(None, pipe.recv)
            if key is None:
                break
            await cache.get(key)
            while layer.get_local(NAMESPACE, key) is None:  # noqa: ASYNC110  # as above
                await asyncio.sleep(0.0005)
            pipe.send("ready")
            while layer.get_local(NAMESPACE, key) is not None:  # noqa: ASYNC110  # polled as tightly as the loop allows
                await asyncio.sleep(0)
            pipe.send(time.monotonic())
    finally:
        await cache.aclose()


def run_follower(url: str, pipe: Connection) -> None:
    asyncio.run(follower(url, pipe))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    ours, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=run_follower, args=(args.url, theirs))
    child.start()
    cache = Cache.from_url(args.url, namespace=NAMESPACE, local=LocalCache(ttl=60))
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    early = 0
    try:
        await cache.clear()
        for n in range(args.trials):
            key, tag = f"k{n}", f"t{n}"
            await cache.set(key, n, tags=[tag])
            ours.send(key)
            assert await loop.run_in_executor(None, ours.recv) == "ready"
            await cache.invalidate_tags([tag])
            returned = time.monotonic()
            dropped = await loop.run_in_executor(None, ours.recv)
            latency = dropped - returned
            early += latency < 0
            latencies.append(max(0.0, latency) * 1000)
        ours.send(None)
    finally:
        await cache.clear()
        await cache.aclose()
        child.join(10)
        if child.is_alive():
            child.kill()
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    report = {
        "trials": len(latencies),
        "p50_ms": statistics.median(ordered),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": ordered[-1],
        "dropped_before_return": early,
    }
    print(
        f"L1 invalidation propagation, process A to process B over {args.url} ({len(latencies)} trials): "
        f"p50 {report['p50_ms']:.3f} ms, p90 {report['p90_ms']:.3f} ms, p99 {report['p99_ms']:.3f} ms, "
        f"max {report['max_ms']:.3f} ms (target p99 < 10 ms); {early} copies were dropped before "
        "invalidate_tags returned in A"
    )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--smoke", action="store_true", help="a few trials, for CI")
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.trials = 20
    result = asyncio.run(main(arguments))
    if arguments.json:
        with open(arguments.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
