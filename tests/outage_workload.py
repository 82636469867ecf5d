"""50 callers of a decorated function on a Zipf key set, recording every call's duration
and whether it ran the loader. Shared by ``tests/test_faults.py`` and ``benchmarks/outage.py``."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tagcache import Cache

CALLERS = 50
KEYS = 200


def zipf_keys(rng: random.Random, n: int) -> list[int]:
    weights = [1 / (k + 1) ** 1.1 for k in range(KEYS)]
    return rng.choices(range(KEYS), weights, k=n)


@dataclass
class Call:
    started: float
    took: float
    loaded: bool


@dataclass
class Workload:
    """``CALLERS`` callers of a decorated function on a Zipf key set, recording every call."""

    cache: Cache
    calls: list[Call] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, seed: int) -> None:
        rng = random.Random(seed)
        loaded = False

        @self.cache.cached(ttl=120, tags=["items"])
        async def item(k: int) -> str:
            nonlocal loaded
            loaded = True
            await asyncio.sleep(0.002)  # the database query
            return f"v{k}"

        async def caller(n: int) -> None:
            nonlocal loaded
            keys = zipf_keys(random.Random(seed * 1000 + n), 100_000)
            i = 0
            while not self.stop.is_set():
                k = keys[i % len(keys)]
                i += 1
                loaded = False
                started = time.monotonic()
                try:
                    got = await item(k)
                except Exception as exc:
                    self.errors.append(exc)
                    continue
                took = time.monotonic() - started
                assert got == f"v{k}"
                self.calls.append(Call(started, took, loaded))
                await asyncio.sleep(rng.random() * 0.002)

        await asyncio.gather(*(caller(n) for n in range(CALLERS)))

    def between(self, start: float, end: float) -> list[Call]:
        return [c for c in self.calls if start <= c.started and c.started + c.took <= end]

    def first_hit_after(self, moment: float) -> float | None:
        hits = [c.started + c.took for c in self.calls if c.started >= moment and not c.loaded]
        return min(hits) - moment if hits else None


async def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition`` (a cheap check of recorded calls) until it holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
