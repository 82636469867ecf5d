"""Cross-process stampede protection and fail-open against real Redis servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from tagcache import BackendError, Cache

from tests.conftest import no_redis, unique_namespace
from tests.redis_server import RedisProcess, redis_server_available

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
#: Upper bound on any step of a worker: reached only when something is broken.
PATIENCE = 60.0


class Worker:
    """A ``tests.stampede_worker`` process, driven line by line (see that module)."""

    def __init__(self, url: str, ns: str, *options: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stampede_worker", url, ns, *options],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            },
        )

    async def expect(self, line: str) -> None:
        """Wait for the worker to print ``line`` (PATIENCE: only reached when something is broken)."""
        assert self.proc.stdout is not None
        got = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), PATIENCE)
        if not got:  # the worker exited
            _, err = self.proc.communicate()
            pytest.fail(f"the worker exited before printing {line!r}: {err}")
        assert got.strip() == line, f"expected {line!r} from the worker, got {got!r}"

    def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    async def results(self) -> list[dict[str, int]]:
        def finish() -> tuple[str, str]:
            return self.proc.communicate(timeout=PATIENCE)

        out, err = await asyncio.to_thread(finish)
        assert self.proc.returncode == 0, err
        return list(json.loads(out.strip().splitlines()[-1])["results"])


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Start stampede workers; any still running after the test is killed."""
    started: list[Worker] = []

    def start(url: str, ns: str, *options: str) -> Worker:
        worker = Worker(url, ns, *options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
        worker.proc.communicate()


async def test_four_processes_run_the_function_once(redis_url: str, workers: Callable[..., Worker]) -> None:
    ns = unique_namespace("stampede")
    procs = [workers(redis_url, ns, "--callers", "250", "--delay", "0.05") for _ in range(4)]
    for proc in procs:
        await proc.expect("ready")  # connected, scripts loaded
    for proc in procs:
        proc.tell("go")  # 1000 callers in four processes on one cold key at once
    results = [r for proc in procs for r in await proc.results()]
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


async def test_waiting_processes_do_not_poll(
    dedicated_redis: RedisProcess, workers: Callable[..., Worker]
) -> None:
    url, ns = dedicated_redis.url, unique_namespace("poll")
    # A long lease: the holder computes until told to finish, however slow the machine.
    holder = workers(url, ns, "--callers", "1", "--hold", "--lease-ttl", "60")
    waiters = [workers(url, ns, "--callers", "333", "--lease-ttl", "60") for _ in range(3)]
    client = redis.Redis.from_url(url)

    async def processed() -> int:
        return int((await client.info("stats"))["total_commands_processed"])

    for proc in [holder, *waiters]:
        await proc.expect("ready")
    holder.tell("go")
    await holder.expect("computing")  # the holder has the key's lease
    for proc in waiters:
        proc.tell("go")
    for proc in waiters:
        await proc.expect("waiting")  # all 333 callers of the process wait for the holder's value
    before = await processed()
    await asyncio.sleep(0.5)  # a window in which waiters that polled would send commands
    during = await processed() - before - 1  # less our own INFO
    holder.tell("finish")
    results = [r for proc in [holder, *waiters] for r in await proc.results()]
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
