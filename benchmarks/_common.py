"""Shared helpers for the benchmarks: workloads, timing and table printing."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import orjson


def zipf_indices(n_keys: int, count: int, s: float = 1.1, seed: int = 7) -> list[int]:
    """``count`` key indices drawn from a Zipf(s) distribution over ``n_keys`` ranks."""
    weights = [1.0 / (rank**s) for rank in range(1, n_keys + 1)]
    cumulative = list(itertools.accumulate(weights))
    rng = random.Random(seed)
    return rng.choices(range(n_keys), cum_weights=cumulative, k=count)


def sample_value(i: int) -> dict[str, object]:
    """A dict of about 200 bytes as JSON, like a small database row."""
    value: dict[str, object] = {
        "id": i,
        "name": f"user-{i:06d}",
        "email": f"user{i:06d}@example.com",
        "active": i % 3 != 0,
        "score": i * 1.5,
        "roles": ["reader", "writer"] if i % 2 else ["reader"],
        "bio": "x" * 60,
    }
    assert 150 <= len(orjson.dumps(value)) <= 260
    return value


async def ops_per_second(
    op: Callable[[int], Awaitable[object]], indices: Sequence[int], callers: int
) -> float:
    """Run ``op`` over ``indices`` split among ``callers`` concurrent tasks; return ops/s."""
    import asyncio

    chunks = [indices[c::callers] for c in range(callers)]

    async def worker(chunk: Sequence[int]) -> None:
        for i in chunk:
            await op(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker(chunk) for chunk in chunks))
    return len(indices) / (time.perf_counter() - start)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


@contextlib.contextmanager
def cluster_url(spec: str | None) -> Iterator[str | None]:
    """The cluster URL to use: ``spec``, or a local 3-primary cluster for ``local``."""
    if spec != "local":
        yield spec
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.redis_cluster import start_cluster

    cluster = start_cluster(3, 0)
    try:
        yield f"redis+cluster://127.0.0.1:{cluster.port}/"
    finally:
        cluster.stop()
