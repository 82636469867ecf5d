"""Cross-process stampede protection and fail-open against real Redis servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from tagcache import BackendError, Cache

from tests.conftest import no_redis, unique_namespace
from tests.redis_server import RedisProcess, redis_server_available

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent


def start_worker(url: str, ns: str, *, callers: int, delay: float, start_at: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.stampede_worker",
            url,
            ns,
            "--callers",
            str(callers),
            "--delay",
            str(delay),
            "--start-at",
            str(start_at),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def results_of(proc: subprocess.Popen[str]) -> list[dict[str, int]]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return list(json.loads(out.strip().splitlines()[-1])["results"])


async def test_four_processes_run_the_function_once(redis_url: str) -> None:
    ns = unique_namespace("stampede")
    start_at = time.time() + 2.0  # all four processes connected and waiting by then
    procs = [start_worker(redis_url, ns, callers=250, delay=0.05, start_at=start_at) for _ in range(4)]
    results = [r for proc in procs for r in await asyncio.to_thread(results_of, proc)]
    assert len(results) == 1000
    client = redis.Redis.from_url(redis_url)
    assert int(await client.get(f"stampede:{ns}:calls")) == 1
    assert all(r == {"item": 1, "call": 1} for r in results)
    await client.delete(f"stampede:{ns}:calls")
    await client.aclose()
    async with Cache.from_url(redis_url, namespace=ns) as cache:
        await cache.clear()


@pytest.fixture
def dedicated_redis() -> Iterator[RedisProcess]:
    if not redis_server_available():
        no_redis("redis-server is not on PATH, needed for a dedicated server")
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_waiting_processes_do_not_poll(dedicated_redis: RedisProcess) -> None:
    url, ns = dedicated_redis.url, unique_namespace("poll")
    now = time.time()
    holder = start_worker(url, ns, callers=1, delay=1.5, start_at=now + 1.0)
    waiters = [start_worker(url, ns, callers=333, delay=1.5, start_at=now + 1.3) for _ in range(3)]
    client = redis.Redis.from_url(url)

    async def processed() -> int:
        return int((await client.info("stats"))["total_commands_processed"])

    await asyncio.sleep(max(0.0, now + 1.7 - time.time()))  # the waiters have all checked in
    before = await processed()
    await asyncio.sleep(0.5)  # the holder is still loading (until about now + 2.5)
    during = await processed() - before - 1  # less our own INFO
    results = [r for proc in [holder, *waiters] for r in await asyncio.to_thread(results_of, proc)]
    assert int(await client.get(f"stampede:{ns}:calls")) == 1
    assert len(results) == 1000
    assert during < 50, f"{during} commands while 999 callers waited"
    await client.aclose()


async def test_fail_open_while_redis_is_down_and_recovery(dedicated_redis: RedisProcess) -> None:
    cache = Cache.from_url(dedicated_redis.url + "?socket_timeout=1&socket_connect_timeout=1", namespace="fo")
    calls = 0

    @cache.cached(ttl=60)
    async def f(x: int) -> int:
        nonlocal calls
        calls += 1
        return x * 10

    assert await f(1) == 10
    assert await f(1) == 10
    assert calls == 1
    dedicated_redis.stop()
    assert [await f(1) for _ in range(3)] == [10, 10, 10]  # served by calling the function
    assert calls == 4
    assert (await cache.stats()).errors >= 3
    dedicated_redis.start()
    deadline = time.monotonic() + 30  # the breaker's cool-down (1 s), then a probe
    while time.monotonic() < deadline:  # connections re-established on demand
        await f(2)
        with contextlib.suppress(BackendError):
            if await cache.get(f.key_for(2)) == 20:
                break
        await asyncio.sleep(0.05)
    assert await cache.get(f.key_for(2)) == 20
    before = calls
    assert await f(2) == 20
    assert calls == before  # cached again after recovery
    await cache.aclose()
