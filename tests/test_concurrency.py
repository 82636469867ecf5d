"""No stale reads under concurrency, on every backend.

Readers go through ``get_or_set`` with loaders that read the source and then
sleep before returning; writers update the source and then invalidate the
item's tag. A read that *began* after an invalidation returned and still saw
the value from before that write is a stale read. There must be none.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from tagcache import Cache
from tagcache.backends import Backend

from tests.conftest import unique_namespace

ITEMS = 8
READERS = 40
READS_PER_READER = 60
WRITES = 80


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
async def test_no_stale_reads(make_backend: Callable[..., Backend], processes: int) -> None:
    backend = make_backend()
    ns = unique_namespace("race")
    # Several Cache objects over one backend behave like several processes:
    # each has its own in-process flights, they share the store.
    caches = [Cache(backend, namespace=ns, owns_backend=False) for _ in range(processes)]
    rng = random.Random(1234)
    source = dict.fromkeys(range(ITEMS), 0)
    # Highest version of each item whose invalidation has returned.
    floor = dict.fromkeys(range(ITEMS), 0)
    stale: list[tuple[int, int, int]] = []
    loads = 0

    def loader_for(item: int) -> Callable[[], object]:
        async def load() -> int:
            nonlocal loads
            loads += 1
            version = source[item]
            await asyncio.sleep(rng.random() * 0.004)
            return version

        return load

    writing = True
    reads = 0

    async def reader(n: int) -> None:
        nonlocal reads
        cache = caches[n % processes]
        done = 0
        # Until the writer is done too: readers served from process memory (an L1) would
        # otherwise finish long before the writes, and the run would test little.
        while done < READS_PER_READER or writing:
            done += 1
            reads += 1
            item = rng.randrange(ITEMS)
            must_see = floor[item]
            got = await cache.get_or_set(f"item:{item}", loader_for(item), ttl=60, tags=[f"item:{item}"])
            if got < must_see:
                stale.append((item, got, must_see))
            await asyncio.sleep(rng.random() * 0.002)

    async def writer() -> None:
        nonlocal writing
        try:
            for n in range(WRITES):
                item = rng.randrange(ITEMS)
                source[item] += 1
                version = source[item]
                await caches[n % processes].invalidate_tags([f"item:{item}"])
                floor[item] = max(floor[item], version)
                await asyncio.sleep(rng.random() * 0.003)
        finally:
            writing = False

    await asyncio.gather(writer(), *(reader(n) for n in range(READERS)))
    total_reads = reads
    stats = [await cache.stats() for cache in caches]
    hits = sum(s.hits for s in stats)
    assert stale == [], f"{len(stale)} stale reads of {total_reads}: {stale[:5]}"
    # The test must exercise the cache: many reads served from it, many loads.
    assert hits > total_reads // 10, hits
    assert loads >= WRITES // 2, loads
    await caches[0].clear()
